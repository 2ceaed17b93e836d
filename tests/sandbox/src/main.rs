//! `waldur-sandbox`: the Kubernetes API test server, the Waldur simulator and the operator in
//! one process, with the CRD installed and a kubeconfig written, so that `kubectl apply -f
//! examples/` shows the operator at work within a minute. Ctrl-C stops everything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use kube_test_server::TestServer;
use waldur_operator::controller::index::ReadPath;
use waldur_operator::controller::{DefaultCredentials, DefaultScope, Settings};
use waldur_operator::operator::{self, Options};
use waldur_operator::telemetry::{self, LogFormat};
use waldur_operator::waldur::{ClientSettings, Limits, Token};
use waldur_sim::{Delays, SimConfig, Simulator};

#[derive(Parser, Debug)]
#[command(
    about = "Runs a Kubernetes API test server, the Waldur simulator and the operator together, for trying the operator with kubectl"
)]
struct Args {
    /// Address of the Kubernetes API test server.
    #[arg(long, env = "SANDBOX_KUBE_LISTEN", default_value = "127.0.0.1:8001")]
    kube_listen: SocketAddr,
    /// Address of the Waldur simulator.
    #[arg(long, env = "SANDBOX_WALDUR_LISTEN", default_value = "127.0.0.1:8090")]
    waldur_listen: SocketAddr,
    /// Address of the operator's /metrics, /healthz and /readyz.
    #[arg(long, env = "SANDBOX_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    metrics_listen: SocketAddr,
    /// Where to write the kubeconfig for kubectl.
    #[arg(long, env = "SANDBOX_KUBECONFIG", default_value = "sandbox.kubeconfig")]
    kubeconfig: PathBuf,
    /// How long each step of a Waldur transition takes in the simulator, in ms.
    #[arg(long, default_value_t = 1000)]
    step_ms: u64,
    /// Log filter of the operator.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let logs = telemetry::init(&args.log_level, LogFormat::Text)?;
    let kube_server = TestServer::start_on(args.kube_listen).await.map_err(|e| {
        format!(
            "cannot start the Kubernetes API test server on {}: {e}",
            args.kube_listen
        )
    })?;
    let crd = serde_json::to_value(waldur_operator::api::crd()).map_err(|e| e.to_string())?;
    kube_server.install_crd(crd)?;
    // The examples' namespace, so that `kubectl apply -f examples/` works at once.
    kube_server.create_namespace("team-a")?;
    let step = Duration::from_millis(args.step_ms);
    let sim = Simulator::start_on(
        SimConfig {
            delays: Delays {
                schedule: step,
                run: step,
            },
            ..Default::default()
        },
        args.waldur_listen,
    )
    .await
    .map_err(|e| {
        format!(
            "cannot start the Waldur simulator on {}: {e}",
            args.waldur_listen
        )
    })?;
    let kubeconfig = kube_server.kubeconfig_yaml("team-a");
    std::fs::write(&args.kubeconfig, &kubeconfig)
        .map_err(|e| format!("cannot write {}: {e}", args.kubeconfig.display()))?;

    let config = Config::from_custom_kubeconfig(
        Kubeconfig::from_yaml(&kubeconfig).map_err(|e| e.to_string())?,
        &KubeConfigOptions::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let kube = Client::try_from(config).map_err(|e| e.to_string())?;
    let options = Options {
        waldur: ClientSettings::new("", Token::new("")),
        defaults: DefaultCredentials {
            url: Some(sim.base_url()),
            token: Some(Token::new(SimConfig::default().staff_token)),
            // The sandbox is a single-user playground: every namespace may use them.
            scope: DefaultScope::all(),
        },
        limits: Limits::default(),
        waldur_max_in_flight_per_url: None,
        allowed_waldur_hosts: Default::default(),
        namespace: String::new(),
        settings: Settings {
            resync_period: Duration::from_secs(60),
            pull_interval: None,
            ..Settings::default()
        },
        concurrency: 16,
        read_path: ReadPath::Batched,
        busy_sweep: Duration::from_secs(1),
        metrics_addr: args.metrics_listen,
        admin_addr: None,
        lease: None,
        claims_namespace: "default".into(),
        shard: waldur_operator::sharding::Shard::ALL,
        kube_budget: None,
    };
    print_welcome(&args, &sim);
    let _ = logs;
    operator::run(options, kube, None, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    println!("\nstopping: operator stopped; shutting down the simulator and the test server");
    sim.shutdown();
    kube_server.shutdown();
    let _ = std::fs::remove_file(&args.kubeconfig);
    Ok(())
}

fn print_welcome(args: &Args, sim: &Simulator) {
    let k = format!("kubectl --kubeconfig {}", args.kubeconfig.display());
    // `$PWD/` only in front of a relative path: an absolute one is printed as it is.
    let export = if args.kubeconfig.is_absolute() {
        args.kubeconfig.display().to_string()
    } else {
        format!("$PWD/{}", args.kubeconfig.display())
    };
    println!(
        r#"
waldur-operator sandbox is running
  Kubernetes API test server  http://{kube}   (a test server, not a cluster)
  Waldur simulator            {waldur}   (tokens: staff-token, user-token)
  operator metrics            http://{metrics}/metrics
  kubeconfig                  {kubeconfig}

Try it (in another terminal, from the repository root):
  export KUBECONFIG={export}
  kubectl apply -f examples/servergroup.yaml
  kubectl get wsg -n team-a -w
  kubectl wait -n team-a --for=condition=Ready servergroup/web --timeout=60s
  kubectl get wsg -n team-a web -o yaml
  kubectl apply -f examples/credentials.yaml     # per-namespace credentials (Secret + ServerGroup)
  kubectl delete -n team-a servergroup/web        # deletes the group in Waldur, then the resource
  curl -s {waldur}/__sim/groups                  # what Waldur holds

Or without exporting: {k} get wsg -A
Ctrl-C stops everything.
"#,
        kube = args.kube_listen,
        waldur = sim.base_url(),
        metrics = args.metrics_listen,
        kubeconfig = args.kubeconfig.display(),
    );
}
