//! `waldur-node`: the real one-node cluster of `control_plane::node`, from the shell.
//!
//!   waldur-node up [--dir DIR]      start it in the background; prints the kubeconfig's path
//!   waldur-node down [--dir DIR]    tear it down and restore the host (also after a kill -9)
//!   waldur-node status [--dir DIR]  whether it runs, and its node
//!   waldur-node import [--dir DIR] TAR  import an image tarball into its containerd
//!
//! DIR (default /tmp/waldur-node) holds `kubeconfig`, `pid`, `serve.log` and the node's run
//! directory `run/`. `up` starts `waldur-node serve`, a process of its own that owns the node
//! (its components die with it) and tears it down on SIGTERM, SIGINT or SIGHUP.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use control_plane::node::{self, Node, NodeOptions};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut dir = PathBuf::from("/tmp/waldur-node");
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => match it.next() {
                Some(d) => dir = PathBuf::from(d),
                None => return fail("--dir needs a directory"),
            },
            _ => rest.push(a.clone()),
        }
    }
    let dir = match std::path::absolute(&dir) {
        Ok(d) => d,
        Err(e) => return fail(&format!("{}: {e}", dir.display())),
    };
    let result = match rest.first().map(String::as_str) {
        Some("up") => up(&dir),
        Some("serve") => serve(&dir),
        Some("down") => down(&dir),
        Some("status") => status(&dir),
        Some("import") => match rest.get(1) {
            Some(tar) => import(&dir, Path::new(tar)),
            None => Err("import needs an image tarball".into()),
        },
        _ => Err("usage: waldur-node up|down|status|import TAR [--dir DIR]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "waldur-node: {message}");
    ExitCode::FAILURE
}

fn pid_of(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        // SAFETY: signal 0 only checks that the process exists.
        .filter(|&pid| unsafe { libc::kill(pid, 0) } == 0)
}

fn up(dir: &Path) -> Result<(), String> {
    if let Some(pid) = pid_of(dir) {
        return Err(format!(
            "a node already runs from {} (pid {pid})",
            dir.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let _ = std::fs::remove_file(dir.join("ready"));
    let log = std::fs::File::create(dir.join("serve.log"))
        .map_err(|e| format!("cannot create serve.log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let mut serve = Command::new(exe);
    serve
        .args(["serve", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    // SAFETY: setsid, close_range and fcntl are async-signal-safe. The server leaves this
    // terminal's session, so that closing the terminal or Ctrl-C here does not reach it, and
    // inherits no descriptor but its standard ones: it outlives `up`, and an inherited one
    // would be held for the node's life (measured: the lock of `flock LOCK scripts/node up`,
    // which then blocked every other holder of that lock until `down`).
    unsafe {
        serve.pre_exec(|| {
            libc::setsid();
            control_plane::close_inherited_descriptors_on_exec();
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = serve
        .spawn()
        .map_err(|e| format!("cannot start the server: {e}"))?;
    loop {
        if dir.join("ready").exists() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
            return Err(format!("the node did not start ({status}):\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("{}", dir.join("kubeconfig").display());
    let _ = writeln!(
        std::io::stderr(),
        "node up in {:.1} s (pid {}); export KUBECONFIG={}; `waldur-node down --dir {}` tears it down",
        started.elapsed().as_secs_f64(),
        child.id(),
        dir.join("kubeconfig").display(),
        dir.display()
    );
    Ok(())
}

fn serve(dir: &Path) -> Result<(), String> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    std::fs::write(dir.join("pid"), std::process::id().to_string())
        .map_err(|e| format!("cannot write the pid file: {e}"))?;
    let node = Node::start(NodeOptions {
        run_dir: Some(dir.join("run")),
        ..NodeOptions::default()
    })?;
    std::fs::copy(node.kubeconfig(), dir.join("kubeconfig"))
        .map_err(|e| format!("cannot copy the kubeconfig: {e}"))?;
    std::fs::write(
        dir.join("ready"),
        format!(
            "address {}\napi {}\ncontainerd {}\npause {}\n",
            node.address(),
            node.control_plane().url(),
            node.containerd_socket().display(),
            node.pause_image()
        ),
    )
    .map_err(|e| format!("cannot write the ready file: {e}"))?;
    let mut reason = "signal".to_string();
    while !STOP.load(Ordering::SeqCst) {
        if let Some(dead) = node.exited() {
            reason = dead;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("tearing down ({reason})");
    let _ = std::fs::remove_file(dir.join("ready"));
    node.stop();
    let _ = std::fs::remove_file(dir.join("kubeconfig"));
    let _ = std::fs::remove_file(dir.join("pid"));
    Ok(())
}

fn down(dir: &Path) -> Result<(), String> {
    let started = Instant::now();
    if let Some(pid) = pid_of(dir) {
        // SAFETY: a signal to the server this directory names.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            if Instant::now() > deadline {
                return Err(format!("the server (pid {pid}) did not stop within 180 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A server that was killed leaves the host to whoever comes next: that is us.
    match node::cleanup_stale()? {
        Some(done) => eprintln!("{done}"),
        None => eprintln!(
            "node down in {:.1} s; host restored",
            started.elapsed().as_secs_f64()
        ),
    }
    Ok(())
}

fn status(dir: &Path) -> Result<(), String> {
    match pid_of(dir) {
        Some(pid) if dir.join("ready").exists() => {
            println!("running (pid {pid})");
            let _ = Command::new(control_plane::kubectl())
                .arg("--kubeconfig")
                .arg(dir.join("kubeconfig"))
                .args(["get", "nodes", "-o", "wide"])
                .status();
            Ok(())
        }
        Some(pid) => {
            println!("starting or stopping (pid {pid})");
            Ok(())
        }
        None => {
            println!("not running");
            Ok(())
        }
    }
}

fn import(dir: &Path, tar: &Path) -> Result<(), String> {
    let ready = std::fs::read_to_string(dir.join("ready"))
        .map_err(|_| format!("no node runs from {}", dir.display()))?;
    let socket = ready
        .lines()
        .find_map(|l| l.strip_prefix("containerd "))
        .ok_or("the ready file names no containerd socket")?;
    let status = Command::new("ctr")
        .args(["-n", "k8s.io", "-a", socket, "images", "import"])
        .arg(tar)
        .status()
        .map_err(|e| format!("cannot run ctr: {e}"))?;
    if !status.success() {
        return Err(format!("ctr images import failed ({status})"));
    }
    Ok(())
}
