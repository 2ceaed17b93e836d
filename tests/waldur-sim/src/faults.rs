//! Injected faults and per-endpoint request counters.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Endpoint names used by the counters and by endpoint-scoped faults.
pub const ENDPOINTS: [&str; 18] = [
    "list",
    "count",
    "retrieve",
    "create",
    "create_collection",
    "pull",
    "delete",
    "unlink",
    "set_erred",
    "set_ok",
    "pull_server_groups",
    "tenant_list",
    "tenant_retrieve",
    "tenant_pull",
    "tenant_set_ok",
    "tenant_set_erred",
    "update",
    "other",
];

/// "Answer the next `remaining` requests (to `endpoint`, or any) with `status`."
#[derive(Debug, Clone, Serialize)]
pub struct FailRule {
    pub remaining: usize,
    pub status: u16,
    pub endpoint: Option<String>,
}

/// Current fault settings; they apply to `/api/...` requests only, never to `/__sim/...`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Faults {
    /// Added to every request before it is handled.
    #[serde(rename = "latency_ms", serialize_with = "ser_ms")]
    pub latency: Duration,
    pub fail_rules: Vec<FailRule>,
    /// Burst mode: every request answers this status until cleared.
    pub failing: Option<u16>,
    /// Requests whose connection is closed without any response.
    pub drop_next: usize,
    /// Delay before each chunk of a response body.
    #[serde(rename = "slow_body_ms", serialize_with = "ser_opt_ms")]
    pub slow_body: Option<Duration>,
    /// Requests that are carried out (committed) and then answered late or not at all.
    pub after_commit: Vec<AfterCommitRule>,
}

/// What becomes of the answer to a request the server has already carried out. A real Waldur
/// behind a proxy shows both: the proxy times out while Django is still answering, or the
/// connection breaks after the database committed. The client cannot tell "done" from "not
/// done" and must look before it tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterCommit {
    /// Send the answer this much later.
    #[serde(rename = "delay_ms", serialize_with = "ser_ms")]
    Delay(Duration),
    /// Close the connection without answering.
    Drop,
}

/// "The next `remaining` successful requests (to `endpoint`, or any) get `action`."
#[derive(Debug, Clone, Serialize)]
pub struct AfterCommitRule {
    pub remaining: usize,
    pub endpoint: Option<String>,
    pub action: AfterCommit,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ser_opt_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_ms(d, s),
        None => s.serialize_none(),
    }
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Close the connection without answering.
    Drop,
    /// Answer this status with an HTML body.
    Fail(u16),
}

impl Faults {
    /// Decides the fate of one request and consumes one-shot faults.
    pub fn decide(&mut self, endpoint: &str) -> Verdict {
        if self.drop_next > 0 {
            self.drop_next -= 1;
            return Verdict::Drop;
        }
        if let Some(status) = self.failing {
            return Verdict::Fail(status);
        }
        let hit = self
            .fail_rules
            .iter_mut()
            .find(|r| r.remaining > 0 && r.endpoint.as_deref().is_none_or(|e| e == endpoint));
        if let Some(rule) = hit {
            rule.remaining -= 1;
            let status = rule.status;
            self.fail_rules.retain(|r| r.remaining > 0);
            return Verdict::Fail(status);
        }
        Verdict::Pass
    }

    /// What to do with the answer to a request that succeeded (2xx), consuming the rule that
    /// applies. Failed requests changed nothing, so they never use up an after-commit fault.
    pub fn after_commit(&mut self, endpoint: &str, status: u16) -> Option<AfterCommit> {
        if !(200..300).contains(&status) {
            return None;
        }
        let rule = self
            .after_commit
            .iter_mut()
            .find(|r| r.remaining > 0 && r.endpoint.as_deref().is_none_or(|e| e == endpoint))?;
        rule.remaining -= 1;
        let action = rule.action;
        self.after_commit.retain(|r| r.remaining > 0);
        Some(action)
    }
}

/// Requests per endpoint since start or the last reset.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub by_endpoint: BTreeMap<String, u64>,
    pub total: u64,
    /// Requests being answered now, and the most there ever were at once.
    pub in_flight: u64,
    pub peak_in_flight: u64,
    /// When each request arrived (the first million), to measure a client's request rate.
    pub arrivals: Vec<std::time::Instant>,
}

/// Arrival times kept at most (16 MB).
const MAX_ARRIVALS: usize = 1_000_000;

impl Counters {
    pub fn hit(&mut self, endpoint: &str) {
        *self.by_endpoint.entry(endpoint.to_string()).or_default() += 1;
        self.total += 1;
        self.in_flight += 1;
        self.peak_in_flight = self.peak_in_flight.max(self.in_flight);
        if self.arrivals.len() < MAX_ARRIVALS {
            self.arrivals.push(std::time::Instant::now());
        }
    }

    /// Zeroes the counters; requests still being answered stay counted as in flight.
    pub fn reset(&mut self) {
        let in_flight = self.in_flight;
        *self = Counters::default();
        self.in_flight = in_flight;
        self.peak_in_flight = in_flight;
    }

    /// A request has been answered (or dropped).
    pub fn done(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    pub fn get(&self, endpoint: &str) -> u64 {
        self.by_endpoint.get(endpoint).copied().unwrap_or(0)
    }

    /// `{"total": n, "endpoints": {"list": n, ...}}` with every known endpoint present.
    pub fn to_json(&self) -> serde_json::Value {
        let mut endpoints = serde_json::Map::new();
        for e in ENDPOINTS {
            endpoints.insert(e.to_string(), self.get(e).into());
        }
        serde_json::json!({"total": self.total, "endpoints": endpoints})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_scoped_failures_only_hit_that_endpoint() {
        let mut f = Faults {
            fail_rules: vec![FailRule {
                remaining: 2,
                status: 503,
                endpoint: Some("create".into()),
            }],
            ..Faults::default()
        };
        assert_eq!(f.decide("list"), Verdict::Pass);
        assert_eq!(f.decide("create"), Verdict::Fail(503));
        assert_eq!(f.decide("create"), Verdict::Fail(503));
        assert_eq!(f.decide("create"), Verdict::Pass);
        assert!(f.fail_rules.is_empty());
        f.drop_next = 1;
        f.failing = Some(502);
        assert_eq!(f.decide("list"), Verdict::Drop);
        assert_eq!(f.decide("list"), Verdict::Fail(502));
    }

    #[test]
    fn after_commit_faults_hit_successes_of_their_endpoint_only() {
        let mut f = Faults {
            after_commit: vec![
                AfterCommitRule {
                    remaining: 1,
                    endpoint: Some("create".into()),
                    action: AfterCommit::Drop,
                },
                AfterCommitRule {
                    remaining: 1,
                    endpoint: None,
                    action: AfterCommit::Delay(Duration::from_millis(5)),
                },
            ],
            ..Faults::default()
        };
        // A refused create committed nothing: the fault waits for one that did.
        assert_eq!(f.after_commit("create", 400), None);
        assert_eq!(f.after_commit("create", 201), Some(AfterCommit::Drop));
        assert_eq!(
            f.after_commit("list", 200),
            Some(AfterCommit::Delay(Duration::from_millis(5)))
        );
        assert_eq!(f.after_commit("create", 201), None);
        assert!(f.after_commit.is_empty());
        let json = serde_json::to_value(AfterCommit::Delay(Duration::from_millis(7))).unwrap();
        assert_eq!(json, serde_json::json!({"delay_ms": 7}));
    }
}
