//! The operator's benchmark: N ServerGroups across 10 namespaces, created against the
//! Kubernetes API test server and the Waldur simulator (both in this process), reconciled by
//! the operator binary running as a separate process. It prints one table, one row per read
//! path, and with `--check` exits non-zero when a request-count target is missed.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures::{StreamExt, TryStreamExt, stream};
use kube::api::PostParams;
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use kube_test_server::TestServer;
use serde_json::{Value, json};
use waldur_sim::{Delays, SimConfig, Simulator};

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Benchmark: time to Ready, Waldur requests per resource, Kubernetes writes per resource, operator peak RSS"
)]
struct Args {
    /// How many ServerGroups (spread over 10 namespaces).
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// Latency the simulated Waldur adds to every request, in ms.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Total create transition in the simulated Waldur (half scheduled, half creating), in ms.
    #[arg(long, default_value_t = 2_000)]
    transition_ms: u64,
    /// The operator's limit on Waldur requests in flight.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// The operator's reconcile concurrency.
    #[arg(long, default_value_t = 64)]
    concurrency: u16,
    /// The resync period given to the operator; the settled phase is measured over one period.
    #[arg(long, default_value = "30s")]
    resync: String,
    /// How many resync periods the settled phase is measured over (the result is per period).
    /// More than one evens out where the sweeps and the jittered per-object reads fall.
    #[arg(long, default_value_t = 1)]
    settled_periods: u32,
    /// Which read paths to run, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Mode::Batched, Mode::PerObject])]
    modes: Vec<Mode>,
    /// The operator binary (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/waldur-operator")]
    operator: PathBuf,
    /// Give up waiting for Ready after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Exit non-zero when a target is missed: request counts, Kubernetes writes and each
    /// process's peak RSS (see `rss_bar_mib`); not times.
    #[arg(long)]
    check: bool,
    /// Run this many operator processes, each a shard (`--shard-index i --total-shards K`)
    /// with its own leader election, Waldur budget and concurrency.
    #[arg(long, default_value_t = 1)]
    shards: u32,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Mode {
    Batched,
    PerObject,
}

impl Mode {
    fn flag(self) -> &'static str {
        match self {
            Mode::Batched => "batched",
            Mode::PerObject => "per-object",
        }
    }
}

struct Row {
    mode: Mode,
    ready_secs: f64,
    create_per_resource: f64,
    /// From all Ready until the settled window: the sweeps' busy tail after the last writes.
    tail_per_resource: f64,
    resync_per_resource: f64,
    /// ServerGroup writes and Event writes (events.k8s.io and core/v1 are one store).
    kube_writes_per_resource: f64,
    events_per_resource: f64,
    /// Each operator process's peak RSS, by shard.
    peak_rss_mib: Vec<Option<f64>>,
}

impl Row {
    /// The largest peak RSS of any process; `None` when one could not be read.
    fn max_rss(&self) -> Option<f64> {
        self.peak_rss_mib
            .iter()
            .try_fold(0.0f64, |max, rss| rss.map(|r| max.max(r)))
            .filter(|_| !self.peak_rss_mib.is_empty())
    }
}

/// Kubernetes writes per resource `--check` allows, Events included: the finalizer, three
/// status writes (created, CREATING, OK), two Events (Created, and StateChanged when the
/// group becomes OK) and the claim on the new group (a Lease) while nothing fails. The goal is
/// 4; getting there means fewer status writes on the happy path, which is not done yet.
const MAX_WRITES: f64 = 7.0;

/// The peak RSS `--check` allows a process with N resources, for release builds (the binary
/// users run): 32 MiB for the process and its caches, plus 3.2 KiB per resource (64 MiB at
/// 10,000). A debug build needs about twice as much: measure the release build.
fn rss_bar_mib(n: usize) -> f64 {
    32.0 + 3.2 * n as f64 / 1024.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if !args.operator.exists() {
        eprintln!(
            "no operator binary at {}: run `cargo build --release` first",
            args.operator.display()
        );
        std::process::exit(2);
    }
    let mut rows = Vec::new();
    for mode in args.modes.clone() {
        match run(&args, mode).await {
            Ok(row) => rows.push(row),
            Err(e) => {
                eprintln!("benchmark failed ({}): {e}", mode.flag());
                std::process::exit(1);
            }
        }
    }
    print_table(&args, &rows);
    if args.check && !targets_met(&args, &rows) {
        std::process::exit(1);
    }
}

async fn run(args: &Args, mode: Mode) -> Result<Row, String> {
    let kube_server = TestServer::start().await.map_err(|e| e.to_string())?;
    let crd = serde_json::to_value(waldur_operator::api::crd()).map_err(|e| e.to_string())?;
    kube_server.install_crd(crd)?;
    for i in 0..10 {
        kube_server.create_namespace(&format!("team-{i}"))?;
    }
    let half = Duration::from_millis(args.transition_ms / 2);
    let sim = Simulator::start(SimConfig {
        delays: Delays {
            schedule: half,
            run: half,
        },
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    sim.set_latency(Duration::from_millis(args.latency_ms));

    let dir = std::env::temp_dir().join(format!("waldur-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kube_server.kubeconfig_yaml("default"))
        .map_err(|e| e.to_string())?;
    let client = kube_server.client().await?;

    let shards = args.shards.max(1);
    let mut operators = Vec::new();
    for index in 0..shards {
        let mut cmd = tokio::process::Command::new(&args.operator);
        cmd.arg("run")
            .env("KUBECONFIG", &kubeconfig)
            .env("WALDUR_URL", sim.base_url())
            .env("WALDUR_TOKEN", SimConfig::default().staff_token)
            .env("DEFAULT_CREDENTIALS_NAMESPACES", "*")
            .env("WALDUR_MAX_IN_FLIGHT", args.in_flight.to_string())
            .env("WALDUR_RATE", "0")
            .env("CONCURRENCY", args.concurrency.to_string())
            .env("RESYNC_PERIOD", &args.resync)
            .env("READ_PATH", mode.flag())
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if shards > 1 {
            cmd.env("SHARD_INDEX", index.to_string())
                .env("TOTAL_SHARDS", shards.to_string())
                .env("POD_NAME", format!("bench-shard-{index}"));
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", args.operator.display()))?;
        let pid = child.id().ok_or("the operator exited at once")?;
        operators.push((child, pid));
    }
    let any_exit = async {
        let waits = operators
            .iter_mut()
            .map(|(child, _)| Box::pin(child.wait()));
        futures::future::select_all(waits).await.0
    };

    // Apply all resources at once, as a GitOps sync of a large repository would.
    sim.reset_counters();
    let writes_before = kube_server.writes("servergroups");
    let events_before = kube_server.writes("events");
    let claims_before = kube_server.writes("leases");
    let started = Instant::now();
    let own_cpu_before = cpu_secs(std::process::id()).unwrap_or_default();
    let watching = tokio::spawn(wait_all_ready(
        client.clone(),
        args.n,
        Duration::from_secs(args.timeout_secs),
    ));
    create_all(&client, args.n).await?;
    tokio::select! {
        done = watching => done.map_err(|e| e.to_string())??,
        status = any_exit => return Err(format!("an operator exited: {status:?}")),
    }
    let ready_secs = started.elapsed().as_secs_f64();
    // Where the 2 cores went until all were Ready: the operators' and this process's (the API
    // test server, the simulator and the benchmark itself).
    let operator_cpu: f64 = operators.iter().filter_map(|(_, pid)| cpu_secs(*pid)).sum();
    let own_cpu = cpu_secs(std::process::id()).unwrap_or_default() - own_cpu_before;
    eprintln!(
        "  {}: CPU until all Ready: operator(s) {operator_cpu:.1} s, test server + simulator + benchmark {own_cpu:.1} s, in {ready_secs:.1} s",
        mode.flag()
    );
    // Every Waldur request from the first create to the end of the settled window is counted,
    // in one of three phases: creation (until all Ready), the tail, the settled window.
    let create_requests = sim.total_requests();
    sim.reset_counters();

    // The sweeps stay at the busy pace for 10 s after the last write; the settled window
    // starts after that tail.
    let resync =
        waldur_operator::controller::plan::parse_duration(&args.resync).ok_or("bad --resync")?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let tail_requests = sim.total_requests();
    sim.reset_counters();
    let periods = args.settled_periods.max(1);
    tokio::time::sleep(resync * periods).await;
    let resync_requests = sim.total_requests() as f64 / f64::from(periods);
    // The benchmark's own writes are the N creates; the rest are the operator's, Events too.
    let events = kube_server.writes("events") - events_before;
    let claims = kube_server.writes("leases") - claims_before;
    eprintln!(
        "  {}: Events by reason: {}",
        mode.flag(),
        event_reasons(&client).await
    );
    let kube_writes =
        kube_server.writes("servergroups") - writes_before - args.n as u64 + events + claims;
    let mut peak_rss = Vec::new();
    for (mut child, pid) in operators {
        peak_rss.push(peak_rss_kib(pid).map(|kib| kib as f64 / 1024.0));
        stop(&mut child, pid).await;
    }
    kube_server.shutdown();
    sim.shutdown();
    let n = args.n as f64;
    Ok(Row {
        mode,
        ready_secs,
        create_per_resource: create_requests as f64 / n,
        tail_per_resource: tail_requests as f64 / n,
        resync_per_resource: resync_requests / n,
        kube_writes_per_resource: kube_writes as f64 / n,
        events_per_resource: events as f64 / n,
        peak_rss_mib: peak_rss,
    })
}

fn manifest(i: usize) -> Value {
    json!({
        "apiVersion": "openstack.waldur.com/v1alpha1",
        "kind": "ServerGroup",
        "metadata": {"name": format!("sg-{i:05}"), "namespace": format!("team-{}", i % 10)},
        "spec": {
            "policy": "anti-affinity",
            "tenant": waldur_sim::DEFAULT_TENANT,
            "deletionPolicy": "Delete",
        }
    })
}

async fn create_all(client: &Client, n: usize) -> Result<(), String> {
    stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move {
                let obj = manifest(i);
                let ns = obj["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string();
                let api: Api<kube::api::DynamicObject> =
                    Api::namespaced_with(client, &ns, &resource());
                let obj: kube::api::DynamicObject =
                    serde_json::from_value(obj).map_err(|e| e.to_string())?;
                api.create(&PostParams::default(), &obj)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<(), String>(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await
}

fn resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: "openstack.waldur.com".into(),
        version: "v1alpha1".into(),
        api_version: "openstack.waldur.com/v1alpha1".into(),
        kind: "ServerGroup".into(),
        plural: "servergroups".into(),
    }
}

/// Ready for the current generation, as `kubectl wait --for=condition=Ready` would judge it.
fn is_ready(obj: &kube::api::DynamicObject) -> bool {
    let generation = obj.metadata.generation;
    obj.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| {
            c["type"] == "Ready"
                && c["status"] == "True"
                && c["observedGeneration"].as_i64() == generation
        })
}

/// Follows a watch (not repeated lists, which would load the API server more than the
/// operator does) until every resource is Ready for its generation.
async fn wait_all_ready(client: Client, n: usize, timeout: Duration) -> Result<(), String> {
    use kube::runtime::watcher;
    let api: Api<kube::api::DynamicObject> = Api::all_with(client, &resource());
    let mut ready = std::collections::HashSet::new();
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_report = Instant::now();
    while ready.len() < n {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| format!("only {} of {n} Ready after {timeout:?}", ready.len()))?;
        let objects = match event {
            Some(Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o))) => vec![o],
            Some(Ok(_)) => vec![],
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the watch ended".into()),
        };
        for o in objects {
            let key = format!(
                "{}/{}",
                o.metadata.namespace.clone().unwrap_or_default(),
                o.metadata.name.clone().unwrap_or_default()
            );
            if is_ready(&o) {
                ready.insert(key);
            } else {
                ready.remove(&key);
            }
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("  ... {} of {n} Ready", ready.len());
            last_report = Instant::now();
        }
    }
    Ok(())
}

/// The operator's Events, counted by reason (and by series count when an Event repeated).
async fn event_reasons(client: &Client) -> String {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    let Ok(list) = api.list(&Default::default()).await else {
        return "unreadable".into();
    };
    let mut by_reason = std::collections::BTreeMap::<String, i64>::new();
    // The most frequent Warning, so that a failing run says why.
    let mut warnings = std::collections::HashMap::<String, i64>::new();
    for e in list.items {
        let times = e.series.map_or(1, |s| i64::from(s.count));
        *by_reason.entry(e.reason.unwrap_or_default()).or_default() += times;
        if e.type_.as_deref() == Some("Warning") {
            *warnings.entry(e.note.unwrap_or_default()).or_default() += times;
        }
    }
    let mut text = by_reason
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    if let Some((note, n)) = warnings.into_iter().max_by_key(|(_, n)| *n) {
        text.push_str(&format!("; most frequent Warning ({n}x): {note}"));
    }
    text
}

/// CPU time the process has used so far, in seconds (user + system, from /proc).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// SIGTERM, as Kubernetes stops a pod (a heap-profiling build writes its profile then), and
/// SIGKILL if it has not exited within a minute.
async fn stop(child: &mut tokio::process::Child, pid: u32) {
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    if tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// The process's peak resident set size, from the kernel (`VmHWM`).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn targets_met(args: &Args, rows: &[Row]) -> bool {
    let mut ok = true;
    for r in rows {
        let mode = r.mode.flag();
        if r.mode == Mode::Batched {
            ok &= check(
                &format!("{mode}: Waldur requests per resource during creation <= 1.1"),
                r.create_per_resource <= 1.1,
            );
            ok &= check(
                &format!("{mode}: Waldur requests per resource in the tail after Ready <= 0.1"),
                r.tail_per_resource <= 0.1,
            );
            // Each shard sweeps every group its credentials see: K shards, K sweeps.
            let settled = 0.01 * f64::from(args.shards.max(1));
            ok &= check(
                &format!(
                    "{mode}: Waldur requests per resource per settled resync <= {settled} (0.01 a process)"
                ),
                r.resync_per_resource <= settled,
            );
        } else {
            // The model: every resource is read at least once per resync period.
            ok &= check(
                &format!("{mode}: at least one Waldur read per resource per resync"),
                r.resync_per_resource >= 1.0,
            );
        }
        ok &= check(
            &format!("{mode}: Kubernetes writes per resource, Events included, <= {MAX_WRITES}"),
            r.kube_writes_per_resource <= MAX_WRITES,
        );
        ok &= check(
            &format!("{mode}: the operator's peak RSS could be read"),
            r.max_rss().is_some(),
        );
        let per_process = args.n.div_ceil(args.shards.max(1) as usize);
        let bar = rss_bar_mib(per_process);
        ok &= check(
            &format!(
                "{mode}: operator peak RSS below {bar:.1} MiB for N = {per_process} per process"
            ),
            r.max_rss().is_some_and(|rss| rss < bar),
        );
    }
    ok
}

fn check(what: &str, ok: bool) -> bool {
    println!("{} {what}", if ok { "PASS" } else { "FAIL" });
    ok
}

fn print_table(args: &Args, rows: &[Row]) {
    // Each shard has a budget of its own: K shards have K x in-flight requests at once.
    let in_flight = args.in_flight * args.shards.max(1) as usize;
    let bound = 1.5
        * (args.n as f64 * args.latency_ms as f64 / 1000.0 / in_flight as f64
            + args.transition_ms as f64 / 1000.0);
    println!(
        "\nN = {}, shards {}, Waldur latency {} ms, create transition {} ms, in-flight limit {} per process, resync {} (time target: {:.1} s)\n",
        args.n,
        args.shards.max(1),
        args.latency_ms,
        args.transition_ms,
        args.in_flight,
        args.resync,
        bound
    );
    println!(
        "| read path | N | Waldur latency | all Ready (s) | Waldur req/resource, creation | Waldur req/resource, tail after Ready | Waldur req/resource/resync, settled | Kubernetes writes/resource (Events) | operator peak RSS (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} ms | {:.1} | {:.3} | {:.3} | {:.4} | {:.2} ({:.2}) | {} |",
            r.mode.flag(),
            args.n,
            args.latency_ms,
            r.ready_secs,
            r.create_per_resource,
            r.tail_per_resource,
            r.resync_per_resource,
            r.kube_writes_per_resource,
            r.events_per_resource,
            rss_cell(&r.peak_rss_mib)
        );
    }
}

/// One process: its peak RSS; several: each shard's, as `a / b / c`.
fn rss_cell(rss: &[Option<f64>]) -> String {
    rss.iter()
        .map(|m| m.map_or_else(|| "unreadable".into(), |m| format!("{m:.1}")))
        .collect::<Vec<_>>()
        .join(" / ")
}
