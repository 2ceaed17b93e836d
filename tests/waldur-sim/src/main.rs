//! `waldur-sim`: run the Waldur server-group simulator as a local HTTP server.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use waldur_sim::{
    CONTROL_HELP, DEFAULT_TENANT, DefaultOrder, Delays, SimConfig, Simulator, Vocabulary,
    WaldurVersion,
};

/// A stateful simulator of the Waldur OpenStack server-group API (tests and local runs).
///
/// It behaves like a real Waldur: 201 from POST /api/openstack-tenants/{uuid}/create_server_group/,
/// 500 from POST /api/openstack-server-groups/, 202 on DELETE, 409 in transitional states,
/// asynchronous state transitions, pagination clamped at 300, sparse fields, the periodic tenant
/// re-sync, and staff vs. non-staff tokens. Faults and counters are driven over /__sim/.
///
/// Like a real server, the list without o= is ordered by tenant name only: rows of one tenant
/// come in a new order on every request, so paging without o= can repeat or skip rows.
#[derive(Debug, Parser)]
#[command(name = "waldur-sim", version, after_help = CONTROL_HELP)]
struct Cli {
    /// Address to listen on (port 0 picks a free port).
    #[arg(
        long,
        value_name = "ADDR",
        env = "WALDUR_SIM_LISTEN",
        default_value = "127.0.0.1:8090"
    )]
    listen: SocketAddr,

    /// Token of the ordinary (non-staff) user; sees only --user-tenant tenants (all by default).
    #[arg(long, env = "WALDUR_SIM_TOKEN", default_value = "user-token")]
    token: String,

    /// Token of the staff user: sees everything and may unlink / set_ok / set_erred.
    #[arg(long, env = "WALDUR_SIM_STAFF_TOKEN", default_value = "staff-token")]
    staff_token: String,

    /// OpenStack tenant UUID that exists at start, in state OK (repeatable; comma-separated in the env var).
    #[arg(long = "tenant", value_name = "UUID", env = "WALDUR_SIM_TENANTS", value_delimiter = ',', default_value = DEFAULT_TENANT, value_parser = parse_uuid)]
    tenants: Vec<String>,

    /// Tenant the ordinary user may see (repeatable); none given = every tenant.
    #[arg(long = "user-tenant", value_name = "UUID", env = "WALDUR_SIM_USER_TENANTS", value_delimiter = ',', value_parser = parse_uuid)]
    user_tenants: Vec<String>,

    /// Send the old state labels ("Creation Scheduled", "Erred", ...) instead of CREATION_SCHEDULED, ERRED, ...
    #[arg(long, env = "WALDUR_SIM_LEGACY_STATES")]
    legacy_states: bool,

    /// Behave like a server before 8.0.4: only the "affinity" policy is accepted.
    #[arg(long, env = "WALDUR_SIM_AFFINITY_ONLY")]
    affinity_only: bool,

    /// Behave like a server before 8.0.0: set_ok and set_erred do not exist (HTML 404).
    #[arg(long, env = "WALDUR_SIM_PRE_8_0_0")]
    pre_8_0_0: bool,

    /// Waldur release to copy: "current" (8.0.x and later) or "7.0" (old state labels, affinity
    /// only, no set_ok/set_erred, description up to 2000 characters, PUT/PATCH answer 500 HTML).
    #[arg(
        long,
        value_name = "VERSION",
        env = "WALDUR_SIM_VERSION",
        default_value = "current"
    )]
    waldur_version: WaldurVersion,

    /// Order of the list without o=: "shuffled" (real servers: by tenant name only, a new order
    /// per request) or "created" (oldest first, stable; kinder than any real server).
    #[arg(long, value_name = "ORDER", env = "WALDUR_SIM_DEFAULT_ORDER", default_value = "shuffled", value_parser = ["shuffled", "created"])]
    default_order: String,

    /// Seed of the per-request shuffles of --default-order shuffled (same seed, same orders).
    #[arg(
        long,
        value_name = "N",
        env = "WALDUR_SIM_ORDER_SEED",
        default_value_t = 0
    )]
    order_seed: u64,

    /// Milliseconds an operation stays in *_SCHEDULED before the worker starts.
    #[arg(long, env = "WALDUR_SIM_SCHEDULE_DELAY_MS", default_value_t = 2000)]
    schedule_delay_ms: u64,

    /// Milliseconds an operation stays in CREATING / UPDATING / DELETING.
    #[arg(long, env = "WALDUR_SIM_RUN_DELAY_MS", default_value_t = 2000)]
    run_delay_ms: u64,

    /// Seconds between Waldur's own tenant re-syncs (real servers: 7200); 0 = only via POST /__sim/resync.
    #[arg(long, env = "WALDUR_SIM_RESYNC_INTERVAL_SECS", default_value_t = 0)]
    resync_interval_secs: u64,

    /// Latency added to every /api request, in milliseconds.
    #[arg(long, env = "WALDUR_SIM_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
}

fn parse_uuid(s: &str) -> Result<String, String> {
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    if hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(format!("{s:?} is not a UUID"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let config = SimConfig {
        vocabulary: if cli.legacy_states {
            Vocabulary::Legacy
        } else {
            Vocabulary::Modern
        },
        affinity_only: cli.affinity_only,
        pre_8_0_0: cli.pre_8_0_0,
        version: cli.waldur_version,
        default_order: if cli.default_order == "created" {
            DefaultOrder::Created
        } else {
            DefaultOrder::Shuffled {
                seed: cli.order_seed,
            }
        },
        delays: Delays {
            schedule: Duration::from_millis(cli.schedule_delay_ms),
            run: Duration::from_millis(cli.run_delay_ms),
        },
        staff_token: cli.staff_token.clone(),
        staff_token_aliases: Vec::new(),
        user_token: cli.token.clone(),
        tenants: cli.tenants.clone(),
        user_tenants: cli.user_tenants.clone(),
        resync_interval: (cli.resync_interval_secs > 0)
            .then(|| Duration::from_secs(cli.resync_interval_secs)),
    };
    let sim = Simulator::start_on(config, cli.listen).await?;
    if cli.latency_ms > 0 {
        sim.set_latency(Duration::from_millis(cli.latency_ms));
    }
    print_usage(&sim.base_url(), &cli);

    tokio::signal::ctrl_c().await?;
    sim.shutdown();
    Ok(())
}

fn print_usage(base: &str, cli: &Cli) {
    let token = &cli.token;
    let tenant = cli.tenants.first().map_or(DEFAULT_TENANT, String::as_str);
    let api = format!("{base}/api/openstack-server-groups");
    println!(
        "\
Waldur simulator listening on {base}
  user token:  {token}
  staff token: {staff}
  tenants:     {tenants}

Try it:
  # create (201, state CREATION_SCHEDULED; OK about {secs:.1}s later)
  curl -sS -X POST -H 'Authorization: Token {token}' -H 'Content-Type: application/json' \\
       -d '{{\"name\":\"web\",\"policy\":\"anti-affinity\"}}' \\
       {base}/api/openstack-tenants/{tenant}/create_server_group/
  # list (bare array; X-Result-Count and Link headers; name an order with o= when paging)
  curl -sS -i -H 'Authorization: Token {token}' '{api}/?tenant_uuid={tenant}&o=created&page_size=300'
  # get one
  curl -sS -H 'Authorization: Token {token}' {api}/UUID/
  # delete (202, then DELETION_SCHEDULED -> DELETING -> 404)
  curl -sS -X DELETE -H 'Authorization: Token {token}' {api}/UUID/
  # request counters
  curl -sS {base}/__sim/stats

{CONTROL_HELP}",
        staff = cli.staff_token,
        tenants = cli.tenants.join(", "),
        secs = (cli.schedule_delay_ms + cli.run_delay_ms) as f64 / 1000.0,
    );
}
