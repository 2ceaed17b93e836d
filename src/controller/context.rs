//! What every reconcile shares: the Context (clients, caches, settings, per-process records),
//! read-your-own-writes, the per-Waldur worker shares, and the error policy.

use super::*;

/// Statuses this process wrote that the watch has not delivered yet, by uid, each with the
/// resourceVersion its write produced. An entry goes as soon as the watch brings that version
/// (or a later one), so the map holds the writes in flight, not a status per resource.
#[derive(Default)]
pub struct OwnWrites {
    /// Boxed: the table holds a pointer per entry, not a whole status.
    map: Mutex<HashMap<String, (u64, Box<crate::api::ServerGroupStatus>)>>,
}

impl OwnWrites {
    pub(super) fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Box<crate::api::ServerGroupStatus>)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The watch delivered `sg`: a write it includes is no longer in flight.
    pub(super) fn seen(&self, sg: &ServerGroup) {
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
    pub(super) fn forget(&self, sg: &ServerGroup) {
        if let Some(uid) = sg.metadata.uid.as_deref() {
            self.lock().remove(uid);
        }
    }

    /// After a relist: objects deleted while the watch was down sent no Delete event, so
    /// their entries go here (review m13), and the table never needs clearing wholesale.
    pub(super) fn retain(&self, present: &HashSet<String>) {
        self.lock().retain(|uid, _| present.contains(uid));
    }
}

/// Consecutive failed reconciles per object, for the error backoff; cleared on success, and
/// forgotten with the object (review m13: it only grew).
#[derive(Default)]
pub(super) struct Failures {
    map: Mutex<HashMap<String, u32>>,
}

impl Failures {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(sg: &ServerGroup) -> String {
        sg.metadata.uid.clone().unwrap_or_else(|| {
            let meta = &sg.metadata;
            format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default()
            )
        })
    }

    pub(super) fn record(&self, sg: &ServerGroup) -> u32 {
        let mut map = self.lock();
        let n = map.entry(Self::key(sg)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    pub(super) fn forget(&self, sg: &ServerGroup) {
        self.lock().remove(&Self::key(sg));
    }

    /// After a relist, as [`OwnWrites::retain`].
    pub(super) fn retain(&self, present: &HashSet<String>) {
        self.lock().retain(|uid, _| present.contains(uid));
    }
}

/// An object's resourceVersion as a number: opaque in the API's contract, ordered integers
/// in practice; `None` when it does not parse, which makes no comparison hold.
pub(super) fn version(sg: &ServerGroup) -> Option<u64> {
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
    failures: Arc<Failures>,
    /// The batched read path; `None` reads Waldur once per resource per reconcile.
    pub index: Option<Arc<index::WaldurIndex>>,
    pub metrics: Metrics,
    /// Statuses this process wrote that the watch may not have delivered yet, by uid.
    own_writes: Arc<OwnWrites>,
    /// Where the claims on Waldur groups live (the operator's own namespace).
    pub claims_namespace: String,
    /// The claims this process holds without a Lease ([`claims::HeldHere`]).
    pub held_here: Arc<super::claims::HeldHere>,
    /// The cached resources by the name their group has in Waldur, fed by the watch.
    pub names: Arc<super::names::Names>,
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
    /// When this process first saw each resource being deleted, by uid: a deletion on the
    /// batched path reads a sweep that started after that (on this clock, not the API
    /// server's whole-second deletionTimestamp).
    deletions_seen: Mutex<HashMap<String, std::time::Instant>>,
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
            failures: Arc::default(),
            index: None,
            metrics: Metrics::new(),
            own_writes: Arc::default(),
            claims_namespace: "default".into(),
            held_here: Arc::default(),
            names: Arc::default(),
            parked: Mutex::new(HashMap::new()),
            wake: None,
            shard: Shard::ALL,
            tenant_pulls: Arc::default(),
            url_workers: Arc::new(UrlWorkers::new(usize::MAX)),
            deletions_seen: Mutex::new(HashMap::new()),
        }
    }

    /// How long ago this process first saw `uid` being deleted (now, the first time).
    pub fn deleting_for(&self, uid: &str) -> std::time::Duration {
        let mut seen = self
            .deletions_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        // Objects released elsewhere (a finalizer removed by hand) are forgotten after a day.
        if seen.len() > 1024 && !seen.contains_key(uid) {
            seen.retain(|_, at| now.duration_since(*at) < std::time::Duration::from_secs(86_400));
        }
        now.duration_since(*seen.entry(uid.to_string()).or_insert(now))
    }

    /// The deletion of `uid` is over (its finalizer is gone).
    pub fn deletion_done(&self, uid: &str) {
        self.deletions_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
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

    pub(super) fn with_own_writes(mut self, own_writes: Arc<OwnWrites>) -> Self {
        self.own_writes = own_writes;
        self
    }

    pub(super) fn with_failures(mut self, failures: Arc<Failures>) -> Self {
        self.failures = failures;
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
    pub(super) fn park_until_reachable(self: &Arc<Self>, obj: &ServerGroup, waldur: &str) {
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

    /// The names index, shared with the watch that feeds it.
    pub fn with_names(mut self, names: Arc<super::names::Names>) -> Self {
        self.names = names;
        self
    }

    /// The claims made here, shared with the watch that forgets a deleted holder's.
    pub fn with_held_here(mut self, held_here: Arc<super::claims::HeldHere>) -> Self {
        self.held_here = held_here;
        self
    }

    pub fn with_claims_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.claims_namespace = namespace.into();
        self
    }

    /// Remembers a status this process wrote, with the resourceVersion the write produced.
    pub(super) fn wrote_status(
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
        map.insert(uid, (rv, Box::new(status.clone())));
    }

    /// Reads its own writes: when the cache still holds an object older than a status this
    /// process wrote, the reconcile starts from that status. Without this, a reconcile woken
    /// by the watch event of an earlier write (the finalizer) would see no status yet, take
    /// the group it just created for one to adopt, and write the same status again.
    /// resourceVersions are opaque in the API's contract but ordered integers in practice;
    /// one that does not parse leaves the object as it is.
    pub(super) fn freshest(&self, obj: Arc<ServerGroup>) -> Arc<ServerGroup> {
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

    pub(super) fn record_failure(&self, obj: &ServerGroup) -> u32 {
        self.failures.record(obj)
    }

    pub(super) fn clear_failures(&self, obj: &ServerGroup) {
        self.failures.forget(obj);
    }
}

/// Exponential backoff after failed reconciles: 2 s doubling to 5 min, with jitter, so a
/// failing Waldur is never hammered.
pub fn error_policy(obj: Arc<ServerGroup>, err: &Error, ctx: Arc<Context>) -> Action {
    if let Error::WorkersBusy(_) = err {
        // Not a failure of this resource: its Waldur has its share of workers. Soon again.
        return Action::requeue(Duration::from_secs(2).mul_f64(1.0 + rand::random::<f64>()));
    }
    if let Error::StaleView(_) = err {
        // The watch delivers the newer object within moments (and wakes the resource).
        return Action::requeue(Duration::from_millis(500).mul_f64(1.0 + rand::random::<f64>()));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn object(uid: &str, version: &str) -> ServerGroup {
        let mut sg = ServerGroup::new("web", Default::default());
        sg.metadata.namespace = Some("ns".into());
        sg.metadata.uid = Some(uid.into());
        sg.metadata.resource_version = Some(version.into());
        sg
    }

    /// Review m13: what is remembered per object goes with the object, whether the watch
    /// says it was deleted or a relist no longer lists it.
    #[test]
    fn per_object_records_go_with_their_objects() {
        let failures = Failures::default();
        let (a, b) = (object("a", "1"), object("b", "1"));
        assert_eq!(failures.record(&a), 1);
        assert_eq!(failures.record(&a), 2, "consecutive failures count up");
        failures.record(&b);
        failures.forget(&a);
        assert_eq!(failures.record(&a), 1, "a deleted object starts afresh");
        failures.retain(&HashSet::from(["a".to_string()]));
        assert_eq!(failures.lock().len(), 1, "b was not relisted");

        let own = OwnWrites::default();
        own.lock().insert("a".into(), (5, Box::default()));
        own.lock().insert("b".into(), (5, Box::default()));
        own.seen(&object("a", "4"));
        assert_eq!(own.lock().len(), 2, "the write to a is still in flight");
        own.retain(&HashSet::from(["a".to_string()]));
        assert!(own.lock().contains_key("a") && !own.lock().contains_key("b"));
        own.seen(&object("a", "5"));
        assert!(own.lock().is_empty(), "delivered");
    }
}
