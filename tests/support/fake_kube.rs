//! A small stateful stand-in for the Kubernetes API, served to a real `kube::Client` through
//! a tower service (no sockets). It keeps ServerGroups, Secrets and Events in memory and
//! implements just what the reconcile uses: GET, JSON patch of metadata (with `test`),
//! server-side apply of the status subresource, delete with finalizers, and Event writes.
//! The full API semantics (watch, selectors, schema validation) belong to the Kubernetes API
//! test server; this fake exists so reconcile tests can look at the state a user would see.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    /// (plural, namespace, name) -> object
    objects: BTreeMap<(String, String, String), Value>,
    events: Vec<Value>,
    resource_version: u64,
    writes: u64,
    /// GETs of one object, by plural.
    reads: BTreeMap<String, u64>,
    /// Status writes to fail with 409, to simulate a conflicting writer.
    fail_status_writes: usize,
}

#[derive(Clone, Default)]
pub struct FakeKube {
    state: Arc<Mutex<State>>,
}

fn key(plural: &str, ns: &str, name: &str) -> (String, String, String) {
    (plural.to_string(), ns.to_string(), name.to_string())
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl FakeKube {
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let me = me.clone();
            async move { Ok::<_, std::convert::Infallible>(me.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Creates an object as `kubectl apply` would: with uid, generation 1 and a timestamp.
    pub fn create(&self, plural: &str, mut obj: Value) {
        let mut s = self.lock();
        s.resource_version += 1;
        let rv = s.resource_version;
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.insert("namespace".into(), json!(ns));
        meta.insert("uid".into(), json!(format!("uid-{name}-{rv}")));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("generation".into(), json!(1));
        meta.insert("creationTimestamp".into(), json!(now()));
        s.objects.insert(key(plural, &ns, &name), obj);
    }

    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(&key(plural, ns, name)).cloned()
    }

    pub fn list(&self, plural: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| k.0 == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Changes the spec (or metadata) as a user would; the generation moves on spec changes.
    pub fn edit(&self, plural: &str, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut s = self.lock();
        s.resource_version += 1;
        let rv = s.resource_version;
        let obj = s.objects.get_mut(&key(plural, ns, name)).unwrap();
        let before = obj["spec"].clone();
        f(obj);
        if obj["spec"] != before {
            let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(g + 1);
        }
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    }

    /// `kubectl delete`: marks the object while finalizers remain, removes it otherwise.
    pub fn delete(&self, plural: &str, ns: &str, name: &str) {
        let mut s = self.lock();
        let k = key(plural, ns, name);
        let Some(obj) = s.objects.get_mut(&k) else {
            return;
        };
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            obj["metadata"]["deletionTimestamp"] = json!(now());
        } else {
            s.objects.remove(&k);
        }
    }

    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// Reasons of the Events recorded for an object, in order.
    pub fn event_reasons(&self, name: &str) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["regarding"]["name"] == name)
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Writes to ServerGroups (metadata patches and status), not counting Events.
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// A GET of one object, counted.
    fn read(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        *self.lock().reads.entry(plural.to_string()).or_default() += 1;
        self.get(plural, ns, name)
    }

    /// GETs of one object of `plural` (leases, servergroups, ...).
    pub fn reads(&self, plural: &str) -> u64 {
        self.lock().reads.get(plural).copied().unwrap_or(0)
    }

    pub fn fail_next_status_writes(&self, n: usize) {
        self.lock().fail_status_writes = n;
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let (code, value) = self.route(&method, &path, &body);
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&value).unwrap()))
            .unwrap()
    }

    fn route(&self, method: &Method, path: &str, body: &[u8]) -> (StatusCode, Value) {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        // /apis/{group}/{version}/namespaces/{ns}/{plural}[/{name}[/status]]
        // /api/v1/namespaces/{ns}/{plural}[/{name}]
        let rest = match parts.as_slice() {
            ["apis", _, _, rest @ ..] | ["api", _, rest @ ..] => rest,
            _ => {
                return (
                    StatusCode::NOT_FOUND,
                    status_body(404, "NotFound", "no such path"),
                );
            }
        };
        match (method, rest) {
            (&Method::POST, ["namespaces", _, "events"]) => {
                let mut s = self.lock();
                let ev: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                s.events.push(ev.clone());
                (StatusCode::CREATED, ev)
            }
            (&Method::PATCH, ["namespaces", _, "events", _]) => (StatusCode::OK, json!({})),
            // Leases (the operator's claims on Waldur groups): create, replace, delete.
            (&Method::POST, ["namespaces", ns, "leases"]) => self.create_lease(ns, body),
            (&Method::PUT, ["namespaces", ns, "leases", name]) => {
                self.replace_lease(ns, name, body)
            }
            (&Method::DELETE, ["namespaces", ns, "leases", name]) => {
                match self.lock().objects.remove(&key("leases", ns, name)) {
                    Some(obj) => (StatusCode::OK, obj),
                    None => (
                        StatusCode::NOT_FOUND,
                        status_body(404, "NotFound", "not found"),
                    ),
                }
            }
            (&Method::GET, ["namespaces", ns, plural, name]) => match self.read(plural, ns, name) {
                Some(obj) => (StatusCode::OK, obj),
                None => (
                    StatusCode::NOT_FOUND,
                    status_body(404, "NotFound", &format!("{plural} \"{name}\" not found")),
                ),
            },
            (&Method::GET, ["namespaces", _, plural]) | (&Method::GET, [plural]) => {
                let items = self.list(plural);
                (
                    StatusCode::OK,
                    json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            (&Method::PATCH, ["namespaces", ns, plural, name]) => {
                self.patch_metadata(plural, ns, name, body)
            }
            (&Method::PATCH, ["namespaces", ns, plural, name, "status"]) => {
                self.apply_status(plural, ns, name, body)
            }
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                status_body(405, "MethodNotAllowed", "not implemented by the fake"),
            ),
        }
    }

    fn create_lease(&self, ns: &str, body: &[u8]) -> (StatusCode, Value) {
        let mut obj: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut s = self.lock();
        let k = key("leases", ns, &name);
        if s.objects.contains_key(&k) {
            return (
                StatusCode::CONFLICT,
                status_body(
                    409,
                    "AlreadyExists",
                    &format!("leases \"{name}\" already exists"),
                ),
            );
        }
        s.resource_version += 1;
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["uid"] = json!(format!("lease-{}", s.resource_version));
        obj["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
        s.objects.insert(k, obj.clone());
        (StatusCode::CREATED, obj)
    }

    fn replace_lease(&self, ns: &str, name: &str, body: &[u8]) -> (StatusCode, Value) {
        let mut obj: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let mut s = self.lock();
        let k = key("leases", ns, name);
        let Some(current) = s.objects.get(&k).cloned() else {
            return (
                StatusCode::NOT_FOUND,
                status_body(404, "NotFound", "not found"),
            );
        };
        if obj["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
            return (
                StatusCode::CONFLICT,
                status_body(409, "Conflict", "the object has been modified"),
            );
        }
        s.resource_version += 1;
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
        obj["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
        s.objects.insert(k, obj.clone());
        (StatusCode::OK, obj)
    }

    fn patch_metadata(
        &self,
        plural: &str,
        ns: &str,
        name: &str,
        body: &[u8],
    ) -> (StatusCode, Value) {
        let mut s = self.lock();
        let k = key(plural, ns, name);
        let Some(obj) = s.objects.get(&k).cloned() else {
            return (
                StatusCode::NOT_FOUND,
                status_body(404, "NotFound", "not found"),
            );
        };
        let Ok(patch) = serde_json::from_slice::<json_patch::Patch>(body) else {
            return (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                status_body(
                    415,
                    "UnsupportedMediaType",
                    "the fake takes JSON patches only",
                ),
            );
        };
        let mut next = obj.clone();
        if next["metadata"].get("finalizers").is_none() {
            next["metadata"]["finalizers"] = Value::Null;
        }
        if let Err(e) = json_patch::patch(&mut next, &patch) {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                status_body(422, "Invalid", &e.to_string()),
            );
        }
        s.writes += 1;
        s.resource_version += 1;
        next["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
        let empty = next["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if next["metadata"]["deletionTimestamp"].is_string() && empty {
            s.objects.remove(&k);
        } else {
            s.objects.insert(k, next.clone());
        }
        (StatusCode::OK, next)
    }

    fn apply_status(&self, plural: &str, ns: &str, name: &str, body: &[u8]) -> (StatusCode, Value) {
        let mut s = self.lock();
        if s.fail_status_writes > 0 {
            s.fail_status_writes -= 1;
            return (
                StatusCode::CONFLICT,
                status_body(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version",
                ),
            );
        }
        let k = key(plural, ns, name);
        let Some(mut obj) = s.objects.get(&k).cloned() else {
            return (
                StatusCode::NOT_FOUND,
                status_body(404, "NotFound", "not found"),
            );
        };
        let patch: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        // A uid in the patch that is not the object's is refused, as kube-apiserver and the
        // API test server do (the differential test's case n2): metadata.uid is immutable.
        if let Some(uid) = patch["metadata"]["uid"].as_str()
            && obj["metadata"]["uid"].as_str() != Some(uid)
        {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                status_body(
                    422,
                    "Invalid",
                    &format!("metadata.uid: Invalid value: {uid:?}: field is immutable"),
                ),
            );
        }
        // The operator owns every status field, so its apply replaces the status whole;
        // spec changes in a status write are ignored, as the status subresource does.
        obj["status"] = patch["status"].clone();
        s.writes += 1;
        s.resource_version += 1;
        obj["metadata"]["resourceVersion"] = json!(s.resource_version.to_string());
        s.objects.insert(k, obj.clone());
        (StatusCode::OK, obj)
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}
