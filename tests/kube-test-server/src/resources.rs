//! The resource types the server knows: built-ins and those registered by CRDs.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::error::{ApiError, Cause};

pub const CRD_GROUP: &str = "apiextensions.k8s.io";
pub const CRD_PLURAL: &str = "customresourcedefinitions";

/// Which behaviour beyond the generic object store a resource has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Custom,
    Crd,
    Namespace,
    Secret,
    CoreEvent,
    Event,
    Lease,
    ConfigMap,
}

/// One served version of a resource.
#[derive(Clone)]
pub struct Version {
    pub name: String,
    pub schema: Option<Value>,
    pub cel: Option<Arc<kube_cel::CompiledSchema>>,
    pub status_subresource: bool,
    pub printer_columns: Vec<Value>,
}

impl std::fmt::Debug for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Version")
            .field("name", &self.name)
            .field("status_subresource", &self.status_subresource)
            .finish_non_exhaustive()
    }
}

/// A resource type (group + plural), served at one or more versions.
#[derive(Clone, Debug)]
pub struct Resource {
    pub group: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Served versions, in the order the CRD lists them.
    pub versions: Vec<Version>,
    pub storage_version: String,
    pub flavor: Flavor,
    /// Whether `metadata.generation` is maintained.
    pub generation: bool,
}

pub const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

impl Resource {
    pub fn version(&self, v: &str) -> Option<&Version> {
        self.versions.iter().find(|x| x.name == v)
    }

    pub fn api_version(&self, v: &str) -> String {
        if self.group.is_empty() {
            v.to_string()
        } else {
            format!("{}/{v}", self.group)
        }
    }

    pub fn has_status(&self, v: &str) -> bool {
        self.version(v).is_some_and(|x| x.status_subresource)
    }

    /// The field paths `fieldSelector` may use.
    pub fn field_labels(&self) -> Option<&'static [&'static str]> {
        match self.flavor {
            Flavor::Custom | Flavor::Crd | Flavor::Lease | Flavor::ConfigMap => {
                Some(&["metadata.name", "metadata.namespace"])
            }
            Flavor::Namespace => Some(&["metadata.name", "status.phase"]),
            Flavor::Secret => Some(&["metadata.name", "metadata.namespace", "type"]),
            Flavor::CoreEvent | Flavor::Event => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn builtin(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        short: &[&str],
        flavor: Flavor,
        status: bool,
    ) -> Resource {
        Resource {
            group: group.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            list_kind: format!("{kind}List"),
            namespaced,
            short_names: short.iter().map(|s| s.to_string()).collect(),
            categories: Vec::new(),
            versions: vec![Version {
                name: version.into(),
                schema: None,
                cel: None,
                status_subresource: status,
                printer_columns: Vec::new(),
            }],
            storage_version: version.into(),
            flavor,
            generation: flavor == Flavor::Crd,
        }
    }

    /// The built-in resources.
    pub fn builtins() -> Vec<Resource> {
        vec![
            Resource::builtin(
                "",
                "v1",
                "namespaces",
                "Namespace",
                false,
                &["ns"],
                Flavor::Namespace,
                true,
            ),
            Resource::builtin(
                "",
                "v1",
                "secrets",
                "Secret",
                true,
                &[],
                Flavor::Secret,
                false,
            ),
            Resource::builtin(
                "",
                "v1",
                "configmaps",
                "ConfigMap",
                true,
                &["cm"],
                Flavor::ConfigMap,
                false,
            ),
            Resource::builtin(
                "",
                "v1",
                "events",
                "Event",
                true,
                &["ev"],
                Flavor::CoreEvent,
                false,
            ),
            Resource::builtin(
                "events.k8s.io",
                "v1",
                "events",
                "Event",
                true,
                &["ev"],
                Flavor::Event,
                false,
            ),
            Resource::builtin(
                "coordination.k8s.io",
                "v1",
                "leases",
                "Lease",
                true,
                &[],
                Flavor::Lease,
                false,
            ),
            Resource::builtin(
                CRD_GROUP,
                "v1",
                CRD_PLURAL,
                "CustomResourceDefinition",
                false,
                &["crd", "crds"],
                Flavor::Crd,
                true,
            ),
        ]
    }

    /// The resource a CRD object defines, or the reasons it is invalid.
    pub fn from_crd(crd: &Value) -> Result<Resource, Vec<Cause>> {
        let mut errs = Vec::new();
        let spec = crd.get("spec").cloned().unwrap_or(Value::Null);
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let group = s(&spec, "group");
        let names = spec.get("names").cloned().unwrap_or(Value::Null);
        let plural = s(&names, "plural");
        let kind = s(&names, "kind");
        let scope = s(&spec, "scope");
        if group.is_empty() {
            errs.push(Cause::new(
                "FieldValueRequired",
                "spec.group",
                "Required value",
            ));
        } else if !group.contains('.') {
            errs.push(Cause::new(
                "FieldValueInvalid",
                "spec.group",
                format!("Invalid value: {group:?}: should be a domain with at least one dot"),
            ));
        }
        if plural.is_empty() {
            errs.push(Cause::new(
                "FieldValueRequired",
                "spec.names.plural",
                "Required value",
            ));
        }
        if kind.is_empty() {
            errs.push(Cause::new(
                "FieldValueRequired",
                "spec.names.kind",
                "Required value",
            ));
        }
        if scope != "Namespaced" && scope != "Cluster" {
            errs.push(Cause::new(
                "FieldValueNotSupported",
                "spec.scope",
                format!(
                    "Unsupported value: {scope:?}: supported values: \"Cluster\", \"Namespaced\""
                ),
            ));
        }
        let name = crate::util::meta_str(crd, "name");
        if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
            errs.push(Cause::new(
                "FieldValueInvalid",
                "metadata.name",
                format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
            ));
        }
        let mut versions = Vec::new();
        let mut storage = Vec::new();
        let list = spec
            .get("versions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if list.is_empty() {
            errs.push(Cause::new(
                "FieldValueInvalid",
                "spec.versions",
                "Invalid value: \"null\": must have exactly one version marked as storage version",
            ));
        }
        for (i, v) in list.iter().enumerate() {
            let vname = s(v, "name");
            if vname.is_empty() {
                errs.push(Cause::new(
                    "FieldValueRequired",
                    format!("spec.versions[{i}].name"),
                    "Required value",
                ));
            }
            if v.get("storage").and_then(Value::as_bool) == Some(true) {
                storage.push(vname.clone());
            }
            if v.get("served").and_then(Value::as_bool) != Some(true) {
                continue;
            }
            let schema = v.pointer("/schema/openAPIV3Schema").cloned();
            let mut cel = None;
            if let Some(sc) = &schema {
                crate::schema::check_schema(
                    sc,
                    &format!("spec.versions[{i}].schema.openAPIV3Schema"),
                    &mut errs,
                );
                let compiled = kube_cel::compile_schema(sc);
                for e in compiled.compilation_errors() {
                    tracing::warn!(crd = name, version = %vname, error = %e, "CEL rule does not compile");
                }
                cel = Some(Arc::new(compiled));
            }
            versions.push(Version {
                name: vname,
                schema,
                cel,
                status_subresource: v.pointer("/subresources/status").is_some(),
                printer_columns: v
                    .get("additionalPrinterColumns")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            });
        }
        if !list.is_empty() && storage.len() != 1 {
            errs.push(Cause::new(
                "FieldValueInvalid",
                "spec.versions",
                format!(
                    "Invalid value: {:?}: must have exactly one version marked as storage version",
                    storage
                ),
            ));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let strs = |k: &str| -> Vec<String> {
            names
                .get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let singular = match s(&names, "singular") {
            x if x.is_empty() => kind.to_lowercase(),
            x => x,
        };
        let list_kind = match s(&names, "listKind") {
            x if x.is_empty() => format!("{kind}List"),
            x => x,
        };
        Ok(Resource {
            group,
            plural,
            singular,
            kind,
            list_kind,
            namespaced: scope == "Namespaced",
            short_names: strs("shortNames"),
            categories: strs("categories"),
            versions,
            storage_version: storage.into_iter().next().unwrap_or_default(),
            flavor: Flavor::Custom,
            generation: true,
        })
    }
}

/// Kubernetes version priority: GA before beta before alpha, higher numbers first, then others
/// alphabetically. Returns a sort key (smaller sorts first).
pub fn version_priority(v: &str) -> (u8, i64, i64, String) {
    let parse = |s: &str| -> Option<(i64, u8, i64)> {
        let rest = s.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major: i64 = digits.parse().ok()?;
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return Some((major, 0, 0));
        }
        for (kind, rank) in [("beta", 1u8), ("alpha", 2u8)] {
            if let Some(n) = tail.strip_prefix(kind) {
                return Some((major, rank, n.parse().ok()?));
            }
        }
        None
    };
    match parse(v) {
        Some((major, rank, minor)) => (rank, -major, -minor, String::new()),
        None => (3, 0, 0, v.to_string()),
    }
}

/// The CRD conditions and accepted names written on registration.
pub fn crd_status(crd: &Value, res: &Resource, now: &str) -> Value {
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let mut accepted = names;
    if let Some(m) = accepted.as_object_mut() {
        m.entry("singular")
            .or_insert_with(|| Value::String(res.singular.clone()));
        m.entry("listKind")
            .or_insert_with(|| Value::String(res.list_kind.clone()));
    }
    json!({
        "acceptedNames": accepted,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now}
        ],
        "storedVersions": [res.storage_version],
    })
}

/// 422 for a CRD that does not define a usable resource.
pub fn invalid_crd(crd: &Value, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid(
        CRD_GROUP,
        "CustomResourceDefinition",
        crate::util::meta_str(crd, "name"),
        causes,
    )
}

/// Field names of an Event in core/v1 and in events.k8s.io/v1 (the rest are the same).
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("message", "note"),
    ("involvedObject", "regarding"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

fn rename_event(obj: &Value, core_to_events: bool, api_version: &str) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        for (core, new) in EVENT_FIELDS {
            let (from, to) = if core_to_events {
                (core, new)
            } else {
                (new, core)
            };
            m.remove(*to);
            if let Some(x) = m.remove(*from) {
                m.insert((*to).into(), x);
            }
        }
        m.insert("apiVersion".into(), Value::String(api_version.into()));
        m.insert("kind".into(), Value::String("Event".into()));
    }
    v
}

/// A stored core/v1 Event as events.k8s.io/v1 serves it.
pub fn core_event_to_events(obj: &Value) -> Value {
    rename_event(obj, true, "events.k8s.io/v1")
}

/// An events.k8s.io/v1 Event as core/v1 stores it.
pub fn events_event_to_core(obj: &Value) -> Value {
    rename_event(obj, false, "v1")
}

/// What events.k8s.io/v1 requires of a new Event (the core/v1 API is laxer).
pub fn validate_events_event(obj: &Value) -> Result<(), ApiError> {
    let text = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("");
    let mut causes = Vec::new();
    if obj.get("eventTime").is_none_or(Value::is_null) {
        causes.push(Cause::new(
            "FieldValueRequired",
            "eventTime",
            "Required value",
        ));
    }
    let qualified = regex::Regex::new("^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$").ok();
    let controller = text("reportingController");
    if controller.is_empty() {
        causes.push(Cause::new(
            "FieldValueRequired",
            "reportingController",
            "Required value",
        ));
    }
    let name_part = controller.rsplit('/').next().unwrap_or("");
    if name_part.is_empty() {
        causes.push(Cause::new(
            "FieldValueInvalid",
            "reportingController",
            format!("Invalid value: {controller:?}: name part must be non-empty"),
        ));
    }
    if !qualified.is_some_and(|r| r.is_match(name_part)) || name_part.len() > 63 {
        causes.push(Cause::new(
            "FieldValueInvalid",
            "reportingController",
            format!("Invalid value: {controller:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"),
        ));
    }
    for (field, max) in [("reportingInstance", 128), ("action", 128), ("reason", 128)] {
        let v = text(field);
        if v.is_empty() {
            causes.push(Cause::new("FieldValueRequired", field, "Required value"));
        } else if v.len() > max {
            causes.push(Cause::new(
                "FieldValueInvalid",
                field,
                format!("Invalid value: {v:?}: can have at most {max} characters"),
            ));
        }
    }
    if text("note").len() > 1024 {
        causes.push(Cause::new(
            "FieldValueInvalid",
            "note",
            "Invalid value: \"\": can have at most 1024 characters",
        ));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "events.k8s.io",
            "Event",
            obj.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or(""),
            causes,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order() {
        let mut v = vec!["v1alpha1", "v2", "v1beta2", "v1", "foo", "v1beta1", "v10"];
        v.sort_by_key(|x| version_priority(x));
        assert_eq!(
            v,
            vec!["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }
}
