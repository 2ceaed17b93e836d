//! Steps 5 to 7: mirror the bound group into status, run the follow-ups that are due
//! (annotation requests, recovery pulls), and requeue.

use super::*;

impl Reconciler {
    /// Steps 5 to 7: mirror the group into status, run due follow-ups, and requeue.
    pub(super) async fn observe(
        &self,
        client: &Waldur,
        group: WaldurGroup,
        binding: Binding,
    ) -> Result<Action, Error> {
        self.announce_binding(&group, binding).await;
        // (A group this reconcile created is in the index already, written through.)
        if matches!(
            binding,
            Binding::Adopted | Binding::Imported | Binding::Rebound
        ) {
            // Newly bound: the sweep's picture of this group may be older than the read that
            // found it, and the settled sweep pace may not see it for a resync period. Until a
            // sweep after now has, reads go to Waldur (found by the e2e suite: a group adopted
            // after a restart stayed CREATION_SCHEDULED in status for 30 s).
            client.written(&group.uuid);
        }
        if let Some(previous) = self.status_uuid().filter(|u| *u != group.uuid) {
            // Bound to another group now (rebound or recreated): the claim on the old one goes
            // (review N7), or it would stand for ever.
            self.release_claim(&previous).await?;
        }
        let mut handled = plan::tokens_at_first_binding(&self.sg)
            .or(self.status().handled_requests.map(|h| *h))
            .unwrap_or_default();
        // A request-recreate token seen while a group is bound has nothing to act on: it is
        // recorded, so that it never makes a group without evidence later.
        handled.recreate = self
            .sg
            .annotation(crate::api::ANNOTATION_REQUEST_RECREATE)
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let follow_ups = plan::follow_ups(&self.sg, &group, &self.ctx.settings, self.now.0);
        if follow_ups.is_empty()
            && let Some((uuid, created_ago)) = self.unshown()
            && uuid == group.uuid
            && plan::first_status_waits(&group, created_ago)
        {
            return Ok(Action::requeue(plan::requeue_after(
                &self.sg,
                group.state.as_ref(),
                created_ago,
                &self.ctx.settings,
                rand::random(),
            )));
        }
        let mut auto_pull = self.status().auto_pull;
        let mut busy = false;
        for follow_up in follow_ups {
            match self
                .follow_up(client, &group, &follow_up, &mut handled, &mut auto_pull)
                .await
            {
                Ok(b) => busy |= b,
                Err(e) => {
                    // Keep what was done before the error goes up (review m1): a request
                    // already carried out is recorded and never sent twice.
                    let kept = self
                        .write_status(true, |s| progress(s, &group, &handled, &auto_pull))
                        .await;
                    if let Err(write) = kept {
                        tracing::warn!(error = %write, "could not record the requests already carried out");
                    }
                    return Err(e);
                }
            }
        }
        if group.state == Some(State::Ok) && auto_pull.as_ref().is_some_and(|a| a.attempts > 0) {
            // Recovered: the next ERRED spell starts its backoff afresh.
            auto_pull = None;
        }
        let previous_state = self.status().state;
        let previous_reason = self
            .status()
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .map(|c| c.reason.clone());
        let (ready, reason, message) = plan::readiness(&group);
        let unsupported = self
            .unsupported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .or_else(|| self.still_unsupported(&handled));
        self.write_status(true, |s| {
            progress(s, &group, &handled, &auto_pull);
            s.state = plan::shown_state(previous_state.as_deref(), group.state.as_ref());
            self.ready(s, ready, reason, &message);
            match &unsupported {
                Some(note) => self.synced(s, false, synced_reason::UNSUPPORTED, note),
                None => self.synced(s, true, synced_reason::RECONCILED, ""),
            }
        })
        .await?;
        let state = group.state.as_ref().map(State::to_string);
        // An Event when the group enters another phase (the Ready reason: Creating, Available,
        // Erred...), not for every step within one (CREATION_SCHEDULED -> CREATING), nor when
        // a creation completes: each Event is a Kubernetes write, and those tell a user
        // nothing status does not.
        if previous_state.is_some()
            && previous_state != state
            && plan::phase_change_is_news(previous_reason.as_deref(), reason)
        {
            let note = format!(
                "Waldur state {} -> {}",
                previous_state.as_deref().unwrap_or("none"),
                state.as_deref().unwrap_or("none")
            );
            let kind = if group.state == Some(State::Erred) {
                EventType::Warning
            } else {
                EventType::Normal
            };
            self.event(kind, "StateChanged", "Observe", &note).await;
        }
        if busy {
            return Ok(Action::requeue(SOON));
        }
        Ok(Action::requeue(plan::requeue_after(
            &self.sg,
            group.state.as_ref(),
            self.busy_for(),
            &self.ctx.settings,
            rand::random(),
        )))
    }

    /// Runs one follow-up. Returns whether Waldur is now busy with it.
    pub(super) async fn follow_up(
        &self,
        client: &Waldur,
        group: &WaldurGroup,
        follow_up: &FollowUp,
        handled: &mut HandledRequests,
        auto_pull: &mut Option<AutoPull>,
    ) -> Result<bool, Error> {
        let uuid = &group.uuid;
        match follow_up {
            FollowUp::RequestedPull { token } => {
                let result = client.pull(uuid).await;
                client.written(uuid);
                self.requested(
                    result.map(|_| ()),
                    "PullRequested",
                    "Pull",
                    token,
                    &mut handled.pull,
                )
                .await
            }
            FollowUp::SetOk { .. } | FollowUp::SetErred { .. } => self
                .staff_action(client, uuid, follow_up, handled)
                .await
                .map(|_| false),
            FollowUp::RecoveryPull { attempt } => {
                let note = format!(
                    "the group is ERRED; asked Waldur to pull it from OpenStack (attempt {attempt})"
                );
                self.pull_by_itself(client, uuid, &note, *attempt, auto_pull)
                    .await
            }
            FollowUp::PeriodicPull => {
                self.pull_by_itself(
                    client,
                    uuid,
                    "periodic pull (--pull-interval)",
                    0,
                    auto_pull,
                )
                .await
            }
        }
    }

    /// Carries out `request-set-ok` or `request-set-erred` (any other follow-up is no staff
    /// action and does nothing). Returns whether Waldur took it.
    pub(super) async fn staff_action(
        &self,
        client: &Waldur,
        uuid: &WaldurUuid,
        request: &FollowUp,
        handled: &mut HandledRequests,
    ) -> Result<bool, Error> {
        match request {
            FollowUp::SetOk { token } => {
                let result = client.set_ok(uuid).await.map(|_| ());
                client.written(uuid);
                let slot = &mut handled.set_ok;
                self.requested(result, "SetOkRequested", "SetOk", token, slot)
                    .await
            }
            FollowUp::SetErred { token } => {
                let message = format!(
                    "set through the openstack.waldur.com/request-set-erred annotation (token {token})"
                );
                let result = client
                    .set_erred(uuid, Some(&message), None)
                    .await
                    .map(|_| ());
                client.written(uuid);
                let slot = &mut handled.set_erred;
                self.requested(result, "SetErredRequested", "SetErred", token, slot)
                    .await
            }
            _ => Ok(false),
        }
    }

    pub(super) async fn pull_by_itself(
        &self,
        client: &Waldur,
        uuid: &WaldurUuid,
        note: &str,
        attempts: u32,
        auto_pull: &mut Option<AutoPull>,
    ) -> Result<bool, Error> {
        let result = client.pull(uuid).await;
        client.written(uuid);
        match result {
            Ok(_) => {
                *auto_pull = Some(AutoPull {
                    last_time: self.now.clone(),
                    attempts,
                });
                self.event(EventType::Normal, "PullRequested", "Pull", note)
                    .await;
                Ok(true)
            }
            // Busy (409) or nothing to pull (400): look again at the next resync.
            Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::Invalid) => {
                *auto_pull = Some(AutoPull {
                    last_time: self.now.clone(),
                    attempts,
                });
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records an annotation request as handled once Waldur has answered it for good. A 409
    /// (busy) leaves it pending; a 400 or 403 is final and reported, so it is not retried.
    pub(super) async fn requested(
        &self,
        result: Result<(), WaldurError>,
        reason: &str,
        action: &str,
        token: &str,
        handled: &mut Option<String>,
    ) -> Result<bool, Error> {
        match result {
            Ok(()) => {
                *handled = Some(token.to_string());
                self.event(
                    EventType::Normal,
                    reason,
                    action,
                    &format!("requested by annotation (token {token})"),
                )
                .await;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::Conflict => Ok(true),
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                // Servers before 8.0 have no set_ok/set_erred: asking again cannot help.
                *handled = Some(token.to_string());
                let message = format!(
                    "this Waldur cannot {action} (Waldur before 8.0 has no set_ok and set_erred actions); \
                     the request with token {token} is dropped (remove the annotation to clear this): {e}"
                );
                self.event(
                    EventType::Warning,
                    &format!("{action}Failed"),
                    action,
                    &message,
                )
                .await;
                *self.unsupported.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
                Ok(false)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Invalid
                        | ErrorKind::Forbidden
                        | ErrorKind::NotFound
                        | ErrorKind::Unexpected
                ) =>
            {
                *handled = Some(token.to_string());
                self.event(
                    EventType::Warning,
                    &format!("{action}Failed"),
                    action,
                    &e.to_string(),
                )
                .await;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn announce_binding(&self, group: &WaldurGroup, binding: Binding) {
        let uuid = &group.uuid;
        let (reason, note) = match binding {
            Binding::Known => return,
            Binding::Created => ("Created", format!("created Waldur server group {uuid}")),
            Binding::Recreated => (
                "Recreated",
                format!(
                    "the Waldur group {} was gone; created {uuid} in its place",
                    self.status().uuid.unwrap_or_default()
                ),
            ),
            Binding::Adopted => (
                "Adopted",
                format!("found Waldur server group {uuid} created earlier for this resource"),
            ),
            Binding::Imported => (
                "Adopted",
                format!("bound existing Waldur server group {uuid}"),
            ),
            Binding::Rebound => (
                "Rebound",
                format!(
                    "Waldur re-imported backend id {} under a new UUID: {} -> {uuid}",
                    group.backend_id,
                    self.status().uuid.unwrap_or_default()
                ),
            ),
        };
        self.event(EventType::Normal, reason, "Bind", &note).await;
    }

    /// An unsupported request stays reported while its annotation still asks for it: the
    /// user removes (or changes) the annotation to clear `Synced`.
    pub(super) fn still_unsupported(&self, handled: &HandledRequests) -> Option<String> {
        let status = self.status();
        let reported = status
            .conditions
            .iter()
            .find(|c| c.type_ == SYNCED && c.reason == synced_reason::UNSUPPORTED)?;
        let annotations = self.sg.annotations();
        let asked = [
            (crate::api::ANNOTATION_REQUEST_SET_OK, &handled.set_ok),
            (crate::api::ANNOTATION_REQUEST_SET_ERRED, &handled.set_erred),
        ]
        .iter()
        .any(|(key, token)| token.is_some() && annotations.get(*key) == token.as_ref());
        asked.then(|| reported.message.clone())
    }
}

/// What an observation has established, whatever happens next: the group as Waldur shows it,
/// the request tokens acted on, and the recovery pulls sent.
pub(super) fn progress(
    s: &mut ServerGroupStatus,
    group: &WaldurGroup,
    handled: &HandledRequests,
    auto_pull: &Option<AutoPull>,
) {
    plan::mirror(s, group);
    s.handled_requests =
        Some(Box::new(handled.clone())).filter(|h| **h != HandledRequests::default());
    s.auto_pull = auto_pull.clone();
}
