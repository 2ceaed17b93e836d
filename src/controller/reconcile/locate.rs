//! Step 4: find the resource's group in Waldur (the index or Waldur itself), bind it, or
//! create it; and, for a group that vanished, wait on evidence before making another.

use super::*;

impl Reconciler {
    /// Step 4: find the group, creating it when this resource should have one and has none.
    /// With `deleting` (cleanup) nothing is created, but a group that may come back is still
    /// waited for, so that it can be deleted (review N2).
    pub(super) async fn locate(&self, client: &Waldur, deleting: bool) -> Result<Located, Error> {
        // A group made here whose first status waits: look it up as if status named it.
        if let Some((uuid, claimed_ago)) = self.unshown() {
            if let Some(group) = self.look(client, &Lookup::Uuid(uuid.clone())).await? {
                return Ok(Located::Found(Box::new(group), Binding::Known));
            }
            self.record_vanished_creation(&uuid, claimed_ago).await?;
            return Ok(Located::Recorded);
        }
        let mut lookup = plan::first_lookup(&self.sg)?;
        loop {
            if let Some(group) = self.look(client, &lookup).await? {
                return self.bind(&lookup, group).await;
            }
            match plan::after_missing(&self.sg, &lookup, deleting)? {
                Missing::Lookup(next) => lookup = next,
                Missing::NotFound if deleting => {
                    self.can_see_tenant_of_bound_group(client).await?;
                    return Ok(Located::Gone(not_found_message(&lookup)));
                }
                Missing::NotFound => return Ok(Located::NotFound(not_found_message(&lookup))),
                Missing::AwaitReimport { tenant, backend_id } => {
                    return self
                        .await_reimport(client, &tenant, &backend_id, deleting)
                        .await;
                }
                Missing::Create { recreate } => {
                    return self.leak_check_then_create(client, &lookup, recreate).await;
                }
            }
        }
    }

    /// A group made here vanished before its first status: that status is written now, as
    /// the 201 had it, so that the rules for a vanished group (it may come back with Waldur's
    /// re-sync) decide from it, as they did when status was written at the 201. The claim
    /// stays until the write is seen: without it the next look would take the create intent
    /// for a group never made.
    async fn record_vanished_creation(
        &self,
        uuid: &WaldurUuid,
        claimed_ago: Duration,
    ) -> Result<(), Error> {
        tracing::info!(%uuid, "the group made for this resource is gone from Waldur before its first status; recording it as created");
        let created = plan::as_created(&self.sg, uuid);
        // Last seen at the 201, not now: a re-import is searched for from then on.
        let seen = k8s_openapi::jiff::SignedDuration::try_from(claimed_ago)
            .ok()
            .and_then(|ago| self.now.0.checked_sub(ago).ok())
            .map(Time);
        self.write_status(false, |s| {
            s.auto_pull = None;
            plan::mirror(s, &created);
            s.last_sync_time = seen;
            let (_, reason, message) = plan::readiness(&created);
            self.ready(s, false, reason, &message);
            self.synced(s, true, synced_reason::RECONCILED, "");
        })
        .await
    }

    /// A 404 for the bound group releases a deleted resource only when these credentials can
    /// see its tenant (review m4); otherwise the deletion waits, saying why.
    pub(super) async fn can_see_tenant_of_bound_group(&self, client: &Waldur) -> Result<(), Error> {
        let Some(tenant) = plan::tenant_to_see_before_release(&self.sg) else {
            return Ok(());
        };
        if self.tenant_seen(client, &tenant).await? != plan::TenantSeen::Invisible {
            return Ok(());
        }
        Err(Error::CannotSee(format!(
            "deletion waits: Waldur answers 404 for group {}, but these credentials cannot see \
             its tenant {tenant} either, so the group may still exist (were the credentials \
             changed since it was bound?). Restore credentials that can see the tenant, or set \
             spec.deletionPolicy: Orphan to remove this resource and leave the group",
            self.status_uuid()
                .map(|u| u.to_string())
                .unwrap_or_default()
        )))
    }

    /// Binds a group a lookup found, unless another resource holds it.
    pub(super) async fn bind(&self, lookup: &Lookup, group: WaldurGroup) -> Result<Located, Error> {
        let binding = plan::binding(lookup, self.status_uuid().as_ref(), &group.uuid);
        // An observer only reads: it may watch a group another resource manages.
        let observing = self.sg.spec.management_policy == ManagementPolicy::Observe;
        if binding == Binding::Known || observing {
            return Ok(Located::Found(Box::new(group), binding));
        }
        if let Some(owner) = self.owner_of(&group.uuid) {
            return Ok(Located::AlreadyManaged(managed_by(&owner)));
        }
        if let Some(owner) = self.claim(&group.uuid).await? {
            return Ok(Located::AlreadyManaged(managed_by(&owner)));
        }
        Ok(Located::Found(Box::new(group), binding))
    }

    /// The leak check, then the create: a crash after Waldur's 201 and before the status
    /// write left a group this resource made; bind it instead of making another.
    pub(super) async fn leak_check_then_create(
        &self,
        client: &Waldur,
        lookup: &Lookup,
        recreate: bool,
    ) -> Result<Located, Error> {
        if !matches!(lookup, Lookup::OwnCreation { .. })
            && let Ok(own) = plan::first_lookup_for_create(&self.sg)
            && let Some(group) = self.look(client, &own).await?
            && self.owner_of(&group.uuid).is_none()
            && self.claim(&group.uuid).await?.is_none()
        {
            return Ok(Located::Found(Box::new(group), Binding::Adopted));
        }
        self.create(client, recreate).await
    }

    pub(super) async fn look(
        &self,
        client: &Waldur,
        lookup: &Lookup,
    ) -> Result<Option<WaldurGroup>, Error> {
        if let Some(answer) = self.look_in_index(client, lookup) {
            return Ok(answer);
        }
        self.look_in_waldur(client, lookup).await
    }

    pub(super) async fn look_in_waldur(
        &self,
        client: &Waldur,
        lookup: &Lookup,
    ) -> Result<Option<WaldurGroup>, Error> {
        match lookup {
            Lookup::Uuid(uuid) => match client.get(uuid, &[]).await {
                Ok(g) => {
                    client.record(&g);
                    Ok(Some(g))
                }
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e.into()),
            },
            Lookup::BackendId(backend_id) => {
                let found = client
                    .list(&ListQuery::new().backend_id(backend_id))
                    .await?;
                // Several rows can carry one Nova id briefly (a re-import racing a delete):
                // prefer one that is not on its way out.
                Ok(found
                    .iter()
                    .find(|g| !matches!(g.state, Some(State::DeletionScheduled | State::Deleting)))
                    .or(found.first())
                    .cloned())
            }
            Lookup::OwnCreation {
                tenant,
                name,
                policy,
            } => {
                let candidates = client
                    .list(&ListQuery::new().tenant_uuid(tenant).name_exact(name))
                    .await?;
                Ok(self.own_among(&candidates, *policy))
            }
        }
    }

    /// The index's answer, when it has a trustworthy one. A group the index misses is asked
    /// for directly (the miss may be a group created after the sweep began), so only hits
    /// and lists of own creations come from the index.
    pub(super) fn look_in_index(
        &self,
        client: &Waldur,
        lookup: &Lookup,
    ) -> Option<Option<WaldurGroup>> {
        // A deletion decides a write from what it reads: only a picture taken since the
        // deletion was asked for, else Waldur itself (see `plan::deletion_read`).
        if self.sg.meta().deletion_timestamp.is_some()
            && self.deletion_read(client) != plan::DeletionRead::Index
        {
            return None;
        }
        let shard = client.shard.as_ref()?;
        // A resource that asks to be read more often than the sweeps run is read directly
        // once the sweep's picture is older than its period (review N14).
        let own_period = plan::resync_of(&self.sg, &self.ctx.settings);
        if own_period < self.ctx.settings.resync_period && shard.snapshot_age() > own_period {
            return None;
        }
        match lookup {
            Lookup::Uuid(uuid) => match shard.lookup_uuid(uuid) {
                Answer::Found(g) => Some(Some((*g).clone())),
                // Its own DELETE under way and an exact sweep since without it: as good as
                // Waldur's 404, without a GET per deleted resource (issue 21).
                Answer::Missing
                    if plan::sweep_miss_is_gone(
                        &self.sg,
                        self.sg.meta().deletion_timestamp.is_some(),
                        shard.surely_gone(uuid),
                    ) =>
                {
                    Some(None)
                }
                Answer::Missing | Answer::Unknown => None,
            },
            Lookup::BackendId(backend_id) => match shard.lookup_backend_id(backend_id) {
                Answer::Found(g) => Some(Some((*g).clone())),
                Answer::Missing | Answer::Unknown => None,
            },
            Lookup::OwnCreation {
                tenant,
                name,
                policy,
            } => {
                let candidates = shard.by_tenant_and_name(tenant, name)?;
                // A group of the name while this resource's create intent stands may be its
                // own: a sweep's sparse answer has no description to tell, so ask Waldur (the
                // campaign's seed 3: twins deadlocked on a group neither could recognise).
                if !candidates.is_empty() && plan::pending_intent(&self.sg).is_some() {
                    return None;
                }
                Some(self.own_among(&candidates, *policy))
            }
        }
    }

    /// This resource's own creation among groups of its name, remembering the others: they
    /// were there before any create this reconcile decides, so they are never its own.
    pub(super) fn own_among(
        &self,
        candidates: &[WaldurGroup],
        policy: crate::waldur::Policy,
    ) -> Option<WaldurGroup> {
        // A Nova group another resource of this process let go of (Orphan, Unlink) comes
        // back under its name after a re-sync: never this resource's creation.
        let mine: Vec<WaldurGroup> = candidates
            .iter()
            .filter(|g| {
                !self
                    .ctx
                    .tenant_pulls
                    .was_released(&g.tenant_uuid, &g.name, &g.backend_id)
            })
            .cloned()
            .collect();
        let own = plan::pick_own_creation(&self.sg, &mine, policy).cloned();
        let mut seen = self.seen_names.lock().unwrap_or_else(|p| p.into_inner());
        for group in candidates {
            if own.as_ref().map(|o| &o.uuid) != Some(&group.uuid) && !seen.contains(&group.uuid) {
                seen.push(group.uuid.clone());
            }
        }
        own
    }

    /// The name is taken by another ServerGroup's group: that resource holds the name, and
    /// this one makes its own group once the name is free again (not terminal: the twin of a
    /// kustomize base in another namespace takes over when the first is deleted).
    pub(super) fn name_held_by(
        &self,
        tenant: &WaldurUuid,
        name: &str,
        groups: &[WaldurUuid],
    ) -> Option<Located> {
        let held = groups.iter().find_map(|uuid| {
            let owner = self.owner_of(uuid)?;
            Some(format!("{uuid}, held by ServerGroup {owner}"))
        });
        // A group of the name that nobody binds yet may be another resource's create whose
        // answer was lost: its create intent says so (the campaign's R6).
        let held = held.or_else(|| {
            let (creator, uuid) = self.creating_the_name(tenant, name, groups)?;
            Some(format!("{uuid}, made for ServerGroup {creator}"))
        });
        if held.is_none()
            && let Some(holder) = self.holding_the_name_while_away(tenant, name)
        {
            // Free in Waldur, but another resource's group of the name may come back.
            return Some(Located::AlreadyManaged(format!(
                "the server group named {name:?} in tenant {tenant} belongs to ServerGroup \
                 {holder}, whose group is gone from Waldur for now and may come back (Waldur's \
                 re-sync) or be made anew; Waldur takes one group per name in a tenant, so this \
                 resource makes its own once that resource lets the name go"
            )));
        }
        held.map(|held| {
            Located::AlreadyManaged(format!(
                "tenant {tenant} already has a server group named {name:?} ({held}); Waldur takes \
                 one group per name in a tenant, so this resource makes its own once that one is \
                 gone"
            ))
        })
    }

    /// Another ServerGroup holding this tenant and name while its group is away from Waldur
    /// ([`plan::holds_name_while_away`]).
    fn holding_the_name_while_away(&self, tenant: &WaldurUuid, name: &str) -> Option<String> {
        let me = self.sg.metadata.uid.as_deref();
        let holder = self.named(name).find(|other| {
            other.metadata.uid.as_deref() != me && plan::holds_name_while_away(other, tenant, name)
        })?;
        Some(namespaced_name(&holder))
    }

    /// The cached ServerGroups that would make their group under `name` (the names index,
    /// so that the checks before a create do not walk every cached resource).
    fn named(&self, name: &str) -> impl Iterator<Item = Arc<ServerGroup>> + '_ {
        self.ctx
            .names
            .named(name)
            .into_iter()
            .filter_map(|r| self.ctx.store.get(&r))
    }

    /// Another ServerGroup whose create intent for this tenant and name still stands, and the
    /// group of `groups` its create may have made ([`plan::may_have_made`]).
    fn creating_the_name(
        &self,
        tenant: &WaldurUuid,
        name: &str,
        groups: &[WaldurUuid],
    ) -> Option<(String, WaldurUuid)> {
        if groups.is_empty() {
            return None;
        }
        let me = self.sg.metadata.uid.as_deref();
        let made_by = |other: &ServerGroup| {
            // The name first: a comparison; the intent is JSON to parse.
            if !plan::named(other, name) || other.metadata.uid.as_deref() == me {
                return None;
            }
            let intent = plan::pending_intent(other)?;
            groups
                .iter()
                .find(|g| plan::may_have_made(&intent, tenant, name, g))
                .cloned()
        };
        self.named(name)
            .find_map(|other| made_by(&other).map(|made| (namespaced_name(&other), made)))
    }

    /// The create's 400 for a taken name: held by another ServerGroup (reported as such, not
    /// terminal), or by a group no ServerGroup manages (terminal for this generation, naming
    /// the group, review N16; spec.name cannot change).
    pub(super) async fn name_taken(
        &self,
        client: &Waldur,
        tenant: &WaldurUuid,
        name: &str,
        intent: &crate::api::CreateIntent,
        fresh: bool,
        original: WaldurError,
    ) -> Result<Located, Error> {
        let Ok(groups) = client
            .list(&ListQuery::new().tenant_uuid(tenant).name_exact(name))
            .await
        else {
            return Ok(Located::Rejected(original));
        };
        // What holds the name now is not this resource's: recorded in its intent, so that no
        // later look (a deletion's included) takes it for its own creation (found by the fault
        // campaign, seed 2: a twin deleted Waldur's re-import of its sibling's unlinked group).
        // Only when no earlier create of this resource could have made it (a fresh intent):
        // otherwise the holder may be its own, whose time fell outside the clock slack, and
        // disowning it would leave it to nobody (the campaign's seed 16: twins deadlocked).
        let mut known = intent.clone();
        if fresh {
            for group in &groups {
                let uuid = group.uuid.to_string();
                if !known.foreign.contains(&uuid) {
                    known.foreign.push(uuid);
                }
            }
        }
        if known != *intent {
            self.record_intent(&known).await?;
        }
        let uuids: Vec<WaldurUuid> = groups.iter().map(|g| g.uuid.clone()).collect();
        if let Some(held) = self.name_held_by(tenant, name, &uuids) {
            return Ok(held);
        }
        let Some(group) = groups.first() else {
            return Ok(Located::Rejected(original));
        };
        // Bound by a resource this process does not cache (another shard's): its claim says.
        for uuid in &uuids {
            let owner = crate::controller::claims::holder(
                &self.ctx.kube,
                &self.ctx.claims_namespace,
                uuid,
                &self.sg,
            )
            .await?;
            if let Some(owner) = owner {
                return Ok(Located::AlreadyManaged(format!(
                    "tenant {tenant} already has a server group named {name:?} ({uuid}, held by \
                     ServerGroup {owner}); Waldur takes one group per name in a tenant, so this \
                     resource makes its own once that one is gone"
                )));
            }
        }
        Ok(Located::Rejected(WaldurError::Invalid {
            endpoint: "create",
            messages: crate::waldur::FieldMessages(vec![crate::waldur::FieldMessage {
                field: Some("name".into()),
                message: format!(
                    "tenant {tenant} {} {name:?} ({}, not managed by any ServerGroup), and \
                     Waldur takes one group per name in a tenant: spec.name cannot change, so \
                     create a ServerGroup with another name, or one that imports that group \
                     (checked again every resync period: once the name is free, the group is \
                     created)",
                    plan::NAME_TAKEN,
                    group.uuid
                ),
            }]),
        }))
    }

    /// Records the create intent, and the finalizer when it is not there yet, in one write: a
    /// JSON patch guarded by a test of the resourceVersion, so neither a concurrent change of
    /// the finalizers nor of the annotations is overwritten (a conflict re-reads and tries
    /// once more). The finalizer is then on before Waldur is asked for anything.
    pub(super) async fn record_intent(
        &self,
        intent: &crate::api::CreateIntent,
    ) -> Result<(), Error> {
        let value =
            serde_json::to_string(intent).map_err(|e| Error::Kube(kube::Error::SerdeError(e)))?;
        let key = crate::api::ANNOTATION_CREATE_INTENT;
        if self.sg.annotation(key) == Some(value.as_str()) && self.has_finalizer() {
            return Ok(());
        }
        let patch = |meta: &kube::api::ObjectMeta| {
            crate::controller::finalizers::annotate_and_finalize_patch(meta, key, &value, FINALIZER)
        };
        match self.json_patch(patch(&self.sg.metadata)).await {
            Ok(()) => {}
            // Changed since this object was read (often by this operator's own status write,
            // which the cache has not delivered yet): read it as it is now, once.
            Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 || e.code == 422 => {
                let fresh = self.api.get_metadata(&self.sg.name_any()).await?;
                if fresh.metadata.uid != self.sg.metadata.uid {
                    return Err(Error::Kube(kube::Error::Api(e)));
                }
                // The intent changed since this view was read (this operator's own earlier
                // create, whose write the cache has not delivered): this reconcile decided on
                // a view without it, and writing over it would lose the evidence that a group
                // made since is this resource's own (the campaign's seed 105). Start again
                // from a fresher view.
                let stored = |m: &kube::api::ObjectMeta| {
                    m.annotations.as_ref().and_then(|a| a.get(key)).cloned()
                };
                if stored(&fresh.metadata) != stored(&self.sg.metadata) {
                    return Err(Error::StaleView(
                        "its create intent changed since it was read".into(),
                    ));
                }
                self.json_patch(patch(&fresh.metadata)).await?;
            }
            Err(e) => return Err(e),
        }
        self.finalizer_added
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The client for this resource's credentials, and its index shard on the batched path.
    pub(super) async fn waldur(&self) -> Result<Waldur, Error> {
        let creds = self
            .ctx
            .credentials
            .for_resource(&self.ctx.kube, &self.sg)
            .await?;
        // A Waldur other than the default one gets its share of the workers, no more: a slow
        // one then holds a few workers while the others go on (review N5).
        let base = creds.client.base_url();
        if !self.ctx.credentials.is_default(base) {
            let worker = self
                .ctx
                .url_workers
                .try_take(base)
                .ok_or_else(|| Error::WorkersBusy(base.to_string()))?;
            *self.url_worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(worker);
        }
        // The Secret must outlive this resource's cleanup: held before anything else, Waldur's
        // reachability included (review N12b: during an outage, resources moved between shards
        // were never held while the old shard's finalizer went).
        if let Some(secret) = &creds.secret
            && self.sg.spec.management_policy == ManagementPolicy::Managed
            && self.sg.spec.deletion_policy != crate::api::DeletionPolicy::Orphan
            && self.sg.meta().deletion_timestamp.is_none()
        {
            crate::controller::secret_guard::hold(
                &self.ctx.kube,
                &self.namespace(),
                secret,
                &self.ctx.shard.secret_finalizer(),
            )
            .await?;
        }
        // While Waldur is unreachable nothing can be learnt or done: say so at once and wait
        // for the breaker to close (the error policy parks the resource until then).
        if let Some(refusal) = creds.client.breaker().and_then(|b| b.refusal("reconcile")) {
            return Err(refusal.into());
        }
        let shard = match &self.ctx.index {
            Some(index) => {
                let shard = index.shard(&creds.key, &creds.client);
                shard.wait_complete(Duration::from_secs(30)).await;
                shard.wait_after_outage(Duration::from_secs(10)).await;
                Some(shard)
            }
            None => None,
        };
        Ok(Waldur {
            client: creds.client,
            shard,
        })
    }

    pub(super) async fn create(&self, client: &Waldur, recreate: bool) -> Result<Located, Error> {
        let Lookup::OwnCreation {
            tenant,
            name,
            policy,
        } = plan::first_lookup_for_create(&self.sg)?
        else {
            return Ok(Located::NotFound("nothing to create from".into()));
        };
        // Recorded before the POST, with the finalizer when it is not there yet (one write):
        // a lost answer is then always recognised as this resource's own (review N3).
        let seen = self
            .seen_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Another resource's group holds the name: a create could only be refused.
        if let Some(held) = self.name_held_by(&tenant, &name, &seen) {
            return Ok(held);
        }
        let (intent, fresh) = plan::intent_for_create(&self.sg, &tenant, &name, &seen, self.now.0);
        self.record_intent(&intent).await?;
        let new = NewServerGroup {
            name: name.clone(),
            policy,
            description: self.sg.spec.description.clone(),
        };
        let group = match client.create(&tenant, &new).await {
            Ok(group) => {
                client.record(&group);
                // Claim what this resource made before anything else can bind it: a resource
                // elsewhere with the same tenant and name (a twin) may find this group in its
                // own lookups before this status write reaches its cache, and without a claim
                // both would bind it (found by the fault campaign). In this process's memory
                // when it reconciles every resource: every other binding here claims there.
                if let Some(owner) = self.claim_creation(&group.uuid).await? {
                    return Ok(Located::AlreadyManaged(managed_by(&owner)));
                }
                group
            }
            // The name is taken. With an intent kept from an earlier create, most likely by
            // that create, whose answer was lost (review M3): ask Waldur itself, and bind the
            // group if it is ours. With a fresh intent no create of this resource came before,
            // so the group is someone else's.
            Err(e) if e.kind() == ErrorKind::Invalid && plan::name_taken(&e) => {
                let own = Lookup::OwnCreation {
                    tenant: tenant.clone(),
                    name: name.clone(),
                    policy,
                };
                if !fresh
                    && let Some(group) = self.look_in_waldur(client, &own).await?
                    && self.owner_of(&group.uuid).is_none()
                {
                    if let Some(owner) = self.claim(&group.uuid).await? {
                        return Ok(Located::AlreadyManaged(managed_by(&owner)));
                    }
                    return Ok(Located::Found(Box::new(group), Binding::Adopted));
                }
                return self
                    .name_taken(client, &tenant, &name, &intent, fresh, e)
                    .await;
            }
            Err(e) if e.kind() == ErrorKind::Invalid => return Ok(Located::Rejected(e)),
            // The tenant is not OK: say which way, with Waldur's message (a tenant Erred by a
            // failed re-sync refuses every create until it is repaired).
            Err(e) if e.kind() == ErrorKind::Conflict => {
                return match self.tenant_seen(client, &tenant).await? {
                    plan::TenantSeen::Erred(message) => Ok(Located::TenantBlocked {
                        reason: ready_reason::TENANT_ERRED,
                        message: plan::tenant_erred_message(&self.sg, &message),
                        retry_in: self
                            .ctx
                            .settings
                            .resync_period
                            .min(Duration::from_secs(300)),
                    }),
                    plan::TenantSeen::Busy(state) => Ok(Located::TenantBlocked {
                        reason: ready_reason::CREATING,
                        message: format!(
                            "Waldur refused the create while tenant {tenant} is busy ({state}): {}; \
                             creating once the tenant is OK again",
                            e.waldur_message()
                        ),
                        retry_in: Duration::from_secs(15),
                    }),
                    _ => Err(e.into()),
                };
            }
            Err(e) => {
                if !e.is_unavailable() {
                    // The create may have been made and its answer lost.
                    client.create_attempted(&tenant, &name);
                }
                return Err(e.into());
            }
        };
        // No status write here: the observation that follows writes it, or, while Waldur is
        // still making the group, lets it wait (`plan::first_status_waits`). A crash before
        // it loses nothing: the create intent, written before the POST, finds the group.
        let binding = if recreate {
            Binding::Recreated
        } else {
            Binding::Created
        };
        Ok(Located::Found(Box::new(group), binding))
    }

    /// Another Managed ServerGroup whose status holds this UUID, as `namespace/name`. An
    /// Observe resource bound to it holds nothing: it only reads (the campaign's seed 146).
    pub(super) fn owner_of(&self, uuid: &WaldurUuid) -> Option<String> {
        // Claimed here and perhaps not yet written into its holder's status.
        if self.sg.spec.management_policy == ManagementPolicy::Managed
            && let Some(holder) = self.ctx.held_here.holder(uuid, &self.sg, &self.ctx.store)
        {
            return Some(holder);
        }
        let me = self.sg.metadata.uid.as_deref();
        let owner = self.ctx.store.find(|other| {
            other.spec.management_policy == ManagementPolicy::Managed
                && other
                    .status
                    .as_ref()
                    .and_then(|s| s.uuid.as_deref())
                    .is_some_and(|theirs| uuid.is(theirs))
                && other.metadata.uid.as_deref() != me
        })?;
        Some(namespaced_name(&owner))
    }

    /// Claims a group this Managed resource is about to bind: `Some` names the resource that
    /// holds it. The cache `owner_of` reads may lag; a claim cannot.
    pub(super) async fn claim(&self, uuid: &WaldurUuid) -> Result<Option<String>, Error> {
        self.claim_with(uuid, true).await
    }

    /// Claims a group this resource has just created: in this process's memory, and with a
    /// Lease only when other processes (shards) may bind it too ([`claims::HeldHere`]). A
    /// group found after a crash is bound through [`Self::claim`], with its Lease.
    ///
    /// [`claims::HeldHere`]: crate::controller::claims::HeldHere
    pub(super) async fn claim_creation(&self, uuid: &WaldurUuid) -> Result<Option<String>, Error> {
        self.claim_with(uuid, self.ctx.shard.is_sharded()).await
    }

    /// Lets go of this resource's claim on `uuid`: its Lease, unless this process made the
    /// claim without one (one Kubernetes read less per deletion of a group created here),
    /// and the claim held in memory.
    pub(super) async fn release_claim(&self, uuid: &WaldurUuid) -> Result<(), Error> {
        if !self.ctx.held_here.without_lease(uuid, &self.sg) {
            crate::controller::claims::release(
                &self.ctx.kube,
                &self.ctx.claims_namespace,
                uuid,
                &self.sg,
            )
            .await?;
        }
        self.ctx.held_here.release(uuid, &self.sg);
        Ok(())
    }

    async fn claim_with(&self, uuid: &WaldurUuid, lease: bool) -> Result<Option<String>, Error> {
        use crate::controller::claims::Claim;
        if self.sg.spec.management_policy != ManagementPolicy::Managed {
            return Ok(None);
        }
        let held_here = &self.ctx.held_here;
        if let Claim::HeldBy(owner) = held_here.claim(uuid, &self.sg, &self.ctx.store, lease) {
            return Ok(Some(owner));
        }
        if !lease {
            return Ok(None);
        }
        match crate::controller::claims::claim(
            &self.ctx.kube,
            &self.ctx.claims_namespace,
            uuid,
            &self.sg,
        )
        .await?
        {
            Claim::Granted => Ok(None),
            Claim::HeldBy(owner) => {
                held_here.release(uuid, &self.sg);
                Ok(Some(owner))
            }
        }
    }
}

/// `namespace/name`: how a message names another ServerGroup.
fn namespaced_name(sg: &ServerGroup) -> String {
    format!("{}/{}", sg.namespace().unwrap_or_default(), sg.name_any())
}

pub(super) fn not_found_message(lookup: &Lookup) -> String {
    match lookup {
        Lookup::Uuid(uuid) => {
            format!("Waldur has no server group {uuid} visible to these credentials")
        }
        Lookup::BackendId(b) => {
            format!("Waldur has no server group with backend id {b:?} visible to these credentials")
        }
        Lookup::OwnCreation { tenant, name, .. } => {
            format!("tenant {tenant} has no server group named {name:?}")
        }
    }
}

/// The AlreadyManaged message naming the ServerGroup that holds the group.
pub(super) fn managed_by(owner: &str) -> String {
    format!("the Waldur group is already managed by ServerGroup {owner}")
}
