//! The Kubernetes floor (`--peer floor`): a client that makes, for each ServerGroup, the three
//! writes the operator makes on the happy path, built by the operator's own functions and sent
//! under its field manager, and nothing else: no Waldur, no wait for a group to be made, no
//! caches. Creating: the finalizer with the create intent, the Created Event, the status once
//! Ready. Deleting: the Deleting status, the finalizer's removal, the Deleted Event.
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
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Semaphore;
use waldur_operator::api::conditions::{
    ConditionStatus, READY, SYNCED, ready_reason, set_condition, synced_reason,
};
use waldur_operator::api::{
    ANNOTATION_CREATE_INTENT, CreateIntent, FINALIZER, ServerGroup, ServerGroupStatus,
};
use waldur_operator::controller::events::EventWriter;
use waldur_operator::controller::{MANAGER, finalizers, status};

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Job {
    Create,
    Delete,
}

/// What to do for an object as the watch sees it: a new one is taken in, a deleted one let
/// go; anything else (its own writes coming back) needs nothing.
fn job(sg: &ServerGroup) -> Option<Job> {
    let deleting = sg.metadata.deletion_timestamp.is_some();
    let finalized = sg.finalizers().iter().any(|f| f == FINALIZER);
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
    let taken: Arc<Mutex<HashSet<(String, Job)>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut objects = watcher(Api::<ServerGroup>::all(client.clone()), Default::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(sg) = objects.next().await {
        let Ok(sg) = sg else { continue };
        let Some(job) = job(&sg) else { continue };
        let key = (sg.uid().unwrap_or_default(), job);
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
            let api = Api::<ServerGroup>::namespaced(client, &sg.namespace().unwrap_or_default());
            let done = match job {
                Job::Create => create(&api, &events, &sg).await,
                Job::Delete => delete(&api, &events, &sg).await,
            };
            if let Err(e) = done {
                eprintln!("floor client: {}: {e}", sg.name_any());
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

async fn create(
    api: &Api<ServerGroup>,
    events: &EventWriter,
    sg: &ServerGroup,
) -> Result<(), kube::Error> {
    let tenant = sg.spec.tenant.clone().unwrap_or_default();
    let intent = CreateIntent {
        tenant: tenant.clone(),
        name: sg.waldur_name(),
        at: Timestamp::now().to_string(),
        replaces: String::new(),
        foreign: Vec::new(),
    };
    let intent = serde_json::to_string(&intent).map_err(kube::Error::SerdeError)?;
    json_patch(
        api,
        sg,
        finalizers::annotate_and_finalize_patch(
            &sg.metadata,
            ANNOTATION_CREATE_INTENT,
            &intent,
            FINALIZER,
        ),
    )
    .await?;
    // Waldur's ids, as long as a real group's: the object's uid stands in for both.
    let backend_id = sg.uid().unwrap_or_default();
    let uuid = backend_id.replace('-', "");
    let note = format!("created Waldur server group {uuid}");
    event(events, sg, "Created", "Bind", &note).await?;
    let now = Time(Timestamp::now());
    let mut next = ServerGroupStatus {
        observed_generation: sg.metadata.generation,
        url: Some(format!(
            "http://127.0.0.1:40000/api/openstack-server-groups/{uuid}/"
        )),
        uuid: Some(uuid),
        tenant_uuid: Some(tenant),
        backend_id: Some(backend_id),
        state: Some("OK".into()),
        name: Some(sg.waldur_name()),
        policy: sg.spec.policy.as_ref().map(|p| p.to_string()),
        instance_count: Some(0),
        last_sync_time: Some(now.clone()),
        ..Default::default()
    };
    condition(
        &mut next,
        sg,
        READY,
        true,
        ready_reason::AVAILABLE,
        "the group is OK in Waldur",
        &now,
    );
    condition(
        &mut next,
        sg,
        SYNCED,
        true,
        synced_reason::RECONCILED,
        "",
        &now,
    );
    status::write(api, sg, &next).await.map(drop)
}

async fn delete(
    api: &Api<ServerGroup>,
    events: &EventWriter,
    sg: &ServerGroup,
) -> Result<(), kube::Error> {
    let mut next = sg.status.clone().unwrap_or_default();
    let now = Time(Timestamp::now());
    let message = "deleting the Waldur group";
    condition(
        &mut next,
        sg,
        READY,
        false,
        ready_reason::DELETING,
        message,
        &now,
    );
    status::write(api, sg, &next).await?;
    if let Some(patch) = finalizers::remove_patch(sg.finalizers(), FINALIZER) {
        json_patch(api, sg, patch).await?;
    }
    event(events, sg, "Deleted", "Delete", "deleted the Waldur group").await
}

/// A condition for `sg`'s generation, as the operator sets it.
fn condition(
    status: &mut ServerGroupStatus,
    sg: &ServerGroup,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    now: &Time,
) {
    let value = if ok {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    let generation = sg.metadata.generation;
    set_condition(
        &mut status.conditions,
        type_,
        value,
        reason,
        message,
        generation,
        now,
    );
}

async fn json_patch(
    api: &Api<ServerGroup>,
    sg: &ServerGroup,
    patch: serde_json::Value,
) -> Result<(), kube::Error> {
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(kube::Error::SerdeError)?;
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    api.patch(&sg.name_any(), &params, &Patch::<()>::Json(patch))
        .await
        .map(drop)
}

async fn event(
    events: &EventWriter,
    sg: &ServerGroup,
    reason: &str,
    action: &str,
    note: &str,
) -> Result<(), kube::Error> {
    let event = Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note.into()),
        action: action.into(),
        secondary: None,
    };
    events.publish(&event, &sg.object_ref(&())).await
}
