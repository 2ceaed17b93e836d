//! The ServerGroup controller: planning (pure), reconcile (effects), status, credentials.

pub mod claims;
pub mod credentials;
mod error;
pub mod events;
mod finalizers;
pub mod index;
pub mod plan;
mod reconcile;
pub mod secret_guard;
mod status;
pub mod tenant_pulls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource};

use crate::api::ServerGroup;
use crate::metrics::Metrics;
use crate::server::Health;
use crate::sharding::Shard;
pub use credentials::{ClientCache, DefaultCredentials, DefaultScope};
pub use error::Error;
pub use plan::Settings;
pub use reconcile::reconcile;

/// The annotation in which `kubectl apply` keeps the last manifest it applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The field manager of the operator's server-side-apply writes.
pub const MANAGER: &str = "waldur-operator";

/// Statuses this process wrote that the watch has not delivered yet, by uid, each with the
/// resourceVersion its write produced. An entry goes as soon as the watch brings that version
/// (or a later one), so the map holds the writes in flight, not a status per resource.
#[derive(Default)]
pub struct OwnWrites {
    /// Boxed: the table holds a pointer per entry, not a whole status.
    map: Mutex<HashMap<String, (u64, Box<crate::api::ServerGroupStatus>)>>,
}

impl OwnWrites {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Box<crate::api::ServerGroupStatus>)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The watch delivered `sg`: a write it includes is no longer in flight.
    fn seen(&self, sg: &ServerGroup) {
        let Some(uid) = sg.metadata.uid.as_deref() else {
            return;
        };
        let mut map = self.lock();
        let Some((written, _)) = map.get(uid) else {
            return;
        };
        if version(sg).is_none_or(|c| c >= *written) {
            map.remove(uid);
            if map.is_empty() {
                // The burst is over: give the table back.
                map.shrink_to_fit();
            }
        }
    }

    /// The object is gone: nothing of it is in flight.
    fn forget(&self, sg: &ServerGroup) {
        if let Some(uid) = sg.metadata.uid.as_deref() {
            self.lock().remove(uid);
        }
    }
}

/// An object's resourceVersion as a number: opaque in the API's contract, ordered integers
/// in practice; `None` when it does not parse, which makes no comparison hold.
fn version(sg: &ServerGroup) -> Option<u64> {
    sg.metadata.resource_version.as_deref()?.parse().ok()
}

/// Everything a reconcile needs besides the object.
pub struct Context {
    pub kube: Client,
    pub settings: Settings,
    pub credentials: Arc<ClientCache>,
    pub reporter: Reporter,
    /// Shared by every reconcile, so that a repeated Event (same object, type, action and
    /// reason) becomes one Event with a count, not one object per failure (review M10).
    pub events: Arc<events::EventWriter>,
    /// All ServerGroups the operator sees, to refuse binding a group another resource holds.
    pub store: Store<ServerGroup>,
    /// Consecutive failures per object, for exponential backoff; cleared on success.
    failures: Mutex<HashMap<ObjectRef<ServerGroup>, u32>>,
    /// The batched read path; `None` reads Waldur once per resource per reconcile.
    pub index: Option<Arc<index::WaldurIndex>>,
    pub metrics: Metrics,
    /// Statuses this process wrote that the watch may not have delivered yet, by uid.
    own_writes: Arc<OwnWrites>,
    /// Where the claims on Waldur groups live (the operator's own namespace).
    pub claims_namespace: String,
    /// Resources parked until the breaker of their Waldur closes, by Waldur base URL.
    parked: Mutex<HashMap<String, std::collections::HashSet<ObjectRef<ServerGroup>>>>,
    /// Reconciles a resource now (the controller's external trigger).
    wake: Option<futures::channel::mpsc::UnboundedSender<ObjectRef<ServerGroup>>>,
    /// The part of the resources this process reconciles; its Secret finalizer is its own.
    pub shard: Shard,
    /// The tenant re-syncs this process asked for: one per tenant at a time, with a floor.
    pub tenant_pulls: Arc<tenant_pulls::TenantPulls>,
    /// How many workers each Waldur other than the default one may hold at once.
    pub url_workers: Arc<UrlWorkers>,
}

/// Workers per Waldur base URL: a namespace whose Secret names a slow (or hostile) Waldur can
/// hold at most its share of the controller's workers; the rest go on serving the others
/// (review N5). The default Waldur is the admin's own and takes no share.
pub struct UrlWorkers {
    quota: usize,
    held: Mutex<HashMap<String, usize>>,
}

impl UrlWorkers {
    pub fn new(quota: usize) -> Self {
        Self {
            quota: quota.max(1),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// A worker for `url`, or `None` when it holds its share already.
    pub fn try_take(self: &Arc<Self>, url: &str) -> Option<UrlWorker> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(url.to_string()).or_default();
        if *n >= self.quota {
            return None;
        }
        *n += 1;
        Some(UrlWorker {
            workers: self.clone(),
            url: url.to_string(),
        })
    }
}

/// One worker held for a Waldur; given back when dropped.
pub struct UrlWorker {
    workers: Arc<UrlWorkers>,
    url: String,
}

impl Drop for UrlWorker {
    fn drop(&mut self) {
        let mut held = self.workers.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.url) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.url);
            }
        }
    }
}

impl Context {
    pub fn new(
        kube: Client,
        settings: Settings,
        credentials: Arc<ClientCache>,
        store: Store<ServerGroup>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            events: Arc::new(events::EventWriter::new(kube.clone(), reporter.clone())),
            kube,
            settings,
            credentials,
            reporter,
            store,
            failures: Mutex::new(HashMap::new()),
            index: None,
            metrics: Metrics::new(),
            own_writes: Arc::default(),
            claims_namespace: "default".into(),
            parked: Mutex::new(HashMap::new()),
            wake: None,
            shard: Shard::ALL,
            tenant_pulls: Arc::default(),
            url_workers: Arc::new(UrlWorkers::new(usize::MAX)),
        }
    }

    /// Each non-default Waldur may hold at most `quota` workers.
    pub fn with_url_worker_quota(mut self, quota: usize) -> Self {
        self.url_workers = Arc::new(UrlWorkers::new(quota));
        self
    }

    /// Shares the record of tenant re-syncs across leadership terms: the floor between two
    /// holds one process's requests, whoever leads.
    pub fn with_tenant_pulls(mut self, pulls: Arc<tenant_pulls::TenantPulls>) -> Self {
        self.tenant_pulls = pulls;
        self
    }

    fn with_own_writes(mut self, own_writes: Arc<OwnWrites>) -> Self {
        self.own_writes = own_writes;
        self
    }

    pub fn with_shard(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    pub fn with_wake(
        mut self,
        wake: futures::channel::mpsc::UnboundedSender<ObjectRef<ServerGroup>>,
    ) -> Self {
        self.wake = Some(wake);
        self
    }

    /// Parks `obj` until the breaker of the Waldur at `waldur` closes, then reconciles it at
    /// once: one probe a second finds Waldur back, not each resource's own backoff. The
    /// first resource parked for a Waldur starts the one task that waits for it.
    fn park_until_reachable(self: &Arc<Self>, obj: &ServerGroup, waldur: &str) {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let first = !parked.contains_key(waldur);
        parked
            .entry(waldur.to_string())
            .or_default()
            .insert(ObjectRef::from_obj(obj));
        drop(parked);
        if !first {
            return;
        }
        let breaker = self.credentials.breaker(waldur);
        let ctx = Arc::downgrade(self);
        let waldur = waldur.to_string();
        tokio::spawn(async move {
            breaker.closed().await;
            let Some(ctx) = ctx.upgrade() else { return };
            let waiting = ctx
                .parked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&waldur)
                .unwrap_or_default();
            tracing::info!(%waldur, resources = waiting.len(), "Waldur answers again: reconciling the parked resources");
            if let Some(wake) = &ctx.wake {
                for obj in waiting {
                    let _ = wake.unbounded_send(obj);
                }
            }
        });
    }

    pub fn with_claims_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.claims_namespace = namespace.into();
        self
    }

    /// Remembers a status this process wrote, with the resourceVersion the write produced.
    fn wrote_status(
        &self,
        obj: &ServerGroup,
        resource_version: Option<&str>,
        status: &crate::api::ServerGroupStatus,
    ) {
        let (Some(uid), Some(rv)) = (
            obj.metadata.uid.clone(),
            resource_version.and_then(|v| v.parse().ok()),
        ) else {
            return;
        };
        let mut map = self.own_writes.lock();
        // The watch may have delivered this write already (the lock orders this check
        // against `OwnWrites::seen`): then there is nothing in flight to remember.
        let cached = self
            .store
            .get(&ObjectRef::from_obj(obj))
            .and_then(|c| version(&c));
        if cached.is_some_and(|c| c >= rv) {
            map.remove(&uid);
            return;
        }
        // Entries of deleted objects are never caught up with; do not let them pile up.
        if map.len() > 50_000 {
            map.clear();
        }
        map.insert(uid, (rv, Box::new(status.clone())));
    }

    /// Reads its own writes: when the cache still holds an object older than a status this
    /// process wrote, the reconcile starts from that status. Without this, a reconcile woken
    /// by the watch event of an earlier write (the finalizer) would see no status yet, take
    /// the group it just created for one to adopt, and write the same status again.
    /// resourceVersions are opaque in the API's contract but ordered integers in practice;
    /// one that does not parse leaves the object as it is.
    fn freshest(&self, obj: Arc<ServerGroup>) -> Arc<ServerGroup> {
        let mut map = self.own_writes.lock();
        // The controller handed over the object as the cache held it when the reconcile was
        // queued; the watch may have brought a newer one since (and with it, our write, whose
        // entry then went): start from the newer one. Under the lock, so that an entry and
        // the cache are read at one moment (`OwnWrites::seen` runs after the cache update).
        let obj = match self.store.get(&ObjectRef::from_obj(&*obj)) {
            Some(cached)
                if version(&cached) > version(&obj) && cached.metadata.uid == obj.metadata.uid =>
            {
                cached
            }
            _ => obj,
        };
        let Some(uid) = obj.metadata.uid.as_deref() else {
            return obj;
        };
        let current = version(&obj);
        match (map.get(uid), current) {
            (Some((written, status)), Some(current)) if *written > current => {
                let mut fresher = (*obj).clone();
                fresher.status = Some((**status).clone());
                Arc::new(fresher)
            }
            (Some(_), _) => {
                // The cache has caught up (or cannot be compared): forget the entry.
                map.remove(uid);
                obj
            }
            (None, _) => obj,
        }
    }

    pub fn with_index(mut self, index: Arc<index::WaldurIndex>) -> Self {
        self.index = Some(index);
        self
    }

    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn record_failure(&self, obj: &ServerGroup) -> u32 {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ObjectRef::from_obj(obj)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn clear_failures(&self, obj: &ServerGroup) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&ObjectRef::from_obj(obj));
    }
}

/// Exponential backoff after failed reconciles: 2 s doubling to 5 min, with jitter, so a
/// failing Waldur is never hammered.
pub fn error_policy(obj: Arc<ServerGroup>, err: &Error, ctx: Arc<Context>) -> Action {
    if let Error::WorkersBusy(_) = err {
        // Not a failure of this resource: its Waldur has its share of workers. Soon again.
        return Action::requeue(Duration::from_secs(2).mul_f64(1.0 + rand::random::<f64>()));
    }
    if let Error::Waldur(crate::waldur::WaldurError::Unavailable { waldur, .. }) = err {
        ctx.park_until_reachable(&obj, waldur);
        // The breaker's wake comes first; this only bounds a wake that went astray.
        return Action::requeue(Duration::from_secs(300));
    }
    let failures = ctx.record_failure(&obj);
    let base = Duration::from_secs(2).saturating_mul(2u32.saturating_pow(failures.min(10) - 1));
    let capped = base.min(Duration::from_secs(300));
    let wait = capped.mul_f64(0.8 + 0.4 * rand::random::<f64>());
    tracing::warn!(
        name = obj.metadata.name.as_deref().unwrap_or_default(),
        namespace = obj.metadata.namespace.as_deref().unwrap_or_default(),
        error = %err,
        retry_in = ?wait,
        "reconcile failed"
    );
    Action::requeue(wait)
}

/// What the controller runs with.
pub struct Runtime {
    pub kube: Client,
    pub api: Api<ServerGroup>,
    pub secrets: Api<PartialObjectMeta<Secret>>,
    pub settings: Settings,
    pub credentials: Arc<ClientCache>,
    pub concurrency: u16,
    pub read_path: index::ReadPath,
    /// How often the batched read path sweeps while anything is in flight.
    pub busy_sweep: Duration,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    /// The operator's own namespace, where its claims on Waldur groups live.
    pub claims_namespace: String,
    /// The resources of this shard are the only ones cached and reconciled.
    pub shard: Shard,
    /// The tenant re-syncs asked for, kept for the whole process (not per leadership term).
    pub tenant_pulls: Arc<tenant_pulls::TenantPulls>,
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    rt: Runtime,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (reader, writer) = reflector::store();
    // The controller never reads managedFields; dropping them keeps the cache small.
    // Lists are consistent reads in pages of 500. (`any_semantic()` would ask for
    // resourceVersion 0, but kube drops it whenever a page size is set, and a watch-cache
    // read could be older than what this process already saw; a relist after 410 must not
    // go back in time.)
    let (groups_synced_tx, groups_synced) = tokio::sync::watch::channel(false);
    let shard = rt.shard;
    let own_writes = Arc::new(OwnWrites::default());
    let changes = Arc::new(Changes::default());
    let seen = changes.clone();
    let stream = watcher(rt.api, watcher::Config::default())
        .default_backoff()
        // Another shard's resources are neither cached nor reconciled here: each process
        // holds its own part only (a uid never changes, so neither does its shard).
        .filter(move |event| std::future::ready(belongs_to(shard, event)))
        .modify(|sg: &mut ServerGroup| {
            let meta = sg.meta_mut();
            meta.managed_fields = None;
            // `kubectl apply` keeps a copy of the whole manifest in an annotation; the
            // operator never reads it, and it would double what the cache holds per object.
            if let Some(annotations) = meta.annotations.as_mut() {
                annotations.remove(LAST_APPLIED);
            }
        })
        .reflect(writer)
        .inspect({
            let own_writes = own_writes.clone();
            move |e| match e {
                Ok(watcher::Event::InitDone) => {
                    groups_synced_tx.send_replace(true);
                }
                Ok(watcher::Event::Apply(sg) | watcher::Event::InitApply(sg)) => {
                    own_writes.seen(sg);
                }
                Ok(watcher::Event::Delete(sg)) => {
                    own_writes.forget(sg);
                    changes.forget(sg);
                }
                _ => {}
            }
        })
        .touched_objects()
        // The operator's own status writes come back as watch events; reconciling on them
        // would bypass the error backoff whenever a failure's message changed (review M10).
        .filter(move |obj| std::future::ready(obj.as_ref().map_or(true, |sg| seen.changed(sg))));
    let (wake_tx, wake_rx) = futures::channel::mpsc::unbounded();
    let mut ctx = Context::new(
        rt.kube.clone(),
        rt.settings.clone(),
        rt.credentials,
        reader.clone(),
    )
    .with_metrics(rt.metrics.clone())
    .with_claims_namespace(rt.claims_namespace.clone())
    .with_wake(wake_tx.clone())
    .with_own_writes(own_writes)
    .with_shard(rt.shard)
    .with_tenant_pulls(rt.tenant_pulls.clone())
    // A quarter of the workers, as the limiter's per-URL share of in-flight requests.
    .with_url_worker_quota(usize::from(rt.concurrency / 4).max(1));
    if rt.read_path == index::ReadPath::Batched {
        let timing = index::SweepTiming {
            busy: rt.busy_sweep,
            settled: rt.settings.resync_period,
            after_write: Duration::from_secs(10),
        };
        ctx = ctx.with_index(Arc::new(index::WaldurIndex::new(
            timing,
            reader.clone(),
            wake_tx,
        )));
    }
    let ctx = Arc::new(ctx);
    // Ends with this run, however it ends (a lost lease drops it mid-way): a term of
    // leadership must not leave a task behind that reports its frozen cache for ever.
    let _cache_gauges = AbortOnDrop(tokio::spawn(watch_cache(
        reader.clone(),
        groups_synced.clone(),
        rt.metrics.clone(),
        rt.health.clone(),
    )));
    // Metadata only: the operator reads a Secret's data when it needs it, and keeps no copy.
    let (secret_reader, secret_writer) = reflector::store();
    let (secrets_synced_tx, secrets_synced) = tokio::sync::watch::channel(false);
    let secret_changes = watcher(rt.secrets, watcher::Config::default())
        .default_backoff()
        .modify(|s: &mut PartialObjectMeta<Secret>| {
            // Only names, uids, versions and finalizers are read. Annotations go too: for a
            // Secret applied with kubectl, last-applied-configuration holds its data (review
            // N11), which this process has no business keeping.
            let meta = s.meta_mut();
            meta.managed_fields = None;
            meta.annotations = None;
            meta.labels = None;
        })
        .reflect(secret_writer)
        .inspect(move |e| {
            if matches!(e, Ok(watcher::Event::InitDone)) {
                secrets_synced_tx.send_replace(true);
            }
        })
        .touched_objects();
    let _secret_janitor = AbortOnDrop(tokio::spawn(release_unused_secrets(
        rt.kube.clone(),
        secret_reader,
        secrets_synced,
        reader.clone(),
        groups_synced,
        rt.shard,
    )));
    let groups = reader.clone();
    Controller::for_stream(stream, reader)
        .watches_stream(secret_changes, move |secret: PartialObjectMeta<Secret>| {
            credentials::referencing(
                &groups.state(),
                secret.metadata.namespace.as_deref(),
                secret.metadata.name.as_deref(),
            )
        })
        .reconcile_on(wake_rx)
        .with_config(kube::runtime::controller::Config::default().concurrency(rt.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(name = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}

/// Whether a watch event concerns this shard: resources by their uid; the list's start and
/// end markers always.
fn belongs_to(shard: Shard, event: &Result<watcher::Event<ServerGroup>, watcher::Error>) -> bool {
    match event {
        Ok(
            watcher::Event::Apply(sg) | watcher::Event::InitApply(sg) | watcher::Event::Delete(sg),
        ) => shard.owns(sg.metadata.uid.as_deref().unwrap_or_default()),
        Ok(watcher::Event::Init | watcher::Event::InitDone) | Err(_) => true,
    }
}

/// What each object last looked like to [`what_asks_for_a_reconcile`], to pass on only the
/// changes that ask for a reconcile. kube's `predicate_filter` does the same keyed by name,
/// namespace and uid (about 170 bytes an object); a hash of the uid is enough here, and an
/// entry goes when its object is deleted.
#[derive(Default)]
struct Changes {
    by_uid: Mutex<HashMap<u64, u64>>,
}

impl Changes {
    fn key(sg: &ServerGroup) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        sg.metadata.uid.hash(&mut h);
        sg.metadata.namespace.hash(&mut h);
        sg.metadata.name.hash(&mut h);
        h.finish()
    }

    /// Whether `sg` differs from what was seen of it last, remembering it.
    fn changed(&self, sg: &ServerGroup) -> bool {
        let now = what_asks_for_a_reconcile(sg);
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        by_uid.insert(Self::key(sg), now) != Some(now)
    }

    fn forget(&self, sg: &ServerGroup) {
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        by_uid.remove(&Self::key(sg));
    }
}

/// What a change must touch to be worth a reconcile: the spec (generation), annotations
/// (paused, requests), finalizers and deletion. Status-only changes are the operator's own.
fn what_asks_for_a_reconcile(sg: &ServerGroup) -> u64 {
    use std::hash::{Hash, Hasher};
    let meta = &sg.metadata;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.annotations.hash(&mut h);
    meta.finalizers.hash(&mut h);
    meta.deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut h);
    h.finish()
}

/// Takes the operator's finalizer off credentials Secrets that no resource needs any more,
/// every few seconds (the release right after a resource's cleanup is the fast path).
async fn release_unused_secrets(
    kube: Client,
    secrets: Store<PartialObjectMeta<Secret>>,
    mut secrets_synced: tokio::sync::watch::Receiver<bool>,
    groups: Store<ServerGroup>,
    mut groups_synced: tokio::sync::watch::Receiver<bool>,
    shard: Shard,
) {
    // Both caches complete first: a Secret is never released on a partial view.
    if secrets_synced.wait_for(|s| *s).await.is_err()
        || groups_synced.wait_for(|s| *s).await.is_err()
    {
        return;
    }
    let started = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        // The finalizers of shards that no longer exist go only after the remaining shards
        // have had time to reconcile what moved to them, and so to hold those Secrets.
        let settled = started.elapsed() >= SHARDS_GONE_AFTER;
        secret_guard::release_unused(&kube, &secrets, &groups, shard, settled).await;
    }
}

/// How long shard 0 runs before it releases Secrets held by shards that no longer exist.
const SHARDS_GONE_AFTER: Duration = Duration::from_secs(120);

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Marks the process ready once the cache holds its first full list, and keeps the
/// resources-by-state gauge current.
///
/// Readiness comes from the watch stream's own InitDone, not `Store::wait_until_ready`:
/// kube-runtime's readiness signal (a oneshot receiver behind a mutex) wakes only the waiter
/// that polled it last, and the controller's runner waits on it too, so a second waiter can
/// sleep for ever (the shipped binary's /readyz stayed 503) or steal the runner's wake-up.
async fn watch_cache(
    store: Store<ServerGroup>,
    mut synced: tokio::sync::watch::Receiver<bool>,
    metrics: Metrics,
    health: Arc<Health>,
) {
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    health
        .synced
        .store(true, std::sync::atomic::Ordering::SeqCst);
    loop {
        metrics.count_resources(&store.state());
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review N5: one Waldur's reconciles hold at most its share of the workers; another
    /// Waldur's are not held up by them, and a worker given back is free again.
    #[test]
    fn a_waldur_holds_at_most_its_share_of_the_workers() {
        let workers = Arc::new(UrlWorkers::new(2));
        let a1 = workers.try_take("https://slow");
        let a2 = workers.try_take("https://slow");
        assert!(a1.is_some() && a2.is_some());
        assert!(workers.try_take("https://slow").is_none(), "its share is 2");
        assert!(
            workers.try_take("https://other").is_some(),
            "another Waldur is not held up"
        );
        drop(a1);
        assert!(
            workers.try_take("https://slow").is_some(),
            "given back on drop"
        );
    }
}
