//! What a sweep leaves behind: the snapshot of the groups the resources could ask about, and
//! the fingerprints that tell a changed group from an unchanged one.

use super::*;

/// A group as the index keeps it: the swept fields only ([`SWEEP_FIELDS`]), each string
/// exactly its length. A [`WaldurGroup`] has room for every field of Waldur's answer (408
/// bytes before its strings); at 10,000 groups the difference is about 2.5 MiB.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) uuid: Box<str>,
    pub(super) url: Box<str>,
    pub(super) name: Box<str>,
    pub(super) policy: Box<str>,
    pub(super) state: Option<crate::waldur::State>,
    pub(super) backend_id: Box<str>,
    pub(super) instances: Box<[crate::waldur::Instance]>,
    pub(super) error_message: Box<str>,
    pub(super) tenant_uuid: Box<str>,
    pub(super) created: Box<str>,
}

impl From<WaldurGroup> for Record {
    fn from(g: WaldurGroup) -> Self {
        Self {
            uuid: g.uuid.as_str().into(),
            url: g.url.into_boxed_str(),
            name: g.name.into_boxed_str(),
            policy: g.policy.into_boxed_str(),
            state: g.state,
            backend_id: g.backend_id.into_boxed_str(),
            instances: g.instances.into_boxed_slice(),
            error_message: g.error_message.into_boxed_str(),
            tenant_uuid: g.tenant_uuid.as_str().into(),
            created: g.created.into_boxed_str(),
        }
    }
}

impl Record {
    pub(super) fn group(&self) -> WaldurGroup {
        WaldurGroup {
            uuid: WaldurUuid::from_canonical(&self.uuid),
            url: self.url.to_string(),
            name: self.name.to_string(),
            policy: self.policy.to_string(),
            state: self.state.clone(),
            backend_id: self.backend_id.to_string(),
            instances: self.instances.to_vec(),
            error_message: self.error_message.to_string(),
            tenant_uuid: WaldurUuid::from_canonical(&self.tenant_uuid),
            created: self.created.to_string(),
            ..Default::default()
        }
    }
}

#[derive(Default)]
pub(super) struct Snapshot {
    pub(super) by_uuid: HashMap<WaldurUuid, Arc<Record>>,
    pub(super) by_backend: HashMap<Box<str>, WaldurUuid>,
    /// The groups of each (tenant, name), by its fingerprint: a lookup before a create reads
    /// these, not every record (at 10,000 groups the filter over all of them was most of what
    /// the operator's CPU still spent growing with the square of the fleet).
    pub(super) by_name: HashMap<u64, Vec<WaldurUuid>>,
    /// Groups the sweep saw but keeps no record of, because no resource of this process
    /// could want them (see [`Wanted`]): a lookup that meets one asks Waldur instead of
    /// answering "missing".
    pub(super) elsewhere: Fingerprints,
    /// Set after the first complete sweep: before it, a miss proves nothing.
    pub(super) complete: bool,
    /// The sweep's pages skipped no row (see `WaldurClient::list_pages`): a miss is as good
    /// as Waldur's 404 at the time of the sweep.
    pub(super) exact: bool,
}

/// 64-bit fingerprints of the groups a sweep saw but did not keep: by UUID, by backend id, by
/// (tenant, name). Nine bytes a group in each set instead of a record: at 30,000 groups over
/// three shards, a shard keeps its 10,000 records and 20,000 fingerprints.
#[derive(Default)]
pub(super) struct Fingerprints {
    pub(super) uuids: HashSet<u64>,
    pub(super) backend_ids: HashSet<u64>,
    pub(super) names: HashSet<u64>,
}

pub(super) fn fingerprint(parts: &[&str]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

impl Fingerprints {
    pub(super) fn add(&mut self, g: &WaldurGroup) {
        self.uuids.insert(fingerprint(&[g.uuid.as_str()]));
        if !g.backend_id.is_empty() {
            self.backend_ids.insert(fingerprint(&[&g.backend_id]));
        }
        self.names
            .insert(fingerprint(&[g.tenant_uuid.as_str(), &g.name]));
    }
}

/// What the resources of this process could ask the index about: the groups they are bound
/// to or import (by UUID or backend id), and the (tenant, name) of those they would create or
/// adopt. Taken from the cache when a sweep starts; a resource that appears later and asks
/// about a group the sweep did not keep finds a fingerprint, and asks Waldur. With shards,
/// this keeps a shard from holding every other shard's groups too.
///
/// Fingerprints too, so that the walk over 10,000 resources once a busy sweep allocates no
/// strings; a fingerprint that collides only keeps one record more.
#[derive(Default)]
pub struct Wanted {
    pub(super) uuids: HashSet<u64>,
    pub(super) backend_ids: HashSet<u64>,
    pub(super) names: HashSet<u64>,
}

/// The fingerprint of a UUID (and a name after it, if any) as the index writes them, from
/// any form a manifest may use.
pub(super) fn uuid_fingerprint(uuid: &str, name: Option<&str>) -> Option<u64> {
    let uuid = WaldurUuid::parse(uuid).ok()?;
    Some(match name {
        None => fingerprint(&[uuid.as_str()]),
        Some(name) => fingerprint(&[uuid.as_str(), name]),
    })
}

impl Wanted {
    pub fn of(groups: &[Arc<ServerGroup>]) -> Self {
        let mut wanted = Self::default();
        for sg in groups {
            let status = sg.status.as_ref();
            let import = sg.spec.import.as_ref();
            for uuid in [
                status.and_then(|s| s.uuid.as_deref()),
                import.and_then(|i| i.uuid.as_deref()),
            ]
            .into_iter()
            .flatten()
            {
                wanted.uuids.extend(uuid_fingerprint(uuid, None));
            }
            for backend_id in [
                status.and_then(|s| s.backend_id.as_deref()),
                import.and_then(|i| i.backend_id.as_deref()),
            ]
            .into_iter()
            .flatten()
            {
                wanted.backend_ids.insert(fingerprint(&[backend_id]));
            }
            if let (Some(tenant), Some(name)) = (sg.spec.tenant.as_deref(), sg.waldur_name_str()) {
                wanted.names.extend(uuid_fingerprint(tenant, Some(name)));
            }
        }
        wanted
    }

    pub(super) fn wants(&self, g: &WaldurGroup) -> bool {
        self.uuids.contains(&fingerprint(&[g.uuid.as_str()]))
            || (!g.backend_id.is_empty()
                && self.backend_ids.contains(&fingerprint(&[&g.backend_id])))
            || self
                .names
                .contains(&fingerprint(&[g.tenant_uuid.as_str(), &g.name]))
    }
}

impl Snapshot {
    pub(super) fn insert(&mut self, group: WaldurGroup) {
        let uuid = group.uuid.clone();
        self.insert_shared(uuid, Arc::new(Record::from(group)));
    }

    pub(super) fn insert_shared(&mut self, uuid: WaldurUuid, record: Arc<Record>) {
        if !record.backend_id.is_empty() {
            self.by_backend
                .insert(record.backend_id.clone(), uuid.clone());
        }
        let same_name = self
            .by_name
            .entry(fingerprint(&[&*record.tenant_uuid, &*record.name]))
            .or_default();
        if !same_name.contains(&uuid) {
            same_name.push(uuid.clone());
        }
        self.by_uuid.insert(uuid, record);
    }

    /// The records of this tenant and name (a fingerprint that collides, or a group renamed
    /// since it was filed, is filtered out here).
    pub(super) fn named<'a>(
        &'a self,
        tenant: &'a WaldurUuid,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Record>> + 'a {
        self.by_name
            .get(&fingerprint(&[tenant.as_str(), name]))
            .into_iter()
            .flatten()
            .filter_map(|uuid| self.by_uuid.get(uuid))
            .filter(move |g| &*g.name == name && &*g.tenant_uuid == tenant.as_str())
    }

    pub(super) fn transitional(&self) -> impl Iterator<Item = &WaldurUuid> {
        self.by_uuid
            .iter()
            .filter(|(_, g)| g.state.as_ref().is_none_or(|s| s.is_transitional()))
            .map(|(uuid, _)| uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(uuid: &str, tenant: &str, name: &str) -> WaldurGroup {
        WaldurGroup {
            uuid: WaldurUuid::parse(uuid).unwrap(),
            tenant_uuid: WaldurUuid::parse(tenant).unwrap(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn groups_are_found_by_tenant_and_name_without_a_walk() {
        const T1: &str = "11111111111111111111111111111111";
        const T2: &str = "22222222222222222222222222222222";
        let mut snap = Snapshot::default();
        snap.insert(group("a0000000000000000000000000000001", T1, "web"));
        snap.insert(group("a0000000000000000000000000000002", T2, "web"));
        snap.insert(group("a0000000000000000000000000000003", T1, "db"));
        // Recorded again (a create's answer after a sweep): listed once.
        snap.insert(group("a0000000000000000000000000000001", T1, "web"));
        fn uuids(snap: &Snapshot, tenant: &str, name: &str) -> Vec<String> {
            let tenant = WaldurUuid::parse(tenant).unwrap();
            let mut found: Vec<String> = snap
                .named(&tenant, name)
                .map(|g| g.uuid.to_string())
                .collect();
            found.sort();
            found
        }
        assert_eq!(
            uuids(&snap, T1, "web"),
            ["a0000000000000000000000000000001"]
        );
        assert_eq!(
            uuids(&snap, T2, "web"),
            ["a0000000000000000000000000000002"]
        );
        assert!(uuids(&snap, T2, "db").is_empty());
        // Renamed in Waldur: found under its new name only.
        snap.insert(group("a0000000000000000000000000000003", T1, "cache"));
        assert!(uuids(&snap, T1, "db").is_empty());
        assert_eq!(
            uuids(&snap, T1, "cache"),
            ["a0000000000000000000000000000003"]
        );
    }
}
