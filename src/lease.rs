//! Leader election on a coordination.k8s.io Lease, decided on this replica's own clock.
//!
//! A Lease held by another replica is taken for expired only once its record has not changed
//! for a whole lease duration of *this* replica's time, as client-go's leader election does
//! (its `observedTime`). Comparing the holder's `renewTime` with our clock instead, as
//! kube-lease-manager does, lets a standby whose clock runs ahead take a lease that is being
//! renewed, and two replicas then act at once (review N8). Every write is an update guarded by
//! the resourceVersion read, so two standbys never both win.
//!
//! The same observations tell whether another shard's Lease is live
//! ([`Observer::live`]), for the shard agreement.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

/// The part of a Lease whose change shows its holder is alive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    pub renew_time: Option<String>,
    pub acquire_time: Option<String>,
    pub duration_s: Option<i32>,
    pub transitions: Option<i32>,
}

impl Record {
    pub fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        let time = |t: Option<MicroTime>| t.map(|t| t.0.to_string());
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renew_time: time(spec.renew_time),
            acquire_time: time(spec.acquire_time),
            duration_s: spec.lease_duration_seconds,
            transitions: spec.lease_transitions,
        }
    }

    /// The lease duration the record states, or `fallback`.
    fn duration(&self, fallback: Duration) -> Duration {
        self.duration_s
            .and_then(|s| u64::try_from(s).ok())
            .map_or(fallback, Duration::from_secs)
    }
}

/// What may be done with a Lease as observed (pure; the table tests hold it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Ours: renew it.
    Ours,
    /// Nobody holds it, or its holder has not renewed it for a whole duration of our time.
    Free,
    /// Another replica holds it and renewed it within its duration, as far as we observed.
    HeldByOther,
}

/// Decides on the record and how long this replica has seen it unchanged; never on the
/// record's timestamps against our clock.
pub fn verdict(
    record: &Record,
    unchanged_for: Duration,
    identity: &str,
    fallback: Duration,
) -> Verdict {
    match record.holder.as_deref() {
        None => Verdict::Free,
        Some(h) if h == identity => Verdict::Ours,
        Some(_) if unchanged_for >= record.duration(fallback) => Verdict::Free,
        Some(_) => Verdict::HeldByOther,
    }
}

/// When this replica last saw each Lease change, on its monotonic clock.
#[derive(Default)]
pub struct Observer {
    seen: HashMap<String, (Record, Instant)>,
}

impl Observer {
    /// Records a read of `name`, returning how long its record has been seen unchanged. A
    /// Lease seen for the first time counts as changed now: a replica that starts (or starts
    /// watching) waits a whole duration before it takes a held lease over.
    pub fn observe(&mut self, name: &str, record: &Record, now: Instant) -> Duration {
        match self.seen.get(name) {
            Some((seen, since)) if seen == record => now.saturating_duration_since(*since),
            _ => {
                self.seen.insert(name.to_string(), (record.clone(), now));
                Duration::ZERO
            }
        }
    }

    /// Whether `lease` is held by a live process, by this replica's observations: held, and
    /// changed within its duration. Records the read.
    pub fn live(&mut self, lease: &Lease, now: Instant, fallback: Duration) -> bool {
        let name = lease.metadata.name.clone().unwrap_or_default();
        let record = Record::of(lease);
        let unchanged_for = self.observe(&name, &record, now);
        record.holder.is_some() && unchanged_for < record.duration(fallback)
    }
}

/// Competes for one Lease and renews it while held, in a task of its own.
pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub grace: Duration,
}

impl Elector {
    /// Starts the election. The receiver says whether this replica holds the Lease; dropping
    /// every receiver ends the task, which then releases the Lease if it holds it.
    pub fn watch(self) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move { self.run(tx).await });
        (rx, task)
    }

    /// How often a standby reads the Lease: the takeover comes at most this late.
    fn poll(&self) -> Duration {
        (self.grace / 2).clamp(Duration::from_millis(200), Duration::from_secs(2))
    }

    async fn run(self, tx: watch::Sender<bool>) {
        let mut observer = Observer::default();
        let mut renewed: Option<Instant> = None;
        loop {
            let next = tokio::select! {
                _ = tx.closed() => break,
                next = self.step(&mut observer, &mut renewed, &tx) => next,
            };
            tokio::select! {
                _ = tx.closed() => break,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
        if *tx.borrow() {
            self.release().await;
        }
    }

    /// One look at the Lease and what follows from it; when to look next.
    async fn step(
        &self,
        observer: &mut Observer,
        renewed: &mut Option<Instant>,
        tx: &watch::Sender<bool>,
    ) -> Instant {
        let now = Instant::now();
        let leading = *tx.borrow();
        let renew_every = self.duration.saturating_sub(self.grace);
        if leading && renewed.is_some_and(|at| now < at + renew_every) {
            return renewed.map_or(now, |at| at + renew_every);
        }
        let lease = match self.api.get_opt(&self.name).await {
            Ok(Some(lease)) => lease,
            Ok(None) => Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: None,
            },
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the lease");
                return now + self.poll();
            }
        };
        let record = Record::of(&lease);
        let unchanged_for = observer.observe(&self.name, &record, now);
        match verdict(&record, unchanged_for, &self.identity, self.duration) {
            Verdict::HeldByOther => {
                if leading {
                    tx.send_replace(false);
                }
                *renewed = None;
                now + self.poll()
            }
            verdict => match self.write(lease, verdict == Verdict::Ours).await {
                Ok(()) => {
                    *renewed = Some(now);
                    if !leading {
                        tx.send_replace(true);
                    }
                    now + renew_every
                }
                Err(e) => {
                    // Another replica wrote first (409), or the API server failed: read again.
                    // A leader keeps its term; the watchdog ends it before the lease can expire.
                    tracing::debug!(error = %e, "cannot write the lease");
                    now + self.poll()
                }
            },
        }
    }

    /// Renews the Lease (ours) or takes it (free), guarded by the resourceVersion read.
    async fn write(&self, mut lease: Lease, ours: bool) -> Result<(), kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let old = lease.spec.take().unwrap_or_default();
        let taken = !ours;
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: if taken {
                Some(now.clone())
            } else {
                old.acquire_time.clone()
            },
            renew_time: Some(now),
            lease_transitions: if taken {
                Some(old.lease_transitions.unwrap_or(0) + 1)
            } else {
                old.lease_transitions
            },
            ..old
        });
        if lease.metadata.resource_version.is_none() {
            self.api.create(&PostParams::default(), &lease).await?;
        } else {
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await?;
        }
        Ok(())
    }

    /// Gives the Lease up for the next replica, if it is still ours.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        if Record::of(&lease).holder.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
            spec.acquire_time = None;
            spec.lease_duration_seconds = None;
        }
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "cannot release the lease; it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str, renew: &str) -> Record {
        Record {
            holder: Some(by.into()),
            renew_time: Some(renew.into()),
            duration_s: Some(15),
            ..Default::default()
        }
    }

    /// Review N8: only what this replica observed decides, not the record's timestamps.
    #[test]
    fn a_lease_is_free_only_when_unchanged_for_a_whole_duration_of_our_time() {
        let s = Duration::from_secs;
        let fallback = s(15);
        assert_eq!(
            verdict(&Record::default(), s(0), "me", fallback),
            Verdict::Free
        );
        assert_eq!(
            verdict(&held("me", "t"), s(0), "me", fallback),
            Verdict::Ours
        );
        assert_eq!(
            verdict(&held("me", "t"), s(99), "me", fallback),
            Verdict::Ours
        );
        // Held by another: a renewTime long past by our clock means nothing by itself.
        for unchanged in [0, 5, 14] {
            assert_eq!(
                verdict(
                    &held("other", "2001-01-01T00:00:00Z"),
                    s(unchanged),
                    "me",
                    fallback
                ),
                Verdict::HeldByOther,
                "{unchanged} s"
            );
        }
        assert_eq!(
            verdict(&held("other", "t"), s(15), "me", fallback),
            Verdict::Free
        );
        // The record's own duration counts, else ours.
        let short = Record {
            duration_s: Some(3),
            ..held("other", "t")
        };
        assert_eq!(verdict(&short, s(3), "me", fallback), Verdict::Free);
        let no_duration = Record {
            duration_s: None,
            ..held("other", "t")
        };
        assert_eq!(
            verdict(&no_duration, s(14), "me", fallback),
            Verdict::HeldByOther
        );
    }

    /// A record seen for the first time counts as changed now; any change restarts the count.
    #[test]
    fn the_observer_counts_from_the_last_change_it_saw() {
        let mut o = Observer::default();
        let t0 = Instant::now();
        let a = held("other", "1");
        assert_eq!(o.observe("l", &a, t0), Duration::ZERO);
        assert_eq!(
            o.observe("l", &a, t0 + Duration::from_secs(4)),
            Duration::from_secs(4)
        );
        let b = held("other", "2");
        assert_eq!(
            o.observe("l", &b, t0 + Duration::from_secs(5)),
            Duration::ZERO
        );
        assert_eq!(
            o.observe("l", &b, t0 + Duration::from_secs(7)),
            Duration::from_secs(2)
        );
        assert_eq!(
            o.observe("other-lease", &b, t0 + Duration::from_secs(7)),
            Duration::ZERO
        );
    }
}
