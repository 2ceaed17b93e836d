//! The README's main command, as a user runs it: `waldur-sandbox` starts, prints how to use
//! it, serves the example to Ready through kubectl, and stops cleanly on Ctrl-C (SIGINT).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the sandbox if the test fails before it stops it.
struct Sandbox(Child);

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("an address").to_string()
}

fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str]) -> std::process::Output {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    Command::new(&bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("kubectl is needed for this test ({bin}): {e}"))
}

#[test]
fn the_sandbox_serves_the_example_and_stops_on_ctrl_c() {
    let dir = std::env::temp_dir().join(format!("wsg-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("sandbox.kubeconfig");
    let out = dir.join("stdout");
    let mut sandbox = Sandbox(
        Command::new(env!("CARGO_BIN_EXE_waldur-sandbox"))
            .args(["--kube-listen", &free_addr()])
            .args(["--waldur-listen", &free_addr()])
            .args(["--metrics-listen", &free_addr()])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--step-ms", "100"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("the sandbox starts"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let printed = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("Ctrl-C stops everything") && kubeconfig.exists() {
            break text;
        }
        assert!(
            sandbox.0.try_wait().unwrap().is_none(),
            "the sandbox exited: {text}"
        );
        assert!(Instant::now() < deadline, "no welcome within 30 s: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        printed.contains(&format!("export KUBECONFIG={}", kubeconfig.display())),
        "an absolute kubeconfig path is printed as it is: {printed}"
    );

    let cache = dir.join("kubectl-cache");
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/servergroup.yaml"
    );
    let apply = kubectl(&kubeconfig, &cache, &["apply", "-f", example]);
    assert!(
        apply.status.success(),
        "{}",
        String::from_utf8_lossy(&apply.stderr)
    );
    let wait = kubectl(
        &kubeconfig,
        &cache,
        &[
            "wait",
            "-n",
            "team-a",
            "--for=condition=Ready",
            "servergroup/web",
            "--timeout=60s",
        ],
    );
    assert!(
        wait.status.success(),
        "{}",
        String::from_utf8_lossy(&wait.stderr)
    );

    let pid = sandbox.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = sandbox.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running 20 s after Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "Ctrl-C is a clean stop: {status}");
    assert!(
        !kubeconfig.exists(),
        "the sandbox removes the kubeconfig it wrote"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
