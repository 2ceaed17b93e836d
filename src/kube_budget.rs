//! A client-side budget for the Kubernetes API server, as client-go's QPS and Burst: every
//! request of the reconcilers (writes, reads, the start of a watch) takes a token from one
//! bucket that refills at `qps` a second and holds at most `burst`. A GitOps sync of 10,000
//! ServerGroups then reaches a shared API server at the pace the admin chose instead of as
//! fast as two cores can write (issue 21), and API Priority and Fairness is left for the
//! spikes.
//!
//! Leader election does not pass through it (`operator::run` gives the leader its own
//! client): a renewal must never queue behind a burst of status writes, or a busy leader
//! would lose its lease for being busy (client-go's leader election has its own client too).

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

/// What the budget has done, for the metrics.
#[derive(Clone, Debug, Default)]
pub struct BudgetStats {
    /// Requests that went through the budget.
    pub requests: Counter,
    /// Of those, requests that had to wait for a token.
    pub throttled: Counter,
    /// Seconds requests waited for their tokens, summed.
    pub waited_seconds: Counter<f64, AtomicU64>,
}

#[derive(Debug)]
struct Bucket {
    /// Tokens now; below zero when requests are queued for tokens not yet refilled.
    tokens: f64,
    last: Instant,
}

/// One budget for the process.
#[derive(Debug)]
pub struct KubeBudget {
    qps: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
    pub stats: BudgetStats,
}

impl KubeBudget {
    /// `None` for `qps` 0: no budget. A burst below one counts as one.
    pub fn new(qps: f64, burst: u32) -> Option<KubeBudget> {
        if qps <= 0.0 || qps.is_nan() {
            return None;
        }
        let burst = f64::from(burst.max(1));
        Some(KubeBudget {
            qps,
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
            stats: BudgetStats::default(),
        })
    }

    /// Tokens a second.
    pub fn qps(&self) -> f64 {
        self.qps
    }

    /// The most tokens held at once.
    pub fn burst(&self) -> u32 {
        self.burst as u32
    }

    /// Reserves the next token and says how long to wait for it (zero: at once). Tokens are
    /// handed out in the order asked, each at its own time, so a burst of requests is spread
    /// at `qps` and none waits longer than those before it.
    fn reserve(&self, now: Instant) -> Duration {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let refilled = now.saturating_duration_since(b.last).as_secs_f64() * self.qps;
        b.tokens = (b.tokens + refilled).min(self.burst);
        b.last = now;
        b.tokens -= 1.0;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / self.qps)
        }
    }

    /// Waits for a token.
    pub async fn acquire(&self) {
        let wait = self.reserve(Instant::now());
        self.stats.requests.inc();
        if !wait.is_zero() {
            self.stats.throttled.inc();
            self.stats.waited_seconds.inc_by(wait.as_secs_f64());
            tokio::time::sleep(wait).await;
        }
    }
}

/// `client` with every request passing through `budget` first.
pub fn budgeted(client: Client, budget: std::sync::Arc<KubeBudget>) -> Client {
    let namespace = client.default_namespace().to_string();
    let service = tower::service_fn(move |request: Request<Body>| {
        let client = client.clone();
        let budget = budget.clone();
        async move {
            budget.acquire().await;
            client.send(request).await.map(|r: Response<Body>| r)
        }
    });
    Client::new(service, namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_budget_without_a_rate() {
        assert!(KubeBudget::new(0.0, 10).is_none());
        assert!(KubeBudget::new(-1.0, 10).is_none());
        assert!(KubeBudget::new(f64::NAN, 10).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_and_the_rest_at_the_rate() {
        let budget = KubeBudget::new(10.0, 5).unwrap();
        let now = Instant::now();
        let waits: Vec<Duration> = (0..10).map(|_| budget.reserve(now)).collect();
        assert!(waits[..5].iter().all(|w| w.is_zero()), "{waits:?}");
        // The sixth waits one token's time (100 ms), the tenth five.
        assert_eq!(waits[5], Duration::from_millis(100));
        assert_eq!(waits[9], Duration::from_millis(500));
        // After a quiet second the bucket is full again, and no fuller than the burst.
        let later = now + Duration::from_secs(10);
        let waits: Vec<Duration> = (0..6).map(|_| budget.reserve(later)).collect();
        assert!(waits[..5].iter().all(|w| w.is_zero()), "{waits:?}");
        assert_eq!(waits[5], Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn acquiring_waits_and_counts_what_it_waited() {
        let budget = KubeBudget::new(2.0, 1).unwrap();
        let start = Instant::now();
        for _ in 0..3 {
            budget.acquire().await;
        }
        // One at once, then one every half second.
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(budget.stats.requests.get(), 3);
        assert_eq!(budget.stats.throttled.get(), 2);
        assert!((budget.stats.waited_seconds.get() - 1.0).abs() < 1e-9);
    }
}
