//! End to end: the `waldur-operator` binary, as users run it, against a Kubernetes API and
//! the Waldur simulator over HTTP.
//!
//! Each scenario is written once and runs on two backends (see `env.rs`): the Kubernetes API
//! test server (`test_server::*`) and the real control plane built from Go modules
//! (`real::*`, or an existing cluster named by `WALDUR_E2E_KUBECONFIG`). On the real tier the
//! operator runs as the Helm chart's ServiceAccount with the chart's RBAC. Scenarios that
//! need fault injection into the Kubernetes API run on the test server alone.

mod api_client_contract;
mod binary;
mod differential;
mod env;
mod gitops;
mod node;
mod real_only;
mod real_waldur;
mod sharding;
mod waldur_versions;

use std::time::{Duration, Instant};

use kube::ResourceExt;
use serde_json::{Value, json};
use waldur_operator::api::FINALIZER;
use waldur_operator::waldur::{ClientSettings, Token};
use waldur_sim::SimConfig;

use env::{Env, Kind, condition, ready_now, reason};

pub const TENANT: &str = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";

fn spec(policy: &str) -> Value {
    json!({"policy": policy, "tenant": TENANT})
}

fn groups_named(env: &Env, name: &str) -> usize {
    env.sim
        .groups()
        .iter()
        .filter(|g| g["name"] == name)
        .count()
}

/// A staff user unlinks the group in Waldur behind the operator's back: Waldur's record goes,
/// OpenStack keeps the group.
async fn unlink_behind_the_operators_back(env: &Env, uuid: Option<&str>) {
    let staff = waldur_operator::waldur::WaldurClient::new(&ClientSettings::new(
        env.sim.base_url(),
        Token::new(SimConfig::default().staff_token),
    ))
    .unwrap();
    let uuid = waldur_operator::waldur::WaldurUuid::parse(uuid.expect("a bound group")).unwrap();
    staff.unlink(&uuid).await.unwrap();
}

/// Waits until `n` ServerGroups of the namespace are Ready.
async fn wait_all_ready(env: &Env, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let list = env.api().list(&Default::default()).await.unwrap();
        let ready = list.items.iter().filter(|sg| ready_now(Some(sg))).count();
        if ready >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ready} of {n} Ready after {within:?}\n{}",
            env.operator_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the request token `want` is recorded as handled in the field `pick` of status.
fn handled(
    pick: fn(&waldur_operator::api::HandledRequests) -> &Option<String>,
    want: &'static str,
) -> impl Fn(Option<&waldur_operator::api::ServerGroup>) -> bool {
    move |sg| {
        sg.and_then(|sg| sg.status.as_ref())
            .and_then(|s| s.handled_requests.as_ref())
            .and_then(|h| pick(h).as_deref())
            == Some(want)
    }
}

/// The scenarios, each runnable on the test server and on a real cluster.
mod scenarios {
    use super::*;

    pub async fn apply_to_ready_and_stale_generations(env: &Env) {
        env.start_operator().await;
        env.apply("web", spec("anti-affinity")).await.unwrap();
        let sg = env.wait_ready("web").await;
        let status = sg.status.unwrap();
        assert_eq!(status.state.as_deref(), Some("OK"));
        assert_eq!(status.policy.as_deref(), Some("anti-affinity"));
        assert!(!status.backend_id.unwrap_or_default().is_empty());
        assert!(
            sg.metadata
                .finalizers
                .unwrap_or_default()
                .contains(&FINALIZER.to_string())
        );
        let reasons = env.event_reasons("web").await;
        assert!(reasons.contains(&"Created".to_string()), "{reasons:?}");
        assert!(
            !reasons.contains(&"Adopted".to_string()),
            "its own creation is not an adoption: {reasons:?}"
        );
        // A spec change makes the old Ready stale until the operator has seen the new
        // generation: paused, it never does, so Ready must not count.
        env.annotate("web", "openstack.waldur.com/paused", Some("true"))
            .await;
        env.wait("web", Duration::from_secs(10), reason("Synced", "Paused"))
            .await;
        let mut changed = spec("anti-affinity");
        changed["deletionPolicy"] = json!("Orphan");
        let sg = env.apply("web", changed).await.unwrap();
        assert_eq!(sg.metadata.generation, Some(2));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sg = env.get("web").await.unwrap();
        assert!(
            !ready_now(Some(&sg)),
            "Ready of generation 1 must not satisfy generation 2"
        );
        env.annotate("web", "openstack.waldur.com/paused", None)
            .await;
        env.wait_ready("web").await;
    }

    pub async fn invalid_manifests_are_rejected_with_the_schemas_message(env: &Env) {
        let err = env.apply("bad", spec("sideways")).await.unwrap_err();
        assert!(err.to_string().contains("spec.policy"), "{err}");
        let err = env
            .apply("bad", json!({"policy": "affinity"}))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.tenant and spec.policy are required"),
            "{err}"
        );
        env.apply("good", spec("affinity")).await.unwrap();
        let err = env.apply("good", spec("anti-affinity")).await.unwrap_err();
        assert!(
            err.to_string().contains("spec.policy is immutable"),
            "{err}"
        );
        let mut long = spec("affinity");
        long["name"] = json!("x".repeat(151));
        let err = env.apply("long", long).await.unwrap_err();
        assert!(
            err.to_string().contains("spec.name") && err.to_string().contains("150"),
            "{err}"
        );
        let mut eager = spec("affinity");
        eager["resyncPeriod"] = json!("1ms");
        let err = env.apply("eager", eager).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.resyncPeriod must be at least 30s"),
            "{err}"
        );
    }

    pub async fn each_deletion_policy(env: &Env) {
        env.start_operator().await;
        for (name, policy) in [("del", "Delete"), ("orph", "Orphan"), ("unl", "Unlink")] {
            let mut s = spec("affinity");
            s["deletionPolicy"] = json!(policy);
            env.apply(name, s).await.unwrap();
        }
        for name in ["del", "orph", "unl"] {
            env.wait_ready(name).await;
        }
        for name in ["del", "orph", "unl"] {
            env.delete(name).await;
        }
        for name in ["del", "orph", "unl"] {
            env.wait(name, Duration::from_secs(20), |sg| sg.is_none())
                .await;
        }
        assert_eq!(groups_named(env, "del"), 0, "Delete removes the group");
        assert_eq!(groups_named(env, "orph"), 1, "Orphan leaves it");
        assert_eq!(
            groups_named(env, "unl"),
            0,
            "Unlink removes Waldur's record"
        );
        assert_eq!(env.sim.requests("unlink"), 1);
    }

    pub async fn out_of_band_delete_and_reimport(env: &Env) {
        env.start_operator().await;
        env.apply("gone", spec("affinity")).await.unwrap();
        env.apply("moved", spec("affinity")).await.unwrap();
        let gone = env.wait_ready("gone").await.status.unwrap();
        let moved = env.wait_ready("moved").await.status.unwrap();
        env.sim
            .openstack_delete(gone.backend_id.as_deref().unwrap());
        unlink_behind_the_operators_back(env, moved.uuid.as_deref()).await;
        env.sim.resync_now().await;
        let recreated = env
            .wait("gone", Duration::from_secs(20), |sg| {
                ready_now(sg) && sg.unwrap().status.as_ref().unwrap().uuid != gone.uuid
            })
            .await
            .unwrap();
        assert_ne!(recreated.status.unwrap().backend_id, gone.backend_id);
        let rebound = env
            .wait("moved", Duration::from_secs(20), |sg| {
                sg.unwrap().status.as_ref().unwrap().uuid != moved.uuid
            })
            .await
            .unwrap();
        assert_eq!(
            rebound.status.unwrap().backend_id,
            moved.backend_id,
            "rebound by backend id"
        );
        assert_eq!(groups_named(env, "gone") + groups_named(env, "moved"), 2);
    }

    /// Review M2: a staff user unlinks the group in Waldur (OpenStack keeps it) and nobody
    /// re-syncs the tenant. The operator asks Waldur for the re-sync instead of making a
    /// second group at once, and binds the original again under its new UUID.
    pub async fn an_unlinked_group_is_reimported_not_duplicated(env: &Env) {
        env.start_operator().await;
        env.apply("web", spec("affinity")).await.unwrap();
        let before = env.wait_ready("web").await.status.unwrap();
        unlink_behind_the_operators_back(env, before.uuid.as_deref()).await;
        let after = env
            .wait("web", Duration::from_secs(20), |sg| {
                ready_now(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
            })
            .await
            .unwrap()
            .status
            .unwrap();
        assert_eq!(after.backend_id, before.backend_id, "the same Nova group");
        assert!(env.sim.requests("pull_server_groups") >= 1);
        assert_eq!(env.sim.requests("create"), 1, "no second group was made");
        let nova = env.sim.openstack_groups(crate::TENANT);
        assert_eq!(
            nova.iter().filter(|(_, name, _)| name == "web").count(),
            1,
            "{nova:?}"
        );
        assert!(after.reimport.is_none());
    }

    /// Waldur drops every connection for a while (WALDUR_E2E_OUTAGE_SECS, 12 s by default;
    /// README's figure is from 60 s) with 50 Ready resources and 50 new ones. The breaker
    /// holds every request but one probe a second, resources say Synced=False
    /// WaldurUnavailable (a Ready one too: no Synced=True from an old snapshot, review M1),
    /// and once Waldur is back all 100 are Ready within 10 s, each group made once.
    pub async fn waldur_outage_then_recovery(env: &Env) {
        const EACH: usize = 50;
        let outage = Duration::from_secs(
            std::env::var("WALDUR_E2E_OUTAGE_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(12),
        );
        let pid = env.start_operator().await;
        let metrics = env.with_operator(pid, |op| op.metrics);
        for i in 0..EACH {
            env.apply(&format!("steady-{i}"), spec("affinity"))
                .await
                .unwrap();
        }
        wait_all_ready(env, EACH, Duration::from_secs(60)).await;

        env.sim.reset_counters();
        env.sim.drop_next_connections(usize::MAX);
        let down = Instant::now();
        for i in 0..EACH {
            env.apply(&format!("new-{i}"), spec("affinity"))
                .await
                .unwrap();
        }
        env.annotate("steady-0", "example.com/touched", Some("1"))
            .await;
        let unavailable = reason("Synced", "WaldurUnavailable");
        let steady = env
            .wait("steady-0", Duration::from_secs(20), &unavailable)
            .await
            .unwrap();
        assert!(ready_now(Some(&steady)), "the last known Ready stays");
        // The first failures carry the transport's words; once the breaker is open, its own.
        env.wait("new-0", Duration::from_secs(20), |sg| {
            sg.and_then(|sg| condition(sg, "Synced")).is_some_and(|c| {
                c.1 == "WaldurUnavailable" && c.2.contains("probes it once a second")
            })
        })
        .await;
        let (_, text) = env::http_get(&format!("http://127.0.0.1:{metrics}/metrics")).await;
        assert!(
            text.lines()
                .any(|l| l.starts_with("waldur_operator_waldur_unreachable{") && l.ends_with(" 1")),
            "the breaker's state is exported"
        );
        tokio::time::sleep(outage.saturating_sub(down.elapsed())).await;
        let during = env.sim.total_requests();
        env.sim.drop_next_connections(0);
        let back = Instant::now();
        wait_all_ready(env, 2 * EACH, Duration::from_secs(60)).await;
        let recovered = back.elapsed();
        eprintln!(
            "outage of {:.0} s with {} resources: {during} Waldur requests during it; all Ready {:.1} s after Waldur came back",
            outage.as_secs_f64(),
            2 * EACH,
            recovered.as_secs_f64()
        );
        // One probe a second, plus what was in flight when the breaker opened.
        assert!(
            during as f64 <= outage.as_secs_f64() + 20.0,
            "{during} Waldur requests during a {outage:?} outage"
        );
        assert!(
            recovered <= Duration::from_secs(10),
            "all Ready only {recovered:?} after Waldur came back\n{}",
            env.operator_logs()
        );
        for i in 0..EACH {
            assert_eq!(groups_named(env, &format!("new-{i}")), 1);
        }
    }

    pub async fn per_namespace_credentials(env: &Env) {
        env.start_operator().await;
        let mut s = spec("affinity");
        s["credentialsRef"] = json!({"name": "waldur"});
        env.apply("creds", s).await.unwrap();
        let sg = env
            .wait(
                "creds",
                Duration::from_secs(20),
                reason("Synced", "CredentialsNotFound"),
            )
            .await
            .unwrap();
        assert!(condition(&sg, "Synced").unwrap().2.contains("waldur"));
        env.secret("waldur", &SimConfig::default().user_token).await;
        // The Secret's arrival wakes the resource; no restart, no long backoff.
        env.wait("creds", Duration::from_secs(10), ready_now).await;
    }

    /// The admin allows the default credentials elsewhere: a resource here without a
    /// credentialsRef is refused (Stalled, nothing sent to Waldur, no finalizer, so it deletes
    /// at once), and one with a credentialsRef works as always. A mistyped Secret never
    /// blocks deletion either (review M6).
    pub async fn default_credentials_only_where_the_admin_allows(env: &Env) {
        env.start_operator_with(&[("DEFAULT_CREDENTIALS_NAMESPACES", "team-*,other")])
            .await;
        env.apply("web", spec("affinity")).await.unwrap();
        let sg = env
            .wait(
                "web",
                Duration::from_secs(20),
                reason("Stalled", "DefaultCredentialsNotAllowed"),
            )
            .await
            .unwrap();
        let (status, why, message, _) = condition(&sg, "Synced").unwrap();
        assert_eq!(
            (status.as_str(), why.as_str()),
            ("False", "DefaultCredentialsNotAllowed")
        );
        assert!(
            message.contains(&env.ns)
                && message.contains("spec.credentialsRef")
                && message.contains("defaultCredentials.namespaces"),
            "{message}"
        );
        assert!(sg.metadata.finalizers.unwrap_or_default().is_empty());
        assert_eq!(groups_named(env, "web"), 0, "nothing reached Waldur");

        let mut typo = spec("affinity");
        typo["credentialsRef"] = json!({"name": "wladur"});
        env.apply("typo", typo).await.unwrap();
        env.wait(
            "typo",
            Duration::from_secs(20),
            reason("Synced", "CredentialsNotFound"),
        )
        .await;
        for name in ["web", "typo"] {
            env.delete(name).await;
            env.wait(name, Duration::from_secs(10), |sg| sg.is_none())
                .await;
        }

        env.secret("waldur", &SimConfig::default().user_token).await;
        let mut own = spec("affinity");
        own["credentialsRef"] = json!({"name": "waldur"});
        env.apply("own", own).await.unwrap();
        env.wait_ready("own").await;
    }

    pub async fn paused_and_request_annotations(env: &Env) {
        env.start_operator().await;
        env.apply("ann", spec("affinity")).await.unwrap();
        env.wait_ready("ann").await;
        env.annotate("ann", "openstack.waldur.com/request-pull", Some("t1"))
            .await;
        env.wait("ann", Duration::from_secs(10), handled(|h| &h.pull, "t1"))
            .await;
        env.wait_ready("ann").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(env.sim.requests("pull"), 1, "one token, one pull");
        env.annotate("ann", "openstack.waldur.com/paused", Some("true"))
            .await;
        env.wait("ann", Duration::from_secs(10), reason("Synced", "Paused"))
            .await;
        let before = env.sim.requests("pull") + env.sim.requests("set_ok");
        env.annotate("ann", "openstack.waldur.com/request-set-ok", Some("k1"))
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            env.sim.requests("pull") + env.sim.requests("set_ok"),
            before,
            "paused: no Waldur writes"
        );
        env.annotate("ann", "openstack.waldur.com/paused", None)
            .await;
        env.wait("ann", Duration::from_secs(10), handled(|h| &h.set_ok, "k1"))
            .await;
        assert_eq!(env.sim.requests("set_ok"), 1);
    }

    /// kubectl as a user drives it: apply the example, wait, get (table and YAML), describe
    /// (Events included), an invalid change refused with the CRD's message, delete.
    pub async fn kubectl_apply_wait_get_and_delete_a_servergroup(env: &Env) {
        env.start_operator().await;
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/servergroup.yaml"
        ))
        .unwrap()
        .replace("namespace: team-a", &format!("namespace: {}", env.ns));
        let file = env.dir.join("servergroup.yaml");
        std::fs::write(&file, &example).unwrap();
        let file = file.to_string_lossy().into_owned();
        let ok = |out: &std::process::Output, what: &str| {
            assert!(
                out.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let out = env.kubectl(&["apply", "-f", &file]).await;
        assert!(ok(&out, "apply").contains("servergroup.openstack.waldur.com/web created"));
        let out = env
            .kubectl(&[
                "wait",
                "--for=condition=Ready",
                "servergroup/web",
                "--timeout=60s",
            ])
            .await;
        ok(&out, "wait");
        // The operator's own writes (the create intent with the finalizer, the status) keep
        // what kubectl apply recorded: without it, the next apply cannot tell which fields it
        // set before, and would never remove one a user deleted from the manifest.
        let last = ok(
            &env.kubectl(&["apply", "view-last-applied", "servergroup/web"])
                .await,
            "view-last-applied after the operator's writes",
        );
        assert!(
            last.contains("name: web") && last.contains("anti-affinity"),
            "{last}"
        );
        let yaml = ok(
            &env.kubectl(&["get", "wsg", "web", "-o", "yaml"]).await,
            "get -o yaml",
        );
        assert!(
            yaml.contains("state: OK") && yaml.contains("backendId:"),
            "{yaml}"
        );
        let table = ok(&env.kubectl(&["get", "wsg"]).await, "get");
        assert!(
            table.contains("POLICY") && table.contains("anti-affinity") && table.contains("True"),
            "{table}"
        );
        if env.kind == Kind::Real {
            // The operator names itself: the finalizer and the create intent are its fields,
            // not "unknown"'s, in managedFields (and in audit logs, by the same User-Agent).
            let json = ok(
                &env.kubectl(&[
                    "get",
                    "servergroup/web",
                    "-o",
                    "json",
                    "--show-managed-fields",
                ])
                .await,
                "get --show-managed-fields",
            );
            let object: serde_json::Value = serde_json::from_str(&json).unwrap();
            let owners: Vec<&str> = object["metadata"]["managedFields"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| !m["fieldsV1"]["f:metadata"]["f:finalizers"].is_null())
                .filter_map(|m| m["manager"].as_str())
                .collect();
            assert_eq!(owners, ["waldur-operator"], "{json}");
            // Events written through events.k8s.io/v1 are the ones `kubectl describe` shows
            // (the real server keeps both Event APIs in one store).
            let described = ok(
                &env.kubectl(&["describe", "servergroup", "web"]).await,
                "describe",
            );
            assert!(
                described.contains("Events:") && described.contains("Created"),
                "{described}"
            );
        }
        let bad = env.dir.join("bad.yaml");
        std::fs::write(
            &bad,
            example.replace("policy: anti-affinity", "policy: affinity"),
        )
        .unwrap();
        let out = env.kubectl(&["apply", "-f", &bad.to_string_lossy()]).await;
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("spec.policy is immutable"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = env
            .kubectl(&["delete", "servergroup/web", "--timeout=60s"])
            .await;
        ok(&out, "delete");
        assert!(env.get("web").await.is_none());
        assert_eq!(
            groups_named(env, "web"),
            0,
            "kubectl delete waited for Waldur's deletion"
        );
    }

    /// Deleting a namespace whose ServerGroups use a credentialsRef Secret of that namespace
    /// finishes: the Secret is kept (a finalizer of the operator's) until the last resource
    /// that needs it has cleaned up, and each group follows its deletionPolicy.
    pub async fn deleting_a_namespace_cleans_up_with_its_own_credentials(env: &Env) {
        env.start_operator().await;
        env.secret("waldur", &SimConfig::default().staff_token)
            .await;
        for (name, policy, creds) in [
            ("del", "Delete", true),
            ("orph", "Orphan", true),
            ("unl", "Unlink", true),
            ("dflt", "Delete", false),
        ] {
            let mut s = spec("affinity");
            s["deletionPolicy"] = json!(policy);
            if creds {
                s["credentialsRef"] = json!({"name": "waldur"});
            }
            env.apply(name, s).await.unwrap();
        }
        for name in ["del", "orph", "unl", "dflt"] {
            env.wait_ready(name).await;
        }
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(env.kube.clone(), &env.ns);
        let held = secrets.get("waldur").await.unwrap();
        assert!(
            held.finalizers()
                .iter()
                .any(|f| f == waldur_operator::controller::secret_guard::SECRET_FINALIZER),
            "the Secret is held while resources need it: {:?}",
            held.finalizers()
        );
        let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
            kube::Api::all(env.kube.clone());
        namespaces
            .delete(&env.ns, &Default::default())
            .await
            .expect("the namespace deletion is accepted");
        let started = Instant::now();
        loop {
            match namespaces.get_opt(&env.ns).await.unwrap() {
                None => break,
                Some(ns) => assert!(
                    started.elapsed() < Duration::from_secs(90),
                    "the namespace is still {:?} after 90 s: {:?}\n{}",
                    ns.status.as_ref().and_then(|s| s.phase.clone()),
                    ns.status.as_ref().and_then(|s| s.conditions.clone()),
                    env.operator_logs()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "namespace with 4 ServerGroups deleted in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(groups_named(env, "del"), 0, "Delete removed the group");
        assert_eq!(groups_named(env, "dflt"), 0, "Delete removed the group");
        assert_eq!(groups_named(env, "orph"), 1, "Orphan left it");
        assert_eq!(
            groups_named(env, "unl"),
            0,
            "Unlink removed Waldur's record"
        );
    }

    /// Two ServerGroups importing the same Waldur group at the same instant: only one binds,
    /// the other reports AlreadyManaged naming it (the informer cache both consult cannot
    /// tell; the claim, created atomically in Kubernetes, can).
    pub async fn two_imports_of_one_group_at_the_same_instant_bind_once(env: &Env) {
        env.start_operator().await;
        env.sim.openstack_create(TENANT, "shared", "affinity");
        env.sim.resync_now().await;
        let uuid = env
            .sim
            .groups()
            .iter()
            .find(|g| g["name"] == "shared")
            .and_then(|g| g["uuid"].as_str().map(str::to_string))
            .expect("the re-sync imported the group");
        for round in 0..3 {
            let (a, b) = (format!("first-{round}"), format!("second-{round}"));
            let import = json!({"import": {"uuid": uuid}, "deletionPolicy": "Orphan"});
            let (ra, rb) = futures::join!(env.apply(&a, import.clone()), env.apply(&b, import));
            ra.unwrap();
            rb.unwrap();
            let settled = |sg: Option<&waldur_operator::api::ServerGroup>| {
                ready_now(sg) || reason("Ready", "AlreadyManaged")(sg)
            };
            let sa = env
                .wait(&a, Duration::from_secs(30), settled)
                .await
                .unwrap();
            let sb = env
                .wait(&b, Duration::from_secs(30), settled)
                .await
                .unwrap();
            let bound: Vec<&str> = [(&a, &sa), (&b, &sb)]
                .iter()
                .filter(|(_, sg)| ready_now(Some(sg)))
                .map(|(n, _)| n.as_str())
                .collect();
            assert_eq!(bound.len(), 1, "round {round}: bound {bound:?}");
            let loser = if bound[0] == a { &sb } else { &sa };
            let message = condition(loser, "Ready").unwrap().2;
            assert!(message.contains(bound[0]), "{message}");
            // Both go; the claim goes with the one that held it, so the next round starts
            // from nothing.
            env.delete(&a).await;
            env.delete(&b).await;
            env.wait(&a, Duration::from_secs(20), |sg| sg.is_none())
                .await;
            env.wait(&b, Duration::from_secs(20), |sg| sg.is_none())
                .await;
        }
    }

    pub async fn many_resources_converge(env: &Env, n: usize) {
        env.start_operator().await;
        let started = Instant::now();
        futures::future::join_all((0..n).map(|i| env.apply_owned(format!("m-{i:04}")))).await;
        let api = env.api();
        loop {
            let list = api.list(&Default::default()).await.unwrap();
            let ready = list.items.iter().filter(|sg| ready_now(Some(sg))).count();
            if ready == n {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{ready}/{n} Ready after 120 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(env.sim.groups().len(), n, "one group per resource");
        println!(
            "{n} resources Ready in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
}

impl Env {
    async fn apply_owned(&self, name: String) {
        self.apply(&name, spec("affinity")).await.expect("apply");
    }
}

/// A cluster that kept an older CRD (crds.enabled=false, or an old `kubectl apply`): the API server answers
/// 500 to every status write that names a field it does not know. The operator says so,
/// with what to do, in an Event (status itself cannot be written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outdated_crd_is_named_as_the_cause() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let env = Env::new(Kind::TestServer, "outdated-crd").await;
    let mut old = serde_json::to_value(waldur_operator::api::crd()).unwrap();
    let status = &mut old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        ["properties"];
    assert!(status["instanceCount"].is_object(), "{status}");
    status.as_object_mut().unwrap().remove("instanceCount");
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(env.kube.clone());
    crds.patch(
        "servergroups.openstack.waldur.com",
        &kube::api::PatchParams::apply("an-older-chart").force(),
        &kube::api::Patch::Apply(old),
    )
    .await
    .unwrap();
    env.start_operator().await;
    env.apply("web", spec("affinity")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if env
            .event_reasons("web")
            .await
            .contains(&"CRDOutdated".to_string())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no CRDOutdated Event: {:?}",
            env.event_reasons("web").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A lagging watch cache: every watch event reaches the operator 300 ms late.
mod lagging_watch {
    use super::*;

    const LAG: Duration = Duration::from_millis(300);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_imports_of_one_group_at_the_same_instant_bind_once() {
        let env = Env::lagging("lag-imports", LAG).await;
        scenarios::two_imports_of_one_group_at_the_same_instant_bind_once(&env).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn apply_to_ready_and_stale_generations() {
        let env = Env::lagging("lag-ready", LAG).await;
        scenarios::apply_to_ready_and_stale_generations(&env).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_deletion_policy() {
        let env = Env::lagging("lag-delete", LAG).await;
        scenarios::each_deletion_policy(&env).await;
    }
}

/// The scenarios as tests on one backend, in a module of their own; `many` resources for the
/// scale scenario.
macro_rules! backend {
    ($module:ident, $kind:expr, $many:expr, [$($name:ident),*]) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    scenarios::$name(&Env::new($kind, stringify!($name)).await).await;
                }
            )*

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn deleting_a_namespace_cleans_up_with_its_own_credentials() {
                let env = Env::cluster_wide($kind, "ns-deletion").await;
                scenarios::deleting_a_namespace_cleans_up_with_its_own_credentials(&env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn many_resources_converge_to_ready() {
                let env = Env::new($kind, "many").await;
                scenarios::many_resources_converge(&env, $many).await;
            }
        }
    };
}

/// Each scenario as a test on both backends: `test_server::NAME` (1,000 resources for the
/// scale scenario) and `real::NAME` (100).
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        backend!(test_server, Kind::TestServer, 1000, [$($name),*]);
        backend!(real, Kind::Real, 100, [$($name),*]);
    };
}

both!(
    apply_to_ready_and_stale_generations,
    invalid_manifests_are_rejected_with_the_schemas_message,
    each_deletion_policy,
    out_of_band_delete_and_reimport,
    an_unlinked_group_is_reimported_not_duplicated,
    waldur_outage_then_recovery,
    per_namespace_credentials,
    default_credentials_only_where_the_admin_allows,
    paused_and_request_annotations,
    kubectl_apply_wait_get_and_delete_a_servergroup,
    two_imports_of_one_group_at_the_same_instant_bind_once,
);

// ---- Scenarios that need the test server's fault injection ----

/// Review M10: a failure whose words change every time (401 and 403 in turn) must still back
/// off. The operator's own status write used to come back as a watch event and start the next
/// reconcile at once, and every failure made a new Event object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_whose_message_keeps_changing_still_backs_off() {
    let env = Env::new(Kind::TestServer, "m10-backoff").await;
    for i in 0..400 {
        env.sim
            .fail_next_requests(1, if i % 2 == 0 { 401 } else { 403 });
    }
    env.start_operator().await;
    env.apply("web", spec("affinity")).await.unwrap();
    env.wait("web", Duration::from_secs(10), |sg| {
        sg.and_then(|sg| condition(sg, "Synced"))
            .is_some_and(|c| c.0 == "False")
    })
    .await;
    env.sim.reset_counters();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let requests = env.sim.total_requests();
    let events = env.event_reasons("web").await;
    eprintln!(
        "8 s of alternating 401/403: {requests} Waldur requests, {} Event objects",
        events.len()
    );
    // Backoff 2 s doubling, plus the index's sweeps backing off: a handful, not hundreds.
    assert!(requests <= 20, "{requests} Waldur requests in 8 s");
    assert!(events.len() <= 4, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_restarts_and_410_gone_do_not_lose_events() {
    let env = Env::new(Kind::TestServer, "watch-410").await;
    env.start_operator().await;
    env.apply("before", spec("affinity")).await.unwrap();
    env.wait_ready("before").await;
    let server = env.server();
    let lists_before = server.count("list", "servergroups", None);
    server.compact();
    server.expire_watches();
    env.apply("after", spec("affinity")).await.unwrap();
    env.wait_ready("after").await;
    assert!(
        server.count("list", "servergroups", None) > lists_before,
        "the watch was answered 410 and the operator listed again"
    );
    server.expire_watches();
    env.delete("before").await;
    env.wait("before", Duration::from_secs(20), |sg| sg.is_none())
        .await;
    assert_eq!(groups_named(&env, "before"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_on_status_writes_are_retried() {
    let env = Env::new(Kind::TestServer, "status-409").await;
    env.server()
        .fail_next(3, "patch", "servergroups", Some("status"), 409);
    env.start_operator().await;
    env.apply("web", spec("affinity")).await.unwrap();
    env.wait_ready("web").await;
    assert!(
        env.server().count("patch", "servergroups", Some("status")) >= 4,
        "the three injected 409s were served"
    );
    assert_eq!(
        groups_named(&env, "web"),
        1,
        "a failed status write never makes a second group"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_each_step_of_create_never_two_groups() {
    let env = Env::new(Kind::TestServer, "killed-create").await;
    let server = env.server();
    // Step 1: killed after the finalizer, before anything in Waldur.
    // Step 2: killed after Waldur's 201, before the status write (the write fails and the
    // operator dies before trying again).
    // Step 3: killed while the group is still being created.
    for (i, step) in ["finalizer", "created", "creating"].iter().enumerate() {
        let name = format!("crash-{i}");
        if *step == "created" {
            server.fail_next(100, "patch", "servergroups", Some("status"), 409);
        }
        env.start_operator().await;
        env.apply(&name, spec("affinity")).await.unwrap();
        match *step {
            "finalizer" => {
                env.wait(&name, Duration::from_secs(10), |sg| {
                    sg.is_some_and(|s| s.finalizers().iter().any(|f| f == FINALIZER))
                })
                .await;
            }
            "created" => {
                let deadline = Instant::now() + Duration::from_secs(10);
                while groups_named(&env, &name) == 0 {
                    assert!(Instant::now() < deadline, "no create reached Waldur");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            _ => {
                env.wait(&name, Duration::from_secs(10), |sg| {
                    sg.and_then(|s| s.status.as_ref())
                        .and_then(|s| s.uuid.as_ref())
                        .is_some()
                })
                .await;
            }
        }
        env.kill_operator();
        server.fail_next(0, "patch", "servergroups", Some("status"), 409);
        env.start_operator().await;
        env.wait_ready(&name).await;
        env.kill_operator();
        assert_eq!(
            groups_named(&env, &name),
            1,
            "step {step}: exactly one group"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_delete_never_loses_the_finalizer() {
    let env = Env::new(Kind::TestServer, "killed-delete").await;
    env.start_operator().await;
    env.apply("web", spec("affinity")).await.unwrap();
    env.wait_ready("web").await;
    env.delete("web").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.sim.requests("delete") == 0 {
        assert!(Instant::now() < deadline, "no DELETE reached Waldur");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    env.kill_operator();
    let sg = env
        .get("web")
        .await
        .expect("the finalizer holds the object while Waldur deletes");
    assert!(sg.finalizers().iter().any(|f| f == FINALIZER));
    env.start_operator().await;
    env.wait("web", Duration::from_secs(20), |sg| sg.is_none())
        .await;
    assert_eq!(groups_named(&env, "web"), 0);
}
