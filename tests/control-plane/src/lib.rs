//! A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager
//! (namespace deletion and garbage collection) on free loopback ports, the way
//! controller-runtime's envtest runs them, with RBAC on.
//!
//! The binaries come from `scripts/k8s-assets` (built once from Go modules into a per-user
//! cache), or from `KUBEBUILDER_ASSETS` when it is set. Certificates (a CA, the API server's
//! serving certificate, an admin client certificate in `system:masters`) and the
//! service-account signing key are generated for each start.
//!
//! Every process is stopped and the temporary directory removed when the [`ControlPlane`] is
//! dropped (a panicking test unwinds through it), at process exit for [`ControlPlane::shared`],
//! and by the kernel (`PR_SET_PDEATHSIG`) if the test process is killed; directories left by
//! killed test processes are removed by the next start.
//!
//! [`ControlPlane::start_with`] takes [`Options`] for the real node of [`node`]: an address pods
//! can reach, Node and RBAC authorization, every controller, and certificates for the kubelet.

pub mod node;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The service-account token issuer and audience of the API server.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

const DIR_PREFIX: &str = "waldur-k8s-";
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// The controllers the envtest-like control plane runs: enough for namespaces to go away and
/// for owner references to be followed.
const ENVTEST_CONTROLLERS: &str = "namespace-controller,garbage-collector-controller";

/// How to start a [`ControlPlane`]. The default is the envtest-like one: loopback only, RBAC,
/// namespace deletion and garbage collection.
#[derive(Debug, Clone)]
pub struct Options {
    /// The directory to live in (created; removed at stop). None: a fresh one under the
    /// temporary directory, removed by a later start if this process is killed.
    pub dir: Option<PathBuf>,
    /// The address kube-apiserver listens on and is reached at.
    pub bind: IpAddr,
    /// Advertise this address as the `kubernetes` Service's endpoint (the default endpoint
    /// reconciler). None: no endpoints (a loopback address may not be one).
    pub advertise: Option<IpAddr>,
    /// `Node,RBAC` authorization with the NodeRestriction admission plugin, and a client
    /// certificate for kube-apiserver to reach kubelets (`kubectl logs`, `exec`) by their
    /// InternalIP, checked against the cluster CA.
    pub node_authorization: bool,
    /// kube-controller-manager's `--controllers`.
    pub controllers: String,
    /// The Service ClusterIP range.
    pub service_cidr: String,
    /// More IP addresses in kube-apiserver's serving certificate (such as the `kubernetes`
    /// Service's ClusterIP, which pods use).
    pub serving_ips: Vec<IpAddr>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dir: None,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise: None,
            node_authorization: false,
            controllers: ENVTEST_CONTROLLERS.to_string(),
            service_cidr: "10.0.0.0/24".to_string(),
            serving_ips: Vec::new(),
        }
    }
}

/// A running control plane. Stops everything it started when dropped.
pub struct ControlPlane {
    dir: PathBuf,
    procs: Mutex<Vec<(String, Child)>>,
    url: String,
    started_in: Duration,
    stopped: Mutex<bool>,
}

impl ControlPlane {
    /// The control plane shared by every test of this test binary (each test works in its own
    /// namespace). Started on first use; stopped when the test binary exits.
    ///
    /// Panics, with the reason, when it cannot start: the real tier fails, it never skips.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| {
            let cp = ControlPlane::start()
                .unwrap_or_else(|e| panic!("the real Kubernetes control plane did not start: {e}"));
            extern "C" fn stop_shared() {
                if let Some(cp) = SHARED.get() {
                    cp.stop();
                }
            }
            // SAFETY: registers a plain function with no arguments to run at exit.
            unsafe {
                libc::atexit(stop_shared);
            }
            cp
        })
    }

    /// Starts etcd, kube-apiserver and kube-controller-manager and waits until the API
    /// server is ready.
    pub fn start() -> Result<ControlPlane, String> {
        ControlPlane::start_with(Options::default())
    }

    /// [`ControlPlane::start`] with other [`Options`]. A port picked free can be taken by
    /// another process (an outgoing connection's ephemeral port) before etcd or the API server
    /// binds it: such a start is tried again with new ports, twice at most.
    pub fn start_with(options: Options) -> Result<ControlPlane, String> {
        let mut attempt = 1;
        loop {
            match ControlPlane::start_once(options.clone()) {
                Err(e) if attempt < 3 && e.contains("address already in use") => {
                    eprintln!("control plane: a port was taken meanwhile; starting again");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    fn start_once(options: Options) -> Result<ControlPlane, String> {
        let started = Instant::now();
        let assets = assets_dir()?;
        remove_stale_dirs(DIR_PREFIX);
        let dir = options.dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "{DIR_PREFIX}{}-{}",
                std::process::id(),
                next_serial()
            ))
        });
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut cp = ControlPlane {
            dir,
            procs: Mutex::new(Vec::new()),
            url: String::new(),
            started_in: Duration::ZERO,
            stopped: Mutex::new(false),
        };
        cp.launch(&assets, &options)?;
        cp.started_in = started.elapsed();
        // Straight to stderr, past the test harness's capture: the start-up time is a figure
        // CI logs should show.
        let _ = writeln!(
            std::io::stderr(),
            "control plane (etcd, kube-apiserver, kube-controller-manager from {}) ready at {} in {:.1} s",
            assets.display(),
            cp.url,
            cp.started_in.as_secs_f64()
        );
        Ok(cp)
    }

    fn launch(&mut self, assets: &Path, options: &Options) -> Result<(), String> {
        let pki = Pki::generate(&self.dir, &options.serving_ips)?;
        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let api_port = free_port_on(options.bind)?;
        let bind = options.bind;
        self.url = match bind {
            IpAddr::V4(a) => format!("https://{a}:{api_port}"),
            IpAddr::V6(a) => format!("https://[{a}]:{api_port}"),
        };
        std::fs::write(
            self.admin_kubeconfig(),
            self.admin_kubeconfig_yaml("default"),
        )
        .map_err(|e| format!("cannot write the admin kubeconfig: {e}"))?;
        let d = |name: &str| self.dir.join(name).to_string_lossy().into_owned();

        let mut etcd = Command::new(assets.join("etcd"));
        etcd.args([
            "--name=default",
            &format!("--data-dir={}", d("etcd")),
            &format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
            &format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
            &format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
            &format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]);
        self.spawn("etcd", etcd)?;

        let mut apiserver = Command::new(assets.join("kube-apiserver"));
        apiserver.args([
            &format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
            &format!("--bind-address={bind}"),
            &format!("--secure-port={api_port}"),
            &format!("--cert-dir={}", d("apiserver-certs")),
            &format!("--tls-cert-file={}", pki.serving_cert.display()),
            &format!("--tls-private-key-file={}", pki.serving_key.display()),
            &format!("--client-ca-file={}", pki.ca_cert.display()),
            &format!("--service-account-issuer={ISSUER}"),
            &format!("--api-audiences={ISSUER}"),
            &format!("--service-account-key-file={}", pki.sa_public.display()),
            &format!(
                "--service-account-signing-key-file={}",
                pki.sa_private.display()
            ),
            &format!("--service-cluster-ip-range={}", options.service_cidr),
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--v=1",
        ]);
        match options.advertise {
            Some(address) => {
                // The default endpoint reconciler makes this address (and the secure port) the
                // `kubernetes` Service's endpoint, which pods reach through kube-proxy.
                apiserver.arg(format!("--advertise-address={address}"));
            }
            None => {
                // No Endpoints for the `kubernetes` Service: a loopback address is not allowed
                // there, and nothing in the tests reaches the API server through the Service.
                apiserver.args([
                    &format!("--advertise-address={bind}"),
                    "--endpoint-reconciler-type=none",
                ]);
            }
        }
        if options.node_authorization {
            let (cert, key) = self.issue(
                "apiserver-kubelet-client",
                &CertRequest::client("kube-apiserver-kubelet-client", &["system:masters"]),
            )?;
            apiserver.args([
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                &format!("--kubelet-client-certificate={}", cert.display()),
                &format!("--kubelet-client-key={}", key.display()),
                &format!("--kubelet-certificate-authority={}", pki.ca_cert.display()),
                // The node's name is not resolvable; its InternalIP is what the kubelet's
                // serving certificate names.
                "--kubelet-preferred-address-types=InternalIP",
            ]);
        } else {
            apiserver.arg("--authorization-mode=RBAC");
        }
        self.spawn("kube-apiserver", apiserver)?;
        self.wait_ready()?;

        let mut kcm = Command::new(assets.join("kube-controller-manager"));
        kcm.args([
            &format!("--kubeconfig={}", self.admin_kubeconfig().display()),
            &format!("--controllers={}", options.controllers),
            // For the ServiceAccount token and root CA ConfigMap controllers (with
            // --controllers='*'): pods get their in-cluster credentials from them.
            &format!("--root-ca-file={}", pki.ca_cert.display()),
            &format!(
                "--service-account-private-key-file={}",
                pki.sa_private.display()
            ),
            "--leader-elect=false",
            "--secure-port=0",
            "--v=1",
        ]);
        self.spawn("kube-controller-manager", kcm)?;
        Ok(())
    }

    fn spawn(&self, name: &str, mut command: Command) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))
            .map_err(|e| format!("cannot create the log of {name}: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot create the log of {name}: {e}"))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child =
            spawn_tied_to_this_process(command).map_err(|e| format!("cannot start {name}: {e}"))?;
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), child));
        Ok(())
    }

    /// Polls `/readyz` with the admin credential (through kubectl, which the tests need anyway).
    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(dead) = self.exited() {
                return Err(format!("{dead}\n{}", self.log_tails()));
            }
            let out = Command::new(kubectl())
                .arg("--kubeconfig")
                .arg(self.admin_kubeconfig())
                .args(["get", "--raw=/readyz", "--request-timeout=5s"])
                .output()
                .map_err(|e| format!("kubectl is needed ({}): {e}", kubectl()))?;
            if out.status.success() {
                return Ok(());
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(format!(
            "kube-apiserver was not ready within {READY_TIMEOUT:?} (last answer: {last})\n{}",
            self.log_tails()
        ))
    }

    /// The process id of one of its processes (`kube-apiserver`, `etcd`, ...), if it runs.
    pub fn pid_of(&self, name: &str) -> Option<u32> {
        let procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        procs.iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }

    /// The first process that has exited, as a sentence.
    pub fn exited(&self) -> Option<String> {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        procs
            .iter_mut()
            .find_map(|(name, child)| match child.try_wait() {
                Ok(Some(status)) => Some(format!("{name} exited: {status}")),
                _ => None,
            })
    }

    /// Stops one process by name (SIGTERM, then SIGKILL after `grace`), if it runs. The node
    /// stops kube-controller-manager first, so that no controller recreates the pods it
    /// deletes.
    pub fn stop_process(&self, name: &str, grace: Duration) {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(index) = procs.iter().position(|(n, _)| n == name) {
            let (_, mut child) = procs.remove(index);
            terminate(&mut child, grace);
        }
    }

    /// Issues a certificate signed by the cluster CA, as `<name>.crt` and `<name>.key` in the
    /// control plane's directory.
    pub fn issue(&self, name: &str, request: &CertRequest) -> Result<(PathBuf, PathBuf), String> {
        Pki::issue(&self.dir, name, request)
    }

    /// A kubeconfig that authenticates with a client certificate and key (files).
    pub fn cert_kubeconfig_yaml(&self, cert: &Path, key: &Path) -> String {
        self.kubeconfig(
            &format!(
                "client-certificate: {}\n    client-key: {}",
                cert.display(),
                key.display()
            ),
            "default",
        )
    }

    /// The last lines of each process's log, for failure messages.
    pub fn log_tails(&self) -> String {
        log_tails(
            &self.dir,
            &["etcd", "kube-apiserver", "kube-controller-manager"],
        )
    }

    /// The API server's address, such as `https://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The CA that signed the API server's certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A kubeconfig file for the cluster admin (`system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// A kubeconfig for the cluster admin with `namespace` as the default namespace.
    pub fn admin_kubeconfig_yaml(&self, namespace: &str) -> String {
        self.kubeconfig(
            &format!(
                "client-certificate: {}\n    client-key: {}",
                self.dir.join("admin.crt").display(),
                self.dir.join("admin.key").display()
            ),
            namespace,
        )
    }

    /// A kubeconfig that authenticates with a bearer token (a ServiceAccount's, from the
    /// TokenRequest API).
    pub fn token_kubeconfig_yaml(&self, token: &str, namespace: &str) -> String {
        self.kubeconfig(&format!("token: {token}"), namespace)
    }

    fn kubeconfig(&self, user: &str, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: e2e\n  user:\n    {user}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: e2e\n    namespace: {namespace}\ncurrent-context: e2e\n",
            self.url,
            self.ca_file().display()
        )
    }

    /// A scratch directory that lives as long as the control plane.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops every process and removes the temporary directory. Idempotent.
    pub fn stop(&self) {
        let Ok(mut stopped) = self.stopped.try_lock() else {
            return;
        };
        if *stopped {
            return;
        }
        *stopped = true;
        if let Ok(mut procs) = self.procs.try_lock() {
            // The controller manager and the API server first, etcd last.
            for (_, child) in procs.iter_mut().rev() {
                let _ = child.kill();
                let _ = child.wait();
            }
            procs.clear();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The directory holding etcd, kube-apiserver and kube-controller-manager:
/// `KUBEBUILDER_ASSETS` when set, else what `scripts/k8s-assets` prints (it builds them the
/// first time).
pub fn assets_dir() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| run_assets_script(&[])).clone()
}

/// The directory holding helm, built by `scripts/k8s-assets helm` the first time.
pub fn helm_dir() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| run_assets_script(&["helm"])).clone()
}

/// The directory holding `kstatus-of` (tests/kstatus), built by `scripts/k8s-assets kstatus`.
pub fn kstatus_dir() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| run_assets_script(&["kstatus"])).clone()
}

/// The directory holding ORC's manager and its CRDs (`crds/`), the peer of `waldur-bench
/// --peer orc`, built by `scripts/k8s-assets orc` the first time.
pub fn orc_dir() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| run_assets_script(&["orc"])).clone()
}

/// Runs `scripts/NAME ARGS` (stderr passed through) and returns its stdout, or why it failed.
pub(crate) fn run_project_script(name: &str, args: &[&str]) -> Result<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(name);
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/{name} {} failed ({})",
            args.join(" "),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_assets_script(args: &[&str]) -> Result<PathBuf, String> {
    let text = run_project_script("k8s-assets", args)
        .map_err(|e| format!("{e}; the real tier needs these binaries and does not skip"))?;
    let dir = text
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| "scripts/k8s-assets printed no directory".to_string())?;
    Ok(PathBuf::from(dir))
}

/// The kubectl to use: `KUBECTL`, else the one on PATH.
pub fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// A free TCP port on 127.0.0.1 (bound and released; a tiny race with other processes is
/// accepted, as envtest does).
pub fn free_port() -> Result<u16, String> {
    free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// A free TCP port on `address`, as [`free_port`].
pub fn free_port_on(address: IpAddr) -> Result<u16, String> {
    TcpListener::bind((address, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port on {address}: {e}"))
}

/// Stops a child: SIGTERM, then SIGKILL if it is still there after `grace`; always reaped.
pub(crate) fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: a signal to our own child, which has not been reaped (try_wait said so).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn next_serial() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Removes the directories `<prefix><pid>...` in the temporary directory that processes which
/// were killed left behind (their pid is gone).
pub fn remove_stale_dirs(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Marks every descriptor above stderr close-on-exec. For a child about to exec: descriptors
/// this process inherited without that flag (such as the one `flock LOCK cargo test` holds its
/// lock on) would pass on to it, and from containerd (Go passes them on too) to its shims,
/// which outlive a killed test process and would hold the lock until the next node start.
///
/// # Safety
/// Only async-signal-safe calls: fit for `pre_exec`.
pub unsafe fn close_inherited_descriptors_on_exec() {
    // SAFETY: close_range and fcntl have no memory effects.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            for fd in 3..65536 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
}

/// Spawns `command` so that the kernel kills it when this process dies, however it dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, and test threads end
/// with their test; so every child is forked by one thread that lives as long as the process.
pub fn spawn_tied_to_this_process(command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let _ = std::thread::Builder::new()
            .name("control-plane-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    die_with_spawning_thread(&mut command);
                    let _ = reply.send(command.spawn());
                }
            });
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((command, reply_tx))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// Has the kernel kill (SIGKILL) the process `command` starts once the thread that spawns it
/// ends, and keeps the descriptors this process inherited from passing on to it. The thread
/// must live as long as the process should: [`spawn_tied_to_this_process`] has one of its own.
pub fn die_with_spawning_thread(command: &mut Command) {
    // SAFETY: prctl, close_range and fcntl are async-signal-safe; nothing else runs between
    // fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            close_inherited_descriptors_on_exec();
            Ok(())
        });
    }
}

/// What a certificate from [`ControlPlane::issue`] is for.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub common_name: String,
    pub organizations: Vec<String>,
    /// DNS names and IP addresses (a serving certificate).
    pub subject_alt_names: Vec<String>,
    pub server: bool,
}

impl CertRequest {
    /// A client certificate for user `common_name` in groups `organizations`.
    pub fn client(common_name: &str, organizations: &[&str]) -> CertRequest {
        CertRequest {
            common_name: common_name.to_string(),
            organizations: organizations.iter().map(|o| o.to_string()).collect(),
            subject_alt_names: Vec::new(),
            server: false,
        }
    }

    /// A serving certificate for these names and addresses.
    pub fn server(common_name: &str, subject_alt_names: &[String]) -> CertRequest {
        CertRequest {
            common_name: common_name.to_string(),
            organizations: Vec::new(),
            subject_alt_names: subject_alt_names.to_vec(),
            server: true,
        }
    }
}

/// The CA's parameters: the same each time, so that an issuer rebuilt from them and the CA key
/// signs certificates that chain to the CA certificate written at start.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "waldur-operator-e2e-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(ca)
}

/// The files of a freshly generated PKI.
struct Pki {
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_public: PathBuf,
    sa_private: PathBuf,
}

impl Pki {
    fn generate(dir: &Path, serving_ips: &[IpAddr]) -> Result<Pki, String> {
        let err = |e: rcgen::Error| format!("cannot generate certificates: {e}");
        let write = |name: &str, content: &str| -> Result<PathBuf, String> {
            let path = dir.join(name);
            std::fs::write(&path, content)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(path)
        };

        let ca_key = KeyPair::generate().map_err(err)?;
        let ca = ca_params().map_err(err)?;
        let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
        // Kept (owner-only) so that the node harness can issue kubelet and component
        // certificates after start; removed with the directory.
        write_private(&dir.join("ca.key"), &ca_key.serialize_pem())?;
        let issuer = Issuer::new(ca, ca_key);

        let serving_key = KeyPair::generate().map_err(err)?;
        let mut names = vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
        ];
        names.extend(serving_ips.iter().map(|ip| ip.to_string()));
        let mut serving = CertificateParams::new(names).map_err(err)?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &issuer).map_err(err)?;

        let admin_key = KeyPair::generate().map_err(err)?;
        let mut admin = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "e2e-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin.signed_by(&admin_key, &issuer).map_err(err)?;

        let sa_key = KeyPair::generate().map_err(err)?;

        let pki = Pki {
            ca_cert: write("ca.crt", &ca_cert.pem())?,
            serving_cert: write("serving.crt", &serving_cert.pem())?,
            serving_key: write("serving.key", &serving_key.serialize_pem())?,
            sa_public: write("sa.pub", &sa_key.public_key_pem())?,
            sa_private: write("sa.key", &sa_key.serialize_pem())?,
        };
        write("admin.crt", &admin_cert.pem())?;
        write("admin.key", &admin_key.serialize_pem())?;
        Ok(pki)
    }

    /// A certificate signed by the CA whose key [`Pki::generate`] left in `dir`.
    fn issue(dir: &Path, name: &str, request: &CertRequest) -> Result<(PathBuf, PathBuf), String> {
        let err = |e: rcgen::Error| format!("cannot issue the certificate {name}: {e}");
        let ca_pem = std::fs::read_to_string(dir.join("ca.key"))
            .map_err(|e| format!("cannot read the CA key: {e}"))?;
        let ca_key = KeyPair::from_pem(&ca_pem).map_err(err)?;
        let issuer = Issuer::new(ca_params().map_err(err)?, ca_key);
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(request.subject_alt_names.clone()).map_err(err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, request.common_name.as_str());
        for org in &request.organizations {
            params
                .distinguished_name
                .push(DnType::OrganizationName, org.as_str());
        }
        params.extended_key_usages = vec![if request.server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = params.signed_by(&key, &issuer).map_err(err)?;
        let cert_path = dir.join(format!("{name}.crt"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem())
            .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
        write_private(&key_path, &key.serialize_pem())?;
        Ok((cert_path, key_path))
    }
}

/// Writes a file only its owner may read (a private key).
fn write_private(path: &Path, content: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(content.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The last 15 lines of `dir/NAME.log` for each name there is a log of, for failure messages.
pub(crate) fn log_tails(dir: &Path, names: &[&str]) -> String {
    let mut out = String::new();
    for name in names {
        if let Ok(text) = std::fs::read_to_string(dir.join(format!("{name}.log"))) {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            let _ = writeln!(
                out,
                "--- {name} (last {} lines)\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
    out
}
