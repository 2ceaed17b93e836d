//! A real one-node Kubernetes cluster on this machine: the control plane of [`ControlPlane`]
//! (with Node,RBAC authorization, every controller and an address pods reach), the scheduler,
//! containerd with runc, kubelet, kube-proxy in iptables mode and a bridge CNI network, so that
//! the operator runs as a pod from its image, as users run it.
//!
//! Needs root, the Debian packages `containerd runc containernetworking-plugins umoci skopeo
//! iptables` (scripts/install-tools) and the binaries of `scripts/k8s-assets node`.
//!
//! # One node per machine
//! Ports 10250/10248, the bridge, the `kubepods` cgroups, iptables chains and kernel settings are
//! host-wide, so a lock file ([`STATE_DIR`]/lock) lets one node run at a time; a second start
//! waits for it. The lock holder writes down what it changes (saved sysctls, directories it
//! creates, its run directory) in [`STATE_DIR`]/record *before* changing it, so whoever takes
//! the lock next after a killed owner (`kill -9`, a crash) finds the record and restores the
//! host first. The kernel releases the lock of a dead process; the components die with it
//! (`PR_SET_PDEATHSIG`), except containerd's shims and the containers, which the clean-up
//! finds by their command line and cgroups.
//!
//! # Nothing leaves the machine
//! The node's address is a local one on an interface of its own (a bridge without ports) ([`NodeOptions::address`], by
//! default in TEST-NET-2). The Service and pod ranges get blackhole routes, so a packet for
//! them that nothing on this host claims is dropped instead of following the default route
//! out (measured: a request to the `kubernetes` ClusterIP before kube-proxy ran left the VM and
//! was answered from outside). A mangle-table rule, in a chain of its own, drops every
//! forwarded packet from the pod range to a destination outside it: pods reach this host's
//! addresses (input, not forward) and each other, nothing else. [`Node::check_isolation`]
//! verifies all of it; the node is only reported ready once it holds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{CertRequest, ControlPlane, Options, kubectl, run_assets_script, terminate};

/// Host-wide state of the node harness: the lock and the record of what the holder changed.
/// Under /run, so that a reboot (which resets the host state too) forgets it.
pub const STATE_DIR: &str = "/run/waldur-node";
/// The interface holding the node's address: a bridge without ports, local to this host.
pub const NODE_LINK: &str = "wo-node0";
/// The bridge of the CNI network.
pub const BRIDGE: &str = "wo-cni0";
/// The chain (mangle table, iptables and ip6tables) that keeps pod traffic on this host.
pub const EGRESS_CHAIN: &str = "WO-NODE-EGRESS";
/// The CNI network's name.
const CNI_NETWORK: &str = "wo-node";
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const LOCK_TIMEOUT: Duration = Duration::from_secs(600);

/// Kernel settings that kubelet (`setupKernelTunables`), the bridge plugin (`ip_forward`) and
/// kube-proxy (conntrack, `route_localnet`; zeroed or off in its config, saved all the same)
/// may change. Saved before the node starts and written back at teardown.
const SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
];

/// Host directories that containerd 1.6 and kubelet write to whatever their configuration
/// says (shim sockets and FIFOs, network namespaces, libcni's result cache, container log
/// links, the device plugin socket, which kubelet puts under /var/lib/kubelet whatever its
/// --root-dir). Removed at teardown when the node created them.
const HOST_DIRS: &[&str] = &[
    "/run/containerd",
    "/run/netns",
    "/var/lib/cni",
    "/var/log/containers",
    "/var/lib/kubelet",
];

/// Where and how the node runs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The run directory (created; removed at teardown). None: `waldur-node-<pid>` under the
    /// temporary directory.
    pub run_dir: Option<PathBuf>,
    /// The node's address, on the interface [`NODE_LINK`]: kube-apiserver, kubelet and
    /// the tests' Waldur simulator listen here, and pods reach it.
    pub address: Ipv4Addr,
    /// The prefix length of the node's network on [`NODE_LINK`].
    pub prefix: u8,
    /// The pods' range (blackholed, and the egress rule's source).
    pub cluster_cidr: String,
    /// The node's pod subnet, a part of `cluster_cidr` (host-local IPAM on the bridge).
    pub pod_subnet: String,
    /// The Service ClusterIP range (blackholed).
    pub service_cidr: String,
    /// The node's name.
    pub name: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            run_dir: None,
            // TEST-NET-2 (RFC 5737): documentation only, never routed anywhere.
            address: Ipv4Addr::new(198, 51, 100, 2),
            prefix: 24,
            cluster_cidr: "10.244.0.0/16".into(),
            pod_subnet: "10.244.0.0/24".into(),
            service_cidr: "10.96.0.0/24".into(),
            name: "waldur-node".into(),
        }
    }
}

impl NodeOptions {
    /// The `kubernetes` Service's ClusterIP: the first address of the Service range.
    pub fn kubernetes_service_ip(&self) -> Result<Ipv4Addr, String> {
        let (net, _) = parse_cidr(&self.service_cidr)?;
        Ok(Ipv4Addr::from(u32::from(net) + 1))
    }

    fn bridge_gateway(&self) -> Result<Ipv4Addr, String> {
        let (net, _) = parse_cidr(&self.pod_subnet)?;
        Ok(Ipv4Addr::from(u32::from(net) + 1))
    }
}

/// A running node. Everything it started and changed is undone when it is dropped, at exit
/// for [`Node::shared`], and by the next start after its process was killed.
pub struct Node {
    options: NodeOptions,
    run: PathBuf,
    assets: PathBuf,
    cp: Option<ControlPlane>,
    procs: Mutex<Vec<(String, Child)>>,
    record: Record,
    pause_image: String,
    started_in: Duration,
    stopped: Mutex<bool>,
    /// Held for the node's life: the kernel releases it when the process dies.
    _lock: File,
}

impl Node {
    /// The node shared by every test of this test binary. Started on first use; torn down
    /// when the test binary exits. Panics, with the reason, when it cannot start.
    pub fn shared() -> &'static Node {
        static SHARED: OnceLock<Node> = OnceLock::new();
        SHARED.get_or_init(|| {
            let node = Node::start(NodeOptions::default())
                .unwrap_or_else(|e| panic!("the real Kubernetes node did not start: {e}"));
            extern "C" fn stop_shared() {
                if let Some(node) = SHARED.get() {
                    node.stop();
                }
            }
            // SAFETY: registers a plain function with no arguments to run at exit.
            unsafe {
                libc::atexit(stop_shared);
            }
            node
        })
    }

    /// Starts the node and waits until it is Ready, kube-proxy has programmed the
    /// `kubernetes` Service and the isolation rules are in place.
    pub fn start(options: NodeOptions) -> Result<Node, String> {
        let started = Instant::now();
        preflight()?;
        let assets = run_assets_script(&["node"])?;
        let lock = take_lock()?;
        cleanup_stale_locked()?;
        check_no_foreign_node()?;
        check_ranges_free(&options)?;

        let run = options.run_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("waldur-node-{}", std::process::id()))
        });
        // Written before anything changes, so that a kill at any later point is undone.
        let record = Record::capture(&run, &assets, &options);
        record.save()?;
        if run.exists() {
            // A run directory of ours from an earlier run: nothing may be mounted there any
            // more (the clean-up above unmounted it), so it can go.
            if !mounts_under(&run).is_empty() {
                return Err(format!(
                    "{} still has mounts; not reusing it",
                    run.display()
                ));
            }
            std::fs::remove_dir_all(&run)
                .map_err(|e| format!("cannot clear {}: {e}", run.display()))?;
        }
        for sub in [
            "logs",
            "cni/net.d",
            "cni/ipam",
            "kubelet",
            "pod-logs",
            "images",
        ] {
            std::fs::create_dir_all(run.join(sub))
                .map_err(|e| format!("cannot create {}: {e}", run.join(sub).display()))?;
        }
        let mut node = Node {
            options,
            run,
            assets,
            cp: None,
            procs: Mutex::new(Vec::new()),
            record,
            pause_image: String::new(),
            started_in: Duration::ZERO,
            stopped: Mutex::new(false),
            _lock: lock,
        };
        if let Err(e) = node.launch() {
            let tails = node.log_tails();
            node.stop();
            return Err(format!("{e}\n{tails}"));
        }
        node.started_in = started.elapsed();
        let _ = writeln!(
            std::io::stderr(),
            "node {} Ready at {} (API {}) in {:.1} s; run directory {}",
            node.options.name,
            node.options.address,
            node.control_plane().url(),
            node.started_in.as_secs_f64(),
            node.run.display()
        );
        Ok(node)
    }

    fn launch(&mut self) -> Result<(), String> {
        let o = self.options.clone();
        self.isolate()?;
        self.check_isolation()?;

        let service_ip = o.kubernetes_service_ip()?;
        let cp = ControlPlane::start_with(Options {
            dir: Some(self.run.join("cp")),
            bind: IpAddr::V4(o.address),
            advertise: Some(IpAddr::V4(o.address)),
            node_authorization: true,
            controllers: "*".into(),
            service_cidr: o.service_cidr.clone(),
            serving_ips: vec![IpAddr::V4(o.address), IpAddr::V4(service_ip)],
        })?;
        let kubeconfig = |name: &str, request: CertRequest| -> Result<PathBuf, String> {
            let (cert, key) = cp.issue(name, &request)?;
            let path = self.run.join(format!("{name}.kubeconfig"));
            std::fs::write(&path, cp.cert_kubeconfig_yaml(&cert, &key))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(path)
        };
        // Each component as the user its default RBAC bindings (or the Node authorizer) expect.
        let kubelet_kubeconfig = kubeconfig(
            "kubelet",
            CertRequest::client(&format!("system:node:{}", o.name), &["system:nodes"]),
        )?;
        let proxy_kubeconfig =
            kubeconfig("kube-proxy", CertRequest::client("system:kube-proxy", &[]))?;
        let scheduler_kubeconfig = kubeconfig(
            "kube-scheduler",
            CertRequest::client("system:kube-scheduler", &[]),
        )?;
        let (serving_cert, serving_key) = cp.issue(
            "kubelet-serving",
            &CertRequest::server(&o.name, &[o.address.to_string(), o.name.clone()]),
        )?;
        let ca = cp.ca_file();
        self.cp = Some(cp);

        // The pause image first: containerd's CRI needs its sandbox image before any pod.
        let pause = run_node_image(&["pause", "--out", &self.path("images/pause")])?;
        self.pause_image = pause.reference.clone();
        self.write_cni_config()?;
        self.start_containerd(&pause)?;

        // kube-proxy before the kubelet, so that the `kubernetes` Service works from the first
        // pod on; the scheduler before the node is Ready.
        self.start_kube_proxy(&proxy_kubeconfig)?;
        let mut scheduler = Command::new(self.assets.join("kube-scheduler"));
        scheduler.args([
            &format!("--kubeconfig={}", scheduler_kubeconfig.display()),
            "--leader-elect=false",
            "--secure-port=0",
            "--v=1",
        ]);
        self.spawn("kube-scheduler", scheduler)?;
        self.start_kubelet(&kubelet_kubeconfig, &ca, &serving_cert, &serving_key)?;
        self.wait_ready(service_ip)?;
        // Once more, after kube-proxy, the CNI plugins and the kubelet have all written their
        // rules: ours must still be there, ahead of anything that could accept pod traffic.
        self.check_isolation()?;
        Ok(())
    }

    /// The node's interface and address, the blackhole routes and the egress chain.
    fn isolate(&self) -> Result<(), String> {
        let o = &self.options;
        // A bridge with no ports, not a dummy interface: the dummy module is missing from some
        // kernels (this project's VMs), the bridge one never is where the bridge CNI runs.
        run("ip", &["link", "add", NODE_LINK, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/{}", o.address, o.prefix),
                "dev",
                NODE_LINK,
            ],
        )?;
        run("ip", &["link", "set", NODE_LINK, "up"])?;
        for cidr in [&o.service_cidr, &o.cluster_cidr] {
            run("ip", &["route", "add", "blackhole", cidr])?;
        }
        // mangle FORWARD runs before filter FORWARD, where kube-proxy and the CNI plugins put
        // their ACCEPT rules, and after nat PREROUTING, so Service addresses are already
        // translated to the pod or node address they stand for.
        let comment = "waldur-operator test node: pods reach only this host";
        run("iptables", &["-w", "-t", "mangle", "-N", EGRESS_CHAIN])?;
        run(
            "iptables",
            &[
                "-w",
                "-t",
                "mangle",
                "-A",
                EGRESS_CHAIN,
                "-s",
                &o.cluster_cidr,
                "!",
                "-d",
                &o.cluster_cidr,
                "-m",
                "comment",
                "--comment",
                comment,
                "-j",
                "DROP",
            ],
        )?;
        run(
            "iptables",
            &[
                "-w",
                "-t",
                "mangle",
                "-I",
                "FORWARD",
                "1",
                "-j",
                EGRESS_CHAIN,
            ],
        )?;
        // Pods get no IPv6 address, but nothing from the bridge may be forwarded over IPv6
        // either (a router advertisement on the host's network must not change that).
        run("ip6tables", &["-w", "-t", "mangle", "-N", EGRESS_CHAIN])?;
        run(
            "ip6tables",
            &[
                "-w",
                "-t",
                "mangle",
                "-A",
                EGRESS_CHAIN,
                "-i",
                BRIDGE,
                "-m",
                "comment",
                "--comment",
                comment,
                "-j",
                "DROP",
            ],
        )?;
        run(
            "ip6tables",
            &[
                "-w",
                "-t",
                "mangle",
                "-I",
                "FORWARD",
                "1",
                "-j",
                EGRESS_CHAIN,
            ],
        )?;
        Ok(())
    }

    /// Checks that nothing the node's pods send can leave this host: the node address is on
    /// its own interface, the Service and pod ranges are blackholed (a host lookup of the
    /// `kubernetes` ClusterIP finds no way out), and the egress chain is the first rule of
    /// mangle FORWARD. Returns what it checked, one item a line.
    pub fn check_isolation(&self) -> Result<Vec<String>, String> {
        let o = &self.options;
        let mut seen = Vec::new();
        let addr = output("ip", &["-4", "-o", "addr", "show", "dev", NODE_LINK])?;
        let want = format!("inet {}/{}", o.address, o.prefix);
        if !addr.contains(&want) {
            return Err(format!("{NODE_LINK} does not hold {want}: {addr}"));
        }
        seen.push(format!("{NODE_LINK} holds {}/{}", o.address, o.prefix));
        let blackholes = output("ip", &["-4", "route", "show", "type", "blackhole"])?;
        for cidr in [&o.service_cidr, &o.cluster_cidr] {
            if !blackholes
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(cidr))
            {
                return Err(format!("no blackhole route for {cidr}: {blackholes}"));
            }
            seen.push(format!("blackhole route for {cidr}"));
        }
        // What the kernel does with a packet from this host to the `kubernetes` ClusterIP
        // (before kube-proxy translates it): nothing, rather than the default route.
        let service_ip = o.kubernetes_service_ip()?.to_string();
        let lookup = Command::new("ip")
            .args(["-4", "route", "get", &service_ip])
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        let answer = String::from_utf8_lossy(&lookup.stdout).into_owned();
        if lookup.status.success() && !answer.contains("blackhole") {
            return Err(format!(
                "a packet to {service_ip} would be routed: {answer}"
            ));
        }
        seen.push(format!("a route lookup of {service_ip} finds no way out"));
        for (tool, rule) in [
            (
                "iptables",
                format!(
                    "-A {EGRESS_CHAIN} -s {} ! -d {} ",
                    o.cluster_cidr, o.cluster_cidr
                ),
            ),
            ("ip6tables", format!("-A {EGRESS_CHAIN} -i {BRIDGE} ")),
        ] {
            let rules = output(tool, &["-w", "-t", "mangle", "-S"])?;
            let first_forward = rules.lines().find(|l| l.starts_with("-A FORWARD "));
            if first_forward != Some(&format!("-A FORWARD -j {EGRESS_CHAIN}")) {
                return Err(format!(
                    "{tool}: the first rule of mangle FORWARD is {first_forward:?}, not the jump to {EGRESS_CHAIN}"
                ));
            }
            if !rules
                .lines()
                .any(|l| l.starts_with(&rule) && l.ends_with("-j DROP"))
            {
                return Err(format!("{tool}: no `{rule}... -j DROP` in {EGRESS_CHAIN}"));
            }
            seen.push(format!(
                "{tool} mangle FORWARD starts with {EGRESS_CHAIN}: {rule}-j DROP"
            ));
        }
        Ok(seen)
    }

    fn write_cni_config(&self) -> Result<(), String> {
        let o = &self.options;
        let conflist = format!(
            r#"{{
  "cniVersion": "1.0.0",
  "name": "{CNI_NETWORK}",
  "plugins": [
    {{
      "type": "bridge",
      "bridge": "{BRIDGE}",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {{
        "type": "host-local",
        "ranges": [[{{"subnet": "{}", "gateway": "{}"}}]],
        "routes": [{{"dst": "0.0.0.0/0"}}],
        "dataDir": "{}"
      }}
    }},
    {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
  ]
}}
"#,
            o.pod_subnet,
            o.bridge_gateway()?,
            self.path("cni/ipam")
        );
        write(&self.run.join("cni/net.d/10-wo-node.conflist"), &conflist)
    }

    fn start_containerd(&self, pause: &ImageOut) -> Result<(), String> {
        let c = self.path("containerd");
        let config = format!(
            r#"version = 2
root = "{c}/root"
state = "{c}/state"
# Snapshotters this node does not use; they would only log their absence.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{c}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{c}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_ref}"
  # Sandboxes ask for oom_score_adj -998, which a process without CAP_SYS_RESOURCE (this VM's
  # root) may not set: runc then fails every sandbox with "can't get final child's PID from
  # pipe: EOF". Restricted, the value is clamped to what the runtime may set.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{run}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{run}/cni/net.d"
    max_conf_num = 1
"#,
            pause_ref = pause.reference,
            run = self.run.display(),
        );
        let config_path = self.run.join("containerd.toml");
        write(&config_path, &config)?;
        let mut containerd = Command::new("containerd");
        containerd.arg("--config").arg(&config_path);
        self.spawn("containerd", containerd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(dead) = self.exited() {
                return Err(dead);
            }
            let ok = Command::new("ctr")
                .args(["-a", &self.containerd_socket_str(), "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            if Instant::now() > deadline {
                return Err("containerd did not answer within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.import_image(&pause.tar)
    }

    fn start_kube_proxy(&self, kubeconfig: &Path) -> Result<(), String> {
        let o = &self.options;
        // Conntrack settings zeroed: kube-proxy leaves the host's as they are. No NodePorts on
        // loopback (that needs route_localnet), and NodePorts on the node address only.
        let config = format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: {addr}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {name}
mode: iptables
clusterCIDR: {cluster}
nodePortAddresses: ["{addr}/32"]
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
iptables:
  localhostNodePorts: false
  masqueradeAll: false
  syncPeriod: 30s
  minSyncPeriod: 0s
"#,
            addr = o.address,
            kubeconfig = kubeconfig.display(),
            name = o.name,
            cluster = o.cluster_cidr,
        );
        let path = self.run.join("kube-proxy.yaml");
        write(&path, &config)?;
        let mut proxy = Command::new(self.assets.join("kube-proxy"));
        proxy
            .arg(format!("--config={}", path.display()))
            .arg("--v=1");
        self.spawn("kube-proxy", proxy)
    }

    fn start_kubelet(
        &self,
        kubeconfig: &Path,
        ca: &Path,
        serving_cert: &Path,
        serving_key: &Path,
    ) -> Result<(), String> {
        let o = &self.options;
        // failCgroupV1: this machine kind has cgroup v1 hierarchies, which kubelet refuses by
        // default. imageGCHighThresholdPercent 100: imported images cannot be pulled again.
        // makeIPTablesUtilChains false: kube-proxy owns the rules. resolvConf "" and no
        // clusterDNS: pods get no name servers (they have no way out to ask one anyway).
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {addr}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
tlsCertFile: {cert}
tlsPrivateKeyFile: {key}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{sock}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 50Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
makeIPTablesUtilChains: false
clusterDomain: cluster.local
resolvConf: ""
podLogsDir: {logs}
registerNode: true
serializeImagePulls: false
"#,
            addr = o.address,
            ca = ca.display(),
            cert = serving_cert.display(),
            key = serving_key.display(),
            sock = self.containerd_socket_str(),
            logs = self.path("pod-logs"),
        );
        let path = self.run.join("kubelet.yaml");
        write(&path, &config)?;
        let mut kubelet = Command::new(self.assets.join("kubelet"));
        kubelet.args([
            &format!("--config={}", path.display()),
            &format!("--kubeconfig={}", kubeconfig.display()),
            &format!("--root-dir={}", self.path("kubelet")),
            &format!("--hostname-override={}", o.name),
            &format!("--node-ip={}", o.address),
            "--v=1",
        ]);
        self.spawn("kubelet", kubelet)
    }

    /// Waits for the Node to be Ready and for kube-proxy to have programmed the `kubernetes`
    /// Service (its address must lead to the API server from the first pod on).
    fn wait_ready(&self, service_ip: Ipv4Addr) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        let service_rule = format!("-d {service_ip}/32");
        while Instant::now() < deadline {
            if let Some(dead) = self.exited() {
                return Err(dead);
            }
            let ready = Command::new(kubectl())
                .arg("--kubeconfig")
                .arg(self.kubeconfig())
                .args([
                    "get",
                    "node",
                    &self.options.name,
                    "--request-timeout=5s",
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ])
                .output()
                .map_err(|e| format!("kubectl is needed ({}): {e}", kubectl()))?;
            let status = String::from_utf8_lossy(&ready.stdout).trim().to_string();
            let proxied = output("iptables", &["-w", "-t", "nat", "-S", "KUBE-SERVICES"])
                .map(|rules| rules.contains(&service_rule))
                .unwrap_or(false);
            if status == "True" && proxied {
                return Ok(());
            }
            last = format!(
                "Ready={status:?} {} kube-proxy rule for {service_ip}: {proxied}",
                String::from_utf8_lossy(&ready.stderr).trim()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(format!(
            "node {} not ready within {READY_TIMEOUT:?} ({last})",
            self.options.name
        ))
    }

    fn spawn(&self, name: &str, mut command: Command) -> Result<(), String> {
        let log = File::create(self.run.join(format!("logs/{name}.log")))
            .map_err(|e| format!("cannot create the log of {name}: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot create the log of {name}: {e}"))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = crate::spawn_tied_to_this_process(command)
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), child));
        Ok(())
    }

    /// The first component that has exited, as a sentence (the control plane's included).
    pub fn exited(&self) -> Option<String> {
        if let Some(dead) = self.cp.as_ref().and_then(|cp| cp.exited()) {
            return Some(dead);
        }
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        procs
            .iter_mut()
            .find_map(|(name, child)| match child.try_wait() {
                Ok(Some(status)) => Some(format!("{name} exited: {status}")),
                _ => None,
            })
    }

    /// The last lines of each component's log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = self
            .cp
            .as_ref()
            .map(|cp| cp.log_tails())
            .unwrap_or_default();
        out.push_str(&crate::log_tails(
            &self.run.join("logs"),
            &["containerd", "kube-proxy", "kube-scheduler", "kubelet"],
        ));
        out
    }

    /// The control plane of the node.
    pub fn control_plane(&self) -> &ControlPlane {
        // Set before start returns; a Node is never handed out without it.
        self.cp
            .as_ref()
            .unwrap_or_else(|| unreachable!("the node's control plane runs while it exists"))
    }

    /// A cluster-admin kubeconfig file.
    pub fn kubeconfig(&self) -> PathBuf {
        self.run.join("cp/admin.kubeconfig")
    }

    /// The node's address: the API server, the kubelet and anything tests serve to pods listen
    /// here.
    pub fn address(&self) -> Ipv4Addr {
        self.options.address
    }

    pub fn options(&self) -> &NodeOptions {
        &self.options
    }

    pub fn name(&self) -> &str {
        &self.options.name
    }

    pub fn run_dir(&self) -> &Path {
        &self.run
    }

    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The pods' sandbox image, which is always in the node's containerd: also a container
    /// image for tests that need a process in a pod and nothing more.
    pub fn pause_image(&self) -> &str {
        &self.pause_image
    }

    /// containerd's socket (for `ctr -a`).
    pub fn containerd_socket(&self) -> PathBuf {
        self.run.join("containerd/containerd.sock")
    }

    fn containerd_socket_str(&self) -> String {
        self.containerd_socket().to_string_lossy().into_owned()
    }

    fn path(&self, sub: &str) -> String {
        self.run.join(sub).to_string_lossy().into_owned()
    }

    /// Imports an image tarball (docker-archive or OCI) into the node's containerd, where the
    /// kubelet finds it (namespace k8s.io).
    pub fn import_image(&self, tar: &Path) -> Result<(), String> {
        let out = Command::new("ctr")
            .args(["-n", "k8s.io", "-a", &self.containerd_socket_str()])
            .args(["images", "import"])
            .arg(tar)
            .output()
            .map_err(|e| format!("cannot run ctr: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ctr images import {} failed: {}",
                tar.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Builds the operator image (scripts/node-image operator) and imports it; returns its
    /// reference. `binary`: an already built static release binary; None builds one.
    pub fn build_operator_image(&self, binary: Option<&Path>) -> Result<String, String> {
        let out = self.path("images/operator");
        let mut args = vec!["operator".to_string(), "--out".into(), out];
        if let Some(binary) = binary {
            args.push("--binary".into());
            args.push(binary.to_string_lossy().into_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let image = run_node_image(&args)?;
        self.import_image(&image.tar)?;
        Ok(image.reference)
    }

    /// Tears the node down and restores the host. Idempotent.
    pub fn stop(&self) {
        let Ok(mut stopped) = self.stopped.try_lock() else {
            return;
        };
        if *stopped {
            return;
        }
        *stopped = true;
        let started = Instant::now();
        let grace = Duration::from_secs(5);
        // No controller may recreate what is deleted below, no scheduler place it.
        if let Some(cp) = &self.cp {
            cp.stop_process("kube-controller-manager", grace);
        }
        self.stop_process("kube-scheduler", grace);
        // Pods deleted through the API while the kubelet still runs: it stops their containers
        // and sandboxes, which runs CNI DEL (veth, IP, the plugins' iptables rules).
        let kubelet_alive = self.alive("kubelet");
        if kubelet_alive && self.cp.as_ref().is_some_and(|cp| cp.exited().is_none()) {
            let _ = Command::new(kubectl())
                .arg("--kubeconfig")
                .arg(self.kubeconfig())
                .args([
                    "delete",
                    "pods",
                    "--all",
                    "--all-namespaces",
                    "--grace-period=1",
                    "--timeout=30s",
                    "--request-timeout=10s",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        self.stop_process("kubelet", grace);
        // Whatever still runs in containerd (a pod the kubelet could not stop): killed, and its
        // task deleted so that its shim exits.
        if self.alive("containerd") {
            let sock = self.containerd_socket_str();
            if let Ok(tasks) = output("ctr", &["-n", "k8s.io", "-a", &sock, "tasks", "ls", "-q"]) {
                for id in tasks.split_whitespace() {
                    let _ = quiet(
                        "ctr",
                        &[
                            "-n", "k8s.io", "-a", &sock, "tasks", "kill", "-s", "SIGKILL", id,
                        ],
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
                for id in tasks.split_whitespace() {
                    let _ = quiet(
                        "ctr",
                        &["-n", "k8s.io", "-a", &sock, "tasks", "delete", "-f", id],
                    );
                }
            }
        }
        self.stop_process("containerd", grace);
        self.stop_process("kube-proxy", grace);
        if let Some(cp) = &self.cp {
            cp.stop();
        }
        let problems = restore_host(&self.record);
        let _ = writeln!(
            std::io::stderr(),
            "node {} torn down in {:.1} s{}",
            self.options.name,
            started.elapsed().as_secs_f64(),
            if problems.is_empty() {
                String::new()
            } else {
                format!("; NOT restored: {}", problems.join("; "))
            }
        );
    }

    fn alive(&self, name: &str) -> bool {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        procs
            .iter_mut()
            .any(|(n, child)| n == name && matches!(child.try_wait(), Ok(None)))
    }

    fn stop_process(&self, name: &str, grace: Duration) {
        let child = {
            let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
            procs
                .iter()
                .position(|(n, _)| n == name)
                .map(|i| procs.remove(i).1)
        };
        if let Some(mut child) = child {
            terminate(&mut child, grace);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Restores the host after a node whose process was killed, if its record is there and no live
/// node holds the lock. Returns what was found (None: nothing to do). For `waldur-node down`
/// and for tests that want a clean host.
pub fn cleanup_stale() -> Result<Option<String>, String> {
    let _lock = take_lock()?;
    cleanup_stale_locked()
}

/// With the lock held: the record's presence means its writer died before restoring the host.
fn cleanup_stale_locked() -> Result<Option<String>, String> {
    let Some(record) = Record::load()? else {
        return Ok(None);
    };
    let started = Instant::now();
    let _ = writeln!(
        std::io::stderr(),
        "node: restoring the host after the node of process {} (run directory {}), which did not tear down",
        record.pid,
        record.run.display()
    );
    // Its components died with it (PR_SET_PDEATHSIG); its shims and containers did not.
    let killed = kill_processes_mentioning(&record.run);
    let problems = restore_host(&record);
    if !problems.is_empty() {
        return Err(format!(
            "could not restore the host after process {}: {}",
            record.pid,
            problems.join("; ")
        ));
    }
    Ok(Some(format!(
        "restored the host after process {} in {:.1} s ({killed} leftover processes killed)",
        record.pid,
        started.elapsed().as_secs_f64()
    )))
}

/// What the node changed on the host, written before it changes it.
#[derive(Debug, Clone)]
struct Record {
    pid: u32,
    run: PathBuf,
    assets: PathBuf,
    sysctls: BTreeMap<String, String>,
    created_dirs: Vec<PathBuf>,
    /// The blackhole routes the node adds.
    blackholes: Vec<String>,
}

impl Record {
    fn path() -> PathBuf {
        Path::new(STATE_DIR).join("record")
    }

    fn capture(run: &Path, assets: &Path, options: &NodeOptions) -> Record {
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|name| {
                std::fs::read_to_string(Path::new("/proc/sys").join(name))
                    .ok()
                    .map(|v| (name.to_string(), v.trim().to_string()))
            })
            .collect();
        let created_dirs = HOST_DIRS
            .iter()
            .map(PathBuf::from)
            .filter(|d| !d.exists())
            .collect();
        Record {
            pid: std::process::id(),
            run: run.to_path_buf(),
            assets: assets.to_path_buf(),
            sysctls,
            created_dirs,
            blackholes: vec![options.service_cidr.clone(), options.cluster_cidr.clone()],
        }
    }

    fn save(&self) -> Result<(), String> {
        let mut text = format!(
            "pid {}\nrun {}\nassets {}\n",
            self.pid,
            self.run.display(),
            self.assets.display()
        );
        for (k, v) in &self.sysctls {
            let _ = writeln!(text, "sysctl {k} {v}");
        }
        for d in &self.created_dirs {
            let _ = writeln!(text, "created {}", d.display());
        }
        for r in &self.blackholes {
            let _ = writeln!(text, "blackhole {r}");
        }
        let tmp = Record::path().with_extension("tmp");
        write(&tmp, &text)?;
        std::fs::rename(&tmp, Record::path())
            .map_err(|e| format!("cannot write {}: {e}", Record::path().display()))
    }

    fn load() -> Result<Option<Record>, String> {
        let text = match std::fs::read_to_string(Record::path()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", Record::path().display())),
        };
        let mut record = Record {
            pid: 0,
            run: PathBuf::new(),
            assets: PathBuf::new(),
            sysctls: BTreeMap::new(),
            created_dirs: Vec::new(),
            blackholes: Vec::new(),
        };
        for line in text.lines() {
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "pid" => record.pid = rest.parse().unwrap_or(0),
                "run" => record.run = PathBuf::from(rest),
                "assets" => record.assets = PathBuf::from(rest),
                "sysctl" => {
                    if let Some((k, v)) = rest.split_once(' ') {
                        record.sysctls.insert(k.to_string(), v.to_string());
                    }
                }
                "created" => record.created_dirs.push(PathBuf::from(rest)),
                "blackhole" => record.blackholes.push(rest.to_string()),
                _ => {}
            }
        }
        if record.run.as_os_str().is_empty() {
            return Err(format!(
                "{} names no run directory",
                Record::path().display()
            ));
        }
        Ok(Some(record))
    }
}

/// Everything the node leaves on the host, undone (after its processes are gone). Returns the
/// problems; the record is removed only when there are none.
fn restore_host(record: &Record) -> Vec<String> {
    let mut problems = Vec::new();
    // Container processes outlive containerd; nothing may hold the cgroups or mounts below.
    kill_cgroup_processes();
    // kube-proxy's own clean-up of its rules (iptables and ip6tables), then a sweep of every
    // KUBE-, CNI- and our chain: the CNI plugins' NAT chains, and anything a killed
    // kube-proxy left.
    let proxy = record.assets.join("kube-proxy");
    if proxy.exists() {
        let _ = Command::new(proxy)
            .args(["--cleanup", "--v=0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    for tool in ["iptables", "ip6tables"] {
        if let Err(e) = sweep_chains(tool) {
            problems.push(e);
        }
    }
    // Pod network namespaces (their veths go with them), the bridge, the node's interface (and
    // its routes), the blackhole routes.
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("cni-") {
                let _ = quiet("ip", &["netns", "delete", &name]);
            }
        }
    }
    for link in [BRIDGE, NODE_LINK] {
        if link_exists(link)
            && let Err(e) = run("ip", &["link", "delete", link])
        {
            problems.push(e);
        }
    }
    let blackholes =
        output("ip", &["-4", "route", "show", "type", "blackhole"]).unwrap_or_default();
    for cidr in &record.blackholes {
        if blackholes
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(cidr.as_str()))
            && let Err(e) = run("ip", &["route", "delete", "blackhole", cidr])
        {
            problems.push(e);
        }
    }
    remove_kubepods_cgroups(&mut problems);
    // The kubelet's bind mount of its root directory, pod volumes, containers' root
    // filesystems: deepest first, detached.
    for mount in mounts_under(&record.run)
        .into_iter()
        .chain(mounts_under(Path::new("/run/containerd")))
        .chain(mounts_under(Path::new("/run/netns")))
    {
        if let Ok(c) = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid C string; MNT_DETACH never blocks.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
    let left = mounts_under(&record.run);
    if !left.is_empty() {
        problems.push(format!(
            "still mounted under {}: {left:?}",
            record.run.display()
        ));
    }
    // Host directories the node created, and the container log links it made in an existing
    // /var/log/containers.
    // libcni's cached results of our network, in a /var/lib/cni that was already there.
    if let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{CNI_NETWORK}-"))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    for dir in &record.created_dirs {
        if mounts_under(dir).is_empty() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/var/log/containers") {
        for entry in entries.flatten() {
            if std::fs::read_link(entry.path()).is_ok_and(|t| t.starts_with(&record.run)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    for (name, value) in &record.sysctls {
        let path = Path::new("/proc/sys").join(name);
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() != value)
            && let Err(e) = std::fs::write(&path, value)
        {
            problems.push(format!("cannot restore {name} = {value}: {e}"));
        }
    }
    // Never remove a directory that still has mounts: the removal would walk into them.
    if left.is_empty() {
        let _ = std::fs::remove_dir_all(&record.run);
    }
    if problems.is_empty() {
        let _ = std::fs::remove_file(Record::path());
    }
    problems
}

/// Deletes every KUBE-, CNI- and WO-NODE- chain of every table, after removing the rules of
/// other chains that jump to them.
fn sweep_chains(tool: &str) -> Result<(), String> {
    let ours = |chain: &str| {
        chain.starts_with("KUBE-") || chain.starts_with("CNI-") || chain == EGRESS_CHAIN
    };
    for table in ["filter", "nat", "mangle", "raw"] {
        let Ok(rules) = output(tool, &["-w", "-t", table, "-S"]) else {
            continue;
        };
        let chains: Vec<String> = rules
            .lines()
            .filter_map(|l| {
                l.strip_prefix("-N ")
                    .or_else(|| l.strip_prefix("-P "))
                    .and_then(|r| r.split_whitespace().next())
                    .map(str::to_string)
            })
            .collect();
        if !chains.iter().any(|c| ours(c)) {
            continue;
        }
        for chain in chains.iter().filter(|c| !ours(c)) {
            // Rule numbers from the listing, deleted from the last so the others keep theirs.
            let Ok(listing) = output(
                tool,
                &["-w", "-t", table, "-L", chain, "-n", "--line-numbers"],
            ) else {
                continue;
            };
            let mut numbers: Vec<u32> = listing
                .lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let n = f.next()?.parse::<u32>().ok()?;
                    let target = f.next()?;
                    ours(target).then_some(n)
                })
                .collect();
            numbers.sort_unstable();
            for n in numbers.into_iter().rev() {
                let _ = quiet(tool, &["-w", "-t", table, "-D", chain, &n.to_string()]);
            }
        }
        for chain in chains.iter().filter(|c| ours(c)) {
            let _ = quiet(tool, &["-w", "-t", table, "-F", chain]);
        }
        for chain in chains.iter().filter(|c| ours(c)) {
            let _ = quiet(tool, &["-w", "-t", table, "-X", chain]);
        }
        let after = output(tool, &["-w", "-t", table, "-S"]).unwrap_or_default();
        let left: Vec<&str> = after
            .lines()
            .filter(|l| l.starts_with("-N ") && l.split_whitespace().nth(1).is_some_and(ours))
            .collect();
        if !left.is_empty() {
            return Err(format!("{tool} {table}: chains left: {left:?}"));
        }
    }
    Ok(())
}

/// The cgroup directories the kubelet makes (cgroupfs driver): `kubepods` in each v1 hierarchy
/// and in the unified one.
fn kubepods_cgroups() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let root = Path::new("/sys/fs/cgroup");
    if root.join("kubepods").is_dir() {
        out.push(root.join("kubepods"));
    }
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let dir = entry.path().join("kubepods");
            if dir.is_dir() {
                out.push(dir);
            }
        }
    }
    out
}

fn cgroup_tree(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_tree(&entry.path(), out);
            }
        }
    }
}

/// SIGKILLs every process in the kubepods cgroups until none is left (at most 10 s).
fn kill_cgroup_processes() {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut any = false;
        for top in kubepods_cgroups() {
            let mut tree = Vec::new();
            cgroup_tree(&top, &mut tree);
            for dir in tree {
                let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
                    continue;
                };
                for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    any = true;
                    // SAFETY: a signal to a process of the node's cgroups.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        if !any || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn remove_kubepods_cgroups(problems: &mut Vec<String>) {
    for top in kubepods_cgroups() {
        let mut tree = Vec::new();
        cgroup_tree(&top, &mut tree);
        // Children before parents. A cgroup whose last process just died may be busy for a
        // moment: retry briefly.
        for dir in tree.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Err(e) = std::fs::remove_dir(dir) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    break;
                }
                if Instant::now() > deadline {
                    problems.push(format!("cannot remove the cgroup {}: {e}", dir.display()));
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The node's programs, as /proc/<pid>/comm names them (15 characters at most).
const COMPONENTS: &[&str] = &[
    "containerd-shim",
    "containerd",
    "kubelet",
    "kube-proxy",
    "kube-scheduler",
    "kube-apiserver",
    "kube-controller",
    "etcd",
];

/// SIGKILLs every node component whose command line names `dir` (containerd's shims carry its
/// socket path). Returns how many.
fn kill_processes_mentioning(dir: &Path) -> usize {
    let needle = dir.as_os_str().as_encoded_bytes();
    if needle.len() < 2 {
        return 0;
    }
    let me = std::process::id();
    let mut victims = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let is_component = std::fs::read_to_string(entry.path().join("comm"))
            .is_ok_and(|c| COMPONENTS.contains(&c.trim()));
        if !is_component {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle)
            && let Ok(pid) = i32::try_from(pid)
        {
            // SAFETY: a signal to a leftover of the dead node.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            victims.push(pid);
        }
    }
    wait_gone(&victims);
    victims.len()
}

/// Waits (at most 5 s) until each process has exited: gone, or a zombie that only its parent
/// (init, for a shim) has yet to reap.
fn wait_gone(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let running = pids.iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // The state follows the command name in parentheses, which may hold spaces.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_some_and(|state| state != "Z" && state != "X")
            })
        });
        if !running {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Root, and the programs of the Debian packages.
pub fn preflight() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "the real node needs root (network interfaces, iptables, cgroups, mounts)".into(),
        );
    }
    let mut missing = Vec::new();
    for program in [
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "ctr",
        "iptables",
        "ip6tables",
        "ip",
        "umoci",
        "skopeo",
    ] {
        if find_program(program).is_none() {
            missing.push(program.to_string());
        }
    }
    for plugin in ["bridge", "host-local", "portmap", "loopback"] {
        if !Path::new("/usr/lib/cni").join(plugin).exists() {
            missing.push(format!("/usr/lib/cni/{plugin}"));
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "the real node needs {} (Debian: containerd runc containernetworking-plugins umoci skopeo iptables; scripts/install-tools installs them as root)",
            missing.join(", ")
        ));
    }
    Ok(())
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The host-wide lock: waits (up to [`LOCK_TIMEOUT`]) while another node runs.
fn take_lock() -> Result<File, String> {
    std::fs::create_dir_all(STATE_DIR).map_err(|e| format!("cannot create {STATE_DIR}: {e}"))?;
    let path = Path::new(STATE_DIR).join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let deadline = Instant::now() + LOCK_TIMEOUT;
    let mut told = false;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let holder = Record::load()
            .ok()
            .flatten()
            .map(|r| format!("process {} ({})", r.pid, r.run.display()))
            .unwrap_or_else(|| "another process".into());
        if Instant::now() > deadline {
            return Err(format!(
                "another node runs on this machine ({holder}) and did not stop within {LOCK_TIMEOUT:?}: one node per machine"
            ));
        }
        if !told {
            let _ = writeln!(
                std::io::stderr(),
                "node: waiting for the node of {holder} to stop (one node per machine)"
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A kubelet or kube-proxy not ours (there is no record: ours are cleaned up by now) means
/// another Kubernetes node runs here, whose host state (kubepods cgroups, KUBE- chains) we
/// must not touch. A system containerd (Docker's, say) is no conflict: ours has its own
/// socket, root and state.
fn check_no_foreign_node() -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none()
        {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        if ["kubelet", "kube-proxy"].contains(&comm) {
            return Err(format!(
                "{comm} (pid {}) already runs on this machine: the real node shares host-wide state with it and does not start",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    if link_exists(NODE_LINK) || link_exists(BRIDGE) {
        return Err(format!(
            "{NODE_LINK} or {BRIDGE} exists without a node record in {STATE_DIR}: remove it (ip link delete) if it is a leftover"
        ));
    }
    Ok(())
}

/// The node's network and the pod and Service ranges must not overlap anything this host
/// already has an address or a route for (the default route aside): that traffic would go
/// the wrong way.
fn check_ranges_free(o: &NodeOptions) -> Result<(), String> {
    let node_net = format!("{}/{}", o.address, o.prefix);
    let mut taken = Vec::new();
    let addrs = output("ip", &["-4", "-o", "addr", "show"])?;
    for line in addrs.lines() {
        let mut f = line.split_whitespace();
        while let Some(w) = f.next() {
            if w == "inet"
                && let Some(a) = f.next()
            {
                taken.push((a.to_string(), line.to_string()));
            }
        }
    }
    let routes = output("ip", &["-4", "route", "show", "table", "all"])?;
    for line in routes.lines() {
        let mut dest = line.split_whitespace().next().unwrap_or("");
        if ["broadcast", "local", "unicast", "multicast"].contains(&dest) {
            dest = line.split_whitespace().nth(1).unwrap_or("");
        }
        if dest == "default" || dest.is_empty() || dest.starts_with("127.") {
            continue;
        }
        taken.push((dest.to_string(), line.to_string()));
    }
    for range in [&node_net, &o.cluster_cidr, &o.service_cidr] {
        let mine = parse_cidr(range)?;
        for (other, line) in &taken {
            let Ok(theirs) = parse_cidr(other) else {
                continue;
            };
            if overlap(mine, theirs) {
                return Err(format!(
                    "{range} overlaps this host's `{line}`: choose other NodeOptions ranges"
                ));
            }
        }
    }
    Ok(())
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
    let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{s}: {e}"))?;
    let len: u8 = len.parse().map_err(|e| format!("{s}: {e}"))?;
    if len > 32 {
        return Err(format!("{s}: prefix longer than 32"));
    }
    Ok((addr, len))
}

fn overlap(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (u32::from(a.0) & mask) == (u32::from(b.0) & mask)
}

struct ImageOut {
    tar: PathBuf,
    reference: String,
}

fn run_node_image(args: &[&str]) -> Result<ImageOut, String> {
    let dir = PathBuf::from(crate::run_project_script("node-image", args)?.trim());
    let reference = std::fs::read_to_string(dir.join("ref"))
        .map_err(|e| format!("scripts/node-image wrote no ref in {}: {e}", dir.display()))?
        .trim()
        .to_string();
    Ok(ImageOut {
        tar: dir.join("image.tar"),
        reference,
    })
}

fn write(path: &Path, content: &str) -> Result<(), String> {
    std::fs::write(path, content).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Runs a host tool; an error carries its stderr.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    output(program, args).map(|_| ())
}

/// Runs a host tool and returns its stdout; an error carries its stderr.
fn output(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a host tool, ignoring its output (best-effort clean-up steps).
fn quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_of_ranges() {
        let c = |s| parse_cidr(s).expect("a CIDR");
        assert!(overlap(c("10.244.0.0/16"), c("10.244.3.0/24")));
        assert!(overlap(c("10.0.0.0/8"), c("10.96.0.0/24")));
        assert!(!overlap(c("10.96.0.0/24"), c("10.244.0.0/16")));
        assert!(!overlap(c("198.51.100.0/24"), c("192.0.2.2/24")));
        assert!(overlap(c("192.0.2.0/24"), c("192.0.2.2")));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mount("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }

    #[test]
    fn service_ip() {
        let o = NodeOptions::default();
        assert_eq!(
            o.kubernetes_service_ip().expect("an address"),
            Ipv4Addr::new(10, 96, 0, 1)
        );
        assert_eq!(
            o.bridge_gateway().expect("an address"),
            Ipv4Addr::new(10, 244, 0, 1)
        );
    }
}
