//! The `waldur-operator` binary's own surface, as a user meets it: flags and environment,
//! sub-commands, exit codes, signals, the HTTP endpoints, and the Waldur request budget.
//! These run on the Kubernetes API test server (fast); the real tier runs the same binary in
//! every scenario.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_test_server::TestServer;

use crate::env::{Env, Kind, OPERATOR, http_get, wait_http_ok};
use crate::{groups_named, spec};

#[test]
fn version_and_crd() {
    let out = Command::new(OPERATOR).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("waldur-operator {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(OPERATOR).arg("crd").output().unwrap();
    assert!(out.status.success());
    let checked_in = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/servergroups.openstack.waldur.com.yaml"
    ))
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        checked_in,
        "crds/ is what `waldur-operator crd` prints"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_the_crd_exits_non_zero_saying_how_to_install_it() {
    let server = TestServer::start().await.unwrap();
    let dir = std::env::temp_dir().join(format!("wsg-no-crd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig_yaml("default")).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(OPERATOR)
            .arg("run")
            .env("KUBECONFIG", &kubeconfig)
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env_remove("WALDUR_URL")
            .env_remove("WALDUR_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the ServerGroup CRD is not installed")
            && stderr.contains("kubectl apply -f crds/"),
        "{stderr}"
    );
}

/// The shipped binary, given `[::]` as the chart's METRICS_ADDR does, answers its probes on
/// IPv4 and on IPv6: an IPv6-only or an IPv4-only cluster's kubelet both reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probes_answer_on_ipv4_and_ipv6() {
    let env = Env::new(Kind::TestServer, "dual-stack").await;
    let port = control_plane::free_port().expect("a free port");
    let addr = format!("[::]:{port}");
    let (pid, _) = env.spawn_operator(&[("METRICS_ADDR", addr.as_str())], &[]);
    for host in ["127.0.0.1", "[::1]"] {
        wait_http_ok(&format!("http://{host}:{port}/healthz"), || {
            env.with_operator(pid, |o| o.exited().map(|s| format!("exited: {s}")))
        })
        .await;
    }
}

/// The floor on polling holds for the admin's flag too: the binary refuses to start.
#[test]
fn a_resync_period_under_30s_is_refused_at_start() {
    let out = Command::new(OPERATOR)
        .args(["run", "--resync-period", "10s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shorter than 30s"), "{stderr}");
}

/// Review m14: a busy sweep pace of 0s made the failure back-off 0x2^n, a hot loop against
/// a failing Waldur. The binary refuses a pace under 100ms before it starts anything.
#[test]
fn a_busy_sweep_under_100ms_is_refused_at_start() {
    for pace in ["0s", "50ms"] {
        let out = Command::new(OPERATOR)
            .args(["run", "--busy-sweep", pace])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{pace}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("shorter than 100ms"), "{stderr}");
    }
}

/// The admin's Waldur host list and per-URL cap are checked at start: a URL where a host
/// name belongs, or a cap of 0, stop the binary with a message saying what is expected.
#[test]
fn a_bad_waldur_host_list_or_per_url_cap_is_refused_at_start() {
    let out = Command::new(OPERATOR)
        .arg("run")
        .env(
            "ALLOWED_WALDUR_HOSTS",
            "waldur.example.com,https://other.example.com/api",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not a host name") && stderr.contains("ALLOWED_WALDUR_HOSTS"),
        "{stderr}"
    );
    let out = Command::new(OPERATOR)
        .args(["run", "--waldur-max-in-flight-per-url", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--waldur-max-in-flight-per-url"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_namespace_scope_token_file_and_sigterm() {
    let env = Env::new(Kind::TestServer, "binary-surface").await;
    let token_file = env.dir.join("token");
    std::fs::write(&token_file, "staff-token\n").unwrap();
    let token_path = token_file.to_string_lossy().into_owned();
    // The token comes from the file alone: WALDUR_TOKEN is unset.
    let pid = env
        .start_operator_with(&[
            ("WALDUR_TOKEN", ""),
            ("WALDUR_TOKEN_FILE", &token_path),
            ("LEADER_ELECT", "true"),
            ("LEASE_NAME", "waldur-operator"),
            ("POD_NAME", "replica-x"),
        ])
        .await;
    let port = env.with_operator(pid, |o| o.metrics);
    let (code, body) = http_get(&format!("http://127.0.0.1:{port}/healthz")).await;
    assert_eq!((code, body.trim()), (200, "ok"));
    // Ready once it leads and its cache is synced.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(&format!("http://127.0.0.1:{port}/readyz")).await;
        if code == 200 && body.trim() == "ok: leader" {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz: {code} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // In the watched namespace: reconciled. Elsewhere: untouched.
    env.server().create_namespace("elsewhere").unwrap();
    env.apply("mine", spec("affinity")).await.unwrap();
    let other: Api<waldur_operator::api::ServerGroup> =
        Api::namespaced(env.kube.clone(), "elsewhere");
    let obj = serde_json::json!({
        "apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
        "metadata": {"name": "theirs", "namespace": "elsewhere"}, "spec": spec("affinity"),
    });
    other
        .patch(
            "theirs",
            &kube::api::PatchParams::apply("e2e-user"),
            &kube::api::Patch::Apply(obj),
        )
        .await
        .unwrap();
    env.wait_ready("mine").await;
    let theirs = other.get("theirs").await.unwrap();
    // Untouched: no finalizer, and the status is the CRD's default, not one the operator wrote.
    let default_status = waldur_operator::api::ServerGroupStatus {
        observed_generation: Some(0),
        ..Default::default()
    };
    assert_eq!(theirs.status.unwrap_or_default(), default_status);
    assert!(theirs.metadata.finalizers.is_none());
    assert_eq!(groups_named(&env, "theirs"), 0);

    let (code, metrics) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(code, 200);
    for family in [
        "waldur_operator_waldur_requests_total{",
        "waldur_operator_reconciles_total",
        "waldur_operator_leader{shard=\"0\",shards=\"1\"} 1",
        "waldur_operator_build_info{",
    ] {
        assert!(metrics.contains(family), "{family} missing from\n{metrics}");
    }
    let leases: Api<Lease> = Api::namespaced(env.kube.clone(), &env.ns);
    let holder = |l: Option<Lease>| l.and_then(|l| l.spec).and_then(|s| s.holder_identity);
    assert_eq!(
        holder(leases.get_opt("waldur-operator").await.unwrap()).as_deref(),
        Some("replica-x")
    );

    let status = env.terminate(pid).await;
    assert!(
        status.success(),
        "SIGTERM ends the process cleanly: {status}"
    );
    let log = env.with_operator(pid, |o| o.log_text());
    assert!(log.contains("shutting down"), "{log}");
    assert!(
        !log.contains("staff-token"),
        "the token never shows in logs"
    );
    assert_eq!(
        holder(leases.get_opt("waldur-operator").await.unwrap()),
        None,
        "the Lease is released for the next replica instead of left to expire"
    );
}

/// Every Waldur request of the binary, the default credentials' included, goes through one
/// budget: `--waldur-rate` requests per second (bursts up to one second's worth) and
/// `--waldur-max-in-flight` at once; and each is counted in
/// `waldur_operator_waldur_requests_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_waldur_request_obeys_the_rate_and_in_flight_limits() {
    let env = Env::new(Kind::TestServer, "budget").await;
    env.sim.set_latency(Duration::from_millis(100));
    let pid = env
        .start_operator_with(&[("WALDUR_RATE", "2"), ("WALDUR_MAX_IN_FLIGHT", "1")])
        .await;
    let port = env.with_operator(pid, |o| o.metrics);
    let started = Instant::now();
    for i in 0..20 {
        env.apply(&format!("b-{i:02}"), spec("affinity"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let arrivals = env.sim.arrivals();
    assert!(
        arrivals.len() >= 8,
        "the operator did work: {} requests",
        arrivals.len()
    );
    // Any window of w seconds holds at most one second's burst plus w seconds' worth.
    for w in [1u64, 3, 5] {
        let window = Duration::from_secs(w);
        let most = arrivals
            .iter()
            .enumerate()
            .map(|(i, t)| {
                arrivals[i..]
                    .iter()
                    .take_while(|u| **u - *t < window)
                    .count()
            })
            .max()
            .unwrap_or(0);
        let allowed = 2 + 2 * w as usize;
        assert!(
            most <= allowed,
            "{most} requests within {w} s at --waldur-rate 2 (at most {allowed})"
        );
    }
    assert_eq!(
        env.sim.peak_in_flight(),
        1,
        "--waldur-max-in-flight 1: never two requests at once"
    );
    eprintln!(
        "{} Waldur requests in {:.1} s at --waldur-rate 2",
        arrivals.len(),
        started.elapsed().as_secs_f64()
    );
    // The metric counts what the simulator saw, the only Waldur this operator talks to (one
    // request may be on its way at the moment of reading).
    let body = wait_http_ok(&format!("http://127.0.0.1:{port}/metrics"), || None).await;
    let counted: f64 = body
        .lines()
        .filter(|l| l.starts_with("waldur_operator_waldur_requests_total{"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    let seen = env.sim.total_requests() as f64;
    assert!(
        (counted - seen).abs() <= 1.0,
        "waldur_operator_waldur_requests_total = {counted}, the simulator saw {seen}"
    );
}

/// Every Kubernetes request the reconcilers make goes through one budget, `--kube-qps` a
/// second with bursts of `--kube-burst` (client-go's QPS and Burst): the binary counts them,
/// waits when the bucket is empty, says so in its metrics, and loses no work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kubernetes_request_obeys_the_kube_budget() {
    let env = Env::new(Kind::TestServer, "kube-budget").await;
    let started = Instant::now();
    let pid = env
        .start_operator_with(&[("KUBE_QPS", "4"), ("KUBE_BURST", "4")])
        .await;
    let port = env.with_operator(pid, |o| o.metrics);
    let names: Vec<String> = (0..6).map(|i| format!("q-{i:02}")).collect();
    for name in &names {
        env.apply(name, spec("affinity")).await.unwrap();
    }
    // Each creation costs about five requests: 30 at 4 a second, so the budget must hold
    // some back, and everything still gets done.
    for name in &names {
        env.wait_ready(name).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let body = wait_http_ok(&format!("http://127.0.0.1:{port}/metrics"), || None).await;
    let metric = |name: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    };
    let requests = metric("waldur_operator_kube_requests_total");
    let throttled = metric("waldur_operator_kube_requests_throttled_total");
    eprintln!(
        "{requests} Kubernetes requests through the budget, {throttled} held back, all Ready in {elapsed:.1} s"
    );
    assert!(
        requests >= 20.0,
        "the reconcilers' requests are counted: {requests}"
    );
    assert!(
        throttled > 0.0,
        "at --kube-qps 4 some of {requests} requests had to wait"
    );
    // Never more than the burst and 4 a second since the process started.
    let allowed = 4.0 + 4.0 * elapsed + 1.0;
    assert!(
        requests <= allowed,
        "{requests} requests in {elapsed:.1} s at --kube-qps 4 (at most {allowed:.0})"
    );
}

/// A lone leader keeps its term through many renewals: its watchdog's deadline must fall after
/// the lease manager's renewal (`duration - grace`), not on it. With the chart's 15 s / 5 s
/// the two used to coincide, and a leader could end its own term at every renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_leader_keeps_leading_through_renewals() {
    let env = Env::new(Kind::TestServer, "renewals").await;
    // The chart's ratio, scaled down: renewal 2 s after each renewal, duration 3 s.
    let pid = env
        .start_operator_with(&[
            ("LEADER_ELECT", "true"),
            ("POD_NAME", "alone"),
            ("LEASE_DURATION", "3s"),
            ("LEASE_GRACE", "1s"),
        ])
        .await;
    let port = env.with_operator(pid, |o| o.metrics);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(&format!("http://127.0.0.1:{port}/readyz"))
        .await
        .1
        .trim()
        != "ok: leader"
    {
        assert!(Instant::now() < deadline, "never led");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What users can see, not log phrases (test-suite audit m4): the leader gauge never drops
    // while the Lease is renewed several times, and the Lease never changes hands.
    let leases: Api<Lease> = Api::namespaced(env.kube.clone(), &env.ns);
    let lease = || async {
        let spec = leases
            .get("waldur-operator")
            .await
            .unwrap()
            .spec
            .unwrap_or_default();
        (
            spec.holder_identity,
            spec.lease_transitions,
            spec.renew_time.map(|t| t.0),
        )
    };
    let (holder, transitions, first_renewal) = lease().await;
    assert_eq!(holder.as_deref(), Some("alone"));
    let leader_gauge = "waldur_operator_leader{shard=\"0\",shards=\"1\"}";
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let (_, metrics) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
        assert!(
            metrics.contains(&format!("{leader_gauge} 1")),
            "the leader ended its own term:\n{}",
            env.with_operator(pid, |o| o.log_text())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (holder, transitions_after, last_renewal) = lease().await;
    assert_eq!(holder.as_deref(), Some("alone"));
    assert_eq!(
        transitions_after, transitions,
        "the Lease never changed hands"
    );
    let renewed_for = last_renewal
        .zip(first_renewal)
        .map(|(last, first)| last.duration_since(first).as_secs_f64())
        .unwrap_or_default();
    assert!(
        renewed_for >= 4.0,
        "renewed across the window (2 s apart): the last renewal came {renewed_for} s after the first"
    );
}

/// The shipped binary runs jemalloc with the compiled-in settings the memory figures were
/// measured with (one arena, pages back after a second); jemalloc prints the settings in
/// effect when asked to through its environment variable.
#[test]
fn the_binary_runs_jemalloc_with_its_compiled_in_settings() {
    let out = Command::new(OPERATOR)
        .arg("crd")
        .env(
            "_RJEM_MALLOC_CONF",
            "stats_print:true,stats_print_opts:Jmdablxe",
        )
        .output()
        .unwrap();
    assert!(out.status.success());
    let stats = String::from_utf8_lossy(&out.stderr);
    for setting in [
        "\"narenas\":1,",
        "\"dirty_decay_ms\":1000,",
        "\"muzzy_decay_ms\":0,",
    ] {
        assert!(stats.contains(setting), "{setting} not in effect:\n{stats}");
    }
}

/// Review N8: a standby whose clock runs ahead of the leader's must not take the lease while
/// the leader keeps renewing it. The leader here is the test, renewing every second with a
/// clock 30 s behind the operator's (every renewTime it writes is 30 s old by the operator's
/// clock, so by timestamps alone the lease looks long expired). The operator decides on what
/// it observes, as client-go does: the record changed less than a lease duration ago, so it is
/// held. Once the renewals stop, it takes over after a lease duration of its own time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_with_a_clock_ahead_never_takes_a_lease_that_is_being_renewed() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let env = Env::new(Kind::TestServer, "skew").await;
    let leases: Api<Lease> = Api::namespaced(env.kube.clone(), &env.ns);
    let behind = || MicroTime(k8s_openapi::jiff::Timestamp::now() - Duration::from_secs(30));
    let lease = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "waldur-operator"},
        "spec": {
            "holderIdentity": "slow-clock",
            "leaseDurationSeconds": 3,
            "acquireTime": behind(),
            "renewTime": behind(),
        }
    });
    leases
        .create(&Default::default(), &serde_json::from_value(lease).unwrap())
        .await
        .unwrap();
    let renew = || async {
        let patch = serde_json::json!({"spec": {"renewTime": behind()}});
        leases
            .patch(
                "waldur-operator",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .unwrap();
    };
    let pid = env
        .start_operator_with(&[
            ("LEADER_ELECT", "true"),
            ("POD_NAME", "fast-clock"),
            ("LEASE_DURATION", "3s"),
            ("LEASE_GRACE", "1s"),
        ])
        .await;
    let holder = || async {
        leases
            .get("waldur-operator")
            .await
            .unwrap()
            .spec
            .and_then(|s| s.holder_identity)
    };
    for _ in 0..8 {
        renew().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            holder().await.as_deref(),
            Some("slow-clock"),
            "the standby took a lease renewed within its duration:\n{}",
            env.with_operator(pid, |o| o.log_text())
        );
    }
    let log = env.with_operator(pid, |o| o.log_text());
    assert!(!log.contains("acquired the lease"), "{log}");
    // The renewals stop: taken over after a lease duration (3 s) of the operator's own time.
    let stopped = Instant::now();
    while holder().await.as_deref() != Some("fast-clock") {
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "never took over the abandoned lease:\n{}",
            env.with_operator(pid, |o| o.log_text())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = stopped.elapsed();
    eprintln!("took over {took:?} after the last renewal");
    assert!(
        took >= Duration::from_secs(2),
        "{took:?}: before a lease duration had passed"
    );
}

/// Review N15: a repeated Event (same object, type, action and reason) becomes one Event with
/// a series, and the Event shows the latest words, not the first failure's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_series_shows_the_latest_note() {
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::runtime::events::{Event, EventType, Reporter};
    use waldur_operator::controller::events::EventWriter;
    let server = TestServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let writer = EventWriter::new(
        client.clone(),
        Reporter {
            controller: "waldur-operator".into(),
            instance: Some("test".into()),
        },
    );
    let regarding = ObjectReference {
        api_version: Some("openstack.waldur.com/v1alpha1".into()),
        kind: Some("ServerGroup".into()),
        name: Some("web".into()),
        namespace: Some("default".into()),
        uid: Some("00000000-0000-4000-8000-000000000001".into()),
        ..Default::default()
    };
    for note in ["Waldur answered 500: first", "Waldur answered 500: second"] {
        let ev = Event {
            type_: EventType::Warning,
            reason: "WaldurError".into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        writer.publish(&ev, &regarding).await.unwrap();
    }
    let events: Api<K8sEvent> = Api::namespaced(client, "default");
    let listed = events.list(&Default::default()).await.unwrap().items;
    assert_eq!(listed.len(), 1, "one Event with a series: {listed:?}");
    let ev = &listed[0];
    assert_eq!(ev.series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(ev.note.as_deref(), Some("Waldur answered 500: second"));
}

/// `--tenant-pulls=false` (`TENANT_PULLS=false`), as the binary reads it: after an unlink the
/// operator asks Waldur for no tenant re-sync and makes no group; it says it waits for
/// Waldur's periodic re-sync, and rebinds the group when that re-sync brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tenant_pulls_off_the_binary_asks_for_no_re_sync() {
    let env = Env::new(Kind::TestServer, "no-pulls").await;
    env.start_operator_with(&[("TENANT_PULLS", "false")]).await;
    env.apply("web", spec("affinity")).await.unwrap();
    let before = env.wait_ready("web").await.status.unwrap();
    crate::unlink_behind_the_operators_back(&env, before.uuid.as_deref()).await;
    let waiting = env
        .wait("web", Duration::from_secs(20), |sg| {
            sg.and_then(|s| crate::condition(s, "Ready"))
                .is_some_and(|c| c.1 == "Reimporting")
        })
        .await
        .unwrap();
    let message = crate::condition(&waiting, "Ready").unwrap().2;
    assert!(message.contains("periodic re-sync"), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.sim.requests("pull_server_groups"),
        0,
        "no re-sync asked for"
    );
    assert_eq!(env.sim.requests("create"), 1, "no group made");
    env.sim.resync_now().await;
    let after = env
        .wait("web", Duration::from_secs(20), |sg| {
            crate::ready_now(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
        })
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(after.backend_id, before.backend_id, "the same Nova group");
    assert_eq!(env.sim.requests("pull_server_groups"), 0);
}
