//! Effects: carries out what `plan` decides, against Waldur and the Kubernetes API.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::Context;
use super::error::Error;
use super::index::{Answer, Shard};
use super::plan::{self, Cleanup, FollowUp, Lookup, Missing};
use super::status;
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
    /// The credentialsRef Secret, when the resource names one.
    secret: Option<k8s_openapi::api::core::v1::Secret>,
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

/// How the group was found, for Events and the status write that binds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Binding {
    Known,
    Imported,
    Adopted,
    Rebound,
    Created,
    Recreated,
}

enum Located {
    /// The group vanished and may come back: wait, with the record of what was learnt.
    AwaitingReimport {
        reimport: crate::api::Reimport,
        /// `Reimporting`, or `TenantErred` when the tenant blocks everything.
        reason: &'static str,
        message: String,
        retry_in: Duration,
        /// A re-sync was asked for now.
        asked: bool,
    },
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
            // Same spec, same answer: wait for the user to change it.
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
        if let Some(secret) = &client.secret
            && self.sg.spec.management_policy == ManagementPolicy::Managed
            && self.sg.spec.deletion_policy != crate::api::DeletionPolicy::Orphan
        {
            // Before any Waldur write: the Secret must outlive this resource's cleanup.
            super::secret_guard::hold(
                &self.ctx.kube,
                &self.namespace(),
                secret,
                &self.ctx.shard.secret_finalizer(),
            )
            .await?;
        }
        match self.locate(&client, false).await? {
            Located::Found(group, binding) => {
                self.ensure_finalizer().await?;
                self.observe(&client, *group, binding).await
            }
            Located::NotFound(message) => {
                self.write_status(true, |s| {
                    self.ready(s, false, ready_reason::NOT_FOUND, &message);
                    self.synced(s, true, synced_reason::RECONCILED, "");
                })
                .await?;
                Ok(self.settled_requeue())
            }
            Located::AwaitingReimport {
                reimport,
                reason,
                message,
                retry_in,
                asked,
            } => {
                if asked {
                    self.event(EventType::Normal, "ReimportRequested", "Locate", &message)
                        .await;
                }
                self.blocked(reason, &message, Some(reimport)).await?;
                Ok(Action::requeue(retry_in))
            }
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
                Ok(Action::await_change())
            }
        }
    }

    /// Step 4: find the group, creating it when this resource should have one and has none.
    /// With `deleting` (cleanup) nothing is created, but a group that may come back is still
    /// waited for, so that it can be deleted (review N2).
    async fn locate(&self, client: &Waldur, deleting: bool) -> Result<Located, Error> {
        let mut lookup = plan::first_lookup(&self.sg)?;
        loop {
            if let Some(group) = self.look(client, &lookup).await? {
                return self.bind(&lookup, group).await;
            }
            match plan::after_missing(&self.sg, &lookup, deleting)? {
                Missing::Lookup(next) => lookup = next,
                Missing::NotFound if deleting => {
                    return Ok(Located::Gone(not_found_message(&lookup)));
                }
                Missing::NotFound => return Ok(Located::NotFound(not_found_message(&lookup))),
                Missing::AwaitReimport { tenant, backend_id } => {
                    return self
                        .await_reimport(client, &tenant, &backend_id, deleting)
                        .await;
                }
                Missing::Create { recreate } => {
                    return self.leak_check_then_create(client, &lookup, recreate).await;
                }
            }
        }
    }

    /// Binds a group a lookup found, unless another resource holds it.
    async fn bind(&self, lookup: &Lookup, group: WaldurGroup) -> Result<Located, Error> {
        let known = self.status_uuid();
        if known.as_ref() == Some(&group.uuid) {
            return Ok(Located::Found(Box::new(group), Binding::Known));
        }
        if let Some(owner) = self.owner_of(&group.uuid) {
            return Ok(Located::AlreadyManaged(managed_by(&owner)));
        }
        let binding = match (lookup, known.is_some()) {
            (Lookup::BackendId(_), true) => Binding::Rebound,
            (Lookup::OwnCreation { .. }, _) => Binding::Adopted,
            _ => Binding::Imported,
        };
        if let Some(owner) = self.claim(&group.uuid).await? {
            return Ok(Located::AlreadyManaged(managed_by(&owner)));
        }
        Ok(Located::Found(Box::new(group), binding))
    }

    /// The leak check, then the create: a crash after Waldur's 201 and before the status
    /// write left a group this resource made; bind it instead of making another.
    async fn leak_check_then_create(
        &self,
        client: &Waldur,
        lookup: &Lookup,
        recreate: bool,
    ) -> Result<Located, Error> {
        if !matches!(lookup, Lookup::OwnCreation { .. })
            && let Ok(own) = plan::first_lookup_for_create(&self.sg)
            && let Some(group) = self.look(client, &own).await?
            && self.owner_of(&group.uuid).is_none()
            && self.claim(&group.uuid).await?.is_none()
        {
            return Ok(Located::Found(Box::new(group), Binding::Adopted));
        }
        self.create(client, recreate).await
    }

    /// A group that vanished and may come back: learn what the tenant's re-sync did, ask for
    /// one when due, and make a new group (or, deleting, let go) only on evidence.
    async fn await_reimport(
        &self,
        client: &Waldur,
        tenant: &WaldurUuid,
        backend_id: &str,
        deleting: bool,
    ) -> Result<Located, Error> {
        let mut record = self
            .status()
            .reimport
            .filter(|r| r.backend_id == backend_id)
            .unwrap_or_else(|| crate::api::Reimport {
                backend_id: backend_id.to_string(),
                since: Some(self.now.clone()),
                requested_at: None,
            });
        let seen = self.tenant_seen(client, tenant).await?;
        let pulls = self.ctx.tenant_pulls.seen(client.base_url(), tenant);
        let settings = &self.ctx.settings;
        let (step, accepted) =
            plan::reimport_step(&self.sg, &record, &seen, pulls, settings, self.now.0);
        if record.requested_at.is_none() {
            record.requested_at = accepted.map(Time);
        }
        let what = if backend_id.is_empty() {
            format!("a group named {:?}", self.sg.waldur_name())
        } else {
            format!("its Nova group {backend_id}")
        };
        let waiting = |message: String, retry_in: Duration, asked: bool, record| {
            Ok(Located::AwaitingReimport {
                reimport: record,
                reason: ready_reason::REIMPORTING,
                message,
                retry_in,
                asked,
            })
        };
        match step {
            plan::ReimportStep::AskPull => match self.ctx.tenant_pulls.ask(client, tenant).await? {
                super::tenant_pulls::Asked::Accepted(at) => {
                    record.requested_at = Some(Time(at));
                    let message = format!(
                        "the group is gone from Waldur, but OpenStack may still hold {what}: \
                             asked Waldur to re-sync tenant {tenant}, and the group is looked for \
                             again when the re-sync has run"
                    );
                    waiting(message, Duration::from_secs(3), true, record)
                }
                super::tenant_pulls::Asked::InFlight => waiting(
                    format!(
                        "the group is gone from Waldur; a re-sync of tenant {tenant} is being asked for"
                    ),
                    Duration::from_secs(5),
                    false,
                    record,
                ),
                super::tenant_pulls::Asked::Refused(e) => waiting(
                    format!(
                        "the group is gone from Waldur, and Waldur refused to re-sync tenant \
                             {tenant} now ({}); asking again in {:?}",
                        e.waldur_message(),
                        settings.tenant_pull_floor
                    ),
                    settings.tenant_pull_floor,
                    false,
                    record,
                ),
            },
            plan::ReimportStep::Recheck => {
                // The re-sync ran: read Waldur itself, never an older sweep's picture.
                let again = if backend_id.is_empty() {
                    plan::first_lookup_for_create(&self.sg)?
                } else {
                    Lookup::BackendId(backend_id.to_string())
                };
                match self.look_in_waldur(client, &again).await? {
                    Some(group) => self.bind(&again, group).await,
                    None if deleting => Ok(Located::Gone(format!(
                        "Waldur re-synced tenant {tenant} and {what} did not come back"
                    ))),
                    None => self.leak_check_then_create(client, &again, true).await,
                }
            }
            plan::ReimportStep::Gone(why) if deleting => Ok(Located::Gone(why)),
            plan::ReimportStep::Gone(why) => {
                tracing::info!(%why, "a vanished group is made anew");
                self.leak_check_then_create(client, &Lookup::Uuid(WaldurUuid::default()), true)
                    .await
            }
            plan::ReimportStep::Wait { message, retry_in } => waiting(
                format!(
                    "the group is gone from Waldur, but OpenStack may still hold {what}: {message}"
                ),
                retry_in,
                false,
                record,
            ),
            plan::ReimportStep::TenantErred { message, retry_in } => {
                Ok(Located::AwaitingReimport {
                    reimport: record,
                    reason: ready_reason::TENANT_ERRED,
                    message,
                    retry_in,
                    asked: false,
                })
            }
        }
    }

    /// The tenant's state, as far as these credentials can read it.
    async fn tenant_seen(
        &self,
        client: &Waldur,
        tenant: &WaldurUuid,
    ) -> Result<plan::TenantSeen, Error> {
        match client.get_tenant(tenant).await {
            Ok(t) => Ok(plan::TenantSeen::of(t.state.as_ref(), &t.error_message)),
            Err(e) if e.is_not_found() => Ok(plan::TenantSeen::Invisible),
            Err(e) if matches!(e.kind(), ErrorKind::Unsupported | ErrorKind::Unexpected) => {
                Ok(plan::TenantSeen::Unknown)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn look(&self, client: &Waldur, lookup: &Lookup) -> Result<Option<WaldurGroup>, Error> {
        if let Some(answer) = self.look_in_index(client, lookup) {
            return Ok(answer);
        }
        self.look_in_waldur(client, lookup).await
    }

    async fn look_in_waldur(
        &self,
        client: &Waldur,
        lookup: &Lookup,
    ) -> Result<Option<WaldurGroup>, Error> {
        match lookup {
            Lookup::Uuid(uuid) => match client.get(uuid, &[]).await {
                Ok(g) => {
                    client.record(&g);
                    Ok(Some(g))
                }
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e.into()),
            },
            Lookup::BackendId(backend_id) => {
                let found = client
                    .list(&ListQuery::new().backend_id(backend_id))
                    .await?;
                // Several rows can carry one Nova id briefly (a re-import racing a delete):
                // prefer one that is not on its way out.
                Ok(found
                    .iter()
                    .find(|g| !matches!(g.state, Some(State::DeletionScheduled | State::Deleting)))
                    .or(found.first())
                    .cloned())
            }
            Lookup::OwnCreation {
                tenant,
                name,
                policy,
            } => {
                let candidates = client
                    .list(&ListQuery::new().tenant_uuid(tenant).name_exact(name))
                    .await?;
                Ok(self.own_among(&candidates, *policy))
            }
        }
    }

    /// The index's answer, when it has a trustworthy one. A group the index misses is asked
    /// for directly (the miss may be a group created after the sweep began), so only hits
    /// and lists of own creations come from the index.
    fn look_in_index(&self, client: &Waldur, lookup: &Lookup) -> Option<Option<WaldurGroup>> {
        // A deletion decides a write from what it reads: it reads Waldur, not a sweep's
        // older picture, so it does not send a DELETE that Waldur would refuse.
        if self.sg.meta().deletion_timestamp.is_some() {
            return None;
        }
        let shard = client.shard.as_ref()?;
        // A resource that asks to be read more often than the sweeps run is read directly
        // once the sweep's picture is older than its period (review N14).
        let own_period = plan::resync_of(&self.sg, &self.ctx.settings);
        if own_period < self.ctx.settings.resync_period && shard.snapshot_age() > own_period {
            return None;
        }
        match lookup {
            Lookup::Uuid(uuid) => match shard.lookup_uuid(uuid) {
                Answer::Found(g) => Some(Some((*g).clone())),
                Answer::Missing | Answer::Unknown => None,
            },
            Lookup::BackendId(backend_id) => match shard.lookup_backend_id(backend_id) {
                Answer::Found(g) => Some(Some((*g).clone())),
                Answer::Missing | Answer::Unknown => None,
            },
            Lookup::OwnCreation {
                tenant,
                name,
                policy,
            } => {
                let candidates = shard.by_tenant_and_name(tenant, name)?;
                Some(self.own_among(&candidates, *policy))
            }
        }
    }

    /// This resource's own creation among groups of its name, remembering the others: they
    /// were there before any create this reconcile decides, so they are never its own.
    fn own_among(
        &self,
        candidates: &[WaldurGroup],
        policy: crate::waldur::Policy,
    ) -> Option<WaldurGroup> {
        let own = plan::pick_own_creation(&self.sg, candidates, policy).cloned();
        let mut seen = self.seen_names.lock().unwrap_or_else(|p| p.into_inner());
        for group in candidates {
            if own.as_ref().map(|o| &o.uuid) != Some(&group.uuid) && !seen.contains(&group.uuid) {
                seen.push(group.uuid.clone());
            }
        }
        own
    }

    /// The create's 400 for a taken name, naming who holds the group when a ServerGroup does
    /// (review N16), and what the user can do: spec.name cannot change.
    async fn name_taken_error(
        &self,
        client: &Waldur,
        tenant: &WaldurUuid,
        name: &str,
        original: WaldurError,
    ) -> WaldurError {
        let holder = match client
            .list(&ListQuery::new().tenant_uuid(tenant).name_exact(name))
            .await
        {
            Ok(groups) => groups.first().map(|g| match self.owner_of(&g.uuid) {
                Some(owner) => format!("group {} is held by ServerGroup {owner}", g.uuid),
                None => format!("group {} is not managed by any ServerGroup", g.uuid),
            }),
            Err(_) => None,
        };
        let Some(holder) = holder else {
            return original;
        };
        WaldurError::Invalid {
            endpoint: "create",
            messages: crate::waldur::FieldMessages(vec![crate::waldur::FieldMessage {
                field: Some("name".into()),
                message: format!(
                    "tenant {tenant} already has a server group named {name:?} ({holder}), and \
                     Waldur takes one group per name in a tenant: spec.name cannot change, so \
                     create a ServerGroup with another name, or one that imports that group"
                ),
            }]),
        }
    }

    /// Records the create intent, and the finalizer when it is not there yet, in one write: a
    /// JSON patch guarded by a test of the resourceVersion, so neither a concurrent change of
    /// the finalizers nor of the annotations is overwritten (a conflict re-reads and tries
    /// once more). The finalizer is then on before Waldur is asked for anything.
    async fn record_intent(&self, intent: &crate::api::CreateIntent) -> Result<(), Error> {
        let value =
            serde_json::to_string(intent).map_err(|e| Error::Kube(kube::Error::SerdeError(e)))?;
        let key = crate::api::ANNOTATION_CREATE_INTENT;
        if self.sg.annotation(key) == Some(value.as_str()) && self.has_finalizer() {
            return Ok(());
        }
        let patch = |meta: &kube::api::ObjectMeta| {
            let mut finalizers = meta.finalizers.clone().unwrap_or_default();
            if !finalizers.iter().any(|f| f == FINALIZER) {
                finalizers.push(FINALIZER.to_string());
            }
            let mut annotations = meta.annotations.clone().unwrap_or_default();
            annotations.insert(key.to_string(), value.clone());
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": meta.resource_version},
                {"op": "add", "path": "/metadata/annotations", "value": annotations},
                {"op": "add", "path": "/metadata/finalizers", "value": finalizers},
            ])
        };
        match self.json_patch(patch(&self.sg.metadata)).await {
            Ok(()) => {}
            // Changed since this object was read (often by this operator's own status write,
            // which the cache has not delivered yet): read it as it is now, once.
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 || e.code == 422 => {
                let fresh = self.api.get_metadata(&self.sg.name_any()).await?;
                if fresh.metadata.uid != self.sg.metadata.uid {
                    return Err(Error::Kube(kube::Error::Api(e)));
                }
                self.json_patch(patch(&fresh.metadata)).await?;
            }
            Err(e) => return Err(e),
        }
        self.finalizer_added
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The client for this resource's credentials, and its index shard on the batched path.
    async fn waldur(&self) -> Result<Waldur, Error> {
        let creds = self
            .ctx
            .credentials
            .for_resource(&self.ctx.kube, &self.sg)
            .await?;
        // While Waldur is unreachable nothing can be learnt or done: say so at once and wait
        // for the breaker to close (the error policy parks the resource until then).
        if let Some(refusal) = creds.client.breaker().and_then(|b| b.refusal("reconcile")) {
            return Err(refusal.into());
        }
        let shard = match &self.ctx.index {
            Some(index) => {
                let shard = index.shard(&creds.key, &creds.client);
                shard.wait_complete(Duration::from_secs(30)).await;
                shard.wait_after_outage(Duration::from_secs(10)).await;
                Some(shard)
            }
            None => None,
        };
        Ok(Waldur {
            client: creds.client,
            shard,
            secret: creds.secret,
        })
    }

    async fn create(&self, client: &Waldur, recreate: bool) -> Result<Located, Error> {
        let Lookup::OwnCreation {
            tenant,
            name,
            policy,
        } = plan::first_lookup_for_create(&self.sg)?
        else {
            return Ok(Located::NotFound("nothing to create from".into()));
        };
        // Recorded before the POST, with the finalizer when it is not there yet (one write):
        // a lost answer is then always recognised as this resource's own (review N3).
        let seen = self
            .seen_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (intent, fresh) = plan::intent_for_create(&self.sg, &tenant, &name, &seen, self.now.0);
        self.record_intent(&intent).await?;
        let new = NewServerGroup {
            name: name.clone(),
            policy,
            description: self.sg.spec.description.clone(),
        };
        let group = match client.create(&tenant, &new).await {
            Ok(group) => {
                client.record(&group);
                // Claim what this resource made before anything else can bind it: a resource
                // elsewhere with the same tenant and name (a twin) may find this group in its
                // own lookups before this status write reaches its cache, and without a claim
                // both would bind it (found by the fault campaign).
                if let Some(owner) = self.claim(&group.uuid).await? {
                    return Ok(Located::AlreadyManaged(managed_by(&owner)));
                }
                group
            }
            // The name is taken. With an intent kept from an earlier create, most likely by
            // that create, whose answer was lost (review M3): ask Waldur itself, and bind the
            // group if it is ours. With a fresh intent no create of this resource came before,
            // so the group is someone else's.
            Err(e) if e.kind() == ErrorKind::Invalid && plan::name_taken(&e) => {
                let own = Lookup::OwnCreation {
                    tenant: tenant.clone(),
                    name: name.clone(),
                    policy,
                };
                if !fresh
                    && let Some(group) = self.look_in_waldur(client, &own).await?
                    && self.owner_of(&group.uuid).is_none()
                {
                    if let Some(owner) = self.claim(&group.uuid).await? {
                        return Ok(Located::AlreadyManaged(managed_by(&owner)));
                    }
                    return Ok(Located::Found(Box::new(group), Binding::Adopted));
                }
                return Ok(Located::Rejected(
                    self.name_taken_error(client, &tenant, &name, e).await,
                ));
            }
            Err(e) if e.kind() == ErrorKind::Invalid => return Ok(Located::Rejected(e)),
            // The tenant is not OK: say which way, with Waldur's message (a tenant Erred by a
            // failed re-sync refuses every create until it is repaired).
            Err(e) if e.kind() == ErrorKind::Conflict => {
                return match self.tenant_seen(client, &tenant).await? {
                    plan::TenantSeen::Erred(message) => Ok(Located::TenantBlocked {
                        reason: ready_reason::TENANT_ERRED,
                        message: plan::tenant_erred_message(&self.sg, &message),
                        retry_in: self
                            .ctx
                            .settings
                            .resync_period
                            .min(Duration::from_secs(300)),
                    }),
                    plan::TenantSeen::Busy(state) => Ok(Located::TenantBlocked {
                        reason: ready_reason::CREATING,
                        message: format!(
                            "Waldur refused the create while tenant {tenant} is busy ({state}): {}; \
                             creating once the tenant is OK again",
                            e.waldur_message()
                        ),
                        retry_in: Duration::from_secs(15),
                    }),
                    _ => Err(e.into()),
                };
            }
            Err(e) => {
                if !e.is_unavailable() {
                    // The create may have been made and its answer lost.
                    client.create_attempted(&tenant, &name);
                }
                return Err(e.into());
            }
        };
        // Write the UUID at once: from here on a crash cannot lose track of the group.
        // It is the whole status the observation that follows would write, so that one
        // write, not two, records the creation.
        self.write_status(true, |s| {
            s.auto_pull = None;
            plan::mirror(s, &group);
            let (_, reason, message) = plan::readiness(&group);
            self.ready(s, false, reason, &message);
            self.synced(s, true, synced_reason::RECONCILED, "");
        })
        .await?;
        let binding = if recreate {
            Binding::Recreated
        } else {
            Binding::Created
        };
        Ok(Located::Found(Box::new(group), binding))
    }

    /// Steps 5 to 7: mirror the group into status, run due follow-ups, and requeue.
    async fn observe(
        &self,
        client: &Waldur,
        group: WaldurGroup,
        binding: Binding,
    ) -> Result<Action, Error> {
        self.announce_binding(&group, binding).await;
        if let Some(previous) = self.status_uuid().filter(|u| *u != group.uuid) {
            // Bound to another group now (rebound or recreated): the claim on the old one goes
            // (review N7), or it would stand for ever.
            super::claims::release(
                &self.ctx.kube,
                &self.ctx.claims_namespace,
                &previous,
                &self.sg,
            )
            .await?;
        }
        let mut handled = plan::tokens_at_first_binding(&self.sg)
            .or(self.status().handled_requests.map(|h| *h))
            .unwrap_or_default();
        // A request-recreate token seen while a group is bound has nothing to act on: it is
        // recorded, so that it never makes a group without evidence later.
        handled.recreate = self
            .sg
            .annotation(crate::api::ANNOTATION_REQUEST_RECREATE)
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let mut auto_pull = self.status().auto_pull;
        let mut busy = false;
        for follow_up in plan::follow_ups(&self.sg, &group, &self.ctx.settings, self.now.0) {
            match self
                .follow_up(client, &group, &follow_up, &mut handled, &mut auto_pull)
                .await
            {
                Ok(b) => busy |= b,
                Err(e) => {
                    // Keep what was done before the error goes up (review m1): a request
                    // already carried out is recorded and never sent twice.
                    let kept = self
                        .write_status(true, |s| progress(s, &group, &handled, &auto_pull))
                        .await;
                    if let Err(write) = kept {
                        tracing::warn!(error = %write, "could not record the requests already carried out");
                    }
                    return Err(e);
                }
            }
        }
        if group.state == Some(State::Ok) && auto_pull.as_ref().is_some_and(|a| a.attempts > 0) {
            // Recovered: the next ERRED spell starts its backoff afresh.
            auto_pull = None;
        }
        let previous_state = self.status().state;
        let previous_reason = self
            .status()
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .map(|c| c.reason.clone());
        let (ready, reason, message) = plan::readiness(&group);
        let unsupported = self
            .unsupported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .or_else(|| self.still_unsupported(&handled));
        self.write_status(true, |s| {
            progress(s, &group, &handled, &auto_pull);
            self.ready(s, ready, reason, &message);
            match &unsupported {
                Some(note) => self.synced(s, false, synced_reason::UNSUPPORTED, note),
                None => self.synced(s, true, synced_reason::RECONCILED, ""),
            }
        })
        .await?;
        let state = group.state.as_ref().map(State::to_string);
        // An Event when the group enters another phase (the Ready reason: Creating, Available,
        // Erred...), not for every step within one (CREATION_SCHEDULED -> CREATING): each
        // Event is a Kubernetes write, and that step tells a user nothing.
        if previous_state.is_some()
            && previous_state != state
            && previous_reason.as_deref() != Some(reason)
        {
            let note = format!(
                "Waldur state {} -> {}",
                previous_state.as_deref().unwrap_or("none"),
                state.as_deref().unwrap_or("none")
            );
            let kind = if group.state == Some(State::Erred) {
                EventType::Warning
            } else {
                EventType::Normal
            };
            self.event(kind, "StateChanged", "Observe", &note).await;
        }
        if busy {
            return Ok(Action::requeue(SOON));
        }
        Ok(Action::requeue(plan::requeue_after(
            &self.sg,
            group.state.as_ref(),
            self.busy_for(),
            &self.ctx.settings,
            rand::random(),
        )))
    }

    /// Runs one follow-up. Returns whether Waldur is now busy with it.
    async fn follow_up(
        &self,
        client: &Waldur,
        group: &WaldurGroup,
        follow_up: &FollowUp,
        handled: &mut HandledRequests,
        auto_pull: &mut Option<AutoPull>,
    ) -> Result<bool, Error> {
        let uuid = &group.uuid;
        match follow_up {
            FollowUp::RequestedPull { token } => {
                let result = client.pull(uuid).await;
                client.written(uuid);
                self.requested(
                    result.map(|_| ()),
                    "PullRequested",
                    "Pull",
                    token,
                    &mut handled.pull,
                )
                .await
            }
            FollowUp::SetOk { token } => {
                let result = client.set_ok(uuid).await.map(|_| ());
                client.written(uuid);
                let slot = &mut handled.set_ok;
                self.requested(result, "SetOkRequested", "SetOk", token, slot)
                    .await
                    .map(|_| false)
            }
            FollowUp::SetErred { token } => {
                let message = format!(
                    "set through the openstack.waldur.com/request-set-erred annotation (token {token})"
                );
                let result = client
                    .set_erred(uuid, Some(&message), None)
                    .await
                    .map(|_| ());
                client.written(uuid);
                let slot = &mut handled.set_erred;
                self.requested(result, "SetErredRequested", "SetErred", token, slot)
                    .await
                    .map(|_| false)
            }
            FollowUp::RecoveryPull { attempt } => {
                let note = format!(
                    "the group is ERRED; asked Waldur to pull it from OpenStack (attempt {attempt})"
                );
                self.pull_by_itself(client, uuid, &note, *attempt, auto_pull)
                    .await
            }
            FollowUp::PeriodicPull => {
                self.pull_by_itself(
                    client,
                    uuid,
                    "periodic pull (--pull-interval)",
                    0,
                    auto_pull,
                )
                .await
            }
        }
    }

    async fn pull_by_itself(
        &self,
        client: &Waldur,
        uuid: &WaldurUuid,
        note: &str,
        attempts: u32,
        auto_pull: &mut Option<AutoPull>,
    ) -> Result<bool, Error> {
        let result = client.pull(uuid).await;
        client.written(uuid);
        match result {
            Ok(_) => {
                *auto_pull = Some(AutoPull {
                    last_time: self.now.clone(),
                    attempts,
                });
                self.event(EventType::Normal, "PullRequested", "Pull", note)
                    .await;
                Ok(true)
            }
            // Busy (409) or nothing to pull (400): look again at the next resync.
            Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::Invalid) => {
                *auto_pull = Some(AutoPull {
                    last_time: self.now.clone(),
                    attempts,
                });
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records an annotation request as handled once Waldur has answered it for good. A 409
    /// (busy) leaves it pending; a 400 or 403 is final and reported, so it is not retried.
    async fn requested(
        &self,
        result: Result<(), WaldurError>,
        reason: &str,
        action: &str,
        token: &str,
        handled: &mut Option<String>,
    ) -> Result<bool, Error> {
        match result {
            Ok(()) => {
                *handled = Some(token.to_string());
                self.event(
                    EventType::Normal,
                    reason,
                    action,
                    &format!("requested by annotation (token {token})"),
                )
                .await;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::Conflict => Ok(true),
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                // Servers before 8.0 have no set_ok/set_erred: asking again cannot help.
                *handled = Some(token.to_string());
                let message = format!(
                    "this Waldur cannot {action} (Waldur before 8.0 has no set_ok and set_erred actions); \
                     the request with token {token} is dropped (remove the annotation to clear this): {e}"
                );
                self.event(
                    EventType::Warning,
                    &format!("{action}Failed"),
                    action,
                    &message,
                )
                .await;
                *self.unsupported.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
                Ok(false)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Invalid
                        | ErrorKind::Forbidden
                        | ErrorKind::NotFound
                        | ErrorKind::Unexpected
                ) =>
            {
                *handled = Some(token.to_string());
                self.event(
                    EventType::Warning,
                    &format!("{action}Failed"),
                    action,
                    &e.to_string(),
                )
                .await;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn announce_binding(&self, group: &WaldurGroup, binding: Binding) {
        let uuid = &group.uuid;
        let (reason, note) = match binding {
            Binding::Known => return,
            Binding::Created => ("Created", format!("created Waldur server group {uuid}")),
            Binding::Recreated => (
                "Recreated",
                format!(
                    "the Waldur group {} was gone; created {uuid} in its place",
                    self.status().uuid.unwrap_or_default()
                ),
            ),
            Binding::Adopted => (
                "Adopted",
                format!("found Waldur server group {uuid} created earlier for this resource"),
            ),
            Binding::Imported => (
                "Adopted",
                format!("bound existing Waldur server group {uuid}"),
            ),
            Binding::Rebound => (
                "Rebound",
                format!(
                    "Waldur re-imported backend id {} under a new UUID: {} -> {uuid}",
                    group.backend_id,
                    self.status().uuid.unwrap_or_default()
                ),
            ),
        };
        self.event(EventType::Normal, reason, "Bind", &note).await;
    }

    /// Step 2: the deletion policy.
    async fn cleanup(&self) -> Result<Action, Error> {
        if !self.has_finalizer() {
            return Ok(Action::await_change());
        }
        let mut decision = plan::cleanup(&self.sg, None, self.now.0);
        if decision == Cleanup::Locate {
            let client = self.waldur().await.map_err(deletion_waits)?;
            let group = match self.locate(&client, true).await? {
                Located::Found(group, _) => Some(*group),
                // The group may come back (review N2): the finalizer stays until it is back
                // (and is deleted) or shown gone for good.
                Located::AwaitingReimport {
                    reimport,
                    reason,
                    message,
                    retry_in,
                    asked,
                } => {
                    if asked {
                        self.event(EventType::Normal, "ReimportRequested", "Delete", &message)
                            .await;
                    }
                    let message = format!("deletion waits for the group to come back: {message}");
                    self.blocked(reason, &message, Some(reimport)).await?;
                    return Ok(Action::requeue(retry_in));
                }
                // Held by another resource: not ours to delete.
                Located::AlreadyManaged(_)
                | Located::NotFound(_)
                | Located::Gone(_)
                | Located::Rejected(_)
                | Located::TenantBlocked { .. } => None,
            };
            decision = plan::cleanup(&self.sg, Some(group.as_ref()), self.now.0);
            if let Some(action) = self.carry_out(&client, &decision).await? {
                return Ok(action);
            }
        }
        // Here the finalizer may go: the decision was to release, or carrying it out finished
        // the job (an unlink done, a DELETE or pull answered 404). Waiting for another trigger
        // instead left a finished unlink holding its finalizer (found by the fault campaign).
        let reason = match &decision {
            Cleanup::Release { reason } => *reason,
            Cleanup::Unlink(_) => "unlinked: Waldur's record is gone, OpenStack keeps the group",
            _ => "the group is gone from Waldur",
        };
        if let Some(uuid) = self.status_uuid() {
            super::claims::release(&self.ctx.kube, &self.ctx.claims_namespace, &uuid, &self.sg)
                .await?;
        }
        self.remove_finalizer().await?;
        if let Some(reference) = &self.sg.spec.credentials_ref {
            super::secret_guard::release_if_unused(
                &self.ctx.kube,
                &self.ctx.store,
                &self.namespace(),
                &reference.name,
                self.sg.metadata.uid.as_deref(),
                &self.ctx.shard.secret_finalizer(),
            )
            .await?;
        }
        let event = match self.sg.spec.deletion_policy {
            crate::api::DeletionPolicy::Orphan => "Orphaned",
            crate::api::DeletionPolicy::Unlink => "Unlinked",
            crate::api::DeletionPolicy::Delete => "Deleted",
        };
        self.event(EventType::Normal, event, "Delete", reason).await;
        Ok(Action::await_change())
    }

    /// Sends DELETE or unlink, or waits. `None` means the finalizer may go.
    async fn carry_out(
        &self,
        client: &Waldur,
        decision: &Cleanup,
    ) -> Result<Option<Action>, Error> {
        match decision {
            Cleanup::Delete(uuid) => {
                match client.delete(uuid).await.inspect(|_| client.written(uuid)) {
                    Ok(()) => {
                        self.event(
                            EventType::Normal,
                            "DeleteRequested",
                            "Delete",
                            &format!("asked Waldur to delete {uuid}"),
                        )
                        .await;
                        self.deleting_status("Waldur is deleting the group").await?;
                        Ok(Some(Action::requeue(SOON)))
                    }
                    Err(e) if e.is_not_found() => Ok(None),
                    // Busy with another operation: ask again shortly.
                    Err(e) if e.kind() == ErrorKind::Conflict => Ok(Some(Action::requeue(SOON))),
                    Err(e) => Err(e.into()),
                }
            }
            Cleanup::Unlink(uuid) => {
                match client.unlink(uuid).await.inspect(|_| client.written(uuid)) {
                    Ok(()) => {
                        self.event(
                            EventType::Normal,
                            "Unlinked",
                            "Delete",
                            &format!(
                                "removed Waldur's record of {uuid}; OpenStack keeps the group"
                            ),
                        )
                        .await;
                        Ok(None)
                    }
                    Err(e) if e.is_not_found() => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            Cleanup::Wait { state } => {
                self.deleting_status(&format!(
                    "waiting for Waldur to finish ({state}) before deleting"
                ))
                .await?;
                // Backing off like any transitional state (review m3): a group stuck in
                // DELETING is not read every 2 s for ever.
                Ok(Some(Action::requeue(plan::requeue_after(
                    &self.sg,
                    Some(&State::Deleting),
                    self.busy_for(),
                    &self.ctx.settings,
                    0.0,
                ))))
            }
            Cleanup::PullFirst {
                uuid,
                attempt,
                tenant,
            } => {
                // A tenant re-sync only when one may be asked for (on, OK, past the floor);
                // otherwise the group's own pull, which holds nothing but the group.
                let tenant = match tenant {
                    Some(t) => {
                        let pulls = self.ctx.tenant_pulls.seen(client.base_url(), t);
                        let seen = self.tenant_seen(client, t).await?;
                        plan::tenant_pull_due(&self.ctx.settings, pulls, &seen, self.now.0)
                            .then_some(t)
                    }
                    None => None,
                };
                let asked = match tenant {
                    Some(tenant) => match self.ctx.tenant_pulls.ask(client, tenant).await {
                        Ok(super::tenant_pulls::Asked::Refused(e)) => Err(e),
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    },
                    None => client.pull(uuid).await.map(|_| ()),
                };
                client.written(uuid);
                match asked {
                    Ok(()) => {
                        let how = if tenant.is_some() {
                            "asked for the tenant's re-sync, which brings it back to OK or drops \
                             the record if the Nova group is gone"
                        } else {
                            "asked Waldur to pull it"
                        };
                        let note = format!(
                            "the group is ERRED and OpenStack may still hold it: {how} before \
                             deleting, so that the Nova group is deleted too (attempt {attempt})"
                        );
                        self.event(EventType::Normal, "PullBeforeDelete", "Delete", &note)
                            .await;
                        let pulled = AutoPull {
                            last_time: self.now.clone(),
                            attempts: *attempt,
                        };
                        self.write_status(true, |s| {
                            s.auto_pull = Some(pulled.clone());
                            self.ready(s, false, ready_reason::DELETING, &note);
                            self.synced(s, true, synced_reason::RECONCILED, "");
                        })
                        .await?;
                        Ok(Some(Action::requeue(SOON)))
                    }
                    // The group is gone (a 404 for the tenant says nothing about the group).
                    Err(e) if e.is_not_found() && tenant.is_none() => Ok(None),
                    Err(e) if e.kind() == ErrorKind::Conflict => Ok(Some(Action::requeue(SOON))),
                    Err(e) => Err(e.into()),
                }
            }
            Cleanup::Held {
                message,
                attempts,
                retry_in,
            } => {
                if self
                    .status()
                    .conditions
                    .iter()
                    .all(|c| c.message != *message)
                {
                    self.event(EventType::Warning, "DeleteBlocked", "Delete", message)
                        .await;
                }
                self.write_status(true, |s| {
                    self.ready(s, false, ready_reason::DELETING, message);
                    self.synced(s, false, synced_reason::DELETE_BLOCKED, message);
                })
                .await?;
                tracing::debug!(attempts, ?retry_in, "deletion held: the group is ERRED");
                Ok(Some(Action::requeue(*retry_in)))
            }
            Cleanup::Release { .. } | Cleanup::Locate => Ok(None),
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

    fn ready_reason(&self) -> Option<String> {
        self.status()
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .map(|c| c.reason.clone())
    }

    async fn deleting_status(&self, message: &str) -> Result<(), Error> {
        self.write_status(true, |s| {
            self.ready(s, false, ready_reason::DELETING, message);
            self.synced(s, true, synced_reason::RECONCILED, "");
        })
        .await
    }

    /// Reports a failed reconcile in `Synced` and as a Warning Event, with Waldur's message.
    async fn report_failure(&self, err: &Error) {
        let message = err.message();
        self.event(EventType::Warning, err.reason(), "Reconcile", &message)
            .await;
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

    fn status_uuid(&self) -> Option<WaldurUuid> {
        self.sg
            .status
            .as_ref()?
            .uuid
            .as_deref()
            .and_then(|u| WaldurUuid::parse(u).ok())
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

    /// Another ServerGroup whose status holds this UUID, as `namespace/name`.
    fn owner_of(&self, uuid: &WaldurUuid) -> Option<String> {
        let me = self.sg.uid();
        self.ctx.store.state().iter().find_map(|other| {
            let theirs = other.status.as_ref()?.uuid.as_deref()?;
            let same = WaldurUuid::parse(theirs).ok().as_ref() == Some(uuid);
            (same && other.uid() != me).then(|| {
                format!(
                    "{}/{}",
                    other.namespace().unwrap_or_default(),
                    other.name_any()
                )
            })
        })
    }

    /// An unsupported request stays reported while its annotation still asks for it: the
    /// user removes (or changes) the annotation to clear `Synced`.
    fn still_unsupported(&self, handled: &HandledRequests) -> Option<String> {
        let status = self.status();
        let reported = status
            .conditions
            .iter()
            .find(|c| c.type_ == SYNCED && c.reason == synced_reason::UNSUPPORTED)?;
        let annotations = self.sg.annotations();
        let asked = [
            (crate::api::ANNOTATION_REQUEST_SET_OK, &handled.set_ok),
            (crate::api::ANNOTATION_REQUEST_SET_ERRED, &handled.set_erred),
        ]
        .iter()
        .any(|(key, token)| token.is_some() && annotations.get(*key) == token.as_ref());
        asked.then(|| reported.message.clone())
    }

    /// Claims a group this Managed resource is about to bind: `Some` names the resource that
    /// holds it. The cache `owner_of` reads may lag; a claim cannot.
    async fn claim(&self, uuid: &WaldurUuid) -> Result<Option<String>, Error> {
        if self.sg.spec.management_policy != ManagementPolicy::Managed {
            return Ok(None);
        }
        match super::claims::claim(&self.ctx.kube, &self.ctx.claims_namespace, uuid, &self.sg)
            .await?
        {
            super::claims::Claim::Granted => Ok(None),
            super::claims::Claim::HeldBy(owner) => Ok(Some(owner)),
        }
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
            .json_patch(add_finalizer_patch(self.sg.metadata.finalizers.as_ref()))
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
                self.json_patch(add_finalizer_patch(fresh.metadata.finalizers.as_ref()))
                    .await
            }
            other => other,
        }
    }

    async fn remove_finalizer(&self) -> Result<(), Error> {
        let Some(index) = self.sg.finalizers().iter().position(|f| f == FINALIZER) else {
            return Ok(());
        };
        let patch = json!([
            {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER},
            {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
        ]);
        match self.json_patch(patch).await {
            // Already gone: the object was deleted once the last finalizer went.
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(()),
            other => other,
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

/// The guarded patch that adds the finalizer to an object whose list is `current`. It tests
/// against what is stored: absent (null) and an empty list are different, and testing a
/// stored `[]` against null would fail on every attempt.
fn add_finalizer_patch(current: Option<&Vec<String>>) -> serde_json::Value {
    match current {
        None => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ]),
        Some(list) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": list},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ]),
    }
}

fn not_found_message(lookup: &Lookup) -> String {
    match lookup {
        Lookup::Uuid(uuid) => {
            format!("Waldur has no server group {uuid} visible to these credentials")
        }
        Lookup::BackendId(b) => {
            format!("Waldur has no server group with backend id {b:?} visible to these credentials")
        }
        Lookup::OwnCreation { tenant, name, .. } => {
            format!("tenant {tenant} has no server group named {name:?}")
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

/// What an observation has established, whatever happens next: the group as Waldur shows it,
/// the request tokens acted on, and the recovery pulls sent.
fn progress(
    s: &mut ServerGroupStatus,
    group: &WaldurGroup,
    handled: &HandledRequests,
    auto_pull: &Option<AutoPull>,
) {
    plan::mirror(s, group);
    s.handled_requests =
        Some(Box::new(handled.clone())).filter(|h| **h != HandledRequests::default());
    s.auto_pull = auto_pull.clone();
}

/// A deletion that cannot reach Waldur says so, and how to let go without it.
fn deletion_waits(e: Error) -> Error {
    let how = "restore them, or set spec.deletionPolicy: Orphan to remove this resource and leave the Waldur group";
    match e {
        Error::CredentialsNotFound(m) => {
            Error::CredentialsNotFound(format!("deletion waits for credentials: {m}; {how}"))
        }
        Error::DefaultCredentialsNotAllowed(m) => Error::DefaultCredentialsNotAllowed(format!(
            "deletion waits for credentials: {m}; {how}"
        )),
        other => other,
    }
}

/// The AlreadyManaged message naming the ServerGroup that holds the group.
fn managed_by(owner: &str) -> String {
    format!("the Waldur group is already managed by ServerGroup {owner}")
}
