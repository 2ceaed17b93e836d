//! The waldur-operator command line: `run` (the default) and `crd`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::{Api, Client};
use std::net::SocketAddr;
use std::sync::Arc;

use waldur_operator::api::{self, ServerGroup};
use waldur_operator::controller::index::ReadPath;
use waldur_operator::controller::{self, ClientCache, DefaultCredentials, Settings, plan};
use waldur_operator::leader::{self, LeaseSettings};
use waldur_operator::metrics::Metrics;
use waldur_operator::server::{self, Health};
use waldur_operator::telemetry;
use waldur_operator::waldur::{ClientSettings, Limiter, Limits, Token};

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    name = "waldur-operator",
    version,
    about = "Makes Waldur OpenStack server groups declarative: reconciles ServerGroup resources with Waldur."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller (the default when no command is given).
    Run(Box<RunArgs>),
    /// Print the ServerGroup CustomResourceDefinition as YAML, for `kubectl apply -f -`.
    Crd,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Waldur's address, for example https://waldur.example.com. Used by resources without a
    /// credentialsRef, and by those whose Secret has no `url` key.
    #[arg(long, env = "WALDUR_URL")]
    waldur_url: Option<String>,
    /// A file holding the default Waldur API token. The token may also come from the
    /// WALDUR_TOKEN environment variable (never from a flag, which `ps` would show).
    #[arg(long, env = "WALDUR_TOKEN_FILE")]
    waldur_token_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for Waldur, besides the system's.
    #[arg(long, env = "WALDUR_CA_FILE")]
    waldur_ca_file: Option<PathBuf>,
    /// Do not verify Waldur's TLS certificate. Dangerous: for tests only.
    #[arg(long, env = "WALDUR_INSECURE_SKIP_TLS_VERIFY")]
    waldur_insecure_skip_tls_verify: bool,
    /// Timeout of one Waldur request, such as 30s.
    #[arg(long, env = "WALDUR_TIMEOUT", default_value = "30s", value_parser = duration)]
    waldur_timeout: Duration,
    /// Watch only this namespace; all namespaces when empty.
    #[arg(long, env = "WATCH_NAMESPACE", default_value = "")]
    namespace: String,
    /// How often a settled group is re-read from Waldur, unless its spec.resyncPeriod says otherwise.
    #[arg(long, env = "RESYNC_PERIOD", default_value = "10m", value_parser = duration)]
    resync_period: Duration,
    /// Ask Waldur to pull settled groups from OpenStack this often, such as 1h. Off by default:
    /// Waldur re-syncs every 2 hours by itself.
    #[arg(long, env = "PULL_INTERVAL", value_parser = duration)]
    pull_interval: Option<Duration>,
    /// How many resources are reconciled at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Log filter: a level (error, warn, info, debug, trace) or a tracing directive list.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Requests to Waldur in flight at once, across all resources and credentials.
    #[arg(long, env = "WALDUR_MAX_IN_FLIGHT", default_value_t = 16)]
    waldur_max_in_flight: usize,
    /// Requests to Waldur per second, sustained (0: no rate limit). A 429 pauses all requests
    /// for its Retry-After.
    #[arg(long, env = "WALDUR_RATE", default_value_t = 20.0)]
    waldur_rate: f64,
    /// How reconciles read Waldur: one list sweep per credentials into an index (batched), or
    /// one GET per resource (per-object, for comparison).
    #[arg(long, env = "READ_PATH", value_enum, default_value_t = ReadPathArg::Batched)]
    read_path: ReadPathArg,
    /// How often the batched read path sweeps while any group is changing.
    #[arg(long, env = "BUSY_SWEEP", default_value = "1s", value_parser = duration)]
    busy_sweep: Duration,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Address of /debug/loglevel (GET shows, PUT changes the log filter). Loopback by default:
    /// reach it with `kubectl port-forward`.
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:8081")]
    admin_addr: SocketAddr,
    /// Elect a leader through a coordination.k8s.io Lease; only the leader reconciles.
    #[arg(long, env = "LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "waldur-operator")]
    lease_name: String,
    /// Namespace of the Lease; defaults to POD_NAMESPACE, else "default".
    #[arg(long, env = "LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// How long a lease stays valid without renewal.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = duration)]
    lease_duration: Duration,
    /// How long before expiry the holder renews.
    #[arg(long, env = "LEASE_GRACE", default_value = "5s", value_parser = duration)]
    lease_grace: Duration,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ReadPathArg {
    Batched,
    PerObject,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn duration(s: &str) -> Result<Duration, String> {
    plan::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration such as 500ms, 30s, 10m or 1h"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd) => match api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Run(args)) => run(*args).await,
        None => run(cli.run).await,
    }
}

async fn run(args: RunArgs) -> ExitCode {
    let format = match args.log_format {
        LogFormat::Json => telemetry::LogFormat::Json,
        LogFormat::Text => telemetry::LogFormat::Text,
    };
    let logs = match telemetry::init(&args.log_level, format) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match start(args, logs).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn start(args: RunArgs, logs: telemetry::LogControl) -> Result<(), String> {
    let metrics = Metrics::new();
    let limiter = Arc::new(Limiter::new(Limits {
        max_in_flight: args.waldur_max_in_flight,
        rate_per_second: args.waldur_rate,
    }));
    let credentials = Arc::new(
        client_cache(&args)?
            .with_limiter(limiter)
            .with_observer(Arc::new(metrics.clone())),
    );
    let kube = Client::try_default()
        .await
        .map_err(|e| format!("cannot reach Kubernetes (kubeconfig or in-cluster config): {e}"))?;
    let (api, secrets): (Api<ServerGroup>, Api<PartialObjectMeta<Secret>>) =
        if args.namespace.is_empty() {
            (Api::all(kube.clone()), Api::all(kube.clone()))
        } else {
            (
                Api::namespaced(kube.clone(), &args.namespace),
                Api::namespaced(kube.clone(), &args.namespace),
            )
        };
    check_crd(&api).await?;
    let health = Arc::new(Health::new(args.leader_elect));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| format!("cannot listen on --metrics-addr {}: {e}", args.metrics_addr))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admin = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .map_err(|e| format!("cannot listen on --admin-addr {}: {e}", args.admin_addr))?;
    let server = tokio::spawn(server::serve(
        listener,
        server::router(metrics.clone(), health.clone()),
        leader::stopped(stop_rx.clone()),
    ));
    tokio::spawn(server::serve(
        admin,
        server::admin_router(logs),
        leader::stopped(stop_rx.clone()),
    ));
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let runtime = || controller::Runtime {
        kube: kube.clone(),
        api: api.clone(),
        secrets: secrets.clone(),
        settings: Settings {
            resync_period: args.resync_period,
            pull_interval: args.pull_interval,
        },
        credentials: credentials.clone(),
        concurrency: args.concurrency,
        read_path: match args.read_path {
            ReadPathArg::Batched => ReadPath::Batched,
            ReadPathArg::PerObject => ReadPath::PerObject,
        },
        busy_sweep: args.busy_sweep,
        metrics: metrics.clone(),
        health: health.clone(),
    };
    tracing::info!(
        namespace = if args.namespace.is_empty() { "(all)" } else { &args.namespace },
        resync = ?args.resync_period,
        concurrency = args.concurrency,
        leader_elect = args.leader_elect,
        "waldur-operator {} starting",
        env!("CARGO_PKG_VERSION")
    );
    if args.leader_elect {
        let lease = LeaseSettings {
            name: args.lease_name.clone(),
            namespace: args
                .lease_namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".into()),
            identity: std::env::var("POD_NAME")
                .unwrap_or_else(|_| format!("waldur-operator-{:08x}", rand::random::<u32>())),
            duration: args.lease_duration,
            grace: args.lease_grace,
        };
        leader::run_when_leading(&kube, &lease, &health, &metrics, stop_rx.clone(), runtime)
            .await?;
    } else {
        health
            .leader
            .store(true, std::sync::atomic::Ordering::SeqCst);
        metrics.leader.set(1);
        controller::run(runtime(), leader::stopped(stop_rx.clone())).await;
    }
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}

fn client_cache(args: &RunArgs) -> Result<ClientCache, String> {
    let token = match &args.waldur_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --waldur-token-file {}: {e}", path.display()))?,
        ),
        None => std::env::var("WALDUR_TOKEN").ok(),
    }
    .map(Token::new)
    .filter(|t| !t.is_empty());
    let mut template =
        ClientSettings::new(args.waldur_url.clone().unwrap_or_default(), Token::new(""));
    template.timeout = args.waldur_timeout;
    template.insecure_skip_tls_verify = args.waldur_insecure_skip_tls_verify;
    if args.waldur_insecure_skip_tls_verify {
        tracing::warn!(
            "TLS verification of Waldur is OFF (--waldur-insecure-skip-tls-verify): anyone on the path can read the token"
        );
    }
    if let Some(path) = &args.waldur_ca_file {
        template.ca_bundle_pem = Some(
            std::fs::read(path)
                .map_err(|e| format!("cannot read --waldur-ca-file {}: {e}", path.display()))?,
        );
    }
    let defaults = DefaultCredentials {
        url: args.waldur_url.clone().filter(|u| !u.trim().is_empty()),
        token,
    };
    if defaults.url.is_none() || defaults.token.is_none() {
        tracing::warn!(
            "no default Waldur URL or token: only resources with a credentialsRef can be reconciled"
        );
    }
    let cache = ClientCache::new(template, defaults.clone());
    // Bad settings (a malformed URL or CA bundle) stop the start, not the first reconcile.
    if let (Some(url), Some(token)) = (&defaults.url, &defaults.token) {
        cache.client(url, token).map_err(|e| e.to_string())?;
    }
    Ok(cache)
}

async fn check_crd(api: &Api<ServerGroup>) -> Result<(), String> {
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(
            "the ServerGroup CRD is not installed in this cluster. Install it with \
             `kubectl apply -f crds/` (or `waldur-operator crd | kubectl apply -f -`) and start again"
                .into(),
        ),
        Err(e) => Err(format!("cannot list ServerGroups: {e}")),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
