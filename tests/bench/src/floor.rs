//! The Kubernetes floor (`--peer floor`): a client that makes, for each ServerGroup, the three
//! writes the operator makes on the happy path, with the same bodies and field manager, and
//! nothing else: no Waldur, no wait for a group to be made, no caches. Creating: the finalizer
//! with the create intent, the Created Event, the status once Ready. Deleting: the Deleting
//! status, the finalizer's removal, the Deleted Event.
//!
//! Its time to all Ready is what the API server (and this machine) needs for those writes alone:
//! a bound no client making them can beat. The operator's row beside it shows what Waldur and
//! the operator add to it. It runs as a child process (`waldur-bench --floor-client`) as the
//! operator does, so the two rows share the machine the same way.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use waldur_operator::controller::events::EventWriter;

/// What the operator writes under: its field manager and Event reporter, its finalizer and
/// its create-intent annotation.
const MANAGER: &str = "waldur-operator";
const FINALIZER: &str = "openstack.waldur.com/server-group";
const INTENT: &str = "openstack.waldur.com/create-intent";

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Job {
    Create,
    Delete,
}

/// What to do for an object as the watch sees it: a new one is taken in, a deleted one let
/// go; anything else (its own writes coming back) needs nothing.
fn job(obj: &DynamicObject) -> Option<Job> {
    let deleting = obj.metadata.deletion_timestamp.is_some();
    let finalized = obj.finalizers().iter().any(|f| f == FINALIZER);
    match (deleting, finalized) {
        (false, false) => Some(Job::Create),
        (true, true) => Some(Job::Delete),
        _ => None,
    }
}

/// Runs until killed, with at most `concurrency` objects in hand at once (the operator's
/// reconcile concurrency).
pub async fn run(concurrency: usize) -> Result<(), String> {
    let client = Client::try_default().await.map_err(|e| e.to_string())?;
    let events = Arc::new(EventWriter::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: None,
        },
    ));
    let all: Api<DynamicObject> = Api::all_with(client.clone(), &crate::resource());
    let taken: Arc<Mutex<HashSet<(String, Job)>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut objects = watcher(all, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(obj) = objects.next().await {
        let Ok(obj) = obj else { continue };
        let Some(job) = job(&obj) else { continue };
        let key = (obj.uid().unwrap_or_default(), job);
        if !lock(&taken).insert(key.clone()) {
            continue;
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (client, events, taken) = (client.clone(), events.clone(), taken.clone());
        tokio::spawn(async move {
            let done = match job {
                Job::Create => create(&client, &events, &obj).await,
                Job::Delete => delete(&client, &events, &obj).await,
            };
            if let Err(e) = done {
                eprintln!("floor client: {}: {e}", obj.name_any());
                // Taken again when the watch next shows it.
                lock(&taken).remove(&key);
            }
            drop(permit);
        });
    }
    Err("the watch ended".into())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn api(client: &Client, obj: &DynamicObject) -> Api<DynamicObject> {
    let ns = obj.namespace().unwrap_or_default();
    Api::namespaced_with(client.clone(), &ns, &crate::resource())
}

fn manager() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).unwrap_or_default()
}

async fn create(client: &Client, events: &EventWriter, obj: &DynamicObject) -> Result<(), String> {
    let api = api(client, obj);
    let name = obj.name_any();
    let spec = &obj.data["spec"];
    let intent = json!({"tenant": spec["tenant"], "name": name, "at": now()}).to_string();
    json_patch(
        &api,
        &name,
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": obj.resource_version()},
            {"op": "add", "path": "/metadata/annotations", "value": {INTENT: intent}},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ]),
    )
    .await?;
    // Waldur's ids, as long as a real group's: the object's uid stands in for both.
    let backend_id = obj.uid().unwrap_or_default();
    let uuid = backend_id.replace('-', "");
    event(
        events,
        obj,
        "Created",
        "Bind",
        &format!("created Waldur server group {uuid}"),
    )
    .await?;
    let at = now();
    let generation = obj.metadata.generation;
    let condition = |type_: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": "True", "reason": reason, "message": message,
               "observedGeneration": generation, "lastTransitionTime": at})
    };
    let status = json!({
        "backendId": backend_id,
        "conditions": [
            condition("Ready", "Available", "the group is OK in Waldur"),
            condition("Synced", "ReconcileSuccess", ""),
        ],
        "instanceCount": 0,
        "lastSyncTime": at,
        "name": name,
        "observedGeneration": generation,
        "policy": spec["policy"],
        "state": "OK",
        "tenantUuid": spec["tenant"],
        "url": format!("http://127.0.0.1:40000/api/openstack-server-groups/{uuid}/"),
        "uuid": uuid,
    });
    apply_status(&api, obj, status).await
}

async fn delete(client: &Client, events: &EventWriter, obj: &DynamicObject) -> Result<(), String> {
    let api = api(client, obj);
    let name = obj.name_any();
    let mut status = obj.data["status"].clone();
    status["conditions"] = json!([
        {"type": "Ready", "status": "False", "reason": "Deleting",
         "message": "deleting the Waldur group", "observedGeneration": obj.metadata.generation,
         "lastTransitionTime": now()},
        status["conditions"][1].clone(),
    ]);
    apply_status(&api, obj, status).await?;
    let left: Vec<&String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    json_patch(
        &api,
        &name,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": obj.finalizers()},
            {"op": "replace", "path": "/metadata/finalizers", "value": left},
        ]),
    )
    .await?;
    event(events, obj, "Deleted", "Delete", "deleted the Waldur group").await
}

async fn json_patch(api: &Api<DynamicObject>, name: &str, patch: Value) -> Result<(), String> {
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(|e| e.to_string())?;
    api.patch(name, &manager(), &Patch::<()>::Json(patch))
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn apply_status(
    api: &Api<DynamicObject>,
    obj: &DynamicObject,
    status: Value,
) -> Result<(), String> {
    let patch = json!({
        "apiVersion": "openstack.waldur.com/v1alpha1",
        "kind": "ServerGroup",
        "metadata": {"uid": obj.uid()},
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

async fn event(
    events: &EventWriter,
    obj: &DynamicObject,
    reason: &str,
    action: &str,
    note: &str,
) -> Result<(), String> {
    let event = Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note.into()),
        action: action.into(),
        secondary: None,
    };
    events
        .publish(&event, &obj.object_ref(&crate::resource()))
        .await
        .map_err(|e| e.to_string())
}
