//! Behaviours matched to kube-apiserver 1.37 by the differential test (`tests/e2e/differential.rs`
//! of the workspace), and the `watch_delay` knob.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Event as CoreEvent;
use k8s_openapi::api::events::v1::Event as NewEvent;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};
use kube_test_server::{Config, TestServer};
use serde_json::json;

#[tokio::test]
async fn custom_resources_refuse_what_kube_apiserver_refuses() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let pp = PostParams::default();
    api.create(&pp, &widget("w", json!({"size": "small"})))
        .await
        .unwrap();

    // Strategic merge patch: 415 on custom resources.
    let s = api_error(
        api.patch(
            "w",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((s.code, s.reason.as_str()), (415, "UnsupportedMediaType"));

    // PUT without resourceVersion: 422.
    let mut w = api.get("w").await.unwrap();
    w.metadata.resource_version = None;
    let s = api_error(api.replace("w", &pp, &w).await.unwrap_err());
    assert_eq!(s.code, 422);
    assert_eq!(
        s.message,
        "widgets.example.com \"w\" is invalid: metadata.resourceVersion: Invalid value: 0: must be specified for an update"
    );

    // Server-side apply converts to the schema's types first: 500, whatever fieldValidation.
    let s = api_error(
        api.patch(
            "w",
            &PatchParams::apply("m").force(),
            &Patch::Apply(json!({"apiVersion": "example.com/v1", "kind": "Widget",
                                 "metadata": {"name": "w"}, "spec": {"bogus": 1}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(s.code, 500);
    assert_eq!(
        s.message,
        "failed to create typed patch object (/w; example.com/v1, Kind=Widget): .spec.bogus: field not declared in schema"
    );
}

#[tokio::test]
async fn delete_answers_and_the_last_deleted_event() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let pp = PostParams::default();

    // Gone at once: a Success Status.
    api.create(&pp, &widget("free", json!({"size": "small"})))
        .await
        .unwrap();
    let status = api
        .delete("free", &DeleteParams::default())
        .await
        .unwrap()
        .right()
        .expect("a Status");
    assert_eq!(
        status.status,
        Some(kube::core::response::StatusSummary::Success)
    );
    assert_eq!(status.details.unwrap().name, "free");

    // Held by a finalizer: the object. Removing the finalizer: DELETED with the last stored
    // object, finalizer still listed.
    let mut held = widget("held", json!({"size": "small"}));
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    api.create(&pp, &held).await.unwrap();
    let obj = api
        .delete("held", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("the object");
    let rv = obj.resource_version().unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Deleted(o)) => {
            assert_eq!(o.finalizers(), ["example.com/hold".to_string()]);
            assert!(o.resource_version().unwrap().parse::<u64>().unwrap() > rv.parse().unwrap());
        }
        other => panic!("expected DELETED, got {other:?}"),
    }
}

#[tokio::test]
async fn finalizers_are_a_set_under_server_side_apply() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let applied = |f: &str| {
        json!({"apiVersion": "example.com/v1", "kind": "Widget",
               "metadata": {"name": "w", "finalizers": [f]}, "spec": {"size": "small"}})
    };
    api.patch(
        "w",
        &PatchParams::apply("one"),
        &Patch::Apply(applied("one.example.com/f")),
    )
    .await
    .unwrap();
    let w = api
        .patch(
            "w",
            &PatchParams::apply("two"),
            &Patch::Apply(applied("two.example.com/f")),
        )
        .await
        .unwrap();
    assert_eq!(w.finalizers(), ["one.example.com/f", "two.example.com/f"]);
    let fields = serde_json::to_value(&w.metadata.managed_fields).unwrap();
    assert_eq!(
        fields[1]["fieldsV1"]["f:metadata"]["f:finalizers"],
        json!({"v:\"two.example.com/f\"": {}})
    );
    // "one" drops its finalizer: only its own goes.
    let w = api
        .patch(
            "w",
            &PatchParams::apply("one"),
            &Patch::Apply(json!({"apiVersion": "example.com/v1", "kind": "Widget",
                                 "metadata": {"name": "w"}, "spec": {"size": "small"}})),
        )
        .await
        .unwrap();
    assert_eq!(w.finalizers(), ["two.example.com/f"]);
}

#[tokio::test]
async fn core_and_events_k8s_io_events_are_one_store() {
    let server = server().await;
    let client = client(&server, "default").await;
    let new: Api<NewEvent> = Api::namespaced(client.clone(), "default");
    let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let e: NewEvent = serde_json::from_value(json!({
        "metadata": {"name": "e"},
        "regarding": {"kind": "Widget", "name": "w", "namespace": "default"},
        "reason": "Tested", "note": "hello", "type": "Normal", "action": "Test",
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "example.com/ctl", "reportingInstance": "ctl-1"
    }))
    .unwrap();
    new.create(&PostParams::default(), &e).await.unwrap();
    let c = core.get("e").await.unwrap();
    assert_eq!(c.message.as_deref(), Some("hello"));
    assert_eq!(c.involved_object.name.as_deref(), Some("w"));
    assert_eq!(c.reporting_component.as_deref(), Some("example.com/ctl"));
    let n = new.get("e").await.unwrap();
    assert_eq!(n.note.as_deref(), Some("hello"));
    // Merge patches through events.k8s.io/v1 use its field names.
    new.patch(
        "e",
        &PatchParams::default(),
        &Patch::Merge(json!({"note": "again"})),
    )
    .await
    .unwrap();
    assert_eq!(
        core.get("e").await.unwrap().message.as_deref(),
        Some("again")
    );
    // events.k8s.io/v1 requires the reporting fields.
    let mut bad = e.clone();
    bad.metadata.name = Some("bad".into());
    bad.reporting_controller = None;
    let s = api_error(new.create(&PostParams::default(), &bad).await.unwrap_err());
    assert_eq!(s.code, 422);
}

#[tokio::test]
async fn watch_list_parameters_are_validated() {
    let server = server().await;
    let client = client(&server, "default").await;
    let url = format!(
        "{}/apis/example.com/v1/namespaces/default/widgets",
        server.url()
    );
    let get = |q: &str| {
        let req = http::Request::get(format!("{url}?watch=true&{q}"))
            .body(Vec::new())
            .unwrap();
        let client = client.clone();
        async move { client.request_text(req).await }
    };
    match get("sendInitialEvents=true&allowWatchBookmarks=true").await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422);
            assert_eq!(
                s.message,
                "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"
            );
        }
        other => panic!("expected 422, got {other:?}"),
    }
    match get("resourceVersionMatch=NotOlderThan").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 422),
        other => panic!("expected 422, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_delay_holds_events_back() {
    let server = TestServer::start_with(Config {
        watch_delay: Duration::from_millis(700),
        ..Config::default()
    })
    .await
    .unwrap();
    server.install_crd(widget_crd()).unwrap();
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let rv = server.resource_version().to_string();
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let start = Instant::now();
    api.create(
        &PostParams::default(),
        &widget("late", json!({"size": "small"})),
    )
    .await
    .unwrap();
    // The write itself is answered at once and reads see it; the watch sees it late.
    assert!(start.elapsed() < Duration::from_millis(500));
    assert!(api.get_opt("late").await.unwrap().is_some());
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Added(o)) => assert_eq!(o.name_any(), "late"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[tokio::test]
async fn watch_delay_can_be_switched_on_and_off_for_open_watches() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let rv = server.resource_version().to_string();
    // Opened without a delay: it is switched on afterwards and still applies.
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    server.set_watch_delay(Duration::from_millis(600));
    let start = Instant::now();
    api.create(
        &PostParams::default(),
        &widget("slow", json!({"size": "small"})),
    )
    .await
    .unwrap();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Added(o)) => assert_eq!(o.name_any(), "slow"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(550), "{waited:?}");

    server.set_watch_delay(Duration::ZERO);
    let start = Instant::now();
    api.create(
        &PostParams::default(),
        &widget("quick", json!({"size": "small"})),
    )
    .await
    .unwrap();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Added(o)) => assert_eq!(o.name_any(), "quick"),
        other => panic!("expected ADDED, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
}
