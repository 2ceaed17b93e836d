use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::*;
use crate::api::{
    ANNOTATION_REQUEST_PULL, ANNOTATION_REQUEST_SET_ERRED, ANNOTATION_REQUEST_SET_OK, AutoPull,
    HandledRequests, ImportSource, ServerGroupSpec,
};

const TENANT: &str = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";
const UUID: &str = "4c3e00000000000000000000000000aa";

fn uuid(s: &str) -> WaldurUuid {
    WaldurUuid::parse(s).unwrap()
}

fn settings() -> Settings {
    Settings {
        resync_period: Duration::from_secs(600),
        ..Settings::default()
    }
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Managed,
    ImportUuid,
    ImportBackendId,
    Observe,
}

fn resource(mode: Mode, status_uuid: Option<&str>, backend_id: Option<&str>) -> ServerGroup {
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

fn group(state: State, backend_id: &str) -> WaldurGroup {
    WaldurGroup {
        uuid: uuid(UUID),
        state: Some(state),
        backend_id: backend_id.into(),
        policy: "anti-affinity".into(),
        ..Default::default()
    }
}

fn own() -> Lookup {
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

fn vanished(since: i64, requested: Option<i64>) -> (ServerGroup, crate::api::Reimport) {
    let sg = resource(Mode::Managed, Some(UUID), Some("nova-1"));
    let record = crate::api::Reimport {
        backend_id: "nova-1".into(),
        since: Some(Time(Timestamp::from_second(since).unwrap())),
        requested_at: requested.map(|t| Time(Timestamp::from_second(t).unwrap())),
    };
    (sg, record)
}

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(secs).unwrap()
}

fn is_wait(step: &ReimportStep) -> bool {
    matches!(step, ReimportStep::Wait { .. })
}

/// Review M2 and E2: a vanished group is made anew only on evidence that a re-sync which began
/// after it vanished finished without it, never at a fixed time after a request. The re-sync
/// may run 45 s or 10 minutes late: the decision is the same until the tenant is back to OK.
#[test]
fn a_vanished_group_is_recreated_only_on_evidence() {
    let s = settings();
    let none = TenantPullsSeen::default();
    // Vanished at 1,000 s: the tenant is OK and nothing was asked: ask for a re-sync.
    let (sg, fresh) = vanished(1_000, None);
    assert_eq!(
        reimport_step(&sg, &fresh, &TenantSeen::Ok, none, &s, at(1_000)).0,
        ReimportStep::AskPull
    );
    // Asked at 1,001 s; Waldur holds the tenant until its worker runs the re-sync, 45 s or
    // 10 minutes later: wait, however long it takes.
    let (sg, asked) = vanished(1_000, Some(1_001));
    for late in [3, 45, 600, 4 * 3600] {
        let (step, _) = reimport_step(
            &sg,
            &asked,
            &TenantSeen::Busy("UPDATE_SCHEDULED".into()),
            none,
            &s,
            at(1_001 + late),
        );
        assert!(is_wait(&step), "{late} s late: {step:?}");
    }
    // The tenant is OK again after the accepted request: the re-sync ran; look once more.
    assert_eq!(
        reimport_step(&sg, &asked, &TenantSeen::Ok, none, &s, at(1_650)).0,
        ReimportStep::Recheck
    );
    // The re-sync failed: the tenant is Erred; say so, do not create.
    assert!(matches!(
        reimport_step(&sg, &asked, &TenantSeen::Erred("Nova 500".into()), none, &s, at(1_650)).0,
        ReimportStep::TenantErred { ref message, .. } if message.contains("Nova 500")
    ));
}

/// Another resource's request accepted after this group vanished is evidence too; one accepted
/// before it vanished is not.
#[test]
fn a_re_sync_counts_only_if_accepted_after_the_group_vanished() {
    let s = settings();
    let (sg, fresh) = vanished(1_000, None);
    // Stored times are whole seconds: a request in the same second may have come before.
    let same_second = TenantPullsSeen {
        last_accepted: Some(at(1_000)),
        last_asked: Some(at(1_000)),
    };
    assert_eq!(
        reimport_step(&sg, &fresh, &TenantSeen::Ok, same_second, &s, at(1_020)).1,
        None
    );
    let after = TenantPullsSeen {
        last_accepted: Some(at(1_010)),
        last_asked: Some(at(1_010)),
    };
    assert_eq!(
        reimport_step(&sg, &fresh, &TenantSeen::Ok, after, &s, at(1_020)),
        (ReimportStep::Recheck, Some(at(1_010)))
    );
    let before = TenantPullsSeen {
        last_accepted: Some(at(990)),
        last_asked: Some(at(990)),
    };
    // Before: not evidence, and the floor (5 minutes from 990 s) holds the next request back.
    let (step, accepted) = reimport_step(&sg, &fresh, &TenantSeen::Ok, before, &s, at(1_020));
    assert!(is_wait(&step), "{step:?}");
    assert_eq!(accepted, None);
    assert_eq!(
        reimport_step(&sg, &fresh, &TenantSeen::Ok, before, &s, at(1_290)).0,
        ReimportStep::AskPull
    );
}

/// Tenant re-syncs with care: never while the tenant is held or Erred, never when turned off,
/// and with automatic re-syncs off only a wait longer than Waldur's periodic re-sync decides.
#[test]
fn without_re_syncs_only_the_safe_wait_decides() {
    let off = Settings {
        tenant_pulls: false,
        ..settings()
    };
    let none = TenantPullsSeen::default();
    let (sg, fresh) = vanished(1_000, None);
    // Waldur's periodic re-sync runs every 2 hours; it may be 10 minutes late.
    for waited in [1, 45, 2 * 3600 + 600] {
        let (step, _) = reimport_step(&sg, &fresh, &TenantSeen::Ok, none, &off, at(1_000 + waited));
        assert!(is_wait(&step), "{waited}: {step:?}");
    }
    assert!(matches!(
        reimport_step(
            &sg,
            &fresh,
            &TenantSeen::Ok,
            none,
            &off,
            at(1_000 + 3 * 3600)
        )
        .0,
        ReimportStep::Gone(_)
    ));
    // A tenant held by someone else's action: no request, and no evidence either.
    let (step, _) = reimport_step(
        &sg,
        &fresh,
        &TenantSeen::Busy("UPDATING".into()),
        none,
        &settings(),
        at(1_000 + 4 * 3600),
    );
    assert!(is_wait(&step), "{step:?}");
    // A tenant these credentials cannot see: the safe wait, never a request.
    let (step, _) = reimport_step(
        &sg,
        &fresh,
        &TenantSeen::Invisible,
        none,
        &settings(),
        at(1_100),
    );
    assert!(is_wait(&step), "{step:?}");
    // The user knows better: a new request-recreate token makes the group now.
    let mut forced = sg.clone();
    forced.metadata.annotations = Some(BTreeMap::from([(
        crate::api::ANNOTATION_REQUEST_RECREATE.to_string(),
        "1".to_string(),
    )]));
    assert!(matches!(
        reimport_step(&forced, &fresh, &TenantSeen::Ok, none, &off, at(1_001)).0,
        ReimportStep::Gone(ref why) if why.contains("request-recreate")
    ));
    forced.status.as_mut().unwrap().handled_requests = Some(Box::new(HandledRequests {
        recreate: Some("1".into()),
        ..Default::default()
    }));
    let (step, _) = reimport_step(&forced, &fresh, &TenantSeen::Ok, none, &off, at(1_001));
    assert!(
        is_wait(&step),
        "a token acted on is not acted on again: {step:?}"
    );
}

#[test]
fn a_tenant_re_sync_is_due_only_when_on_ok_and_past_the_floor() {
    let s = settings();
    let asked = TenantPullsSeen {
        last_accepted: None,
        last_asked: Some(at(1_000)),
    };
    assert!(tenant_pull_due(
        &s,
        TenantPullsSeen::default(),
        &TenantSeen::Ok,
        at(1_000)
    ));
    assert!(!tenant_pull_due(&s, asked, &TenantSeen::Ok, at(1_299)));
    assert!(tenant_pull_due(&s, asked, &TenantSeen::Ok, at(1_300)));
    assert!(!tenant_pull_due(
        &s,
        TenantPullsSeen::default(),
        &TenantSeen::Erred(String::new()),
        at(1_000)
    ));
    assert!(!tenant_pull_due(
        &s,
        TenantPullsSeen::default(),
        &TenantSeen::Busy("UPDATING".into()),
        at(1_000)
    ));
    let off = Settings {
        tenant_pulls: false,
        ..settings()
    };
    assert!(!tenant_pull_due(
        &off,
        TenantPullsSeen::default(),
        &TenantSeen::Ok,
        at(1_000)
    ));
}

fn created_at(sg: &mut ServerGroup, t: &str) {
    sg.metadata.creation_timestamp = Some(Time(t.parse::<Timestamp>().unwrap()));
}

fn with_intent(sg: &mut ServerGroup, at: &str, foreign: &[&str]) {
    let intent = CreateIntent {
        tenant: TENANT.into(),
        name: "web".into(),
        at: at.into(),
        replaces: sg
            .status
            .as_ref()
            .and_then(|s| s.uuid.clone())
            .unwrap_or_default(),
        foreign: foreign.iter().map(|s| s.to_string()).collect(),
    };
    sg.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            crate::api::ANNOTATION_CREATE_INTENT.into(),
            serde_json::to_string(&intent).unwrap(),
        );
}

/// Own creations are recognised by this resource's create intent: same policy, not there
/// when the create was decided, made no earlier than the intent (less Waldur's clock slack),
/// the oldest first; never without an intent.
#[test]
fn own_creation_is_recognised_by_the_create_intent() {
    let mut sg = resource(Mode::Managed, None, None);
    created_at(&mut sg, "2026-11-27T12:00:00Z");
    let mut ours = group(State::CreationScheduled, "");
    ours.created = "2026-11-27T13:00:00Z".into();
    // No intent: this resource never asked Waldur to create, so no group is its own: a twin
    // must not take the group its sibling's lost create made (the campaign's R6).
    assert_eq!(
        pick_own_creation(&sg, std::slice::from_ref(&ours), Policy::AntiAffinity),
        None
    );
    // The intent written before the POST: ours, even with Waldur's clock 5 s behind.
    with_intent(&mut sg, "2026-11-27T13:00:05Z", &[]);
    assert_eq!(
        pick_own_creation(&sg, std::slice::from_ref(&ours), Policy::AntiAffinity),
        Some(&ours)
    );
    let mut other_policy = ours.clone();
    other_policy.policy = "affinity".into();
    let mut older = ours.clone();
    older.created = "2026-11-27T12:59:00Z".into();
    let mut undated = ours.clone();
    undated.created = String::new();
    for not_ours in [other_policy, older, undated] {
        assert_eq!(
            pick_own_creation(&sg, std::slice::from_ref(&not_ours), Policy::AntiAffinity),
            None,
            "{not_ours:?}"
        );
    }
    // A group that was there when the create was decided is not ours, whatever its time.
    with_intent(&mut sg, "2026-11-27T13:00:05Z", &[UUID]);
    assert_eq!(pick_own_creation(&sg, &[ours], Policy::AntiAffinity), None);
}

/// Review N3: a resource that was once AlreadyManaged (its twin held the name) and then
/// created the group itself, losing the answer, recognises its own group by its create intent
/// whatever its conditions said; an intent from before a group was bound does not stand.
#[test]
fn a_create_intent_outranks_an_old_lost_name() {
    let mut sg = resource(Mode::Managed, None, None);
    sg.status = Some(ServerGroupStatus {
        conditions: vec![Condition {
            type_: READY.into(),
            status: "False".into(),
            reason: ready_reason::ALREADY_MANAGED.into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }],
        ..Default::default()
    });
    let mut ours = group(State::CreationScheduled, "");
    ours.created = "2026-11-27T13:00:00Z".into();
    with_intent(&mut sg, "2026-11-27T13:00:00Z", &[]);
    assert_eq!(
        pick_own_creation(&sg, std::slice::from_ref(&ours), Policy::AntiAffinity),
        Some(&ours)
    );
    let mut bound = resource(
        Mode::Managed,
        Some("11111111111111111111111111111111"),
        Some("n"),
    );
    with_intent(&mut bound, "2026-11-27T13:00:05Z", &[]);
    bound.status.as_mut().unwrap().uuid = Some("22222222222222222222222222222222".into());
    assert_eq!(pending_intent(&bound), None);
}

/// The intent of a create whose answer may have been lost is kept for the next create, so its
/// time still covers the group that create made; a bound group ends it.
#[test]
fn an_intent_is_kept_until_a_group_is_bound() {
    let mut sg = resource(Mode::Managed, None, None);
    let now = at(5_000);
    let (first, fresh) = intent_for_create(&sg, &uuid(TENANT), "web", &[], now);
    assert!(fresh);
    sg.metadata.annotations = Some(BTreeMap::from([(
        crate::api::ANNOTATION_CREATE_INTENT.to_string(),
        serde_json::to_string(&first).unwrap(),
    )]));
    let other = uuid("33333333333333333333333333333333");
    let (again, fresh) = intent_for_create(
        &sg,
        &uuid(TENANT),
        "web",
        std::slice::from_ref(&other),
        at(9_000),
    );
    assert!(!fresh);
    assert_eq!(again.at, first.at);
    assert_eq!(again.foreign, vec![other.to_string()]);
    // Bound since: a recreate starts a fresh intent that names what it replaces.
    sg.status = Some(ServerGroupStatus {
        uuid: Some(UUID.into()),
        ..Default::default()
    });
    let (recreate, fresh) = intent_for_create(&sg, &uuid(TENANT), "web", &[], at(9_000));
    assert!(fresh);
    assert_eq!(recreate.replaces, UUID);
    assert_eq!(recreate.at, at(9_000).to_string());
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
