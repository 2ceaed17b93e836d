//! Runs a plan: the Kubernetes API test server and the Waldur simulator in this process, the
//! operator binary as a child process, the points one after the other with their waits, and
//! at the end every fault off, a settle, and the invariants.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, Client, ResourceExt};
use kube_test_server::TestServer;
use serde_json::{Value, json};
use waldur_operator::api::{ANNOTATION_PAUSED, ANNOTATION_REQUEST_PULL, ServerGroup};
use waldur_sim::{DefaultOrder, Delays, SimConfig, Simulator};

use crate::check::{self, Cond, Nova, Outcome, Row, SgView, Truth};
use crate::operator::{self, Ending, Operator};
use crate::plan::{
    Action, CREDS_NAMESPACE, CREDS_SECRET, CreateSpec, CredChange, Flavour, Import, NAMESPACES,
    OneObject, Plan, Point, ROTATED_TOKEN, Repair, ResId, SourcePlan, TENANTS, TenantPulls,
};
use crate::record::{ResRecord, SourceRecord};

/// How the campaign runs, from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    pub seed: u64,
    pub operator: PathBuf,
    /// Where logs, the kubeconfig, the trace and the report go.
    pub dir: PathBuf,
    /// The longest wait for the operator to settle at the end.
    pub settle: Duration,
    /// Stop settling once the same violations have stood this long.
    pub stuck: Duration,
    pub read_path: String,
    pub log_level: String,
    /// The operator's WALDUR_TIMEOUT; the timeout fault adds latency beyond it.
    pub waldur_timeout: Duration,
    /// Run Waldur's periodic re-sync once more before settling (what Waldur does within two
    /// hours anyway): it brings back unlinked groups and drops rows whose Nova group is gone.
    pub final_resync: bool,
    /// Extra environment for the operator, after (and over) the campaign's own.
    pub operator_env: Vec<(String, String)>,
    /// Operator processes: 1, or 2 with leader election (the points act on the first; the
    /// second stands by and takes over when the first is killed or stopped).
    pub replicas: usize,
    /// Shards to start with, one process each (1: unsharded).
    pub shards: usize,
}

/// What a finished campaign reports.
pub struct Report {
    pub outcomes: Vec<Outcome>,
    pub trace: Vec<String>,
    pub points_time: Duration,
    pub settle_time: Duration,
    pub settled: bool,
    pub runs: Vec<(PathBuf, String)>,
}

pub struct Campaign {
    settings: Settings,
    kube: TestServer,
    sim: Simulator,
    client: Client,
    operator: Operator,
    /// The other processes running now: the second replica (`--replicas 2`), or shards 1 and
    /// up of the current rollout (`--shards`).
    peers: Vec<Operator>,
    /// Processes of earlier rollouts, stopped: their runs count for panics and the report.
    retired: Vec<Operator>,
    /// The operator's environment but the shard's own variables.
    env: Vec<(String, String)>,
    /// Rollouts so far (names the processes of each).
    rollout: usize,
    records: BTreeMap<ResId, ResRecord>,
    sources: Vec<SourceRecord>,
    trace: Vec<String>,
    history: Vec<String>,
    seen: BTreeSet<String>,
    crashes: Vec<String>,
    /// Resources told something false while the campaign ran (for `status-is-true`): a
    /// healthy resource told Waldur is unavailable while only one other object failed.
    told: Vec<String>,
    t0: Instant,
    /// The point running now.
    point: usize,
    /// Every Waldur row seen so far (see `watch_rows`), by UUID.
    lineage: Arc<Mutex<BTreeMap<String, Row>>>,
    watcher: tokio::task::JoinHandle<()>,
}

/// How often the driver samples the simulator's row table. A row lives at least a schedule
/// and a run (200 ms) before it has a Nova group, so this sees every row that ever got one,
/// but for one the operator unlinks within this window of its creation.
const SAMPLE: Duration = Duration::from_millis(20);

/// Create transitions: short, so that a campaign is quick, and long enough that the operator
/// meets groups in every transitional state.
const SCHEDULE: Duration = Duration::from_millis(100);
const RUN: Duration = Duration::from_millis(100);

/// The processes of one rollout to `total` shards, named `r<rollout>-shard<i>`; not started.
fn shard_processes(
    settings: &Settings,
    env: &[(String, String)],
    total: usize,
    rollout: usize,
) -> Vec<Operator> {
    (0..total)
        .map(|i| {
            let mut env = env.to_vec();
            env.push(("TOTAL_SHARDS".into(), total.to_string()));
            env.push(("SHARD_INDEX".into(), i.to_string()));
            Operator::named(
                &settings.operator,
                env,
                &settings.dir,
                &format!("r{rollout}-shard{i}"),
            )
        })
        .collect()
}

fn resource() -> ApiResource {
    ApiResource::erase::<ServerGroup>(&())
}

impl Campaign {
    pub async fn start(settings: Settings) -> Result<Campaign, String> {
        std::fs::create_dir_all(&settings.dir)
            .map_err(|e| format!("{}: {e}", settings.dir.display()))?;
        let kube = TestServer::start().await.map_err(|e| e.to_string())?;
        let crd = serde_json::to_value(waldur_operator::api::crd()).map_err(|e| e.to_string())?;
        kube.install_crd(crd)?;
        for ns in NAMESPACES {
            kube.create_namespace(ns)?;
        }
        let sim = Simulator::start(SimConfig {
            delays: Delays {
                schedule: SCHEDULE,
                run: RUN,
            },
            tenants: TENANTS.iter().map(|t| t.to_string()).collect(),
            default_order: DefaultOrder::Shuffled {
                seed: settings.seed,
            },
            // A rotation hands the staff user a second token; a swap hands over the user
            // token, which sees none of the campaign's tenants.
            staff_token_aliases: vec![ROTATED_TOKEN.into()],
            user_tenants: vec!["00000000000000000000000000000001".into()],
            ..SimConfig::default()
        })
        .await
        .map_err(|e| e.to_string())?;
        let kubeconfig = settings.dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kube.kubeconfig_yaml("default")).map_err(|e| e.to_string())?;
        let client = kube.client().await?;
        put_credentials(&client, &SimConfig::default().staff_token).await?;
        let env = vec![
            ("KUBECONFIG", kubeconfig.to_string_lossy().to_string()),
            ("WALDUR_URL", sim.base_url()),
            ("WALDUR_TOKEN", SimConfig::default().staff_token),
            ("DEFAULT_CREDENTIALS_NAMESPACES", "*".into()),
            ("RESYNC_PERIOD", "30s".into()),
            ("BUSY_SWEEP", "200ms".into()),
            (
                "WALDUR_TIMEOUT",
                format!("{}ms", settings.waldur_timeout.as_millis()),
            ),
            ("WALDUR_RATE", "0".into()),
            ("CONCURRENCY", "8".into()),
            // Tenant re-syncs the operator asks for, at most one per tenant this often: short,
            // so that a campaign sees several (the default 5m would see one).
            ("TENANT_PULL_FLOOR", "2s".into()),
            ("READ_PATH", settings.read_path.clone()),
            ("METRICS_ADDR", "127.0.0.1:0".into()),
            ("ADMIN_ADDR", "127.0.0.1:0".into()),
            ("LOG_LEVEL", settings.log_level.clone()),
            // Plain text in the log files, for grep.
            ("NO_COLOR", "1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(
            // Two replicas elect a leader through a Lease; short terms, so that a takeover
            // falls within the campaign (the e2e tests' 3 s and 1 s).
            [
                ("LEADER_ELECT", "true"),
                ("LEASE_DURATION", "3s"),
                ("LEASE_GRACE", "1s"),
            ]
            .into_iter()
            .filter(|_| settings.replicas > 1 || settings.shards > 1)
            .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .filter(|(k, _)| !settings.operator_env.iter().any(|(o, _)| o == k))
        .chain(settings.operator_env.iter().cloned())
        .collect::<Vec<(String, String)>>();
        let (mut operator, mut peers) = if settings.shards > 1 {
            let mut shards = shard_processes(&settings, &env, settings.shards, 0);
            let first = shards.remove(0);
            (first, shards)
        } else {
            let operator = Operator::new(&settings.operator, env.clone(), &settings.dir);
            let standby = (settings.replicas > 1).then(|| {
                Operator::named(&settings.operator, env.clone(), &settings.dir, "standby")
            });
            (operator, standby.into_iter().collect())
        };
        operator.start()?;
        for peer in &mut peers {
            peer.start()?;
        }
        let lineage = Arc::new(Mutex::new(BTreeMap::new()));
        let watcher = tokio::spawn(watch_rows(sim.clone(), lineage.clone()));
        Ok(Campaign {
            settings,
            kube,
            sim,
            client,
            operator,
            peers,
            retired: Vec::new(),
            env,
            rollout: 0,
            records: BTreeMap::new(),
            sources: Vec::new(),
            trace: Vec::new(),
            history: Vec::new(),
            seen: BTreeSet::new(),
            crashes: Vec::new(),
            told: Vec::new(),
            t0: Instant::now(),
            point: 0,
            lineage,
            watcher,
        })
    }

    /// Runs every point, then settles and checks.
    pub async fn run(mut self, plan: &Plan) -> Report {
        self.t0 = Instant::now();
        for point in &plan.points {
            tokio::time::sleep(Duration::from_millis(point.wait_ms)).await;
            self.mind_the_operator(point.index);
            self.credentials_back().await;
            self.point = point.index;
            let started = self.t0.elapsed();
            let outcome = self.execute(point).await;
            self.trace.push(format!(
                "[{:8.3}s] #{:03} {:<14} {} -> {outcome}",
                started.as_secs_f64(),
                point.index,
                point.action.category().as_str(),
                point.action
            ));
            self.look(point.index).await;
        }
        let points_time = self.t0.elapsed();
        let (settled, settle_time) = self.settle(plan.points.len()).await;
        let (sgs, truth) = self.snapshot().await;
        self.watcher.abort();
        let lineage = self.lineage_with(&truth);
        let runs = self.processes().map(|o| o.runs.len()).sum();
        let mut crashes = self.crashes.clone();
        for process in self.processes() {
            crashes.extend(operator::panics(&process.runs));
        }
        let outcomes = check::check(&check::Input {
            records: &self.records,
            sources: &self.sources,
            sgs: &sgs,
            truth: &truth,
            history: &self.history,
            crashes: &crashes,
            told: &self.told,
            runs,
            lineage: &lineage,
            settled,
        });
        self.operator.kill();
        for peer in &mut self.peers {
            peer.kill();
        }
        self.dump(&sgs, &truth).await;
        let runs = self
            .processes()
            .flat_map(|o| o.runs.iter())
            .map(|r| {
                let ending = match &r.ending {
                    Ending::Running => "running".to_string(),
                    Ending::Killed => "killed".to_string(),
                    Ending::Terminated(s) => format!("terminated (SIGTERM): {s}"),
                    Ending::Exited(s) => format!("exited by itself: {s}"),
                };
                (
                    r.log.clone(),
                    format!("{ending}, ran {:.1} s", r.ran.as_secs_f64()),
                )
            })
            .collect();
        self.kube.shutdown();
        self.sim.shutdown();
        Report {
            outcomes,
            trace: self.trace,
            points_time,
            settle_time,
            settled,
            runs,
        }
    }

    /// Every row seen so far, the rows of `truth` included.
    fn lineage_with(&self, truth: &Truth) -> Vec<Row> {
        let mut seen = self.lineage.lock().unwrap_or_else(|e| e.into_inner());
        remember_rows(&mut seen, &truth.rows);
        seen.values().cloned().collect()
    }

    fn note(&mut self, what: String) {
        self.trace.push(format!(
            "[{:8.3}s]      {what}",
            self.t0.elapsed().as_secs_f64()
        ));
    }

    /// An operator that exited by itself is a finding; start it again so the campaign goes on.
    fn mind_the_operator(&mut self, point: usize) {
        let mut exits = Vec::new();
        for peer in &mut self.peers {
            if let Some(how) = peer.exited() {
                let log = peer
                    .runs
                    .last()
                    .map(|r| r.log.display().to_string())
                    .unwrap_or_default();
                let started = peer.start();
                exits.push((how, log, started));
            }
        }
        for (how, log, started) in exits {
            self.crashes.push(format!(
                "before point #{point}: another process exited by itself ({how}); log {log}"
            ));
            self.note(format!(
                "another process exited by itself ({how}); starting it again: {started:?}"
            ));
        }
        if let Some(how) = self.operator.exited() {
            let log = self
                .operator
                .runs
                .last()
                .map(|r| r.log.display().to_string())
                .unwrap_or_default();
            self.crashes.push(format!(
                "before point #{point}: the operator exited by itself ({how}); log {log}"
            ));
            self.note(format!(
                "the operator exited by itself ({how}); starting it again"
            ));
            if let Err(e) = self.operator.start() {
                self.note(format!("cannot start the operator: {e}"));
            }
        }
    }

    async fn execute(&mut self, point: &Point) -> String {
        let sim = self.sim.clone();
        match &point.action {
            Action::Create(c) => self.create(c).await,
            Action::CreateTwins(a, b) => {
                let (ma, mb) = (self.manifest(a), self.manifest(b));
                let (ra, rb) = tokio::join!(
                    post(&self.client, a.res.ns, ma),
                    post(&self.client, b.res.ns, mb)
                );
                let out = format!("{}; {}", self.accepted(a, ra), self.accepted(b, rb));
                out
            }
            Action::SetDeletionPolicy { res, to } => {
                let r = self
                    .merge(res, json!({"spec": {"deletionPolicy": to.as_str()}}))
                    .await;
                if let Some(rec) = self.records.get_mut(res) {
                    rec.deletion = *to;
                }
                r
            }
            Action::Pause { res } | Action::Unpause { res } => {
                let pause = matches!(point.action, Action::Pause { .. });
                let value = if pause { json!("true") } else { Value::Null };
                let r = self
                    .merge(
                        res,
                        json!({"metadata": {"annotations": {ANNOTATION_PAUSED: value}}}),
                    )
                    .await;
                if let Some(rec) = self.records.get_mut(res) {
                    rec.paused = pause;
                }
                r
            }
            Action::RequestPull { res, token } => {
                self.merge(
                    res,
                    json!({"metadata": {"annotations": {ANNOTATION_REQUEST_PULL: token}}}),
                )
                .await
            }
            Action::Delete { res } => self.delete(res, point.index).await,
            Action::Kill { down_ms } => {
                self.operator.kill();
                tokio::time::sleep(Duration::from_millis(*down_ms)).await;
                self.restart()
            }
            Action::KillAfterCommit {
                create,
                answer_delay_ms,
                down_ms,
            } => {
                sim.delay_answers_after_commit(
                    Some("create"),
                    1,
                    Duration::from_millis(*answer_delay_ms),
                );
                let created = self.create(create).await;
                let started = Instant::now();
                let committed = self
                    .wait_for_row(create.tenant, &create.waldur_name(), Duration::from_secs(5))
                    .await;
                self.operator.kill();
                sim.clear_faults();
                tokio::time::sleep(Duration::from_millis(*down_ms)).await;
                let restarted = self.restart();
                match committed {
                    true => format!(
                        "{created}; committed after {} ms, operator killed while Waldur held the 201; {restarted}",
                        started.elapsed().as_millis()
                    ),
                    false => format!(
                        "{created}; no create reached Waldur within 5 s, killed anyway; {restarted}"
                    ),
                }
            }
            Action::Burst5xx { n, status, hold_ms } => {
                sim.fail_next_requests(*n, *status);
                self.hold_then_clear(*hold_ms).await;
                "armed, then cleared".into()
            }
            Action::DropConnections { n, hold_ms } => {
                sim.drop_next_connections(*n);
                self.hold_then_clear(*hold_ms).await;
                "armed, then cleared".into()
            }
            Action::Timeouts { hold_ms } => {
                sim.set_latency(self.settings.waldur_timeout + Duration::from_millis(500));
                tokio::time::sleep(Duration::from_millis(*hold_ms)).await;
                sim.set_latency(Duration::ZERO);
                "latency beyond the operator's timeout, then none".into()
            }
            Action::DelayedAnswer {
                create,
                delay_ms,
                hold_ms,
            } => {
                let before = sim.requests("create");
                sim.delay_answers_after_commit(Some("create"), 1, Duration::from_millis(*delay_ms));
                let created = match create {
                    Some(c) => self.create(c).await,
                    None => "no create of ours".into(),
                };
                self.hold_then_clear(*hold_ms).await;
                format!(
                    "{created}; {} create request(s) while armed",
                    sim.requests("create") - before
                )
            }
            Action::CommitThenDrop {
                endpoint,
                create,
                hold_ms,
            } => {
                let before = sim.requests(endpoint);
                sim.drop_answers_after_commit(Some(endpoint), 1);
                let created = match create {
                    Some(c) => self.create(c).await,
                    None => "no create of ours".into(),
                };
                self.hold_then_clear(*hold_ms).await;
                format!(
                    "{created}; {} {endpoint} request(s) while armed",
                    sim.requests(endpoint) - before
                )
            }
            Action::Outage { refuse, hold_ms } => {
                if *refuse {
                    sim.stop_listening();
                } else {
                    sim.set_failing(Some(503));
                }
                tokio::time::sleep(Duration::from_millis(*hold_ms)).await;
                if *refuse {
                    match sim.listen_again().await {
                        Ok(()) => "connections refused, then accepted again".into(),
                        Err(e) => format!("cannot listen again: {e}"),
                    }
                } else {
                    sim.set_failing(None);
                    "every request 503, then none".into()
                }
            }
            Action::Resync => {
                let r = sim.resync_report();
                format!(
                    "deleted {}, imported {}, recovered {}",
                    r.deleted.len(),
                    r.imported.len(),
                    r.recovered.len()
                )
            }
            Action::OobOpenstackDelete { res }
            | Action::OobWaldurDelete { res }
            | Action::OobUnlink { res } => self.out_of_band(point, res).await,
            Action::FailCreate { create, hold_ms } => {
                sim.fail_next_creates(1);
                let created = self.create(create).await;
                self.hold_then_clear(*hold_ms).await;
                created
            }
            Action::Sigterm { down_ms } => {
                let started = Instant::now();
                if !self.operator.terminate() {
                    return format!("no SIGTERM sent; {}", self.restart());
                }
                let mut how = None;
                while started.elapsed() < Duration::from_secs(10) {
                    how = self.operator.terminated();
                    if how.is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let ended = match how {
                    Some(how) => format!(
                        "exited {} ms after SIGTERM ({how})",
                        started.elapsed().as_millis()
                    ),
                    None => {
                        self.operator.kill();
                        "still running 10 s after SIGTERM: killed".to_string()
                    }
                };
                tokio::time::sleep(Duration::from_millis(*down_ms)).await;
                format!("{ended}; {}", self.restart())
            }
            Action::Reshard { to, overlap_ms } => self.reshard(*to, *overlap_ms).await,
            Action::TwinsLostCreate { a, b, down_ms } => {
                sim.drop_answers_after_commit(Some("create"), 1);
                let (ma, mb) = (self.manifest(a), self.manifest(b));
                let (ra, rb) = tokio::join!(
                    post(&self.client, a.res.ns, ma),
                    post(&self.client, b.res.ns, mb)
                );
                let created = format!("{}; {}", self.accepted(a, ra), self.accepted(b, rb));
                let started = Instant::now();
                let committed = self
                    .wait_for_row(a.tenant, &a.waldur_name(), Duration::from_secs(5))
                    .await;
                self.operator.kill();
                sim.clear_faults();
                tokio::time::sleep(Duration::from_millis(*down_ms)).await;
                let restarted = self.restart();
                match committed {
                    true => format!(
                        "{created}; a group committed after {} ms, operator killed; {restarted}",
                        started.elapsed().as_millis()
                    ),
                    false => format!(
                        "{created}; no create reached Waldur within 5 s, killed anyway; {restarted}"
                    ),
                }
            }
            Action::TenantPullFault {
                res,
                pulls,
                hold_ms,
            } => {
                self.tenant_pull_fault(point, res.as_ref(), *pulls, *hold_ms)
                    .await
            }
            Action::UnlinkThenDelete { res } => {
                // Not excused: with deletionPolicy Delete the operator waits for Waldur to
                // re-import the Nova group and deletes it (review N2).
                let unlinked = self.unlink(point, res, false).await;
                let deleted = self.delete(res, point.index).await;
                format!("{unlinked}; {deleted}")
            }
            Action::DeleteTransitional {
                res,
                state,
                then,
                hold_ms,
            } => {
                let uuid = self.bound_uuid(res).await;
                let forced = match &uuid {
                    Some(u) if self.sim.group(u).is_some_and(|g| g["state"] == "OK") => {
                        sim.force_state(u, state)
                    }
                    _ => false,
                };
                let deleted = self.delete(res, point.index).await;
                tokio::time::sleep(Duration::from_millis(*hold_ms)).await;
                match (uuid, forced) {
                    (Some(u), true) => {
                        let still = self.sim.group(&u).is_some_and(|g| g["state"] == *state);
                        if still {
                            sim.force_state(&u, then);
                        }
                        format!(
                            "{u} forced {state}; {deleted}; {}",
                            if still {
                                format!("then {then}")
                            } else {
                                "it left the state by itself".into()
                            }
                        )
                    }
                    (Some(u), false) => format!("{u} not OK, not forced; {deleted}"),
                    (None, _) => format!("no group bound yet; {deleted}"),
                }
            }
            Action::CreateThenDelete { create, after_ms } => {
                let created = self.create(create).await;
                tokio::time::sleep(Duration::from_millis(*after_ms)).await;
                let state = self
                    .sim
                    .groups()
                    .iter()
                    .find(|g| g["description"] == check::tag(&create.res))
                    .map(|g| g["state"].as_str().unwrap_or_default().to_string())
                    .unwrap_or_else(|| "no row yet".into());
                let deleted = self.delete(&create.res, point.index).await;
                format!("{created}; its group: {state}; {deleted}")
            }
            Action::OneObject500 { target, n, hold_ms } => {
                self.one_object_500(point, target, *n, *hold_ms).await
            }
            Action::ClockSkew {
                secs,
                create,
                drop_answer,
                hold_ms,
            } => {
                sim.set_clock_offset(*secs);
                let created = match create {
                    Some(c) => {
                        if *drop_answer {
                            sim.drop_answers_after_commit(Some("create"), 1);
                        }
                        self.create(c).await
                    }
                    None => "no create of ours".into(),
                };
                self.hold_then_clear(*hold_ms).await;
                sim.set_clock_offset(0);
                format!("{created}; Waldur's clock back on time")
            }
            Action::Credentials {
                change,
                delete,
                hold_ms,
            } => {
                let changed = match change {
                    CredChange::Rotate => put_credentials(&self.client, ROTATED_TOKEN).await,
                    CredChange::Swap => {
                        put_credentials(&self.client, &SimConfig::default().user_token).await
                    }
                    CredChange::Delete => {
                        let secrets: Api<Secret> =
                            Api::namespaced(self.client.clone(), CREDS_NAMESPACE);
                        secrets
                            .delete(CREDS_SECRET, &DeleteParams::default())
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    }
                };
                let deleted = match delete {
                    Some(res) => self.delete(res, point.index).await,
                    None => "nothing deleted".into(),
                };
                tokio::time::sleep(Duration::from_millis(*hold_ms)).await;
                // Put back: the staff token, the Secret made again if it went.
                let restored = put_credentials(&self.client, &SimConfig::default().staff_token)
                    .await
                    .map_or_else(|e| format!("not restored: {e}"), |_| "restored".into());
                format!(
                    "{}; {deleted}; {restored}",
                    changed.map_or_else(|e| format!("change failed: {e}"), |_| "changed".into())
                )
            }
            Action::Conflicts { n, target, hold_ms } => {
                let before = self.kube.count("patch", "servergroups", None);
                self.kube
                    .fail_next(*n, "patch", "servergroups", target.subresource(), 409);
                tokio::time::sleep(Duration::from_millis(*hold_ms)).await;
                self.kube
                    .fail_next(0, "patch", "servergroups", target.subresource(), 409);
                format!(
                    "{} patch(es) of servergroups while armed",
                    self.kube.count("patch", "servergroups", None) - before
                )
            }
            Action::LeasesDown { hold_ms } => {
                let before = self.kube.count("update", "leases", None)
                    + self.kube.count("create", "leases", None);
                self.kube.fail_next(usize::MAX, "*", "leases", None, 503);
                tokio::time::sleep(Duration::from_millis(*hold_ms)).await;
                self.kube.fail_next(0, "*", "leases", None, 503);
                let tried = self.kube.count("update", "leases", None)
                    + self.kube.count("create", "leases", None)
                    - before;
                format!("{tried} Lease write(s) refused, then answered again")
            }
            Action::ExpireWatches => {
                self.kube.expire_watches();
                "watches ended".into()
            }
            Action::Compact => {
                self.kube.compact();
                self.kube.expire_watches();
                "history dropped, watches ended (re-watches get 410)".into()
            }
            Action::WatchDelay { delay_ms, hold_ms } => {
                self.kube.set_watch_delay(Duration::from_millis(*delay_ms));
                tokio::time::sleep(Duration::from_millis(*hold_ms)).await;
                self.kube.set_watch_delay(Duration::ZERO);
                "watch events late, then on time".into()
            }
        }
    }

    /// The user who deleted the credentials Secret makes it again once it is gone (while
    /// resources need it to clean up, the operator's finalizer keeps it, deleting).
    async fn credentials_back(&mut self) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), CREDS_NAMESPACE);
        if let Ok(None) = secrets.get_opt(CREDS_SECRET).await {
            let r = put_credentials(&self.client, &SimConfig::default().staff_token).await;
            self.note(format!(
                "the credentials Secret was gone: made again ({r:?})"
            ));
        }
    }

    /// The user deletes the resource.
    async fn delete(&mut self, res: &ResId, point: usize) -> String {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), res.ns, &resource());
        let r = api.delete(&res.name, &DeleteParams::default()).await;
        if let Some(rec) = self.records.get_mut(res) {
            rec.deleted_at = Some(point);
        }
        match r {
            Ok(_) => "deletion requested".into(),
            Err(e) => format!("delete failed: {e}"),
        }
    }

    /// The UUID the resource's status names now.
    async fn bound_uuid(&self, res: &ResId) -> Option<String> {
        let api: Api<ServerGroup> = Api::namespaced(self.client.clone(), res.ns);
        api.get_opt(&res.name)
            .await
            .ok()
            .flatten()
            .and_then(|sg| sg.status.and_then(|s| s.uuid))
    }

    /// Tenant re-syncs late, never run or failing while `res`'s group is unlinked, so the
    /// operator asks for one; at the end of the point the re-syncs run again and an Erred
    /// tenant is repaired.
    async fn tenant_pull_fault(
        &mut self,
        point: &Point,
        res: Option<&ResId>,
        pulls: TenantPulls,
        hold_ms: u64,
    ) -> String {
        let before = self.sim.requests("pull_server_groups");
        match pulls {
            TenantPulls::Late { delay_ms } => self
                .sim
                .set_tenant_pull_delay(Some(Duration::from_millis(delay_ms))),
            TenantPulls::Never => self.sim.set_tenant_pull_delay(None),
            TenantPulls::Erred { .. } => self.sim.fail_next_tenant_pulls(1),
        }
        // Not excused: the operator rebinds Waldur's re-import (or, deleted, deletes it).
        let unlinked = match res {
            Some(r) => self.unlink(point, r, false).await,
            None => "no resource to unlink".into(),
        };
        // The fault is about the re-sync the operator asks for: give it up to 8 s to notice
        // the unlink (its next sweep) and ask, then hold the fault `hold_ms` from there.
        let asked_by = Instant::now() + Duration::from_secs(8);
        let did_unlink =
            res.is_some() && !unlinked.starts_with("skipped") && !unlinked.starts_with("no effect");
        while did_unlink
            && self.sim.requests("pull_server_groups") == before
            && Instant::now() < asked_by
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // What the tenants went through meanwhile.
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_millis(hold_ms);
        while Instant::now() < deadline {
            for t in TENANTS {
                if let Some(state) = self
                    .sim
                    .tenant(t)
                    .and_then(|v| v["state"].as_str().map(str::to_string))
                    && state != "OK"
                {
                    seen.insert(format!("{} {state}", &t[..6]));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let off = match pulls {
            TenantPulls::Late { .. } => {
                self.sim.reset_tenant_pull_delay();
                "re-syncs on time again".to_string()
            }
            TenantPulls::Never => {
                self.sim.release_tenant_pulls();
                self.sim.reset_tenant_pull_delay();
                "held re-syncs released".to_string()
            }
            TenantPulls::Erred { repair } => {
                self.sim.fail_next_tenant_pulls(0);
                let erred: Vec<&str> = TENANTS
                    .iter()
                    .copied()
                    .filter(|t| self.sim.tenant(t).is_some_and(|v| v["state"] == "ERRED"))
                    .collect();
                match (repair, erred.is_empty()) {
                    (_, true) => "no tenant Erred".to_string(),
                    (Repair::SetOk, false) => {
                        for t in &erred {
                            self.sim.set_tenant_ok(t, true);
                        }
                        format!("{} Erred tenant(s) set OK by staff", erred.len())
                    }
                    (Repair::Resync, false) => {
                        let r = self.sim.resync_report();
                        format!(
                            "{} Erred tenant(s) repaired by Waldur's periodic re-sync (imported {}, recovered tenants {})",
                            erred.len(),
                            r.imported.len(),
                            r.recovered_tenants.len()
                        )
                    }
                }
            }
        };
        format!(
            "{unlinked}; {} tenant re-sync(s) asked for; tenants seen {}; {off}",
            self.sim.requests("pull_server_groups") - before,
            if seen.is_empty() {
                "OK throughout".to_string()
            } else {
                seen.into_iter().collect::<Vec<_>>().join(", ")
            }
        )
    }

    /// One object's requests answer 500 while Waldur answers every other: a resource that was
    /// Ready and Synced before may not be told Waldur is unavailable meanwhile (review N4).
    /// Every such resource is poked (an annotation) so that it is reconciled in the window.
    async fn one_object_500(
        &mut self,
        point: &Point,
        target: &OneObject,
        n: usize,
        hold_ms: u64,
    ) -> String {
        let (endpoint, target_res) = match target {
            OneObject::Create(c) => ("create", c.res.clone()),
            OneObject::Pull { res, .. } => ("pull", res.clone()),
        };
        let (sgs, _) = self.snapshot().await;
        let healthy: Vec<ResId> = sgs
            .iter()
            .filter(|sg| !sg.deleting && !sg.paused)
            .filter(|sg| {
                sg.cond("Ready")
                    .is_some_and(|c| c.status == "True" && c.reason == "Available")
                    && sg.cond("Synced").is_some_and(|c| c.status == "True")
            })
            .filter_map(|sg| sg.res.clone())
            .filter(|r| *r != target_res)
            .collect();
        // The object's own reads fail too (a GET of it answers 500 and is retried): the
        // simulator scopes faults by endpoint, not by object, and a Ready resource of the
        // batched read path reads from the sweep's lists, not by GET.
        let before = self.sim.requests(endpoint) + self.sim.requests("retrieve");
        let armed_at = k8s_openapi::jiff::Timestamp::now();
        self.sim.fail_next_requests_for(endpoint, n, 500);
        self.sim.fail_next_requests_for("retrieve", n, 500);
        let started = match target {
            OneObject::Create(c) => self.create(c).await,
            OneObject::Pull { res, token } => {
                let r = self
                    .merge(
                        res,
                        json!({"metadata": {"annotations": {ANNOTATION_REQUEST_PULL: token}}}),
                    )
                    .await;
                format!("request-pull {res}: {r}")
            }
        };
        for r in &healthy {
            self.merge(
                r,
                json!({"metadata": {"annotations": {"waldur-chaos/poke": point.index.to_string()}}}),
            )
            .await;
        }
        let mut told: BTreeSet<String> = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_millis(hold_ms);
        while Instant::now() < deadline {
            let (sgs, _) = self.snapshot().await;
            for sg in &sgs {
                let Some(res) = sg.res.as_ref().filter(|r| healthy.contains(r)) else {
                    continue;
                };
                // The fault is scoped by endpoint, not object: a resource whose own GET met
                // one of the 500s is told the truth about its own request. The defect is being
                // refused for another's failures (the breaker's "unreachable since").
                let own_500 = |m: &str| {
                    m.contains("HTTP 500")
                        && [endpoint, "retrieve"].iter().any(|e| {
                            m.starts_with(&format!("Waldur is unavailable ({e}): HTTP 500"))
                        })
                };
                // A breaker opened by an earlier point's real outage stays open until its next
                // probe (a second): "unreachable since" before this point is not its doing (seed
                // 89: #29's outage, then #30's pokes within that second).
                // And a breaker whose cause is no 500 (a connection failure, a 502, 503 or 504,
                // a timeout) was opened by an earlier point's fault, whatever its second (seed
                // 257: #057's dropped connections, then #058 within the same second).
                let opened_before =
                    |m: &str| breaker_opened_before(m, armed_at) || breaker_cause_not_500(m);
                if let Some(c) = sg
                    .cond("Synced")
                    .filter(|c| c.status == "False" && c.reason == "WaldurUnavailable")
                    .filter(|c| !own_500(&c.message) && !opened_before(&c.message))
                    && told.insert(res.to_string())
                {
                    let v = format!(
                        "at point #{}: {res} was told WaldurUnavailable while only {target_res}'s {endpoint} (and retrieve) requests failed (500): {}",
                        point.index,
                        check::clip(&c.message, 300)
                    );
                    self.note(format!("VIOLATION SEEN: {v}"));
                    self.told.push(v);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.sim.clear_faults();
        format!(
            "{started}; {} {endpoint} and retrieve request(s) while armed; {} healthy resource(s) poked, {} told WaldurUnavailable",
            self.sim.requests(endpoint) + self.sim.requests("retrieve") - before,
            healthy.len(),
            told.len()
        )
    }

    /// Every process of the campaign, stopped ones included.
    fn processes(&self) -> impl Iterator<Item = &Operator> {
        std::iter::once(&self.operator)
            .chain(self.peers.iter())
            .chain(self.retired.iter())
    }

    /// A rollout to `to` shards as a Deployment with surge does it: the new processes start,
    /// then the old ones are asked to stop (SIGTERM, killed after 10 s) once `overlap_ms` has
    /// passed. Kills and SIGTERMs of later points hit the new shard 0.
    async fn reshard(&mut self, to: usize, overlap_ms: u64) -> String {
        if self.settings.shards < 2 {
            return "not sharded: nothing rolled out".into();
        }
        self.rollout += 1;
        let mut new = shard_processes(&self.settings, &self.env, to, self.rollout);
        let mut started = 0;
        for process in &mut new {
            match process.start() {
                Ok(()) => started += 1,
                Err(e) => self.crashes.push(format!("cannot start a shard: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(overlap_ms)).await;
        let first = new.remove(0);
        let mut old = std::mem::replace(&mut self.peers, new);
        old.insert(0, std::mem::replace(&mut self.operator, first));
        let began = Instant::now();
        for process in &mut old {
            process.terminate();
        }
        let mut killed = 0;
        for process in &mut old {
            while process.is_running() && process.terminated().is_none() {
                if began.elapsed() > Duration::from_secs(10) {
                    process.kill();
                    killed += 1;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let stopped = old.len();
        self.retired.extend(old);
        format!(
            "{started} of {to} new shard(s) started; {stopped} old process(es) stopped {} ms after SIGTERM ({killed} killed after 10 s)",
            began.elapsed().as_millis()
        )
    }

    fn restart(&mut self) -> String {
        match self.operator.start() {
            Ok(()) => format!("operator run {} started", self.operator.runs.len() - 1),
            Err(e) => format!("cannot start the operator: {e}"),
        }
    }

    /// Holds a one-shot Waldur fault armed for a while, then clears every Waldur fault: no
    /// point's fault outlives it.
    async fn hold_then_clear(&self, hold_ms: u64) {
        tokio::time::sleep(Duration::from_millis(hold_ms)).await;
        self.sim.clear_faults();
    }

    async fn wait_for_row(&self, tenant: &str, name: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let tenant = check::norm(tenant);
        while Instant::now() < deadline {
            let found = self.sim.groups().iter().any(|g| {
                g["name"] == name
                    && g["tenant_uuid"].as_str().map(check::norm) == Some(tenant.clone())
            });
            if found {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// Someone acts on the resource's group behind the operator's back.
    async fn out_of_band(&mut self, point: &Point, res: &ResId) -> String {
        self.out_of_band_excused(point, res, true).await
    }

    /// A staff user unlinks the resource's group behind the operator's back. `excuse`: the
    /// Nova group is not held against the resource's deletion (as for `oob-unlink`).
    async fn unlink(&mut self, point: &Point, res: &ResId, excuse: bool) -> String {
        self.out_of_band_excused(point, res, excuse).await
    }

    async fn out_of_band_excused(
        &mut self,
        point: &Point,
        res: &ResId,
        excuse_unlink: bool,
    ) -> String {
        let api: Api<ServerGroup> = Api::namespaced(self.client.clone(), res.ns);
        let uuid = match api.get_opt(&res.name).await {
            Ok(Some(sg)) => sg.status.and_then(|s| s.uuid),
            Ok(None) => return "skipped: the resource is gone".into(),
            Err(e) => return format!("skipped: cannot read the resource: {e}"),
        };
        let Some(uuid) = uuid else {
            return "skipped: no group bound yet".into();
        };
        let backend = self
            .sim
            .group(&uuid)
            .and_then(|g| g["backend_id"].as_str().map(str::to_string))
            .unwrap_or_default();
        let (done, what) = match &point.action {
            Action::OobOpenstackDelete { .. } => (
                self.sim.openstack_delete(&uuid),
                format!("Nova group {backend:?} of {uuid} deleted in OpenStack"),
            ),
            Action::OobWaldurDelete { .. } => match self.sim.waldur_delete(&uuid) {
                Ok(()) => (true, format!("DELETE of {uuid} accepted")),
                Err(e) => (false, format!("DELETE of {uuid} refused: {e}")),
            },
            _ => (
                self.sim.waldur_unlink(&uuid),
                format!("{uuid} unlinked, Nova group {backend:?} kept"),
            ),
        };
        if done && let Some(rec) = self.records.get_mut(res) {
            rec.out_of_band = true;
            rec.taints
                .push(format!("#{} {}: {what}", point.index, point.action.kind()));
            if excuse_unlink && !backend.is_empty() {
                rec.excused_backends.push(backend.clone());
            }
            if let Some(src) = rec
                .spec
                .import
                .as_ref()
                .and_then(|i| match i {
                    Import::SourceUuid(id) | Import::SourceBackendId(id) => Some(*id),
                    Import::Missing(_) => None,
                })
                .and_then(|id| self.sources.iter_mut().find(|s| s.plan.id == id))
            {
                src.out_of_band = true;
            }
        }
        // A Nova group deleted behind the operator's back is gone for every resource that was
        // bound to it, not only the one the point named: an Unlink that let go of it before a
        // duplicate import took it expects it to stay (the final run's seed 175).
        if done && matches!(point.action, Action::OobOpenstackDelete { .. }) && !backend.is_empty()
        {
            for (other, rec) in self.records.iter_mut() {
                if other != res && rec.last_bound.as_ref().is_some_and(|(_, b)| *b == backend) {
                    rec.out_of_band = true;
                    rec.taints.push(format!(
                        "#{} {}: its former Nova group {backend:?} deleted in OpenStack (through {res})",
                        point.index,
                        point.action.kind()
                    ));
                }
            }
        }
        if done {
            what
        } else {
            format!("no effect: {what}")
        }
    }

    async fn merge(&self, res: &ResId, patch: Value) -> String {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), res.ns, &resource());
        match api
            .patch(&res.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => "patched".into(),
            Err(e) => format!("patch failed: {e}"),
        }
    }

    async fn create(&mut self, c: &CreateSpec) -> String {
        let mut notes = Vec::new();
        if let Some(src) = &c.new_source {
            notes.push(self.prepare_source(src).await);
        }
        let manifest = self.manifest(c);
        let r = post(&self.client, c.res.ns, manifest).await;
        notes.push(self.accepted(c, r));
        notes.join("; ")
    }

    /// Records a create the API server answered.
    fn accepted(&mut self, c: &CreateSpec, r: Result<(), String>) -> String {
        let mut rec = ResRecord::new(c.clone());
        rec.created_at = self.point;
        let out = match r {
            Ok(()) => format!("{} created", c.res),
            Err(e) => {
                rec.accepted = false;
                format!("{} refused: {e}", c.res)
            }
        };
        self.records.insert(c.res.clone(), rec);
        out
    }

    /// Someone creates the group in Waldur first; it is an import's or an observe's source.
    async fn prepare_source(&mut self, src: &SourcePlan) -> String {
        let mut rec = SourceRecord {
            plan: src.clone(),
            uuid: None,
            backend_id: None,
            out_of_band: false,
        };
        let out = match self.sim.waldur_create(src.tenant, &src.name, src.policy) {
            Ok(uuid) => {
                let deadline = Instant::now() + Duration::from_secs(3);
                let mut backend = None;
                while Instant::now() < deadline {
                    if let Some(g) = self.sim.group(&uuid)
                        && g["state"] == "OK"
                    {
                        backend = g["backend_id"].as_str().map(str::to_string);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                rec.uuid = Some(uuid.clone());
                rec.backend_id = backend.clone();
                format!(
                    "source {} made in Waldur: {uuid} backend {:?}",
                    src.name,
                    backend.unwrap_or_default()
                )
            }
            Err(e) => format!("source {} refused by Waldur: {e}", src.name),
        };
        self.sources.push(rec);
        out
    }

    fn manifest(&self, c: &CreateSpec) -> Value {
        let mut spec = serde_json::Map::new();
        spec.insert("deletionPolicy".into(), json!(c.deletion.as_str()));
        if c.flavour == Flavour::Observe {
            spec.insert("managementPolicy".into(), json!("Observe"));
        }
        let source = |id: &usize| self.sources.iter().find(|s| s.plan.id == *id);
        match &c.import {
            None => {
                spec.insert("tenant".into(), json!(c.tenant));
                spec.insert("policy".into(), json!(c.policy));
                if let Some(n) = &c.spec_name {
                    spec.insert("name".into(), json!(n));
                }
                // Waldur keeps the description on the row the operator makes: the checks
                // tell by it which resource a row was made for (`check::tag`).
                spec.insert("description".into(), json!(check::tag(&c.res)));
            }
            Some(Import::Missing(u)) => {
                spec.insert("import".into(), json!({"uuid": u}));
            }
            Some(Import::SourceUuid(id)) => {
                let uuid = source(id).and_then(|s| s.uuid.clone());
                spec.insert(
                    "import".into(),
                    json!({"uuid": uuid.unwrap_or_else(|| "0".repeat(32))}),
                );
            }
            Some(Import::SourceBackendId(id)) => {
                let s = source(id);
                match s.and_then(|s| s.backend_id.clone()).filter(|b| !b.is_empty()) {
                    Some(b) => spec.insert("import".into(), json!({"backendId": b})),
                    // The source never reached OK: import it by UUID instead.
                    None => spec.insert(
                        "import".into(),
                        json!({"uuid": s.and_then(|s| s.uuid.clone()).unwrap_or_else(|| "0".repeat(32))}),
                    ),
                };
            }
        }
        if c.res.ns == CREDS_NAMESPACE {
            spec.insert("credentialsRef".into(), json!({"name": CREDS_SECRET}));
        }
        json!({
            "apiVersion": "openstack.waldur.com/v1alpha1",
            "kind": "ServerGroup",
            "metadata": {"name": c.res.name, "namespace": c.res.ns},
            "spec": spec,
        })
    }

    /// Reads Kubernetes and Waldur, remembers which group each resource is bound to, and
    /// notes violations that can be seen at any moment.
    async fn look(&mut self, point: usize) {
        let (sgs, truth) = self.snapshot().await;
        remember_rows(
            &mut self.lineage.lock().unwrap_or_else(|e| e.into_inner()),
            &truth.rows,
        );
        for sg in &sgs {
            let (Some(res), Some(uuid)) = (&sg.res, &sg.uuid) else {
                continue;
            };
            if let Some(rec) = self.records.get_mut(res) {
                let backend = truth
                    .row(uuid)
                    .map(|r| r.backend_id.clone())
                    .filter(|b| !b.is_empty())
                    .or_else(|| sg.backend_id.clone())
                    .unwrap_or_default();
                rec.last_bound = Some((uuid.clone(), backend));
            }
        }
        for v in check::during_run(point, &self.records, &sgs, &truth, &mut self.seen) {
            self.note(format!("VIOLATION SEEN: {v}"));
            self.history.push(v);
        }
    }

    /// Writes what a diagnosis needs besides the operator's logs: the Events the operator
    /// published (its account of each binding, create and delete) and the final state of
    /// Kubernetes, Waldur and OpenStack.
    async fn dump(&self, sgs: &[SgView], truth: &Truth) {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(self.client.clone());
        let mut lines = Vec::new();
        match events.list(&ListParams::default()).await {
            Ok(list) => {
                let mut items = list.items;
                items.sort_by_key(|e| {
                    e.event_time
                        .as_ref()
                        .map(|t| t.0)
                        .or(e.deprecated_last_timestamp.as_ref().map(|t| t.0))
                });
                for e in items {
                    let when = e
                        .event_time
                        .as_ref()
                        .map(|t| t.0.to_string())
                        .or(e
                            .deprecated_last_timestamp
                            .as_ref()
                            .map(|t| t.0.to_string()))
                        .unwrap_or_default();
                    let about = e
                        .regarding
                        .as_ref()
                        .map(|r| {
                            format!(
                                "{}/{}",
                                r.namespace.clone().unwrap_or_default(),
                                r.name.clone().unwrap_or_default()
                            )
                        })
                        .unwrap_or_default();
                    lines.push(format!(
                        "{when} {about} {} {} x{}: {}",
                        e.type_.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.deprecated_count.unwrap_or(1),
                        e.note.unwrap_or_default()
                    ));
                }
            }
            Err(e) => lines.push(format!("cannot list Events: {e}")),
        }
        let _ = std::fs::write(
            self.settings.dir.join("events.txt"),
            lines.join("\n") + "\n",
        );
        let mut state = vec!["ServerGroups:".to_string()];
        state.extend(
            sgs.iter()
                .map(|sg| format!("  {} {}", sg.key, sg.describe())),
        );
        state.push("Waldur rows:".into());
        state.extend(truth.rows.iter().map(|r| {
            format!(
                "  {} {:<10} {:<8} tenant={} backend={:?} created={:?} description={:?}",
                r.uuid,
                r.name,
                r.state,
                &r.tenant[..6],
                r.backend_id,
                r.created,
                r.description
            )
        }));
        state.push("Nova groups:".into());
        state.extend(truth.nova.iter().map(|g| {
            format!(
                "  {} {:<10} tenant={}",
                g.backend_id,
                g.name,
                &g.tenant[..6]
            )
        }));
        let _ = std::fs::write(
            self.settings.dir.join("final-state.txt"),
            state.join("\n") + "\n",
        );
    }

    /// Every ServerGroup, every Waldur row, every Nova group.
    async fn snapshot(&self) -> (Vec<SgView>, Truth) {
        let api: Api<ServerGroup> = Api::all(self.client.clone());
        let sgs = match api.list(&ListParams::default()).await {
            Ok(list) => list.items.iter().map(view).collect(),
            Err(e) => {
                eprintln!("cannot list ServerGroups: {e}");
                Vec::new()
            }
        };
        (sgs, truth(&self.sim))
    }

    /// Every fault off, the operator running, one last Waldur re-sync; then waits until the
    /// invariants hold twice in a row or the time is up. Returns whether they did.
    async fn settle(&mut self, points: usize) -> (bool, Duration) {
        let started = Instant::now();
        self.sim.clear_faults();
        if let Err(e) = self.sim.listen_again().await {
            self.note(format!("cannot listen again: {e}"));
        }
        // Held tenant re-syncs run, tenants are repaired, Waldur's clock is on time: without
        // these nothing could settle.
        self.sim.release_tenant_pulls();
        self.sim.reset_tenant_pull_delay();
        self.sim.set_clock_offset(0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        for t in TENANTS {
            if let Some(state) = self
                .sim
                .tenant(t)
                .and_then(|v| v["state"].as_str().map(str::to_string))
                .filter(|s| s != "OK")
            {
                self.sim.set_tenant_ok(t, true);
                self.note(format!("end: tenant {} was {state}, set OK", &t[..6]));
            }
        }
        self.kube.set_watch_delay(Duration::ZERO);
        for sub in [None, Some("status"), Some("*")] {
            self.kube.fail_next(0, "patch", "servergroups", sub, 409);
        }
        self.mind_the_operator(points);
        if !self.operator.is_running() {
            let r = self.restart();
            self.note(r);
        }
        // A paused resource waits for its deletion too; the user unpauses what they deleted.
        let stuck: Vec<ResId> = self
            .records
            .values()
            .filter(|r| r.deleted_at.is_some() && r.paused)
            .map(|r| r.spec.res.clone())
            .collect();
        for res in stuck {
            let r = self
                .merge(
                    &res,
                    json!({"metadata": {"annotations": {ANNOTATION_PAUSED: null}}}),
                )
                .await;
            if let Some(rec) = self.records.get_mut(&res) {
                rec.paused = false;
            }
            self.note(format!("end: unpause deleted {res}: {r}"));
        }
        if self.settings.final_resync {
            // Waldur's re-sync skips a group being pulled; Waldur runs it again two hours
            // later, the campaign only once: so not while a pull (a user's request-pull just
            // before the end) holds a group (seed 423: an ERRED group whose Nova group was
            // deleted out of band kept its row, and the operator had nothing to repair).
            let waited = Instant::now();
            while waited.elapsed() < Duration::from_secs(10)
                && self.sim.groups().iter().any(|g| {
                    let state = g["state"]
                        .as_str()
                        .unwrap_or_default()
                        .to_ascii_uppercase()
                        .replace(' ', "_");
                    matches!(state.as_str(), "UPDATE_SCHEDULED" | "UPDATING")
                })
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let r = self.sim.resync_report();
            self.note(format!(
                "end: all faults off; Waldur's periodic re-sync: deleted {}, imported {}, recovered {}",
                r.deleted.len(),
                r.imported.len(),
                r.recovered.len()
            ));
        } else {
            self.note("end: all faults off".into());
        }
        let deadline = started + self.settings.settle;
        let mut passes = 0;
        // The same violations for longer than a resync period (and its jitter) will not go
        // away by themselves: stop waiting for them.
        let mut last: Vec<String> = Vec::new();
        let mut unchanged_since = Instant::now();
        loop {
            self.mind_the_operator(points);
            self.credentials_back().await;
            let (sgs, truth) = self.snapshot().await;
            let lineage = self.lineage_with(&truth);
            let outcomes = check::check(&check::Input {
                records: &self.records,
                sources: &self.sources,
                sgs: &sgs,
                truth: &truth,
                history: &[],
                crashes: &[],
                told: &[],
                runs: 0,
                lineage: &lineage,
                settled: true,
            });
            let good = outcomes.iter().all(|o| o.violations.is_empty()) && !truth.busy();
            passes = if good { passes + 1 } else { 0 };
            if passes >= 2 {
                let t = started.elapsed();
                self.note(format!("end: settled after {:.1} s", t.as_secs_f64()));
                return (true, t);
            }
            let now: Vec<String> = outcomes
                .iter()
                .flat_map(|o| o.violations.iter().cloned())
                .collect();
            if now != last || now.is_empty() {
                last = now;
                unchanged_since = Instant::now();
            }
            let stuck = unchanged_since.elapsed() >= self.settings.stuck;
            if Instant::now() >= deadline || stuck {
                let t = started.elapsed();
                self.note(format!(
                    "end: not settled after {:.1} s{}; checking as it stands",
                    t.as_secs_f64(),
                    if stuck {
                        format!(
                            " (the same violations for {} s)",
                            self.settings.stuck.as_secs()
                        )
                    } else {
                        String::new()
                    }
                ));
                return (false, t);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Writes the credentials Secret with `token`: made if it is not there, replaced if it is
/// (a Secret being deleted, held by the operator's finalizer, cannot be changed; it is left).
async fn put_credentials(client: &Client, token: &str) -> Result<(), String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), CREDS_NAMESPACE);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(CREDS_SECRET.into()),
            namespace: Some(CREDS_NAMESPACE.into()),
            ..Default::default()
        },
        data: Some(
            [(
                "token".to_string(),
                k8s_openapi::ByteString(token.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    let mut applied = serde_json::to_value(&secret).map_err(|e| e.to_string())?;
    applied["apiVersion"] = json!("v1");
    applied["kind"] = json!("Secret");
    match secrets
        .get_opt(CREDS_SECRET)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(s) if s.metadata.deletion_timestamp.is_some() => Ok(()),
        Some(_) => secrets
            .patch(
                CREDS_SECRET,
                &PatchParams::apply("chaos-user").force(),
                &Patch::Apply(applied),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        None => secrets
            .create(&PostParams::default(), &secret)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    }
}

async fn post(client: &Client, ns: &str, manifest: Value) -> Result<(), String> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource());
    let obj: DynamicObject = serde_json::from_value(manifest).map_err(|e| e.to_string())?;
    api.create(&PostParams::default(), &obj)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn view(sg: &ServerGroup) -> SgView {
    let ns = sg.namespace().unwrap_or_default();
    let res = NAMESPACES.iter().find(|n| **n == ns).map(|n| ResId {
        ns: n,
        name: sg.name_any(),
    });
    let status = sg.status.clone().unwrap_or_default();
    SgView {
        res,
        key: format!("{ns}/{}", sg.name_any()),
        generation: sg.metadata.generation,
        created: sg.metadata.creation_timestamp.as_ref().map(|t| t.0),
        deleting: sg.metadata.deletion_timestamp.is_some(),
        finalizers: sg.finalizers().to_vec(),
        paused: sg.is_paused(),
        uuid: status.uuid.clone(),
        backend_id: status.backend_id.clone(),
        conditions: status
            .conditions
            .iter()
            .map(|c| Cond {
                type_: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                observed_generation: c.observed_generation,
            })
            .collect(),
    }
}

/// Every row in the simulator's table, as the staff API renders it.
fn rows(sim: &Simulator) -> Vec<Row> {
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    sim.groups()
        .iter()
        .map(|g| Row {
            uuid: check::norm(&s(g, "uuid")),
            name: s(g, "name"),
            tenant: check::norm(&s(g, "tenant_uuid")),
            state: s(g, "state"),
            backend_id: s(g, "backend_id"),
            description: s(g, "description"),
            created: g["created"].as_str().and_then(|c| c.parse().ok()),
        })
        .collect()
}

/// Adds rows to what was seen, keeping the backend id a row once had (an unlinked row is
/// gone, but its Nova group, and Waldur's re-import of it, are still the creator's).
fn remember_rows(seen: &mut BTreeMap<String, Row>, rows: &[Row]) {
    for r in rows {
        let backend = match seen.get(&r.uuid) {
            Some(old) if r.backend_id.is_empty() => old.backend_id.clone(),
            _ => r.backend_id.clone(),
        };
        let mut r = r.clone();
        r.backend_id = backend;
        seen.insert(r.uuid.clone(), r);
    }
}

/// Samples the simulator's row table until aborted: the simulator keeps no log of the rows it
/// had, and the checks need to know which row (made for which resource) a Nova group stood
/// for after the row is gone.
async fn watch_rows(sim: Simulator, seen: Arc<Mutex<BTreeMap<String, Row>>>) {
    loop {
        let now = rows(&sim);
        remember_rows(&mut seen.lock().unwrap_or_else(|e| e.into_inner()), &now);
        tokio::time::sleep(SAMPLE).await;
    }
}

fn truth(sim: &Simulator) -> Truth {
    let rows = rows(sim);
    let nova = TENANTS
        .iter()
        .flat_map(|t| {
            sim.openstack_groups(t)
                .into_iter()
                .map(|(backend_id, name, _)| Nova {
                    tenant: check::norm(t),
                    backend_id,
                    name,
                })
        })
        .collect();
    Truth { rows, nova }
}

/// Whether a breaker's "unreachable since T" message names a second before `armed_at`'s.
fn breaker_opened_before(message: &str, armed_at: k8s_openapi::jiff::Timestamp) -> bool {
    message
        .split("unreachable since ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .is_some_and(|since| since.as_second() < armed_at.as_second())
}

/// Whether a breaker's message ("unreachable since T (cause)") gives a cause other than an
/// HTTP 500: then no 500 opened it (review N4 is a breaker opened by one object's 500s).
fn breaker_cause_not_500(message: &str) -> bool {
    message
        .split("unreachable since ")
        .nth(1)
        .and_then(|rest| rest.split_once(" ("))
        .is_some_and(|(_, cause)| !cause.starts_with("HTTP 500"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breaker_opened_by_something_else_than_a_500_is_told_apart() {
        let refused = "Waldur at http://127.0.0.1:37791 is unreachable since 2026-12-07T03:31:51Z (the connection failed: error sending request for url (http://127.0.0.1:37791/api/openstack-tenants/x/): client error (SendRequest): connect…";
        assert!(breaker_cause_not_500(refused));
        let bad_gateway = "Waldur at http://127.0.0.1:1 is unreachable since 2026-12-07T03:31:51Z (HTTP 502: bad gateway); the operator probes it";
        assert!(breaker_cause_not_500(bad_gateway));
        // A breaker opened by 500s is review N4 itself: still a violation.
        let n4 = "Waldur at http://127.0.0.1:1 is unreachable since 2026-12-07T03:31:51Z (HTTP 500: boom); the operator probes it";
        assert!(!breaker_cause_not_500(n4));
        assert!(!breaker_cause_not_500(
            "Waldur is unavailable (create): HTTP 500"
        ));
    }

    #[test]
    fn a_breaker_opened_by_an_earlier_outage_is_told_apart() {
        let m = "Waldur at http://127.0.0.1:39743 is unreachable since 2026-12-07T01:10:45Z (HTTP 503: <html>)";
        let at = |t: &str| t.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
        assert!(breaker_opened_before(m, at("2026-12-07T01:10:47.9Z")));
        assert!(!breaker_opened_before(m, at("2026-12-07T01:10:45.2Z")));
        assert!(!breaker_opened_before(
            "Waldur is unavailable (create): HTTP 500",
            at("2026-12-07T01:10:47Z")
        ));
    }
}
