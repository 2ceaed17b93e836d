//! A bound group: its follow-ups (requests, recovery pulls), readiness, stalled, and the
//! status fields that mirror it.

use super::*;

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
    let new_token = |key: &str, done: &Option<String>| new_request_token(sg, key, done);
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

/// The token of annotation `key` when it asks for something not yet done (`done` is the
/// token last handled). Tokens present when the resource first binds a group were written
/// before there was a group to act on: a manifest re-applied from Git, or a group made a moment
/// ago. They are recorded as handled (see `tokens_at_first_binding`), never run (review m2).
pub(super) fn new_request_token(
    sg: &ServerGroup,
    key: &str,
    done: &Option<String>,
) -> Option<String> {
    let first_binding = sg.status.as_ref().is_none_or(|s| s.uuid.is_none());
    sg.annotation(key)
        .map(str::trim)
        .filter(|t| !first_binding && !t.is_empty() && Some(*t) != done.as_deref())
        .map(str::to_string)
}

/// A staff recovery request (`request-set-ok`, then `request-set-erred`) not yet carried out:
/// honoured while the resource is being deleted too, since that is when a group stuck in a
/// transitional or ERRED state most needs it (review m3).
pub fn staff_request(sg: &ServerGroup) -> Option<FollowUp> {
    let handled = sg
        .status
        .as_ref()
        .and_then(|s| s.handled_requests.as_deref())
        .cloned()
        .unwrap_or_default();
    if let Some(token) =
        new_request_token(sg, crate::api::ANNOTATION_REQUEST_SET_OK, &handled.set_ok)
    {
        return Some(FollowUp::SetOk { token });
    }
    new_request_token(
        sg,
        crate::api::ANNOTATION_REQUEST_SET_ERRED,
        &handled.set_erred,
    )
    .map(|token| FollowUp::SetErred { token })
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

/// Recovery pulls of an ERRED group: at most once per resync period, doubling after each
/// attempt that did not help, up to a day.
pub fn recovery_backoff(resync: Duration, attempts: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(16));
    resync
        .saturating_mul(factor)
        .min(Duration::from_secs(24 * 3600))
}

/// The Waldur state status should show, given the one it shows now. A step within one
/// transitional phase (CREATION_SCHEDULED -> CREATING, UPDATE_SCHEDULED -> UPDATING,
/// DELETION_SCHEDULED -> DELETING) keeps the state shown: `Ready` says the same before and
/// after, and writing the step would cost a Kubernetes write per resource and tell a user
/// nothing (issue 21). Any other change shows the state observed.
pub fn shown_state(shown: Option<&str>, observed: Option<&State>) -> Option<String> {
    let phase = |s: &State| match s {
        State::CreationScheduled | State::Creating => Some(0),
        State::UpdateScheduled | State::Updating => Some(1),
        State::DeletionScheduled | State::Deleting => Some(2),
        _ => None,
    };
    let observed_phase = observed.and_then(phase);
    match shown {
        Some(label)
            if observed_phase.is_some() && phase(&State::parse(label)) == observed_phase =>
        {
            Some(label.to_string())
        }
        _ => observed.map(State::to_string),
    }
}

/// How long the first status of a group this process created may wait while Waldur makes it.
pub const FIRST_STATUS_WAIT: Duration = Duration::from_secs(10);

/// Whether the first status of a group this process has just created, and not yet shown,
/// waits for the next look: while Waldur is still making it and for at most
/// [`FIRST_STATUS_WAIT`]. Waldur's create takes about 2 s to reach OK, so most creations are
/// shown once, already Ready: one Kubernetes write instead of two (a Creating status, then
/// the Ready one). Nothing is lost meanwhile: the claim is held in memory, the create intent
/// is in the object, and the Created Event says what was done. Pure, for the table tests.
/// Once Waldur has the Nova id the status is written: a group that vanished later must be
/// looked for by that id (`after_missing`), and only status keeps it across a restart.
pub fn first_status_waits(group: &WaldurGroup, created_ago: Duration) -> bool {
    matches!(
        group.state,
        Some(State::CreationScheduled | State::Creating)
    ) && group.backend_id.is_empty()
        && created_ago < FIRST_STATUS_WAIT
}

/// The group `sg` made, as Waldur's 201 described it: what the first status would have shown
/// had it not waited. For a group that vanished before that status was written, so that the
/// rules for a bound group that vanished decide from status, as they always have.
pub fn as_created(sg: &ServerGroup, uuid: &WaldurUuid) -> WaldurGroup {
    WaldurGroup {
        uuid: uuid.clone(),
        name: sg.waldur_name(),
        tenant_uuid: sg
            .spec
            .tenant
            .as_deref()
            .and_then(|t| WaldurUuid::parse(t).ok())
            .unwrap_or_default(),
        policy: sg.spec.policy.map(|p| p.to_string()).unwrap_or_default(),
        state: Some(State::CreationScheduled),
        ..Default::default()
    }
}

/// Whether a change of phase deserves an Event of its own. Not the end of a creation
/// (Creating -> Available): the Created (or Adopted, Recreated) Event said what happened and
/// `Ready` turning True says the rest, so that Event would be one more write per resource
/// for nothing new. Every other change of phase is one, Erred as a Warning.
pub fn phase_change_is_news(previous_reason: Option<&str>, reason: &str) -> bool {
    previous_reason != Some(reason)
        && !(previous_reason == Some(crate::api::conditions::ready_reason::CREATING)
            && reason == crate::api::conditions::ready_reason::AVAILABLE)
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
/// case the same request must not be sent again until the spec changes. A taken name is the
/// exception: it clears by itself when its holder goes (an ERRED group dropped by Waldur's
/// re-sync, someone deleting it), so it is checked again at the resync period rather than
/// stuck until a spec change that cannot help (the campaign's seed 258).
pub fn rejected_for_this_generation(sg: &ServerGroup) -> bool {
    let Some(status) = &sg.status else {
        return false;
    };
    status.uuid.is_none()
        && status.conditions.iter().any(|c| {
            c.type_ == READY
                && c.reason == ready_reason::INVALID_SPEC
                && c.observed_generation == sg.metadata.generation
                && !says_name_taken(&c.message)
        })
}

/// How the operator says a create was refused for a taken name (with the holder named).
pub const NAME_TAKEN: &str = "already has a server group named";

/// Whether a rejection's message is about a taken name: the operator's words, or Waldur's.
pub fn says_name_taken(message: &str) -> bool {
    message.contains(NAME_TAKEN)
        || message
            .to_ascii_lowercase()
            .contains("name should be unique")
}

/// A resource rejected for this generation and then paused and unpaused still says Synced
/// Paused: the Synced condition to write instead (the rejection, as Ready states it), or
/// `None` when Synced is not stale.
pub fn synced_after_unpause(sg: &ServerGroup) -> Option<(String, String)> {
    let status = sg.status.as_ref()?;
    let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t);
    let synced = condition(SYNCED)?;
    if synced.reason != synced_reason::PAUSED || sg.is_paused() {
        return None;
    }
    let ready = condition(READY)?;
    Some((ready.reason.clone(), ready.message.clone()))
}

/// The status fields that mirror the observed group.
pub fn mirror(status: &mut ServerGroupStatus, group: &WaldurGroup) {
    // Bound to a group again: no re-import is awaited.
    status.reimport = None;
    status.uuid = Some(group.uuid.to_string());
    status.url = Some(group.url.clone()).filter(|u| !u.is_empty());
    status.backend_id = Some(group.backend_id.clone());
    status.tenant_uuid = Some(group.tenant_uuid.to_string()).filter(|t| !t.is_empty());
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
