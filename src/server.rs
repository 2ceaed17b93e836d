//! The operator's own HTTP endpoints: `/metrics`, `/healthz` and `/readyz` on the metrics port,
//! and `/debug/loglevel` on a separate admin port that listens on loopback by default, so that
//! only someone allowed to `kubectl port-forward` to the pod can change the log level.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use socket2::{Domain, Protocol, Socket, Type};

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

/// Listens on `addr`. An unspecified IPv6 address (`[::]`, the default) is bound dual-stack,
/// so IPv4-only, IPv6-only and dual-stack pods all answer the kubelet's probes. Where the
/// kernel has IPv6 disabled, `[::]` falls back to `0.0.0.0` on the same port.
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    match bind(addr) {
        Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && ipv6_unavailable(&e) => {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::warn!(%addr, fallback = %v4, error = %e, "IPv6 is not available; listening on IPv4 only");
            bind(v4)
        }
        other => other,
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// EAFNOSUPPORT (no IPv6 in the kernel) or EADDRNOTAVAIL (IPv6 disabled on every interface).
fn ipv6_unavailable(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(97)
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

    /// The default `[::]` answers on both loopbacks (this machine has IPv6 on `lo`), which is
    /// what the kubelet's probes need on IPv4-only and IPv6-only clusters alike.
    #[tokio::test]
    async fn the_unspecified_ipv6_address_serves_ipv4_and_ipv6() {
        let listener = listen("[::]:0".parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            for _ in 0..2 {
                listener.accept().await.unwrap();
            }
        });
        for peer in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
            tokio::net::TcpStream::connect(&peer)
                .await
                .unwrap_or_else(|e| panic!("{peer}: {e}"));
        }
        accept.await.unwrap();
    }
}
