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

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
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
        let started = Instant::now();
        let assets = assets_dir()?;
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            next_serial()
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut cp = ControlPlane {
            dir,
            procs: Mutex::new(Vec::new()),
            url: String::new(),
            started_in: Duration::ZERO,
            stopped: Mutex::new(false),
        };
        cp.launch(&assets)?;
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

    fn launch(&mut self, assets: &Path) -> Result<(), String> {
        let pki = Pki::generate(&self.dir)?;
        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let api_port = free_port()?;
        self.url = format!("https://127.0.0.1:{api_port}");
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
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            // No Endpoints for the `kubernetes` Service: a loopback address is not allowed
            // there, and nothing in the tests reaches the API server through the Service.
            "--endpoint-reconciler-type=none",
            &format!("--secure-port={api_port}"),
            &format!("--cert-dir={}", d("apiserver-certs")),
            &format!("--tls-cert-file={}", pki.serving_cert.display()),
            &format!("--tls-private-key-file={}", pki.serving_key.display()),
            &format!("--client-ca-file={}", pki.ca_cert.display()),
            "--authorization-mode=RBAC",
            &format!("--service-account-issuer={ISSUER}"),
            &format!("--api-audiences={ISSUER}"),
            &format!("--service-account-key-file={}", pki.sa_public.display()),
            &format!(
                "--service-account-signing-key-file={}",
                pki.sa_private.display()
            ),
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--v=1",
        ]);
        self.spawn("kube-apiserver", apiserver)?;
        self.wait_ready()?;

        let mut kcm = Command::new(assets.join("kube-controller-manager"));
        kcm.args([
            &format!("--kubeconfig={}", self.admin_kubeconfig().display()),
            "--controllers=namespace-controller,garbage-collector-controller",
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

    /// The last lines of each process's log, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for name in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.join(format!("{name}.log"))) {
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

fn run_assets_script(args: &[&str]) -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/k8s-assets");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({}); the real tier needs these binaries and does not skip",
            script.display(),
            args.join(" "),
            out.status
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .ok_or_else(|| format!("{} printed no directory", script.display()))?;
    Ok(PathBuf::from(dir))
}

/// The kubectl to use: `KUBECTL`, else the one on PATH.
pub fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// A free TCP port on 127.0.0.1 (bound and released; a tiny race with other processes is
/// accepted, as envtest does).
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

fn next_serial() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Removes directories left by test processes that were killed (their pid is gone).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
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
                    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs
                    // between fork and exec.
                    unsafe {
                        command.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
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

/// The files of a freshly generated PKI.
struct Pki {
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_public: PathBuf,
    sa_private: PathBuf,
}

impl Pki {
    fn generate(dir: &Path) -> Result<Pki, String> {
        let err = |e: rcgen::Error| format!("cannot generate certificates: {e}");
        let write = |name: &str, content: &str| -> Result<PathBuf, String> {
            let path = dir.join(name);
            std::fs::write(&path, content)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(path)
        };

        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca.distinguished_name
            .push(DnType::CommonName, "waldur-operator-e2e-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
        let issuer = Issuer::new(ca, ca_key);

        let serving_key = KeyPair::generate().map_err(err)?;
        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
        ])
        .map_err(err)?;
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
}
