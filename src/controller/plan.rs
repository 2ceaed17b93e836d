//! Pure decisions: from (spec, status, what Waldur answered) to the next thing to do.
//!
//! Nothing here performs I/O or reads a clock; `reconcile` carries the answers out. That keeps
//! every rule of the design's reconcile steps table-testable.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::conditions::synced_reason;
use crate::api::{
    CreateIntent, DeletionPolicy, HandledRequests, ManagementPolicy, READY, SYNCED, ServerGroup,
    ServerGroupStatus, ready_reason,
};
use crate::waldur::{Policy, ServerGroup as WaldurGroup, State, WaldurUuid};

mod cleanup;
mod locate;
mod observe;
mod reimport;

pub use cleanup::*;
pub use locate::*;
pub use observe::*;
pub use reimport::*;

/// Operator-wide settings that shape decisions.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often a settled group is re-read, unless the resource sets its own.
    pub resync_period: Duration,
    /// Pull settled groups this often; `None` leaves it to Waldur's own 2-hourly re-sync.
    pub pull_interval: Option<Duration>,
    /// How long a vanished group is waited for when no evidence can be had (automatic tenant
    /// re-syncs off, refused, or the tenant's state unreadable): longer than Waldur's own
    /// periodic re-sync (every 2 hours) and its lateness, so that a group Waldur re-imports is
    /// back before a new one is made.
    pub reimport_wait: Duration,
    /// Whether the operator asks Waldur for tenant re-syncs by itself (after an unlink, and
    /// before deleting an ERRED group). Each holds the whole tenant while it runs, and a failed
    /// one leaves the tenant Erred for every user.
    pub tenant_pulls: bool,
    /// The least time between two tenant re-syncs this operator asks for in one tenant.
    pub tenant_pull_floor: Duration,
}

impl Settings {
    /// Waldur's periodic re-sync runs every 2 hours; one more hour covers a late one.
    pub const DEFAULT_REIMPORT_WAIT: Duration = Duration::from_secs(3 * 3600);
    pub const DEFAULT_TENANT_PULL_FLOOR: Duration = Duration::from_secs(300);
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            resync_period: Duration::from_secs(600),
            pull_interval: None,
            reimport_wait: Self::DEFAULT_REIMPORT_WAIT,
            tenant_pulls: true,
            tenant_pull_floor: Self::DEFAULT_TENANT_PULL_FLOOR,
        }
    }
}

fn due(last: Option<Timestamp>, every: Duration, now: Timestamp) -> bool {
    match last {
        None => true,
        Some(last) => SignedDuration::try_from(every)
            .ok()
            .and_then(|d| last.checked_add(d).ok())
            .is_none_or(|next| next <= now),
    }
}

/// The resource's resync period, or the operator's default when unset or unreadable. A period
/// below the floor (stored before the CRD had its rule) counts as the floor.
pub fn resync_of(sg: &ServerGroup, settings: &Settings) -> Duration {
    sg.spec
        .resync_period
        .as_deref()
        .and_then(parse_duration)
        .filter(|d| !d.is_zero())
        .map(|d| d.max(crate::api::MIN_RESYNC_PERIOD))
        .unwrap_or(settings.resync_period)
}

/// Parses `90s`, `10m`, `1h30m`, `500ms`: the forms the CRD's pattern admits.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else {
            return None;
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(n).ok()?)?)?;
        rest = &rest[len..];
    }
    Some(total)
}

/// When to look again: soon (backing off) while Waldur is busy, within the resync period when
/// settled: between 90 % and 100 % of it, so the reads spread out and every resource is read
/// at least once per period (the period is a promise, not an average). `busy_for` is how long the group has been transitional;
/// `jitter` is a number in [0, 1) chosen by the caller.
pub fn requeue_after(
    sg: &ServerGroup,
    state: Option<&State>,
    busy_for: Duration,
    settings: &Settings,
    jitter: f64,
) -> Duration {
    match state {
        Some(s) if s.is_transitional() => {
            // 1 s, growing with a quarter of the time spent waiting, capped at 30 s.
            (busy_for / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
        }
        _ => resync_of(sg, settings).mul_f64(0.9 + 0.1 * jitter.clamp(0.0, 1.0)),
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
