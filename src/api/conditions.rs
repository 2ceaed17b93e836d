//! The `Ready`, `Synced` and `Stalled` conditions: names, reasons, and the one rule for
//! updating them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const SYNCED: &str = "Synced";
/// Present, and True, only while nothing will change without a change of spec or of Waldur:
/// kstatus (Flux, `kubectl wait`-style tools) then reports Failed at once instead of waiting
/// for a timeout. Removed as soon as the resource can make progress again.
pub const STALLED: &str = "Stalled";

/// Reasons of `Ready`.
pub mod ready_reason {
    pub const AVAILABLE: &str = "Available";
    pub const CREATING: &str = "Creating";
    pub const UPDATING: &str = "Updating";
    pub const DELETING: &str = "Deleting";
    pub const ERRED: &str = "Erred";
    pub const NOT_FOUND: &str = "NotFound";
    pub const ALREADY_MANAGED: &str = "AlreadyManaged";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The group vanished from Waldur; a tenant re-sync may bring it back before a new one.
    pub const REIMPORTING: &str = "Reimporting";
    /// The group's tenant is Erred in Waldur: every tenant action, creates included, is
    /// refused for every user until staff or Waldur's background pull repairs the tenant.
    pub const TENANT_ERRED: &str = "TenantErred";
    /// Nothing is known yet (first reconcile, or Waldur could not be reached).
    pub const UNKNOWN: &str = "Unknown";
}

/// Reasons of `Synced`.
pub mod synced_reason {
    pub const RECONCILED: &str = "ReconcileSuccess";
    pub const UNAUTHORIZED: &str = "Unauthorized";
    pub const FORBIDDEN: &str = "Forbidden";
    pub const WALDUR_UNAVAILABLE: &str = "WaldurUnavailable";
    pub const CREDENTIALS_NOT_FOUND: &str = "CredentialsNotFound";
    /// No credentialsRef, in a namespace the admin did not allow the default credentials in.
    pub const DEFAULT_CREDENTIALS_NOT_ALLOWED: &str = "DefaultCredentialsNotAllowed";
    pub const CONFLICT: &str = "Conflict";
    pub const PAUSED: &str = "Paused";
    pub const ERROR: &str = "ReconcileError";
    /// The Waldur in use has no such action (for example set_ok before 8.0).
    pub const UNSUPPORTED: &str = "UnsupportedByWaldur";
    /// The installed CRD lacks a field this operator writes: status cannot be written.
    pub const CRD_OUTDATED: &str = "CRDOutdated";
    /// Deletion waits: the group is ERRED and OpenStack may still hold it.
    pub const DELETE_BLOCKED: &str = "DeleteBlocked";
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// The most characters of Waldur's words kept in a condition message or `errorMessage`
/// (review m8): a huge OpenStack error must not push the object past etcd's size limit, after
/// which no status write would succeed.
pub const MAX_MESSAGE_CHARS: usize = 4096;

/// `text` cut to `MAX_MESSAGE_CHARS`, with an ellipsis when it was longer.
pub fn bounded(text: &str) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        None => text.to_string(),
        Some((at, _)) => format!("{}…", &text[..at]),
    }
}

/// Sets a condition in place. `lastTransitionTime` moves only when the status flips, so
/// users (and `kubectl wait`) can tell how long a resource has been in its condition.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: &Time,
) {
    let message = &bounded(message);
    let existing = conditions.iter_mut().find(|c| c.type_ == type_);
    match existing {
        Some(c) => {
            if c.status != status.as_str() {
                c.last_transition_time = now.clone();
                c.status = status.as_str().to_string();
            }
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status: status.as_str().to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            observed_generation,
            last_transition_time: now.clone(),
        }),
    }
}

/// Sets `Stalled=True` with `reason` and `message`, or removes it when `None`.
pub fn set_stalled(
    conditions: &mut Vec<Condition>,
    stalled: Option<(&str, &str)>,
    observed_generation: Option<i64>,
    now: &Time,
) {
    match stalled {
        Some((reason, message)) => set_condition(
            conditions,
            STALLED,
            ConditionStatus::True,
            reason,
            message,
            observed_generation,
            now,
        ),
        None => conditions.retain(|c| c.type_ != STALLED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn messages_are_bounded() {
        let mut c = Vec::new();
        let huge = "é".repeat(MAX_MESSAGE_CHARS * 3);
        set_condition(
            &mut c,
            READY,
            ConditionStatus::False,
            "Erred",
            &huge,
            None,
            &at(1),
        );
        assert_eq!(c[0].message.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn transition_time_moves_only_on_a_flip() {
        let mut c = Vec::new();
        set_condition(
            &mut c,
            READY,
            ConditionStatus::False,
            "Creating",
            "",
            Some(1),
            &at(10),
        );
        set_condition(
            &mut c,
            READY,
            ConditionStatus::False,
            "Creating",
            "still",
            Some(1),
            &at(20),
        );
        assert_eq!(c[0].last_transition_time, at(10));
        assert_eq!(c[0].message, "still");
        set_condition(
            &mut c,
            READY,
            ConditionStatus::True,
            "Available",
            "",
            Some(2),
            &at(30),
        );
        assert_eq!(c[0].last_transition_time, at(30));
        assert_eq!(c[0].observed_generation, Some(2));
        assert_eq!(c.len(), 1);
    }
}
