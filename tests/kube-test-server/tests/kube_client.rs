//! The test server driven by a real `kube::Client`, as the operator drives it.

mod common;

use common::*;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, ValidationDirective, WatchEvent,
    WatchParams,
};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::{Value, json};
use std::time::Duration;

fn spec_of(o: &kube::api::DynamicObject) -> Value {
    o.data["spec"].clone()
}

#[tokio::test]
async fn create_get_list_select_and_page() {
    let server = server().await;
    let client = client(&server, "team-a").await;
    let api = widgets(&client, "team-a");
    let pp = PostParams::default();

    let created = api
        .create(&pp, &widget("w0", json!({"size": "small"})))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created
            .metadata
            .uid
            .as_deref()
            .is_some_and(|u| u.len() == 36)
    );
    assert!(created.metadata.creation_timestamp.is_some());
    // The schema default is applied.
    assert_eq!(spec_of(&created)["color"], "blue");

    let again = api
        .create(&pp, &widget("w0", json!({"size": "small"})))
        .await
        .unwrap_err();
    let s = api_error(again);
    assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(s.message, "widgets.example.com \"w0\" already exists");

    let mut generated = widget("", json!({"size": "large"}));
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let g = api.create(&pp, &generated).await.unwrap();
    assert!(g.name_any().starts_with("gen-") && g.name_any().len() == 9);

    for (i, tier) in ["front", "front", "back", "db"].iter().enumerate() {
        let mut w = widget(&format!("w{}", i + 1), json!({"size": "medium"}));
        w.metadata.labels = Some([("tier".to_string(), tier.to_string())].into());
        api.create(&pp, &w).await.unwrap();
    }
    let got = api.get("w1").await.unwrap();
    assert_eq!(got.labels()["tier"], "front");
    assert_eq!(
        api.get("missing")
            .await
            .map(|_| ())
            .map_err(api_error)
            .unwrap_err()
            .code,
        404
    );

    let names = |l: kube::api::ObjectList<kube::api::DynamicObject>| {
        l.items.iter().map(|o| o.name_any()).collect::<Vec<_>>()
    };
    let sel = |s: &str| ListParams::default().labels(s);
    assert_eq!(
        names(api.list(&sel("tier=front")).await.unwrap()),
        ["w1", "w2"]
    );
    assert_eq!(
        names(api.list(&sel("tier in (back,db)")).await.unwrap()),
        ["w3", "w4"]
    );
    assert_eq!(
        names(api.list(&sel("tier,tier!=front")).await.unwrap()),
        ["w3", "w4"]
    );
    assert_eq!(api.list(&sel("!tier")).await.unwrap().items.len(), 2);
    let by_name = ListParams::default().fields("metadata.name=w3");
    assert_eq!(names(api.list(&by_name).await.unwrap()), ["w3"]);

    // limit + continue walks all 6 objects in name order, 4 pages of at most 2.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut lp = ListParams::default().limit(2);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api.list(&lp).await.unwrap();
        assert!(page.metadata.resource_version.is_some());
        pages += 1;
        seen.extend(names(page.clone()));
        token = page.metadata.continue_.filter(|c| !c.is_empty());
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 6);
    assert_eq!(seen[0], g.name_any());

    // Api::all lists across namespaces.
    common::ensure_namespace(&client, "team-b").await;
    let other = widgets(&client, "team-b");
    other
        .create(&pp, &widget("w0", json!({"size": "small"})))
        .await
        .unwrap();
    assert_eq!(
        all_widgets(&client)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        7
    );
    assert_eq!(server.list("example.com", "widgets").len(), 7);
    assert!(
        server
            .get("example.com", "widgets", Some("team-b"), "w0")
            .is_some()
    );
}

#[tokio::test]
async fn replace_patch_and_conflicts() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let pp = PostParams::default();
    let w = api
        .create(&pp, &widget("w", json!({"size": "small", "tenant": "abc"})))
        .await
        .unwrap();

    // Replace with the current resourceVersion works; with a stale one answers 409 Conflict.
    let mut fresh = w.clone();
    fresh.data["spec"]["size"] = json!("medium");
    let replaced = api.replace("w", &pp, &fresh).await.unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    let mut stale = w.clone();
    stale.data["spec"]["size"] = json!("large");
    let s = api_error(api.replace("w", &pp, &stale).await.unwrap_err());
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert!(
        s.message.contains("the object has been modified; please apply your changes to the latest version and try again"),
        "{}",
        s.message
    );

    // Merge patch.
    let patched = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": "large", "color": null}})),
        )
        .await
        .unwrap();
    assert_eq!(spec_of(&patched)["size"], "large");
    assert_eq!(
        spec_of(&patched)["color"],
        "blue",
        "removed field is defaulted again"
    );
    assert_eq!(patched.metadata.generation, Some(3));

    // JSON patch: a failing `test` answers 422 and changes nothing; a passing one applies.
    let rv = patched.resource_version().unwrap();
    let failing: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/spec/size", "value": "small"},
        {"op": "replace", "path": "/spec/size", "value": "medium"}
    ]))
    .unwrap();
    let s = api_error(
        api.patch("w", &PatchParams::default(), &Patch::<()>::Json(failing))
            .await
            .unwrap_err(),
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    assert_eq!(api.get("w").await.unwrap().resource_version().unwrap(), rv);
    let passing: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}
    ]))
    .unwrap();
    let p = api
        .patch("w", &PatchParams::default(), &Patch::<()>::Json(passing))
        .await
        .unwrap();
    assert_eq!(p.labels()["a"], "b");
    assert_eq!(
        p.metadata.generation,
        Some(3),
        "metadata changes keep the generation"
    );

    // As with the real server, `test` against null passes for a missing member (kube's
    // finalizer helper adds the first finalizer this way).
    let first_finalizer: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/f"]}
    ]))
    .unwrap();
    let p = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::<()>::Json(first_finalizer),
        )
        .await
        .unwrap();
    assert_eq!(p.finalizers(), ["example.com/f"]);
    let again: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/g"]}
    ]))
    .unwrap();
    assert_eq!(
        api_error(
            api.patch("w", &PatchParams::default(), &Patch::<()>::Json(again))
                .await
                .unwrap_err()
        )
        .code,
        422
    );

    // A merge patch carrying a stale resourceVersion is a conflict too.
    let s = api_error(
        api.patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": rv}, "spec": {"size": "small"}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(s.code, 409);

    // A no-op patch stores nothing (no new resourceVersion, no watch event).
    let before = server.resource_version();
    let same = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": "large"}})),
        )
        .await
        .unwrap();
    assert_eq!(server.resource_version(), before);
    assert_eq!(same.resource_version(), p.resource_version());

    // Unsupported patch content types answer 415.
    let req = http::Request::patch("/apis/example.com/v1/namespaces/default/widgets/w")
        .header("content-type", "application/x-unknown")
        .body(b"{}".to_vec())
        .unwrap();
    let s = api_error(client.request::<Value>(req).await.unwrap_err());
    assert_eq!(s.code, 415);
}

#[tokio::test]
async fn server_side_apply_tracks_managers() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let ssa = PatchParams::apply("alice");
    let cfg = |spec: Value| json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": spec});

    // Apply creates.
    let created = api
        .patch(
            "w",
            &ssa,
            &Patch::Apply(cfg(json!({"size": "small", "name": "one", "tags": ["a"]}))),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let mf = created.metadata.managed_fields.clone().unwrap();
    assert_eq!(mf.len(), 1);
    assert_eq!(mf[0].manager.as_deref(), Some("alice"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));
    let fields = serde_json::to_value(&mf[0].fields_v1).unwrap();
    assert!(fields["f:spec"]["f:name"].is_object(), "{fields}");

    // Apply again without `name`: alice's field is removed; the change bumps the generation.
    let updated = api
        .patch(
            "w",
            &ssa,
            &Patch::Apply(cfg(json!({"size": "medium", "tags": ["a"]}))),
        )
        .await
        .unwrap();
    assert_eq!(spec_of(&updated)["size"], "medium");
    assert!(spec_of(&updated).get("name").is_none());
    assert_eq!(updated.metadata.generation, Some(2));

    // Another manager changing alice's field conflicts, unless forced.
    let bob = PatchParams::apply("bob");
    let s = api_error(
        api.patch("w", &bob, &Patch::Apply(cfg(json!({"size": "large"}))))
            .await
            .unwrap_err(),
    );
    assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    assert!(
        s.message.contains("conflict with \"alice\""),
        "{}",
        s.message
    );
    assert!(s.message.contains(".spec.size"), "{}", s.message);
    let forced = api
        .patch(
            "w",
            &bob.clone().force(),
            &Patch::Apply(cfg(json!({"size": "large"}))),
        )
        .await
        .unwrap();
    assert_eq!(spec_of(&forced)["size"], "large");
    let managers: Vec<String> = forced
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, ["alice", "bob"]);

    // Apply without fieldManager is refused with 422, as the API server does.
    let req = http::Request::patch("/apis/example.com/v1/namespaces/default/widgets/w")
        .header("content-type", "application/apply-patch+yaml")
        .body(
            b"apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\nspec: {size: small}\n"
                .to_vec(),
        )
        .unwrap();
    let s = api_error(client.request::<Value>(req).await.unwrap_err());
    assert_eq!(s.code, 422);
    assert!(
        s.message.contains("fieldManager: Required value"),
        "{}",
        s.message
    );

    // YAML bodies work with a manager.
    let req = http::Request::patch(
        "/apis/example.com/v1/namespaces/default/widgets/y?fieldManager=carol",
    )
    .header("content-type", "application/apply-patch+yaml")
    .body(
        b"apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: y}\nspec: {size: small}\n"
            .to_vec(),
    )
    .unwrap();
    let v: Value = client.request(req).await.unwrap();
    assert_eq!(v["metadata"]["managedFields"][0]["manager"], "carol");

    // Status applied through the subresource is owned separately.
    let st = api
        .patch_status(
            "w",
            &PatchParams::apply("ctrl").force(),
            &Patch::Apply(json!({
            "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
            "status": {"phase": "Ready"}})),
        )
        .await
        .unwrap();
    assert_eq!(st.data["status"]["phase"], "Ready");
    let entry = st
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .find(|m| m.manager.as_deref() == Some("ctrl"))
        .unwrap();
    assert_eq!(entry.subresource.as_deref(), Some("status"));
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let mut w = widget("w", json!({"size": "small"}));
    w.data["status"] = json!({"phase": "Sneaky"});
    let created = api.create(&PostParams::default(), &w).await.unwrap();
    assert!(
        created.data.get("status").is_none(),
        "create cannot set status"
    );

    // Writes to the main resource ignore status.
    let p = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Main"}})),
        )
        .await
        .unwrap();
    assert!(p.data.get("status").is_none());
    assert_eq!(p.metadata.generation, Some(1));
    assert_eq!(
        p.resource_version(),
        created.resource_version(),
        "nothing changed"
    );

    // Writes to /status change only status (spec and labels in the body are ignored).
    let s = api
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({
            "metadata": {"labels": {"x": "y"}},
            "spec": {"size": "large"},
            "status": {"phase": "Ready", "observedGeneration": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(s.data["status"]["phase"], "Ready");
    assert_eq!(spec_of(&s)["size"], "small");
    assert!(s.metadata.labels.is_none());
    assert_eq!(
        s.metadata.generation,
        Some(1),
        "status writes keep the generation"
    );

    // PUT on /status, with a stale resourceVersion: 409; with the current one: ok.
    let mut obj = api.get_status("w").await.unwrap();
    obj.data["status"]["phase"] = json!("Put");
    let ok = api
        .replace_status("w", &PostParams::default(), &obj)
        .await
        .unwrap();
    assert_eq!(ok.data["status"]["phase"], "Put");
    let s = api_error(
        api.replace_status("w", &PostParams::default(), &obj)
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code, 409);

    // Spec changes bump the generation; metadata changes do not.
    let g2 = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": "medium"}})),
        )
        .await
        .unwrap();
    assert_eq!(g2.metadata.generation, Some(2));
    assert_eq!(
        g2.data["status"]["phase"], "Put",
        "status survives spec writes"
    );
    let g2b = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(g2b.metadata.generation, Some(2));
}

#[tokio::test]
async fn finalizers_hold_deletion() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let mut w = widget("w", json!({"size": "small"}));
    w.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    api.create(&PostParams::default(), &w).await.unwrap();

    let deleted = api.delete("w", &DeleteParams::default()).await.unwrap();
    let obj = deleted.left().expect("the object, still there");
    assert!(obj.metadata.deletion_timestamp.is_some());
    assert_eq!(
        obj.metadata.generation,
        Some(2),
        "marking for deletion bumps the generation"
    );
    let still = api.get("w").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());

    // No new finalizers while being deleted.
    let s = api_error(
        api.patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/hold", "new/one"]}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(s.code, 422);
    assert!(
        s.message.contains("no new finalizers can be added"),
        "{}",
        s.message
    );

    // Removing the last finalizer removes the object.
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_error(api.get("w").await.unwrap_err()).code, 404);
    assert_eq!(
        api_error(api.delete("w", &DeleteParams::default()).await.unwrap_err()).code,
        404
    );

    // Without finalizers, delete removes at once; propagation/grace params are accepted.
    api.create(
        &PostParams::default(),
        &widget("v", json!({"size": "small"})),
    )
    .await
    .unwrap();
    api.delete("v", &DeleteParams::foreground().grace_period(0))
        .await
        .unwrap();
    assert!(
        server
            .get("example.com", "widgets", Some("default"), "v")
            .is_none()
    );
}

#[tokio::test]
async fn schema_and_cel_validation() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let pp = PostParams::default();

    let s = api_error(
        api.create(&pp, &widget("bad", json!({"size": "bogus", "name": "far-too-long-name", "tenant": "XYZ", "replicas": 9})))
            .await
            .unwrap_err(),
    );
    assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
    for expected in [
        "Widget.example.com \"bad\" is invalid: [",
        "spec.size: Unsupported value: \"bogus\": supported values: \"small\", \"medium\", \"large\"",
        "spec.name: Too long: may not be more than 10 bytes",
        "spec.tenant: Invalid value: \"XYZ\": spec.tenant in body should match '^[0-9a-f]+$'",
        "spec.replicas: Invalid value: 9: spec.replicas in body should be less than or equal to 5",
    ] {
        assert!(
            s.message.contains(expected),
            "missing {expected:?} in {}",
            s.message
        );
    }
    let details = s.details.unwrap();
    assert_eq!(details.kind, "Widget");
    assert_eq!(details.group, "example.com");
    let causes = details.causes;
    assert!(
        causes
            .iter()
            .any(|c| c.reason == "FieldValueNotSupported" && c.field == "spec.size")
    );
    assert!(
        causes
            .iter()
            .any(|c| c.reason == "FieldValueTooLong" && c.field == "spec.name")
    );

    let s = api_error(
        api.create(&pp, &widget("req", json!({})))
            .await
            .unwrap_err(),
    );
    // A Required error blocks the CEL rules, and a last cause says so (as kube-apiserver).
    assert_eq!(
        s.message,
        "Widget.example.com \"req\" is invalid: [spec.size: Required value, <nil>: Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation]"
    );

    let s = api_error(
        api.create(
            &pp,
            &widget("typ", json!({"size": "small", "replicas": "two"})),
        )
        .await
        .unwrap_err(),
    );
    assert!(
        s.message.contains("spec.replicas: Invalid value: \"string\": spec.replicas in body must be of type integer: \"string\""),
        "{}",
        s.message
    );

    // CEL rule.
    let s = api_error(
        api.create(
            &pp,
            &widget("cel", json!({"size": "small", "name": "forbidden"})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        s.message,
        "Widget.example.com \"cel\" is invalid: spec: Invalid value: spec.name must not be 'forbidden'"
    );

    // CEL transition rule (oldSelf) applies on update only.
    api.create(&pp, &widget("t", json!({"size": "small", "tenant": "abc"})))
        .await
        .unwrap();
    let s = api_error(
        api.patch(
            "t",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"tenant": "def"}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        s.message,
        "Widget.example.com \"t\" is invalid: spec: Invalid value: spec.tenant is immutable"
    );

    // metadata.name must be a DNS subdomain.
    let s = api_error(
        api.create(&pp, &widget("Bad_Name", json!({"size": "small"})))
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code, 422);
    assert!(
        s.message
            .contains("metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"),
        "{}",
        s.message
    );

    // Unknown fields: pruned with a warning by default, refused with Strict.
    let w = api
        .create(&pp, &widget("u", json!({"size": "small", "bogus": 1})))
        .await
        .unwrap();
    assert!(spec_of(&w).get("bogus").is_none());
    let strict = PatchParams {
        field_validation: Some(ValidationDirective::Strict),
        ..PatchParams::default()
    };
    let s = api_error(
        api.patch("u", &strict, &Patch::Merge(json!({"spec": {"bogus": 2}})))
            .await
            .unwrap_err(),
    );
    assert_eq!(s.code, 400);
    assert!(
        s.message
            .contains("strict decoding error: unknown field \"spec.bogus\""),
        "{}",
        s.message
    );

    // dryRun validates without storing.
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    api.create(&dry, &widget("dry", json!({"size": "small"})))
        .await
        .unwrap();
    assert!(
        server
            .get("example.com", "widgets", Some("default"), "dry")
            .is_none()
    );
    assert_eq!(
        api_error(
            api.create(&dry, &widget("dry", json!({"size": "nope"})))
                .await
                .unwrap_err()
        )
        .code,
        422
    );

    // Bad JSON is a 400 Status, not a crash.
    let req = http::Request::post("/apis/example.com/v1/namespaces/default/widgets")
        .header("content-type", "application/json")
        .body(b"{not json".to_vec())
        .unwrap();
    assert_eq!(
        api_error(client.request::<Value>(req).await.unwrap_err()).code,
        400
    );
}

async fn next_event(
    stream: &mut (
             impl futures::Stream<
        Item = Result<watcher::Event<kube::api::DynamicObject>, watcher::Error>,
    > + Unpin
         ),
) -> Option<watcher::Event<kube::api::DynamicObject>> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(e))) => return Some(e),
            Ok(Some(Err(_))) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

fn label(e: &watcher::Event<kube::api::DynamicObject>) -> String {
    match e {
        watcher::Event::Apply(o) => format!("apply {}", o.name_any()),
        watcher::Event::Delete(o) => format!("delete {}", o.name_any()),
        watcher::Event::Init => "init".into(),
        watcher::Event::InitApply(o) => format!("initapply {}", o.name_any()),
        watcher::Event::InitDone => "initdone".into(),
    }
}

#[tokio::test]
async fn watcher_sees_changes_and_recovers() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    api.create(
        &PostParams::default(),
        &widget("pre", json!({"size": "small"})),
    )
    .await
    .unwrap();
    let cfg = watcher::Config::default().disable_bookmarks();
    let mut stream = watcher(api.clone(), cfg).boxed();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(label(&next_event(&mut stream).await.unwrap()));
    }
    assert_eq!(got, ["init", "initapply pre", "initdone"]);

    api.create(
        &PostParams::default(),
        &widget("a", json!({"size": "small"})),
    )
    .await
    .unwrap();
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"size": "large"}})),
    )
    .await
    .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(label(&next_event(&mut stream).await.unwrap()));
    }
    assert_eq!(got, ["apply a", "apply a", "delete a"]);

    // expire_watches: the watcher re-watches from its resourceVersion, without re-listing.
    let lists = server.count("list", "widgets", None);
    let watches = server.count("watch", "widgets", None);
    server.expire_watches();
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.create(
        &PostParams::default(),
        &widget("b", json!({"size": "small"})),
    )
    .await
    .unwrap();
    assert_eq!(label(&next_event(&mut stream).await.unwrap()), "apply b");
    assert_eq!(server.count("list", "widgets", None), lists);
    assert!(server.count("watch", "widgets", None) > watches);

    // After a compaction the watcher's next watch gets 410 Gone and it recovers by re-listing.
    server.compact();
    server.expire_watches();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(label(&next_event(&mut stream).await.unwrap()));
    }
    assert_eq!(got, ["init", "initapply b", "initapply pre", "initdone"]);
    assert!(server.count("list", "widgets", None) > lists);
}

#[tokio::test]
async fn raw_watch_gone_bookmarks_and_initial_events() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let w = api
        .create(
            &PostParams::default(),
            &widget("w", json!({"size": "small"})),
        )
        .await
        .unwrap();
    let old_rv = w.resource_version().unwrap();
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"size": "large"}})),
    )
    .await
    .unwrap();

    // Resuming from an RV in the history replays what happened since.
    let mut s = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .unwrap()
        .boxed();
    match s.try_next().await.unwrap() {
        Some(WatchEvent::Modified(o)) => assert_eq!(o.data["spec"]["size"], "large"),
        other => panic!("expected MODIFIED, got {other:?}"),
    }

    // After compaction the same RV is too old: an ERROR event with 410 Expired.
    server.compact();
    let mut s = api
        .watch(&WatchParams::default(), &old_rv)
        .await
        .unwrap()
        .boxed();
    match s.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
            assert!(
                e.message
                    .starts_with(&format!("too old resource version: {old_rv} (")),
                "{}",
                e.message
            );
        }
        other => panic!("expected a 410 ERROR, got {other:?}"),
    }

    // Bookmarks arrive about every second; timeoutSeconds ends the stream.
    let wp = WatchParams::default().timeout(2);
    let current = server.resource_version().to_string();
    let start = std::time::Instant::now();
    let events: Vec<_> = api
        .watch(&wp, &current)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_secs(2) && start.elapsed() < Duration::from_secs(4));
    assert!(
        events
            .iter()
            .filter(|e| matches!(e, WatchEvent::Bookmark(_)))
            .count()
            >= 2
    );

    // RV "0": synthetic ADDED for what exists; streaming lists end the initial events with a
    // bookmark annotated k8s.io/initial-events-end.
    let mut s = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        s.try_next().await.unwrap(),
        Some(WatchEvent::Added(_))
    ));
    let mut s = api
        .watch(&WatchParams::streaming_lists(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        s.try_next().await.unwrap(),
        Some(WatchEvent::Added(_))
    ));
    match s.try_next().await.unwrap() {
        Some(WatchEvent::Bookmark(b)) => {
            assert_eq!(
                b.metadata
                    .annotations
                    .get("k8s.io/initial-events-end")
                    .map(String::as_str),
                Some("true")
            );
        }
        other => panic!("expected the initial-events-end bookmark, got {other:?}"),
    }

    // Label-selector watches see objects enter and leave the selection.
    let wp = WatchParams::default().labels("app=x");
    let mut s = api
        .watch(&wp, &server.resource_version().to_string())
        .await
        .unwrap()
        .boxed();
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "x"}}})),
    )
    .await
    .unwrap();
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "y"}}})),
    )
    .await
    .unwrap();
    assert!(matches!(
        s.try_next().await.unwrap(),
        Some(WatchEvent::Added(_))
    ));
    assert!(matches!(
        s.try_next().await.unwrap(),
        Some(WatchEvent::Deleted(_))
    ));
}

#[tokio::test]
async fn builtins_faults_and_counters() {
    let server = server().await;
    let client = client(&server, "default").await;
    let pp = PostParams::default();

    // Secrets: stringData is stored as base64 data.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    secrets
        .create(
            &pp,
            &serde_json::from_value(
                json!({"metadata": {"name": "creds"}, "stringData": {"token": "hello"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let s = secrets.get("creds").await.unwrap();
    assert_eq!(s.data.unwrap()["token"].0, b"hello");
    assert_eq!(s.type_.as_deref(), Some("Opaque"));

    // Metadata-only reads (PartialObjectMetadata), as metadata watchers use them.
    let meta = secrets.get_metadata("creds").await.unwrap();
    assert_eq!(meta.metadata.name.as_deref(), Some("creds"));
    let metas = secrets.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(metas.items.len(), 1);

    // Leases: create and patch (leader election style).
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    leases
        .create(&pp, &serde_json::from_value(json!({"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}})).unwrap())
        .await
        .unwrap();
    let l = leases
        .patch(
            "leader",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "b"}})),
        )
        .await
        .unwrap();
    assert_eq!(l.spec.unwrap().holder_identity.as_deref(), Some("b"));

    // events.k8s.io Events through kube's recorder: create, then a patch for the repeat.
    let recorder = kube::runtime::events::Recorder::new(client.clone(), "test-controller".into());
    let widget_obj = widgets(&client, "default")
        .create(&pp, &widget("w", json!({"size": "small"})))
        .await
        .unwrap();
    let reference = widget_obj.object_ref(&widget_resource());
    let ev = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Normal,
        reason: "Created".into(),
        note: Some("made it".into()),
        action: "Create".into(),
        secondary: None,
    };
    recorder.publish(&ev, &reference).await.unwrap();
    recorder.publish(&ev, &reference).await.unwrap();
    let events: Api<K8sEvent> = Api::namespaced(client.clone(), "default");
    let list = events.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].reason.as_deref(), Some("Created"));
    assert_eq!(server.count("patch", "events", None), 1);

    // fail_next: the next two status writes answer 409, then writes go through again.
    let api = widgets(&client, "default");
    server.fail_next(2, "patch", "widgets", Some("status"), 409);
    let writes = server.writes("widgets");
    let status_patch = Patch::Merge(json!({"status": {"phase": "Ready"}}));
    for _ in 0..2 {
        let s = api_error(
            api.patch_status("w", &PatchParams::default(), &status_patch)
                .await
                .unwrap_err(),
        );
        assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
    }
    // The main resource is not affected by a status rule.
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
    )
    .await
    .unwrap();
    api.patch_status("w", &PatchParams::default(), &status_patch)
        .await
        .unwrap();
    assert_eq!(server.writes("widgets"), writes + 4);
    server.fail_next(1, "get", "secrets", None, 500);
    assert_eq!(api_error(secrets.get("creds").await.unwrap_err()).code, 500);
    assert!(secrets.get("creds").await.is_ok());
    // kube's client retries 503 by itself: the injected failure costs one extra request.
    let gets = server.count("get", "secrets", None);
    server.fail_next(1, "get", "secrets", None, 503);
    assert!(secrets.get("creds").await.is_ok());
    assert_eq!(server.count("get", "secrets", None), gets + 2);

    // Counters over HTTP.
    let before = server.requests();
    let stats: Value = client
        .request(
            http::Request::get("/__test/stats")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(server.requests(), before, "/__test/ is not counted");
    assert_eq!(stats["requests"], before);
    assert!(stats["writes"]["widgets"].as_u64().unwrap() >= 5);
    assert_eq!(stats["objects"]["widgets.example.com"], 1);

    // Faults over HTTP.
    let _: Value = client
        .request(
            http::Request::post("/__test/fail")
                .body(br#"{"n":1,"verb":"create","resource":"leases","status":500}"#.to_vec())
                .unwrap(),
        )
        .await
        .unwrap();
    let s = api_error(
        leases
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": "other"}})).unwrap(),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((s.code, s.reason.as_str()), (500, "InternalError"));

    // Discovery and version, as kube's discovery client reads them.
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .find(|(ar, _)| ar.kind == "Widget")
        .unwrap();
    assert_eq!(ar.plural, "widgets");
    assert!(caps.subresources.iter().any(|(s, _)| s.plural == "status"));
    assert_eq!(
        client.apiserver_version().await.unwrap().git_version,
        "v1.37.2"
    );

    // Unknown resources and groups answer 404 Status, not silence.
    let req = http::Request::get("/apis/nope.example.com/v1/things")
        .body(Vec::new())
        .unwrap();
    assert_eq!(
        api_error(client.request::<Value>(req).await.unwrap_err()).code,
        404
    );
}

#[tokio::test]
async fn crd_lifecycle() {
    let server = kube_test_server::TestServer::start().await.unwrap();
    let client = client(&server, "default").await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    let created = crds
        .create(
            &PostParams::default(),
            &serde_json::from_value(widget_crd()).unwrap(),
        )
        .await
        .unwrap();
    let conditions = created.status.unwrap().conditions.unwrap();
    for ty in ["Established", "NamesAccepted"] {
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == ty && c.status == "True"),
            "{ty}"
        );
    }
    // Endpoints exist at once.
    let api = widgets(&client, "default");
    let mut w = widget("w", json!({"size": "small"}));
    w.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    api.create(&PostParams::default(), &w).await.unwrap();

    // Deleting the CRD deletes its objects; finalizers hold the CRD until they are released.
    crds.delete("widgets.example.com", &DeleteParams::default())
        .await
        .unwrap();
    let s = api_error(
        api.create(
            &PostParams::default(),
            &widget("new", json!({"size": "small"})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(s.code, 405);
    assert!(
        api.get("w")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(
        api_error(crds.get("widgets.example.com").await.unwrap_err()).code,
        404
    );
    assert_eq!(
        api_error(api.list(&ListParams::default()).await.unwrap_err()).code,
        404
    );
    // An invalid CRD is refused.
    let mut bad = widget_crd();
    bad["metadata"]["name"] = json!("wrong.example.com");
    assert_eq!(
        api_error(
            crds.create(
                &PostParams::default(),
                &serde_json::from_value(bad).unwrap()
            )
            .await
            .unwrap_err()
        )
        .code,
        422
    );
}

#[tokio::test]
async fn namespaces_are_required_and_cascade() {
    let server = server().await;
    let client = client(&server, "default").await;
    let pp = PostParams::default();
    // Objects cannot be created in a namespace nobody created.
    let s = api_error(
        widgets(&client, "ghost")
            .create(&pp, &widget("w", json!({"size": "small"})))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (s.code, s.message.as_str()),
        (404, "namespaces \"ghost\" not found")
    );

    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert!(names.contains(&"default".to_string()) && !names.contains(&"ghost".to_string()));
    namespaces
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "team-x"}})).unwrap(),
        )
        .await
        .unwrap();
    let api = widgets(&client, "team-x");
    let mut held = widget("held", json!({"size": "small"}));
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    api.create(&pp, &held).await.unwrap();
    api.create(&pp, &widget("free", json!({"size": "small"})))
        .await
        .unwrap();

    // Deleting the namespace deletes its contents; finalizers keep it Terminating.
    namespaces
        .delete("team-x", &DeleteParams::default())
        .await
        .unwrap();
    let ns = namespaces.get("team-x").await.unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Terminating"));
    assert_eq!(api_error(api.get("free").await.unwrap_err()).code, 404);
    let s = api_error(
        api.create(&pp, &widget("new", json!({"size": "small"})))
            .await
            .unwrap_err(),
    );
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
    assert!(
        s.message.contains("because it is being terminated"),
        "{}",
        s.message
    );
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(
        api_error(namespaces.get("team-x").await.unwrap_err()).code,
        404
    );
}

#[tokio::test]
async fn shutdown_ends_watches_and_connections() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let mut stream = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    server.shutdown();
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the watch stream must end on shutdown");
    // A new client (the old one's pool may hold a connection) cannot reach the server.
    let fresh = common::client(&server, "default").await;
    assert!(
        widgets(&fresh, "default")
            .list(&ListParams::default())
            .await
            .is_err()
    );
}
