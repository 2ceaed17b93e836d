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

/// The patch that records annotation `key` = `value` and, when missing, `finalizer`, on an
/// object read as `meta`, guarded by its resourceVersion.
///
/// `meta` is the informer cache's copy, which lacks the annotations the cache drops (kubectl's
/// last-applied-configuration): the patch adds the one key, and never writes the whole map
/// back, which would delete those from the stored object. When the copy has no annotations at
/// all, neither has the stored object at that resourceVersion (dropping a key leaves the map),
/// so the map is added with this key alone.
pub fn annotate_and_finalize_patch(
    meta: &kube::api::ObjectMeta,
    key: &str,
    value: &str,
    finalizer: &str,
) -> serde_json::Value {
    let annotation = match meta.annotations {
        Some(_) => json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", pointer_escape(key)),
            "value": value,
        }),
        None => json!({"op": "add", "path": "/metadata/annotations", "value": {key: value}}),
    };
    let mut finalizers = meta.finalizers.clone().unwrap_or_default();
    if !finalizers.iter().any(|f| f == finalizer) {
        finalizers.push(finalizer.to_string());
    }
    json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": meta.resource_version},
        annotation,
        {"op": "add", "path": "/metadata/finalizers", "value": finalizers},
    ])
}

/// A JSON Pointer reference token (RFC 6901): `~` and `/` escaped.
fn pointer_escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::api::{ANNOTATION_CREATE_INTENT as KEY, FINALIZER as FIN};

    fn meta(
        annotations: Option<&[(&str, &str)]>,
        finalizers: Option<&[&str]>,
    ) -> kube::api::ObjectMeta {
        kube::api::ObjectMeta {
            resource_version: Some("7".into()),
            annotations: annotations.map(|a| {
                a.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>()
            }),
            finalizers: finalizers.map(|f| f.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    /// Applies `patch` to `stored` as the API server would (RFC 6902).
    fn applied(stored: serde_json::Value, patch: serde_json::Value) -> serde_json::Value {
        let mut doc = stored;
        let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        doc
    }

    #[test]
    fn the_intent_is_added_beside_annotations_the_cache_does_not_hold() {
        // The stored object has kubectl's annotation; the cache's copy had it dropped.
        let stored = json!({"metadata": {
            "resourceVersion": "7",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
        }});
        let cached = meta(Some(&[]), None);
        let after = applied(
            stored,
            annotate_and_finalize_patch(&cached, KEY, "{\"at\":1}", FIN),
        );
        assert_eq!(
            after["metadata"]["annotations"],
            json!({
                "kubectl.kubernetes.io/last-applied-configuration": "{...}",
                KEY: "{\"at\":1}",
            })
        );
        assert_eq!(after["metadata"]["finalizers"], json!([FIN]));
    }

    #[test]
    fn an_older_intent_is_replaced_and_the_finalizer_is_not_doubled() {
        let stored = json!({"metadata": {
            "resourceVersion": "7",
            "annotations": {KEY: "old", "team": "a"},
            "finalizers": ["other", FIN],
        }});
        let cached = meta(Some(&[(KEY, "old"), ("team", "a")]), Some(&["other", FIN]));
        let after = applied(
            stored,
            annotate_and_finalize_patch(&cached, KEY, "new", FIN),
        );
        assert_eq!(
            after["metadata"]["annotations"],
            json!({KEY: "new", "team": "a"})
        );
        assert_eq!(after["metadata"]["finalizers"], json!(["other", FIN]));
    }

    #[test]
    fn an_object_without_annotations_gets_the_map_with_the_intent_alone() {
        let stored = json!({"metadata": {"resourceVersion": "7"}});
        let after = applied(
            stored,
            annotate_and_finalize_patch(&meta(None, None), KEY, "v", FIN),
        );
        assert_eq!(after["metadata"]["annotations"], json!({KEY: "v"}));
    }

    #[test]
    fn the_patch_holds_only_at_the_resource_version_it_was_read_at() {
        let stored = json!({"metadata": {"resourceVersion": "8", "annotations": {}}});
        let patch: json_patch::Patch = serde_json::from_value(annotate_and_finalize_patch(
            &meta(Some(&[]), None),
            KEY,
            "v",
            FIN,
        ))
        .unwrap();
        let mut doc = stored;
        assert!(json_patch::patch(&mut doc, &patch).is_err());
    }
}
