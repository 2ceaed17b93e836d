//! One view of a Waldur's health, shared by every client (every token) that talks to it: a
//! circuit breaker.
//!
//! The breaker opens only on evidence that Waldur *as a whole* cannot be reached (review N4):
//! failures that say so (no answer, a timeout, a 502/503/504 from the proxy in front of it)
//! from [`OPEN_AFTER`] distinct logical requests, with no answer in between and within a
//! window. The retries of one read are one piece of evidence, not four, and a 500 is Waldur
//! answering about one object (an application error), never a sign that it is down. So one
//! object's or one tenant's trouble stays its own.
//!
//! While open no request goes out but one probe a second, in total, whatever the number of
//! resources; every other request fails at once with [`WaldurError::Unavailable`], which
//! carries a message that stays the same for the whole outage (so status is written once,
//! not on every retry). The first probe that gets any answer from Waldur closes it, and
//! `closed` tells everyone waiting to try again now.
//!
//! Cancellation (review N1): [`Breaker::admit`] hands out a [`Permit`]. A probe whose future
//! is dropped before it records a result (a reconcile task aborted when a leadership term
//! ends) frees the probe slot in `Drop`, as a failed probe; a probe whose request has not
//! ended well past the request timeout is reclaimed by the next caller. So no lost task can
//! hold the breaker open for good.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::error::WaldurError;

/// Distinct logical requests that must fail as "unreachable", with no answer in between and
/// within the evidence window, to open the breaker.
pub const OPEN_AFTER: usize = 3;
/// While open: at most one probe this often.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe still in flight this long after the request timeout is taken as lost.
pub const PROBE_RECLAIM_MARGIN: Duration = Duration::from_secs(5);
/// The request timeout assumed until [`Breaker::with_request_timeout`] says otherwise.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One logical request: a write, or a read with all its retries. The breaker counts each once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestId(u64);

impl RequestId {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// What recording a result did to the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    Opened,
    Closed,
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    /// Past this the probe is taken as lost and another may go.
    reclaim_at: Instant,
}

#[derive(Debug)]
struct Open {
    /// When it opened, for the message (wall clock) and the metric.
    since: SystemTime,
    /// The failure that opened it, in Waldur's or the transport's words.
    cause: String,
    next_probe: Instant,
    probe: Option<InFlight>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Logical requests that failed as "unreachable" since the last answer, oldest first.
    evidence: VecDeque<(RequestId, Instant)>,
    open: Option<Open>,
    probes: u64,
}

/// The breaker of one Waldur (one base URL).
#[derive(Debug)]
pub struct Breaker {
    waldur: String,
    inner: Mutex<Inner>,
    /// Counts closings; a change means "Waldur answers again".
    closings: watch::Sender<u64>,
    /// Told when a probe ends (or is abandoned), so the prober waits for it rather than asks.
    probe_ended: Notify,
    /// How long one request may take: bounds a probe (and sets the evidence window).
    request_timeout: Duration,
    /// No longer in the cache (unused for long): its prober stops.
    retired: AtomicBool,
}

/// Leave to send one request. Record how it ended with [`Permit::record`]; dropped without a
/// result (the request's future was cancelled), a probe counts as failed and frees its slot.
#[must_use = "a permit records the request's result"]
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: Option<u64>,
    recorded: bool,
}

impl Permit<'_> {
    /// Whether this request is the breaker's one probe (the breaker is open).
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    /// Records how the request ended: `Some(cause)` when it showed Waldur unreachable,
    /// `None` when Waldur answered (whatever it answered).
    pub fn record(mut self, request: RequestId, unreachable: Option<&str>) -> Transition {
        self.recorded = true;
        self.breaker.finish(self.probe, request, unreachable)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            // A cancelled request says nothing about Waldur; only a probe slot must be freed
            // (as a failed probe: the breaker stays open and the next probe is a second on).
            self.breaker.abandon(self.probe);
        }
    }
}

impl Breaker {
    pub fn new(waldur: impl Into<String>) -> Self {
        Self {
            waldur: waldur.into(),
            inner: Mutex::new(Inner::default()),
            closings: watch::Sender::new(0),
            probe_ended: Notify::new(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retired: AtomicBool::new(false),
        }
    }

    /// The timeout of one request to this Waldur (`--waldur-timeout`).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The Waldur this breaker watches (its base URL).
    pub fn waldur(&self) -> &str {
        &self.waldur
    }

    /// Failures further apart than this are not one outage: a read with all its retries
    /// (four tries and their back-off) fits well inside it.
    fn window(&self) -> Duration {
        (self.request_timeout * 4).max(Duration::from_secs(60))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets a request go, or refuses it while the breaker is open and the probe is not due.
    pub fn admit(&self, endpoint: &'static str) -> Result<Permit<'_>, WaldurError> {
        let mut inner = self.lock();
        let Inner { open, probes, .. } = &mut *inner;
        let Some(open) = open.as_mut() else {
            return Ok(Permit {
                breaker: self,
                probe: None,
                recorded: false,
            });
        };
        let now = Instant::now();
        if open.probe.as_ref().is_some_and(|p| now >= p.reclaim_at) {
            tracing::debug!(waldur = %self.waldur, "a probe never ended: taken as lost");
            open.probe = None;
        }
        if open.probe.is_none() && now >= open.next_probe {
            *probes = probes.wrapping_add(1);
            open.probe = Some(InFlight {
                id: *probes,
                reclaim_at: now + self.request_timeout + PROBE_RECLAIM_MARGIN,
            });
            open.next_probe = now + PROBE_EVERY;
            return Ok(Permit {
                breaker: self,
                probe: Some(*probes),
                recorded: false,
            });
        }
        Err(WaldurError::Unavailable {
            endpoint,
            waldur: self.waldur.clone(),
            since: open.since,
            cause: open.cause.clone(),
        })
    }

    fn abandon(&self, probe: Option<u64>) {
        let Some(id) = probe else { return };
        let mut inner = self.lock();
        if let Some(open) = inner.open.as_mut()
            && open.probe.as_ref().is_some_and(|p| p.id == id)
        {
            open.probe = None;
            drop(inner);
            self.probe_ended.notify_waiters();
        }
    }

    fn finish(
        &self,
        probe: Option<u64>,
        request: RequestId,
        unreachable: Option<&str>,
    ) -> Transition {
        let mut inner = self.lock();
        let Some(cause) = unreachable else {
            // Any answer, even from a probe taken as lost, shows Waldur reachable.
            inner.evidence.clear();
            if inner.open.take().is_some() {
                drop(inner);
                tracing::info!(waldur = %self.waldur, "Waldur answers again: retrying every waiting resource");
                self.closings.send_modify(|n| *n = n.wrapping_add(1));
                self.probe_ended.notify_waiters();
                return Transition::Closed;
            }
            return Transition::Unchanged;
        };
        if let Some(open) = inner.open.as_mut() {
            if let Some(id) = probe
                && open.probe.as_ref().is_some_and(|p| p.id == id)
            {
                open.probe = None;
                drop(inner);
                self.probe_ended.notify_waiters();
            }
            return Transition::Unchanged;
        }
        let now = Instant::now();
        let window = self.window();
        inner
            .evidence
            .retain(|(_, at)| now.saturating_duration_since(*at) <= window);
        if !inner.evidence.iter().any(|(id, _)| *id == request) {
            inner.evidence.push_back((request, now));
        }
        if inner.evidence.len() < OPEN_AFTER {
            return Transition::Unchanged;
        }
        inner.evidence.clear();
        tracing::warn!(waldur = %self.waldur, cause, "Waldur is unreachable: holding requests, probing once a second");
        inner.open = Some(Open {
            since: SystemTime::now(),
            cause: cause.to_string(),
            next_probe: now + PROBE_EVERY,
            probe: None,
        });
        Transition::Opened
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

    /// For the prober: `None` when there is nothing to probe (closed, or retired); zero when
    /// a probe may go now; else how long to wait at most before asking again. While another
    /// probe is in flight that is until it could be reclaimed, capped at [`PROBE_EVERY`]
    /// (and [`Breaker::probe_ended`] wakes the prober earlier), never zero: the prober must
    /// not spin on refusals (review N1, E4b).
    pub fn until_probe(&self) -> Option<Duration> {
        if self.retired.load(Ordering::Relaxed) {
            return None;
        }
        let inner = self.lock();
        let open = inner.open.as_ref()?;
        let now = Instant::now();
        Some(match &open.probe {
            Some(p) if now < p.reclaim_at => (p.reclaim_at - now).min(PROBE_EVERY),
            _ => open.next_probe.saturating_duration_since(now),
        })
    }

    /// Resolves when a probe ends, is abandoned, or the breaker closes. Create it before
    /// reading the state it waits on (then `enable` it), so no wake-up is missed.
    pub fn probe_ended(&self) -> tokio::sync::futures::Notified<'_> {
        self.probe_ended.notified()
    }

    /// Takes the breaker out of service (its Waldur has not been used for long): a prober
    /// still running for it stops.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.probe_ended.notify_waiters();
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

/// Whether a failed request shows that Waldur cannot be reached: no answer at all (refused,
/// reset, a timeout), or the gateway in front of it saying so (502, 503, 504). Not a 500:
/// that is Waldur's application answering, about one object or one request (review N4). Not
/// a 4xx (Waldur answering no) or a 429 (asking to slow down; the limiter pauses for it).
pub fn unreachable_cause(error: &WaldurError) -> Option<String> {
    match error {
        WaldurError::Transient {
            status: None | Some(502..=504),
            reason,
            ..
        } => Some(reason.clone()),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) fn force_open(b: &Breaker) {
    for _ in 0..OPEN_AFTER {
        let _ = b
            .admit("test")
            .map(|p| p.record(RequestId::new(), Some("connection refused")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(b: &Breaker) -> Transition {
        match b.admit("list") {
            Ok(p) => p.record(RequestId::new(), Some("connection refused")),
            Err(_) => Transition::Unchanged,
        }
    }

    fn answer(b: &Breaker) -> Transition {
        match b.admit("list") {
            Ok(p) => p.record(RequestId::new(), None),
            Err(_) => Transition::Unchanged,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_of_distinct_requests_and_lets_one_probe_a_second() {
        let b = Breaker::new("https://waldur.example.com");
        assert_eq!(fail(&b), Transition::Unchanged);
        answer(&b); // an answer in between starts the count again
        assert_eq!(fail(&b), Transition::Unchanged);
        assert_eq!(fail(&b), Transition::Unchanged);
        assert_eq!(fail(&b), Transition::Opened, "the third in a row opens it");
        let err = b.admit("list").unwrap_err();
        assert!(err.is_unavailable());
        let message = err.to_string();
        assert!(message.contains("connection refused") && message.contains("waldur.example.com"));

        // Over 10 s of requests every 10 ms: one probe a second (the first a second after
        // opening), never two at once.
        let mut probes = 0;
        for _ in 0..1000 {
            if let Ok(p) = b.admit("list") {
                assert!(p.is_probe());
                probes += 1;
                p.record(RequestId::new(), Some("connection refused"));
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert_eq!(probes, 9);
        // The same words for the whole outage: a status written once stays unchanged.
        assert_eq!(b.refusal("list").unwrap().to_string(), message);
    }

    /// Review N4: the retries of one read are one piece of evidence.
    #[tokio::test(start_paused = true)]
    async fn the_retries_of_one_request_count_once() {
        let b = Breaker::new("w");
        let read = RequestId::new();
        for _ in 0..10 {
            let p = b.admit("list").unwrap();
            assert_eq!(p.record(read, Some("timed out")), Transition::Unchanged);
        }
        assert!(!b.is_open());
        // Failures far apart are not one outage.
        tokio::time::advance(b.window() + Duration::from_secs(1)).await;
        assert_eq!(fail(&b), Transition::Unchanged);
        assert_eq!(
            fail(&b),
            Transition::Unchanged,
            "the old failure no longer counts"
        );
        assert_eq!(fail(&b), Transition::Opened);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_in_flight_holds_the_others_and_an_answer_closes_it() {
        let b = Breaker::new("w");
        force_open(&b);
        tokio::time::advance(PROBE_EVERY).await;
        let probe = b.admit("retrieve").unwrap();
        assert!(probe.is_probe());
        tokio::time::advance(PROBE_EVERY * 3).await;
        assert!(b.admit("retrieve").is_err(), "one probe at a time");
        let closings = b.closings();
        // A 401 is an answer: Waldur is reachable.
        assert_eq!(probe.record(RequestId::new(), None), Transition::Closed);
        assert!(!b.is_open());
        assert!(closings.has_changed().unwrap());
        assert!(!b.admit("retrieve").unwrap().is_probe());
        b.closed().await;
    }

    /// Review N1 (E4): a probe whose future is dropped mid-request (a reconcile aborted when
    /// a leadership term ends) frees its slot, so the breaker can close once Waldur answers.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_its_slot() {
        let b = Breaker::new("w");
        force_open(&b);
        tokio::time::advance(PROBE_EVERY).await;
        let probe = b.admit("retrieve").unwrap();
        assert!(probe.is_probe());
        drop(probe);
        assert!(b.is_open(), "an abandoned probe is a failed one");
        assert!(
            b.admit("retrieve").is_err(),
            "the next probe is a second on"
        );
        tokio::time::advance(PROBE_EVERY).await;
        assert_eq!(answer(&b), Transition::Closed);
    }

    /// Review N1: a probe that never ends (its task stuck or lost without a drop) is taken as
    /// lost past the request timeout and a margin; its late answer still closes the breaker.
    #[tokio::test(start_paused = true)]
    async fn a_probe_held_past_the_timeout_is_reclaimed() {
        let b = Breaker::new("w").with_request_timeout(Duration::from_secs(10));
        force_open(&b);
        tokio::time::advance(PROBE_EVERY).await;
        let stuck = b.admit("retrieve").unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(b.admit("retrieve").is_err(), "still within the timeout");
        assert!(
            b.until_probe().unwrap() > Duration::ZERO,
            "the prober waits"
        );
        tokio::time::advance(PROBE_RECLAIM_MARGIN).await;
        let next = b.admit("retrieve").expect("reclaimed");
        assert!(next.is_probe());
        next.record(RequestId::new(), Some("timed out"));
        assert!(b.is_open());
        assert_eq!(stuck.record(RequestId::new(), None), Transition::Closed);
    }

    #[test]
    fn only_silence_timeouts_and_gateway_errors_count_as_unreachable() {
        let transient = |status| WaldurError::Transient {
            endpoint: "list",
            reason: "x".into(),
            retry_after: None,
            status,
        };
        assert!(unreachable_cause(&transient(None)).is_some());
        for s in [502, 503, 504] {
            assert!(unreachable_cause(&transient(Some(s))).is_some(), "{s}");
        }
        assert!(
            unreachable_cause(&transient(Some(500))).is_none(),
            "one object's application error"
        );
        assert!(unreachable_cause(&transient(Some(429))).is_none());
        let refused = WaldurError::Unauthorized {
            endpoint: "list",
            detail: "Invalid token.".into(),
        };
        assert!(unreachable_cause(&refused).is_none());
    }
}
