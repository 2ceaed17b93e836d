//! The Kubernetes side of a run: the API test server (in this process, the default: fast),
//! or a real kube-apiserver with etcd (`--kube real`, the control plane the e2e suite builds
//! from Go modules; `scripts/k8s-assets` or `KUBEBUILDER_ASSETS`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use kube_test_server::TestServer;
use serde_json::json;

pub enum KubeSide {
    TestServer(TestServer),
    Real(control_plane::ControlPlane),
}

impl KubeSide {
    pub async fn start(real: bool) -> Result<KubeSide, String> {
        let side = if real {
            let plane = tokio::task::spawn_blocking(control_plane::ControlPlane::start)
                .await
                .map_err(|e| e.to_string())??;
            KubeSide::Real(plane)
        } else {
            KubeSide::TestServer(TestServer::start().await.map_err(|e| e.to_string())?)
        };
        let client = side.client().await?;
        let crd = serde_json::to_value(waldur_operator::api::crd()).map_err(|e| e.to_string())?;
        install_crds(&client, vec![crd]).await?;
        for ns in crate::namespaces() {
            Api::<Namespace>::all(client.clone())
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": ns}}))
                        .map_err(|e| e.to_string())?,
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(side)
    }

    pub fn name(&self) -> &'static str {
        match self {
            KubeSide::TestServer(_) => "test-server",
            KubeSide::Real(_) => "kube-apiserver",
        }
    }

    pub fn kubeconfig_yaml(&self) -> String {
        match self {
            KubeSide::TestServer(s) => s.kubeconfig_yaml("default"),
            KubeSide::Real(p) => p.admin_kubeconfig_yaml("default"),
        }
    }

    pub async fn client(&self) -> Result<Client, String> {
        let kubeconfig =
            Kubeconfig::from_yaml(&self.kubeconfig_yaml()).map_err(|e| e.to_string())?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        Client::try_from(config).map_err(|e| e.to_string())
    }

    /// Every write the API server recorded so far, by `resource` or `resource/subresource`.
    /// A real one says it in `apiserver_request_total`; its controller-manager's own lease
    /// renewals (one every 2 s) are among them.
    pub async fn writes_by_resource(&self, client: &Client) -> BTreeMap<String, u64> {
        match self {
            KubeSide::TestServer(s) => s.writes_by_resource(),
            KubeSide::Real(_) => {
                let text = client
                    .request_text(
                        http::Request::get("/metrics")
                            .body(Vec::new())
                            .unwrap_or_default(),
                    )
                    .await
                    .unwrap_or_default();
                writes_in_metrics(&text)
            }
        }
    }

    /// The API server's own CPU seconds so far, when it is a process of its own.
    pub fn server_cpu_secs(&self) -> Option<f64> {
        match self {
            KubeSide::TestServer(_) => None,
            KubeSide::Real(p) => p.pid_of("kube-apiserver").and_then(crate::cpu_secs),
        }
    }

    pub fn shutdown(&self) {
        match self {
            KubeSide::TestServer(s) => s.shutdown(),
            KubeSide::Real(p) => p.stop(),
        }
    }
}

/// Writes (POST, PUT, PATCH, APPLY, DELETE, DELETECOLLECTION) in kube-apiserver's
/// `apiserver_request_total`, summed by resource and subresource.
pub fn writes_in_metrics(text: &str) -> BTreeMap<String, u64> {
    let mut by = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split("\",").find_map(|kv| {
                let (k, v) = kv.split_once("=\"")?;
                (k.trim_start_matches(',') == name).then(|| v.trim_end_matches('"').to_string())
            })
        };
        let verb = label("verb").unwrap_or_default();
        if !matches!(
            verb.as_str(),
            "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION"
        ) {
            continue;
        }
        let resource = label("resource").unwrap_or_default();
        let key = match label("subresource").filter(|s| !s.is_empty()) {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource,
        };
        let n = value.trim().parse::<f64>().unwrap_or_default() as u64;
        *by.entry(key).or_default() += n;
    }
    by
}

/// Applies the CRDs (server-side) and waits until every one is Established.
pub async fn install_crds(client: &Client, crds: Vec<serde_json::Value>) -> Result<(), String> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in crds {
        let name = crd["metadata"]["name"]
            .as_str()
            .ok_or("a CRD without a name")?
            .to_string();
        api.patch(
            &name,
            &PatchParams::apply("waldur-bench").force(),
            &Patch::Apply(crd),
        )
        .await
        .map_err(|e| format!("applying CRD {name}: {e}"))?;
        names.push(name);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in names {
        loop {
            let crd = api.get(&name).await.map_err(|e| e.to_string())?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("CRD {name} was not Established in 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_read_from_the_api_servers_metrics() {
        let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="201",component="apiserver",dry_run="",group="openstack.waldur.com",resource="servergroups",scope="resource",subresource="",verb="POST",version="v1alpha1"} 1000
apiserver_request_total{code="200",component="apiserver",dry_run="",group="openstack.waldur.com",resource="servergroups",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 2000
apiserver_request_total{code="200",component="apiserver",dry_run="",group="openstack.waldur.com",resource="servergroups",scope="resource",subresource="",verb="PATCH",version="v1alpha1"} 1000
apiserver_request_total{code="200",component="apiserver",dry_run="",group="openstack.waldur.com",resource="servergroups",scope="cluster",subresource="",verb="LIST",version="v1alpha1"} 7
apiserver_request_total{code="201",component="apiserver",dry_run="",group="events.k8s.io",resource="events",scope="resource",subresource="",verb="POST",version="v1"} 999
apiserver_request_total{code="409",component="apiserver",dry_run="",group="events.k8s.io",resource="events",scope="resource",subresource="",verb="POST",version="v1"} 1
"#;
        let by = writes_in_metrics(text);
        assert_eq!(by.get("servergroups"), Some(&2000));
        assert_eq!(by.get("servergroups/status"), Some(&2000));
        assert_eq!(by.get("events"), Some(&1000));
        assert_eq!(by.len(), 3);
    }
}
