//! The real node (issue 19), first proofs: the operator runs as a pod from its released image,
//! installed with the chart, against the Waldur simulator on the node's address; and the host
//! is restored after the node, also when its owner was killed with SIGKILL.
//!
//! Needs root and the Debian packages of scripts/install-tools, hence ignored by default:
//!   cargo test -p control-plane --test node -- --ignored --test-threads=1
//! WALDUR_OPERATOR_BINARY names an already built static release binary
//! (`RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked
//! --target x86_64-unknown-linux-gnu --bin waldur-operator`); without it scripts/node-image
//! builds one.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use control_plane::node::{self, EGRESS_CHAIN, NODE_LINK, Node, NodeOptions};
use control_plane::{helm_dir, kubectl};
use waldur_sim::{DEFAULT_TENANT, Delays, SimConfig, Simulator};

/// One node per machine: the tests of this file take turns, and each compares the host before
/// and after its own node.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
#[ignore = "needs root and the real node"]
fn operator_runs_as_a_pod_from_its_image_and_reconciles() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    node::cleanup_stale().expect("the host is restored after an earlier node");
    let before = HostState::take();

    let t = Instant::now();
    let node = Node::start(NodeOptions::default()).expect("the node starts");
    let bring_up = t.elapsed();

    // Before the first pod: every rule that keeps pod traffic on this host is in place.
    let isolation = node
        .check_isolation()
        .expect("the isolation rules are in place before the first pod");
    eprintln!("isolation:\n  {}", isolation.join("\n  "));
    let pods = kubectl_out(&node, &["get", "pods", "-A", "-o", "name"]);
    assert_eq!(pods.trim(), "", "no pod runs before the test's own");

    let t = Instant::now();
    let binary = std::env::var_os("WALDUR_OPERATOR_BINARY").map(PathBuf::from);
    let image = node
        .build_operator_image(binary.as_deref())
        .expect("the operator image is built and imported");
    let image_time = t.elapsed();
    let (repository, tag) = image.rsplit_once(':').expect("a tagged reference");

    // The simulator listens on the node's address, which pods reach without any egress.
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let sim = rt
        .block_on(Simulator::start_on(
            SimConfig {
                delays: Delays {
                    schedule: Duration::from_millis(100),
                    run: Duration::from_millis(100),
                },
                ..SimConfig::default()
            },
            SocketAddr::new(IpAddr::V4(node.address()), 0),
        ))
        .expect("the simulator starts on the node address");

    let t = Instant::now();
    let helm = helm_dir().expect("helm is built").join("helm");
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/waldur-operator");
    let out = Command::new(&helm)
        .arg("--kubeconfig")
        .arg(node.kubeconfig())
        .args(["install", "wo"])
        .arg(&chart)
        .args([
            "--namespace=waldur-operator",
            "--create-namespace",
            &format!("--set=image.repository={repository}"),
            &format!("--set=image.tag={tag}"),
            "--set=image.pullPolicy=IfNotPresent",
            &format!("--set=waldur.url={}", sim.base_url()),
            &format!("--set=waldur.token={}", SimConfig::default().staff_token),
            "--set=defaultCredentials.namespaces={team-a}",
        ])
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm install failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    kubectl_ok(
        &node,
        &[
            "wait",
            "--namespace=waldur-operator",
            "--for=condition=Ready",
            "pod",
            "--selector=app.kubernetes.io/name=waldur-operator",
            "--timeout=180s",
        ],
    );
    let to_pod_ready = t.elapsed();
    let logs = kubectl_out(
        &node,
        &[
            "logs",
            "--namespace=waldur-operator",
            "deploy/wo-waldur-operator",
        ],
    );
    assert!(
        logs.contains("starting"),
        "the operator logged its start line:\n{logs}"
    );

    // From inside the operator pod's network namespace: the simulator on the node address
    // answers; an address beyond this host (TEST-NET-3, which the default route would carry
    // out) does not, and it is our egress rule that drops it.
    let netns = pod_netns();
    let code = probe(&netns, &format!("{}/api/", sim.base_url()));
    assert!(
        code.is_some(),
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
        "{EGRESS_CHAIN} dropped the pod's packet to 203.0.113.1"
    );

    let t = Instant::now();
    kubectl_ok(&node, &["create", "namespace", "team-a"]);
    let group = format!(
        "apiVersion: openstack.waldur.com/v1alpha1\nkind: ServerGroup\nmetadata:\n  name: web\n  namespace: team-a\nspec:\n  policy: anti-affinity\n  tenant: {DEFAULT_TENANT}\n  description: front-end pool\n  deletionPolicy: Delete\n"
    );
    kubectl_stdin(&node, &["apply", "-f", "-"], &group);
    kubectl_ok(
        &node,
        &[
            "wait",
            "--namespace=team-a",
            "--for=condition=Ready",
            "servergroup/web",
            "--timeout=120s",
        ],
    );
    let to_group_ready = t.elapsed();
    let groups = sim.groups();
    assert_eq!(groups.len(), 1, "one group in Waldur: {groups:?}");
    assert_eq!(groups[0]["name"], "web");

    kubectl_ok(
        &node,
        &[
            "delete",
            "--namespace=team-a",
            "servergroup/web",
            "--timeout=120s",
        ],
    );
    assert!(
        sim.groups().is_empty(),
        "the group is gone from Waldur: {:?}",
        sim.groups()
    );

    let run_dir = node.run_dir().to_path_buf();
    let t = Instant::now();
    drop(node);
    let teardown = t.elapsed();
    sim.shutdown();
    eprintln!(
        "figures: bring-up {:.1} s, image build+import {:.1} s, helm install -> pod Ready {:.1} s, ServerGroup Ready {:.1} s, teardown {:.1} s",
        bring_up.as_secs_f64(),
        image_time.as_secs_f64(),
        to_pod_ready.as_secs_f64(),
        to_group_ready.as_secs_f64(),
        teardown.as_secs_f64()
    );
    HostState::take().assert_same_as(&before, &run_dir);
}

/// A node whose owner dies by SIGKILL leaves its shims, containers and host changes behind:
/// the next start (here `waldur-node down`, which runs the same clean-up) restores the host.
#[test]
#[ignore = "needs root and the real node"]
fn host_is_restored_after_the_owner_is_killed() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    node::cleanup_stale().expect("the host is restored after an earlier node");
    let before = HostState::take();
    let dir = std::env::temp_dir().join(format!("waldur-node-kill-{}", std::process::id()));
    let bin = env!("CARGO_BIN_EXE_waldur-node");
    let up = Command::new(bin)
        .args(["up", "--dir"])
        .arg(&dir)
        .output()
        .expect("waldur-node runs");
    assert!(
        up.status.success(),
        "waldur-node up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let kubeconfig = dir.join("kubeconfig");
    // A pod, so that a shim and a container outlive the killed owner. Its image is the
    // node's own pause image, which is always there (no registry, no operator build needed).
    let ready = std::fs::read_to_string(dir.join("ready")).expect("the ready file");
    let pause = ready
        .lines()
        .find_map(|l| l.strip_prefix("pause "))
        .expect("the ready file names the pause image");
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: sleeper\nspec:\n  containers:\n  - name: pause\n    image: {pause}\n    imagePullPolicy: Never\n"
    );
    let mut apply = Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    std::io::Write::write_all(&mut apply.stdin.take().expect("stdin"), pod.as_bytes())
        .expect("the pod is written");
    assert!(apply.wait().expect("kubectl ends").success());
    let wait = Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "wait",
            "--for=condition=Ready",
            "pod/sleeper",
            "--timeout=120s",
        ])
        .status()
        .expect("kubectl runs");
    assert!(wait.success(), "the pod is Ready");

    let pid: i32 = std::fs::read_to_string(dir.join("pid"))
        .expect("a pid file")
        .trim()
        .parse()
        .expect("a pid");
    // SAFETY: SIGKILL to the node's owner, which this test started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: signal 0 only checks existence.
    while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let left = HostState::take();
    eprintln!("after kill -9: {left:#?}");
    assert!(
        left.links.contains(&NODE_LINK.to_string()),
        "the node's interface is left behind"
    );
    assert!(
        left.processes.iter().any(|p| p.contains("containerd-shim")),
        "a shim outlives its owner: {:?}",
        left.processes
    );

    let t = Instant::now();
    let down = Command::new(bin)
        .args(["down", "--dir"])
        .arg(&dir)
        .output()
        .expect("waldur-node runs");
    assert!(
        down.status.success(),
        "waldur-node down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    eprintln!(
        "clean-up after kill -9: {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&down.stderr).trim()
    );
    HostState::take().assert_same_as(&before, &dir.join("run"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Node::shared()` lives as long as its test binary and is torn down at exit (atexit): run
/// this test binary again for that one test, with a marker in the environment, and compare
/// the host after it exits.
#[test]
#[ignore = "needs root and the real node"]
fn shared_node_is_torn_down_when_the_test_binary_exits() {
    const INNER: &str = "WALDUR_NODE_TEST_SHARED_INNER";
    if std::env::var_os(INNER).is_some() {
        let node = Node::shared();
        let status = kubectl_out(
            node,
            &[
                "get",
                "node",
                node.name(),
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ],
        );
        assert_eq!(status, "True");
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    node::cleanup_stale().expect("the host is restored after an earlier node");
    let before = HostState::take();
    let mut inner = Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--ignored",
            "--exact",
            "shared_node_is_torn_down_when_the_test_binary_exits",
        ])
        .env(INNER, "1")
        .spawn()
        .expect("the test binary runs");
    let pid = inner.id();
    assert!(
        inner.wait().expect("it ends").success(),
        "the inner test passes"
    );
    HostState::take().assert_same_as(
        &before,
        &std::env::temp_dir().join(format!("waldur-node-{pid}")),
    );
    assert!(
        node::cleanup_stale()
            .expect("the record is readable")
            .is_none(),
        "the shared node left no record behind: it was torn down at exit"
    );
}

/// What a node changes on the host.
#[derive(Debug, PartialEq)]
struct HostState {
    links: Vec<String>,
    routes: String,
    chains: BTreeMap<String, usize>,
    sysctls: BTreeMap<String, String>,
    netns: Vec<String>,
    kubepods: Vec<String>,
    dirs: Vec<String>,
    processes: Vec<String>,
}

impl HostState {
    fn take() -> HostState {
        let links = std::fs::read_dir("/sys/class/net")
            .expect("/sys/class/net")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let routes = stdout("ip", &["route", "show", "table", "all"]);
        let mut chains = BTreeMap::new();
        for tool in ["iptables-save", "ip6tables-save"] {
            let rules = stdout(tool, &[]);
            for prefix in ["KUBE-", "CNI-", EGRESS_CHAIN] {
                chains.insert(
                    format!("{tool} {prefix}"),
                    rules.lines().filter(|l| l.contains(prefix)).count(),
                );
            }
        }
        let sysctls = [
            "vm/overcommit_memory",
            "vm/panic_on_oom",
            "kernel/panic",
            "kernel/panic_on_oops",
            "kernel/keys/root_maxkeys",
            "kernel/keys/root_maxbytes",
            "net/ipv4/ip_forward",
            "net/ipv4/conf/all/route_localnet",
            "net/netfilter/nf_conntrack_max",
        ]
        .iter()
        .map(|k| {
            (
                k.to_string(),
                std::fs::read_to_string(Path::new("/proc/sys").join(k))
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            )
        })
        .collect();
        let netns = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let kubepods = std::fs::read_dir("/sys/fs/cgroup")
            .expect("/sys/fs/cgroup")
            .flatten()
            .map(|e| e.path().join("kubepods"))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        let dirs = [
            "/run/containerd",
            "/run/netns",
            "/var/lib/cni",
            "/var/log/containers",
            "/var/log/pods",
            "/var/lib/kubelet",
            "/etc/kubernetes",
        ]
        .iter()
        .filter(|d| Path::new(d).exists())
        .map(|d| d.to_string())
        .collect();
        // Zombies aside: a killed shim's parent is init, which reaps it in its own time.
        let processes = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("stat")).is_ok_and(|stat| {
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().next())
                        .is_some_and(|state| state != "Z" && state != "X")
                })
            })
            .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .filter(|c| {
                [
                    "containerd",
                    "containerd-shim",
                    "kubelet",
                    "kube-proxy",
                    "kube-scheduler",
                    "kube-apiserver",
                    "kube-controller",
                    "etcd",
                    // Not waldur-operator: other test suites run it on the host. The pod's
                    // operator is in the kubepods cgroups, compared above.
                    "pause",
                ]
                .contains(&c.as_str())
            })
            .collect();
        HostState {
            links,
            routes,
            chains,
            sysctls,
            netns,
            kubepods,
            dirs,
            processes,
        }
    }

    fn assert_same_as(&self, before: &HostState, run_dir: &Path) {
        assert_eq!(self, before, "the host is as it was before the node");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let run = run_dir.display().to_string();
        assert!(
            !mounts.lines().any(|l| l.contains(&run)),
            "nothing mounted under {run}"
        );
        assert!(!run_dir.exists(), "{run} is removed");
    }
}

/// The network namespace of the one pod that runs (containerd names them cni-*).
fn pod_netns() -> PathBuf {
    let all: Vec<PathBuf> = std::fs::read_dir("/run/netns")
        .expect("/run/netns")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("cni-"))
        })
        .collect();
    assert_eq!(all.len(), 1, "one pod network namespace: {all:?}");
    all[0].clone()
}

/// An HTTP GET from inside `netns` (curl through nsenter): the status code, None when nothing
/// answered within 2 s.
fn probe(netns: &Path, url: &str) -> Option<u16> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
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

/// Packets the egress chain's DROP rule has matched.
fn egress_drops() -> u64 {
    let listing = stdout(
        "iptables",
        &["-w", "-t", "mangle", "-L", EGRESS_CHAIN, "-v", "-n", "-x"],
    );
    listing
        .lines()
        .find(|l| l.contains("DROP"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the egress chain's DROP rule and its counter")
}

fn stdout(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl_cmd(node: &Node) -> Command {
    let mut cmd = Command::new(kubectl());
    cmd.arg("--kubeconfig").arg(node.kubeconfig());
    cmd
}

fn kubectl_out(node: &Node, args: &[&str]) -> String {
    let out = kubectl_cmd(node).args(args).output().expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl_ok(node: &Node, args: &[&str]) {
    kubectl_out(node, args);
}

fn kubectl_stdin(node: &Node, args: &[&str], input: &str) {
    let mut child = kubectl_cmd(node)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input.as_bytes())
        .expect("kubectl reads its input");
    let out = child.wait_with_output().expect("kubectl ends");
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
