//! What the driver remembers about each resource and source group while the campaign runs:
//! the facts the end-of-run invariants need and cannot read back from a cluster in which the
//! resource is already gone (its deletion policy at deletion, the group it was last seen
//! bound to, what was done to its group behind the operator's back).

use crate::plan::{CreateSpec, Deletion, SourcePlan};

#[derive(Clone, Debug)]
pub struct ResRecord {
    pub spec: CreateSpec,
    /// The API server accepted the create.
    pub accepted: bool,
    /// The point that created it: with `deleted_at`, when it lived (to tell names shared at
    /// the same time from names reused later).
    pub created_at: usize,
    /// The deletion policy now (the last one set before the delete).
    pub deletion: Deletion,
    pub paused: bool,
    /// The point that deleted it.
    pub deleted_at: Option<usize>,
    /// `(uuid, backend_id)` of the group the status named at the last look.
    pub last_bound: Option<(String, String)>,
    /// Out-of-band actions on its group, worded for reports.
    pub taints: Vec<String>,
    /// Something happened to its group behind the operator's back.
    pub out_of_band: bool,
    /// Nova groups that a staff user unlinked behind the operator's back: Waldur itself lost
    /// them, so the operator cannot be asked to delete them.
    pub excused_backends: Vec<String>,
}

impl ResRecord {
    pub fn new(spec: CreateSpec) -> ResRecord {
        ResRecord {
            deletion: spec.deletion,
            spec,
            accepted: true,
            created_at: 0,
            paused: false,
            deleted_at: None,
            last_bound: None,
            taints: Vec::new(),
            out_of_band: false,
            excused_backends: Vec::new(),
        }
    }
}

/// A group created in Waldur by someone else, for imports.
#[derive(Clone, Debug)]
pub struct SourceRecord {
    pub plan: SourcePlan,
    pub uuid: Option<String>,
    pub backend_id: Option<String>,
    /// Touched behind the operator's back (through a resource that imports it).
    pub out_of_band: bool,
}
