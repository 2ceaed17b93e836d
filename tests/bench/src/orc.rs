//! The peer `--peer orc` runs: the OpenStack Resource Controller's manager (v2.6.0, built from
//! the Go module proxy by `scripts/k8s-assets orc`), on the same API server, against the
//! Keystone and Nova emulator of [`crate::nova`].
//!
//! Its manager starts every controller and waits for all their informers, so all its CRDs
//! are installed, not only ServerGroup. Credentials are a `clouds.yaml` Secret in each
//! namespace, named by each ServerGroup's `cloudCredentialsRef`. Ready is its `Available`
//! condition for the current generation.

use std::path::PathBuf;
use std::process::Stdio;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DynamicObject, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::nova::Nova;

const SECRET: &str = "openstack-clouds";

/// ORC's manager binary and its CRDs' directory.
pub struct Orc {
    manager: PathBuf,
    crds: PathBuf,
}

impl Orc {
    pub fn find() -> Result<Orc, String> {
        let dir = control_plane::orc_dir()?;
        Ok(Orc {
            manager: dir.join("manager"),
            crds: dir.join("crds"),
        })
    }

    /// Installs every CRD of ORC's and a credentials Secret in each of the benchmark's
    /// namespaces.
    pub async fn install(&self, client: &Client, nova: &Nova) -> Result<(), String> {
        let mut crds = Vec::new();
        for entry in std::fs::read_dir(&self.crds).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            let crd: Value =
                serde_yaml_ng::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            crds.push(crd);
        }
        crate::kube_side::install_crds(client, crds).await?;
        for ns in crate::namespaces() {
            let secret: Secret = serde_json::from_value(json!({
                "metadata": {"name": SECRET, "namespace": ns},
                "stringData": {"clouds.yaml": nova.clouds_yaml()},
            }))
            .map_err(|e| e.to_string())?;
            Api::<Secret>::namespaced(client.clone(), &ns)
                .create(&PostParams::default(), &secret)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The manager as shipped (no leader election), metrics and probes off, quiet but for
    /// errors (`ORC_LOG_LEVEL` to see more).
    pub fn command(&self, kubeconfig: &std::path::Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.manager);
        // "0" turns both servers off (controller-runtime): no port to pick, none to collide.
        cmd.arg("--metrics-bind-address=0")
            .arg("--health-probe-bind-address=0")
            .arg(format!(
                "--zap-log-level={}",
                std::env::var("ORC_LOG_LEVEL").unwrap_or_else(|_| "error".into())
            ))
            .env("KUBECONFIG", kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        cmd
    }
}

pub fn resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "openstack.k-orc.cloud".into(),
        version: "v1alpha1".into(),
        api_version: "openstack.k-orc.cloud/v1alpha1".into(),
        kind: "ServerGroup".into(),
        plural: "servergroups".into(),
    }
}

/// The same group as the benchmark's own manifest asks of Waldur: an anti-affinity group,
/// managed (created and deleted) by the controller.
pub fn manifest(i: usize) -> Value {
    json!({
        "apiVersion": "openstack.k-orc.cloud/v1alpha1",
        "kind": "ServerGroup",
        "metadata": {"name": format!("sg-{i:05}"), "namespace": format!("team-{}", i % 10)},
        "spec": {
            "cloudCredentialsRef": {"cloudName": "openstack", "secretName": SECRET},
            "managementPolicy": "managed",
            "resource": {"policy": "anti-affinity"},
        }
    })
}

/// ORC's Ready: the `Available` condition, True, for the current generation.
pub fn is_ready(obj: &DynamicObject) -> bool {
    crate::condition_true(obj, "Available")
}
