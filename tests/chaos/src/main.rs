//! `waldur-chaos`: a seeded, randomized fault campaign against the waldur-operator binary.
//!
//! One seed draws a plan of N points (user actions on ServerGroups, operator kills, Waldur
//! faults, Kubernetes faults), which run against the Kubernetes API test server and the Waldur
//! simulator in this process while the operator runs as a child process. Then every fault is
//! switched off, the operator settles, and seven invariants are checked against the
//! simulator's truth. A violation prints the seed, the invariant, and the trace of points that
//! replays it (`--seed S --points N` again), and exits 1.

mod campaign;
mod check;
mod operator;
mod plan;
mod record;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "waldur-chaos",
    about = "Seeded randomized fault campaign: the operator binary against the Kubernetes API test server and the Waldur simulator, then invariants"
)]
struct Args {
    /// The seed: the same seed draws the same plan.
    #[arg(long)]
    seed: u64,
    /// How many points (user actions and faults) the plan has.
    #[arg(long, default_value_t = 60)]
    points: usize,
    /// The operator binary (`cargo build` first).
    #[arg(long, default_value = "target/debug/waldur-operator")]
    operator: PathBuf,
    /// At most this many ServerGroups live at once.
    #[arg(long, default_value_t = 12)]
    resources: usize,
    /// The longest wait for the operator to settle at the end, in seconds.
    #[arg(long, default_value_t = 75)]
    settle_secs: u64,
    /// Stop settling once the same violations have stood this many seconds (longer than the
    /// operator's 30 s resync period, so every periodic retry had its chance).
    #[arg(long, default_value_t = 40)]
    stuck_secs: u64,
    /// The operator's READ_PATH: batched or per-object.
    #[arg(long, default_value = "batched")]
    read_path: String,
    /// The operator's LOG_LEVEL.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// The operator's WALDUR_TIMEOUT in ms; the timeout fault waits longer than this.
    #[arg(long, default_value_t = 2000)]
    waldur_timeout_ms: u64,
    /// An extra environment variable for the operator, `KEY=VALUE` (repeatable), after the
    /// campaign's own: for instance `REIMPORT_WAIT=3s` to scale an older operator's wait.
    #[arg(long = "operator-env", value_parser = key_value)]
    operator_env: Vec<(String, String)>,
    /// Operator processes: 1, or 2 electing a leader (kills and SIGTERMs hit the first; the
    /// second takes over). The plan is the same either way.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    replicas: u8,
    /// Shards to start with (`TOTAL_SHARDS`, one process each, leader election on); above 1,
    /// about one point in ten rolls out another number of shards (1 to 4) while the old ones
    /// still run. Kills and SIGTERMs hit shard 0.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4), conflicts_with = "replicas")]
    shards: u8,
    /// Leave out the Waldur re-sync before the settle.
    #[arg(long)]
    no_final_resync: bool,
    /// Where operator logs, the trace and the report go (default: a new directory under the
    /// system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print the plan and exit without running it.
    #[arg(long)]
    dry_run: bool,
    /// Print the trace even when every invariant holds.
    #[arg(long)]
    trace: bool,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let plan = plan::draw_with(args.seed, args.points, args.resources, args.shards > 1);
    if args.dry_run {
        println!("plan of seed {}: {} points", plan.seed, plan.points.len());
        for p in &plan.points {
            println!(
                "#{:03} +{:3} ms {:<14} {}",
                p.index,
                p.wait_ms,
                p.action.category().as_str(),
                p.action
            );
        }
        return ExitCode::SUCCESS;
    }
    if !args.operator.exists() {
        eprintln!(
            "no operator binary at {}: run `cargo build` first",
            args.operator.display()
        );
        return ExitCode::from(2);
    }
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "waldur-chaos-seed{}-{}",
            args.seed,
            std::process::id()
        ))
    });
    let settings = campaign::Settings {
        seed: args.seed,
        operator: args.operator.clone(),
        dir: dir.clone(),
        settle: Duration::from_secs(args.settle_secs),
        stuck: Duration::from_secs(args.stuck_secs),
        read_path: args.read_path.clone(),
        log_level: args.log_level.clone(),
        waldur_timeout: Duration::from_millis(args.waldur_timeout_ms),
        final_resync: !args.no_final_resync,
        operator_env: args.operator_env.clone(),
        replicas: usize::from(args.replicas),
        shards: usize::from(args.shards),
    };
    let started = Instant::now();
    println!(
        "waldur-chaos: seed {} points {} resources {} read path {} (logs in {})",
        args.seed,
        args.points,
        args.resources,
        args.read_path,
        dir.display()
    );
    let campaign = match campaign::Campaign::start(settings).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start the campaign: {e}");
            return ExitCode::from(2);
        }
    };
    let report = campaign.run(&plan).await;
    let total = started.elapsed();

    let mut out = Vec::new();
    for o in &report.outcomes {
        out.push(format!(
            "invariant {:<32} checked {:>3} {:<20} violations {}",
            o.name,
            o.checked,
            o.unit,
            o.violations.len()
        ));
    }
    let mut by_kind: BTreeMap<(plan::Category, &str), usize> = BTreeMap::new();
    for p in &plan.points {
        *by_kind
            .entry((p.action.category(), p.action.kind()))
            .or_default() += 1;
    }
    let mut by_category: BTreeMap<plan::Category, usize> = BTreeMap::new();
    for ((c, _), n) in &by_kind {
        *by_category.entry(*c).or_default() += n;
    }
    out.push(format!(
        "points: {} ({})",
        plan.points.len(),
        by_category
            .iter()
            .map(|(c, n)| format!("{} {n}", c.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out.push(format!(
        "  resources created: {}; by kind: {}",
        plan.points
            .iter()
            .map(|p| p.action.creates().len())
            .sum::<usize>(),
        by_kind
            .iter()
            .map(|((_, k), n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out.push(format!(
        "time: total {:.1} s (points {:.1} s, settle {:.1} s{}), operator runs {}",
        total.as_secs_f64(),
        report.points_time.as_secs_f64(),
        report.settle_time.as_secs_f64(),
        if report.settled {
            ""
        } else {
            ", did not settle"
        },
        report.runs.len()
    ));
    let failed = report.outcomes.iter().any(|o| !o.violations.is_empty());
    let mut details = Vec::new();
    if failed {
        details.push(format!(
            "\nFAILED: seed {} (replay: waldur-chaos --seed {} --points {} --resources {}{})",
            args.seed,
            args.seed,
            args.points,
            args.resources,
            if args.read_path == "batched" {
                String::new()
            } else {
                format!(" --read-path {}", args.read_path)
            }
        ));
        for o in report.outcomes.iter().filter(|o| !o.violations.is_empty()) {
            details.push(format!("violated: {}", o.name));
            for v in &o.violations {
                details.push(format!("  - {v}"));
            }
        }
        details.push("operator runs:".into());
        for (log, ending) in &report.runs {
            details.push(format!("  {} ({ending})", log.display()));
        }
    }
    if failed || args.trace {
        details.push(format!("trace (seed {}):", args.seed));
        details.extend(report.trace.iter().cloned());
    }
    for line in out.iter().chain(details.iter()) {
        println!("{line}");
    }
    let text = out
        .iter()
        .chain(details.iter())
        .chain(std::iter::once(&"full trace:".to_string()))
        .chain(report.trace.iter())
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    if let Err(e) = std::fs::write(dir.join("report.txt"), text + "\n") {
        eprintln!("cannot write the report: {e}");
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
