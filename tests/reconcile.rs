//! The real reconcile against a fake Kubernetes API and the Waldur simulator over HTTP.

mod support;

use waldur_operator::controller::index::ReadPath;

/// Every scenario runs twice: reading Waldur once per resource, and through the batched index.
macro_rules! scenarios {
    ($module:ident, $mode:expr) => {
        mod $module {
            use serde_json::json;
            use crate::support::{Harness, NS, PLURAL, TENANT, condition, is_ready, reason_is};
            use waldur_operator::api::FINALIZER;
            use waldur_operator::controller::index::ReadPath;
            use waldur_sim::{Delays, SimConfig};

            const MODE: ReadPath = $mode;


        fn spec(policy: &str) -> serde_json::Value {
            json!({"policy": policy, "tenant": TENANT, "deletionPolicy": "Delete", "managementPolicy": "Managed"})
        }

        #[tokio::test]
        async fn create_to_ready_with_status_events_and_finalizer() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("anti-affinity"));
            let sg = h.converge("web", is_ready).await.unwrap();
            let status = sg.status.clone().unwrap();
            assert_eq!(status.state.as_deref(), Some("OK"));
            assert_eq!(status.policy.as_deref(), Some("anti-affinity"));
            assert_eq!(status.name.as_deref(), Some("web"));
            assert!(!status.backend_id.clone().unwrap().is_empty());
            assert_eq!(status.instance_count, Some(0));
            assert_eq!(status.observed_generation, Some(1));
            assert!(status.last_sync_time.is_some());
            assert_eq!(condition(&sg, "Synced").unwrap().0, "True");
            assert_eq!(condition(&sg, "Ready").unwrap().1, "Available");
            assert!(
                sg.metadata
                    .finalizers
                    .clone()
                    .unwrap_or_default()
                    .contains(&FINALIZER.to_string())
            );
            let groups = h.sim.groups();
            assert_eq!(groups.len(), 1);
            assert_eq!(groups[0]["uuid"].as_str(), status.uuid.as_deref());
            assert_eq!(h.sim.requests("create"), 1);
            // One Event (Created): the creation completing is what Ready says (issue 21).
            assert_eq!(h.kube.event_reasons("web"), vec!["Created".to_string()]);
            // The finalizer with the create intent and the status once OK: the status waits
            // while Waldur makes the group (about 2 s), so Creating costs no write, and no
            // Lease claims it (issue 21): with the Event, three writes in all.
            assert_eq!(h.kube.writes(), 2, "ServerGroup writes");
            assert_eq!(h.kube.list("leases").len(), 0, "no claim Lease");
        }

        #[tokio::test]
        async fn a_stored_empty_finalizer_list_does_not_block_the_finalizer() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            h.kube.edit(PLURAL, NS, "web", |obj| {
                obj["metadata"]["finalizers"] = json!([]);
            });
            let sg = h.converge("web", is_ready).await.unwrap();
            assert_eq!(sg.metadata.finalizers, Some(vec![FINALIZER.to_string()]));
        }

        /// A lagging cache: the reconcile after the one that added the finalizer still sees
        /// the object without it. The guarded add then fails its test (422), and must read
        /// the list anew instead of failing the reconcile (seen 37,672 times at 30,000
        /// resources over three shards).
        #[tokio::test]
        async fn a_finalizer_already_added_behind_a_lagging_cache_is_not_an_error() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            let stale = h.sg("web").unwrap();
            h.reconcile("web").await.unwrap();
            assert!(h.sg("web").unwrap().metadata.finalizers.is_some_and(|f| f.contains(&FINALIZER.to_string())));
            // The cache still holds the object as it was before the first reconcile.
            waldur_operator::controller::reconcile(std::sync::Arc::new(stale), h.ctx.clone())
                .await
                .expect("no error for a finalizer that is already there");
            assert!(!h.kube.event_reasons("web").contains(&"ReconcileError".to_string()));
            assert_eq!(h.sg("web").unwrap().metadata.finalizers, Some(vec![FINALIZER.to_string()]));
        }

        #[tokio::test]
        async fn an_unchanged_group_writes_nothing_to_kubernetes() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            h.converge("web", is_ready).await;
            let writes = h.kube.writes();
            for _ in 0..3 {
                h.reconcile("web").await.unwrap();
            }
            assert_eq!(
                h.kube.writes(),
                writes,
                "a resync of a settled group must not write status"
            );
        }

        #[tokio::test]
        async fn an_erred_create_shows_waldurs_message() {
            let h = Harness::fast_mode(MODE).await;
            h.sim.fail_next_creates(1);
            h.apply("web", spec("affinity"));
            let sg = h
                .converge("web", reason_is("Ready", "Erred"))
                .await
                .unwrap();
            let (status, _, message) = condition(&sg, "Ready").unwrap();
            assert_eq!(status, "False");
            let waldur_message = h.sim.groups()[0]["error_message"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(!waldur_message.is_empty());
            assert_eq!(message, waldur_message);
            assert_eq!(
                sg.status.unwrap().error_message.as_deref(),
                Some(waldur_message.as_str())
            );
        }

        #[tokio::test]
        async fn a_rejected_policy_is_invalid_spec_and_not_retried() {
            let config = SimConfig {
                affinity_only: true,
                delays: Delays::fast(),
                ..Default::default()
            };
            let h = Harness::with_mode(config, MODE).await;
            h.apply("web", spec("anti-affinity"));
            let sg = h
                .converge("web", reason_is("Ready", "InvalidSpec"))
                .await
                .unwrap();
            let (_, _, message) = condition(&sg, "Ready").unwrap();
            assert!(
                message.contains("\"anti-affinity\" is not a valid choice."),
                "{message}"
            );
            for _ in 0..5 {
                h.reconcile("web").await.unwrap();
            }
            assert_eq!(
                h.sim.requests("create"),
                1,
                "a 400 must not be retried for the same generation"
            );
            assert!(
                h.kube
                    .event_reasons("web")
                    .contains(&"InvalidSpec".to_string())
            );
        }

        #[tokio::test]
        async fn delete_waits_for_waldur_then_releases_the_finalizer() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            h.converge("web", is_ready).await;
            h.kube.delete(PLURAL, NS, "web");
            // Right after DELETE (202) the object stays, held by the finalizer. (On the
            // batched path the first reconcile of a deletion waits for a sweep taken after
            // it, so the DELETE may come in the next.)
            crate::reconcile_until(&h, "web", || h.sim.requests("delete") > 0).await;
            assert!(
                h.sg("web").is_some(),
                "the finalizer must hold until Waldur answers 404"
            );
            assert_eq!(h.sim.requests("delete"), 1);
            let (_, reason, _) = condition(&h.sg("web").unwrap(), "Ready").unwrap();
            assert_eq!(reason, "Deleting");
            h.converge("web", |sg| sg.is_none()).await;
            assert!(h.sim.groups().is_empty());
            // One Event for the deletion, when it is done (issue 21: each is a write).
            assert_eq!(
                h.kube.event_reasons("web"),
                vec!["Created".to_string(), "Deleted".to_string()]
            );
        }

        #[tokio::test]
        async fn delete_of_a_busy_group_waits_instead_of_failing() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            let sg = h.converge("web", is_ready).await.unwrap();
            let uuid = sg.status.unwrap().uuid.unwrap();
            h.sim.force_state(&uuid, "UPDATING");
            h.kube.delete(PLURAL, NS, "web");
            h.reconcile("web").await.unwrap();
            h.reconcile("web").await.unwrap();
            assert!(h.sg("web").is_some());
            assert_eq!(
                h.sim.requests("delete"),
                0,
                "DELETE would answer 409 while UPDATING"
            );
            h.sim.force_state(&uuid, "OK");
            h.converge("web", |sg| sg.is_none()).await;
            assert!(h.sim.groups().is_empty());
        }

        /// Review m3: a group stuck in a transitional state holds a deleted resource until
        /// Waldur finishes; staff's way out, `request-set-ok`, is honoured during deletion too
        /// (it was ignored once the resource was deleted), and the deletion then goes on.
        #[tokio::test]
        async fn request_set_ok_unsticks_a_deletion_waiting_on_a_stuck_group() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            let sg = h.converge("web", is_ready).await.unwrap();
            let uuid = sg.status.unwrap().uuid.unwrap();
            h.sim.force_state(&uuid, "UPDATING");
            h.kube.delete(PLURAL, NS, "web");
            for _ in 0..3 {
                h.reconcile("web").await.unwrap();
            }
            assert!(h.sg("web").is_some(), "waits while the group is stuck");
            assert_eq!(h.sim.requests("delete"), 0);
            h.kube.edit(PLURAL, NS, "web", |o| {
                o["metadata"]["annotations"]["openstack.waldur.com/request-set-ok"] = json!("k1");
            });
            h.converge("web", |sg| sg.is_none()).await;
            assert_eq!(h.sim.requests("set_ok"), 1, "the request runs once");
            assert_eq!(h.sim.requests("delete"), 1);
            assert!(h.sim.groups().is_empty());
            let reasons = h.kube.event_reasons("web");
            assert!(
                reasons.contains(&"SetOkRequested".to_string()),
                "{reasons:?}"
            );
        }

        #[tokio::test]
        async fn orphan_leaves_the_group_in_waldur() {
            let h = Harness::fast_mode(MODE).await;
            let mut s = spec("affinity");
            s["deletionPolicy"] = json!("Orphan");
            h.apply("web", s);
            h.converge("web", is_ready).await;
            h.kube.delete(PLURAL, NS, "web");
            h.converge("web", |sg| sg.is_none()).await;
            assert_eq!(h.sim.groups().len(), 1);
            assert_eq!(h.sim.requests("delete") + h.sim.requests("unlink"), 0);
            assert!(
                h.kube
                    .event_reasons("web")
                    .contains(&"Orphaned".to_string())
            );
        }

        #[tokio::test]
        async fn unlink_without_staff_is_forbidden_keeps_the_finalizer_until_orphaned() {
            let h = Harness::fast_mode(MODE).await;
            h.secret("user-creds", &SimConfig::default().user_token);
            let mut s = spec("affinity");
            s["deletionPolicy"] = json!("Unlink");
            s["credentialsRef"] = json!({"name": "user-creds"});
            h.apply("web", s);
            h.converge("web", is_ready).await;
            h.kube.delete(PLURAL, NS, "web");
            let sg = h
                .converge("web", reason_is("Synced", "Forbidden"))
                .await
                .unwrap();
            assert!(
                sg.metadata
                    .finalizers
                    .unwrap_or_default()
                    .contains(&FINALIZER.to_string())
            );
            assert_eq!(h.sim.groups().len(), 1);
            // Switching to Orphan releases it.
            h.kube.edit(PLURAL, NS, "web", |o| {
                o["spec"]["deletionPolicy"] = json!("Orphan")
            });
            h.converge("web", |sg| sg.is_none()).await;
            assert_eq!(h.sim.groups().len(), 1);
        }

        /// Review m4: the credentialsRef Secret changed to a user who cannot see the tenant,
        /// then the resource deleted: Waldur's 404 for the group proves nothing, so the
        /// finalizer stays (Synced=False Forbidden, saying why) until credentials that can see
        /// it are back, and then the group is deleted. With and without a Nova id.
        #[tokio::test]
        async fn a_deletion_with_credentials_that_cannot_see_the_group_waits_for_them() {
            // The campaign's seed 7 found the Unlink case (an import's record left in Waldur).
            for (erred, policy) in [(false, "Delete"), (true, "Delete"), (false, "Unlink")] {
                let config = SimConfig {
                    user_tenants: vec!["00000000000000000000000000000001".into()],
                    ..SimConfig::default()
                };
                let h = Harness::with_mode(config, MODE).await;
                h.secret("creds", &SimConfig::default().staff_token);
                let mut s = spec("affinity");
                s["credentialsRef"] = json!({"name": "creds"});
                s["deletionPolicy"] = json!(policy);
                if erred {
                    h.sim.fail_next_creates(1);
                }
                h.apply("web", s);
                let bound = if erred {
                    h.converge("web", reason_is("Ready", "Erred")).await
                } else {
                    h.converge("web", is_ready).await
                };
                let uuid = bound.unwrap().status.unwrap().uuid.unwrap();
                h.kube.edit("secrets", NS, "creds", |o| {
                    o["data"]["token"] = json!(crate::support::base64_like::encode(&SimConfig::default().user_token));
                });
                h.kube.delete(PLURAL, NS, "web");
                let sg = h
                    .converge("web", reason_is("Synced", "Forbidden"))
                    .await
                    .unwrap();
                let (_, _, message) = condition(&sg, "Synced").unwrap();
                assert!(message.contains("cannot see"), "erred={erred}: {message}");
                for _ in 0..3 {
                    let _ = h.reconcile("web").await;
                }
                assert!(h.sg("web").is_some(), "erred={erred}: the finalizer stays");
                assert!(h.sim.group(&uuid).is_some(), "erred={erred}: the group stays");
                h.kube.edit("secrets", NS, "creds", |o| {
                    o["data"]["token"] = json!(crate::support::base64_like::encode(&SimConfig::default().staff_token));
                });
                h.converge("web", |sg| sg.is_none()).await;
                assert!(
                    h.sim.group(&uuid).is_none(),
                    "erred={erred} {policy}: gone from Waldur"
                );
            }
        }

        #[tokio::test]
        async fn unlink_with_staff_removes_only_the_record() {
            let h = Harness::fast_mode(MODE).await;
            let mut s = spec("affinity");
            s["deletionPolicy"] = json!("Unlink");
            h.apply("web", s);
            h.converge("web", is_ready).await;
            h.kube.delete(PLURAL, NS, "web");
            // The reconcile that unlinks lets go: nothing else may be needed to trigger the
            // release (before, a Waldur re-sync could re-import the group first, and the next
            // reconcile unlinked that too and hung; found by the fault campaign).
            crate::reconcile_until(&h, "web", || h.sim.requests("unlink") > 0).await;
            assert!(h.sg("web").is_none(), "released in the reconcile that unlinked");
            assert_eq!(h.sim.requests("unlink"), 1);
            assert!(h.sim.groups().is_empty());
            assert!(h.kube.event_reasons("web").contains(&"Unlinked".to_string()));
        }

        #[tokio::test]
        async fn a_bad_token_is_unauthorized_and_never_shown() {
            let h = Harness::fast_mode(MODE).await;
            h.secret("bad", "not-a-real-token-123");
            let mut s = spec("affinity");
            s["credentialsRef"] = json!({"name": "bad"});
            h.apply("web", s);
            let sg = h
                .converge("web", reason_is("Synced", "Unauthorized"))
                .await
                .unwrap();
            let shown =
                serde_json::to_string(&sg).unwrap() + &serde_json::to_string(&h.kube.events()).unwrap();
            assert!(!shown.contains("not-a-real-token-123"));
            assert!(
                h.kube
                    .event_reasons("web")
                    .contains(&"Unauthorized".to_string())
            );
        }

        #[tokio::test]
        async fn a_missing_secret_is_reported_then_picked_up_when_created() {
            let h = Harness::fast_mode(MODE).await;
            let mut s = spec("affinity");
            s["credentialsRef"] = json!({"name": "later"});
            h.apply("web", s);
            let sg = h
                .converge("web", reason_is("Synced", "CredentialsNotFound"))
                .await
                .unwrap();
            assert!(condition(&sg, "Synced").unwrap().2.contains("team-a/later"));
            assert_eq!(h.sim.total_requests(), 0);
            h.secret("later", &SimConfig::default().staff_token);
            h.converge("web", is_ready).await;
        }

        #[tokio::test]
        async fn a_crash_between_create_and_status_write_leaves_one_group() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            h.reconcile("web").await.unwrap();
            assert_eq!(h.sim.requests("create"), 1);
            let web = h.sg("web").unwrap();
            assert!(
                web.status.and_then(|s| s.uuid).is_none(),
                "the first status waits while Waldur makes the group"
            );
            // The crash: what the process held in memory is gone.
            h.ctx.held_here.forget_holder(web.metadata.uid.as_deref().unwrap());
            let sg = h.converge("web", is_ready).await.unwrap();
            assert_eq!(h.sim.groups().len(), 1, "never two groups");
            assert_eq!(h.sim.requests("create"), 1);
            assert_eq!(
                h.sim.groups()[0]["uuid"].as_str(),
                sg.status.unwrap().uuid.as_deref()
            );
            assert!(h.kube.event_reasons("web").contains(&"Adopted".to_string()));
        }

        #[tokio::test]
        async fn a_group_deleted_out_of_band_is_recreated() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            let before = h.converge("web", is_ready).await.unwrap().status.unwrap();
            h.sim
                .openstack_delete(before.backend_id.as_deref().unwrap());
            h.sim.resync_now().await;
            assert!(
                h.sim.groups().is_empty(),
                "Waldur's re-sync dropped the row"
            );
            let after = h
                .converge("web", |sg| {
                    is_ready(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
                })
                .await
                .unwrap()
                .status
                .unwrap();
            assert_eq!(h.sim.groups().len(), 1);
            assert_ne!(after.backend_id, before.backend_id);
            assert!(
                h.kube
                    .event_reasons("web")
                    .contains(&"Recreated".to_string())
            );
        }

        #[tokio::test]
        async fn a_group_reimported_under_a_new_uuid_is_rebound() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            let before = h.converge("web", is_ready).await.unwrap().status.unwrap();
            let old = waldur_operator::waldur::WaldurUuid::parse(before.uuid.as_deref().unwrap()).unwrap();
            h.staff_client().unlink(&old).await.unwrap();
            h.sim.resync_now().await;
            let groups = h.sim.groups();
            assert_eq!(groups.len(), 1);
            assert_ne!(
                groups[0]["uuid"].as_str(),
                before.uuid.as_deref(),
                "re-imported under a new UUID"
            );
            let after = h
                .converge("web", |sg| {
                    sg.unwrap().status.as_ref().unwrap().uuid.as_deref() == groups[0]["uuid"].as_str()
                })
                .await
                .unwrap()
                .status
                .unwrap();
            assert_eq!(after.backend_id, before.backend_id);
            assert_eq!(h.sim.requests("create"), 1, "rebound, not recreated");
            assert!(h.kube.event_reasons("web").contains(&"Rebound".to_string()));
        }

        #[tokio::test]
        async fn paused_makes_no_waldur_calls() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            h.kube.edit(PLURAL, NS, "web", |o| {
                o["metadata"]["annotations"] = json!({"openstack.waldur.com/paused": "true"})
            });
            h.reconcile("web").await.unwrap();
            h.reconcile("web").await.unwrap();
            assert_eq!(h.sim.total_requests(), 0);
            let sg = h.sg("web").unwrap();
            assert_eq!(condition(&sg, "Synced").unwrap().1, "Paused");
            h.kube.edit(PLURAL, NS, "web", |o| {
                o["metadata"]["annotations"] = json!({})
            });
            h.converge("web", is_ready).await;
        }

        #[tokio::test]
        async fn each_request_annotation_acts_exactly_once_per_token() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            h.converge("web", is_ready).await;
            let annotate = |k: &str, v: &str| {
                let (k, v) = (k.to_string(), v.to_string());
                h.kube.edit(PLURAL, NS, "web", move |o| {
                    o["metadata"]["annotations"][k] = json!(v);
                });
            };
            annotate("openstack.waldur.com/request-pull", "one");
            for _ in 0..3 {
                h.reconcile("web").await.unwrap();
            }
            assert_eq!(h.sim.requests("pull"), 1);
            h.converge("web", is_ready).await;
            for _ in 0..2 {
                h.reconcile("web").await.unwrap();
            }
            assert_eq!(h.sim.requests("pull"), 1, "the same token acts once");
            annotate("openstack.waldur.com/request-pull", "two");
            h.converge("web", |sg| {
                sg.unwrap()
                    .status
                    .as_ref()
                    .unwrap()
                    .handled_requests
                    .as_ref()
                    .and_then(|r| r.pull.as_deref())
                    == Some("two")
            })
            .await;
            assert_eq!(h.sim.requests("pull"), 2);

            annotate("openstack.waldur.com/request-set-erred", "e1");
            h.converge("web", reason_is("Ready", "Erred")).await;
            annotate("openstack.waldur.com/request-set-ok", "k1");
            h.converge("web", is_ready).await;
            for _ in 0..3 {
                h.reconcile("web").await.unwrap();
            }
            assert_eq!(h.sim.requests("set_erred"), 1);
            assert_eq!(h.sim.requests("set_ok"), 1);
        }

        /// Review m1: a pull that went out is recorded even when the set-ok after it fails,
        /// so the next reconcile does not pull again for the same token.
        #[tokio::test]
        async fn a_request_carried_out_is_kept_when_the_next_one_fails() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            h.converge("web", is_ready).await;
            h.kube.edit(PLURAL, NS, "web", |o| {
                o["metadata"]["annotations"] = json!({
                    "openstack.waldur.com/request-pull": "p1",
                    "openstack.waldur.com/request-set-ok": "k1",
                });
            });
            h.sim.fail_next_requests_for("set_ok", 1, 503);
            assert!(h.reconcile("web").await.is_err(), "set_ok is refused once");
            assert_eq!(h.sim.requests("pull"), 1);
            h.converge("web", |sg| {
                sg.and_then(|sg| sg.status.as_ref())
                    .and_then(|s| s.handled_requests.as_ref())
                    .and_then(|r| r.set_ok.as_deref())
                    == Some("k1")
            })
            .await;
            h.converge("web", is_ready).await;
            for _ in 0..2 {
                h.reconcile("web").await.unwrap();
            }
            assert_eq!(h.sim.requests("pull"), 1, "the pull was not sent twice");
        }

        /// Review m2: a manifest applied with request tokens already in it (from Git) does
        /// not replay them on the group it creates.
        #[tokio::test]
        async fn request_tokens_in_a_fresh_manifest_are_not_replayed() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            h.kube.edit(PLURAL, NS, "web", |o| {
                o["metadata"]["annotations"] = json!({
                    "openstack.waldur.com/request-set-ok": "from-git",
                    "openstack.waldur.com/request-set-erred": "from-git",
                });
            });
            let sg = h.converge("web", is_ready).await.unwrap();
            let handled = sg.status.unwrap().handled_requests.unwrap();
            assert_eq!(handled.set_ok.as_deref(), Some("from-git"));
            assert_eq!(h.sim.requests("set_ok") + h.sim.requests("set_erred"), 0);
        }

        #[tokio::test]
        async fn import_by_backend_id_observes_without_writing() {
            let h = Harness::fast_mode(MODE).await;
            let backend = h.sim.openstack_create(TENANT, "legacy", "affinity");
            h.sim.resync_now().await;
            h.apply("legacy", json!({"import": {"backendId": backend}, "managementPolicy": "Observe", "deletionPolicy": "Delete"}));
            let sg = h.converge("legacy", is_ready).await.unwrap();
            assert_eq!(
                sg.status.as_ref().unwrap().backend_id.as_deref(),
                Some(backend.as_str())
            );
            h.kube.delete(PLURAL, NS, "legacy");
            h.converge("legacy", |sg| sg.is_none()).await;
            assert_eq!(h.sim.groups().len(), 1, "Observe never deletes");
            assert_eq!(
                h.sim.requests("create") + h.sim.requests("delete") + h.sim.requests("pull"),
                0
            );
        }

        #[tokio::test]
        async fn a_second_resource_importing_a_held_group_is_already_managed() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("first", spec("affinity"));
            let uuid = h
                .converge("first", is_ready)
                .await
                .unwrap()
                .status
                .unwrap()
                .uuid
                .unwrap();
            h.apply("second", json!({"import": {"uuid": uuid}, "managementPolicy": "Managed", "deletionPolicy": "Delete"}));
            let sg = h
                .converge("second", reason_is("Ready", "AlreadyManaged"))
                .await
                .unwrap();
            assert!(condition(&sg, "Ready").unwrap().2.contains("team-a/first"));
            h.kube.delete(PLURAL, NS, "second");
            h.converge("second", |sg| sg.is_none()).await;
            assert_eq!(
                h.sim.groups().len(),
                1,
                "deleting the second must not delete the first's group"
            );
        }

        #[tokio::test]
        async fn waldur_outage_is_reported_then_recovers() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            h.sim.set_failing(Some(503));
            let sg = h
                .converge("web", reason_is("Synced", "WaldurUnavailable"))
                .await
                .unwrap();
            assert!(condition(&sg, "Synced").unwrap().2.contains("503"));
            h.sim.set_failing(None);
            h.converge("web", is_ready).await;
            assert_eq!(h.sim.groups().len(), 1);
        }

        #[tokio::test]
        async fn a_409_on_delete_is_retried_until_waldur_accepts() {
            let h = Harness::fast_mode(MODE).await;
            h.apply("web", spec("affinity"));
            h.converge("web", is_ready).await;
            h.sim.fail_next_requests_for("delete", 2, 409);
            h.kube.delete(PLURAL, NS, "web");
            h.reconcile("web").await.unwrap();
            h.reconcile("web").await.unwrap();
            assert!(
                h.sg("web").is_some(),
                "a refused DELETE keeps the finalizer"
            );
            assert_eq!(h.sim.groups().len(), 1);
            h.converge("web", |sg| sg.is_none()).await;
            assert_eq!(
                h.sim.requests("delete"),
                3,
                "two refusals, then the accepted DELETE"
            );
            assert!(h.sim.groups().is_empty());
        }

        }
    };
}

scenarios!(per_object, ReadPath::PerObject);
scenarios!(batched, ReadPath::Batched);

/// The batched path answers settled reconciles from its index; the per-object path asks
/// Waldur every time.
#[tokio::test]
async fn the_batched_path_reads_waldur_once_per_sweep_not_per_reconcile() {
    use support::{Harness, TENANT, is_ready};
    let spec = serde_json::json!({"policy": "affinity", "tenant": TENANT});
    let mut cost = Vec::new();
    for mode in [ReadPath::PerObject, ReadPath::Batched] {
        let h = Harness::fast_mode(mode).await;
        for i in 0..5 {
            h.apply(&format!("g{i}"), spec.clone());
        }
        for i in 0..5 {
            h.converge(&format!("g{i}"), is_ready).await;
        }
        h.sim.reset_counters();
        for _ in 0..4 {
            for i in 0..5 {
                h.reconcile(&format!("g{i}")).await.unwrap();
            }
        }
        cost.push(h.sim.requests("retrieve"));
    }
    assert_eq!(cost[0], 20, "per-object: one GET per reconcile");
    assert_eq!(cost[1], 0, "batched: settled reconciles read the index");
}

/// Review M1: once a sweep fails, the index stops answering from its last snapshot. A token
/// that Waldur stops accepting makes a settled resource say Synced=False Unauthorized, not
/// Synced=True from what the last good sweep saw.
#[tokio::test]
async fn a_failed_sweep_stops_the_index_from_answering() {
    use support::{Harness, TENANT, condition, is_ready, reason_is};
    let h = Harness::fast_mode(ReadPath::Batched).await;
    h.apply(
        "web",
        serde_json::json!({"policy": "affinity", "tenant": TENANT}),
    );
    h.converge("web", is_ready).await;
    h.reconcile("web").await.unwrap();
    assert_eq!(
        condition(&h.sg("web").unwrap(), "Synced").unwrap().0,
        "True"
    );
    // The write keeps the sweeps at the busy pace (30 ms) for a while: they now fail.
    h.sim.set_failing(Some(401));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let sg = h
        .converge("web", reason_is("Synced", "Unauthorized"))
        .await
        .unwrap();
    assert_eq!(condition(&sg, "Synced").unwrap().0, "False");
    assert_eq!(
        condition(&sg, "Ready").unwrap().0,
        "True",
        "the last known Ready stays"
    );
}

/// An index over the simulator with `timing`, and nothing bound to any group.
fn bare_index(
    timing: waldur_operator::controller::index::SweepTiming,
) -> std::sync::Arc<waldur_operator::controller::index::WaldurIndex> {
    let (reader, _writer) = kube::runtime::reflector::store();
    let (wake, _) = futures::channel::mpsc::unbounded();
    std::sync::Arc::new(waldur_operator::controller::index::WaldurIndex::new(
        timing, reader, wake,
    ))
}

/// Review M8: a group stuck in a transitional state that no ServerGroup manages (a Waldur
/// worker crashed) does not keep the sweeps at the busy pace.
#[tokio::test]
async fn a_stuck_group_nobody_manages_does_not_set_the_sweep_pace() {
    use std::time::Duration;
    use waldur_operator::controller::index::SweepTiming;
    use waldur_operator::waldur::{NewServerGroup, Policy, WaldurUuid};
    let h = support::Harness::fast_mode(ReadPath::Batched).await;
    let staff = h.staff_client();
    let stuck = staff
        .create(
            &WaldurUuid::parse(support::TENANT).unwrap(),
            &NewServerGroup {
                name: "stuck".into(),
                policy: Policy::Affinity,
                description: None,
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(h.sim.force_state(stuck.uuid.as_str(), "CREATING"));
    let index = bare_index(SweepTiming {
        busy: Duration::from_millis(20),
        settled: Duration::from_secs(600),
        after_write: Duration::ZERO,
    });
    h.sim.reset_counters();
    let _shard = index.shard("staff", &staff);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        h.sim.requests("list"),
        1,
        "one sweep, then the settled pace: nothing bound is changing"
    );
}

/// Review M7: the index of credentials no reconcile uses any more (a rotated or revoked
/// token) is dropped, and its sweeps stop.
#[tokio::test]
async fn an_index_nobody_uses_is_dropped() {
    use std::time::Duration;
    use waldur_operator::controller::index::SweepTiming;
    let h = support::Harness::fast_mode(ReadPath::Batched).await;
    let index = bare_index(SweepTiming {
        busy: Duration::from_millis(10),
        settled: Duration::from_millis(50),
        after_write: Duration::ZERO,
    });
    let shard = index.shard("rotated-away", &h.staff_client());
    drop(shard);
    assert_eq!(index.shard_count(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(index.shard_count(), 0, "idle for 3 sweep periods: dropped");
    let lists = h.sim.requests("list");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.sim.requests("list"), lists, "its sweeps stopped");
}

/// Review M3: Waldur commits a create and the answer never arrives. The retry must find the
/// group in Waldur (the index's picture predates it) and bind it: one group, Ready, never a
/// terminal InvalidSpec from Waldur's "name should be unique".
#[tokio::test]
async fn a_create_whose_answer_was_lost_is_bound_not_rejected() {
    use support::{Harness, TENANT, is_ready};
    for mode in [ReadPath::Batched, ReadPath::PerObject] {
        let h = Harness::fast_mode(mode).await;
        // Let the index sweep a Waldur without the group first.
        h.apply(
            "warm",
            serde_json::json!({"policy": "affinity", "tenant": TENANT}),
        );
        h.converge("warm", is_ready).await;
        h.sim.drop_answers_after_commit(Some("create"), 1);
        h.apply(
            "web",
            serde_json::json!({"policy": "affinity", "tenant": TENANT}),
        );
        assert!(h.reconcile("web").await.is_err(), "the answer was lost");
        let sg = h.converge("web", is_ready).await.unwrap();
        let named: Vec<_> = h
            .sim
            .groups()
            .into_iter()
            .filter(|g| g["name"] == "web")
            .collect();
        assert_eq!(named.len(), 1, "{mode:?}: one group");
        assert_eq!(
            sg.status.unwrap().uuid.as_deref(),
            named[0]["uuid"].as_str(),
            "{mode:?}: the committed group is bound"
        );
        assert_eq!(
            h.sim.requests("create"),
            2,
            "{mode:?}: the first create and warm's"
        );
    }
}

/// Review N3 (E3): a resource once told AlreadyManaged (its twin held the name) creates the
/// group itself after the twin is gone, and the create's answer is lost. Its create intent
/// makes the group found later its own: bound and Ready, not "made by another ServerGroup";
/// and deleting it deletes the group, leaving nothing in Waldur.
#[tokio::test]
async fn a_resource_that_once_lost_the_name_still_owns_its_own_lost_create() {
    use support::{Harness, NS, PLURAL, TENANT, is_ready, reason_is};
    for mode in [ReadPath::Batched, ReadPath::PerObject] {
        let h = Harness::fast_mode(mode).await;
        let spec = serde_json::json!({"policy": "affinity", "tenant": TENANT, "name": "shared"});
        // Twins: created together, so a's group is younger than b and looks like b's own.
        h.apply("a", spec.clone());
        h.apply("b", spec);
        h.converge("a", is_ready).await;
        h.converge("b", reason_is("Ready", "AlreadyManaged")).await;
        h.kube.delete(PLURAL, NS, "a");
        h.converge("a", |sg| sg.is_none()).await;
        assert!(h.sim.groups().is_empty(), "{mode:?}: a's group deleted");
        h.sim.drop_answers_after_commit(Some("create"), 1);
        let b = h.converge("b", is_ready).await.unwrap();
        let groups = h.sim.groups();
        assert_eq!(groups.len(), 1, "{mode:?}: one group");
        assert_eq!(
            b.status.unwrap().uuid.as_deref(),
            groups[0]["uuid"].as_str(),
            "{mode:?}: b bound the group its lost create made"
        );
        h.kube.delete(PLURAL, NS, "b");
        h.converge("b", |sg| sg.is_none()).await;
        assert!(
            h.sim.groups().is_empty(),
            "{mode:?}: deleting b deleted its group: {:?}",
            h.sim.groups()
        );
    }
}

/// The fault campaign's seed 393: a group made without a Nova id (ERRED) is deleted out of
/// band, so the resource makes another in its place; that create is committed but its answer
/// is lost, and the resource is deleted right then. Its create intent still stands (nothing
/// bound since): the deletion looks for the group that create made and deletes it, instead of
/// letting go because the old group is gone.
#[tokio::test]
async fn deleting_right_after_a_recreate_whose_answer_was_lost_deletes_what_it_made() {
    use support::{Harness, NS, PLURAL, TENANT, reason_is};
    for mode in [ReadPath::Batched, ReadPath::PerObject] {
        let h = Harness::fast_mode(mode).await;
        h.sim.fail_next_creates(1);
        h.apply(
            "web",
            serde_json::json!({"policy": "affinity", "tenant": TENANT, "deletionPolicy": "Delete"}),
        );
        let erred = h
            .converge("web", reason_is("Ready", "Erred"))
            .await
            .unwrap();
        let old = erred.status.unwrap().uuid.unwrap();
        h.sim.waldur_delete(&old).unwrap();
        h.sim.drop_answers_after_commit(Some("create"), 1);
        let mut made = false;
        for _ in 0..200 {
            let _ = h.reconcile("web").await;
            if h.sim
                .groups()
                .iter()
                .any(|g| g["uuid"].as_str() != Some(old.as_str()))
            {
                made = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(made, "{mode:?}: the recreate reached Waldur");
        h.kube.delete(PLURAL, NS, "web");
        h.converge("web", |sg| sg.is_none()).await;
        assert!(
            h.sim.groups().is_empty(),
            "{mode:?}: the group the lost recreate made is left: {:?}",
            h.sim.groups()
        );
    }
}

/// The fault campaign's R6 (seed 2): twins (one tenant and name) are created; the first one's
/// create is committed in Waldur but its answer is lost, and the second one looks next. The
/// group is young and well named, but the second twin never asked Waldur for it: it must not
/// take it. The first binds its own group; the second reports AlreadyManaged.
#[tokio::test]
async fn a_twin_never_takes_the_group_its_siblings_lost_create_made() {
    use support::{Harness, TENANT, is_ready, reason_is};
    for mode in [ReadPath::Batched, ReadPath::PerObject] {
        let h = Harness::fast_mode(mode).await;
        let spec = serde_json::json!({"policy": "affinity", "tenant": TENANT, "name": "tw"});
        h.apply("a", spec.clone());
        h.apply("b", spec);
        h.sim.drop_answers_after_commit(Some("create"), 1);
        assert!(
            h.reconcile("a").await.is_err(),
            "{mode:?}: a's answer was lost"
        );
        let made = h.sim.groups();
        assert_eq!(made.len(), 1, "{mode:?}");
        let _ = h.reconcile("b").await;
        let b = h.sg("b").unwrap();
        assert_ne!(
            b.status.as_ref().and_then(|s| s.uuid.as_deref()),
            made[0]["uuid"].as_str(),
            "{mode:?}: b took a's group"
        );
        let a = h.converge("a", is_ready).await.unwrap();
        assert_eq!(a.status.unwrap().uuid.as_deref(), made[0]["uuid"].as_str());
        h.converge("b", reason_is("Ready", "AlreadyManaged")).await;
        assert_eq!(h.sim.groups().len(), 1, "{mode:?}: one group");
    }
}

/// The fault campaign's seed 105: a group deleted out of band is made anew; the create is
/// committed but its answer lost; the next reconcile starts from a cache that has not yet
/// delivered the create intent written before the POST. It must not write a newer intent over
/// the standing one (the group would then look older than the intent, not its own, and the
/// resource would end InvalidSpec beside a group nobody holds): it waits for a fresh view, and
/// then binds the group its lost create made.
#[tokio::test]
async fn a_stale_view_never_replaces_the_standing_create_intent() {
    use support::{Harness, TENANT, condition, is_ready};
    for mode in [ReadPath::Batched, ReadPath::PerObject] {
        let h = Harness::fast_mode(mode).await;
        h.apply(
            "web",
            serde_json::json!({"policy": "affinity", "tenant": TENANT, "deletionPolicy": "Orphan"}),
        );
        let first = h.converge("web", is_ready).await.unwrap().status.unwrap();
        h.sim.waldur_delete(first.uuid.as_deref().unwrap()).unwrap();
        h.sim.drop_answers_after_commit(Some("create"), 1);
        // Reconcile until the new group's create is committed; keep the view from before it.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let stale = loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{mode:?}: no recreate"
            );
            let before = h.sg("web").unwrap();
            let _ = h.reconcile("web").await;
            if h.sim.requests("create") == 2 {
                break before;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        };
        for _ in 0..3 {
            let _ = h.reconcile_as_cached(stale.clone()).await;
        }
        let sg = h.sg("web").unwrap();
        let (_, reason, message) = condition(&sg, "Ready").unwrap();
        assert_ne!(reason, "InvalidSpec", "{mode:?}: {message}");
        let after = h.converge("web", is_ready).await.unwrap().status.unwrap();
        let groups = h.sim.groups();
        assert_eq!(groups.len(), 1, "{mode:?}: {groups:?}");
        assert_eq!(
            after.uuid.as_deref(),
            groups[0]["uuid"].as_str(),
            "{mode:?}"
        );
    }
}

mod reimport {
    //! A group that vanished from Waldur while OpenStack may hold it (an unlink) is made anew
    //! only on evidence, and a deletion meanwhile never lets it go (review N2, M2, E1, E2).

    use std::time::Duration;

    use crate::support::{Harness, NS, PLURAL, TENANT, condition, is_ready, reason_is};
    use waldur_operator::controller::index::ReadPath;
    use waldur_operator::waldur::WaldurUuid;
    use waldur_sim::SimConfig;

    fn fast() -> SimConfig {
        SimConfig {
            delays: waldur_sim::Delays::fast(),
            ..Default::default()
        }
    }

    fn spec() -> serde_json::Value {
        serde_json::json!({"policy": "affinity", "tenant": TENANT, "deletionPolicy": "Delete"})
    }

    /// Ready, then a staff user unlinks its group: Waldur's record goes, Nova keeps the group.
    async fn unlinked(h: &Harness) -> waldur_operator::api::ServerGroupStatus {
        h.apply("web", spec());
        let before = h.converge("web", is_ready).await.unwrap().status.unwrap();
        let uuid = WaldurUuid::parse(before.uuid.as_deref().unwrap()).unwrap();
        h.staff_client().unlink(&uuid).await.unwrap();
        before
    }

    fn nova_groups(h: &Harness) -> usize {
        h.sim.openstack_groups(TENANT).len()
    }

    /// Reconciles `name` for `for_` (as requeues would), returning the last status.
    async fn keep_reconciling(h: &Harness, name: &str, for_: Duration) {
        let until = tokio::time::Instant::now() + for_;
        while tokio::time::Instant::now() < until {
            let _ = h.reconcile(name).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// E1: deleted while its group awaits re-import, a Delete-policy resource keeps its
    /// finalizer (saying why), and deletes the group once Waldur re-imported it: nothing is
    /// left in Waldur or OpenStack. Before the fix it was released with no DELETE at all.
    #[tokio::test]
    async fn a_deletion_waits_for_the_group_to_come_back_and_deletes_it() {
        for mode in [ReadPath::Batched, ReadPath::PerObject] {
            let h = Harness::fast_mode(mode).await;
            // The re-sync runs only when the test says: the deletion must wait for it.
            h.sim.set_tenant_pull_delay(None);
            unlinked(&h).await;
            h.kube.delete(PLURAL, NS, "web");
            keep_reconciling(&h, "web", Duration::from_secs(3)).await;
            let waiting = h.sg("web").expect("the finalizer holds it");
            let (_, reason, message) = condition(&waiting, "Ready").unwrap();
            assert_eq!(reason, "Deleting", "{mode:?}: {message}");
            assert!(message.contains("come back"), "{mode:?}: {message}");
            assert_eq!(h.sim.requests("delete"), 0, "{mode:?}");
            h.sim.release_tenant_pulls();
            h.converge("web", |sg| sg.is_none()).await;
            assert!(h.sim.groups().is_empty(), "{mode:?}: {:?}", h.sim.groups());
            assert_eq!(
                nova_groups(&h),
                0,
                "{mode:?}: the Nova group is deleted too"
            );
        }
    }

    /// E2 and the re-sync running 45 s or 10 minutes late (here: until the test lets it run,
    /// far past --reimport-wait, which is 2 s in this harness): the group is waited for, never
    /// made twice, and bound again under its new UUID.
    #[tokio::test]
    async fn a_late_re_sync_never_makes_a_second_group() {
        for mode in [ReadPath::Batched, ReadPath::PerObject] {
            let h = Harness::fast_mode(mode).await;
            h.sim.set_tenant_pull_delay(None);
            let before = unlinked(&h).await;
            keep_reconciling(&h, "web", Duration::from_secs(4)).await;
            let waiting = h.sg("web").unwrap();
            assert_eq!(condition(&waiting, "Ready").unwrap().1, "Reimporting");
            assert_eq!(h.sim.requests("create"), 1, "{mode:?}: no second group");
            assert_eq!(
                h.sim.requests("pull_server_groups"),
                1,
                "{mode:?}: one re-sync asked for, not one per reconcile"
            );
            h.sim.release_tenant_pulls();
            let after = h
                .converge("web", |sg| {
                    is_ready(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
                })
                .await
                .unwrap()
                .status
                .unwrap();
            assert_eq!(
                after.backend_id, before.backend_id,
                "{mode:?}: the same Nova group"
            );
            assert_eq!(h.sim.requests("create"), 1, "{mode:?}");
            assert_eq!(nova_groups(&h), 1, "{mode:?}");
        }
    }

    /// A re-sync that fails in OpenStack leaves the tenant Erred: the resource says so
    /// (TenantErred, with Waldur's message), makes nothing, and once staff repair the tenant
    /// asks again: the group comes back, still one in Nova.
    #[tokio::test]
    async fn a_failed_re_sync_is_reported_as_the_tenant_erred_and_asked_again_after_repair() {
        for mode in [ReadPath::Batched, ReadPath::PerObject] {
            let h = Harness::fast_mode(mode).await;
            h.sim.fail_next_tenant_pulls(1);
            let before = unlinked(&h).await;
            let erred = h
                .converge("web", reason_is("Ready", "TenantErred"))
                .await
                .unwrap();
            let message = condition(&erred, "Ready").unwrap().2;
            assert!(
                message.contains("500"),
                "{mode:?}: Waldur's message: {message}"
            );
            assert!(
                h.kube
                    .event_reasons("web")
                    .contains(&"TenantErred".to_string())
            );
            keep_reconciling(&h, "web", Duration::from_secs(2)).await;
            assert_eq!(
                h.sim.requests("create"),
                1,
                "{mode:?}: nothing made meanwhile"
            );
            h.sim.set_tenant_ok(TENANT, true);
            let after = h
                .converge("web", |sg| {
                    is_ready(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
                })
                .await
                .unwrap()
                .status
                .unwrap();
            assert_eq!(after.backend_id, before.backend_id, "{mode:?}");
            assert_eq!(h.sim.requests("create"), 1, "{mode:?}");
            assert_eq!(nova_groups(&h), 1, "{mode:?}");
        }
    }

    /// The campaign's R9 (seed 14): the re-sync fails in OpenStack and staff set the tenant
    /// OK before the operator looks again. The tenant then looks exactly as after a re-sync
    /// that ran, so one re-sync without the group is not evidence enough: a second one must
    /// agree. Here the second brings the group back: rebound, one Nova group, nothing made.
    #[tokio::test]
    async fn a_failed_re_sync_repaired_between_two_looks_is_not_taken_for_one_that_ran() {
        for mode in [ReadPath::Batched, ReadPath::PerObject] {
            let h = Harness::with_settings(fast(), mode, |s| {
                s.tenant_pull_floor = Duration::from_secs(1);
            })
            .await;
            h.sim.fail_next_tenant_pulls(1);
            let before = unlinked(&h).await;
            // The operator asks for the re-sync ...
            let until = tokio::time::Instant::now() + Duration::from_secs(5);
            while h.sim.requests("pull_server_groups") == 0 {
                assert!(
                    tokio::time::Instant::now() < until,
                    "{mode:?}: no re-sync asked"
                );
                let _ = h.reconcile("web").await;
            }
            // ... it fails (the tenant Erred), and staff repair the tenant before the next look.
            let until = tokio::time::Instant::now() + Duration::from_secs(5);
            let erred = |t: serde_json::Value| {
                t["state"]
                    .as_str()
                    .unwrap_or("")
                    .eq_ignore_ascii_case("erred")
            };
            while !erred(h.sim.tenant(TENANT).unwrap()) {
                assert!(tokio::time::Instant::now() < until, "{mode:?}: never Erred");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            h.sim.set_tenant_ok(TENANT, true);
            let after = h
                .converge("web", |sg| {
                    is_ready(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
                })
                .await
                .unwrap()
                .status
                .unwrap();
            assert_eq!(
                after.backend_id, before.backend_id,
                "{mode:?}: rebound to its own Nova group, not a new one"
            );
            assert_eq!(h.sim.requests("create"), 1, "{mode:?}: nothing made");
            assert_eq!(nova_groups(&h), 1, "{mode:?}: one Nova group");
        }
    }

    /// The campaign's seed 146: two re-syncs in a row fail in OpenStack, each repaired by
    /// staff 1.5 s later, before the operator's next look: from the tenant's state alone they
    /// look like two that ran. The operator follows each re-sync it asked for (the tenant read
    /// once a second), sees them fail, and makes nothing; the third runs and brings the group
    /// back.
    #[tokio::test]
    async fn two_failed_re_syncs_repaired_between_looks_make_no_group() {
        for mode in [ReadPath::Batched, ReadPath::PerObject] {
            let h = Harness::with_settings(fast(), mode, |s| {
                s.tenant_pull_floor = Duration::from_secs(1);
            })
            .await;
            h.sim.fail_next_tenant_pulls(2);
            let before = unlinked(&h).await;
            let erred = |t: serde_json::Value| {
                t["state"]
                    .as_str()
                    .unwrap_or("")
                    .eq_ignore_ascii_case("erred")
            };
            for n in 1..=2 {
                let until = tokio::time::Instant::now() + Duration::from_secs(15);
                while !erred(h.sim.tenant(TENANT).unwrap()) {
                    assert!(
                        tokio::time::Instant::now() < until,
                        "{mode:?}: failure {n} never came"
                    );
                    let _ = h.reconcile("web").await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
                h.sim.set_tenant_ok(TENANT, true);
            }
            let after = h
                .converge("web", |sg| {
                    is_ready(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
                })
                .await
                .unwrap()
                .status
                .unwrap();
            assert_eq!(after.backend_id, before.backend_id, "{mode:?}: rebound");
            assert_eq!(h.sim.requests("create"), 1, "{mode:?}: nothing made");
            assert_eq!(nova_groups(&h), 1, "{mode:?}: one Nova group");
        }
    }

    /// With automatic tenant re-syncs off, only Waldur's periodic re-sync brings the group
    /// back: no request is made, nothing is created meanwhile, and the group is rebound.
    #[tokio::test]
    async fn with_re_syncs_off_the_periodic_re_sync_brings_it_back() {
        for mode in [ReadPath::Batched, ReadPath::PerObject] {
            let h = Harness::with_settings(fast(), mode, |s| {
                s.tenant_pulls = false;
                s.reimport_wait = Duration::from_secs(3600);
            })
            .await;
            let before = unlinked(&h).await;
            keep_reconciling(&h, "web", Duration::from_secs(2)).await;
            assert_eq!(h.sim.requests("pull_server_groups"), 0, "{mode:?}");
            assert_eq!(h.sim.requests("create"), 1, "{mode:?}");
            h.sim.resync_now().await;
            let after = h
                .converge("web", |sg| {
                    is_ready(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
                })
                .await
                .unwrap()
                .status
                .unwrap();
            assert_eq!(after.backend_id, before.backend_id, "{mode:?}");
            assert_eq!(nova_groups(&h), 1, "{mode:?}");
        }
    }

    /// The campaign's seed 16: twins; the bound one's group is unlinked and awaits the
    /// re-sync. The free name must not be taken by the other twin meanwhile: Waldur's
    /// re-import brings the group back under its old name whatever holds the name by then,
    /// and both twins would end bound to a group of the name each. The other twin waits
    /// (AlreadyManaged); the first rebinds its own Nova group; one group in Nova.
    #[tokio::test]
    async fn a_twin_waits_while_its_siblings_group_awaits_re_import() {
        for mode in [ReadPath::Batched, ReadPath::PerObject] {
            let h = Harness::fast_mode(mode).await;
            let twin = serde_json::json!({"policy": "affinity", "tenant": TENANT, "name": "tw"});
            h.apply("a", twin.clone());
            let before = h.converge("a", is_ready).await.unwrap().status.unwrap();
            h.apply("b", twin);
            h.converge("b", reason_is("Ready", "AlreadyManaged")).await;
            h.sim.set_tenant_pull_delay(None);
            let uuid = WaldurUuid::parse(before.uuid.as_deref().unwrap()).unwrap();
            h.staff_client().unlink(&uuid).await.unwrap();
            let until = tokio::time::Instant::now() + Duration::from_secs(3);
            while tokio::time::Instant::now() < until {
                let _ = h.reconcile("b").await;
                let _ = h.reconcile("a").await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(h.sim.requests("create"), 1, "{mode:?}: b made no group");
            let b = h.sg("b").unwrap();
            let (_, reason, message) = condition(&b, "Ready").unwrap();
            assert_eq!(reason, "AlreadyManaged", "{mode:?}: {message}");
            assert!(message.contains("come back"), "{mode:?}: {message}");
            h.sim.release_tenant_pulls();
            let after = h
                .converge("a", |sg| {
                    is_ready(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
                })
                .await
                .unwrap()
                .status
                .unwrap();
            assert_eq!(
                after.backend_id, before.backend_id,
                "{mode:?}: a's own group"
            );
            h.converge("b", reason_is("Ready", "AlreadyManaged")).await;
            assert_eq!(h.sim.requests("create"), 1, "{mode:?}");
            assert_eq!(nova_groups(&h), 1, "{mode:?}: one Nova group");
        }
    }

    /// The campaign's seed 117: someone deletes the group in Waldur and, before Waldur's
    /// worker runs the deletion, a staff user unlinks it: the row goes, the Nova group stays.
    /// A 404 after a deletion this operator did not ask for is no proof that OpenStack lost
    /// the group: the re-sync brings it back and it is rebound, not made twice.
    #[tokio::test]
    async fn a_group_unlinked_while_someone_elses_delete_was_pending_is_rebound() {
        for mode in [ReadPath::Batched, ReadPath::PerObject] {
            // Waldur's worker takes a second to start the deletion: time for the unlink.
            let slow_worker = SimConfig {
                delays: waldur_sim::Delays {
                    schedule: Duration::from_millis(1500),
                    run: Duration::from_millis(20),
                },
                ..Default::default()
            };
            let h = Harness::with_settings(slow_worker, mode, |_| {}).await;
            h.apply("web", spec());
            let before = h.converge("web", is_ready).await.unwrap().status.unwrap();
            let uuid = before.uuid.clone().unwrap();
            h.sim.set_tenant_pull_delay(None);
            h.sim.waldur_delete(&uuid).unwrap();
            h.converge("web", |sg| {
                sg.and_then(|s| s.status.as_ref()?.state.clone()).as_deref()
                    == Some("DELETION_SCHEDULED")
            })
            .await;
            h.staff_client()
                .unlink(&WaldurUuid::parse(&uuid).unwrap())
                .await
                .unwrap();
            keep_reconciling(&h, "web", Duration::from_secs(2)).await;
            assert_eq!(h.sim.requests("create"), 1, "{mode:?}: nothing made yet");
            h.sim.release_tenant_pulls();
            let after = h
                .converge("web", |sg| {
                    is_ready(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
                })
                .await
                .unwrap()
                .status
                .unwrap();
            assert_eq!(after.backend_id, before.backend_id, "{mode:?}: rebound");
            assert_eq!(h.sim.requests("create"), 1, "{mode:?}");
            assert_eq!(nova_groups(&h), 1, "{mode:?}: one Nova group");
        }
    }

    /// The campaign's seeds 124 and 128: an imported group (Managed, Delete) is unlinked and
    /// the resource deleted at once. Its spec names no tenant, but its group's tenant is known
    /// from status: the deletion waits for the re-import and deletes the group, in Nova too.
    #[tokio::test]
    async fn deleting_an_unlinked_imported_group_waits_for_it_and_deletes_it() {
        for mode in [ReadPath::Batched, ReadPath::PerObject] {
            let h = Harness::fast_mode(mode).await;
            let uuid = h.sim.waldur_create(TENANT, "theirs", "affinity").unwrap();
            h.apply(
                "imp",
                serde_json::json!({"import": {"uuid": uuid}, "deletionPolicy": "Delete"}),
            );
            h.converge("imp", is_ready).await;
            h.sim.set_tenant_pull_delay(None);
            h.staff_client()
                .unlink(&WaldurUuid::parse(&uuid).unwrap())
                .await
                .unwrap();
            h.kube.delete(PLURAL, NS, "imp");
            let until = tokio::time::Instant::now() + Duration::from_secs(2);
            while tokio::time::Instant::now() < until {
                assert!(
                    h.sg("imp").is_some(),
                    "{mode:?}: released while its group may come back"
                );
                let _ = h.reconcile("imp").await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let waiting = h.sg("imp").expect("the finalizer holds it");
            let (_, reason, message) = condition(&waiting, "Ready").unwrap();
            assert_eq!(reason, "Deleting", "{mode:?}: {message}");
            h.sim.release_tenant_pulls();
            h.converge("imp", |sg| sg.is_none()).await;
            assert!(h.sim.groups().is_empty(), "{mode:?}: {:?}", h.sim.groups());
            assert_eq!(nova_groups(&h), 0, "{mode:?}: deleted in Nova too");
        }
    }

    /// The campaign's seed 142: a Nova group of the name that this process did not let go of
    /// (left by another operator, or before a restart) is in the tenant; a resource's group is
    /// unlinked before its Nova id reached status, so it is looked for by name after the
    /// re-sync, which brings both back. Nothing tells which is its own: it binds neither and
    /// says so (binding the other one would delete it with the Delete policy later).
    #[tokio::test]
    async fn two_groups_of_the_name_coming_back_are_not_told_apart_by_guessing() {
        // Per object: on the batched path a sweep may have seen the group OK with its Nova
        // id before the unlink, and the resource then rebinds it by that id (as it should).
        for mode in [ReadPath::PerObject] {
            let h = Harness::fast_mode(mode).await;
            let other = h.sim.openstack_create(TENANT, "tw", "affinity");
            h.apply(
                "b",
                serde_json::json!({"policy": "affinity", "tenant": TENANT, "name": "tw", "deletionPolicy": "Delete"}),
            );
            h.sim.set_tenant_pull_delay(None);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while h.sim.requests("create") < 1 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{mode:?}: b never created"
                );
                let _ = h.reconcile("b").await;
            }
            let b = h.sg("b").unwrap().status.unwrap_or_default();
            assert_eq!(
                b.backend_id.as_deref().unwrap_or(""),
                "",
                "{mode:?}: not seen yet"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
            let uuid = WaldurUuid::parse(&h.bound_uuid("b").unwrap()).unwrap();
            h.staff_client().unlink(&uuid).await.unwrap();
            keep_reconciling(&h, "b", Duration::from_secs(1)).await;
            h.sim.release_tenant_pulls();
            keep_reconciling(&h, "b", Duration::from_secs(3)).await;
            let b = h.sg("b").unwrap();
            let leftover = h
                .sim
                .groups()
                .into_iter()
                .find(|g| g["backend_id"].as_str() == Some(other.as_str()))
                .expect("the other Nova group imported");
            assert_ne!(
                b.status.as_ref().and_then(|s| s.uuid.as_deref()),
                leftover["uuid"].as_str(),
                "{mode:?}: b took the other group"
            );
            let (_, reason, message) = condition(&b, "Ready").unwrap();
            assert_eq!(reason, "Reimporting", "{mode:?}: {message}");
            assert!(message.contains("several groups"), "{mode:?}: {message}");
        }
    }

    /// A group really gone (deleted in OpenStack too) is made anew once the re-sync shows it
    /// will not come back; and the user can skip the wait with request-recreate.
    #[tokio::test]
    async fn a_group_gone_for_good_is_made_anew_after_the_re_sync_or_on_request() {
        for mode in [ReadPath::Batched, ReadPath::PerObject] {
            let h = Harness::fast_mode(mode).await;
            let before = unlinked(&h).await;
            h.sim
                .openstack_delete(before.backend_id.as_deref().unwrap());
            let after = h
                .converge("web", |sg| {
                    is_ready(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
                })
                .await
                .unwrap()
                .status
                .unwrap();
            assert_ne!(
                after.backend_id, before.backend_id,
                "{mode:?}: a new Nova group"
            );
            assert!(
                h.kube
                    .event_reasons("web")
                    .contains(&"Recreated".to_string())
            );
            assert_eq!(nova_groups(&h), 1, "{mode:?}");
            assert_eq!(h.sim.requests("create"), 2, "{mode:?}: one more group");

            // Again, with no re-sync to be had (tenant re-syncs off, --reimport-wait an hour):
            // only the annotation makes it now.
            let h = Harness::with_settings(fast(), mode, |s| {
                s.tenant_pulls = false;
                s.reimport_wait = Duration::from_secs(3600);
            })
            .await;
            let before = unlinked(&h).await;
            h.sim
                .openstack_delete(before.backend_id.as_deref().unwrap());
            keep_reconciling(&h, "web", Duration::from_secs(2)).await;
            assert_eq!(
                h.sim.requests("create"),
                1,
                "{mode:?}: waiting, not creating"
            );
            h.kube.edit(PLURAL, NS, "web", |o| {
                o["metadata"]["annotations"]["openstack.waldur.com/request-recreate"] =
                    serde_json::json!("1");
            });
            h.converge("web", |sg| {
                is_ready(sg) && sg.unwrap().status.as_ref().unwrap().uuid != before.uuid
            })
            .await;
            assert_eq!(h.sim.requests("create"), 2, "{mode:?}");
            // The token is acted on once: the next vanishing waits again.
            assert_eq!(
                h.sg("web")
                    .unwrap()
                    .status
                    .unwrap()
                    .handled_requests
                    .unwrap()
                    .recreate
                    .as_deref(),
                Some("1")
            );
        }
    }
}

/// A tenant Erred in Waldur (a failed re-sync, say) refuses every create with 409: the
/// resource says so as TenantErred, with Waldur's message and what repairs it, not as a
/// create failure; once the tenant is repaired the group is made.
#[tokio::test]
async fn a_create_in_an_erred_tenant_reports_the_tenant() {
    use support::{Harness, TENANT, condition, is_ready, reason_is};
    let h = Harness::fast_mode(ReadPath::Batched).await;
    h.sim.set_tenant_ok(TENANT, false);
    h.apply(
        "web",
        serde_json::json!({"policy": "affinity", "tenant": TENANT}),
    );
    let sg = h
        .converge("web", reason_is("Ready", "TenantErred"))
        .await
        .unwrap();
    let (_, _, message) = condition(&sg, "Ready").unwrap();
    assert!(message.contains("staff"), "says what repairs it: {message}");
    assert_eq!(
        condition(&sg, "Synced").unwrap().0,
        "True",
        "not a reconcile failure"
    );
    assert!(h.sim.groups().is_empty());
    h.sim.set_tenant_ok(TENANT, true);
    h.converge("web", is_ready).await;
    assert_eq!(h.sim.groups().len(), 1);
}

/// Review N17: a spec the operator cannot act on (here a tenant that is not a UUID, which
/// only an older CRD lets in) gets no finalizer, so deleting it never waits on an operator
/// that cannot clean up.
#[tokio::test]
async fn a_spec_the_operator_cannot_act_on_gets_no_finalizer() {
    use support::{Harness, NS, PLURAL};
    let h = Harness::fast_mode(ReadPath::PerObject).await;
    h.apply(
        "bad",
        serde_json::json!({"policy": "affinity", "tenant": "not-a-uuid"}),
    );
    assert!(h.reconcile("bad").await.is_err());
    let sg = h.sg("bad").unwrap();
    assert!(sg.metadata.finalizers.unwrap_or_default().is_empty());
    h.kube.delete(PLURAL, NS, "bad");
    assert!(h.sg("bad").is_none(), "deleted at once");
}

/// Review m5: an imported group that goes away is NotFound, and the status no longer shows
/// the state, instances or count it had (STATE stayed OK before).
#[tokio::test]
async fn an_imported_group_that_went_away_shows_no_state() {
    use support::{Harness, TENANT, is_ready, reason_is};
    let h = Harness::fast_mode(ReadPath::PerObject).await;
    let uuid = h.sim.waldur_create(TENANT, "theirs", "affinity").unwrap();
    h.apply("imp", serde_json::json!({"import": {"uuid": uuid}}));
    let ready = h.converge("imp", is_ready).await.unwrap();
    assert_eq!(ready.status.unwrap().state.as_deref(), Some("OK"));
    h.sim.waldur_delete(&uuid).unwrap();
    let gone = h
        .converge("imp", |sg| {
            reason_is("Ready", "NotFound")(sg)
                && sg.unwrap().status.as_ref().unwrap().state.is_none()
        })
        .await
        .unwrap();
    assert_eq!(gone.status.unwrap().instance_count, None);
}

/// Review N7: a claim whose holder is gone (here: force-finalized, so its cleanup never ran)
/// is deleted by the claim janitor; the claim of a live holder stays.
#[tokio::test]
async fn the_claim_janitor_deletes_claims_whose_holder_is_gone() {
    use support::{Harness, NS, PLURAL, TENANT, is_ready};
    let h = Harness::fast_mode(ReadPath::PerObject).await;
    // Imported groups: a group the operator makes itself is claimed in memory instead.
    let spec = |name: &str| {
        let uuid = h.sim.waldur_create(TENANT, name, "affinity").unwrap();
        serde_json::json!({"import": {"uuid": uuid}, "managementPolicy": "Managed"})
    };
    h.apply("gone", spec("gone"));
    h.apply("live", spec("live"));
    h.converge("gone", is_ready).await;
    h.converge("live", is_ready).await;
    let claims = || h.kube.list("leases").len();
    assert_eq!(claims(), 2, "one claim per bound group");
    // Force-finalized: the finalizer removed by hand, then deleted.
    h.kube.edit(PLURAL, NS, "gone", |o| {
        o["metadata"]["finalizers"] = serde_json::json!([]);
    });
    h.kube.delete(PLURAL, NS, "gone");
    h.reconcile("live").await.unwrap();
    let released = waldur_operator::controller::claims::release_orphaned(
        &h.ctx.kube,
        &h.ctx.claims_namespace,
        &h.ctx.store,
        waldur_operator::sharding::Shard::ALL,
    )
    .await
    .unwrap();
    assert_eq!(released, 1);
    assert_one_claim_held_by(&h, "/live/");
}

/// There is one claim Lease, and `who` (`/name/`) holds it.
fn assert_one_claim_held_by(h: &support::Harness, who: &str) {
    let leases = h.kube.list("leases");
    assert_eq!(leases.len(), 1, "{leases:?}");
    let holder = leases[0]["spec"]["holderIdentity"].as_str().unwrap();
    assert!(holder.contains(who), "{leases:?}");
}

/// Issue 21: a group the operator creates is claimed in this process's memory, not with a
/// Lease (one Kubernetes write less per resource), and the claim still holds: a resource that
/// imports the new group before the creator's status reaches the cache is told who holds it.
#[tokio::test]
async fn a_created_group_is_claimed_without_a_lease_and_a_twin_still_cannot_bind_it() {
    use support::{Harness, TENANT, is_ready, reason_is};
    let h = Harness::fast_mode(ReadPath::PerObject).await;
    h.apply(
        "maker",
        serde_json::json!({"policy": "affinity", "tenant": TENANT, "name": "made"}),
    );
    let before = h.sg("maker").unwrap();
    h.converge("maker", is_ready).await.unwrap();
    assert_eq!(h.kube.list("leases").len(), 0, "no Lease for a creation");
    let made = h.sim.groups();
    let uuid = made[0]["uuid"].as_str().unwrap().to_string();
    h.apply(
        "importer",
        serde_json::json!({"import": {"uuid": uuid}, "managementPolicy": "Managed"}),
    );
    // The cache still has the maker as it was before its status named the group.
    let mut stale = before;
    stale.metadata.finalizers = h.sg("maker").unwrap().metadata.finalizers;
    h.reconcile_others_as_cached("importer", stale).await.ok();
    let importer = h.sg("importer").unwrap();
    assert!(
        reason_is("Ready", "AlreadyManaged")(Some(&importer)),
        "{:?}",
        importer.status
    );
    let message = support::condition(&importer, "Ready").unwrap().2;
    assert!(message.contains("maker"), "{message}");
}

/// Issue 21: a sharded operator claims its creations with a Lease: another shard's twin can
/// only learn of the claim there.
#[tokio::test]
async fn a_sharded_operator_claims_its_creations_with_a_lease() {
    use support::{Harness, TENANT, is_ready};
    let config = waldur_sim::SimConfig {
        delays: waldur_sim::Delays::fast(),
        ..Default::default()
    };
    let shard = waldur_operator::sharding::Shard { index: 0, total: 2 };
    let h = Harness::with_context(
        config,
        ReadPath::PerObject,
        |_| {},
        |ctx| ctx.with_shard(shard),
    )
    .await;
    h.apply(
        "maker",
        serde_json::json!({"policy": "affinity", "tenant": TENANT, "name": "made"}),
    );
    h.converge("maker", is_ready).await.unwrap();
    assert_one_claim_held_by(&h, "/maker/");
}

/// Deleting a resource whose group this process created (and claimed in memory, without a
/// Lease) reads no claim Lease: one Kubernetes request less per deletion. After a restart the
/// memory is gone, and the Lease is read as before.
#[tokio::test]
async fn deleting_a_group_created_here_reads_no_claim_lease_until_a_restart() {
    use support::{Harness, NS, PLURAL, TENANT, is_ready};
    let h = Harness::fast_mode(ReadPath::PerObject).await;
    for name in ["kept", "restarted"] {
        h.apply(
            name,
            serde_json::json!({"policy": "affinity", "tenant": TENANT, "name": name}),
        );
        h.converge(name, is_ready).await.unwrap();
    }
    let reads = h.kube.reads("leases");
    h.kube.delete(PLURAL, NS, "kept");
    h.converge("kept", |sg| sg.is_none()).await;
    assert_eq!(h.kube.reads("leases"), reads, "no claim Lease read");

    let restarted = h.sg("restarted").unwrap();
    h.ctx
        .held_here
        .forget_holder(restarted.metadata.uid.as_deref().unwrap());
    h.kube.delete(PLURAL, NS, "restarted");
    h.converge("restarted", |sg| sg.is_none()).await;
    assert!(h.kube.reads("leases") > reads, "the Lease is read");
    assert!(h.sim.groups().is_empty());
}

/// An imported group's claim is a Lease as well as memory: deleting the importer releases the
/// Lease, even when the same resource claimed the group without one since.
#[tokio::test]
async fn deleting_an_importer_releases_its_claim_lease() {
    use support::{Harness, NS, PLURAL, TENANT, is_ready};
    let h = Harness::fast_mode(ReadPath::PerObject).await;
    let uuid = h.sim.waldur_create(TENANT, "old", "affinity").unwrap();
    h.apply(
        "importer",
        serde_json::json!({"import": {"uuid": uuid}, "managementPolicy": "Managed"}),
    );
    h.converge("importer", is_ready).await.unwrap();
    assert_one_claim_held_by(&h, "/importer/");
    // The same resource claims the group again without a Lease (as a create's recovery
    // would): the Lease it holds must still go with it.
    let importer = h.sg("importer").unwrap();
    let group = waldur_operator::waldur::WaldurUuid::parse(&uuid).unwrap();
    let _ = h
        .ctx
        .held_here
        .claim(&group, &importer, &h.ctx.store, false);
    h.kube.delete(PLURAL, NS, "importer");
    h.converge("importer", |sg| sg.is_none()).await;
    assert_eq!(h.kube.list("leases").len(), 0, "the claim Lease went");
}

/// Review N13: a reconcile still in flight for an object that was deleted and created again
/// under the same name (Observe has no finalizer; Argo CD's Replace) never writes the old
/// object's status into the new one: the status write carries the uid as a precondition.
#[tokio::test]
async fn a_status_write_never_lands_on_a_new_object_of_the_same_name() {
    use support::{Harness, NS, PLURAL, TENANT, is_ready};
    let h = Harness::fast_mode(ReadPath::PerObject).await;
    let first = h.sim.waldur_create(TENANT, "first", "affinity").unwrap();
    let second = h.sim.waldur_create(TENANT, "second", "affinity").unwrap();
    let observe =
        |uuid: &str| serde_json::json!({"import": {"uuid": uuid}, "managementPolicy": "Observe"});
    h.apply("obs", observe(&first));
    h.converge("obs", is_ready).await;
    let mut stale = h.sg("obs").unwrap();
    // Its status not yet written, as a reconcile that started before the first write.
    stale.status = None;
    h.kube.delete(PLURAL, NS, "obs");
    h.apply("obs", observe(&second));
    let _ = h.reconcile_as_cached(stale).await;
    let now = h.sg("obs").unwrap();
    assert_ne!(
        now.status.and_then(|s| s.uuid).as_deref(),
        Some(first.as_str()),
        "the old object's group was written into the new object"
    );
    let bound = h.converge("obs", is_ready).await.unwrap();
    assert_eq!(bound.status.unwrap().uuid.as_deref(), Some(second.as_str()));
}

/// The fault campaign's seed 110: a group an Orphan resource left holds the name. A second
/// resource of the name is told InvalidSpec (it met the group on its create's 400, so its
/// intent lists it as found there); a third must be told the same, not that the group was
/// "made for" the second, which made nothing (a false AlreadyManaged that never clears).
#[tokio::test]
async fn a_group_nobody_made_is_never_attributed_to_a_refused_create() {
    use support::{Harness, NS, PLURAL, TENANT, condition, is_ready, reason_is};
    for mode in [ReadPath::Batched, ReadPath::PerObject] {
        let h = Harness::fast_mode(mode).await;
        let spec = |policy: &str| serde_json::json!({"policy": "affinity", "tenant": TENANT, "name": "tw", "deletionPolicy": policy});
        h.apply("a", spec("Orphan"));
        h.converge("a", is_ready).await;
        h.kube.delete(PLURAL, NS, "a");
        h.converge("a", |sg| sg.is_none()).await;
        h.apply("b", spec("Delete"));
        h.converge("b", reason_is("Ready", "InvalidSpec")).await;
        h.apply("c", spec("Delete"));
        let c = h
            .converge("c", |sg| {
                sg.and_then(|s| condition(s, "Ready"))
                    .is_some_and(|c| c.1 == "InvalidSpec" || c.1 == "AlreadyManaged")
            })
            .await
            .unwrap();
        let (_, reason, message) = condition(&c, "Ready").unwrap();
        assert_eq!(reason, "InvalidSpec", "{mode:?}: {message}");
        assert!(
            message.contains("not managed by any ServerGroup"),
            "{mode:?}: {message}"
        );
    }
}

/// The fault campaign's seed 146: an Observe resource watches a group another resource
/// manages (imported, Managed): an observer only reads, so it binds it and is Ready, and the
/// managing resource is not told AlreadyManaged because of it either.
#[tokio::test]
async fn an_observer_watches_a_group_another_resource_manages() {
    use support::{Harness, TENANT, is_ready};
    for mode in [ReadPath::Batched, ReadPath::PerObject] {
        let h = Harness::fast_mode(mode).await;
        let uuid = h.sim.waldur_create(TENANT, "shared", "affinity").unwrap();
        let observe = serde_json::json!({"import": {"uuid": uuid}, "managementPolicy": "Observe"});
        let manage = serde_json::json!({"import": {"uuid": uuid}, "deletionPolicy": "Orphan"});
        h.apply("watcher", observe.clone());
        h.converge("watcher", is_ready).await;
        h.apply("owner", manage);
        h.converge("owner", is_ready).await;
        h.apply("watcher2", observe);
        let w = h.converge("watcher2", is_ready).await.unwrap();
        assert_eq!(
            w.status.unwrap().uuid.as_deref(),
            Some(uuid.as_str()),
            "{mode:?}"
        );
    }
}

/// The fault campaign's seed 154: an Unlink resource lets its group go (Nova keeps it); a
/// resource of the same name made afterwards loses its own group to an unlink before its Nova
/// id reached status, and its own never reached OpenStack. The re-sync brings back only the
/// first one's Nova group: that is not this resource's, and deleting this resource (policy
/// Delete) must leave it in Nova.
#[tokio::test]
async fn a_group_another_resource_let_go_of_is_never_taken_for_a_re_import() {
    use support::{Harness, NS, PLURAL, TENANT, is_ready};
    // Waldur's worker takes a second to start a create: time to unlink before Nova has it.
    let slow_worker = waldur_sim::SimConfig {
        delays: waldur_sim::Delays {
            schedule: std::time::Duration::from_millis(1500),
            run: std::time::Duration::from_millis(20),
        },
        ..Default::default()
    };
    let h = Harness::with_settings(slow_worker, ReadPath::PerObject, |_| {}).await;
    let spec = |policy: &str| serde_json::json!({"policy": "affinity", "tenant": TENANT, "name": "n", "deletionPolicy": policy});
    h.apply("first", spec("Unlink"));
    let first = h.converge("first", is_ready).await.unwrap().status.unwrap();
    h.kube.delete(PLURAL, NS, "first");
    h.converge("first", |sg| sg.is_none()).await;
    h.sim.set_tenant_pull_delay(None);
    h.apply("second", spec("Delete"));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.sim.requests("create") < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no second create");
        let _ = h.reconcile("second").await;
    }
    let uuid =
        waldur_operator::waldur::WaldurUuid::parse(&h.bound_uuid("second").unwrap()).unwrap();
    h.staff_client().unlink(&uuid).await.unwrap();
    h.sim.reset_tenant_pull_delay();
    h.sim.release_tenant_pulls();
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        let _ = h.reconcile("second").await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let leftover = h
        .sim
        .groups()
        .into_iter()
        .find(|g| g["backend_id"].as_str() == first.backend_id.as_deref());
    if let Some(leftover) = leftover {
        assert_ne!(
            h.sg("second").unwrap().status.unwrap().uuid.as_deref(),
            leftover["uuid"].as_str(),
            "second took first's leftover"
        );
    }
    h.kube.delete(PLURAL, NS, "second");
    h.converge("second", |sg| sg.is_none()).await;
    let nova = h.sim.openstack_groups(TENANT);
    assert!(
        nova.iter()
            .any(|(id, _, _)| Some(id.as_str()) == first.backend_id.as_deref()),
        "first's Nova group was deleted: {nova:?}"
    );
}

/// The fault campaign's seed 209: a resource told InvalidSpec is paused and unpaused; Synced
/// then says the rejection again, not "paused" for ever.
#[tokio::test]
async fn unpausing_a_rejected_resource_clears_paused() {
    use support::{Harness, NS, PLURAL, TENANT, condition, reason_is};
    let h = Harness::fast_mode(ReadPath::PerObject).await;
    h.sim.waldur_create(TENANT, "taken", "affinity").unwrap();
    h.apply(
        "web",
        serde_json::json!({"policy": "affinity", "tenant": TENANT, "name": "taken"}),
    );
    h.converge("web", reason_is("Ready", "InvalidSpec")).await;
    let annotate = |value: Option<&str>| {
        h.kube.edit(PLURAL, NS, "web", |o| match value {
            Some(v) => {
                o["metadata"]["annotations"]["openstack.waldur.com/paused"] = serde_json::json!(v)
            }
            None => {
                o["metadata"]["annotations"]
                    .as_object_mut()
                    .map(|a| a.remove("openstack.waldur.com/paused"));
            }
        })
    };
    annotate(Some("true"));
    h.converge("web", reason_is("Synced", "Paused")).await;
    annotate(None);
    let _ = h.reconcile("web").await;
    let sg = h.sg("web").unwrap();
    let synced = condition(&sg, "Synced").unwrap();
    assert_eq!(synced.1, "InvalidSpec", "{synced:?}");
}

/// As above, across a restart (the final run's seed 154: the operator was killed between the
/// Unlink and the re-sync, and an in-memory record was lost): the record of the released Nova
/// group is read from the operator's namespace, so the only group of the name that came back
/// is still not taken, and deleting the resource leaves it in Nova.
#[tokio::test]
async fn a_released_group_is_still_known_after_a_restart() {
    use support::{Harness, NS, PLURAL, TENANT};
    let slow_worker = waldur_sim::SimConfig {
        delays: waldur_sim::Delays {
            schedule: std::time::Duration::from_millis(1500),
            run: std::time::Duration::from_millis(20),
        },
        ..Default::default()
    };
    let h = Harness::with_settings(slow_worker, ReadPath::PerObject, |_| {}).await;
    // Released by an earlier process of the operator: recorded in its namespace only.
    let leftover = h.sim.openstack_create(TENANT, "n", "affinity");
    let tenant = waldur_operator::waldur::WaldurUuid::parse(TENANT).unwrap();
    waldur_operator::controller::released::record(
        &h.ctx.kube,
        &h.ctx.claims_namespace,
        &tenant,
        "n",
        &leftover,
    )
    .await
    .unwrap();
    h.sim.set_tenant_pull_delay(None);
    h.apply(
        "second",
        serde_json::json!({"policy": "affinity", "tenant": TENANT, "name": "n", "deletionPolicy": "Delete"}),
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.sim.requests("create") < 1 {
        assert!(tokio::time::Instant::now() < deadline, "no create");
        let _ = h.reconcile("second").await;
    }
    let uuid =
        waldur_operator::waldur::WaldurUuid::parse(&h.bound_uuid("second").unwrap()).unwrap();
    h.staff_client().unlink(&uuid).await.unwrap();
    h.sim.reset_tenant_pull_delay();
    h.sim.release_tenant_pulls();
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        let _ = h.reconcile("second").await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let row = h
        .sim
        .groups()
        .into_iter()
        .find(|g| g["backend_id"].as_str() == Some(leftover.as_str()))
        .expect("the leftover re-imported");
    assert_ne!(
        h.sg("second").unwrap().status.unwrap().uuid.as_deref(),
        row["uuid"].as_str(),
        "second took the released group"
    );
    h.kube.delete(PLURAL, NS, "second");
    h.converge("second", |sg| sg.is_none()).await;
    assert!(
        h.sim
            .openstack_groups(TENANT)
            .iter()
            .any(|(id, _, _)| *id == leftover),
        "the released Nova group was deleted"
    );
}

/// The final run's seed 154, once more: an Unlink resource deleted right after its create, its
/// status without the Nova id Waldur has by then. The record of the released Nova group is
/// made from the group as the cleanup read it, not from the older status.
#[tokio::test]
async fn a_group_let_go_of_before_its_nova_id_reached_status_is_recorded() {
    use support::{Harness, NS, PLURAL, TENANT};
    let h = Harness::fast_mode(ReadPath::PerObject).await;
    h.apply(
        "quick",
        serde_json::json!({"policy": "affinity", "tenant": TENANT, "deletionPolicy": "Unlink"}),
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.sim.requests("create") < 1 {
        assert!(tokio::time::Instant::now() < deadline, "no create");
        let _ = h.reconcile("quick").await;
    }
    let status = h.sg("quick").unwrap().status.unwrap_or_default();
    assert_eq!(
        status.backend_id.as_deref().unwrap_or(""),
        "",
        "not in status yet"
    );
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let nova = h.sim.groups()[0]["backend_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!nova.is_empty(), "Waldur has the Nova id");
    h.kube.delete(PLURAL, NS, "quick");
    h.converge("quick", |sg| sg.is_none()).await;
    let records: Vec<serde_json::Value> = h
        .kube
        .list("leases")
        .into_iter()
        .filter(|l| l["metadata"]["labels"]["openstack.waldur.com/released-nova"] == "true")
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        records[0]["metadata"]["annotations"]["openstack.waldur.com/backend-id"],
        nova.as_str()
    );
}

/// The campaign's seed 6 (credentials points, this session): a resource paused before its
/// group's Nova id reached status, then its group unlinked and the resource deleted. Waldur's
/// re-sync re-imported the group long before the resource was unpaused and noticed; the
/// re-import was older than that notice, so the by-name search passed over it, two re-syncs
/// "agreed" the group was gone, and the resource was let go with its group left in Waldur and
/// OpenStack. A re-import counts from the last time the group was seen, not from the notice.
#[tokio::test]
async fn a_group_re_imported_before_a_paused_resource_noticed_is_still_deleted() {
    use support::{Harness, NS, PLURAL, TENANT};
    let h = Harness::fast_mode(ReadPath::PerObject).await;
    h.apply(
        "late",
        serde_json::json!({"policy": "affinity", "tenant": TENANT, "deletionPolicy": "Delete"}),
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.sim.requests("create") < 1 {
        assert!(tokio::time::Instant::now() < deadline, "no create");
        let _ = h.reconcile("late").await;
    }
    h.kube.edit(PLURAL, NS, "late", |o| {
        o["metadata"]["annotations"]["openstack.waldur.com/paused"] = serde_json::json!("true");
    });
    let status = h.sg("late").unwrap().status.unwrap_or_default();
    assert_eq!(
        status.backend_id.as_deref().unwrap_or(""),
        "",
        "no Nova id in status"
    );
    let uuid = h.bound_uuid("late").unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.sim.group(&uuid).unwrap()["backend_id"]
        .as_str()
        .unwrap_or("")
        .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "never reached Nova");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    h.staff_client()
        .unlink(&waldur_operator::waldur::WaldurUuid::parse(&uuid).unwrap())
        .await
        .unwrap();
    // Waldur's periodic re-sync re-imports it at once; the resource stays paused for longer
    // than the clock slack the search allows (10 s), as seed 6's did for 35 s.
    let report = h.sim.resync_report();
    assert_eq!(report.imported.len(), 1, "re-imported");
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    h.kube.delete(PLURAL, NS, "late");
    h.kube.edit(PLURAL, NS, "late", |o| {
        if let Some(a) = o["metadata"]["annotations"].as_object_mut() {
            a.remove("openstack.waldur.com/paused");
        }
    });
    h.converge("late", |sg| sg.is_none()).await;
    assert!(
        h.sim.groups().is_empty(),
        "the re-import is deleted: {:?}",
        h.sim.groups()
    );
    assert!(
        h.sim.openstack_groups(TENANT).is_empty(),
        "and its Nova group"
    );
}

/// Reconciles `name` until `done` (at most 100 times, 20 ms apart): a deletion on the batched
/// path first waits for a sweep taken after it.
async fn reconcile_until(h: &support::Harness, name: &str, done: impl Fn() -> bool) {
    for _ in 0..100 {
        h.reconcile(name).await.unwrap();
        if done() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{name}: not done after 100 reconciles");
}
