//! Test hooks: injected failures and request counters.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Verbs counted as writes by [`Hooks::writes`].
pub const WRITE_VERBS: &[&str] = &["create", "update", "patch", "delete", "deletecollection"];

/// "Answer the next `remaining` requests matching this with `status`."
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailRule {
    pub remaining: usize,
    /// A verb (`create`, `update`, `patch`, `delete`, `deletecollection`, `get`, `list`,
    /// `watch`) or `*`.
    pub verb: String,
    /// A resource plural or `*`.
    pub plural: String,
    /// `None`: the main resource only; `Some("status")`: that subresource; `Some("*")`: any.
    pub subresource: Option<String>,
    pub status: u16,
}

impl FailRule {
    fn matches(&self, verb: &str, plural: &str, sub: Option<&str>) -> bool {
        (self.verb == "*" || self.verb == verb)
            && (self.plural == "*" || self.plural == plural)
            && match self.subresource.as_deref() {
                Some("*") => true,
                want => want == sub,
            }
    }
}

/// Counters and pending failures.
#[derive(Debug, Default)]
pub struct Hooks {
    rules: Vec<FailRule>,
    /// (verb, plural, subresource or "") -> count
    counts: BTreeMap<(String, String, String), u64>,
    requests: u64,
    injected: u64,
}

impl Hooks {
    /// Sets the pending failures for (verb, plural, subresource): replaces an earlier rule for
    /// the same key; `remaining == 0` clears it.
    pub fn add_rule(&mut self, rule: FailRule) {
        self.rules.retain(|r| {
            !(r.verb == rule.verb && r.plural == rule.plural && r.subresource == rule.subresource)
        });
        if rule.remaining > 0 {
            self.rules.push(rule);
        }
    }

    /// Counts one HTTP request (any path but `/__test/`).
    pub fn count_request(&mut self) {
        self.requests += 1;
    }

    /// Counts one API request on a resource and says whether it must fail (with which code).
    pub fn on_request(&mut self, verb: &str, plural: &str, sub: Option<&str>) -> Option<u16> {
        *self
            .counts
            .entry((
                verb.to_string(),
                plural.to_string(),
                sub.unwrap_or("").to_string(),
            ))
            .or_default() += 1;
        let idx = self
            .rules
            .iter()
            .position(|r| r.remaining > 0 && r.matches(verb, plural, sub))?;
        let rule = &mut self.rules[idx];
        rule.remaining -= 1;
        let status = rule.status;
        if rule.remaining == 0 {
            self.rules.remove(idx);
        }
        self.injected += 1;
        Some(status)
    }

    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// create/update/patch/delete(collection) requests on a resource, subresources included.
    pub fn writes(&self, plural: &str) -> u64 {
        self.counts
            .iter()
            .filter(|((v, p, _), _)| p == plural && WRITE_VERBS.contains(&v.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    /// Every write, by `resource` or `resource/subresource`: what the API server persisted.
    pub fn writes_by_resource(&self) -> BTreeMap<String, u64> {
        let mut by = BTreeMap::new();
        for ((v, p, s), n) in &self.counts {
            if WRITE_VERBS.contains(&v.as_str()) {
                let key = if s.is_empty() {
                    p.clone()
                } else {
                    format!("{p}/{s}")
                };
                *by.entry(key).or_default() += n;
            }
        }
        by
    }

    /// Requests with this verb on a resource (`sub`: `None` = all, `Some("")` = main only).
    pub fn count(&self, verb: &str, plural: &str, sub: Option<&str>) -> u64 {
        self.counts
            .iter()
            .filter(|((v, p, s), _)| v == verb && p == plural && sub.is_none_or(|x| x == s))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn reset(&mut self) {
        self.counts.clear();
        self.requests = 0;
        self.injected = 0;
    }

    pub fn stats(&self) -> Value {
        let by: Vec<Value> = self
            .counts
            .iter()
            .map(|((v, p, s), n)| json!({"verb": v, "resource": p, "subresource": s, "count": n}))
            .collect();
        let mut writes: BTreeMap<&str, u64> = BTreeMap::new();
        for ((v, p, _), n) in &self.counts {
            if WRITE_VERBS.contains(&v.as_str()) {
                *writes.entry(p).or_default() += n;
            }
        }
        let pending: Vec<Value> = self
            .rules
            .iter()
            .map(|r| {
                json!({"remaining": r.remaining, "verb": r.verb, "resource": r.plural,
                       "subresource": r.subresource, "status": r.status})
            })
            .collect();
        json!({
            "requests": self.requests,
            "injectedFailures": self.injected,
            "writes": writes,
            "byVerb": by,
            "pendingFailures": pending,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_counts() {
        let mut h = Hooks::default();
        h.add_rule(FailRule {
            remaining: 2,
            verb: "patch".into(),
            plural: "widgets".into(),
            subresource: Some("status".into()),
            status: 409,
        });
        assert_eq!(h.on_request("patch", "widgets", None), None);
        assert_eq!(h.on_request("patch", "widgets", Some("status")), Some(409));
        assert_eq!(h.on_request("get", "widgets", Some("status")), None);
        assert_eq!(h.on_request("patch", "widgets", Some("status")), Some(409));
        assert_eq!(h.on_request("patch", "widgets", Some("status")), None);
        assert_eq!(h.writes("widgets"), 4);
        // A new rule for the same key replaces the old one; n = 0 clears it.
        let rule = |n| FailRule {
            remaining: n,
            verb: "*".into(),
            plural: "widgets".into(),
            subresource: None,
            status: 500,
        };
        h.add_rule(rule(100));
        h.add_rule(rule(0));
        assert_eq!(h.on_request("get", "widgets", None), None);
        assert_eq!(h.count("patch", "widgets", Some("status")), 3);
    }
}
