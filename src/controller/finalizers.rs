//! The guarded JSON patches that add and remove a finalizer, for ServerGroups and for the
//! credentials Secrets alike: each tests the list it read, so a concurrent change fails (422)
//! instead of being overwritten.

use serde_json::json;

/// The patch that adds `finalizer` to an object whose finalizers are `current`; `None` when it
/// is there. It tests against what is stored: absent (null) and an empty list differ, and
/// testing a stored `[]` against null would fail on every attempt.
pub fn add_patch(current: Option<&Vec<String>>, finalizer: &str) -> Option<serde_json::Value> {
    match current {
        Some(list) if list.iter().any(|f| f == finalizer) => None,
        Some(list) => Some(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": list},
            {"op": "add", "path": "/metadata/finalizers/-", "value": finalizer},
        ])),
        None => Some(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [finalizer]},
        ])),
    }
}

/// The patch that removes `finalizer`; `None` when it is not there.
pub fn remove_patch(current: &[String], finalizer: &str) -> Option<serde_json::Value> {
    let index = current.iter().position(|f| f == finalizer)?;
    Some(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": finalizer},
        {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
    ]))
}
