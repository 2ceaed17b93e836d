//! Step 2: the deletion policy, carried out until the finalizer may go.

use super::*;

impl Reconciler {
    /// Step 2: the deletion policy.
    pub(super) async fn cleanup(&self) -> Result<Action, Error> {
        if !self.has_finalizer() {
            return Ok(Action::await_change());
        }
        let mut decision = plan::cleanup(&self.sg, None, self.now.0);
        let mut located: Option<WaldurGroup> = None;
        if decision == Cleanup::Locate {
            let client = self.waldur().await.map_err(deletion_waits)?;
            if self.deletion_read(&client) == plan::DeletionRead::WaitForSweep {
                if let Some(shard) = &client.shard {
                    shard.look_soon();
                }
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            let group = match self.locate(&client, true).await? {
                Located::Found(group, _) => Some(*group),
                // The group may come back (review N2): the finalizer stays until it is back
                // (and is deleted) or shown gone for good.
                Located::AwaitingReimport(waiting) => return self.awaiting(waiting).await,
                Located::Recorded => return Ok(Action::requeue(Duration::from_secs(1))),
                // The bound group is gone, but a create decided since may have made another.
                Located::NotFound(_) | Located::Gone(_) => {
                    self.own_creation_while_deleting(&client).await?
                }
                // Held by another resource: not ours to delete.
                Located::AlreadyManaged(_)
                | Located::Rejected(_)
                | Located::TenantBlocked { .. } => None,
            };
            decision = plan::cleanup(&self.sg, Some(group.as_ref()), self.now.0);
            if let Some(action) = self.carry_out(&client, &decision).await? {
                return Ok(action);
            }
            located = group;
        }
        // Here the finalizer may go: the decision was to release, or carrying it out finished
        // the job (an unlink done, a DELETE or pull answered 404). Waiting for another trigger
        // instead left a finished unlink holding its finalizer (found by the fault campaign).
        let reason = match &decision {
            Cleanup::Release { reason } => *reason,
            Cleanup::Unlink(_) => "unlinked: Waldur's record is gone, OpenStack keeps the group",
            _ => "the group is gone from Waldur",
        };
        self.remember_release(&decision, located.as_ref()).await?;
        // The bound group's claim, and the claim on a group found while deleting (a lost
        // create's): neither may outlive this resource.
        let found = located.as_ref().map(|g| g.uuid.clone());
        let mut claimed: Vec<WaldurUuid> = self.status_uuid().into_iter().collect();
        claimed.extend(found.filter(|f| !claimed.contains(f)));
        for uuid in &claimed {
            self.release_claim(uuid).await?;
        }
        self.remove_finalizer().await?;
        self.ctx
            .deletion_done(self.sg.metadata.uid.as_deref().unwrap_or_default());
        if let Some(reference) = &self.sg.spec.credentials_ref {
            crate::controller::secret_guard::release_if_unused(
                &self.ctx.kube,
                &self.ctx.store,
                &self.namespace(),
                &reference.name,
                self.sg.metadata.uid.as_deref(),
                &self.ctx.shard.secret_finalizer(),
            )
            .await?;
        }
        let event = match self.sg.spec.deletion_policy {
            crate::api::DeletionPolicy::Orphan => "Orphaned",
            crate::api::DeletionPolicy::Unlink => "Unlinked",
            crate::api::DeletionPolicy::Delete => "Deleted",
        };
        self.event(EventType::Normal, event, "Delete", reason).await;
        Ok(Action::await_change())
    }

    /// A create decided for this resource after its last binding (its intent still stands)
    /// may have made a group whose answer never came: that group is this resource's, and the
    /// deletion deletes it rather than letting go because the bound one is gone (the fault
    /// campaign's seed 393: a recreate timed out after Waldur committed it, and the resource
    /// was deleted at that moment). Found as a lost create is, by name, policy, description
    /// and a creation time after the intent.
    async fn own_creation_while_deleting(
        &self,
        client: &Waldur,
    ) -> Result<Option<WaldurGroup>, Error> {
        if plan::pending_intent(&self.sg).is_none() {
            return Ok(None);
        }
        let Ok(own) = plan::first_lookup_for_create(&self.sg) else {
            return Ok(None);
        };
        let Some(group) = self.look(client, &own).await? else {
            return Ok(None);
        };
        match self.bind(&own, group).await? {
            Located::Found(group, _) => Ok(Some(*group)),
            _ => Ok(None),
        }
    }

    /// An Orphan or Unlink resource lets go of a Nova group that stays: remembered, so that
    /// another resource's by-name search for its own re-import does not take it.
    async fn remember_release(
        &self,
        decision: &Cleanup,
        located: Option<&WaldurGroup>,
    ) -> Result<(), Error> {
        let keeps_nova = matches!(decision, Cleanup::Unlink(_))
            || self.sg.spec.deletion_policy != crate::api::DeletionPolicy::Delete;
        // The group as just read, else as status last recorded it: a group let go of right
        // after its create may have its Nova id in Waldur but not yet in status (the final
        // run's seed 154 again).
        let status = self.sg.status.clone().unwrap_or_default();
        let (tenant, name, backend_id) = match located {
            Some(g) => (
                Some(g.tenant_uuid.clone()).filter(|t| !t.as_str().is_empty()),
                g.name.clone(),
                g.backend_id.clone(),
            ),
            None => (
                status
                    .tenant_uuid
                    .as_deref()
                    .and_then(|t| WaldurUuid::parse(t).ok()),
                status.name.clone().unwrap_or_default(),
                status.backend_id.clone().unwrap_or_default(),
            ),
        };
        let Some(tenant) = tenant.or_else(|| {
            self.sg
                .spec
                .tenant
                .as_deref()
                .and_then(|t| WaldurUuid::parse(t).ok())
        }) else {
            return Ok(());
        };
        let (name, backend_id) = (name.as_str(), backend_id.as_str());
        if keeps_nova && !backend_id.is_empty() {
            // Kept a day in the operator's namespace (a restart must not forget it), and in
            // memory for the lookups that cannot wait for a list.
            crate::controller::released::record(
                &self.ctx.kube,
                &self.ctx.claims_namespace,
                &tenant,
                name,
                backend_id,
            )
            .await?;
            self.ctx
                .tenant_pulls
                .record_release(&tenant, name, backend_id);
        }
        Ok(())
    }

    /// Sends DELETE or unlink, or waits. `None` means the finalizer may go.
    pub(super) async fn carry_out(
        &self,
        client: &Waldur,
        decision: &Cleanup,
    ) -> Result<Option<Action>, Error> {
        match decision {
            Cleanup::Delete(uuid) => {
                match client.delete(uuid).await.inspect(|_| client.written(uuid)) {
                    // No Event: status says Deleting, and the Deleted Event follows when the
                    // group is gone (each Event is a Kubernetes write per resource).
                    Ok(()) => {
                        self.deleting_status(
                            "Waldur is deleting the group",
                            Some(State::DeletionScheduled.as_str()),
                        )
                        .await?;
                        Ok(Some(Action::requeue(SOON)))
                    }
                    Err(e) if e.is_not_found() => Ok(None),
                    // Busy with another operation: ask again shortly, on a picture taken after
                    // this answer.
                    Err(e) if e.kind() == ErrorKind::Conflict => {
                        client.written(uuid);
                        Ok(Some(Action::requeue(SOON)))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Cleanup::Unlink(uuid) => {
                match client.unlink(uuid).await.inspect(|_| client.written(uuid)) {
                    Ok(()) => {
                        self.event(
                            EventType::Normal,
                            "Unlinked",
                            "Delete",
                            &format!(
                                "removed Waldur's record of {uuid}; OpenStack keeps the group"
                            ),
                        )
                        .await;
                        Ok(None)
                    }
                    Err(e) if e.is_not_found() => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            Cleanup::Staff { uuid, request } => {
                let mut handled = self
                    .status()
                    .handled_requests
                    .map(|h| *h)
                    .unwrap_or_default();
                let result = self.staff_action(client, uuid, request, &mut handled).await;
                // Recorded whatever happened next, so a request carried out is never sent twice.
                self.write_status(true, |s| {
                    s.handled_requests = Some(Box::new(handled.clone()))
                        .filter(|h| **h != HandledRequests::default());
                })
                .await?;
                result?;
                Ok(Some(Action::requeue(SOON)))
            }
            Cleanup::Wait { state } => {
                // Being deleted says what the DELETE said: no write for each step of it.
                let deleting = matches!(
                    State::parse(state),
                    State::DeletionScheduled | State::Deleting
                );
                let message = if deleting {
                    "Waldur is deleting the group".to_string()
                } else {
                    format!("waiting for Waldur to finish ({state}) before deleting")
                };
                let shown =
                    plan::shown_state(self.status().state.as_deref(), Some(&State::parse(state)));
                self.deleting_status(&message, shown.as_deref()).await?;
                // Backing off like any transitional state (review m3): a group stuck in
                // DELETING is not read every 2 s for ever.
                Ok(Some(Action::requeue(plan::requeue_after(
                    &self.sg,
                    Some(&State::Deleting),
                    self.busy_for(),
                    &self.ctx.settings,
                    0.0,
                ))))
            }
            Cleanup::PullFirst {
                uuid,
                attempt,
                tenant,
            } => {
                // A tenant re-sync only when one may be asked for (on, OK, past the floor);
                // otherwise the group's own pull, which holds nothing but the group.
                let tenant = match tenant {
                    Some(t) => {
                        let pulls = self.ctx.tenant_pulls.seen(client.base_url(), t);
                        let seen = self.tenant_seen(client, t).await?;
                        plan::tenant_pull_due(&self.ctx.settings, pulls, &seen, self.now.0)
                            .then_some(t)
                    }
                    None => None,
                };
                let asked = match tenant {
                    Some(tenant) => match self.ctx.tenant_pulls.ask(client, tenant).await {
                        Ok(crate::controller::tenant_pulls::Asked::Refused(e)) => Err(e),
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    },
                    None => client.pull(uuid).await.map(|_| ()),
                };
                client.written(uuid);
                match asked {
                    Ok(()) => {
                        let how = if tenant.is_some() {
                            "asked for the tenant's re-sync, which brings it back to OK or drops \
                             the record if the Nova group is gone"
                        } else {
                            "asked Waldur to pull it"
                        };
                        let note = format!(
                            "the group is ERRED and OpenStack may still hold it: {how} before \
                             deleting, so that the Nova group is deleted too (attempt {attempt})"
                        );
                        self.event(EventType::Normal, "PullBeforeDelete", "Delete", &note)
                            .await;
                        let pulled = AutoPull {
                            last_time: self.now.clone(),
                            attempts: *attempt,
                        };
                        self.write_status(true, |s| {
                            s.auto_pull = Some(pulled.clone());
                            // As seen: ERRED, not on its way out.
                            s.state = Some(State::Erred.as_str().to_string());
                            self.ready(s, false, ready_reason::DELETING, &note);
                            self.synced(s, true, synced_reason::RECONCILED, "");
                        })
                        .await?;
                        Ok(Some(Action::requeue(SOON)))
                    }
                    // The group is gone (a 404 for the tenant says nothing about the group).
                    Err(e) if e.is_not_found() && tenant.is_none() => Ok(None),
                    Err(e) if e.kind() == ErrorKind::Conflict => Ok(Some(Action::requeue(SOON))),
                    Err(e) => Err(e.into()),
                }
            }
            Cleanup::Held {
                message,
                attempts,
                retry_in,
            } => {
                if self
                    .status()
                    .conditions
                    .iter()
                    .all(|c| c.message != *message)
                {
                    self.event(EventType::Warning, "DeleteBlocked", "Delete", message)
                        .await;
                }
                self.write_status(true, |s| {
                    s.state = Some(State::Erred.as_str().to_string());
                    self.ready(s, false, ready_reason::DELETING, message);
                    self.synced(s, false, synced_reason::DELETE_BLOCKED, message);
                })
                .await?;
                tracing::debug!(attempts, ?retry_in, "deletion held: the group is ERRED");
                Ok(Some(Action::requeue(*retry_in)))
            }
            Cleanup::Release { .. } | Cleanup::Locate => Ok(None),
        }
    }

    /// Where this deletion reads its bound group (see [`plan::deletion_read`]).
    pub(super) fn deletion_read(&self, client: &Waldur) -> plan::DeletionRead {
        let deleting_for = self
            .ctx
            .deleting_for(self.sg.metadata.uid.as_deref().unwrap_or_default());
        match (&client.shard, self.status_uuid()) {
            (Some(shard), Some(uuid)) => plan::deletion_read(
                true,
                shard.answers(),
                shard.snapshot_age(),
                deleting_for,
                shard.written_ago(&uuid),
            ),
            _ => plan::DeletionRead::Direct,
        }
    }

    /// `Ready=False Deleting`, with Waldur's state as last seen (`state`): a group whose
    /// last state was DELETING and then answers 404 was deleted, not lost.
    pub(super) async fn deleting_status(
        &self,
        message: &str,
        state: Option<&str>,
    ) -> Result<(), Error> {
        self.write_status(true, |s| {
            if let Some(state) = state {
                s.state = Some(state.to_string());
            }
            self.ready(s, false, ready_reason::DELETING, message);
            self.synced(s, true, synced_reason::RECONCILED, "");
        })
        .await
    }
}

/// A deletion that cannot reach Waldur says so, and how to let go without it.
pub(super) fn deletion_waits(e: Error) -> Error {
    let how = "restore them, or set spec.deletionPolicy: Orphan to remove this resource and leave the Waldur group";
    match e {
        Error::CredentialsNotFound(m) => {
            Error::CredentialsNotFound(format!("deletion waits for credentials: {m}; {how}"))
        }
        Error::DefaultCredentialsNotAllowed(m) => Error::DefaultCredentialsNotAllowed(format!(
            "deletion waits for credentials: {m}; {how}"
        )),
        other => other,
    }
}
