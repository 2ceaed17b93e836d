//! The operator's own HTTP endpoints: `/metrics`, `/healthz` and `/readyz` on the metrics port,
//! and `/debug/loglevel` on a separate admin port that listens on loopback by default, so that
//! only someone allowed to `kubectl port-forward` to the pod can change the log level.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;
use crate::telemetry::LogControl;

/// What the probes report.
#[derive(Debug, Default)]
pub struct Health {
    /// The controller's cache has its first full list.
    pub synced: AtomicBool,
    /// This replica holds the lease (always true without leader election).
    pub leader: AtomicBool,
    /// Leader election is on.
    pub electing: bool,
}

impl Health {
    pub fn new(electing: bool) -> Self {
        Self {
            electing,
            ..Default::default()
        }
    }

    /// Ready once the cache is synced; a standby replica is ready too, so a rolling update
    /// can proceed, and says that it is standing by.
    pub fn readiness(&self) -> (bool, &'static str) {
        let leader = self.leader.load(Ordering::SeqCst);
        let synced = self.synced.load(Ordering::SeqCst);
        match (self.electing, leader, synced) {
            (true, false, _) => (true, "ok: standby, another replica holds the lease\n"),
            (_, _, false) => (
                false,
                "not ready: the ServerGroup cache is not synced yet\n",
            ),
            (true, true, true) => (true, "ok: leader\n"),
            (false, _, true) => (true, "ok\n"),
        }
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
    logs: Option<LogControl>,
}

/// `/metrics`, `/healthz`, `/readyz`: read-only, safe to expose to the cluster.
pub fn router(metrics: Metrics, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AppState {
            metrics,
            health,
            logs: None,
        })
}

/// `/debug/loglevel`: changes the running process, so it belongs on the admin port.
pub fn admin_router(logs: LogControl) -> Router {
    Router::new()
        .route("/debug/loglevel", get(log_level).put(set_log_level))
        .with_state(AppState {
            metrics: Metrics::new(),
            health: Arc::new(Health::default()),
            logs: Some(logs),
        })
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    let (ok, body) = s.health.readiness();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

async fn log_level(State(s): State<AppState>) -> impl IntoResponse {
    match s.logs {
        Some(l) => (StatusCode::OK, format!("{}\n", l.current())),
        None => (StatusCode::NOT_FOUND, "no log control\n".to_string()),
    }
}

async fn set_log_level(State(s): State<AppState>, body: String) -> impl IntoResponse {
    match s.logs.map(|l| l.set(&body)) {
        Some(Ok(())) => {
            tracing::info!(filter = body.trim(), "log filter changed");
            (
                StatusCode::OK,
                format!("log filter is now {}\n", body.trim()),
            )
        }
        Some(Err(e)) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
        None => (StatusCode::NOT_FOUND, "no log control\n".to_string()),
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_sync_and_leadership() {
        let h = Health::new(false);
        assert!(!h.readiness().0);
        h.synced.store(true, Ordering::SeqCst);
        assert_eq!(h.readiness(), (true, "ok\n"));
        let e = Health::new(true);
        assert!(e.readiness().0);
        assert!(e.readiness().1.contains("standby"));
        e.leader.store(true, Ordering::SeqCst);
        assert!(
            !e.readiness().0,
            "a new leader is not ready until its cache syncs"
        );
        e.synced.store(true, Ordering::SeqCst);
        assert_eq!(e.readiness(), (true, "ok: leader\n"));
    }
}
