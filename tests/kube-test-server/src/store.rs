//! The object store and the API semantics of writes: create, update, patch, apply, delete,
//! with resource versions, generations, finalizers, the status subresource, validation and
//! the watch event history.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::error::{ApiError, Cause, qualified};
use crate::managed::{self, Scope};
use crate::resources::{CRD_GROUP, CRD_PLURAL, Flavor, Resource, crd_status, invalid_crd};
use crate::selector::{FieldSelector, LabelSelector};
use crate::util::{self, meta_mut, meta_str};

/// (group, plural)
pub type ResKey = (String, String);
/// (namespace or "", name)
pub type ObjKey = (String, String);

const CRD_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

/// `fieldValidation`: what to do with fields the schema does not declare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

/// Options common to writes.
#[derive(Clone, Debug)]
pub struct WriteOpts {
    pub dry_run: bool,
    pub validation: FieldValidation,
    /// The field manager: the `fieldManager` parameter, else derived from the User-Agent.
    pub manager: String,
    /// Whether `fieldManager` was given explicitly (server-side apply requires it).
    pub manager_given: bool,
    pub force: bool,
}

impl Default for WriteOpts {
    fn default() -> Self {
        WriteOpts {
            dry_run: false,
            validation: FieldValidation::Warn,
            manager: "kube-test-server".into(),
            manager_given: false,
            force: false,
        }
    }
}

/// Options of a delete.
#[derive(Clone, Debug, Default)]
pub struct DeleteOpts {
    pub dry_run: bool,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// The patch content types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    Apply,
}

/// The result of a write.
#[derive(Debug)]
pub struct Outcome {
    pub object: Value,
    pub created: bool,
    pub warnings: Vec<String>,
}

/// What a request addresses.
#[derive(Clone, Debug)]
pub struct Target {
    pub res: Arc<Resource>,
    pub version: String,
    pub namespace: Option<String>,
    pub sub: Option<String>,
}

impl Target {
    pub fn key(&self) -> ResKey {
        if self.res.flavor == Flavor::Event {
            // events.k8s.io/v1 Events are core/v1 Events, stored once.
            return (String::new(), "events".into());
        }
        (self.res.group.clone(), self.res.plural.clone())
    }

    fn obj_key(&self, name: &str) -> ObjKey {
        let ns = if self.res.namespaced {
            self.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        };
        (ns, name.to_string())
    }

    fn is_status(&self) -> bool {
        self.sub.as_deref() == Some("status")
    }

    fn scope(&self) -> Scope {
        if self.is_status() {
            Scope::Status
        } else {
            Scope::Main {
                status_is_subresource: self.res.has_status(&self.version),
            }
        }
    }
}

/// A watch event type (`ADDED`, ...) and its object.
pub type TypedEvent = (&'static str, Value);

/// One entry of the watch history.
#[derive(Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub key: ResKey,
    pub etype: &'static str,
    pub object: Value,
    pub prev: Option<Value>,
}

/// Which objects a watch or list selects.
#[derive(Clone, Debug)]
pub struct Filter {
    pub key: ResKey,
    pub namespace: Option<String>,
    pub label: LabelSelector,
    pub field: FieldSelector,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && meta_str(obj, "namespace") != ns
        {
            return false;
        }
        self.label.matches(obj) && self.field.matches(obj)
    }
}

/// Sets `apiVersion` for the version a client asked for (conversion strategy `None`).
pub fn view(obj: &Value, res: &Resource, version: &str) -> Value {
    let mut v = if res.flavor == Flavor::Event && obj["apiVersion"] == "v1" {
        crate::resources::core_event_to_events(obj)
    } else {
        obj.clone()
    };
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), Value::String(res.api_version(version)));
        m.insert("kind".into(), Value::String(res.kind.clone()));
    }
    v
}

fn strip_times(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(list) = v
        .pointer_mut("/metadata/managedFields")
        .and_then(Value::as_array_mut)
    {
        for e in list {
            if let Some(m) = e.as_object_mut() {
                m.remove("time");
            }
        }
    }
    v
}

fn without_metadata(v: &Value, status_too: bool) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        if status_too {
            m.remove("status");
        }
        m.remove("metadata");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253
        && !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn dns1123_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && dns1123_subdomain(s)
}

fn label_name_ok(s: &str) -> bool {
    s.len() <= 63
        && !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

/// `metadata` checks every resource gets: name syntax and label syntax.
fn validate_meta(res: &Resource, obj: &Value, errs: &mut Vec<Cause>) {
    let name = meta_str(obj, "name");
    if res.flavor == Flavor::Namespace {
        if !dns1123_label(name) {
            errs.push(Cause::new(
                "FieldValueInvalid",
                "metadata.name",
                format!("Invalid value: {name:?}: {LABEL_MSG}"),
            ));
        }
    } else if name.len() > 253 {
        errs.push(Cause::new(
            "FieldValueInvalid",
            "metadata.name",
            format!("Invalid value: {name:?}: must be no more than 253 characters"),
        ));
    } else if !dns1123_subdomain(name) {
        errs.push(Cause::new(
            "FieldValueInvalid",
            "metadata.name",
            format!("Invalid value: {name:?}: {SUBDOMAIN_MSG}"),
        ));
    }
    if let Some(labels) = obj.pointer("/metadata/labels") {
        let Some(labels) = labels.as_object() else {
            errs.push(Cause::new(
                "FieldValueTypeInvalid",
                "metadata.labels",
                "Invalid value: \"object\": must be a map of strings",
            ));
            return;
        };
        for (k, v) in labels {
            let (prefix, key_name) = match k.rsplit_once('/') {
                Some((p, n)) => (Some(p), n),
                None => (None, k.as_str()),
            };
            if !label_name_ok(key_name) || prefix.is_some_and(|p| !dns1123_subdomain(p)) {
                errs.push(Cause::new(
                    "FieldValueInvalid",
                    "metadata.labels",
                    format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"),
                ));
            }
            match v.as_str() {
                Some(s) if s.is_empty() || label_name_ok(s) => {}
                _ => errs.push(Cause::new(
                    "FieldValueInvalid",
                    "metadata.labels",
                    format!("Invalid value: {}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')", crate::error::show_value(v)),
                )),
            }
        }
    }
    if let Some(ann) = obj.pointer("/metadata/annotations")
        && !ann
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string))
    {
        errs.push(Cause::new(
            "FieldValueTypeInvalid",
            "metadata.annotations",
            "Invalid value: \"object\": must be a map of strings",
        ));
    }
}

/// Removes strategic-merge-patch directives (`$patch`, `$setElementOrder/...`, ...), which
/// this server does not interpret: strategic merge patch is applied as a JSON merge patch.
fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            for x in m.values_mut() {
                strip_directives(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

/// Applies a JSON patch the way the API server (evanphx/json-patch) does: as there, a `test`
/// against `null` passes when the member is missing (kube's finalizer helper relies on it).
fn json_patch_go(
    doc: &mut Value,
    ops: &[json_patch::PatchOperation],
) -> Result<(), json_patch::PatchError> {
    for op in ops {
        if let json_patch::PatchOperation::Test(t) = op
            && t.value.is_null()
            && doc.pointer(t.path.as_str()).is_none()
        {
            let parent = t
                .path
                .as_str()
                .rsplit_once('/')
                .map(|(p, _)| p)
                .unwrap_or("");
            if doc.pointer(parent).is_some() {
                continue;
            }
        }
        json_patch::patch(doc, std::slice::from_ref(op))?;
    }
    Ok(())
}

/// ObjectMeta's `finalizers` is `omitempty`: an emptied list is stored (and answered) as
/// none, so the operator's `test /metadata/finalizers null` guard passes after a removal.
fn drop_empty_finalizers(obj: &mut Value) {
    if let Some(meta) = meta_mut(obj)
        && meta
            .get("finalizers")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
    {
        meta.remove("finalizers");
    }
}

/// coordination.k8s.io/v1 `ValidateLeaseSpec`: the duration must be positive and the
/// transitions count not negative.
fn validate_lease(res: &Resource, obj: &Value, name: &str) -> Result<(), ApiError> {
    if res.flavor != Flavor::Lease {
        return Ok(());
    }
    let mut causes = Vec::new();
    if let Some(d) = obj
        .pointer("/spec/leaseDurationSeconds")
        .and_then(Value::as_i64)
        && d <= 0
    {
        causes.push(Cause::new(
            "FieldValueInvalid",
            "spec.leaseDurationSeconds",
            format!("Invalid value: {d}: must be greater than 0"),
        ));
    }
    if let Some(n) = obj
        .pointer("/spec/leaseTransitions")
        .and_then(Value::as_i64)
        && n < 0
    {
        causes.push(Cause::new(
            "FieldValueInvalid",
            "spec.leaseTransitions",
            format!("Invalid value: {n}: must be greater than or equal to 0"),
        ));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&res.group, &res.kind, name, causes))
    }
}

/// kube-apiserver's answer to a continue token whose revision etcd has compacted.
const INCONSISTENT_CONTINUE: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

/// A continue token as kube-apiserver writes it (`storage.EncodeContinue`): base64url of
/// `{"v":"meta.k8s.io/v1","rv":N,"start":"/<key after the list's prefix>\u0000"}`. The key
/// is `name` in a namespace's list, `namespace/name` in a list across namespaces.
fn encode_continue(last: &ObjKey, in_namespace: bool, rv: i64) -> String {
    let key = if in_namespace || last.0.is_empty() {
        last.1.clone()
    } else {
        format!("{}/{}", last.0, last.1)
    };
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("/{key}\u{0}")});
    util::base64_raw_url(token.to_string().as_bytes())
}

/// The last key returned and the resourceVersion of a continue token, or the 400 kube-apiserver
/// answers for it (`storage.DecodeContinue`'s wording).
fn decode_continue(token: &str, in_namespace: bool) -> Result<(ObjKey, i64), ApiError> {
    let invalid = |why: String| ApiError::bad_request(format!("invalid continue token: {why}"));
    let generic = "continue key is not valid";
    let bytes =
        util::base64_raw_url_decode(token).map_err(|e| invalid(format!("{generic}: {e}")))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        // Go's encoding/json wording for the common cases.
        let why = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => "unexpected end of JSON input".to_string(),
            Some(&b) if !b"{[\"-0123456789tfn".contains(&b) => format!(
                "invalid character {:?} looking for beginning of value",
                char::from(b)
            ),
            Some(_) => e.to_string(),
        };
        invalid(format!("{generic}: {why}"))
    })?;
    let version = v["v"].as_str().unwrap_or_default();
    if version != "meta.k8s.io/v1" {
        return Err(invalid(format!(
            "{generic}: server does not recognize this encoded version {version}"
        )));
    }
    let rv = v["rv"].as_i64().unwrap_or(0);
    if rv == 0 {
        return Err(invalid(format!(
            "{generic}: incorrect encoded start resourceVersion (version meta.k8s.io/v1)"
        )));
    }
    let start = v["start"].as_str().unwrap_or_default();
    if start.is_empty() {
        return Err(invalid(format!(
            "{generic}: encoded start key empty (version meta.k8s.io/v1)"
        )));
    }
    let Some(key) = start.strip_prefix('/') else {
        return Err(invalid(format!("{generic}: {start}")));
    };
    let key = key.trim_end_matches('\u{0}');
    let ok = match key.split_once('/') {
        Some((ns, name)) if !in_namespace => (ns.to_string(), name.to_string()),
        _ => (String::new(), key.to_string()),
    };
    Ok((ok, rv))
}

/// The whole server state behind one lock.
pub struct Store {
    resources: BTreeMap<ResKey, Arc<Resource>>,
    objects: HashMap<ResKey, BTreeMap<ObjKey, Value>>,
    rv: u64,
    history: VecDeque<Arc<WatchEvent>>,
    history_cap: usize,
    /// A watch from a resourceVersion at or above this can be resumed from the history.
    oldest_valid: u64,
    /// Per resource, the resourceVersion its watch cache started at (server start for
    /// built-ins, registration for custom resources): a watch from an older one gets 410.
    cache_start: HashMap<ResKey, u64>,
    notify: watch::Sender<u64>,
}

impl Store {
    pub fn new(history_cap: usize) -> Store {
        let (notify, _) = watch::channel(0);
        let mut store = Store {
            resources: BTreeMap::new(),
            objects: HashMap::new(),
            rv: 0,
            history: VecDeque::new(),
            history_cap: history_cap.max(1),
            oldest_valid: 0,
            cache_start: HashMap::new(),
            notify,
        };
        for r in Resource::builtins() {
            store
                .resources
                .insert((r.group.clone(), r.plural.clone()), Arc::new(r));
        }
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            if let Some(t) = store.target("", "v1", "namespaces", None, None) {
                let body = json!({"metadata": {"name": ns}});
                if let Err(e) = store.create(&t, body, &WriteOpts::default(), None) {
                    tracing::warn!(error = %e, "could not create namespace {ns}");
                }
            }
        }
        let start = store.rv;
        store.cache_start = store.resources.keys().map(|k| (k.clone(), start)).collect();
        store
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn resources(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.resources.values()
    }

    pub fn resource(&self, group: &str, plural: &str) -> Option<Arc<Resource>> {
        self.resources
            .get(&(group.to_string(), plural.to_string()))
            .cloned()
    }

    /// A target for a served version of a resource.
    pub fn target(
        &self,
        group: &str,
        version: &str,
        plural: &str,
        namespace: Option<&str>,
        sub: Option<&str>,
    ) -> Option<Target> {
        let res = self.resource(group, plural)?;
        res.version(version)?;
        Some(Target {
            res,
            version: version.to_string(),
            namespace: namespace.map(str::to_string),
            sub: sub.map(str::to_string),
        })
    }

    pub fn object_counts(&self) -> BTreeMap<String, usize> {
        self.objects
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|((g, p), m)| (qualified(p, g), m.len()))
            .collect()
    }

    /// Drops the watch history and moves the resourceVersion on (without an event), so every
    /// resourceVersion handed out so far is too old: a watch from any of them gets 410 Gone,
    /// while a new list returns a version that can be watched from.
    pub fn compact(&mut self) {
        self.history.clear();
        self.rv += 1;
        self.oldest_valid = self.rv;
    }

    fn stored(&self, key: &ResKey, ok: &ObjKey) -> Option<&Value> {
        self.objects.get(key).and_then(|m| m.get(ok))
    }

    pub fn get_raw(
        &self,
        group: &str,
        plural: &str,
        ns: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let res = self.resource(group, plural)?;
        let ns = if res.namespaced {
            ns.unwrap_or("default")
        } else {
            ""
        };
        self.stored(
            &(group.to_string(), plural.to_string()),
            &(ns.to_string(), name.to_string()),
        )
        .map(|o| view(o, &res, &res.storage_version))
    }

    pub fn list_raw(&self, group: &str, plural: &str) -> Vec<Value> {
        let Some(res) = self.resource(group, plural) else {
            return Vec::new();
        };
        self.objects
            .get(&(group.to_string(), plural.to_string()))
            .map(|m| {
                m.values()
                    .map(|o| view(o, &res, &res.storage_version))
                    .collect()
            })
            .unwrap_or_default()
    }

    // -----------------------------------------------------------------------------------------
    // Events

    fn emit(&mut self, key: &ResKey, etype: &'static str, object: Value, prev: Option<Value>) {
        self.history.push_back(Arc::new(WatchEvent {
            rv: self.rv,
            key: key.clone(),
            etype,
            object,
            prev,
        }));
        while self.history.len() > self.history_cap {
            if let Some(e) = self.history.pop_front() {
                self.oldest_valid = e.rv;
            }
        }
        self.notify.send_replace(self.rv);
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn set_rv(obj: &mut Value, rv: u64) {
        if let Some(m) = meta_mut(obj) {
            m.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
    }

    /// The current objects a filter selects, and the resourceVersion of that state.
    pub fn snapshot(&self, f: &Filter) -> (Vec<Value>, u64) {
        let items = self
            .objects
            .get(&f.key)
            .map(|m| m.values().filter(|o| f.matches(o)).cloned().collect())
            .unwrap_or_default();
        (items, self.rv)
    }

    /// The events after `cursor` a watch with this filter sees, and the new cursor; or, when
    /// the history no longer reaches back to `cursor`, `Err(oldest resumable version)`.
    pub fn events_since(&self, f: &Filter, cursor: u64) -> Result<(Vec<TypedEvent>, u64), u64> {
        let oldest = self
            .cache_start
            .get(&f.key)
            .copied()
            .unwrap_or(0)
            .max(self.oldest_valid);
        if cursor < oldest {
            return Err(oldest);
        }
        let start = self.history.partition_point(|e| e.rv <= cursor);
        let mut out = Vec::new();
        for e in self.history.iter().skip(start) {
            if e.key != f.key {
                continue;
            }
            let now = f.matches(&e.object);
            let etype = match e.etype {
                "MODIFIED" => {
                    let before = e.prev.as_ref().is_some_and(|p| f.matches(p));
                    match (before, now) {
                        (true, true) => "MODIFIED",
                        (false, true) => "ADDED",
                        (true, false) => "DELETED",
                        (false, false) => continue,
                    }
                }
                other if now => other,
                _ => continue,
            };
            out.push((etype, e.object.clone()));
        }
        Ok((out, self.rv))
    }

    /// The objects of a resource as they were at resourceVersion `rv`, rebuilt from the
    /// current ones by undoing the history after `rv`; `None` when the history no longer
    /// reaches back that far (etcd has compacted that revision).
    fn objects_at(&self, key: &ResKey, rv: u64) -> Option<BTreeMap<ObjKey, Value>> {
        let oldest = self
            .cache_start
            .get(key)
            .copied()
            .unwrap_or(0)
            .max(self.oldest_valid);
        if rv < oldest {
            return None;
        }
        let mut objects = self.objects.get(key).cloned().unwrap_or_default();
        let start = self.history.partition_point(|e| e.rv <= rv);
        for e in self.history.iter().skip(start).rev() {
            if e.key != *key {
                continue;
            }
            let ok = (
                meta_str(&e.object, "namespace").to_string(),
                meta_str(&e.object, "name").to_string(),
            );
            match (e.etype, &e.prev) {
                ("ADDED", _) => {
                    objects.remove(&ok);
                }
                (_, Some(prev)) => {
                    objects.insert(ok, prev.clone());
                }
                (_, None) => {}
            }
        }
        Some(objects)
    }

    // -----------------------------------------------------------------------------------------
    // Reads

    pub fn get(&self, t: &Target, name: &str) -> Result<Value, ApiError> {
        self.stored(&t.key(), &t.obj_key(name))
            .map(|o| view(o, &t.res, &t.version))
            .ok_or_else(|| ApiError::not_found(&t.res.group, &t.res.plural, name))
    }

    /// A list response, with `limit`/`continue` paging.
    pub fn list(
        &self,
        t: &Target,
        label: &LabelSelector,
        field: &FieldSelector,
        limit: Option<usize>,
        cont: Option<&str>,
    ) -> Result<Value, ApiError> {
        let filter = Filter {
            key: t.key(),
            namespace: t.namespace.clone(),
            label: label.clone(),
            field: field.clone(),
        };
        // A continue token names the list's resourceVersion and the key after the last item
        // returned: the next pages are read at that resourceVersion (one consistent snapshot),
        // or, once the history no longer reaches back to it, the list answers 410.
        let in_namespace = t.res.namespaced && t.namespace.is_some();
        let (start, list_rv, objects) = match cont.filter(|c| !c.is_empty()) {
            Some(c) => {
                let (mut start, rv) = decode_continue(c, in_namespace)?;
                if in_namespace {
                    start.0 = t.namespace.clone().unwrap_or_default();
                }
                let current = || self.objects.get(&t.key()).cloned().unwrap_or_default();
                match u64::try_from(rv) {
                    // rv -1: the token of a 410, going on at the newest revision.
                    Err(_) => (Some(start), self.rv, current()),
                    Ok(rv) if rv > self.rv => (Some(start), self.rv, current()),
                    Ok(rv) => match self.objects_at(&t.key(), rv) {
                        Some(objects) => (Some(start), rv, objects),
                        None => {
                            let mut e = ApiError::expired(INCONSISTENT_CONTINUE);
                            e.continue_token = Some(encode_continue(&start, in_namespace, -1));
                            return Err(e);
                        }
                    },
                }
            }
            None => (
                None,
                self.rv,
                self.objects.get(&t.key()).cloned().unwrap_or_default(),
            ),
        };
        let matching: Vec<(&ObjKey, &Value)> = objects
            .iter()
            .filter(|(k, _)| start.as_ref().is_none_or(|s| *k > s))
            .filter(|(_, o)| filter.matches(o))
            .collect();
        let limit = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let page: Vec<Value> = matching
            .iter()
            .take(limit)
            .map(|(_, o)| view(o, &t.res, &t.version))
            .collect();
        let mut meta = Map::new();
        meta.insert("resourceVersion".into(), Value::String(list_rv.to_string()));
        if matching.len() > page.len()
            && let Some((last, _)) = matching.get(page.len().saturating_sub(1))
        {
            let token = encode_continue(last, in_namespace, i64::try_from(list_rv).unwrap_or(-1));
            meta.insert("continue".into(), Value::String(token));
            // Counted only when nothing is filtered out (etcd counts keys, not matches).
            if label.is_empty() && field.is_empty() {
                meta.insert(
                    "remainingItemCount".into(),
                    Value::from(matching.len() - page.len()),
                );
            }
        } else if t.res.flavor == Flavor::Custom && (limit != usize::MAX || cont.is_some()) {
            // The last page of a paged list of custom resources (unstructured lists) says
            // `continue: ""` rather than leaving it out.
            meta.insert("continue".into(), Value::String(String::new()));
        }
        Ok(json!({
            "kind": t.res.list_kind,
            "apiVersion": t.res.api_version(&t.version),
            "metadata": meta,
            "items": page,
        }))
    }

    // -----------------------------------------------------------------------------------------
    // Writes

    fn check_type_meta(t: &Target, obj: &mut Value) -> Result<(), ApiError> {
        let expected = t.res.api_version(&t.version);
        let Some(m) = obj.as_object_mut() else {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON or YAML object",
            ));
        };
        match m.get("apiVersion").and_then(Value::as_str) {
            Some(v) if !v.is_empty() && v != expected => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({v}) does not match the expected API version ({expected})"
                )));
            }
            _ => {}
        }
        match m.get("kind").and_then(Value::as_str) {
            Some(k) if !k.is_empty() && k != t.res.kind => {
                return Err(ApiError::bad_request(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    t.res.kind
                )));
            }
            _ => {}
        }
        m.insert("apiVersion".into(), Value::String(expected));
        m.insert("kind".into(), Value::String(t.res.kind.clone()));
        if m.get("metadata")
            .is_some_and(|v| !v.is_object() && !v.is_null())
        {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
        Ok(())
    }

    fn check_namespace(t: &Target, obj: &mut Value) -> Result<(), ApiError> {
        let body_ns = meta_str(obj, "namespace").to_string();
        let Some(meta) = meta_mut(obj) else {
            return Ok(());
        };
        if t.res.namespaced {
            let ns = t.namespace.clone().unwrap_or_default();
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            meta.insert("namespace".into(), Value::String(ns));
        } else {
            meta.remove("namespace");
        }
        Ok(())
    }

    /// Schema pruning, defaulting and validation (custom resources), and the metadata checks
    /// every resource gets. Unknown fields are refused (Strict) or reported as warnings (Warn).
    fn admit(
        &self,
        t: &Target,
        obj: &mut Value,
        old: Option<&Value>,
        opts: &WriteOpts,
        warnings: &mut Vec<String>,
    ) -> Result<(), ApiError> {
        let res = &t.res;
        let name = meta_str(obj, "name").to_string();
        let mut causes = Vec::new();
        let version = res.version(&t.version);
        if res.flavor == Flavor::Custom
            && let Some(schema) = version.and_then(|v| v.schema.as_ref())
        {
            let unknown = crate::schema::prune_root(schema, obj);
            if !unknown.is_empty() {
                let msgs: Vec<String> = unknown
                    .iter()
                    .map(|u| format!("unknown field \"{u}\""))
                    .collect();
                match opts.validation {
                    FieldValidation::Strict => {
                        return Err(ApiError::bad_request(format!(
                            "{kind} in version \"{v}\" cannot be handled as a {kind}: strict decoding error: {}",
                            msgs.join(", "),
                            kind = res.kind,
                            v = t.version
                        )));
                    }
                    FieldValidation::Warn => warnings.extend(msgs),
                    FieldValidation::Ignore => {}
                }
            }
            crate::schema::apply_defaults(schema, obj);
            crate::schema::validate(schema, obj, "", &mut causes);
            // As apiextensions' hasBlockingErr: after these errors the CEL rules are not
            // evaluated, and one cause says so.
            let blocking = causes.iter().any(|c| {
                matches!(
                    c.reason.as_str(),
                    "FieldValueTypeInvalid"
                        | "FieldValueNotSupported"
                        | "FieldValueRequired"
                        | "FieldValueTooLong"
                        | "FieldValueTooMany"
                )
            });
            if let Some(cel) = version.and_then(|v| v.cel.as_ref()) {
                if blocking {
                    causes.push(Cause::new(
                        "FieldValueInvalid",
                        "<nil>",
                        "Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation",
                    ));
                } else {
                    let old_view = old.map(|o| view(o, res, &t.version));
                    causes.extend(crate::schema::cel_causes(cel, obj, old_view.as_ref()));
                }
            }
        }
        validate_meta(res, obj, &mut causes);
        if causes.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(&res.group, &res.kind, &name, causes))
        }
    }

    /// Type-specific preparation of an object about to be stored.
    fn prepare(
        &self,
        t: &Target,
        obj: &mut Value,
        old: Option<&Value>,
        now: &str,
    ) -> Result<(), ApiError> {
        match t.res.flavor {
            Flavor::Secret => {
                let Some(m) = obj.as_object_mut() else {
                    return Ok(());
                };
                if let Some(Value::Object(sd)) = m.remove("stringData") {
                    let data = m.entry("data").or_insert_with(|| Value::Object(Map::new()));
                    if !data.is_object() {
                        *data = Value::Object(Map::new());
                    }
                    if let Some(d) = data.as_object_mut() {
                        for (k, v) in sd {
                            let s = v.as_str().map(str::to_string).unwrap_or(v.to_string());
                            d.insert(k, Value::String(util::base64(s.as_bytes())));
                        }
                    }
                }
                if m.get("type")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    m.insert("type".into(), Value::String("Opaque".into()));
                }
            }
            Flavor::Namespace => {
                let name = meta_str(obj, "name").to_string();
                let terminating = obj.pointer("/metadata/deletionTimestamp").is_some();
                if let Some(m) = obj.as_object_mut() {
                    m.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
                    m.insert(
                        "status".into(),
                        json!({"phase": if terminating { "Terminating" } else { "Active" }}),
                    );
                }
                if let Some(meta) = meta_mut(obj) {
                    let labels = meta
                        .entry("labels")
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Some(l) = labels.as_object_mut() {
                        l.insert("kubernetes.io/metadata.name".into(), Value::String(name));
                    }
                }
            }
            Flavor::Crd => {
                let res = Resource::from_crd(obj).map_err(|c| invalid_crd(obj, c))?;
                if let Some(old) = old {
                    let before = Resource::from_crd(old).ok();
                    let mut errs = Vec::new();
                    if let Some(b) = before {
                        if b.group != res.group {
                            errs.push(Cause::new(
                                "FieldValueInvalid",
                                "spec.group",
                                format!("Invalid value: {:?}: field is immutable", res.group),
                            ));
                        }
                        if b.namespaced != res.namespaced {
                            errs.push(Cause::new(
                                "FieldValueInvalid",
                                "spec.scope",
                                "Invalid value: \"string\": field is immutable",
                            ));
                        }
                    }
                    if !errs.is_empty() {
                        return Err(invalid_crd(obj, errs));
                    }
                }
                if old.is_none()
                    && let Some(meta) = meta_mut(obj)
                {
                    let f = meta
                        .entry("finalizers")
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let Some(a) = f.as_array_mut()
                        && !a.iter().any(|x| x == CRD_FINALIZER)
                    {
                        a.push(Value::String(CRD_FINALIZER.into()));
                    }
                }
                let status = match old.and_then(|o| o.get("status")) {
                    Some(s) => {
                        let mut s = s.clone();
                        if let (Some(m), Some(fresh)) = (
                            s.as_object_mut(),
                            crd_status(obj, &res, now).get("acceptedNames"),
                        ) {
                            m.insert("acceptedNames".into(), fresh.clone());
                        }
                        s
                    }
                    None => crd_status(obj, &res, now),
                };
                if let Some(m) = obj.as_object_mut() {
                    m.insert("status".into(), status);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn namespace_terminating(&self, ns: &str) -> bool {
        self.stored(
            &(String::new(), "namespaces".into()),
            &(String::new(), ns.to_string()),
        )
        .is_some_and(|n| n.pointer("/metadata/deletionTimestamp").is_some())
    }

    fn crd_terminating(&self, res: &Resource) -> bool {
        self.stored(
            &(CRD_GROUP.into(), CRD_PLURAL.into()),
            &(String::new(), format!("{}.{}", res.plural, res.group)),
        )
        .is_some_and(|n| n.pointer("/metadata/deletionTimestamp").is_some())
    }

    /// POST, or a server-side apply that creates. `apply` carries the apply request and the
    /// applied configuration.
    pub fn create(
        &mut self,
        t: &Target,
        body: Value,
        opts: &WriteOpts,
        apply: Option<(&managed::Apply<'_>, &Value)>,
    ) -> Result<Outcome, ApiError> {
        let res = t.res.clone();
        let mut obj = body;
        Self::check_type_meta(t, &mut obj)?;
        Self::check_namespace(t, &mut obj)?;
        drop_empty_finalizers(&mut obj);
        validate_lease(&res, &obj, meta_str(&obj, "name"))?;
        if res.flavor == Flavor::Custom && self.crd_terminating(&res) {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "create not allowed while custom resource definition is terminating",
            ));
        }
        let ns = t.namespace.clone().unwrap_or_default();
        if res.namespaced
            && self
                .stored(
                    &(String::new(), "namespaces".into()),
                    &(String::new(), ns.clone()),
                )
                .is_none()
        {
            return Err(ApiError::not_found("", "namespaces", &ns));
        }
        if res.namespaced && self.namespace_terminating(&ns) {
            let name = meta_str(&obj, "name");
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    qualified(&res.plural, &res.group)
                ),
            )
            .with_details(json!({"name": name, "group": res.group, "kind": res.plural,
                "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]})));
        }
        let mut name = meta_str(&obj, "name").to_string();
        if name.is_empty() {
            let prefix = meta_str(&obj, "generateName").to_string();
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    &res.group,
                    &res.kind,
                    "",
                    vec![Cause::new(
                        "FieldValueRequired",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    )],
                ));
            }
            for _ in 0..16 {
                name = format!("{prefix}{}", util::name_suffix());
                if self.stored(&t.key(), &t.obj_key(&name)).is_none() {
                    break;
                }
            }
        }
        let now = util::now_rfc3339();
        if let Some(meta) = meta_mut(&mut obj) {
            for k in [
                "uid",
                "resourceVersion",
                "generation",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
                "managedFields",
            ] {
                meta.remove(k);
            }
            meta.insert("name".into(), Value::String(name.clone()));
            meta.insert("uid".into(), Value::String(util::uuid4()));
            meta.insert("creationTimestamp".into(), Value::String(now.clone()));
            if res.generation {
                meta.insert("generation".into(), Value::from(1));
            }
        }
        if res.has_status(&t.version)
            && let Some(m) = obj.as_object_mut()
        {
            // Create cannot set status when status is a subresource.
            m.remove("status");
        }
        self.prepare(t, &mut obj, None, &now)?;
        let mut warnings = Vec::new();
        self.admit(t, &mut obj, None, opts, &mut warnings)?;

        let api_version = res.api_version(&t.version);
        match apply {
            Some((a, applied)) => {
                let shadow = managed::apply(&json!({}), applied, a).unwrap_or_default();
                let mut entries = managed::parse_entries(&shadow);
                for e in entries.iter_mut() {
                    e.fields.retain(|p| managed::get_path(&obj, p).is_some());
                }
                managed::store_entries(&mut obj, &entries);
            }
            None => managed::record_update(
                None,
                &mut obj,
                &managed::Writer {
                    manager: &opts.manager,
                    api_version: &api_version,
                    scope: t.scope(),
                    now: &now,
                },
            ),
        }

        let ok = t.obj_key(&name);
        if self.stored(&t.key(), &ok).is_some() {
            return Err(ApiError::already_exists(&res.group, &res.plural, &name));
        }
        if opts.dry_run {
            return Ok(Outcome {
                object: view(&obj, &res, &t.version),
                created: true,
                warnings,
            });
        }
        let rv = self.next_rv();
        Self::set_rv(&mut obj, rv);
        let stored = view(&obj, &res, &res.storage_version);
        self.objects
            .entry(t.key())
            .or_default()
            .insert(ok, stored.clone());
        self.emit(&t.key(), "ADDED", stored.clone(), None);
        self.after_write(&res, &stored);
        Ok(Outcome {
            object: view(&stored, &res, &t.version),
            created: true,
            warnings,
        })
    }

    /// Registers (or re-registers) the resource a stored CRD defines.
    fn after_write(&mut self, res: &Resource, stored: &Value) {
        if res.flavor == Flavor::Crd
            && let Ok(r) = Resource::from_crd(stored)
        {
            self.cache_start
                .entry((r.group.clone(), r.plural.clone()))
                .or_insert(self.rv);
            self.resources
                .insert((r.group.clone(), r.plural.clone()), Arc::new(r));
        }
    }

    fn current(&self, t: &Target, name: &str) -> Result<Value, ApiError> {
        self.stored(&t.key(), &t.obj_key(name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&t.res.group, &t.res.plural, name))
    }

    fn check_name(obj: &mut Value, name: &str) -> Result<(), ApiError> {
        let body_name = meta_str(obj, "name").to_string();
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(meta) = meta_mut(obj) {
            meta.insert("name".into(), Value::String(name.to_string()));
        }
        Ok(())
    }

    fn check_precondition(
        t: &Target,
        current: &Value,
        obj: &Value,
        name: &str,
    ) -> Result<(), ApiError> {
        let want = meta_str(obj, "resourceVersion");
        if !want.is_empty() && want.parse::<u64>().is_err() {
            // etcd3's versioner fails to parse it: a plain 500 without a reason.
            return Err(ApiError::new(
                500,
                "",
                format!("strconv.ParseUint: parsing {want:?}: invalid syntax"),
            ));
        }
        if !want.is_empty() && want != meta_str(current, "resourceVersion") {
            return Err(ApiError::stale(&t.res.group, &t.res.plural, name));
        }
        Ok(())
    }

    /// PUT.
    pub fn update(
        &mut self,
        t: &Target,
        name: &str,
        body: Value,
        opts: &WriteOpts,
    ) -> Result<Outcome, ApiError> {
        let current = self.current(t, name)?;
        let mut obj = body;
        Self::check_type_meta(t, &mut obj)?;
        Self::check_name(&mut obj, name)?;
        Self::check_namespace(t, &mut obj)?;
        if t.res.flavor == Flavor::Custom && meta_str(&obj, "resourceVersion").is_empty() {
            // Custom resources do not allow unconditional updates.
            return Err(ApiError::invalid(
                &t.res.group,
                &t.res.plural,
                name,
                vec![Cause::new(
                    "FieldValueInvalid",
                    "metadata.resourceVersion",
                    "Invalid value: 0: must be specified for an update",
                )],
            ));
        }
        let uid = meta_str(&obj, "uid");
        if !uid.is_empty() && uid != meta_str(&current, "uid") {
            // The uid in a PUT body is a storage precondition.
            let ns = t.namespace.as_deref().filter(|_| t.res.namespaced);
            let key: Vec<&str> = [
                Some(t.res.group.as_str()),
                Some(t.res.plural.as_str()),
                ns,
                Some(name),
            ]
            .into_iter()
            .flatten()
            .filter(|p| !p.is_empty())
            .collect();
            return Err(ApiError::conflict(
                &t.res.group,
                &t.res.plural,
                name,
                &format!(
                    "StorageError: invalid object, Code: 4, Key: /registry/{}, ResourceVersion: 0, AdditionalErrorMsg: Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    key.join("/"),
                    meta_str(&current, "uid")
                ),
            ));
        }
        Self::check_precondition(t, &current, &obj, name)?;
        self.finish_update(t, &current, obj, opts, false)
    }

    /// PATCH (merge, JSON, strategic-as-merge, apply).
    pub fn patch(
        &mut self,
        t: &Target,
        name: &str,
        ptype: PatchType,
        body: &[u8],
        opts: &WriteOpts,
    ) -> Result<Outcome, ApiError> {
        if ptype == PatchType::Apply {
            return self.apply(t, name, body, opts);
        }
        if opts.force {
            return Err(ApiError::invalid(
                "meta.k8s.io",
                "PatchOptions",
                "",
                vec![Cause::new(
                    "FieldValueForbidden",
                    "force",
                    "Forbidden: may not be specified for non-apply patch",
                )],
            ));
        }
        let current = self.current(t, name)?;
        let mut doc = view(&current, &t.res, &t.version);
        match ptype {
            PatchType::Merge | PatchType::Strategic => {
                let mut p: Value = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
                if !p.is_object() {
                    return Err(ApiError::bad_request(
                        "error decoding patch: a merge patch must be a JSON object",
                    ));
                }
                if ptype == PatchType::Strategic {
                    strip_directives(&mut p);
                }
                json_patch::merge(&mut doc, &p);
            }
            PatchType::Json => {
                // kube-apiserver answers a failed or unknown operation with a bare 422 (the
                // detail is only in its log), a body that is not a list of operations with 400.
                let rejected = || {
                    ApiError::new(
                        422,
                        "Invalid",
                        "the server rejected our request due to an error in our request",
                    )
                };
                let raw: Value = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
                if !raw.is_array() {
                    let go_type = match raw {
                        Value::Object(_) => "object",
                        Value::String(_) => "string",
                        Value::Number(_) => "number",
                        Value::Bool(_) => "bool",
                        _ => "null",
                    };
                    return Err(ApiError::bad_request(format!(
                        "error decoding patch: json: cannot unmarshal {go_type} into Go value of type []handlers.jsonPatchOp"
                    )));
                }
                let p: json_patch::Patch = serde_json::from_value(raw).map_err(|_| rejected())?;
                json_patch_go(&mut doc, &p.0).map_err(|_| rejected())?;
            }
            PatchType::Apply => {}
        }
        if !doc.is_object() {
            return Err(ApiError::bad_request(
                "the patched object is not a JSON object",
            ));
        }
        let core;
        let t = if t.res.flavor == Flavor::Event {
            // Patched as events.k8s.io/v1 sees it, stored as the core/v1 Event it is.
            Self::check_type_meta(t, &mut doc)?;
            doc = crate::resources::events_event_to_core(&doc);
            core = self
                .target("", "v1", "events", t.namespace.as_deref(), t.sub.as_deref())
                .ok_or_else(ApiError::no_route)?;
            &core
        } else {
            t
        };
        Self::check_type_meta(t, &mut doc)?;
        Self::check_precondition(t, &current, &doc, name)?;
        if let Some(meta) = meta_mut(&mut doc) {
            meta.insert("name".into(), Value::String(name.to_string()));
        }
        Self::check_namespace(t, &mut doc)?;
        self.finish_update(t, &current, doc, opts, false)
    }

    fn apply(
        &mut self,
        t: &Target,
        name: &str,
        body: &[u8],
        opts: &WriteOpts,
    ) -> Result<Outcome, ApiError> {
        if !opts.manager_given {
            return Err(ApiError::invalid(
                "meta.k8s.io",
                "PatchOptions",
                "",
                vec![Cause::new(
                    "FieldValueRequired",
                    "fieldManager",
                    "Required value: is required for apply patch",
                )],
            ));
        }
        let mut applied: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(_) => serde_yaml_ng::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?,
        };
        if !applied.is_object() {
            return Err(ApiError::bad_request(
                "the applied configuration must be an object",
            ));
        }
        let body_ns = meta_str(&applied, "namespace").to_string();
        Self::check_type_meta(t, &mut applied)?;
        Self::check_name(&mut applied, name)?;
        Self::check_namespace(t, &mut applied)?;
        // The field manager converts the applied configuration to a typed value against the
        // schema before merging; undeclared fields and wrong types fail there with a 500,
        // whatever fieldValidation says.
        if t.res.flavor == Flavor::Custom
            && let Some(schema) = t.res.version(&t.version).and_then(|v| v.schema.as_ref())
        {
            // kube-apiserver reports the first error only.
            if let Some(detail) = crate::schema::typed_errors(schema, &applied).first() {
                return Err(ApiError::new(
                    500,
                    "",
                    format!(
                        "failed to create typed patch object ({body_ns}/{name}; {}, Kind={}): {detail}",
                        t.res.api_version(&t.version),
                        t.res.kind
                    ),
                ));
            }
        }
        let scope = t.scope();
        let api_version = t.res.api_version(&t.version);
        let now = util::now_rfc3339();
        let a = managed::Apply {
            manager: &opts.manager,
            api_version: &api_version,
            scope,
            force: opts.force,
            now: &now,
        };
        let current = match self.stored(&t.key(), &t.obj_key(name)) {
            Some(c) => c.clone(),
            None => {
                if t.is_status() {
                    return Err(ApiError::not_found(&t.res.group, &t.res.plural, name));
                }
                let mut obj = applied.clone();
                if let Some(meta) = meta_mut(&mut obj) {
                    meta.remove("resourceVersion");
                }
                return self.create(t, obj, opts, Some((&a, &applied)));
            }
        };
        let merged = managed::apply(&view(&current, &t.res, &t.version), &applied, &a).map_err(
            |conflicts| {
                let (msg, causes) = managed::conflict_message(&conflicts);
                // kube-apiserver's apply conflicts carry the causes only, no name or kind.
                ApiError::new(409, "Conflict", msg).with_details(json!({"causes": causes}))
            },
        )?;
        // The resourceVersion precondition is checked on the merged object, after the field
        // manager's conflicts, as kube-apiserver does.
        Self::check_precondition(t, &current, &merged, name)?;
        self.finish_update(t, &current, merged, opts, true)
    }

    /// The common tail of update, patch and apply: subresource isolation, protected metadata,
    /// finalizer rules, validation, generation, managed fields, no-op detection, storage,
    /// and deletion once the last finalizer is gone.
    fn finish_update(
        &mut self,
        t: &Target,
        old: &Value,
        new: Value,
        opts: &WriteOpts,
        applied: bool,
    ) -> Result<Outcome, ApiError> {
        let res = t.res.clone();
        let old_view = view(old, &res, &t.version);
        let mut new = new;
        drop_empty_finalizers(&mut new);
        validate_lease(&res, &new, meta_str(old, "name"))?;
        // ObjectMeta update validation: a different uid, or a deletionTimestamp on an object
        // not being deleted, is refused (kube-apiserver checks it twice: two equal causes).
        let mut immutable = Vec::new();
        let new_uid = meta_str(&new, "uid");
        if !new_uid.is_empty() && new_uid != meta_str(old, "uid") {
            immutable.push(("metadata.uid", new_uid.to_string()));
        }
        let new_deletion = meta_str(&new, "deletionTimestamp");
        if !new_deletion.is_empty() && old.pointer("/metadata/deletionTimestamp").is_none() {
            immutable.push(("metadata.deletionTimestamp", new_deletion.to_string()));
        }
        if !immutable.is_empty() {
            let causes = immutable
                .iter()
                .flat_map(|(field, v)| {
                    let c = Cause::new(
                        "FieldValueInvalid",
                        *field,
                        format!("Invalid value: {v:?}: field is immutable"),
                    );
                    [c.clone(), c]
                })
                .collect();
            return Err(ApiError::invalid(
                &res.group,
                &res.kind,
                meta_str(old, "name"),
                causes,
            ));
        }
        if t.is_status() {
            let mut merged = old_view.clone();
            if let Some(m) = merged.as_object_mut() {
                match new.get("status") {
                    Some(s) => {
                        m.insert("status".into(), s.clone());
                    }
                    None => {
                        m.remove("status");
                    }
                }
            }
            if applied
                && let (Some(mf), Some(meta)) = (
                    new.pointer("/metadata/managedFields").cloned(),
                    meta_mut(&mut merged),
                )
            {
                meta.insert("managedFields".into(), mf);
            }
            new = merged;
        } else {
            let reset_managed = new
                .pointer("/metadata/managedFields")
                .and_then(Value::as_array)
                .is_some_and(|a| a.len() == 1 && a[0].as_object().is_some_and(Map::is_empty));
            let old_meta = old.get("metadata").and_then(Value::as_object).cloned();
            if let (Some(meta), Some(old_meta)) = (meta_mut(&mut new), old_meta) {
                for k in [
                    "name",
                    "namespace",
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                    "resourceVersion",
                    "generateName",
                ] {
                    match old_meta.get(k) {
                        Some(v) => {
                            meta.insert(k.into(), v.clone());
                        }
                        None => {
                            meta.remove(k);
                        }
                    }
                }
                meta.remove("selfLink");
                if reset_managed {
                    meta.remove("managedFields");
                } else if !applied {
                    match old_meta.get("managedFields") {
                        Some(v) => {
                            meta.insert("managedFields".into(), v.clone());
                        }
                        None => {
                            meta.remove("managedFields");
                        }
                    }
                }
            }
            if res.has_status(&t.version)
                && let Some(m) = new.as_object_mut()
            {
                match old.get("status") {
                    Some(s) => {
                        m.insert("status".into(), s.clone());
                    }
                    None => {
                        m.remove("status");
                    }
                }
            }
        }
        if let Some(m) = new.as_object_mut() {
            m.insert(
                "apiVersion".into(),
                Value::String(res.api_version(&t.version)),
            );
            m.insert("kind".into(), Value::String(res.kind.clone()));
        }
        let name = meta_str(old, "name").to_string();

        if old.pointer("/metadata/deletionTimestamp").is_some() {
            let before = finalizers(old);
            let added: Vec<String> = finalizers(&new)
                .into_iter()
                .filter(|f| !before.contains(f))
                .collect();
            if !added.is_empty() {
                return Err(ApiError::invalid(
                    &res.group,
                    &res.kind,
                    &name,
                    vec![Cause::new(
                        "FieldValueForbidden",
                        "metadata.finalizers",
                        format!(
                            "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
                        ),
                    )],
                ));
            }
        }

        let now = util::now_rfc3339();
        self.prepare(t, &mut new, Some(old), &now)?;
        let mut warnings = Vec::new();
        self.admit(t, &mut new, Some(old), opts, &mut warnings)?;

        // Only spec (everything but metadata, and status when it is a subresource) counts;
        // writes to /status never bump the generation.
        let status_sub = res.has_status(&t.version);
        if res.generation
            && !t.is_status()
            && without_metadata(old, status_sub) != without_metadata(&new, status_sub)
        {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if let Some(meta) = meta_mut(&mut new) {
                meta.insert("generation".into(), Value::from(g + 1));
            }
        }
        if !applied {
            let api_version = res.api_version(&t.version);
            managed::record_update(
                Some(&old_view),
                &mut new,
                &managed::Writer {
                    manager: &opts.manager,
                    api_version: &api_version,
                    scope: t.scope(),
                    now: &now,
                },
            );
        }

        if strip_times(&old_view) == strip_times(&new) {
            return Ok(Outcome {
                object: old_view,
                created: false,
                warnings,
            });
        }
        if opts.dry_run {
            return Ok(Outcome {
                object: new,
                created: false,
                warnings,
            });
        }
        let key = t.key();
        let ok = t.obj_key(&name);
        let rv = self.next_rv();
        Self::set_rv(&mut new, rv);
        let stored = view(&new, &res, &res.storage_version);
        if stored.pointer("/metadata/deletionTimestamp").is_some() && finalizers(&stored).is_empty()
        {
            // The emptied update is never stored: the DELETED event carries the last stored
            // object (finalizers still listed) with the deletion's resourceVersion.
            let mut last = old.clone();
            Self::set_rv(&mut last, rv);
            self.remove(&res, &key, &ok, last);
        } else {
            if let Some(m) = self.objects.get_mut(&key) {
                m.insert(ok, stored.clone());
            }
            self.emit(&key, "MODIFIED", stored.clone(), Some(old.clone()));
            self.after_write(&res, &stored);
        }
        Ok(Outcome {
            object: view(&stored, &res, &t.version),
            created: false,
            warnings,
        })
    }

    /// Removes an object for good (the current resourceVersion is already its deletion's).
    fn remove(&mut self, res: &Resource, key: &ResKey, ok: &ObjKey, last: Value) {
        let stored = self.objects.get_mut(key).and_then(|m| m.remove(ok));
        // `prev` is the object as it was stored, for lists at an older resourceVersion.
        self.emit(key, "DELETED", last.clone(), stored);
        if res.flavor == Flavor::Crd
            && let Ok(r) = Resource::from_crd(&last)
        {
            let k = (r.group.clone(), r.plural.clone());
            self.cache_start.remove(&k);
            self.resources.remove(&k);
            self.objects.remove(&k);
        }
        self.finalize_pending();
    }

    /// DELETE of one object.
    pub fn delete(
        &mut self,
        t: &Target,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Outcome, ApiError> {
        let current = self.current(t, name)?;
        if let Some(uid) = &opts.uid
            && uid != meta_str(&current, "uid")
        {
            return Err(ApiError::conflict(
                &t.res.group,
                &t.res.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&current, "uid")
                ),
            ));
        }
        if let Some(rv) = &opts.resource_version
            && rv != meta_str(&current, "resourceVersion")
        {
            return Err(ApiError::conflict(
                &t.res.group,
                &t.res.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&current, "resourceVersion")
                ),
            ));
        }
        if opts.dry_run {
            return Ok(Outcome {
                object: view(&current, &t.res, &t.version),
                created: false,
                warnings: Vec::new(),
            });
        }
        let obj = self.delete_object(&t.res, &t.obj_key(name));
        if self.stored(&t.key(), &t.obj_key(name)).is_none() {
            // Gone at once: kube-apiserver answers a Success Status (its stores do not set
            // ReturnDeletedObject), not the object.
            let mut details =
                json!({"name": name, "kind": t.res.plural, "uid": meta_str(&current, "uid")});
            if !t.res.group.is_empty() {
                details["group"] = json!(t.res.group);
            }
            return Ok(Outcome {
                object: json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Success", "details": details}),
                created: false,
                warnings: Vec::new(),
            });
        }
        Ok(Outcome {
            object: view(&obj.unwrap_or(current), &t.res, &t.version),
            created: false,
            warnings: Vec::new(),
        })
    }

    /// DELETE of a collection: deletes each selected object.
    pub fn delete_collection(
        &mut self,
        t: &Target,
        label: &LabelSelector,
        field: &FieldSelector,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let list = self.list(t, label, field, None, None)?;
        if !dry_run {
            for item in list["items"].as_array().cloned().unwrap_or_default() {
                let ok = t.obj_key(meta_str(&item, "name"));
                self.delete_object(&t.res, &ok);
            }
        }
        Ok(list)
    }

    /// Marks an object as being deleted (when finalizers hold it) or removes it; cascades for
    /// namespaces and CRDs. Returns the object as last stored.
    fn delete_object(&mut self, res: &Arc<Resource>, ok: &ObjKey) -> Option<Value> {
        let key = (res.group.clone(), res.plural.clone());
        let current = self.stored(&key, ok)?.clone();
        if current.pointer("/metadata/deletionTimestamp").is_some() {
            return Some(current);
        }
        let holds = !finalizers(&current).is_empty() || res.flavor == Flavor::Namespace;
        let rv = self.next_rv();
        let mut obj = current.clone();
        Self::set_rv(&mut obj, rv);
        if holds {
            if let Some(meta) = meta_mut(&mut obj) {
                if let Some(g) = meta.get("generation").and_then(Value::as_i64)
                    && g > 0
                {
                    meta.insert("generation".into(), Value::from(g + 1));
                }
                meta.insert(
                    "deletionTimestamp".into(),
                    Value::String(util::now_rfc3339()),
                );
                meta.insert("deletionGracePeriodSeconds".into(), Value::from(0));
            }
            if res.flavor == Flavor::Namespace
                && let Some(m) = obj.as_object_mut()
            {
                m.insert("status".into(), json!({"phase": "Terminating"}));
            }
            if let Some(m) = self.objects.get_mut(&key) {
                m.insert(ok.clone(), obj.clone());
            }
            self.emit(&key, "MODIFIED", obj.clone(), Some(current));
            match res.flavor {
                Flavor::Namespace => self.cascade_namespace(&ok.1),
                Flavor::Crd => self.cascade_crd(&obj),
                _ => {}
            }
            self.finalize_pending();
        } else {
            self.remove(res, &key, ok, obj.clone());
        }
        Some(obj)
    }

    fn cascade_namespace(&mut self, ns: &str) {
        let victims: Vec<(Arc<Resource>, ObjKey)> = self
            .objects
            .iter()
            .filter_map(|(k, m)| self.resources.get(k).map(|r| (r.clone(), m)))
            .filter(|(r, _)| r.namespaced)
            .flat_map(|(r, m)| {
                m.keys()
                    .filter(|(n, _)| n == ns)
                    .map(move |ok| (r.clone(), ok.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (r, ok) in victims {
            self.delete_object(&r, &ok);
        }
    }

    fn cascade_crd(&mut self, crd: &Value) {
        let Ok(r) = Resource::from_crd(crd) else {
            return;
        };
        let key = (r.group.clone(), r.plural.clone());
        let Some(res) = self.resources.get(&key).cloned() else {
            return;
        };
        let keys: Vec<ObjKey> = self
            .objects
            .get(&key)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for ok in keys {
            self.delete_object(&res, &ok);
        }
    }

    /// Completes the deletion of terminating CRDs and namespaces once they are empty.
    fn finalize_pending(&mut self) {
        let crd_key: ResKey = (CRD_GROUP.into(), CRD_PLURAL.into());
        let pending: Vec<(ObjKey, Value)> = self
            .objects
            .get(&crd_key)
            .map(|m| {
                m.iter()
                    .filter(|(_, o)| o.pointer("/metadata/deletionTimestamp").is_some())
                    .filter(|(_, o)| finalizers(o).iter().any(|f| f == CRD_FINALIZER))
                    .map(|(k, o)| (k.clone(), o.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (ok, crd) in pending {
            let Ok(r) = Resource::from_crd(&crd) else {
                continue;
            };
            let empty = self
                .objects
                .get(&(r.group.clone(), r.plural.clone()))
                .is_none_or(BTreeMap::is_empty);
            if !empty {
                continue;
            }
            let Some(crd_res) = self.resources.get(&crd_key).cloned() else {
                continue;
            };
            let rv = self.next_rv();
            let mut obj = crd.clone();
            Self::set_rv(&mut obj, rv);
            if let Some(meta) = meta_mut(&mut obj) {
                let left: Vec<Value> = finalizers(&crd)
                    .into_iter()
                    .filter(|f| f != CRD_FINALIZER)
                    .map(Value::String)
                    .collect();
                if left.is_empty() {
                    meta.remove("finalizers");
                } else {
                    meta.insert("finalizers".into(), Value::Array(left));
                }
            }
            if finalizers(&obj).is_empty() {
                self.remove(&crd_res, &crd_key, &ok, obj);
            } else {
                if let Some(m) = self.objects.get_mut(&crd_key) {
                    m.insert(ok, obj.clone());
                }
                self.emit(&crd_key, "MODIFIED", obj, Some(crd));
            }
        }

        let ns_key: ResKey = (String::new(), "namespaces".into());
        let terminating: Vec<(ObjKey, Value)> = self
            .objects
            .get(&ns_key)
            .map(|m| {
                m.iter()
                    .filter(|(_, o)| o.pointer("/metadata/deletionTimestamp").is_some())
                    .map(|(k, o)| (k.clone(), o.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (ok, ns_obj) in terminating {
            let ns = &ok.1;
            let occupied = self.objects.iter().any(|(k, m)| {
                self.resources.get(k).is_some_and(|r| r.namespaced)
                    && m.keys().any(|(n, _)| n == ns)
            });
            if occupied || !finalizers(&ns_obj).is_empty() {
                continue;
            }
            let Some(ns_res) = self.resources.get(&ns_key).cloned() else {
                continue;
            };
            let rv = self.next_rv();
            let mut obj = ns_obj;
            Self::set_rv(&mut obj, rv);
            self.remove(&ns_res, &ns_key, &ok, obj);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd() -> Value {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "things.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "things", "singular": "thing", "kind": "Thing"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "properties": {"size": {"type": "integer", "default": 1}}},
                        "status": {"type": "object", "properties": {"ok": {"type": "boolean"}}}}}}}]}})
    }

    fn setup() -> (Store, Target) {
        let mut s = Store::new(100);
        let ct = s
            .target(CRD_GROUP, "v1", CRD_PLURAL, None, None)
            .unwrap_or_else(|| unreachable!());
        s.create(&ct, crd(), &WriteOpts::default(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let nt = s
            .target("", "v1", "namespaces", None, None)
            .unwrap_or_else(|| unreachable!());
        s.create(
            &nt,
            json!({"metadata": {"name": "ns1"}}),
            &WriteOpts::default(),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let t = s
            .target("example.com", "v1", "things", Some("ns1"), None)
            .unwrap_or_else(|| panic!("not registered"));
        (s, t)
    }

    /// Pages of one list are one snapshot; once the history is compacted past the token's
    /// revision, the continue answers 410 with a token that goes on at the newest revision.
    #[test]
    fn continue_token_of_a_compacted_revision_is_gone() {
        let (mut s, t) = setup();
        let none = (LabelSelector::default(), FieldSelector::default());
        for name in ["a", "b", "c", "d"] {
            s.create(
                &t,
                json!({"metadata": {"name": name}, "spec": {}}),
                &WriteOpts::default(),
                None,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let page = |s: &Store, cont: Option<&str>| s.list(&t, &none.0, &none.1, Some(2), cont);
        let first = page(&s, None).unwrap_or_else(|e| panic!("{e}"));
        let token = first["metadata"]["continue"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(first["metadata"]["remainingItemCount"], 2);
        // A delete between pages is not seen by the next page: it is read at the first's rv.
        let nt = Target {
            sub: None,
            ..t.clone()
        };
        s.delete(&nt, "c", &DeleteOpts::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let second = page(&s, Some(&token)).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = second["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["metadata"]["name"].as_str())
            .collect();
        assert_eq!(names, ["c", "d"]);
        s.compact();
        let gone = page(&s, Some(&token))
            .err()
            .unwrap_or_else(|| panic!("not 410"));
        assert_eq!((gone.code, gone.reason.as_str()), (410, "Expired"));
        let status = gone.to_status();
        let next = gone
            .continue_token
            .unwrap_or_else(|| panic!("no token in the 410"));
        assert_eq!(status["metadata"]["continue"], next.as_str());
        let rest = page(&s, Some(&next)).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = rest["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["metadata"]["name"].as_str())
            .collect();
        assert_eq!(names, ["d"], "the newest state after the token's key");
    }

    #[test]
    fn generation_status_and_finalizers() {
        let (mut s, t) = setup();
        let o = s
            .create(&t, json!({"metadata": {"name": "a", "finalizers": ["x/y"]}, "spec": {}, "status": {"ok": true}}), &WriteOpts::default(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.object["metadata"]["generation"], 1);
        assert_eq!(o.object["spec"]["size"], 1);
        assert!(o.object.get("status").is_none());
        let st = Target {
            sub: Some("status".into()),
            ..t.clone()
        };
        let o = s
            .patch(
                &st,
                "a",
                PatchType::Merge,
                br#"{"status":{"ok":true},"spec":{"size":5}}"#,
                &WriteOpts::default(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.object["status"]["ok"], true);
        assert_eq!(o.object["spec"]["size"], 1);
        assert_eq!(o.object["metadata"]["generation"], 1);
        let o = s
            .patch(
                &t,
                "a",
                PatchType::Merge,
                br#"{"spec":{"size":3}}"#,
                &WriteOpts::default(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.object["metadata"]["generation"], 2);
        let rv = s.resource_version();
        // A no-op patch writes nothing.
        s.patch(
            &t,
            "a",
            PatchType::Merge,
            br#"{"spec":{"size":3}}"#,
            &WriteOpts::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.resource_version(), rv);
        let d = s
            .delete(&t, "a", &DeleteOpts::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(d.object["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(d.object["metadata"]["generation"], 3);
        s.patch(
            &t,
            "a",
            PatchType::Merge,
            br#"{"metadata":{"finalizers":null}}"#,
            &WriteOpts::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(s.get(&t, "a").is_err());
    }

    #[test]
    fn crd_deletion_cascades() {
        let (mut s, t) = setup();
        s.create(
            &t,
            json!({"metadata": {"name": "a"}}),
            &WriteOpts::default(),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let ct = s
            .target(CRD_GROUP, "v1", CRD_PLURAL, None, None)
            .unwrap_or_else(|| unreachable!());
        s.delete(&ct, "things.example.com", &DeleteOpts::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(s.resource("example.com", "things").is_none());
        assert!(s.get(&ct, "things.example.com").is_err());
    }
}
