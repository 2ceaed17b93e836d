//! Leader election on a coordination.k8s.io Lease: only the holder reconciles, and a replica
//! that loses the lease stops reconciling at once (its in-flight reconciles are dropped).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

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

/// Runs the controller during each term of leadership until `stop` turns true.
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
    tracing::info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "waiting for the lease");
    let mut stop_wait = stop.clone();
    loop {
        tokio::select! {
            changed = leading.wait_for(|l| *l) => if changed.is_err() { break },
            _ = stop_wait.wait_for(|s| *s) => break,
        }
        set_leader(health, metrics, true);
        tracing::info!("acquired the lease: reconciling");
        let term = controller::run(runtime(), stopped(stop.clone()));
        tokio::select! {
            _ = term => {
                // Stopped by the shutdown signal.
                set_leader(health, metrics, false);
                break;
            }
            _ = leading.wait_for(|l| !*l) => {
                set_leader(health, metrics, false);
                tracing::warn!("lost the lease: stopped reconciling");
            }
        }
    }
    // Dropping the receiver ends the manager's task, which releases the lease for the next
    // replica instead of leaving it to expire.
    drop(leading);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    Ok(())
}

fn set_leader(health: &Health, metrics: &Metrics, leading: bool) {
    health.leader.store(leading, Ordering::SeqCst);
    health.synced.store(false, Ordering::SeqCst);
    metrics.leader.set(i64::from(leading));
}

/// Resolves once `stop` turns true.
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
