//! The batched read path: per set of credentials, one loop lists every visible server group
//! (sparse fields, 300 a page) into an in-memory index, and reconciles read the index instead
//! of sending one GET per resource. When a sweep finds a group changed, only the resources
//! bound to that group are woken.
//!
//! The index is written through by the operator's own writes (a created group is in it at
//! once) and marks groups it has just asked Waldur to change as dirty, so that a reconcile
//! right after a write reads Waldur directly rather than the sweep's older picture.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::time::Instant;

use crate::api::ServerGroup;
use crate::waldur::{ListQuery, ServerGroup as WaldurGroup, WaldurClient, WaldurError, WaldurUuid};

/// The fields a sweep asks for: everything the controller reads, nothing else.
pub const SWEEP_FIELDS: &[&str] = &[
    "uuid",
    "url",
    "name",
    "policy",
    "state",
    "backend_id",
    "instances",
    "error_message",
    "tenant_uuid",
    "created",
];

/// How reconciles read Waldur.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPath {
    /// One list sweep per credentials feeds an index (the default).
    Batched,
    /// One GET per resource per reconcile: what most operators do; kept for comparison.
    PerObject,
}

/// Timing of the sweeps.
#[derive(Clone, Copy, Debug)]
pub struct SweepTiming {
    /// While any group is transitional or a write is recent.
    pub busy: Duration,
    /// When everything is settled: the resync period.
    pub settled: Duration,
    /// How long after a write the loop stays busy, even if the group looks settled.
    pub after_write: Duration,
}

mod snapshot;

use snapshot::*;

/// A group transitional for longer than this no longer keeps the sweeps at the busy pace: a
/// row stuck in CREATION_SCHEDULED after a Waldur worker crash would otherwise keep them there
/// for ever (review M8). Its resource still sees it at the settled pace.
pub const STUCK_AFTER: Duration = Duration::from_secs(600);

/// What the index can say about a group.
#[derive(Debug, PartialEq)]
pub enum Answer {
    Found(Arc<WaldurGroup>),
    /// A complete sweep did not see it, and nothing was written to it since.
    Missing,
    /// Ask Waldur: the index has no complete picture, or the group was just written.
    Unknown,
}

/// One set of credentials' view of Waldur.
pub struct Shard {
    client: WaldurClient,
    snapshot: RwLock<Snapshot>,
    /// Groups written since the sweep that is under way started, with the write's time.
    dirty: Mutex<HashMap<WaldurUuid, Instant>>,
    /// (tenant, name) of creates sent without a clear answer (an error, a lost reply), with
    /// the time: Waldur may have made the group, so the index cannot say it does not exist
    /// until a sweep that started later has looked (review M3).
    attempted: Mutex<HashMap<(WaldurUuid, String), Instant>>,
    /// Groups created (or read) since the sweep under way started: a sweep that began
    /// before them cannot know them, so they are carried over into its snapshot.
    recent: Mutex<HashMap<WaldurUuid, (Instant, WaldurGroup)>>,
    busy_until: Mutex<Instant>,
    /// Since when each group has been transitional, as the sweeps saw it.
    transitional_since: Mutex<HashMap<WaldurUuid, Instant>>,
    /// When a reconcile last used this shard: an idle shard ends (review M7).
    used_at: Mutex<Instant>,
    /// How long a write keeps the sweeps at the busy pace.
    after_write: Duration,
    wake: tokio::sync::Notify,
    /// Whether a sweep has finished yet, and how.
    complete: tokio::sync::watch::Sender<SweepState>,
    /// When the last successful sweep started; a snapshot older than `stale_after` is not
    /// trusted even if no sweep failed (a sweep that hangs).
    swept_at: Mutex<Instant>,
    stale_after: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SweepState {
    Pending,
    /// The last sweep failed: the snapshot is not trusted (a revoked token, a list Waldur
    /// cannot serve); reconciles go to Waldur directly and meet the error themselves.
    Failed,
    /// The last sweep found Waldur unreachable: reconciles meet the open breaker, and when it
    /// closes they wait briefly for the sweep that follows at once.
    Unreachable,
    Complete,
}

impl Shard {
    /// Waits (up to `limit`) for the first complete sweep, so that a burst of reconciles at
    /// start-up reads one listing instead of sending one request each.
    pub async fn wait_complete(&self, limit: Duration) {
        let mut rx = self.complete.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| *s != SweepState::Pending)).await;
    }

    /// After Waldur was unreachable and answers again, the sweep loop sweeps at once: wait
    /// (up to `limit`) for that sweep rather than sending one GET per resource meanwhile.
    pub async fn wait_after_outage(&self, limit: Duration) {
        let reachable = self.client.breaker().is_none_or(|b| !b.is_open());
        if *self.complete.borrow() != SweepState::Unreachable || !reachable {
            return;
        }
        let mut rx = self.complete.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| *s != SweepState::Unreachable)).await;
    }

    /// How old the snapshot is: since its sweep started.
    pub fn snapshot_age(&self) -> Duration {
        self.swept_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Whether the snapshot may answer: the last sweep succeeded, recently enough.
    fn trusted(&self) -> bool {
        *self.complete.borrow() == SweepState::Complete
            && self
                .swept_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                <= self.stale_after
    }

    fn new(client: WaldurClient, after_write: Duration, stale_after: Duration) -> Self {
        Self {
            client,
            after_write,
            swept_at: Mutex::new(Instant::now()),
            stale_after,
            snapshot: RwLock::new(Snapshot::default()),
            dirty: Mutex::new(HashMap::new()),
            attempted: Mutex::new(HashMap::new()),
            recent: Mutex::new(HashMap::new()),
            busy_until: Mutex::new(Instant::now()),
            transitional_since: Mutex::new(HashMap::new()),
            used_at: Mutex::new(Instant::now()),
            wake: tokio::sync::Notify::new(),
            complete: tokio::sync::watch::Sender::new(SweepState::Pending),
        }
    }

    pub fn lookup_uuid(&self, uuid: &WaldurUuid) -> Answer {
        if self.is_dirty(uuid) || !self.trusted() {
            return Answer::Unknown;
        }
        let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        match snap.by_uuid.get(uuid) {
            Some(g) => Answer::Found(Arc::new(g.group())),
            None if snap
                .elsewhere
                .uuids
                .contains(&fingerprint(&[uuid.as_str()])) =>
            {
                Answer::Unknown
            }
            None if snap.complete => Answer::Missing,
            None => Answer::Unknown,
        }
    }

    pub fn lookup_backend_id(&self, backend_id: &str) -> Answer {
        if !self.trusted() {
            return Answer::Unknown;
        }
        let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        match snap
            .by_backend
            .get(backend_id)
            .and_then(|u| Some((u, snap.by_uuid.get(u)?)))
        {
            Some((uuid, g)) if !self.is_dirty(uuid) => Answer::Found(Arc::new(g.group())),
            Some(_) => Answer::Unknown,
            None if snap
                .elsewhere
                .backend_ids
                .contains(&fingerprint(&[backend_id])) =>
            {
                Answer::Unknown
            }
            None if snap.complete => Answer::Missing,
            None => Answer::Unknown,
        }
    }

    /// The UUID the last sweep saw for a Nova id, if any.
    fn uuid_of_backend(&self, backend_id: &str) -> Option<WaldurUuid> {
        let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        snap.by_backend.get(backend_id).cloned()
    }

    /// Groups in `tenant` named exactly `name`, or `None` when the index cannot say.
    pub fn by_tenant_and_name(&self, tenant: &WaldurUuid, name: &str) -> Option<Vec<WaldurGroup>> {
        let attempted = self
            .attempted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&(tenant.clone(), name.to_string()));
        if attempted || !self.trusted() {
            return None;
        }
        let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        if !snap.complete
            || snap
                .elsewhere
                .names
                .contains(&fingerprint(&[tenant.as_str(), name]))
        {
            return None;
        }
        Some(snap.named(tenant, name).map(|g| g.group()).collect())
    }

    /// A group the operator just created or read: known at once, before the next sweep.
    pub fn record(&self, group: &WaldurGroup) {
        // Lock order: snapshot, then recent (as in `sweep`), so a sweep swapping the
        // snapshot cannot slip between the two inserts and drop the group.
        {
            let mut snap = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
            snap.insert(group.clone());
            self.recent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(group.uuid.clone(), (Instant::now(), group.clone()));
        }
        self.stay_busy();
    }

    /// The operator asked Waldur to change this group: read it directly until a sweep that
    /// started after now has seen it.
    pub fn written(&self, uuid: &WaldurUuid) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uuid.clone(), Instant::now());
        self.stay_busy();
    }

    /// A create of `name` in `tenant` went out and its answer is unknown: ask Waldur, not the
    /// index, whether it exists, until a sweep that started after now has looked.
    pub fn create_attempted(&self, tenant: &WaldurUuid, name: &str) {
        self.attempted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((tenant.clone(), name.to_string()), Instant::now());
        self.stay_busy();
    }

    /// Whether `uuid` is surely gone: absent from a complete, exact sweep (no row skipped by
    /// paging) that started after this operator's last write to it. Only a deletion that saw
    /// its own DELETE under way takes this for Waldur's 404 (see `plan::deletion_read`).
    pub fn surely_gone(&self, uuid: &WaldurUuid) -> bool {
        if self.is_dirty(uuid) || !self.trusted() {
            return false;
        }
        let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        snap.complete
            && snap.exact
            && !snap.by_uuid.contains_key(uuid)
            && !snap
                .elsewhere
                .uuids
                .contains(&fingerprint(&[uuid.as_str()]))
    }

    /// A reconcile waits for the next sweep rather than reading Waldur itself: sweep soon.
    pub fn look_soon(&self) {
        self.stay_busy();
    }

    /// Whether the last sweep succeeded recently enough to answer at all.
    pub fn answers(&self) -> bool {
        self.trusted()
    }

    /// How long ago this operator last wrote to `uuid`, while no sweep that started after
    /// the write has run yet (`None`: no such write).
    pub fn written_ago(&self, uuid: &WaldurUuid) -> Option<Duration> {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uuid)
            .map(|at| at.elapsed())
    }

    pub fn is_dirty(&self, uuid: &WaldurUuid) -> bool {
        self.written_ago(uuid).is_some()
    }

    fn stay_busy(&self) {
        // The sweep loop reads this to decide its pace; a write makes it look again soon.
        *self.busy_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Instant::now() + self.after_write;
        self.wake.notify_one();
    }

    /// One sweep: list everything, swap the snapshot, and return the UUIDs whose group changed,
    /// appeared or disappeared.
    pub async fn sweep(&self, wanted: &Wanted) -> Result<Vec<WaldurUuid>, WaldurError> {
        let started = Instant::now();
        let mut next = Snapshot {
            complete: true,
            ..Default::default()
        };
        let exact = {
            // A group as it was in the last sweep keeps its record: a settled sweep of 10,000
            // groups then allocates two maps of pointers, not 10,000 new records beside the
            // old ones (a reader holding the old snapshot's lock is not blocked meanwhile: the
            // read lock is taken once per page).
            let query = ListQuery::new().fields(SWEEP_FIELDS);
            self.client
                .list_pages(&query, |page| {
                    let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
                    for group in page {
                        if !wanted.wants(&group) {
                            next.elsewhere.add(&group);
                            continue;
                        }
                        let uuid = group.uuid.clone();
                        let record = Record::from(group);
                        match snap.by_uuid.get(&uuid) {
                            Some(same) if **same == record => {
                                next.insert_shared(uuid, same.clone())
                            }
                            _ => next.insert_shared(uuid, Arc::new(record)),
                        }
                    }
                })
                .await?
        };
        next.exact = exact;
        let changed = {
            let mut snap = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent.retain(|_, (at, _)| *at >= started);
            for (uuid, (_, group)) in recent.iter() {
                if !next.by_uuid.contains_key(uuid) {
                    next.insert(group.clone());
                }
            }
            drop(recent);
            let changed = diff(&snap.by_uuid, &next.by_uuid);
            let mut since = self
                .transitional_since
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let still: HashSet<&WaldurUuid> = next.transitional().collect();
            since.retain(|u, _| still.contains(u));
            for uuid in still {
                since.entry(uuid.clone()).or_insert(now);
            }
            drop(since);
            *snap = next;
            changed
        };
        *self.swept_at.lock().unwrap_or_else(|p| p.into_inner()) = started;
        self.complete.send_replace(SweepState::Complete);
        // Writes before the sweep started are now reflected; later ones stay dirty.
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, at| *at >= started);
        self.attempted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, at| *at >= started);
        Ok(changed)
    }

    /// The busy pace while a group some ServerGroup is bound to (`bound`) is changing, and
    /// not stuck, or right after a write; the settled pace otherwise. Groups no resource
    /// manages never set the pace (review M8).
    ///
    /// `bound` is asked for only when some group is changing: in a settled installation of
    /// 10,000 resources the sweep loop does not walk the store after every sweep.
    fn next_pause(
        &self,
        timing: &SweepTiming,
        bound: impl FnOnce() -> HashSet<WaldurUuid>,
    ) -> Duration {
        if *self.busy_until.lock().unwrap_or_else(|p| p.into_inner()) > Instant::now() {
            return timing.busy;
        }
        let since = self
            .transitional_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let fresh: Vec<&WaldurUuid> = since
            .iter()
            .filter(|(_, at)| at.elapsed() < STUCK_AFTER)
            .map(|(uuid, _)| uuid)
            .collect();
        if fresh.is_empty() {
            return timing.settled;
        }
        let bound = bound();
        if fresh.iter().any(|uuid| bound.contains(*uuid)) {
            timing.busy
        } else {
            timing.settled
        }
    }
}

fn diff(
    old: &HashMap<WaldurUuid, Arc<Record>>,
    new: &HashMap<WaldurUuid, Arc<Record>>,
) -> Vec<WaldurUuid> {
    let mut changed: Vec<WaldurUuid> = new
        .iter()
        .filter(|(uuid, g)| old.get(*uuid).is_none_or(|o| o != *g))
        .map(|(uuid, _)| uuid.clone())
        .collect();
    changed.extend(old.keys().filter(|u| !new.contains_key(*u)).cloned());
    changed
}

/// All shards, and the channel that wakes resources.
pub struct WaldurIndex {
    shards: Mutex<HashMap<String, Arc<Shard>>>,
    timing: SweepTiming,
    store: Store<ServerGroup>,
    wake: UnboundedSender<ObjectRef<ServerGroup>>,
}

impl WaldurIndex {
    pub fn new(
        timing: SweepTiming,
        store: Store<ServerGroup>,
        wake: UnboundedSender<ObjectRef<ServerGroup>>,
    ) -> Self {
        Self {
            shards: Mutex::new(HashMap::new()),
            timing,
            store,
            wake,
        }
    }

    /// The shard for these credentials, starting its sweep loop on first use.
    pub fn shard(self: &Arc<Self>, key: &str, client: &WaldurClient) -> Arc<Shard> {
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = shards.get(key) {
            *s.used_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            return s.clone();
        }
        // A settled loop sweeps once per resync period: two missed sweeps make it stale.
        let stale_after = self.timing.settled * 2 + self.timing.busy;
        let shard = Arc::new(Shard::new(
            client.clone(),
            self.timing.after_write,
            stale_after,
        ));
        shards.insert(key.to_string(), shard.clone());
        let me = Arc::downgrade(self);
        let looping = Arc::downgrade(&shard);
        let key = key.to_string();
        tokio::spawn(async move { sweep_loop(me, looping, key).await });
        shard
    }

    /// How many sets of credentials are swept now (for tests and the log).
    pub fn shard_count(&self) -> usize {
        self.shards.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The UUIDs some ServerGroup is bound to: what sets the sweep pace.
    fn bound(&self) -> HashSet<WaldurUuid> {
        self.store
            .state()
            .iter()
            .filter_map(|sg| sg.status.as_ref()?.uuid.as_deref())
            .filter_map(|u| WaldurUuid::parse(u).ok())
            .collect()
    }

    /// Removes the shard of `key` when no reconcile has used it for `idle`: a rotated, revoked
    /// or mistyped token, or a deleted namespace's Secret, must not keep listing Waldur (and
    /// holding a snapshot) for ever (review M7). Returns whether it was removed.
    fn drop_if_idle(&self, key: &str, idle: Duration) -> bool {
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let unused = shards.get(key).is_some_and(|s| {
            s.used_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                > idle
        });
        if unused {
            shards.remove(key);
            tracing::info!(
                shards = shards.len(),
                "credentials unused for {idle:?}: their index is dropped"
            );
        }
        unused
    }

    /// Wakes the resources bound to a group that changed, and those awaiting the re-import of
    /// a Nova id that a changed (new) group now carries: Waldur's periodic re-sync brought it
    /// back, and the resource need not wait out its poll to rebind it.
    fn wake_bound_to(&self, shard: &Shard, changed: &[WaldurUuid]) {
        if changed.is_empty() {
            return;
        }
        let changed: HashSet<&WaldurUuid> = changed.iter().collect();
        for sg in self.store.state() {
            let Some(status) = sg.status.as_ref() else {
                continue;
            };
            let bound = status
                .uuid
                .as_deref()
                .and_then(|u| WaldurUuid::parse(u).ok());
            let back = status
                .reimport
                .as_ref()
                .filter(|r| !r.backend_id.is_empty())
                .and_then(|r| shard.uuid_of_backend(&r.backend_id));
            if bound.is_some_and(|u| changed.contains(&u))
                || back.is_some_and(|u| changed.contains(&u))
            {
                let _ = self.wake.unbounded_send(ObjectRef::from_obj(sg.as_ref()));
            }
        }
    }
}

async fn sweep_loop(
    index: std::sync::Weak<WaldurIndex>,
    shard: std::sync::Weak<Shard>,
    key: String,
) {
    let mut failures = 0u32;
    loop {
        let (Some(index), Some(shard)) = (index.upgrade(), shard.upgrade()) else {
            return;
        };
        // Every resource using these credentials reconciles at least once per resync period.
        if index.drop_if_idle(&key, index.timing.settled * 3) {
            return;
        }
        // Taken in a statement of its own: a temporary copy of the cache's list would live
        // until the sweep's end, keeping every object the watch replaces meanwhile (at 10,000
        // resources in their creation burst, 4 MiB more peak RSS).
        let wanted = Wanted::of(&index.store.state());
        let pause = match shard.sweep(&wanted).await {
            Ok(changed) => {
                failures = 0;
                index.wake_bound_to(&shard, &changed);
                shard.next_pause(&index.timing, || index.bound())
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                // The snapshot is no longer the truth (review M1): reconciles stop answering
                // from it, and say what failed instead of Synced=True.
                let state = if e.is_unavailable()
                    || crate::waldur::breaker::unreachable_cause(&e).is_some()
                {
                    SweepState::Unreachable
                } else {
                    SweepState::Failed
                };
                shard.complete.send_replace(state);
                if !e.is_unavailable() {
                    tracing::warn!(error = %e, "Waldur sweep failed");
                }
                // Back off while Waldur fails: never a hot loop.
                (index.timing.busy * 2u32.saturating_pow(failures.min(6))).min(index.timing.settled)
            }
        };
        let busy = index.timing.busy;
        drop(index);
        {
            let swept = Instant::now();
            let wake = shard.wake.notified();
            tokio::pin!(wake);
            // A write wakes a settled loop early, but never sooner than the busy pace allows.
            // Waldur answering again after an outage: sweep now, everyone waits for it.
            let back = async {
                match shard.client.breaker().filter(|b| b.is_open()) {
                    Some(b) => b.closed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = &mut wake => tokio::time::sleep_until(swept + busy.min(pause)).await,
                _ = back => {}
            }
        }
        drop(shard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::waldur::State;

    fn g(uuid: &str, state: State) -> WaldurGroup {
        WaldurGroup {
            uuid: WaldurUuid::parse(uuid).unwrap(),
            state: Some(state),
            ..Default::default()
        }
    }

    fn named(uuid: &str, tenant: &str, name: &str, backend_id: &str) -> WaldurGroup {
        WaldurGroup {
            uuid: WaldurUuid::parse(uuid).unwrap(),
            tenant_uuid: WaldurUuid::parse(tenant).unwrap(),
            name: name.into(),
            backend_id: backend_id.into(),
            state: Some(State::Ok),
            ..Default::default()
        }
    }

    /// A shard keeps records of the groups its resources could ask about, and fingerprints of
    /// the rest: a question about one of those is "ask Waldur", never "missing" (a wrong
    /// "missing" before a create would make a second group).
    #[test]
    fn groups_kept_elsewhere_are_unknown_not_missing() {
        let tenant = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";
        let mine = named("00000000000000000000000000000001", tenant, "web", "nova-1");
        let theirs = named("00000000000000000000000000000002", tenant, "db", "nova-2");
        let mut sg = ServerGroup::new(
            "web",
            crate::api::ServerGroupSpec {
                tenant: Some(tenant.into()),
                ..Default::default()
            },
        );
        sg.metadata.namespace = Some("team-a".into());
        let wanted = Wanted::of(&[Arc::new(sg)]);
        assert!(wanted.wants(&mine), "by tenant and name");
        assert!(!wanted.wants(&theirs));

        let client = WaldurClient::new(&crate::waldur::ClientSettings::new(
            "http://127.0.0.1:9",
            crate::waldur::Token::new("t"),
        ))
        .unwrap();
        let shard = Shard::new(client, Duration::from_secs(1), Duration::from_secs(60));
        {
            let mut snap = shard.snapshot.write().unwrap();
            snap.complete = true;
            snap.insert(mine.clone());
            snap.elsewhere.add(&theirs);
        }
        shard.complete.send_replace(SweepState::Complete);
        let tenant = WaldurUuid::parse(tenant).unwrap();
        assert!(matches!(shard.lookup_uuid(&mine.uuid), Answer::Found(_)));
        assert_eq!(shard.lookup_uuid(&theirs.uuid), Answer::Unknown);
        assert_eq!(
            shard.lookup_uuid(&WaldurUuid::parse("00000000000000000000000000000003").unwrap()),
            Answer::Missing
        );
        assert_eq!(shard.lookup_backend_id("nova-2"), Answer::Unknown);
        assert_eq!(shard.lookup_backend_id("nova-3"), Answer::Missing);
        assert_eq!(
            shard.by_tenant_and_name(&tenant, "web").map(|g| g.len()),
            Some(1)
        );
        assert_eq!(shard.by_tenant_and_name(&tenant, "db"), None, "ask Waldur");
        assert_eq!(
            shard.by_tenant_and_name(&tenant, "new").map(|g| g.len()),
            Some(0)
        );
    }

    #[test]
    fn diff_names_changed_new_and_gone_groups_only() {
        let a = "00000000000000000000000000000001";
        let b = "00000000000000000000000000000002";
        let c = "00000000000000000000000000000003";
        let old: HashMap<_, _> = [(a, State::Ok), (b, State::Creating)]
            .into_iter()
            .map(|(u, s)| {
                (
                    WaldurUuid::parse(u).unwrap(),
                    Arc::new(Record::from(g(u, s))),
                )
            })
            .collect();
        let new: HashMap<_, _> = [(a, State::Ok), (c, State::Ok)]
            .into_iter()
            .map(|(u, s)| {
                (
                    WaldurUuid::parse(u).unwrap(),
                    Arc::new(Record::from(g(u, s))),
                )
            })
            .collect();
        let mut changed: Vec<String> = diff(&old, &new).iter().map(|u| u.to_string()).collect();
        changed.sort();
        assert_eq!(changed, vec![b.to_string(), c.to_string()]);
    }
}
