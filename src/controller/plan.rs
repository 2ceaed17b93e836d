//! Pure decisions: from (spec, status, what Waldur answered) to the next thing to do.
//!
//! Nothing here performs I/O or reads a clock; `reconcile` carries the answers out. That keeps
//! every rule of the design's reconcile steps table-testable.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::conditions::synced_reason;
use crate::api::{
    CreateIntent, DeletionPolicy, HandledRequests, ManagementPolicy, READY, SYNCED, ServerGroup,
    ServerGroupStatus, ready_reason,
};
use crate::waldur::{Policy, ServerGroup as WaldurGroup, State, WaldurUuid};

/// Operator-wide settings that shape decisions.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often a settled group is re-read, unless the resource sets its own.
    pub resync_period: Duration,
    /// Pull settled groups this often; `None` leaves it to Waldur's own 2-hourly re-sync.
    pub pull_interval: Option<Duration>,
    /// How long a vanished group is waited for when no evidence can be had (automatic tenant
    /// re-syncs off, refused, or the tenant's state unreadable): longer than Waldur's own
    /// periodic re-sync (every 2 hours) and its lateness, so that a group Waldur re-imports is
    /// back before a new one is made.
    pub reimport_wait: Duration,
    /// Whether the operator asks Waldur for tenant re-syncs by itself (after an unlink, and
    /// before deleting an ERRED group). Each holds the whole tenant while it runs, and a failed
    /// one leaves the tenant Erred for every user.
    pub tenant_pulls: bool,
    /// The least time between two tenant re-syncs this operator asks for in one tenant.
    pub tenant_pull_floor: Duration,
}

impl Settings {
    /// Waldur's periodic re-sync runs every 2 hours; one more hour covers a late one.
    pub const DEFAULT_REIMPORT_WAIT: Duration = Duration::from_secs(3 * 3600);
    pub const DEFAULT_TENANT_PULL_FLOOR: Duration = Duration::from_secs(300);
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            resync_period: Duration::from_secs(600),
            pull_interval: None,
            reimport_wait: Self::DEFAULT_REIMPORT_WAIT,
            tenant_pulls: true,
            tenant_pull_floor: Self::DEFAULT_TENANT_PULL_FLOOR,
        }
    }
}

/// How Waldur is asked where the group is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// GET by UUID.
    Uuid(WaldurUuid),
    /// List with `backend_id=` (an import by backend id, or a rebind after a re-import).
    BackendId(String),
    /// List the tenant's groups with this exact name: the group this resource may have created
    /// before a crash lost the status write.
    OwnCreation {
        tenant: WaldurUuid,
        name: String,
        policy: Policy,
    },
}

/// What to do once a lookup came back empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// Ask again another way.
    Lookup(Lookup),
    /// Create the group; `recreate` when a group this resource had is gone.
    Create { recreate: bool },
    /// Report `Ready=False NotFound`: imported and observed groups are never created.
    NotFound,
    /// The group's UUID and Nova id are both unknown to Waldur, but OpenStack may still hold
    /// it (an unlink): Waldur re-imports it only on a tenant re-sync, under a new UUID. Making
    /// a new group before that is known not to happen would leave two in OpenStack (review
    /// M2), so learn what the tenant's re-sync did first ([`reimport_step`]).
    AwaitReimport {
        tenant: WaldurUuid,
        /// Empty when the group vanished before Waldur reported its Nova id: it is then looked
        /// for by name.
        backend_id: String,
    },
}

/// A spec the controller cannot act on. The CRD's rules keep these out; an older CRD or an
/// object written around the API server's validation can still carry them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecProblem {
    #[error("spec.tenant and spec.policy are required unless spec.import is set")]
    MissingTenantOrPolicy,
    #[error("spec.tenant: {0}")]
    BadTenant(String),
    #[error("spec.import.uuid: {0}")]
    BadImportUuid(String),
    #[error("spec.import must name exactly one of uuid or backendId")]
    BadImport,
}

/// The first place to look for the resource's group.
pub fn first_lookup(sg: &ServerGroup) -> Result<Lookup, SpecProblem> {
    let status_uuid = sg
        .status
        .as_ref()
        .and_then(|s| s.uuid.as_deref())
        .and_then(|u| WaldurUuid::parse(u).ok());
    if let Some(uuid) = status_uuid {
        return Ok(Lookup::Uuid(uuid));
    }
    if let Some(import) = &sg.spec.import {
        return match (&import.uuid, &import.backend_id) {
            (Some(u), None) => WaldurUuid::parse(u)
                .map(Lookup::Uuid)
                .map_err(|e| SpecProblem::BadImportUuid(e.to_string())),
            (None, Some(b)) => Ok(Lookup::BackendId(b.clone())),
            _ => Err(SpecProblem::BadImport),
        };
    }
    first_lookup_for_create(sg)
}

/// Where a group this resource created would be: its tenant, under its name.
pub fn first_lookup_for_create(sg: &ServerGroup) -> Result<Lookup, SpecProblem> {
    let (Some(tenant), Some(policy)) = (&sg.spec.tenant, sg.spec.policy) else {
        return Err(SpecProblem::MissingTenantOrPolicy);
    };
    let tenant = WaldurUuid::parse(tenant).map_err(|e| SpecProblem::BadTenant(e.to_string()))?;
    Ok(Lookup::OwnCreation {
        tenant,
        name: sg.waldur_name(),
        policy,
    })
}

/// The next step after `lookup` found nothing. `deleting`: the resource is being deleted, so
/// nothing is created, but a group that may come back is still waited for (review N2).
pub fn after_missing(
    sg: &ServerGroup,
    lookup: &Lookup,
    deleting: bool,
) -> Result<Missing, SpecProblem> {
    let managed = sg.spec.management_policy == ManagementPolicy::Managed;
    let imported = sg.spec.import.is_some();
    let status = sg.status.as_ref();
    let known_backend_id = status
        .and_then(|s| s.backend_id.as_deref())
        .filter(|b| !b.is_empty());
    let had_uuid = status.and_then(|s| s.uuid.as_ref()).is_some();
    let last_state = status.and_then(|s| s.state.as_deref()).map(State::parse);
    // Last seen on its way out (this resource's own DELETE, or Waldur's): a 404 now means
    // Waldur deleted it, in OpenStack too (a failed delete leaves the row ERRED instead).
    let deleted = matches!(last_state, Some(State::DeletionScheduled | State::Deleting));
    // A group last seen while Waldur was still creating it may have got a Nova group since,
    // which this resource never saw: it too may come back, by name.
    let maybe_in_openstack_unseen = had_uuid
        && known_backend_id.is_none()
        && matches!(last_state, Some(State::CreationScheduled | State::Creating));
    // Deleting with the Delete policy: the group must be found to be deleted, whatever
    // brought it here. Unlink wants Waldur's record gone, and it is.
    let may_come_back_for = managed
        && !deleted
        && if deleting {
            sg.spec.deletion_policy == DeletionPolicy::Delete
        } else {
            !imported
        };
    let await_reimport = |backend_id: &str| -> Result<Missing, SpecProblem> {
        let Some(tenant) = sg.spec.tenant.as_deref() else {
            return Ok(Missing::NotFound);
        };
        Ok(Missing::AwaitReimport {
            tenant: WaldurUuid::parse(tenant).map_err(|e| SpecProblem::BadTenant(e.to_string()))?,
            backend_id: backend_id.to_string(),
        })
    };
    match lookup {
        // Waldur re-imports a group that survived in OpenStack under a new UUID: find it
        // by its Nova id before concluding it is gone.
        Lookup::Uuid(_) if had_uuid && known_backend_id.is_some() => Ok(Missing::Lookup(
            Lookup::BackendId(known_backend_id.unwrap_or_default().to_string()),
        )),
        Lookup::BackendId(backend_id)
            if had_uuid && known_backend_id == Some(backend_id) && may_come_back_for =>
        {
            await_reimport(backend_id)
        }
        Lookup::Uuid(_) if maybe_in_openstack_unseen && may_come_back_for => await_reimport(""),
        _ if imported || !managed || deleting => Ok(Missing::NotFound),
        Lookup::Uuid(_) | Lookup::BackendId(_) => Ok(Missing::Create { recreate: had_uuid }),
        Lookup::OwnCreation { .. } => Ok(Missing::Create { recreate: false }),
    }
}

/// What the operator saw of the group's tenant in this reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantSeen {
    /// OK: Waldur runs tenant actions, and no re-sync of it is pending.
    Ok,
    /// Held by a tenant action (Update Scheduled, Updating...): a re-sync is pending or running.
    Busy(String),
    /// Erred: every tenant action is refused until it is repaired. Waldur's message.
    Erred(String),
    /// These credentials cannot see the tenant (404).
    Invisible,
    /// Its state could not be read (an older Waldur, a malformed answer).
    Unknown,
}

impl TenantSeen {
    pub fn of(state: Option<&State>, error_message: &str) -> Self {
        match state {
            Some(State::Ok) => Self::Ok,
            Some(State::Erred) => Self::Erred(error_message.to_string()),
            Some(other) => Self::Busy(other.to_string()),
            None => Self::Unknown,
        }
    }
}

/// The tenant re-syncs this process asked for in the group's tenant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantPullsSeen {
    /// The last one Waldur accepted (202).
    pub last_accepted: Option<Timestamp>,
    /// The last one asked for, accepted or not: the floor counts from it.
    pub last_asked: Option<Timestamp>,
}

/// The next step for a group that vanished and may come back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReimportStep {
    /// Ask Waldur to re-sync the tenant now.
    AskPull,
    /// A re-sync that started after the group vanished has finished (the tenant is back to
    /// OK): look for the group once more; if it is still absent, it is gone for good.
    Recheck,
    /// Gone for good without a re-sync to show it: the safe wait passed, or the user asked.
    Gone(String),
    /// Nothing to learn yet: look again after `retry_in`.
    Wait { message: String, retry_in: Duration },
    /// The tenant is Erred (Waldur's message in `message`).
    TenantErred { message: String, retry_in: Duration },
}

/// Decides, on evidence, whether a vanished group may still come back (review M2 and E2): only
/// a tenant re-sync that started after the disappearance and finished without bringing it back
/// shows it will not, or a wait longer than Waldur's own periodic re-sync when no such re-sync
/// can be had. Never a fixed time after a request. Returns the step, and the accepted re-sync
/// the evidence rests on (to record in status).
pub fn reimport_step(
    sg: &ServerGroup,
    reimport: &crate::api::Reimport,
    tenant: &TenantSeen,
    pulls: TenantPullsSeen,
    settings: &Settings,
    now: Timestamp,
) -> (ReimportStep, Option<Timestamp>) {
    let since = reimport.since().map_or(now, |t| t.0);
    // A re-sync accepted after the group vanished re-imports it if OpenStack has it: the one
    // this resource asked for, or one another resource of this process asked for since. The
    // stored time is cut to whole seconds, so another's request must be a second later to be
    // surely after (found by the reconcile tests: a request 0.4 s before counted).
    let surely_after = since
        .checked_add(SignedDuration::from_secs(1))
        .unwrap_or(since);
    let accepted = reimport
        .requested_at
        .as_ref()
        .map(|t| t.0)
        .or(pulls.last_accepted.filter(|t| *t >= surely_after));
    let waited = now.duration_since(since).unsigned_abs();
    let safe_wait_left = settings.reimport_wait.saturating_sub(waited);
    let poll =
        |elapsed: Duration| (elapsed / 4).clamp(Duration::from_secs(2), Duration::from_secs(60));
    let step = match (tenant, accepted) {
        (TenantSeen::Erred(message), _) => ReimportStep::TenantErred {
            message: tenant_erred_message(sg, message),
            retry_in: settings.resync_period.min(Duration::from_secs(300)),
        },
        // The tenant was held when Waldur accepted the re-sync; back to OK means it ran.
        (TenantSeen::Ok, Some(_)) => ReimportStep::Recheck,
        (TenantSeen::Busy(state), Some(at)) => ReimportStep::Wait {
            message: format!(
                "Waldur is re-syncing the tenant ({state}); the group is looked for again when it \
                 is done"
            ),
            retry_in: poll(now.duration_since(at).unsigned_abs()),
        },
        (TenantSeen::Busy(state), None) => ReimportStep::Wait {
            message: format!(
                "the tenant is busy ({state}); a re-sync is asked for once it is OK again"
            ),
            retry_in: Duration::from_secs(15),
        },
        (TenantSeen::Ok, None) if settings.tenant_pulls => {
            let next = pulls.last_asked.map(|t| {
                settings
                    .tenant_pull_floor
                    .saturating_sub(now.duration_since(t).unsigned_abs())
            });
            match next {
                Some(left) if !left.is_zero() => ReimportStep::Wait {
                    message: format!(
                        "a re-sync of the tenant was asked for {:?} ago; the next may be asked \
                         for in {left:?}",
                        settings.tenant_pull_floor.saturating_sub(left)
                    ),
                    retry_in: left,
                },
                _ => ReimportStep::AskPull,
            }
        }
        // No re-sync can be asked for or seen: only Waldur's periodic one remains.
        _ if safe_wait_left.is_zero() => ReimportStep::Gone(format!(
            "not back {waited:?} after it vanished, longer than Waldur's periodic re-sync \
             (--reimport-wait {:?})",
            settings.reimport_wait
        )),
        (TenantSeen::Invisible, _) => ReimportStep::Wait {
            message: format!(
                "these credentials cannot see the tenant, so its re-sync cannot be followed; \
                 waiting for Waldur's periodic re-sync ({safe_wait_left:?} left)"
            ),
            retry_in: settings.resync_period.min(safe_wait_left),
        },
        _ => ReimportStep::Wait {
            message: format!(
                "waiting for Waldur's periodic re-sync to bring it back ({safe_wait_left:?} left \
                 of --reimport-wait; set the openstack.waldur.com/request-recreate annotation to \
                 make a new group now)"
            ),
            retry_in: settings.resync_period.min(safe_wait_left),
        },
    };
    // The user knows the group is gone: make a new one now.
    let step = match (&step, new_recreate_token(sg)) {
        (ReimportStep::Wait { .. } | ReimportStep::AskPull, Some(token)) => {
            ReimportStep::Gone(format!(
                "requested by the openstack.waldur.com/request-recreate annotation (token {token})"
            ))
        }
        _ => step,
    };
    (step, accepted)
}

/// Whether the operator may ask for a tenant re-sync now: automatic re-syncs on, the tenant
/// seen OK (never while it is held or Erred), and the floor passed since the last one asked for.
pub fn tenant_pull_due(
    settings: &Settings,
    pulls: TenantPullsSeen,
    tenant: &TenantSeen,
    now: Timestamp,
) -> bool {
    settings.tenant_pulls
        && *tenant == TenantSeen::Ok
        && pulls
            .last_asked
            .is_none_or(|t| now.duration_since(t).unsigned_abs() >= settings.tenant_pull_floor)
}

/// A `request-recreate` token not yet acted on.
pub fn new_recreate_token(sg: &ServerGroup) -> Option<String> {
    let done = sg
        .status
        .as_ref()
        .and_then(|s| s.handled_requests.as_ref())
        .and_then(|h| h.recreate.clone());
    sg.annotation(crate::api::ANNOTATION_REQUEST_RECREATE)
        .map(str::trim)
        .filter(|t| !t.is_empty() && Some(*t) != done.as_deref())
        .map(str::to_string)
}

/// What a user reads on a resource whose tenant is Erred.
pub fn tenant_erred_message(sg: &ServerGroup, waldur_message: &str) -> String {
    let tenant = sg.spec.tenant.as_deref().unwrap_or("?");
    let why = if waldur_message.is_empty() {
        "no message".to_string()
    } else {
        waldur_message.to_string()
    };
    format!(
        "tenant {tenant} is Erred in Waldur ({why}): Waldur refuses every tenant action, creating \
         server groups included, for every user until the tenant is repaired: a staff user pulls \
         the tenant in Waldur (or sets it OK), or Waldur's periodic background pull recovers it"
    )
}

/// Waldur's 400 for a create whose name the tenant already has ("Server group name should
/// be unique."): not a bad spec when the group is this resource's own lost create.
pub fn name_taken(error: &crate::waldur::WaldurError) -> bool {
    match error {
        crate::waldur::WaldurError::Invalid { messages, .. } => messages.0.iter().any(|m| {
            m.message
                .to_ascii_lowercase()
                .contains("name should be unique")
        }),
        _ => false,
    }
}

/// Waldur's clock may be this far behind the operator's when a create intent's time is
/// compared with a group's `created` (the campaign's ±5 s Waldur clock, with room).
pub const INTENT_CLOCK_SLACK: SignedDuration = SignedDuration::from_secs(30);

/// The create intent that still stands: recorded for this tenant and name, and no group bound
/// since (the intent of a recreate names the UUID it replaces).
pub fn pending_intent(sg: &ServerGroup) -> Option<CreateIntent> {
    let intent = sg.create_intent()?;
    let Lookup::OwnCreation { tenant, name, .. } = first_lookup_for_create(sg).ok()? else {
        return None;
    };
    let bound = sg
        .status
        .as_ref()
        .and_then(|s| s.uuid.as_deref())
        .and_then(|u| WaldurUuid::parse(u).ok());
    let replaces = WaldurUuid::parse(&intent.replaces).ok();
    let same_target =
        WaldurUuid::parse(&intent.tenant).ok().as_ref() == Some(&tenant) && intent.name == name;
    (same_target && replaces == bound).then_some(intent)
}

/// The intent to record before a create: the pending one kept (an earlier create of this
/// resource may have made the group and lost its answer, so its time and the groups it saw
/// stay), else a fresh one. `fresh` says no earlier create can be this resource's.
pub fn intent_for_create(
    sg: &ServerGroup,
    tenant: &WaldurUuid,
    name: &str,
    seen: &[WaldurUuid],
    now: Timestamp,
) -> (CreateIntent, bool) {
    let mut foreign: Vec<String> = seen.iter().map(|u| u.to_string()).collect();
    if let Some(mut kept) = pending_intent(sg) {
        for uuid in foreign {
            if !kept.foreign.contains(&uuid) {
                kept.foreign.push(uuid);
            }
        }
        return (kept, false);
    }
    foreign.sort();
    foreign.dedup();
    let intent = CreateIntent {
        tenant: tenant.to_string(),
        name: name.to_string(),
        at: now.to_string(),
        replaces: sg
            .status
            .as_ref()
            .and_then(|s| s.uuid.clone())
            .unwrap_or_default(),
        foreign,
    };
    (intent, true)
}

/// Which of the listed groups is the one this resource created.
///
/// Only a resource with a create intent standing asked Waldur to create (the intent is written
/// before every create): without one, no group is its own, however young and well named. A
/// twin (same tenant and name) would otherwise take the group its sibling's lost create made
/// (the fault campaign's R6); and a resource told AlreadyManaged or InvalidSpec never disowns
/// its own later create (review N3). With one: a group of the name and policy that was not
/// there when the create was decided, made no earlier than the intent less Waldur's clock
/// slack, the oldest first. A group whose creation time is missing or unreadable is never
/// taken for its own.
pub fn pick_own_creation<'a>(
    sg: &ServerGroup,
    candidates: &'a [WaldurGroup],
    policy: Policy,
) -> Option<&'a WaldurGroup> {
    let intent = pending_intent(sg)?;
    let not_before = intent
        .at
        .parse::<Timestamp>()
        .ok()?
        .checked_sub(INTENT_CLOCK_SLACK)
        .ok()?;
    let mut fitting: Vec<(Timestamp, &WaldurGroup)> = candidates
        .iter()
        .filter(|g| g.policy == policy.as_str())
        .filter(|g| !intent.foreign.iter().any(|f| f == g.uuid.as_str()))
        .filter_map(|g| Some((g.created.parse::<Timestamp>().ok()?, g)))
        .filter(|(created, _)| *created >= not_before)
        .collect();
    fitting.sort_by_key(|(created, _)| *created);
    fitting.into_iter().next().map(|(_, g)| g)
}

/// What a deleted resource needs next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// Nothing (more) to do in Waldur: drop the finalizer.
    Release { reason: &'static str },
    /// Find the group first.
    Locate,
    /// Send DELETE.
    Delete(WaldurUuid),
    /// Send unlink.
    Unlink(WaldurUuid),
    /// Waldur is working on it (deleting, or busy with another operation): look again soon.
    Wait { state: String },
    /// ERRED with a Nova group: a DELETE now would make Waldur drop its record even when
    /// OpenStack keeps the group. Learn what OpenStack holds first, and delete once the group
    /// is OK: the first attempt pulls the group (Waldur's recovery path); later ones, with
    /// `tenant` set, ask for the tenant's re-sync instead, which also drops the record when the
    /// Nova group is really gone (a pull leaves such a group ERRED, and a re-sync skips a
    /// group that is busy being pulled).
    PullFirst {
        uuid: WaldurUuid,
        attempt: u32,
        tenant: Option<WaldurUuid>,
    },
    /// Still ERRED after pulling: OpenStack may hold the group. Pull again after `retry_in`;
    /// meanwhile the finalizer stays and status says why.
    Held {
        message: String,
        attempts: u32,
        retry_in: Duration,
    },
}

/// Pulls of an ERRED group that is being deleted: 10 s, doubling, at most 10 minutes apart.
pub fn delete_pull_backoff(attempts: u32) -> Duration {
    Duration::from_secs(10)
        .saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1).min(16)))
        .min(Duration::from_secs(600))
}

/// The deletion policy applied to what is known of the group. `observed` is `None` before a
/// lookup and `Some(None)` when Waldur no longer has the group.
pub fn cleanup(
    sg: &ServerGroup,
    observed: Option<Option<&WaldurGroup>>,
    now: Timestamp,
) -> Cleanup {
    if sg.spec.management_policy == ManagementPolicy::Observe {
        return Cleanup::Release {
            reason: "observed groups are never deleted in Waldur",
        };
    }
    match sg.spec.deletion_policy {
        DeletionPolicy::Orphan => Cleanup::Release {
            reason: "deletionPolicy is Orphan: the group stays in Waldur",
        },
        policy => match observed {
            None => Cleanup::Locate,
            Some(None) => Cleanup::Release {
                reason: "the group is gone from Waldur",
            },
            Some(Some(group)) => {
                let state = group.state.clone().unwrap_or(State::Unknown(String::new()));
                match (policy, &state) {
                    // Unlink works from any state: it is the tool for stuck groups.
                    (DeletionPolicy::Unlink, _) => Cleanup::Unlink(group.uuid.clone()),
                    (_, State::Erred) if !group.backend_id.is_empty() => {
                        erred_cleanup(sg, group, now)
                    }
                    (_, State::Ok | State::Erred) => Cleanup::Delete(group.uuid.clone()),
                    _ => Cleanup::Wait {
                        state: state.to_string(),
                    },
                }
            }
        },
    }
}

/// An ERRED group with a Nova group, being deleted: pull it when a pull is due, else hold.
fn erred_cleanup(sg: &ServerGroup, group: &WaldurGroup, now: Timestamp) -> Cleanup {
    let pulled = sg.status.as_ref().and_then(|s| s.auto_pull.as_ref());
    let attempts = pulled.map_or(0, |a| a.attempts);
    let wait = delete_pull_backoff(attempts);
    if due(pulled.map(|a| a.last_time.0), wait, now) {
        let tenant = Some(group.tenant_uuid.clone())
            .filter(|t| !t.is_empty())
            .or_else(|| {
                sg.spec
                    .tenant
                    .as_deref()
                    .and_then(|t| WaldurUuid::parse(t).ok())
            });
        return Cleanup::PullFirst {
            uuid: group.uuid.clone(),
            attempt: attempts + 1,
            tenant: tenant.filter(|_| attempts >= 1),
        };
    }
    let error = if group.error_message.is_empty() {
        "no message".to_string()
    } else {
        group.error_message.clone()
    };
    Cleanup::Held {
        message: format!(
            "Waldur could not finish with the group ({error}); it is ERRED and OpenStack may \
             still hold Nova group {}, so it is not deleted from ERRED (Waldur would drop its \
             record and leave the Nova group behind). Pulled {attempts} time(s) to bring it back \
             to OK and delete it then; the finalizer stays until the group is OK (then deleted) \
             or gone from Waldur. To give up on it, set deletionPolicy to Orphan or Unlink.",
            group.backend_id
        ),
        attempts,
        retry_in: wait,
    }
}

/// A Waldur write asked for by an annotation or by the recovery rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FollowUp {
    /// `request-pull` with a token not yet acted on.
    RequestedPull { token: String },
    /// `request-set-ok` with a new token.
    SetOk { token: String },
    /// `request-set-erred` with a new token.
    SetErred { token: String },
    /// Pull an ERRED group that has a backend id: Waldur's own recovery path.
    RecoveryPull { attempt: u32 },
    /// `--pull-interval` is due for a settled group.
    PeriodicPull,
}

/// The Waldur writes due now for an observed group, in the order to run them.
pub fn follow_ups(
    sg: &ServerGroup,
    group: &WaldurGroup,
    settings: &Settings,
    now: Timestamp,
) -> Vec<FollowUp> {
    if sg.spec.management_policy == ManagementPolicy::Observe {
        return vec![];
    }
    let status = sg.status.clone().unwrap_or_default();
    let handled = status
        .handled_requests
        .as_deref()
        .cloned()
        .unwrap_or_default();
    // Tokens present when the resource first binds a group were written before there was a
    // group to act on: a manifest re-applied from Git, or a group made a moment ago. They are
    // recorded as handled (see `tokens_at_first_binding`), never run (review m2).
    let first_binding = status.uuid.is_none();
    let new_token = |key: &str, done: &Option<String>| {
        sg.annotation(key)
            .map(str::trim)
            .filter(|t| !first_binding && !t.is_empty() && Some(*t) != done.as_deref())
            .map(str::to_string)
    };
    let state = group.state.clone().unwrap_or(State::Unknown(String::new()));
    let mut out = Vec::new();
    let mut pulling = false;
    // A pull is refused (409) while Waldur is busy: keep the request until it can run.
    if let Some(token) = new_token(crate::api::ANNOTATION_REQUEST_PULL, &handled.pull)
        && state.is_settled()
    {
        out.push(FollowUp::RequestedPull { token });
        pulling = true;
    }
    if !pulling && state == State::Erred && !group.backend_id.is_empty() {
        let attempts = status.auto_pull.as_ref().map_or(0, |a| a.attempts);
        let last = status.auto_pull.as_ref().map(|a| a.last_time.0);
        if due(
            last,
            recovery_backoff(resync_of(sg, settings), attempts),
            now,
        ) {
            out.push(FollowUp::RecoveryPull {
                attempt: attempts + 1,
            });
            pulling = true;
        }
    }
    if !pulling
        && state == State::Ok
        && let Some(interval) = settings.pull_interval
    {
        let last = status.auto_pull.as_ref().map(|a| a.last_time.0);
        if due(last, interval, now) {
            out.push(FollowUp::PeriodicPull);
        }
    }
    // The staff recovery actions work from any state, so they never wait.
    if let Some(token) = new_token(crate::api::ANNOTATION_REQUEST_SET_OK, &handled.set_ok) {
        out.push(FollowUp::SetOk { token });
    }
    if let Some(token) = new_token(crate::api::ANNOTATION_REQUEST_SET_ERRED, &handled.set_erred) {
        out.push(FollowUp::SetErred { token });
    }
    out
}

/// The request tokens to record as handled when a resource first binds a group: every token
/// present, so only a token changed later asks Waldur for anything.
pub fn tokens_at_first_binding(sg: &ServerGroup) -> Option<HandledRequests> {
    if sg.status.as_ref().and_then(|s| s.uuid.as_ref()).is_some() {
        return None;
    }
    let token = |key: &str| {
        sg.annotation(key)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
    };
    Some(HandledRequests {
        pull: token(crate::api::ANNOTATION_REQUEST_PULL),
        set_ok: token(crate::api::ANNOTATION_REQUEST_SET_OK),
        set_erred: token(crate::api::ANNOTATION_REQUEST_SET_ERRED),
        recreate: token(crate::api::ANNOTATION_REQUEST_RECREATE),
    })
}

fn due(last: Option<Timestamp>, every: Duration, now: Timestamp) -> bool {
    match last {
        None => true,
        Some(last) => SignedDuration::try_from(every)
            .ok()
            .and_then(|d| last.checked_add(d).ok())
            .is_none_or(|next| next <= now),
    }
}

/// Recovery pulls of an ERRED group: at most once per resync period, doubling after each
/// attempt that did not help, up to a day.
pub fn recovery_backoff(resync: Duration, attempts: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
    resync
        .saturating_mul(factor)
        .min(Duration::from_secs(24 * 3600))
}

/// The resource's resync period, or the operator's default when unset or unreadable. A period
/// below the floor (stored before the CRD had its rule) counts as the floor.
pub fn resync_of(sg: &ServerGroup, settings: &Settings) -> Duration {
    sg.spec
        .resync_period
        .as_deref()
        .and_then(parse_duration)
        .filter(|d| !d.is_zero())
        .map(|d| d.max(crate::api::MIN_RESYNC_PERIOD))
        .unwrap_or(settings.resync_period)
}

/// Parses `90s`, `10m`, `1h30m`, `500ms`: the forms the CRD's pattern admits.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return None;
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(n).ok()?)?)?;
        rest = &rest[len..];
    }
    Some(total)
}

/// The `Ready` condition for an observed Waldur state: (is ready, reason, message).
pub fn readiness(group: &WaldurGroup) -> (bool, &'static str, String) {
    match group.state.clone().unwrap_or(State::Unknown(String::new())) {
        State::Ok => (
            true,
            ready_reason::AVAILABLE,
            "the group is OK in Waldur".into(),
        ),
        State::CreationScheduled | State::Creating => (
            false,
            ready_reason::CREATING,
            "Waldur is creating the group in OpenStack".into(),
        ),
        State::UpdateScheduled | State::Updating => (
            false,
            ready_reason::UPDATING,
            "Waldur is updating the group from OpenStack".into(),
        ),
        State::DeletionScheduled | State::Deleting => (
            false,
            ready_reason::DELETING,
            "Waldur is deleting the group".into(),
        ),
        State::Erred => (
            false,
            ready_reason::ERRED,
            if group.error_message.is_empty() {
                "Waldur reports the group as ERRED without a message".into()
            } else {
                group.error_message.clone()
            },
        ),
        State::Unknown(label) => (
            false,
            ready_reason::UNKNOWN,
            format!("Waldur reports an unknown state {label:?}"),
        ),
    }
}

/// Recovery pulls that left an ERRED group ERRED before it counts as stalled. The first pull
/// goes at once and the second one resync period later, so a group stays ERRED through one
/// whole period of Waldur's own recovery before GitOps tools are told it failed.
pub const STALLED_AFTER_PULLS: u32 = 2;

/// Why the resource is stalled (the `Stalled` condition's reason and message), or `None` while
/// it can still make progress by itself. `status` is the status about to be written.
pub fn stalled(sg: &ServerGroup, status: &ServerGroupStatus) -> Option<(&'static str, String)> {
    if sg.metadata.deletion_timestamp.is_some() || sg.is_paused() {
        return None;
    }
    let synced = status.conditions.iter().find(|c| c.type_ == SYNCED);
    if let Some(c) = synced.filter(|c| c.reason == synced_reason::DEFAULT_CREDENTIALS_NOT_ALLOWED) {
        // Only a credentialsRef or the admin's flag can change this.
        return Some((
            synced_reason::DEFAULT_CREDENTIALS_NOT_ALLOWED,
            c.message.clone(),
        ));
    }
    let ready = status.conditions.iter().find(|c| c.type_ == READY)?;
    let why = |what: &str| match ready.message.as_str() {
        "" => what.to_string(),
        words => format!("{what}: {words}"),
    };
    match ready.reason.as_str() {
        ready_reason::INVALID_SPEC => Some((
            ready_reason::INVALID_SPEC,
            why("Waldur refused this spec; change the spec"),
        )),
        ready_reason::ALREADY_MANAGED => Some((
            ready_reason::ALREADY_MANAGED,
            why(
                "another ServerGroup owns this Waldur group; import another group or delete one of them",
            ),
        )),
        ready_reason::NOT_FOUND => Some((
            ready_reason::NOT_FOUND,
            why(
                "the group to import or observe is not in Waldur; fix spec.import or create the group",
            ),
        )),
        ready_reason::ERRED => {
            let observe = sg.spec.management_policy == ManagementPolicy::Observe;
            let no_nova_group = status.backend_id.as_deref().is_none_or(str::is_empty);
            let pulls = status.auto_pull.as_ref().map_or(0, |a| a.attempts);
            let message = if observe {
                why("the observed group is ERRED and this resource never writes to Waldur")
            } else if no_nova_group {
                why(
                    "the group is ERRED and has no OpenStack group to recover from; delete this resource and create it again",
                )
            } else if pulls >= STALLED_AFTER_PULLS {
                why(&format!(
                    "the group is still ERRED after {pulls} recovery pulls; the operator keeps pulling with backoff, and the request-pull or request-set-ok annotation asks again"
                ))
            } else {
                return None;
            };
            Some((ready_reason::ERRED, message))
        }
        _ => None,
    }
}

/// Whether the last attempt for this generation was rejected by Waldur as invalid, in which
/// case the same request must not be sent again until the spec changes.
pub fn rejected_for_this_generation(sg: &ServerGroup) -> bool {
    let Some(status) = &sg.status else {
        return false;
    };
    status.uuid.is_none()
        && status.conditions.iter().any(|c| {
            c.type_ == READY
                && c.reason == ready_reason::INVALID_SPEC
                && c.observed_generation == sg.metadata.generation
        })
}

/// When to look again: soon (backing off) while Waldur is busy, within the resync period when
/// settled: between 90 % and 100 % of it, so the reads spread out and every resource is read
/// at least once per period (the period is a promise, not an average). `busy_for` is how long the group has been transitional;
/// `jitter` is a number in [0, 1) chosen by the caller.
pub fn requeue_after(
    sg: &ServerGroup,
    state: Option<&State>,
    busy_for: Duration,
    settings: &Settings,
    jitter: f64,
) -> Duration {
    match state {
        Some(s) if s.is_transitional() => {
            // 1 s, growing with a quarter of the time spent waiting, capped at 30 s.
            (busy_for / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
        }
        _ => resync_of(sg, settings).mul_f64(0.9 + 0.1 * jitter.clamp(0.0, 1.0)),
    }
}

/// The status fields that mirror the observed group.
pub fn mirror(status: &mut ServerGroupStatus, group: &WaldurGroup) {
    // Bound to a group again: no re-import is awaited.
    status.reimport = None;
    status.uuid = Some(group.uuid.to_string());
    status.url = Some(group.url.clone()).filter(|u| !u.is_empty());
    status.backend_id = Some(group.backend_id.clone());
    status.state = group.state.as_ref().map(|s| s.to_string());
    status.name = Some(group.name.clone());
    status.policy = Some(group.policy.clone());
    // Waldur computes instances from VM records; they mean something once the group is OK.
    let ok = group.state == Some(State::Ok);
    status.instances = if ok {
        group
            .instances
            .iter()
            .map(|i| crate::api::InstanceStatus {
                name: i.name.clone(),
                uuid: i.uuid.to_string(),
                backend_id: i.backend_id.clone(),
            })
            .collect()
    } else {
        vec![]
    };
    status.instance_count = Some(status.instances.len() as i64);
    status.error_message =
        Some(crate::api::conditions::bounded(&group.error_message)).filter(|m| !m.is_empty());
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
