//! Step 4, for a group that vanished from Waldur while OpenStack may still hold it: learn what
//! the tenant's re-sync did (following the re-syncs this process asked for), ask for one when
//! due, and make another group (or, deleting, let go) only on evidence.

use super::*;

impl Reconciler {
    /// A group that vanished and may come back: learn what the tenant's re-sync did, ask for
    /// one when due, and make a new group (or, deleting, let go) only on evidence.
    pub(super) async fn await_reimport(
        &self,
        client: &Waldur,
        tenant: &WaldurUuid,
        backend_id: &str,
        deleting: bool,
    ) -> Result<Located, Error> {
        let mut record = self
            .status()
            .reimport
            .filter(|r| r.backend_id == backend_id)
            .unwrap_or_else(|| crate::api::Reimport {
                backend_id: backend_id.to_string(),
                since: Some(self.now.clone()),
                requested_at: None,
                checked_at: None,
                last_seen: self.status().last_sync_time,
            });
        let seen = self.tenant_seen(client, tenant).await?;
        let pulls = self.ctx.tenant_pulls.seen(client.base_url(), tenant);
        let settings = &self.ctx.settings;
        let (step, accepted) =
            plan::reimport_step(&self.sg, &record, &seen, pulls, settings, self.now.0);
        if record.requested_at.is_none() {
            record.requested_at = accepted.map(Time);
        }
        if matches!(step, plan::ReimportStep::TenantErred { .. }) {
            // The re-sync failed (or the tenant broke meanwhile): it is no evidence, and once
            // the tenant is repaired a new one must run. Nothing accepted until now counts.
            record.since = Some(self.now.clone());
            record.requested_at = None;
            record.checked_at = None;
        }
        let what = if backend_id.is_empty() {
            format!("a group named {:?}", self.sg.waldur_name())
        } else {
            format!("its Nova group {backend_id}")
        };
        let waiting = |message: String, retry_in: Duration, asked: bool, record| {
            Ok(Located::AwaitingReimport(Awaiting {
                reimport: record,
                reason: ready_reason::REIMPORTING,
                message,
                retry_in,
                asked,
            }))
        };
        match step {
            plan::ReimportStep::AskPull => match self.ctx.tenant_pulls.ask(client, tenant).await? {
                crate::controller::tenant_pulls::Asked::Accepted(at) => {
                    record.requested_at = Some(Time(at));
                    let message = format!(
                        "the group is gone from Waldur, but OpenStack may still hold {what}: \
                             asked Waldur to re-sync tenant {tenant}, and the group is looked for \
                             again when the re-sync has run"
                    );
                    waiting(message, Duration::from_secs(3), true, record)
                }
                crate::controller::tenant_pulls::Asked::InFlight => waiting(
                    format!(
                        "the group is gone from Waldur; a re-sync of tenant {tenant} is being asked for"
                    ),
                    Duration::from_secs(5),
                    false,
                    record,
                ),
                crate::controller::tenant_pulls::Asked::Refused(e) => waiting(
                    format!(
                        "the group is gone from Waldur, and Waldur refused to re-sync tenant \
                             {tenant} now ({}); asking again in {:?}",
                        e.waldur_message(),
                        settings.tenant_pull_floor
                    ),
                    settings.tenant_pull_floor,
                    false,
                    record,
                ),
            },
            plan::ReimportStep::Failed(message) => {
                record.since = Some(self.now.clone());
                record.requested_at = None;
                record.checked_at = None;
                waiting(
                    format!(
                        "the group is gone from Waldur, but OpenStack may still hold {what}: {message}"
                    ),
                    settings.tenant_pull_floor.min(Duration::from_secs(60)),
                    false,
                    record,
                )
            }
            plan::ReimportStep::Recheck { observed } => {
                // The re-sync ran: read Waldur itself, never an older sweep's picture.
                let again = if backend_id.is_empty() {
                    plan::first_lookup_for_create(&self.sg)?
                } else {
                    Lookup::BackendId(backend_id.to_string())
                };
                let found = match &again {
                    // No Nova id known: Waldur's re-import carries the name (the campaign's R8).
                    Lookup::OwnCreation {
                        tenant,
                        name,
                        policy,
                    } => {
                        // Made (re-imported) after the group was last seen, which may be
                        // long before this resource noticed it gone (the campaign's seed 6).
                        let since = record
                            .last_seen
                            .as_ref()
                            .or(record.since())
                            .map_or(self.now.0, |t| t.0);
                        let candidates = client
                            .list(&ListQuery::new().tenant_uuid(tenant).name_exact(name))
                            .await?;
                        // What any process of this operator let go of in the tenant (the
                        // records survive restarts), remembered for the lookups that follow.
                        if !candidates.is_empty() {
                            let released = crate::controller::released::in_tenant(
                                &self.ctx.kube,
                                &self.ctx.claims_namespace,
                                tenant,
                            )
                            .await?;
                            for (n, b) in released {
                                self.ctx.tenant_pulls.record_release(tenant, &n, &b);
                            }
                        }
                        // Nobody's, and not a group another resource of this process let
                        // go of (an Unlink's Nova group comes back under its name).
                        let free: Vec<WaldurGroup> = candidates
                            .into_iter()
                            .filter(|g| self.owner_of(&g.uuid).is_none())
                            .filter(|g| {
                                !self
                                    .ctx
                                    .tenant_pulls
                                    .was_released(tenant, name, &g.backend_id)
                            })
                            .collect();
                        match plan::pick_reimport(&free, *policy, since) {
                            plan::Reimported::One(group) => Some(group.clone()),
                            plan::Reimported::Nothing => None,
                            plan::Reimported::Several(uuids) => {
                                return waiting(
                                    format!(
                                        "the group vanished before Waldur reported its Nova id, \
                                         and the re-sync brought back several groups named \
                                         {name:?} ({}): nothing tells which was this \
                                         resource's. Delete or unlink the others in Waldur (or \
                                         import the right one into another ServerGroup); this \
                                         resource binds the one that is left",
                                        uuids.join(", ")
                                    ),
                                    settings.resync_period.min(Duration::from_secs(300)),
                                    false,
                                    record,
                                );
                            }
                        }
                    }
                    _ => self.look_in_waldur(client, &again).await?,
                };
                let Some(group) = found else {
                    return match plan::after_empty_recheck(&record, observed, self.now.0) {
                        plan::EmptyRecheck::AskAgain(record) => waiting(
                            format!(
                                "Waldur re-synced tenant {tenant} and {what} did not come back; \
                                 a second re-sync must agree before it is taken for gone (one \
                                 that failed and was repaired meanwhile looks the same)"
                            ),
                            Duration::from_secs(5),
                            false,
                            record,
                        ),
                        plan::EmptyRecheck::Gone if deleting => Ok(Located::Gone(format!(
                            "Waldur re-synced tenant {tenant} twice and {what} did not come back"
                        ))),
                        plan::EmptyRecheck::Gone => {
                            self.leak_check_then_create(client, &again, true).await
                        }
                    };
                };
                self.bind(&again, group).await
            }
            plan::ReimportStep::Gone(why) if deleting => {
                // Not back after the wait says nothing when these credentials could not have
                // seen it come back (review m4).
                self.can_see_tenant_of_bound_group(client).await?;
                Ok(Located::Gone(why))
            }
            plan::ReimportStep::Gone(why) => {
                tracing::info!(%why, "a vanished group is made anew");
                self.leak_check_then_create(client, &Lookup::Uuid(WaldurUuid::default()), true)
                    .await
            }
            plan::ReimportStep::Wait { message, retry_in } => waiting(
                format!(
                    "the group is gone from Waldur, but OpenStack may still hold {what}: {message}"
                ),
                retry_in,
                false,
                record,
            ),
            plan::ReimportStep::TenantErred { message, retry_in } => {
                Ok(Located::AwaitingReimport(Awaiting {
                    reimport: record,
                    reason: ready_reason::TENANT_ERRED,
                    message,
                    retry_in,
                    asked: false,
                }))
            }
        }
    }

    /// The tenant's state, as far as these credentials can read it.
    pub(super) async fn tenant_seen(
        &self,
        client: &Waldur,
        tenant: &WaldurUuid,
    ) -> Result<plan::TenantSeen, Error> {
        match client.get_tenant(tenant).await {
            Ok(t) => Ok(plan::TenantSeen::of(t.state.as_ref(), &t.error_message)),
            Err(e) if e.is_not_found() => Ok(plan::TenantSeen::Invisible),
            Err(e) if matches!(e.kind(), ErrorKind::Unsupported | ErrorKind::Unexpected) => {
                Ok(plan::TenantSeen::Unknown)
            }
            Err(e) => Err(e.into()),
        }
    }
}
