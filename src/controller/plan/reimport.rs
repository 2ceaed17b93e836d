//! A group that vanished and may come back: what the tenant's state and the re-syncs asked
//! for say, decided on evidence and never on a timer alone.

use super::*;

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
    /// How the last accepted one went, as this process followed it.
    pub outcome: Option<PullOutcome>,
}

/// How an accepted tenant re-sync went, followed by reading the tenant once a second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PullOutcome {
    pub accepted: Timestamp,
    pub result: PullResult,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullResult {
    /// Still held (Update Scheduled, Updating).
    Running,
    /// Back to OK, never seen Erred: it ran.
    Ran,
    /// Seen Erred: it failed in OpenStack, whatever the tenant says now.
    Failed,
    /// Not followed closely enough to say.
    Unobserved,
}

/// The next step for a group that vanished and may come back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReimportStep {
    /// Ask Waldur to re-sync the tenant now.
    AskPull,
    /// A re-sync that started after the group vanished has finished (the tenant is back to
    /// OK): look for the group once more. `observed`: this process followed it from accepted
    /// to OK, never Erred, so an empty look shows the group is gone for good; otherwise a
    /// second re-sync must agree ([`after_empty_recheck`]).
    Recheck { observed: bool },
    /// The re-sync was seen failing (the tenant Erred), though the tenant is OK again: no
    /// evidence; start over (a new re-sync once the floor allows).
    Failed(String),
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
    // surely after (found by the reconcile tests: a request 0.4 s before counted). After a
    // first empty recheck, only a re-sync accepted after it counts (the campaign's R9).
    let after = reimport
        .checked_at
        .as_ref()
        .map_or(since, |t| t.0.max(since));
    let surely_after = after
        .checked_add(SignedDuration::from_secs(1))
        .unwrap_or(after);
    let accepted = reimport
        .requested_at
        .as_ref()
        .map(|t| t.0)
        .or(pulls.last_accepted.filter(|t| *t >= surely_after));
    // How this process saw that very re-sync go, if it followed it (the stored time is cut
    // to whole seconds).
    let followed = pulls
        .outcome
        .filter(|o| {
            accepted.is_some_and(|at| {
                o.accepted >= at
                    && o.accepted < at.checked_add(SignedDuration::from_secs(1)).unwrap_or(at)
            })
        })
        .map(|o| o.result);
    let waited = now.duration_since(since).unsigned_abs();
    let safe_wait_left = settings.reimport_wait.saturating_sub(waited);
    let poll =
        |elapsed: Duration| (elapsed / 4).clamp(Duration::from_secs(2), Duration::from_secs(60));
    let step = match (tenant, accepted) {
        (TenantSeen::Erred(message), _) => ReimportStep::TenantErred {
            message: tenant_erred_message(sg, message),
            retry_in: settings.resync_period.min(Duration::from_secs(300)),
        },
        // Followed from accepted to Erred: it failed, whatever the tenant says now.
        (_, Some(_)) if followed == Some(PullResult::Failed) => ReimportStep::Failed(
            "the tenant re-sync failed in OpenStack (the tenant was seen Erred), so it is no \
             evidence; another is asked for once the tenant is OK and the floor has passed"
                .to_string(),
        ),
        // Still being followed: wait for its end.
        (TenantSeen::Ok, Some(at)) if followed == Some(PullResult::Running) => ReimportStep::Wait {
            message:
                "Waldur is re-syncing the tenant; the group is looked for again when it is done"
                    .to_string(),
            retry_in: poll(now.duration_since(at).unsigned_abs()),
        },
        // The tenant was held when Waldur accepted the re-sync; back to OK means it ran, for
        // sure only when followed all the way.
        (TenantSeen::Ok, Some(_)) => ReimportStep::Recheck {
            observed: followed == Some(PullResult::Ran),
        },
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
                        "{}a re-sync of the tenant was asked for {:?} ago; the next may be asked \
                         for in {left:?}",
                        if reimport.checked_at.is_some() {
                            "one re-sync ran without it, and a second must agree (one that \
                             failed and was repaired meanwhile looks the same); "
                        } else {
                            ""
                        },
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

/// What an accepted re-sync that ran without bringing the group back shows.
#[derive(Clone, Debug, PartialEq)]
pub enum EmptyRecheck {
    /// The first such re-sync: a failed one that staff repaired before this look leaves the
    /// tenant just as one that ran (the campaign's R9), so ask for one more and wait for it.
    /// The record to keep.
    AskAgain(crate::api::Reimport),
    /// Two re-syncs, one accepted after the other had run, agree: the group is gone for good.
    Gone,
}

/// Decides what an empty recheck after a re-sync means (see [`EmptyRecheck`]). `observed`:
/// this process followed that re-sync from accepted to OK and never saw it fail.
pub fn after_empty_recheck(
    record: &crate::api::Reimport,
    observed: bool,
    now: Timestamp,
) -> EmptyRecheck {
    if observed || record.checked_at.is_some() {
        return EmptyRecheck::Gone;
    }
    EmptyRecheck::AskAgain(crate::api::Reimport {
        checked_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
        requested_at: None,
        ..record.clone()
    })
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

/// What Waldur re-imported of a group that vanished before its Nova id reached status.
#[derive(Clone, Debug, PartialEq)]
pub enum Reimported<'a> {
    /// One group of this name and policy made (imported) since it vanished: this one.
    One(&'a WaldurGroup),
    /// None yet.
    Nothing,
    /// Several: the re-sync brought back more than one group of the name (another resource's
    /// Unlink left one, say), and nothing tells which Nova group was this resource's. Binding
    /// the wrong one would later delete someone else's group (the campaign's seed 142).
    Several(Vec<String>),
}

/// Waldur's re-import of a group that vanished before its Nova id reached status: the groups
/// of this name and policy made (imported) after it vanished. The caller leaves out groups
/// another resource holds.
pub fn pick_reimport(
    candidates: &[WaldurGroup],
    policy: Policy,
    since: Timestamp,
) -> Reimported<'_> {
    let Ok(not_before) = since.checked_sub(INTENT_CLOCK_SLACK) else {
        return Reimported::Nothing;
    };
    let fitting: Vec<&WaldurGroup> = candidates
        .iter()
        .filter(|g| g.policy == policy.as_str())
        .filter(|g| {
            g.created
                .parse::<Timestamp>()
                .is_ok_and(|created| created >= not_before)
        })
        .collect();
    match fitting.as_slice() {
        [] => Reimported::Nothing,
        [one] => Reimported::One(one),
        several => Reimported::Several(several.iter().map(|g| g.uuid.to_string()).collect()),
    }
}

#[cfg(test)]
#[path = "reimport_tests.rs"]
mod tests;
