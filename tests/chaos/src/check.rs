//! The invariants, as pure functions of what the driver recorded and what Kubernetes and the
//! simulated Waldur (and OpenStack behind it) hold at the end.
//!
//! Everything is compared by the simulator's truth, never by what the operator says: a status
//! that claims Ready for a group Waldur does not have is a violation, not a pass. Where the
//! truth leaves room (a group deleted behind the operator's back, a name someone else holds),
//! the rules say so next to the check rather than skipping the resource.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::jiff::Timestamp;

use crate::plan::{Deletion, Flavour, Import, ResId};
use crate::record::{ResRecord, SourceRecord};

/// A condition, as the check needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cond {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub observed_generation: Option<i64>,
}

/// A ServerGroup as Kubernetes holds it.
#[derive(Clone, Debug, Default)]
pub struct SgView {
    pub res: Option<ResId>,
    pub key: String,
    pub generation: Option<i64>,
    pub created: Option<Timestamp>,
    pub deleting: bool,
    pub finalizers: Vec<String>,
    pub paused: bool,
    pub uuid: Option<String>,
    pub backend_id: Option<String>,
    pub conditions: Vec<Cond>,
}

impl SgView {
    pub fn cond(&self, type_: &str) -> Option<&Cond> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// `Ready=<status> <reason>: <message>` and the same for Synced and Stalled, for reports.
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        for t in ["Ready", "Synced", "Stalled"] {
            if let Some(c) = self.cond(t) {
                out.push(format!(
                    "{t}={} {} (gen {:?}): {}",
                    c.status,
                    c.reason,
                    c.observed_generation,
                    clip(&c.message, 160)
                ));
            }
        }
        format!(
            "uuid={} gen={:?} finalizers={:?} deleting={} paused={} | {}",
            self.uuid.as_deref().unwrap_or("-"),
            self.generation,
            self.finalizers,
            self.deleting,
            self.paused,
            out.join(" | ")
        )
    }
}

/// A Waldur row, as the simulator's staff view renders it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub uuid: String,
    pub name: String,
    pub tenant: String,
    pub state: String,
    pub backend_id: String,
    /// What the creator wrote: the campaign writes `tag(res)` into each resource's
    /// spec.description, so a row the operator made says which resource it made it for.
    pub description: String,
    pub created: Option<Timestamp>,
}

/// What the campaign writes into spec.description of every resource whose group the operator
/// creates. Waldur keeps it on the row, so the simulator's own table (not the operator's
/// status) says which resource a row was made for, even when the operator never wrote the
/// row's UUID into the status or made it under another name.
pub fn tag(res: &ResId) -> String {
    format!("{TAG_PREFIX}{res}")
}

const TAG_PREFIX: &str = "waldur-chaos ";

/// A Nova server group.
#[derive(Clone, Debug, PartialEq)]
pub struct Nova {
    pub tenant: String,
    pub backend_id: String,
    pub name: String,
}

/// The simulator's truth.
#[derive(Clone, Debug, Default)]
pub struct Truth {
    pub rows: Vec<Row>,
    pub nova: Vec<Nova>,
}

impl Truth {
    pub fn row(&self, uuid: &str) -> Option<&Row> {
        let uuid = norm(uuid);
        self.rows.iter().find(|r| r.uuid == uuid)
    }

    pub fn rows_named(&self, tenant: &str, name: &str) -> Vec<&Row> {
        let tenant = norm(tenant);
        self.rows
            .iter()
            .filter(|r| r.tenant == tenant && r.name == name)
            .collect()
    }

    pub fn row_with_backend(&self, backend_id: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| !backend_id.is_empty() && r.backend_id == backend_id)
    }

    pub fn nova_has(&self, backend_id: &str) -> bool {
        self.nova.iter().any(|g| g.backend_id == backend_id)
    }

    /// Whether any row is in a transitional state (the workers are still busy).
    pub fn busy(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.state != "OK" && r.state != "ERRED")
    }
}

/// UUIDs compare as 32 lowercase hex digits.
pub fn norm(uuid: &str) -> String {
    uuid.replace('-', "").to_ascii_lowercase()
}

pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// One invariant's result: one line of the report.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub unit: &'static str,
    pub checked: usize,
    pub violations: Vec<String>,
}

impl Outcome {
    fn new(name: &'static str, unit: &'static str) -> Outcome {
        Outcome {
            name,
            unit,
            checked: 0,
            violations: Vec::new(),
        }
    }
}

pub const ONE_GROUP: &str = "one-group-per-resource";
pub const NO_LEAK: &str = "nothing-left-behind-by-deletes";
pub const NO_FINALIZER: &str = "no-finalizer-left-on-deleted";
pub const TRUTHFUL: &str = "status-is-true";
pub const NO_PANIC: &str = "no-panic-no-crash";
pub const ACCOUNTED: &str = "every-group-accounted-for";
pub const SETTLED: &str = "campaign-settled";

/// Everything the check reads.
pub struct Input<'a> {
    pub records: &'a BTreeMap<ResId, ResRecord>,
    pub sources: &'a [SourceRecord],
    pub sgs: &'a [SgView],
    pub truth: &'a Truth,
    /// Violations seen while the campaign ran (two resources bound to one group, a group
    /// bound that the resource did not create), already worded.
    pub history: &'a [String],
    /// Panic lines and unexpected exits of the operator, already worded.
    pub crashes: &'a [String],
    /// What the driver saw a resource told falsely while the campaign ran (`status-is-true`).
    pub told: &'a [String],
    pub runs: usize,
    /// Every Waldur row the driver saw while the campaign ran (it samples the simulator's row
    /// table every few milliseconds), with the last non-empty backend id each one had: which
    /// resource made a row, and which Nova group it stood for, after the row is gone.
    pub lineage: &'a [Row],
    /// The settle ended with the invariants holding twice in a row (true while settling: the
    /// settle itself is what decides it).
    pub settled: bool,
}

/// Who a group belongs to, as far as the simulator's rows and the driver's records tell.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Owner {
    /// A resource the campaign created: the operator made the group for it (or Waldur
    /// re-imported that group's Nova group under a new UUID).
    Res(ResId),
    /// A group someone made in Waldur for imports and observes (its id in the plan).
    Source(usize),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Res(r) => write!(f, "{r}"),
            Owner::Source(id) => write!(f, "source #{id}"),
        }
    }
}

/// A Waldur row or a Nova group, for the rules that judge both.
#[derive(Clone, Copy)]
enum Group<'g> {
    Row(&'g Row),
    Nova(&'g Nova),
}

impl Group<'_> {
    fn backend(&self) -> &str {
        match self {
            Group::Row(r) => &r.backend_id,
            Group::Nova(g) => &g.backend_id,
        }
    }
}

/// All the invariants, in report order.
pub fn check(input: &Input) -> Vec<Outcome> {
    let ctx = Ctx::new(input);
    vec![
        ctx.one_group(),
        ctx.accounted(),
        ctx.no_leak(),
        ctx.no_finalizer(),
        ctx.truthful(),
        ctx.no_panic(),
        ctx.settled(),
    ]
}

/// Says whose each row and Nova group is, strongest evidence first: the simulator's own rows
/// (a source's UUID; the description tag the operator passed on to Waldur; a row's backend id
/// tying a Nova group, and Waldur's re-import of it, to the row that made it), then what the
/// driver saw done behind the operator's back, and only last what the operator's status said.
/// A weaker source never overrides a stronger one.
fn attribute(input: &Input) -> (BTreeMap<String, Owner>, BTreeMap<String, Owner>) {
    let tags: BTreeMap<String, &ResId> = input
        .records
        .values()
        .filter(|r| r.spec.flavour.creates())
        .map(|r| (tag(&r.spec.res), &r.spec.res))
        .collect();
    let rows: Vec<&Row> = input.lineage.iter().chain(&input.truth.rows).collect();
    let mut row_owner: BTreeMap<String, Owner> = BTreeMap::new();
    let mut backend_owner: BTreeMap<String, Owner> = BTreeMap::new();
    for row in &rows {
        let source = input
            .sources
            .iter()
            .find(|s| s.uuid.as_deref().map(norm).as_deref() == Some(row.uuid.as_str()));
        let owner = match source {
            Some(s) => Some(Owner::Source(s.plan.id)),
            None => tags
                .get(row.description.as_str())
                .map(|r| Owner::Res((*r).clone())),
        };
        if let Some(o) = owner {
            row_owner.entry(row.uuid.clone()).or_insert(o);
        }
    }
    for s in input.sources {
        if let Some(b) = s.backend_id.as_deref().filter(|b| !b.is_empty()) {
            backend_owner
                .entry(b.to_string())
                .or_insert(Owner::Source(s.plan.id));
        }
    }
    let by_backend = |row_owner: &BTreeMap<String, Owner>,
                      backend_owner: &mut BTreeMap<String, Owner>| {
        for row in &rows {
            if !row.backend_id.is_empty()
                && let Some(o) = row_owner.get(&row.uuid)
            {
                backend_owner
                    .entry(row.backend_id.clone())
                    .or_insert_with(|| o.clone());
            }
        }
    };
    let reimports = |row_owner: &mut BTreeMap<String, Owner>,
                     backend_owner: &BTreeMap<String, Owner>| {
        for row in &rows {
            if !row_owner.contains_key(&row.uuid)
                && let Some(o) = backend_owner.get(&row.backend_id)
            {
                row_owner.insert(row.uuid.clone(), o.clone());
            }
        }
    };
    by_backend(&row_owner, &mut backend_owner);
    // The driver read these backend ids from the simulator when a staff user unlinked them.
    for rec in input.records.values() {
        for b in &rec.excused_backends {
            backend_owner
                .entry(b.clone())
                .or_insert_with(|| Owner::Res(rec.spec.res.clone()));
        }
    }
    reimports(&mut row_owner, &backend_owner);
    // Last: the operator's own status, for rows no tag names (the unit tests' rows, and any
    // group made without the campaign's description).
    let said = input
        .records
        .values()
        .filter_map(|r| {
            r.last_bound
                .as_ref()
                .map(|(u, b)| (&r.spec.res, u, b.as_str()))
        })
        .chain(input.sgs.iter().filter_map(|sg| {
            let (res, u) = (sg.res.as_ref()?, sg.uuid.as_ref()?);
            Some((res, u, sg.backend_id.as_deref().unwrap_or("")))
        }));
    for (res, u, b) in said {
        let u = norm(u);
        row_owner
            .entry(u.clone())
            .or_insert_with(|| Owner::Res(res.clone()));
        // The backend id re-read from the simulator's rows: the status may have been read
        // before Waldur assigned one.
        let seen = rows
            .iter()
            .find(|r| r.uuid == u && !r.backend_id.is_empty())
            .map(|r| r.backend_id.as_str());
        for b in [Some(b), seen]
            .into_iter()
            .flatten()
            .filter(|b| !b.is_empty())
        {
            backend_owner
                .entry(b.to_string())
                .or_insert_with(|| Owner::Res(res.clone()));
        }
    }
    by_backend(&row_owner, &mut backend_owner);
    reimports(&mut row_owner, &backend_owner);
    (row_owner, backend_owner)
}

struct Ctx<'a> {
    input: &'a Input<'a>,
    by_res: BTreeMap<&'a ResId, &'a SgView>,
    /// UUID -> the present, not deleting resources bound to it.
    bound: BTreeMap<String, Vec<&'a ResId>>,
    /// Row UUID (seen at any time) -> whose group it is.
    row_owner: BTreeMap<String, Owner>,
    /// Nova backend id (seen at any time) -> whose group it is.
    backend_owner: BTreeMap<String, Owner>,
}

impl<'a> Ctx<'a> {
    fn new(input: &'a Input<'a>) -> Ctx<'a> {
        let mut by_res = BTreeMap::new();
        let mut bound: BTreeMap<String, Vec<&ResId>> = BTreeMap::new();
        for sg in input.sgs {
            if let Some(res) = &sg.res {
                by_res.insert(res, sg);
                if let Some(u) = &sg.uuid
                    && !sg.deleting
                {
                    bound.entry(norm(u)).or_default().push(res);
                }
            }
        }
        let (row_owner, backend_owner) = attribute(input);
        Ctx {
            input,
            by_res,
            bound,
            row_owner,
            backend_owner,
        }
    }

    fn truth(&self) -> &Truth {
        self.input.truth
    }

    fn source(&self, import: &Import) -> Option<&SourceRecord> {
        match import {
            Import::SourceUuid(id) | Import::SourceBackendId(id) => {
                self.input.sources.iter().find(|s| s.plan.id == *id)
            }
            Import::Missing(_) => None,
        }
    }

    /// Whether something else could have made a group of this resource's tenant+name while it
    /// lived: another creating resource alive at the same time (twins, a clash before this
    /// one was deleted) or a source of that name (sources are never deleted by the driver).
    /// Then a group of the name that nothing is attributed to proves nothing about this one.
    /// A resource that only ever shared its name with ones before or after it keeps its
    /// name checks: a clash that takes an orphaned name later does not switch them off.
    fn name_shared(&self, rec: &ResRecord) -> bool {
        let name = rec.spec.waldur_name();
        let end = |r: &ResRecord| r.deleted_at.unwrap_or(usize::MAX);
        let others = self
            .input
            .records
            .values()
            .filter(|o| o.spec.res != rec.spec.res && o.accepted && o.spec.flavour.creates())
            .filter(|o| o.spec.waldur_name() == name && o.spec.tenant == rec.spec.tenant)
            .any(|o| o.created_at <= end(rec) && rec.created_at <= end(o));
        let source = self
            .input
            .sources
            .iter()
            .any(|s| s.plan.name == name && s.plan.tenant == rec.spec.tenant);
        others || source
    }

    /// The rows and Nova groups in the truth that are this resource's: attributed to it, and,
    /// when no one alive at the same time shared its name, those of its name that nothing is
    /// attributed to. Counting these, not everything of the name, keeps the duplicate and
    /// leak checks on whatever else carries the name.
    fn groups_of(&self, rec: &ResRecord) -> (Vec<&'a Row>, Vec<&'a Nova>) {
        let me = Owner::Res(rec.spec.res.clone());
        let by_name = rec.spec.flavour.creates() && !self.name_shared(rec);
        let (tenant, name) = (norm(rec.spec.tenant), rec.spec.waldur_name());
        let truth = self.input.truth;
        let rows = truth
            .rows
            .iter()
            .filter(|r| match self.row_owner.get(&r.uuid) {
                Some(o) => *o == me,
                None => by_name && r.tenant == tenant && r.name == name,
            })
            .collect();
        let nova = truth
            .nova
            .iter()
            .filter(|g| match self.backend_owner.get(&g.backend_id) {
                Some(o) => *o == me,
                None => by_name && g.tenant == tenant && g.name == name,
            })
            .collect();
        (rows, nova)
    }

    /// The backend id a row had when the driver last saw it with one (the simulator's rows,
    /// not the status, which may have been read before Waldur assigned it).
    fn backend_seen(&self, uuid: &str) -> Option<String> {
        let uuid = norm(uuid);
        self.input
            .lineage
            .iter()
            .chain(&self.input.truth.rows)
            .find(|r| r.uuid == uuid && !r.backend_id.is_empty())
            .map(|r| r.backend_id.clone())
    }

    /// The resource's group vanished before its Nova id was known, and the re-sync brought
    /// back several groups of its name: it says so, names them, and binds none (a person must
    /// pick: nothing tells which Nova group was its own). That is the truth, not a violation,
    /// when its own re-import (by the simulator's records) and another row of the name are
    /// among those it names (the final run's seed 105: the other was a twin's leftover after
    /// a restart).
    fn honest_ambiguity(&self, rec: &ResRecord, sg: &SgView) -> bool {
        let Some(ready) = sg.cond("Ready") else {
            return false;
        };
        if ready.reason != "Reimporting" || !ready.message.contains("several groups named") {
            return false;
        }
        let mine = Owner::Res(rec.spec.res.clone());
        let named: Vec<&Row> = self
            .truth()
            .rows_named(rec.spec.tenant, &rec.spec.waldur_name())
            .into_iter()
            .filter(|r| ready.message.contains(&r.uuid))
            .collect();
        let own = named
            .iter()
            .any(|r| self.row_owner.get(&r.uuid) == Some(&mine));
        let other = named
            .iter()
            .any(|r| self.row_owner.get(&r.uuid) != Some(&mine));
        own && other
    }

    fn live(&self) -> impl Iterator<Item = (&'a ResRecord, &'a SgView)> + '_ {
        self.input
            .records
            .values()
            .filter(|r| r.accepted && r.deleted_at.is_none())
            .filter_map(|r| self.by_res.get(&r.spec.res).map(|sg| (r, *sg)))
    }

    /// The resource waits for a twin whose group is away from Waldur (unlinked, awaiting the
    /// re-sync; or paused since): true when the twin it names is live, creates under the same
    /// tenant and name, and is still bound to (or awaiting) a group Waldur does not have.
    fn name_held_while_away(&self, rec: &ResRecord, message: &str) -> bool {
        if !message.contains("whose group is gone from Waldur for now") {
            return false;
        }
        self.live().any(|(other, sg)| {
            other.spec.res != rec.spec.res
                && other.spec.flavour.creates()
                && norm(other.spec.tenant) == norm(rec.spec.tenant)
                && other.spec.waldur_name() == rec.spec.waldur_name()
                && message.contains(&other.spec.res.to_string())
                && sg
                    .uuid
                    .as_deref()
                    .is_none_or(|u| self.truth().row(u).is_none())
        })
    }

    /// The other resources holding this group. Observe resources hold nothing: they only
    /// read, and may watch a group another resource manages.
    fn others_bound(&self, uuid: &str, me: &ResId) -> Vec<String> {
        let observer = |r: &ResId| {
            self.input
                .records
                .get(r)
                .is_some_and(|rec| rec.spec.flavour == Flavour::Observe)
        };
        if observer(me) {
            return vec![];
        }
        self.bound
            .get(&norm(uuid))
            .into_iter()
            .flatten()
            .filter(|r| **r != me && !observer(r))
            .map(|r| r.to_string())
            .collect()
    }

    /// Everything that may have made a group of this name in the tenant: the resources that
    /// create under it and the sources that carry it. Only for groups no evidence ties to an
    /// owner (the driver's sampling missed the row that made them).
    fn name_candidates(&self, tenant: &str, name: &str) -> Vec<Owner> {
        let tenant = norm(tenant);
        let resources = self
            .input
            .records
            .values()
            .filter(|r| r.spec.flavour.creates())
            .filter(|r| norm(r.spec.tenant) == tenant && r.spec.waldur_name() == name)
            .map(|r| Owner::Res(r.spec.res.clone()));
        let sources = self
            .input
            .sources
            .iter()
            .filter(|s| norm(s.plan.tenant) == tenant && s.plan.name == name)
            .map(|s| Owner::Source(s.plan.id));
        resources.chain(sources).collect()
    }

    /// Whether `owner` accounts for the group still being there, and why not.
    fn accounts(&self, owner: &Owner, group: Group) -> Result<(), String> {
        let res = match owner {
            // Someone else's: its fate is the importers' (nothing-left-behind judges that).
            Owner::Source(_) => return Ok(()),
            Owner::Res(r) => r,
        };
        let Some(rec) = self.input.records.get(res) else {
            return Err(format!("{res} is no resource of the campaign"));
        };
        if !rec.accepted {
            return Err(format!("{res}'s create was refused by Kubernetes"));
        }
        let backend = group.backend();
        if !backend.is_empty() && rec.excused_backends.iter().any(|b| b == backend) {
            // A staff user unlinked it behind the operator's back: Waldur lost it, not the
            // operator.
            return Ok(());
        }
        if let Some(sg) = self.by_res.get(res) {
            // Deleting: no-finalizer-left judges it. Paused: the user froze the resource,
            // possibly between a create and its status write. Ambiguous: it names the group
            // and waits for a person.
            if sg.deleting
                || sg.paused
                || rec.deleted_at.is_some()
                || self.honest_ambiguity(rec, sg)
            {
                return Ok(());
            }
            let bound = sg.uuid.as_deref().map(norm);
            let bound_backend = bound
                .as_deref()
                .and_then(|u| self.truth().row(u))
                .map(|r| r.backend_id.clone())
                .filter(|b| !b.is_empty())
                .or_else(|| sg.backend_id.clone().filter(|b| !b.is_empty()));
            let ok = match group {
                Group::Row(r) => bound.as_deref() == Some(r.uuid.as_str()),
                Group::Nova(g) => bound_backend.as_deref() == Some(g.backend_id.as_str()),
            };
            return if ok {
                Ok(())
            } else {
                Err(format!(
                    "{res} is live and bound to {}",
                    bound.as_deref().unwrap_or("nothing")
                ))
            };
        }
        if rec.deleted_at.is_none() {
            // Gone from Kubernetes unasked: one-group-per-resource reports that.
            return Ok(());
        }
        match (rec.deletion, group) {
            (Deletion::Orphan, _) | (Deletion::Unlink, Group::Nova(_)) => Ok(()),
            (Deletion::Unlink, Group::Row(r)) => {
                let its_own = r.description == tag(res)
                    || rec
                        .last_bound
                        .as_ref()
                        .is_some_and(|(u, _)| norm(u) == r.uuid);
                if its_own {
                    Err(format!(
                        "{res} was deleted with deletionPolicy Unlink, yet its own record is still in Waldur"
                    ))
                } else {
                    // Waldur's re-import of the Nova group the unlink left.
                    Ok(())
                }
            }
            (Deletion::Delete, _) => Err(format!("{res} was deleted with deletionPolicy Delete")),
        }
    }

    /// Why a group is unaccounted for, if it is.
    fn unaccounted(
        &self,
        owner: Option<&Owner>,
        tenant: &str,
        name: &str,
        group: Group,
    ) -> Option<String> {
        match owner {
            Some(o) => self
                .accounts(o, group)
                .err()
                .map(|why| format!("made for {o}, but {why}")),
            None => {
                let candidates = self.name_candidates(tenant, name);
                if candidates.iter().any(|o| self.accounts(o, group).is_ok()) {
                    return None;
                }
                Some(format!(
                    "nothing ties it to a resource or a source, and nothing of its name accounts for it ({})",
                    if candidates.is_empty() {
                        "no resource or source has the name".to_string()
                    } else {
                        candidates
                            .iter()
                            .map(|o| o.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ))
            }
        }
    }

    /// Every Waldur row and every Nova group is accounted for: a live resource's bound group,
    /// a source, what a deleted resource's policy leaves (Orphan: both; Unlink: the Nova group
    /// and Waldur's re-import of it), or a Nova group a staff user unlinked. Anything else is
    /// a leak, whoever made it and under whatever name.
    fn accounted(&self) -> Outcome {
        let mut out = Outcome::new(ACCOUNTED, "groups");
        for row in &self.truth().rows {
            out.checked += 1;
            if let Some(why) = self.unaccounted(
                self.row_owner.get(&row.uuid),
                &row.tenant,
                &row.name,
                Group::Row(row),
            ) {
                out.violations.push(format!(
                    "Waldur row {} '{}' {} backend={:?} left: {why}",
                    row.uuid, row.name, row.state, row.backend_id
                ));
            }
        }
        for g in &self.truth().nova {
            out.checked += 1;
            if let Some(why) = self.unaccounted(
                self.backend_owner.get(&g.backend_id),
                &g.tenant,
                &g.name,
                Group::Nova(g),
            ) {
                out.violations.push(format!(
                    "Nova group {} '{}' (tenant {}) left: {why}",
                    g.backend_id,
                    g.name,
                    clip(&g.tenant, 6)
                ));
            }
        }
        out
    }

    /// Exactly one Waldur group (and one Nova group) per Managed, live resource, and it is
    /// the right one.
    fn one_group(&self) -> Outcome {
        let mut out = Outcome::new(ONE_GROUP, "live resources");
        out.violations.extend(self.input.history.iter().cloned());
        for rec in self.input.records.values() {
            if rec.accepted && rec.deleted_at.is_none() && !self.by_res.contains_key(&rec.spec.res)
            {
                out.violations.push(format!(
                    "{}: created and never deleted, yet gone from Kubernetes",
                    rec.spec.res
                ));
            }
        }
        for (rec, sg) in self.live() {
            out.checked += 1;
            if sg.paused {
                out.violations.extend(self.paused_problems(rec, sg));
                continue;
            }
            if rec.spec.flavour == Flavour::Observe {
                out.violations.extend(self.observe_problem(rec, sg));
                continue;
            }
            if self.honest_ambiguity(rec, sg) {
                continue;
            }
            let res = &rec.spec.res;
            let reason = sg.cond("Ready").map(|c| c.reason.as_str()).unwrap_or("");
            let Some(uuid) = &sg.uuid else {
                if !matches!(reason, "NotFound" | "AlreadyManaged" | "InvalidSpec") {
                    out.violations.push(format!(
                        "{res}: no Waldur group bound ({}) | {}",
                        rec.spec,
                        sg.describe()
                    ));
                }
                continue;
            };
            let others = self.others_bound(uuid, res);
            if !others.is_empty() {
                out.violations.push(format!(
                    "{res}: group {uuid} is also bound by {}",
                    others.join(", ")
                ));
            }
            let Some(row) = self.truth().row(uuid) else {
                if !matches!(reason, "NotFound" | "AlreadyManaged" | "InvalidSpec") {
                    out.violations.push(format!(
                        "{res}: bound to {uuid}, which Waldur does not have | {}",
                        sg.describe()
                    ));
                }
                continue;
            };
            if rec.spec.flavour.creates() {
                // A row made for this resource (its description) is its own whatever the
                // times say: Waldur's clock may run behind the API server's (clock-skew).
                if let (Some(made), Some(resource)) = (row.created, sg.created)
                    && made < resource
                    && row.description != tag(res)
                {
                    out.violations.push(format!(
                        "{res}: bound to {uuid} '{}', created {made} before the resource ({resource}): not its own group",
                        row.name
                    ));
                }
                match self.row_owner.get(&row.uuid) {
                    Some(Owner::Res(o)) if o != res => out.violations.push(format!(
                        "{res}: bound to {uuid} '{}', which was made for {o}",
                        row.name
                    )),
                    Some(Owner::Source(id)) => out.violations.push(format!(
                        "{res}: bound to {uuid} '{}', source #{id}'s group: someone else's",
                        row.name
                    )),
                    _ => {}
                }
                // Its own groups, by attribution (and by name where no one else could have
                // made one): exactly the bound row and the Nova group behind it.
                let (rows, nova) = self.groups_of(rec);
                if rows.len() != 1 || rows[0].uuid != norm(uuid) {
                    out.violations.push(format!(
                        "{res}: {} Waldur group(s) of its own, bound to {uuid}: {}",
                        rows.len(),
                        list_rows(&rows)
                    ));
                }
                let want: Vec<&str> = Some(row.backend_id.as_str())
                    .filter(|b| !b.is_empty())
                    .into_iter()
                    .collect();
                let have: Vec<&str> = nova.iter().map(|g| g.backend_id.as_str()).collect();
                if have != want {
                    out.violations.push(format!(
                        "{res}: {} Nova group(s) of its own (expected {want:?}): {}",
                        have.len(),
                        list_nova(&nova)
                    ));
                }
            }
            if !row.backend_id.is_empty() && !self.truth().nova_has(&row.backend_id) {
                out.violations.push(format!(
                    "{res}: bound to {uuid} whose Nova group {} is gone",
                    row.backend_id
                ));
            }
            if let Some(import) = &rec.spec.import
                && let Some(src) = self.source(import)
            {
                let same_uuid = src.uuid.as_deref().map(norm) == Some(row.uuid.clone());
                let same_backend = src
                    .backend_id
                    .as_deref()
                    .is_some_and(|b| !b.is_empty() && b == row.backend_id);
                if !same_uuid && !same_backend {
                    out.violations.push(format!(
                        "{res}: imports {} ({:?}) but is bound to {uuid} '{}'",
                        src.plan.name, src.uuid, row.name
                    ));
                }
            }
        }
        self.twins_bound(&mut out);
        out
    }

    /// A paused resource does nothing, but what its status names must still be true: a group
    /// Waldur has, bound by no one else. Excused: its group was touched behind the operator's
    /// back (or its source's, by another importer's Delete), or it never reached OpenStack
    /// (an ERRED row without a Nova group, which Waldur's re-sync drops).
    fn paused_problems(&self, rec: &ResRecord, sg: &SgView) -> Vec<String> {
        let res = &rec.spec.res;
        let Some(uuid) = &sg.uuid else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let others = self.others_bound(uuid, res);
        if !others.is_empty() {
            out.push(format!(
                "{res} (paused): group {uuid} is also bound by {}",
                others.join(", ")
            ));
        }
        let source_gone = rec
            .spec
            .import
            .as_ref()
            .and_then(|i| self.source(i))
            .is_some_and(|s| self.deleted_by_importer(s));
        let never_in_nova = self.backend_seen(uuid).is_none()
            && self
                .input
                .lineage
                .iter()
                .any(|r| r.uuid == norm(uuid) && r.state == "ERRED");
        if self.truth().row(uuid).is_none() && !rec.out_of_band && !source_gone && !never_in_nova {
            out.push(format!(
                "{res} (paused): bound to {uuid}, which Waldur does not have, though nothing touched it behind the operator's back | {}",
                sg.describe()
            ));
        }
        out
    }

    /// A live Observe resource is bound to its source (or Waldur's re-import of it) while the
    /// group it names is in Waldur; when it is not, status-is-true judges the NotFound.
    fn observe_problem(&self, rec: &ResRecord, sg: &SgView) -> Option<String> {
        let res = &rec.spec.res;
        let src = rec.spec.import.as_ref().and_then(|i| self.source(i))?;
        let there = src
            .uuid
            .as_deref()
            .is_some_and(|u| self.truth().row(u).is_some());
        if !there {
            return None;
        }
        let theirs = Owner::Source(src.plan.id);
        match &sg.uuid {
            Some(u) if self.row_owner.get(&norm(u)) == Some(&theirs) => None,
            Some(u) => Some(format!(
                "{res} (Observe): observes {} ({:?}) but is bound to {u} | {}",
                src.plan.name,
                src.uuid,
                sg.describe()
            )),
            None => Some(format!(
                "{res} (Observe): observes {} ({:?}), which Waldur has, and is bound to nothing | {}",
                src.plan.name,
                src.uuid,
                sg.describe()
            )),
        }
    }

    /// A deleted resource left behind what its deletionPolicy says, and nothing else.
    fn no_leak(&self) -> Outcome {
        let mut out = Outcome::new(NO_LEAK, "deleted resources");
        for rec in self.input.records.values() {
            if rec.deleted_at.is_none() || !rec.accepted || self.by_res.contains_key(&rec.spec.res)
            {
                continue;
            }
            if matches!(
                rec.spec.flavour,
                Flavour::Observe | Flavour::MissingImport | Flavour::DuplicateImport
            ) {
                // Never theirs to delete: the source's fate is decided by its importer.
                out.checked += 1;
                if let Some(src) = rec.spec.import.as_ref().and_then(|i| self.source(i))
                    && let Some(u) = &src.uuid
                    && rec.spec.flavour == Flavour::Observe
                    && self.truth().row(u).is_none()
                    && !src
                        .backend_id
                        .as_deref()
                        .is_some_and(|b| self.truth().nova_has(b))
                    && !self.deleted_by_importer(src)
                {
                    out.violations.push(format!(
                        "{}: observed {} ({u}), which is gone from Waldur and OpenStack though no importer deleted it",
                        rec.spec.res, src.plan.name
                    ));
                }
                continue;
            }
            out.checked += 1;
            let res = &rec.spec.res;
            let excused = |backend: &str| rec.excused_backends.iter().any(|b| b == backend);
            // The group its status last named, unless a live resource holds it now, with the
            // backend id re-read from the simulator's rows when the status had none yet.
            let bound = rec
                .last_bound
                .as_ref()
                .filter(|(u, _)| self.bound.get(&norm(u)).is_none_or(|v| v.is_empty()))
                .map(|(u, b)| {
                    let b = match b.is_empty() {
                        true => self.backend_seen(u).unwrap_or_default(),
                        false => b.clone(),
                    };
                    (u.clone(), b)
                });
            let (rows, nova) = self.groups_of(rec);
            match rec.deletion {
                Deletion::Delete => {
                    if let Some((u, b)) = &bound {
                        if self.truth().row(u).is_some() {
                            out.violations
                                .push(format!("{res} (Delete): its group {u} is still in Waldur"));
                        }
                        if !b.is_empty() && !excused(b) && self.truth().nova_has(b) {
                            out.violations.push(format!(
                                "{res} (Delete): its Nova group {b} is still in OpenStack"
                            ));
                        }
                    }
                    let rows: Vec<&Row> = rows
                        .into_iter()
                        .filter(|r| !excused(&r.backend_id))
                        .collect();
                    let nova: Vec<&Nova> = nova
                        .into_iter()
                        .filter(|g| !excused(&g.backend_id))
                        .collect();
                    if !rows.is_empty() || !nova.is_empty() {
                        out.violations.push(format!(
                            "{res} (Delete): left {} Waldur group(s) [{}] and {} Nova group(s) [{}] of its own{}",
                            rows.len(),
                            list_rows(&rows),
                            nova.len(),
                            list_nova(&nova),
                            taints(rec)
                        ));
                    }
                }
                Deletion::Unlink => {
                    let u = bound.as_ref().map(|(u, _)| norm(u));
                    if let Some((u, b)) = &bound {
                        if self.truth().row(u).is_some() {
                            out.violations.push(format!(
                                "{res} (Unlink): its Waldur record {u} is still there"
                            ));
                        }
                        if !b.is_empty() && !rec.out_of_band && !self.truth().nova_has(b) {
                            out.violations.push(format!(
                                "{res} (Unlink): its Nova group {b} is gone from OpenStack"
                            ));
                        }
                    }
                    // Records it made and its status never named (a re-import is fine).
                    let records: Vec<&Row> = rows
                        .into_iter()
                        .filter(|r| r.description == tag(res) && Some(&r.uuid) != u.as_ref())
                        .collect();
                    if !records.is_empty() {
                        out.violations.push(format!(
                            "{res} (Unlink): its Waldur record(s) still there: {}",
                            list_rows(&records)
                        ));
                    }
                    if nova.len() > 1 {
                        out.violations.push(format!(
                            "{res} (Unlink): {} Nova groups of its own [{}]{}",
                            nova.len(),
                            list_nova(&nova),
                            taints(rec)
                        ));
                    }
                }
                Deletion::Orphan => {
                    if let Some((u, b)) = &bound
                        && !b.is_empty()
                        && !rec.out_of_band
                    {
                        if !self.truth().nova_has(b) {
                            out.violations.push(format!(
                                "{res} (Orphan): its Nova group {b} is gone from OpenStack"
                            ));
                        }
                        if self.truth().row(u).is_none()
                            && self.truth().row_with_backend(b).is_none()
                        {
                            out.violations.push(format!(
                                "{res} (Orphan): its Waldur group {u} (backend {b}) is gone"
                            ));
                        }
                    }
                    if rows.len() > 1 || nova.len() > 1 {
                        out.violations.push(format!(
                            "{res} (Orphan): {} Waldur [{}] and {} Nova groups [{}] of its own{}",
                            rows.len(),
                            list_rows(&rows),
                            nova.len(),
                            list_nova(&nova),
                            taints(rec)
                        ));
                    }
                }
            }
        }
        out
    }

    /// Whether a Managed importer of `src` was deleted with Delete: then the source's absence
    /// is explained.
    fn deleted_by_importer(&self, src: &SourceRecord) -> bool {
        self.input.records.values().any(|r| {
            r.deleted_at.is_some()
                && r.deletion == Deletion::Delete
                && matches!(r.spec.flavour, Flavour::Import)
                && r.spec
                    .import
                    .as_ref()
                    .and_then(|i| self.source(i))
                    .map(|s| s.plan.id)
                    == Some(src.plan.id)
        }) || src.out_of_band
    }

    /// Every resource the campaign deleted is gone: no finalizer was left behind.
    fn no_finalizer(&self) -> Outcome {
        let mut out = Outcome::new(NO_FINALIZER, "deleted resources");
        for rec in self.input.records.values() {
            if rec.deleted_at.is_none() || !rec.accepted {
                continue;
            }
            out.checked += 1;
            if let Some(sg) = self.by_res.get(&rec.spec.res) {
                out.violations.push(format!(
                    "{}: deleted at point #{} and still here ({}) | {}",
                    rec.spec.res,
                    rec.deleted_at.unwrap_or_default(),
                    rec.deletion.as_str(),
                    sg.describe()
                ));
            }
        }
        out
    }

    /// Every remaining resource is Ready, or says truthfully why not.
    fn truthful(&self) -> Outcome {
        let mut out = Outcome::new(TRUTHFUL, "remaining resources");
        out.violations.extend(self.input.told.iter().cloned());
        for (rec, sg) in self.live() {
            out.checked += 1;
            let res = &rec.spec.res;
            let synced = sg.cond("Synced");
            if sg.paused {
                if !synced.is_some_and(|c| c.status == "False" && c.reason == "Paused") {
                    out.violations.push(format!(
                        "{res}: paused, but not Synced=False Paused | {}",
                        sg.describe()
                    ));
                }
                continue;
            }
            let Some(ready) = sg.cond("Ready") else {
                out.violations
                    .push(format!("{res}: no Ready condition | {}", sg.describe()));
                continue;
            };
            if ready.observed_generation != sg.generation {
                out.violations.push(format!(
                    "{res}: Ready is for generation {:?}, the object is at {:?} | {}",
                    ready.observed_generation,
                    sg.generation,
                    sg.describe()
                ));
                continue;
            }
            let row = sg.uuid.as_deref().and_then(|u| self.truth().row(u));
            let stalled = sg.cond("Stalled").filter(|c| c.status == "True");
            let mut problem = |what: String| {
                out.violations.push(format!(
                    "{res} [{}]: {what} | {}",
                    rec.spec.flavour.as_str(),
                    sg.describe()
                ));
            };
            match ready.reason.as_str() {
                "Available" => match row {
                    Some(r) if r.state == "OK" && ready.status == "True" => {}
                    Some(r) => problem(format!("says Available, Waldur says {}", r.state)),
                    None => problem("says Available, Waldur has no such group".into()),
                },
                "Erred" => match row {
                    Some(r) if r.state == "ERRED" => {}
                    Some(r) => problem(format!("says Erred, Waldur says {}", r.state)),
                    None => problem("says Erred, Waldur has no such group".into()),
                },
                "NotFound" => {
                    let gone = match &rec.spec.import {
                        Some(Import::Missing(u)) => self.truth().row(u).is_none(),
                        Some(Import::SourceUuid(id)) => self
                            .input
                            .sources
                            .iter()
                            .find(|s| s.plan.id == *id)
                            .and_then(|s| s.uuid.as_deref())
                            .is_none_or(|u| self.truth().row(u).is_none()),
                        Some(Import::SourceBackendId(id)) => self
                            .input
                            .sources
                            .iter()
                            .find(|s| s.plan.id == *id)
                            .and_then(|s| s.backend_id.as_deref())
                            .is_none_or(|b| self.truth().row_with_backend(b).is_none()),
                        None => false,
                    };
                    if !gone {
                        problem(if rec.spec.import.is_some() {
                            "says NotFound, but the group to import is in Waldur".into()
                        } else {
                            "says NotFound for a group the operator should create".into()
                        });
                    } else if stalled.is_none_or(|c| c.reason != "NotFound") {
                        problem("NotFound without Stalled=True NotFound".into());
                    }
                }
                "AlreadyManaged" => {
                    let target: Vec<String> = match &rec.spec.import {
                        Some(i) => self
                            .source(i)
                            .map(|s| {
                                let mut t: Vec<String> = s.uuid.iter().map(|u| norm(u)).collect();
                                if let Some(r) = s
                                    .backend_id
                                    .as_deref()
                                    .and_then(|b| self.truth().row_with_backend(b))
                                {
                                    t.push(r.uuid.clone());
                                }
                                t
                            })
                            .unwrap_or_default(),
                        None => self
                            .truth()
                            .rows_named(rec.spec.tenant, &rec.spec.waldur_name())
                            .iter()
                            .map(|r| r.uuid.clone())
                            .collect(),
                    };
                    let held = target.iter().any(|u| !self.others_bound(u, res).is_empty())
                        || self.name_held_while_away(rec, &ready.message);
                    if !held {
                        problem(
                            "says AlreadyManaged, but no other resource holds the group".into(),
                        );
                    }
                }
                "InvalidSpec" => {
                    // Waldur refuses a create only for a taken name here (every spec the
                    // campaign writes is valid), and only twins and clashes share names.
                    if !matches!(rec.spec.flavour, Flavour::Clash | Flavour::Twin) {
                        problem(format!(
                            "says InvalidSpec for a valid spec ({}): {}",
                            rec.spec,
                            clip(&ready.message, 200)
                        ));
                    } else if let Some(why) = self.name_not_taken(rec) {
                        problem(format!("says InvalidSpec (name taken), but {why}"));
                    }
                }
                "Reimporting" if self.honest_ambiguity(rec, sg) => {}
                other => problem(format!("not settled: Ready reason {other:?}")),
            }
            let synced_ok = match ready.reason.as_str() {
                "InvalidSpec" => synced.is_some_and(|c| c.reason == "InvalidSpec"),
                _ => synced.is_some_and(|c| c.status == "True"),
            };
            if !synced_ok {
                problem("Synced does not say the last reconcile succeeded".into());
            }
            if ready.status == "True" && stalled.is_some() {
                problem("Ready and Stalled at once".into());
            }
        }
        out
    }

    /// Why an InvalidSpec (name taken) is not the truth, if it is not: the name must be taken
    /// in Waldur by a group that is not this resource's own: another resource's (live, or
    /// left by a deleted one's Orphan/Unlink, which is where clashes take their names from)
    /// or a source's. Its own group under the name is a lost create answer, not a taken name.
    fn name_not_taken(&self, rec: &ResRecord) -> Option<String> {
        let name = rec.spec.waldur_name();
        let me = Owner::Res(rec.spec.res.clone());
        let rows = self.truth().rows_named(rec.spec.tenant, &name);
        if rows
            .iter()
            .any(|r| self.row_owner.get(&r.uuid) != Some(&me))
        {
            return None;
        }
        Some(match rows.is_empty() {
            true => format!("Waldur has no group named {name:?} in the tenant"),
            false => format!(
                "the only group named {name:?} is its own, unbound: {}",
                list_rows(&rows)
            ),
        })
    }

    /// Two live twins, both settled for their generation: exactly one holds the group (the
    /// other is told the name is taken). Neither is the failure mode "a lost create answer
    /// or a name race turned into name taken on both sides".
    fn twins_bound(&self, out: &mut Outcome) {
        let mut pairs: BTreeMap<(&str, String), Vec<&SgView>> = BTreeMap::new();
        for (rec, sg) in self.live() {
            if rec.spec.flavour == Flavour::Twin {
                pairs
                    .entry((rec.spec.tenant, rec.spec.waldur_name()))
                    .or_default()
                    .push(sg);
            }
        }
        for ((_, name), sgs) in pairs {
            let settled = sgs.iter().all(|sg| {
                !sg.paused
                    && !sg.deleting
                    && sg
                        .cond("Ready")
                        .is_some_and(|c| c.observed_generation == sg.generation)
            });
            if sgs.len() != 2 || !settled {
                continue;
            }
            let bound = sgs.iter().filter(|sg| sg.uuid.is_some()).count();
            if bound != 1 {
                out.violations.push(format!(
                    "twins {} named {name:?}: {bound} of them bound, not one | {}",
                    sgs.iter()
                        .map(|sg| sg.key.as_str())
                        .collect::<Vec<_>>()
                        .join(" and "),
                    sgs.iter()
                        .map(|sg| sg.describe())
                        .collect::<Vec<_>>()
                        .join(" || ")
                ));
            }
        }
    }

    /// The campaign settled, and no Waldur row is left in a transitional state: a row stuck
    /// in CREATING or DELETING is a group nobody can use or delete, whatever the statuses say.
    fn settled(&self) -> Outcome {
        let mut out = Outcome::new(SETTLED, "Waldur rows");
        if !self.input.settled {
            out.violations.push(
                "the campaign did not settle: the invariants never held twice in a row before the deadline or the stuck limit".into(),
            );
        }
        for r in &self.truth().rows {
            out.checked += 1;
            if r.state != "OK" && r.state != "ERRED" {
                out.violations.push(format!(
                    "Waldur row {} '{}' left {} (backend={:?}, made for {})",
                    r.uuid,
                    r.name,
                    r.state,
                    r.backend_id,
                    self.row_owner
                        .get(&r.uuid)
                        .map(|o| o.to_string())
                        .unwrap_or_else(|| "no one known".into())
                ));
            }
        }
        out
    }

    fn no_panic(&self) -> Outcome {
        let mut out = Outcome::new(NO_PANIC, "operator runs");
        out.checked = self.input.runs;
        out.violations.extend(self.input.crashes.iter().cloned());
        out
    }
}

fn list_rows(rows: &[&Row]) -> String {
    rows.iter()
        .map(|r| {
            format!(
                "{} '{}' {} backend={:?}",
                r.uuid, r.name, r.state, r.backend_id
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn list_nova(nova: &[&Nova]) -> String {
    nova.iter()
        .map(|g| format!("{} '{}'", g.backend_id, g.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn taints(rec: &ResRecord) -> String {
    if rec.taints.is_empty() {
        String::new()
    } else {
        format!(" (out of band: {})", rec.taints.join("; "))
    }
}

/// Violations visible while the campaign runs, from one look at Kubernetes and Waldur:
/// two resources bound to one group, and a creating resource bound to a group older than
/// itself (someone else's). `seen` keeps them from being reported twice.
pub fn during_run(
    point: usize,
    records: &BTreeMap<ResId, ResRecord>,
    sgs: &[SgView],
    truth: &Truth,
    seen: &mut BTreeSet<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut bound: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for sg in sgs {
        // An Observe resource only reads: it may watch a group another resource manages.
        let observer = sg
            .res
            .as_ref()
            .and_then(|r| records.get(r))
            .is_some_and(|rec| rec.spec.flavour == Flavour::Observe);
        if let Some(u) = &sg.uuid
            && !observer
        {
            bound.entry(norm(u)).or_default().push(sg.key.clone());
        }
    }
    for (uuid, holders) in &bound {
        if holders.len() > 1 {
            let key = format!("double:{uuid}:{}", holders.join(","));
            if seen.insert(key) {
                out.push(format!(
                    "at point #{point}: Waldur group {uuid} bound by {} at once",
                    holders.join(" and ")
                ));
            }
        }
    }
    for sg in sgs {
        let (Some(res), Some(uuid), Some(created)) = (&sg.res, &sg.uuid, sg.created) else {
            continue;
        };
        let Some(rec) = records.get(res) else {
            continue;
        };
        if !rec.spec.flavour.creates() {
            continue;
        }
        // The simulator's row says whom the operator made it for (the description the
        // campaign wrote): binding a group made for another resource is taking someone
        // else's, whatever the creation times say.
        if let Some(row) = truth.row(uuid)
            && row.description.starts_with(TAG_PREFIX)
            && row.description != tag(res)
        {
            let key = format!("made-for-other:{res}:{uuid}");
            if seen.insert(key) {
                out.push(format!(
                    "at point #{point}: {res} bound {uuid} '{}', which was made for {}",
                    row.name,
                    row.description.trim_start_matches(TAG_PREFIX)
                ));
            }
        }
        // Waldur's re-import of the resource's own Nova group (after an unlink) is its own too,
        // even when Waldur's clock runs behind and dates it before the resource (seed 602).
        let own_nova = |row: &Row| {
            !row.backend_id.is_empty()
                && (rec.excused_backends.contains(&row.backend_id)
                    || rec
                        .last_bound
                        .as_ref()
                        .is_some_and(|(_, b)| *b == row.backend_id))
        };
        if let Some(row) = truth.row(uuid)
            && let Some(made) = row.created
            && made < created
            && row.description != tag(res)
            && !own_nova(row)
        {
            let key = format!("foreign:{res}:{uuid}");
            if seen.insert(key) {
                out.push(format!(
                    "at point #{point}: {res} bound {uuid} '{}', created {made}, before the resource ({created}): someone else's group",
                    row.name
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{CreateSpec, SourcePlan};

    const T: &str = waldur_sim::DEFAULT_TENANT;

    fn spec(name: &str, flavour: Flavour, deletion: Deletion) -> CreateSpec {
        CreateSpec {
            res: ResId {
                ns: "chaos-a",
                name: name.into(),
            },
            flavour,
            tenant: T,
            policy: "affinity",
            spec_name: None,
            deletion,
            import: None,
            new_source: None,
        }
    }

    fn record(spec: CreateSpec) -> ResRecord {
        ResRecord::new(spec)
    }

    fn ready(reason: &str, ok: bool) -> Vec<Cond> {
        vec![
            Cond {
                type_: "Ready".into(),
                status: if ok { "True" } else { "False" }.into(),
                reason: reason.into(),
                message: String::new(),
                observed_generation: Some(1),
            },
            Cond {
                type_: "Synced".into(),
                status: "True".into(),
                reason: "ReconcileSuccess".into(),
                message: String::new(),
                observed_generation: Some(1),
            },
        ]
    }

    fn view(res: &ResId, uuid: Option<&str>, conditions: Vec<Cond>) -> SgView {
        SgView {
            res: Some(res.clone()),
            key: res.to_string(),
            generation: Some(1),
            created: Some("2026-01-01T00:00:00Z".parse().unwrap()),
            uuid: uuid.map(str::to_string),
            conditions,
            ..SgView::default()
        }
    }

    fn row(uuid: &str, name: &str, state: &str, backend: &str) -> Row {
        Row {
            uuid: uuid.into(),
            name: name.into(),
            tenant: T.into(),
            state: state.into(),
            backend_id: backend.into(),
            description: String::new(),
            created: Some("2026-01-01T00:00:01Z".parse().unwrap()),
        }
    }

    /// A row the operator made for `res` (the campaign's description tag on it).
    fn made_for(res: &ResId, uuid: &str, name: &str, backend: &str) -> Row {
        Row {
            description: tag(res),
            ..row(uuid, name, "OK", backend)
        }
    }

    fn source(id: usize, name: &str, uuid: &str, backend: &str) -> SourceRecord {
        SourceRecord {
            plan: SourcePlan {
                id,
                name: name.into(),
                tenant: T,
                policy: "affinity",
            },
            uuid: Some(uuid.into()),
            backend_id: Some(backend.into()),
            out_of_band: false,
        }
    }

    fn nova(backend: &str, name: &str) -> Nova {
        Nova {
            tenant: T.into(),
            backend_id: backend.into(),
            name: name.into(),
        }
    }

    fn run(
        records: &BTreeMap<ResId, ResRecord>,
        sources: &[SourceRecord],
        sgs: &[SgView],
        truth: &Truth,
    ) -> Vec<Outcome> {
        run_seen(records, sources, sgs, truth, &[])
    }

    /// `run` with rows the driver saw earlier (gone since, or not).
    fn run_seen(
        records: &BTreeMap<ResId, ResRecord>,
        sources: &[SourceRecord],
        sgs: &[SgView],
        truth: &Truth,
        lineage: &[Row],
    ) -> Vec<Outcome> {
        check(&Input {
            records,
            sources,
            sgs,
            truth,
            history: &[],
            crashes: &[],
            told: &[],
            runs: 1,
            lineage,
            settled: true,
        })
    }

    fn violations(out: &[Outcome], name: &str) -> Vec<String> {
        out.iter()
            .find(|o| o.name == name)
            .map(|o| o.violations.clone())
            .unwrap_or_default()
    }

    #[test]
    fn a_ready_resource_with_its_one_group_passes_and_a_duplicate_fails() {
        let mut records = BTreeMap::new();
        let r = record(spec("r001", Flavour::Plain, Deletion::Delete));
        let res = r.spec.res.clone();
        records.insert(res.clone(), r);
        let sgs = vec![view(&res, Some("aa"), ready("Available", true))];
        let mut truth = Truth {
            rows: vec![row("aa", "r001", "OK", "n1")],
            nova: vec![nova("n1", "r001")],
        };
        let out = run(&records, &[], &sgs, &truth);
        assert!(out.iter().all(|o| o.violations.is_empty()), "{out:?}");
        assert_eq!(out[0].checked, 1);
        // A second group under the name (a re-import after an unlink, say) is one too many.
        truth.rows.push(row("bb", "r001", "OK", "n2"));
        truth.nova.push(nova("n2", "r001"));
        let out = run(&records, &[], &sgs, &truth);
        assert_eq!(violations(&out, ONE_GROUP).len(), 2, "{out:?}");
    }

    #[test]
    fn a_status_that_claims_more_than_waldur_has_is_a_violation() {
        let mut records = BTreeMap::new();
        let r = record(spec("r002", Flavour::Plain, Deletion::Delete));
        let res = r.spec.res.clone();
        records.insert(res.clone(), r);
        let sgs = vec![view(&res, Some("aa"), ready("Available", true))];
        let truth = Truth {
            rows: vec![row("aa", "r002", "ERRED", "")],
            nova: vec![],
        };
        let out = run(&records, &[], &sgs, &truth);
        assert_eq!(violations(&out, TRUTHFUL).len(), 1, "{out:?}");
        // Saying Erred is the truth.
        let sgs = vec![view(&res, Some("aa"), ready("Erred", false))];
        let out = run(&records, &[], &sgs, &truth);
        assert!(violations(&out, TRUTHFUL).is_empty(), "{out:?}");
        // InvalidSpec for a spec nobody else shares a name with is not.
        let mut conds = ready("InvalidSpec", false);
        conds[1].status = "False".into();
        conds[1].reason = "InvalidSpec".into();
        let sgs = vec![view(&res, None, conds)];
        let out = run(&records, &[], &sgs, &truth);
        assert_eq!(violations(&out, TRUTHFUL).len(), 1, "{out:?}");
    }

    #[test]
    fn deletes_are_judged_by_their_policy() {
        let mut records = BTreeMap::new();
        for (name, deletion) in [
            ("d1", Deletion::Delete),
            ("o1", Deletion::Orphan),
            ("u1", Deletion::Unlink),
        ] {
            let mut r = record(spec(name, Flavour::Plain, deletion));
            r.deleted_at = Some(3);
            r.last_bound = Some((format!("{name}uuid"), format!("{name}nova")));
            records.insert(r.spec.res.clone(), r);
        }
        // Everything as it should be: Delete left nothing, Orphan left both, Unlink left Nova.
        let truth = Truth {
            rows: vec![row("o1uuid", "o1", "OK", "o1nova")],
            nova: vec![nova("o1nova", "o1"), nova("u1nova", "u1")],
        };
        let out = run(&records, &[], &[], &truth);
        assert!(out.iter().all(|o| o.violations.is_empty()), "{out:?}");
        assert_eq!(out[1].checked, 3);
        assert_eq!(out[2].checked, 3);
        // A leftover of the Delete one, a lost Nova group of the Unlink one.
        let truth = Truth {
            rows: vec![
                row("o1uuid", "o1", "OK", "o1nova"),
                row("d1uuid", "d1", "OK", "d1nova"),
            ],
            nova: vec![nova("o1nova", "o1"), nova("d1nova", "d1")],
        };
        let out = run(&records, &[], &[], &truth);
        let v = violations(&out, NO_LEAK);
        assert_eq!(v.len(), 4, "{v:?}");
        // A Nova group a staff user unlinked behind the operator's back is excused.
        let mut excused = records.clone();
        for r in excused.values_mut() {
            r.excused_backends.push("d1nova".into());
            r.out_of_band = true;
        }
        let truth = Truth {
            rows: vec![
                row("o1uuid", "o1", "OK", "o1nova"),
                row("cc", "d1", "OK", "d1nova"),
            ],
            nova: vec![
                nova("o1nova", "o1"),
                nova("d1nova", "d1"),
                nova("u1nova", "u1"),
            ],
        };
        let out = run(&excused, &[], &[], &truth);
        assert!(violations(&out, NO_LEAK).is_empty(), "{out:?}");
        // Still present: a finalizer was left.
        let res = ResId {
            ns: "chaos-a",
            name: "d1".into(),
        };
        let mut sg = view(&res, Some("d1uuid"), ready("Deleting", false));
        sg.deleting = true;
        sg.finalizers = vec!["openstack.waldur.com/server-group".into()];
        let out = run(&records, &[], &[sg], &truth);
        assert_eq!(violations(&out, NO_FINALIZER).len(), 1);
    }

    #[test]
    fn imports_are_judged_against_their_source() {
        let mut records = BTreeMap::new();
        let mut s = spec("i1", Flavour::Import, Deletion::Orphan);
        s.import = Some(Import::SourceUuid(0));
        let mut missing = spec("m1", Flavour::MissingImport, Deletion::Delete);
        missing.import = Some(Import::Missing("ff".repeat(16)));
        for s in [s, missing] {
            records.insert(s.res.clone(), record(s));
        }
        let sources = vec![SourceRecord {
            plan: SourcePlan {
                id: 0,
                name: "src001".into(),
                tenant: T,
                policy: "affinity",
            },
            uuid: Some("aa".into()),
            backend_id: Some("n1".into()),
            out_of_band: false,
        }];
        let i1 = ResId {
            ns: "chaos-a",
            name: "i1".into(),
        };
        let m1 = ResId {
            ns: "chaos-a",
            name: "m1".into(),
        };
        let mut not_found = ready("NotFound", false);
        not_found.push(Cond {
            type_: "Stalled".into(),
            status: "True".into(),
            reason: "NotFound".into(),
            ..Cond::default()
        });
        let truth = Truth {
            rows: vec![row("aa", "src001", "OK", "n1")],
            nova: vec![nova("n1", "src001")],
        };
        let sgs = vec![
            view(&i1, Some("aa"), ready("Available", true)),
            view(&m1, None, not_found.clone()),
        ];
        let out = run(&records, &sources, &sgs, &truth);
        assert!(out.iter().all(|o| o.violations.is_empty()), "{out:?}");
        // NotFound while the source is right there is a lie.
        let sgs = vec![
            view(&i1, None, not_found),
            view(&m1, None, ready("Unknown", false)),
        ];
        let out = run(&records, &sources, &sgs, &truth);
        assert_eq!(violations(&out, TRUTHFUL).len(), 2, "{out:?}");
    }

    // ----- the audit's escapes (test-suite-audit-7821a77.md), each with its control -----

    /// Audit M1: a Waldur row and two Nova groups that no resource, source or deletion policy
    /// accounts for are leaks, even with no record naming them.
    #[test]
    fn unattributed_groups_are_leaks() {
        let records = BTreeMap::new();
        let truth = Truth {
            rows: vec![row("zz", "zz", "OK", "n1")],
            nova: vec![nova("n1", "zz"), nova("n2", "orphan")],
        };
        let out = run(&records, &[], &[], &truth);
        let v = violations(&out, "every-group-accounted-for");
        assert_eq!(v.len(), 3, "{out:?}");
    }

    /// Control for M1: every kind of group that is accounted for, with no status naming the
    /// deleted resources' groups (the simulator's rows and their descriptions say whose they
    /// are); then the two ways a known resource's group is a leak.
    #[test]
    fn accounted_groups_pass_and_a_tagged_leftover_does_not() {
        let mut records = BTreeMap::new();
        let live = record(spec("r1", Flavour::Plain, Deletion::Delete));
        let mut orphan = record(spec("o1", Flavour::Plain, Deletion::Orphan));
        let mut unlink = record(spec("u1", Flavour::Plain, Deletion::Unlink));
        let mut delete = record(spec("d1", Flavour::Plain, Deletion::Delete));
        for r in [&mut orphan, &mut unlink, &mut delete] {
            r.deleted_at = Some(3);
        }
        delete.excused_backends.push("n5".into());
        delete.out_of_band = true;
        let ids: Vec<ResId> = [&live, &orphan, &unlink, &delete]
            .iter()
            .map(|r| r.spec.res.clone())
            .collect();
        for r in [live, orphan, unlink, delete] {
            records.insert(r.spec.res.clone(), r);
        }
        let (r1, o1, u1, d1) = (&ids[0], &ids[1], &ids[2], &ids[3]);
        let sources = vec![source(0, "src000", "bb", "n2")];
        let sgs = vec![view(r1, Some("aa"), ready("Available", true))];
        // Seen earlier: u1's own row, before its deletion unlinked it; d1's, before a staff
        // user unlinked it.
        let lineage = vec![
            made_for(u1, "dd", "u1", "n4"),
            made_for(d1, "gg", "d1", "n5"),
        ];
        let truth = Truth {
            rows: vec![
                made_for(r1, "aa", "r1", "n1"),
                row("bb", "src000", "OK", "n2"),
                made_for(o1, "cc", "o1", "n3"),
                // Waldur's re-imports of the Nova groups the unlinks left.
                row("ee", "u1", "OK", "n4"),
                row("ff", "d1", "OK", "n5"),
            ],
            nova: vec![
                nova("n1", "r1"),
                nova("n2", "src000"),
                nova("n3", "o1"),
                nova("n4", "u1"),
                nova("n5", "d1"),
            ],
        };
        let out = run_seen(&records, &sources, &sgs, &truth, &lineage);
        assert!(out.iter().all(|o| o.violations.is_empty()), "{out:?}");
        assert_eq!(out[1].checked, 10, "{out:?}");
        // The unlinked resource's own record still there; a second group made for the live
        // one, under another name, that its status never named.
        let mut leaky = truth.clone();
        leaky.rows.push(made_for(u1, "dd", "u1", "n4"));
        leaky.rows.push(made_for(r1, "zz", "other", ""));
        let out = run_seen(&records, &sources, &sgs, &leaky, &lineage);
        assert_eq!(violations(&out, ACCOUNTED).len(), 2, "{out:?}");
    }

    /// Audit M2: a deleted Delete resource whose status never showed a backend id leaves its
    /// Nova group behind, and a later clash shares its name.
    #[test]
    fn a_nova_leak_of_a_name_shared_deleted_resource_is_caught() {
        let mut records = BTreeMap::new();
        let mut gone = record(spec("r001", Flavour::Plain, Deletion::Delete));
        gone.deleted_at = Some(3);
        gone.last_bound = Some(("aa".into(), String::new()));
        records.insert(gone.spec.res.clone(), gone);
        let mut clash = spec("r002", Flavour::Clash, Deletion::Delete);
        clash.spec_name = Some("r001".into());
        let mut clash = record(clash);
        // Made after r001's deletion, as the plan draws clashes: the two never lived at once.
        clash.created_at = 5;
        let res = clash.spec.res.clone();
        records.insert(res.clone(), clash);
        let mut conds = ready("InvalidSpec", false);
        conds[1].status = "False".into();
        conds[1].reason = "InvalidSpec".into();
        let sgs = vec![view(&res, None, conds)];
        let truth = Truth {
            rows: vec![],
            nova: vec![nova("n1", "r001")],
        };
        let out = run(&records, &[], &sgs, &truth);
        assert_eq!(violations(&out, NO_LEAK).len(), 1, "{out:?}");
        assert_eq!(violations(&out, ACCOUNTED).len(), 1, "{out:?}");
        // The clash lived while r001 did, so the name alone proves nothing; the simulator's
        // row (seen before it went) still ties the Nova group to r001 by its backend id.
        let mut both = records.clone();
        for r in both.values_mut() {
            r.created_at = 0;
        }
        let out = run(&both, &[], &sgs, &truth);
        assert!(violations(&out, NO_LEAK).is_empty(), "{out:?}");
        let seen = [row("aa", "r001", "OK", "n1")];
        let out = run_seen(&both, &[], &sgs, &truth, &seen);
        let v = violations(&out, NO_LEAK);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(
            v[0].contains("its Nova group n1 is still in OpenStack"),
            "{v:?}"
        );
        // Control: r001's group gone, the clash's own group (made for it) there: no leak.
        let mut own = Truth::default();
        own.rows.push(made_for(&res, "cc", "r001", "n2"));
        own.nova.push(nova("n2", "r001"));
        let sgs = vec![view(&res, Some("cc"), ready("Available", true))];
        let out = run_seen(&records, &[], &sgs, &own, &seen);
        assert!(out.iter().all(|o| o.violations.is_empty()), "{out:?}");
    }

    /// Audit M3: two live twins that both say InvalidSpec (name taken) while nobody holds a
    /// group of their name: neither has a group.
    #[test]
    fn twins_may_not_both_end_without_a_group() {
        let mut records = BTreeMap::new();
        let mut a = spec("r001a", Flavour::Twin, Deletion::Delete);
        a.spec_name = Some("tw001".into());
        let mut b = a.clone();
        b.res.name = "r001b".into();
        b.res.ns = "chaos-b";
        records.insert(a.res.clone(), record(a.clone()));
        records.insert(b.res.clone(), record(b.clone()));
        let mut conds = ready("InvalidSpec", false);
        conds[1].status = "False".into();
        conds[1].reason = "InvalidSpec".into();
        let sgs = vec![
            view(&a.res, None, conds.clone()),
            view(&b.res, None, conds.clone()),
        ];
        let out = run(&records, &[], &sgs, &Truth::default());
        assert_eq!(violations(&out, TRUTHFUL).len(), 2, "{out:?}");
        assert_eq!(violations(&out, ONE_GROUP).len(), 1, "{out:?}");
        // Control: one twin holds the group it made, the other is told the name is taken.
        let truth = Truth {
            rows: vec![made_for(&a.res, "aa", "tw001", "n1")],
            nova: vec![nova("n1", "tw001")],
        };
        let good = vec![
            view(&a.res, Some("aa"), ready("Available", true)),
            view(&b.res, None, conds.clone()),
        ];
        let out = run(&records, &[], &good, &truth);
        assert!(out.iter().all(|o| o.violations.is_empty()), "{out:?}");
        // The group there is b's own (its create answer lost), unbound: not a taken name.
        let truth = Truth {
            rows: vec![made_for(&b.res, "bb", "tw001", "n2")],
            nova: vec![nova("n2", "tw001")],
        };
        let out = run(&records, &[], &sgs, &truth);
        let v = violations(&out, TRUTHFUL);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("its own, unbound"), "{v:?}");
    }

    /// Audit m2: the simulator's rows, not the status, say whose a group is. A deleted
    /// resource whose status never named its group (deleted before any look saw a UUID)
    /// still leaks what the row made for it left; and binding a group made for another
    /// resource is seen during the run, whatever the creation times say.
    #[test]
    fn groups_are_attributed_by_the_simulators_rows() {
        let mut records = BTreeMap::new();
        let mut gone = record(spec("r007", Flavour::Plain, Deletion::Delete));
        gone.deleted_at = Some(8);
        let r007 = gone.spec.res.clone();
        records.insert(r007.clone(), gone);
        let seen = [made_for(&r007, "aa", "r007", "n1")];
        let truth = Truth {
            rows: vec![],
            nova: vec![nova("n1", "r007")],
        };
        let out = run_seen(&records, &[], &[], &truth, &seen);
        assert_eq!(violations(&out, NO_LEAK).len(), 1, "{out:?}");
        assert_eq!(violations(&out, ACCOUNTED).len(), 1, "{out:?}");

        let mut a = spec("r009a", Flavour::Twin, Deletion::Delete);
        a.spec_name = Some("tw009".into());
        let mut b = a.clone();
        b.res.name = "r009b".into();
        b.res.ns = "chaos-b";
        records.insert(a.res.clone(), record(a.clone()));
        records.insert(b.res.clone(), record(b.clone()));
        // b binds the group made for a (a re-bound elsewhere since): the creation time is
        // after b's, so only the row's description tells.
        let truth = Truth {
            rows: vec![made_for(&a.res, "aa", "tw009", "n1")],
            nova: vec![],
        };
        let sgs = vec![view(&b.res, Some("aa"), vec![])];
        let mut seen = BTreeSet::new();
        let v = during_run(9, &records, &sgs, &truth, &mut seen);
        assert_eq!(v.len(), 1, "{v:?}");
        // Control: a binds its own.
        let sgs = vec![view(&a.res, Some("aa"), vec![])];
        assert!(during_run(10, &records, &sgs, &truth, &mut seen).is_empty());
    }

    /// Audit m3: a row left in a transitional state at the end is a violation, whatever the
    /// statuses say.
    #[test]
    fn a_row_left_transitional_is_a_violation() {
        let truth = Truth {
            rows: vec![row("aa", "src000", "CREATING", "")],
            nova: vec![],
        };
        let sources = vec![source(0, "src000", "aa", "")];
        let out = run(&BTreeMap::new(), &sources, &[], &truth);
        assert_eq!(violations(&out, SETTLED).len(), 1, "{out:?}");
        // Control: the same row in OK, in a campaign that settled.
        let mut ok = truth.clone();
        ok.rows[0].state = "OK".into();
        let out = run(&BTreeMap::new(), &sources, &[], &ok);
        assert!(out.iter().all(|o| o.violations.is_empty()), "{out:?}");
        // A campaign that did not settle fails even when the end state looks right.
        let out = check(&Input {
            records: &BTreeMap::new(),
            sources: &sources,
            sgs: &[],
            truth: &ok,
            history: &[],
            crashes: &[],
            told: &[],
            runs: 1,
            lineage: &[],
            settled: false,
        });
        assert_eq!(violations(&out, SETTLED).len(), 1, "{out:?}");
    }

    /// Audit m6: a live Observe resource bound to a group other than its source, and a paused
    /// resource bound to a group Waldur no longer has, are violations.
    #[test]
    fn observers_and_paused_resources_are_judged_too() {
        let mut records = BTreeMap::new();
        let mut o = spec("r011", Flavour::Observe, Deletion::Delete);
        o.import = Some(Import::SourceUuid(0));
        let p = spec("r012", Flavour::Plain, Deletion::Delete);
        let (o_res, p_res) = (o.res.clone(), p.res.clone());
        records.insert(o.res.clone(), record(o));
        let mut paused = record(p);
        paused.paused = true;
        records.insert(p_res.clone(), paused);
        let sources = vec![
            source(0, "src000", "bb", "n2"),
            source(1, "src001", "cc", "n3"),
        ];
        let truth = Truth {
            rows: vec![
                row("bb", "src000", "OK", "n2"),
                row("cc", "src001", "OK", "n3"),
            ],
            nova: vec![nova("n2", "src000"), nova("n3", "src001")],
        };
        let mut frozen = view(&p_res, Some("dd"), ready("Available", true));
        frozen.paused = true;
        frozen.conditions[1].status = "False".into();
        frozen.conditions[1].reason = "Paused".into();
        let sgs = vec![
            view(&o_res, Some("cc"), ready("Available", true)),
            frozen.clone(),
        ];
        let out = run(&records, &sources, &sgs, &truth);
        assert_eq!(violations(&out, ONE_GROUP).len(), 2, "{out:?}");
        // Control: the observer bound to its source; the paused one's group deleted behind
        // the operator's back (an out-of-band point), which a paused operator cannot see.
        let sgs = vec![view(&o_res, Some("bb"), ready("Available", true)), frozen];
        if let Some(r) = records.get_mut(&p_res) {
            r.out_of_band = true;
        }
        let out = run(&records, &sources, &sgs, &truth);
        assert!(out.iter().all(|o| o.violations.is_empty()), "{out:?}");
    }

    /// A clash is told the name is taken; the group of that name is a source's.
    #[test]
    fn a_clash_is_invalid_only_while_someone_else_holds_the_name() {
        let mut records = BTreeMap::new();
        let mut c = spec("r005", Flavour::Clash, Deletion::Delete);
        c.spec_name = Some("src000".into());
        records.insert(c.res.clone(), record(c.clone()));
        let mut conds = ready("InvalidSpec", false);
        conds[1].status = "False".into();
        conds[1].reason = "InvalidSpec".into();
        let sgs = vec![view(&c.res, None, conds)];
        let sources = vec![source(0, "src000", "bb", "n2")];
        let truth = Truth {
            rows: vec![row("bb", "src000", "OK", "n2")],
            nova: vec![nova("n2", "src000")],
        };
        let out = run(&records, &sources, &sgs, &truth);
        assert!(out.iter().all(|o| o.violations.is_empty()), "{out:?}");
        // The source is gone (its importer deleted it): the name is free, InvalidSpec a lie.
        let out = run(&records, &sources, &sgs, &Truth::default());
        assert_eq!(violations(&out, TRUTHFUL).len(), 1, "{out:?}");
    }

    #[test]
    fn double_bindings_and_foreign_groups_are_seen_during_the_run() {
        let mut records = BTreeMap::new();
        let mut a = spec("r1a", Flavour::Twin, Deletion::Delete);
        a.spec_name = Some("tw1".into());
        let mut b = a.clone();
        b.res.name = "r1b".into();
        b.res.ns = "chaos-b";
        records.insert(a.res.clone(), record(a.clone()));
        records.insert(b.res.clone(), record(b.clone()));
        let truth = Truth {
            rows: vec![row("aa", "tw1", "OK", "n1")],
            nova: vec![],
        };
        let sgs = vec![
            view(&a.res, Some("aa"), vec![]),
            view(&b.res, Some("AA"), vec![]),
        ];
        let mut seen = BTreeSet::new();
        let v = during_run(4, &records, &sgs, &truth, &mut seen);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(during_run(5, &records, &sgs, &truth, &mut seen).is_empty());
        // A group created before the resource was someone else's.
        let mut old = truth.clone();
        old.rows[0].created = Some("2025-12-31T23:00:00Z".parse().unwrap());
        let v = during_run(6, &records, &sgs[..1], &old, &mut seen);
        assert_eq!(v.len(), 1, "{v:?}");
    }

    #[test]
    fn a_group_made_for_the_resource_is_its_own_whatever_waldurs_clock_says() {
        let mut records = BTreeMap::new();
        let r = record(spec("r001", Flavour::Plain, Deletion::Delete));
        let res = r.spec.res.clone();
        records.insert(res.clone(), r);
        let sgs = vec![view(&res, Some("aa"), ready("Available", true))];
        // Waldur's clock 5 s behind the API server's: its own group looks older than itself.
        let mut own = made_for(&res, "aa", "r001", "n1");
        own.created = Some("2025-12-31T23:59:56Z".parse().unwrap());
        let truth = Truth {
            rows: vec![own.clone()],
            nova: vec![nova("n1", "r001")],
        };
        let out = run(&records, &[], &sgs, &truth);
        assert!(out.iter().all(|o| o.violations.is_empty()), "{out:?}");
        let mut seen = BTreeSet::new();
        assert!(during_run(1, &records, &sgs, &truth, &mut seen).is_empty());
        // The same times on a row no one tagged: someone else's group, as before.
        let mut foreign = truth.clone();
        foreign.rows[0].description = String::new();
        let out = run(&records, &[], &sgs, &foreign);
        assert_eq!(violations(&out, ONE_GROUP).len(), 1, "{out:?}");
        assert_eq!(during_run(2, &records, &sgs, &foreign, &mut seen).len(), 1);
    }

    /// Seed 602: Waldur re-imported the resource's own Nova group (unlinked behind the
    /// operator's back) while its clock ran 5 s behind, so the re-import looked older than the
    /// resource. A re-import of its own Nova group is its own; a row of another Nova group
    /// with the same times is still someone else's.
    #[test]
    fn a_reimport_of_its_own_nova_group_is_its_own_whatever_waldurs_clock_says() {
        let mut records = BTreeMap::new();
        let mut r = record(spec("r036", Flavour::Plain, Deletion::Delete));
        r.excused_backends.push("n1".into());
        let res = r.spec.res.clone();
        records.insert(res.clone(), r);
        let sgs = vec![view(&res, Some("bb"), ready("Available", true))];
        let mut reimport = row("bb", "r036", "OK", "n1");
        reimport.created = Some("2025-12-31T23:59:56Z".parse().unwrap());
        let truth = Truth {
            rows: vec![reimport],
            nova: vec![nova("n1", "r036")],
        };
        let mut seen = BTreeSet::new();
        assert!(during_run(1, &records, &sgs, &truth, &mut seen).is_empty());
        let mut other = truth.clone();
        other.rows[0].backend_id = "n9".into();
        other.nova[0].backend_id = "n9".into();
        assert_eq!(during_run(2, &records, &sgs, &other, &mut seen).len(), 1);
    }

    /// The campaign's seed 146 and after: an Observe resource may watch a group a Managed
    /// import of the same source manages (both bound); two Managed resources on one group
    /// are still a violation.
    #[test]
    fn an_observer_beside_the_manager_of_a_group_is_no_double_binding() {
        let mut records = BTreeMap::new();
        let watcher = spec("r001", Flavour::Observe, Deletion::Delete);
        let owner = spec("r002", Flavour::DuplicateImport, Deletion::Orphan);
        let other = spec("r003", Flavour::DuplicateImport, Deletion::Orphan);
        for s in [&watcher, &owner, &other] {
            records.insert(s.res.clone(), record(s.clone()));
        }
        let truth = Truth::default();
        let mut seen = BTreeSet::new();
        let sgs = vec![
            view(&watcher.res, Some("aa"), vec![]),
            view(&owner.res, Some("aa"), vec![]),
        ];
        assert!(during_run(1, &records, &sgs, &truth, &mut seen).is_empty());
        let sgs = vec![
            view(&owner.res, Some("aa"), vec![]),
            view(&other.res, Some("aa"), vec![]),
        ];
        assert_eq!(during_run(2, &records, &sgs, &truth, &mut seen).len(), 1);
    }

    /// The final run's seed 105: the resource's group vanished before its Nova id was known
    /// and the re-sync brought back its own and another group of its name. Saying so (both
    /// named, none bound) is the truth; naming only one, or not its own, is not.
    #[test]
    fn an_honest_report_of_two_groups_of_the_name_is_no_violation() {
        let mut records = BTreeMap::new();
        let mut a = spec("r032a", Flavour::Twin, Deletion::Delete);
        a.spec_name = Some("tw032".into());
        records.insert(a.res.clone(), record(a.clone()));
        let truth = Truth {
            rows: vec![
                made_for(&a.res, "aa", "tw032", "n1"),
                row("bb", "tw032", "OK", "n2"),
            ],
            nova: vec![nova("n1", "tw032"), nova("n2", "tw032")],
        };
        let report = |message: &str| {
            let mut c = ready("Reimporting", false);
            c[0].message = message.into();
            vec![view(&a.res, Some("gone"), c)]
        };
        let honest =
            report("the re-sync brought back several groups named \"tw032\" (aa, bb): ...");
        let out = run(&records, &[], &honest, &truth);
        assert!(violations(&out, ONE_GROUP).is_empty(), "{out:?}");
        assert!(violations(&out, ACCOUNTED).is_empty(), "{out:?}");
        assert!(violations(&out, TRUTHFUL).is_empty(), "{out:?}");
        let half = report("the re-sync brought back several groups named \"tw032\" (bb): ...");
        let out = run(&records, &[], &half, &truth);
        assert!(!violations(&out, ONE_GROUP).is_empty(), "{out:?}");
    }

    /// The final run's seed 155: a twin waits (AlreadyManaged) while its sibling, paused, is
    /// still bound to a group Waldur lost: true. Naming a resource that holds nothing is not.
    #[test]
    fn waiting_for_a_twin_whose_group_is_away_is_truthful() {
        let mut records = BTreeMap::new();
        let mut a = spec("r016a", Flavour::Twin, Deletion::Delete);
        a.spec_name = Some("tw016".into());
        let mut b = a.clone();
        b.res.name = "r016b".into();
        b.res.ns = "chaos-b";
        records.insert(a.res.clone(), record(a.clone()));
        records.insert(b.res.clone(), record(b.clone()));
        let truth = Truth::default();
        let waiting = |named: &ResId| {
            let mut c = ready("AlreadyManaged", false);
            c[0].message = format!(
                "the server group named \"tw016\" in tenant T belongs to ServerGroup {named}, whose group is gone from Waldur for now and may come back"
            );
            c
        };
        let sgs = vec![
            view(&a.res, None, waiting(&b.res)),
            view(&b.res, Some("lost"), ready("Available", true)),
        ];
        let out = run(&records, &[], &sgs, &truth);
        let told = violations(&out, TRUTHFUL);
        assert!(told.iter().all(|v| !v.contains("r016a")), "{told:?}");
        let sgs = vec![
            view(&a.res, None, waiting(&a.res)),
            view(&b.res, Some("lost"), ready("Available", true)),
        ];
        let out = run(&records, &[], &sgs, &truth);
        assert!(
            violations(&out, TRUTHFUL)
                .iter()
                .any(|v| v.contains("r016a"))
        );
    }

    #[test]
    fn a_resource_told_unavailable_for_anothers_failures_is_untruthful() {
        let records = BTreeMap::new();
        let truth = Truth::default();
        let told = vec!["at point #3: chaos-a/r001 was told WaldurUnavailable".to_string()];
        let out = check(&Input {
            records: &records,
            sources: &[],
            sgs: &[],
            truth: &truth,
            history: &[],
            crashes: &[],
            told: &told,
            runs: 1,
            lineage: &[],
            settled: true,
        });
        assert_eq!(violations(&out, TRUTHFUL), told, "{out:?}");
    }
}
