//! The deletion policy applied to what is known of the group.

use super::*;

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
    /// Run a staff recovery request (`request-set-ok` or `request-set-erred`) first: the way
    /// out for a group stuck in a transitional or ERRED state while it is being deleted.
    Staff { uuid: WaldurUuid, request: FollowUp },
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

/// Where a deletion on the batched read path reads its bound group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeletionRead {
    /// From the index: its picture was taken after the deletion was asked for, and after
    /// this operator's last write to the group.
    Index,
    /// Not yet: wait for the next sweep (woken now) instead of one GET per resource, so that
    /// deleting N groups costs about N DELETEs and a few shared lists (issue 21).
    WaitForSweep,
    /// From Waldur itself: sweeps are not coming (failing, or slowed to the settled pace
    /// while this deletion waited), or there is no index to wait for.
    Direct,
}

/// How long a deletion may wait for sweeps that started after it before reading Waldur
/// itself; and how recent the last sweep must be for waiting to be worth it.
pub const DELETION_READ_PATIENCE: Duration = Duration::from_secs(20);
pub const SWEEPS_RUNNING: Duration = Duration::from_secs(5);
/// Where a deletion reads its group. A deletion decides a write (DELETE, or a pull first for
/// an ERRED group that may still be in OpenStack) from what it reads, so the picture must be
/// no older than the deletion itself: the index's last sweep must have started after this
/// process first saw the deletion (`deleting_for` ago, on its own clock) and after its last
/// write to the group (`written_ago`, `Some` until a sweep that started after it has run).
/// The patience for that sweep counts from the later of the two: a DELETE that waited its
/// turn behind a thousand others still gets a sweep, not a GET.
pub fn deletion_read(
    index: bool,
    answers: bool,
    picture_age: Duration,
    deleting_for: Duration,
    written_ago: Option<Duration>,
) -> DeletionRead {
    if !index {
        return DeletionRead::Direct;
    }
    if answers && written_ago.is_none() && picture_age < deleting_for {
        return DeletionRead::Index;
    }
    let waiting_for = written_ago.map_or(deleting_for, |w| w.min(deleting_for));
    if waiting_for < DELETION_READ_PATIENCE || picture_age < SWEEPS_RUNNING {
        return DeletionRead::WaitForSweep;
    }
    DeletionRead::Direct
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
                if policy == DeletionPolicy::Delete
                    && let Some(request) = staff_request(sg)
                {
                    return Cleanup::Staff {
                        uuid: group.uuid.clone(),
                        request,
                    };
                }
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
pub(super) fn erred_cleanup(sg: &ServerGroup, group: &WaldurGroup, now: Timestamp) -> Cleanup {
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
