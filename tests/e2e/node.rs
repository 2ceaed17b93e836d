//! The node tier (issue 19): the operator as users run it, a container of its released image in
//! a pod that `helm install` (or `kubectl apply -k deploy/`, or the release's install.yaml)
//! makes, on a real one-node cluster on this machine (tests/control-plane/src/node.rs: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, containerd, kubelet, kube-proxy and
//! a bridge CNI). Each test talks to its own Waldur simulator, listening on the node's address,
//! which pods reach without leaving the host.
//!
//! One node per machine: the tests take turns on one shared node, started on first use and
//! torn down (the host restored) when the test binary exits. They need root and the Debian
//! packages of scripts/install-tools; without them this tier says loudly that it did not run,
//! and fails with CI=true. WALDUR_OPERATOR_BINARY names the static release binary to pack into
//! the image (scripts/test builds it); without it scripts/node-image builds one.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use control_plane::helm_dir;
use control_plane::node::{self, Node};
use serde_json::Value;
use waldur_sim::{DEFAULT_TENANT, Delays, SimConfig, Simulator};

const HOW: &str = "run as root, with the packages scripts/install-tools installs as root \
                   (containerd runc containernetworking-plugins umoci skopeo iptables) and \
                   the Go builds of scripts/k8s-assets node";
const OPERATOR_NS: &str = "waldur-operator";
const RELEASE: &str = "wo";
const CRD: &str = "servergroups.openstack.waldur.com";

struct Tier {
    node: &'static Node,
    repository: String,
    tag: String,
}

static TIER: OnceLock<Option<Tier>> = OnceLock::new();
static TURN: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();

fn start() -> Option<Tier> {
    if let Err(why) = node::preflight() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and the node tier cannot run: {why}; {HOW}");
        }
        eprintln!("\n*** node: THIS TIER DID NOT RUN ({why}): {HOW} ***\n");
        return None;
    }
    let node = Node::shared();
    // Before the first pod: every rule that keeps the node's traffic on this host.
    let checked = node
        .check_isolation()
        .unwrap_or_else(|e| panic!("the isolation rules are not in place: {e}"));
    let pods = kubectl(node, &["get", "pods", "-A", "-o", "name"]);
    assert_eq!(pods.trim(), "", "no pod runs before the isolation check");
    eprintln!(
        "node: up in {:.1} s; isolation checked before the first pod:\n  {}",
        node.started_in().as_secs_f64(),
        checked.join("\n  ")
    );
    let binary = std::env::var_os("WALDUR_OPERATOR_BINARY").map(PathBuf::from);
    let t = Instant::now();
    let image = node
        .build_operator_image(binary.as_deref())
        .unwrap_or_else(|e| panic!("the operator image: {e}"));
    eprintln!(
        "node: image {image} packed and imported in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (repository, tag) = image.rsplit_once(':').expect("a tagged image");
    Some(Tier {
        node,
        repository: repository.to_string(),
        tag: tag.to_string(),
    })
}

/// The node, this test's turn on it, and a simulator on the node's address; `None` (the tier
/// said why) when this machine cannot run it.
async fn tier() -> Option<(
    &'static Tier,
    tokio::sync::MutexGuard<'static, ()>,
    Simulator,
)> {
    let turn = TURN
        .get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await;
    let tier = tokio::task::spawn_blocking(|| TIER.get_or_init(start).as_ref())
        .await
        .expect("the tier starts")?;
    let sim = Simulator::start_on(
        SimConfig {
            delays: Delays {
                schedule: Duration::from_millis(100),
                run: Duration::from_millis(200),
            },
            ..SimConfig::default()
        },
        SocketAddr::new(IpAddr::V4(tier.node.address()), 0),
    )
    .await
    .expect("the simulator listens on the node address");
    Some((tier, turn, sim))
}

fn kubectl_cmd(node: &Node, args: &[&str]) -> Command {
    let mut c = Command::new(control_plane::kubectl());
    c.arg("--kubeconfig").arg(node.kubeconfig()).args(args);
    c
}

/// kubectl's stdout; panics with its stderr when it fails.
fn kubectl(node: &Node, args: &[&str]) -> String {
    let out = kubectl_cmd(node, args).output().expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl_json(node: &Node, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(node, &all)).expect("kubectl prints JSON")
}

fn kubectl_apply(node: &Node, yaml: &str) {
    let mut child = kubectl_cmd(node, &["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("kubectl runs");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), yaml.as_bytes())
        .expect("the manifest is written");
    assert!(
        child.wait().expect("kubectl ends").success(),
        "kubectl apply"
    );
}

fn helm(node: &Node, args: &[&str]) {
    let helm = helm_dir().expect("helm is built").join("helm");
    let out = Command::new(helm)
        .arg("--kubeconfig")
        .arg(node.kubeconfig())
        .args(args)
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/waldur-operator")
}

/// What a user sets: the image, and where Waldur is.
fn install_args(t: &Tier, sim: &Simulator, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--namespace",
        OPERATOR_NS,
        "--create-namespace",
        "--wait",
        "--timeout=180s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        format!("--set=image.repository={}", t.repository),
        format!("--set=image.tag={}", t.tag),
        format!("--set=waldur.url={}", sim.base_url()),
        format!("--set=waldur.token={}", SimConfig::default().staff_token),
        "--set=defaultCredentials.namespaces={*}".to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn helm_install(t: &Tier, sim: &Simulator, extra: &[&str]) -> Duration {
    let started = Instant::now();
    let mut args = vec![
        "install".to_string(),
        RELEASE.into(),
        chart().display().to_string(),
    ];
    args.extend(install_args(t, sim, extra));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    helm(t.node, &args);
    started.elapsed()
}

/// Puts the node back as it was for the next test: the test's namespaces deleted while the
/// operator still runs (it deletes their groups and lets go of their Secrets), then the
/// release, the CRD (kept by the chart on uninstall) and the operator's namespace.
struct Cleanup<'a> {
    node: &'a Node,
    namespaces: Vec<String>,
    kustomized: Option<PathBuf>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = kubectl_cmd(self.node, args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        for ns in &self.namespaces {
            quiet(&[
                "delete",
                "namespace",
                ns,
                "--ignore-not-found",
                "--timeout=120s",
            ]);
        }
        match &self.kustomized {
            Some(dir) => {
                let dir = dir.display().to_string();
                quiet(&["delete", "-k", &dir, "--ignore-not-found", "--timeout=120s"]);
            }
            None => {
                let helm = helm_dir().expect("helm is built").join("helm");
                let _ = Command::new(helm)
                    .arg("--kubeconfig")
                    .arg(self.node.kubeconfig())
                    .args(["uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait"])
                    .output();
            }
        }
        // Anything a failed test left holding the finalizer would hold the CRD's deletion.
        if let Ok(out) = kubectl_cmd(self.node, &["get", "servergroups", "-A", "-o", "json"])
            .stderr(Stdio::null())
            .output()
            && let Ok(list) = serde_json::from_slice::<Value>(&out.stdout)
        {
            for sg in list["items"].as_array().into_iter().flatten() {
                let (ns, name) = (
                    sg["metadata"]["namespace"].as_str().unwrap_or_default(),
                    sg["metadata"]["name"].as_str().unwrap_or_default(),
                );
                quiet(&[
                    "patch",
                    "servergroup",
                    name,
                    "-n",
                    ns,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ]);
            }
        }
        quiet(&["delete", "crd", CRD, "--ignore-not-found", "--timeout=60s"]);
        quiet(&[
            "delete",
            "namespace",
            OPERATOR_NS,
            "--ignore-not-found",
            "--timeout=120s",
        ]);
    }
}

fn group_yaml(ns: &str, name: &str, credentials: Option<&str>) -> String {
    let creds = credentials
        .map(|c| format!("  credentialsRef:\n    name: {c}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: openstack.waldur.com/v1alpha1\nkind: ServerGroup\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  policy: affinity\n  tenant: {DEFAULT_TENANT}\n  deletionPolicy: Delete\n{creds}---\n"
    )
}

/// Waits until every ServerGroup of `ns` (at least `n`) is Ready.
fn wait_all_ready(node: &Node, ns: &str, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let list = kubectl_json(node, &["get", "servergroups", "-n", ns]);
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let ready = items.iter().filter(|sg| is_ready(sg)).count();
        if items.len() >= n && ready == items.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ready} of {} ServerGroups in {ns} Ready after {within:?} (want {n})\n{}",
            items.len(),
            operator_logs(node)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn is_ready(sg: &Value) -> bool {
    sg["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn operator_logs(node: &Node) -> String {
    let out = kubectl_cmd(
        node,
        &[
            "logs",
            "-n",
            OPERATOR_NS,
            "--selector=app.kubernetes.io/name=waldur-operator",
            "--tail=40",
            "--prefix",
        ],
    )
    .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn operator_pods(node: &Node) -> Vec<Value> {
    kubectl_json(
        node,
        &[
            "get",
            "pods",
            "-n",
            OPERATOR_NS,
            "--selector=app.kubernetes.io/name=waldur-operator",
        ],
    )["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Each name appears once among the simulator's groups, and each was created once.
fn each_group_once(sim: &Simulator, names: &[String]) {
    let groups = sim.groups();
    for name in names {
        let n = groups.iter().filter(|g| g["name"] == name.as_str()).count();
        assert_eq!(n, 1, "{name}: {n} groups in Waldur");
    }
    assert_eq!(
        sim.requests("create"),
        names.len() as u64,
        "one create per ServerGroup, never two"
    );
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

fn apply_groups(node: &Node, ns: &str, names: &[String], credentials: Option<&str>) {
    let yaml: String = names
        .iter()
        .map(|n| group_yaml(ns, n, credentials))
        .collect();
    kubectl_apply(node, &yaml);
}

/// The Lease's holder (a pod name), if any.
fn lease_holder(node: &Node, name: &str) -> Option<String> {
    let out = kubectl_cmd(
        node,
        &["get", "lease", name, "-n", OPERATOR_NS, "-o", "json"],
    )
    .stderr(Stdio::null())
    .output()
    .ok()?;
    let lease: Value = serde_json::from_slice(&out.stdout).ok()?;
    lease["spec"]["holderIdentity"]
        .as_str()
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}

/// The host PID of a pod's first container, from containerd.
fn container_pid(node: &Node, pod: &Value) -> u32 {
    let id = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|c| c.strip_prefix("containerd://"))
        .expect("a containerd container id")
        .to_string();
    let out = Command::new("ctr")
        .arg("--address")
        .arg(node.containerd_socket())
        .args(["-n", "k8s.io", "tasks", "ls"])
        .output()
        .expect("ctr runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no task {id} in containerd"))
}

/// An HTTP GET from inside a network namespace (curl through nsenter): the status code, None
/// when nothing answered within 2 s.
fn probe(netns: &str, url: &str) -> Option<u16> {
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args([
            "curl",
            "-s",
            "-m",
            "2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ])
        .output()
        .expect("nsenter and curl run");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|&c| c != 0)
}

/// Packets the node's egress chain has dropped.
fn egress_drops() -> u64 {
    let out = Command::new("iptables")
        .args([
            "-w",
            "-t",
            "mangle",
            "-L",
            node::EGRESS_CHAIN,
            "-v",
            "-n",
            "-x",
        ])
        .output()
        .expect("iptables runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("DROP"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the egress chain's DROP rule and its counter")
}

/// `helm install` with the chart's default values, plus the image and where Waldur is: the
/// pod is Ready (its probes pass), it logs its start line, runs with the security settings the
/// chart asks for (checked on the running process, not the YAML), serves metrics through the
/// chart's Service, and reconciles a ServerGroup to Ready and away in Waldur.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_with_default_values_runs_the_operator_pod() {
    let Some((t, _turn, sim)) = tier().await else {
        return;
    };
    let node = t.node;
    let _cleanup = Cleanup {
        node,
        namespaces: vec!["node-a".into()],
        kustomized: None,
    };
    let install = helm_install(t, &sim, &[]);
    let pods = operator_pods(node);
    assert_eq!(pods.len(), 1, "one replica by default");
    let pod = &pods[0];
    let status = &pod["status"]["containerStatuses"][0];
    assert_eq!(status["ready"], true, "the readiness probe passes");
    assert_eq!(status["restartCount"], 0, "the liveness probe never failed");
    let logs = kubectl(
        node,
        &["logs", "-n", OPERATOR_NS, "deploy/wo-waldur-operator"],
    );
    assert!(logs.contains("starting"), "the start line:\n{logs}");

    // The security settings as the kernel applies them to the running process.
    let pid = container_pid(node, pod);
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(
        field("Uid"),
        "65532 65532 65532 65532",
        "non-root (nonroot, 65532)"
    );
    assert_eq!(field("Gid"), "65532 65532 65532 65532");
    for caps in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            field(caps),
            "0000000000000000",
            "{caps}: every capability dropped"
        );
    }
    assert_eq!(field("NoNewPrivs"), "1", "allowPrivilegeEscalation: false");
    assert_eq!(field("Seccomp"), "2", "seccomp RuntimeDefault (a filter)");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("its mounts");
    let root = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    let options = root.split_whitespace().nth(5).unwrap_or_default();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "read-only root filesystem: {root}"
    );

    // From inside the pod's network namespace: the simulator on the node address answers;
    // an address beyond this host (TEST-NET-3, which the default route would carry out) does
    // not, and it is the node's egress rule that drops it.
    let netns = format!("/proc/{pid}/ns/net");
    assert!(
        probe(&netns, &format!("{}/api/", sim.base_url())).is_some(),
        "the pod reaches the simulator on the node address"
    );
    let dropped = egress_drops();
    assert_eq!(
        probe(&netns, "http://203.0.113.1/"),
        None,
        "nothing beyond this host answers a pod"
    );
    assert!(
        egress_drops() > dropped,
        "{} dropped the pod's packet to 203.0.113.1",
        node::EGRESS_CHAIN
    );

    let t0 = Instant::now();
    kubectl(node, &["create", "namespace", "node-a"]);
    apply_groups(node, "node-a", &["web".to_string()], None);
    wait_all_ready(node, "node-a", 1, Duration::from_secs(60));
    let group_ready = t0.elapsed();
    each_group_once(&sim, &["web".to_string()]);

    // Metrics through the chart's Service (the API server's proxy: the host itself cannot
    // reach ClusterIPs, which are blackholed on it).
    let metrics = kubectl(
        node,
        &[
            "get",
            "--raw",
            &format!(
                "/api/v1/namespaces/{OPERATOR_NS}/services/http:wo-waldur-operator-metrics:metrics/proxy/metrics"
            ),
        ],
    );
    for family in [
        "waldur_operator_reconciles_total",
        "waldur_operator_leader{",
        "waldur_operator_build_info{",
    ] {
        assert!(
            metrics.contains(family),
            "{family} is scraped through the Service"
        );
    }

    kubectl(
        node,
        &[
            "delete",
            "servergroup",
            "web",
            "-n",
            "node-a",
            "--timeout=60s",
        ],
    );
    assert!(
        sim.groups().is_empty(),
        "deleted in Waldur: {:?}",
        sim.groups()
    );
    eprintln!(
        "node figures: helm install -> pod Ready {:.1} s; ServerGroup Ready {:.1} s after apply",
        install.as_secs_f64(),
        group_ready.as_secs_f64()
    );
}

/// Two replicas with the PodDisruptionBudget: the leader pod deleted (SIGTERM, as a drain or
/// a rollout sends) gives up its Lease, the standby leads well within the lease duration, and
/// groups created before, during and after are each created once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_fail_over_when_the_leader_pod_goes() {
    let Some((t, _turn, sim)) = tier().await else {
        return;
    };
    let node = t.node;
    let _cleanup = Cleanup {
        node,
        namespaces: vec!["node-b".into()],
        kustomized: None,
    };
    helm_install(
        t,
        &sim,
        &[
            "--set=replicaCount=2",
            "--set=podDisruptionBudget.enabled=true",
        ],
    );
    let pdb = kubectl_json(
        node,
        &["get", "pdb", "-n", OPERATOR_NS, "wo-waldur-operator"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while kubectl_json(
        node,
        &["get", "pdb", "-n", OPERATOR_NS, "wo-waldur-operator"],
    )["status"]["disruptionsAllowed"]
        != 1
    {
        assert!(
            Instant::now() < deadline,
            "the budget allows one disruption: {pdb}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    kubectl(node, &["create", "namespace", "node-b"]);
    let before = names("before", 10);
    apply_groups(node, "node-b", &before, None);
    wait_all_ready(node, "node-b", before.len(), Duration::from_secs(60));

    let lease = "wo-waldur-operator";
    let leader = lease_holder(node, lease).expect("a leader holds the Lease");
    let during = names("during", 10);
    let t0 = Instant::now();
    kubectl(
        node,
        &["delete", "pod", &leader, "-n", OPERATOR_NS, "--wait=false"],
    );
    apply_groups(node, "node-b", &during, None);
    let new_leader = loop {
        if let Some(h) = lease_holder(node, lease).filter(|h| *h != leader) {
            break h;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the standby did not lead within the lease duration (15 s)\n{}",
            operator_logs(node)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let failover = t0.elapsed();
    let after = names("after", 10);
    apply_groups(node, "node-b", &after, None);
    let all: Vec<String> = [before, during, after].concat();
    wait_all_ready(node, "node-b", all.len(), Duration::from_secs(90));
    each_group_once(&sim, &all);
    eprintln!(
        "node figures: leader pod {leader} deleted; {new_leader} leads {:.1} s later (lease duration 15 s)",
        failover.as_secs_f64()
    );
}

/// `helm upgrade` to another image tag with changed values, then `helm rollback`, while 100
/// ServerGroups exist and more are being created: no group created twice, no finalizer lost,
/// all Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_upgrade_and_rollback_under_load() {
    let Some((t, _turn, sim)) = tier().await else {
        return;
    };
    let node = t.node;
    let _cleanup = Cleanup {
        node,
        namespaces: vec!["node-c".into()],
        kustomized: None,
    };
    helm_install(t, &sim, &[]);
    kubectl(node, &["create", "namespace", "node-c"]);
    let first = names("load", 100);
    apply_groups(node, "node-c", &first, None);
    wait_all_ready(node, "node-c", first.len(), Duration::from_secs(180));

    // The same image under a second tag: what an upgrade to a new release looks like here.
    let tag2 = format!("{}-next", t.tag);
    let out = Command::new("ctr")
        .arg("--address")
        .arg(node.containerd_socket())
        .args(["-n", "k8s.io", "images", "tag", "--force"])
        .arg(format!("{}:{}", t.repository, t.tag))
        .arg(format!("{}:{tag2}", t.repository))
        .output()
        .expect("ctr runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let more = names("more", 20);
    let creating = {
        let kubeconfig = node.kubeconfig();
        let more = more.clone();
        std::thread::spawn(move || {
            for name in &more {
                let mut child = Command::new(control_plane::kubectl())
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .args(["apply", "-f", "-"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("kubectl runs");
                std::io::Write::write_all(
                    &mut child.stdin.take().expect("stdin"),
                    group_yaml("node-c", name, None).as_bytes(),
                )
                .expect("written");
                assert!(child.wait().expect("kubectl ends").success());
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    let t0 = Instant::now();
    let mut upgrade = vec![
        "upgrade".to_string(),
        RELEASE.into(),
        chart().display().to_string(),
    ];
    upgrade.extend(install_args(
        t,
        &sim,
        &[
            &format!("--set=image.tag={tag2}"),
            "--set=logLevel=debug",
            "--set=concurrency=8",
        ],
    ));
    let upgrade: Vec<&str> = upgrade.iter().map(String::as_str).collect();
    helm(node, &upgrade);
    let upgraded = t0.elapsed();
    let images: Vec<String> = operator_pods(node)
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            p["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(
        images.iter().all(|i| i.ends_with(&tag2)),
        "the new tag runs: {images:?}"
    );
    let t1 = Instant::now();
    helm(
        node,
        &[
            "rollback",
            RELEASE,
            "1",
            "--namespace",
            OPERATOR_NS,
            "--wait",
            "--timeout=180s",
        ],
    );
    let rolled_back = t1.elapsed();
    creating.join().expect("the creates went in");
    let all: Vec<String> = [first, more].concat();
    wait_all_ready(node, "node-c", all.len(), Duration::from_secs(180));
    each_group_once(&sim, &all);
    let list = kubectl_json(node, &["get", "servergroups", "-n", "node-c"]);
    for sg in list["items"].as_array().into_iter().flatten() {
        let finalizers = sg["metadata"]["finalizers"].to_string();
        assert!(
            finalizers.contains("openstack.waldur.com/server-group"),
            "{}: finalizer lost ({finalizers})",
            sg["metadata"]["name"]
        );
    }
    eprintln!(
        "node figures: helm upgrade (new tag, changed values) {:.1} s, helm rollback {:.1} s, with 100 groups and 20 more created meanwhile",
        upgraded.as_secs_f64(),
        rolled_back.as_secs_f64()
    );
}

/// The sharded chart (`sharding.shards=2`): a Deployment per shard, and each shard's pod
/// creates only the groups of the ServerGroups whose uid falls to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sharded_chart_splits_the_work_between_its_pods() {
    let Some((t, _turn, sim)) = tier().await else {
        return;
    };
    let node = t.node;
    let _cleanup = Cleanup {
        node,
        namespaces: vec!["node-d".into()],
        kustomized: None,
    };
    helm_install(t, &sim, &["--set=sharding.shards=2"]);
    kubectl(node, &["create", "namespace", "node-d"]);
    let all = names("shard", 20);
    apply_groups(node, "node-d", &all, None);
    wait_all_ready(node, "node-d", all.len(), Duration::from_secs(120));
    each_group_once(&sim, &all);
    // Which pod created each: the Created Event's reporting instance (POD_NAME).
    let events = kubectl_json(node, &["get", "events", "-n", "node-d"]);
    let sgs = kubectl_json(node, &["get", "servergroups", "-n", "node-d"]);
    let mut by_shard = [0usize; 2];
    for sg in sgs["items"].as_array().into_iter().flatten() {
        let name = sg["metadata"]["name"].as_str().unwrap_or_default();
        let uid = sg["metadata"]["uid"].as_str().unwrap_or_default();
        let shard = waldur_operator::sharding::slot(uid, 2);
        let creator = events["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["involvedObject"]["name"] == name && e["reason"] == "Created")
            .and_then(|e| e["reportingInstance"].as_str())
            .unwrap_or_else(|| panic!("{name}: no Created Event"));
        assert!(
            creator.contains(&format!("-shard-{shard}-")),
            "{name} (shard {shard}) was created by {creator}"
        );
        by_shard[shard as usize] += 1;
    }
    assert!(
        by_shard.iter().all(|n| *n > 0),
        "both shards had work: {by_shard:?}"
    );
}

/// `kubectl apply -k` of deploy/ through an overlay that sets the image and Waldur's address,
/// as a user of the plain manifests does; then the release's install.yaml (deploy/ rendered
/// with the image pinned, as .github/workflows/release.yml makes it). Each reaches a Ready
/// ServerGroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_kustomization_and_install_yaml_reach_a_ready_group() {
    let Some((t, _turn, sim)) = tier().await else {
        return;
    };
    let node = t.node;
    let dir = std::env::temp_dir().join(format!("waldur-node-kustomize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let base = dir.join("deploy");
    std::fs::create_dir_all(&base).expect("a scratch directory");
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for entry in std::fs::read_dir(&deploy).expect("deploy/") {
        let path = entry.expect("an entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, base.join(path.file_name().expect("a name"))).expect("copied");
        }
    }
    let overlay = dir.join("overlay");
    std::fs::create_dir_all(&overlay).expect("the overlay");
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../deploy\nimages:\n  - name: ghcr.io/waldur/waldur-operator\n    newName: {}\n    newTag: \"{}\"\npatches:\n  - target:\n      kind: Deployment\n      name: waldur-operator\n    patch: |-\n      - op: replace\n        path: /spec/template/spec/containers/0/env/2/value\n        value: {}\n      - op: add\n        path: /spec/template/spec/containers/0/env/-\n        value: {{name: DEFAULT_CREDENTIALS_NAMESPACES, value: \"*\"}}\n",
            t.repository,
            t.tag,
            sim.base_url()
        ),
    )
    .expect("the overlay is written");
    let rendered = kubectl(node, &["kustomize", &overlay.display().to_string()]);
    assert!(
        rendered.contains(&format!("value: {}", sim.base_url())),
        "the overlay's patch names WALDUR_URL (env index 2):\n{rendered}"
    );

    for (how, install_yaml) in [("apply -k", false), ("install.yaml", true)] {
        let cleanup = Cleanup {
            node,
            namespaces: vec!["node-e".into()],
            kustomized: Some(overlay.clone()),
        };
        kubectl(node, &["create", "namespace", OPERATOR_NS]);
        kubectl(
            node,
            &[
                "create",
                "secret",
                "generic",
                "waldur-operator-credentials",
                "-n",
                OPERATOR_NS,
                &format!("--from-literal=token={}", SimConfig::default().staff_token),
            ],
        );
        if install_yaml {
            let file = dir.join("install.yaml");
            std::fs::write(&file, &rendered).expect("install.yaml");
            kubectl(node, &["apply", "-f", &file.display().to_string()]);
        } else {
            kubectl(node, &["apply", "-k", &overlay.display().to_string()]);
        }
        kubectl(
            node,
            &[
                "rollout",
                "status",
                "deployment/waldur-operator",
                "-n",
                OPERATOR_NS,
                "--timeout=180s",
            ],
        );
        kubectl(node, &["create", "namespace", "node-e"]);
        apply_groups(node, "node-e", &["plain".to_string()], None);
        wait_all_ready(node, "node-e", 1, Duration::from_secs(60));
        kubectl(
            node,
            &[
                "delete",
                "servergroup",
                "plain",
                "-n",
                "node-e",
                "--timeout=60s",
            ],
        );
        assert!(sim.groups().is_empty(), "{how}: deleted in Waldur");
        drop(cleanup);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Deleting a namespace that holds ServerGroups and their credentials Secret finishes: the
/// Secret stays (the operator's finalizer) until every group is deleted in Waldur with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_namespace_with_groups_and_their_secret_finishes() {
    let Some((t, _turn, sim)) = tier().await else {
        return;
    };
    let node = t.node;
    let _cleanup = Cleanup {
        node,
        namespaces: vec!["node-f".into()],
        kustomized: None,
    };
    helm_install(t, &sim, &["--set=defaultCredentials.namespaces=null"]);
    kubectl(node, &["create", "namespace", "node-f"]);
    kubectl(
        node,
        &[
            "create",
            "secret",
            "generic",
            "creds",
            "-n",
            "node-f",
            &format!("--from-literal=token={}", SimConfig::default().staff_token),
        ],
    );
    let all = names("team", 5);
    apply_groups(node, "node-f", &all, Some("creds"));
    wait_all_ready(node, "node-f", all.len(), Duration::from_secs(60));
    assert_eq!(sim.groups().len(), all.len());
    let t0 = Instant::now();
    kubectl(node, &["delete", "namespace", "node-f", "--timeout=120s"]);
    assert!(
        sim.groups().is_empty(),
        "every group deleted in Waldur: {:?}",
        sim.groups()
    );
    eprintln!(
        "node figures: namespace with 5 groups and their Secret deleted in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
