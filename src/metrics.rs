//! Prometheus metrics: reconciles, Waldur requests, resources by state, leadership, build.

use crate::sharding::Shard;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::ServerGroup;
use crate::waldur::{Endpoint, Observer};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    /// The HTTP status, or `none` when no answer came.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaldurLabel {
    /// The Waldur's base URL (never a token).
    pub waldur: String,
}

/// Which shard a replica serves: leadership is per shard.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: String,
    pub shards: String,
}

impl From<Shard> for ShardLabels {
    fn from(s: Shard) -> Self {
        Self {
            shard: s.index.to_string(),
            shards: s.total.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
}

/// Every metric the operator exports. Cheap to clone: the families share their storage.
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    pub waldur_requests: Family<RequestLabels, Counter>,
    pub waldur_request_duration: Family<EndpointLabel, Histogram>,
    pub waldur_queue_wait: Histogram,
    pub resources: Family<StateLabel, Gauge>,
    leader: Family<ShardLabels, Gauge>,
    shard: ShardLabels,
    /// 1 while this replica holds its shard's lease but waits for the other shards to agree
    /// on their number (a change of --total-shards being rolled out).
    pub shard_waiting: Gauge,
    pub waldur_unreachable: Family<WaldurLabel, Gauge>,
    pub waldur_refused: Family<EndpointLabel, Counter>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("waldur_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by result (success, error)",
            reconciles.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "How long one reconcile took",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles by reason (the Synced condition's reason)",
            reconcile_errors.clone(),
        );
        let waldur_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "waldur_requests",
            "Requests to Waldur by endpoint and HTTP status",
            waldur_requests.clone(),
        );
        let waldur_request_duration = Family::<EndpointLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.005, 2.0, 14))) as fn() -> Histogram,
        );
        registry.register(
            "waldur_request_duration_seconds",
            "Latency of Waldur requests by endpoint",
            waldur_request_duration.clone(),
        );
        let waldur_queue_wait = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "waldur_queue_wait_seconds",
            "Time a Waldur request waited for the limiter (rate and in-flight bound)",
            waldur_queue_wait.clone(),
        );
        let resources = Family::<StateLabel, Gauge>::default();
        registry.register(
            "resources",
            "ServerGroups by observed Waldur state (UNKNOWN before the first observation)",
            resources.clone(),
        );
        let leader = Family::<ShardLabels, Gauge>::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease of its shard",
            leader.clone(),
        );
        let shard = ShardLabels::from(Shard::ALL);
        leader.get_or_create(&shard).set(0);
        let shard_waiting = Gauge::default();
        registry.register(
            "shard_waiting",
            "1 while this replica holds its shard's lease but waits for every shard to run with the same --total-shards",
            shard_waiting.clone(),
        );
        let waldur_unreachable = Family::<WaldurLabel, Gauge>::default();
        registry.register(
            "waldur_unreachable",
            "1 while the breaker of this Waldur is open: requests are held, one probe a second",
            waldur_unreachable.clone(),
        );
        let waldur_refused = Family::<EndpointLabel, Counter>::default();
        registry.register(
            "waldur_requests_held",
            "Requests not sent because the breaker of their Waldur was open",
            waldur_refused.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("build_info", "The running version", build);
        Self {
            reconciles,
            reconcile_duration,
            reconcile_errors,
            waldur_requests,
            waldur_request_duration,
            waldur_queue_wait,
            resources,
            leader,
            shard,
            shard_waiting,
            waldur_unreachable,
            waldur_refused,
            registry: Arc::new(registry),
        }
    }

    /// Reports the Kubernetes budget's counters, when there is a budget.
    pub fn with_kube_budget(mut self, budget: Option<&crate::kube_budget::KubeBudget>) -> Self {
        if let (Some(budget), Some(registry)) = (budget, Arc::get_mut(&mut self.registry)) {
            let kube_requests = Counter::clone(&budget.stats.requests);
            registry.register(
                "kube_requests",
                "Requests to the Kubernetes API server through the budget (--kube-qps, --kube-burst); leader election is outside it",
                kube_requests,
            );
            let kube_requests_throttled = Counter::clone(&budget.stats.throttled);
            registry.register(
                "kube_requests_throttled",
                "Requests to the Kubernetes API server that waited for the budget",
                kube_requests_throttled,
            );
            let kube_throttle_wait_seconds =
                Counter::<f64, std::sync::atomic::AtomicU64>::clone(&budget.stats.waited_seconds);
            registry.register(
                "kube_throttle_wait_seconds",
                "Seconds requests to the Kubernetes API server waited for the budget, summed",
                kube_throttle_wait_seconds,
            );
        }
        self
    }

    /// Labels leadership with this process's shard.
    pub fn with_shard(mut self, shard: Shard) -> Self {
        self.leader.clear();
        self.shard = shard.into();
        self.leader.get_or_create(&self.shard).set(0);
        self
    }

    /// Whether this replica reconciles its shard now.
    pub fn set_leader(&self, leading: bool) {
        self.leader
            .get_or_create(&self.shard)
            .set(i64::from(leading));
    }

    /// The metrics in the OpenMetrics text format (what `/metrics` serves).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn reconciled(&self, elapsed: Duration, error_reason: Option<&str>) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        let result = if error_reason.is_some() {
            "error"
        } else {
            "success"
        };
        self.reconciles
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
        if let Some(reason) = error_reason {
            self.reconcile_errors
                .get_or_create(&ReasonLabel {
                    reason: reason.into(),
                })
                .inc();
        }
    }

    /// Recounts resources by state from the controller's cache.
    pub fn count_resources(&self, groups: &[Arc<ServerGroup>]) {
        let mut counts = std::collections::BTreeMap::<String, i64>::new();
        for sg in groups {
            let state = sg
                .status
                .as_ref()
                .and_then(|s| s.state.clone())
                .unwrap_or_else(|| "UNKNOWN".into());
            *counts.entry(state).or_default() += 1;
        }
        self.resources.clear();
        for (state, n) in counts {
            self.resources.get_or_create(&StateLabel { state }).set(n);
        }
    }
}

impl Observer for Metrics {
    fn observe(
        &self,
        endpoint: Endpoint,
        status: Option<u16>,
        elapsed: Duration,
        queued: Duration,
    ) {
        self.waldur_requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.as_str().into(),
                status: status.map_or_else(|| "none".into(), |s| s.to_string()),
            })
            .inc();
        self.waldur_request_duration
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.as_str().into(),
            })
            .observe(elapsed.as_secs_f64());
        self.waldur_queue_wait.observe(queued.as_secs_f64());
    }

    fn refused(&self, endpoint: Endpoint) {
        self.waldur_refused
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.as_str().into(),
            })
            .inc();
    }

    fn breaker_changed(&self, waldur: &str, open: bool) {
        self.waldur_unreachable
            .get_or_create(&WaldurLabel {
                waldur: waldur.into(),
            })
            .set(i64::from(open));
    }

    /// A Waldur unused for long has its series removed: Secrets may name many addresses
    /// over time, and each would otherwise stay exported for ever (review N10).
    fn breaker_forgotten(&self, waldur: &str) {
        self.waldur_unreachable.remove(&WaldurLabel {
            waldur: waldur.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_every_family() {
        let m = Metrics::new();
        m.reconciled(Duration::from_millis(12), None);
        m.reconciled(Duration::from_millis(3), Some("WaldurUnavailable"));
        m.observe(
            Endpoint::List,
            Some(200),
            Duration::from_millis(20),
            Duration::ZERO,
        );
        m.observe(
            Endpoint::Create,
            None,
            Duration::from_millis(20),
            Duration::ZERO,
        );
        m.set_leader(true);
        let mut sg = ServerGroup::new("a", Default::default());
        sg.status = Some(crate::api::ServerGroupStatus {
            state: Some("OK".into()),
            ..Default::default()
        });
        m.count_resources(&[
            Arc::new(sg),
            Arc::new(ServerGroup::new("b", Default::default())),
        ]);
        let text = m.encode();
        for needle in [
            "waldur_operator_reconciles_total{result=\"success\"} 1",
            "waldur_operator_reconciles_total{result=\"error\"} 1",
            "waldur_operator_reconcile_errors_total{reason=\"WaldurUnavailable\"} 1",
            "waldur_operator_reconcile_duration_seconds_count 2",
            "waldur_operator_waldur_requests_total{endpoint=\"list\",status=\"200\"} 1",
            "waldur_operator_waldur_requests_total{endpoint=\"create\",status=\"none\"} 1",
            "waldur_operator_waldur_request_duration_seconds_count{endpoint=\"list\"} 1",
            "waldur_operator_waldur_queue_wait_seconds_count 2",
            "waldur_operator_resources{state=\"OK\"} 1",
            "waldur_operator_resources{state=\"UNKNOWN\"} 1",
            "waldur_operator_leader{shard=\"0\",shards=\"1\"} 1",
            "waldur_operator_build_info{version=\"0.1.0\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn a_forgotten_waldur_leaves_no_series() {
        let m = Metrics::new();
        m.breaker_changed("https://gone.example.com", true);
        m.breaker_changed("https://kept.example.com", false);
        m.breaker_forgotten("https://gone.example.com");
        let text = m.encode();
        assert!(!text.contains("gone.example.com"), "{text}");
        assert!(text.contains("kept.example.com"), "{text}");
    }
}
