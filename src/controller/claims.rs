//! Claims on Waldur groups: one coordination.k8s.io Lease per group a Managed resource binds
//! by import, adoption or rebinding, named after the group's UUID, in the operator's
//! namespace.
//!
//! "Never bind two resources to one Waldur group" was checked against the informer cache,
//! which lags the API server: two ServerGroups importing the same group at the same instant
//! could both see no owner and both bind. Creating an object is atomic in Kubernetes, so the
//! first to create the claim wins and the other reports AlreadyManaged. A claim whose holder
//! is gone (deleted while the operator was down) or has moved to another group is taken over.
//!
//! Groups the operator creates itself are claimed right after Waldur's 201, before the status
//! write: a twin (same tenant and name) could otherwise find and bind the new group first.
//! That claim is kept in this process's memory ([`HeldHere`]) unless the operator is sharded:
//! every binding here claims there first, so it costs no Kubernetes write. A
//! resource releases its claim when it lets its group go (cleanup) and when it binds another
//! group (a rebind after a re-import, or a recreate).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::error::Error;
use crate::api::ServerGroup;
use crate::waldur::WaldurUuid;

/// The label that marks the operator's claims.
pub const CLAIM_LABEL: &str = "openstack.waldur.com/claim";

/// The outcome of a claim.
#[derive(Debug, PartialEq)]
pub enum Claim {
    Granted,
    /// Held by another resource, `namespace/name`.
    HeldBy(String),
}

/// The Lease that claims a group: `wsg-` and the UUID's 32 hex digits.
pub fn lease_name(uuid: &WaldurUuid) -> String {
    format!(
        "wsg-{}",
        uuid.as_str().replace('-', "").to_ascii_lowercase()
    )
}

/// How a resource names itself in a claim: `namespace/name/uid`.
pub fn holder_of(sg: &ServerGroup) -> String {
    format!(
        "{}/{}/{}",
        sg.namespace().unwrap_or_default(),
        sg.name_any(),
        sg.uid().unwrap_or_default()
    )
}

/// `(namespace, name, uid)` of a holder identity.
fn parse_holder(holder: &str) -> Option<(&str, &str, &str)> {
    let mut parts = holder.splitn(3, '/');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// How long a fresh claim stands even though its holder's status still names another group:
/// a rebind or recreate claims the new group before it writes status (review N6).
pub const FRESH_CLAIM: std::time::Duration = std::time::Duration::from_secs(120);

/// Whether a claim by `holder` still stands, given the holder as the API server has it now
/// (`None`: gone) and how long ago the claim was made (`None`: unknown, an older claim).
/// Pure, so the rule is tested on its own.
pub fn still_held(
    holder_uid: &str,
    current: Option<&ServerGroup>,
    uuid: &WaldurUuid,
    claimed_ago: Option<std::time::Duration>,
) -> bool {
    let Some(current) = current else {
        return false;
    };
    if current.uid().as_deref() != Some(holder_uid) {
        // Same name, new object: the old holder is gone.
        return false;
    }
    match current.status.as_ref().and_then(|s| s.uuid.as_deref()) {
        // Bound to another group: it moved on, unless it claimed this one a moment ago and is
        // about to write it into status.
        Some(bound) => {
            WaldurUuid::parse(bound).ok().as_ref() == Some(uuid)
                || claimed_ago.is_some_and(|ago| ago < FRESH_CLAIM)
        }
        // Claimed and not yet written, or still binding: it stands.
        None => true,
    }
}

fn lease_body(name: &str, holder: &str) -> Result<Lease, Error> {
    serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "labels": {CLAIM_LABEL: "true", "app.kubernetes.io/managed-by": "waldur-operator"},
        },
        "spec": {
            "holderIdentity": holder,
            "acquireTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                k8s_openapi::jiff::Timestamp::now()
            ),
        },
    }))
    .map_err(|e| Error::Kube(kube::Error::SerdeError(e)))
}

/// Claims `uuid` for `sg`. Granted when the claim is new, already ours, or taken over from a
/// holder that is gone; `HeldBy` names the resource that holds it.
pub async fn claim(
    kube: &Client,
    namespace: &str,
    uuid: &WaldurUuid,
    sg: &ServerGroup,
) -> Result<Claim, Error> {
    let leases: Api<Lease> = Api::namespaced(kube.clone(), namespace);
    let name = lease_name(uuid);
    let me = holder_of(sg);
    // Two rounds: a takeover may race with another takeover.
    for _ in 0..2 {
        match leases
            .create(&PostParams::default(), &lease_body(&name, &me)?)
            .await
        {
            Ok(_) => return Ok(Claim::Granted),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        let Some(existing) = leases.get_opt(&name).await? else {
            continue; // released meanwhile: create again
        };
        if let Some(holder) = standing_holder(kube, &existing, uuid, &me).await? {
            return Ok(Claim::HeldBy(holder));
        }
        let mine = existing
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(me.as_str());
        if mine {
            return Ok(Claim::Granted);
        }
        // Stale: take it over, guarded by the resourceVersion just read.
        let mut takeover = lease_body(&name, &me)?;
        takeover.metadata.resource_version = existing.metadata.resource_version.clone();
        match leases
            .replace(&name, &PostParams::default(), &takeover)
            .await
        {
            Ok(_) => return Ok(Claim::Granted),
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let holder = leases
        .get_opt(&name)
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    Ok(Claim::HeldBy(
        parse_holder(&holder)
            .map(|(ns, n, _)| format!("{ns}/{n}"))
            .unwrap_or(holder),
    ))
}

/// The resource (`namespace/name`) other than `sg` whose claim on `uuid` still stands, if
/// any: a read, nothing taken. What the informer cache cannot say when the holder is on
/// another shard (the campaign's seed 1004: a twin told "not managed by any ServerGroup").
pub async fn holder(
    kube: &Client,
    namespace: &str,
    uuid: &WaldurUuid,
    sg: &ServerGroup,
) -> Result<Option<String>, Error> {
    let leases: Api<Lease> = Api::namespaced(kube.clone(), namespace);
    match leases.get_opt(&lease_name(uuid)).await? {
        Some(existing) => standing_holder(kube, &existing, uuid, &holder_of(sg)).await,
        None => Ok(None),
    }
}

/// The holder of `existing` as `namespace/name` when it is not `me` and its claim still
/// stands; `None` when it is mine or stale.
async fn standing_holder(
    kube: &Client,
    existing: &Lease,
    uuid: &WaldurUuid,
    me: &str,
) -> Result<Option<String>, Error> {
    let holder = existing
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default();
    if holder == me {
        return Ok(None);
    }
    let Some((ns, holder_name, uid)) = parse_holder(&holder) else {
        return Ok(Some(holder));
    };
    let current = Api::<ServerGroup>::namespaced(kube.clone(), ns)
        .get_opt(holder_name)
        .await?;
    // The Lease's own time, as the API server stored it, against this clock: the grace is
    // long against any skew between operator replicas.
    let claimed_ago = existing
        .spec
        .as_ref()
        .and_then(|s| s.acquire_time.as_ref())
        .map(|t| {
            k8s_openapi::jiff::Timestamp::now()
                .duration_since(t.0)
                .unsigned_abs()
        });
    Ok(still_held(uid, current.as_ref(), uuid, claimed_ago).then(|| format!("{ns}/{holder_name}")))
}

/// Releases `sg`'s claim on `uuid`, if it holds one. Someone else's claim is left alone.
pub async fn release(
    kube: &Client,
    namespace: &str,
    uuid: &WaldurUuid,
    sg: &ServerGroup,
) -> Result<(), Error> {
    let leases: Api<Lease> = Api::namespaced(kube.clone(), namespace);
    let name = lease_name(uuid);
    let Some(existing) = leases.get_opt(&name).await? else {
        return Ok(());
    };
    let holder = existing.spec.and_then(|s| s.holder_identity);
    if holder.as_deref() != Some(holder_of(sg).as_str()) {
        return Ok(());
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: existing.metadata.uid,
            resource_version: existing.metadata.resource_version,
        }),
        ..Default::default()
    };
    match leases.delete(&name, &params).await {
        Ok(_) => Ok(()),
        // Gone, or changed hands meanwhile: not ours to delete.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the claims of this shard whose holder is gone (review N7): a resource deleted while
/// the operator was down, force-finalized, or whose cleanup adopted a group it then let go. A
/// holder still in `groups` (this shard's cache, with the same uid) is not asked about; others
/// are read from the API server. Returns how many claims went.
pub async fn release_orphaned(
    kube: &Client,
    namespace: &str,
    groups: &kube::runtime::reflector::Store<ServerGroup>,
    shard: crate::sharding::Shard,
) -> Result<usize, Error> {
    let leases: Api<Lease> = Api::namespaced(kube.clone(), namespace);
    let claims = leases
        .list(&kube::api::ListParams::default().labels(&format!("{CLAIM_LABEL}=true")))
        .await?;
    let cached = groups.state();
    let mut released = 0;
    for lease in claims.items {
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        let Some((ns, name, uid)) = parse_holder(&holder) else {
            continue;
        };
        if !shard.owns(uid) {
            continue;
        }
        let in_cache = cached.iter().any(|sg| sg.uid().as_deref() == Some(uid));
        if in_cache {
            continue;
        }
        let current = Api::<ServerGroup>::namespaced(kube.clone(), ns)
            .get_opt(name)
            .await?;
        if current.is_some_and(|sg| sg.uid().as_deref() == Some(uid)) {
            continue;
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: lease.metadata.uid.clone(),
                resource_version: lease.metadata.resource_version.clone(),
            }),
            ..Default::default()
        };
        match leases.delete(&lease.name_any(), &params).await {
            Ok(_) => released += 1,
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(released)
}

/// Claims this process made, by group: the claim on a group the operator creates itself,
/// where no Lease is written when one process reconciles every resource.
///
/// A twin (same tenant and name) may see the new group in a Waldur list before the creator's
/// status names it. Every binding in this process goes through [`HeldHere::claim`] under one
/// lock, so of the creator and a twin, the first to claim binds and the other is told who
/// holds it, as a Lease would tell it. Across processes (shards) only a Lease can say that,
/// so a sharded operator writes one for its creations as well. What this saves is one
/// Kubernetes write per created resource, the most common binding by far.
#[derive(Default)]
pub struct HeldHere {
    held: std::sync::Mutex<Held>,
}

#[derive(Default)]
struct Held {
    by_group: std::collections::HashMap<WaldurUuid, HeldBy>,
    /// Each holder's latest claim, by uid: what it binds before its status says (one map
    /// look per reconcile, not a walk over every claim).
    latest: std::collections::HashMap<String, WaldurUuid>,
}

struct HeldBy {
    /// `namespace/name/uid`, as in a Lease's holder identity.
    holder: String,
    at: std::time::Instant,
    /// A Lease may back this claim too (an import, an adoption, a sharded creation): letting
    /// it go must read the Lease. False only for claims this process made without one.
    lease: bool,
}

impl HeldHere {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `uuid` for `sg`, with the same rule as a Lease: granted when free, already
    /// `sg`'s, or held by a resource that is gone or has moved on ([`still_held`], with the
    /// holder as the informer cache has it). `lease`: the caller writes a Lease as well.
    pub fn claim(
        &self,
        uuid: &WaldurUuid,
        sg: &ServerGroup,
        store: &kube::runtime::reflector::Store<ServerGroup>,
        lease: bool,
    ) -> Claim {
        let me = holder_of(sg);
        let mut held = self.lock();
        if let Some(owner) = held
            .by_group
            .get(uuid)
            .and_then(|h| standing_here(h, &me, uuid, store))
        {
            return Claim::HeldBy(owner);
        }
        if let Some(uid) = sg.metadata.uid.clone() {
            held.latest.insert(uid, uuid.clone());
        }
        // Once a Lease may exist for `sg`'s claim, it stays that way: a later claim of the
        // same group without one (a create's recovery after an adoption) does not remove it.
        let lease = lease
            || held
                .by_group
                .get(uuid)
                .is_some_and(|h| h.holder == me && h.lease);
        held.by_group.insert(
            uuid.clone(),
            HeldBy {
                holder: me,
                at: std::time::Instant::now(),
                lease,
            },
        );
        Claim::Granted
    }

    /// Whether `sg`'s claim on `uuid` lives only here: this process made it and wrote no Lease
    /// for it, so letting it go need not read one. After a restart nothing is known here, and
    /// the Lease is read as before.
    pub fn without_lease(&self, uuid: &WaldurUuid, sg: &ServerGroup) -> bool {
        let me = holder_of(sg);
        self.lock()
            .by_group
            .get(uuid)
            .is_some_and(|h| h.holder == me && !h.lease)
    }

    /// The resource (`namespace/name`) other than `sg` whose claim here on `uuid` stands.
    pub fn holder(
        &self,
        uuid: &WaldurUuid,
        sg: &ServerGroup,
        store: &kube::runtime::reflector::Store<ServerGroup>,
    ) -> Option<String> {
        let me = holder_of(sg);
        self.lock()
            .by_group
            .get(uuid)
            .and_then(|h| standing_here(h, &me, uuid, store))
    }

    /// The group `sg` claimed here most recently, and how long ago: what it binds even before
    /// its status names it.
    pub fn held_by(&self, sg: &ServerGroup) -> Option<(WaldurUuid, std::time::Duration)> {
        let held = self.lock();
        let uuid = held.latest.get(sg.metadata.uid.as_deref()?)?;
        let claim = held.by_group.get(uuid)?;
        (claim.holder == holder_of(sg)).then(|| (uuid.clone(), claim.at.elapsed()))
    }

    /// Releases `sg`'s claim on `uuid`; someone else's is left alone.
    pub fn release(&self, uuid: &WaldurUuid, sg: &ServerGroup) {
        let me = holder_of(sg);
        let mut held = self.lock();
        if held.by_group.get(uuid).is_some_and(|h| h.holder == me) {
            held.by_group.remove(uuid);
            if let Some(uid) = sg.metadata.uid.as_deref()
                && held.latest.get(uid) == Some(uuid)
            {
                held.latest.remove(uid);
            }
        }
    }

    /// Forgets the latest claim of a resource that is gone (its watch said Deleted). An older
    /// one it never released is stale by [`still_held`] and taken over when asked for.
    pub fn forget_holder(&self, uid: &str) {
        let mut held = self.lock();
        if let Some(uuid) = held.latest.remove(uid) {
            let theirs = held
                .by_group
                .get(&uuid)
                .and_then(|h| parse_holder(&h.holder))
                .is_some_and(|(_, _, u)| u == uid);
            if theirs {
                held.by_group.remove(&uuid);
            }
        }
    }
}

/// The holder of a claim made here, as `namespace/name`, when it is not `me` and stands.
fn standing_here(
    held: &HeldBy,
    me: &str,
    uuid: &WaldurUuid,
    store: &kube::runtime::reflector::Store<ServerGroup>,
) -> Option<String> {
    if held.holder == me {
        return None;
    }
    let (ns, name, uid) = parse_holder(&held.holder)?;
    let current = store.get(&kube::runtime::reflector::ObjectRef::new(name).within(ns));
    still_held(uid, current.as_deref(), uuid, Some(held.at.elapsed()))
        .then(|| format!("{ns}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ServerGroupSpec, ServerGroupStatus};

    fn sg(uid: &str, bound: Option<&str>) -> ServerGroup {
        let mut sg = ServerGroup::new("web", ServerGroupSpec::default());
        sg.metadata.namespace = Some("team-a".into());
        sg.metadata.uid = Some(uid.into());
        sg.status = bound.map(|u| ServerGroupStatus {
            uuid: Some(u.into()),
            ..Default::default()
        });
        sg
    }

    const UUID: &str = "4c3e2f1a0b9c8d7e6b2a0c4e9f1d4b7a";
    const OTHER: &str = "0f5e6d1c2b3a4c9d8e7f6a5b4c3d2e1f";

    #[test]
    fn a_claim_stands_while_its_holder_exists_and_is_bound_to_it_or_binding() {
        let uuid = WaldurUuid::parse(UUID).unwrap();
        let old = Some(FRESH_CLAIM * 2);
        assert!(
            still_held("u1", Some(&sg("u1", None)), &uuid, old),
            "binding"
        );
        assert!(
            still_held("u1", Some(&sg("u1", Some(UUID))), &uuid, old),
            "bound"
        );
        assert!(!still_held("u1", None, &uuid, old), "gone");
        assert!(
            !still_held("u1", Some(&sg("u2", None)), &uuid, old),
            "a new object of that name"
        );
        assert!(
            !still_held("u1", Some(&sg("u1", Some(OTHER))), &uuid, old),
            "moved on"
        );
        assert!(
            !still_held("u1", Some(&sg("u1", Some(OTHER))), &uuid, None),
            "moved on, a claim without a time"
        );
    }

    /// Review N6: a resource rebinding to a re-imported group claims it before its status
    /// names it; a claim that fresh stands, so nobody takes it over in that window.
    #[test]
    fn a_fresh_claim_stands_while_its_holder_writes_status() {
        let uuid = WaldurUuid::parse(UUID).unwrap();
        let rebinding = sg("u1", Some(OTHER));
        assert!(still_held(
            "u1",
            Some(&rebinding),
            &uuid,
            Some(std::time::Duration::from_secs(1))
        ));
        assert!(!still_held(
            "u1",
            Some(&rebinding),
            &uuid,
            Some(FRESH_CLAIM)
        ));
    }

    #[test]
    fn names_and_holders() {
        let uuid = WaldurUuid::parse("4C3E2F1A-0B9C-8D7E-6B2A-0C4E9F1D4B7A").unwrap();
        assert_eq!(lease_name(&uuid), format!("wsg-{UUID}"));
        assert_eq!(holder_of(&sg("u1", None)), "team-a/web/u1");
        assert_eq!(parse_holder("a/b/c"), Some(("a", "b", "c")));
        assert_eq!(parse_holder("a/b"), None);
    }
}
