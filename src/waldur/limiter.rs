//! One limiter for every request to Waldur: a bound on requests in flight and a token bucket
//! for the request rate, shared by reads and writes and by every client of the process. A 429
//! with `Retry-After` pauses all requests, not just the one that was refused.
//!
//! Fairness between Waldurs (review N5): a namespace's Secret may name any Waldur address,
//! including a slow or hostile one that answers every request just before the timeout. So
//! each Waldur but the operator's default one has its own cap on requests in flight
//! ([`Limiter::per_waldur_cap`]), taken *before* a shared slot: requests queued for a capped
//! Waldur wait on that Waldur's cap, never holding a shared slot, and one address can never
//! hold more than its cap of the shared slots. The default Waldur (the admin's own) is not
//! capped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// Limits, as given on the command line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Requests in flight at once.
    pub max_in_flight: usize,
    /// Requests per second, sustained. Bursts up to one second's worth are allowed.
    pub rate_per_second: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: 16,
            rate_per_second: 20.0,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// Nobody sends before this instant (set by a 429's Retry-After).
    paused_until: Option<Instant>,
}

#[derive(Debug)]
pub struct Limiter {
    in_flight: Semaphore,
    /// Per Waldur base URL (all but the default one): at most `per_waldur_cap` in flight.
    per_waldur: Mutex<HashMap<String, Arc<Semaphore>>>,
    per_waldur_cap: usize,
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

/// Entries of Waldurs with nothing in flight or queued are dropped past this many.
const MAX_IDLE_WALDURS: usize = 64;

/// Held while a request is in flight.
pub struct Slot<'a> {
    _permit: Option<SemaphorePermit<'a>>,
    _waldur: Option<OwnedSemaphorePermit>,
    /// How long the request waited for its slot: the limiter's queue time.
    pub waited: Duration,
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        let rate = if limits.rate_per_second.is_finite() && limits.rate_per_second > 0.0 {
            limits.rate_per_second
        } else {
            f64::INFINITY
        };
        let burst = if rate.is_finite() { rate.max(1.0) } else { 1.0 };
        let max_in_flight = limits.max_in_flight.max(1);
        Self {
            in_flight: Semaphore::new(max_in_flight),
            per_waldur: Mutex::new(HashMap::new()),
            per_waldur_cap: Self::default_per_waldur_cap(max_in_flight),
            rate,
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
                paused_until: None,
            }),
        }
    }

    /// The per-Waldur cap when none is given: a quarter of the shared bound (4 of the default
    /// 16), at least 1. At the default rate of 20 requests a second, 4 in flight keep up with
    /// the whole rate while requests take up to 200 ms, so a healthy second Waldur loses
    /// nothing; a slow or hostile one holds at most a quarter of the slots, and the default
    /// Waldur and every other address keep the rest.
    pub fn default_per_waldur_cap(max_in_flight: usize) -> usize {
        (max_in_flight / 4).max(1)
    }

    /// Sets the per-Waldur cap (`None`: [`Limiter::default_per_waldur_cap`]). It is never
    /// above the shared bound.
    pub fn with_per_waldur_cap(mut self, cap: Option<usize>) -> Self {
        let shared = self.in_flight.available_permits().max(1);
        self.per_waldur_cap = cap
            .unwrap_or_else(|| Self::default_per_waldur_cap(shared))
            .clamp(1, shared);
        self
    }

    pub fn per_waldur_cap(&self) -> usize {
        self.per_waldur_cap
    }

    /// Waits for a token and a free slot, outside any per-Waldur cap.
    pub async fn acquire(&self) -> Slot<'_> {
        self.acquire_for(None).await
    }

    /// Waits for a free slot under the cap of the Waldur at `waldur` (a base URL; `None` for
    /// the uncapped default Waldur), then for a token and a shared slot.
    pub async fn acquire_for(&self, waldur: Option<&str>) -> Slot<'_> {
        let started = Instant::now();
        let lane = match waldur {
            Some(base) => self.lane(base).acquire_owned().await.ok(),
            None => None,
        };
        loop {
            match self.try_take() {
                None => break,
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
        // The semaphore is never closed, so this is always Some.
        let permit = self.in_flight.acquire().await.ok();
        Slot {
            _permit: permit,
            _waldur: lane,
            waited: started.elapsed(),
        }
    }

    fn lane(&self, base: &str) -> Arc<Semaphore> {
        let mut lanes = self.per_waldur.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lane) = lanes.get(base) {
            return lane.clone();
        }
        if lanes.len() >= MAX_IDLE_WALDURS {
            // A permit or a waiter holds a clone: those in use stay, with their counts.
            lanes.retain(|_, lane| Arc::strong_count(lane) > 1);
        }
        let lane = Arc::new(Semaphore::new(self.per_waldur_cap));
        lanes.insert(base.to_string(), lane.clone());
        lane
    }

    /// Takes a token, or says how long to wait for one.
    fn try_take(&self) -> Option<Duration> {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(until) = b.paused_until {
            if until > now {
                return Some(until - now);
            }
            b.paused_until = None;
        }
        if self.rate.is_infinite() {
            return None;
        }
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }

    /// Waldur said "too many requests": nobody sends for `wait`.
    pub fn pause_for(&self, wait: Duration) {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let until = Instant::now() + wait;
        if b.paused_until.is_none_or(|current| current < until) {
            b.paused_until = Some(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_held_after_the_first_burst() {
        let limiter = Limiter::new(Limits {
            max_in_flight: 100,
            rate_per_second: 10.0,
        });
        let start = Instant::now();
        for _ in 0..30 {
            let _ = limiter.acquire().await;
        }
        // 10 from the burst, then 20 at 10/s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1_900) && took <= Duration::from_millis(2_100),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_bound_are_in_flight() {
        let limiter = Arc::new(Limiter::new(Limits {
            max_in_flight: 3,
            rate_per_second: 0.0,
        }));
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (limiter, now, peak) = (limiter.clone(), now.clone(), peak.clone());
                tokio::spawn(async move {
                    let _slot = limiter.acquire().await;
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }

    /// Review N5: one Waldur holds at most its cap of the shared slots; the default Waldur
    /// (uncapped) and other Waldurs get the rest at once.
    #[tokio::test(start_paused = true)]
    async fn one_waldur_holds_at_most_its_cap() {
        let limiter = Arc::new(
            Limiter::new(Limits {
                max_in_flight: 8,
                rate_per_second: 0.0,
            })
            .with_per_waldur_cap(None),
        );
        assert_eq!(limiter.per_waldur_cap(), 2);
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(limiter.acquire_for(Some("https://slow")).await);
        }
        let queued = tokio::spawn({
            let limiter = limiter.clone();
            async move {
                let _slot = limiter.acquire_for(Some("https://slow")).await;
            }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            !queued.is_finished(),
            "the third waits for the slow Waldur's cap"
        );
        for _ in 0..2 {
            held.push(limiter.acquire_for(Some("https://other")).await);
        }
        for _ in 0..4 {
            held.push(limiter.acquire().await);
        }
        assert_eq!(
            held.len(),
            8,
            "everyone else got the other six slots at once"
        );
        held.truncate(1);
        queued.await.unwrap();
        assert_eq!(
            Limiter::new(Limits::default())
                .with_per_waldur_cap(Some(100))
                .per_waldur_cap(),
            16,
            "never above the shared bound"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_request() {
        let limiter = Limiter::new(Limits::default());
        limiter.pause_for(Duration::from_secs(5));
        let slot = limiter.acquire().await;
        assert!(slot.waited >= Duration::from_secs(5), "{:?}", slot.waited);
    }
}
