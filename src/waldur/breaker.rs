//! One view of a Waldur's health, shared by every client (every token) that talks to it: a
//! circuit breaker.
//!
//! After a few failures in a row that say Waldur cannot be reached (no answer, a timeout, a
//! 5xx), the breaker opens. While it is open no request goes out but one probe a second, in
//! total, whatever the number of resources; every other request fails at once with
//! [`WaldurError::Unavailable`], which carries a message that stays the same for the whole
//! outage (so status is written once, not on every retry). The first probe that gets any
//! answer from Waldur closes it, and `closed` tells everyone waiting to try again now.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use super::error::WaldurError;

/// Failures in a row (with no answer in between) that open the breaker.
pub const OPEN_AFTER: u32 = 3;
/// While open: at most one probe this often.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Whether a request may go out, and in which role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The breaker is closed.
    Normal,
    /// The breaker is open and this request is the one probe allowed now.
    Probe,
}

#[derive(Debug)]
struct Open {
    /// When it opened, for the message (wall clock) and the metric.
    since: SystemTime,
    /// The failure that opened it, in Waldur's or the transport's words.
    cause: String,
    next_probe: Instant,
    probe_in_flight: bool,
}

#[derive(Debug, Default)]
struct Inner {
    failures_in_a_row: u32,
    open: Option<Open>,
}

/// The breaker of one Waldur (one base URL).
#[derive(Debug)]
pub struct Breaker {
    waldur: String,
    inner: Mutex<Inner>,
    /// Counts closings; a change means "Waldur answers again".
    closings: watch::Sender<u64>,
}

impl Breaker {
    pub fn new(waldur: impl Into<String>) -> Self {
        Self {
            waldur: waldur.into(),
            inner: Mutex::new(Inner::default()),
            closings: watch::Sender::new(0),
        }
    }

    /// The Waldur this breaker watches (its base URL).
    pub fn waldur(&self) -> &str {
        &self.waldur
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a request go, or refuses it while the breaker is open and the probe is not due.
    pub fn admit(&self, endpoint: &'static str) -> Result<Admission, WaldurError> {
        let mut inner = self.lock();
        let Some(open) = inner.open.as_mut() else {
            return Ok(Admission::Normal);
        };
        let now = Instant::now();
        if !open.probe_in_flight && now >= open.next_probe {
            open.probe_in_flight = true;
            open.next_probe = now + PROBE_EVERY;
            return Ok(Admission::Probe);
        }
        Err(WaldurError::Unavailable {
            endpoint,
            waldur: self.waldur.clone(),
            since: open.since,
            cause: open.cause.clone(),
        })
    }

    /// Records how an admitted request ended: `Some(cause)` when it showed Waldur unreachable,
    /// `None` when Waldur answered (whatever it answered). Returns true when this opened the
    /// breaker, so the caller starts probing.
    pub fn record(&self, admission: Admission, unreachable: Option<&str>) -> bool {
        let mut inner = self.lock();
        match unreachable {
            None => {
                inner.failures_in_a_row = 0;
                if inner.open.take().is_some() {
                    drop(inner);
                    tracing::info!(waldur = %self.waldur, "Waldur answers again: retrying every waiting resource");
                    self.closings.send_modify(|n| *n = n.wrapping_add(1));
                }
                false
            }
            Some(cause) => {
                inner.failures_in_a_row = inner.failures_in_a_row.saturating_add(1);
                if let Some(open) = inner.open.as_mut() {
                    if admission == Admission::Probe {
                        open.probe_in_flight = false;
                    }
                    return false;
                }
                if inner.failures_in_a_row < OPEN_AFTER {
                    return false;
                }
                tracing::warn!(waldur = %self.waldur, cause, "Waldur is unreachable: holding requests, probing once a second");
                inner.open = Some(Open {
                    since: SystemTime::now(),
                    cause: cause.to_string(),
                    next_probe: Instant::now() + PROBE_EVERY,
                    probe_in_flight: false,
                });
                true
            }
        }
    }

    /// The error a request would get now, without taking the probe: for callers that want
    /// to fail fast before preparing any request.
    pub fn refusal(&self, endpoint: &'static str) -> Option<WaldurError> {
        let inner = self.lock();
        let open = inner.open.as_ref()?;
        Some(WaldurError::Unavailable {
            endpoint,
            waldur: self.waldur.clone(),
            since: open.since,
            cause: open.cause.clone(),
        })
    }

    pub fn is_open(&self) -> bool {
        self.lock().open.is_some()
    }

    /// When the breaker is open: how long until the next probe may go.
    pub fn until_probe(&self) -> Option<Duration> {
        let inner = self.lock();
        let open = inner.open.as_ref()?;
        Some(open.next_probe.saturating_duration_since(Instant::now()))
    }

    /// Changes each time the breaker closes.
    pub fn closings(&self) -> watch::Receiver<u64> {
        self.closings.subscribe()
    }

    /// Resolves when the breaker is closed (at once if it is).
    pub async fn closed(&self) {
        let mut rx = self.closings();
        while self.is_open() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Whether a failed request shows that Waldur cannot be reached (no answer, a timeout, a
/// 5xx), as opposed to Waldur answering no (4xx) or asking to slow down (429).
pub fn unreachable_cause(error: &WaldurError) -> Option<String> {
    match error {
        WaldurError::Transient {
            status: None | Some(500..=599),
            reason,
            ..
        } => Some(reason.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(b: &Breaker, a: Admission) -> bool {
        b.record(a, Some("connection refused"))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_in_a_row_and_lets_one_probe_a_second() {
        let b = Breaker::new("https://waldur.example.com");
        assert!(!fail(&b, Admission::Normal));
        b.record(Admission::Normal, None); // an answer in between starts the count again
        assert!(!fail(&b, Admission::Normal));
        assert!(!fail(&b, Admission::Normal));
        assert!(fail(&b, Admission::Normal), "the third in a row opens it");
        let err = b.admit("list").unwrap_err();
        assert!(err.is_unavailable());
        let message = err.to_string();
        assert!(message.contains("connection refused") && message.contains("waldur.example.com"));

        // Over 10 s of requests every 10 ms: one probe a second (the first a second after
        // opening), never two at once.
        let mut probes = 0;
        for _ in 0..1000 {
            if let Ok(a) = b.admit("list") {
                assert_eq!(a, Admission::Probe);
                probes += 1;
                fail(&b, a);
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert_eq!(probes, 9);
        // The same words for the whole outage: a status written once stays unchanged.
        assert_eq!(b.refusal("list").unwrap().to_string(), message);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_in_flight_holds_the_others_and_an_answer_closes_it() {
        let b = Breaker::new("w");
        for _ in 0..OPEN_AFTER {
            fail(&b, Admission::Normal);
        }
        tokio::time::advance(PROBE_EVERY).await;
        let probe = b.admit("retrieve").unwrap();
        assert_eq!(probe, Admission::Probe);
        tokio::time::advance(PROBE_EVERY * 3).await;
        assert!(b.admit("retrieve").is_err(), "one probe at a time");
        let closings = b.closings();
        // A 401 is an answer: Waldur is reachable.
        b.record(probe, None);
        assert!(!b.is_open());
        assert!(closings.has_changed().unwrap());
        assert_eq!(b.admit("retrieve").unwrap(), Admission::Normal);
        b.closed().await;
    }

    #[test]
    fn only_silence_timeouts_and_5xx_count_as_unreachable() {
        let transient = |status| WaldurError::Transient {
            endpoint: "list",
            reason: "x".into(),
            retry_after: None,
            status,
        };
        assert!(unreachable_cause(&transient(None)).is_some());
        assert!(unreachable_cause(&transient(Some(503))).is_some());
        assert!(unreachable_cause(&transient(Some(429))).is_none());
        let refused = WaldurError::Unauthorized {
            endpoint: "list",
            detail: "Invalid token.".into(),
        };
        assert!(unreachable_cause(&refused).is_none());
    }
}
