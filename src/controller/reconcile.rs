//! Effects: carries out what `plan` decides, against Waldur and the Kubernetes API.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};

use super::Context;
use super::error::Error;
use super::finalizers::{add_patch, remove_patch};
use super::index::{Answer, Shard};
use super::plan::{self, Cleanup, FollowUp, Lookup, Missing};
use super::status;

mod cleanup;
mod locate;
mod observe;
mod reimport;
use crate::api::conditions::{
    ConditionStatus, READY, SYNCED, ready_reason, set_condition, set_stalled, synced_reason,
};
use crate::api::{
    AutoPull, FINALIZER, HandledRequests, ManagementPolicy, ServerGroup, ServerGroupStatus,
};
use crate::waldur::{
    ErrorKind, ListQuery, NewServerGroup, ServerGroup as WaldurGroup, State, WaldurClient,
    WaldurError, WaldurUuid,
};

/// How soon to look again after asking Waldur to do something asynchronous.
const SOON: Duration = Duration::from_secs(2);

/// Reconciles one ServerGroup: the design's seven steps.
pub async fn reconcile(sg: Arc<ServerGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let sg = ctx.freshest(sg);
    let r = Reconciler::new(sg.clone(), ctx.clone());
    let result = r.run().await;
    match &result {
        Ok(_) => ctx.clear_failures(&sg),
        // Nothing happened: the resource waits for a worker of its Waldur, and says nothing.
        Err(Error::WorkersBusy(_) | Error::StaleView(_)) => {}
        Err(e) => r.report_failure(e).await,
    }
    let reason = result.as_ref().err().map(Error::reason);
    ctx.metrics.reconciled(started.elapsed(), reason);
    result
}

/// A Waldur client with, on the batched read path, the index of its credentials.
struct Waldur {
    client: WaldurClient,
    shard: Option<Arc<Shard>>,
}

impl std::ops::Deref for Waldur {
    type Target = WaldurClient;
    fn deref(&self) -> &WaldurClient {
        &self.client
    }
}

impl Waldur {
    /// After a write: the index must not answer for this group until it has seen the change.
    fn written(&self, uuid: &WaldurUuid) {
        if let Some(shard) = &self.shard {
            shard.written(uuid);
        }
    }

    fn record(&self, group: &WaldurGroup) {
        if let Some(shard) = &self.shard {
            shard.record(group);
        }
    }

    fn create_attempted(&self, tenant: &WaldurUuid, name: &str) {
        if let Some(shard) = &self.shard {
            shard.create_attempted(tenant, name);
        }
    }
}

use plan::Binding;

/// A vanished group that may come back: what was learnt, and how to report the wait.
struct Awaiting {
    reimport: crate::api::Reimport,
    /// `Reimporting`, or `TenantErred` when the tenant blocks everything.
    reason: &'static str,
    message: String,
    retry_in: Duration,
    /// A re-sync was asked for now.
    asked: bool,
}

enum Located {
    /// A group made here vanished before its first status: that status is written now, and
    /// the next look decides from it.
    Recorded,
    /// The group vanished and may come back: wait, with the record of what was learnt.
    AwaitingReimport(Awaiting),
    Found(Box<WaldurGroup>, Binding),
    NotFound(String),
    /// Deleting: the group is gone for good, as far as can be known.
    Gone(String),
    AlreadyManaged(String),
    /// Waldur rejected the create: terminal for this generation.
    Rejected(WaldurError),
    /// Waldur refused the create because the tenant is Erred or busy.
    TenantBlocked {
        reason: &'static str,
        message: String,
        retry_in: Duration,
    },
}

struct Reconciler {
    sg: Arc<ServerGroup>,
    ctx: Arc<Context>,
    api: Api<ServerGroup>,
    events: Arc<super::events::EventWriter>,
    now: Time,
    /// The status as this reconcile last wrote it: the base for the next write, so that one
    /// reconcile never writes the same status twice.
    latest: tokio::sync::Mutex<Option<ServerGroupStatus>>,
    /// A request this Waldur cannot serve (no such route), reported in `Synced`.
    unsupported: std::sync::Mutex<Option<String>>,
    /// Groups of this resource's name seen in its tenant that are not its own.
    seen_names: std::sync::Mutex<Vec<WaldurUuid>>,
    /// This reconcile added the finalizer (the object it holds predates that).
    finalizer_added: std::sync::atomic::AtomicBool,
    /// The worker of a non-default Waldur this reconcile holds (its share, review N5).
    url_worker: std::sync::Mutex<Option<super::UrlWorker>>,
}

impl Reconciler {
    fn new(sg: Arc<ServerGroup>, ctx: Arc<Context>) -> Self {
        let namespace = sg.namespace().unwrap_or_else(|| "default".into());
        Self {
            api: Api::namespaced(ctx.kube.clone(), &namespace),
            // One recorder for the process: it aggregates repeats into an Event series.
            events: ctx.events.clone(),
            now: Time(Timestamp::now()),
            latest: tokio::sync::Mutex::new(None),
            unsupported: std::sync::Mutex::new(None),
            seen_names: std::sync::Mutex::new(Vec::new()),
            finalizer_added: std::sync::atomic::AtomicBool::new(false),
            url_worker: std::sync::Mutex::new(None),
            sg,
            ctx,
        }
    }

    async fn run(&self) -> Result<Action, Error> {
        if self.sg.is_paused() {
            self.write_status(false, |s| {
                self.synced(
                    s,
                    false,
                    synced_reason::PAUSED,
                    "reconciliation is paused by the openstack.waldur.com/paused annotation",
                );
            })
            .await?;
            return Ok(Action::await_change());
        }
        if self.sg.meta().deletion_timestamp.is_some() {
            return self.cleanup().await;
        }
        if plan::rejected_for_this_generation(&self.sg) {
            // Same spec, same answer: wait for the user to change it. Unpaused meanwhile,
            // Synced says the rejection again, not "paused" (the campaign's seed 209).
            if let Some((reason, message)) = plan::synced_after_unpause(&self.sg) {
                self.write_status(false, |s| self.synced(s, false, &reason, &message))
                    .await?;
            }
            return Ok(Action::await_change());
        }
        // A spec the operator cannot act on gets no finalizer that deletion would then be
        // unable to remove (review N17).
        plan::first_lookup(&self.sg)?;
        // Only once credentials resolve can anything reach Waldur, so a resource that never
        // had usable credentials has no finalizer and is deleted without them. The finalizer
        // goes on before the first Waldur write: with the create intent, or when a group is
        // bound.
        let client = self.waldur().await?;
        match self.locate(&client, false).await? {
            Located::Found(group, binding) => {
                self.ensure_finalizer().await?;
                self.observe(&client, *group, binding).await
            }
            Located::NotFound(message) => {
                self.write_status(true, |s| {
                    // What was mirrored of a group that is not there is no longer true
                    // (review m5): STATE must not go on showing OK.
                    s.state = None;
                    s.instances.clear();
                    s.instance_count = None;
                    self.ready(s, false, ready_reason::NOT_FOUND, &message);
                    self.synced(s, true, synced_reason::RECONCILED, "");
                })
                .await?;
                Ok(self.settled_requeue())
            }
            Located::AwaitingReimport(waiting) => self.awaiting(waiting).await,
            Located::Recorded => Ok(Action::requeue(Duration::from_secs(1))),
            Located::TenantBlocked {
                reason,
                message,
                retry_in,
            } => {
                self.blocked(reason, &message, None).await?;
                Ok(Action::requeue(retry_in))
            }
            // Only deletion reports a group gone for good.
            Located::Gone(message) => {
                self.write_status(true, |s| {
                    self.ready(s, false, ready_reason::NOT_FOUND, &message);
                    self.synced(s, true, synced_reason::RECONCILED, "");
                })
                .await?;
                Ok(self.settled_requeue())
            }
            Located::AlreadyManaged(message) => {
                self.event(
                    EventType::Warning,
                    ready_reason::ALREADY_MANAGED,
                    "Bind",
                    &message,
                )
                .await;
                self.write_status(false, |s| {
                    self.ready(s, false, ready_reason::ALREADY_MANAGED, &message);
                    self.synced(s, true, synced_reason::RECONCILED, "");
                })
                .await?;
                Ok(self.settled_requeue())
            }
            Located::Rejected(err) => {
                let message = err.to_string();
                self.event(
                    EventType::Warning,
                    ready_reason::INVALID_SPEC,
                    "Create",
                    &message,
                )
                .await;
                self.write_status(false, |s| {
                    self.ready(s, false, ready_reason::INVALID_SPEC, &message);
                    self.synced(s, false, ready_reason::INVALID_SPEC, &message);
                })
                .await?;
                // A taken name may be freed by its holder: looked at again at the resync
                // period. Any other rejection waits for the spec to change.
                if plan::says_name_taken(&message) {
                    Ok(self.settled_requeue())
                } else {
                    Ok(Action::await_change())
                }
            }
        }
    }

    /// Reports a resource that waits on Waldur (a re-import, or its tenant) in `Ready`, with
    /// what it waits for; deleting, the reason stays `Deleting` so users see the finalizer's
    /// cause. A tenant newly found Erred is also a Warning Event.
    async fn blocked(
        &self,
        reason: &'static str,
        message: &str,
        reimport: Option<crate::api::Reimport>,
    ) -> Result<(), Error> {
        let deleting = self.sg.meta().deletion_timestamp.is_some();
        let was = self.ready_reason();
        if reason == ready_reason::TENANT_ERRED && was.as_deref() != Some(reason) {
            self.event(EventType::Warning, reason, "Locate", message)
                .await;
        }
        let shown = if deleting {
            ready_reason::DELETING
        } else {
            reason
        };
        self.write_status(true, |s| {
            if let Some(reimport) = reimport {
                s.reimport = Some(reimport);
            }
            self.ready(s, false, shown, message);
            self.synced(s, true, synced_reason::RECONCILED, "");
        })
        .await
    }

    /// Waits for a vanished group that may come back, saying what for; a deletion says it
    /// is the deletion that waits.
    async fn awaiting(&self, waiting: Awaiting) -> Result<Action, Error> {
        let Awaiting {
            reimport,
            reason,
            message,
            retry_in,
            asked,
        } = waiting;
        let deleting = self.sg.meta().deletion_timestamp.is_some();
        let action = if deleting { "Delete" } else { "Locate" };
        if asked {
            self.event(EventType::Normal, "ReimportRequested", action, &message)
                .await;
        }
        let message = if deleting {
            format!("deletion waits for the group to come back: {message}")
        } else {
            message
        };
        self.blocked(reason, &message, Some(reimport)).await?;
        Ok(Action::requeue(retry_in))
    }

    fn ready_reason(&self) -> Option<String> {
        self.status()
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .map(|c| c.reason.clone())
    }

    /// Reports a failed reconcile in `Synced` and as a Warning Event, with Waldur's message.
    async fn report_failure(&self, err: &Error) {
        let message = err.message();
        self.event(EventType::Warning, err.reason(), "Reconcile", &message)
            .await;
        let before = self
            .latest
            .lock()
            .await
            .as_ref()
            .or(self.sg.status.as_ref())
            .and_then(|s| s.observed_generation);
        let result = self
            .write_status(false, |s| {
                self.synced(s, false, err.reason(), &message);
                if !s.conditions.iter().any(|c| c.type_ == READY) {
                    self.ready(
                        s,
                        false,
                        ready_reason::UNKNOWN,
                        "the operator could not reach a conclusion yet; see Synced",
                    );
                }
                // A failure the operator will retry has not acted on this generation: the
                // previous observedGeneration stays, so kstatus (Flux) and Argo CD show a spec
                // change that then failed as in progress, not as a Ready object of the new
                // generation (review m12). A failure that needs the user (Stalled) concludes it.
                if !err.needs_the_user() && plan::stalled(&self.sg, s).is_none() {
                    s.observed_generation = before;
                }
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not write the failure into status");
        }
    }

    fn ready(&self, s: &mut ServerGroupStatus, ok: bool, reason: &str, message: &str) {
        let status = if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        };
        set_condition(
            &mut s.conditions,
            READY,
            status,
            reason,
            message,
            self.sg.metadata.generation,
            &self.now,
        );
    }

    fn synced(&self, s: &mut ServerGroupStatus, ok: bool, reason: &str, message: &str) {
        let status = if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        };
        set_condition(
            &mut s.conditions,
            SYNCED,
            status,
            reason,
            message,
            self.sg.metadata.generation,
            &self.now,
        );
    }

    async fn write_status(
        &self,
        read_waldur: bool,
        change: impl FnOnce(&mut ServerGroupStatus),
    ) -> Result<(), Error> {
        let mut latest = self.latest.lock().await;
        let current = latest.as_ref().or(self.sg.status.as_ref());
        // Stalled follows from the rest of the status, so every write keeps it true.
        let change = |s: &mut ServerGroupStatus| {
            change(s);
            let stalled = plan::stalled(&self.sg, s);
            set_stalled(
                &mut s.conditions,
                stalled.as_ref().map(|(r, m)| (*r, m.as_str())),
                self.sg.metadata.generation,
                &self.now,
            );
        };
        if let Some(next) = status::next_status(
            current,
            self.sg.metadata.generation,
            read_waldur,
            &self.now,
            change,
        ) {
            let version = status::write(&self.api, &self.sg, &next).await?;
            self.ctx.wrote_status(&self.sg, version.as_deref(), &next);
            *latest = Some(next);
        }
        Ok(())
    }

    fn status(&self) -> ServerGroupStatus {
        self.sg.status.clone().unwrap_or_default()
    }

    /// The bound group: as status names it, or, before status does, as claimed here (a
    /// creation whose first status waits, [`plan::first_status_waits`]).
    fn status_uuid(&self) -> Option<WaldurUuid> {
        self.shown_uuid()
            .or_else(|| self.unshown().map(|(uuid, _)| uuid))
    }

    fn shown_uuid(&self) -> Option<WaldurUuid> {
        self.sg
            .status
            .as_ref()?
            .uuid
            .as_deref()
            .and_then(|u| WaldurUuid::parse(u).ok())
    }

    /// The group this resource claimed here and status does not name yet, and the claim's age.
    fn unshown(&self) -> Option<(WaldurUuid, Duration)> {
        if self.shown_uuid().is_some() {
            return None;
        }
        self.ctx.held_here.held_by(&self.sg)
    }

    /// How long the group has been in its current transitional Ready reason.
    fn busy_for(&self) -> Duration {
        self.status()
            .conditions
            .iter()
            .find(|c| c.type_ == READY && c.status == "False")
            .and_then(|c| {
                self.now
                    .0
                    .duration_since(c.last_transition_time.0)
                    .try_into()
                    .ok()
            })
            .unwrap_or_default()
    }

    fn settled_requeue(&self) -> Action {
        Action::requeue(plan::requeue_after(
            &self.sg,
            None,
            Duration::ZERO,
            &self.ctx.settings,
            rand::random(),
        ))
    }

    fn namespace(&self) -> String {
        self.sg.namespace().unwrap_or_else(|| "default".into())
    }

    fn has_finalizer(&self) -> bool {
        self.finalizer_added
            .load(std::sync::atomic::Ordering::Relaxed)
            || self.sg.finalizers().iter().any(|f| f == FINALIZER)
    }

    /// The finalizer, before anything this resource binds can be written to.
    async fn ensure_finalizer(&self) -> Result<(), Error> {
        if self.sg.spec.management_policy != ManagementPolicy::Managed || self.has_finalizer() {
            return Ok(());
        }
        self.add_finalizer().await?;
        self.finalizer_added
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Adds the finalizer with a JSON patch guarded by `test`, so a concurrent change to the
    /// finalizer list fails (422) instead of being overwritten.
    async fn add_finalizer(&self) -> Result<(), Error> {
        match self
            .json_patch_if(add_patch(self.sg.metadata.finalizers.as_ref(), FINALIZER))
            .await
        {
            // The list changed since this object was read: most often this operator's own
            // add, which a lagging watch has not delivered yet (seen at 30,000 resources over
            // three shards). Read the list as it is now rather than fail the reconcile.
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 422 => {
                let fresh = self.api.get_metadata(&self.sg.name_any()).await?;
                if fresh.metadata.uid != self.sg.metadata.uid {
                    return Err(Error::Kube(kube::Error::Api(e)));
                }
                if fresh.finalizers().iter().any(|f| f == FINALIZER) {
                    return Ok(());
                }
                self.json_patch_if(add_patch(fresh.metadata.finalizers.as_ref(), FINALIZER))
                    .await
            }
            other => other,
        }
    }

    async fn remove_finalizer(&self) -> Result<(), Error> {
        match self
            .json_patch_if(remove_patch(self.sg.finalizers(), FINALIZER))
            .await
        {
            // Already gone: the object was deleted once the last finalizer went.
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(()),
            other => other,
        }
    }

    async fn json_patch_if(&self, patch: Option<serde_json::Value>) -> Result<(), Error> {
        match patch {
            Some(patch) => self.json_patch(patch).await,
            None => Ok(()),
        }
    }

    async fn json_patch(&self, patch: serde_json::Value) -> Result<(), Error> {
        let patch: json_patch::Patch =
            serde_json::from_value(patch).map_err(|e| Error::Kube(kube::Error::SerdeError(e)))?;
        self.api
            .patch(
                &self.sg.name_any(),
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            )
            .await?;
        Ok(())
    }

    async fn event(&self, type_: EventType, reason: &str, action: &str, note: &str) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(truncate(note, 1000)),
            action: action.to_string(),
            secondary: None,
        };
        let reference = self.sg.object_ref(&());
        if let Err(e) = self.events.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
