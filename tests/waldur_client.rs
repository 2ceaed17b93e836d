//! The Waldur client against the simulator over real HTTP on loopback: every endpoint, every
//! error class, pagination, both vocabularies, UUID forms and the token's secrecy.

use std::sync::Arc;
use std::time::Duration;

use waldur_operator::waldur::{
    Breaker, ClientSettings, ErrorKind, Limiter, Limits, ListQuery, NewServerGroup, Policy,
    ServerGroup, State, Token, WaldurClient, WaldurError, WaldurUuid,
};
use waldur_sim::{Delays, SimConfig, Simulator, Vocabulary};

const TENANT: &str = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";
const TENANT_DASHED: &str = "6b2a0c4e-9f1d-4b7a-8c3e-2f1a0b9c8d7e";

async fn sim(config: SimConfig) -> Simulator {
    Simulator::start(SimConfig {
        delays: Delays::fast(),
        ..config
    })
    .await
    .unwrap()
}

fn client(sim: &Simulator, token: &str) -> WaldurClient {
    let mut s = ClientSettings::new(sim.base_url(), Token::new(token));
    s.retry_min_delay = Duration::from_millis(5);
    s.retry_max_delay = Duration::from_millis(20);
    s.timeout = Duration::from_secs(5);
    WaldurClient::new(&s).unwrap()
}

fn staff(sim: &Simulator) -> WaldurClient {
    client(sim, &SimConfig::default().staff_token)
}

fn user(sim: &Simulator) -> WaldurClient {
    client(sim, &SimConfig::default().user_token)
}

fn tenant() -> WaldurUuid {
    WaldurUuid::parse(TENANT_DASHED).unwrap()
}

fn new(name: &str, policy: Policy) -> NewServerGroup {
    NewServerGroup {
        name: name.into(),
        policy,
        description: Some("made by a test".into()),
    }
}

/// Polls until the group reaches `want` (or is gone, for `None`).
async fn wait_for(c: &WaldurClient, uuid: &WaldurUuid, want: Option<State>) -> Option<ServerGroup> {
    for _ in 0..200 {
        match c.get(uuid, &[]).await {
            Ok(g) if want.is_some() && g.state == want => return Some(g),
            Err(e) if want.is_none() && e.is_not_found() => return None,
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    panic!("{uuid} never reached {want:?}");
}

#[tokio::test]
async fn create_goes_through_the_tenant_action_and_reaches_ok() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    let g = c
        .create(&tenant(), &new("web", Policy::AntiAffinity))
        .await
        .unwrap();
    assert_eq!(g.state, Some(State::CreationScheduled));
    assert_eq!(g.backend_id, "");
    assert!(g.instances.is_empty());
    assert_eq!(g.uuid.as_str().len(), 32);
    assert_eq!(g.tenant_uuid, tenant());
    assert_eq!(sim.requests("create"), 1);
    let ok = wait_for(&c, &g.uuid, Some(State::Ok)).await.unwrap();
    assert!(!ok.backend_id.is_empty());
    assert_eq!(ok.policy, "anti-affinity");
    assert_eq!(ok.description, "made by a test");
}

#[tokio::test]
async fn the_collection_create_answers_500_as_real_waldur_does() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    let err = c
        .create_on_collection(
            "http://x/api/openstack-tenants/x/",
            &new("web", Policy::Affinity),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    assert_eq!(
        sim.requests("create_collection"),
        1,
        "a write is never retried"
    );
    assert!(sim.groups().is_empty());
}

#[tokio::test]
async fn list_reads_every_page_of_more_than_300_groups() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    for i in 0..650 {
        c.create(&tenant(), &new(&format!("g{i:03}"), Policy::Affinity))
            .await
            .unwrap();
    }
    sim.reset_counters();
    let all = c.list(&ListQuery::new()).await.unwrap();
    assert_eq!(all.len(), 650);
    // Pages 1, then 3 and 2, then 1 again (see the next test): one list a sweep more.
    assert_eq!(sim.requests("list"), 4, "300 + 50 + 300 + 300");
    let mut names: Vec<_> = all.iter().map(|g| g.name.clone()).collect();
    names.dedup();
    assert_eq!(names.len(), 650, "no page read twice");
    assert_eq!(c.count(&ListQuery::new()).await.unwrap(), 650);
    // A page size above 300 is clamped by Waldur, and by the client before it.
    sim.reset_counters();
    assert_eq!(
        c.list(&ListQuery::new().page_size(1000))
            .await
            .unwrap()
            .len(),
        650
    );
    assert_eq!(sim.requests("list"), 4);
    // Small pages still add up.
    assert_eq!(
        c.list(&ListQuery::new().page_size(100).name("g01"))
            .await
            .unwrap()
            .len(),
        10
    );
}

/// Offset paging skips a row when rows before it go between two pages: a sweep during a mass
/// deletion then missed groups that were still there, and a deletion that took such a miss
/// for Waldur's 404 would let go of a group still being deleted. The walk reads the pages
/// after the first backwards and the first again, so nothing is skipped.
#[tokio::test]
async fn a_walk_during_deletions_misses_no_group_that_stays() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    for i in 0..650 {
        c.create(&tenant(), &new(&format!("g{i:03}"), Policy::Affinity))
            .await
            .unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    let mut first_page = true;
    let exact = c
        .list_pages(&ListQuery::new(), |page| {
            if first_page {
                // 50 of the first page's groups go before the other pages are read.
                for g in page.iter().take(50) {
                    assert!(sim.waldur_unlink(g.uuid.as_str()));
                }
                first_page = false;
            }
            seen.extend(page.into_iter().map(|g| g.uuid.to_string()));
        })
        .await
        .unwrap();
    assert!(exact);
    let left: Vec<String> = sim
        .groups()
        .iter()
        .map(|g| g["uuid"].as_str().unwrap().replace('-', ""))
        .collect();
    assert_eq!(left.len(), 600);
    let missed: Vec<&String> = left
        .iter()
        .filter(|u| !seen.contains(&u.replace('-', "")))
        .collect();
    assert!(
        missed.is_empty(),
        "{} groups that stayed were missed",
        missed.len()
    );
}

#[tokio::test]
async fn filters_and_sparse_fields() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    let web = c
        .create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap();
    c.create(&tenant(), &new("web-2", Policy::Affinity))
        .await
        .unwrap();
    let web = wait_for(&c, &web.uuid, Some(State::Ok)).await.unwrap();
    let exact = c
        .list(&ListQuery::new().tenant_uuid(&tenant()).name_exact("web"))
        .await
        .unwrap();
    assert_eq!(
        exact.iter().map(|g| g.uuid.clone()).collect::<Vec<_>>(),
        vec![web.uuid.clone()]
    );
    assert_eq!(
        c.list(&ListQuery::new().name("web")).await.unwrap().len(),
        2
    );
    let by_backend = c
        .list(&ListQuery::new().backend_id(&web.backend_id))
        .await
        .unwrap();
    assert_eq!(by_backend.len(), 1);
    assert_eq!(c.count(&ListQuery::new().uuid(&web.uuid)).await.unwrap(), 1);
    let sparse = c
        .list(
            &ListQuery::new()
                .name_exact("web")
                .fields(&["uuid", "state"]),
        )
        .await
        .unwrap();
    assert_eq!(sparse[0].uuid, web.uuid);
    assert_eq!(sparse[0].state, Some(State::Ok));
    assert_eq!(sparse[0].name, "", "fields not asked for are absent");
    let ordered = c.list(&ListQuery::new().order_by("-name")).await.unwrap();
    assert_eq!(ordered[0].name, "web-2");
    let one = c.get(&web.uuid, &["uuid", "backend_id"]).await.unwrap();
    assert_eq!(one.backend_id, web.backend_id);
    assert_eq!(one.state, None);
}

#[tokio::test]
async fn dashed_and_undashed_uuids_reach_the_same_group() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    let g = c
        .create(
            &WaldurUuid::parse(TENANT).unwrap(),
            &new("web", Policy::Affinity),
        )
        .await
        .unwrap();
    let raw = g.uuid.as_str();
    let dashed = format!(
        "{}-{}-{}-{}-{}",
        &raw[..8],
        &raw[8..12],
        &raw[12..16],
        &raw[16..20],
        &raw[20..]
    )
    .to_uppercase();
    let again = c
        .get(&WaldurUuid::parse(&dashed).unwrap(), &[])
        .await
        .unwrap();
    assert_eq!(again.uuid, g.uuid);
}

#[tokio::test]
async fn the_legacy_vocabulary_parses_to_the_same_states() {
    let sim = sim(SimConfig {
        vocabulary: Vocabulary::Legacy,
        ..Default::default()
    })
    .await;
    let c = staff(&sim);
    let g = c
        .create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap();
    assert_eq!(g.state, Some(State::CreationScheduled));
    let raw = sim.group(g.uuid.as_str()).unwrap();
    wait_for(&c, &g.uuid, Some(State::Ok)).await;
    sim.force_state(g.uuid.as_str(), "ERRED");
    assert_eq!(c.get(&g.uuid, &[]).await.unwrap().state, Some(State::Erred));
    assert!(
        raw["state"].as_str().unwrap().contains(' '),
        "the simulator spoke legacy: {raw}"
    );
}

#[tokio::test]
async fn affinity_only_servers_reject_other_policies_with_their_message() {
    let sim = sim(SimConfig {
        affinity_only: true,
        ..Default::default()
    })
    .await;
    let c = staff(&sim);
    let err = c
        .create(&tenant(), &new("web", Policy::AntiAffinity))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert_eq!(
        err.waldur_message(),
        "policy: \"anti-affinity\" is not a valid choice."
    );
    c.create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap();
}

#[tokio::test]
async fn invalid_requests_keep_waldurs_field_messages() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    c.create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap();
    let dup = c
        .create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap_err();
    assert_eq!(dup.kind(), ErrorKind::Invalid);
    assert_eq!(dup.waldur_message(), "Server group name should be unique.");
    let long = c
        .create(&tenant(), &new(&"x".repeat(151), Policy::Affinity))
        .await
        .unwrap_err();
    assert!(long.waldur_message().starts_with("name: "), "{long}");
    let missing = c
        .create(
            &WaldurUuid::parse("00000000000000000000000000000009").unwrap(),
            &new("a", Policy::Affinity),
        )
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn transitional_states_refuse_pull_and_delete_with_409() {
    let sim = sim(SimConfig {
        delays: Delays {
            schedule: Duration::from_millis(300),
            run: Duration::from_millis(300),
        },
        ..Default::default()
    })
    .await;
    let c = staff(&sim);
    let g = c
        .create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap();
    assert_eq!(
        c.pull(&g.uuid).await.unwrap_err().kind(),
        ErrorKind::Conflict
    );
    let err = c.delete(&g.uuid).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(
        err.waldur_message(),
        "Valid states for operation: OK, ERRED."
    );
}

#[tokio::test]
async fn pull_without_a_backend_id_is_invalid_with_waldurs_bare_list_message() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    sim.fail_next_creates(1);
    let g = c
        .create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap();
    let erred = wait_for(&c, &g.uuid, Some(State::Erred)).await.unwrap();
    assert!(!erred.error_message.is_empty());
    let err = c.pull(&g.uuid).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert_eq!(err.waldur_message(), "Resource does not have backend ID.");
}

#[tokio::test]
async fn pull_delete_set_ok_set_erred_and_unlink() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    let g = c
        .create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap();
    wait_for(&c, &g.uuid, Some(State::Ok)).await;
    c.pull(&g.uuid).await.unwrap();
    assert!(matches!(
        c.get(&g.uuid, &[]).await.unwrap().state,
        Some(State::UpdateScheduled | State::Updating)
    ));
    wait_for(&c, &g.uuid, Some(State::Ok)).await;
    c.set_erred(&g.uuid, Some("stuck"), Some("trace"))
        .await
        .unwrap();
    let erred = c.get(&g.uuid, &[]).await.unwrap();
    assert_eq!(
        (erred.state, erred.error_message.as_str()),
        (Some(State::Erred), "stuck")
    );
    c.set_ok(&g.uuid).await.unwrap();
    let ok = c.get(&g.uuid, &[]).await.unwrap();
    assert_eq!((ok.state, ok.error_message.as_str()), (Some(State::Ok), ""));
    c.delete(&g.uuid).await.unwrap();
    assert!(matches!(
        c.get(&g.uuid, &[]).await.unwrap().state,
        Some(State::DeletionScheduled | State::Deleting)
    ));
    wait_for(&c, &g.uuid, None).await;

    let h = c
        .create(&tenant(), &new("other", Policy::Affinity))
        .await
        .unwrap();
    c.unlink(&h.uuid).await.unwrap();
    assert!(c.get(&h.uuid, &[]).await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn staff_only_actions_are_forbidden_to_users() {
    let sim = sim(SimConfig::default()).await;
    let g = staff(&sim)
        .create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap();
    let u = user(&sim);
    for err in [
        u.unlink(&g.uuid).await.unwrap_err(),
        u.set_ok(&g.uuid).await.unwrap_err(),
        u.set_erred(&g.uuid, None, None).await.unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::Forbidden, "{err}");
    }
    // The user sees the group in its own tenant.
    assert_eq!(u.get(&g.uuid, &[]).await.unwrap().uuid, g.uuid);
}

#[tokio::test]
async fn invisible_groups_are_404_for_users() {
    let sim = sim(SimConfig {
        tenants: vec![TENANT.into(), "11111111111111111111111111111111".into()],
        user_tenants: vec![TENANT.into()],
        ..Default::default()
    })
    .await;
    let hidden = WaldurUuid::parse("11111111111111111111111111111111").unwrap();
    let g = staff(&sim)
        .create(&hidden, &new("secret", Policy::Affinity))
        .await
        .unwrap();
    let u = user(&sim);
    assert!(u.get(&g.uuid, &[]).await.unwrap_err().is_not_found());
    assert!(u.list(&ListQuery::new()).await.unwrap().is_empty());
    assert_eq!(
        u.create(&hidden, &new("x", Policy::Affinity))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn servers_before_8_0_0_have_no_recovery_actions() {
    for config in [
        SimConfig {
            pre_8_0_0: true,
            ..Default::default()
        },
        SimConfig {
            version: waldur_sim::WaldurVersion::V7_0,
            ..Default::default()
        },
    ] {
        let sim = sim(config).await;
        let c = staff(&sim);
        let g = c
            .create(&tenant(), &new("web", Policy::Affinity))
            .await
            .unwrap();
        for err in [
            c.set_ok(&g.uuid).await.unwrap_err(),
            c.set_erred(&g.uuid, None, None).await.unwrap_err(),
        ] {
            // An HTML 404: the route is missing, the group is not gone.
            assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
            assert!(!err.is_not_found());
        }
    }
}

#[tokio::test]
async fn a_bad_token_is_unauthorized_and_never_formatted() {
    let sim = sim(SimConfig::default()).await;
    let secret = "tok-abc-very-secret";
    let c = client(&sim, secret);
    let err = c.list(&ListQuery::new()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    assert!(!format!("{err} {err:?} {c:?}").contains(secret));
}

#[tokio::test]
async fn no_error_class_shows_the_token() {
    let sim = sim(SimConfig::default()).await;
    let token = SimConfig::default().staff_token;
    let c = staff(&sim);
    let missing = WaldurUuid::parse("00000000000000000000000000000001").unwrap();
    sim.set_failing(Some(503));
    let transient = c.get(&missing, &[]).await.unwrap_err();
    sim.set_failing(None);
    sim.drop_next_connections(4); // one try and three retries
    let dropped = c.get(&missing, &[]).await.unwrap_err();
    let errors: Vec<WaldurError> = vec![
        transient,
        dropped,
        c.get(&missing, &[]).await.unwrap_err(),
        c.create(&tenant(), &new(" ", Policy::Affinity))
            .await
            .unwrap_err(),
        user(&sim).unlink(&missing).await.unwrap_err(),
    ];
    for e in &errors {
        let shown = format!("{e} {e:?} {}", e.waldur_message());
        assert!(!shown.contains(&token), "{shown}");
    }
    let kinds: Vec<ErrorKind> = errors.iter().map(WaldurError::kind).collect();
    assert_eq!(
        kinds[..4],
        [
            ErrorKind::Transient,
            ErrorKind::Transient,
            ErrorKind::NotFound,
            ErrorKind::Invalid
        ]
    );
}

#[tokio::test]
async fn reads_retry_transient_failures_writes_do_not() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    sim.fail_next_requests(2, 502);
    assert!(
        c.list(&ListQuery::new()).await.is_ok(),
        "two 502s are retried away"
    );
    assert_eq!(sim.requests("list"), 3);
    sim.drop_next_connections(1);
    assert!(
        c.count(&ListQuery::new()).await.is_ok(),
        "a dropped connection is retried for reads"
    );
    sim.fail_next_requests(1, 503);
    let err = c
        .create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap_err();
    assert!(err.is_transient());
    assert_eq!(
        sim.requests("create"),
        1,
        "a write that failed is not sent again"
    );
    // Retries are bounded: a persistent outage ends in an error, not a hang.
    sim.set_failing(Some(503));
    sim.reset_counters();
    assert!(c.list(&ListQuery::new()).await.unwrap_err().is_transient());
    assert_eq!(sim.requests("list"), 4, "one try and three retries");
}

#[tokio::test]
async fn timeouts_and_slow_bodies_are_transient() {
    let sim = sim(SimConfig::default()).await;
    let mut s = ClientSettings::new(sim.base_url(), Token::new(SimConfig::default().staff_token));
    s.timeout = Duration::from_millis(200);
    s.read_retries = 0;
    let c = WaldurClient::new(&s).unwrap();
    sim.set_latency(Duration::from_millis(500));
    let err = c.list(&ListQuery::new()).await.unwrap_err();
    assert!(
        err.is_transient() && err.to_string().contains("timed out"),
        "{err}"
    );
    sim.set_latency(Duration::ZERO);
    sim.set_slow_body(Some(Duration::from_millis(300)));
    assert!(c.list(&ListQuery::new()).await.unwrap_err().is_transient());
}

#[tokio::test]
async fn the_resync_deletes_vanished_rows_and_reimports_under_new_uuids() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    let a = c
        .create(&tenant(), &new("a", Policy::Affinity))
        .await
        .unwrap();
    let b = c
        .create(&tenant(), &new("b", Policy::Affinity))
        .await
        .unwrap();
    let a = wait_for(&c, &a.uuid, Some(State::Ok)).await.unwrap();
    let b = wait_for(&c, &b.uuid, Some(State::Ok)).await.unwrap();
    sim.openstack_delete(&a.backend_id);
    c.unlink(&b.uuid).await.unwrap();
    sim.resync_now().await;
    assert!(
        c.get(&a.uuid, &[]).await.unwrap_err().is_not_found(),
        "gone from OpenStack: row deleted"
    );
    let back = c
        .list(&ListQuery::new().backend_id(&b.backend_id))
        .await
        .unwrap();
    assert_eq!(back.len(), 1);
    assert_ne!(back[0].uuid, b.uuid, "re-imported under a new UUID");
    assert_eq!(back[0].state, Some(State::Ok));
}

#[tokio::test]
async fn a_base_url_with_api_suffix_works() {
    let sim = sim(SimConfig::default()).await;
    let s = ClientSettings::new(
        format!("{}/api/", sim.base_url()),
        Token::new(SimConfig::default().staff_token),
    );
    let c = WaldurClient::new(&s).unwrap();
    assert_eq!(c.count(&ListQuery::new()).await.unwrap(), 0);
}

/// A real Waldur orders the list only by tenant name, so the rows of one tenant come in a
/// different order on each request: a paged read without `o=` repeats some and misses others.
/// The batched read path's sweep must still see every group of a tenant with 1,000 of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_of_one_tenant_with_1000_groups_misses_none() {
    use kube::runtime::reflector;
    use waldur_operator::controller::index::{Answer, SweepTiming, WaldurIndex};

    let sim = sim(SimConfig::default()).await;
    for i in 0..1000 {
        sim.openstack_create(TENANT, &format!("g-{i:04}"), "affinity");
    }
    sim.resync_now().await;
    let uuids: Vec<WaldurUuid> = sim
        .groups()
        .iter()
        .map(|g| WaldurUuid::parse(g["uuid"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(uuids.len(), 1000);
    // Resources import the first 500 groups: the index keeps records of those, and only
    // fingerprints of the other 500, which no resource of this process could ask about.
    let (store, mut writer) = reflector::store();
    for (i, uuid) in uuids.iter().take(500).enumerate() {
        let mut sg = waldur_operator::api::ServerGroup::new(
            &format!("imp-{i}"),
            waldur_operator::api::ServerGroupSpec {
                import: Some(waldur_operator::api::ImportSource {
                    uuid: Some(uuid.to_string()),
                    backend_id: None,
                }),
                ..Default::default()
            },
        );
        sg.metadata.namespace = Some("team-a".into());
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(sg));
    }
    let (wake, _woken) = futures::channel::mpsc::unbounded();
    let index = std::sync::Arc::new(WaldurIndex::new(
        SweepTiming {
            busy: Duration::from_secs(60),
            settled: Duration::from_secs(60),
            after_write: Duration::from_secs(1),
        },
        store,
        wake,
    ));
    let shard = index.shard("staff", &staff(&sim));
    shard.wait_complete(Duration::from_secs(30)).await;
    let missing: Vec<&WaldurUuid> = uuids[..500]
        .iter()
        .filter(|u| !matches!(shard.lookup_uuid(u), Answer::Found(_)))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of 500 wanted groups missing from the snapshot",
        missing.len()
    );
    // Seen but not kept: "ask Waldur", never "missing" (which would let a create duplicate).
    let unseen = uuids[500..]
        .iter()
        .filter(|u| shard.lookup_uuid(u) != Answer::Unknown)
        .count();
    assert_eq!(unseen, 0, "every group the sweep saw is known to exist");
    assert_eq!(
        sim.requests("list"),
        5,
        "four pages of 300, each read once, and the first once more at the end"
    );
}

/// The on-demand tenant re-sync: 202 at once, the rows change a moment later (here: a group
/// unlinked from Waldur comes back under a new UUID); 409 while the tenant is not OK.
#[tokio::test]
async fn the_tenant_re_sync_is_scheduled_and_re_imports_unlinked_groups() {
    let sim = sim(SimConfig::default()).await;
    let c = staff(&sim);
    let g = c
        .create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap();
    let backend = wait_for(&c, &g.uuid, Some(State::Ok))
        .await
        .expect("OK")
        .backend_id;
    c.unlink(&g.uuid).await.unwrap();
    c.pull_tenant_server_groups(&tenant()).await.unwrap();
    assert_eq!(sim.requests("pull_server_groups"), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let back = c
            .list(&ListQuery::new().backend_id(&backend))
            .await
            .unwrap();
        if let Some(row) = back.first() {
            assert_ne!(row.uuid, g.uuid, "re-imported under a new UUID");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not re-imported in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim.set_tenant_ok(TENANT, false);
    let err = c.pull_tenant_server_groups(&tenant()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
}

/// Review m8: an answer is never read without a bound. A success body past 16 MiB is an
/// error (half a page must not be acted on); an error body is cut to what is quoted.
#[tokio::test]
async fn bodies_are_read_with_a_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for status in ["200 OK", "502 Bad Gateway"] {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let len = waldur_operator::waldur::MAX_BODY + 1;
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/html\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
            );
            if stream.write_all(head.as_bytes()).await.is_err() {
                continue;
            }
            let block = vec![b'x'; 1 << 20];
            let mut sent = 0;
            while sent < len {
                let n = block.len().min(len - sent);
                if stream.write_all(&block[..n]).await.is_err() {
                    break;
                }
                sent += n;
            }
        }
    });
    let client = WaldurClient::new(&ClientSettings::new(
        format!("http://{addr}"),
        Token::new("t"),
    ))
    .unwrap();
    let uuid = WaldurUuid::parse(TENANT).unwrap();
    let too_big = client.get(&uuid, &[]).await.unwrap_err();
    assert!(
        too_big.to_string().contains("larger than 16 MiB"),
        "{too_big}"
    );
    let cut = client.delete(&uuid).await.unwrap_err();
    assert!(
        cut.to_string().len() < 1_000,
        "the quoted error stays short"
    );
}

// ----- one view of each Waldur's health (review N1, N4) and fairness (N5) -----

fn shared(sim: &Simulator, token: &str, breaker: &Arc<Breaker>) -> WaldurClient {
    client(sim, token).with_breaker(breaker.clone())
}

/// Review N1: a reconcile aborted while its request was the breaker's probe (a leadership
/// term ending mid-request) must not leave the probe slot taken for good. The breaker is
/// opened from a runtime that then ends, so its prober is gone too: the waiting request is
/// the only one that can find out that Waldur answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_cancelled_mid_request_does_not_keep_the_breaker_open() {
    let sim = sim(SimConfig::default()).await;
    let breaker = Arc::new(Breaker::new(sim.base_url()));
    sim.drop_next_connections(usize::MAX);
    let opener = shared(&sim, &SimConfig::default().staff_token, &breaker);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..3 {
                let _ = opener.list(&ListQuery::new()).await;
            }
        });
    })
    .join()
    .unwrap();
    assert!(breaker.is_open());
    sim.drop_next_connections(0);
    sim.set_latency(Duration::from_secs(60));
    let c = shared(&sim, &SimConfig::default().staff_token, &breaker);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let probe = tokio::spawn({
        let c = c.clone();
        async move { c.list(&ListQuery::new()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!probe.is_finished(), "the probe waits for Waldur");
    probe.abort();
    let _ = probe.await;
    sim.set_latency(Duration::ZERO);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match c.list(&ListQuery::new()).await {
            Ok(_) => break,
            Err(e) if e.is_unavailable() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("Waldur answers, yet the breaker still holds requests: {e}"),
        }
    }
    assert!(!breaker.is_open());
}

/// Review N4: one object's 500s (with the read's retries) are that object's trouble. They
/// never mark the whole Waldur unreachable for other tokens and tenants.
#[tokio::test]
async fn one_objects_500s_never_mark_waldur_unreachable() {
    let sim = sim(SimConfig::default()).await;
    let breaker = Arc::new(Breaker::new(sim.base_url()));
    let staff = shared(&sim, &SimConfig::default().staff_token, &breaker);
    let user = shared(&sim, &SimConfig::default().user_token, &breaker);
    let g = staff
        .create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap();
    sim.reset_counters();
    sim.fail_next_requests_for("retrieve", 4, 500);
    let err = staff.get(&g.uuid, &[]).await.unwrap_err();
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    assert_eq!(sim.requests("retrieve"), 4, "one try and three retries");
    assert!(!breaker.is_open());
    user.list(&ListQuery::new()).await.unwrap();
}

/// Review N4: the retries of one request are one piece of evidence, not three; failures of
/// several distinct requests with no answer in between open the breaker.
#[tokio::test]
async fn only_several_distinct_requests_timing_out_open_the_breaker() {
    let sim = sim(SimConfig::default()).await;
    let breaker = Arc::new(Breaker::new(sim.base_url()));
    let mut s = ClientSettings::new(sim.base_url(), Token::new(SimConfig::default().staff_token));
    s.timeout = Duration::from_millis(200);
    s.retry_min_delay = Duration::from_millis(5);
    s.retry_max_delay = Duration::from_millis(20);
    let c = WaldurClient::new(&s).unwrap().with_breaker(breaker.clone());
    let g = c
        .create(&tenant(), &new("web", Policy::Affinity))
        .await
        .unwrap();
    sim.set_latency(Duration::from_secs(1));
    assert!(c.list(&ListQuery::new()).await.unwrap_err().is_transient());
    assert!(!breaker.is_open(), "one request timing out four times");
    assert!(c.count(&ListQuery::new()).await.unwrap_err().is_transient());
    assert!(!breaker.is_open(), "two requests");
    assert!(c.get(&g.uuid, &[]).await.unwrap_err().is_transient());
    assert!(breaker.is_open(), "three distinct requests timed out");
}

/// Review N5: a Waldur (a namespace's Secret `url`) that answers every request after a long
/// delay cannot take every in-flight slot of the shared limiter: requests to another Waldur
/// still go at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_waldur_cannot_take_every_slot_from_another() {
    let slow = sim(SimConfig::default()).await;
    let fast = sim(SimConfig::default()).await;
    slow.set_latency(Duration::from_secs(10));
    let limiter = Arc::new(Limiter::new(Limits {
        max_in_flight: 4,
        rate_per_second: 0.0,
    }));
    let s = staff(&slow).with_limiter(limiter.clone());
    let f = staff(&fast).with_limiter(limiter.clone());
    let hogs: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.count(&ListQuery::new()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    f.list(&ListQuery::new()).await.unwrap();
    let took = started.elapsed();
    for h in &hogs {
        h.abort();
    }
    assert!(
        took < Duration::from_secs(1),
        "waited {took:?} behind the slow Waldur"
    );
}
