//! HTTP: routing, content negotiation, the resource verbs, watch streaming and `/__test/`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::discovery;
use crate::error::ApiError;
use crate::error::Cause;
use crate::hooks::FailRule;
use crate::resources::Flavor;
use crate::selector::{FieldSelector, LabelSelector};
use crate::server::Shared;
use crate::store::{DeleteOpts, FieldValidation, Filter, PatchType, Target, WriteOpts, view};
use crate::table::{Include, partial_metadata, table};
use crate::util::{decode_segment, meta_str, parse_query};

const MAX_BODY: usize = 16 << 20;

/// A request, read in full.
struct Req {
    method: Method,
    path: String,
    segs: Vec<String>,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
}

impl Req {
    fn q(&self, k: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.q(k), Some("true" | "1" | "True" | "TRUE"))
    }

    fn header(&self, name: header::HeaderName) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The media type of the body, lower-cased, without parameters.
    fn content_type(&self) -> String {
        self.header(header::CONTENT_TYPE)
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    }
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text_response(code: u16, text: String) -> Response<Body> {
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.to_status());
    if e.code == 429 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn with_warnings(mut r: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        let text = format!("299 - {:?}", w);
        if let Ok(v) = HeaderValue::from_str(&text) {
            r.headers_mut().append(header::WARNING, v);
        }
    }
    r
}

/// Entry point for every request.
pub(crate) async fn handle(shared: Arc<Shared>, req: http::Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(parse_query).unwrap_or_default();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error_response(&ApiError::new(
                413,
                "RequestEntityTooLarge",
                format!("could not read the request body: {e}"),
            ));
        }
    };
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode_segment)
        .collect();
    let req = Req {
        method: parts.method,
        path,
        segs,
        query,
        headers: parts.headers,
        body,
    };
    if req.segs.first().map(String::as_str) == Some("__test") {
        return test_hooks(&shared, &req);
    }
    shared.hooks().count_request();
    let resp = match route(&shared, &req) {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    tracing::debug!(method = %req.method, path = %req.path, status = resp.status().as_u16(), "request");
    resp
}

/// Which discovery document version the client asked for in `Accept`, if aggregated.
fn aggregated_discovery(req: &Req) -> Option<&'static str> {
    let accept = req.header(header::ACCEPT);
    for media in accept.split(',') {
        let m = media.replace(' ', "");
        if m.contains("as=APIGroupDiscoveryList") && m.contains("g=apidiscovery.k8s.io") {
            if m.contains("v=v2beta1") {
                return Some("v2beta1");
            }
            if m.contains("v=v2") {
                return Some("v2");
            }
        }
        if m.starts_with("application/json") && !m.contains("as=") {
            return None;
        }
    }
    None
}

fn aggregated_response(doc: &Value, version: &str) -> Response<Body> {
    let mut r = json_response(200, doc);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"
    )) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn route(shared: &Arc<Shared>, req: &Req) -> Result<Response<Body>, ApiError> {
    let s: Vec<&str> = req.segs.iter().map(String::as_str).collect();
    let get = req.method == Method::GET;
    match s.as_slice() {
        ["version"] if get => Ok(json_response(200, &discovery::version_info())),
        ["healthz" | "livez" | "readyz"] if get => Ok(text_response(200, "ok".into())),
        ["api"] if get => {
            let store = shared.store();
            Ok(match aggregated_discovery(req) {
                Some(v) => aggregated_response(&discovery::aggregated(&store, true, v), v),
                None => json_response(200, &discovery::api_versions(&shared.addr.to_string())),
            })
        }
        ["apis"] if get => {
            let store = shared.store();
            Ok(match aggregated_discovery(req) {
                Some(v) => aggregated_response(&discovery::aggregated(&store, false, v), v),
                None => json_response(200, &discovery::group_list(&store)),
            })
        }
        ["apis", g] if get => discovery::group(&shared.store(), g)
            .map(|v| json_response(200, &v))
            .ok_or_else(ApiError::no_route),
        ["openapi", "v2"] if get => Err(ApiError::no_route()),
        ["openapi", "v3"] if get => Ok(json_response(
            200,
            &discovery::openapi_v3_root(&shared.store()),
        )),
        ["openapi", "v3", "api", v] if get => discovery::openapi_v3_gv(&shared.store(), "", v)
            .map(|d| json_response(200, &d))
            .ok_or_else(ApiError::no_route),
        ["openapi", "v3", "apis", g, v] if get => discovery::openapi_v3_gv(&shared.store(), g, v)
            .map(|d| json_response(200, &d))
            .ok_or_else(ApiError::no_route),
        ["api", v, rest @ ..] => resource(shared, req, "", v, rest),
        ["apis", g, v, rest @ ..] => resource(shared, req, g, v, rest),
        _ => Err(ApiError::no_route()),
    }
}

/// The representation the client asked for in `Accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Table(&'static str),
    Partial,
}

fn format(req: &Req) -> Format {
    let accept = req.header(header::ACCEPT);
    for media in accept.split(',') {
        let m = media.replace(' ', "");
        let ty = m.split(';').next().unwrap_or("");
        if ty != "application/json" && ty != "*/*" && !ty.is_empty() {
            continue;
        }
        if m.contains("as=Table") {
            return Format::Table(if m.contains("v=v1beta1") {
                "v1beta1"
            } else {
                "v1"
            });
        }
        if m.contains("as=PartialObjectMetadata") {
            return Format::Partial;
        }
        return Format::Json;
    }
    Format::Json
}

fn parse_body(req: &Req) -> Result<Value, ApiError> {
    let ct = req.content_type();
    match ct.as_str() {
        "" | "application/json" | "*/*" => serde_json::from_slice(&req.body).map_err(|e| {
            ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
        }),
        "application/yaml" | "application/x-yaml" | "text/yaml" => {
            serde_yaml_ng::from_slice(&req.body)
                .map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")))
        }
        "application/vnd.kubernetes.protobuf" => crate::proto::decode(&req.body),
        other => Err(ApiError::unsupported_media_type(
            other,
            &["application/json", "application/yaml"],
        )),
    }
}

fn write_opts(req: &Req) -> Result<WriteOpts, ApiError> {
    let dry_run = match req.q("dryRun") {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: {other:?}: supported values: \"All\""
            )));
        }
    };
    let validation = match req.q("fieldValidation") {
        None | Some("") | Some("Warn") => FieldValidation::Warn,
        Some("Strict") => FieldValidation::Strict,
        Some("Ignore") => FieldValidation::Ignore,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
            )));
        }
    };
    let given = req.q("fieldManager").filter(|m| !m.is_empty());
    let manager = match given {
        Some(m) => m.to_string(),
        None => {
            let ua = req.header(header::USER_AGENT);
            let prefix = ua.split('/').next().unwrap_or("").trim();
            if prefix.is_empty() {
                "unknown".to_string()
            } else {
                prefix.chars().take(128).collect()
            }
        }
    };
    Ok(WriteOpts {
        dry_run,
        validation,
        manager,
        manager_given: given.is_some(),
        force: req.flag("force"),
    })
}

fn selectors(req: &Req, t: &Target) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let label = LabelSelector::parse(req.q("labelSelector").unwrap_or(""))?;
    let field = FieldSelector::parse(req.q("fieldSelector").unwrap_or(""), t.res.field_labels())?;
    Ok((label, field))
}

fn render_one(t: &Target, obj: &Value, fmt: Format, req: &Req) -> Value {
    match fmt {
        Format::Json => obj.clone(),
        Format::Partial => partial_metadata(obj),
        Format::Table(tv) => table(
            &t.res,
            &t.version,
            std::slice::from_ref(obj),
            json!({"resourceVersion": meta_str(obj, "resourceVersion")}),
            Include::parse(req.q("includeObject")),
            tv,
        ),
    }
}

fn resource(
    shared: &Arc<Shared>,
    req: &Req,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Response<Body>, ApiError> {
    if rest.is_empty() {
        if req.method != Method::GET {
            return Err(ApiError::method_not_allowed(req.method.as_str(), &req.path));
        }
        return discovery::resource_list(&shared.store(), group, version)
            .map(|v| json_response(200, &v))
            .ok_or_else(ApiError::no_route);
    }
    let mut rest = rest;
    let mut watch_path = false;
    if rest[0] == "watch" {
        watch_path = true;
        rest = &rest[1..];
    }
    let mut ns = None;
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"))
    {
        ns = Some(rest[1]);
        rest = &rest[2..];
    }
    if rest.is_empty() || rest.len() > 3 {
        return Err(ApiError::no_route());
    }
    let plural = rest[0];
    let name = rest.get(1).copied();
    let sub = rest.get(2).copied();
    let t = shared
        .store()
        .target(group, version, plural, ns, sub)
        .ok_or_else(ApiError::no_route)?;
    if ns.is_some() && !t.res.namespaced {
        return Err(ApiError::no_route());
    }
    if name.is_some() && t.res.namespaced && ns.is_none() {
        return Err(ApiError::no_route());
    }
    if let Some(s) = sub
        && !(s == "status" && t.res.has_status(version))
    {
        return Err(ApiError::no_route());
    }
    let watching = watch_path || req.flag("watch");
    let verb = match (&req.method, name, sub) {
        (&Method::GET, _, _) if watching => "watch",
        (&Method::GET, Some(_), _) => "get",
        (&Method::GET, None, _) => "list",
        (&Method::POST, None, None) => "create",
        (&Method::PUT, Some(_), _) => "update",
        (&Method::PATCH, Some(_), _) => "patch",
        (&Method::DELETE, Some(_), None) => "delete",
        (&Method::DELETE, None, None) => "deletecollection",
        (m, _, _) => return Err(ApiError::method_not_allowed(m.as_str(), &req.path)),
    };
    if let Some(code) = shared.hooks().on_request(verb, plural, sub) {
        return Err(ApiError::injected(code, group, plural, name.unwrap_or("")));
    }
    let fmt = format(req);
    // events.k8s.io/v1 Events are written as the core/v1 Events they are stored as.
    let events_api = t.res.flavor == Flavor::Event;
    let wt = if events_api {
        shared
            .store()
            .target("", "v1", "events", ns, sub)
            .ok_or_else(ApiError::no_route)?
    } else {
        t.clone()
    };
    let to_client = |obj: &Value| {
        if events_api && obj["kind"] != "Status" {
            view(obj, &t.res, &t.version)
        } else {
            obj.clone()
        }
    };
    let from_client = |body: Value| -> Result<Value, ApiError> {
        if !events_api {
            return Ok(body);
        }
        if body.is_object() {
            let mut b = body;
            b["apiVersion"] = json!("events.k8s.io/v1");
            Ok(crate::resources::events_event_to_core(&b))
        } else {
            Ok(body)
        }
    };
    match verb {
        "watch" => start_watch(shared, req, &t, name),
        "get" => {
            let name = name.unwrap_or("");
            let obj = shared.store().get(&t, name)?;
            Ok(json_response(200, &render_one(&t, &obj, fmt, req)))
        }
        "list" => {
            let (label, field) = selectors(req, &t)?;
            let limit = req.q("limit").and_then(|l| l.parse::<usize>().ok());
            let list = shared
                .store()
                .list(&t, &label, &field, limit, req.q("continue"))?;
            Ok(json_response(200, &render_list(&t, list, fmt, req)))
        }
        "create" => {
            let body = parse_body(req)?;
            if events_api {
                crate::resources::validate_events_event(&body)?;
            }
            let body = from_client(body)?;
            let opts = write_opts(req)?;
            let out = shared.store().create(&wt, body, &opts, None)?;
            Ok(with_warnings(
                json_response(201, &to_client(&out.object)),
                &out.warnings,
            ))
        }
        "update" => {
            let body = from_client(parse_body(req)?)?;
            let opts = write_opts(req)?;
            let out = shared
                .store()
                .update(&wt, name.unwrap_or(""), body, &opts)?;
            Ok(with_warnings(
                json_response(200, &to_client(&out.object)),
                &out.warnings,
            ))
        }
        "patch" => {
            let ptype = match req.content_type().as_str() {
                "application/merge-patch+json" => PatchType::Merge,
                "application/json-patch+json" => PatchType::Json,
                // Custom resources have no Go type to take patch strategies from.
                "application/strategic-merge-patch+json" if t.res.flavor != Flavor::Custom => {
                    PatchType::Strategic
                }
                "application/apply-patch+yaml" | "application/apply-patch+json" => PatchType::Apply,
                _ if t.res.flavor == Flavor::Custom => {
                    return Err(ApiError::unsupported_patch_type(&[
                        "application/json-patch+json",
                        "application/merge-patch+json",
                        "application/apply-patch+yaml",
                    ]));
                }
                _ => {
                    return Err(ApiError::unsupported_patch_type(&[
                        "application/json-patch+json",
                        "application/merge-patch+json",
                        "application/strategic-merge-patch+json",
                        "application/apply-patch+yaml",
                    ]));
                }
            };
            let opts = write_opts(req)?;
            let out = if events_api && ptype == PatchType::Apply {
                let applied: Value = serde_json::from_slice(&req.body)
                    .or_else(|_| serde_yaml_ng::from_slice(&req.body))
                    .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
                let applied = serde_json::to_vec(&from_client(applied)?).unwrap_or_default();
                shared
                    .store()
                    .patch(&wt, name.unwrap_or(""), ptype, &applied, &opts)?
            } else {
                shared
                    .store()
                    .patch(&t, name.unwrap_or(""), ptype, &req.body, &opts)?
            };
            let code = if out.created { 201 } else { 200 };
            Ok(with_warnings(
                json_response(code, &to_client(&out.object)),
                &out.warnings,
            ))
        }
        "delete" => {
            let opts = delete_opts(req)?;
            let out = shared.store().delete(&wt, name.unwrap_or(""), &opts)?;
            Ok(json_response(200, &to_client(&out.object)))
        }
        "deletecollection" => {
            let (label, field) = selectors(req, &t)?;
            let opts = delete_opts(req)?;
            let list = shared
                .store()
                .delete_collection(&wt, &label, &field, opts.dry_run)?;
            Ok(json_response(200, &list))
        }
        _ => Err(ApiError::method_not_allowed(req.method.as_str(), &req.path)),
    }
}

fn render_list(t: &Target, list: Value, fmt: Format, req: &Req) -> Value {
    let items = list
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let meta = list.get("metadata").cloned().unwrap_or(json!({}));
    match fmt {
        Format::Json => list,
        Format::Partial => json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": meta,
            "items": items.iter().map(partial_metadata).collect::<Vec<_>>(),
        }),
        Format::Table(tv) => table(
            &t.res,
            &t.version,
            &items,
            meta,
            Include::parse(req.q("includeObject")),
            tv,
        ),
    }
}

fn delete_opts(req: &Req) -> Result<DeleteOpts, ApiError> {
    if req.q("dryRun").is_some_and(|d| !d.is_empty() && d != "All") {
        return Err(ApiError::bad_request(
            "dryRun: Unsupported value: supported values: \"All\"",
        ));
    }
    let mut opts = DeleteOpts {
        dry_run: req.q("dryRun") == Some("All"),
        ..DeleteOpts::default()
    };
    // DeleteOptions may come as JSON (or, from typed clients, protobuf: then only the query
    // parameters count; propagationPolicy and gracePeriodSeconds are ignored anyway).
    if let Ok(body) = serde_json::from_slice::<Value>(&req.body) {
        if let Some(p) = body.get("preconditions") {
            opts.uid = p.get("uid").and_then(Value::as_str).map(str::to_string);
            opts.resource_version = p
                .get("resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        if body
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x == "All"))
        {
            opts.dry_run = true;
        }
    }
    Ok(opts)
}

// ---------------------------------------------------------------------------------------------
// Watch

struct WatchSpec {
    filter: Filter,
    target: Target,
    format: Format,
    include: Include,
    bookmarks: bool,
    timeout: Option<Duration>,
}

fn event_line(etype: &str, object: Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": etype, "object": object})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

impl WatchSpec {
    fn render(&self, obj: &Value) -> Value {
        let o = view(obj, &self.target.res, &self.target.version);
        match self.format {
            Format::Json => o,
            Format::Partial => partial_metadata(&o),
            Format::Table(tv) => table(
                &self.target.res,
                &self.target.version,
                std::slice::from_ref(&o),
                json!({"resourceVersion": meta_str(&o, "resourceVersion")}),
                self.include,
                tv,
            ),
        }
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
        if initial_end && let Some(m) = meta.as_object_mut() {
            m.insert(
                "annotations".into(),
                json!({"k8s.io/initial-events-end": "true"}),
            );
        }
        let (kind, api_version) = match self.format {
            Format::Json => (
                self.target.res.kind.clone(),
                self.target.res.api_version(&self.target.version),
            ),
            Format::Partial => ("PartialObjectMetadata".into(), "meta.k8s.io/v1".into()),
            Format::Table(tv) => ("Table".into(), format!("meta.k8s.io/{tv}")),
        };
        event_line(
            "BOOKMARK",
            json!({"kind": kind, "apiVersion": api_version, "metadata": meta}),
        )
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    req: &Req,
    t: &Target,
    name: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let (label, mut field) = selectors(req, t)?;
    if let Some(n) = name {
        let combined = match req.q("fieldSelector").filter(|f| !f.is_empty()) {
            Some(f) => format!("{f},metadata.name={n}"),
            None => format!("metadata.name={n}"),
        };
        field = FieldSelector::parse(&combined, None)?;
    }
    let rv = match req.q("resourceVersion").unwrap_or("") {
        "" | "0" => None,
        s => Some(s.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion: Invalid value: {s:?}: must be a number"
            ))
        })?),
    };
    // sendInitialEvents / resourceVersionMatch as ListOptions validation has them (the
    // WatchList feature is on in 1.37).
    let send_initial_param = req.q("sendInitialEvents").map(|v| v == "true" || v == "1");
    let rv_match = req.q("resourceVersionMatch").unwrap_or("");
    let mut causes = Vec::new();
    if send_initial_param.is_some() && rv_match != "NotOlderThan" {
        causes.push(Cause::new(
            "FieldValueForbidden",
            "resourceVersionMatch",
            "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ));
    }
    if !rv_match.is_empty() {
        if send_initial_param.is_none() {
            causes.push(Cause::new(
                "FieldValueForbidden",
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        if rv_match != "NotOlderThan" {
            causes.push(Cause::new(
                "FieldValueNotSupported",
                "resourceVersionMatch",
                format!("Unsupported value: {rv_match:?}: supported values: \"NotOlderThan\""),
            ));
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid("meta.k8s.io", "ListOptions", "", causes));
    }
    let send_initial = send_initial_param == Some(true);
    let timeout = req
        .q("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs);
    let spec = WatchSpec {
        filter: Filter {
            key: t.key(),
            namespace: if t.res.namespaced {
                t.namespace.clone()
            } else {
                None
            },
            label,
            field,
        },
        target: t.clone(),
        format: format(req),
        include: Include::parse(req.q("includeObject")),
        bookmarks: req.flag("allowWatchBookmarks"),
        timeout,
    };
    let (rv_rx, initial, cursor) = {
        let store = shared.store();
        let rv_rx = store.subscribe();
        match (rv, send_initial_param) {
            (_, Some(true)) | (None, None) => {
                let (items, cur) = store.snapshot(&spec.filter);
                (rv_rx, Some(items), cur)
            }
            (Some(n), _) => (rv_rx, None, n),
            // sendInitialEvents=false without a resourceVersion: from now, nothing synthetic.
            (None, Some(false)) => (rv_rx, None, store.resource_version()),
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let tx = delayed(tx, shared.watch_delay_ms.clone());
    tokio::spawn(run_watch(
        shared.clone(),
        spec,
        rv_rx,
        initial,
        send_initial,
        cursor,
        tx,
    ));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

/// A sender whose lines reach `out` the current watch delay after they were sent
/// (`Config::watch_delay`, changed by `TestServer::set_watch_delay`). The delay is read as
/// each line is sent, so a delay switched on (or off) at run time reaches open watches.
fn delayed(
    out: mpsc::Sender<Bytes>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
) -> mpsc::Sender<Bytes> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(256);
    let (timed_tx, mut timed_rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Bytes)>();
    // Stamp each line when it is sent, then deliver it when its time comes, in order. Either
    // task ends when the other does, so a watcher that went away ends the watch.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = timed_tx.closed() => return,
                b = rx.recv() => match b {
                    Some(b) => {
                        let delay = Duration::from_millis(
                            delay_ms.load(std::sync::atomic::Ordering::Relaxed),
                        );
                        if timed_tx.send((tokio::time::Instant::now() + delay, b)).is_err() {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
    });
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = out.closed() => return,
                item = timed_rx.recv() => match item {
                    Some((due, b)) => {
                        tokio::time::sleep_until(due).await;
                        if out.send(b).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
    });
    tx
}

async fn run_watch(
    shared: Arc<Shared>,
    spec: WatchSpec,
    mut rv_rx: tokio::sync::watch::Receiver<u64>,
    initial: Option<Vec<Value>>,
    send_initial: bool,
    mut cursor: u64,
    tx: mpsc::Sender<Bytes>,
) {
    let mut expire = shared.expire.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    if *shutdown.borrow() {
        return;
    }
    if let Some(items) = initial {
        for o in items {
            if tx.send(event_line("ADDED", spec.render(&o))).await.is_err() {
                return;
            }
        }
        if send_initial && spec.bookmarks && tx.send(spec.bookmark(cursor, true)).await.is_err() {
            return;
        }
    }
    let deadline = spec.timeout.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(
        shared
            .config
            .bookmark_interval
            .max(Duration::from_millis(10)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let drained = shared.store().events_since(&spec.filter, cursor);
        match drained {
            Ok((events, next)) => {
                for (etype, obj) in events {
                    if tx.send(event_line(etype, spec.render(&obj))).await.is_err() {
                        return;
                    }
                }
                cursor = next;
            }
            Err(oldest) => {
                let status =
                    ApiError::expired(format!("too old resource version: {cursor} ({oldest})"))
                        .to_status();
                let _ = tx.send(event_line("ERROR", status)).await;
                return;
            }
        }
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => futures::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = rv_rx.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = tick.tick(), if spec.bookmarks => {
                if tx.send(spec.bookmark(cursor, false)).await.is_err() {
                    return;
                }
            }
            _ = sleep => {
                if spec.bookmarks {
                    let _ = tx.send(spec.bookmark(cursor, false)).await;
                }
                return;
            }
            _ = expire.changed() => return,
            _ = shutdown.changed() => return,
            _ = tx.closed() => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /__test/

/// What `GET /__test/` answers.
pub const TEST_HELP: &str = "kube-test-server test hooks:
  GET  /__test/stats             request counters (by verb/resource/subresource), writes per resource, objects, resourceVersion
  POST /__test/fail              {\"n\":2,\"verb\":\"patch\",\"resource\":\"servergroups\",\"subresource\":\"status\",\"status\":409}
                                 subresource: omitted/null = main resource only, \"*\" = any; verb/resource may be \"*\"
  POST /__test/expire-watches    end all open watch streams now
  POST /__test/compact           drop the watch history (watches from older resourceVersions get 410 Gone)
  POST /__test/reset-counters    zero the request counters
  GET  /__test/kubeconfig?namespace=NS   a kubeconfig for this server
";

pub(crate) fn stats(shared: &Shared) -> Value {
    let mut v = shared.hooks().stats();
    let store = shared.store();
    if let Some(m) = v.as_object_mut() {
        m.insert("objects".into(), json!(store.object_counts()));
        m.insert("resourceVersion".into(), json!(store.resource_version()));
    }
    v
}

fn test_hooks(shared: &Arc<Shared>, req: &Req) -> Response<Body> {
    let s: Vec<&str> = req.segs.iter().skip(1).map(String::as_str).collect();
    let post = req.method == Method::POST;
    match (s.as_slice(), post) {
        ([], false) => text_response(200, TEST_HELP.into()),
        (["stats"], false) => json_response(200, &stats(shared)),
        (["kubeconfig"], false) => text_response(
            200,
            crate::server::kubeconfig_yaml(&shared.url(), req.q("namespace").unwrap_or("default")),
        ),
        (["expire-watches"], true) => {
            shared.expire.send_modify(|n| *n += 1);
            json_response(200, &json!({"expired": true}))
        }
        (["compact"], true) => {
            shared.store().compact();
            json_response(200, &json!({"compacted": true}))
        }
        (["reset-counters"], true) => {
            shared.hooks().reset();
            json_response(200, &json!({"reset": true}))
        }
        (["fail"], true) => {
            let body: Value = match serde_json::from_slice(&req.body) {
                Ok(v) => v,
                Err(e) => {
                    return error_response(&ApiError::bad_request(format!("invalid JSON: {e}")));
                }
            };
            let str_of = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
            let (Some(verb), Some(resource), Some(status)) = (
                str_of("verb"),
                str_of("resource"),
                body.get("status").and_then(Value::as_u64),
            ) else {
                return error_response(&ApiError::bad_request(
                    "expected {\"n\":N,\"verb\":V,\"resource\":R,\"subresource\":S?,\"status\":CODE}",
                ));
            };
            let rule = FailRule {
                remaining: body.get("n").and_then(Value::as_u64).unwrap_or(1) as usize,
                verb,
                plural: resource,
                subresource: str_of("subresource"),
                status: status.clamp(100, 599) as u16,
            };
            shared.hooks().add_rule(rule);
            json_response(200, &json!({"scheduled": true}))
        }
        _ => error_response(&ApiError::no_route()),
    }
}
