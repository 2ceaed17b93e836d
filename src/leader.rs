//! Leader election on a coordination.k8s.io Lease: only the holder reconciles, and a replica
//! that loses the lease stops reconciling at once (its in-flight reconciles are dropped).
//!
//! kube-lease-manager acquires and renews the lease, but when renewals fail (the API server is
//! overloaded, or unreachable from this replica only) it keeps retrying and never reports the
//! loss, while the lease expires and another replica takes it. So each term also has a
//! watchdog of its own: the lease must be confirmed ours, by reading it, before it can have
//! expired; a term that cannot confirm it ends `margin` before the earliest moment another
//! replica could take over.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::controller::{self, Runtime};
use crate::metrics::Metrics;
use crate::server::Health;

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub grace: Duration,
}

impl LeaseSettings {
    /// How long before the lease could expire a leader that cannot confirm it stops: a third
    /// of the duration, but at most half the grace, so that the deadline falls after the lease
    /// manager's renewal (at `duration - grace`); a deadline on the renewal itself would end
    /// the term at every renewal. The term ends (and its reconciles are dropped) well before
    /// another replica may acquire the lease.
    pub fn margin(&self) -> Duration {
        (self.grace / 2)
            .min(self.duration / 3)
            .max(Duration::from_millis(200))
    }

    /// How often a leader reads its lease back.
    fn check_every(&self) -> Duration {
        (self.margin() / 2).max(Duration::from_millis(100))
    }

    /// Refuses settings the lease manager cannot run (it counts whole seconds, and renews
    /// `grace` before expiry).
    pub fn check(&self) -> Result<(), String> {
        if self.grace < Duration::from_secs(1) || self.grace >= self.duration {
            return Err(format!(
                "--lease-grace ({:?}) must be at least 1s and shorter than --lease-duration ({:?})",
                self.grace, self.duration
            ));
        }
        Ok(())
    }
}

/// Why a term of leadership ended.
#[derive(Debug, PartialEq)]
enum TermEnd {
    Stopped,
    Lost,
    Unconfirmed,
}

/// Runs the controller during each term of leadership until `stop` turns true. Returns an
/// error when leader election itself ends (so the process exits and is restarted, instead of
/// idling as a standby for ever).
pub async fn run_when_leading(
    kube: &Client,
    lease: &LeaseSettings,
    health: &Arc<Health>,
    metrics: &Metrics,
    stop: watch::Receiver<bool>,
    runtime: impl Fn() -> Runtime,
) -> Result<(), String> {
    let manager = LeaseManagerBuilder::new(kube.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration.as_secs().max(1))
        .with_grace(lease.grace.as_secs().max(1))
        .build()
        .await
        .map_err(|e| {
            format!(
                "cannot set up leader election on Lease {}/{}: {e}",
                lease.namespace, lease.name
            )
        })?;
    let (mut leading, task) = manager.watch().await;
    let watchdog = Watchdog::new(kube, lease);
    tracing::info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "waiting for the lease");
    let mut stop_wait = stop.clone();
    let mut outcome = Ok(());
    loop {
        // A term starts when the manager says we lead *and* the lease, read back, says so.
        let valid_until = tokio::select! {
            v = acquired(&mut leading, &watchdog) => match v {
                Some(v) => v,
                None => {
                    outcome = Err(format!(
                        "leader election on Lease {}/{} ended unexpectedly",
                        lease.namespace, lease.name
                    ));
                    break;
                }
            },
            _ = stop_wait.wait_for(|s| *s) => break,
        };
        set_leader(health, metrics, true);
        tracing::info!("acquired the lease: reconciling");
        let (term_stop_tx, term_stop_rx) = watch::channel(false);
        let mut term = Box::pin(controller::run(
            runtime(),
            stopped_either(stop.clone(), term_stop_rx),
        ));
        let end = tokio::select! {
            _ = &mut term => TermEnd::Stopped,
            _ = leading.wait_for(|l| !*l) => TermEnd::Lost,
            _ = watchdog.guard(valid_until) => TermEnd::Unconfirmed,
        };
        // Dropping the term drops every reconcile in flight; tell its background tasks too.
        let _ = term_stop_tx.send(true);
        drop(term);
        set_leader(health, metrics, false);
        match end {
            TermEnd::Stopped => break,
            TermEnd::Lost => tracing::warn!("lost the lease: stopped reconciling"),
            TermEnd::Unconfirmed => tracing::warn!(
                margin = ?lease.margin(),
                "cannot confirm the lease with the API server: stopped reconciling before it can expire"
            ),
        }
    }
    // Dropping the receiver ends the manager's task, which releases the lease for the next
    // replica instead of leaving it to expire.
    drop(leading);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    outcome
}

/// Waits until the manager reports leadership and the lease confirms it; the deadline by
/// which it must be confirmed again. `None` when the manager has ended.
async fn acquired(leading: &mut watch::Receiver<bool>, watchdog: &Watchdog) -> Option<Instant> {
    loop {
        leading.wait_for(|l| *l).await.ok()?;
        if let Some(until) = watchdog.confirm().await {
            return Some(until);
        }
        tokio::time::sleep(watchdog.check_every).await;
    }
}

/// Reads the Lease back to learn until when it is surely ours.
struct Watchdog {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    margin: Duration,
    check_every: Duration,
}

impl Watchdog {
    fn new(kube: &Client, lease: &LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(kube.clone(), &lease.namespace),
            name: lease.name.clone(),
            identity: lease.identity.clone(),
            duration: lease.duration,
            margin: lease.margin(),
            check_every: lease.check_every(),
        }
    }

    /// When this replica must stop unless it confirms the lease again: the lease's expiry
    /// (its last renewal plus its duration, read from the API server) less the margin.
    /// `None` when the lease cannot be read in time or is not ours.
    async fn confirm(&self) -> Option<Instant> {
        let asked = Instant::now();
        let lease = tokio::time::timeout(
            self.check_every.max(Duration::from_secs(1)),
            self.api.get(&self.name),
        )
        .await
        .ok()?
        .ok()?;
        let spec = lease.spec?;
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return None;
        }
        let renewed = spec.renew_time?.0;
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
            .unwrap_or(self.duration);
        let age_ms = k8s_openapi::jiff::Timestamp::now()
            .as_millisecond()
            .saturating_sub(renewed.as_millisecond())
            .max(0);
        let left = duration
            .saturating_sub(Duration::from_millis(
                u64::try_from(age_ms).unwrap_or(u64::MAX),
            ))
            .saturating_sub(self.margin);
        // Counted from when the read was sent: the answer may have taken a while.
        Some(asked + left)
    }

    /// Resolves when the lease has not been confirmed in time: at the deadline, even while a
    /// read of the lease is still waiting for an API server that does not answer.
    async fn guard(&self, mut valid_until: Instant) {
        loop {
            let next = (Instant::now() + self.check_every).min(valid_until);
            tokio::time::sleep_until(next).await;
            if Instant::now() >= valid_until {
                return;
            }
            tokio::select! {
                confirmed = self.confirm() => {
                    if let Some(until) = confirmed {
                        valid_until = until;
                    }
                }
                _ = tokio::time::sleep_until(valid_until) => return,
            }
        }
    }
}

fn set_leader(health: &Health, metrics: &Metrics, leading: bool) {
    health.leader.store(leading, Ordering::SeqCst);
    health.synced.store(false, Ordering::SeqCst);
    metrics.leader.set(i64::from(leading));
    if !leading {
        // A standby does not count resources: its last counts would be read as current and
        // summed with the new leader's (an ERRED alert on old data).
        metrics.resources.clear();
    }
}

/// Resolves once `stop` turns true.
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Resolves once either turns true.
async fn stopped_either(a: watch::Receiver<bool>, b: watch::Receiver<bool>) {
    tokio::select! {
        _ = stopped(a) => {},
        _ = stopped(b) => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_that_stops_leading_exports_no_resource_counts() {
        let metrics = Metrics::new();
        let health = Health::new(true);
        set_leader(&health, &metrics, true);
        metrics.count_resources(&[std::sync::Arc::new(crate::api::ServerGroup::new(
            "web",
            Default::default(),
        ))]);
        let text = || metrics.encode();
        assert!(text().contains("waldur_operator_resources{"), "{}", text());
        set_leader(&health, &metrics, false);
        assert!(!text().contains("waldur_operator_resources{"), "{}", text());
        assert!(text().contains("waldur_operator_leader 0"));
    }

    #[test]
    fn the_deadline_falls_between_the_renewal_and_the_expiry() {
        let s = |duration, grace| LeaseSettings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "i".into(),
            duration: Duration::from_secs(duration),
            grace: Duration::from_secs(grace),
        };
        for (duration, grace) in [(15, 5), (4, 2), (3, 1), (2, 1), (60, 30)] {
            let s = s(duration, grace);
            assert_eq!(s.check(), Ok(()));
            let renewal = s.duration - s.grace;
            let deadline = s.duration - s.margin();
            // One check after the renewal is seen still lands before the deadline.
            assert!(
                renewal + s.check_every() < deadline && deadline < s.duration,
                "{duration}/{grace}: renewal {renewal:?}, check {:?}, deadline {deadline:?}",
                s.check_every()
            );
        }
        assert_eq!(s(15, 5).margin(), Duration::from_millis(2500));
        assert!(s(15, 15).check().unwrap_err().contains("shorter than"));
        assert!(s(15, 0).check().is_err());
    }
}
