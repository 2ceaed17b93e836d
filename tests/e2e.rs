//! End to end: the whole operator (watch, reconcile, status, Events, deletion) against the
//! Kubernetes API test server and the Waldur simulator over HTTP.
//!
//! Each scenario is written once and runs twice: against the test server (always), and
//! against a real cluster when `WALDUR_E2E_KUBECONFIG` names a kubeconfig (those tests are
//! `#[ignore]`d, so a plain `cargo test` reports them as ignored, not passed; run them with
//! `cargo test --test e2e -- --ignored`). Fault injection into the Kubernetes API exists only
//! on the test server; scenarios that need it run there alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use kube_test_server::TestServer;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use waldur_operator::api::{FINALIZER, ServerGroup};
use waldur_operator::controller::index::ReadPath;
use waldur_operator::controller::{self, ClientCache, DefaultCredentials, Runtime, Settings};
use waldur_operator::metrics::Metrics;
use waldur_operator::server::Health;
use waldur_operator::waldur::{ClientSettings, Limiter, Limits, Token};
use waldur_sim::{Delays, SimConfig, Simulator};

const TENANT: &str = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";
const KUBECONFIG_ENV: &str = "WALDUR_E2E_KUBECONFIG";

struct Env {
    kube: Client,
    server: Option<TestServer>,
    sim: Simulator,
    ns: String,
    operator: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Env {
    async fn test_server() -> Env {
        let server = TestServer::start().await.expect("the test server starts");
        server
            .install_crd(serde_json::to_value(waldur_operator::api::crd()).unwrap())
            .expect("the CRD installs");
        let kube = client_from(&server.kubeconfig_yaml("default")).await;
        Self::with(kube, Some(server), "team-a".into()).await
    }

    /// `None` when no real cluster is configured.
    async fn real_cluster() -> Env {
        let path = std::env::var(KUBECONFIG_ENV).unwrap_or_else(|_| {
            panic!("{KUBECONFIG_ENV} must name a kubeconfig to run the real-cluster tests")
        });
        let yaml = std::fs::read_to_string(&path).expect("the kubeconfig is readable");
        let kube = client_from(&yaml).await;
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(kube.clone());
        crds.patch(
            "servergroups.openstack.waldur.com",
            &PatchParams::apply("waldur-operator-e2e").force(),
            &Patch::Apply(waldur_operator::api::crd()),
        )
        .await
        .expect("the CRD applies");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ns = format!("wsg-e2e-{:08x}", rand_u32());
        let namespaces: Api<Namespace> = Api::all(kube.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
            .expect("the namespace is created");
        Self::with(kube, None, ns).await
    }

    async fn with(kube: Client, server: Option<TestServer>, ns: String) -> Env {
        let sim = Simulator::start(SimConfig {
            delays: Delays {
                schedule: Duration::from_millis(100),
                run: Duration::from_millis(100),
            },
            ..Default::default()
        })
        .await
        .expect("the simulator starts");
        Env {
            kube,
            server,
            sim,
            ns,
            operator: std::sync::Mutex::new(None),
        }
    }

    /// Starts the operator in this process, as `waldur-operator run` would.
    fn start_operator(&self) {
        let credentials = ClientCache::new(
            ClientSettings::new("", Token::new("")),
            DefaultCredentials {
                url: Some(self.sim.base_url()),
                token: Some(Token::new(SimConfig::default().staff_token)),
            },
        )
        .with_limiter(Arc::new(Limiter::new(Limits {
            max_in_flight: 16,
            rate_per_second: 0.0,
        })));
        let runtime = Runtime {
            kube: self.kube.clone(),
            api: Api::all(self.kube.clone()),
            secrets: Api::all(self.kube.clone()),
            settings: Settings {
                resync_period: Duration::from_secs(30),
                pull_interval: None,
            },
            credentials: Arc::new(credentials),
            concurrency: 32,
            read_path: ReadPath::Batched,
            busy_sweep: Duration::from_millis(200),
            metrics: Metrics::new(),
            health: Arc::new(Health::new(false)),
        };
        let handle = tokio::spawn(controller::run(runtime, std::future::pending()));
        *self.operator.lock().unwrap() = Some(handle);
    }

    /// Kills the operator: every reconcile in flight is dropped where it stands.
    fn kill_operator(&self) {
        if let Some(h) = self.operator.lock().unwrap().take() {
            h.abort();
        }
    }

    fn api(&self) -> Api<ServerGroup> {
        Api::namespaced(self.kube.clone(), &self.ns)
    }

    async fn apply(&self, name: &str, spec: Value) -> Result<ServerGroup, kube::Error> {
        let obj = json!({
            "apiVersion": "openstack.waldur.com/v1alpha1",
            "kind": "ServerGroup",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": spec,
        });
        self.api()
            .patch(
                name,
                &PatchParams::apply("e2e-user").force(),
                &Patch::Apply(obj),
            )
            .await
    }

    async fn secret(&self, name: &str, token: &str) {
        let secrets: Api<Secret> = Api::namespaced(self.kube.clone(), &self.ns);
        let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"token": token}});
        secrets
            .patch(
                name,
                &PatchParams::apply("e2e-user").force(),
                &Patch::Apply(s),
            )
            .await
            .expect("the Secret is written");
    }

    async fn get(&self, name: &str) -> Option<ServerGroup> {
        self.api().get_opt(name).await.expect("get works")
    }

    /// Waits until `done` holds for the object (or its absence).
    async fn wait(
        &self,
        name: &str,
        timeout: Duration,
        done: impl Fn(Option<&ServerGroup>) -> bool,
    ) -> Option<ServerGroup> {
        let deadline = Instant::now() + timeout;
        loop {
            let current = self.get(name).await;
            if done(current.as_ref()) {
                return current;
            }
            if Instant::now() > deadline {
                panic!("{name} did not get there in {timeout:?}: {current:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_ready(&self, name: &str) -> ServerGroup {
        self.wait(name, Duration::from_secs(20), ready_now)
            .await
            .unwrap()
    }

    async fn delete(&self, name: &str) {
        self.api()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete is accepted");
    }

    async fn annotate(&self, name: &str, key: &str, value: Option<&str>) {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.api()
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect("annotate");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_operator();
        self.sim.shutdown();
        if let Some(s) = &self.server {
            s.shutdown();
        }
    }
}

async fn client_from(yaml: &str) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(yaml).expect("a kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a client config");
    Client::try_from(config).expect("a client")
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(7)
}

fn condition(sg: &ServerGroup, type_: &str) -> Option<(String, String, String, Option<i64>)> {
    sg.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone(),
                c.message.clone(),
                c.observed_generation,
            )
        })
}

/// What `kubectl wait --for=condition=Ready` should accept: Ready=True for this generation.
fn ready_now(sg: Option<&ServerGroup>) -> bool {
    sg.and_then(|s| condition(s, "Ready").map(|c| (c, s.metadata.generation)))
        .is_some_and(|(c, generation)| c.0 == "True" && c.3 == generation)
}

fn reason(type_: &'static str, want: &'static str) -> impl Fn(Option<&ServerGroup>) -> bool {
    move |sg| {
        sg.and_then(|s| condition(s, type_))
            .is_some_and(|c| c.1 == want)
    }
}

fn spec(policy: &str) -> Value {
    json!({"policy": policy, "tenant": TENANT})
}

fn groups_named(env: &Env, name: &str) -> usize {
    env.sim
        .groups()
        .iter()
        .filter(|g| g["name"] == name)
        .count()
}

/// The scenarios, each runnable on the test server and on a real cluster.
mod scenarios {
    use super::*;

    pub async fn apply_to_ready_and_stale_generations(env: &Env) {
        env.start_operator();
        env.apply("web", spec("anti-affinity")).await.unwrap();
        let sg = env.wait_ready("web").await;
        let status = sg.status.unwrap();
        assert_eq!(status.state.as_deref(), Some("OK"));
        assert_eq!(status.policy.as_deref(), Some("anti-affinity"));
        assert!(!status.backend_id.unwrap_or_default().is_empty());
        assert!(
            sg.metadata
                .finalizers
                .unwrap_or_default()
                .contains(&FINALIZER.to_string())
        );
        if let Some(server) = &env.server {
            let reasons: Vec<String> = server
                .list("events.k8s.io", "events")
                .iter()
                .filter(|e| e["regarding"]["name"] == "web")
                .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
                .collect();
            assert!(reasons.contains(&"Created".to_string()), "{reasons:?}");
            assert!(
                !reasons.contains(&"Adopted".to_string()),
                "its own creation is not an adoption: {reasons:?}"
            );
        }
        // A spec change makes the old Ready stale until the operator has seen the new
        // generation: paused, it never does, so Ready must not count.
        env.annotate("web", "openstack.waldur.com/paused", Some("true"))
            .await;
        env.wait("web", Duration::from_secs(10), reason("Synced", "Paused"))
            .await;
        let mut changed = spec("anti-affinity");
        changed["deletionPolicy"] = json!("Orphan");
        let sg = env.apply("web", changed).await.unwrap();
        assert_eq!(sg.metadata.generation, Some(2));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sg = env.get("web").await.unwrap();
        assert!(
            !ready_now(Some(&sg)),
            "Ready of generation 1 must not satisfy generation 2"
        );
        env.annotate("web", "openstack.waldur.com/paused", None)
            .await;
        env.wait_ready("web").await;
    }

    pub async fn invalid_manifests_are_rejected_with_the_schemas_message(env: &Env) {
        let err = env.apply("bad", spec("sideways")).await.unwrap_err();
        assert!(err.to_string().contains("spec.policy"), "{err}");
        let err = env
            .apply("bad", json!({"policy": "affinity"}))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.tenant and spec.policy are required"),
            "{err}"
        );
        env.apply("good", spec("affinity")).await.unwrap();
        let err = env.apply("good", spec("anti-affinity")).await.unwrap_err();
        assert!(
            err.to_string().contains("spec.policy is immutable"),
            "{err}"
        );
        let mut long = spec("affinity");
        long["name"] = json!("x".repeat(151));
        assert!(env.apply("long", long).await.is_err());
    }

    pub async fn each_deletion_policy(env: &Env) {
        env.start_operator();
        for (name, policy) in [("del", "Delete"), ("orph", "Orphan"), ("unl", "Unlink")] {
            let mut s = spec("affinity");
            s["deletionPolicy"] = json!(policy);
            env.apply(name, s).await.unwrap();
        }
        for name in ["del", "orph", "unl"] {
            env.wait_ready(name).await;
        }
        for name in ["del", "orph", "unl"] {
            env.delete(name).await;
        }
        for name in ["del", "orph", "unl"] {
            env.wait(name, Duration::from_secs(20), |sg| sg.is_none())
                .await;
        }
        assert_eq!(groups_named(env, "del"), 0, "Delete removes the group");
        assert_eq!(groups_named(env, "orph"), 1, "Orphan leaves it");
        assert_eq!(
            groups_named(env, "unl"),
            0,
            "Unlink removes Waldur's record"
        );
        assert_eq!(env.sim.requests("unlink"), 1);
    }

    pub async fn out_of_band_delete_and_reimport(env: &Env) {
        env.start_operator();
        env.apply("gone", spec("affinity")).await.unwrap();
        env.apply("moved", spec("affinity")).await.unwrap();
        let gone = env.wait_ready("gone").await.status.unwrap();
        let moved = env.wait_ready("moved").await.status.unwrap();
        env.sim
            .openstack_delete(gone.backend_id.as_deref().unwrap());
        let staff = waldur_operator::waldur::WaldurClient::new(&ClientSettings::new(
            env.sim.base_url(),
            Token::new(SimConfig::default().staff_token),
        ))
        .unwrap();
        let old =
            waldur_operator::waldur::WaldurUuid::parse(moved.uuid.as_deref().unwrap()).unwrap();
        staff.unlink(&old).await.unwrap();
        env.sim.resync_now().await;
        let recreated = env
            .wait("gone", Duration::from_secs(20), |sg| {
                ready_now(sg) && sg.unwrap().status.as_ref().unwrap().uuid != gone.uuid
            })
            .await
            .unwrap();
        assert_ne!(recreated.status.unwrap().backend_id, gone.backend_id);
        let rebound = env
            .wait("moved", Duration::from_secs(20), |sg| {
                sg.unwrap().status.as_ref().unwrap().uuid != moved.uuid
            })
            .await
            .unwrap();
        assert_eq!(
            rebound.status.unwrap().backend_id,
            moved.backend_id,
            "rebound by backend id"
        );
        assert_eq!(groups_named(env, "gone") + groups_named(env, "moved"), 2);
    }

    pub async fn waldur_outage_then_recovery(env: &Env) {
        env.start_operator();
        env.apply("steady", spec("affinity")).await.unwrap();
        env.wait_ready("steady").await;
        env.sim.set_failing(Some(503));
        env.sim.reset_counters();
        env.apply("during", spec("affinity")).await.unwrap();
        let sg = env
            .wait(
                "during",
                Duration::from_secs(20),
                reason("Synced", "WaldurUnavailable"),
            )
            .await
            .unwrap();
        assert!(condition(&sg, "Synced").unwrap().2.contains("503"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let during_outage = env.sim.total_requests();
        env.sim.set_failing(None);
        env.wait_ready("during").await;
        env.wait_ready("steady").await;
        // Backoff, not a hot loop: two resources over ~6 s of outage, with reads retried
        // three times, stay well under a hundred requests.
        assert!(
            during_outage <= 60,
            "{during_outage} Waldur requests during the outage"
        );
        assert_eq!(groups_named(env, "during"), 1);
    }

    pub async fn per_namespace_credentials(env: &Env) {
        env.start_operator();
        let mut s = spec("affinity");
        s["credentialsRef"] = json!({"name": "waldur"});
        env.apply("creds", s).await.unwrap();
        let sg = env
            .wait(
                "creds",
                Duration::from_secs(20),
                reason("Synced", "CredentialsNotFound"),
            )
            .await
            .unwrap();
        assert!(condition(&sg, "Synced").unwrap().2.contains("waldur"));
        env.secret("waldur", &SimConfig::default().user_token).await;
        // The Secret's arrival wakes the resource; no restart, no long backoff.
        env.wait("creds", Duration::from_secs(10), ready_now).await;
    }

    pub async fn paused_and_request_annotations(env: &Env) {
        env.start_operator();
        env.apply("ann", spec("affinity")).await.unwrap();
        env.wait_ready("ann").await;
        env.annotate("ann", "openstack.waldur.com/request-pull", Some("t1"))
            .await;
        env.wait("ann", Duration::from_secs(10), |sg| {
            sg.unwrap()
                .status
                .as_ref()
                .and_then(|s| s.handled_requests.as_ref())
                .and_then(|h| h.pull.as_deref())
                == Some("t1")
        })
        .await;
        env.wait_ready("ann").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(env.sim.requests("pull"), 1, "one token, one pull");
        env.annotate("ann", "openstack.waldur.com/paused", Some("true"))
            .await;
        env.wait("ann", Duration::from_secs(10), reason("Synced", "Paused"))
            .await;
        let before = env.sim.requests("pull") + env.sim.requests("set_ok");
        env.annotate("ann", "openstack.waldur.com/request-set-ok", Some("k1"))
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            env.sim.requests("pull") + env.sim.requests("set_ok"),
            before,
            "paused: no Waldur writes"
        );
        env.annotate("ann", "openstack.waldur.com/paused", None)
            .await;
        env.wait("ann", Duration::from_secs(10), |sg| {
            sg.unwrap()
                .status
                .as_ref()
                .and_then(|s| s.handled_requests.as_ref())
                .and_then(|h| h.set_ok.as_deref())
                == Some("k1")
        })
        .await;
        assert_eq!(env.sim.requests("set_ok"), 1);
    }

    pub async fn many_resources_converge(env: &Env, n: usize) {
        env.start_operator();
        let started = Instant::now();
        futures::future::join_all((0..n).map(|i| env.apply_owned(format!("m-{i:04}")))).await;
        let api = env.api();
        loop {
            let list = api.list(&Default::default()).await.unwrap();
            let ready = list.items.iter().filter(|sg| ready_now(Some(sg))).count();
            if ready == n {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{ready}/{n} Ready after 120 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(env.sim.groups().len(), n, "one group per resource");
        println!(
            "{n} resources Ready in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
}

impl Env {
    async fn apply_owned(&self, name: String) {
        self.apply(&name, spec("affinity")).await.expect("apply");
    }
}

macro_rules! both {
    ($name:ident, $real:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            scenarios::$name(&Env::test_server().await).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = "real cluster: set WALDUR_E2E_KUBECONFIG and run with --ignored"]
        async fn $real() {
            scenarios::$name(&Env::real_cluster().await).await;
        }
    };
}

both!(
    apply_to_ready_and_stale_generations,
    real_apply_to_ready_and_stale_generations
);
both!(
    invalid_manifests_are_rejected_with_the_schemas_message,
    real_invalid_manifests_are_rejected
);
both!(each_deletion_policy, real_each_deletion_policy);
both!(
    out_of_band_delete_and_reimport,
    real_out_of_band_delete_and_reimport
);
both!(
    waldur_outage_then_recovery,
    real_waldur_outage_then_recovery
);
both!(per_namespace_credentials, real_per_namespace_credentials);
both!(
    paused_and_request_annotations,
    real_paused_and_request_annotations
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_resources_converge_to_ready() {
    scenarios::many_resources_converge(&Env::test_server().await, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "real cluster: set WALDUR_E2E_KUBECONFIG and run with --ignored"]
async fn real_a_hundred_resources_converge_to_ready() {
    scenarios::many_resources_converge(&Env::real_cluster().await, 100).await;
}

// ---- Scenarios that need the test server's fault injection ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_restarts_and_410_gone_do_not_lose_events() {
    let env = Env::test_server().await;
    env.start_operator();
    env.apply("before", spec("affinity")).await.unwrap();
    env.wait_ready("before").await;
    let server = env.server.as_ref().unwrap();
    server.compact();
    server.expire_watches();
    env.apply("after", spec("affinity")).await.unwrap();
    env.wait_ready("after").await;
    server.expire_watches();
    env.delete("before").await;
    env.wait("before", Duration::from_secs(20), |sg| sg.is_none())
        .await;
    assert_eq!(groups_named(&env, "before"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_on_status_writes_are_retried() {
    let env = Env::test_server().await;
    env.server
        .as_ref()
        .unwrap()
        .fail_next(3, "patch", "servergroups", Some("status"), 409);
    env.start_operator();
    env.apply("web", spec("affinity")).await.unwrap();
    env.wait_ready("web").await;
    assert_eq!(
        groups_named(&env, "web"),
        1,
        "a failed status write never makes a second group"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_each_step_of_create_never_two_groups() {
    let env = Env::test_server().await;
    let server = env.server.as_ref().unwrap();
    // Step 1: killed after the finalizer, before anything in Waldur.
    // Step 2: killed after Waldur's 201, before the status write (the write fails and the
    // operator dies before trying again).
    // Step 3: killed while the group is still being created.
    for (i, step) in ["finalizer", "created", "creating"].iter().enumerate() {
        let name = format!("crash-{i}");
        if *step == "created" {
            server.fail_next(100, "patch", "servergroups", Some("status"), 409);
        }
        env.start_operator();
        env.apply(&name, spec("affinity")).await.unwrap();
        match *step {
            "finalizer" => {
                env.wait(&name, Duration::from_secs(10), |sg| {
                    sg.is_some_and(|s| s.finalizers().iter().any(|f| f == FINALIZER))
                })
                .await;
            }
            "created" => {
                let deadline = Instant::now() + Duration::from_secs(10);
                while groups_named(&env, &name) == 0 {
                    assert!(Instant::now() < deadline, "no create reached Waldur");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            _ => {
                env.wait(&name, Duration::from_secs(10), |sg| {
                    sg.and_then(|s| s.status.as_ref())
                        .and_then(|s| s.uuid.as_ref())
                        .is_some()
                })
                .await;
            }
        }
        env.kill_operator();
        server.fail_next(0, "patch", "servergroups", Some("status"), 409);
        env.start_operator();
        env.wait_ready(&name).await;
        env.kill_operator();
        assert_eq!(
            groups_named(&env, &name),
            1,
            "step {step}: exactly one group"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_delete_never_loses_the_finalizer() {
    let env = Env::test_server().await;
    env.start_operator();
    env.apply("web", spec("affinity")).await.unwrap();
    env.wait_ready("web").await;
    env.delete("web").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.sim.requests("delete") == 0 {
        assert!(Instant::now() < deadline, "no DELETE reached Waldur");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    env.kill_operator();
    let sg = env
        .get("web")
        .await
        .expect("the finalizer holds the object while Waldur deletes");
    assert!(sg.finalizers().iter().any(|f| f == FINALIZER));
    env.start_operator();
    env.wait("web", Duration::from_secs(20), |sg| sg.is_none())
        .await;
    assert_eq!(groups_named(&env, "web"), 0);
}

// ---- kubectl, as a user would drive it ----

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> std::process::Output {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    std::process::Command::new(&bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl is needed for this test and could not run ({bin}): {e}")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_wait_get_and_delete_a_servergroup() {
    let env = Env::test_server().await;
    env.start_operator();
    let dir = std::env::temp_dir().join(format!("wsg-kubectl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        env.server.as_ref().unwrap().kubeconfig_yaml("team-a"),
    )
    .unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/servergroup.yaml");
    let kc = kubeconfig.clone();
    let run = move |args: Vec<&'static str>| {
        let kc = kc.clone();
        tokio::task::spawn_blocking(move || kubectl(&kc, &args))
    };

    let out = run(vec!["apply", "-f", example]).await.unwrap();
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("servergroup.openstack.waldur.com/web created")
    );
    let out = run(vec![
        "wait",
        "-n",
        "team-a",
        "--for=condition=Ready",
        "servergroup/web",
        "--timeout=30s",
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "wait: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(vec!["get", "-n", "team-a", "wsg", "web", "-o", "yaml"])
        .await
        .unwrap();
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        yaml.contains("state: OK") && yaml.contains("backendId:"),
        "{yaml}"
    );
    let out = run(vec!["get", "-n", "team-a", "wsg"]).await.unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("POLICY") && table.contains("anti-affinity") && table.contains("True"),
        "{table}"
    );
    // An invalid change is refused by the API server with the CRD's message.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(example)
            .unwrap()
            .replace("policy: anti-affinity", "policy: affinity"),
    )
    .unwrap();
    let bad_path: &'static str = Box::leak(bad.to_string_lossy().into_owned().into_boxed_str());
    let out = run(vec!["apply", "-f", bad_path]).await.unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.policy is immutable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(vec![
        "delete",
        "-n",
        "team-a",
        "servergroup/web",
        "--timeout=30s",
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(env.get("web").await.is_none());
    assert_eq!(
        groups_named(&env, "web"),
        0,
        "kubectl delete waited for Waldur's deletion"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
