//! Where the group is: the lookups, what follows a miss, and which group is this resource's
//! own creation (by its create intent).

use super::*;

/// How Waldur is asked where the group is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// GET by UUID.
    Uuid(WaldurUuid),
    /// List with `backend_id=` (an import by backend id, or a rebind after a re-import).
    BackendId(String),
    /// List the tenant's groups with this exact name: the group this resource may have created
    /// before a crash lost the status write.
    OwnCreation {
        tenant: WaldurUuid,
        name: String,
        policy: Policy,
    },
}

/// What to do once a lookup came back empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// Ask again another way.
    Lookup(Lookup),
    /// Create the group; `recreate` when a group this resource had is gone.
    Create { recreate: bool },
    /// Report `Ready=False NotFound`: imported and observed groups are never created.
    NotFound,
    /// The group's UUID and Nova id are both unknown to Waldur, but OpenStack may still hold
    /// it (an unlink): Waldur re-imports it only on a tenant re-sync, under a new UUID. Making
    /// a new group before that is known not to happen would leave two in OpenStack (review
    /// M2), so learn what the tenant's re-sync did first ([`reimport_step`]).
    AwaitReimport {
        tenant: WaldurUuid,
        /// Empty when the group vanished before Waldur reported its Nova id: it is then looked
        /// for by name.
        backend_id: String,
    },
}

/// A spec the controller cannot act on. The CRD's rules keep these out; an older CRD or an
/// object written around the API server's validation can still carry them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecProblem {
    #[error("spec.tenant and spec.policy are required unless spec.import is set")]
    MissingTenantOrPolicy,
    #[error("spec.tenant: {0}")]
    BadTenant(String),
    #[error("spec.import.uuid: {0}")]
    BadImportUuid(String),
    #[error("spec.import must name exactly one of uuid or backendId")]
    BadImport,
}

/// The first place to look for the resource's group.
pub fn first_lookup(sg: &ServerGroup) -> Result<Lookup, SpecProblem> {
    let status_uuid = sg
        .status
        .as_ref()
        .and_then(|s| s.uuid.as_deref())
        .and_then(|u| WaldurUuid::parse(u).ok());
    if let Some(uuid) = status_uuid {
        return Ok(Lookup::Uuid(uuid));
    }
    if let Some(import) = &sg.spec.import {
        return match (&import.uuid, &import.backend_id) {
            (Some(u), None) => WaldurUuid::parse(u)
                .map(Lookup::Uuid)
                .map_err(|e| SpecProblem::BadImportUuid(e.to_string())),
            (None, Some(b)) => Ok(Lookup::BackendId(b.clone())),
            _ => Err(SpecProblem::BadImport),
        };
    }
    first_lookup_for_create(sg)
}

/// Where a group this resource created would be: its tenant, under its name.
pub fn first_lookup_for_create(sg: &ServerGroup) -> Result<Lookup, SpecProblem> {
    let (Some(tenant), Some(policy)) = (&sg.spec.tenant, sg.spec.policy) else {
        return Err(SpecProblem::MissingTenantOrPolicy);
    };
    let tenant = WaldurUuid::parse(tenant).map_err(|e| SpecProblem::BadTenant(e.to_string()))?;
    Ok(Lookup::OwnCreation {
        tenant,
        name: sg.waldur_name(),
        policy,
    })
}

/// The tenant whose visibility must be checked before a 404 for the bound group releases a
/// deleted resource (review m4): Waldur answers 404 for a group these credentials cannot see
/// (a credentialsRef changed to another user's), and that proves nothing. A token that sees
/// the tenant sees its groups, so the 404 counts only when the tenant is visible. `None` when
/// the 404 needs no such check: nothing was ever bound, the resource's own DELETE was seen
/// under way, or no tenant is known.
pub fn tenant_to_see_before_release(sg: &ServerGroup) -> Option<WaldurUuid> {
    let status = sg.status.as_ref()?;
    status.uuid.as_ref()?;
    let last_state = status.state.as_deref().map(State::parse);
    if matches!(last_state, Some(State::DeletionScheduled | State::Deleting)) {
        return None;
    }
    status
        .tenant_uuid
        .as_deref()
        .or(sg.spec.tenant.as_deref())
        .and_then(|t| WaldurUuid::parse(t).ok())
}

/// The next step after `lookup` found nothing. `deleting`: the resource is being deleted, so
/// nothing is created, but a group that may come back is still waited for (review N2).
/// Whether the group was last seen on its way out while this resource is being deleted (its
/// own DELETE under way): then its absence means Waldur deleted it, in OpenStack too (a failed
/// delete leaves the row ERRED). Not so for a deletion someone else asked for: a staff unlink
/// before Waldur's worker ran it removes the row and leaves the Nova group (the campaign's
/// seed 117).
pub fn own_delete_under_way(sg: &ServerGroup, deleting: bool) -> bool {
    let last_state = sg
        .status
        .as_ref()
        .and_then(|s| s.state.as_deref())
        .map(State::parse);
    deleting && matches!(last_state, Some(State::DeletionScheduled | State::Deleting))
}

/// Whether a group an exact sweep did not list counts as Waldur's 404 for `sg`, without a GET
/// per deleted resource (issue 21). Only while `sg` is being deleted and its own DELETE is
/// under way (another absence, such as a staff unlink, may leave the Nova group: seed 117),
/// and only when the sweep surely covered the group (`surely_gone`: it began after the group
/// was last seen and listed every page).
pub fn sweep_miss_is_gone(sg: &ServerGroup, deleting: bool, surely_gone: bool) -> bool {
    own_delete_under_way(sg, deleting) && surely_gone
}

pub fn after_missing(
    sg: &ServerGroup,
    lookup: &Lookup,
    deleting: bool,
) -> Result<Missing, SpecProblem> {
    let managed = sg.spec.management_policy == ManagementPolicy::Managed;
    let imported = sg.spec.import.is_some();
    let status = sg.status.as_ref();
    let known_backend_id = status
        .and_then(|s| s.backend_id.as_deref())
        .filter(|b| !b.is_empty());
    let had_uuid = status.and_then(|s| s.uuid.as_ref()).is_some();
    let last_state = status.and_then(|s| s.state.as_deref()).map(State::parse);
    let deleted = own_delete_under_way(sg, deleting);
    // A group last seen while Waldur was still creating it may have got a Nova group since,
    // which this resource never saw: it too may come back, by name.
    let maybe_in_openstack_unseen = had_uuid
        && known_backend_id.is_none()
        && matches!(last_state, Some(State::CreationScheduled | State::Creating));
    // Deleting with the Delete policy: the group must be found to be deleted, whatever
    // brought it here. Unlink wants Waldur's record gone, and it is.
    let may_come_back_for = managed
        && !deleted
        && if deleting {
            sg.spec.deletion_policy == DeletionPolicy::Delete
        } else {
            !imported
        };
    let await_reimport = |backend_id: &str| -> Result<Missing, SpecProblem> {
        // An import names no tenant: its group's, as last observed (the campaign's seed 124).
        let tenant = sg
            .spec
            .tenant
            .as_deref()
            .or(status.and_then(|s| s.tenant_uuid.as_deref()));
        let Some(tenant) = tenant else {
            return Ok(Missing::NotFound);
        };
        Ok(Missing::AwaitReimport {
            tenant: WaldurUuid::parse(tenant).map_err(|e| SpecProblem::BadTenant(e.to_string()))?,
            backend_id: backend_id.to_string(),
        })
    };
    match lookup {
        // Waldur re-imports a group that survived in OpenStack under a new UUID: find it
        // by its Nova id before concluding it is gone. Not one its own DELETE took away: that
        // one is gone from OpenStack too (one list a resource fewer to delete N, issue 21).
        Lookup::Uuid(_) if had_uuid && known_backend_id.is_some() && !deleted => {
            Ok(Missing::Lookup(Lookup::BackendId(
                known_backend_id.unwrap_or_default().to_string(),
            )))
        }
        Lookup::BackendId(backend_id)
            if had_uuid && known_backend_id == Some(backend_id) && may_come_back_for =>
        {
            await_reimport(backend_id)
        }
        Lookup::Uuid(_) if maybe_in_openstack_unseen && may_come_back_for => await_reimport(""),
        _ if imported || !managed || deleting => Ok(Missing::NotFound),
        Lookup::Uuid(_) | Lookup::BackendId(_) => Ok(Missing::Create { recreate: had_uuid }),
        Lookup::OwnCreation { .. } => Ok(Missing::Create { recreate: false }),
    }
}

/// Waldur's 400 for a create whose name the tenant already has ("Server group name should
/// be unique."): not a bad spec when the group is this resource's own lost create.
pub fn name_taken(error: &crate::waldur::WaldurError) -> bool {
    match error {
        crate::waldur::WaldurError::Invalid { messages, .. } => messages.0.iter().any(|m| {
            m.message
                .to_ascii_lowercase()
                .contains("name should be unique")
        }),
        _ => false,
    }
}

/// Waldur's clock may be this far behind the operator's when a create intent's time is
/// compared with a group's `created` (the campaign's ±5 s Waldur clock, and latency). A group of the name
/// made by someone else within this window before the intent, unseen by the picture the create
/// was decided on, is indistinguishable from this resource's own lost create; the window is
/// kept near the clock bound, and a deletion does not use it at all (see `pick_own_creation`).
pub const INTENT_CLOCK_SLACK: SignedDuration = SignedDuration::from_secs(10);

/// The create intent that still stands: recorded for this tenant and name, and no group bound
/// since (the intent of a recreate names the UUID it replaces).
pub fn pending_intent(sg: &ServerGroup) -> Option<CreateIntent> {
    let intent = sg.create_intent()?;
    let Lookup::OwnCreation { tenant, name, .. } = first_lookup_for_create(sg).ok()? else {
        return None;
    };
    let bound = sg
        .status
        .as_ref()
        .and_then(|s| s.uuid.as_deref())
        .and_then(|u| WaldurUuid::parse(u).ok());
    let replaces = WaldurUuid::parse(&intent.replaces).ok();
    let same_target =
        WaldurUuid::parse(&intent.tenant).ok().as_ref() == Some(&tenant) && intent.name == name;
    (same_target && replaces == bound).then_some(intent)
}

/// Whether `other` (another ServerGroup) holds the tenant's `name` while its group is away
/// from Waldur: a Managed create of that tenant and name bound to a group (its status keeps
/// the UUID while it looks again) or awaiting Waldur's re-import of it. That group may come
/// back (a re-sync re-imports it under its old name, whatever else holds the name by then)
/// or its owner makes it anew: a twin that took the free name meanwhile would leave two groups
/// of the name, both bound (the fault campaign's seed 16).
pub fn holds_name_while_away(other: &ServerGroup, tenant: &WaldurUuid, name: &str) -> bool {
    if !named(other, name)
        || other.spec.management_policy != ManagementPolicy::Managed
        || other.spec.import.is_some()
    {
        return false;
    }
    let Ok(Lookup::OwnCreation {
        tenant: theirs,
        name: their_name,
        ..
    }) = first_lookup_for_create(other)
    else {
        return false;
    };
    let Some(status) = other.status.as_ref() else {
        return false;
    };
    let away = status.uuid.is_some() || status.reimport.is_some();
    away && &theirs == tenant && their_name == name
}

/// Whether `other` would make its group under `name`: a comparison, no allocation, so that a
/// walk over every cached ServerGroup before each create stays cheap (at 10,000 resources the
/// walks parsed every other resource's intent and tenant: 124 s of CPU to create them all).
pub fn named(other: &ServerGroup, name: &str) -> bool {
    other.waldur_name_str() == Some(name)
}

/// Whether a create recorded by `intent` may have made `group` of this tenant and name: not
/// a group its create found already there (its `foreign` list). The group an Orphan resource
/// left, which a later create met on its 400, is nobody's creation (the campaign's seed 110: a
/// third resource of the name was told it was made for the one refused).
pub fn may_have_made(
    intent: &CreateIntent,
    tenant: &WaldurUuid,
    name: &str,
    group: &WaldurUuid,
) -> bool {
    WaldurUuid::parse(&intent.tenant).ok().as_ref() == Some(tenant)
        && intent.name == name
        && !intent.foreign.iter().any(|f| f == &group.to_string())
}

/// The intent to record before a create: the pending one kept (an earlier create of this
/// resource may have made the group and lost its answer, so its time and the groups it saw
/// stay), else a fresh one. `fresh` says no earlier create can be this resource's.
pub fn intent_for_create(
    sg: &ServerGroup,
    tenant: &WaldurUuid,
    name: &str,
    seen: &[WaldurUuid],
    now: Timestamp,
) -> (CreateIntent, bool) {
    let mut foreign: Vec<String> = seen.iter().map(|u| u.to_string()).collect();
    if let Some(mut kept) = pending_intent(sg) {
        for uuid in foreign {
            if !kept.foreign.contains(&uuid) {
                kept.foreign.push(uuid);
            }
        }
        return (kept, false);
    }
    foreign.sort();
    foreign.dedup();
    let intent = CreateIntent {
        tenant: tenant.to_string(),
        name: name.to_string(),
        at: now.to_string(),
        replaces: sg
            .status
            .as_ref()
            .and_then(|s| s.uuid.clone())
            .unwrap_or_default(),
        foreign,
    };
    (intent, true)
}

/// Which of the listed groups is the one this resource created.
///
/// Only a resource with a create intent standing asked Waldur to create (the intent is written
/// before every create): without one, no group is its own, however young and well named. A
/// twin (same tenant and name) would otherwise take the group its sibling's lost create made
/// (the fault campaign's R6); and a resource told AlreadyManaged or InvalidSpec never disowns
/// its own later create (review N3). With one: a group of the name and policy that was not
/// there when the create was decided, made no earlier than the intent less Waldur's clock
/// slack, the oldest first. A group whose creation time is missing or unreadable is never
/// taken for its own.
pub fn pick_own_creation<'a>(
    sg: &ServerGroup,
    candidates: &'a [WaldurGroup],
    policy: Policy,
) -> Option<&'a WaldurGroup> {
    let intent = pending_intent(sg)?;
    // A deletion deletes only a group surely made after this resource decided to create:
    // leaving a doubtful one is a leak the user can see; deleting it may destroy another's
    // (the fault campaign's seed 2: Waldur's re-import of a twin's unlinked group).
    let slack = if sg.metadata.deletion_timestamp.is_some() {
        SignedDuration::ZERO
    } else {
        INTENT_CLOCK_SLACK
    };
    let not_before = intent
        .at
        .parse::<Timestamp>()
        .ok()?
        .checked_sub(slack)
        .ok()?;
    // The create sent spec.description: a group with other words was not made by it (twins of
    // one name whose creates both lost their answers, the campaign's seed 2). A sweep's sparse
    // answer carries no description: then a resource with one finds no own group there, and its
    // next create's "name taken" reads Waldur itself.
    let description = sg.spec.description.as_deref().unwrap_or_default().trim();
    let mut fitting: Vec<(Timestamp, &WaldurGroup)> = candidates
        .iter()
        .filter(|g| g.policy == policy.as_str())
        .filter(|g| g.description.trim() == description)
        .filter(|g| !intent.foreign.iter().any(|f| f == g.uuid.as_str()))
        .filter_map(|g| Some((g.created.parse::<Timestamp>().ok()?, g)))
        .filter(|(created, _)| *created >= not_before)
        .collect();
    fitting.sort_by_key(|(created, _)| *created);
    fitting.into_iter().next().map(|(_, g)| g)
}

/// How the group was found, for Events and the status write that binds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    Known,
    Imported,
    Adopted,
    Rebound,
    Created,
    Recreated,
}

/// How a group a lookup found is bound: the one in status is known; found by its Nova id
/// for a resource that had another UUID, it was re-imported; found as this resource's own
/// creation, adopted; otherwise (an import), imported.
pub fn binding(lookup: &Lookup, known: Option<&WaldurUuid>, found: &WaldurUuid) -> Binding {
    match (lookup, known) {
        (_, Some(k)) if k == found => Binding::Known,
        (Lookup::BackendId(_), Some(_)) => Binding::Rebound,
        (Lookup::OwnCreation { .. }, _) => Binding::Adopted,
        _ => Binding::Imported,
    }
}

#[cfg(test)]
#[path = "locate_tests.rs"]
mod tests;
