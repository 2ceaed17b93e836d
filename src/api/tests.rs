use super::*;
use serde_json::{Value, json};

fn schema() -> Value {
    let crd = crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has a schema");
    serde_json::to_value(schema).unwrap()
}

fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "openstack.waldur.com/v1alpha1",
        "kind": "ServerGroup",
        "metadata": {"name": "web", "namespace": "team-a"},
        "spec": spec,
    })
}

/// The CEL messages the API server would answer with, for a create (`old` None) or an update.
fn cel_errors(new: Value, old: Option<Value>) -> Vec<String> {
    let new = object(new);
    let old = old.map(object);
    match kube_cel::validate(&schema(), &new, old.as_ref()) {
        Ok(()) => vec![],
        Err(errors) => errors.iter().map(|e| e.message.clone()).collect(),
    }
}

const TENANT: &str = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";

fn valid() -> Value {
    json!({"policy": "anti-affinity", "tenant": TENANT, "deletionPolicy": "Delete", "managementPolicy": "Managed"})
}

#[test]
fn the_checked_in_crd_matches_the_code() {
    let checked_in = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/servergroups.openstack.waldur.com.yaml"
    ))
    .expect("crds/servergroups.openstack.waldur.com.yaml exists");
    assert!(
        checked_in == crd_yaml().unwrap(),
        "crds/ is stale: run `cargo run -- crd > crds/servergroups.openstack.waldur.com.yaml`"
    );
}

#[test]
fn a_complete_spec_passes_every_rule() {
    assert_eq!(cel_errors(valid(), None), Vec::<String>::new());
    let imported = json!({"import": {"backendId": "abc"}, "managementPolicy": "Observe"});
    assert_eq!(cel_errors(imported, None), Vec::<String>::new());
}

#[test]
fn tenant_and_policy_are_required_unless_import() {
    for spec in [
        json!({"policy": "affinity", "managementPolicy": "Managed"}),
        json!({"tenant": TENANT, "managementPolicy": "Managed"}),
    ] {
        let errs = cel_errors(spec, None);
        assert!(
            errs.iter()
                .any(|e| e.contains("spec.tenant and spec.policy are required")),
            "{errs:?}"
        );
    }
}

#[test]
fn import_takes_exactly_one_key() {
    for import in [json!({}), json!({"uuid": TENANT, "backendId": "x"})] {
        let errs = cel_errors(
            json!({"import": import, "managementPolicy": "Managed"}),
            None,
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("exactly one of uuid or backendId")),
            "{errs:?}"
        );
    }
}

#[test]
fn identity_fields_are_immutable_with_a_message_that_says_what_to_do() {
    let cases = [
        ("policy", json!("affinity"), "spec.policy is immutable"),
        (
            "tenant",
            json!("00000000000000000000000000000001"),
            "spec.tenant is immutable",
        ),
        ("name", json!("other"), "spec.name is immutable"),
        (
            "description",
            json!("changed"),
            "spec.description is immutable",
        ),
        (
            "managementPolicy",
            json!("Observe"),
            "spec.managementPolicy is immutable",
        ),
        (
            "import",
            json!({"uuid": TENANT}),
            "spec.import is immutable",
        ),
    ];
    for (field, value, message) in cases {
        let mut changed = valid();
        changed[field] = value;
        let errs = cel_errors(changed, Some(valid()));
        assert!(
            errs.iter()
                .any(|e| e.contains(message) && e.contains("create a new ServerGroup")),
            "{field}: {errs:?}"
        );
    }
    // Setting a name that was unset renames the group in Waldur's eyes: refused too.
    let mut named = valid();
    named["name"] = json!("web");
    let errs = cel_errors(named.clone(), Some(valid()));
    assert!(
        errs.iter().any(|e| e.contains("spec.name is immutable")),
        "{errs:?}"
    );
    // Removing it likewise.
    let errs = cel_errors(valid(), Some(named));
    assert!(
        errs.iter().any(|e| e.contains("spec.name is immutable")),
        "{errs:?}"
    );
}

#[test]
fn deletion_policy_resync_and_credentials_may_change() {
    let mut changed = valid();
    changed["deletionPolicy"] = json!("Orphan");
    changed["resyncPeriod"] = json!("1h");
    changed["credentialsRef"] = json!({"name": "waldur"});
    assert_eq!(cel_errors(changed, Some(valid())), Vec::<String>::new());
}

/// A namespace user cannot make the operator poll Waldur without pause: below 30s the API
/// server refuses the object and says why.
#[test]
fn resync_period_has_a_floor_of_30s() {
    for ok in ["30s", "1m", "10m30s", "1h", "30000ms"] {
        let mut spec = valid();
        spec["resyncPeriod"] = json!(ok);
        assert_eq!(cel_errors(spec, None), Vec::<String>::new(), "{ok}");
    }
    for short in ["1ms", "29s", "29999ms", "0s"] {
        let mut spec = valid();
        spec["resyncPeriod"] = json!(short);
        let errors = cel_errors(spec, None);
        assert!(
            errors.len() == 1 && errors[0].contains("at least 30s"),
            "{short}: {errors:?}"
        );
    }
}

#[test]
fn the_schema_carries_the_enums_limits_and_defaults() {
    let s = schema();
    let spec = &s["properties"]["spec"]["properties"];
    assert_eq!(
        spec["policy"]["enum"],
        json!([
            "affinity",
            "anti-affinity",
            "soft-affinity",
            "soft-anti-affinity"
        ])
    );
    assert_eq!(
        spec["deletionPolicy"]["enum"],
        json!(["Delete", "Orphan", "Unlink"])
    );
    assert_eq!(spec["deletionPolicy"]["default"], json!("Delete"));
    assert_eq!(spec["managementPolicy"]["default"], json!("Managed"));
    assert_eq!(spec["name"]["maxLength"], json!(150));
    assert_eq!(spec["description"]["maxLength"], json!(4096));
    assert!(spec["tenant"]["pattern"].is_string());
    assert!(!serde_json::to_string(&s).unwrap().contains("nullable"));
}

#[test]
fn the_crd_names_printer_columns_and_status_subresource() {
    let crd = crd();
    assert_eq!(crd.spec.names.short_names, Some(vec!["wsg".to_string()]));
    assert_eq!(crd.spec.names.categories, Some(vec!["waldur".to_string()]));
    let v = &crd.spec.versions[0];
    assert!(
        v.subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    );
    let columns: Vec<(String, Option<i32>)> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.to_uppercase(), c.priority))
        .collect();
    assert_eq!(
        columns,
        vec![
            ("POLICY".into(), None),
            ("STATE".into(), None),
            ("READY".into(), None),
            ("SYNCED".into(), None),
            ("REASON".into(), None),
            ("INSTANCES".into(), None),
            ("BACKEND-ID".into(), Some(1)),
            ("SYNC-REASON".into(), Some(1)),
            ("AGE".into(), None),
        ]
    );
}

/// `kubectl explain` shows each field's description: every property of spec and status has
/// one of its own, not the boilerplate a Rust or Go type brings along.
#[test]
fn every_field_explains_itself() {
    fn walk(path: &str, schema: &Value, missing: &mut Vec<String>) {
        let description = schema["description"].as_str().unwrap_or("");
        if description.trim().is_empty() || description.starts_with("Time is a wrapper") {
            missing.push(path.to_string());
        }
        for (name, prop) in schema["properties"].as_object().into_iter().flatten() {
            walk(&format!("{path}.{name}"), prop, missing);
        }
        if schema["items"].is_object() {
            walk(&format!("{path}[]"), &schema["items"], missing);
        }
    }
    let schema = schema();
    let mut missing = vec![];
    for top in ["spec", "status"] {
        walk(top, &schema["properties"][top], &mut missing);
    }
    assert_eq!(
        missing,
        Vec::<String>::new(),
        "fields without kubectl explain text"
    );
}

/// Conditions are a map keyed by type, so server-side apply merges them per type and the API
/// server refuses two conditions of one type.
#[test]
fn conditions_are_a_list_map_keyed_by_type() {
    let conditions = &schema()["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    let required = conditions["items"]["required"].as_array().unwrap();
    assert!(
        required.contains(&json!("type")),
        "a map key must be required"
    );
}
