//! A Keystone and Nova emulator for the peer of `--peer orc`: the few endpoints the OpenStack
//! Resource Controller's ServerGroup controller calls, with the same latency and request
//! counting as the Waldur simulator, so that both operators meet the same backend costs.
//!
//! What ORC v2.6.0 calls (read from its source and gophercloud v2.12.0, and seen here):
//! - `POST /v3/auth/tokens` (password, project scope): 201 with `X-Subject-Token` and a service
//!   catalog whose public `compute` endpoint ends in `/v2.1`; `GET /v3/auth/tokens` to check a
//!   cached scope;
//! - `GET /v2.1/os-server-groups` with no filter (ORC matches name and policy itself; gophercloud
//!   reads one page, and Nova caps a page at `max_limit`, 1,000);
//! - `POST /v2.1/os-server-groups`: 200 with the group (Nova creates synchronously);
//! - `GET` and `DELETE /v2.1/os-server-groups/{id}`: 200 or 404, and 204.
//!
//! Anything else answers 404 and is counted under `other`, so that a run shows it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

/// Nova's `[api] max_limit`: the most groups one list answers.
const MAX_LIMIT: usize = 1_000;
const PROJECT_ID: &str = "b0c0e5b4bench0000000000000000000";
const USER_ID: &str = "a11ce000bench0000000000000000000";
const TOKEN: &str = "gAAAAABbench-token";

/// The endpoints counted, as `GET /v2.1/os-server-groups` and so on.
pub const ENDPOINTS: &[&str] = &[
    "POST /v3/auth/tokens",
    "GET /v3/auth/tokens",
    "GET /v2.1/os-server-groups",
    "POST /v2.1/os-server-groups",
    "GET /v2.1/os-server-groups/{id}",
    "DELETE /v2.1/os-server-groups/{id}",
    "other",
];

#[derive(Default)]
struct Inner {
    /// By id, in creation order (ids are a sequence), as Nova lists them.
    groups: Mutex<BTreeMap<u64, Value>>,
    next_id: AtomicU64,
    latency_ms: AtomicU64,
    counts: Mutex<BTreeMap<&'static str, u64>>,
    base_url: Mutex<String>,
}

#[derive(Clone)]
pub struct Nova {
    inner: Arc<Inner>,
    addr: SocketAddr,
    shutdown: Arc<tokio::sync::Notify>,
}

impl Nova {
    pub async fn start(latency: Duration) -> Result<Nova, String> {
        let inner = Arc::new(Inner::default());
        inner
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
        let app = Router::new()
            .route("/v3/auth/tokens", get(validate_token).post(issue_token))
            .route(
                "/v2.1/os-server-groups",
                get(list_groups).post(create_group),
            )
            .route(
                "/v2.1/os-server-groups/{id}",
                get(get_group).delete(delete_group),
            )
            .fallback(other)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        if let Ok(mut url) = inner.base_url.lock() {
            *url = format!("http://{addr}");
        }
        let shutdown = Arc::new(tokio::sync::Notify::new());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.notified().await })
                .await;
        });
        Ok(Nova {
            inner,
            addr,
            shutdown,
        })
    }

    /// The `clouds.yaml` ORC reads from its credentials Secret (cloud `openstack`).
    pub fn clouds_yaml(&self) -> String {
        format!(
            "clouds:\n  openstack:\n    auth:\n      auth_url: http://{}/v3\n      username: bench\n      password: bench\n      project_name: bench\n      user_domain_name: Default\n      project_domain_name: Default\n    region_name: RegionOne\n    interface: public\n    identity_api_version: 3\n",
            self.addr
        )
    }

    pub fn total_requests(&self) -> u64 {
        self.inner
            .counts
            .lock()
            .map(|c| c.values().sum())
            .unwrap_or_default()
    }

    pub fn requests(&self, endpoint: &str) -> u64 {
        self.inner
            .counts
            .lock()
            .ok()
            .and_then(|c| c.get(endpoint).copied())
            .unwrap_or_default()
    }

    pub fn reset_counters(&self) {
        if let Ok(mut c) = self.inner.counts.lock() {
            c.clear();
        }
    }

    pub fn groups(&self) -> usize {
        self.inner
            .groups
            .lock()
            .map(|g| g.len())
            .unwrap_or_default()
    }

    pub fn shutdown(&self) {
        self.shutdown.notify_waiters();
    }
}

/// Counts the request and waits the latency, as every answer does.
async fn arrive(inner: &Inner, endpoint: &'static str) {
    if let Ok(mut c) = inner.counts.lock() {
        *c.entry(endpoint).or_default() += 1;
    }
    let ms = inner.latency_ms.load(Ordering::Relaxed);
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

fn token_body(inner: &Inner) -> Value {
    let base = inner.base_url.lock().map(|u| u.clone()).unwrap_or_default();
    let domain = json!({"id": "default", "name": "Default"});
    json!({"token": {
        "methods": ["password"],
        "expires_at": "2099-01-01T00:00:00.000000Z",
        "issued_at": "2026-01-01T00:00:00.000000Z",
        "user": {"id": USER_ID, "name": "bench", "domain": domain},
        "project": {"id": PROJECT_ID, "name": "bench", "domain": domain},
        "roles": [{"id": "r1", "name": "member"}],
        "catalog": [{
            "id": "c1", "type": "compute", "name": "nova",
            "endpoints": [{
                "id": "e1", "interface": "public", "region": "RegionOne",
                "region_id": "RegionOne", "url": format!("{base}/v2.1"),
            }],
        }],
    }})
}

async fn issue_token(State(inner): State<Arc<Inner>>) -> Response {
    arrive(&inner, "POST /v3/auth/tokens").await;
    token_answer(&inner, StatusCode::CREATED)
}

async fn validate_token(State(inner): State<Arc<Inner>>) -> Response {
    arrive(&inner, "GET /v3/auth/tokens").await;
    token_answer(&inner, StatusCode::OK)
}

/// Keystone answers both with the token in `X-Subject-Token` and its body.
fn token_answer(inner: &Inner, status: StatusCode) -> Response {
    (
        status,
        [("X-Subject-Token", TOKEN)],
        axum::Json(token_body(inner)),
    )
        .into_response()
}

async fn list_groups(
    State(inner): State<Arc<Inner>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    arrive(&inner, "GET /v2.1/os-server-groups").await;
    let limit = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(MAX_LIMIT)
        .min(MAX_LIMIT);
    let offset = query
        .get("offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or(0usize);
    let page: Vec<Value> = match inner.groups.lock() {
        Ok(groups) => groups.values().skip(offset).take(limit).cloned().collect(),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    axum::Json(json!({"server_groups": page})).into_response()
}

async fn create_group(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    arrive(&inner, "POST /v2.1/os-server-groups").await;
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("malformed request body");
    };
    let asked = &request["server_group"];
    let (Some(name), Some(policy)) = (asked["name"].as_str(), asked["policy"].as_str()) else {
        return bad_request("name and policy are required");
    };
    let seq = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("00000000-0000-4000-8000-{seq:012x}");
    let group = json!({
        "id": id,
        "name": name,
        "policy": policy,
        "rules": asked.get("rules").cloned().unwrap_or_else(|| json!({})),
        "members": [],
        "project_id": PROJECT_ID,
        "user_id": USER_ID,
        "metadata": {},
    });
    match inner.groups.lock() {
        Ok(mut groups) => groups.insert(seq, group.clone()),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    axum::Json(json!({"server_group": group})).into_response()
}

fn seq_of(id: &str) -> Option<u64> {
    u64::from_str_radix(id.strip_prefix("00000000-0000-4000-8000-")?, 16).ok()
}

async fn get_group(State(inner): State<Arc<Inner>>, Path(id): Path<String>) -> Response {
    arrive(&inner, "GET /v2.1/os-server-groups/{id}").await;
    let found = seq_of(&id).and_then(|seq| inner.groups.lock().ok()?.get(&seq).cloned());
    match found {
        Some(group) => axum::Json(json!({"server_group": group})).into_response(),
        None => not_found(&id),
    }
}

async fn delete_group(State(inner): State<Arc<Inner>>, Path(id): Path<String>) -> Response {
    arrive(&inner, "DELETE /v2.1/os-server-groups/{id}").await;
    let removed = seq_of(&id).and_then(|seq| inner.groups.lock().ok()?.remove(&seq));
    match removed {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => not_found(&id),
    }
}

async fn other(
    State(inner): State<Arc<Inner>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    arrive(&inner, "other").await;
    eprintln!("  nova emulator: no route for {method} {uri}");
    StatusCode::NOT_FOUND.into_response()
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"badRequest": {"code": 400, "message": message}})),
    )
        .into_response()
}

fn not_found(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"itemNotFound": {"code": 404, "message": format!("Server group {id} could not be found.")}})),
    )
        .into_response()
}
