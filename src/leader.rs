//! Leader election on a coordination.k8s.io Lease: only the holder reconciles, and a replica
//! that loses the lease stops reconciling at once (its in-flight reconciles are dropped).
//!
//! The elector ([`crate::lease::Elector`]) takes and renews the lease on this replica's own
//! clock. When renewals fail (the API server is overloaded, or unreachable from this replica
//! only) it keeps trying while the lease expires and another replica takes it. So each term
//! also has a watchdog of its own: the lease must be confirmed ours, by reading it, before it
//! can have expired; a term that cannot confirm it ends `margin` before the earliest moment
//! another replica could take over.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::controller::{self, Runtime};
use crate::metrics::Metrics;
use crate::server::Health;
use crate::sharding::{self, PeerLease, SHARD_LEASE_LABEL, Shard};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// The operator's Lease name; a shard's Lease adds its place (see [`Shard::lease_name`]).
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
    pub grace: Duration,
    pub shard: Shard,
}

impl LeaseSettings {
    /// The Lease this process competes for.
    pub fn lease_name(&self) -> String {
        self.shard.lease_name(&self.name)
    }

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
    /// Another shard runs with a different number of shards.
    Resharding(String),
}

/// Why the lease cannot be relied on now.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// Not read in time, or not ours; why, when the API server said (a missing RBAC verb).
    Unconfirmed(Option<String>),
    /// Ours, but the shards disagree on their number.
    Disagree(String),
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
    let name = lease.lease_name();
    label_shard_lease(kube, lease).await?;
    let elector = crate::lease::Elector {
        api: Api::namespaced(kube.clone(), &lease.namespace),
        name: name.clone(),
        identity: lease.identity.clone(),
        duration: lease.duration,
        grace: lease.grace,
    };
    let (mut leading, task) = elector.watch();
    let watchdog = Watchdog::new(kube, lease);
    tracing::info!(lease = %name, namespace = %lease.namespace, identity = %lease.identity, shard = %lease.shard, "waiting for the lease");
    let mut stop_wait = stop.clone();
    let mut outcome = Ok(());
    loop {
        // A term starts when the manager says we lead *and* the lease, read back, says so.
        let valid_until = tokio::select! {
            v = acquired(&mut leading, &watchdog, metrics) => match v {
                Some(v) => v,
                None => {
                    outcome = Err(format!(
                        "leader election on Lease {}/{name} ended unexpectedly",
                        lease.namespace
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
            end = watchdog.guard(valid_until) => end,
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
            TermEnd::Resharding(why) => {
                tracing::warn!(%why, "the shards disagree on their number: stopped reconciling");
            }
        }
    }
    // Dropping the receiver ends the elector's task, which releases the lease for the next
    // replica instead of leaving it to expire.
    drop(leading);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    outcome
}

/// Waits until the manager reports leadership, the lease confirms it and every shard agrees
/// on their number; the deadline by which the lease must be confirmed again. `None` when the
/// manager has ended.
async fn acquired(
    leading: &mut watch::Receiver<bool>,
    watchdog: &Watchdog,
    metrics: &Metrics,
) -> Option<Instant> {
    let mut told = None;
    loop {
        if !*leading.borrow() {
            // Not holding the shard's lease: not waiting on the other shards either.
            metrics.shard_waiting.set(0);
        }
        leading.wait_for(|l| *l).await.ok()?;
        match watchdog.confirm().await {
            Ok(until) => {
                metrics.shard_waiting.set(0);
                return Some(until);
            }
            Err(Refusal::Disagree(why)) => {
                metrics.shard_waiting.set(1);
                if told.as_ref() != Some(&why) {
                    tracing::warn!(%why, "holding the shard's lease, not reconciling yet");
                    told = Some(why);
                }
            }
            Err(Refusal::Unconfirmed(Some(why))) => {
                if told.as_ref() != Some(&why) {
                    tracing::warn!(%why, "cannot read the shard leases, not reconciling yet");
                    told = Some(why);
                }
            }
            Err(Refusal::Unconfirmed(None)) => {}
        }
        tokio::time::sleep(watchdog.check_every).await;
    }
}

/// Makes sure the shard's Lease exists and carries [`SHARD_LEASE_LABEL`], so that every shard
/// finds the others' with one labelled list. The lease manager patches the spec only, so the
/// label stays.
async fn label_shard_lease(kube: &Client, lease: &LeaseSettings) -> Result<(), String> {
    let api: Api<Lease> = Api::namespaced(kube.clone(), &lease.namespace);
    let name = lease.lease_name();
    let fail = |e: kube::Error| {
        format!(
            "cannot label the shard Lease {}/{name}: {e}",
            lease.namespace
        )
    };
    let labelled = Lease {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([(SHARD_LEASE_LABEL.to_string(), lease.name.clone())].into()),
            ..Default::default()
        },
        spec: None,
    };
    match api.create(&PostParams::default(), &labelled).await {
        Ok(_) => return Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(fail(e)),
    }
    let patch = serde_json::json!({"metadata": {"labels": {SHARD_LEASE_LABEL: lease.name}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(fail)
}

/// Reads the Lease back to learn until when it is surely ours, and the other shards' Leases
/// to learn whether they agree on the number of shards.
struct Watchdog {
    api: Api<Lease>,
    name: String,
    base: String,
    shard: Shard,
    identity: String,
    duration: Duration,
    margin: Duration,
    check_every: Duration,
    /// When each shard Lease last changed, on this replica's clock.
    observer: std::sync::Mutex<crate::lease::Observer>,
}

impl Watchdog {
    fn new(kube: &Client, lease: &LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(kube.clone(), &lease.namespace),
            name: lease.lease_name(),
            base: lease.name.clone(),
            shard: lease.shard,
            identity: lease.identity.clone(),
            duration: lease.duration,
            margin: lease.margin(),
            check_every: lease.check_every(),
            observer: Default::default(),
        }
    }

    /// Every shard Lease of this operator: the labelled ones, and the plain-named Lease of an
    /// unsharded operator (one from before sharding has no label).
    async fn shard_leases(&self) -> Result<Vec<Lease>, kube::Error> {
        let selector = format!("{SHARD_LEASE_LABEL}={}", self.base);
        let mut leases = self
            .api
            .list(&ListParams::default().labels(&selector))
            .await?
            .items;
        let has = |leases: &[Lease], name: &str| {
            leases
                .iter()
                .any(|l| l.metadata.name.as_deref() == Some(name))
        };
        if !has(&leases, &self.name) {
            leases.extend(self.api.get_opt(&self.name).await?);
        }
        if !has(&leases, &self.base) {
            leases.extend(self.api.get_opt(&self.base).await?);
        }
        Ok(leases)
    }

    /// When this replica must stop unless it confirms the lease again: the lease's expiry
    /// (its last renewal plus its duration, read from the API server) less the margin.
    async fn confirm(&self) -> Result<Instant, Refusal> {
        let asked = Instant::now();
        let leases = tokio::time::timeout(
            self.check_every.max(Duration::from_secs(1)),
            self.shard_leases(),
        )
        .await
        .map_err(|_| Refusal::Unconfirmed(None))?
        .map_err(|e| match e {
            kube::Error::Api(e) => Refusal::Unconfirmed(Some(format!(
                "{} ({}): the operator needs get and list on leases in its namespace",
                e.message, e.code
            ))),
            _ => Refusal::Unconfirmed(None),
        })?;
        let peers: Vec<PeerLease> = {
            let mut observer = self.observer.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            leases
                .iter()
                .map(|l| peer(l, observer.live(l, now, self.duration)))
                .collect()
        };
        let mine = peers
            .iter()
            .find(|p| p.name == self.name)
            .ok_or(Refusal::Unconfirmed(None))?;
        if mine.holder.as_deref() != Some(self.identity.as_str()) {
            return Err(Refusal::Unconfirmed(None));
        }
        let renewed = mine.renewed_ms.ok_or(Refusal::Unconfirmed(None))?;
        let duration = mine
            .duration_s
            .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
            .unwrap_or(self.duration);
        let now_ms = k8s_openapi::jiff::Timestamp::now().as_millisecond();
        let age_ms = now_ms.saturating_sub(renewed).max(0);
        let left = duration
            .saturating_sub(Duration::from_millis(
                u64::try_from(age_ms).unwrap_or(u64::MAX),
            ))
            .saturating_sub(self.margin);
        sharding::agreement(self.shard, &self.base, &peers).map_err(Refusal::Disagree)?;
        // Counted from when the read was sent: the answer may have taken a while.
        Ok(asked + left)
    }

    /// Resolves when the term must end: at the deadline when the lease has not been confirmed
    /// in time (even while a read is still waiting for an API server that does not answer),
    /// or as soon as another shard disagrees on the number of shards.
    async fn guard(&self, mut valid_until: Instant) -> TermEnd {
        loop {
            let next = (Instant::now() + self.check_every).min(valid_until);
            tokio::time::sleep_until(next).await;
            if Instant::now() >= valid_until {
                return TermEnd::Unconfirmed;
            }
            tokio::select! {
                confirmed = self.confirm() => match confirmed {
                    Ok(until) => valid_until = until,
                    Err(Refusal::Disagree(why)) => return TermEnd::Resharding(why),
                    Err(Refusal::Unconfirmed(_)) => {}
                },
                _ = tokio::time::sleep_until(valid_until) => return TermEnd::Unconfirmed,
            }
        }
    }
}

fn peer(lease: &Lease, live: bool) -> PeerLease {
    let spec = lease.spec.as_ref();
    PeerLease {
        name: lease.metadata.name.clone().unwrap_or_default(),
        holder: spec.and_then(|s| s.holder_identity.clone()),
        renewed_ms: spec
            .and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
            .map(|t| t.0.as_millisecond()),
        duration_s: spec.and_then(|s| s.lease_duration_seconds).map(i64::from),
        live,
    }
}

fn set_leader(health: &Health, metrics: &Metrics, leading: bool) {
    health.leader.store(leading, Ordering::SeqCst);
    health.synced.store(false, Ordering::SeqCst);
    metrics.set_leader(leading);
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
        assert!(text().contains("waldur_operator_leader{shard=\"0\",shards=\"1\"} 0"));
    }

    #[test]
    fn the_deadline_falls_between_the_renewal_and_the_expiry() {
        let s = |duration, grace| LeaseSettings {
            name: "l".into(),
            namespace: "n".into(),
            identity: "i".into(),
            duration: Duration::from_secs(duration),
            grace: Duration::from_secs(grace),
            shard: Shard::ALL,
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
