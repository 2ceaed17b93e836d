//! The simulated Waldur database and the simulated OpenStack behind it. Everything here is
//! synchronous and runs under one mutex; the HTTP layer and the background workers call in.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value, json};

use crate::config::{DefaultOrder, Delays, SimConfig, Vocabulary, WaldurVersion};
use crate::error::ApiError;
use crate::model::{
    Instance, NovaGroup, Row, State, Tenant, new_dashed_uuid, new_hex_uuid, normalize_uuid,
    now_micros, render_row, render_tenant,
};

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Staff,
    User,
}

/// A background transition to run after a request was accepted.
#[derive(Debug, Clone)]
pub enum Job {
    Create {
        uuid: String,
        gen_: u64,
        /// `Some(message)` when OpenStack will refuse the group.
        failure: Option<String>,
    },
    Delete {
        uuid: String,
        gen_: u64,
        /// OpenStack refuses the deletion.
        fail: bool,
        /// The row was OK (not ERRED) when deletion was requested.
        was_ok: bool,
    },
    Pull {
        uuid: String,
        gen_: u64,
    },
}

/// What a tenant pull re-syncs once the worker runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantPullKind {
    /// `pull_server_groups`: the tenant's server groups only.
    ServerGroups,
    /// The tenant's own `pull` (staff): Waldur 7.0.7's `TenantPullExecutor` checks the tenant
    /// exists in OpenStack, then `ExistingTenantPullExecutor` pulls the tenant and every kind of
    /// sub-resource in one chain, `pull_tenant_server_groups` among them, and sets the tenant
    /// OK. Here: the server-group re-sync, then OK.
    Full,
}

/// A tenant pull accepted by the API: Waldur's action executor holds the tenant
/// (`UPDATE_SCHEDULED` → `UPDATING` → `OK`) while its worker runs.
#[derive(Debug, Clone)]
pub struct TenantJob {
    pub tenant: String,
    pub gen_: u64,
    pub kind: TenantPullKind,
    /// OpenStack refuses the pull (the Nova list answers 500): the tenant ends ERRED.
    pub fail: bool,
    /// [`World::tenant_releases`] when the pull was accepted: once it moves on, the pull
    /// finishes without waiting any longer.
    pub release_epoch: u64,
}

/// How long tenant pulls take, independently of the server-group workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TenantPullTiming {
    /// The server-group delays: `schedule` in `UPDATE_SCHEDULED`, then `run` in `UPDATING`.
    #[default]
    FollowGroups,
    /// This long in all: half in `UPDATE_SCHEDULED`, half in `UPDATING`.
    After(std::time::Duration),
    /// The worker never picks the pull up (as when Waldur's Celery worker is stopped): the
    /// tenant stays `UPDATE_SCHEDULED` until the pulls are released or a delay is set.
    Never,
}

/// What a re-sync changed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ResyncReport {
    /// Rows removed because their group is not in OpenStack.
    pub deleted: Vec<String>,
    /// New rows (new UUIDs) for OpenStack groups Waldur had no row for.
    pub imported: Vec<String>,
    /// ERRED rows set back to OK.
    pub recovered: Vec<String>,
    /// ERRED tenants set back to OK (the periodic re-sync only).
    pub recovered_tenants: Vec<String>,
}

/// What Waldur stores on a tenant whose `pull_server_groups` failed in OpenStack.
pub const TENANT_PULL_ERROR: &str =
    "Nova server group list failed: 500 Internal Server Error (HTTP 500)";

pub struct World {
    /// The release copied; `vocabulary`, `affinity_only` and `pre_8_0_0` already reflect it.
    pub version: WaldurVersion,
    pub vocabulary: Vocabulary,
    pub affinity_only: bool,
    pub pre_8_0_0: bool,
    /// The list's order without `o=`.
    pub default_order: DefaultOrder,
    /// Lists answered so far with the shuffled default order (the shuffle's per-request seed).
    shuffles: u64,
    pub delays: Delays,
    pub staff_token: String,
    pub staff_token_aliases: Vec<String>,
    pub user_token: String,
    /// The user token sees every tenant (config `user_tenants` empty).
    pub user_sees_all: bool,
    pub tenants: BTreeMap<String, Tenant>,
    pub rows: HashMap<String, Row>,
    /// The UUIDs of `rows` in (created, seq) order, as last sorted: every list request wants
    /// that order, and sorting 10,000 rows for each page of each sweep made the simulator,
    /// not the operator, what bounded the benchmark at 10,000.
    order_cache: std::sync::Mutex<Vec<String>>,
    /// Nova server groups per tenant UUID.
    pub openstack: BTreeMap<String, Vec<NovaGroup>>,
    pub fail_creates: usize,
    pub fail_deletes: usize,
    /// OpenStack refuses every delete until switched off (OK → ERRED; from ERRED the row goes).
    pub refuse_deletes: bool,
    /// The next this many `pull_server_groups` fail in OpenStack (the tenant ends ERRED).
    pub fail_tenant_pulls: usize,
    /// Timing of tenant pulls (`pull_server_groups`).
    pub tenant_pull_timing: TenantPullTiming,
    /// Bumped by `release_tenant_pulls`: every pull accepted before finishes at once.
    pub tenant_releases: u64,
    /// Waldur's clock minus ours, in microseconds: added to every timestamp written from now
    /// on (a real Waldur's clock can be seconds off the API server's).
    pub clock_offset: i64,
    next_seq: u64,
    next_gen: u64,
    last_ts: i64,
}

fn norm_or_raw(s: &str) -> String {
    normalize_uuid(s).unwrap_or_else(|| s.trim().to_ascii_lowercase())
}

impl World {
    pub fn new(config: &SimConfig) -> World {
        let user_tenants: HashSet<String> =
            config.user_tenants.iter().map(|t| norm_or_raw(t)).collect();
        let v7 = config.version == WaldurVersion::V7_0;
        let mut world = World {
            version: config.version,
            vocabulary: if v7 {
                Vocabulary::Legacy
            } else {
                config.vocabulary
            },
            affinity_only: config.affinity_only || v7,
            pre_8_0_0: config.pre_8_0_0 || v7,
            default_order: config.default_order,
            shuffles: 0,
            delays: config.delays,
            staff_token: config.staff_token.clone(),
            staff_token_aliases: config.staff_token_aliases.clone(),
            user_token: config.user_token.clone(),
            user_sees_all: user_tenants.is_empty(),
            tenants: BTreeMap::new(),
            rows: HashMap::new(),
            order_cache: std::sync::Mutex::new(Vec::new()),
            openstack: BTreeMap::new(),
            fail_creates: 0,
            fail_deletes: 0,
            refuse_deletes: false,
            fail_tenant_pulls: 0,
            tenant_pull_timing: TenantPullTiming::default(),
            tenant_releases: 0,
            clock_offset: 0,
            next_seq: 0,
            next_gen: 0,
            last_ts: 0,
        };
        for t in &config.tenants {
            let uuid = norm_or_raw(t);
            let visible = user_tenants.contains(&uuid);
            world.add_tenant(&uuid, visible);
        }
        world
    }

    /// Adds a tenant in state OK (no-op if it exists). Returns its normalised UUID.
    pub fn add_tenant(&mut self, uuid: &str, user_visible: bool) -> String {
        let uuid = norm_or_raw(uuid);
        if !self.tenants.contains_key(&uuid) {
            let now = self.tick();
            self.tenants
                .insert(uuid.clone(), Tenant::new(&uuid, user_visible, now));
        }
        self.openstack.entry(uuid.clone()).or_default();
        uuid
    }

    /// The timestamp to write now: strictly increasing on our own clock (so `created`
    /// ordering is total and stable), then shifted by Waldur's clock offset. The offset is
    /// applied after the increase so a negative one takes effect at once; changing it can make
    /// a later write carry an earlier time, as resetting a real clock would.
    fn tick(&mut self) -> i64 {
        let now = now_micros().max(self.last_ts + 1);
        self.last_ts = now;
        now.saturating_add(self.clock_offset)
    }

    fn bump_gen(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    // ----- auth and visibility -----

    /// DRF TokenAuthentication, plus bearer tokens as newer servers accept.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let Some(header) = authorization else {
            return Err(ApiError::Unauthorized(
                "Authentication credentials were not provided.",
            ));
        };
        let mut parts = header.split_whitespace();
        let scheme = parts.next().unwrap_or("");
        if !scheme.eq_ignore_ascii_case("token") && !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::Unauthorized(
                "Authentication credentials were not provided.",
            ));
        }
        let Some(key) = parts.next() else {
            return Err(ApiError::Unauthorized(
                "Invalid token header. No credentials provided.",
            ));
        };
        if parts.next().is_some() {
            return Err(ApiError::Unauthorized(
                "Invalid token header. Token string should not contain spaces.",
            ));
        }
        if key == self.staff_token || self.staff_token_aliases.iter().any(|a| a == key) {
            Ok(Caller::Staff)
        } else if key == self.user_token {
            Ok(Caller::User)
        } else {
            Err(ApiError::Unauthorized("Invalid token."))
        }
    }

    pub fn tenant_visible(&self, caller: Caller, tenant_uuid: &str) -> bool {
        match caller {
            Caller::Staff => self.tenants.contains_key(tenant_uuid),
            Caller::User => self
                .tenants
                .get(tenant_uuid)
                .is_some_and(|t| self.user_sees_all || t.user_visible),
        }
    }

    /// The row with that UUID (dashed or not) if this caller may see it.
    pub fn visible_row(&self, caller: Caller, raw_uuid: &str) -> Option<&Row> {
        let uuid = normalize_uuid(raw_uuid)?;
        let row = self.rows.get(&uuid)?;
        self.tenant_visible(caller, &row.tenant_uuid).then_some(row)
    }

    /// The tenant with that UUID (dashed or not) if this caller may see it.
    pub fn visible_tenant(&self, caller: Caller, raw_uuid: &str) -> Option<&Tenant> {
        let uuid = normalize_uuid(raw_uuid)?;
        self.tenant_visible(caller, &uuid)
            .then(|| self.tenants.get(&uuid))
            .flatten()
    }

    pub fn render_tenant(&self, tenant: &Tenant, base: &str) -> Value {
        render_tenant(tenant, self.vocabulary, base)
    }

    /// All tenants in Waldur's default order (`order_by("name")`), UUID breaking ties.
    pub fn tenants_sorted(&self) -> Vec<&Tenant> {
        let mut tenants: Vec<&Tenant> = self.tenants.values().collect();
        tenants.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
        tenants
    }

    pub fn render(&self, row: &Row, base: &str) -> Value {
        let mut value = render_row(
            row,
            self.tenants.get(&row.tenant_uuid),
            self.vocabulary,
            base,
        );
        // 7.0.7's serializer has no customer_uuid on a server group (it has `customer`, a URL),
        // found by the real-Waldur differential test; 8.x's schema lists it.
        if self.version == WaldurVersion::V7_0
            && let Some(map) = value.as_object_mut()
        {
            map.remove("customer_uuid");
        }
        value
    }

    /// Longest description the create serializer accepts.
    pub fn description_max(&self) -> usize {
        match self.version {
            WaldurVersion::V7_0 => 2000,
            WaldurVersion::Current => 4096,
        }
    }

    /// The seed of the next list's shuffle, when the default order is shuffled.
    pub fn next_shuffle_seed(&mut self) -> Option<u64> {
        match self.default_order {
            DefaultOrder::Shuffled { seed } => {
                self.shuffles += 1;
                Some(seed ^ self.shuffles.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            }
            DefaultOrder::Created => None,
        }
    }

    /// All rows, oldest first.
    pub fn rows_sorted(&self) -> Vec<&Row> {
        let mut order = self.order_cache.lock().unwrap_or_else(|p| p.into_inner());
        // The same number of rows, all still there: the same set (a row's created and seq
        // never change), so the same order.
        let current =
            order.len() == self.rows.len() && order.iter().all(|u| self.rows.contains_key(u));
        if !current {
            let mut rows: Vec<&Row> = self.rows.values().collect();
            rows.sort_by_key(|r| (r.created, r.seq));
            *order = rows.iter().map(|r| r.uuid.clone()).collect();
        }
        order.iter().filter_map(|u| self.rows.get(u)).collect()
    }

    // ----- API operations -----

    /// `POST /api/openstack-tenants/{uuid}/create_server_group/`.
    pub fn create(
        &mut self,
        caller: Caller,
        raw_tenant: &str,
        body: &[u8],
    ) -> Result<(String, Job), ApiError> {
        // Waldur runs the tenant's state validator before it looks at the body.
        let tenant_uuid = self.usable_tenant(caller, raw_tenant)?;
        let data = parse_body(body)?;
        let req = validate_create(&data, self.affinity_only, self.description_max())?;
        if self
            .rows
            .values()
            .any(|r| r.tenant_uuid == tenant_uuid && r.name == req.name)
        {
            return Err(ApiError::Invalid(json!({
                "non_field_errors": ["Server group name should be unique."]
            })));
        }
        let failure = if req.policy.is_empty() {
            Some(
                "Invalid input for field/attribute policies. Value: []. [] is too short"
                    .to_string(),
            )
        } else if self.fail_creates > 0 {
            self.fail_creates -= 1;
            Some(
                "Unable to create server group: simulated OpenStack failure (injected)."
                    .to_string(),
            )
        } else {
            None
        };
        let now = self.tick();
        let gen_ = self.bump_gen();
        self.next_seq += 1;
        let uuid = new_hex_uuid();
        let row = Row {
            seq: self.next_seq,
            uuid: uuid.clone(),
            name: req.name,
            description: req.description,
            policy: req.policy,
            state: State::CreationScheduled,
            backend_id: String::new(),
            error_message: String::new(),
            error_traceback: String::new(),
            tenant_uuid,
            created: now,
            modified: now,
            instances: Vec::new(),
            op_gen: gen_,
        };
        tracing::info!(uuid = %row.uuid, name = %row.name, policy = %row.policy, "server group creation scheduled");
        self.rows.insert(uuid.clone(), row);
        Ok((
            uuid.clone(),
            Job::Create {
                uuid,
                gen_,
                failure,
            },
        ))
    }

    /// `DELETE /api/openstack-server-groups/{uuid}/`.
    pub fn delete(&mut self, caller: Caller, raw_uuid: &str) -> Result<Job, ApiError> {
        let (uuid, state) = self
            .visible_row(caller, raw_uuid)
            .map(|r| (r.uuid.clone(), r.state))
            .ok_or(ApiError::NotFound)?;
        if !state.is_settled() {
            return Err(self.settled_conflict());
        }
        let fail = if self.fail_deletes > 0 {
            self.fail_deletes -= 1;
            true
        } else {
            false
        };
        let gen_ = self.bump_gen();
        let now = self.tick();
        let row = self.rows.get_mut(&uuid).ok_or(ApiError::NotFound)?;
        row.state = State::DeletionScheduled;
        row.op_gen = gen_;
        row.modified = now;
        tracing::info!(%uuid, "server group deletion scheduled");
        Ok(Job::Delete {
            uuid,
            gen_,
            fail,
            was_ok: state == State::Ok,
        })
    }

    /// `POST .../{uuid}/pull/`.
    pub fn pull(&mut self, caller: Caller, raw_uuid: &str) -> Result<Job, ApiError> {
        let uuid = self
            .visible_row(caller, raw_uuid)
            .map(|r| r.uuid.clone())
            .ok_or(ApiError::NotFound)?;
        let conflict = self.settled_conflict();
        let gen_ = self.bump_gen();
        let now = self.tick();
        let row = self.rows.get_mut(&uuid).ok_or(ApiError::NotFound)?;
        if !row.state.is_settled() {
            return Err(conflict);
        }
        if row.backend_id.is_empty() {
            return Err(ApiError::Invalid(json!([
                "Resource does not have backend ID."
            ])));
        }
        row.state = State::UpdateScheduled;
        row.op_gen = gen_;
        row.modified = now;
        Ok(Job::Pull { uuid, gen_ })
    }

    /// `POST .../{uuid}/unlink/`: the record goes, OpenStack keeps the group.
    pub fn unlink(&mut self, caller: Caller, raw_uuid: &str) -> Result<(), ApiError> {
        let uuid = self
            .visible_row(caller, raw_uuid)
            .map(|r| r.uuid.clone())
            .ok_or(ApiError::NotFound)?;
        self.rows.remove(&uuid);
        tracing::info!(%uuid, "server group unlinked");
        Ok(())
    }

    /// `set_ok` / `set_erred`: any state, synchronously; stops any running worker.
    pub fn set_state_action(
        &mut self,
        caller: Caller,
        raw_uuid: &str,
        state: State,
        error_message: String,
        error_traceback: String,
    ) -> Result<(), ApiError> {
        let uuid = self
            .visible_row(caller, raw_uuid)
            .map(|r| r.uuid.clone())
            .ok_or(ApiError::NotFound)?;
        let gen_ = self.bump_gen();
        let now = self.tick();
        let row = self.rows.get_mut(&uuid).ok_or(ApiError::NotFound)?;
        row.state = state;
        row.op_gen = gen_;
        row.modified = now;
        row.error_message = error_message;
        row.error_traceback = error_traceback;
        Ok(())
    }

    /// Puts a tenant in a state at once (`set_ok`, `set_erred`, or out of band) and stops any
    /// tenant pull in flight on it. OK clears `error_message` and `error_traceback` as Waldur's
    /// `set_ok` does; ERRED stores the message given. False if there is no such tenant.
    pub fn set_tenant_state(
        &mut self,
        raw_uuid: &str,
        state: State,
        error_message: &str,
        error_traceback: &str,
    ) -> bool {
        let gen_ = self.bump_gen();
        let now = self.tick();
        let Some(t) = self.tenants.get_mut(&norm_or_raw(raw_uuid)) else {
            return false;
        };
        t.state = state;
        t.op_gen = gen_;
        t.modified = now;
        match state {
            State::Ok => {
                t.error_message.clear();
                t.error_traceback.clear();
            }
            State::Erred => {
                t.error_message = error_message.to_string();
                t.error_traceback = error_traceback.to_string();
            }
            _ => {}
        }
        tracing::info!(tenant = %t.uuid, state = state.modern(), "tenant state set");
        true
    }

    /// `POST /api/openstack-tenants/{uuid}/pull_server_groups/`: Waldur's
    /// `TenantPullServerGroupsExecutor` holds the tenant at once (`UPDATE_SCHEDULED`, saved, so
    /// `modified` moves); until its worker has run, every tenant action answers 409.
    pub fn pull_server_groups(
        &mut self,
        caller: Caller,
        raw_tenant: &str,
    ) -> Result<TenantJob, ApiError> {
        let tenant = self.usable_tenant(caller, raw_tenant)?;
        let fail = if self.fail_tenant_pulls > 0 {
            self.fail_tenant_pulls -= 1;
            true
        } else {
            false
        };
        self.schedule_tenant_pull(&tenant, TenantPullKind::ServerGroups, fail)
            .ok_or(ApiError::NotFound)
    }

    /// `POST /api/openstack-tenants/{uuid}/pull/` (the API layer checks staff): allowed from OK
    /// and ERRED (`ResourceViewSet.pull_validators`), so it is how staff repair a tenant a
    /// failed pull left ERRED. It holds the tenant like any executor.
    pub fn tenant_pull(&mut self, caller: Caller, raw_tenant: &str) -> Result<TenantJob, ApiError> {
        let tenant = self
            .visible_tenant(caller, raw_tenant)
            .ok_or(ApiError::NotFound)?;
        if !tenant.state.is_settled() {
            return Err(self.settled_conflict());
        }
        if tenant.backend_id.is_empty() {
            return Err(ApiError::Invalid(json!([
                "Resource does not have backend ID."
            ])));
        }
        let uuid = tenant.uuid.clone();
        self.schedule_tenant_pull(&uuid, TenantPullKind::Full, false)
            .ok_or(ApiError::NotFound)
    }

    /// The 409 of an action allowed from OK and ERRED, in this server's labels
    /// (`StateValidator` prints the state names: "OK, Erred." on 7.0.x).
    pub fn settled_conflict(&self) -> ApiError {
        ApiError::Conflict(format!(
            "Valid states for operation: {}, {}.",
            State::Ok.label(self.vocabulary),
            State::Erred.label(self.vocabulary)
        ))
    }

    /// `schedule_updating` plus save: the tenant is held from here on.
    fn schedule_tenant_pull(
        &mut self,
        tenant: &str,
        kind: TenantPullKind,
        fail: bool,
    ) -> Option<TenantJob> {
        let gen_ = self.bump_gen();
        let now = self.tick();
        let release_epoch = self.tenant_releases;
        let t = self.tenants.get_mut(tenant)?;
        // Waldur's `delete_error_message` handler: leaving ERRED clears the message (the
        // traceback stays).
        if t.state == State::Erred {
            t.error_message.clear();
        }
        t.state = State::UpdateScheduled;
        t.op_gen = gen_;
        t.modified = now;
        tracing::info!(%tenant, ?kind, "tenant pull scheduled; the tenant is held");
        Some(TenantJob {
            tenant: tenant.to_string(),
            gen_,
            kind,
            fail,
            release_epoch,
        })
    }

    /// `(time in UPDATE_SCHEDULED, time in UPDATING)` of a tenant pull, or `None` when the
    /// worker never runs it.
    pub fn tenant_pull_times(&self) -> Option<Delays> {
        match self.tenant_pull_timing {
            TenantPullTiming::FollowGroups => Some(self.delays),
            TenantPullTiming::After(total) => {
                let schedule = total / 2;
                Some(Delays {
                    schedule,
                    run: total.saturating_sub(schedule),
                })
            }
            TenantPullTiming::Never => None,
        }
    }

    /// Moves a held tenant from `from` to `to` (saved: `modified` moves) if no other operation
    /// took it over. False = the pull was superseded; its worker stops.
    pub fn advance_tenant(&mut self, job: &TenantJob, from: State, to: State) -> bool {
        let now = self.tick();
        match self.tenants.get_mut(&job.tenant) {
            Some(t) if t.op_gen == job.gen_ && t.state == from => {
                t.state = to;
                t.modified = now;
                true
            }
            _ => false,
        }
    }

    /// The pull's backend work, halfway through `UPDATING`: the server-group rows change here,
    /// while the tenant is still held, as Waldur's task does before its success step sets the
    /// tenant OK. False = superseded (nothing done).
    pub fn run_tenant_pull(&mut self, job: &TenantJob) -> bool {
        let current = self
            .tenants
            .get(&job.tenant)
            .is_some_and(|t| t.op_gen == job.gen_ && t.state == State::Updating);
        if !current {
            return false;
        }
        if job.fail {
            // The Nova list failed: no row changes, and the executor's failure step
            // (`ErrorStateTransitionTask`) stores the error and sets the tenant ERRED. Every
            // tenant action then answers 409 until staff or the periodic pull repair it.
            let now = self.tick();
            if let Some(t) = self.tenants.get_mut(&job.tenant) {
                t.state = State::Erred;
                t.modified = now;
                t.error_message = TENANT_PULL_ERROR.to_string();
                t.error_traceback = format!(
                    "Traceback (most recent call last):\n  ...\n\
                     waldur_openstack.exceptions.OpenStackBackendError: {TENANT_PULL_ERROR}"
                );
            }
            tracing::info!(tenant = %job.tenant, "tenant pull failed in OpenStack; the tenant is ERRED");
            return false;
        }
        // Both kinds re-sync the server groups (a full pull also pulls what the simulator does
        // not model: networks, quotas, ...).
        match job.kind {
            TenantPullKind::ServerGroups | TenantPullKind::Full => {
                self.resync_tenant(&job.tenant);
            }
        }
        true
    }

    /// The executor's success step: the tenant goes back to OK, the sign the re-sync ran.
    pub fn finish_tenant_pull(&mut self, job: &TenantJob) {
        if self.advance_tenant(job, State::Updating, State::Ok) {
            tracing::info!(tenant = %job.tenant, "tenant pull done; the tenant is OK again");
        }
    }

    // ----- background worker steps -----

    /// Moves the row from `from` to `to` if no other operation took it over. False = stop.
    pub fn advance(&mut self, uuid: &str, gen_: u64, from: State, to: State) -> bool {
        let now = self.tick();
        match self.rows.get_mut(uuid) {
            Some(row) if row.op_gen == gen_ && row.state == from => {
                row.state = to;
                row.modified = now;
                true
            }
            _ => false,
        }
    }

    pub fn finish_create(&mut self, uuid: &str, gen_: u64, failure: Option<String>) {
        let now = self.tick();
        let Some(row) = self.rows.get_mut(uuid) else {
            return;
        };
        if row.op_gen != gen_ || row.state != State::Creating {
            return;
        }
        row.modified = now;
        match failure {
            Some(message) => {
                row.state = State::Erred;
                row.error_message = message;
                row.error_traceback =
                    "Traceback (most recent call last):\n  ...\nnovaclient.exceptions.BadRequest"
                        .to_string();
                tracing::info!(%uuid, "server group creation failed in OpenStack");
            }
            None => {
                let backend_id = new_dashed_uuid();
                self.openstack
                    .entry(row.tenant_uuid.clone())
                    .or_default()
                    .push(NovaGroup {
                        backend_id: backend_id.clone(),
                        name: row.name.clone(),
                        policy: row.policy.clone(),
                    });
                // backend_id is set in the same step as OK, as Waldur's executor does.
                row.backend_id = backend_id;
                row.state = State::Ok;
                row.error_message.clear();
                row.error_traceback.clear();
                tracing::info!(%uuid, backend_id = %row.backend_id, "server group created");
            }
        }
    }

    pub fn finish_delete(&mut self, uuid: &str, gen_: u64, fail: bool, was_ok: bool) {
        let now = self.tick();
        let fail = fail || self.refuse_deletes;
        let Some(row) = self.rows.get_mut(uuid) else {
            return;
        };
        if row.op_gen != gen_ || row.state != State::Deleting {
            return;
        }
        if fail && was_ok {
            row.state = State::Erred;
            row.modified = now;
            row.error_message =
                "Unable to delete server group: simulated OpenStack failure (injected)."
                    .to_string();
            row.error_traceback =
                "Traceback (most recent call last):\n  ...\nnovaclient.exceptions.Conflict"
                    .to_string();
            tracing::info!(%uuid, "server group deletion failed in OpenStack");
            return;
        }
        let backend_id = row.backend_id.clone();
        let tenant = row.tenant_uuid.clone();
        // A delete from ERRED drops the row even when OpenStack refuses; the group then stays in
        // Nova, and the next tenant re-sync imports it again under a new UUID.
        if !fail
            && !backend_id.is_empty()
            && let Some(groups) = self.openstack.get_mut(&tenant)
        {
            groups.retain(|g| g.backend_id != backend_id);
        }
        self.rows.remove(uuid);
        tracing::info!(%uuid, "server group deleted");
    }

    pub fn finish_pull(&mut self, uuid: &str, gen_: u64) {
        let now = self.tick();
        let Some(row) = self.rows.get_mut(uuid) else {
            return;
        };
        if row.op_gen != gen_ || row.state != State::Updating {
            return;
        }
        row.modified = now;
        let found = self
            .openstack
            .get(&row.tenant_uuid)
            .and_then(|gs| gs.iter().find(|g| g.backend_id == row.backend_id));
        match found {
            Some(g) => {
                row.name = g.name.clone();
                row.policy = g.policy.clone();
                // Measured on 7.0.7: the message goes, the traceback stays.
                row.state = State::Ok;
                row.error_message.clear();
            }
            None => {
                row.state = State::Erred;
                row.error_message = format!(
                    "Server group {} could not be found (HTTP 404).",
                    row.backend_id
                );
            }
        }
    }

    // ----- Waldur's periodic tenant re-sync -----

    /// The checks of a tenant action (`create_server_group`, `pull_server_groups`): 404 unless
    /// the caller sees the tenant, 409 unless it is OK. Returns the tenant's canonical UUID.
    pub fn usable_tenant(&self, caller: Caller, raw_tenant: &str) -> Result<String, ApiError> {
        let tenant_uuid = normalize_uuid(raw_tenant).ok_or(ApiError::NotFound)?;
        if !self.tenant_visible(caller, &tenant_uuid) {
            return Err(ApiError::NotFound);
        }
        if !self.tenants.get(&tenant_uuid).is_some_and(Tenant::is_ok) {
            return Err(ApiError::Conflict(
                "Valid states for operation: OK.".to_string(),
            ));
        }
        Ok(tenant_uuid)
    }

    /// The re-sync of every tenant (Waldur's periodic `TenantSubresourcesListPullTask`). It is
    /// no executor: it does not hold the tenants. Like Waldur's `BackgroundListPullTask` it pulls
    /// only tenants in OK or ERRED (a tenant held by a pull is left alone), and on success it
    /// sets an ERRED tenant back to OK and clears its error message, keeping the traceback
    /// (`BackgroundPullTask.on_pull_success`).
    pub fn resync(&mut self) -> ResyncReport {
        let tenants: Vec<String> = self
            .tenants
            .values()
            .filter(|t| t.state.is_settled())
            .map(|t| t.uuid.clone())
            .collect();
        let mut report = self.resync_tenants(&tenants);
        for uuid in &tenants {
            let gen_ = self.bump_gen();
            let now = self.tick();
            if let Some(t) = self.tenants.get_mut(uuid)
                && t.state == State::Erred
            {
                t.state = State::Ok;
                t.error_message.clear();
                t.op_gen = gen_;
                t.modified = now;
                report.recovered_tenants.push(uuid.clone());
                tracing::info!(tenant = %uuid, "periodic pull recovered an ERRED tenant");
            }
        }
        report
    }

    /// The re-sync of one tenant (what `pull_server_groups` schedules).
    pub fn resync_tenant(&mut self, tenant: &str) -> ResyncReport {
        self.resync_tenants(&[tenant.to_string()])
    }

    fn resync_tenants(&mut self, tenants: &[String]) -> ResyncReport {
        let mut report = ResyncReport::default();
        let now = self.tick();
        for tenant in tenants.iter().cloned() {
            let groups = self.openstack.get(&tenant).cloned().unwrap_or_default();
            // Rows in OK/ERRED whose group is gone (or never existed) are deleted.
            let doomed: Vec<String> = self
                .rows
                .values()
                .filter(|r| r.tenant_uuid == tenant && r.state.is_settled())
                .filter(|r| !groups.iter().any(|g| g.backend_id == r.backend_id))
                .map(|r| r.uuid.clone())
                .collect();
            for uuid in doomed {
                self.rows.remove(&uuid);
                report.deleted.push(uuid);
            }
            for g in &groups {
                let existing = self
                    .rows
                    .values()
                    .find(|r| r.tenant_uuid == tenant && r.backend_id == g.backend_id)
                    .map(|r| r.uuid.clone());
                match existing {
                    Some(uuid) => {
                        let gen_ = self.bump_gen();
                        let Some(row) = self.rows.get_mut(&uuid) else {
                            continue;
                        };
                        if !row.state.is_settled() {
                            continue;
                        }
                        let mut changed = row.name != g.name || row.policy != g.policy;
                        row.name = g.name.clone();
                        row.policy = g.policy.clone();
                        if row.state == State::Erred {
                            row.state = State::Ok;
                            row.error_message.clear();
                            row.error_traceback.clear();
                            report.recovered.push(uuid.clone());
                            changed = true;
                        }
                        if changed {
                            row.modified = now;
                            row.op_gen = gen_;
                        }
                    }
                    None => {
                        let uuid = self.import(&tenant, g, now);
                        report.imported.push(uuid);
                    }
                }
            }
        }
        if !(report.deleted.is_empty() && report.imported.is_empty() && report.recovered.is_empty())
        {
            tracing::info!(
                deleted = report.deleted.len(),
                imported = report.imported.len(),
                recovered = report.recovered.len(),
                "tenant re-sync changed server groups"
            );
        }
        report
    }

    fn import(&mut self, tenant: &str, g: &NovaGroup, now: i64) -> String {
        let gen_ = self.bump_gen();
        self.next_seq += 1;
        let uuid = new_hex_uuid();
        self.rows.insert(
            uuid.clone(),
            Row {
                seq: self.next_seq,
                uuid: uuid.clone(),
                name: g.name.clone(),
                description: String::new(),
                policy: g.policy.clone(),
                state: State::Ok,
                backend_id: g.backend_id.clone(),
                error_message: String::new(),
                error_traceback: String::new(),
                tenant_uuid: tenant.to_string(),
                created: now,
                modified: now,
                instances: Vec::new(),
                op_gen: gen_,
            },
        );
        uuid
    }

    // ----- out-of-band operations -----

    /// Removes a group from OpenStack by Nova id, or by the UUID of the Waldur row pointing at it.
    pub fn openstack_delete(&mut self, id: &str) -> bool {
        let backend_id = match normalize_uuid(id).and_then(|u| self.rows.get(&u)) {
            Some(row) => row.backend_id.clone(),
            None => id.to_string(),
        };
        if backend_id.is_empty() {
            return false;
        }
        let mut removed = false;
        for groups in self.openstack.values_mut() {
            let before = groups.len();
            groups.retain(|g| g.backend_id != backend_id);
            removed |= groups.len() != before;
        }
        removed
    }

    /// Creates a group directly in OpenStack (Waldur learns of it at the next re-sync).
    pub fn openstack_create(&mut self, tenant_uuid: &str, name: &str, policy: &str) -> String {
        let tenant = norm_or_raw(tenant_uuid);
        let backend_id = new_dashed_uuid();
        self.openstack.entry(tenant).or_default().push(NovaGroup {
            backend_id: backend_id.clone(),
            name: name.to_string(),
            policy: policy.to_string(),
        });
        backend_id
    }

    /// Renames or re-policies a group in OpenStack, so pull and re-sync have something to copy.
    pub fn openstack_update(
        &mut self,
        backend_id: &str,
        name: Option<&str>,
        policy: Option<&str>,
    ) -> bool {
        for g in self.openstack.values_mut().flatten() {
            if g.backend_id == backend_id {
                if let Some(n) = name {
                    g.name = n.to_string();
                }
                if let Some(p) = policy {
                    g.policy = p.to_string();
                }
                return true;
            }
        }
        false
    }

    pub fn force_state(&mut self, raw_uuid: &str, state: State) -> bool {
        let gen_ = self.bump_gen();
        let now = self.tick();
        match normalize_uuid(raw_uuid).and_then(|u| self.rows.get_mut(&u)) {
            Some(row) => {
                row.state = state;
                row.op_gen = gen_;
                row.modified = now;
                true
            }
            None => false,
        }
    }

    pub fn set_instances(&mut self, raw_uuid: &str, instances: Vec<(String, String)>) -> bool {
        match normalize_uuid(raw_uuid).and_then(|u| self.rows.get_mut(&u)) {
            Some(row) => {
                row.instances = instances
                    .into_iter()
                    .map(|(name, backend_id)| Instance {
                        uuid: new_hex_uuid(),
                        name,
                        backend_id,
                    })
                    .collect();
                true
            }
            None => false,
        }
    }
}

/// The request body as JSON; an empty body is an empty form, as DRF treats it.
pub fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::Parse(e.to_string()))
}

/// Python's name for a JSON value's type, for DRF's "Expected a dictionary" message.
fn py_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// Python's `str()` of a JSON value, as DRF puts it in messages.
fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".to_string(),
        Value::Bool(false) => "False".to_string(),
        Value::Null => "None".to_string(),
        other => other.to_string(),
    }
}

pub struct CreateRequest {
    pub name: String,
    pub description: String,
    pub policy: String,
}

pub const POLICIES: [&str; 4] = [
    "affinity",
    "anti-affinity",
    "soft-affinity",
    "soft-anti-affinity",
];

/// DRF `CharField` (trimmed). `Ok(None)` when the field is absent.
fn char_field(
    data: &serde_json::Map<String, Value>,
    key: &str,
    required: bool,
    allow_blank: bool,
    max_len: usize,
) -> Result<Option<String>, String> {
    let Some(v) = data.get(key) else {
        return if required {
            Err("This field is required.".to_string())
        } else {
            Ok(None)
        };
    };
    let s = match v {
        Value::Null => return Err("This field may not be null.".to_string()),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err("Not a valid string.".to_string()),
    };
    let s = s.trim().to_string();
    if s.is_empty() && !allow_blank {
        return Err("This field may not be blank.".to_string());
    }
    if s.chars().count() > max_len {
        return Err(format!(
            "Ensure this field has no more than {max_len} characters."
        ));
    }
    Ok(Some(s))
}

/// The create serializer's field validation; all field errors are reported together.
pub fn validate_create(
    data: &Value,
    affinity_only: bool,
    description_max: usize,
) -> Result<CreateRequest, ApiError> {
    let Value::Object(map) = data else {
        return Err(ApiError::Invalid(json!({
            "non_field_errors": [format!("Invalid data. Expected a dictionary, but got {}.", py_type(data))]
        })));
    };
    let mut errors = serde_json::Map::new();
    let name = char_field(map, "name", true, false, 150)
        .map_err(|e| errors.insert("name".into(), json!([e])))
        .ok()
        .flatten();
    let description = char_field(map, "description", false, true, description_max)
        .map_err(|e| errors.insert("description".into(), json!([e])))
        .ok()
        .flatten();
    let allowed: &[&str] = if affinity_only {
        &POLICIES[..1]
    } else {
        &POLICIES
    };
    let policy = match map.get("policy") {
        None => Some(String::new()),
        Some(Value::Null) => {
            errors.insert("policy".into(), json!(["This field may not be null."]));
            None
        }
        Some(v) => {
            let s = py_str(v);
            if s.is_empty() || (v.is_string() && allowed.contains(&s.as_str())) {
                Some(s)
            } else {
                errors.insert(
                    "policy".into(),
                    json!([format!("\"{s}\" is not a valid choice.")]),
                );
                None
            }
        }
    };
    match (name, policy) {
        (Some(name), Some(policy)) if errors.is_empty() => Ok(CreateRequest {
            name,
            description: description.unwrap_or_default(),
            policy,
        }),
        _ => Err(ApiError::Invalid(Value::Object(errors))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_validation_messages() {
        let err = |v: Value, aff: bool| match validate_create(&v, aff, 4096) {
            Err(ApiError::Invalid(body)) => body,
            other => panic!("expected 400, got {:?}", other.map(|r| r.name)),
        };
        assert_eq!(
            err(json!({}), false),
            json!({"name": ["This field is required."]})
        );
        assert_eq!(
            err(json!({"name": "   "}), false),
            json!({"name": ["This field may not be blank."]})
        );
        assert_eq!(
            err(json!({"name": "x".repeat(151), "policy": "bogus"}), false),
            json!({"name": ["Ensure this field has no more than 150 characters."],
                   "policy": ["\"bogus\" is not a valid choice."]})
        );
        assert_eq!(
            err(json!({"name": "a", "policy": "anti-affinity"}), true),
            json!({"policy": ["\"anti-affinity\" is not a valid choice."]})
        );
        assert_eq!(
            err(json!({"name": "a", "description": "d".repeat(4097)}), false),
            json!({"description": ["Ensure this field has no more than 4096 characters."]})
        );
        assert_eq!(
            err(json!([1]), false),
            json!({"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]})
        );
        assert!(matches!(
            validate_create(&json!({"name": "a", "description": "d".repeat(2001)}), true, 2000),
            Err(ApiError::Invalid(ref b))
                if *b == json!({"description": ["Ensure this field has no more than 2000 characters."]})
        ));
        let ok = validate_create(&json!({"name": " web ", "policy": "affinity"}), true, 4096);
        assert!(matches!(ok, Ok(ref r) if r.name == "web" && r.policy == "affinity"));
        let blank = validate_create(&json!({"name": "web"}), false, 4096);
        assert!(matches!(blank, Ok(ref r) if r.policy.is_empty()));
    }
}
