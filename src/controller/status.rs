//! Status: a pure function decides the next status (or that none is needed); one writer sends it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::SignedDuration;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::MANAGER;
use crate::api::{ServerGroup, ServerGroupStatus};

/// `lastSyncTime` is refreshed at least this often even when nothing else changed. Between
/// refreshes an unchanged status is not written, which keeps Kubernetes writes per resource low.
const SYNC_TIME_REFRESH: SignedDuration = SignedDuration::from_hours(1);

/// Applies `change` to a copy of the current status and returns it when it differs from what
/// is stored, or `None` when writing it would change nothing a user could see.
/// `read_waldur` says this reconcile read the group from Waldur, so `lastSyncTime` may move.
pub fn next_status(
    current: Option<&ServerGroupStatus>,
    generation: Option<i64>,
    read_waldur: bool,
    now: &Time,
    change: impl FnOnce(&mut ServerGroupStatus),
) -> Option<ServerGroupStatus> {
    let current = current.cloned().unwrap_or_default();
    let mut next = current.clone();
    // Set before `change`, which may keep the previous one: a generation is observed once a
    // reconcile has concluded for it (see `Reconciler::report_failure`).
    next.observed_generation = generation;
    change(&mut next);
    let mut comparable = next.clone();
    comparable.last_sync_time = current.last_sync_time.clone();
    let changed = comparable != current;
    let stale = current
        .last_sync_time
        .as_ref()
        .and_then(|t| t.0.checked_add(SYNC_TIME_REFRESH).ok())
        .is_none_or(|refresh_at| refresh_at <= now.0);
    if read_waldur && (changed || stale) {
        next.last_sync_time = Some(now.clone());
    }
    (changed || (read_waldur && stale)).then_some(next)
}

/// Writes the whole status with server-side apply: the operator owns every status field.
/// Returns the resourceVersion the write produced, when the server sent one.
pub async fn write(
    api: &Api<ServerGroup>,
    sg: &ServerGroup,
    status: &ServerGroupStatus,
) -> Result<Option<String>, kube::Error> {
    // The uid makes the write a precondition (review N13): a reconcile still in flight for an
    // object that was deleted and made again under the same name cannot write the old
    // object's status (and so its group) into the new one.
    let patch = json!({
        "apiVersion": "openstack.waldur.com/v1alpha1",
        "kind": "ServerGroup",
        "metadata": {"uid": sg.metadata.uid},
        "status": status,
    });
    let written = api
        .patch_status(
            &sg.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(written.metadata.resource_version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn resource(status: Option<ServerGroupStatus>) -> ServerGroup {
        let mut sg = ServerGroup::new("web", Default::default());
        sg.metadata.generation = Some(3);
        sg.status = status;
        sg
    }

    #[test]
    fn nothing_to_write_when_nothing_changed() {
        let status = ServerGroupStatus {
            observed_generation: Some(3),
            state: Some("OK".into()),
            last_sync_time: Some(at(1_000)),
            ..Default::default()
        };
        let sg = resource(Some(status));
        assert_eq!(
            next_status(
                sg.status.as_ref(),
                sg.metadata.generation,
                true,
                &at(1_060),
                |s| s.state = Some("OK".into())
            ),
            None
        );
    }

    #[test]
    fn a_change_is_written_with_a_fresh_sync_time_and_generation() {
        let sg = resource(Some(ServerGroupStatus {
            observed_generation: Some(2),
            state: Some("CREATING".into()),
            last_sync_time: Some(at(1_000)),
            ..Default::default()
        }));
        let next = next_status(
            sg.status.as_ref(),
            sg.metadata.generation,
            true,
            &at(1_060),
            |s| s.state = Some("OK".into()),
        )
        .unwrap();
        assert_eq!(next.state.as_deref(), Some("OK"));
        assert_eq!(next.observed_generation, Some(3));
        assert_eq!(next.last_sync_time, Some(at(1_060)));
    }

    #[test]
    fn sync_time_is_refreshed_hourly_even_without_changes() {
        let status = ServerGroupStatus {
            observed_generation: Some(3),
            last_sync_time: Some(at(1_000)),
            ..Default::default()
        };
        let sg = resource(Some(status));
        let next = next_status(
            sg.status.as_ref(),
            sg.metadata.generation,
            true,
            &at(1_000 + 3_600),
            |_| {},
        )
        .unwrap();
        assert_eq!(next.last_sync_time, Some(at(4_600)));
        // Without a Waldur read the time must not move.
        assert_eq!(
            next_status(
                sg.status.as_ref(),
                sg.metadata.generation,
                false,
                &at(1_000 + 7_200),
                |_| {}
            ),
            None
        );
    }
}
