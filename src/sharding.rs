//! Scale-out: several operator processes split the ServerGroups between them.
//!
//! Shard `i` of `N` reconciles the resources whose uid hashes to `i` (FNV-1a, 64 bits, modulo
//! `N`): a uid never changes, so a resource belongs to one shard for as long as `N` stays the
//! same, and every process computes the same answer without asking anyone.
//!
//! What needs care is a change of `N` (and a rollout that mixes old and new processes): shard 1
//! of 3 and shard 3 of 4 may both claim a resource. So each shard has its own leader Lease,
//! named after its place (`waldur-operator-1-of-3`, or the plain name when `N` is 1) and
//! labelled as a shard lease, and a shard reconciles only while every live shard lease names
//! the same `N` as its own. The fence is safe because a lease is taken before the others are
//! read: of two processes that disagree, the later one sees the earlier one's lease and waits,
//! and the earlier one sees the later one's at its next check and stops. During a change of
//! `N` nothing is reconciled until the rollout is complete; the resources wait and nothing
//! is lost.

use std::borrow::Cow;

use crate::controller::secret_guard::SECRET_FINALIZER;

/// The label on every shard's leader Lease; its value is the Lease name of the whole operator.
pub const SHARD_LEASE_LABEL: &str = "openstack.waldur.com/shard-lease-of";

/// Which part of the resources this process reconciles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shard {
    pub index: u32,
    pub total: u32,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shard {} of {}", self.index, self.total)
    }
}

impl Shard {
    /// One process reconciles everything.
    pub const ALL: Shard = Shard { index: 0, total: 1 };

    /// The shard given on the command line.
    pub fn new(index: u32, total: u32) -> Result<Self, String> {
        if total == 0 {
            return Err("--total-shards must be at least 1".into());
        }
        if index >= total {
            return Err(format!(
                "--shard-index {index} is not below --total-shards {total}: shards are numbered from 0"
            ));
        }
        Ok(Self { index, total })
    }

    pub fn is_sharded(&self) -> bool {
        self.total > 1
    }

    /// Whether this shard reconciles the resource with this uid.
    pub fn owns(&self, uid: &str) -> bool {
        slot(uid, self.total) == self.index
    }

    /// The name of this shard's leader Lease: the operator's own name when there is one shard
    /// (so the Lease of an unsharded operator is shard 0 of 1), else `<name>-<i>-of-<n>`.
    pub fn lease_name(&self, base: &str) -> String {
        if self.is_sharded() {
            format!("{base}-{}-of-{}", self.index, self.total)
        } else {
            base.to_string()
        }
    }

    /// The shard a Lease named `name` belongs to, if it is a shard lease of `base`.
    pub fn of_lease(base: &str, name: &str) -> Option<Shard> {
        if name == base {
            return Some(Self::ALL);
        }
        let (index, total) = name
            .strip_prefix(base)?
            .strip_prefix('-')?
            .split_once("-of-")?;
        let parse = |s: &str| s.parse::<u32>().ok().filter(|_| !s.starts_with('+'));
        Shard::new(parse(index)?, parse(total)?)
            .ok()
            .filter(Shard::is_sharded)
    }

    /// The finalizer this shard puts on credentials Secrets its resources need. Shards share
    /// Secrets (a namespace's resources land on every shard), and each releases only its own
    /// finalizer, when none of *its* resources needs the Secret. Shard 0 keeps the unsharded
    /// name, so that an operator that starts sharding keeps what it held.
    pub fn secret_finalizer(&self) -> Cow<'static, str> {
        secret_finalizer_of(self.index)
    }

    /// The index of a shard's Secret finalizer, if `finalizer` is one.
    pub fn of_secret_finalizer(finalizer: &str) -> Option<u32> {
        if finalizer == SECRET_FINALIZER {
            return Some(0);
        }
        let index = finalizer
            .strip_prefix(SECRET_FINALIZER)?
            .strip_prefix("-shard-")?;
        index
            .parse()
            .ok()
            .filter(|i| *i > 0 && !index.starts_with(['0', '+']))
    }
}

fn secret_finalizer_of(index: u32) -> Cow<'static, str> {
    if index == 0 {
        Cow::Borrowed(SECRET_FINALIZER)
    } else {
        Cow::Owned(format!("{SECRET_FINALIZER}-shard-{index}"))
    }
}

/// The shard index of a uid among `total`: FNV-1a over its bytes. Written out rather than
/// taken from std, whose hasher may change between Rust releases: every version of the
/// operator must place a resource in the same shard.
pub fn slot(uid: &str, total: u32) -> u32 {
    if total <= 1 {
        return 0;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in uid.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    u32::try_from(hash % u64::from(total)).unwrap_or(0)
}

/// A shard Lease as read from the API server.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerLease {
    pub name: String,
    pub holder: Option<String>,
    /// Last renewal, in milliseconds since the epoch (by the holder's clock).
    pub renewed_ms: Option<i64>,
    pub duration_s: Option<i64>,
    /// Held by a process that renewed it within its duration, as this replica observed on its
    /// own clock ([`crate::lease::Observer::live`]), never by its timestamps (review N8).
    pub live: bool,
}

/// Whether `me` may reconcile: every live shard lease of `base` must name the same number of
/// shards. The error says which lease disagrees, for the log and the standby's readiness.
pub fn agreement(me: Shard, base: &str, leases: &[PeerLease]) -> Result<(), String> {
    for lease in leases {
        let Some(peer) = Shard::of_lease(base, &lease.name) else {
            continue;
        };
        if peer.total != me.total && lease.live {
            return Err(format!(
                "Lease {} is held by {} for {peer}, but this process is {me}: every shard waits \
                 until all of them run with the same --total-shards (a rollout in progress)",
                lease.name,
                lease.holder.as_deref().unwrap_or("?"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_uid_belongs_to_exactly_one_shard_and_the_split_is_even() {
        let total = 3;
        let shards: Vec<Shard> = (0..total).map(|i| Shard::new(i, total).unwrap()).collect();
        let mut counts = [0u32; 3];
        for n in 0..30_000u32 {
            let uid = format!(
                "{:08x}-7d3e-4c1a-9b2f-{:012x}",
                n.wrapping_mul(2_654_435_761),
                n
            );
            let owners: Vec<_> = shards.iter().filter(|s| s.owns(&uid)).collect();
            assert_eq!(owners.len(), 1, "{uid}");
            counts[owners[0].index as usize] += 1;
        }
        for c in counts {
            assert!((9_500..=10_500).contains(&c), "{counts:?}");
        }
        assert!(Shard::ALL.owns("anything"));
    }

    #[test]
    fn the_slot_of_a_uid_is_fixed_across_releases() {
        // Pinned (computed by an independent FNV-1a): changing the hash would move resources
        // between running shards. FNV-1a("a") is the published 0xaf63dc4c8601ec8c.
        assert_eq!(slot("2f1c4a7e-9b3d-4e8f-a1c2-3d4e5f6a7b8c", 3), 0);
        assert_eq!(slot("2f1c4a7e-9b3d-4e8f-a1c2-3d4e5f6a7b8c", 7), 4);
        assert_eq!(slot("", 5), 2);
        let a = 0xaf63_dc4c_8601_ec8c_u64 % u64::from(u32::MAX);
        assert_eq!(u64::from(slot("a", u32::MAX)), a);
    }

    #[test]
    fn bad_shard_flags_are_refused_with_the_reason() {
        assert!(Shard::new(0, 0).unwrap_err().contains("at least 1"));
        assert!(Shard::new(3, 3).unwrap_err().contains("numbered from 0"));
        assert_eq!(Shard::new(2, 3), Ok(Shard { index: 2, total: 3 }));
    }

    #[test]
    fn lease_names_round_trip_and_the_unsharded_name_is_shard_0_of_1() {
        let base = "waldur-operator";
        assert_eq!(Shard::ALL.lease_name(base), base);
        assert_eq!(Shard::of_lease(base, base), Some(Shard::ALL));
        let s = Shard::new(1, 3).unwrap();
        assert_eq!(s.lease_name(base), "waldur-operator-1-of-3");
        assert_eq!(Shard::of_lease(base, &s.lease_name(base)), Some(s));
        for other in [
            "waldur-operator-x",
            "waldur-operator-3-of-3",
            "waldur-operator-0-of-1",
            "waldur-operator-+1-of-3",
            "other-1-of-3",
            "waldur-operatorx-1-of-3",
        ] {
            assert_eq!(Shard::of_lease(base, other), None, "{other}");
        }
    }

    #[test]
    fn secret_finalizers_name_the_shard_and_shard_0_keeps_the_old_name() {
        assert_eq!(Shard::ALL.secret_finalizer(), SECRET_FINALIZER);
        let s = Shard::new(2, 3).unwrap();
        assert_eq!(
            s.secret_finalizer(),
            "openstack.waldur.com/credentials-in-use-shard-2"
        );
        assert!(s.secret_finalizer().len() - "openstack.waldur.com/".len() <= 63);
        assert_eq!(Shard::of_secret_finalizer(&s.secret_finalizer()), Some(2));
        assert_eq!(Shard::of_secret_finalizer(SECRET_FINALIZER), Some(0));
        assert_eq!(
            Shard::of_secret_finalizer("openstack.waldur.com/credentials-in-use-shard-0"),
            None
        );
        assert_eq!(Shard::of_secret_finalizer("kubernetes"), None);
    }

    fn lease(name: &str, holder: Option<&str>, live: bool) -> PeerLease {
        PeerLease {
            name: name.into(),
            holder: holder.map(Into::into),
            renewed_ms: None,
            duration_s: Some(15),
            live,
        }
    }

    #[test]
    fn a_shard_runs_only_while_every_live_shard_lease_names_its_count() {
        let base = "waldur-operator";
        let me = Shard::new(1, 3).unwrap();
        let same = [
            lease("waldur-operator-0-of-3", Some("a"), true),
            lease("waldur-operator-1-of-3", Some("me"), true),
            // Left by a bigger deployment, not renewed for a whole duration since.
            lease("waldur-operator-3-of-4", Some("old"), false),
            // Released on shutdown.
            lease("waldur-operator", None, false),
            // Not a shard lease (a claim).
            lease("wsg-4c3e2f1a", Some("x"), true),
        ];
        assert_eq!(agreement(me, base, &same), Ok(()));

        let rollout = [
            lease("waldur-operator-1-of-3", Some("me"), true),
            lease("waldur-operator-3-of-4", Some("new-pod"), true),
        ];
        let why = agreement(me, base, &rollout).unwrap_err();
        assert!(why.contains("waldur-operator-3-of-4"), "{why}");
        assert!(
            why.contains("shard 3 of 4") && why.contains("shard 1 of 3"),
            "{why}"
        );

        let unsharded_leader = [lease("waldur-operator", Some("old-release"), true)];
        assert!(agreement(me, base, &unsharded_leader).is_err());
        assert!(
            agreement(Shard::ALL, base, &rollout).is_err(),
            "an unsharded process yields to shards too"
        );
    }
}
