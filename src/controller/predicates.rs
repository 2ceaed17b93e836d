//! Which watch events ask for a reconcile: only changes a user or Waldur made, not the
//! operator's own status writes coming back, and only this shard's resources.

use super::*;

/// Whether a watch event concerns this shard: resources by their uid; the list's start and
/// end markers always.
pub(super) fn belongs_to(
    shard: Shard,
    event: &Result<watcher::Event<ServerGroup>, watcher::Error>,
) -> bool {
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
pub(super) struct Changes {
    by_uid: Mutex<HashMap<u64, u64>>,
}

impl Changes {
    pub(super) fn key(sg: &ServerGroup) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        sg.metadata.uid.hash(&mut h);
        sg.metadata.namespace.hash(&mut h);
        sg.metadata.name.hash(&mut h);
        h.finish()
    }

    /// Whether `sg` differs from what was seen of it last, remembering it.
    pub(super) fn changed(&self, sg: &ServerGroup) -> bool {
        let now = what_asks_for_a_reconcile(sg);
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        by_uid.insert(Self::key(sg), now) != Some(now)
    }

    pub(super) fn forget(&self, sg: &ServerGroup) {
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        by_uid.remove(&Self::key(sg));
    }

    /// After a relist: only the objects listed are remembered (review m13).
    pub(super) fn retain(&self, present: &[std::sync::Arc<ServerGroup>]) {
        let keep: std::collections::HashSet<u64> = present.iter().map(|sg| Self::key(sg)).collect();
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        by_uid.retain(|k, _| keep.contains(k));
    }
}

/// What a change must touch to be worth a reconcile: the spec (generation), annotations
/// (paused, requests), finalizers and deletion. Status-only changes are the operator's own.
pub(super) fn what_asks_for_a_reconcile(sg: &ServerGroup) -> u64 {
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
