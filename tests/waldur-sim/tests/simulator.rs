//! Drives the simulator over raw HTTP and checks it behaves like the Waldur contract says.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use waldur_sim::{
    DEFAULT_TENANT, DefaultOrder, Delays, SimConfig, Simulator, Vocabulary, WaldurVersion,
};

const STAFF: &str = "staff-token";
const USER: &str = "user-token";
const OTHER_TENANT: &str = "0f0e0d0c0b0a49988776655443322110";

/// `OpenStackServerGroup` from the published 8.0.5 schema: every property, nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ServerGroup {
    url: String,
    uuid: String,
    name: String,
    description: String,
    service_name: String,
    service_settings: String,
    service_settings_uuid: String,
    service_settings_state: String,
    service_settings_error_message: String,
    project: String,
    project_name: String,
    project_uuid: String,
    customer: String,
    customer_uuid: String,
    customer_name: String,
    customer_native_name: String,
    customer_abbreviation: String,
    error_message: String,
    error_traceback: String,
    resource_type: String,
    state: String,
    created: String,
    modified: String,
    backend_id: String,
    access_url: Option<String>,
    tenant: String,
    tenant_name: String,
    tenant_uuid: String,
    policy: String,
    display_name: String,
    instances: Vec<NestedInstance>,
    marketplace_offering_uuid: Option<String>,
    marketplace_offering_name: Option<String>,
    marketplace_offering_plugin_options: Option<serde_json::Map<String, Value>>,
    marketplace_category_uuid: Option<String>,
    marketplace_category_name: Option<String>,
    marketplace_resource_uuid: Option<String>,
    marketplace_plan_uuid: Option<String>,
    marketplace_resource_state: Option<String>,
    is_usage_based: Option<bool>,
    is_limit_based: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NestedInstance {
    backend_id: Option<String>,
    name: String,
    uuid: String,
}

/// `OpenStackServerGroupFieldEnum` from the schema: the names `?field=` accepts.
const FIELD_ENUM: [&str; 41] = [
    "access_url",
    "backend_id",
    "created",
    "customer",
    "customer_abbreviation",
    "customer_name",
    "customer_native_name",
    "customer_uuid",
    "description",
    "display_name",
    "error_message",
    "error_traceback",
    "instances",
    "is_limit_based",
    "is_usage_based",
    "marketplace_category_name",
    "marketplace_category_uuid",
    "marketplace_offering_name",
    "marketplace_offering_plugin_options",
    "marketplace_offering_uuid",
    "marketplace_plan_uuid",
    "marketplace_resource_state",
    "marketplace_resource_uuid",
    "modified",
    "name",
    "policy",
    "project",
    "project_name",
    "project_uuid",
    "resource_type",
    "service_name",
    "service_settings",
    "service_settings_error_message",
    "service_settings_state",
    "service_settings_uuid",
    "state",
    "tenant",
    "tenant_name",
    "tenant_uuid",
    "url",
    "uuid",
];

struct Harness {
    sim: Simulator,
    http: reqwest::Client,
}

impl Harness {
    async fn start(config: SimConfig) -> Harness {
        let sim = Simulator::start(config).await.expect("simulator starts");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        Harness { sim, http }
    }

    async fn fast() -> Harness {
        Self::start(fast_config()).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sim.base_url())
    }

    fn groups_url(&self) -> String {
        self.url("/api/openstack-server-groups/")
    }

    fn group_url(&self, uuid: &str) -> String {
        self.url(&format!("/api/openstack-server-groups/{uuid}/"))
    }

    fn create_url(&self, tenant: &str) -> String {
        self.url(&format!(
            "/api/openstack-tenants/{tenant}/create_server_group/"
        ))
    }

    fn tenant_url(&self, tenant: &str) -> String {
        self.url(&format!("/api/openstack-tenants/{tenant}/"))
    }

    /// `GET` the tenant as `token` sees it; must be 200.
    async fn tenant(&self, tenant: &str, token: &str) -> Value {
        let resp = self.get(&self.tenant_url(tenant), token).await;
        assert_eq!(resp.status(), StatusCode::OK, "tenant {tenant}");
        resp.json().await.expect("json")
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = self.http.request(method, url);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Token {t}"));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("request sent")
    }

    async fn get(&self, url: &str, token: &str) -> reqwest::Response {
        self.send(Method::GET, url, Some(token), None).await
    }

    async fn post(&self, url: &str, token: &str, body: Option<Value>) -> reqwest::Response {
        self.send(Method::POST, url, Some(token), body).await
    }

    async fn delete(&self, uuid: &str, token: &str) -> reqwest::Response {
        self.send(Method::DELETE, &self.group_url(uuid), Some(token), None)
            .await
    }

    /// `GET` the collection with a query string; must be 200.
    async fn list(&self, query: &str) -> Vec<Value> {
        let url = format!("{}?{query}", self.groups_url());
        let resp = self.get(&url, USER).await;
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        resp.json().await.expect("json")
    }

    /// Creates through the tenant action and returns the 201 body.
    async fn create(&self, name: &str, policy: &str) -> Value {
        let resp = self
            .post(
                &self.create_url(DEFAULT_TENANT),
                USER,
                Some(json!({"name": name, "policy": policy})),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::CREATED, "create {name}");
        resp.json().await.expect("json")
    }

    /// Creates and waits for OK; returns (uuid, backend_id).
    async fn create_ok(&self, name: &str) -> (String, String) {
        let body = self.create(name, "anti-affinity").await;
        let uuid = body["uuid"].as_str().expect("uuid").to_string();
        let row = self.wait_state(&uuid, "OK").await;
        (
            uuid,
            row["backend_id"].as_str().expect("backend_id").to_string(),
        )
    }

    /// Polls the simulator (not the API, so counters stay clean) until the row has the state.
    async fn wait_state(&self, uuid: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let row = self.sim.group(uuid);
            if let Some(r) = &row
                && r["state"] == state
            {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{uuid} never reached {state}: {row:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Polls the simulator (not the API) until the tenant has the state; returns it.
    async fn wait_tenant_state(&self, tenant: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let t = self.sim.tenant(tenant).expect("tenant exists");
            if t["state"] == state {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "tenant {tenant} never reached {state}: {t}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn pull_groups_url(&self, tenant: &str) -> String {
        self.url(&format!(
            "/api/openstack-tenants/{tenant}/pull_server_groups/"
        ))
    }

    async fn wait_gone(&self, uuid: &str) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.sim.group(uuid).is_some() {
            assert!(Instant::now() < deadline, "{uuid} never went away");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Slow enough that a poll cannot miss an intermediate state on a loaded machine.
fn observing_config() -> SimConfig {
    SimConfig {
        delays: Delays {
            schedule: Duration::from_millis(150),
            run: Duration::from_millis(150),
        },
        ..SimConfig::default()
    }
}

fn fast_config() -> SimConfig {
    SimConfig {
        delays: Delays::fast(),
        ..SimConfig::default()
    }
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32
        && s.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

fn dashed(hex: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// `2026-11-27T12:00:00.123456Z`
fn is_drf_datetime(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 27
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[26] == b'Z'
}

#[tokio::test]
async fn create_returns_201_with_the_schema_shape_and_runs_to_ok() {
    let h = Harness::start(observing_config()).await;
    let resp = h
        .post(
            &h.create_url(&dashed(DEFAULT_TENANT)),
            USER,
            Some(json!({"name": "web", "policy": "anti-affinity", "description": "front"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let raw: Value = resp.json().await.expect("json");
    let mut keys: Vec<&str> = raw
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, FIELD_ENUM.to_vec(), "exactly the schema's field set");
    let sg: ServerGroup = serde_json::from_value(raw.clone()).expect("schema shape");
    assert_eq!(sg.state, "CREATION_SCHEDULED");
    assert_eq!(sg.backend_id, "");
    assert!(sg.instances.is_empty());
    assert_eq!(sg.name, "web");
    assert_eq!(sg.description, "front");
    assert_eq!(sg.policy, "anti-affinity");
    assert_eq!(sg.resource_type, "OpenStack.ServerGroup");
    assert_eq!(sg.tenant_uuid, DEFAULT_TENANT);
    assert!(
        sg.tenant
            .ends_with(&format!("/api/openstack-tenants/{DEFAULT_TENANT}/"))
    );
    for id in [
        &sg.uuid,
        &sg.project_uuid,
        &sg.customer_uuid,
        &sg.service_settings_uuid,
    ] {
        assert!(is_hex32(id), "{id} is 32 lowercase hex");
    }
    assert!(is_drf_datetime(&sg.created), "{}", sg.created);
    assert!(is_drf_datetime(&sg.modified), "{}", sg.modified);
    assert_eq!(sg.url, h.group_url(&sg.uuid));

    // The url is usable at once, and dashed UUIDs are accepted in paths.
    let got = h.get(&sg.url, USER).await;
    assert_eq!(got.status(), StatusCode::OK);
    let got = h.get(&h.group_url(&dashed(&sg.uuid)), USER).await;
    assert_eq!(got.status(), StatusCode::OK);
    let body: Value = got.json().await.expect("json");
    assert_eq!(body["uuid"], sg.uuid.as_str());

    // CREATION_SCHEDULED -> CREATING -> OK, with backend_id set only at OK.
    let creating = h.wait_state(&sg.uuid, "CREATING").await;
    assert_eq!(creating["backend_id"], "");
    let ok = h.wait_state(&sg.uuid, "OK").await;
    let backend = ok["backend_id"].as_str().expect("backend id");
    assert_eq!(backend.len(), 36, "Nova id {backend}");
    assert_eq!(h.sim.openstack_groups(DEFAULT_TENANT).len(), 1);
    let fetched: ServerGroup = h
        .get(&sg.url, USER)
        .await
        .json()
        .await
        .expect("schema shape");
    assert_eq!(fetched.state, "OK");
    assert_eq!(fetched.backend_id, backend);
}

#[tokio::test]
async fn collection_post_is_a_500_html_page_and_saves_nothing() {
    let h = Harness::fast().await;
    let resp = h
        .post(
            &h.groups_url(),
            USER,
            Some(json!({"name": "web", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(header(&resp, "content-type").starts_with("text/html"));
    assert!(
        resp.text()
            .await
            .expect("body")
            .contains("Server Error (500)")
    );
    assert!(h.sim.groups().is_empty());
    assert_eq!(h.sim.requests("create_collection"), 1);
    assert_eq!(h.sim.requests("create"), 0);
}

#[tokio::test]
async fn delete_is_202_then_404_and_transitional_states_conflict() {
    let h = Harness::start(observing_config()).await;
    let created = h.create("db", "affinity").await;
    let uuid = created["uuid"].as_str().expect("uuid").to_string();

    // Transitional: delete and pull are 409 with Waldur's message.
    for resp in [
        h.delete(&uuid, USER).await,
        h.post(&format!("{}pull/", h.group_url(&uuid)), USER, None)
            .await,
    ] {
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(
            body,
            json!({"detail": "Valid states for operation: OK, ERRED."})
        );
    }

    h.wait_state(&uuid, "OK").await;
    let resp = h.delete(&uuid, USER).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body, json!({"detail": "Deletion was scheduled."}));
    let row: Value = h
        .get(&h.group_url(&uuid), USER)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(row["state"], "DELETION_SCHEDULED");
    assert_eq!(h.delete(&uuid, USER).await.status(), StatusCode::CONFLICT);
    h.wait_state(&uuid, "DELETING").await;
    h.wait_gone(&uuid).await;
    let resp = h.get(&h.group_url(&uuid), USER).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body, json!({"detail": "Not found."}));
    assert!(
        h.sim.openstack_groups(DEFAULT_TENANT).is_empty(),
        "gone in OpenStack too"
    );
    assert_eq!(h.delete(&uuid, USER).await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pull_rereads_openstack_and_needs_a_backend_id() {
    let h = Harness::start(observing_config()).await;
    let (uuid, backend) = h.create_ok("app").await;
    assert!(
        h.sim
            .openstack_update(&backend, Some("renamed"), Some("soft-affinity"))
    );
    let pull_url = format!("{}pull/", h.group_url(&uuid));
    let resp = h.post(&pull_url, USER, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"detail": "Pull operation was successfully scheduled."})
    );
    assert_eq!(
        h.sim.group(&uuid).expect("row")["state"],
        "UPDATE_SCHEDULED"
    );
    h.wait_state(&uuid, "UPDATING").await;
    let row = h.wait_state(&uuid, "OK").await;
    assert_eq!(row["name"], "renamed");
    assert_eq!(row["policy"], "soft-affinity");

    // Gone in OpenStack: the pull ends ERRED with a message.
    assert!(h.sim.openstack_delete(&backend));
    assert_eq!(
        h.post(&pull_url, USER, None).await.status(),
        StatusCode::ACCEPTED
    );
    let row = h.wait_state(&uuid, "ERRED").await;
    assert_ne!(row["error_message"], "");

    // A failed create has no backend id: pull is a 400 bare list.
    h.sim.fail_next_creates(1);
    let failed = h.create("broken", "affinity").await;
    let failed_uuid = failed["uuid"].as_str().expect("uuid");
    let row = h.wait_state(failed_uuid, "ERRED").await;
    assert_eq!(row["backend_id"], "");
    assert_ne!(row["error_message"], "");
    let resp = h
        .post(&format!("{}pull/", h.group_url(failed_uuid)), USER, None)
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body, json!(["Resource does not have backend ID."]));
}

#[tokio::test]
async fn empty_policy_is_accepted_but_errs_in_openstack() {
    let h = Harness::fast().await;
    let body = h.create("nopolicy", "").await;
    assert_eq!(body["policy"], "");
    let row = h
        .wait_state(body["uuid"].as_str().expect("uuid"), "ERRED")
        .await;
    assert_eq!(row["backend_id"], "");
    assert!(h.sim.openstack_groups(DEFAULT_TENANT).is_empty());
}

#[tokio::test]
async fn failed_openstack_delete_errs_and_a_second_delete_removes_the_row() {
    let h = Harness::fast().await;
    let (uuid, backend) = h.create_ok("sticky").await;
    h.sim.fail_next_deletes(2);
    assert_eq!(h.delete(&uuid, USER).await.status(), StatusCode::ACCEPTED);
    let row = h.wait_state(&uuid, "ERRED").await;
    assert_ne!(row["error_message"], "");
    assert_eq!(h.delete(&uuid, USER).await.status(), StatusCode::ACCEPTED);
    h.wait_gone(&uuid).await;
    // OpenStack still has it, so Waldur's next re-sync brings it back under a new UUID.
    assert_eq!(h.sim.openstack_groups(DEFAULT_TENANT).len(), 1);
    let report = h.sim.resync_report();
    assert_eq!(report.imported.len(), 1);
    assert_ne!(report.imported[0], uuid);
    let back = h.sim.group(&report.imported[0]).expect("imported");
    assert_eq!(back["backend_id"], backend.as_str());
    assert_eq!(back["state"], "OK");
}

#[tokio::test]
async fn pagination_clamps_at_300_with_link_and_count() {
    let h = Harness::fast().await;
    for i in 0..301 {
        h.sim
            .openstack_create(DEFAULT_TENANT, &format!("g{i:03}"), "affinity");
    }
    h.sim.resync_now().await;
    assert_eq!(h.sim.groups().len(), 301);

    // Paging needs a named order (without o= a real server reshuffles the rows between pages).
    let resp = h
        .get(
            &format!("{}?o=created&page_size=1000", h.groups_url()),
            USER,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-result-count"), "301");
    let link = header(&resp, "link").to_string();
    let base = h.groups_url();
    assert!(
        link.contains(&format!(
            "<{base}?o=created&page=2&page_size=1000>; rel=\"next\""
        )),
        "{link}"
    );
    assert!(link.contains(&format!(
        "<{base}?o=created&page=1&page_size=1000>; rel=\"first\""
    )));
    assert!(link.contains(&format!(
        "<{base}?o=created&page=2&page_size=1000>; rel=\"last\""
    )));
    assert!(!link.contains("rel=\"prev\""));
    let page: Vec<Value> = resp.json().await.expect("json");
    assert_eq!(page.len(), 300, "page_size clamped to 300");

    let resp = h
        .get(
            &format!("{}?o=created&page_size=300&page=2", h.groups_url()),
            USER,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let link = header(&resp, "link").to_string();
    assert!(
        link.contains("rel=\"prev\"") && !link.contains("rel=\"next\""),
        "{link}"
    );
    let page: Vec<Value> = resp.json().await.expect("json");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["name"], "g300", "o=created is oldest first");

    let resp = h
        .get(&format!("{}?page_size=300&page=3", h.groups_url()), USER)
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body, json!({"detail": "Invalid page."}));

    // Default page size is 10; other query parameters are kept in the links.
    let resp = h
        .get(&format!("{}?name=g1&field=uuid", h.groups_url()), USER)
        .await;
    assert_eq!(header(&resp, "x-result-count"), "100");
    let link = header(&resp, "link").to_string();
    assert!(
        link.contains(&format!("<{base}?field=uuid&name=g1&page=2>; rel=\"next\"")),
        "{link}"
    );
    assert!(link.contains(&format!(
        "<{base}?field=uuid&name=g1&page=10>; rel=\"last\""
    )));
    let page: Vec<Value> = resp.json().await.expect("json");
    assert_eq!(page.len(), 10);

    // HEAD counts with the same filters and sends no body.
    let resp = h
        .send(
            Method::HEAD,
            &format!("{}?name=g29", h.groups_url()),
            Some(USER),
            None,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-result-count"), "10", "g290..g299");
    assert_eq!(h.sim.requests("count"), 1);

    // Page 1 of an empty result is fine.
    let resp = h
        .get(&format!("{}?name=nothing-matches", h.groups_url()), USER)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-result-count"), "0");
    assert!(header(&resp, "link").contains("rel=\"last\""));
    let page: Vec<Value> = resp.json().await.expect("json");
    assert!(page.is_empty());
}

#[tokio::test]
async fn sparse_fields_and_filters() {
    let h = Harness::fast().await;
    h.sim.add_tenant(OTHER_TENANT);
    let (a, a_backend) = h.create_ok("Alpha-web").await;
    let b = h.create("beta-db", "affinity").await["uuid"]
        .as_str()
        .expect("uuid")
        .to_string();
    let resp = h
        .post(
            &h.create_url(OTHER_TENANT),
            USER,
            Some(json!({"name": "gamma", "policy": "affinity", "description": "Big Pool"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let c: Value = resp.json().await.expect("json");

    let names = |rows: &[Value]| {
        rows.iter()
            .map(|r| r["name"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };

    let rows = h
        .list("field=uuid&field=state&field=backend_id&field=bogus")
        .await;
    assert_eq!(rows.len(), 3);
    let mut keys: Vec<&String> = rows[0].as_object().expect("object").keys().collect();
    keys.sort();
    assert_eq!(keys, ["backend_id", "state", "uuid"]);
    let one: Value = h
        .get(&format!("{}?field=name", h.group_url(&a)), USER)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(one, json!({"name": "Alpha-web"}));

    assert_eq!(names(&h.list("name=ALPHA").await), ["Alpha-web"]);
    assert!(h.list("name_exact=alpha-web").await.is_empty());
    assert_eq!(names(&h.list("name_exact=beta-db").await), ["beta-db"]);
    assert_eq!(
        names(
            &h.list(&format!("tenant_uuid={}", dashed(OTHER_TENANT)))
                .await
        ),
        ["gamma"]
    );
    let tenant_url = c["tenant"].as_str().expect("tenant url");
    assert_eq!(
        names(&h.list(&format!("tenant={tenant_url}")).await),
        ["gamma"]
    );
    assert_eq!(
        names(
            &h.list(&format!(
                "project_uuid={}",
                c["project_uuid"].as_str().expect("p")
            ))
            .await
        ),
        ["gamma"]
    );
    assert_eq!(
        names(
            &h.list(&format!(
                "customer_uuid={}",
                c["customer_uuid"].as_str().expect("c")
            ))
            .await
        ),
        ["gamma"]
    );
    assert_eq!(
        names(&h.list(&format!("backend_id={a_backend}")).await),
        ["Alpha-web"]
    );
    assert_eq!(
        names(&h.list(&format!("uuid={}", dashed(&b))).await),
        ["beta-db"]
    );
    assert_eq!(names(&h.list("description=pool").await), ["gamma"]);
    assert_eq!(names(&h.list("state=OK").await), ["Alpha-web"]);
    assert_eq!(h.list("state=OK&state=CREATION_SCHEDULED").await.len(), 3);
    assert_eq!(
        names(&h.list("o=-name").await),
        ["gamma", "beta-db", "Alpha-web"]
    );
    assert_eq!(
        names(&h.list("o=name").await),
        ["Alpha-web", "beta-db", "gamma"]
    );
    assert_eq!(
        names(&h.list("o=-created").await),
        ["gamma", "beta-db", "Alpha-web"]
    );

    let resp = h
        .get(&format!("{}?tenant_uuid=nope", h.groups_url()), USER)
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body, json!({"tenant_uuid": ["Enter a valid UUID."]}));
    let resp = h
        .get(&format!("{}?state=Erred", h.groups_url()), USER)
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"state": ["Select a valid choice. Erred is not one of the available choices."]})
    );
}

#[tokio::test]
async fn legacy_vocabulary_is_spoken_and_filtered_strictly() {
    let h = Harness::start(SimConfig {
        vocabulary: Vocabulary::Legacy,
        ..fast_config()
    })
    .await;
    let body = h.create("old", "affinity").await;
    assert_eq!(body["state"], "Creation Scheduled");
    let uuid = body["uuid"].as_str().expect("uuid").to_string();
    h.wait_state(&uuid, "OK").await;
    assert!(h.sim.force_state(&uuid, "ERRED"));
    let row: Value = h
        .get(&h.group_url(&uuid), USER)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(row["state"], "Erred");
    let resp = h
        .get(&format!("{}?state=Erred", h.groups_url()), USER)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-result-count"), "1");
    let resp = h
        .get(&format!("{}?state=ERRED", h.groups_url()), USER)
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(h.sim.force_state(&uuid, "Deletion Scheduled"));
    assert_eq!(
        h.sim.group(&uuid).expect("row")["state"],
        "Deletion Scheduled"
    );
}

#[tokio::test]
async fn create_validation_matches_drf() {
    let h = Harness::start(SimConfig {
        affinity_only: true,
        ..fast_config()
    })
    .await;
    let url = h.create_url(DEFAULT_TENANT);
    let cases = [
        (
            json!({"policy": "affinity"}),
            json!({"name": ["This field is required."]}),
        ),
        (
            json!({"name": "  ", "policy": "affinity"}),
            json!({"name": ["This field may not be blank."]}),
        ),
        (
            json!({"name": "n".repeat(151), "policy": "affinity"}),
            json!({"name": ["Ensure this field has no more than 150 characters."]}),
        ),
        (
            json!({"name": "x", "policy": "affinity", "description": "d".repeat(4097)}),
            json!({"description": ["Ensure this field has no more than 4096 characters."]}),
        ),
        (
            json!({"name": "x", "policy": "anti-affinity"}),
            json!({"policy": ["\"anti-affinity\" is not a valid choice."]}),
        ),
        (
            json!({"name": "x", "policy": "sideways"}),
            json!({"policy": ["\"sideways\" is not a valid choice."]}),
        ),
    ];
    for (req, expected) in cases {
        let resp = h.post(&url, USER, Some(req.clone())).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{req}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body, expected, "{req}");
    }

    // Exactly 150 characters is fine; then the same name again is not.
    let long = "n".repeat(150);
    assert_eq!(
        h.post(
            &url,
            USER,
            Some(json!({"name": long, "policy": "affinity"}))
        )
        .await
        .status(),
        StatusCode::CREATED
    );
    let resp = h
        .post(
            &url,
            USER,
            Some(json!({"name": long, "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"non_field_errors": ["Server group name should be unique."]})
    );

    let resp = h
        .http
        .post(&url)
        .header("Authorization", format!("Token {USER}"))
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("JSON parse error - ")),
        "{body}"
    );

    // Unknown tenant: 404. Tenant not OK: 409.
    let resp = h
        .post(
            &h.create_url(OTHER_TENANT),
            USER,
            Some(json!({"name": "x", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    h.sim.set_tenant_ok(DEFAULT_TENANT, false);
    let resp = h
        .post(&url, USER, Some(json!({"name": "y", "policy": "affinity"})))
        .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let body: Value = resp.json().await.expect("json");
    assert!(body["detail"].is_string());
    h.sim.set_tenant_ok(DEFAULT_TENANT, true);
    let resp = h
        .post(&url, USER, Some(json!({"name": "y", "policy": "affinity"})))
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn auth_staff_actions_and_visibility() {
    let h = Harness::start(SimConfig {
        tenants: vec![DEFAULT_TENANT.into(), OTHER_TENANT.into()],
        user_tenants: vec![DEFAULT_TENANT.into()],
        ..fast_config()
    })
    .await;

    let resp = h.send(Method::GET, &h.groups_url(), None, None).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&resp, "www-authenticate"), "Token");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"detail": "Authentication credentials were not provided."})
    );
    let resp = h.get(&h.groups_url(), "wrong").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body, json!({"detail": "Invalid token."}));
    let resp = h
        .http
        .get(h.groups_url())
        .header("Authorization", format!("Bearer {USER}"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);

    // The user cannot see or create in the other tenant; staff can.
    let resp = h
        .post(
            &h.create_url(OTHER_TENANT),
            USER,
            Some(json!({"name": "hidden", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = h
        .post(
            &h.create_url(OTHER_TENANT),
            STAFF,
            Some(json!({"name": "hidden", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let hidden: Value = resp.json().await.expect("json");
    let hidden_uuid = hidden["uuid"].as_str().expect("uuid").to_string();
    assert_eq!(
        h.get(&h.group_url(&hidden_uuid), USER).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.get(&h.group_url(&hidden_uuid), STAFF).await.status(),
        StatusCode::OK
    );
    let resp = h.get(&h.groups_url(), USER).await;
    assert_eq!(header(&resp, "x-result-count"), "0");
    let resp = h.get(&h.groups_url(), STAFF).await;
    assert_eq!(header(&resp, "x-result-count"), "1");
    h.wait_state(&hidden_uuid, "OK").await;
    assert_eq!(
        h.delete(&hidden_uuid, USER).await.status(),
        StatusCode::NOT_FOUND
    );

    let (uuid, backend) = h.create_ok("mine").await;
    for action in ["unlink", "set_ok", "set_erred"] {
        let resp = h
            .post(&format!("{}{action}/", h.group_url(&uuid)), USER, None)
            .await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{action}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(
            body,
            json!({"detail": "You do not have permission to perform this action."})
        );
    }

    // set_erred / set_ok work from any state, synchronously.
    assert!(h.sim.force_state(&uuid, "DELETING"));
    let resp = h
        .post(
            &format!("{}set_erred/", h.group_url(&uuid)),
            STAFF,
            Some(json!({"error_message": "stuck", "error_traceback": "tb"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.json::<Value>().await.expect("json")["detail"].is_string());
    let row = h.sim.group(&uuid).expect("row");
    assert_eq!(
        (row["state"].as_str(), row["error_message"].as_str()),
        (Some("ERRED"), Some("stuck"))
    );
    let resp = h
        .post(&format!("{}set_ok/", h.group_url(&uuid)), STAFF, None)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let row = h.sim.group(&uuid).expect("row");
    assert_eq!(
        (row["state"].as_str(), row["error_message"].as_str()),
        (Some("OK"), Some(""))
    );

    // Unlink: the row goes at once, OpenStack keeps the group, re-sync re-imports it anew.
    let resp = h
        .post(&format!("{}unlink/", h.group_url(&uuid)), STAFF, None)
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.bytes().await.expect("body").is_empty());
    assert_eq!(
        h.get(&h.group_url(&uuid), STAFF).await.status(),
        StatusCode::NOT_FOUND
    );
    h.sim.resync_now().await;
    let rows: Vec<Value> = h
        .get(&format!("{}?backend_id={backend}", h.groups_url()), USER)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(rows.len(), 1);
    assert_ne!(rows[0]["uuid"], uuid.as_str());
    assert_eq!(rows[0]["state"], "OK");
    assert_eq!(rows[0]["name"], "mine");

    // Updates are refused.
    for method in [Method::PATCH, Method::PUT] {
        let resp = h
            .send(
                method.clone(),
                &h.group_url(&hidden_uuid),
                Some(STAFF),
                Some(json!({"name": "x"})),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(
            body,
            json!({"detail": format!("Method \"{method}\" not allowed.")})
        );
    }
    assert_eq!(h.sim.requests("update"), 2);
}

#[tokio::test]
async fn set_ok_and_set_erred_are_missing_before_8_0_0() {
    let h = Harness::start(SimConfig {
        pre_8_0_0: true,
        ..fast_config()
    })
    .await;
    let (uuid, _) = h.create_ok("old").await;
    for action in ["set_ok", "set_erred"] {
        let resp = h
            .post(&format!("{}{action}/", h.group_url(&uuid)), STAFF, None)
            .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{action}");
        // No such route: Django's HTML page, not Waldur's "no such object" JSON.
        assert!(header(&resp, "content-type").starts_with("text/html"));
        assert!(resp.text().await.expect("text").contains("Not Found"));
    }
    assert_eq!(h.sim.group(&uuid).expect("row")["state"], "OK");
}

#[tokio::test]
async fn unknown_paths_are_html_404s_and_missing_slashes_redirect() {
    let h = Harness::fast().await;
    // No URL pattern: Django's HTML page, even without a token.
    for path in [
        "/api/nothing-here/",
        "/api/nothing-here",
        "/api/openstack-server-groups/6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e/explode/",
        "/elsewhere",
        "/__sim/nothing-here",
    ] {
        for token in [Some(USER), None] {
            let resp = h.send(Method::GET, &h.url(path), token, None).await;
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
            assert!(
                header(&resp, "content-type").starts_with("text/html"),
                "{path}"
            );
            let body = resp.text().await.expect("text");
            assert!(body.contains("<h1>Not Found</h1>"), "{path}: {body}");
        }
    }
    // No such object: Waldur's JSON.
    for uuid in ["not-a-uuid", "0123456789abcdef0123456789abcdef"] {
        let resp = h.get(&h.group_url(uuid), USER).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body, json!({"detail": "Not found."}));
    }
    // A path that matches once its slash is appended: 301 there, query kept (APPEND_SLASH).
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    for (path, location) in [
        (
            "/api/openstack-server-groups?o=name",
            "/api/openstack-server-groups/?o=name",
        ),
        (
            "/api/openstack-server-groups/6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e",
            "/api/openstack-server-groups/6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e/",
        ),
    ] {
        let resp = no_follow.get(h.url(path)).send().await.expect("sent");
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY, "{path}");
        assert_eq!(header(&resp, "location"), location);
    }
    // A client that follows redirects ends up on the real route.
    let rows: Vec<Value> = h
        .get(&h.url("/api/openstack-server-groups"), USER)
        .await
        .json()
        .await
        .expect("json");
    assert!(rows.is_empty());
}

#[tokio::test]
async fn resync_deletes_reimports_and_recovers() {
    let h = Harness::fast().await;
    let (gone, gone_backend) = h.create_ok("gone").await;
    let (erred, _) = h.create_ok("erred").await;
    let (renamed, renamed_backend) = h.create_ok("renamed").await;
    h.sim.fail_next_creates(1);
    let failed = h.create("failed", "affinity").await["uuid"]
        .as_str()
        .expect("uuid")
        .to_string();
    h.wait_state(&failed, "ERRED").await;
    // Slow workers for this one, so it is still in flight during the re-sync.
    h.sim.set_delays(Delays {
        schedule: Duration::from_millis(300),
        run: Duration::from_millis(20),
    });
    let busy = h.create("busy", "affinity").await["uuid"]
        .as_str()
        .expect("uuid")
        .to_string();

    assert!(h.sim.openstack_delete(&gone_backend));
    assert!(h.sim.force_state(&erred, "ERRED"));
    assert!(
        h.sim
            .openstack_update(&renamed_backend, Some("new-name"), None)
    );
    let foreign = h
        .sim
        .openstack_create(DEFAULT_TENANT, "made-in-horizon", "affinity");
    let report = h.sim.resync_report();

    let mut deleted = report.deleted.clone();
    deleted.sort();
    let mut expected = vec![gone.clone(), failed.clone()];
    expected.sort();
    assert_eq!(deleted, expected, "rows without an OpenStack group go");
    assert_eq!(report.recovered, vec![erred.clone()]);
    assert_eq!(report.imported.len(), 1);
    assert!(h.sim.group(&gone).is_none());
    assert!(h.sim.group(&failed).is_none());
    assert_eq!(h.sim.group(&erred).expect("row")["state"], "OK");
    assert_eq!(h.sim.group(&renamed).expect("row")["name"], "new-name");
    let imported = h.sim.group(&report.imported[0]).expect("imported");
    assert_eq!(imported["backend_id"], foreign.as_str());
    assert_eq!(imported["state"], "OK");
    assert_eq!(imported["name"], "made-in-horizon");
    // A create still in flight is left alone and finishes normally.
    assert!(h.sim.group(&busy).is_some());
    h.wait_state(&busy, "OK").await;
    assert!(
        h.sim.resync_report().imported.is_empty(),
        "nothing imported twice"
    );
}

#[tokio::test]
async fn periodic_resync_runs_by_itself() {
    let h = Harness::start(SimConfig {
        resync_interval: Some(Duration::from_millis(30)),
        ..fast_config()
    })
    .await;
    let backend = h
        .sim
        .openstack_create(DEFAULT_TENANT, "appears", "affinity");
    let deadline = Instant::now() + Duration::from_secs(2);
    while !h
        .sim
        .groups()
        .iter()
        .any(|g| g["backend_id"] == backend.as_str())
    {
        assert!(Instant::now() < deadline, "never imported");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn instances_can_be_attached_out_of_band() {
    let h = Harness::fast().await;
    let (uuid, _) = h.create_ok("vms").await;
    assert!(h.sim.set_instances(
        &uuid,
        vec![
            ("vm1".into(), "nova-1".into()),
            ("vm2".into(), "nova-2".into())
        ]
    ));
    let sg: ServerGroup = h
        .get(&h.group_url(&uuid), USER)
        .await
        .json()
        .await
        .expect("schema");
    assert_eq!(sg.instances.len(), 2);
    assert_eq!(sg.instances[0].name, "vm1");
    assert_eq!(sg.instances[0].backend_id.as_deref(), Some("nova-1"));
    assert!(is_hex32(&sg.instances[0].uuid));
}

#[tokio::test]
async fn injected_5xx_bursts_and_latency() {
    let h = Harness::fast().await;
    h.sim.fail_next_requests(2, 503);
    for _ in 0..2 {
        let resp = h.get(&h.groups_url(), USER).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(header(&resp, "content-type").starts_with("text/html"));
        assert!(resp.text().await.expect("body").contains("503"));
    }
    assert_eq!(h.get(&h.groups_url(), USER).await.status(), StatusCode::OK);

    h.sim.fail_next_requests_for("create", 1, 502);
    assert_eq!(h.get(&h.groups_url(), USER).await.status(), StatusCode::OK);
    let resp = h
        .post(
            &h.create_url(DEFAULT_TENANT),
            USER,
            Some(json!({"name": "a", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert!(h.sim.groups().is_empty(), "a failed request saves nothing");

    h.sim.set_failing(Some(504));
    for _ in 0..3 {
        assert_eq!(
            h.get(&h.groups_url(), USER).await.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }
    // The control plane is never faulted.
    let stats: Value = h
        .http
        .get(h.url("/__sim/stats"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["endpoints"]["list"], 7);
    assert_eq!(stats["endpoints"]["create"], 1);
    h.sim.set_failing(None);
    assert_eq!(h.get(&h.groups_url(), USER).await.status(), StatusCode::OK);

    h.sim.set_latency(Duration::from_millis(150));
    let started = Instant::now();
    assert_eq!(h.get(&h.groups_url(), USER).await.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150));
    h.sim.set_latency(Duration::ZERO);
}

#[tokio::test]
async fn dropped_connections_are_client_errors_not_responses() {
    let h = Harness::fast().await;
    // Warm a pooled keep-alive connection first: the drop must hit it mid-request too.
    assert_eq!(h.get(&h.groups_url(), USER).await.status(), StatusCode::OK);
    h.sim.drop_next_connections(2);
    for _ in 0..2 {
        let err = h
            .http
            .get(h.groups_url())
            .header("Authorization", format!("Token {USER}"))
            .send()
            .await
            .expect_err("no HTTP response");
        assert!(!err.is_status(), "{err:?}");
    }
    assert_eq!(h.get(&h.groups_url(), USER).await.status(), StatusCode::OK);
    assert_eq!(h.sim.requests("list"), 4);
}

#[tokio::test]
async fn slow_bodies_arrive_late_but_whole() {
    let h = Harness::fast().await;
    h.create("slow", "affinity").await;
    h.sim.set_slow_body(Some(Duration::from_millis(40)));
    let started = Instant::now();
    let resp = h.get(&h.groups_url(), USER).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let headers_at = started.elapsed();
    let rows: Vec<Value> = resp.json().await.expect("whole body");
    assert_eq!(rows.len(), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(160),
        "{:?}",
        started.elapsed()
    );
    assert!(
        headers_at < Duration::from_millis(140),
        "headers come first: {headers_at:?}"
    );

    // A client read timeout shorter than the trickle fails.
    let impatient = reqwest::Client::builder()
        .read_timeout(Duration::from_millis(20))
        .build()
        .expect("client");
    let result = async {
        impatient
            .get(h.groups_url())
            .header("Authorization", format!("Token {USER}"))
            .send()
            .await?
            .bytes()
            .await
    }
    .await;
    assert!(result.is_err());
}

#[tokio::test]
async fn counters_per_endpoint_and_over_http() {
    let h = Harness::fast().await;
    let (uuid, _) = h.create_ok("counted").await;
    h.get(&h.groups_url(), USER).await;
    h.get(&h.group_url(&uuid), USER).await;
    h.post(&format!("{}pull/", h.group_url(&uuid)), USER, None)
        .await;
    h.wait_state(&uuid, "OK").await;
    h.delete(&uuid, USER).await;
    h.send(Method::HEAD, &h.groups_url(), Some(USER), None)
        .await;
    h.get(&h.url("/api/unknown/"), USER).await;
    for (endpoint, n) in [
        ("create", 1),
        ("list", 1),
        ("retrieve", 1),
        ("pull", 1),
        ("delete", 1),
        ("count", 1),
        ("other", 1),
        ("unlink", 0),
    ] {
        assert_eq!(h.sim.requests(endpoint), n, "{endpoint}");
    }
    assert_eq!(h.sim.total_requests(), 7);

    let stats: Value = h
        .http
        .get(h.url("/__sim/stats"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["total"], 7);
    assert_eq!(stats["endpoints"]["create"], 1);
    assert_eq!(stats["endpoints"]["set_ok"], 0);

    let resp = h
        .http
        .post(h.url("/__sim/stats/reset"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(h.sim.total_requests(), 0);
    h.sim.reset_counters();
    assert_eq!(h.sim.requests("create"), 0);
}

#[tokio::test]
async fn control_plane_over_http() {
    let h = Harness::fast().await;
    let (uuid, backend) = h.create_ok("remote").await;
    let post = |path: &str, body: Value| {
        let req = h.http.post(h.url(path)).json(&body);
        async move { req.send().await.expect("sent") }
    };

    let resp = post(
        "/__sim/faults",
        json!({"fail_next": {"count": 1, "status": 500, "endpoint": "retrieve"}, "latency_ms": 0}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(h.get(&h.groups_url(), USER).await.status(), StatusCode::OK);
    assert_eq!(
        h.get(&h.group_url(&uuid), USER).await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let resp = post("/__sim/faults", json!({"failing": 503})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        h.get(&h.groups_url(), USER).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    post("/__sim/faults", json!({"failing": null})).await;
    assert_eq!(h.get(&h.groups_url(), USER).await.status(), StatusCode::OK);
    post("/__sim/faults", json!({"drop_next": 1})).await;
    assert!(
        h.http
            .get(h.groups_url())
            .header("Authorization", format!("Token {USER}"))
            .send()
            .await
            .is_err()
    );
    let resp = post("/__sim/faults", json!({"no_such_fault": 1})).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        post("/__sim/faults/clear", json!({})).await.status(),
        StatusCode::OK
    );

    let resp = post("/__sim/state", json!({"uuid": uuid, "state": "UPDATING"})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(h.delete(&uuid, USER).await.status(), StatusCode::CONFLICT);
    post("/__sim/state", json!({"uuid": uuid, "state": "OK"})).await;

    let resp = post(
        "/__sim/instances",
        json!({"uuid": uuid, "instances": [{"name": "vm", "backend_id": "n1"}]}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        h.sim.group(&uuid).expect("row")["instances"][0]["name"],
        "vm"
    );

    let resp = post("/__sim/openstack/delete", json!({"uuid": uuid})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = post("/__sim/openstack/delete", json!({"backend_id": backend})).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = post(
        "/__sim/openstack/create",
        json!({"tenant_uuid": DEFAULT_TENANT, "name": "horizon", "policy": "affinity"}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let created: Value = resp.json().await.expect("json");
    let report: Value = post("/__sim/resync", json!({}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(report["deleted"], json!([uuid]));
    assert_eq!(report["imported"].as_array().map(Vec::len), Some(1));
    let groups: Vec<Value> = h
        .http
        .get(h.url("/__sim/groups"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["backend_id"], created["backend_id"]);

    let resp = post("/__sim/tenants", json!({"uuid": OTHER_TENANT, "ok": false})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = h
        .post(
            &h.create_url(OTHER_TENANT),
            USER,
            Some(json!({"name": "x", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let help = h
        .http
        .get(h.url("/__sim/"))
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("text");
    assert!(help.contains("/__sim/faults"));
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let h = Harness::fast().await;
    assert_eq!(h.get(&h.groups_url(), USER).await.status(), StatusCode::OK);
    h.sim.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fresh = reqwest::Client::new();
    assert!(fresh.get(h.groups_url()).send().await.is_err());
}

// ----- what a real Waldur (7.0.7) showed, beyond the published contract -----

/// Creates `n` groups straight in OpenStack and imports them, oldest first; returns their UUIDs.
async fn import_many(h: &Harness, tenant: &str, prefix: &str, n: usize) -> Vec<String> {
    let before: std::collections::HashSet<String> = h
        .sim
        .groups()
        .iter()
        .map(|g| g["uuid"].as_str().unwrap_or("").to_string())
        .collect();
    for i in 0..n {
        h.sim
            .openstack_create(tenant, &format!("{prefix}{i:02}"), "affinity");
    }
    h.sim.resync_now().await;
    h.sim
        .groups()
        .iter()
        .map(|g| g["uuid"].as_str().unwrap_or("").to_string())
        .filter(|u| !before.contains(u))
        .collect()
}

fn uuids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["uuid"].as_str().expect("uuid").to_string())
        .collect()
}

#[tokio::test]
async fn without_o_rows_of_a_tenant_reshuffle_so_paging_can_skip_rows() {
    let h = Harness::fast().await;
    h.sim.add_tenant(OTHER_TENANT);
    let mine = import_many(&h, DEFAULT_TENANT, "g", 25).await;
    // "tenant-0f0e0d0c" sorts before "tenant-6b2a0c4e".
    let other = import_many(&h, OTHER_TENANT, "o", 3).await;
    let mut created_order = mine.clone();
    created_order.extend(other.iter().cloned());
    created_order.sort_by_key(|u| {
        h.sim
            .groups()
            .iter()
            .position(|g| g["uuid"] == u.as_str())
            .unwrap_or(usize::MAX)
    });

    // Default order: tenant name only; within a tenant the order changes between requests.
    let first = uuids(&h.list("page_size=300").await);
    assert_eq!(first.len(), 28);
    let mut head = first[..3].to_vec();
    head.sort();
    let mut expected_head = other.clone();
    expected_head.sort();
    assert_eq!(head, expected_head, "the other tenant's rows come first");
    let mut changed = false;
    for _ in 0..5 {
        changed |= uuids(&h.list("page_size=300").await) != first;
    }
    assert!(
        changed,
        "the order within a tenant changes between requests"
    );

    // A client paging without o= can see a row twice and miss another; with o=created never.
    let read_all = |query: &'static str| {
        let h = &h;
        async move {
            let mut seen = Vec::new();
            for page in 1..=3 {
                seen.extend(uuids(
                    &h.list(&format!("{query}page_size=10&page={page}")).await,
                ));
            }
            seen
        }
    };
    let mut missed = 0;
    for _ in 0..10 {
        let seen = read_all("").await;
        assert_eq!(seen.len(), 28);
        let distinct: std::collections::HashSet<&String> = seen.iter().collect();
        if distinct.len() < 28 {
            missed += 1;
        }
    }
    assert!(missed > 0, "paging without o= never skipped a row");
    for _ in 0..10 {
        assert_eq!(read_all("o=created&").await, created_order);
    }
    let mut newest_first = created_order.clone();
    newest_first.reverse();
    assert_eq!(
        uuids(&h.list("o=-created&page_size=300").await),
        newest_first
    );

    // o= takes django-filter's comma-separated list; ties on the first key fall back to creation.
    let by_state_name = h.list("o=state,-name&page_size=300").await;
    assert_eq!(by_state_name[0]["name"], "o02");
    assert_eq!(h.list("o=name&page_size=300").await[0]["name"], "g00");
    for bad in ["uuid", "modified", "-bogus", "name,tenant_name"] {
        let resp = h.get(&format!("{}?o={bad}", h.groups_url()), USER).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
        let body: Value = resp.json().await.expect("json");
        let key = bad.rsplit(',').next().unwrap_or(bad);
        assert_eq!(
            body,
            json!({"o": [format!("Select a valid choice. {key} is not one of the available choices.")]}),
        );
    }

    // The same seed gives the same sequence of orders; "created" restores a stable default.
    let replay = Harness::fast().await;
    let again = Harness::fast().await;
    import_many(&replay, DEFAULT_TENANT, "g", 12).await;
    import_many(&again, DEFAULT_TENANT, "g", 12).await;
    let names = |rows: Vec<Value>| {
        rows.iter()
            .map(|r| r["name"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    for _ in 0..3 {
        assert_eq!(
            names(replay.list("page_size=300").await),
            names(again.list("page_size=300").await)
        );
    }
    replay.sim.set_default_order(DefaultOrder::Created);
    let stable = names(replay.list("page_size=300").await);
    assert_eq!(
        stable,
        (0..12).map(|i| format!("g{i:02}")).collect::<Vec<_>>()
    );
    let resp = replay
        .http
        .post(replay.url("/__sim/order"))
        .json(&json!({"order": "shuffled", "seed": 7}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    let order: Value = replay
        .http
        .get(replay.url("/__sim/order"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(order, json!({"order": "shuffled", "seed": 7}));
}

#[tokio::test]
async fn odd_page_sizes_mean_10_page_0_is_invalid_and_head_sends_link() {
    let h = Harness::fast().await;
    import_many(&h, DEFAULT_TENANT, "g", 15).await;
    for size in ["0", "-1", "abc", ""] {
        let resp = h
            .get(
                &format!("{}?o=created&page_size={size}", h.groups_url()),
                USER,
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK, "page_size={size}");
        let rows: Vec<Value> = resp.json().await.expect("json");
        assert_eq!(rows.len(), 10, "page_size={size}");
    }
    for page in ["0", "-1", "abc", "3"] {
        let resp = h
            .get(&format!("{}?o=created&page={page}", h.groups_url()), USER)
            .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "page={page}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body, json!({"detail": "Invalid page."}));
    }
    let resp = h
        .send(
            Method::HEAD,
            &format!("{}?o=created", h.groups_url()),
            Some(USER),
            None,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-result-count"), "15");
    let base = h.groups_url();
    let link = header(&resp, "link").to_string();
    assert!(
        link.contains(&format!("<{base}?o=created&page=2>; rel=\"next\"")),
        "{link}"
    );
    assert!(link.contains("rel=\"first\"") && link.contains("rel=\"last\""));
    assert!(resp.bytes().await.expect("body").is_empty());
    assert_eq!(h.sim.requests("count"), 1);
}

#[tokio::test]
async fn delete_from_erred_drops_the_row_even_when_openstack_refuses() {
    let h = Harness::start(observing_config()).await;
    let (uuid, backend) = h.create_ok("stuck").await;
    h.sim.openstack_refuse_deletes(true);

    // From OK: the refusal shows as ERRED, the row and the Nova group stay.
    assert_eq!(h.delete(&uuid, USER).await.status(), StatusCode::ACCEPTED);
    h.wait_state(&uuid, "DELETION_SCHEDULED").await;
    h.wait_state(&uuid, "DELETING").await;
    let row = h.wait_state(&uuid, "ERRED").await;
    assert_ne!(row["error_message"], "");
    assert_ne!(row["error_traceback"], "");
    assert_eq!(h.sim.openstack_groups(DEFAULT_TENANT).len(), 1);

    // A pull finds the Nova group: OK again, message cleared, traceback kept.
    let resp = h
        .post(&format!("{}pull/", h.group_url(&uuid)), USER, None)
        .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let row = h.wait_state(&uuid, "OK").await;
    assert_eq!(row["error_message"], "");
    assert_ne!(row["error_traceback"], "", "pull leaves the traceback");

    // Back to ERRED, then one DELETE from ERRED removes the row although OpenStack refuses.
    assert_eq!(h.delete(&uuid, USER).await.status(), StatusCode::ACCEPTED);
    h.wait_state(&uuid, "ERRED").await;
    assert_eq!(h.delete(&uuid, USER).await.status(), StatusCode::ACCEPTED);
    h.wait_gone(&uuid).await;
    assert_eq!(
        h.get(&h.group_url(&uuid), USER).await.status(),
        StatusCode::NOT_FOUND
    );
    let nova = h.sim.openstack_groups(DEFAULT_TENANT);
    assert_eq!(nova.len(), 1, "the Nova group stays");
    assert_eq!(nova[0].0, backend);

    // The re-sync re-imports it under a new UUID.
    let report = h.sim.resync_report();
    assert_eq!(report.imported.len(), 1);
    assert_ne!(report.imported[0], uuid);
    assert_eq!(
        h.sim.group(&report.imported[0]).expect("row")["backend_id"],
        backend.as_str()
    );

    // The same switch over /__sim/faults, cleared by faults/clear.
    let set: Value = h
        .http
        .post(h.url("/__sim/faults"))
        .json(&json!({"refuse_deletes": true}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(set["refuse_deletes"], true);
    let cleared: Value = h
        .http
        .post(h.url("/__sim/faults/clear"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(cleared["refuse_deletes"], false);
}

#[tokio::test]
async fn malformed_json_on_any_post_is_a_400_detail() {
    let h = Harness::fast().await;
    let (uuid, _) = h.create_ok("target").await;
    let group = h.group_url(&uuid);
    for (url, token) in [
        (h.create_url(DEFAULT_TENANT), USER),
        (h.groups_url(), USER),
        (format!("{group}pull/"), USER),
        (format!("{group}unlink/"), STAFF),
        (format!("{group}set_ok/"), STAFF),
        (format!("{group}set_erred/"), STAFF),
    ] {
        let resp = h
            .http
            .post(&url)
            .header("Authorization", format!("Token {token}"))
            .header("Content-Type", "application/json")
            .body("{\"name\": \"x\",")
            .send()
            .await
            .expect("sent");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{url}");
        let body: Value = resp.json().await.expect("json");
        let obj = body.as_object().expect("object");
        assert_eq!(obj.len(), 1, "{body}");
        let detail = body["detail"].as_str().expect("detail");
        assert!(detail.starts_with("JSON parse error - "), "{detail}");
    }
    let row = h.sim.group(&uuid).expect("nothing happened to the row");
    assert_eq!(row["state"], "OK");
    assert_eq!(h.sim.groups().len(), 1);
}

#[tokio::test]
async fn waldur_7_0_mode_has_the_old_labels_limits_and_routes() {
    assert_eq!(WaldurVersion::parse("7.0.7"), Some(WaldurVersion::V7_0));
    assert_eq!(
        WaldurVersion::parse("current"),
        Some(WaldurVersion::Current)
    );
    let h = Harness::start(SimConfig {
        version: WaldurVersion::V7_0,
        ..fast_config()
    })
    .await;
    let url = h.create_url(DEFAULT_TENANT);

    let resp = h
        .post(
            &url,
            USER,
            Some(json!({"name": "a", "policy": "anti-affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"policy": ["\"anti-affinity\" is not a valid choice."]})
    );
    let resp = h
        .post(
            &url,
            USER,
            Some(json!({"name": "a", "policy": "affinity", "description": "d".repeat(2001)})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"description": ["Ensure this field has no more than 2000 characters."]})
    );
    let resp = h
        .post(
            &url,
            USER,
            Some(json!({"name": "a", "policy": "affinity", "description": "d".repeat(2000)})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["state"], "Creation Scheduled");
    let uuid = body["uuid"].as_str().expect("uuid").to_string();
    h.wait_state(&uuid, "OK").await;

    for action in ["set_ok", "set_erred"] {
        let resp = h
            .post(&format!("{}{action}/", h.group_url(&uuid)), STAFF, None)
            .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{action}");
        assert!(header(&resp, "content-type").starts_with("text/html"));
    }
    for method in [Method::PUT, Method::PATCH] {
        let resp = h
            .send(
                method.clone(),
                &h.group_url(&uuid),
                Some(USER),
                Some(json!({"name": "b"})),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR, "{method}");
        assert!(header(&resp, "content-type").starts_with("text/html"));
        assert!(
            resp.text()
                .await
                .expect("text")
                .contains("Server Error (500)")
        );
    }
    assert_eq!(h.sim.requests("update"), 2);
    assert_eq!(h.list("state=OK").await.len(), 1);
    assert_eq!(
        h.get(&format!("{}?state=OK", h.groups_url()), USER)
            .await
            .status(),
        StatusCode::OK
    );

    // The current mode keeps 4096 characters, set_ok, and 405 on PUT/PATCH.
    let now = Harness::fast().await;
    let resp = now
        .post(
            &now.create_url(DEFAULT_TENANT),
            USER,
            Some(json!({"name": "a", "policy": "anti-affinity", "description": "d".repeat(4096)})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = now
        .post(
            &now.create_url(DEFAULT_TENANT),
            USER,
            Some(json!({"name": "b", "policy": "affinity", "description": "d".repeat(4097)})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body,
        json!({"description": ["Ensure this field has no more than 4096 characters."]})
    );
    let (uuid, _) = now.create_ok("c").await;
    let resp = now
        .send(
            Method::PATCH,
            &now.group_url(&uuid),
            Some(USER),
            Some(json!({})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let resp = now
        .post(&format!("{}set_ok/", now.group_url(&uuid)), STAFF, None)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
}

// ----- faults after the commit, outages that refuse connections, out-of-band users -----

#[tokio::test]
async fn a_create_committed_then_dropped_exists_though_no_answer_came() {
    let h = Harness::fast().await;
    h.sim.drop_answers_after_commit(Some("create"), 1);
    // A refused create (bad policy) commits nothing and leaves the fault armed.
    let resp = h
        .post(
            &h.create_url(DEFAULT_TENANT),
            USER,
            Some(json!({"name": "bad", "policy": "sideways"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let err = h
        .http
        .post(h.create_url(DEFAULT_TENANT))
        .header("Authorization", format!("Token {USER}"))
        .json(&json!({"name": "lost", "policy": "affinity"}))
        .send()
        .await
        .expect_err("the connection closes without an answer");
    assert!(!err.is_status(), "{err:?}");
    let rows = h.sim.groups();
    assert_eq!(rows.len(), 1, "the create was committed: {rows:?}");
    assert_eq!(rows[0]["name"], "lost");
    h.wait_state(rows[0]["uuid"].as_str().expect("uuid"), "OK")
        .await;
    // The fault was used up: the next create is answered, and the name is taken now.
    let again = h
        .post(
            &h.create_url(DEFAULT_TENANT),
            USER,
            Some(json!({"name": "lost", "policy": "affinity"})),
        )
        .await;
    assert_eq!(again.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_delayed_answer_comes_after_the_commit() {
    let h = Harness::fast().await;
    h.sim
        .delay_answers_after_commit(Some("create"), 1, Duration::from_millis(400));
    let started = Instant::now();
    let sim = h.sim.clone();
    // While the client waits, the row already exists.
    let seen = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_millis(350);
        while Instant::now() < deadline {
            if !sim.groups().is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    });
    let body = h.create("late", "affinity").await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(seen.await.expect("joined"), "committed before the answer");
    assert_eq!(body["name"], "late");
    // Over HTTP: the control plane arms the same fault, and shows it.
    let resp: Value = h
        .http
        .post(h.url("/__sim/faults"))
        .json(&json!({"after_commit": {"count": 2, "endpoint": "delete"}}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(resp["faults"]["after_commit"][0]["remaining"], 2);
    assert_eq!(resp["faults"]["after_commit"][0]["action"], "drop");
    h.sim.clear_faults();
    assert_eq!(h.get(&h.groups_url(), USER).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn stop_listening_refuses_connections_and_keeps_the_world() {
    let h = Harness::fast().await;
    let (uuid, _) = h.create_ok("kept").await;
    h.sim.stop_listening();
    assert!(!h.sim.is_listening());
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Pooled connections are cut too, and new ones are refused.
    let err = h
        .http
        .get(h.groups_url())
        .header("Authorization", format!("Token {USER}"))
        .send()
        .await
        .expect_err("refused");
    assert!(err.is_connect() || err.is_request(), "{err:?}");
    h.sim.listen_again().await.expect("the same port again");
    assert!(h.sim.is_listening());
    let rows = h.list("").await;
    assert_eq!(uuids(&rows), vec![uuid]);
    // Listening again while listening changes nothing.
    h.sim.listen_again().await.expect("no-op");
}

#[tokio::test]
async fn out_of_band_users_create_delete_and_unlink() {
    let h = Harness::fast().await;
    let uuid = h
        .sim
        .waldur_create(DEFAULT_TENANT, "theirs", "anti-affinity")
        .expect("created");
    assert!(
        h.sim
            .waldur_create(DEFAULT_TENANT, "theirs", "affinity")
            .expect_err("the name is taken")
            .contains("400")
    );
    let row = h.wait_state(&uuid, "OK").await;
    let backend_id = row["backend_id"].as_str().expect("backend_id").to_string();
    assert_eq!(
        h.sim.requests("create"),
        0,
        "out-of-band calls are not counted"
    );

    assert!(h.sim.waldur_unlink(&uuid));
    assert!(h.sim.group(&uuid).is_none());
    assert_eq!(h.sim.openstack_groups(DEFAULT_TENANT).len(), 1);
    let report = h.sim.resync_report();
    assert_eq!(report.imported.len(), 1);
    let reimported = report.imported[0].clone();
    assert_eq!(
        h.sim.group(&reimported).expect("row")["backend_id"],
        backend_id
    );

    h.sim.waldur_delete(&reimported).expect("accepted");
    assert!(
        h.sim
            .waldur_delete(&reimported)
            .expect_err("busy deleting")
            .contains("409")
    );
    h.wait_gone(&reimported).await;
    assert!(h.sim.openstack_groups(DEFAULT_TENANT).is_empty());
    assert!(!h.sim.waldur_unlink(&reimported));
}

/// `GET /api/openstack-tenants/{uuid}/` and the list: the fields a real tenant has, 32-hex UUIDs,
/// DRF datetimes, the server's state vocabulary, visibility, pagination and counters.
#[tokio::test]
async fn tenants_can_be_read_like_a_real_waldur_serves_them() {
    let h = Harness::start(SimConfig {
        tenants: vec![DEFAULT_TENANT.into(), dashed(OTHER_TENANT)],
        user_tenants: vec![DEFAULT_TENANT.into()],
        ..fast_config()
    })
    .await;
    let t = h.tenant(&dashed(DEFAULT_TENANT), USER).await;
    for key in [
        "url",
        "uuid",
        "name",
        "state",
        "error_message",
        "error_traceback",
        "created",
        "modified",
        "backend_id",
        "project_uuid",
        "customer_uuid",
    ] {
        assert!(t.get(key).is_some(), "tenant has {key}: {t}");
    }
    assert_eq!(t["uuid"], DEFAULT_TENANT);
    assert!(
        t["url"]
            .as_str()
            .is_some_and(|u| u.ends_with(&format!("/api/openstack-tenants/{DEFAULT_TENANT}/")))
    );
    assert_eq!(t["state"], "OK");
    assert_eq!(t["error_message"], "");
    assert!(is_hex32(t["project_uuid"].as_str().unwrap_or("")));
    assert!(is_hex32(t["customer_uuid"].as_str().unwrap_or("")));
    assert!(!t["backend_id"].as_str().unwrap_or("").is_empty());
    assert!(is_drf_datetime(t["created"].as_str().unwrap_or("")), "{t}");
    assert!(is_drf_datetime(t["modified"].as_str().unwrap_or("")), "{t}");
    // Server groups point at the same tenant.
    let g = h.create("in-tenant", "affinity").await;
    assert_eq!(g["tenant"], t["url"]);
    assert_eq!(g["project_uuid"], t["project_uuid"]);

    // The user token does not see the other tenant: JSON 404, as for a missing one.
    let resp = h.get(&h.tenant_url(OTHER_TENANT), USER).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"detail": "Not found."})
    );
    let resp = h.get(&h.tenant_url("not-a-uuid"), STAFF).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(h.tenant(OTHER_TENANT, STAFF).await["uuid"], OTHER_TENANT);
    let resp = h
        .send(Method::GET, &h.tenant_url(DEFAULT_TENANT), None, None)
        .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // The list: a bare array with X-Result-Count and Link, ordered by name, filtered by uuid.
    let resp = h.get(&h.url("/api/openstack-tenants/"), STAFF).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-result-count"), "2");
    assert!(header(&resp, "link").contains("rel=\"last\""));
    let all: Vec<Value> = resp.json().await.expect("json");
    assert_eq!(all.len(), 2);
    // "tenant-0f0e0d0c" sorts before "tenant-6b2a0c4e".
    assert_eq!(all[0]["uuid"], OTHER_TENANT);
    let resp = h.get(&h.url("/api/openstack-tenants/"), USER).await;
    assert_eq!(header(&resp, "x-result-count"), "1");
    let url = h.url(&format!(
        "/api/openstack-tenants/?uuid={}&field=uuid&field=state",
        dashed(OTHER_TENANT)
    ));
    let one: Vec<Value> = h.get(&url, STAFF).await.json().await.expect("json");
    assert_eq!(one, vec![json!({"uuid": OTHER_TENANT, "state": "OK"})]);
    let resp = h
        .get(&h.url("/api/openstack-tenants/?page_size=1&page=3"), STAFF)
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = h
        .get(&h.url("/api/openstack-tenants/?uuid=nope"), STAFF)
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    assert_eq!(h.sim.requests("tenant_retrieve"), 5);
    assert_eq!(h.sim.requests("tenant_list"), 5);
    assert_eq!(h.sim.requests("retrieve"), 0);
    assert_eq!(h.sim.stats()["endpoints"]["tenant_list"], 5);

    // An ERRED tenant in both vocabularies.
    h.sim.set_tenant_ok(DEFAULT_TENANT, false);
    let t = h.tenant(DEFAULT_TENANT, USER).await;
    assert_eq!(t["state"], "ERRED");
    assert!(!t["error_message"].as_str().unwrap_or("").is_empty());
    let legacy = Harness::start(SimConfig {
        version: WaldurVersion::V7_0,
        ..fast_config()
    })
    .await;
    legacy.sim.set_tenant_ok(DEFAULT_TENANT, false);
    assert_eq!(legacy.tenant(DEFAULT_TENANT, USER).await["state"], "Erred");
    assert!(
        legacy
            .sim
            .set_tenant_state(DEFAULT_TENANT, "UPDATE_SCHEDULED", "")
    );
    assert_eq!(
        legacy.tenant(DEFAULT_TENANT, USER).await["state"],
        "Update Scheduled"
    );
    assert!(legacy.sim.set_tenant_state(DEFAULT_TENANT, "Updating", ""));
    assert_eq!(
        legacy.tenant(DEFAULT_TENANT, USER).await["state"],
        "Updating"
    );
    assert!(!legacy.sim.set_tenant_state(DEFAULT_TENANT, "DELETING", ""));
    legacy.sim.set_tenant_ok(DEFAULT_TENANT, true);
    let t = legacy.tenant(DEFAULT_TENANT, USER).await;
    assert_eq!(t["state"], "OK");
    assert_eq!(t["error_message"], "");
}

const TENANT_409: &str = "Valid states for operation: OK.";

/// `modified` of a tenant or row as a comparable string (DRF datetimes sort as text).
fn modified(v: &Value) -> String {
    v["modified"].as_str().expect("modified").to_string()
}

/// Measured on 7.0.7: `pull_server_groups` holds the whole tenant. It answers 202 and the
/// tenant is Update Scheduled at once, then Updating, then OK; meanwhile every tenant action is
/// a 409, and the rows have changed by the time the tenant is OK again.
#[tokio::test]
async fn pull_server_groups_holds_the_tenant_until_the_resync_ran() {
    let h = Harness::fast().await;
    let (unlinked, backend) = h.create_ok("unlinked").await;
    assert!(h.sim.waldur_unlink(&unlinked));
    // Long enough that polls every few ms see each phase on a loaded machine.
    h.sim
        .set_tenant_pull_delay(Some(Duration::from_millis(1200)));
    let before = h.tenant(DEFAULT_TENANT, USER).await;
    assert_eq!(before["state"], "OK");

    let resp = h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"status": "Server groups pull has been scheduled."})
    );
    let held = h.tenant(DEFAULT_TENANT, USER).await;
    assert_eq!(held["state"], "UPDATE_SCHEDULED", "held at once");
    assert!(modified(&held) > modified(&before), "the hold is saved");

    // Every tenant action is refused while the tenant is held: no second group is made.
    let resp = h
        .post(
            &h.create_url(DEFAULT_TENANT),
            USER,
            Some(json!({"name": "unlinked", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"detail": TENANT_409})
    );
    let resp = h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"detail": TENANT_409})
    );

    // Watch it through the API: Updating, the row re-imported while still Updating, then OK.
    let reimported = |h: &Harness| {
        h.sim
            .groups()
            .iter()
            .any(|g| g["backend_id"] == backend.as_str())
    };
    let mut seen = vec![held["state"].as_str().unwrap_or("").to_string()];
    let mut last_modified = modified(&held);
    let mut rows_changed_while_held = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = h.tenant(DEFAULT_TENANT, STAFF).await;
        let state = t["state"].as_str().unwrap_or("").to_string();
        if seen.last() != Some(&state) {
            assert!(modified(&t) > last_modified, "each step is saved: {t}");
            last_modified = modified(&t);
            seen.push(state.clone());
        }
        if state == "OK" {
            assert!(reimported(&h), "the rows changed before the tenant was OK");
            break;
        }
        rows_changed_while_held |= reimported(&h);
        assert!(Instant::now() < deadline, "the tenant never came back: {t}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, ["UPDATE_SCHEDULED", "UPDATING", "OK"]);
    assert!(
        rows_changed_while_held,
        "the re-import is visible while the tenant is still Updating"
    );
    let back: Vec<Value> = h.list(&format!("backend_id={backend}")).await;
    assert_eq!(back.len(), 1);
    assert_ne!(back[0]["uuid"], unlinked.as_str(), "a new UUID");

    // OK again: tenant actions work.
    let resp = h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    h.wait_tenant_state(DEFAULT_TENANT, "OK").await;
    let resp = h
        .post(
            &h.create_url(DEFAULT_TENANT),
            USER,
            Some(json!({"name": "after", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(h.sim.requests("pull_server_groups"), 3);
}

/// A pull the worker never picks up holds the tenant until the pulls are released or a delay
/// is set; by default the tenant pull follows the server-group delays.
#[tokio::test]
async fn a_tenant_pull_that_never_runs_holds_the_tenant_until_released() {
    let h = Harness::start(SimConfig {
        version: WaldurVersion::V7_0,
        ..fast_config()
    })
    .await;
    let backend = h
        .sim
        .openstack_create(DEFAULT_TENANT, "horizon", "affinity");
    h.sim.set_tenant_pull_delay(None);
    let resp = h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.tenant(DEFAULT_TENANT, USER).await["state"],
        "Update Scheduled",
        "7.0.x labels; the worker never ran"
    );
    assert!(h.sim.groups().is_empty(), "nothing imported while held");
    let resp = h
        .post(
            &h.create_url(DEFAULT_TENANT),
            USER,
            Some(json!({"name": "x", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"detail": TENANT_409})
    );

    h.sim.release_tenant_pulls();
    h.wait_tenant_state(DEFAULT_TENANT, "OK").await;
    assert_eq!(h.sim.groups().len(), 1);
    assert_eq!(h.sim.groups()[0]["backend_id"], backend.as_str());

    // Still "never": the next pull is held again; setting a delay lets it complete.
    let resp = h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.sim.tenant(DEFAULT_TENANT).expect("tenant")["state"],
        "Update Scheduled"
    );
    h.sim.set_tenant_pull_delay(Some(Duration::from_millis(40)));
    h.wait_tenant_state(DEFAULT_TENANT, "OK").await;

    // The default follows the group delays (20 ms + 20 ms here).
    h.sim.reset_tenant_pull_delay();
    let started = Instant::now();
    let resp = h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    h.wait_tenant_state(DEFAULT_TENANT, "OK").await;
    assert!(started.elapsed() >= Duration::from_millis(40));
}

/// Measured on 7.0.7: a `pull_server_groups` that fails in OpenStack leaves the tenant Erred,
/// and every tenant action answers 409 for every user until staff pull the tenant.
#[tokio::test]
async fn a_failed_tenant_pull_leaves_the_tenant_erred_until_staff_pull_it() {
    let h = Harness::fast().await;
    let (kept, _) = h.create_ok("kept").await;
    let backend = h
        .sim
        .openstack_create(DEFAULT_TENANT, "horizon", "affinity");
    h.sim.fail_next_tenant_pulls(1);
    let resp = h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    h.wait_tenant_state(DEFAULT_TENANT, "ERRED").await;
    let t = h.tenant(DEFAULT_TENANT, USER).await;
    assert_eq!(
        t["error_message"],
        "Nova server group list failed: 500 Internal Server Error (HTTP 500)"
    );
    assert_eq!(h.sim.groups().len(), 1, "no row changed: nothing imported");
    assert!(h.sim.group(&kept).is_some());

    // Every tenant action, for every user, is a 409 now.
    for token in [USER, STAFF] {
        let resp = h
            .post(
                &h.create_url(DEFAULT_TENANT),
                token,
                Some(json!({"name": "blocked", "policy": "affinity"})),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::CONFLICT, "{token}");
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"detail": TENANT_409})
        );
        let resp = h
            .post(&h.pull_groups_url(DEFAULT_TENANT), token, None)
            .await;
        assert_eq!(resp.status(), StatusCode::CONFLICT, "{token}");
    }
    // It stays so: only one pull was to fail, but nothing repairs the tenant by itself.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.tenant(DEFAULT_TENANT, USER).await["state"], "ERRED");

    // The tenant's own pull is staff-only; it holds the tenant too, then sets it OK.
    let pull_url = format!("{}pull/", h.tenant_url(DEFAULT_TENANT));
    let resp = h.post(&pull_url, USER, None).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    h.sim
        .set_tenant_pull_delay(Some(Duration::from_millis(400)));
    let resp = h.post(&pull_url, STAFF, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"detail": "Pull operation was successfully scheduled."})
    );
    let held = h.tenant(DEFAULT_TENANT, STAFF).await;
    assert_eq!(held["state"], "UPDATE_SCHEDULED");
    assert_eq!(
        held["error_message"], "",
        "leaving ERRED clears the message"
    );
    let resp = h.post(&pull_url, STAFF, None).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"detail": "Valid states for operation: OK, ERRED."})
    );
    let resp = h
        .post(
            &h.create_url(DEFAULT_TENANT),
            STAFF,
            Some(json!({"name": "still-held", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let t = h.wait_tenant_state(DEFAULT_TENANT, "OK").await;
    assert_eq!(t["error_message"], "");
    assert!(
        h.sim
            .groups()
            .iter()
            .any(|g| g["backend_id"] == backend.as_str()),
        "the tenant pull re-synced the server groups"
    );
    let resp = h
        .post(
            &h.create_url(DEFAULT_TENANT),
            USER,
            Some(json!({"name": "after", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(h.sim.requests("tenant_pull"), 3);
}

/// Waldur's periodic pull is no executor: it skips held tenants, and it sets an Erred tenant
/// back to OK (`BackgroundPullTask.on_pull_success`) without holding it.
#[tokio::test]
async fn the_periodic_resync_recovers_an_erred_tenant_without_holding_it() {
    let h = Harness::fast().await;
    h.sim.fail_next_tenant_pulls(1);
    let resp = h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let erred = h.wait_tenant_state(DEFAULT_TENANT, "ERRED").await;
    let backend = h
        .sim
        .openstack_create(DEFAULT_TENANT, "horizon", "affinity");
    let report = h.sim.resync_report();
    assert_eq!(report.recovered_tenants, vec![DEFAULT_TENANT.to_string()]);
    assert_eq!(report.imported.len(), 1);
    // At once, with no hold on the way.
    let t = h.tenant(DEFAULT_TENANT, USER).await;
    assert_eq!(t["state"], "OK");
    assert_eq!(t["error_message"], "");
    assert_eq!(
        t["error_traceback"], erred["error_traceback"],
        "on_pull_success clears only the message"
    );
    assert!(modified(&t) > modified(&erred));
    let resp = h
        .post(
            &h.create_url(DEFAULT_TENANT),
            USER,
            Some(json!({"name": "after", "policy": "affinity"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert!(
        h.sim
            .groups()
            .iter()
            .any(|g| g["backend_id"] == backend.as_str())
    );

    // A held tenant is not pulled: its rows wait for its own pull.
    h.sim.set_tenant_pull_delay(None);
    let resp = h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    h.sim.openstack_create(DEFAULT_TENANT, "later", "affinity");
    h.sim.resync_now().await;
    let report = h.sim.resync_report();
    assert!(report.imported.is_empty() && report.recovered_tenants.is_empty());
    assert_eq!(
        h.sim.tenant(DEFAULT_TENANT).expect("tenant")["state"],
        "UPDATE_SCHEDULED"
    );
    h.sim.release_tenant_pulls();
    h.wait_tenant_state(DEFAULT_TENANT, "OK").await;
    assert!(h.sim.groups().iter().any(|g| g["name"] == "later"));
}

/// 8.x has `set_ok`/`set_erred` on tenants (staff); 7.0.x has no such route (HTML 404) and
/// words its 409s in the old labels.
#[tokio::test]
async fn tenant_set_ok_exists_from_8_0_and_7_0_speaks_old_labels() {
    let h = Harness::fast().await;
    h.sim.fail_next_tenant_pulls(1);
    h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    h.wait_tenant_state(DEFAULT_TENANT, "ERRED").await;
    let set_ok = format!("{}set_ok/", h.tenant_url(DEFAULT_TENANT));
    assert_eq!(
        h.post(&set_ok, USER, None).await.status(),
        StatusCode::FORBIDDEN
    );
    let resp = h.post(&set_ok, STAFF, None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let t = h.tenant(DEFAULT_TENANT, USER).await;
    assert_eq!(t["state"], "OK");
    assert_eq!(t["error_message"], "");
    assert_eq!(t["error_traceback"], "");
    let resp = h
        .post(
            &format!("{}set_erred/", h.tenant_url(DEFAULT_TENANT)),
            STAFF,
            Some(json!({"error_message": "broken by hand"})),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let t = h.tenant(DEFAULT_TENANT, USER).await;
    assert_eq!(t["state"], "ERRED");
    assert_eq!(t["error_message"], "broken by hand");
    assert_eq!(h.sim.requests("tenant_set_ok"), 2);
    assert_eq!(h.sim.requests("tenant_set_erred"), 1);

    let old = Harness::start(SimConfig {
        version: WaldurVersion::V7_0,
        ..fast_config()
    })
    .await;
    old.sim.fail_next_tenant_pulls(1);
    old.post(&old.pull_groups_url(DEFAULT_TENANT), USER, None)
        .await;
    old.wait_tenant_state(DEFAULT_TENANT, "Erred").await;
    let resp = old
        .post(
            &format!("{}set_ok/", old.tenant_url(DEFAULT_TENANT)),
            STAFF,
            None,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(header(&resp, "content-type").starts_with("text/html"));
    assert_eq!(old.tenant(DEFAULT_TENANT, USER).await["state"], "Erred");
    // The tenant's pull exists on 7.0.x; while it runs, a second one gets the old labels.
    old.sim.set_tenant_pull_delay(None);
    let pull_url = format!("{}pull/", old.tenant_url(DEFAULT_TENANT));
    assert_eq!(
        old.post(&pull_url, STAFF, None).await.status(),
        StatusCode::ACCEPTED
    );
    let resp = old.post(&pull_url, STAFF, None).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(
        resp.json::<Value>().await.expect("json"),
        json!({"detail": "Valid states for operation: OK, Erred."})
    );
    old.sim.release_tenant_pulls();
    old.wait_tenant_state(DEFAULT_TENANT, "OK").await;
}

/// Microseconds since the epoch of a DRF datetime (`2026-11-27T12:00:00.123456Z`).
fn drf_micros(s: &str) -> i64 {
    assert!(is_drf_datetime(s), "{s}");
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().expect("digits");
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60 + n(17, 19);
    secs * 1_000_000 + n(20, 26)
}

fn now_micros() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    i64::try_from(d.as_micros()).expect("fits")
}

/// A real Waldur's clock can be off the API server's: `created` and `modified` written after
/// `set_clock_offset` are shifted by it, on server groups and tenants alike.
#[tokio::test]
async fn the_clock_offset_shifts_every_timestamp_written_afterwards() {
    let h = Harness::fast().await;
    assert_eq!(
        drf_micros("2026-11-27T12:00:00.123456Z"),
        1_795_780_800_123_456
    );
    let near = |stamp: &Value, offset_secs: i64| {
        let at = drf_micros(stamp.as_str().expect("timestamp"));
        let expected = now_micros() + offset_secs * 1_000_000;
        (at - expected).abs() < 2_000_000
    };
    let plain = h.create("plain", "affinity").await;
    assert!(near(&plain["created"], 0), "{plain}");

    h.sim.set_clock_offset(-3600);
    let behind = h.create("behind", "affinity").await;
    assert!(near(&behind["created"], -3600), "{behind}");
    assert!(near(&behind["modified"], -3600), "{behind}");
    let uuid = behind["uuid"].as_str().expect("uuid").to_string();
    let row = h.wait_state(&uuid, "OK").await;
    assert!(near(&row["modified"], -3600), "worker writes too: {row}");
    // Written before the change: unchanged.
    let before = h
        .get(&h.group_url(plain["uuid"].as_str().expect("uuid")), USER)
        .await;
    let before: Value = before.json().await.expect("json");
    assert_eq!(before["created"], plain["created"]);

    h.sim.set_clock_offset(90);
    h.sim.set_tenant_ok(DEFAULT_TENANT, false);
    let t = h.tenant(DEFAULT_TENANT, USER).await;
    assert!(near(&t["modified"], 90), "{t}");
    assert!(near(&t["created"], 0), "the tenant was created before: {t}");
    h.sim.set_tenant_ok(DEFAULT_TENANT, true);
    let resp = h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let t = h.wait_tenant_state(DEFAULT_TENANT, "OK").await;
    assert!(near(&t["modified"], 90), "{t}");
}

/// The tenant controls over `/__sim/`, for runs of the simulator as a separate process.
#[tokio::test]
async fn tenant_controls_over_http() {
    let h = Harness::fast().await;
    let post = |path: &str, body: Value| {
        let req = h.http.post(h.url(path)).json(&body);
        async move { req.send().await.expect("sent") }
    };
    let get = |path: &str| {
        let req = h.http.get(h.url(path));
        async move {
            let resp = req.send().await.expect("sent");
            assert_eq!(resp.status(), StatusCode::OK);
            resp.json::<Value>().await.expect("json")
        }
    };

    let all = get("/__sim/tenants").await;
    assert_eq!(all[0]["uuid"], DEFAULT_TENANT);
    assert_eq!(all[0]["state"], "OK");
    assert_eq!(all[0]["ok"], true);

    // State get/set.
    let resp = post(
        "/__sim/tenants",
        json!({"uuid": DEFAULT_TENANT, "state": "Erred", "error_message": "by hand"}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let t: Value = resp.json().await.expect("json");
    assert_eq!(
        (t["state"].clone(), t["ok"].clone()),
        (json!("ERRED"), json!(false))
    );
    assert_eq!(
        h.tenant(DEFAULT_TENANT, USER).await["error_message"],
        "by hand"
    );
    let resp = post(
        "/__sim/tenants",
        json!({"uuid": DEFAULT_TENANT, "state": "DELETING"}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = post(
        "/__sim/tenants",
        json!({"uuid": DEFAULT_TENANT, "ok": true}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(h.tenant(DEFAULT_TENANT, USER).await["state"], "OK");

    // Failing tenant pulls, and the periodic re-sync over HTTP repairs the tenant.
    let resp = post("/__sim/faults", json!({"fail_tenant_pulls": 1})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(get("/__sim/faults").await["fail_tenant_pulls"], 1);
    h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    h.wait_tenant_state(DEFAULT_TENANT, "ERRED").await;
    let report: Value = post("/__sim/resync", json!({}))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(report["recovered_tenants"], json!([DEFAULT_TENANT]));
    assert_eq!(h.tenant(DEFAULT_TENANT, USER).await["state"], "OK");
    post("/__sim/faults", json!({"fail_tenant_pulls": 3})).await;
    post("/__sim/faults/clear", json!({})).await;
    assert_eq!(get("/__sim/faults").await["fail_tenant_pulls"], 0);

    // The pull delay: never, release, a number, back to the default; typos are 400s.
    assert_eq!(
        get("/__sim/tenants/pull-delay").await,
        json!({"delay_ms": "default"})
    );
    let resp = post("/__sim/tenants/pull-delay", json!({"delay_ms": null})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        get("/__sim/tenants/pull-delay").await,
        json!({"delay_ms": null})
    );
    h.post(&h.pull_groups_url(DEFAULT_TENANT), USER, None).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.tenant(DEFAULT_TENANT, USER).await["state"],
        "UPDATE_SCHEDULED"
    );
    let resp = post("/__sim/tenants/release", json!({})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    h.wait_tenant_state(DEFAULT_TENANT, "OK").await;
    for bad in [
        json!({}),
        json!({"delay_ms": "soon"}),
        json!({"delay_ms": -1}),
    ] {
        let resp = post("/__sim/tenants/pull-delay", bad.clone()).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    post("/__sim/tenants/pull-delay", json!({"delay_ms": 50})).await;
    assert_eq!(
        get("/__sim/tenants/pull-delay").await,
        json!({"delay_ms": 50})
    );
    post("/__sim/tenants/pull-delay", json!({"delay_ms": "default"})).await;
    assert_eq!(
        get("/__sim/tenants/pull-delay").await,
        json!({"delay_ms": "default"})
    );

    // The clock.
    assert_eq!(get("/__sim/clock").await, json!({"offset_secs": 0}));
    let resp = post("/__sim/clock", json!({"offset_secs": -7200})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(get("/__sim/clock").await, json!({"offset_secs": -7200}));
    let g = h.create("late", "affinity").await;
    let skew = now_micros() - drf_micros(g["created"].as_str().expect("created"));
    assert!((skew - 7_200_000_000).abs() < 2_000_000, "{g}");

    let help = h
        .http
        .get(h.url("/__sim/"))
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("text");
    for route in [
        "/__sim/tenants/pull-delay",
        "/__sim/tenants/release",
        "/__sim/clock",
        "fail_tenant_pulls",
    ] {
        assert!(help.contains(route), "help lists {route}");
    }
}
