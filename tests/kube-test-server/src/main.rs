//! `kube-test-server`: runs the Kubernetes API test server until interrupted.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use kube_test_server::{Config, TestServer};
use serde::Deserialize;
use serde_json::Value;

/// A Kubernetes API test server (plain HTTP, no auth) for integration tests and local sandboxes.
///
/// It serves CRDs registered at run time plus Namespaces, Secrets, ConfigMaps, Events and
/// Leases, with watch, server-side apply, the status subresource and schema/CEL validation.
/// It is not a cluster: nothing runs pods. State lives in memory and is lost on exit.
#[derive(Debug, Parser)]
#[command(
    name = "kube-test-server",
    version,
    after_help = "Example:\n  kube-test-server --crd crds/servergroups.openstack.waldur.com.yaml --kubeconfig-out /tmp/kts.kubeconfig\n  kubectl --kubeconfig /tmp/kts.kubeconfig get servergroups\n\nTest hooks: GET <url>/__test/ lists them (stats, fail, expire-watches, compact, reset-counters)."
)]
struct Args {
    /// Address to listen on (plain HTTP).
    #[arg(
        long,
        env = "KUBE_TEST_SERVER_LISTEN",
        default_value = "127.0.0.1:8001"
    )]
    listen: SocketAddr,

    /// Write a kubeconfig for this server to PATH (use it with `kubectl --kubeconfig PATH`).
    #[arg(long, env = "KUBE_TEST_SERVER_KUBECONFIG_OUT", value_name = "PATH")]
    kubeconfig_out: Option<PathBuf>,

    /// CRD file (YAML, possibly multi-document, or JSON) to install at start; repeatable.
    #[arg(long = "crd", value_name = "FILE")]
    crds: Vec<PathBuf>,

    /// Namespace of the kubeconfig's context.
    #[arg(long, env = "KUBE_TEST_SERVER_NAMESPACE", default_value = "default")]
    namespace: String,

    /// How many watch events to keep for watches that resume from a resourceVersion.
    #[arg(long, env = "KUBE_TEST_SERVER_HISTORY", default_value_t = 10_000)]
    history: usize,

    /// Seconds between BOOKMARK events on watches that allow them.
    #[arg(long, env = "KUBE_TEST_SERVER_BOOKMARK_SECONDS", default_value_t = 1.0)]
    bookmark_seconds: f64,

    /// Milliseconds each watch event waits before it reaches watchers (a lagging watch cache).
    #[arg(long, env = "KUBE_TEST_SERVER_WATCH_DELAY_MS", default_value_t = 0)]
    watch_delay_ms: u64,
}

fn read_documents(path: &PathBuf) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Ok(v) = serde_json::from_str::<Value>(&text) {
        return Ok(vec![v]);
    }
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).map_err(|e| format!("{}: {e}", path.display()))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let server = TestServer::start_with(Config {
        addr: args.listen,
        history: args.history,
        bookmark_interval: std::time::Duration::from_secs_f64(args.bookmark_seconds.max(0.05)),
        watch_delay: std::time::Duration::from_millis(args.watch_delay_ms),
    })
    .await?;
    for path in &args.crds {
        for doc in read_documents(path)? {
            let name = doc
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            server
                .install_crd(doc)
                .map_err(|e| format!("{}: CRD {name}: {e}", path.display()))?;
            println!("installed CRD {name}");
        }
    }
    let kubeconfig = server.kubeconfig_yaml(&args.namespace);
    println!(
        "kube-test-server serving the Kubernetes API at {}",
        server.url()
    );
    println!(
        "  resources: CRDs (POST them or pass --crd), namespaces, secrets, configmaps, events, events.k8s.io events, leases"
    );
    println!(
        "  test hooks: {}/__test/ (stats, fail, expire-watches, compact)",
        server.url()
    );
    match &args.kubeconfig_out {
        Some(path) => {
            std::fs::write(path, &kubeconfig)?;
            println!("  kubeconfig written to {}", path.display());
            println!(
                "  try: kubectl --kubeconfig {} api-resources",
                path.display()
            );
        }
        None => {
            println!("  no --kubeconfig-out given; this kubeconfig points kubectl here:\n");
            println!("{kubeconfig}");
        }
    }
    tokio::signal::ctrl_c().await?;
    server.shutdown();
    Ok(())
}
