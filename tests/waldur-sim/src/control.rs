//! `/__sim/...`: the out-of-band control plane for tests, scripts and benchmarks in other
//! processes. Never authenticated, never faulted, never counted.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::config::{DefaultOrder, Delays};
use crate::error::json_response;
use crate::faults::{AfterCommit, AfterCommitRule, ENDPOINTS, FailRule, Faults};
use crate::model::State;
use crate::server::Shared;
use crate::world::{Caller, TenantPullTiming};

/// Plain-text reference of the control plane, served at `GET /__sim/` and printed by `--help`.
pub const CONTROL_HELP: &str = "\
Control plane (no auth; faults and counters ignore it):
  GET  /__sim/                   this text
  GET  /__sim/stats              request counters {\"total\":N,\"endpoints\":{\"list\":N,...}}
  POST /__sim/stats/reset        zero the counters
  GET  /__sim/groups             every server-group row, as staff sees it
  GET  /__sim/openstack          OpenStack's groups per tenant
  POST /__sim/openstack/create   {\"tenant_uuid\",\"name\",\"policy\"} -> {\"backend_id\"} (imported by the next re-sync)
  POST /__sim/openstack/delete   {\"backend_id\"} or {\"uuid\"} (row uuid): remove the group from OpenStack
  POST /__sim/openstack/update   {\"backend_id\",\"name\"?,\"policy\"?}: change it in OpenStack
  POST /__sim/resync             run Waldur's tenant re-sync now -> {\"deleted\",\"imported\",\"recovered\"}
  POST /__sim/state              {\"uuid\",\"state\"}: force a row's state (either vocabulary)
  POST /__sim/instances          {\"uuid\",\"instances\":[{\"name\",\"backend_id\"}]}: attach VMs
  GET  /__sim/tenants            every tenant as staff sees it (plus \"ok\", \"user_visible\")
  POST /__sim/tenants            {\"uuid\",\"ok\"?,\"state\"?,\"error_message\"?,\"user_visible\"?}: add or change a tenant
                                 (state OK|ERRED|UPDATE_SCHEDULED|UPDATING, stops its pull; ok=false = ERRED:
                                 every tenant action answers 409 outside OK)
  GET  /__sim/tenants/pull-delay how long pull_server_groups holds a tenant
  POST /__sim/tenants/pull-delay {\"delay_ms\":N} (half Update Scheduled, half Updating), {\"delay_ms\":null}
                                 (never runs: held until released) or {\"delay_ms\":\"default\"} (group delays)
  POST /__sim/tenants/release    every tenant pull accepted so far completes now
  GET  /__sim/clock              Waldur's clock offset {\"offset_secs\":N}
  POST /__sim/clock              {\"offset_secs\":N}: shift every created/modified written from now on (N may be < 0)
  POST /__sim/delays             {\"schedule_ms\",\"run_ms\"}: worker timing for new operations
  GET  /__sim/order              the list's order without o=
  POST /__sim/order              {\"order\":\"shuffled\",\"seed\":N?} (real server: tenant name, then a new order
                                 per request) or {\"order\":\"created\"} (oldest first, stable)
  GET  /__sim/faults             current faults
  POST /__sim/faults             any of {\"latency_ms\":N, \"fail_next\":{\"count\":N,\"status\":503,\"endpoint\":\"create\"?},
                                 \"failing\":502|null, \"drop_next\":N, \"slow_body_ms\":N|null,
                                 \"fail_creates\":N, \"fail_deletes\":N, \"refuse_deletes\":true|false,
                                 \"fail_tenant_pulls\":N,
                                 \"after_commit\":{\"count\":N,\"endpoint\":\"create\"?,\"delay_ms\":N?}}
                                 (after_commit: the next N successful requests are carried out, then
                                 answered delay_ms late, or without delay_ms never: the connection drops)
                                 (fail_deletes: the next N deletes fail in OpenStack; refuse_deletes: all
                                 of them until false; from OK -> ERRED, from ERRED the row goes anyway)
                                 (fail_tenant_pulls: the next N pull_server_groups fail in OpenStack: no row
                                 changes, the tenant ends ERRED until a staff tenant pull, set_ok or /__sim/resync)
  POST /__sim/faults/clear       remove every fault
Endpoint names: list count retrieve create create_collection pull delete unlink set_erred set_ok
  pull_server_groups tenant_list tenant_retrieve tenant_pull tenant_set_ok tenant_set_erred update other
";

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/__sim", get(help))
        .route("/__sim/", get(help))
        .route("/__sim/stats", get(stats))
        .route("/__sim/stats/reset", post(reset_stats))
        .route("/__sim/groups", get(groups))
        .route("/__sim/openstack", get(openstack))
        .route("/__sim/openstack/create", post(openstack_create))
        .route("/__sim/openstack/delete", post(openstack_delete))
        .route("/__sim/openstack/update", post(openstack_update))
        .route("/__sim/resync", post(resync))
        .route("/__sim/state", post(force_state))
        .route("/__sim/instances", post(instances))
        .route("/__sim/tenants", get(get_tenants).post(tenants))
        .route(
            "/__sim/tenants/pull-delay",
            get(get_tenant_pull_delay).post(set_tenant_pull_delay),
        )
        .route("/__sim/tenants/release", post(release_tenant_pulls))
        .route("/__sim/clock", get(get_clock).post(set_clock))
        .route("/__sim/delays", post(delays))
        .route("/__sim/order", get(get_order).post(set_order))
        .route("/__sim/faults", get(get_faults).post(set_faults))
        .route("/__sim/faults/clear", post(clear_faults))
}

type Shared_ = AxState<Arc<Shared>>;

fn bad(msg: impl std::fmt::Display) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({ "detail": msg.to_string() }),
    )
}

fn ok(body: Value) -> Response {
    json_response(StatusCode::OK, &body)
}

/// Errors come back as a boxed ready-made 400 so handlers can `return *e`.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| Box::new(bad(e)))
}

async fn help() -> Response {
    CONTROL_HELP.into_response()
}

async fn stats(AxState(s): Shared_) -> Response {
    ok(s.counters().to_json())
}

async fn reset_stats(AxState(s): Shared_) -> Response {
    s.counters().reset();
    ok(json!({"detail": "Counters reset."}))
}

async fn groups(AxState(s): Shared_) -> Response {
    let world = s.world();
    let rows: Vec<Value> = world
        .rows_sorted()
        .into_iter()
        .map(|r| world.render(r, &s.base_url))
        .collect();
    ok(Value::Array(rows))
}

async fn openstack(AxState(s): Shared_) -> Response {
    let world = s.world();
    let mut out = serde_json::Map::new();
    for (tenant, groups) in &world.openstack {
        let list: Vec<Value> = groups
            .iter()
            .map(|g| json!({"backend_id": g.backend_id, "name": g.name, "policy": g.policy}))
            .collect();
        out.insert(tenant.clone(), Value::Array(list));
    }
    ok(Value::Object(out))
}

#[derive(Deserialize)]
struct OsCreate {
    tenant_uuid: Option<String>,
    name: String,
    #[serde(default)]
    policy: String,
}

async fn openstack_create(AxState(s): Shared_, body: Bytes) -> Response {
    let req: OsCreate = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let mut world = s.world();
    let tenant = match req.tenant_uuid {
        Some(t) => t,
        None => match world.tenants.keys().next() {
            Some(t) => t.clone(),
            None => return bad("no tenant"),
        },
    };
    let backend_id = world.openstack_create(&tenant, &req.name, &req.policy);
    json_response(StatusCode::CREATED, &json!({ "backend_id": backend_id }))
}

#[derive(Deserialize)]
struct OsDelete {
    backend_id: Option<String>,
    uuid: Option<String>,
}

async fn openstack_delete(AxState(s): Shared_, body: Bytes) -> Response {
    let req: OsDelete = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let Some(id) = req.backend_id.or(req.uuid) else {
        return bad("give backend_id or uuid");
    };
    if s.world().openstack_delete(&id) {
        ok(json!({"detail": "Deleted in OpenStack."}))
    } else {
        json_response(
            StatusCode::NOT_FOUND,
            &json!({"detail": "No such group in OpenStack."}),
        )
    }
}

#[derive(Deserialize)]
struct OsUpdate {
    backend_id: String,
    name: Option<String>,
    policy: Option<String>,
}

async fn openstack_update(AxState(s): Shared_, body: Bytes) -> Response {
    let req: OsUpdate = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    if s.world()
        .openstack_update(&req.backend_id, req.name.as_deref(), req.policy.as_deref())
    {
        ok(json!({"detail": "Updated in OpenStack."}))
    } else {
        json_response(
            StatusCode::NOT_FOUND,
            &json!({"detail": "No such group in OpenStack."}),
        )
    }
}

async fn resync(AxState(s): Shared_) -> Response {
    let report = s.world().resync();
    ok(serde_json::to_value(report).unwrap_or(Value::Null))
}

#[derive(Deserialize)]
struct ForceState {
    uuid: String,
    state: String,
}

async fn force_state(AxState(s): Shared_, body: Bytes) -> Response {
    let req: ForceState = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let Some(state) = State::parse_any(&req.state) else {
        return bad(format!("unknown state {:?}", req.state));
    };
    let mut world = s.world();
    if !world.force_state(&req.uuid, state) {
        return json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not found."}));
    }
    match world.visible_row(Caller::Staff, &req.uuid) {
        Some(row) => ok(world.render(row, &s.base_url)),
        None => json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not found."})),
    }
}

#[derive(Deserialize)]
struct InstanceSpec {
    name: String,
    #[serde(default)]
    backend_id: String,
}

#[derive(Deserialize)]
struct Instances {
    uuid: String,
    #[serde(default)]
    instances: Vec<InstanceSpec>,
}

async fn instances(AxState(s): Shared_, body: Bytes) -> Response {
    let req: Instances = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let list = req
        .instances
        .into_iter()
        .map(|i| (i.name, i.backend_id))
        .collect();
    let mut world = s.world();
    if !world.set_instances(&req.uuid, list) {
        return json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not found."}));
    }
    match world.visible_row(Caller::Staff, &req.uuid) {
        Some(row) => ok(world.render(row, &s.base_url)),
        None => json_response(StatusCode::NOT_FOUND, &json!({"detail": "Not found."})),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantReq {
    uuid: String,
    /// Shorthand: true = OK, false = ERRED (as `Simulator::set_tenant_ok`).
    ok: Option<bool>,
    /// `OK`, `ERRED`, `UPDATE_SCHEDULED` or `UPDATING` (either vocabulary); wins over `ok`.
    state: Option<String>,
    /// Kept when the tenant is (set) ERRED.
    error_message: Option<String>,
    user_visible: Option<bool>,
}

/// A tenant as staff sees it over the API, plus the simulator's own bookkeeping.
fn tenant_json(world: &crate::world::World, id: &str, base: &str) -> Value {
    match world.tenants.get(id) {
        Some(t) => {
            let mut v = world.render_tenant(t, base);
            if let Some(map) = v.as_object_mut() {
                map.insert("ok".into(), t.is_ok().into());
                map.insert("user_visible".into(), t.user_visible.into());
            }
            v
        }
        None => Value::Null,
    }
}

async fn get_tenants(AxState(s): Shared_) -> Response {
    let world = s.world();
    let list: Vec<Value> = world
        .tenants_sorted()
        .into_iter()
        .map(|t| tenant_json(&world, &t.uuid, &s.base_url))
        .collect();
    ok(Value::Array(list))
}

async fn tenants(AxState(s): Shared_, body: Bytes) -> Response {
    let req: TenantReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let state = match (&req.state, req.ok) {
        (Some(label), _) => match State::parse_any(label).filter(|st| st.is_tenant_state()) {
            Some(st) => Some(st),
            None => {
                return bad(format!(
                    "unknown tenant state {label:?} (OK, ERRED, UPDATE_SCHEDULED, UPDATING)"
                ));
            }
        },
        (None, Some(true)) => Some(State::Ok),
        (None, Some(false)) => Some(State::Erred),
        (None, None) => None,
    };
    let mut world = s.world();
    let id = world.add_tenant(&req.uuid, req.user_visible.unwrap_or(false));
    if let Some(st) = state {
        let message = req
            .error_message
            .as_deref()
            .unwrap_or(crate::server::TENANT_ERRED_BY_HAND);
        world.set_tenant_state(&id, st, message, "");
    }
    if let (Some(v), Some(t)) = (req.user_visible, world.tenants.get_mut(&id)) {
        t.user_visible = v;
    }
    ok(tenant_json(&world, &id, &s.base_url))
}

fn tenant_pull_delay_json(timing: TenantPullTiming) -> Value {
    match timing {
        TenantPullTiming::FollowGroups => json!({"delay_ms": "default"}),
        TenantPullTiming::After(d) => {
            json!({"delay_ms": u64::try_from(d.as_millis()).unwrap_or(u64::MAX)})
        }
        TenantPullTiming::Never => json!({"delay_ms": null}),
    }
}

async fn get_tenant_pull_delay(AxState(s): Shared_) -> Response {
    ok(tenant_pull_delay_json(s.world().tenant_pull_timing))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantPullDelayReq {
    /// A number of milliseconds, `null` (never) or `"default"`; required, so that a typo is a
    /// 400 and not a tenant held for ever.
    #[serde(deserialize_with = "present")]
    delay_ms: Option<Value>,
}

async fn set_tenant_pull_delay(AxState(s): Shared_, body: Bytes) -> Response {
    let req: TenantPullDelayReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let timing = match req.delay_ms {
        None | Some(Value::Null) => TenantPullTiming::Never,
        Some(Value::String(s)) if s == "default" => TenantPullTiming::FollowGroups,
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            TenantPullTiming::After(Duration::from_millis(n.as_u64().unwrap_or(0)))
        }
        Some(other) => {
            return bad(format!(
                "delay_ms must be milliseconds, null (never) or \"default\", not {other}"
            ));
        }
    };
    crate::server::set_tenant_pull_timing(&s, timing);
    ok(tenant_pull_delay_json(timing))
}

async fn release_tenant_pulls(AxState(s): Shared_) -> Response {
    crate::server::release_tenant_pulls(&s);
    ok(json!({"detail": "Pending tenant pulls released."}))
}

fn clock_json(offset_micros: i64) -> Value {
    json!({"offset_secs": offset_micros / 1_000_000})
}

async fn get_clock(AxState(s): Shared_) -> Response {
    ok(clock_json(s.world().clock_offset))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockReq {
    offset_secs: i64,
}

async fn set_clock(AxState(s): Shared_, body: Bytes) -> Response {
    let req: ClockReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let offset = req.offset_secs.saturating_mul(1_000_000);
    s.world().clock_offset = offset;
    ok(clock_json(offset))
}

#[derive(Deserialize)]
struct DelaysReq {
    schedule_ms: u64,
    run_ms: u64,
}

async fn delays(AxState(s): Shared_, body: Bytes) -> Response {
    let req: DelaysReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    s.world().delays = Delays {
        schedule: Duration::from_millis(req.schedule_ms),
        run: Duration::from_millis(req.run_ms),
    };
    ok(json!({"schedule_ms": req.schedule_ms, "run_ms": req.run_ms}))
}

fn order_json(order: DefaultOrder) -> Value {
    match order {
        DefaultOrder::Shuffled { seed } => json!({"order": "shuffled", "seed": seed}),
        DefaultOrder::Created => json!({"order": "created"}),
    }
}

async fn get_order(AxState(s): Shared_) -> Response {
    ok(order_json(s.world().default_order))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderReq {
    order: String,
    seed: Option<u64>,
}

async fn set_order(AxState(s): Shared_, body: Bytes) -> Response {
    let req: OrderReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let order = match req.order.as_str() {
        "shuffled" => DefaultOrder::Shuffled {
            seed: req.seed.unwrap_or(0),
        },
        "created" => DefaultOrder::Created,
        other => return bad(format!("unknown order {other:?} (shuffled or created)")),
    };
    s.world().default_order = order;
    ok(order_json(order))
}

fn fault_state(s: &Shared) -> Value {
    let faults = serde_json::to_value(&*s.faults()).unwrap_or(Value::Null);
    let world = s.world();
    json!({"faults": faults, "fail_creates": world.fail_creates, "fail_deletes": world.fail_deletes,
           "refuse_deletes": world.refuse_deletes, "fail_tenant_pulls": world.fail_tenant_pulls})
}

async fn get_faults(AxState(s): Shared_) -> Response {
    ok(fault_state(&s))
}

/// Distinguishes an absent field from an explicit `null`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct FailNext {
    count: usize,
    #[serde(default = "default_status")]
    status: u16,
    endpoint: Option<String>,
}

fn default_status() -> u16 {
    503
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsReq {
    latency_ms: Option<u64>,
    fail_next: Option<FailNext>,
    #[serde(default, deserialize_with = "present")]
    failing: Option<Option<u16>>,
    drop_next: Option<usize>,
    #[serde(default, deserialize_with = "present")]
    slow_body_ms: Option<Option<u64>>,
    fail_creates: Option<usize>,
    fail_deletes: Option<usize>,
    refuse_deletes: Option<bool>,
    fail_tenant_pulls: Option<usize>,
    after_commit: Option<AfterCommitReq>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AfterCommitReq {
    count: usize,
    endpoint: Option<String>,
    /// Absent: drop the connection instead of answering.
    delay_ms: Option<u64>,
}

async fn set_faults(AxState(s): Shared_, body: Bytes) -> Response {
    let req: FaultsReq = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    if let Some(f) = &req.fail_next {
        if let Some(e) = &f.endpoint
            && !ENDPOINTS.contains(&e.as_str())
        {
            return bad(format!("unknown endpoint {e:?}"));
        }
        if StatusCode::from_u16(f.status).is_err() {
            return bad(format!("invalid status {}", f.status));
        }
    }
    if let Some(e) = req.after_commit.as_ref().and_then(|a| a.endpoint.as_ref())
        && !ENDPOINTS.contains(&e.as_str())
    {
        return bad(format!("unknown endpoint {e:?}"));
    }
    if let Some(Some(st)) = req.failing
        && StatusCode::from_u16(st).is_err()
    {
        return bad(format!("invalid status {st}"));
    }
    {
        let mut faults = s.faults();
        if let Some(ms) = req.latency_ms {
            faults.latency = Duration::from_millis(ms);
        }
        if let Some(f) = req.fail_next
            && f.count > 0
        {
            faults.fail_rules.push(FailRule {
                remaining: f.count,
                status: f.status,
                endpoint: f.endpoint,
            });
        }
        if let Some(failing) = req.failing {
            faults.failing = failing.filter(|st| *st != 0);
        }
        if let Some(n) = req.drop_next {
            faults.drop_next = n;
        }
        if let Some(ms) = req.slow_body_ms {
            faults.slow_body = ms.filter(|ms| *ms > 0).map(Duration::from_millis);
        }
        if let Some(a) = req.after_commit
            && a.count > 0
        {
            faults.after_commit.push(AfterCommitRule {
                remaining: a.count,
                endpoint: a.endpoint,
                action: match a.delay_ms {
                    Some(ms) => AfterCommit::Delay(Duration::from_millis(ms)),
                    None => AfterCommit::Drop,
                },
            });
        }
    }
    {
        let mut world = s.world();
        if let Some(n) = req.fail_creates {
            world.fail_creates = n;
        }
        if let Some(n) = req.fail_deletes {
            world.fail_deletes = n;
        }
        if let Some(r) = req.refuse_deletes {
            world.refuse_deletes = r;
        }
        if let Some(n) = req.fail_tenant_pulls {
            world.fail_tenant_pulls = n;
        }
    }
    ok(fault_state(&s))
}

async fn clear_faults(AxState(s): Shared_) -> Response {
    *s.faults() = Faults::default();
    {
        let mut world = s.world();
        world.fail_creates = 0;
        world.fail_deletes = 0;
        world.fail_tenant_pulls = 0;
        world.refuse_deletes = false;
    }
    ok(fault_state(&s))
}
