//! The operator process: everything `waldur-operator run` wires together (the Waldur budget,
//! metrics, probes, the admin port, leader election, the controller), in one place that the
//! binary and the sandbox both call, so that what the tests run and what users run cannot
//! drift apart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::{Api, Client};

use crate::api::ServerGroup;
use crate::controller::credentials::AllowedHosts;
use crate::controller::index::ReadPath;
use crate::controller::{self, ClientCache, DefaultCredentials, Settings};
use crate::kube_budget::KubeBudget;
use crate::leader::{self, LeaseSettings};
use crate::metrics::Metrics;
use crate::server::{self, Health};
use crate::sharding::Shard;
use crate::telemetry::LogControl;
use crate::waldur::{ClientSettings, Limiter, Limits};

/// What the operator runs with: the command line, parsed.
#[derive(Clone, Debug)]
pub struct Options {
    /// Timeouts and TLS settings of every Waldur client (`url` and `token` are ignored).
    pub waldur: ClientSettings,
    /// The operator's own Waldur address and token, for resources without credentialsRef.
    pub defaults: DefaultCredentials,
    /// One budget for every request to Waldur, whatever the credentials.
    pub limits: Limits,
    /// Requests in flight to one Waldur other than the default one (`None`: a quarter of
    /// `limits.max_in_flight`): one slow Secret `url` cannot take every slot (review N5).
    pub waldur_max_in_flight_per_url: Option<usize>,
    /// The hosts a Secret's `url` may name; empty: any.
    pub allowed_waldur_hosts: AllowedHosts,
    /// Watch one namespace; all when empty.
    pub namespace: String,
    pub settings: Settings,
    pub concurrency: u16,
    pub read_path: ReadPath,
    pub busy_sweep: Duration,
    pub metrics_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    /// Leader election; `None` reconciles at once.
    pub lease: Option<LeaseSettings>,
    /// The operator's own namespace: its claims on Waldur groups live there.
    pub claims_namespace: String,
    /// The part of the resources this process reconciles (scale-out); every one by default.
    pub shard: Shard,
    /// The budget of Kubernetes requests (`--kube-qps`, `--kube-burst`); `None`: unlimited.
    pub kube_budget: Option<Arc<KubeBudget>>,
}

/// The Waldur clients of the process: every one of them, the defaults' included, shares one
/// limiter and reports to the metrics. Bad settings (a malformed URL or CA bundle) of the
/// default credentials stop the start, not the first reconcile.
pub fn credentials(options: &Options, metrics: &Metrics) -> Result<Arc<ClientCache>, String> {
    let limiter = Arc::new(
        Limiter::new(options.limits).with_per_waldur_cap(options.waldur_max_in_flight_per_url),
    );
    let cache = ClientCache::new(
        options.waldur.clone(),
        options.defaults.clone(),
        limiter,
        Arc::new(metrics.clone()),
    )
    .with_allowed_hosts(options.allowed_waldur_hosts.clone())
    // As the read index drops a shard: every resource reconciles once per resync period.
    .with_idle_after(options.settings.resync_period * 3);
    if let (Some(url), Some(token)) = (&options.defaults.url, &options.defaults.token) {
        cache.client(url, token).map_err(|e| e.to_string())?;
    }
    Ok(Arc::new(cache))
}

/// Runs the operator until `shutdown` resolves. Returns an error, for a non-zero exit, when
/// it cannot start or when leader election ends on its own.
pub async fn run(
    options: Options,
    kube: Client,
    logs: Option<LogControl>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    // Leader election keeps a client of its own, outside the budget (see kube_budget).
    let leader_kube = kube.clone();
    let kube = match &options.kube_budget {
        Some(budget) => crate::kube_budget::budgeted(kube, budget.clone()),
        None => kube,
    };
    let metrics = Metrics::new()
        .with_shard(options.shard)
        .with_kube_budget(options.kube_budget.as_deref());
    let credentials = credentials(&options, &metrics)?;
    if options.defaults.url.is_none() || options.defaults.token.is_none() {
        tracing::warn!(
            "no default Waldur URL or token: only resources with a credentialsRef can be reconciled"
        );
    }
    if options.waldur.insecure_skip_tls_verify {
        tracing::warn!(
            "TLS verification of Waldur is OFF (--waldur-insecure-skip-tls-verify): anyone on the path can read the token"
        );
    }
    let (api, secrets): (Api<ServerGroup>, Api<PartialObjectMeta<Secret>>) =
        if options.namespace.is_empty() {
            (Api::all(kube.clone()), Api::all(kube.clone()))
        } else {
            (
                Api::namespaced(kube.clone(), &options.namespace),
                Api::namespaced(kube.clone(), &options.namespace),
            )
        };
    check_crd(&api).await?;
    let health = Arc::new(Health::new(options.lease.is_some()));
    let listener = server::listen(options.metrics_addr).map_err(|e| {
        format!(
            "cannot listen on --metrics-addr {}: {e}",
            options.metrics_addr
        )
    })?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(server::serve(
        listener,
        server::router(metrics.clone(), health.clone()),
        leader::stopped(stop_rx.clone()),
    ));
    if let (Some(addr), Some(logs)) = (options.admin_addr, logs) {
        let admin = server::listen(addr)
            .map_err(|e| format!("cannot listen on --admin-addr {addr}: {e}"))?;
        tokio::spawn(server::serve(
            admin,
            server::admin_router(logs),
            leader::stopped(stop_rx.clone()),
        ));
    }
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let tenant_pulls = Arc::new(controller::tenant_pulls::TenantPulls::default());
    let runtime = || controller::Runtime {
        kube: kube.clone(),
        api: api.clone(),
        secrets: secrets.clone(),
        settings: options.settings.clone(),
        credentials: credentials.clone(),
        concurrency: options.concurrency,
        read_path: options.read_path,
        busy_sweep: options.busy_sweep,
        metrics: metrics.clone(),
        health: health.clone(),
        claims_namespace: options.claims_namespace.clone(),
        shard: options.shard,
        tenant_pulls: tenant_pulls.clone(),
    };
    tracing::info!(
        namespace = if options.namespace.is_empty() { "(all)" } else { &options.namespace },
        resync = ?options.settings.resync_period,
        concurrency = options.concurrency,
        max_in_flight = options.limits.max_in_flight,
        rate = options.limits.rate_per_second,
        kube_qps = options.kube_budget.as_ref().map_or(0.0, |b| b.qps()),
        kube_burst = options.kube_budget.as_ref().map_or(0, |b| b.burst()),
        leader_elect = options.lease.is_some(),
        shard = options.shard.index,
        total_shards = options.shard.total,
        default_credentials_namespaces = %options.defaults.scope.describe(),
        allowed_waldur_hosts = %options.allowed_waldur_hosts.describe(),
        max_in_flight_per_url = options
            .waldur_max_in_flight_per_url
            .unwrap_or_else(|| Limiter::default_per_waldur_cap(options.limits.max_in_flight)),
        metrics_addr = %options.metrics_addr,
        "waldur-operator {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let outcome = match &options.lease {
        Some(lease) => {
            leader::run_when_leading(
                &leader_kube,
                lease,
                &health,
                &metrics,
                stop_rx.clone(),
                runtime,
            )
            .await
        }
        None => {
            health.leader.store(true, Ordering::SeqCst);
            metrics.set_leader(true);
            controller::run(runtime(), leader::stopped(stop_rx.clone())).await;
            Ok(())
        }
    };
    if outcome.is_ok() {
        let _ = server.await;
        tracing::info!("stopped");
    }
    outcome
}

async fn check_crd(api: &Api<ServerGroup>) -> Result<(), String> {
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(
            "the ServerGroup CRD is not installed in this cluster. Install it with \
             `kubectl apply -f crds/` (or `waldur-operator crd | kubectl apply -f -`) and start again"
                .into(),
        ),
        Err(kube::Error::Api(e)) if e.code == 403 => Err(format!(
            "not allowed to list ServerGroups ({}): check the operator's RBAC (the chart's ClusterRole, or a Role when it watches one namespace)",
            e.message
        )),
        Err(e) => Err(format!("cannot list ServerGroups: {e}")),
    }
}
