//! One test environment: a Kubernetes backend, a Waldur simulator, a namespace of the test's
//! own, and the operator as users run it: the `waldur-operator` binary, as child processes.
//!
//! Backends:
//! - `TestServer`: kube-test-server, in process (the fast tier, with fault injection).
//! - `Real`: the real control plane (etcd, kube-apiserver, kube-controller-manager built from
//!   Go modules, RBAC on), one per test binary; or, when `WALDUR_E2E_KUBECONFIG` names a
//!   kubeconfig, that existing cluster. There the operator authenticates as the Helm chart's
//!   ServiceAccount (token from the TokenRequest API) with exactly the RBAC `helm template`
//!   renders, and watches only the test's namespace, so tests run side by side.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use control_plane::ControlPlane;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{ApiCapabilities, ApiResource, Scope};
use kube::{Api, Client, Config, Discovery, ResourceExt};
use kube_test_server::TestServer;
use serde_json::{Value, json};
use waldur_operator::api::ServerGroup;
use waldur_sim::{Delays, SimConfig, Simulator};

pub const KUBECONFIG_ENV: &str = "WALDUR_E2E_KUBECONFIG";
/// The release name the tests render the chart with.
pub const RELEASE: &str = "waldur-operator";
pub const OPERATOR: &str = env!("CARGO_BIN_EXE_waldur-operator");

/// How the chart is installed on the real tier.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Install {
    OneNamespace,
    ClusterWide,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    TestServer,
    Real,
}

pub enum Backend {
    TestServer(TestServer),
    /// The built control plane (shared by the test binary), or an existing cluster.
    Real,
}

/// A started `waldur-operator run`.
pub struct OperatorProcess {
    pub name: String,
    child: Child,
    pub metrics: u16,
    pub log: PathBuf,
}

impl OperatorProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited, and how.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub struct Env {
    pub kind: Kind,
    /// The cluster admin (the test itself).
    pub kube: Client,
    pub backend: Backend,
    pub sim: Simulator,
    pub ns: String,
    /// Where the operator's ServiceAccount and Lease live.
    pub operator_ns: String,
    install: Install,
    pub dir: PathBuf,
    /// The kubeconfig the operator runs with: the chart's ServiceAccount on the real tier.
    pub operator_kubeconfig: PathBuf,
    operators: Mutex<Vec<OperatorProcess>>,
}

impl Env {
    /// The chart installed to watch the test's namespace only: a Role in that namespace.
    pub async fn new(kind: Kind, test: &str) -> Env {
        Self::build(
            kind,
            test,
            sim_config(),
            Install::OneNamespace,
            Duration::ZERO,
        )
        .await
    }

    /// The test server and a simulator configured by `sim`.
    pub async fn with_waldur(test: &str, sim: SimConfig) -> Env {
        Self::build(
            Kind::TestServer,
            test,
            sim,
            Install::OneNamespace,
            Duration::ZERO,
        )
        .await
    }

    /// The test server delivering every watch event `delay` late, as a lagging watch cache
    /// of a busy API server does.
    pub async fn lagging(test: &str, delay: Duration) -> Env {
        Self::build(
            Kind::TestServer,
            test,
            sim_config(),
            Install::OneNamespace,
            delay,
        )
        .await
    }

    /// The chart installed as most clusters run it: its own namespace (`<ns>-operator`) and a
    /// ClusterRole. The operator still watches only the test's namespace.
    pub async fn cluster_wide(kind: Kind, test: &str) -> Env {
        Self::build(
            kind,
            test,
            sim_config(),
            Install::ClusterWide,
            Duration::ZERO,
        )
        .await
    }

    async fn build(
        kind: Kind,
        test: &str,
        sim: SimConfig,
        install: Install,
        watch_delay: Duration,
    ) -> Env {
        let ns = namespace_name(test);
        let dir = std::env::temp_dir().join(format!("wsg-e2e-{}-{ns}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let (backend, admin_yaml) = match kind {
            Kind::TestServer => {
                let server = TestServer::start_with(kube_test_server::Config {
                    watch_delay,
                    ..Default::default()
                })
                .await
                .expect("the test server starts");
                server
                    .install_crd(serde_json::to_value(waldur_operator::api::crd()).unwrap())
                    .expect("the CRD installs");
                let yaml = server.kubeconfig_yaml(&ns);
                (Backend::TestServer(server), yaml)
            }
            Kind::Real => match std::env::var(KUBECONFIG_ENV) {
                Ok(path) => {
                    let yaml = std::fs::read_to_string(&path).expect("the kubeconfig is readable");
                    (Backend::Real, yaml)
                }
                Err(_) => {
                    let cp = tokio::task::spawn_blocking(ControlPlane::shared)
                        .await
                        .expect("the control plane starts");
                    (Backend::Real, cp.admin_kubeconfig_yaml(&ns))
                }
            },
        };
        let kube = client_from(&admin_yaml).await;
        if kind == Kind::Real {
            install_crd(&kube).await;
        }
        create_namespace(&kube, &ns).await;
        let operator_ns = match install {
            Install::OneNamespace => ns.clone(),
            Install::ClusterWide => {
                let op = format!("{ns}-operator");
                create_namespace(&kube, &op).await;
                op
            }
        };
        let operator_kubeconfig = dir.join("operator.kubeconfig");
        let operator_yaml = match &backend {
            Backend::TestServer(server) => server.kubeconfig_yaml(&ns),
            Backend::Real => {
                let account = apply_chart_rbac(&kube, &ns, &operator_ns, install).await;
                let token = service_account_token(&kube, &operator_ns, &account).await;
                token_kubeconfig(&admin_yaml, &token, &ns)
            }
        };
        std::fs::write(&operator_kubeconfig, operator_yaml).expect("the operator's kubeconfig");
        std::fs::write(dir.join("admin.kubeconfig"), &admin_yaml).expect("the admin kubeconfig");
        let sim = Simulator::start(sim).await.expect("the simulator starts");
        Env {
            kind,
            kube,
            backend,
            sim,
            ns,
            operator_ns,
            install,
            dir,
            operator_kubeconfig,
            operators: Mutex::new(Vec::new()),
        }
    }

    pub fn server(&self) -> &TestServer {
        match &self.backend {
            Backend::TestServer(s) => s,
            Backend::Real => panic!("this scenario needs the test server's fault injection"),
        }
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The environment `waldur-operator run` gets by default in these tests.
    pub fn operator_env(&self) -> Vec<(String, String)> {
        [
            (
                "KUBECONFIG",
                self.operator_kubeconfig.to_string_lossy().as_ref(),
            ),
            ("WATCH_NAMESPACE", self.ns.as_str()),
            ("POD_NAMESPACE", self.operator_ns.as_str()),
            ("WALDUR_URL", self.sim.base_url().as_str()),
            ("WALDUR_TOKEN", SimConfig::default().staff_token.as_str()),
            ("ADMIN_ADDR", "127.0.0.1:0"),
            ("BUSY_SWEEP", "200ms"),
            ("RESYNC_PERIOD", "30s"),
            // A vanished group is made anew on evidence (a tenant re-sync that ran), never
            // on this timer: an hour that no test waits out proves it.
            ("REIMPORT_WAIT", "1h"),
            // Tests unlink in one tenant many times within a minute.
            ("TENANT_PULL_FLOOR", "1s"),
            ("CONCURRENCY", "32"),
            ("WALDUR_RATE", "0"),
            ("LOG_LEVEL", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Starts `waldur-operator run` with the default environment and waits until it serves
    /// `/readyz`.
    pub async fn start_operator(&self) -> u32 {
        self.start_operator_with(&[]).await
    }

    /// Starts `waldur-operator run` with the default environment changed by `overrides`
    /// (an empty value removes the variable) and waits until its `/readyz` answers 200.
    pub async fn start_operator_with(&self, overrides: &[(&str, &str)]) -> u32 {
        let (pid, metrics) = self.spawn_operator(overrides, &[]);
        wait_http_ok(&format!("http://127.0.0.1:{metrics}/readyz"), || {
            self.operator_failure(pid)
        })
        .await;
        pid
    }

    /// Spawns the binary; returns its pid and metrics port at once.
    pub fn spawn_operator(&self, overrides: &[(&str, &str)], args: &[&str]) -> (u32, u16) {
        let metrics = control_plane::free_port().expect("a free port");
        let mut env = self.operator_env();
        env.push(("METRICS_ADDR".into(), format!("127.0.0.1:{metrics}")));
        for (k, v) in overrides {
            env.retain(|(key, _)| key != k);
            if !v.is_empty() {
                env.push((k.to_string(), v.to_string()));
            }
        }
        let mut operators = self.operators.lock().unwrap();
        let name = format!("operator-{}", operators.len());
        let log = self.dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("a log file");
        let mut cmd = Command::new(OPERATOR);
        cmd.arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        clear_operator_env(&mut cmd);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let child = control_plane::spawn_tied_to_this_process(cmd).expect("the operator starts");
        let pid = child.id();
        operators.push(OperatorProcess {
            name,
            child,
            metrics,
            log,
        });
        (pid, metrics)
    }

    /// `Some(reason)` when the operator with this pid has exited.
    fn operator_failure(&self, pid: u32) -> Option<String> {
        let mut operators = self.operators.lock().unwrap();
        let op = operators.iter_mut().find(|o| o.pid() == pid)?;
        op.exited()
            .map(|status| format!("the operator exited ({status}):\n{}", op.log_text()))
    }

    /// Runs `f` on the operator process with this pid.
    pub fn with_operator<T>(&self, pid: u32, f: impl FnOnce(&mut OperatorProcess) -> T) -> T {
        let mut operators = self.operators.lock().unwrap();
        let op = operators
            .iter_mut()
            .find(|o| o.pid() == pid)
            .expect("an operator with that pid");
        f(op)
    }

    /// SIGKILLs every operator: reconciles in flight stop where they stand.
    pub fn kill_operator(&self) {
        for op in self.operators.lock().unwrap().iter_mut() {
            let _ = op.child.kill();
            let _ = op.child.wait();
        }
    }

    /// SIGKILLs one operator.
    pub fn kill(&self, pid: u32) {
        self.with_operator(pid, |op| {
            let _ = op.child.kill();
            let _ = op.child.wait();
        });
    }

    /// Sends SIGTERM and waits for the exit, returning its status.
    pub async fn terminate(&self, pid: u32) -> std::process::ExitStatus {
        // SAFETY: sends a signal to our own child.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.with_operator(pid, |op| op.exited()) {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within 20 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn api(&self) -> Api<ServerGroup> {
        Api::namespaced(self.kube.clone(), &self.ns)
    }

    pub async fn apply(&self, name: &str, spec: Value) -> Result<ServerGroup, kube::Error> {
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

    pub async fn secret(&self, name: &str, token: &str) {
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

    pub async fn get(&self, name: &str) -> Option<ServerGroup> {
        self.api().get_opt(name).await.expect("get works")
    }

    /// Waits until `done` holds for the object (or its absence).
    pub async fn wait(
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
                panic!(
                    "{name} did not get there in {timeout:?}: {current:#?}\n{}",
                    self.operator_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_ready(&self, name: &str) -> ServerGroup {
        self.wait(name, Duration::from_secs(30), ready_now)
            .await
            .unwrap()
    }

    pub async fn delete(&self, name: &str) {
        self.api()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete is accepted");
    }

    pub async fn annotate(&self, name: &str, key: &str, value: Option<&str>) {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.api()
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect("annotate");
    }

    /// The reasons of the Events about `name`, read as `kubectl` would (events.k8s.io).
    pub async fn event_reasons(&self, name: &str) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.kube.clone(), &self.ns);
        events
            .list(&Default::default())
            .await
            .expect("events list")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter_map(|e| e.reason)
            .collect()
    }

    /// kubectl as the admin, in this test's namespace, run off the async threads.
    pub async fn kubectl(&self, args: &[&str]) -> std::process::Output {
        let kubeconfig = self.admin_kubeconfig();
        let cache = self.dir.join("kubectl-cache");
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let ns = self.ns.clone();
        tokio::task::spawn_blocking(move || kubectl(&kubeconfig, &cache, &ns, &args))
            .await
            .unwrap()
    }

    /// The operators' logs, for failure messages.
    pub fn operator_logs(&self) -> String {
        let Ok(operators) = self.operators.try_lock() else {
            return String::new();
        };
        let mut out = String::new();
        for op in operators.iter() {
            let text = op.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            out.push_str(&format!(
                "--- {} (last {} lines)\n{}\n",
                op.name,
                tail.len(),
                tail.join("\n")
            ));
        }
        out
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.operator_logs());
        }
        self.kill_operator();
        self.sim.shutdown();
        match &self.backend {
            Backend::TestServer(s) => s.shutdown(),
            Backend::Real => {
                // Leave nothing behind on a shared cluster: the namespace (with its
                // ServerGroups, whose finalizers no operator will release now) goes.
                let kubeconfig = self.admin_kubeconfig();
                let ns = self.ns.clone();
                let extra = (self.install == Install::ClusterWide).then(|| {
                    (
                        self.operator_ns.clone(),
                        release_for(self.install, &self.ns),
                    )
                });
                let cache = self.dir.join("kubectl-cache");
                let _ = std::thread::spawn(move || {
                    let run = |args: &[&str]| {
                        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
                        kubectl(&kubeconfig, &cache, &ns, &args)
                    };
                    let release = r#"{"metadata":{"finalizers":null}}"#;
                    for kind in ["servergroups.openstack.waldur.com", "secrets"] {
                        run(&["patch", kind, "--all", "--type=merge", "-p", release]);
                    }
                    run(&[
                        "delete",
                        "namespace",
                        &ns,
                        "--wait=false",
                        "--ignore-not-found",
                    ]);
                    if let Some((op_ns, release)) = extra {
                        for what in [
                            format!("namespace/{op_ns}"),
                            format!("clusterrole/{release}"),
                            format!("clusterrolebinding/{release}"),
                        ] {
                            run(&["delete", &what, "--wait=false", "--ignore-not-found"]);
                        }
                    }
                })
                .join();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn sim_config() -> SimConfig {
    SimConfig {
        delays: Delays {
            schedule: Duration::from_millis(100),
            run: Duration::from_millis(100),
        },
        ..Default::default()
    }
}

/// The operator reads these from the environment; a developer's own must not leak in.
fn clear_operator_env(cmd: &mut Command) {
    for (key, _) in std::env::vars() {
        let ours = [
            "KUBECONFIG",
            "WATCH_NAMESPACE",
            "POD_NAMESPACE",
            "POD_NAME",
            "LEADER_ELECT",
            "METRICS_ADDR",
            "ADMIN_ADDR",
            "RESYNC_PERIOD",
            "REIMPORT_WAIT",
            "TENANT_PULLS",
            "TENANT_PULL_FLOOR",
            "DEFAULT_CREDENTIALS_NAMESPACES",
            "PULL_INTERVAL",
            "CONCURRENCY",
            "LOG_LEVEL",
            "LOG_FORMAT",
            "READ_PATH",
            "BUSY_SWEEP",
        ];
        if key.starts_with("WALDUR_") || key.starts_with("LEASE_") || ours.contains(&key.as_str()) {
            cmd.env_remove(key);
        }
    }
}

/// A namespace name of the test's own: a readable prefix and a random suffix.
fn namespace_name(test: &str) -> String {
    let prefix: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    format!(
        "{}-{:06x}",
        prefix.trim_matches('-'),
        rand::random::<u32>() & 0xff_ffff
    )
}

pub async fn client_from(yaml: &str) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(yaml).expect("a kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a client config");
    Client::try_from(config).expect("a client")
}

/// Installs (or updates) the CRD and waits until the API server serves it.
async fn install_crd(kube: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(kube.clone());
    let name = "servergroups.openstack.waldur.com";
    crds.patch(
        name,
        &PatchParams::apply("waldur-operator-e2e").force(),
        &Patch::Apply(waldur_operator::api::crd()),
    )
    .await
    .expect("the CRD applies");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let crd = crds.get(name).await.expect("the CRD reads back");
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the CRD was not Established in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_namespace(kube: &Client, ns: &str) {
    let namespaces: Api<Namespace> = Api::all(kube.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .expect("the namespace is created");
}

/// The release name: the chart's default for one namespace; for a cluster-wide install, one
/// of the test's own, since ClusterRoles are shared by every test on the cluster.
fn release_for(install: Install, ns: &str) -> String {
    match install {
        Install::OneNamespace => RELEASE.to_string(),
        Install::ClusterWide => format!("wo-{ns}"),
    }
}

pub fn helm() -> PathBuf {
    control_plane::helm_dir()
        .unwrap_or_else(|e| panic!("helm is needed for the real tier: {e}"))
        .join("helm")
}

/// `helm template` of the chart into `release_ns`, as a user would install it.
pub fn helm_template(release: &str, release_ns: &str, extra: &[&str]) -> Vec<Value> {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/waldur-operator");
    let out = Command::new(helm())
        .args(["template", release, chart, "--namespace", release_ns])
        .args(["--set", "waldur.url=http://waldur.invalid"])
        .args(extra)
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("helm renders YAML");
        if v.is_object() {
            docs.push(v);
        }
    }
    docs
}

/// Applies what the chart renders for access: the ServiceAccount and every RBAC object.
/// Returns the ServiceAccount's name.
async fn apply_chart_rbac(kube: &Client, ns: &str, operator_ns: &str, install: Install) -> String {
    let wanted = [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
    ];
    let release = release_for(install, ns);
    let watch = format!("watchNamespace={ns}");
    let extra: Vec<&str> = match install {
        Install::OneNamespace => vec!["--set", &watch],
        Install::ClusterWide => vec![],
    };
    let docs: Vec<Value> = helm_template(&release, operator_ns, &extra)
        .into_iter()
        .filter(|d| wanted.contains(&d["kind"].as_str().unwrap_or_default()))
        .collect();
    let expected = match install {
        Install::OneNamespace => "Role",
        Install::ClusterWide => "ClusterRole",
    };
    assert!(
        docs.iter().any(|d| d["kind"] == expected),
        "the chart renders a {expected} for a {install:?} install"
    );
    apply_all(kube, &docs).await;
    docs.iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .and_then(|d| d["metadata"]["name"].as_str())
        .expect("the chart renders a ServiceAccount")
        .to_string()
}

/// Server-side applies each object, as `kubectl apply --server-side` would.
pub async fn apply_all(kube: &Client, docs: &[Value]) {
    let discovery = Discovery::new(kube.clone()).run().await.expect("discovery");
    for doc in docs {
        let obj: DynamicObject = serde_json::from_value(doc.clone()).expect("an object");
        let gvk = obj
            .types
            .as_ref()
            .map(|t| kube::core::GroupVersionKind::try_from(t).expect("apiVersion and kind"))
            .expect("typed");
        let (ar, caps): (ApiResource, ApiCapabilities) =
            discovery.resolve_gvk(&gvk).expect("a known kind");
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => Api::namespaced_with(
                kube.clone(),
                obj.namespace().as_deref().unwrap_or("default"),
                &ar,
            ),
            Scope::Cluster => Api::all_with(kube.clone(), &ar),
        };
        api.patch(
            &obj.name_any(),
            &PatchParams::apply("e2e-admin").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("{} {}: {e}", gvk.kind, obj.name_any()));
    }
}

/// A token of the ServiceAccount, from the TokenRequest API (as the kubelet gets one).
pub async fn service_account_token(kube: &Client, ns: &str, sa: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(kube.clone(), ns);
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": 3600}
    }))
    .unwrap();
    let answer: TokenRequest = accounts
        .create_subresource("token", sa, &PostParams::default(), &request)
        .await
        .expect("a ServiceAccount token");
    answer.status.and_then(|s| s.token).expect("a token")
}

/// The admin kubeconfig with its user replaced by a bearer token.
fn token_kubeconfig(admin_yaml: &str, token: &str, ns: &str) -> String {
    let mut config: Value = serde_yaml_ng::from_str(admin_yaml).expect("a kubeconfig");
    let current = config["current-context"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let context = config["contexts"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == current.as_str()))
        .cloned()
        .expect("the current context");
    let cluster_name = context["context"]["cluster"].clone();
    let cluster = config["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == cluster_name))
        .cloned()
        .expect("the current cluster");
    config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster_name, "user": "operator", "namespace": ns}}],
        "current-context": "operator",
    });
    serde_yaml_ng::to_string(&config).expect("YAML")
}

pub fn kubectl(kubeconfig: &Path, cache: &Path, ns: &str, args: &[String]) -> std::process::Output {
    let bin = control_plane::kubectl();
    Command::new(&bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(["-n", ns])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl is needed for this test and could not run ({bin}): {e}")
        })
}

/// Polls `url` until it answers 200; fails with `dead()`'s reason if the process behind it
/// exits first.
pub async fn wait_http_ok(url: &str, dead: impl Fn() -> Option<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = reqwest::Client::new();
    loop {
        if let Some(reason) = dead() {
            panic!("{url}: {reason}");
        }
        if let Ok(r) = client.get(url).timeout(Duration::from_secs(2)).send().await
            && r.status().is_success()
        {
            return r.text().await.unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer 200 within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn http_get(url: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

pub fn condition(sg: &ServerGroup, type_: &str) -> Option<(String, String, String, Option<i64>)> {
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
pub fn ready_now(sg: Option<&ServerGroup>) -> bool {
    sg.and_then(|s| condition(s, "Ready").map(|c| (c, s.metadata.generation)))
        .is_some_and(|(c, generation)| c.0 == "True" && c.3 == generation)
}

pub fn reason(type_: &'static str, want: &'static str) -> impl Fn(Option<&ServerGroup>) -> bool {
    move |sg| {
        sg.and_then(|s| condition(s, type_))
            .is_some_and(|c| c.1 == want)
    }
}
