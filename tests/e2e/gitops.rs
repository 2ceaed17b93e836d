//! What GitOps tools show for our objects in every state, from live objects the shipped
//! operator wrote. kstatus (sigs.k8s.io/cli-utils, behind Flux's health checks) is the
//! library's own code, through `kstatus-of` (tests/kstatus). The Argo CD health check
//! (deploy/argocd/health.lua) is our Lua, run by `lua5.1` through deploy/argocd/test.lua, not
//! by Argo CD's gopher-lua sandbox: the logic is checked, not Argo CD's embedding of it
//! (test-suite audit m5).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use kube::api::ListParams;
use serde_json::{Value, json};
use waldur_sim::SimConfig;

use crate::env::{Env, reason, sim_config};
use crate::spec;

/// Each object: (name, what kstatus says, what Argo CD says, words the kstatus message holds).
const EXPECTED: [(&str, &str, &str, &str); 8] = [
    ("ready", "Current", "Healthy", "Resource is Ready"),
    // Never concluded: observedGeneration stays the CRD's default 0 (review m12), which
    // kstatus reports before the Ready condition's "see Synced".
    (
        "waiting",
        "InProgress",
        "Progressing",
        "latest observed generation is 0",
    ),
    ("invalid", "Failed", "Degraded", "is not a valid choice"),
    ("taken", "Failed", "Degraded", "already managed by"),
    ("missing", "Failed", "Degraded", "import"),
    (
        "failed",
        "Failed",
        "Degraded",
        "no OpenStack group to recover from",
    ),
    // Ready, then a spec change the operator cannot carry out yet (its credentials are
    // missing): in progress, not the old generation's Ready (review m12).
    (
        "changed",
        "InProgress",
        "Progressing",
        "latest observed generation is 1",
    ),
    // kstatus knows no "paused": a paused object it calls Current; Argo CD calls it Suspended.
    ("paused", "Current", "Suspended", "Resource is current"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_and_argo_cd_see_every_state_at_once() {
    // A Waldur that refuses anti-affinity, as 7.0.x does: a deterministic InvalidSpec.
    let env = Env::with_waldur(
        "gitops-states",
        SimConfig {
            affinity_only: true,
            ..sim_config()
        },
    )
    .await;
    env.start_operator().await;
    let within = Duration::from_secs(30);

    env.apply("ready", spec("affinity")).await.unwrap();
    let uuid = env.wait_ready("ready").await.status.unwrap().uuid.unwrap();

    env.apply("changed", spec("affinity")).await.unwrap();
    env.wait_ready("changed").await;
    let mut changed = spec("affinity");
    changed["credentialsRef"] = json!({"name": "absent"});
    env.apply("changed", changed).await.unwrap();

    let mut waiting = spec("affinity");
    waiting["credentialsRef"] = json!({"name": "absent"});
    env.apply("waiting", waiting).await.unwrap();
    env.apply("invalid", spec("anti-affinity")).await.unwrap();
    env.apply("taken", json!({"import": {"uuid": uuid}}))
        .await
        .unwrap();
    env.apply(
        "missing",
        json!({"import": {"uuid": "0badc0de0badc0de0badc0de0badc0de"}}),
    )
    .await
    .unwrap();
    env.sim.fail_next_creates(1);
    env.apply("failed", spec("affinity")).await.unwrap();
    // Paused from its first write on: the operator never touches Waldur for it.
    let paused = json!({
        "apiVersion": "openstack.waldur.com/v1alpha1",
        "kind": "ServerGroup",
        "metadata": {"name": "paused", "annotations": {"openstack.waldur.com/paused": "true"}},
        "spec": spec("affinity"),
    });
    env.api()
        .create(
            &Default::default(),
            &serde_json::from_value(paused).unwrap(),
        )
        .await
        .unwrap();

    env.wait("waiting", within, reason("Synced", "CredentialsNotFound"))
        .await;
    env.wait("paused", within, reason("Synced", "Paused")).await;
    env.wait("changed", within, reason("Synced", "CredentialsNotFound"))
        .await;
    for (name, why) in [
        ("invalid", "InvalidSpec"),
        ("taken", "AlreadyManaged"),
        ("missing", "NotFound"),
        ("failed", "Erred"),
    ] {
        env.wait(name, within, reason("Stalled", why)).await;
    }

    let objects: Vec<Value> = env
        .api()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|sg| {
            let mut v = serde_json::to_value(sg).unwrap();
            v["apiVersion"] = json!("openstack.waldur.com/v1alpha1");
            v["kind"] = json!("ServerGroup");
            v
        })
        .collect();
    assert_eq!(objects.len(), EXPECTED.len(), "one object per state");

    assert_seen_as(&objects, &EXPECTED, &env.dir);
}

/// Issue 21: a ServerGroup the operator has not written yet (its first status waits while
/// Waldur makes the group) reads as `status: {observedGeneration: 0}`, defaulted by the CRD on
/// the real API server: kstatus says InProgress, not Current, and Argo CD Progressing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_the_operator_has_not_written_yet_is_in_progress() {
    let env = Env::with_waldur("gitops-fresh", sim_config()).await;
    // No operator runs: the object is as the user's apply left it.
    env.apply("fresh", spec("affinity")).await.unwrap();
    let fresh = env.api().get("fresh").await.unwrap();
    let mut object = serde_json::to_value(&fresh).unwrap();
    object["apiVersion"] = json!("openstack.waldur.com/v1alpha1");
    object["kind"] = json!("ServerGroup");
    assert_eq!(
        object["status"],
        json!({"observedGeneration": 0}),
        "{object}"
    );
    let expected = [(
        "fresh",
        "InProgress",
        "Progressing",
        "latest observed generation is 0",
    )];
    assert_seen_as(&[object], &expected, &env.dir);
}

/// Asserts what kstatus and Argo CD's health check say of each object.
fn assert_seen_as(objects: &[Value], expected: &[(&str, &str, &str, &str)], dir: &std::path::Path) {
    let flux = kstatus(objects);
    let argo = argo_cd(objects, expected, dir);
    for &(name, want_flux, want_argo, words) in expected {
        let (status, message) = &flux[name];
        assert_eq!(status, want_flux, "kstatus of {name}: {message}");
        assert!(message.contains(words), "kstatus of {name}: {message}");
        assert!(
            argo.contains(&format!("ok   {name:<30} {want_argo}")),
            "Argo CD health of {name} should be {want_argo}:\n{argo}"
        );
    }
}

/// kstatus's (status, message) of each object, by name.
fn kstatus(objects: &[Value]) -> BTreeMap<String, (String, String)> {
    let dir = control_plane::kstatus_dir().unwrap_or_else(|e| panic!("kstatus-of: {e}"));
    let mut child = Command::new(dir.join("kstatus-of"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("kstatus-of runs");
    serde_json::to_writer(child.stdin.take().unwrap(), objects).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kstatus-of failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (text("name"), (text("status"), text("message")))
        })
        .collect()
}

/// The Lua runner's report over the objects, each as a sample whose expected status is the
/// one in `EXPECTED` (the runner prints `ok` or `FAIL` per object).
fn argo_cd(
    objects: &[Value],
    expected: &[(&str, &str, &str, &str)],
    scratch: &std::path::Path,
) -> String {
    let dir = scratch.join("argocd-samples");
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = vec![];
    for object in objects {
        let name = object["metadata"]["name"].as_str().unwrap();
        let (_, _, want, _) = expected.iter().find(|e| e.0 == name).unwrap();
        let path = dir.join(format!("{name}.json"));
        let sample = json!({"description": "live", "expected": {"status": want}, "object": object});
        std::fs::write(&path, sample.to_string()).unwrap();
        files.push(path);
    }
    let runner = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/argocd/test.lua");
    let out = Command::new("lua5.1")
        .arg(runner)
        .args(&files)
        .output()
        .expect("lua5.1 runs (scripts/install-tools installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
