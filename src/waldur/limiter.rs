//! One limiter for every request to Waldur: a bound on requests in flight and a token bucket
//! for the request rate, shared by reads and writes and by every client of the process. A 429
//! with `Retry-After` pauses all requests, not just the one that was refused.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
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
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

/// Held while a request is in flight.
pub struct Slot<'a> {
    _permit: Option<SemaphorePermit<'a>>,
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
        Self {
            in_flight: Semaphore::new(limits.max_in_flight.max(1)),
            rate,
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
                paused_until: None,
            }),
        }
    }

    /// Waits for a token and a free slot.
    pub async fn acquire(&self) -> Slot<'_> {
        let started = Instant::now();
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
            waited: started.elapsed(),
        }
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

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_request() {
        let limiter = Limiter::new(Limits::default());
        limiter.pause_for(Duration::from_secs(5));
        let slot = limiter.acquire().await;
        assert!(slot.waited >= Duration::from_secs(5), "{:?}", slot.waited);
    }
}
