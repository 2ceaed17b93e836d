//! A kube-runtime Controller (finalizer helper, server-side-applied status, watcher with
//! bookmarks) reconciling Widgets on the test server: the paths an operator takes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;

const FINALIZER: &str = "example.com/cleanup";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Error(String);

async fn reconcile(obj: Arc<DynamicObject>, api: Arc<Api<DynamicObject>>) -> Result<Action, Error> {
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(w) => {
                let status = json!({
                    "apiVersion": "example.com/v1", "kind": "Widget",
                    "status": {"phase": "Ready", "observedGeneration": w.metadata.generation,
                        "conditions": [{"type": "Ready", "status": "True", "reason": "Reconciled",
                            "message": "", "observedGeneration": w.metadata.generation,
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
                });
                api.patch_status(
                    &w.name_any(),
                    &PatchParams::apply("widget-controller").force(),
                    &Patch::Apply(status),
                )
                .await
                .map_err(|e| Error(e.to_string()))?;
                Ok(Action::await_change())
            }
            Finalizer::Cleanup(_) => Ok(Action::await_change()),
        }
    })
    .await
    .map_err(|e: kube::runtime::finalizer::Error<Error>| Error(e.to_string()))
}

#[tokio::test]
async fn controller_reconciles_through_finalizers_and_status() {
    let server = server().await;
    let client = client(&server, "default").await;
    let api = widgets(&client, "default");
    let shared = Arc::new(api.clone());
    let controller =
        Controller::new_with(api.clone(), watcher::Config::default(), widget_resource())
            .run(
                reconcile,
                |_obj, _err: &Error, _ctx| Action::requeue(Duration::from_millis(100)),
                shared,
            )
            .for_each(|_| async {});
    let handle = tokio::spawn(controller);

    api.create(
        &PostParams::default(),
        &widget("w", json!({"size": "small"})),
    )
    .await
    .unwrap();
    let ready = |generation: i64| {
        let api = api.clone();
        async move {
            for _ in 0..100 {
                if let Ok(w) = api.get("w").await
                    && w.finalizers() == [FINALIZER]
                    && w.data["status"]["observedGeneration"] == json!(generation)
                {
                    return w;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("widget never reconciled for generation {generation}");
        }
    };
    let w = ready(1).await;
    assert_eq!(w.data["status"]["conditions"][0]["status"], "True");

    // A spec change is a new generation, reconciled again.
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"size": "large"}})),
    )
    .await
    .unwrap();
    ready(2).await;

    // Deletion runs the cleanup and releases the finalizer.
    api.delete("w", &DeleteParams::default()).await.unwrap();
    for _ in 0..100 {
        if server
            .get("example.com", "widgets", Some("default"), "w")
            .is_none()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        server
            .get("example.com", "widgets", Some("default"), "w")
            .is_none()
    );
    handle.abort();
}
