use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::super::tests::{Mode, TENANT, UUID, group, resource, uuid};
use super::super::*;

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

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(secs).unwrap()
}

#[test]
fn how_a_found_group_is_bound() {
    let known = uuid("11111111111111111111111111111111");
    let found = uuid(UUID);
    let by_backend = Lookup::BackendId("nova-1".into());
    let own = Lookup::OwnCreation {
        tenant: uuid(TENANT),
        name: "web".into(),
        policy: Policy::AntiAffinity,
    };
    assert_eq!(
        binding(&Lookup::Uuid(found.clone()), Some(&found), &found),
        Binding::Known
    );
    assert_eq!(binding(&by_backend, Some(&known), &found), Binding::Rebound);
    assert_eq!(binding(&by_backend, None, &found), Binding::Imported);
    assert_eq!(binding(&own, None, &found), Binding::Adopted);
    assert_eq!(binding(&own, Some(&known), &found), Binding::Adopted);
    assert_eq!(
        binding(&Lookup::Uuid(found.clone()), None, &found),
        Binding::Imported
    );
}

/// A group of the name made just before the intent (within Waldur's clock slack) may be this
/// resource's own lost create: bound while live, but never deleted on that doubt.
#[test]
fn a_deletion_takes_only_a_group_surely_made_after_the_intent() {
    let mut sg = resource(Mode::Managed, None, None);
    with_intent(&mut sg, "2026-11-27T13:00:05Z", &[]);
    let mut doubtful = group(State::Ok, "nova-1");
    doubtful.created = "2026-11-27T13:00:02Z".into();
    let mut surely = group(State::Ok, "nova-2");
    surely.created = "2026-11-27T13:00:06Z".into();
    assert_eq!(
        pick_own_creation(&sg, std::slice::from_ref(&doubtful), Policy::AntiAffinity),
        Some(&doubtful)
    );
    sg.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(1).unwrap()));
    assert_eq!(
        pick_own_creation(&sg, std::slice::from_ref(&doubtful), Policy::AntiAffinity),
        None
    );
    assert_eq!(
        pick_own_creation(&sg, std::slice::from_ref(&surely), Policy::AntiAffinity),
        Some(&surely)
    );
}

/// Twins of one name whose creates both lost their answers: the group carries the description
/// its create sent, so only the twin that sent it takes it for its own.
#[test]
fn a_group_with_other_words_is_not_this_resources_own() {
    let mut sg = resource(Mode::Managed, None, None);
    sg.spec.description = Some("for team a".into());
    with_intent(&mut sg, "2026-11-27T13:00:05Z", &[]);
    let mut theirs = group(State::Ok, "nova-1");
    theirs.created = "2026-11-27T13:00:06Z".into();
    theirs.description = "for team b".into();
    assert_eq!(
        pick_own_creation(&sg, std::slice::from_ref(&theirs), Policy::AntiAffinity),
        None
    );
    let mut ours = theirs.clone();
    ours.description = "for team a".into();
    assert_eq!(
        pick_own_creation(&sg, std::slice::from_ref(&ours), Policy::AntiAffinity),
        Some(&ours)
    );
}

/// A twin's name is held while the other resource's group is away from Waldur: bound (its
/// status keeps the UUID) or awaiting re-import. Not by an unbound resource, an import, an
/// Observe, or another tenant or name (the campaign's seed 16: a twin took the free name while
/// its sibling awaited the re-import, and the re-sync left two groups of the name).
#[test]
fn a_name_is_held_while_the_holders_group_is_away() {
    let tenant = uuid(TENANT);
    let bound = resource(Mode::Managed, Some(UUID), Some("nova-1"));
    assert!(holds_name_while_away(&bound, &tenant, "web"));
    assert!(!holds_name_while_away(&bound, &tenant, "db"));
    let other_tenant = uuid("0000000000000000000000000000000a");
    assert!(!holds_name_while_away(&bound, &other_tenant, "web"));
    let mut awaiting = resource(Mode::Managed, None, None);
    awaiting.status = Some(ServerGroupStatus {
        reimport: Some(crate::api::Reimport {
            backend_id: "nova-1".into(),
            since: None,
            requested_at: None,
            checked_at: None,
            last_seen: None,
        }),
        ..Default::default()
    });
    assert!(holds_name_while_away(&awaiting, &tenant, "web"));
    let unbound = resource(Mode::Managed, None, None);
    assert!(!holds_name_while_away(&unbound, &tenant, "web"));
    for mode in [Mode::ImportUuid, Mode::ImportBackendId, Mode::Observe] {
        let imported = resource(mode, Some(UUID), Some("nova-1"));
        assert!(
            !holds_name_while_away(&imported, &tenant, "web"),
            "{mode:?}"
        );
    }
}

/// A create may have made a group of its tenant and name, but never one it found there.
#[test]
fn a_create_never_made_a_group_it_found_there() {
    let tenant = uuid(TENANT);
    let mut sg = resource(Mode::Managed, None, None);
    with_intent(&mut sg, "2026-11-27T13:00:05Z", &[UUID]);
    let intent = sg.create_intent().unwrap();
    let other = uuid("0000000000000000000000000000000b");
    assert!(may_have_made(&intent, &tenant, "web", &other));
    assert!(
        !may_have_made(&intent, &tenant, "web", &uuid(UUID)),
        "foreign"
    );
    assert!(
        !may_have_made(&intent, &tenant, "db", &other),
        "another name"
    );
    let elsewhere = uuid("0000000000000000000000000000000a");
    assert!(
        !may_have_made(&intent, &elsewhere, "web", &other),
        "another tenant"
    );
}

/// Review m4: a 404 for a bound group counts only once the credentials are shown to see its
/// tenant; no check for a resource that never bound one, or whose own DELETE was seen.
#[test]
fn a_404_for_a_bound_group_needs_its_tenant_seen() {
    let bound = resource(Mode::Managed, Some(UUID), Some("nova-1"));
    assert_eq!(tenant_to_see_before_release(&bound), Some(uuid(TENANT)));
    let never_bound = resource(Mode::Managed, None, None);
    assert_eq!(tenant_to_see_before_release(&never_bound), None);
    for own_delete in ["DELETION_SCHEDULED", "DELETING"] {
        let mut deleting = bound.clone();
        if let Some(s) = deleting.status.as_mut() {
            s.state = Some(own_delete.into());
        }
        assert_eq!(
            tenant_to_see_before_release(&deleting),
            None,
            "{own_delete}"
        );
    }
    // The tenant last observed wins over the spec's (an import names none).
    let other = "0123456789abcdef0123456789abcdef";
    let mut imported = resource(Mode::ImportUuid, Some(UUID), None);
    imported.spec.tenant = None;
    if let Some(s) = imported.status.as_mut() {
        s.tenant_uuid = Some(other.into());
    }
    assert_eq!(tenant_to_see_before_release(&imported), Some(uuid(other)));
}
