//! The campaign's plan: every point, with every random choice already made, drawn from one
//! seed before anything runs.
//!
//! Drawing everything up front (which resource a delete hits, how long an outage lasts, how
//! long to wait before the next point) keeps a seed's campaign the same from run to run
//! whatever the operator does meanwhile: only the operator's timing differs, never the
//! driver's. The plan keeps its own model of which resources are live and paused, so that it
//! only draws actions that make sense (no unpause of a resource that is not paused, no more
//! than `max_live` resources at once), and names resources after the point that creates them,
//! so a trace reads as a script.

use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Namespaces the resources are spread over.
pub const NAMESPACES: [&str; 3] = ["chaos-a", "chaos-b", "chaos-c"];
/// A second tenant besides the simulator's default one.
pub const SECOND_TENANT: &str = "3c1f9e2a7b6d4c5e8f0a1b2c3d4e5f60";
pub const TENANTS: [&str; 2] = [waldur_sim::DEFAULT_TENANT, SECOND_TENANT];
/// Resources in this namespace name their credentials in a Secret (`CREDS_SECRET`, the staff
/// token at first); the others use the operator's default credentials.
pub const CREDS_NAMESPACE: &str = NAMESPACES[1];
pub const CREDS_SECRET: &str = "waldur-creds";
/// Another token of the staff user, for a rotation.
pub const ROTATED_TOKEN: &str = "staff-token-rotated";

/// What happens to the credentials Secret for a while.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredChange {
    /// A new token of the same user.
    Rotate,
    /// Another user's token, who cannot see the campaign's tenants.
    Swap,
    /// The Secret is deleted (the operator's finalizer holds it while resources use it).
    Delete,
}

/// Every policy the simulator accepts (it runs as a current Waldur, not the affinity-only 7.0).
pub const POLICIES: [&str; 4] = [
    "affinity",
    "anti-affinity",
    "soft-affinity",
    "soft-anti-affinity",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deletion {
    Delete,
    Orphan,
    Unlink,
}

impl Deletion {
    pub fn as_str(self) -> &'static str {
        match self {
            Deletion::Delete => "Delete",
            Deletion::Orphan => "Orphan",
            Deletion::Unlink => "Unlink",
        }
    }
}

/// A ServerGroup, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResId {
    pub ns: &'static str,
    pub name: String,
}

impl fmt::Display for ResId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ns, self.name)
    }
}

/// A group someone created in Waldur (not the operator), for imports and observes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcePlan {
    pub id: usize,
    pub name: String,
    pub tenant: &'static str,
    pub policy: &'static str,
}

/// What `spec.import` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Import {
    SourceUuid(usize),
    SourceBackendId(usize),
    /// A UUID no group has.
    Missing(String),
}

/// Which kind of ServerGroup a create writes, and so what the end state may truthfully be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// The operator creates the group under the resource's own name.
    Plain,
    /// One of two resources in two namespaces with the same spec.name, created at once (a
    /// kustomize base applied twice): at most one may bind the group.
    Twin,
    /// spec.name is the name of a group someone else holds in the tenant: the resource must
    /// not bind it.
    Clash,
    /// Managed import of a source group.
    Import,
    /// managementPolicy Observe of a source group.
    Observe,
    /// Another resource imports a source group that an earlier one imports (deletionPolicy
    /// Orphan, so its deletion never decides the source's fate).
    DuplicateImport,
    /// Import of a group that does not exist.
    MissingImport,
}

impl Flavour {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavour::Plain => "plain",
            Flavour::Twin => "twin",
            Flavour::Clash => "clash",
            Flavour::Import => "import",
            Flavour::Observe => "observe",
            Flavour::DuplicateImport => "duplicate-import",
            Flavour::MissingImport => "missing-import",
        }
    }

    /// The operator creates this resource's group itself (under spec.name or metadata.name).
    pub fn creates(self) -> bool {
        matches!(self, Flavour::Plain | Flavour::Twin | Flavour::Clash)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateSpec {
    pub res: ResId,
    pub flavour: Flavour,
    /// The tenant of the group (the source's for imports; not written in the spec then).
    pub tenant: &'static str,
    pub policy: &'static str,
    /// `spec.name`; `None` leaves the Waldur name to metadata.name.
    pub spec_name: Option<String>,
    pub deletion: Deletion,
    pub import: Option<Import>,
    /// Create this source out of band first.
    pub new_source: Option<SourcePlan>,
}

impl CreateSpec {
    /// The name of the group in Waldur, for the flavours that create one.
    pub fn waldur_name(&self) -> String {
        self.spec_name
            .clone()
            .unwrap_or_else(|| self.res.name.clone())
    }
}

impl fmt::Display for CreateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}", self.res, self.flavour.as_str())?;
        if let Some(n) = &self.spec_name {
            write!(f, " name={n}")?;
        }
        if self.flavour.creates() {
            write!(f, " {} tenant={}", self.policy, &self.tenant[..6])?;
        }
        match &self.import {
            Some(Import::SourceUuid(s)) => write!(f, " src#{s} by uuid")?,
            Some(Import::SourceBackendId(s)) => write!(f, " src#{s} by backendId")?,
            Some(Import::Missing(u)) => write!(f, " uuid {}", &u[..8])?,
            None => {}
        }
        if self.flavour != Flavour::Observe {
            write!(f, " {}", self.deletion.as_str())?;
        }
        write!(f, "]")
    }
}

/// Which status writes a conflict fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictTarget {
    /// `patch servergroups/status`: the operator's status writes.
    Status,
    /// `patch servergroups`: finalizer adds and removes.
    Main,
    /// Both.
    Any,
}

impl ConflictTarget {
    /// The test server's subresource selector.
    pub fn subresource(self) -> Option<&'static str> {
        match self {
            ConflictTarget::Status => Some("status"),
            ConflictTarget::Main => None,
            ConflictTarget::Any => Some("*"),
        }
    }
}

/// What becomes of the tenant re-syncs (`pull_server_groups`) the operator asks for during a
/// point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantPulls {
    /// Each holds its tenant `delay_ms` (Waldur's 45 s, scaled down) before it runs.
    Late { delay_ms: u64 },
    /// Waldur's worker never runs them: the tenant stays UPDATE_SCHEDULED until they are
    /// released at the end of the point.
    Never,
    /// The next one fails in OpenStack: the tenant ends ERRED until it is repaired at the end
    /// of the point.
    Erred { repair: Repair },
}

/// How an Erred tenant is repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Staff `set_ok` on the tenant.
    SetOk,
    /// Waldur's periodic re-sync (which also re-imports unlinked groups).
    Resync,
}

/// A transitional state a group is forced into before its resource is deleted, and the
/// state it leaves it for at the end of the point.
pub const TRANSITIONAL: [(&str, &str); 6] = [
    ("CREATION_SCHEDULED", "OK"),
    ("CREATING", "OK"),
    ("UPDATE_SCHEDULED", "OK"),
    ("UPDATING", "OK"),
    // Someone else's delete that OpenStack refused, as the simulator's refused deletes end.
    ("DELETION_SCHEDULED", "ERRED"),
    ("DELETING", "ERRED"),
];

/// Which requests of one object answer 500 while the rest of Waldur is healthy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OneObject {
    /// The creates of a new resource (one tenant's create answers 500).
    Create(CreateSpec),
    /// The pulls a request-pull token on a bound resource asks for.
    Pull { res: ResId, token: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    // ----- user actions -----
    Create(CreateSpec),
    CreateTwins(CreateSpec, CreateSpec),
    SetDeletionPolicy {
        res: ResId,
        to: Deletion,
    },
    Pause {
        res: ResId,
    },
    Unpause {
        res: ResId,
    },
    RequestPull {
        res: ResId,
        token: String,
    },
    Delete {
        res: ResId,
    },
    // ----- operator faults -----
    /// SIGKILL the operator; start it again `down_ms` later.
    Kill {
        down_ms: u64,
    },
    /// Make Waldur hold its 201 back `answer_delay_ms` after committing, create a resource,
    /// and SIGKILL the operator as soon as the create is committed (so between the 201 and
    /// the status write).
    KillAfterCommit {
        create: CreateSpec,
        answer_delay_ms: u64,
        down_ms: u64,
    },
    /// SIGTERM (a rollout, a drained node): the operator stops as it chooses, mid-reconcile;
    /// it is started again `down_ms` after it exited (SIGKILL if it has not within 10 s).
    Sigterm {
        down_ms: u64,
    },
    /// With `--shards`: a rollout to `to` shards. The new processes start while the old ones
    /// still run (a Deployment's surge), then after `overlap_ms` every old one gets SIGTERM;
    /// old and new disagree on who owns what until the last old one is gone.
    Reshard {
        to: usize,
        overlap_ms: u64,
    },
    /// Twins are created while Waldur drops the answer of the next committed create, and the
    /// operator is killed as soon as a group of the twins' name exists.
    TwinsLostCreate {
        a: CreateSpec,
        b: CreateSpec,
        down_ms: u64,
    },
    // ----- Waldur faults -----
    Burst5xx {
        n: usize,
        status: u16,
        hold_ms: u64,
    },
    DropConnections {
        n: usize,
        hold_ms: u64,
    },
    /// Latency longer than the operator's WALDUR_TIMEOUT.
    Timeouts {
        hold_ms: u64,
    },
    /// The next successful create is answered `delay_ms` after its commit (more or less than
    /// the operator's timeout); with `create`, this point makes one.
    DelayedAnswer {
        create: Option<CreateSpec>,
        delay_ms: u64,
        hold_ms: u64,
    },
    /// The next successful request to `endpoint` is committed, then its connection dropped.
    CommitThenDrop {
        endpoint: &'static str,
        create: Option<CreateSpec>,
        hold_ms: u64,
    },
    /// Every request answers 503 (`refuse` false) or connections are refused (`refuse` true).
    Outage {
        refuse: bool,
        hold_ms: u64,
    },
    /// Waldur's periodic tenant re-sync, now.
    Resync,
    /// The resource's group is deleted in OpenStack (the Waldur row stays until a re-sync).
    OobOpenstackDelete {
        res: ResId,
    },
    /// Another Waldur user DELETEs the resource's group.
    OobWaldurDelete {
        res: ResId,
    },
    /// A staff user unlinks the resource's group (OpenStack keeps it).
    OobUnlink {
        res: ResId,
    },
    /// The next create ends ERRED in OpenStack; this point makes one.
    FailCreate {
        create: CreateSpec,
        hold_ms: u64,
    },
    /// Tenant re-syncs late, never run, or failing (tenant Erred), while a staff user unlinks
    /// `res`'s group (so the operator asks for one); switched off at the end of the point.
    TenantPullFault {
        res: Option<ResId>,
        pulls: TenantPulls,
        hold_ms: u64,
    },
    /// A staff user unlinks the resource's group and the user deletes the resource at once:
    /// a delete while the group awaits re-import (review N2).
    UnlinkThenDelete {
        res: ResId,
    },
    /// The resource's group is forced into a transitional state, the resource is deleted,
    /// and `hold_ms` later the group leaves that state (see [`TRANSITIONAL`]).
    DeleteTransitional {
        res: ResId,
        state: &'static str,
        then: &'static str,
        hold_ms: u64,
    },
    /// A resource is created and deleted `after_ms` later, while Waldur still creates its
    /// group (CREATION_SCHEDULED, CREATING).
    CreateThenDelete {
        create: CreateSpec,
        after_ms: u64,
    },
    /// The next `n` requests of one object answer 500 while every other is answered: no
    /// other resource may be told Waldur is unavailable (review N4).
    OneObject500 {
        target: OneObject,
        n: usize,
        hold_ms: u64,
    },
    /// Waldur's clock runs `secs` off the API server's for the point (every `created` and
    /// `modified` it writes), while a resource is created, its create answer lost with
    /// `drop_answer` (review N3's clock remark, m15).
    ClockSkew {
        secs: i64,
        create: Option<CreateSpec>,
        drop_answer: bool,
        hold_ms: u64,
    },
    /// The credentials Secret is changed (`change`) for `hold_ms`, then put back; with
    /// `delete`, a resource that uses it is deleted meanwhile (review m4).
    Credentials {
        change: CredChange,
        delete: Option<ResId>,
        hold_ms: u64,
    },
    // ----- Kubernetes faults -----
    Conflicts {
        n: usize,
        target: ConflictTarget,
        hold_ms: u64,
    },
    /// Every request on Leases answers 503 for `hold_ms`: leader and shard leases cannot be
    /// renewed (a term ends while reconciles are in flight), and claims and release records
    /// cannot be written: the coordination API partitioned away.
    LeasesDown {
        hold_ms: u64,
    },
    ExpireWatches,
    /// Drop the watch history, then end the watches: every re-watch is answered 410.
    Compact,
    WatchDelay {
        delay_ms: u64,
        hold_ms: u64,
    },
}

/// The four groups of points, for the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Category {
    User,
    Operator,
    Waldur,
    Kubernetes,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::User => "user",
            Category::Operator => "operator-fault",
            Category::Waldur => "waldur-fault",
            Category::Kubernetes => "kube-fault",
        }
    }
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Create(_) => "create",
            Action::CreateTwins(..) => "create-twins",
            Action::SetDeletionPolicy { .. } => "set-deletion-policy",
            Action::Pause { .. } => "pause",
            Action::Unpause { .. } => "unpause",
            Action::RequestPull { .. } => "request-pull",
            Action::Delete { .. } => "delete",
            Action::Kill { .. } => "kill",
            Action::KillAfterCommit { .. } => "kill-after-commit",
            Action::Burst5xx { .. } => "5xx-burst",
            Action::DropConnections { .. } => "drop-connections",
            Action::Timeouts { .. } => "timeouts",
            Action::DelayedAnswer { .. } => "delayed-201",
            Action::CommitThenDrop { .. } => "commit-then-drop",
            Action::Outage { refuse: false, .. } => "outage-503",
            Action::Outage { refuse: true, .. } => "outage-refused",
            Action::Resync => "resync",
            Action::OobOpenstackDelete { .. } => "oob-openstack-delete",
            Action::OobWaldurDelete { .. } => "oob-waldur-delete",
            Action::OobUnlink { .. } => "oob-unlink",
            Action::FailCreate { .. } => "create-erred",
            Action::Conflicts { .. } => "409-conflicts",
            Action::LeasesDown { .. } => "leases-down",
            Action::ExpireWatches => "expire-watches",
            Action::Compact => "compact-410",
            Action::WatchDelay { .. } => "watch-delay",
            Action::Sigterm { .. } => "sigterm",
            Action::Reshard { .. } => "reshard",
            Action::TwinsLostCreate { .. } => "twins-lost-create",
            Action::TenantPullFault {
                pulls: TenantPulls::Late { .. },
                ..
            } => "tenant-pull-late",
            Action::TenantPullFault {
                pulls: TenantPulls::Never,
                ..
            } => "tenant-pull-never",
            Action::TenantPullFault {
                pulls: TenantPulls::Erred { .. },
                ..
            } => "tenant-erred",
            Action::UnlinkThenDelete { .. } => "unlink-then-delete",
            Action::DeleteTransitional { .. } => "delete-transitional",
            Action::CreateThenDelete { .. } => "create-then-delete",
            Action::OneObject500 { .. } => "one-object-500",
            Action::ClockSkew { .. } => "clock-skew",
            Action::Credentials { change, .. } => match change {
                CredChange::Rotate => "credentials-rotate",
                CredChange::Swap => "credentials-swap",
                CredChange::Delete => "credentials-delete",
            },
        }
    }

    pub fn category(&self) -> Category {
        match self {
            Action::Create(_)
            | Action::CreateTwins(..)
            | Action::SetDeletionPolicy { .. }
            | Action::Pause { .. }
            | Action::Unpause { .. }
            | Action::RequestPull { .. }
            | Action::Delete { .. }
            | Action::Credentials { .. } => Category::User,
            Action::Kill { .. }
            | Action::KillAfterCommit { .. }
            | Action::Sigterm { .. }
            | Action::Reshard { .. }
            | Action::TwinsLostCreate { .. } => Category::Operator,
            Action::Conflicts { .. }
            | Action::ExpireWatches
            | Action::LeasesDown { .. }
            | Action::Compact
            | Action::WatchDelay { .. } => Category::Kubernetes,
            _ => Category::Waldur,
        }
    }

    /// Every resource this point creates.
    pub fn creates(&self) -> Vec<&CreateSpec> {
        match self {
            Action::Create(c)
            | Action::KillAfterCommit { create: c, .. }
            | Action::FailCreate { create: c, .. } => vec![c],
            Action::CreateTwins(a, b) | Action::TwinsLostCreate { a, b, .. } => vec![a, b],
            Action::CreateThenDelete { create: c, .. }
            | Action::OneObject500 {
                target: OneObject::Create(c),
                ..
            } => vec![c],
            Action::ClockSkew { create, .. } => create.iter().collect(),
            Action::DelayedAnswer { create, .. } | Action::CommitThenDrop { create, .. } => {
                create.iter().collect()
            }
            _ => vec![],
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind();
        match self {
            Action::Create(c) => write!(f, "{kind} {c}"),
            Action::CreateTwins(a, b) => write!(f, "{kind} {a} + {b}"),
            Action::SetDeletionPolicy { res, to } => write!(f, "{kind} {res} -> {}", to.as_str()),
            Action::Pause { res } | Action::Unpause { res } | Action::Delete { res } => {
                write!(f, "{kind} {res}")
            }
            Action::RequestPull { res, token } => write!(f, "{kind} {res} token={token}"),
            Action::Kill { down_ms } => write!(f, "{kind} (down {down_ms} ms)"),
            Action::KillAfterCommit {
                create,
                answer_delay_ms,
                down_ms,
            } => write!(
                f,
                "{kind}: 201 held {answer_delay_ms} ms, create {create}, kill at commit (down {down_ms} ms)"
            ),
            Action::Burst5xx { n, status, hold_ms } => {
                write!(f, "{kind} next {n} requests {status} (for {hold_ms} ms)")
            }
            Action::DropConnections { n, hold_ms } => {
                write!(f, "{kind} next {n} requests (for {hold_ms} ms)")
            }
            Action::Timeouts { hold_ms } => write!(f, "{kind} for {hold_ms} ms"),
            Action::DelayedAnswer {
                create,
                delay_ms,
                hold_ms,
            } => {
                write!(
                    f,
                    "{kind} next create answered {delay_ms} ms after commit (for {hold_ms} ms)"
                )?;
                if let Some(c) = create {
                    write!(f, ", create {c}")?;
                }
                Ok(())
            }
            Action::CommitThenDrop {
                endpoint,
                create,
                hold_ms,
            } => {
                write!(f, "{kind} next {endpoint} (for {hold_ms} ms)")?;
                if let Some(c) = create {
                    write!(f, ", create {c}")?;
                }
                Ok(())
            }
            Action::Outage { hold_ms, .. } => write!(f, "{kind} for {hold_ms} ms"),
            Action::Resync | Action::ExpireWatches | Action::Compact => write!(f, "{kind}"),
            Action::OobOpenstackDelete { res }
            | Action::OobWaldurDelete { res }
            | Action::OobUnlink { res } => write!(f, "{kind} of {res}'s group"),
            Action::FailCreate { create, hold_ms } => {
                write!(
                    f,
                    "{kind}: next create ERRED (for {hold_ms} ms), create {create}"
                )
            }
            Action::Conflicts { n, target, hold_ms } => {
                write!(
                    f,
                    "{kind} next {n} patches of {target:?} (for {hold_ms} ms)"
                )
            }
            Action::WatchDelay { delay_ms, hold_ms } => {
                write!(f, "{kind} {delay_ms} ms (for {hold_ms} ms)")
            }
            Action::LeasesDown { hold_ms } => {
                write!(f, "{kind}: every Lease request 503 (for {hold_ms} ms)")
            }
            Action::Sigterm { down_ms } => write!(f, "{kind} (down {down_ms} ms after exit)"),
            Action::Reshard { to, overlap_ms } => write!(
                f,
                "{kind}: roll out {to} shard(s), the old ones stopped {overlap_ms} ms later"
            ),
            Action::TwinsLostCreate { a, b, down_ms } => write!(
                f,
                "{kind}: next create answer dropped, twins {a} + {b}, kill at commit (down {down_ms} ms)"
            ),
            Action::TenantPullFault {
                res,
                pulls,
                hold_ms,
            } => {
                match pulls {
                    TenantPulls::Late { delay_ms } => {
                        write!(f, "{kind}: tenant re-syncs held {delay_ms} ms")?
                    }
                    TenantPulls::Never => write!(f, "{kind}: tenant re-syncs never run")?,
                    TenantPulls::Erred { repair } => {
                        write!(f, "{kind}: next tenant re-sync fails, repair by {repair:?}")?
                    }
                }
                write!(f, " (for {hold_ms} ms)")?;
                if let Some(r) = res {
                    write!(f, ", unlink {r}'s group")?;
                }
                Ok(())
            }
            Action::UnlinkThenDelete { res } => {
                write!(f, "{kind}: unlink {res}'s group, delete {res} at once")
            }
            Action::DeleteTransitional {
                res,
                state,
                then,
                hold_ms,
            } => write!(
                f,
                "{kind}: {res}'s group forced {state}, delete {res}, {then} after {hold_ms} ms"
            ),
            Action::CreateThenDelete { create, after_ms } => {
                write!(f, "{kind}: create {create}, delete it {after_ms} ms later")
            }
            Action::OneObject500 { target, n, hold_ms } => {
                match target {
                    OneObject::Create(c) => write!(f, "{kind}: next {n} creates 500, create {c}")?,
                    OneObject::Pull { res, token } => write!(
                        f,
                        "{kind}: next {n} pulls 500, request-pull {res} token={token}"
                    )?,
                }
                write!(f, " (for {hold_ms} ms)")
            }
            Action::Credentials {
                delete, hold_ms, ..
            } => {
                write!(
                    f,
                    "{kind}: Secret {CREDS_NAMESPACE}/{CREDS_SECRET} (for {hold_ms} ms)"
                )?;
                if let Some(r) = delete {
                    write!(f, ", delete {r} meanwhile")?;
                }
                Ok(())
            }
            Action::ClockSkew {
                secs,
                create,
                drop_answer,
                hold_ms,
            } => {
                write!(f, "{kind}: Waldur's clock {secs:+} s (for {hold_ms} ms)")?;
                if let Some(c) = create {
                    write!(f, ", create {c}")?;
                    if *drop_answer {
                        write!(f, ", its answer dropped after commit")?;
                    }
                }
                Ok(())
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    pub index: usize,
    /// How long to wait before this point, so that reconciles interleave with the faults.
    pub wait_ms: u64,
    pub action: Action,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub seed: u64,
    pub points: Vec<Point>,
}

/// What the plan knows of a live resource while it draws.
#[derive(Clone, Debug)]
struct Live {
    res: ResId,
    flavour: Flavour,
    paused: bool,
}

/// The drawing state: the seeded generator and the plan's model of the cluster.
struct Drawer {
    rng: StdRng,
    max_live: usize,
    live: Vec<Live>,
    sources: Vec<SourcePlan>,
    /// `(name, tenant, policy)` of groups someone other than a live resource holds (sources,
    /// and the groups of resources deleted with Orphan or Unlink): what a Clash create reuses.
    foreign: Vec<(String, &'static str, &'static str)>,
    /// The creates drawn so far, by resource, to know a deleted resource's name.
    created: Vec<CreateSpec>,
}

/// Draws the plan for `seed`: `points` points, at most `max_live` resources live at once.
#[cfg(test)]
pub fn draw(seed: u64, points: usize, max_live: usize) -> Plan {
    draw_with(seed, points, max_live, false)
}

/// As [`draw`], with `reshards`: about one point in ten becomes a rollout to another number
/// of shards (1 to 4), drawn from a generator of its own, so the plan of a seed without
/// reshards stays what it always was.
pub fn draw_with(seed: u64, points: usize, max_live: usize, reshards: bool) -> Plan {
    let mut shard_rng = StdRng::seed_from_u64(seed ^ 0x5A4D_5EED);
    let mut d = Drawer {
        rng: StdRng::seed_from_u64(seed),
        max_live: max_live.max(2),
        live: Vec::new(),
        sources: Vec::new(),
        foreign: Vec::new(),
        created: Vec::new(),
    };
    let points = (0..points)
        .map(|index| {
            let wait_ms = d.rng.random_range(20..=300);
            let action = if reshards && shard_rng.random_bool(0.1) {
                Action::Reshard {
                    to: shard_rng.random_range(1..=4),
                    overlap_ms: shard_rng.random_range(0..=3000),
                }
            } else {
                d.action(index)
            };
            Point {
                index,
                wait_ms,
                action,
            }
        })
        .collect();
    Plan { seed, points }
}

/// Weights of the point kinds (they need not sum to anything).
const WEIGHTS: &[(&str, u32)] = &[
    ("create", 16),
    ("create-twins", 2),
    ("set-deletion-policy", 5),
    ("pause", 3),
    ("unpause", 3),
    ("request-pull", 4),
    ("delete", 10),
    ("kill", 4),
    ("kill-after-commit", 3),
    ("5xx-burst", 5),
    ("drop-connections", 4),
    ("timeouts", 3),
    ("delayed-201", 3),
    ("commit-then-drop", 4),
    ("outage", 3),
    ("resync", 4),
    ("oob-openstack-delete", 2),
    ("oob-waldur-delete", 2),
    ("oob-unlink", 2),
    ("create-erred", 3),
    ("409-conflicts", 5),
    ("expire-watches", 3),
    ("compact-410", 2),
    ("watch-delay", 3),
    ("sigterm", 2),
    ("twins-lost-create", 2),
    ("tenant-pull-late", 3),
    ("tenant-pull-never", 2),
    ("tenant-erred", 2),
    ("unlink-then-delete", 2),
    ("delete-transitional", 3),
    ("create-then-delete", 2),
    ("one-object-500", 3),
    ("clock-skew", 2),
    ("credentials-rotate", 2),
    ("credentials-swap", 2),
    ("credentials-delete", 2),
    ("leases-down", 2),
];

impl Drawer {
    fn action(&mut self, index: usize) -> Action {
        let total: u32 = WEIGHTS.iter().map(|(_, w)| w).sum();
        let mut pick = self.rng.random_range(0..total);
        let mut kind = WEIGHTS[0].0;
        for (k, w) in WEIGHTS {
            if pick < *w {
                kind = k;
                break;
            }
            pick -= w;
        }
        let full = self.live.len() >= self.max_live;
        let room_for_two = self.live.len() + 2 <= self.max_live;
        match kind {
            "create" | "create-twins" | "create-erred" | "create-then-delete" if full => {
                self.delete()
            }
            "twins-lost-create" if room_for_two => {
                let Action::CreateTwins(a, b) = self.twins(index) else {
                    unreachable!("twins() draws twins")
                };
                Action::TwinsLostCreate {
                    a,
                    b,
                    down_ms: self.rng.random_range(0..=800),
                }
            }
            "twins-lost-create" => self.fallback(index),
            "sigterm" => Action::Sigterm {
                down_ms: self.rng.random_range(0..=800),
            },
            "tenant-pull-late" | "tenant-pull-never" | "tenant-erred" => {
                let pulls = match kind {
                    // Waldur's 45 s, scaled down like every delay of the campaign.
                    "tenant-pull-late" => TenantPulls::Late {
                        delay_ms: self.rng.random_range(1500..=4500),
                    },
                    "tenant-pull-never" => TenantPulls::Never,
                    _ => TenantPulls::Erred {
                        repair: if self.rng.random_bool(0.5) {
                            Repair::SetOk
                        } else {
                            Repair::Resync
                        },
                    },
                };
                let res = self.creating_target();
                Action::TenantPullFault {
                    res,
                    pulls,
                    hold_ms: self.rng.random_range(1500..=5000),
                }
            }
            "unlink-then-delete" if !self.live.is_empty() => {
                let Action::Delete { res } = self.delete() else {
                    unreachable!("delete() draws deletes")
                };
                Action::UnlinkThenDelete { res }
            }
            "delete-transitional" if !self.live.is_empty() => {
                let Action::Delete { res } = self.delete() else {
                    unreachable!("delete() draws deletes")
                };
                let (state, then) = TRANSITIONAL[self.rng.random_range(0..TRANSITIONAL.len())];
                Action::DeleteTransitional {
                    res,
                    state,
                    then,
                    hold_ms: self.rng.random_range(500..=2500),
                }
            }
            "unlink-then-delete" | "delete-transitional" => self.fallback(index),
            "create-then-delete" => {
                let create = self.plain(index);
                self.live.retain(|l| l.res != create.res);
                self.left_behind(&create.res);
                Action::CreateThenDelete {
                    create,
                    after_ms: self.rng.random_range(0..=400),
                }
            }
            "one-object-500" => {
                let n = self.rng.random_range(3..=8);
                let hold_ms = self.rng.random_range(1500..=3000);
                let target = match self.creating_target() {
                    Some(res) if full || self.rng.random_bool(0.4) => OneObject::Pull {
                        res,
                        token: format!("t{index}"),
                    },
                    _ if full => return self.delete(),
                    _ => OneObject::Create(self.plain(index)),
                };
                Action::OneObject500 { target, n, hold_ms }
            }
            "clock-skew" => {
                let secs = if self.rng.random_bool(0.5) { 5 } else { -5 };
                let drop_answer = self.rng.random_bool(0.5);
                let create = (!full).then(|| self.plain(index));
                Action::ClockSkew {
                    secs,
                    create,
                    drop_answer,
                    hold_ms: self.rng.random_range(1000..=3000),
                }
            }
            "credentials-rotate" | "credentials-swap" | "credentials-delete" => {
                let change = match kind {
                    "credentials-rotate" => CredChange::Rotate,
                    "credentials-swap" => CredChange::Swap,
                    _ => CredChange::Delete,
                };
                let delete = if self.rng.random_bool(0.6) {
                    self.delete_in(CREDS_NAMESPACE)
                } else {
                    None
                };
                Action::Credentials {
                    change,
                    delete,
                    hold_ms: self.rng.random_range(1000..=4000),
                }
            }
            "create" => Action::Create(self.create(index)),
            "create-twins" if room_for_two => self.twins(index),
            "create-twins" => Action::Create(self.create(index)),
            "set-deletion-policy" => self.set_policy().unwrap_or_else(|| self.fallback(index)),
            "pause" => self.pause(true).unwrap_or_else(|| self.fallback(index)),
            "unpause" => self.pause(false).unwrap_or_else(|| self.fallback(index)),
            "request-pull" => match self.target() {
                Some(res) => Action::RequestPull {
                    res,
                    token: format!("t{index}"),
                },
                None => self.fallback(index),
            },
            "delete" if self.live.is_empty() => self.fallback(index),
            "delete" => self.delete(),
            "kill" => Action::Kill {
                down_ms: self.rng.random_range(0..=800),
            },
            "kill-after-commit" if full => Action::Kill {
                down_ms: self.rng.random_range(0..=800),
            },
            "kill-after-commit" => Action::KillAfterCommit {
                create: self.plain(index),
                answer_delay_ms: self.rng.random_range(800..=1800),
                down_ms: self.rng.random_range(0..=500),
            },
            "5xx-burst" => Action::Burst5xx {
                n: self.rng.random_range(1..=6),
                status: [500, 502, 503, 504][self.rng.random_range(0..4)],
                hold_ms: self.rng.random_range(200..=1200),
            },
            "drop-connections" => Action::DropConnections {
                n: self.rng.random_range(1..=4),
                hold_ms: self.rng.random_range(200..=1200),
            },
            "timeouts" => Action::Timeouts {
                hold_ms: self.rng.random_range(1000..=2500),
            },
            "delayed-201" => Action::DelayedAnswer {
                create: (!full).then(|| self.plain(index)),
                // Either side of the operator's 2 s timeout.
                delay_ms: self.rng.random_range(500..=3500),
                hold_ms: self.rng.random_range(1000..=2000),
            },
            "commit-then-drop" => {
                let endpoint = if self.rng.random_bool(0.7) {
                    "create"
                } else {
                    ["delete", "pull", "unlink"][self.rng.random_range(0..3)]
                };
                let create = (endpoint == "create" && !full).then(|| self.plain(index));
                Action::CommitThenDrop {
                    endpoint,
                    create,
                    hold_ms: self.rng.random_range(500..=1500),
                }
            }
            "outage" => Action::Outage {
                refuse: self.rng.random_bool(0.5),
                hold_ms: self.rng.random_range(800..=3000),
            },
            "resync" => Action::Resync,
            "oob-openstack-delete" | "oob-waldur-delete" | "oob-unlink" => match self.target() {
                Some(res) => match kind {
                    "oob-openstack-delete" => Action::OobOpenstackDelete { res },
                    "oob-waldur-delete" => Action::OobWaldurDelete { res },
                    _ => Action::OobUnlink { res },
                },
                None => self.fallback(index),
            },
            "create-erred" => Action::FailCreate {
                create: self.plain(index),
                hold_ms: self.rng.random_range(300..=1000),
            },
            "409-conflicts" => Action::Conflicts {
                n: self.rng.random_range(1..=5),
                target: [
                    ConflictTarget::Status,
                    ConflictTarget::Main,
                    ConflictTarget::Any,
                ][self.rng.random_range(0..3)],
                hold_ms: self.rng.random_range(300..=1500),
            },
            "expire-watches" => Action::ExpireWatches,
            // Longer than the campaign's 3 s leader lease, or not.
            "leases-down" => Action::LeasesDown {
                hold_ms: self.rng.random_range(1000..=6000),
            },
            "compact-410" => Action::Compact,
            _ => Action::WatchDelay {
                delay_ms: self.rng.random_range(300..=1500),
                hold_ms: self.rng.random_range(500..=2000),
            },
        }
    }

    /// When the drawn action has no target: a create, or a delete when full.
    fn fallback(&mut self, index: usize) -> Action {
        if self.live.len() >= self.max_live {
            self.delete()
        } else {
            Action::Create(self.create(index))
        }
    }

    fn namespace(&mut self) -> &'static str {
        NAMESPACES[self.rng.random_range(0..NAMESPACES.len())]
    }

    fn policy(&mut self) -> &'static str {
        POLICIES[self.rng.random_range(0..POLICIES.len())]
    }

    fn tenant(&mut self) -> &'static str {
        TENANTS[self.rng.random_range(0..TENANTS.len())]
    }

    fn deletion(&mut self) -> Deletion {
        match self.rng.random_range(0..10) {
            0..=5 => Deletion::Delete,
            6 | 7 => Deletion::Orphan,
            _ => Deletion::Unlink,
        }
    }

    /// An import of source `id`, by its UUID or its backend id, half and half.
    fn by_uuid_or_backend_id(&mut self, id: usize) -> Import {
        if self.rng.random_bool(0.5) {
            Import::SourceUuid(id)
        } else {
            Import::SourceBackendId(id)
        }
    }

    fn new_source(&mut self, index: usize) -> SourcePlan {
        let s = SourcePlan {
            id: self.sources.len(),
            name: format!("src{index:03}"),
            tenant: self.tenant(),
            policy: self.policy(),
        };
        self.sources.push(s.clone());
        self.foreign.push((s.name.clone(), s.tenant, s.policy));
        s
    }

    fn remember(&mut self, c: &CreateSpec) {
        self.live.push(Live {
            res: c.res.clone(),
            flavour: c.flavour,
            paused: false,
        });
        self.created.push(c.clone());
    }

    /// A plain create: the resource the create-related faults need.
    fn plain(&mut self, index: usize) -> CreateSpec {
        let c = CreateSpec {
            res: ResId {
                ns: self.namespace(),
                name: format!("r{index:03}"),
            },
            flavour: Flavour::Plain,
            tenant: self.tenant(),
            policy: self.policy(),
            spec_name: None,
            deletion: self.deletion(),
            import: None,
            new_source: None,
        };
        self.remember(&c);
        c
    }

    fn create(&mut self, index: usize) -> CreateSpec {
        let roll = self.rng.random_range(0..100);
        let res = ResId {
            ns: self.namespace(),
            name: format!("r{index:03}"),
        };
        let deletion = self.deletion();
        let c = match roll {
            0..=54 => return self.plain(index),
            55..=72 => {
                let src = self.new_source(index);
                let import = self.by_uuid_or_backend_id(src.id);
                CreateSpec {
                    res,
                    flavour: Flavour::Import,
                    tenant: src.tenant,
                    policy: src.policy,
                    spec_name: None,
                    deletion,
                    import: Some(import),
                    new_source: Some(src),
                }
            }
            73..=80 => {
                let fresh = self.sources.is_empty() || self.rng.random_bool(0.6);
                let (src, new_source) = if fresh {
                    let s = self.new_source(index);
                    (s.clone(), Some(s))
                } else {
                    let i = self.rng.random_range(0..self.sources.len());
                    (self.sources[i].clone(), None)
                };
                CreateSpec {
                    res,
                    flavour: Flavour::Observe,
                    tenant: src.tenant,
                    policy: src.policy,
                    spec_name: None,
                    deletion,
                    import: Some(Import::SourceUuid(src.id)),
                    new_source,
                }
            }
            81..=85 => {
                let uuid: String = (0..32)
                    .map(|_| char::from(b"0123456789abcdef"[self.rng.random_range(0..16)]))
                    .collect();
                CreateSpec {
                    res,
                    flavour: Flavour::MissingImport,
                    tenant: self.tenant(),
                    policy: self.policy(),
                    spec_name: None,
                    deletion,
                    import: Some(Import::Missing(uuid)),
                    new_source: None,
                }
            }
            86..=92 if !self.sources.is_empty() => {
                let src = self.sources[self.rng.random_range(0..self.sources.len())].clone();
                let import = self.by_uuid_or_backend_id(src.id);
                CreateSpec {
                    res,
                    flavour: Flavour::DuplicateImport,
                    tenant: src.tenant,
                    policy: src.policy,
                    spec_name: None,
                    deletion: Deletion::Orphan,
                    import: Some(import),
                    new_source: None,
                }
            }
            93.. if !self.foreign.is_empty() => {
                let (name, tenant, theirs) =
                    self.foreign[self.rng.random_range(0..self.foreign.len())].clone();
                // Half the time the policy matches too: only the creation time then tells
                // the resource's own group from the one someone else holds.
                let policy = if self.rng.random_bool(0.5) {
                    theirs
                } else {
                    self.policy()
                };
                CreateSpec {
                    res,
                    flavour: Flavour::Clash,
                    tenant,
                    policy,
                    spec_name: Some(name),
                    deletion,
                    import: None,
                    new_source: None,
                }
            }
            _ => return self.plain(index),
        };
        self.remember(&c);
        c
    }

    fn twins(&mut self, index: usize) -> Action {
        let first = self.rng.random_range(0..NAMESPACES.len());
        let second = (first + self.rng.random_range(1..NAMESPACES.len())) % NAMESPACES.len();
        let tenant = self.tenant();
        let policy = self.policy();
        let make = |ns: &'static str, suffix: &str, deletion: Deletion| CreateSpec {
            res: ResId {
                ns,
                name: format!("r{index:03}{suffix}"),
            },
            flavour: Flavour::Twin,
            tenant,
            policy,
            spec_name: Some(format!("tw{index:03}")),
            deletion,
            import: None,
            new_source: None,
        };
        let (da, db) = (self.deletion(), self.deletion());
        let a = make(NAMESPACES[first], "a", da);
        let b = make(NAMESPACES[second], "b", db);
        self.remember(&a);
        self.remember(&b);
        Action::CreateTwins(a, b)
    }

    fn target(&mut self) -> Option<ResId> {
        if self.live.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..self.live.len());
        Some(self.live[i].res.clone())
    }

    fn set_policy(&mut self) -> Option<Action> {
        // Duplicate imports stay Orphan: their deletion must never decide the source's fate.
        let candidates: Vec<usize> = (0..self.live.len())
            .filter(|i| self.live[*i].flavour != Flavour::DuplicateImport)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let i = candidates[self.rng.random_range(0..candidates.len())];
        let res = self.live[i].res.clone();
        let to = self.deletion();
        if let Some(c) = self.created.iter_mut().find(|c| c.res == res) {
            c.deletion = to;
        }
        Some(Action::SetDeletionPolicy { res, to })
    }

    fn pause(&mut self, pause: bool) -> Option<Action> {
        let candidates: Vec<usize> = (0..self.live.len())
            .filter(|i| self.live[*i].paused != pause)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let i = candidates[self.rng.random_range(0..candidates.len())];
        self.live[i].paused = pause;
        let res = self.live[i].res.clone();
        Some(if pause {
            Action::Pause { res }
        } else {
            Action::Unpause { res }
        })
    }

    fn delete(&mut self) -> Action {
        let i = self.rng.random_range(0..self.live.len());
        let gone = self.live.remove(i);
        self.left_behind(&gone.res);
        Action::Delete { res: gone.res }
    }

    /// Deletes a live resource of namespace `ns`, if there is one.
    fn delete_in(&mut self, ns: &str) -> Option<ResId> {
        let candidates: Vec<usize> = (0..self.live.len())
            .filter(|i| self.live[*i].res.ns == ns)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let i = candidates[self.rng.random_range(0..candidates.len())];
        let gone = self.live.remove(i);
        self.left_behind(&gone.res);
        Some(gone.res)
    }

    /// A deleted resource's group that stays behind (Orphan) or comes back at a re-sync
    /// (Unlink) is someone else's from then on: a clash may take its name.
    fn left_behind(&mut self, res: &ResId) {
        if let Some(c) = self.created.iter().find(|c| &c.res == res)
            && c.flavour.creates()
            && c.deletion != Deletion::Delete
        {
            self.foreign.push((c.waldur_name(), c.tenant, c.policy));
        }
    }

    /// A live resource whose group the operator creates (so a vanished group is waited for
    /// and re-synced, not reported NotFound), if any.
    fn creating_target(&mut self) -> Option<ResId> {
        let candidates: Vec<usize> = (0..self.live.len())
            .filter(|i| self.live[*i].flavour.creates())
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let i = candidates[self.rng.random_range(0..candidates.len())];
        Some(self.live[i].res.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_draws_the_same_plan() {
        let a = draw(7, 200, 12);
        let b = draw(7, 200, 12);
        assert_eq!(a.points, b.points);
        let c = draw(8, 200, 12);
        assert_ne!(a.points, c.points, "another seed, another plan");
    }

    #[test]
    fn reshards_are_drawn_only_when_asked_and_leave_other_plans_alone() {
        let plain = draw(7, 300, 12);
        assert_eq!(plain.points, draw_with(7, 300, 12, false).points);
        assert!(
            !plain
                .points
                .iter()
                .any(|p| matches!(p.action, Action::Reshard { .. }))
        );
        let sharded = draw_with(7, 300, 12, true);
        let targets: std::collections::BTreeSet<usize> = sharded
            .points
            .iter()
            .filter_map(|p| match p.action {
                Action::Reshard { to, .. } => Some(to),
                _ => None,
            })
            .collect();
        assert_eq!(
            targets,
            (1..=4).collect(),
            "every shard count from 1 to 4 is rolled out"
        );
    }

    #[test]
    fn plans_respect_the_live_limit_and_target_only_live_resources() {
        for seed in 0..20 {
            let plan = draw(seed, 300, 6);
            let mut live: Vec<ResId> = Vec::new();
            let mut paused: Vec<ResId> = Vec::new();
            for p in &plan.points {
                for c in p.action.creates() {
                    assert!(!live.contains(&c.res), "seed {seed}: {} twice", c.res);
                    live.push(c.res.clone());
                }
                assert!(
                    live.len() <= 6,
                    "seed {seed} point {}: {}",
                    p.index,
                    live.len()
                );
                match &p.action {
                    Action::Delete { res }
                    | Action::UnlinkThenDelete { res }
                    | Action::DeleteTransitional { res, .. }
                    | Action::Credentials {
                        delete: Some(res), ..
                    } => {
                        assert!(live.contains(res), "seed {seed}: delete of {res}");
                        live.retain(|r| r != res);
                        paused.retain(|r| r != res);
                    }
                    Action::CreateThenDelete { create, .. } => {
                        live.retain(|r| r != &create.res);
                    }
                    Action::TenantPullFault { res: Some(res), .. }
                    | Action::OneObject500 {
                        target: OneObject::Pull { res, .. },
                        ..
                    } => {
                        assert!(
                            live.contains(res),
                            "seed {seed}: {} of {res}",
                            p.action.kind()
                        );
                    }
                    Action::Pause { res } => {
                        assert!(live.contains(res) && !paused.contains(res));
                        paused.push(res.clone());
                    }
                    Action::Unpause { res } => {
                        assert!(paused.contains(res));
                        paused.retain(|r| r != res);
                    }
                    Action::SetDeletionPolicy { res, .. }
                    | Action::RequestPull { res, .. }
                    | Action::OobOpenstackDelete { res }
                    | Action::OobWaldurDelete { res }
                    | Action::OobUnlink { res } => {
                        assert!(
                            live.contains(res),
                            "seed {seed}: {} of {res}",
                            p.action.kind()
                        );
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn a_long_plan_draws_every_kind_of_point() {
        let plan = draw(1, 2000, 12);
        let kinds: std::collections::BTreeSet<&str> =
            plan.points.iter().map(|p| p.action.kind()).collect();
        for k in [
            "create",
            "create-twins",
            "set-deletion-policy",
            "pause",
            "unpause",
            "request-pull",
            "delete",
            "kill",
            "kill-after-commit",
            "5xx-burst",
            "drop-connections",
            "timeouts",
            "delayed-201",
            "commit-then-drop",
            "outage-503",
            "outage-refused",
            "resync",
            "oob-openstack-delete",
            "oob-waldur-delete",
            "oob-unlink",
            "create-erred",
            "409-conflicts",
            "expire-watches",
            "compact-410",
            "watch-delay",
            "sigterm",
            "twins-lost-create",
            "tenant-pull-late",
            "tenant-pull-never",
            "tenant-erred",
            "unlink-then-delete",
            "delete-transitional",
            "create-then-delete",
            "one-object-500",
            "clock-skew",
        ] {
            assert!(kinds.contains(k), "no {k} in {kinds:?}");
        }
        let flavours: std::collections::BTreeSet<&str> = plan
            .points
            .iter()
            .flat_map(|p| p.action.creates())
            .map(|c| c.flavour.as_str())
            .collect();
        assert_eq!(flavours.len(), 7, "{flavours:?}");
    }
}
