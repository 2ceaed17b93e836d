//! kubectl against the test server: what a user of a local sandbox does.
//!
//! kubectl must be installed (CI installs it). Without it this test FAILS: set `KUBECTL` to its
//! path or put it on `PATH`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use kube::api::{Patch, PatchParams};
use serde_json::json;

fn kubectl_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBECTL") {
        return PathBuf::from(p);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("kubectl"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push(PathBuf::from("/usr/local/bin/kubectl"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "kubectl not found on PATH or at /usr/local/bin/kubectl: install kubectl (CI does) \
                 or set KUBECTL=/path/to/kubectl. This test does not skip."
            )
        })
}

struct Kubectl {
    bin: PathBuf,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn new(kubeconfig_yaml: &str) -> Kubectl {
        let bin = kubectl_binary();
        let dir = std::env::temp_dir().join(format!(
            "kube-test-server-kubectl-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml).unwrap();
        Kubectl {
            bin,
            dir,
            kubeconfig,
        }
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    async fn run(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .args(args)
            .env_remove("KUBECONFIG")
            .output()
            .await
            .unwrap_or_else(|e| panic!("running {}: {e}", self.bin.display()))
    }

    /// Runs kubectl and expects success; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn widget_yaml(name: &str, size: &str) -> String {
    format!(
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: {name}\n  labels: {{app: demo}}\nspec:\n  size: {size}\n  tenant: abc\n"
    )
}

#[tokio::test]
async fn kubectl_apply_get_wait_delete() {
    let server = kube_test_server::TestServer::start().await.unwrap();
    let k = Kubectl::new(&server.kubeconfig_yaml("team-a"));
    let client = client(&server, "team-a").await;
    let api = widgets(&client, "team-a");

    // CRD, then a custom resource through discovery that has just changed.
    let crd = k.file("crd.yaml", WIDGET_CRD_YAML);
    let out = k.ok(&["apply", "-f", path(&crd)]).await;
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/widgets.example.com created"),
        "{out}"
    );
    let w = k.file("widget.yaml", &widget_yaml("x", "small"));
    let out = k.ok(&["apply", "-f", path(&w)]).await;
    assert!(out.contains("widget.example.com/x created"), "{out}");
    let w = k.file("widget.yaml", &widget_yaml("x", "medium"));
    let out = k.ok(&["apply", "-f", path(&w)]).await;
    assert!(out.contains("widget.example.com/x configured"), "{out}");
    let stored = server
        .get("example.com", "widgets", Some("team-a"), "x")
        .unwrap();
    assert_eq!(stored["spec"]["size"], "medium");
    assert_eq!(stored["spec"]["color"], "blue");
    assert_eq!(stored["metadata"]["generation"], 2);

    // get: YAML, and the server-side printed table with the CRD's printer columns.
    let out = k.ok(&["get", "widgets", "-o", "yaml"]).await;
    assert!(
        out.contains("size: medium") && out.contains("name: x"),
        "{out}"
    );
    let out = k.ok(&["get", "wd"]).await;
    let header = out.lines().next().unwrap_or("");
    assert!(
        header.contains("SIZE") && header.contains("READY") && header.contains("AGE"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("x ") && l.contains("medium")),
        "{out}"
    );

    // An invalid object fails with the schema's message.
    let bad = k.file("bad.yaml", &widget_yaml("x", "bogus"));
    let out = k.run(&["apply", "-f", path(&bad)]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.size: Unsupported value: \"bogus\": supported values: \"small\", \"medium\", \"large\""),
        "{stderr}"
    );

    // kubectl wait: a Ready condition observed for an older generation does not satisfy it
    // (kubectl compares the condition's observedGeneration with metadata.generation); the
    // current one does.
    let ready = |generation: i64| {
        Patch::Merge(
            json!({"status": {"conditions": [{"type": "Ready", "status": "True",
            "observedGeneration": generation, "reason": "Ok", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}),
        )
    };
    api.patch_status("x", &PatchParams::default(), &ready(1))
        .await
        .unwrap();
    let out = k
        .run(&["wait", "--for=condition=Ready", "widget/x", "--timeout=1s"])
        .await;
    assert!(
        !out.status.success(),
        "a stale condition must not satisfy kubectl wait"
    );
    let setter = {
        let api = api.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            api.patch_status("x", &PatchParams::default(), &ready(2))
                .await
                .unwrap();
        })
    };
    let start = Instant::now();
    let out = k
        .ok(&["wait", "--for=condition=Ready", "widget/x", "--timeout=10s"])
        .await;
    assert!(out.contains("widget.example.com/x condition met"), "{out}");
    assert!(start.elapsed() >= Duration::from_millis(600));
    setter.await.unwrap();
    let out = k.ok(&["get", "widget", "x"]).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("x ") && l.contains("True")),
        "{out}"
    );

    // Server-side apply.
    let y = k.file("y.yaml", &widget_yaml("yy", "large"));
    let out = k.ok(&["apply", "--server-side", "-f", path(&y)]).await;
    assert!(
        out.contains("widget.example.com/yy serverside-applied"),
        "{out}"
    );
    let stored = server
        .get("example.com", "widgets", Some("team-a"), "yy")
        .unwrap();
    assert_eq!(stored["metadata"]["managedFields"][0]["manager"], "kubectl");
    assert_eq!(stored["metadata"]["managedFields"][0]["operation"], "Apply");

    // Typed kubectl commands send protobuf bodies; Secrets are understood.
    k.ok(&[
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal=token=abc",
    ])
    .await;
    let secret = server.get("", "secrets", Some("team-a"), "creds").unwrap();
    assert_eq!(secret["data"]["token"], "YWJj");
    assert_eq!(secret["type"], "Opaque");

    // delete: held by a finalizer (--wait=false), released by removing it.
    k.ok(&[
        "patch",
        "widget",
        "x",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["example.com/hold"]}}"#,
    ])
    .await;
    let out = k.ok(&["delete", "widget", "x", "--wait=false"]).await;
    assert!(out.contains("widget.example.com \"x\" deleted"), "{out}");
    let held = server
        .get("example.com", "widgets", Some("team-a"), "x")
        .unwrap();
    assert!(held["metadata"]["deletionTimestamp"].is_string());
    k.ok(&[
        "patch",
        "widget",
        "x",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])
    .await;
    assert!(
        server
            .get("example.com", "widgets", Some("team-a"), "x")
            .is_none()
    );
    let out = k.ok(&["delete", "widget", "yy"]).await;
    assert!(out.contains("widget.example.com \"yy\" deleted"), "{out}");
    assert!(server.list("example.com", "widgets").is_empty());
}
