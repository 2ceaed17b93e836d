//! The simulator handle, its HTTP server loop and its background workers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tower_service::Service;

use crate::config::{DefaultOrder, Delays, SimConfig};
use crate::faults::{AfterCommit, AfterCommitRule, Counters, FailRule, Faults};
use crate::model::State;
use crate::world::{Caller, Job, ResyncReport, TenantJob, TenantPullTiming, World};

/// The error message of a tenant set ERRED by hand (`set_tenant_ok(uuid, false)`).
pub(crate) const TENANT_ERRED_BY_HAND: &str = "Tenant marked as erred by the simulator.";

/// State shared by the handle, the HTTP handlers and the workers.
pub(crate) struct Shared {
    world: Mutex<World>,
    faults: Mutex<Faults>,
    counters: Mutex<Counters>,
    pub base_url: String,
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    /// Bumped whenever the tenant-pull timing changes or pulls are released, so a pull waiting
    /// in a phase looks again (a pull that would never run wakes up).
    tenant_pulls: watch::Sender<u64>,
    /// Stops the current listener and its connections (`None`: not listening), so that an
    /// outage can refuse connections while the world survives.
    listening: Mutex<Option<watch::Sender<bool>>>,
}

/// Poisoning only means another thread panicked mid-update; the data is still usable for a test
/// server, and refusing to serve would hide the original panic behind a cascade of new ones.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn world(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }
    pub fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }
    pub fn counters(&self) -> MutexGuard<'_, Counters> {
        lock(&self.counters)
    }
}

/// Lets a request handler close its own connection without answering (injected drop).
#[derive(Clone)]
pub(crate) struct ConnCtl(pub Arc<Notify>);

/// Runs an accepted operation's state transitions in the background, as Waldur's Celery workers do.
pub(crate) fn spawn_job(shared: &Arc<Shared>, job: Job) {
    let shared = Arc::clone(shared);
    let delays = shared.world().delays;
    tokio::spawn(async move {
        match job {
            Job::Create {
                uuid,
                gen_,
                failure,
            } => {
                tokio::time::sleep(delays.schedule).await;
                if !shared
                    .world()
                    .advance(&uuid, gen_, State::CreationScheduled, State::Creating)
                {
                    return;
                }
                tokio::time::sleep(delays.run).await;
                shared.world().finish_create(&uuid, gen_, failure);
            }
            Job::Delete {
                uuid,
                gen_,
                fail,
                was_ok,
            } => {
                tokio::time::sleep(delays.schedule).await;
                if !shared
                    .world()
                    .advance(&uuid, gen_, State::DeletionScheduled, State::Deleting)
                {
                    return;
                }
                tokio::time::sleep(delays.run).await;
                shared.world().finish_delete(&uuid, gen_, fail, was_ok);
            }
            Job::Pull { uuid, gen_ } => {
                tokio::time::sleep(delays.schedule).await;
                if !shared
                    .world()
                    .advance(&uuid, gen_, State::UpdateScheduled, State::Updating)
                {
                    return;
                }
                tokio::time::sleep(delays.run).await;
                shared.world().finish_pull(&uuid, gen_);
            }
        }
    });
}

/// Runs a tenant pull as Waldur's action executor does: `UPDATE_SCHEDULED` for the schedule
/// time, then `UPDATING`; halfway through it the re-sync changes the rows, and at its end the
/// tenant goes back to OK. Each step stops if something else took the tenant over.
pub(crate) fn spawn_tenant_pull(shared: &Arc<Shared>, job: TenantJob) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        wait_tenant_phase(&shared, &job, |d| d.schedule).await;
        if !shared
            .world()
            .advance_tenant(&job, State::UpdateScheduled, State::Updating)
        {
            return;
        }
        wait_tenant_phase(&shared, &job, |d| d.run / 2).await;
        if !shared.world().run_tenant_pull(&job) {
            return;
        }
        wait_tenant_phase(&shared, &job, |d| d.run.saturating_sub(d.run / 2)).await;
        shared.world().finish_tenant_pull(&job);
    });
}

/// Waits out one phase of a tenant pull (`part` picks its length from the current timing).
/// Returns at once when the pulls were released after this one was accepted; waits forever
/// while the timing is "never"; when the timing changes mid-wait, waits the new length from
/// the change.
async fn wait_tenant_phase(shared: &Shared, job: &TenantJob, part: impl Fn(Delays) -> Duration) {
    // Subscribed before reading the timing, so a change made in between is not missed.
    let mut changes = shared.tenant_pulls.subscribe();
    loop {
        let (times, releases) = {
            let world = shared.world();
            (world.tenant_pull_times(), world.tenant_releases)
        };
        if releases != job.release_epoch {
            return;
        }
        match times {
            None => {
                if changes.changed().await.is_err() {
                    return;
                }
            }
            Some(times) => {
                tokio::select! {
                    _ = tokio::time::sleep(part(times)) => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
            }
        }
    }
}

/// A running simulated Waldur. Cheap to clone; all clones drive the same server.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("base_url", &self.shared.base_url)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Starts a simulator on an ephemeral port of 127.0.0.1.
    pub async fn start(config: SimConfig) -> std::io::Result<Simulator> {
        Self::start_on(config, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)).await
    }

    /// Starts a simulator on the given address (port 0 = ephemeral).
    pub async fn start_on(config: SimConfig, addr: SocketAddr) -> std::io::Result<Simulator> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        // A wildcard bind is reachable on loopback; URLs must name a concrete host.
        let url_addr = if local.ip().is_unspecified() {
            let ip = match local.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            };
            SocketAddr::new(ip, local.port())
        } else {
            local
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            world: Mutex::new(World::new(&config)),
            faults: Mutex::new(Faults::default()),
            counters: Mutex::new(Counters::default()),
            base_url: format!("http://{url_addr}"),
            addr: local,
            shutdown,
            tenant_pulls: watch::channel(0).0,
            listening: Mutex::new(None),
        });
        serve(&shared, listener);
        if let Some(every) = config.resync_interval.filter(|d| !d.is_zero()) {
            tokio::spawn(resync_loop(Arc::clone(&shared), every, shutdown_rx));
        }
        tracing::info!(base_url = %shared.base_url, "Waldur simulator listening");
        Ok(Simulator { shared })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The bound socket address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.shared.addr
    }

    /// Stops accepting connections and closes open ones. Background workers finish quietly.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// An outage that refuses connections: the port is closed and open connections are cut,
    /// but Waldur's database (and OpenStack) stay as they are and background operations go
    /// on, as when Waldur's web server is restarted. [`Simulator::listen_again`] ends it.
    pub fn stop_listening(&self) {
        if let Some(stop) = lock(&self.shared.listening).take() {
            stop.send_replace(true);
        }
    }

    /// Listens again on the same address after [`Simulator::stop_listening`] (a no-op while
    /// listening). Retries for a moment while the old socket is being closed.
    pub async fn listen_again(&self) -> std::io::Result<()> {
        if lock(&self.shared.listening).is_some() {
            return Ok(());
        }
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.shared.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 && e.kind() == std::io::ErrorKind::AddrInUse => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        serve(&self.shared, listener);
        Ok(())
    }

    /// Whether the simulator accepts connections now.
    pub fn is_listening(&self) -> bool {
        lock(&self.shared.listening).is_some()
    }

    // ----- counters -----

    /// Requests to one endpoint (`list`, `count`, `retrieve`, `create`, `create_collection`,
    /// `pull`, `delete`, `unlink`, `set_erred`, `set_ok`, `pull_server_groups`, `tenant_list`,
    /// `tenant_retrieve`, `tenant_pull`, `tenant_set_ok`, `tenant_set_erred`, `update`, `other`).
    pub fn requests(&self, endpoint: &str) -> u64 {
        self.shared.counters().get(endpoint)
    }

    /// All `/api/...` requests, faulted ones included.
    pub fn total_requests(&self) -> u64 {
        self.shared.counters().total
    }

    /// The most `/api/...` requests that were being answered at once.
    pub fn peak_in_flight(&self) -> u64 {
        self.shared.counters().peak_in_flight
    }

    /// When each `/api/...` request arrived, in order.
    pub fn arrivals(&self) -> Vec<std::time::Instant> {
        self.shared.counters().arrivals.clone()
    }

    pub fn reset_counters(&self) {
        self.shared.counters().reset();
    }

    /// `{"total": n, "endpoints": {...}}`, as `GET /__sim/stats` serves it.
    pub fn stats(&self) -> serde_json::Value {
        self.shared.counters().to_json()
    }

    // ----- out of band -----

    /// Every row, oldest first, as the staff API renders it.
    pub fn groups(&self) -> Vec<serde_json::Value> {
        let world = self.shared.world();
        world
            .rows_sorted()
            .into_iter()
            .map(|r| world.render(r, &self.shared.base_url))
            .collect()
    }

    /// One row (UUID dashed or not), as the staff API renders it.
    pub fn group(&self, uuid: &str) -> Option<serde_json::Value> {
        let world = self.shared.world();
        world
            .visible_row(crate::world::Caller::Staff, uuid)
            .map(|r| world.render(r, &self.shared.base_url))
    }

    /// Adds a tenant in state OK. The user token sees it when `user_tenants` was empty.
    pub fn add_tenant(&self, uuid: &str) {
        self.shared.world().add_tenant(uuid, false);
    }

    /// Adds a tenant and says whether the user token may see it (when not seeing all tenants).
    pub fn add_tenant_with_visibility(&self, uuid: &str, user_visible: bool) {
        let mut world = self.shared.world();
        let id = world.add_tenant(uuid, user_visible);
        if let Some(t) = world.tenants.get_mut(&id) {
            t.user_visible = user_visible;
        }
    }

    /// `true`: the tenant is OK (error fields cleared). `false`: the tenant is ERRED with an
    /// error message, so every tenant action (`create_server_group`, `pull_server_groups`)
    /// answers 409. Either way a tenant pull in flight on it stops.
    pub fn set_tenant_ok(&self, uuid: &str, ok: bool) {
        let (state, message) = if ok {
            (State::Ok, "")
        } else {
            (State::Erred, TENANT_ERRED_BY_HAND)
        };
        self.shared
            .world()
            .set_tenant_state(uuid, state, message, "");
    }

    /// Puts a tenant in a state (`OK`, `ERRED`, `UPDATE_SCHEDULED`, `UPDATING`, either
    /// vocabulary) with this error message (kept only for ERRED), and stops any tenant pull in
    /// flight on it: a transitional state stays until something else changes it. False if there
    /// is no such tenant or state.
    pub fn set_tenant_state(&self, uuid: &str, state: &str, error_message: &str) -> bool {
        match State::parse_any(state).filter(|s| s.is_tenant_state()) {
            Some(st) => self
                .shared
                .world()
                .set_tenant_state(uuid, st, error_message, ""),
            None => false,
        }
    }

    /// The tenant (UUID dashed or not) as the staff API renders it
    /// (`GET /api/openstack-tenants/{uuid}/`).
    pub fn tenant(&self, uuid: &str) -> Option<serde_json::Value> {
        let world = self.shared.world();
        world
            .visible_tenant(Caller::Staff, uuid)
            .map(|t| world.render_tenant(t, &self.shared.base_url))
    }

    /// Deletes a group in OpenStack, by Nova id or by the Waldur row UUID. False if none.
    pub fn openstack_delete(&self, backend_id: &str) -> bool {
        self.shared.world().openstack_delete(backend_id)
    }

    /// Creates a group directly in OpenStack; the next re-sync imports it. Returns the Nova id.
    pub fn openstack_create(&self, tenant_uuid: &str, name: &str, policy: &str) -> String {
        self.shared
            .world()
            .openstack_create(tenant_uuid, name, policy)
    }

    /// Changes a group's name and/or policy in OpenStack (seen by pull and re-sync).
    pub fn openstack_update(
        &self,
        backend_id: &str,
        name: Option<&str>,
        policy: Option<&str>,
    ) -> bool {
        self.shared
            .world()
            .openstack_update(backend_id, name, policy)
    }

    /// `(backend_id, name, policy)` of every group OpenStack has in the tenant.
    pub fn openstack_groups(&self, tenant_uuid: &str) -> Vec<(String, String, String)> {
        let id =
            crate::model::normalize_uuid(tenant_uuid).unwrap_or_else(|| tenant_uuid.to_string());
        self.shared
            .world()
            .openstack
            .get(&id)
            .map(|gs| {
                gs.iter()
                    .map(|g| (g.backend_id.clone(), g.name.clone(), g.policy.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Puts a row in a state (either vocabulary accepted) and stops any worker on it; a
    /// transitional state stays until something else changes it. False if no such row or state.
    pub fn force_state(&self, uuid: &str, state: &str) -> bool {
        match State::parse_any(state) {
            Some(st) => self.shared.world().force_state(uuid, st),
            None => false,
        }
    }

    /// Replaces the VMs attached to a group: `(name, backend_id)` each.
    pub fn set_instances(&self, uuid: &str, instances: Vec<(String, String)>) -> bool {
        self.shared.world().set_instances(uuid, instances)
    }

    /// The next `n` accepted creates end ERRED in OpenStack.
    pub fn fail_next_creates(&self, n: usize) {
        self.shared.world().fail_creates = n;
    }

    /// The next `n` accepted `pull_server_groups` fail in OpenStack (the Nova list answers 500):
    /// no row changes, and the tenant ends ERRED with `error_message` set, so every tenant
    /// action answers 409 until staff pull the tenant (`POST .../pull/`), `set_ok` it (8.x), or
    /// the periodic re-sync recovers it.
    pub fn fail_next_tenant_pulls(&self, n: usize) {
        self.shared.world().fail_tenant_pulls = n;
    }

    /// The next `n` accepted deletes fail in OpenStack (OK → ERRED; from ERRED the row still goes).
    pub fn fail_next_deletes(&self, n: usize) {
        self.shared.world().fail_deletes = n;
    }

    /// While `true`, OpenStack refuses every server-group delete: a DELETE from OK goes
    /// `DELETION_SCHEDULED` → `DELETING` → `ERRED` (error fields set, the Nova group stays); a
    /// DELETE from ERRED still removes the row and leaves the Nova group, which the next tenant
    /// re-sync imports under a new UUID. Cleared by [`Simulator::clear_faults`].
    pub fn openstack_refuse_deletes(&self, refuse: bool) {
        self.shared.world().refuse_deletes = refuse;
    }

    /// The list's order when a request has no `o=` (lists from now on).
    pub fn set_default_order(&self, order: DefaultOrder) {
        self.shared.world().default_order = order;
    }

    /// Another Waldur user (staff) creates a group through the tenant action, behind the
    /// operator's back: the row starts in `CREATION_SCHEDULED` and the workers run as for any
    /// create. No faults apply and nothing is counted. Returns the new UUID, or the API's
    /// refusal (for example a name already taken in the tenant).
    pub fn waldur_create(
        &self,
        tenant_uuid: &str,
        name: &str,
        policy: &str,
    ) -> Result<String, String> {
        let body = serde_json::json!({"name": name, "policy": policy}).to_string();
        let (uuid, job) = self
            .shared
            .world()
            .create(Caller::Staff, tenant_uuid, body.as_bytes())
            .map_err(|e| e.to_string())?;
        spawn_job(&self.shared, job);
        Ok(uuid)
    }

    /// Another Waldur user (staff) sends DELETE for the group, behind the operator's back:
    /// the same rules as the API (409 outside OK and ERRED), the same background deletion.
    pub fn waldur_delete(&self, uuid: &str) -> Result<(), String> {
        let job = self
            .shared
            .world()
            .delete(Caller::Staff, uuid)
            .map_err(|e| e.to_string())?;
        spawn_job(&self.shared, job);
        Ok(())
    }

    /// A staff user unlinks the group behind the operator's back: Waldur's record goes at
    /// once, OpenStack keeps the group, and the next tenant re-sync imports it under a new
    /// UUID. False if there is no such row.
    pub fn waldur_unlink(&self, uuid: &str) -> bool {
        self.shared.world().unlink(Caller::Staff, uuid).is_ok()
    }

    /// Runs Waldur's tenant re-sync now.
    pub async fn resync_now(&self) {
        self.shared.world().resync();
    }

    /// Runs the re-sync now and says what it changed.
    pub fn resync_report(&self) -> ResyncReport {
        self.shared.world().resync()
    }

    /// Changes worker timing for operations accepted from now on.
    pub fn set_delays(&self, delays: Delays) {
        self.shared.world().delays = delays;
    }

    /// How long a tenant pull (`pull_server_groups`) holds its tenant: `Some(d)` = `d` in all
    /// (half `UPDATE_SCHEDULED`, half `UPDATING`); `None` = the worker never runs it, so the
    /// tenant stays `UPDATE_SCHEDULED` (409 on every tenant action) until
    /// [`Simulator::release_tenant_pulls`] or another delay is set, after which the pending
    /// pulls complete (a pull already waiting waits the new delay from now). By default tenant
    /// pulls follow the server-group delays (schedule + run).
    pub fn set_tenant_pull_delay(&self, delay: Option<Duration>) {
        self.set_tenant_pull_timing(match delay {
            Some(d) => TenantPullTiming::After(d),
            None => TenantPullTiming::Never,
        });
    }

    /// Tenant pulls follow the server-group delays again (the default).
    pub fn reset_tenant_pull_delay(&self) {
        self.set_tenant_pull_timing(TenantPullTiming::FollowGroups);
    }

    fn set_tenant_pull_timing(&self, timing: TenantPullTiming) {
        set_tenant_pull_timing(&self.shared, timing);
    }

    /// Waldur's clock runs `seconds` ahead of ours (negative: behind): every `created` and
    /// `modified` the simulator writes from now on is shifted by it. Timestamps already
    /// written keep their value.
    pub fn set_clock_offset(&self, seconds: i64) {
        self.shared.world().clock_offset = seconds.saturating_mul(1_000_000);
    }

    /// Every tenant pull accepted so far completes now (re-sync, then OK), whatever the delay;
    /// pulls accepted later wait as usual.
    pub fn release_tenant_pulls(&self) {
        release_tenant_pulls(&self.shared);
    }

    // ----- faults (apply to /api/... only) -----

    /// Added before every request is handled.
    pub fn set_latency(&self, d: Duration) {
        self.shared.faults().latency = d;
    }

    /// The next `n` requests, whatever the endpoint, answer `status` with an HTML body.
    pub fn fail_next_requests(&self, n: usize, status: u16) {
        self.add_fail_rule(n, status, None);
    }

    /// The next `n` requests to `endpoint` (a counter name) answer `status` with an HTML body.
    pub fn fail_next_requests_for(&self, endpoint: &str, n: usize, status: u16) {
        self.add_fail_rule(n, status, Some(endpoint.to_string()));
    }

    fn add_fail_rule(&self, n: usize, status: u16, endpoint: Option<String>) {
        if n > 0 {
            self.shared.faults().fail_rules.push(FailRule {
                remaining: n,
                status,
                endpoint,
            });
        }
    }

    /// Burst mode: every request answers `status` until called with `None`.
    pub fn set_failing(&self, status: Option<u16>) {
        self.shared.faults().failing = status;
    }

    /// The next `n` requests get their connection closed without any response.
    pub fn drop_next_connections(&self, n: usize) {
        self.shared.faults().drop_next = n;
    }

    /// Response bodies are sent in a few chunks with this delay before each; `None` = normal.
    pub fn set_slow_body(&self, d: Option<Duration>) {
        self.shared.faults().slow_body = d;
    }

    /// The next `n` requests to `endpoint` (a counter name, or any with `None`) that succeed
    /// are carried out at once and answered `delay` later: a create is committed (and its
    /// workers run) while the client still waits for its 201.
    pub fn delay_answers_after_commit(&self, endpoint: Option<&str>, n: usize, delay: Duration) {
        self.add_after_commit(endpoint, n, AfterCommit::Delay(delay));
    }

    /// The next `n` requests to `endpoint` (or any) that succeed are carried out, and then
    /// their connection is closed without an answer: "commit, then drop the answer".
    pub fn drop_answers_after_commit(&self, endpoint: Option<&str>, n: usize) {
        self.add_after_commit(endpoint, n, AfterCommit::Drop);
    }

    fn add_after_commit(&self, endpoint: Option<&str>, n: usize, action: AfterCommit) {
        if n > 0 {
            self.shared.faults().after_commit.push(AfterCommitRule {
                remaining: n,
                endpoint: endpoint.map(str::to_string),
                action,
            });
        }
    }

    /// Clears every request fault (latency, failures, drops, slow bodies) and OpenStack failures.
    pub fn clear_faults(&self) {
        *self.shared.faults() = Faults::default();
        let mut world = self.shared.world();
        world.fail_creates = 0;
        world.fail_deletes = 0;
        world.fail_tenant_pulls = 0;
        world.refuse_deletes = false;
    }
}

pub(crate) fn release_tenant_pulls(shared: &Shared) {
    shared.world().tenant_releases += 1;
    shared.tenant_pulls.send_modify(|n| *n += 1);
    tracing::info!("pending tenant pulls released");
}

pub(crate) fn set_tenant_pull_timing(shared: &Shared, timing: TenantPullTiming) {
    shared.world().tenant_pull_timing = timing;
    shared.tenant_pulls.send_modify(|n| *n += 1);
}

/// Resolves once shutdown was requested (or the handle is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send; drop it here, not in the caller's select.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Starts an accept loop on `listener`, stopped by shutdown or by `stop_listening`.
fn serve(shared: &Arc<Shared>, listener: TcpListener) {
    let (stop, stop_rx) = watch::channel(false);
    *lock(&shared.listening) = Some(stop);
    let router = crate::api::router(Arc::clone(shared));
    tokio::spawn(accept_loop(
        listener,
        router,
        shared.shutdown.subscribe(),
        stop_rx,
    ));
}

/// Resolves once either switch is on.
async fn either_stopped(a: &mut watch::Receiver<bool>, b: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = stopped(a) => {}
        _ = stopped(b) => {}
    }
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    shutdown: watch::Receiver<bool>,
    listening: watch::Receiver<bool>,
) {
    let (mut stop, mut suspend) = (shutdown.clone(), listening.clone());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio::spawn(serve_connection(stream, router.clone(), shutdown.clone(), listening.clone()));
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            _ = either_stopped(&mut stop, &mut suspend) => break,
        }
    }
    tracing::info!("Waldur simulator stopped listening");
}

/// Serves one connection with hyper directly (not `axum::serve`) so a handler can make the
/// connection vanish mid-request: that is how injected drops look like resets to clients.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    mut listening: watch::Receiver<bool>,
) {
    let ctl = ConnCtl(Arc::new(Notify::new()));
    let req_ctl = ctl.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(req_ctl.clone());
        let mut router = router.clone();
        async move { router.call(req).await }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = &mut conn => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = ctl.0.notified() => {
            tracing::debug!("dropping connection (injected fault)");
        }
        _ = either_stopped(&mut shutdown, &mut listening) => {}
    }
}

async fn resync_loop(shared: Arc<Shared>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick fires at once; Waldur's first re-sync comes a period after start.
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                shared.world().resync();
            }
            _ = stopped(&mut shutdown) => break,
        }
    }
}
