//! The waldur-operator command line: `run` (the default) and `crd`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::Client;
use std::net::SocketAddr;

use waldur_operator::api;
use waldur_operator::controller::credentials::AllowedHosts;
use waldur_operator::controller::index::ReadPath;
use waldur_operator::controller::{DefaultCredentials, DefaultScope, Settings, plan};
use waldur_operator::leader::LeaseSettings;
use waldur_operator::operator::{self, Options};
use waldur_operator::sharding::Shard;
use waldur_operator::telemetry;
use waldur_operator::waldur::{ClientSettings, Limits, Token};

#[cfg(all(feature = "jemalloc", not(feature = "dhat-heap")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at start (`_RJEM_MALLOC_CONF` in the environment overrides them).
/// One arena instead of four per core: the operator allocates from a few threads, and each
/// arena keeps pages of its own. Freed pages go back to the system after a second rather than
/// ten. Measured at 10,000 resources on the final build: peak RSS 69.8 MiB with jemalloc's
/// defaults (`_RJEM_MALLOC_CONF=narenas:8,dirty_decay_ms:10000`), 63.3 with these.
#[cfg(all(feature = "jemalloc", not(feature = "dhat-heap")))]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8; 47] = b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[cfg(feature = "dhat-heap")]
#[global_allocator]
static GLOBAL: dhat::Alloc = dhat::Alloc;

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
    /// Namespaces whose ServerGroups may use the default credentials (WALDUR_URL and the
    /// default token) by leaving out spec.credentialsRef: a comma-separated list of names or
    /// prefixes ending in * (`team-a,ci-*`), or * for all. Unset: the watched namespace when
    /// WATCH_NAMESPACE is set, else none.
    #[arg(long, env = "DEFAULT_CREDENTIALS_NAMESPACES", value_parser = DefaultScope::parse)]
    default_credentials_namespaces: Option<DefaultScope>,
    /// How often a settled group is re-read from Waldur, unless its spec.resyncPeriod says
    /// otherwise. At least 30s.
    #[arg(long, env = "RESYNC_PERIOD", default_value = "10m", value_parser = resync_period)]
    resync_period: Duration,
    /// When a group vanishes from Waldur while OpenStack may still hold it (an unlink), a new
    /// group is made only on evidence that it will not come back: a tenant re-sync the
    /// operator asked for ran and did not bring it back. Without such evidence (automatic
    /// tenant re-syncs off, refused, or the tenant unreadable) it waits this long, longer than
    /// Waldur's own 2-hourly re-sync. The request-recreate annotation skips the wait.
    #[arg(long, env = "REIMPORT_WAIT", default_value = "3h", value_parser = duration)]
    reimport_wait: Duration,
    /// Whether the operator asks Waldur to re-sync a tenant's server groups by itself (after
    /// an unlink, and before deleting an ERRED group). Each re-sync holds the whole tenant
    /// while it runs, and one that fails in OpenStack leaves the tenant Erred for every user
    /// until staff repair it; with false, only Waldur's periodic re-sync is waited for.
    #[arg(long, env = "TENANT_PULLS", default_value_t = true, action = clap::ArgAction::Set)]
    tenant_pulls: bool,
    /// The least time between two tenant re-syncs the operator asks for in one tenant.
    #[arg(long, env = "TENANT_PULL_FLOOR", default_value = "5m", value_parser = duration)]
    tenant_pull_floor: Duration,
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
    /// Requests to the Kubernetes API server per second, sustained, as client-go's QPS (0: no
    /// budget). Every write and read of the reconcilers takes a token; leader election does
    /// not. The default lets 1,000 new ServerGroups (about 5 writes each) settle in under a
    /// minute while leaving a shared API server room.
    #[arg(long, env = "KUBE_QPS", default_value_t = 100.0)]
    kube_qps: f64,
    /// Requests to the Kubernetes API server allowed at once above --kube-qps, as client-go's
    /// Burst.
    #[arg(long, env = "KUBE_BURST", default_value_t = 200)]
    kube_burst: u32,
    /// How reconciles read Waldur: one list sweep per credentials into an index (batched), or
    /// one GET per resource (per-object, for comparison).
    #[arg(long, env = "READ_PATH", value_enum, default_value_t = ReadPathArg::Batched)]
    read_path: ReadPathArg,
    /// How often the batched read path sweeps while any group is changing. At least 100ms:
    /// the pace also sets the back-off while Waldur fails, which at 0s would be a hot loop.
    #[arg(long, env = "BUSY_SWEEP", default_value = "1s", value_parser = busy_sweep)]
    busy_sweep: Duration,
    /// Requests in flight at once to any one Waldur other than --waldur-url (a Secret's
    /// `url`), within --waldur-max-in-flight. Unset: a quarter of --waldur-max-in-flight (4
    /// of 16), which keeps up with the default rate while requests take up to 200ms. So a
    /// slow or hostile address holds at most that share; the default Waldur is not capped.
    #[arg(long, env = "WALDUR_MAX_IN_FLIGHT_PER_URL", value_parser = clap::value_parser!(u64).range(1..))]
    waldur_max_in_flight_per_url: Option<u64>,
    /// Hosts a credentialsRef Secret's `url` may name: a comma-separated list of host names
    /// and patterns such as *.example.com (names under example.com). Empty: any host, as in
    /// earlier versions. --waldur-url's host is always allowed. A `url` holding a user name,
    /// password, query or fragment is refused whatever this says.
    #[arg(long, env = "ALLOWED_WALDUR_HOSTS", default_value = "", value_parser = AllowedHosts::parse)]
    allowed_waldur_hosts: AllowedHosts,
    /// Address of /metrics, /healthz and /readyz. `[::]` listens on IPv6 and IPv4 (falling back
    /// to 0.0.0.0 where IPv6 is disabled).
    #[arg(long, env = "METRICS_ADDR", default_value = "[::]:8080")]
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
    /// The operator's own namespace, where it keeps one Lease per Waldur group it binds by
    /// import (a claim, so two resources never bind one group); defaults to POD_NAMESPACE,
    /// else "default".
    #[arg(long, env = "CLAIMS_NAMESPACE")]
    claims_namespace: Option<String>,
    /// This process's shard, from 0, when the resources are split over --total-shards
    /// processes by their uid. A StatefulSet's pod name (`name-2`) may be given as is.
    #[arg(long, env = "SHARD_INDEX", default_value = "0", value_parser = shard_index)]
    shard_index: u32,
    /// How many processes split the resources between them. Above 1, each shard elects its
    /// own leader (implies --leader-elect, with a Lease named `<lease-name>-<i>-of-<n>`), and
    /// a shard reconciles only while every running shard agrees on this number.
    #[arg(long, env = "TOTAL_SHARDS", default_value_t = 1)]
    total_shards: u32,
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

/// A shard index, or a pod name that ends in one (a StatefulSet's ordinal).
fn shard_index(s: &str) -> Result<u32, String> {
    let digits = s.rsplit('-').next().unwrap_or(s);
    digits.parse().map_err(|_| {
        format!("{s:?} is not a shard index such as 2 (or a pod name such as waldur-operator-2)")
    })
}

fn busy_sweep(s: &str) -> Result<Duration, String> {
    let pace = duration(s)?;
    if pace < Duration::from_millis(100) {
        return Err(format!(
            "{s:?} is shorter than 100ms: while Waldur fails the sweep backs off from this pace"
        ));
    }
    Ok(pace)
}

fn resync_period(s: &str) -> Result<Duration, String> {
    let period = duration(s)?;
    if period < api::MIN_RESYNC_PERIOD {
        return Err(format!(
            "{s:?} is shorter than {}s: each resync reads every group from Waldur",
            api::MIN_RESYNC_PERIOD.as_secs()
        ));
    }
    Ok(period)
}

#[tokio::main]
async fn main() -> ExitCode {
    // Written to dhat-heap.json when main returns (after SIGTERM), not on SIGKILL.
    #[cfg(feature = "dhat-heap")]
    let _profiler = dhat::Profiler::new_heap();
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
        Some(Command::Run(args)) => run_on_workers(*args).await,
        None => run_on_workers(cli.run).await,
    }
}

/// Runs the operator as a task of the runtime, not in `main`'s own future: tokio polls that
/// future on the main thread, outside the worker pool, so the controller's watch streams and
/// scheduler would make a third busy thread, woken through a futex for every event, beside
/// the workers that run the reconciles.
async fn run_on_workers(args: RunArgs) -> ExitCode {
    match tokio::spawn(run(args)).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: the operator stopped: {e}");
            ExitCode::FAILURE
        }
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
    let options = options(&args)?;
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| format!("cannot reach Kubernetes (kubeconfig or in-cluster config): {e}"))?;
    // kube sends no User-Agent: the API server would then name this process "unknown" as the
    // manager of the finalizer and annotations it writes, and in audit logs.
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("waldur-operator/", env!("CARGO_PKG_VERSION"))),
    ));
    let kube = Client::try_from(config)
        .map_err(|e| format!("cannot reach Kubernetes (kubeconfig or in-cluster config): {e}"))?;
    operator::run(options, kube, Some(logs), shutdown_signal()).await
}

/// The command line as the library's options: every flag reaches the operator through here.
fn options(args: &RunArgs) -> Result<Options, String> {
    let token = match &args.waldur_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --waldur-token-file {}: {e}", path.display()))?,
        ),
        None => std::env::var("WALDUR_TOKEN").ok(),
    }
    .map(|t| Token::new(t.trim()))
    .filter(|t| !t.is_empty());
    let mut waldur = ClientSettings::new("", Token::new(""));
    waldur.timeout = args.waldur_timeout;
    waldur.insecure_skip_tls_verify = args.waldur_insecure_skip_tls_verify;
    if let Some(path) = &args.waldur_ca_file {
        waldur.ca_bundle_pem = Some(
            std::fs::read(path)
                .map_err(|e| format!("cannot read --waldur-ca-file {}: {e}", path.display()))?,
        );
    }
    let own_namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let shard = Shard::new(args.shard_index, args.total_shards)?;
    let lease = (args.leader_elect || shard.is_sharded()).then(|| LeaseSettings {
        name: args.lease_name.clone(),
        namespace: args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| own_namespace.clone()),
        identity: std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("waldur-operator-{:08x}", rand::random::<u32>())),
        duration: args.lease_duration,
        grace: args.lease_grace,
        shard,
    });
    if let Some(lease) = &lease {
        lease.check()?;
    }
    Ok(Options {
        waldur,
        defaults: DefaultCredentials {
            url: args.waldur_url.clone().filter(|u| !u.trim().is_empty()),
            token,
            scope: match &args.default_credentials_namespaces {
                Some(scope) => scope.clone(),
                None => DefaultScope::parse(&args.namespace)?,
            },
        },
        limits: Limits {
            max_in_flight: args.waldur_max_in_flight,
            rate_per_second: args.waldur_rate,
        },
        waldur_max_in_flight_per_url: args
            .waldur_max_in_flight_per_url
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        allowed_waldur_hosts: args.allowed_waldur_hosts.clone(),
        namespace: args.namespace.clone(),
        settings: Settings {
            resync_period: args.resync_period,
            pull_interval: args.pull_interval,
            reimport_wait: args.reimport_wait,
            tenant_pulls: args.tenant_pulls,
            tenant_pull_floor: args.tenant_pull_floor,
        },
        concurrency: args.concurrency,
        read_path: match args.read_path {
            ReadPathArg::Batched => ReadPath::Batched,
            ReadPathArg::PerObject => ReadPath::PerObject,
        },
        busy_sweep: args.busy_sweep,
        metrics_addr: args.metrics_addr,
        admin_addr: Some(args.admin_addr),
        lease,
        claims_namespace: args.claims_namespace.clone().unwrap_or(own_namespace),
        shard,
        kube_budget: waldur_operator::kube_budget::KubeBudget::new(args.kube_qps, args.kube_burst)
            .map(std::sync::Arc::new),
    })
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
