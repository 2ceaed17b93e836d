//! The real node's harness (issue 19): the host is restored after a node, also when its owner
//! was killed with SIGKILL, and a `Node::shared()` is torn down when its test binary exits.
//! The operator's pod on the node is tested in the e2e suite (`cargo test --test e2e -- node::`).
//!
//! Needs root and the Debian packages of scripts/install-tools; without them these tests say
//! loudly that they did not run (and fail with CI=true).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use control_plane::kubectl;
use control_plane::node::{self, EGRESS_CHAIN, NODE_LINK, Node};

/// One node per machine: the tests of this file take turns, and each compares the host before
/// and after its own node.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A node whose owner dies by SIGKILL leaves its shims, containers and host changes behind:
/// the next start (here `waldur-node down`, which runs the same clean-up) restores the host.
#[test]
fn host_is_restored_after_the_owner_is_killed() {
    if !can_run() {
        return;
    }
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
    if !can_run() {
        return;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    node::cleanup_stale().expect("the host is restored after an earlier node");
    let before = HostState::take();
    let mut inner = Command::new(std::env::current_exe().expect("this test binary"))
        .args([
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

/// Root and the node's packages; without them these tests say loudly that they did not run,
/// and fail with CI=true.
fn can_run() -> bool {
    match node::preflight() {
        Ok(()) => true,
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and the node tests cannot run: {why}")
        }
        Err(why) => {
            eprintln!("\n*** node: THESE TESTS DID NOT RUN ({why}) ***\n");
            false
        }
    }
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

fn stdout(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
