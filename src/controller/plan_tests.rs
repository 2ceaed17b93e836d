use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;
use crate::api::{
    ANNOTATION_REQUEST_PULL, ANNOTATION_REQUEST_SET_ERRED, ANNOTATION_REQUEST_SET_OK, AutoPull,
    HandledRequests, ImportSource, ServerGroupSpec,
};

pub(super) const TENANT: &str = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";
pub(super) const UUID: &str = "4c3e00000000000000000000000000aa";

pub(super) fn uuid(s: &str) -> WaldurUuid {
    WaldurUuid::parse(s).unwrap()
}

pub(super) fn settings() -> Settings {
    Settings {
        resync_period: Duration::from_secs(600),
        ..Settings::default()
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Mode {
    Managed,
    ImportUuid,
    ImportBackendId,
    Observe,
}

pub(super) fn resource(
    mode: Mode,
    status_uuid: Option<&str>,
    backend_id: Option<&str>,
) -> ServerGroup {
    let mut spec = ServerGroupSpec {
        policy: Some(Policy::AntiAffinity),
        tenant: Some(TENANT.into()),
        ..Default::default()
    };
    match mode {
        Mode::Managed => {}
        Mode::ImportUuid => {
            spec.import = Some(ImportSource {
                uuid: Some(UUID.into()),
                backend_id: None,
            })
        }
        Mode::ImportBackendId => {
            spec.import = Some(ImportSource {
                uuid: None,
                backend_id: Some("nova-1".into()),
            })
        }
        Mode::Observe => {
            spec.management_policy = ManagementPolicy::Observe;
            spec.import = Some(ImportSource {
                uuid: Some(UUID.into()),
                backend_id: None,
            });
        }
    }
    let mut sg = ServerGroup::new("web", spec);
    sg.metadata.generation = Some(1);
    if status_uuid.is_some() || backend_id.is_some() {
        sg.status = Some(ServerGroupStatus {
            uuid: status_uuid.map(str::to_string),
            backend_id: backend_id.map(str::to_string),
            ..Default::default()
        });
    }
    sg
}

pub(super) fn group(state: State, backend_id: &str) -> WaldurGroup {
    WaldurGroup {
        uuid: uuid(UUID),
        state: Some(state),
        backend_id: backend_id.into(),
        policy: "anti-affinity".into(),
        ..Default::default()
    }
}

pub(super) fn own() -> Lookup {
    Lookup::OwnCreation {
        tenant: uuid(TENANT),
        name: "web".into(),
        policy: Policy::AntiAffinity,
    }
}

#[test]
fn the_first_lookup_prefers_status_then_import_then_own_creation() {
    let known = "11111111111111111111111111111111";
    let cases = [
        (resource(Mode::Managed, None, None), Ok(own())),
        (
            resource(Mode::Managed, Some(known), None),
            Ok(Lookup::Uuid(uuid(known))),
        ),
        (
            resource(Mode::ImportUuid, None, None),
            Ok(Lookup::Uuid(uuid(UUID))),
        ),
        (
            resource(Mode::ImportUuid, Some(known), None),
            Ok(Lookup::Uuid(uuid(known))),
        ),
        (
            resource(Mode::ImportBackendId, None, None),
            Ok(Lookup::BackendId("nova-1".into())),
        ),
        (
            resource(Mode::Observe, None, None),
            Ok(Lookup::Uuid(uuid(UUID))),
        ),
    ];
    for (sg, want) in cases {
        assert_eq!(
            first_lookup(&sg),
            want,
            "{:?} {:?}",
            sg.spec.import,
            sg.status
        );
    }
}

#[test]
fn a_spec_without_tenant_or_policy_is_a_problem_not_a_panic() {
    let mut sg = resource(Mode::Managed, None, None);
    sg.spec.tenant = None;
    assert_eq!(first_lookup(&sg), Err(SpecProblem::MissingTenantOrPolicy));
    let mut sg = resource(Mode::Managed, None, None);
    sg.spec.tenant = Some("nope".into());
    assert!(matches!(first_lookup(&sg), Err(SpecProblem::BadTenant(_))));
    let mut sg = resource(Mode::ImportUuid, None, None);
    sg.spec.import = Some(ImportSource::default());
    assert_eq!(first_lookup(&sg), Err(SpecProblem::BadImport));
}

#[test]
fn what_follows_a_missing_group_for_every_mode() {
    let known = Some("11111111111111111111111111111111");
    let by_uuid = Lookup::Uuid(uuid(UUID));
    let by_backend = Lookup::BackendId("nova-1".into());
    // (mode, status uuid, status backend id, lookup that came back empty, expected)
    let cases = [
        // Never seen a group: create it.
        (
            Mode::Managed,
            None,
            None,
            own(),
            Missing::Create { recreate: false },
        ),
        // Had a group but never a backend id (create failed, row deleted): recreate.
        (
            Mode::Managed,
            known,
            Some(""),
            by_uuid.clone(),
            Missing::Create { recreate: true },
        ),
        // Had a backend id: it may be back under a new UUID.
        (
            Mode::Managed,
            known,
            Some("nova-1"),
            by_uuid.clone(),
            Missing::Lookup(by_backend.clone()),
        ),
        // Not re-imported either: ask Waldur to re-sync the tenant first (review M2).
        (
            Mode::Managed,
            known,
            Some("nova-1"),
            by_backend.clone(),
            Missing::AwaitReimport {
                tenant: uuid(TENANT),
                backend_id: "nova-1".into(),
            },
        ),
        // Imports and observed groups are never created.
        (
            Mode::ImportUuid,
            None,
            None,
            by_uuid.clone(),
            Missing::NotFound,
        ),
        (
            Mode::ImportUuid,
            known,
            Some("nova-1"),
            by_uuid.clone(),
            Missing::Lookup(by_backend.clone()),
        ),
        (
            Mode::ImportUuid,
            known,
            Some("nova-1"),
            by_backend.clone(),
            Missing::NotFound,
        ),
        (
            Mode::ImportBackendId,
            None,
            None,
            by_backend.clone(),
            Missing::NotFound,
        ),
        (
            Mode::Observe,
            None,
            None,
            by_uuid.clone(),
            Missing::NotFound,
        ),
        (
            Mode::Observe,
            known,
            Some("nova-1"),
            by_backend.clone(),
            Missing::NotFound,
        ),
    ];
    for (mode, status_uuid, backend, lookup, want) in cases {
        let sg = resource(mode, status_uuid, backend);
        assert_eq!(
            after_missing(&sg, &lookup, false),
            Ok(want.clone()),
            "{mode:?} {status_uuid:?} {backend:?} {lookup:?}"
        );
    }
}

/// Gone after its own DELETE was seen under way: deleted in OpenStack too, so no look by its
/// Nova id (one request a resource fewer to delete N, issue 21); gone otherwise (an unlink by
/// someone else, seed 117): looked for by its Nova id, as before.
#[test]
fn a_group_its_own_delete_took_is_not_looked_for_again() {
    let by_uuid = Lookup::Uuid(uuid(UUID));
    for (state, want) in [
        ("DELETION_SCHEDULED", Missing::NotFound),
        ("DELETING", Missing::NotFound),
        ("OK", Missing::Lookup(Lookup::BackendId("nova-1".into()))),
    ] {
        let mut sg = resource(
            Mode::Managed,
            Some("11111111111111111111111111111111"),
            Some("nova-1"),
        );
        sg.status.as_mut().unwrap().state = Some(state.into());
        assert_eq!(after_missing(&sg, &by_uuid, true), Ok(want), "{state}");
        assert_eq!(own_delete_under_way(&sg, true), state != "OK");
        assert!(!own_delete_under_way(&sg, false));
    }
}

/// An exact sweep without the group stands for Waldur's 404 only after this resource's own
/// DELETE, while it is being deleted, and only when the sweep surely covered the group: any
/// other absence is asked of Waldur (a GET), as a staff unlink may leave the Nova group.
#[test]
fn a_sweep_miss_is_a_404_only_after_its_own_delete() {
    for (state, deleting, surely_gone, want) in [
        ("DELETING", true, true, true),
        ("DELETION_SCHEDULED", true, true, true),
        ("DELETING", true, false, false),
        ("DELETING", false, true, false),
        ("OK", true, true, false),
        ("ERRED", true, true, false),
    ] {
        let mut sg = resource(
            Mode::Managed,
            Some("11111111111111111111111111111111"),
            Some("nova-1"),
        );
        sg.status.as_mut().unwrap().state = Some(state.into());
        assert_eq!(
            sweep_miss_is_gone(&sg, deleting, surely_gone),
            want,
            "{state}, deleting {deleting}, surely gone {surely_gone}"
        );
    }
}

/// Review N2: deleting never creates, but a group that may come back is waited for (so it can
/// be deleted), imports included; Orphan and Unlink have nothing to wait for.
#[test]
fn deletion_waits_for_a_group_that_may_come_back() {
    use crate::api::DeletionPolicy;
    let known = Some("11111111111111111111111111111111");
    let by_backend = Lookup::BackendId("nova-1".into());
    let awaiting = Ok(Missing::AwaitReimport {
        tenant: uuid(TENANT),
        backend_id: "nova-1".into(),
    });
    let managed = resource(Mode::Managed, known, Some("nova-1"));
    assert_eq!(after_missing(&managed, &by_backend, true), awaiting);
    let imported = resource(Mode::ImportUuid, known, Some("nova-1"));
    assert_eq!(after_missing(&imported, &by_backend, true), awaiting);
    // Gone after Waldur was seen deleting it (this resource's DELETE): deleted, not lost,
    // and no tenant re-sync is asked for (found by the e2e suite: it re-imported another
    // resource's unlinked group).
    let mut deleted = managed.clone();
    deleted.status.as_mut().unwrap().state = Some("DELETION_SCHEDULED".into());
    assert_eq!(
        after_missing(&deleted, &by_backend, true),
        Ok(Missing::NotFound)
    );
    // Someone else's deletion, not this resource's: a staff unlink may have beaten Waldur's
    // worker to it, leaving the Nova group (the campaign's seed 117): wait for the re-sync.
    assert_eq!(after_missing(&deleted, &by_backend, false), awaiting);
    // An import names no tenant in its spec: the tenant its group was last seen in (the
    // campaign's seeds 124, 128); with neither, there is nothing to wait in.
    let mut no_spec_tenant = imported.clone();
    no_spec_tenant.spec.tenant = None;
    assert_eq!(
        after_missing(&no_spec_tenant, &by_backend, true),
        Ok(Missing::NotFound)
    );
    no_spec_tenant.status.as_mut().unwrap().tenant_uuid = Some(TENANT.into());
    assert_eq!(after_missing(&no_spec_tenant, &by_backend, true), awaiting);
    let mut unlink = managed.clone();
    unlink.spec.deletion_policy = DeletionPolicy::Unlink;
    assert_eq!(
        after_missing(&unlink, &by_backend, true),
        Ok(Missing::NotFound)
    );
    // Never had a group: nothing to wait for, and nothing is created while deleting.
    let fresh = resource(Mode::Managed, None, None);
    assert_eq!(after_missing(&fresh, &own(), true), Ok(Missing::NotFound));
    // Last seen CREATING, without a Nova id yet: it may have got one; look for it by name.
    let mut creating = resource(Mode::Managed, known, Some(""));
    creating.status.as_mut().unwrap().state = Some("CREATING".into());
    assert_eq!(
        after_missing(
            &creating,
            &Lookup::Uuid(uuid("11111111111111111111111111111111")),
            true
        ),
        Ok(Missing::AwaitReimport {
            tenant: uuid(TENANT),
            backend_id: String::new(),
        })
    );
    assert_eq!(
        after_missing(
            &creating,
            &Lookup::Uuid(uuid("11111111111111111111111111111111")),
            false
        ),
        Ok(Missing::AwaitReimport {
            tenant: uuid(TENANT),
            backend_id: String::new(),
        })
    );
}

#[test]
fn cleanup_follows_the_deletion_policy_and_waldur_state() {
    use crate::api::DeletionPolicy::*;
    let ok = group(State::Ok, "nova-1");
    let erred = group(State::Erred, "");
    let creating = group(State::Creating, "");
    let deleting = group(State::Deleting, "nova-1");
    let released = |c: &Cleanup| matches!(c, Cleanup::Release { .. });
    for (policy, observed, check) in [
        (
            Delete,
            None,
            &(|c: &Cleanup| *c == Cleanup::Locate) as &dyn Fn(&Cleanup) -> bool,
        ),
        (Delete, Some(None), &released),
        (Delete, Some(Some(&ok)), &|c: &Cleanup| {
            *c == Cleanup::Delete(uuid(UUID))
        }),
        (Delete, Some(Some(&erred)), &|c: &Cleanup| {
            *c == Cleanup::Delete(uuid(UUID))
        }),
        (
            Delete,
            Some(Some(&creating)),
            &|c: &Cleanup| matches!(c, Cleanup::Wait { state } if state == "CREATING"),
        ),
        (Delete, Some(Some(&deleting)), &|c: &Cleanup| {
            matches!(c, Cleanup::Wait { .. })
        }),
        (Orphan, None, &released),
        (Orphan, Some(Some(&ok)), &released),
        (Unlink, None, &|c: &Cleanup| *c == Cleanup::Locate),
        (Unlink, Some(Some(&creating)), &|c: &Cleanup| {
            *c == Cleanup::Unlink(uuid(UUID))
        }),
        (Unlink, Some(None), &released),
    ] {
        let mut sg = resource(Mode::Managed, Some(UUID), None);
        sg.spec.deletion_policy = policy;
        let got = cleanup(&sg, observed, Timestamp::from_second(100_000).unwrap());
        assert!(check(&got), "{policy:?} {observed:?} -> {got:?}");
    }
    // Review m3: a new staff request runs before the deletion step (Delete only: Unlink
    // works from any state), and once recorded as handled it does not run again.
    let mut sg = resource(Mode::Managed, Some(UUID), None);
    sg.metadata.annotations = Some(
        [(
            crate::api::ANNOTATION_REQUEST_SET_OK.to_string(),
            "k1".to_string(),
        )]
        .into(),
    );
    let now = Timestamp::from_second(100_000).unwrap();
    assert_eq!(
        cleanup(&sg, Some(Some(&deleting)), now),
        Cleanup::Staff {
            uuid: uuid(UUID),
            request: FollowUp::SetOk { token: "k1".into() }
        }
    );
    sg.spec.deletion_policy = Unlink;
    assert_eq!(
        cleanup(&sg, Some(Some(&deleting)), now),
        Cleanup::Unlink(uuid(UUID))
    );
    sg.spec.deletion_policy = Delete;
    if let Some(status) = sg.status.as_mut() {
        status.handled_requests = Some(Box::new(crate::api::HandledRequests {
            set_ok: Some("k1".into()),
            ..Default::default()
        }));
    }
    assert!(matches!(
        cleanup(&sg, Some(Some(&deleting)), now),
        Cleanup::Wait { .. }
    ));
    // Observe never deletes, whatever the deletion policy says.
    let mut sg = resource(Mode::Observe, Some(UUID), None);
    sg.spec.deletion_policy = Delete;
    assert!(released(&cleanup(
        &sg,
        Some(Some(&ok)),
        Timestamp::from_second(100_000).unwrap()
    )));
}

fn annotated(pairs: &[(&str, &str)], handled: HandledRequests) -> ServerGroup {
    let mut sg = resource(Mode::Managed, Some(UUID), Some("nova-1"));
    sg.metadata.annotations = Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    );
    sg.status.as_mut().unwrap().handled_requests = Some(Box::new(handled));
    sg
}

#[test]
fn each_request_annotation_acts_once_per_token() {
    let now = Timestamp::from_second(10_000).unwrap();
    let ok = group(State::Ok, "nova-1");
    let s = settings();
    let sg = annotated(
        &[(ANNOTATION_REQUEST_PULL, "a")],
        HandledRequests::default(),
    );
    assert_eq!(
        follow_ups(&sg, &ok, &s, now),
        vec![FollowUp::RequestedPull { token: "a".into() }]
    );
    let done = HandledRequests {
        pull: Some("a".into()),
        ..Default::default()
    };
    let sg = annotated(&[(ANNOTATION_REQUEST_PULL, "a")], done.clone());
    assert_eq!(follow_ups(&sg, &ok, &s, now), vec![]);
    let sg = annotated(&[(ANNOTATION_REQUEST_PULL, "b")], done);
    assert_eq!(
        follow_ups(&sg, &ok, &s, now),
        vec![FollowUp::RequestedPull { token: "b".into() }]
    );
    // A pull waits while Waldur is busy; set-ok and set-erred work from any state.
    let creating = group(State::Creating, "");
    let sg = annotated(
        &[
            (ANNOTATION_REQUEST_PULL, "p"),
            (ANNOTATION_REQUEST_SET_OK, "o"),
            (ANNOTATION_REQUEST_SET_ERRED, "e"),
        ],
        HandledRequests::default(),
    );
    assert_eq!(
        follow_ups(&sg, &creating, &s, now),
        vec![
            FollowUp::SetOk { token: "o".into() },
            FollowUp::SetErred { token: "e".into() }
        ]
    );
    // Observe never writes to Waldur.
    let mut observed = sg.clone();
    observed.spec.management_policy = ManagementPolicy::Observe;
    assert_eq!(follow_ups(&observed, &ok, &s, now), vec![]);
}

/// Review m2: tokens already there when a resource first binds a group (a manifest
/// re-applied from Git, a group made a moment ago) are recorded, never run.
#[test]
fn request_tokens_present_at_first_binding_are_recorded_not_run() {
    let now = Timestamp::from_second(10_000).unwrap();
    let mut fresh = annotated(
        &[
            (ANNOTATION_REQUEST_PULL, "p"),
            (ANNOTATION_REQUEST_SET_ERRED, "e"),
        ],
        HandledRequests::default(),
    );
    fresh.status = None;
    let ok = group(State::Ok, "nova-1");
    assert_eq!(follow_ups(&fresh, &ok, &settings(), now), vec![]);
    assert_eq!(
        tokens_at_first_binding(&fresh),
        Some(HandledRequests {
            pull: Some("p".into()),
            set_ok: None,
            set_erred: Some("e".into()),
            recreate: None,
        })
    );
    // Once bound, only a changed token asks.
    let bound = annotated(
        &[(ANNOTATION_REQUEST_PULL, "p")],
        HandledRequests::default(),
    );
    assert_eq!(tokens_at_first_binding(&bound), None);
}

#[test]
fn erred_groups_with_a_backend_id_are_pulled_with_backoff() {
    let s = settings();
    let erred = group(State::Erred, "nova-1");
    let sg = resource(Mode::Managed, Some(UUID), Some("nova-1"));
    let now = Timestamp::from_second(100_000).unwrap();
    assert_eq!(
        follow_ups(&sg, &erred, &s, now),
        vec![FollowUp::RecoveryPull { attempt: 1 }]
    );
    // No backend id: nothing to pull from (Waldur would answer 400).
    assert_eq!(follow_ups(&sg, &group(State::Erred, ""), &s, now), vec![]);
    // After attempt 2, the next waits 2 resync periods (20 min), not one.
    let mut tried = sg.clone();
    tried.status.as_mut().unwrap().auto_pull = Some(AutoPull {
        last_time: Time(Timestamp::from_second(100_000 - 15 * 60).unwrap()),
        attempts: 2,
    });
    assert_eq!(follow_ups(&tried, &erred, &s, now), vec![]);
    let later = Timestamp::from_second(100_000 + 6 * 60).unwrap();
    assert_eq!(
        follow_ups(&tried, &erred, &s, later),
        vec![FollowUp::RecoveryPull { attempt: 3 }]
    );
    assert_eq!(
        recovery_backoff(Duration::from_secs(600), 1),
        Duration::from_secs(600)
    );
    assert_eq!(
        recovery_backoff(Duration::from_secs(600), 40),
        Duration::from_secs(86_400)
    );
}

#[test]
fn periodic_pulls_only_when_configured_and_due() {
    let ok = group(State::Ok, "nova-1");
    let sg = resource(Mode::Managed, Some(UUID), Some("nova-1"));
    let now = Timestamp::from_second(100_000).unwrap();
    assert_eq!(follow_ups(&sg, &ok, &settings(), now), vec![]);
    let s = Settings {
        pull_interval: Some(Duration::from_secs(3600)),
        ..settings()
    };
    assert_eq!(follow_ups(&sg, &ok, &s, now), vec![FollowUp::PeriodicPull]);
    let mut recent = sg.clone();
    recent.status.as_mut().unwrap().auto_pull = Some(AutoPull {
        last_time: Time(Timestamp::from_second(99_000).unwrap()),
        attempts: 0,
    });
    assert_eq!(follow_ups(&recent, &ok, &s, now), vec![]);
}

#[test]
fn readiness_for_every_waldur_state() {
    let cases = [
        (State::Ok, true, ready_reason::AVAILABLE),
        (State::CreationScheduled, false, ready_reason::CREATING),
        (State::Creating, false, ready_reason::CREATING),
        (State::UpdateScheduled, false, ready_reason::UPDATING),
        (State::Updating, false, ready_reason::UPDATING),
        (State::DeletionScheduled, false, ready_reason::DELETING),
        (State::Deleting, false, ready_reason::DELETING),
        (State::Erred, false, ready_reason::ERRED),
        (State::Unknown("NEW".into()), false, ready_reason::UNKNOWN),
    ];
    for (state, ready, reason) in cases {
        let (r, why, _) = readiness(&group(state.clone(), ""));
        assert_eq!((r, why), (ready, reason), "{state}");
    }
    let mut erred = group(State::Erred, "");
    erred.error_message = "Quota exceeded".into();
    assert_eq!(readiness(&erred).2, "Quota exceeded");
    // A pull that brings a group back to OK clears error_message but leaves error_traceback:
    // the state decides, a leftover traceback does not.
    let mut recovered = group(State::Ok, "nova-1");
    recovered.error_traceback = "Traceback (most recent call last): ...".into();
    assert!(readiness(&recovered).0);
    let mut status = ServerGroupStatus::default();
    mirror(&mut status, &recovered);
    assert_eq!(status.error_message.as_deref().unwrap_or(""), "");
}

#[test]
fn steps_within_a_phase_keep_the_state_shown_and_other_changes_show_the_new_one() {
    use crate::waldur::State as S;
    let cases: &[(Option<&str>, Option<S>, Option<&str>)] = &[
        // A step within creating, updating or deleting keeps what status shows.
        (
            Some("CREATION_SCHEDULED"),
            Some(S::Creating),
            Some("CREATION_SCHEDULED"),
        ),
        (
            Some("Creation Scheduled"),
            Some(S::Creating),
            Some("Creation Scheduled"),
        ),
        (
            Some("UPDATE_SCHEDULED"),
            Some(S::Updating),
            Some("UPDATE_SCHEDULED"),
        ),
        (
            Some("DELETING"),
            Some(S::DeletionScheduled),
            Some("DELETING"),
        ),
        // Into, out of, and between phases: the state observed.
        (Some("CREATION_SCHEDULED"), Some(S::Ok), Some("OK")),
        (
            Some("OK"),
            Some(S::UpdateScheduled),
            Some("UPDATE_SCHEDULED"),
        ),
        (Some("CREATING"), Some(S::Erred), Some("ERRED")),
        (
            Some("UPDATING"),
            Some(S::DeletionScheduled),
            Some("DELETION_SCHEDULED"),
        ),
        (None, Some(S::Creating), Some("CREATING")),
        (Some("CREATING"), None, None),
    ];
    for (shown, observed, want) in cases {
        assert_eq!(
            shown_state(*shown, observed.as_ref()).as_deref(),
            *want,
            "{shown:?} then {observed:?}"
        );
    }
}

#[test]
fn the_end_of_a_creation_is_no_event_and_other_phase_changes_are() {
    use crate::api::conditions::ready_reason as r;
    assert!(!phase_change_is_news(Some(r::CREATING), r::AVAILABLE));
    assert!(!phase_change_is_news(Some(r::AVAILABLE), r::AVAILABLE));
    assert!(phase_change_is_news(Some(r::AVAILABLE), r::ERRED));
    assert!(phase_change_is_news(Some(r::ERRED), r::AVAILABLE));
    assert!(phase_change_is_news(Some(r::CREATING), r::ERRED));
    assert!(phase_change_is_news(Some(r::UPDATING), r::AVAILABLE));
    assert!(phase_change_is_news(None, r::AVAILABLE));
}

#[test]
fn a_deletion_reads_a_picture_no_older_than_itself_or_waldur() {
    use DeletionRead::*;
    let s = Duration::from_secs;
    // (index, answers, picture age, deleting for, own write to the group that long ago)
    //   -> where to read
    let cases = [
        // A sweep started after the deletion was first seen: the index.
        ((true, true, s(1), s(5), None), Index),
        ((true, true, s(4), s(5), None), Index),
        // The picture is older than the deletion, or than the operator's DELETE: wait for
        // the next sweep, early on or while sweeps run.
        ((true, true, s(5), s(5), None), WaitForSweep),
        ((true, true, s(30), s(1), None), WaitForSweep),
        ((true, true, s(1), s(60), Some(s(1))), WaitForSweep),
        ((true, false, s(1), s(5), None), WaitForSweep),
        // Its DELETE went out only now, after a long wait for its turn (a rate-limited mass
        // deletion: 1,000 DELETEs at 20 a second), while sweeps share the slowed budget: the
        // patience counts from the DELETE, not from when the deletion was first seen (the
        // shipped defaults read 484 groups directly for this).
        ((true, true, s(8), s(60), Some(s(2))), WaitForSweep),
        ((true, true, s(8), s(60), Some(s(19))), WaitForSweep),
        // Sweeps are not coming and the deletion has waited: Waldur itself.
        ((true, true, s(40), s(30), None), Direct),
        ((true, false, s(40), s(60), None), Direct),
        ((true, true, s(40), s(60), Some(s(30))), Direct),
        // No index (the per-object path, or no bound group): Waldur itself.
        ((false, true, s(1), s(60), None), Direct),
    ];
    for ((index, answers, age, deleting_for, written_ago), want) in cases {
        assert_eq!(
            deletion_read(index, answers, age, deleting_for, written_ago),
            want,
            "index {index} answers {answers} age {age:?} deleting for {deleting_for:?} written {written_ago:?} ago"
        );
    }
}

#[test]
fn a_rejected_generation_is_not_retried_until_the_spec_changes() {
    let mut sg = resource(Mode::Managed, None, None);
    let now = Time(Timestamp::from_second(1).unwrap());
    let mut status = ServerGroupStatus::default();
    crate::api::set_condition(
        &mut status.conditions,
        READY,
        crate::api::ConditionStatus::False,
        ready_reason::INVALID_SPEC,
        "x",
        Some(1),
        &now,
    );
    sg.status = Some(status);
    assert!(rejected_for_this_generation(&sg));
    sg.metadata.generation = Some(2);
    assert!(!rejected_for_this_generation(&sg));
}

/// A taken name clears when its holder goes: such a rejection is looked at again (the
/// campaign's seed 258 stayed InvalidSpec after Waldur dropped the holder).
#[test]
fn a_taken_name_is_looked_at_again_and_other_rejections_are_not() {
    let now = Time(Timestamp::from_second(1).unwrap());
    for (message, final_) in [
        (
            "name: Ensure this field has no more than 150 characters.",
            true,
        ),
        ("name: Server group name should be unique.", false),
        (
            "name: tenant t already has a server group named \"web\" (u, not managed by any ServerGroup)",
            false,
        ),
    ] {
        let mut sg = resource(Mode::Managed, None, None);
        let mut status = ServerGroupStatus::default();
        crate::api::set_condition(
            &mut status.conditions,
            READY,
            crate::api::ConditionStatus::False,
            ready_reason::INVALID_SPEC,
            message,
            Some(1),
            &now,
        );
        sg.status = Some(status);
        assert_eq!(rejected_for_this_generation(&sg), final_, "{message}");
        assert_eq!(says_name_taken(message), !final_, "{message}");
    }
}

/// Stalled is True exactly when nothing changes without a change of spec or of Waldur.
#[test]
fn stalled_only_when_nothing_will_change_by_itself() {
    let now = Time(Timestamp::from_second(1).unwrap());
    let status_with = |reason: &str, backend_id: Option<&str>, pulls: u32| {
        let mut status = ServerGroupStatus {
            backend_id: backend_id.map(str::to_string),
            auto_pull: (pulls > 0).then(|| AutoPull {
                last_time: now.clone(),
                attempts: pulls,
            }),
            ..Default::default()
        };
        let ok = reason == ready_reason::AVAILABLE;
        crate::api::set_condition(
            &mut status.conditions,
            READY,
            if ok {
                crate::api::ConditionStatus::True
            } else {
                crate::api::ConditionStatus::False
            },
            reason,
            "Waldur's words",
            Some(1),
            &now,
        );
        status
    };
    let managed = resource(Mode::Managed, Some(UUID), None);
    let observed = resource(Mode::Observe, Some(UUID), None);
    let cases = [
        (&managed, ready_reason::AVAILABLE, Some("nova-1"), 0, None),
        (&managed, ready_reason::CREATING, None, 0, None),
        (&managed, ready_reason::UNKNOWN, None, 0, None),
        (&managed, ready_reason::DELETING, Some("nova-1"), 0, None),
        (
            &managed,
            ready_reason::INVALID_SPEC,
            None,
            0,
            Some(ready_reason::INVALID_SPEC),
        ),
        (
            &managed,
            ready_reason::ALREADY_MANAGED,
            None,
            0,
            Some(ready_reason::ALREADY_MANAGED),
        ),
        (
            &observed,
            ready_reason::NOT_FOUND,
            None,
            0,
            Some(ready_reason::NOT_FOUND),
        ),
        // ERRED with a Nova group: Waldur's recovery pulls get their chance first.
        (&managed, ready_reason::ERRED, Some("nova-1"), 0, None),
        (&managed, ready_reason::ERRED, Some("nova-1"), 1, None),
        (
            &managed,
            ready_reason::ERRED,
            Some("nova-1"),
            2,
            Some(ready_reason::ERRED),
        ),
        // A failed create has nothing to recover; an observer never pulls.
        (
            &managed,
            ready_reason::ERRED,
            None,
            0,
            Some(ready_reason::ERRED),
        ),
        (
            &observed,
            ready_reason::ERRED,
            Some("nova-1"),
            0,
            Some(ready_reason::ERRED),
        ),
    ];
    for (sg, reason, backend_id, pulls, want) in cases {
        let got = stalled(sg, &status_with(reason, backend_id, pulls));
        assert_eq!(
            got.as_ref().map(|(r, _)| *r),
            want,
            "{reason} backend {backend_id:?} pulls {pulls}"
        );
        if let Some((_, message)) = got {
            assert!(message.contains("Waldur's words"), "{message}");
        }
    }
    // Deleting or paused: never stalled, whatever Ready says.
    let mut deleting = managed.clone();
    deleting.metadata.deletion_timestamp = Some(now.clone());
    assert_eq!(
        stalled(&deleting, &status_with(ready_reason::INVALID_SPEC, None, 0)),
        None
    );
}

#[test]
fn requeue_is_fast_while_busy_and_jittered_at_resync_when_settled() {
    let sg = resource(Mode::Managed, Some(UUID), None);
    let s = settings();
    assert_eq!(
        requeue_after(&sg, Some(&State::Creating), Duration::ZERO, &s, 0.5),
        Duration::from_secs(1)
    );
    assert_eq!(
        requeue_after(
            &sg,
            Some(&State::Creating),
            Duration::from_secs(600),
            &s,
            0.5
        ),
        Duration::from_secs(30)
    );
    assert_eq!(
        requeue_after(&sg, Some(&State::Ok), Duration::ZERO, &s, 0.0),
        Duration::from_secs(540)
    );
    assert_eq!(
        requeue_after(&sg, Some(&State::Ok), Duration::ZERO, &s, 1.0),
        Duration::from_secs(600)
    );
    let mut own = sg.clone();
    own.spec.resync_period = Some("1h".into());
    assert_eq!(
        requeue_after(&own, Some(&State::Erred), Duration::ZERO, &s, 0.5),
        Duration::from_secs(3420)
    );
}

/// An object stored before the CRD had its 30s rule still cannot poll faster than that.
#[test]
fn a_resync_period_below_the_floor_counts_as_the_floor() {
    let mut sg = resource(Mode::Managed, Some(UUID), None);
    sg.spec.resync_period = Some("1ms".into());
    assert_eq!(resync_of(&sg, &settings()), Duration::from_secs(30));
    sg.spec.resync_period = Some("45s".into());
    assert_eq!(resync_of(&sg, &settings()), Duration::from_secs(45));
}

#[test]
fn durations_parse_in_the_crd_pattern_forms() {
    assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
    assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    for bad in ["", "10", "m", "1d", "-1s", "1.5h"] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
}

#[test]
fn instances_are_mirrored_only_once_the_group_is_ok() {
    let mut g = group(State::Ok, "nova-1");
    g.instances = vec![crate::waldur::Instance {
        name: "vm1".into(),
        uuid: uuid(TENANT),
        backend_id: "i-1".into(),
    }];
    let mut status = ServerGroupStatus::default();
    mirror(&mut status, &g);
    assert_eq!(status.instance_count, Some(1));
    assert_eq!(status.instances[0].name, "vm1");
    g.state = Some(State::Updating);
    mirror(&mut status, &g);
    assert_eq!(status.instance_count, Some(0));
    assert_eq!(status.state.as_deref(), Some("UPDATING"));
}

#[test]
fn an_erred_group_with_a_nova_group_is_pulled_before_it_is_deleted() {
    let now = Timestamp::from_second(100_000).unwrap();
    let mut erred = group(State::Erred, "nova-1");
    erred.error_message = "Nova refused the delete".into();
    let mut sg = resource(Mode::Managed, Some(UUID), Some("nova-1"));
    assert_eq!(
        cleanup(&sg, Some(Some(&erred)), now),
        Cleanup::PullFirst {
            uuid: uuid(UUID),
            attempt: 1,
            tenant: None
        },
        "never DELETE from ERRED while OpenStack may hold the group"
    );
    // Pulled 5 s ago, still ERRED: hold, and say why.
    sg.status.as_mut().unwrap().auto_pull = Some(AutoPull {
        last_time: Time(Timestamp::from_second(100_000 - 5).unwrap()),
        attempts: 1,
    });
    match cleanup(&sg, Some(Some(&erred)), now) {
        Cleanup::Held {
            message, retry_in, ..
        } => {
            assert!(message.contains("Nova refused the delete"), "{message}");
            assert!(
                message.contains("nova-1") && message.contains("Orphan"),
                "{message}"
            );
            assert_eq!(retry_in, delete_pull_backoff(1));
        }
        other => panic!("{other:?}"),
    }
    // The backoff has passed: pull again.
    assert_eq!(
        cleanup(
            &sg,
            Some(Some(&erred)),
            Timestamp::from_second(100_000 + 60).unwrap()
        ),
        Cleanup::PullFirst {
            uuid: uuid(UUID),
            attempt: 2,
            tenant: Some(uuid(TENANT)),
        },
        "from the second attempt the tenant is re-synced too: it drops a record whose Nova group is gone"
    );
    // No Nova group (the create failed): nothing to leak, delete at once.
    let failed = group(State::Erred, "");
    assert_eq!(
        cleanup(&sg, Some(Some(&failed)), now),
        Cleanup::Delete(uuid(UUID))
    );
    assert_eq!(delete_pull_backoff(1), Duration::from_secs(10));
    assert_eq!(delete_pull_backoff(3), Duration::from_secs(40));
    assert_eq!(delete_pull_backoff(30), Duration::from_secs(600));
}

#[test]
fn only_waldurs_name_uniqueness_400_counts_as_a_taken_name() {
    use crate::waldur::{FieldMessage, FieldMessages, WaldurError};
    let invalid = |field: Option<&str>, message: &str| WaldurError::Invalid {
        endpoint: "create",
        messages: FieldMessages(vec![FieldMessage {
            field: field.map(str::to_string),
            message: message.into(),
        }]),
    };
    assert!(name_taken(&invalid(
        Some("non_field_errors"),
        "Server group name should be unique."
    )));
    assert!(!name_taken(&invalid(
        Some("policy"),
        "\"anti-affinity\" is not a valid choice."
    )));
}

/// The campaign's seed 209: rejected (InvalidSpec), paused, unpaused: Synced must say the
/// rejection again, not Paused; while paused, or when Synced is not Paused, nothing changes.
#[test]
fn an_unpaused_rejected_resource_says_the_rejection_again() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    let cond = |t: &str, reason: &str, message: &str| Condition {
        type_: t.into(),
        status: "False".into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(1),
        last_transition_time: Time(Timestamp::from_second(0).unwrap()),
    };
    let mut sg = resource(Mode::Managed, None, None);
    sg.status = Some(ServerGroupStatus {
        conditions: vec![
            cond(READY, ready_reason::INVALID_SPEC, "name taken"),
            cond(SYNCED, synced_reason::PAUSED, "paused"),
        ],
        ..Default::default()
    });
    assert_eq!(
        synced_after_unpause(&sg),
        Some((
            ready_reason::INVALID_SPEC.to_string(),
            "name taken".to_string()
        ))
    );
    let mut paused = sg.clone();
    paused
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(crate::api::ANNOTATION_PAUSED.into(), "true".into());
    assert_eq!(synced_after_unpause(&paused), None);
    sg.status.as_mut().unwrap().conditions[1].reason = "InvalidSpec".into();
    assert_eq!(synced_after_unpause(&sg), None);
}

/// Issue 21: the first status of a group made here waits only while Waldur is making it,
/// has no Nova id yet, and for at most FIRST_STATUS_WAIT; a settled or failed group, or one
/// whose Nova id is known, is written at once.
#[test]
fn the_first_status_of_a_creation_waits_only_while_waldur_makes_it() {
    let group = |state: State, backend_id: &str| WaldurGroup {
        state: Some(state),
        backend_id: backend_id.into(),
        ..Default::default()
    };
    let soon = Duration::from_secs(1);
    let cases = [
        (group(State::CreationScheduled, ""), soon, true),
        (group(State::Creating, ""), soon, true),
        (group(State::Creating, ""), FIRST_STATUS_WAIT, false),
        (group(State::Creating, "nova-1"), soon, false),
        (group(State::Ok, "nova-1"), soon, false),
        (group(State::Ok, ""), soon, false),
        (group(State::Erred, ""), soon, false),
    ];
    for (group, ago, waits) in cases {
        assert_eq!(
            first_status_waits(&group, ago),
            waits,
            "{:?} {:?} after {ago:?}",
            group.state,
            group.backend_id
        );
    }
}

/// A creation that vanished before its first status is recorded as the 201 described it: the
/// vanished-group rules then wait for Waldur's re-sync by name, as for any group last seen
/// while Waldur was making it.
#[test]
fn a_creation_that_vanished_unshown_is_recorded_as_created_and_may_come_back() {
    let sg = resource(Mode::Managed, None, None);
    let created = as_created(&sg, &uuid(UUID));
    assert_eq!(created.tenant_uuid, uuid(TENANT));
    assert_eq!(created.name, sg.waldur_name());
    assert_eq!(created.policy, "anti-affinity");
    let mut status = ServerGroupStatus::default();
    mirror(&mut status, &created);
    let mut shown = sg.clone();
    shown.status = Some(status);
    assert_eq!(
        after_missing(&shown, &Lookup::Uuid(uuid(UUID)), false),
        Ok(Missing::AwaitReimport {
            tenant: uuid(TENANT),
            backend_id: String::new()
        })
    );
}
