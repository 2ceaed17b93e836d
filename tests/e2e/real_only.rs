//! Scenarios that only the real control plane can answer: RBAC, the Lease API with several
//! replicas, a leader cut off from the API server.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use tokio::net::{TcpListener, TcpStream};
use waldur_operator::api::ServerGroup;

use crate::env::{self, Env, Kind, RELEASE, http_get};
use crate::{groups_named, spec};

/// The chart's ServiceAccount may do what the operator needs and nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_service_account_is_denied_what_the_chart_does_not_grant() {
    let env = Env::new(Kind::Real, "rbac-denied").await;
    let yaml = std::fs::read_to_string(&env.operator_kubeconfig).unwrap();
    let sa = env::client_from(&yaml).await;
    let groups: Api<ServerGroup> = Api::namespaced(sa.clone(), &env.ns);
    groups
        .list(&ListParams::default())
        .await
        .expect("the operator may list ServerGroups in its namespace");
    let forbidden = |r: Result<_, kube::Error>, what: &str| match r {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{what}: {e:?}"),
        Ok(_) => panic!("{what} was allowed"),
        Err(e) => panic!("{what}: {e}"),
    };
    let sg: ServerGroup = serde_json::from_value(serde_json::json!({
        "apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
        "metadata": {"name": "x"}, "spec": spec("affinity")
    }))
    .unwrap();
    forbidden(
        groups.create(&PostParams::default(), &sg).await.map(|_| ()),
        "creating a ServerGroup",
    );
    let other: Api<Secret> = Api::namespaced(sa.clone(), "kube-system");
    forbidden(
        other.list(&ListParams::default()).await.map(|_| ()),
        "listing Secrets of another namespace",
    );
    let elsewhere: Api<ServerGroup> = Api::namespaced(sa, "default");
    forbidden(
        elsewhere.list(&ListParams::default()).await.map(|_| ()),
        "listing ServerGroups outside the watched namespace",
    );
}

/// The leader's name and lease settings for a pair of replicas.
const LEASE_DURATION: u64 = 4;
const LEASE_GRACE: u64 = 2;

fn replica_env(name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("LEADER_ELECT", "true".into()),
        ("LEASE_NAME", RELEASE.into()),
        ("LEASE_DURATION", format!("{LEASE_DURATION}s")),
        ("LEASE_GRACE", format!("{LEASE_GRACE}s")),
        ("POD_NAME", name.into()),
    ]
}

async fn leader_gauge(metrics_port: u16) -> Option<i64> {
    let (code, text) = http_get(&format!("http://127.0.0.1:{metrics_port}/metrics")).await;
    assert_eq!(code, 200);
    text.lines()
        .find(|l| l.starts_with("waldur_operator_leader{"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

async fn readyz(metrics_port: u16) -> (u16, String) {
    http_get(&format!("http://127.0.0.1:{metrics_port}/readyz")).await
}

async fn holder(env: &Env) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(env.kube.clone(), &env.ns);
    leases
        .get_opt(RELEASE)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// Waits until the replica on `port` reports `want` as its leader gauge; the time it took.
async fn wait_leader(port: u16, want: i64, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if leader_gauge(port).await == Some(want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "the replica on :{port} did not report leader={want} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn with<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Two replicas of the binary: one leads and writes, the other stands by; SIGKILL the
/// leader and the other takes over within the lease duration plus grace, without any group
/// created twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_and_a_takeover_after_sigkill() {
    let env = Env::new(Kind::Real, "leader-takeover").await;
    let a_env = replica_env("replica-a");
    let a = env.start_operator_with(&with(&a_env)).await;
    let a_port = env.with_operator(a, |o| o.metrics);
    wait_leader(a_port, 1, Duration::from_secs(30)).await;
    let b_env = replica_env("replica-b");
    let b = env.start_operator_with(&with(&b_env)).await;
    let b_port = env.with_operator(b, |o| o.metrics);
    assert_eq!(holder(&env).await.as_deref(), Some("replica-a"));
    assert_eq!(leader_gauge(b_port).await, Some(0));
    let (code, body) = readyz(b_port).await;
    assert_eq!(code, 200, "a standby is ready, so rolling updates proceed");
    assert!(body.contains("standby"), "{body}");

    for i in 0..5 {
        env.apply(&format!("before-{i}"), spec("affinity"))
            .await
            .unwrap();
    }
    for i in 0..5 {
        env.wait_ready(&format!("before-{i}")).await;
    }
    let (code, body) = readyz(a_port).await;
    assert_eq!((code, body.trim()), (200, "ok: leader"));
    let instances = reporting_instances(&env).await;
    assert_eq!(
        instances,
        vec!["replica-a".to_string()],
        "only the leader writes Events"
    );

    env.kill(a);
    let took = wait_leader(
        b_port,
        1,
        Duration::from_secs(LEASE_DURATION + LEASE_GRACE + 10),
    )
    .await;
    eprintln!(
        "takeover after SIGKILL of the leader: {:.1} s",
        took.as_secs_f64()
    );
    assert!(
        took <= Duration::from_secs(LEASE_DURATION + LEASE_GRACE + 1),
        "took {took:?}, lease duration {LEASE_DURATION}s + grace {LEASE_GRACE}s"
    );
    assert_eq!(holder(&env).await.as_deref(), Some("replica-b"));
    for i in 0..5 {
        env.apply(&format!("after-{i}"), spec("affinity"))
            .await
            .unwrap();
    }
    for i in 0..5 {
        env.wait_ready(&format!("after-{i}")).await;
    }
    for prefix in ["before", "after"] {
        for i in 0..5 {
            assert_eq!(groups_named(&env, &format!("{prefix}-{i}")), 1);
        }
    }
}

/// The replicas named as `reportingInstance` of the Events in the namespace.
async fn reporting_instances(env: &Env) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.kube.clone(), &env.ns);
    let mut names: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reporting_instance)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A leader that can no longer reach the API server (renewals fail; kube-lease-manager keeps
/// retrying without telling) stops acting before its lease can expire, so two replicas
/// never act at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_stops_before_another_can_lead() {
    let env = Env::new(Kind::Real, "leader-cut-off").await;
    let proxy = Proxy::start(&env).await;
    let kubeconfig = env.dir.join("via-proxy.kubeconfig");
    std::fs::write(&kubeconfig, proxy.kubeconfig.as_bytes()).unwrap();
    let mut a_env = replica_env("replica-a");
    a_env.push(("KUBECONFIG", kubeconfig.to_string_lossy().into_owned()));
    let a = env.start_operator_with(&with(&a_env)).await;
    let a_port = env.with_operator(a, |o| o.metrics);
    wait_leader(a_port, 1, Duration::from_secs(30)).await;
    let b = env
        .start_operator_with(&with(&replica_env("replica-b")))
        .await;
    let b_port = env.with_operator(b, |o| o.metrics);
    env.apply("before", spec("affinity")).await.unwrap();
    env.wait_ready("before").await;

    proxy.cut();
    let cut_at = Instant::now();
    let mut a_stopped = None;
    let mut b_leads = None;
    while b_leads.is_none() {
        assert!(
            cut_at.elapsed() < Duration::from_secs(LEASE_DURATION + LEASE_GRACE + 15),
            "no takeover after the cut: a stopped {a_stopped:?}"
        );
        if a_stopped.is_none() && leader_gauge(a_port).await == Some(0) {
            a_stopped = Some(cut_at.elapsed());
        }
        if leader_gauge(b_port).await == Some(1) {
            b_leads = Some(cut_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a_stopped = a_stopped.expect("the cut-off leader never stopped");
    let b_leads = b_leads.unwrap();
    eprintln!(
        "cut-off leader stopped after {:.1} s; the other replica led after {:.1} s",
        a_stopped.as_secs_f64(),
        b_leads.as_secs_f64()
    );
    assert!(
        a_stopped < b_leads,
        "the old leader stopped ({a_stopped:?}) after the new one started ({b_leads:?})"
    );
    env.apply("after", spec("affinity")).await.unwrap();
    env.wait_ready("after").await;
    assert_eq!(groups_named(&env, "after"), 1);
}

/// A TCP proxy to the API server that can be cut: open connections are dropped, new ones
/// are closed at once.
struct Proxy {
    kubeconfig: String,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(env: &Env) -> Proxy {
        let yaml = std::fs::read_to_string(&env.operator_kubeconfig).unwrap();
        let upstream = yaml
            .lines()
            .find_map(|l| l.trim().strip_prefix("server:"))
            .map(|s| s.trim().trim_start_matches("https://").to_string())
            .expect("a server address");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let kubeconfig = yaml.replace(&upstream, &format!("127.0.0.1:{port}"));
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            let mut open = tokio::task::JoinSet::new();
            let mut watch = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut down, _)) = accepted else { continue };
                        if flag.load(Ordering::SeqCst) {
                            continue; // dropped: closed at once
                        }
                        let upstream = upstream.clone();
                        open.spawn(async move {
                            if let Ok(mut up) = TcpStream::connect(&upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            }
                        });
                    }
                    _ = watch.tick() => {
                        if flag.load(Ordering::SeqCst) {
                            open.abort_all();
                        }
                    }
                }
            }
        });
        Proxy {
            kubeconfig,
            cut,
            task,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What users install is accepted by a real API server, server-side validation included:
/// `helm install` of the chart (default values, and the one-namespace variant with two
/// replicas), `kubectl apply --server-side --dry-run=server -k deploy/`, and every example.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_kustomize_and_the_examples_are_accepted() {
    let env = Env::new(Kind::Real, "install").await;
    let kubeconfig = env.admin_kubeconfig();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/waldur-operator");
    let suffix = env.ns.rsplit('-').next().unwrap_or("x").to_string();
    let helm = |args: Vec<String>| {
        let kubeconfig = kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(env::helm())
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(&args)
                .output()
                .expect("helm runs")
        })
    };
    // The first install takes over the CRD the test harness applied, as a user upgrading from
    // a chart that shipped it in crds/ does; the second, a second install beside it, leaves
    // the CRD to the first (crds.enabled=false).
    let installs: Vec<(String, String, Vec<&str>)> = vec![
        (
            format!("wo-{suffix}"),
            format!("{}-helm", env.ns),
            vec!["--take-ownership", "--set", "commonLabels.revision=one"],
        ),
        (
            format!("wo1-{suffix}"),
            env.ns.clone(),
            vec![
                "--set",
                "replicaCount=2",
                "--set",
                "networkPolicy.enabled=true",
                "--set",
                "crds.enabled=false",
            ],
        ),
    ];
    let crds: Api<CustomResourceDefinition> = Api::all(env.kube.clone());
    let crd_name = "servergroups.openstack.waldur.com";
    for (release, ns, extra) in &installs {
        let mut args: Vec<String> = vec![
            "install".into(),
            release.clone(),
            chart.into(),
            "--namespace".into(),
            ns.clone(),
            "--create-namespace".into(),
            "--set".into(),
            "waldur.url=https://waldur.example.com".into(),
            "--set".into(),
            "waldur.token=not-a-real-token".into(),
        ];
        if ns == &env.ns {
            args.extend(["--set".into(), format!("watchNamespace={ns}")]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let owns_crd = !extra.contains(&"crds.enabled=false");
        let out = helm(args.clone()).await.unwrap();
        assert!(
            out.status.success(),
            "helm install {release}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if owns_crd {
            // An upgrade upgrades the CRD (a crds/ directory never would).
            let crd = crds.get(crd_name).await.unwrap();
            assert_eq!(
                crd.labels().get("revision").map(String::as_str),
                Some("one")
            );
            assert_eq!(
                crd.annotations()
                    .get("helm.sh/resource-policy")
                    .map(String::as_str),
                Some("keep")
            );
            let mut upgrade = args.clone();
            upgrade[0] = "upgrade".into();
            upgrade.retain(|a| a != "--create-namespace" && a != "--take-ownership");
            upgrade.extend(["--set".into(), "commonLabels.revision=two".into()]);
            let out = helm(upgrade).await.unwrap();
            assert!(
                out.status.success(),
                "helm upgrade {release}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let crd = crds.get(crd_name).await.unwrap();
            assert_eq!(
                crd.labels().get("revision").map(String::as_str),
                Some("two")
            );
        }
        let out = helm(vec![
            "uninstall".into(),
            release.clone(),
            "--namespace".into(),
            ns.clone(),
        ])
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "helm uninstall {release}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Uninstall keeps the CRD, and with it every ServerGroup in the cluster.
        assert!(crds.get_opt(crd_name).await.unwrap().is_some());
    }

    // deploy/ creates its own namespace, which a server-side dry run does not persist: make
    // it exist, then dry-run everything.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.kube.clone());
    for ns in ["waldur-operator", "team-a"] {
        let _ = namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await;
    }
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    let out = kubectl_in(
        "waldur-operator",
        &env,
        &["apply", "--server-side", "--dry-run=server", "-k", deploy],
    )
    .await;
    assert!(
        out.status.success(),
        "kubectl apply -k deploy/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let out = kubectl_in("team-a", &env, &["apply", "--server-side", "-f", examples]).await;
    assert!(
        out.status.success(),
        "kubectl apply -f examples/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied = String::from_utf8_lossy(&out.stdout);
    for name in [
        "servergroup.openstack.waldur.com/web",
        "servergroup.openstack.waldur.com/db",
        "secret/waldur",
    ] {
        assert!(applied.contains(name), "{name} not applied: {applied}");
    }
    // No operator watches team-a here: nothing holds these, so they go with the namespace.
    for ns in ["waldur-operator", "team-a", &format!("{}-helm", env.ns)] {
        let _ = namespaces.delete(ns, &Default::default()).await;
    }
}

/// kubectl as the admin in namespace `ns`.
async fn kubectl_in(ns: &str, env: &Env, args: &[&str]) -> std::process::Output {
    let kubeconfig = env.admin_kubeconfig();
    let cache = env.dir.join("kubectl-cache");
    let ns = ns.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || env::kubectl(&kubeconfig, &cache, &ns, &args))
        .await
        .unwrap()
}
