//! Waldur 8.x without an 8.x server (issue 20, point 4): PyPI's `waldur-api-client` 8.1.3 is
//! generated from Waldur 8.1.3's OpenAPI schema. `tests/waldur-api-client/extract.py` reads
//! what it says about server groups (operations, fields, states, policies); the operator's
//! client and the simulator's 8.x mode are held to it here. Every difference is listed; each
//! must be explained below, or the test fails.
//!
//! The package is installed by `scripts/install-tools` into `.tools/venv`. Without it the test
//! says loudly that it did not run; with `CI=true` it fails.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use waldur_operator::waldur::{NewServerGroup, Policy, ServerGroup, State};

fn contract() -> Option<Value> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".tools/venv/bin/python");
    let script = root.join("tests/waldur-api-client/extract.py");
    let out = Command::new(&python).arg(&script).output();
    match out {
        Ok(out) if out.status.success() => Some(serde_json::from_slice(&out.stdout).expect("JSON")),
        other => {
            let why = match other {
                Ok(out) => String::from_utf8_lossy(&out.stderr).to_string(),
                Err(e) => e.to_string(),
            };
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "waldur-api-client is not installed in .tools/venv (scripts/install-tools): {why}"
                );
            }
            eprintln!(
                "\n*** api_client_contract: DID NOT RUN: waldur-api-client 8.1.3 is not in .tools/venv \
                 (run scripts/install-tools): {why} ***\n"
            );
            None
        }
    }
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Every request the operator's client sends (src/waldur/client.rs, `Endpoint`): method and
/// path, as the generated client names them.
const OPERATOR_SENDS: &[(&str, &str, &str)] = &[
    ("list", "GET", "/api/openstack-server-groups/"),
    ("count", "HEAD", "/api/openstack-server-groups/"),
    ("retrieve", "GET", "/api/openstack-server-groups/{uuid}/"),
    (
        "create",
        "POST",
        "/api/openstack-tenants/{uuid}/create_server_group/",
    ),
    ("pull", "POST", "/api/openstack-server-groups/{uuid}/pull/"),
    ("delete", "DELETE", "/api/openstack-server-groups/{uuid}/"),
    (
        "unlink",
        "POST",
        "/api/openstack-server-groups/{uuid}/unlink/",
    ),
    (
        "set_erred",
        "POST",
        "/api/openstack-server-groups/{uuid}/set_erred/",
    ),
    (
        "set_ok",
        "POST",
        "/api/openstack-server-groups/{uuid}/set_ok/",
    ),
    (
        "pull_server_groups",
        "POST",
        "/api/openstack-tenants/{uuid}/pull_server_groups/",
    ),
    ("tenant_retrieve", "GET", "/api/openstack-tenants/{uuid}/"),
];

/// Fields of a server group that the 8.1.3 schema lists and the simulator does not render:
/// all are marketplace bookkeeping or derived names, which the operator never reads.
const SIM_LACKS: &[&str] = &[
    "is_limit_based",
    "is_usage_based",
    "marketplace_category_name",
    "marketplace_category_uuid",
    "marketplace_offering_name",
    "marketplace_offering_plugin_options",
    "marketplace_offering_type",
    "marketplace_offering_uuid",
    "marketplace_plan_uuid",
    "marketplace_resource_state",
    "marketplace_resource_uuid",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_and_the_simulator_agree_with_waldur_api_client_8_1_3() {
    let Some(c) = contract() else {
        return;
    };
    let mut problems = vec![];
    eprintln!("waldur-api-client {}", c["version"]);

    // 1. Every request the operator sends is an operation of the schema.
    let ops = c["operations"].as_array().cloned().unwrap_or_default();
    for (name, method, path) in OPERATOR_SENDS {
        let found = ops
            .iter()
            .find(|o| o["method"] == *method && o["path"] == *path);
        match found {
            Some(o) => eprintln!(
                "  {name:<20} {method:<6} {path:<52} schema answers {}",
                o["statuses"]
            ),
            None => problems.push(format!(
                "the operator's {name} ({method} {path}) is no operation of the schema"
            )),
        }
    }

    // 2. Every field the operator reads of a group, and sends in a create, is in the schema.
    let group_fields = strings(&c["group_fields"]);
    let ours = keys(&serde_json::to_value(ServerGroup::default()).unwrap());
    for f in ours.difference(&group_fields) {
        problems.push(format!(
            "the operator reads a group field the schema lacks: {f}"
        ));
    }
    let new = NewServerGroup {
        name: "n".into(),
        policy: Policy::Affinity,
        description: Some("d".into()),
    };
    let sent = keys(&serde_json::to_value(&new).unwrap());
    for f in sent.difference(&strings(&c["request_fields"])) {
        problems.push(format!(
            "the operator sends a create field the schema lacks: {f}"
        ));
    }
    // The index's sparse sweep asks only for fields the schema's `field` enum has.
    let field_enum = strings(&c["field_enum"]);
    for f in waldur_operator::controller::index::SWEEP_FIELDS {
        if !field_enum.contains(*f) {
            problems.push(format!(
                "the sweep asks for field={f}, which the schema's enum lacks"
            ));
        }
    }

    // 3. States and policies: the same sets, each read as what it is.
    let states = strings(&c["core_states"]);
    for s in &states {
        if matches!(State::parse(s), State::Unknown(_)) {
            problems.push(format!("the operator does not know the state {s}"));
        }
    }
    let known: BTreeSet<String> = [
        State::CreationScheduled,
        State::Creating,
        State::UpdateScheduled,
        State::Updating,
        State::DeletionScheduled,
        State::Deleting,
        State::Ok,
        State::Erred,
    ]
    .iter()
    .map(|s| s.as_str().to_string())
    .collect();
    if known != states {
        problems.push(format!(
            "states: the operator's {known:?}, the schema's {states:?}"
        ));
    }
    let policies: BTreeSet<String> = Policy::ALL.iter().map(|p| p.as_str().to_string()).collect();
    if policies != strings(&c["policies"]) {
        problems.push(format!(
            "policies: the operator's {policies:?}, the schema's {}",
            c["policies"]
        ));
    }

    // 4. The simulator's 8.x mode renders what the schema lists (and nothing it does not).
    let tenant = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";
    let sim = waldur_sim::Simulator::start(waldur_sim::SimConfig {
        tenants: vec![tenant.into()],
        delays: waldur_sim::Delays::fast(),
        ..Default::default()
    })
    .await
    .expect("the simulator starts");
    let token = waldur_sim::SimConfig::default().staff_token;
    let http = reqwest::Client::new();
    let made: Value = http
        .post(format!(
            "{}/api/openstack-tenants/{tenant}/create_server_group/",
            sim.base_url().as_str().trim_end_matches('/')
        ))
        .header("Authorization", format!("Token {token}"))
        .json(&json!({"name": "contract", "policy": "anti-affinity"}))
        .send()
        .await
        .expect("the simulator answers")
        .json()
        .await
        .expect("JSON");
    let rendered = keys(&made);
    for f in rendered.difference(&group_fields) {
        problems.push(format!(
            "the simulator renders a field the schema lacks: {f}"
        ));
    }
    for f in group_fields.difference(&rendered) {
        if !SIM_LACKS.contains(&f.as_str()) {
            problems.push(format!("the simulator lacks a field of the schema: {f}"));
        }
    }
    let state = made["state"].as_str().unwrap_or("");
    if !states.contains(state) {
        problems.push(format!(
            "the simulator's first state {state:?} is no CoreStates value"
        ));
    }
    assert!(problems.is_empty(), "differences:\n{}", problems.join("\n"));
}
