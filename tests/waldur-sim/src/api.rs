//! The `/api/...` surface: routing, auth, faults, and the server-group endpoints.

use std::cmp::Ordering;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Map, Value, json};

use crate::config::WaldurVersion;
use crate::error::{ApiError, html_error, json_response};
use crate::faults::{AfterCommit, Verdict};
use crate::model::{Row, State, Tenant, normalize_uuid, restrict_fields};
use crate::server::{ConnCtl, Shared, spawn_job, spawn_tenant_pull};
use crate::world::{Caller, World, parse_body};
use rand::SeedableRng;
use rand::seq::SliceRandom;

/// Django's paginator defaults in Waldur.
const DEFAULT_PAGE_SIZE: usize = 10;
const MAX_PAGE_SIZE: usize = 300;
/// Request bodies larger than this are refused (Django's own limit is about this size).
const MAX_BODY: usize = 2 * 1024 * 1024;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    crate::control::routes().fallback(entry).with_state(shared)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Pull,
    Unlink,
    SetErred,
    SetOk,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Unlink => "unlink",
            Action::SetErred => "set_erred",
            Action::SetOk => "set_ok",
        }
    }
}

/// The URL patterns Waldur's router has for server groups.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Collection,
    Detail(String),
    Action(String, Action),
    TenantCreate(String),
    TenantPull(String),
    /// `GET /api/openstack-tenants/`.
    TenantList,
    /// `GET /api/openstack-tenants/{uuid}/`.
    TenantDetail(String),
    /// `POST /api/openstack-tenants/{uuid}/pull|set_ok|set_erred/` (staff).
    TenantAction(String, Action),
    Unknown,
}

impl Route {
    /// `set_actions`: the server has `set_ok` / `set_erred` (8.0.0 and later).
    fn parse(path: &str, set_actions: bool) -> Route {
        // Django's URL patterns all end in a slash; without it nothing matches.
        let Some(inner) = path.strip_prefix("/api/").and_then(|p| p.strip_suffix('/')) else {
            return Route::Unknown;
        };
        let segs: Vec<&str> = inner.split('/').collect();
        if segs.iter().any(|s| s.is_empty()) {
            return Route::Unknown;
        }
        match segs.as_slice() {
            ["openstack-server-groups"] => Route::Collection,
            ["openstack-server-groups", id] => Route::Detail((*id).to_string()),
            ["openstack-server-groups", id, action] => {
                let action = match *action {
                    "pull" => Action::Pull,
                    "unlink" => Action::Unlink,
                    "set_erred" if set_actions => Action::SetErred,
                    "set_ok" if set_actions => Action::SetOk,
                    _ => return Route::Unknown,
                };
                Route::Action((*id).to_string(), action)
            }
            ["openstack-tenants"] => Route::TenantList,
            ["openstack-tenants", id] => Route::TenantDetail((*id).to_string()),
            ["openstack-tenants", id, "create_server_group"] => {
                Route::TenantCreate((*id).to_string())
            }
            ["openstack-tenants", id, "pull_server_groups"] => Route::TenantPull((*id).to_string()),
            ["openstack-tenants", id, action] => {
                // Tenants are resources too: `pull` always, `set_ok`/`set_erred` from 8.0.0.
                let action = match *action {
                    "pull" => Action::Pull,
                    "set_erred" if set_actions => Action::SetErred,
                    "set_ok" if set_actions => Action::SetOk,
                    _ => return Route::Unknown,
                };
                Route::TenantAction((*id).to_string(), action)
            }
            _ => Route::Unknown,
        }
    }

    /// Counter name for this request.
    fn endpoint(&self, method: &Method) -> &'static str {
        match self {
            Route::Collection if method == Method::GET => "list",
            Route::Collection if method == Method::HEAD => "count",
            Route::Collection if method == Method::POST => "create_collection",
            Route::Detail(_) if method == Method::GET || method == Method::HEAD => "retrieve",
            Route::Detail(_) if method == Method::DELETE => "delete",
            Route::Detail(_) if method == Method::PUT || method == Method::PATCH => "update",
            Route::Action(_, action) if method == Method::POST => action.name(),
            Route::TenantCreate(_) if method == Method::POST => "create",
            Route::TenantPull(_) if method == Method::POST => "pull_server_groups",
            Route::TenantList if method == Method::GET || method == Method::HEAD => "tenant_list",
            Route::TenantDetail(_) if method == Method::GET || method == Method::HEAD => {
                "tenant_retrieve"
            }
            Route::TenantAction(_, action) if method == Method::POST => match action {
                Action::Pull => "tenant_pull",
                Action::SetOk => "tenant_set_ok",
                Action::SetErred => "tenant_set_erred",
                Action::Unlink => "other",
            },
            _ => "other",
        }
    }
}

/// Counts a request as in flight until it is answered or dropped.
struct Answering(Arc<Shared>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.counters().done();
    }
}

/// Django's `CommonMiddleware` with `APPEND_SLASH`: a path without its trailing slash that would
/// match with one is answered 301 to that URL (query kept), before any view or auth runs.
fn append_slash_redirect(path: &str, query: Option<&str>, set_actions: bool) -> Option<Response> {
    if path.ends_with('/') {
        return None;
    }
    let with_slash = format!("{path}/");
    if Route::parse(&with_slash, set_actions) == Route::Unknown {
        return None;
    }
    let location = match query {
        Some(q) => format!("{with_slash}?{q}"),
        None => with_slash,
    };
    let mut resp = StatusCode::MOVED_PERMANENTLY.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    Some(resp)
}

/// Every request that is not `/__sim/...` lands here.
async fn entry(AxState(shared): AxState<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if !path.starts_with("/api/") {
        // No URL pattern: Django's HTML 404 page, not Waldur's JSON.
        return ApiError::NoRoute.into_response();
    }
    let set_actions = !shared.world().pre_8_0_0;
    let route = Route::parse(&path, set_actions);
    let endpoint = route.endpoint(&parts.method);
    shared.counters().hit(endpoint);
    let _answering = Answering(shared.clone());
    let (latency, verdict, slow) = {
        let mut faults = shared.faults();
        let verdict = faults.decide(endpoint);
        (faults.latency, verdict, faults.slow_body)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match verdict {
        Verdict::Pass => {}
        Verdict::Drop => {
            tracing::info!(%path, "dropping connection (injected)");
            return drop_connection(&parts.extensions).await;
        }
        Verdict::Fail(status) => {
            tracing::info!(%path, status, "failing request (injected)");
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return maybe_slow(html_error(status), slow, &parts.method).await;
        }
    }
    if route == Route::Unknown
        && let Some(resp) = append_slash_redirect(&path, parts.uri.query(), set_actions)
    {
        return maybe_slow(resp, slow, &parts.method).await;
    }
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &json!({"detail": "Request body too large."}),
            );
        }
    };
    let base = request_base(&parts.headers, &shared.base_url);
    let ctx = Ctx {
        method: parts.method.clone(),
        path,
        query: parse_query(parts.uri.query()),
        headers: parts.headers,
        base,
        body,
    };
    let resp = match handle(&shared, &route, &ctx) {
        Ok(resp) => resp,
        Err(err) => {
            tracing::debug!(path = %ctx.path, error = %err, "request refused");
            err.into_response()
        }
    };
    tracing::debug!(method = %ctx.method, path = %ctx.path, endpoint, status = resp.status().as_u16(), "api request");
    let after = shared
        .faults()
        .after_commit(endpoint, resp.status().as_u16());
    match after {
        None => {}
        Some(AfterCommit::Delay(d)) => {
            tracing::info!(path = %ctx.path, delay_ms = d.as_millis(), "answer delayed after commit (injected)");
            tokio::time::sleep(d).await;
        }
        Some(AfterCommit::Drop) => {
            tracing::info!(path = %ctx.path, "connection dropped after commit (injected)");
            return drop_connection(&parts.extensions).await;
        }
    }
    maybe_slow(resp, slow, &ctx.method).await
}

/// Closes the request's connection without an answer; the future never resolves when the
/// connection is served by our own loop (the loop drops it together with the socket).
async fn drop_connection(extensions: &axum::http::Extensions) -> Response {
    if let Some(ctl) = extensions.get::<ConnCtl>() {
        ctl.0.notify_one();
        std::future::pending::<()>().await;
    }
    // Not served by our own loop: the best we can do is a body that breaks mid-way.
    broken_response()
}

struct Ctx {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    /// `http://host:port` as the client addressed us, for absolute URLs.
    base: String,
    body: Bytes,
}

impl Ctx {
    /// Last value, as Django's `QueryDict.get` returns.
    fn last(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.query
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn fields(&self) -> Vec<String> {
        self.all("field").into_iter().map(str::to_string).collect()
    }
}

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.map(|q| {
        form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    })
    .unwrap_or_default()
}

/// `request.build_absolute_uri()`: Django builds links from the Host header.
fn request_base(headers: &HeaderMap, fallback: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c))
        });
    match host {
        Some(h) => format!("http://{h}"),
        None => fallback.to_string(),
    }
}

fn handle(shared: &Arc<Shared>, route: &Route, ctx: &Ctx) -> Result<Response, ApiError> {
    if *route == Route::Unknown {
        // Django resolves the URL before DRF authenticates: no pattern, no auth, HTML 404.
        return Err(ApiError::NoRoute);
    }
    let auth = ctx
        .headers
        .get(header::AUTHORIZATION)
        .map(|h| h.to_str().unwrap_or("\u{fffd}"));
    let caller = shared.world().authenticate(auth)?;
    let method = &ctx.method;
    let not_allowed = || ApiError::MethodNotAllowed(method.as_str().to_string());
    match route {
        Route::Unknown => Err(ApiError::NoRoute),
        Route::Collection => match *method {
            Method::GET => list(&mut shared.world(), caller, ctx),
            Method::HEAD => count(&mut shared.world(), caller, ctx),
            // The router lists this create, but it has no tenant to attach the group to, so a
            // real server fails inside the serializer: 500 with Django's HTML page, nothing saved.
            // The body is parsed first, so malformed JSON is still a 400.
            Method::POST => {
                parse_body(&ctx.body)?;
                Err(ApiError::ServerError)
            }
            _ => Err(not_allowed()),
        },
        Route::Detail(id) => match *method {
            Method::GET | Method::HEAD => {
                let world = shared.world();
                let row = world.visible_row(caller, id).ok_or(ApiError::NotFound)?;
                let body = restrict_fields(world.render(row, &ctx.base), &ctx.fields());
                Ok(json_response(StatusCode::OK, &body))
            }
            Method::DELETE => {
                let job = shared.world().delete(caller, id)?;
                spawn_job(shared, job);
                Ok(json_response(
                    StatusCode::ACCEPTED,
                    &json!({"detail": "Deletion was scheduled."}),
                ))
            }
            // 7.0.x has the update route but it crashes: 500 with Django's HTML page.
            Method::PUT | Method::PATCH if shared.world().version == WaldurVersion::V7_0 => {
                Err(ApiError::ServerError)
            }
            // From 8.0.3 server groups are immutable through the API.
            _ => Err(not_allowed()),
        },
        // set_ok / set_erred before 8.0.0 never get here: Route::parse finds no pattern.
        Route::Action(id, action) => {
            if *method != Method::POST {
                return Err(not_allowed());
            }
            if matches!(action, Action::Unlink | Action::SetOk | Action::SetErred)
                && caller != Caller::Staff
            {
                return Err(ApiError::Forbidden);
            }
            // DRF looks the object up (404) before the view reads the body (400 on bad JSON).
            if shared.world().visible_row(caller, id).is_none() {
                return Err(ApiError::NotFound);
            }
            if *action != Action::SetErred {
                parse_body(&ctx.body)?;
            }
            match action {
                Action::Pull => {
                    let job = shared.world().pull(caller, id)?;
                    spawn_job(shared, job);
                    Ok(json_response(
                        StatusCode::ACCEPTED,
                        &json!({"detail": "Pull operation was successfully scheduled."}),
                    ))
                }
                Action::Unlink => {
                    shared.world().unlink(caller, id)?;
                    Ok(StatusCode::NO_CONTENT.into_response())
                }
                Action::SetOk => {
                    shared.world().set_state_action(
                        caller,
                        id,
                        State::Ok,
                        String::new(),
                        String::new(),
                    )?;
                    Ok(json_response(
                        StatusCode::OK,
                        &json!({"detail": "Resource has been marked as OK."}),
                    ))
                }
                Action::SetErred => {
                    let (message, traceback) = set_erred_body(&ctx.body)?;
                    shared.world().set_state_action(
                        caller,
                        id,
                        State::Erred,
                        message,
                        traceback,
                    )?;
                    Ok(json_response(
                        StatusCode::OK,
                        &json!({"detail": "Resource has been marked as ERRED."}),
                    ))
                }
            }
        }
        Route::TenantList => match *method {
            Method::GET => tenant_list(&shared.world(), caller, ctx),
            Method::HEAD => {
                let (parts, _) = tenant_list(&shared.world(), caller, ctx)?.into_parts();
                Ok(Response::from_parts(parts, Body::empty()))
            }
            // Tenants are ordered through the marketplace, not created here.
            _ => Err(not_allowed()),
        },
        Route::TenantDetail(id) => match *method {
            Method::GET | Method::HEAD => {
                let world = shared.world();
                let tenant = world.visible_tenant(caller, id).ok_or(ApiError::NotFound)?;
                let body = restrict_fields(world.render_tenant(tenant, &ctx.base), &ctx.fields());
                Ok(json_response(StatusCode::OK, &body))
            }
            // Tenant updates and deletions are not part of what the simulator copies.
            _ => Err(not_allowed()),
        },
        Route::TenantAction(id, action) => {
            if *method != Method::POST {
                return Err(not_allowed());
            }
            // Staff only here. (7.0.7's tenant `pull` also lets customer owners in, through
            // `unsafe_methods_permissions`; the simulator's user token is no owner.)
            if caller != Caller::Staff {
                return Err(ApiError::Forbidden);
            }
            if shared.world().visible_tenant(caller, id).is_none() {
                return Err(ApiError::NotFound);
            }
            match action {
                Action::Pull => {
                    parse_body(&ctx.body)?;
                    let job = shared.world().tenant_pull(caller, id)?;
                    spawn_tenant_pull(shared, job);
                    Ok(json_response(
                        StatusCode::ACCEPTED,
                        &json!({"detail": "Pull operation was successfully scheduled."}),
                    ))
                }
                Action::SetOk => {
                    parse_body(&ctx.body)?;
                    shared.world().set_tenant_state(id, State::Ok, "", "");
                    Ok(json_response(
                        StatusCode::OK,
                        &json!({"detail": "Resource has been marked as OK."}),
                    ))
                }
                Action::SetErred => {
                    let (message, traceback) = set_erred_body(&ctx.body)?;
                    shared
                        .world()
                        .set_tenant_state(id, State::Erred, &message, &traceback);
                    Ok(json_response(
                        StatusCode::OK,
                        &json!({"detail": "Resource has been marked as ERRED."}),
                    ))
                }
                // Never parsed for tenants.
                Action::Unlink => Err(ApiError::NoRoute),
            }
        }
        Route::TenantCreate(tenant) => {
            if *method != Method::POST {
                return Err(not_allowed());
            }
            let (body, job) = {
                let mut world = shared.world();
                let (uuid, job) = world.create(caller, tenant, &ctx.body)?;
                let body = world
                    .rows
                    .get(&uuid)
                    .map(|r| world.render(r, &ctx.base))
                    .unwrap_or(Value::Null);
                (body, job)
            };
            spawn_job(shared, job);
            Ok(json_response(StatusCode::CREATED, &body))
        }
        Route::TenantPull(tenant) => {
            if *method != Method::POST {
                return Err(not_allowed());
            }
            // The tenant is held (UPDATE_SCHEDULED) before the answer goes out.
            let job = shared.world().pull_server_groups(caller, tenant)?;
            spawn_tenant_pull(shared, job);
            Ok(json_response(
                StatusCode::ACCEPTED,
                &json!({"status": "Server groups pull has been scheduled."}),
            ))
        }
    }
}

/// `SetErredRequest`: both fields optional strings.
fn set_erred_body(body: &[u8]) -> Result<(String, String), ApiError> {
    let data = parse_body(body)?;
    let Value::Object(map) = data else {
        return Err(ApiError::Invalid(json!({
            "non_field_errors": ["Invalid data. Expected a dictionary."]
        })));
    };
    let mut errors = Map::new();
    let mut get = |key: &str| match map.get(key) {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => {
            errors.insert(key.to_string(), json!(["Not a valid string."]));
            String::new()
        }
    };
    let message = get("error_message");
    let traceback = get("error_traceback");
    if errors.is_empty() {
        Ok((message, traceback))
    } else {
        Err(ApiError::Invalid(Value::Object(errors)))
    }
}

// ----- list, count, filters, pagination -----

/// Orderable keys of `?o=`: Waldur's `BaseResourceFilter.ORDERING_FIELDS` (the contract names
/// `name`, `created`, `state`; the others are the rest of that list). Any other key is a 400.
const ORDER_FIELDS: [&str; 8] = [
    "name",
    "state",
    "customer_name",
    "customer_native_name",
    "customer_abbreviation",
    "project_name",
    "service_name",
    "created",
];

/// The UUID filters and what each compares against.
const UUID_FILTERS: [&str; 7] = [
    "uuid",
    "tenant_uuid",
    "project_uuid",
    "project",
    "customer_uuid",
    "customer",
    "service_settings_uuid",
];

fn uuid_of<'a>(key: &str, row: &'a Row, tenant: &'a Tenant) -> &'a str {
    match key {
        "uuid" => &row.uuid,
        "tenant_uuid" => &row.tenant_uuid,
        "project_uuid" | "project" => &tenant.project_uuid,
        "customer_uuid" | "customer" => &tenant.customer_uuid,
        _ => &tenant.service_settings_uuid,
    }
}

fn icontains(haystack: &str, needle: &str) -> bool {
    haystack.to_lowercase().contains(&needle.to_lowercase())
}

/// Tenant UUID out of a tenant URL (`.../api/openstack-tenants/<uuid>/`).
fn tenant_from_url(url: &str) -> Option<String> {
    let rest = url.split("/api/openstack-tenants/").nth(1)?;
    normalize_uuid(rest.split('/').next()?)
}

/// django-filter's filter set, then the ordering; 400 with every invalid parameter.
///
/// `shuffle`: the seed of this request's shuffle when the default order is the real server's
/// (tenant name only); `None` keeps the old creation order. Ignored when `o=` is given.
fn filtered<'a>(
    world: &'a World,
    caller: Caller,
    ctx: &Ctx,
    shuffle: Option<u64>,
) -> Result<Vec<&'a Row>, ApiError> {
    let mut errors = Map::new();

    let mut uuid_filters: Vec<(&str, String)> = Vec::new();
    for key in UUID_FILTERS {
        match ctx.last(key) {
            None | Some("") => {}
            Some(v) => match normalize_uuid(v) {
                Some(u) => uuid_filters.push((key, u)),
                None => {
                    errors.insert(key.to_string(), json!(["Enter a valid UUID."]));
                }
            },
        }
    }

    let mut states: Vec<State> = Vec::new();
    for v in ctx.all("state") {
        match State::parse_label(v, world.vocabulary) {
            Some(s) => states.push(s),
            None => {
                errors.insert(
                    "state".to_string(),
                    json!([format!(
                        "Select a valid choice. {v} is not one of the available choices."
                    )]),
                );
                break;
            }
        }
    }

    let mut ordering: Vec<(&str, bool)> = Vec::new();
    if let Some(o) = ctx.last("o").filter(|o| !o.is_empty()) {
        for part in o.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (desc, field) = match part.strip_prefix('-') {
                Some(f) => (true, f),
                None => (false, part),
            };
            match ORDER_FIELDS.iter().find(|f| **f == field) {
                Some(f) => ordering.push((f, desc)),
                None => {
                    errors.insert(
                        "o".to_string(),
                        json!([format!(
                            "Select a valid choice. {part} is not one of the available choices."
                        )]),
                    );
                    break;
                }
            }
        }
    }

    if !errors.is_empty() {
        return Err(ApiError::Invalid(Value::Object(errors)));
    }

    let text = |key: &str| ctx.last(key).filter(|v| !v.is_empty());
    let name = text("name");
    let name_exact = text("name_exact");
    let description = text("description");
    let backend_id = text("backend_id");
    let project_name = text("project_name");
    let customer_name = text("customer_name");
    let service_settings_name = text("service_settings_name");
    // An unparseable tenant URL matches nothing rather than everything.
    let tenant_url = text("tenant").map(tenant_from_url);

    let mut rows: Vec<(&Row, &Tenant)> = world
        .rows_sorted()
        .into_iter()
        .filter(|r| world.tenant_visible(caller, &r.tenant_uuid))
        .filter_map(|r| world.tenants.get(&r.tenant_uuid).map(|t| (r, t)))
        .filter(|(r, t)| {
            uuid_filters.iter().all(|(k, u)| uuid_of(k, r, t) == u)
                && (states.is_empty() || states.contains(&r.state))
                && name.is_none_or(|n| icontains(&r.name, n))
                && name_exact.is_none_or(|n| r.name == n)
                && description.is_none_or(|d| icontains(&r.description, d))
                && backend_id.is_none_or(|b| r.backend_id == b)
                && project_name.is_none_or(|n| icontains(&t.project_name, n))
                && customer_name.is_none_or(|n| icontains(&t.customer_name, n))
                && service_settings_name.is_none_or(|n| icontains(&t.name, n))
                && tenant_url
                    .as_ref()
                    .is_none_or(|u| u.as_deref() == Some(r.tenant_uuid.as_str()))
        })
        .collect();

    // django-filter's OrderingFilter is a CSV filter: `o=state,-created` sorts by both. The sort is
    // stable over the (created, insertion) order, so ties stay oldest-first and every `o=` gives
    // a total, repeatable order (Postgres promises nothing for ties of `state` or `name`, but
    // `created` is what clients should page by).
    if ordering.is_empty() {
        // Waldur's default ordering is the tenant's name only: within a tenant the database
        // returns rows in whatever order it likes, which changes between requests.
        if let Some(seed) = shuffle {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            rows.shuffle(&mut rng);
            rows.sort_by(|(_, ta), (_, tb)| ta.name.cmp(&tb.name));
        }
    } else {
        rows.sort_by(|(a, ta), (b, tb)| {
            for (field, desc) in &ordering {
                let ord = match *field {
                    "name" => a.name.cmp(&b.name),
                    "created" => (a.created, a.seq).cmp(&(b.created, b.seq)),
                    "state" => a.state.db_value().cmp(&b.state.db_value()),
                    "project_name" => ta.project_name.cmp(&tb.project_name),
                    "customer_name" => ta.customer_name.cmp(&tb.customer_name),
                    "service_name" => ta.name.cmp(&tb.name),
                    // customer_native_name, customer_abbreviation: "" for every simulated customer.
                    _ => Ordering::Equal,
                };
                let ord = if *desc { ord.reverse() } else { ord };
                if ord != Ordering::Equal {
                    return ord;
                }
            }
            Ordering::Equal
        });
    }
    Ok(rows.into_iter().map(|(r, _)| r).collect())
}

/// DRF's `_positive_int(..., strict=True, cutoff=max_page_size)`, falling back to the default.
fn page_size(ctx: &Ctx) -> usize {
    match ctx.last("page_size").map(|v| v.trim().parse::<i64>()) {
        Some(Ok(n)) if n > 0 => usize::try_from(n)
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE),
        _ => DEFAULT_PAGE_SIZE,
    }
}

/// The page this request asks for out of `count` items: `(page, pages, page_size)`, or 404
/// `Invalid page.` as Django's paginator answers.
fn page_of(ctx: &Ctx, count: usize) -> Result<(usize, usize, usize), ApiError> {
    let size = page_size(ctx);
    // Django: an empty list still has one (empty) page.
    let pages = count.div_ceil(size).max(1);
    let page = match ctx.last("page").map(str::trim) {
        None | Some("") => 1,
        Some("last") => pages,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(ApiError::InvalidPage)?,
    };
    if page < 1 || page > pages {
        return Err(ApiError::InvalidPage);
    }
    Ok((page, pages, size))
}

/// A page of a list: a bare array, `X-Result-Count` and `Link`, as Waldur's pagination sends.
fn page_response(
    ctx: &Ctx,
    items: Vec<Value>,
    count: usize,
    page: usize,
    pages: usize,
) -> Response {
    let mut resp = json_response(StatusCode::OK, &Value::Array(items));
    resp.headers_mut()
        .insert("x-result-count", HeaderValue::from(count));
    let link = link_header(ctx, page, pages);
    if let Ok(v) = HeaderValue::from_str(&link) {
        resp.headers_mut().insert(header::LINK, v);
    }
    resp
}

fn list(world: &mut World, caller: Caller, ctx: &Ctx) -> Result<Response, ApiError> {
    let shuffle = world.next_shuffle_seed();
    let world = &*world;
    let rows = filtered(world, caller, ctx, shuffle)?;
    let count = rows.len();
    let (page, pages, size) = page_of(ctx, count)?;
    let fields = ctx.fields();
    let items: Vec<Value> = rows
        .iter()
        .skip((page - 1) * size)
        .take(size)
        .map(|r| restrict_fields(world.render(r, &ctx.base), &fields))
        .collect();
    Ok(page_response(ctx, items, count, page, pages))
}

/// `GET /api/openstack-tenants/`: the tenants this caller sees, by name (Waldur's
/// `order_by("name")`), with the UUID filters of `BaseResourceFilter` that matter here.
fn tenant_list(world: &World, caller: Caller, ctx: &Ctx) -> Result<Response, ApiError> {
    let mut errors = Map::new();
    let mut uuid_filters: Vec<(&str, String)> = Vec::new();
    for key in ["uuid", "project_uuid", "customer_uuid"] {
        match ctx.last(key) {
            None | Some("") => {}
            Some(v) => match normalize_uuid(v) {
                Some(u) => uuid_filters.push((key, u)),
                None => {
                    errors.insert(key.to_string(), json!(["Enter a valid UUID."]));
                }
            },
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Invalid(Value::Object(errors)));
    }
    let name_exact = ctx.last("name_exact").filter(|v| !v.is_empty());
    let tenants: Vec<&Tenant> = world
        .tenants_sorted()
        .into_iter()
        .filter(|t| world.tenant_visible(caller, &t.uuid))
        .filter(|t| {
            uuid_filters.iter().all(|(k, u)| match *k {
                "uuid" => t.uuid == *u,
                "project_uuid" => t.project_uuid == *u,
                _ => t.customer_uuid == *u,
            }) && name_exact.is_none_or(|n| t.name == n)
        })
        .collect();
    let count = tenants.len();
    let (page, pages, size) = page_of(ctx, count)?;
    let fields = ctx.fields();
    let items: Vec<Value> = tenants
        .iter()
        .skip((page - 1) * size)
        .take(size)
        .map(|t| restrict_fields(world.render_tenant(t, &ctx.base), &fields))
        .collect();
    Ok(page_response(ctx, items, count, page, pages))
}

/// `HEAD`: the list's answer without its body, so `X-Result-Count` and `Link` both come (and a
/// page that does not exist is a 404 here too).
fn count(world: &mut World, caller: Caller, ctx: &Ctx) -> Result<Response, ApiError> {
    let (parts, _) = list(world, caller, ctx)?.into_parts();
    Ok(Response::from_parts(parts, Body::empty()))
}

/// Waldur's LinkHeaderPagination: absolute URLs with the request's other query parameters kept
/// and sorted by key (DRF's `replace_query_param`); first and last always, prev/next when they apply.
fn link_header(ctx: &Ctx, page: usize, pages: usize) -> String {
    let url_for = |n: usize| {
        let mut pairs: Vec<(&str, String)> = ctx
            .query
            .iter()
            .filter(|(k, _)| k != "page")
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        pairs.push(("page", n.to_string()));
        pairs.sort_by(|a, b| a.0.cmp(b.0));
        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        format!("{}{}?{}", ctx.base, ctx.path, query)
    };
    let mut links = vec![(url_for(1), "first")];
    if page > 1 {
        links.push((url_for(page - 1), "prev"));
    }
    if page < pages {
        links.push((url_for(page + 1), "next"));
    }
    links.push((url_for(pages), "last"));
    links
        .into_iter()
        .map(|(url, rel)| format!("<{url}>; rel=\"{rel}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

// ----- response shaping for faults -----

/// Sends the body in a few chunks with `delay` before each, so headers arrive at once and the
/// body trickles: what a client's read timeout has to cope with.
async fn maybe_slow(resp: Response, delay: Option<Duration>, method: &Method) -> Response {
    let Some(delay) = delay.filter(|d| !d.is_zero()) else {
        return resp;
    };
    if *method == Method::HEAD {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return broken_response();
    };
    if bytes.is_empty() {
        return Response::from_parts(parts, Body::empty());
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    const CHUNKS: usize = 4;
    let chunk = bytes.len().div_ceil(CHUNKS).max(1);
    let pieces: Vec<Bytes> = (0..bytes.len())
        .step_by(chunk)
        .map(|start| bytes.slice(start..(start + chunk).min(bytes.len())))
        .collect();
    let stream = futures::stream::iter(pieces).then(move |piece| async move {
        tokio::time::sleep(delay).await;
        Ok::<Bytes, Infallible>(piece)
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

#[derive(Debug, thiserror::Error)]
#[error("connection dropped (injected fault)")]
struct Dropped;

/// A response whose body fails at once: hyper then aborts the connection mid-message.
fn broken_response() -> Response {
    let stream = futures::stream::once(async { Err::<Bytes, Dropped>(Dropped) });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = StatusCode::OK;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_endpoint_names() {
        let id = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";
        let r = |p: &str| Route::parse(p, true);
        assert_eq!(r("/api/openstack-server-groups/"), Route::Collection);
        assert_eq!(r("/api/openstack-server-groups"), Route::Unknown);
        assert_eq!(
            r(&format!("/api/openstack-server-groups/{id}/")),
            Route::Detail(id.into())
        );
        assert_eq!(
            r(&format!("/api/openstack-server-groups/{id}/set_ok/")),
            Route::Action(id.into(), Action::SetOk)
        );
        assert_eq!(
            r(&format!("/api/openstack-server-groups/{id}/nope/")),
            Route::Unknown
        );
        assert_eq!(
            r(&format!("/api/openstack-tenants/{id}/create_server_group/")),
            Route::TenantCreate(id.into())
        );
        assert_eq!(r("/api/openstack-server-groups//"), Route::Unknown);
        assert_eq!(
            Route::parse(
                &format!("/api/openstack-server-groups/{id}/set_erred/"),
                false
            ),
            Route::Unknown
        );
        assert_eq!(Route::Collection.endpoint(&Method::HEAD), "count");
        assert_eq!(Route::Detail(id.into()).endpoint(&Method::PATCH), "update");
        assert_eq!(
            Route::Action(id.into(), Action::Pull).endpoint(&Method::GET),
            "other"
        );
        assert_eq!(
            tenant_from_url(&format!("http://x/api/openstack-tenants/{id}/")),
            Some(id.into())
        );
    }
}
