//! Differential test: the same raw HTTP requests against the real kube-apiserver (the control
//! plane of `tests/control-plane`) and against the Kubernetes API test server, comparing the
//! status codes and the fields kube-rs reads. Each backend gets a fresh namespace and the
//! operator's CRD. Every case prints `case: real=<...> stand-in=<...>`; the test fails listing
//! every mismatch that is not in [`ALLOWED`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use control_plane::ControlPlane;
use http_body_util::BodyExt;
use kube::Client;
use kube_test_server::TestServer;
use serde_json::{Value, json};

/// Differences left on purpose: `(case, reason)`, each also listed in
/// tests/kube-test-server/README.md, "What is approximated or missing". Empty: every difference
/// these cases found was fixed in the test server. Differences no case here can see (bookmark
/// cadence, list resourceVersion semantics, watch-cache lag, RBAC, ...) are in the README.
const ALLOWED: &[(&str, &str)] = &[];

const GROUP_PATH: &str = "/apis/openstack.waldur.com/v1alpha1";
const TENANT: &str = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";
const APPLY: &str = "application/apply-patch+yaml";
const MERGE: &str = "application/merge-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";

#[derive(Clone)]
struct Side {
    client: Client,
    ns: String,
    _server: Option<Arc<TestServer>>,
}

struct Resp {
    code: u16,
    body: Value,
}

impl Resp {
    /// `code reason` for a Status, `code Kind` for anything else.
    fn brief(&self) -> String {
        if self.body["kind"] == "Status" {
            format!(
                "{} {}/{}",
                self.code,
                self.body["status"].as_str().unwrap_or("-"),
                self.body["reason"].as_str().unwrap_or("-")
            )
        } else {
            format!(
                "{} {}",
                self.code,
                self.body["kind"].as_str().unwrap_or("non-object")
            )
        }
    }

    fn message(&self) -> String {
        self.body["message"].as_str().unwrap_or("").to_string()
    }

    /// The Status causes as `reason field`, sorted.
    fn causes(&self) -> String {
        let mut causes: Vec<String> = self.body["details"]["causes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        format!(
                            "{} {}",
                            c["reason"].as_str().unwrap_or("-"),
                            c["field"].as_str().unwrap_or("-")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        causes.sort();
        format!("[{}]", causes.join(", "))
    }
}

impl Side {
    async fn send(
        &self,
        method: &str,
        path: &str,
        ctype: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let path = path.replace("{ns}", &self.ns);
        let mut req = http::Request::builder().method(method).uri(&path);
        if let Some(ctype) = ctype {
            req = req.header("content-type", ctype);
        }
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let req = req.body(kube::client::Body::from(bytes)).unwrap();
        let res = self.client.send(req).await.expect("the request is sent");
        let code = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Resp { code, body }
    }

    async fn get(&self, path: &str) -> Resp {
        self.send("GET", path, None, None).await
    }

    /// Opens a watch and reads events until `stop` says so, the stream ends or `within` passes.
    /// A non-200 answer is returned as its code and body.
    async fn watch(
        &self,
        path: &str,
        within: Duration,
        stop: impl Fn(&Value) -> bool,
    ) -> (u16, Vec<Value>) {
        let path = path.replace("{ns}", &self.ns);
        let req = http::Request::get(&path)
            .body(kube::client::Body::from(Vec::new()))
            .unwrap();
        let res = self.client.send(req).await.expect("the watch is sent");
        let code = res.status().as_u16();
        let mut body = res.into_body();
        if code != 200 {
            let bytes = body.collect().await.unwrap().to_bytes();
            return (
                code,
                vec![serde_json::from_slice(&bytes).unwrap_or(Value::Null)],
            );
        }
        let deadline = Instant::now() + within;
        let mut buf = Vec::new();
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = match tokio::time::timeout(left, body.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                _ => break,
            };
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
            }
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                if let Ok(event) = serde_json::from_slice::<Value>(&line) {
                    let done = stop(&event);
                    events.push(event);
                    if done {
                        return (code, events);
                    }
                }
            }
        }
        (code, events)
    }

    async fn create_sg(&self, name: &str, extra_meta: Value) -> Resp {
        let mut meta = json!({"name": name});
        if let (Some(m), Some(extra)) = (meta.as_object_mut(), extra_meta.as_object()) {
            m.extend(extra.clone());
        }
        self.send(
            "POST",
            &format!("{GROUP_PATH}/namespaces/{{ns}}/servergroups"),
            Some("application/json"),
            Some(json!({
                "apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
                "metadata": meta, "spec": {"policy": "affinity", "tenant": TENANT}
            })),
        )
        .await
    }
}

fn sg_path(name: &str) -> String {
    format!("{GROUP_PATH}/namespaces/{{ns}}/servergroups/{name}")
}

fn names(list: &Value) -> String {
    let mut names: Vec<&str> = list["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["metadata"]["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    format!("[{}]", names.join(","))
}

fn finalizers(obj: &Value) -> String {
    let mut f: Vec<&str> = obj["metadata"]["finalizers"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    f.sort();
    format!("[{}]", f.join(","))
}

/// Digits replaced by `N`, so that resourceVersions and counts compare equal.
fn no_digits(s: &str) -> String {
    let mut out = String::new();
    let mut last_digit = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !last_digit {
                out.push('N');
            }
            last_digit = true;
        } else {
            out.push(c);
            last_digit = false;
        }
    }
    out
}

/// Watch events as `TYPE(name finalizers)`; periodic bookmarks (whose cadence differs) are
/// left out, the initial-events-end one is kept.
fn events_brief(events: &[Value]) -> String {
    let parts: Vec<String> = events
        .iter()
        .filter_map(|e| {
            let t = e["type"].as_str().unwrap_or("?");
            let o = &e["object"];
            match t {
                "BOOKMARK" => {
                    let end = &o["metadata"]["annotations"]["k8s.io/initial-events-end"];
                    (end == "true").then(|| "BOOKMARK(initial-events-end)".to_string())
                }
                "ERROR" => Some(format!(
                    "ERROR({} {} {})",
                    o["code"],
                    o["reason"].as_str().unwrap_or("-"),
                    no_digits(o["message"].as_str().unwrap_or(""))
                )),
                _ => Some(format!(
                    "{t}({} {} deleting={})",
                    o["metadata"]["name"].as_str().unwrap_or("-"),
                    finalizers(o),
                    o["metadata"]["deletionTimestamp"].is_string()
                )),
            }
        })
        .collect();
    parts.join(" ")
}

async fn real_side(ns: &str) -> Side {
    let cp = tokio::task::spawn_blocking(ControlPlane::shared)
        .await
        .expect("the control plane starts");
    let client = crate::env::client_from(&cp.admin_kubeconfig_yaml(ns)).await;
    let side = Side {
        client,
        ns: ns.to_string(),
        _server: None,
    };
    let mut crd = serde_json::to_value(waldur_operator::api::crd()).unwrap();
    crd["apiVersion"] = json!("apiextensions.k8s.io/v1");
    crd["kind"] = json!("CustomResourceDefinition");
    let name = "servergroups.openstack.waldur.com";
    let path = format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}");
    let r = side
        .send(
            "PATCH",
            &format!("{path}?fieldManager=waldur-operator-e2e&force=true"),
            Some(APPLY),
            Some(crd),
        )
        .await;
    assert!(r.code < 300, "the CRD applies: {} {}", r.code, r.body);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let crd = side.get(&path).await.body;
        let established = crd["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Established" && c["status"] == "True");
        if established {
            break;
        }
        assert!(Instant::now() < deadline, "the CRD is not Established");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    side
}

async fn stand_in_side(ns: &str) -> Side {
    let server = TestServer::start().await.expect("the test server starts");
    server
        .install_crd(serde_json::to_value(waldur_operator::api::crd()).unwrap())
        .expect("the CRD installs");
    let client = crate::env::client_from(&server.kubeconfig_yaml(ns)).await;
    Side {
        client,
        ns: ns.to_string(),
        _server: Some(Arc::new(server)),
    }
}

async fn create_namespace(side: &Side) {
    let r = side
        .send(
            "POST",
            "/api/v1/namespaces",
            Some("application/json"),
            Some(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": side.ns}})),
        )
        .await;
    assert_eq!(r.code, 201, "the namespace is created: {}", r.body);
}

/// Removes the finalizers the cases left, then the namespace.
async fn clean_up(side: &Side) {
    let list = side
        .get(&format!("{GROUP_PATH}/namespaces/{{ns}}/servergroups"))
        .await;
    for item in list.body["items"].as_array().into_iter().flatten() {
        if item["metadata"]["finalizers"].is_array() {
            let name = item["metadata"]["name"].as_str().unwrap_or_default();
            side.send(
                "PATCH",
                &sg_path(name),
                Some(MERGE),
                Some(json!({"metadata": {"finalizers": null}})),
            )
            .await;
        }
    }
    side.send("DELETE", "/api/v1/namespaces/{ns}", None, None)
        .await;
}

type Outcome = Vec<(String, String)>;

/// Runs every case on one side and returns `(case, summary)` in order.
async fn run_cases(s: &Side) -> Outcome {
    let mut out: Outcome = Vec::new();
    let mut put = |case: &str, summary: String| out.push((case.to_string(), summary));

    // version
    let v = s.get("/version").await.body;
    put("version", format!("{}", v["gitVersion"]));

    // (a) server-side apply with fields the CRD does not declare, and with a wrong type.
    s.create_sg("a", json!({})).await;
    let status_apply = |status: Value| {
        json!({"apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
               "metadata": {"name": "a"}, "status": status})
    };
    let apply_status = format!("{}/status?fieldManager=diff&force=true", sg_path("a"));
    let r = s
        .send(
            "PATCH",
            &apply_status,
            Some(APPLY),
            Some(status_apply(json!({"bogus": "x"}))),
        )
        .await;
    put(
        "a1 apply status undeclared field",
        format!("{} {}", r.brief(), r.message()),
    );
    let r = s
        .send(
            "PATCH",
            &apply_status,
            Some(APPLY),
            Some(status_apply(json!({"instanceCount": "three"}))),
        )
        .await;
    put(
        "a2 apply status wrong type",
        format!("{} {}", r.brief(), r.message()),
    );
    let r = s
        .send(
            "PATCH",
            &format!("{}?fieldManager=diff&force=true&fieldValidation=Ignore", sg_path("a")),
            Some(APPLY),
            Some(json!({"apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
                        "metadata": {"name": "a"}, "spec": {"policy": "affinity", "tenant": TENANT, "zzz": 1}})),
        )
        .await;
    put(
        "a3 apply spec undeclared field (Ignore)",
        format!("{} {}", r.brief(), r.message()),
    );
    let r = s
        .send(
            "PATCH",
            &apply_status,
            Some(APPLY),
            Some(status_apply(json!({"state": "OK", "instanceCount": 3}))),
        )
        .await;
    put("a4 apply status well typed", r.brief());
    let r = s
        .send(
            "PATCH",
            &format!("{}/status", sg_path("a")),
            Some(MERGE),
            Some(json!({"status": {"bogus2": "x"}})),
        )
        .await;
    put("a5 merge-patch status undeclared field", r.brief());
    let r = s
        .send(
            "PATCH",
            &apply_status,
            Some(APPLY),
            Some(status_apply(json!({"bogus": 1, "conditions": "x"}))),
        )
        .await;
    // Which of the two is reported may depend on map order: compare how many are.
    put(
        "a6 apply status two errors",
        format!(
            "{} errors reported: {}",
            r.brief(),
            r.message().matches(": expected ").count()
                + r.message().matches("not declared").count()
        ),
    );
    let r = s
        .send(
            "PATCH",
            &format!("{}?fieldManager=diff&force=true", sg_path("a")),
            Some(APPLY),
            Some(
                json!({"apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
                        "metadata": {"name": "a", "namespace": s.ns},
                        "spec": {"policy": "affinity", "tenant": TENANT, "credentialsRef": "x"}}),
            ),
        )
        .await;
    put(
        "a7 apply spec map given a string, namespace in body",
        format!("{} {}", r.brief(), r.message().replace(&s.ns, "NS")),
    );

    // (b) strategic merge patch: 415 on custom resources, merged on built-ins.
    let r = s
        .send(
            "PATCH",
            &sg_path("a"),
            Some(STRATEGIC),
            Some(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await;
    put(
        "b1 strategic patch on a custom resource",
        format!("{} {}", r.brief(), r.message()),
    );
    s.send(
        "POST",
        "/api/v1/namespaces/{ns}/configmaps",
        Some("application/json"),
        Some(json!({"metadata": {"name": "cm"}, "data": {"a": "1"}})),
    )
    .await;
    let r = s
        .send(
            "PATCH",
            "/api/v1/namespaces/{ns}/configmaps/cm",
            Some(STRATEGIC),
            Some(json!({"data": {"b": "2"}})),
        )
        .await;
    put(
        "b2 strategic patch on a ConfigMap",
        format!("{} {}", r.brief(), r.body["data"]),
    );

    // (c) PUT of a custom resource without metadata.resourceVersion.
    let mut obj = s.get(&sg_path("a")).await.body;
    obj["metadata"]
        .as_object_mut()
        .map(|m| m.remove("resourceVersion"));
    obj["metadata"]["labels"] = json!({"put": "yes"});
    let r = s
        .send(
            "PUT",
            &sg_path("a"),
            Some("application/json"),
            Some(obj.clone()),
        )
        .await;
    put(
        "c1 PUT custom resource without resourceVersion",
        format!("{} {} {}", r.brief(), r.message(), r.causes()),
    );
    let r = s
        .send(
            "PUT",
            "/api/v1/namespaces/{ns}/configmaps/cm",
            Some("application/json"),
            Some(json!({"metadata": {"name": "cm"}, "data": {"c": "3"}})),
        )
        .await;
    put("c2 PUT ConfigMap without resourceVersion", r.brief());
    let mut obj = s.get(&sg_path("a")).await.body;
    obj["metadata"]
        .as_object_mut()
        .map(|m| m.remove("resourceVersion"));
    let r = s
        .send(
            "PUT",
            &format!("{}/status", sg_path("a")),
            Some("application/json"),
            Some(obj),
        )
        .await;
    put(
        "c3 PUT status without resourceVersion",
        format!("{} {}", r.brief(), r.causes()),
    );

    // (d) a namespace that does not exist.
    let r = s
        .send(
            "POST",
            "/api/v1/namespaces/{ns}-missing/configmaps",
            Some("application/json"),
            Some(json!({"metadata": {"name": "cm"}})),
        )
        .await;
    put(
        "d1 create ConfigMap in a missing namespace",
        format!("{} {}", r.brief(), r.message().replace(&s.ns, "NS")),
    );
    let r = s
        .send(
            "POST",
            &format!("{GROUP_PATH}/namespaces/{{ns}}-missing/servergroups"),
            Some("application/json"),
            Some(json!({"apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
                        "metadata": {"name": "x"}, "spec": {"policy": "affinity", "tenant": TENANT}})),
        )
        .await;
    put(
        "d2 create ServerGroup in a missing namespace",
        format!("{} {}", r.brief(), r.message().replace(&s.ns, "NS")),
    );
    let r = s
        .send(
            "PATCH",
            &format!("{GROUP_PATH}/namespaces/{{ns}}-missing/servergroups/x?fieldManager=diff"),
            Some(APPLY),
            Some(json!({"apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
                        "metadata": {"name": "x"}, "spec": {"policy": "affinity", "tenant": TENANT}})),
        )
        .await;
    put(
        "d3 apply-create ServerGroup in a missing namespace",
        format!("{} {}", r.brief(), r.message().replace(&s.ns, "NS")),
    );
    let r = s.get("/api/v1/namespaces/{ns}-missing/configmaps").await;
    put("d4 list in a missing namespace", r.brief());

    // (e) core/v1 and events.k8s.io/v1 Events are one store.
    let stamp = "2026-01-02T03:04:05Z";
    let micro = "2026-01-02T03:04:05.000000Z";
    let r = s
        .send(
            "POST",
            "/api/v1/namespaces/{ns}/events",
            Some("application/json"),
            Some(json!({
                "metadata": {"name": "core-event"},
                "involvedObject": {"kind": "ConfigMap", "name": "cm", "namespace": s.ns, "apiVersion": "v1"},
                "reason": "Tested", "message": "from core/v1", "type": "Normal",
                "source": {"component": "diff"}, "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1
            })),
        )
        .await;
    put("e1 create core/v1 Event", r.brief());
    let r = s
        .send(
            "POST",
            "/apis/events.k8s.io/v1/namespaces/{ns}/events",
            Some("application/json"),
            Some(json!({
                "apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"name": "new-event"},
                "regarding": {"kind": "ConfigMap", "name": "cm", "namespace": s.ns, "apiVersion": "v1"},
                "reason": "Tested", "note": "from events.k8s.io/v1", "type": "Normal",
                "action": "Testing", "eventTime": micro,
                "reportingController": "diff.example.com/ctl", "reportingInstance": "diff-1"
            })),
        )
        .await;
    put("e2 create events.k8s.io/v1 Event", r.brief());
    let core = s.get("/api/v1/namespaces/{ns}/events").await;
    let new = s.get("/apis/events.k8s.io/v1/namespaces/{ns}/events").await;
    put("e3 core/v1 lists", names(&core.body));
    put("e4 events.k8s.io/v1 lists", names(&new.body));
    let r = s
        .get("/apis/events.k8s.io/v1/namespaces/{ns}/events/core-event")
        .await;
    put(
        "e5 core Event read as events.k8s.io/v1",
        format!(
            "{} note={} reason={} regarding={}",
            r.brief(),
            r.body["note"],
            r.body["reason"],
            r.body["regarding"]["name"]
        ),
    );
    let r = s.get("/api/v1/namespaces/{ns}/events/new-event").await;
    put(
        "e6 events.k8s.io Event read as core/v1",
        format!(
            "{} message={} reason={} involved={}",
            r.brief(),
            r.body["message"],
            r.body["reason"],
            r.body["involvedObject"]["name"]
        ),
    );
    let r = s
        .send(
            "POST",
            "/apis/events.k8s.io/v1/namespaces/{ns}/events",
            Some("application/json"),
            Some(json!({
                "apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"name": "bad-event"},
                "regarding": {"kind": "ConfigMap", "name": "cm", "namespace": s.ns},
                "reason": "Tested", "note": "x", "type": "Normal", "eventTime": micro
            })),
        )
        .await;
    put(
        "e7 events.k8s.io/v1 Event without reporting fields",
        format!("{} {}", r.brief(), r.causes()),
    );

    // (f) CEL rules are skipped after a blocking schema error.
    let both_imports = json!({"uuid": TENANT, "backendId": "x"});
    for (case, spec) in [
        (
            "f1 enum error + CEL violation",
            json!({"policy": "bogus", "tenant": TENANT, "import": both_imports}),
        ),
        (
            "f2 required error + CEL violation",
            json!({"policy": "affinity", "tenant": TENANT, "credentialsRef": {}, "import": both_imports}),
        ),
        (
            "f3 too long + CEL violation",
            json!({"policy": "affinity", "tenant": TENANT, "name": "n".repeat(151), "import": both_imports}),
        ),
        (
            "f4 pattern error + CEL violation",
            json!({"policy": "affinity", "tenant": "not-a-uuid", "import": both_imports}),
        ),
        (
            "f5 CEL violation alone",
            json!({"policy": "affinity", "tenant": TENANT, "import": both_imports}),
        ),
    ] {
        let r = s
            .send(
                "POST",
                &format!("{GROUP_PATH}/namespaces/{{ns}}/servergroups"),
                Some("application/json"),
                Some(
                    json!({"apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
                            "metadata": {"name": "f"}, "spec": spec}),
                ),
            )
            .await;
        put(
            case,
            format!("{} {} | {}", r.brief(), r.causes(), r.message()),
        );
    }

    // (g) DELETE: a Status when the object goes at once, the object while finalizers remain.
    s.create_sg("g1", json!({})).await;
    let r = s.send("DELETE", &sg_path("g1"), None, None).await;
    let d = &r.body["details"];
    put(
        "g1 delete without finalizers",
        format!(
            "{} details={{name={} group={} kind={} uid={}}}",
            r.brief(),
            d["name"],
            d["group"],
            d["kind"],
            d["uid"].is_string()
        ),
    );
    s.create_sg("g2", json!({"finalizers": ["example.com/keep"]}))
        .await;
    let r = s.send("DELETE", &sg_path("g2"), None, None).await;
    let m = &r.body["metadata"];
    put(
        "g2 delete with a finalizer",
        format!(
            "{} deleting={} generation={} grace={} finalizers={}",
            r.brief(),
            m["deletionTimestamp"].is_string(),
            m["generation"],
            m["deletionGracePeriodSeconds"],
            finalizers(&r.body)
        ),
    );
    let r = s.send("DELETE", &sg_path("g2"), None, None).await;
    put("g3 delete again while finalizers remain", r.brief());
    let r = s.send("DELETE", &sg_path("g-missing"), None, None).await;
    put("g4 delete a missing object", r.brief());
    let r = s
        .send(
            "DELETE",
            "/api/v1/namespaces/{ns}/configmaps/cm",
            None,
            None,
        )
        .await;
    put(
        "g5 delete a ConfigMap",
        format!(
            "{} details={{name={} group={} kind={}}}",
            r.brief(),
            r.body["details"]["name"],
            r.body["details"]["group"],
            r.body["details"]["kind"]
        ),
    );

    // (h) the DELETED event when the last finalizer goes.
    let rv = r_version(&s.get(&sg_path("g2")).await.body);
    let watcher = {
        let s = s.clone();
        let rv = rv.clone();
        tokio::spawn(async move {
            s.watch(
                &format!(
                    "{GROUP_PATH}/namespaces/{{ns}}/servergroups?watch=true&resourceVersion={rv}&fieldSelector=metadata.name%3Dg2"
                ),
                Duration::from_secs(5),
                |e| e["type"] == "DELETED",
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = s
        .send(
            "PATCH",
            &sg_path("g2"),
            Some(MERGE),
            Some(json!({"metadata": {"finalizers": null}})),
        )
        .await;
    put(
        "h1 patch removing the last finalizer",
        format!(
            "{} finalizers={} deleting={}",
            r.brief(),
            finalizers(&r.body),
            r.body["metadata"]["deletionTimestamp"].is_string()
        ),
    );
    let (code, events) = watcher.await.unwrap();
    put(
        "h2 watch events",
        format!("{code} {}", events_brief(&events)),
    );
    let deleted_rv = events
        .iter()
        .find(|e| e["type"] == "DELETED")
        .map(|e| r_version(&e["object"]))
        .unwrap_or_default();
    put(
        "h3 DELETED carries a newer resourceVersion",
        format!(
            "{}",
            deleted_rv.parse::<u64>().unwrap_or(0) > rv.parse::<u64>().unwrap_or(0)
        ),
    );
    let r = s.get(&sg_path("g2")).await;
    put("h4 get after", r.brief());

    // (i) finalizers under server-side apply: a set, each manager owns its items.
    let apply_fin = |fin: &str| {
        json!({"apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
               "metadata": {"name": "i", "finalizers": [fin]},
               "spec": {"policy": "affinity", "tenant": TENANT}})
    };
    let r = s
        .send(
            "PATCH",
            &format!("{}?fieldManager=one", sg_path("i")),
            Some(APPLY),
            Some(apply_fin("one.example.com/f")),
        )
        .await;
    put(
        "i1 first manager applies",
        format!("{} {}", r.brief(), finalizers(&r.body)),
    );
    let r = s
        .send(
            "PATCH",
            &format!("{}?fieldManager=two", sg_path("i")),
            Some(APPLY),
            Some(apply_fin("two.example.com/f")),
        )
        .await;
    put(
        "i2 second manager applies another finalizer",
        format!("{} {}", r.brief(), finalizers(&r.body)),
    );
    let r = s
        .send(
            "PATCH",
            &format!("{}?fieldManager=one", sg_path("i")),
            Some(APPLY),
            Some(json!({"apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
                        "metadata": {"name": "i"}, "spec": {"policy": "affinity", "tenant": TENANT}})),
        )
        .await;
    put(
        "i3 first manager drops its finalizer",
        format!("{} {}", r.brief(), finalizers(&r.body)),
    );

    // (j) the status subresource and the main resource each ignore the other's part.
    s.create_sg("j", json!({})).await;
    let r = s
        .send(
            "PATCH",
            &format!("{}/status", sg_path("j")),
            Some(MERGE),
            Some(
                json!({"spec": {"policy": "anti-affinity"}, "status": {"state": "OK"},
                        "metadata": {"labels": {"from": "status"}}}),
            ),
        )
        .await;
    put(
        "j1 status write with spec",
        format!(
            "{} policy={} state={} generation={} labels={}",
            r.brief(),
            r.body["spec"]["policy"],
            r.body["status"]["state"],
            r.body["metadata"]["generation"],
            r.body["metadata"]["labels"]
        ),
    );
    let r = s
        .send(
            "PATCH",
            &sg_path("j"),
            Some(MERGE),
            Some(json!({"status": {"state": "ERRED"}, "metadata": {"labels": {"x": "y"}}})),
        )
        .await;
    put(
        "j2 main write with status",
        format!(
            "{} state={} generation={} labels={}",
            r.brief(),
            r.body["status"]["state"],
            r.body["metadata"]["generation"],
            r.body["metadata"]["labels"]
        ),
    );
    let mut obj = r.body.clone();
    obj["spec"]["resyncPeriod"] = json!("5m");
    obj["status"]["state"] = json!("ERRED");
    let r = s
        .send("PUT", &sg_path("j"), Some("application/json"), Some(obj))
        .await;
    put(
        "j3 PUT main with spec and status",
        format!(
            "{} resync={} state={} generation={}",
            r.brief(),
            r.body["spec"]["resyncPeriod"],
            r.body["status"]["state"],
            r.body["metadata"]["generation"]
        ),
    );
    let r = s
        .send(
            "POST",
            &format!("{GROUP_PATH}/namespaces/{{ns}}/servergroups"),
            Some("application/json"),
            Some(json!({"apiVersion": "openstack.waldur.com/v1alpha1", "kind": "ServerGroup",
                        "metadata": {"name": "j2"}, "spec": {"policy": "affinity", "tenant": TENANT},
                        "status": {"state": "OK"}})),
        )
        .await;
    put(
        "j4 create with status",
        format!("{} status={}", r.brief(), r.body["status"]),
    );

    // Immutable metadata on update.
    let mut obj = s.get(&sg_path("j")).await.body;
    let uid = obj["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    obj["metadata"]["uid"] = json!("00000000-0000-4000-8000-000000000000");
    let r = s
        .send("PUT", &sg_path("j"), Some("application/json"), Some(obj))
        .await;
    put(
        "n1 PUT with another uid",
        format!(
            "{} {}",
            r.brief(),
            r.message().replace(&uid, "UID").replace(&s.ns, "NS")
        ),
    );
    for (case, meta) in [
        (
            "n2 merge patch changing uid",
            json!({"uid": "00000000-0000-4000-8000-000000000000"}),
        ),
        (
            "n3 merge patch changing creationTimestamp",
            json!({"creationTimestamp": "2020-01-01T00:00:00Z"}),
        ),
        (
            "n4 merge patch lowering generation",
            json!({"generation": 1, "labels": {"n4": "x"}}),
        ),
        (
            "n5 merge patch setting deletionTimestamp",
            json!({"deletionTimestamp": "2020-01-01T00:00:00Z"}),
        ),
    ] {
        let r = s
            .send(
                "PATCH",
                &sg_path("j"),
                Some(MERGE),
                Some(json!({"metadata": meta})),
            )
            .await;
        put(
            case,
            format!(
                "{} {} {} created={} generation={} deleting={}",
                r.brief(),
                r.causes(),
                r.message(),
                r.body["metadata"]["creationTimestamp"] == "2020-01-01T00:00:00Z",
                r.body["metadata"]["generation"],
                r.body["metadata"]["deletionTimestamp"].is_string()
            ),
        );
    }

    // (k) label and field selectors on list.
    for (name, labels) in [
        ("k1", json!({"app": "a"})),
        ("k2", json!({"app": "b"})),
        ("k3", json!({"other": "c"})),
    ] {
        s.create_sg(name, json!({"labels": labels})).await;
    }
    let list = format!("{GROUP_PATH}/namespaces/{{ns}}/servergroups");
    for (case, query) in [
        ("k1 labelSelector app=a", "labelSelector=app%3Da"),
        ("k2 labelSelector app!=a", "labelSelector=app!%3Da"),
        ("k3 labelSelector app", "labelSelector=app"),
        ("k4 labelSelector !app", "labelSelector=!app"),
        (
            "k5 labelSelector app in (a,b)",
            "labelSelector=app%20in%20(a%2Cb)",
        ),
        (
            "k6 fieldSelector metadata.name=k2",
            "fieldSelector=metadata.name%3Dk2",
        ),
        (
            "k7 fieldSelector metadata.name!=k2",
            "fieldSelector=metadata.name!%3Dk2",
        ),
        (
            "k8 fieldSelector metadata.namespace",
            "fieldSelector=metadata.namespace%3D{ns}",
        ),
        (
            "k9 fieldSelector spec.policy (unsupported)",
            "fieldSelector=spec.policy%3Daffinity",
        ),
        (
            "k10 both selectors",
            "labelSelector=app&fieldSelector=metadata.name%3Dk1",
        ),
    ] {
        let r = s.get(&format!("{list}?{query}")).await;
        let found = if r.code == 200 {
            names(&r.body)
        } else {
            r.message()
        };
        put(case, format!("{} {found}", r.brief()));
    }

    // (l) a watch from a resourceVersion that is too old.
    let (code, events) = s
        .watch(
            &format!("{list}?watch=true&resourceVersion=1"),
            Duration::from_secs(5),
            |e| e["type"] == "ERROR",
        )
        .await;
    put(
        "l1 watch from resourceVersion 1",
        format!("{code} {}", events_brief(&events)),
    );

    // (m) streaming lists (WatchList), served by 1.37.
    let watch_list = |q: &str| format!("{list}?watch=true&labelSelector=app&{q}");
    for (case, query) in [
        (
            "m1 sendInitialEvents, NotOlderThan, bookmarks",
            "sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&resourceVersion=0",
        ),
        (
            "m2 sendInitialEvents, NotOlderThan, bookmarks, no resourceVersion",
            "sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
        ),
        (
            "m3 sendInitialEvents without resourceVersionMatch",
            "sendInitialEvents=true&allowWatchBookmarks=true",
        ),
        (
            "m4 sendInitialEvents without bookmarks",
            "sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
        ),
        (
            "m5 resourceVersionMatch without sendInitialEvents",
            "resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
        ),
        (
            "m6 sendInitialEvents=false, rv 0",
            "sendInitialEvents=false&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&resourceVersion=0",
        ),
        ("m7 plain watch, rv 0", "resourceVersion=0"),
        (
            "m9 sendInitialEvents=false, no resourceVersion",
            "sendInitialEvents=false&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
        ),
        (
            "m8 resourceVersionMatch=Exact",
            "sendInitialEvents=true&resourceVersionMatch=Exact&allowWatchBookmarks=true",
        ),
    ] {
        let (code, events) = s
            .watch(&watch_list(query), Duration::from_secs(3), |e| {
                e["type"] == "BOOKMARK"
                    && e["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"] == "true"
            })
            .await;
        let summary = if code == 200 {
            events_brief(&events)
        } else {
            let st = &events[0];
            format!(
                "{} {} | {}",
                st["reason"].as_str().unwrap_or("-"),
                Resp {
                    code,
                    body: st.clone()
                }
                .causes(),
                st["message"].as_str().unwrap_or("-")
            )
        };
        put(case, format!("{code} {summary}"));
    }
    out
}

fn r_version(obj: &Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// One round in fresh namespaces of both servers: the cases that differ, `(case, text)`.
async fn one_round() -> Vec<(String, String)> {
    let ns = format!("diff-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let real = real_side(&ns).await;
    let stand_in = stand_in_side(&ns).await;
    create_namespace(&real).await;
    create_namespace(&stand_in).await;
    let real_out = run_cases(&real).await;
    let stand_in_out = run_cases(&stand_in).await;
    clean_up(&real).await;
    clean_up(&stand_in).await;

    let mut mismatches = Vec::new();
    for ((case, r), (case2, t)) in real_out.iter().zip(&stand_in_out) {
        assert_eq!(case, case2);
        println!("{case}: real={r} stand-in={t}");
        if r != t {
            match ALLOWED.iter().find(|(c, _)| c == case) {
                Some((_, why)) => println!("  (allowed: {why})"),
                None => mismatches.push((
                    case.clone(),
                    format!("{case}:\n    real:     {r}\n    stand-in: {t}"),
                )),
            }
        }
    }
    mismatches
}

/// A difference must show in two rounds to count: the real server's watch cache and its
/// timing under a loaded CI machine can make one round's watch case differ once. The first
/// round's differences are always printed (to stderr, past the capture), so a flaky case is
/// seen, not hidden.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_server_answers_as_kube_apiserver_does() {
    let first = one_round().await;
    if first.is_empty() {
        return;
    }
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "differential: {} difference(s) in the first round, running a second:\n{}",
        first.len(),
        first
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let second = one_round().await;
    let both: Vec<&str> = second
        .iter()
        .filter(|(case, _)| first.iter().any(|(c, _)| c == case))
        .map(|(_, text)| text.as_str())
        .collect();
    assert!(
        both.is_empty(),
        "{} difference(s) between kube-apiserver and the test server, in both rounds:\n{}",
        both.len(),
        both.join("\n")
    );
}
