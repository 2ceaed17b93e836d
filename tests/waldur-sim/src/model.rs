//! Waldur's records (tenants, server-group rows), OpenStack's Nova groups, and how rows render.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::config::Vocabulary;

/// Waldur's resource states (`core.StateMixin.States`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    CreationScheduled,
    Creating,
    UpdateScheduled,
    Updating,
    DeletionScheduled,
    Deleting,
    Ok,
    Erred,
}

impl State {
    pub const ALL: [State; 8] = [
        State::CreationScheduled,
        State::Creating,
        State::UpdateScheduled,
        State::Updating,
        State::DeletionScheduled,
        State::Deleting,
        State::Ok,
        State::Erred,
    ];

    /// The label this server sends for the state.
    pub fn label(self, vocabulary: Vocabulary) -> &'static str {
        match vocabulary {
            Vocabulary::Modern => self.modern(),
            Vocabulary::Legacy => match self {
                State::CreationScheduled => "Creation Scheduled",
                State::Creating => "Creating",
                State::UpdateScheduled => "Update Scheduled",
                State::Updating => "Updating",
                State::DeletionScheduled => "Deletion Scheduled",
                State::Deleting => "Deleting",
                State::Ok => "OK",
                State::Erred => "Erred",
            },
        }
    }

    pub fn modern(self) -> &'static str {
        match self {
            State::CreationScheduled => "CREATION_SCHEDULED",
            State::Creating => "CREATING",
            State::UpdateScheduled => "UPDATE_SCHEDULED",
            State::Updating => "UPDATING",
            State::DeletionScheduled => "DELETION_SCHEDULED",
            State::Deleting => "DELETING",
            State::Ok => "OK",
            State::Erred => "ERRED",
        }
    }

    /// Lenient parse for out-of-band use: either vocabulary, any case.
    pub fn parse_any(s: &str) -> Option<State> {
        let norm = s.trim().to_uppercase().replace([' ', '-'], "_");
        State::ALL.into_iter().find(|st| st.modern() == norm)
    }

    /// Strict parse, as the `?state=` filter does: only this server's own labels.
    pub fn parse_label(s: &str, vocabulary: Vocabulary) -> Option<State> {
        State::ALL.into_iter().find(|st| st.label(vocabulary) == s)
    }

    /// The integer Waldur stores; `?o=state` sorts by it, not by the label.
    pub fn db_value(self) -> u8 {
        match self {
            State::UpdateScheduled => 1,
            State::Updating => 2,
            State::Ok => 3,
            State::Erred => 4,
            State::CreationScheduled => 5,
            State::Creating => 6,
            State::DeletionScheduled => 7,
            State::Deleting => 8,
        }
    }

    /// The states a tenant can be in here (a tenant is never being created or deleted).
    pub fn is_tenant_state(self) -> bool {
        matches!(
            self,
            State::Ok | State::Erred | State::UpdateScheduled | State::Updating
        )
    }

    /// States from which delete and pull may start.
    pub fn is_settled(self) -> bool {
        matches!(self, State::Ok | State::Erred)
    }
}

/// An OpenStack tenant as Waldur knows it, with the project and customer that own it.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub uuid: String,
    pub name: String,
    pub project_uuid: String,
    pub project_name: String,
    pub customer_uuid: String,
    pub customer_name: String,
    pub service_settings_uuid: String,
    /// The Keystone project id (dashed), derived from the UUID so runs are reproducible.
    pub backend_id: String,
    /// One of `OK`, `ERRED`, `UPDATE_SCHEDULED`, `UPDATING`: the only states a tenant that exists
    /// passes through in these tests. Every tenant action answers 409 outside OK.
    pub state: State,
    pub error_message: String,
    pub error_traceback: String,
    /// Microseconds since the Unix epoch (Waldur's clock, offset included).
    pub created: i64,
    pub modified: i64,
    /// Bumped by every operation that takes the tenant over, so a stale tenant-pull worker stops.
    pub op_gen: u64,
    /// Visible to the non-staff token (ignored when the user sees every tenant).
    pub user_visible: bool,
}

impl Tenant {
    /// Names and owner UUIDs are derived from the tenant UUID so runs are reproducible.
    pub fn new(uuid: &str, user_visible: bool, now: i64) -> Tenant {
        let short: String = uuid.chars().take(8).collect();
        Tenant {
            uuid: uuid.to_string(),
            name: format!("tenant-{short}"),
            project_uuid: derive_hex(uuid, "project"),
            project_name: format!("project-{short}"),
            customer_uuid: derive_hex(uuid, "customer"),
            customer_name: format!("customer-{short}"),
            service_settings_uuid: derive_hex(uuid, "service-settings"),
            backend_id: dash(&derive_hex(uuid, "keystone")),
            state: State::Ok,
            error_message: String::new(),
            error_traceback: String::new(),
            created: now,
            modified: now,
            op_gen: 0,
            user_visible,
        }
    }

    /// Tenant actions (`create_server_group`, `pull_server_groups`, ...) need this.
    pub fn is_ok(&self) -> bool {
        self.state == State::Ok
    }
}

/// A VM that points at a server group.
#[derive(Debug, Clone)]
pub struct Instance {
    pub uuid: String,
    pub name: String,
    pub backend_id: String,
}

/// One Waldur server-group record.
#[derive(Debug, Clone)]
pub struct Row {
    /// Insertion order; breaks ties between equal `created` values.
    pub seq: u64,
    pub uuid: String,
    pub name: String,
    pub description: String,
    pub policy: String,
    pub state: State,
    pub backend_id: String,
    pub error_message: String,
    pub error_traceback: String,
    pub tenant_uuid: String,
    /// Microseconds since the Unix epoch.
    pub created: i64,
    pub modified: i64,
    pub instances: Vec<Instance>,
    /// Bumped by every operation that takes the row over, so stale background workers stop.
    pub op_gen: u64,
}

/// A server group in the simulated Nova.
#[derive(Debug, Clone)]
pub struct NovaGroup {
    pub backend_id: String,
    pub name: String,
    pub policy: String,
}

/// Random 32-hex UUID (version 4 bits set), the way Waldur renders UUIDs.
pub fn new_hex_uuid() -> String {
    let mut v: u128 = rand::random();
    v &= !(0xf_u128 << 76);
    v |= 0x4_u128 << 76;
    v &= !(0x3_u128 << 62);
    v |= 0x2_u128 << 62;
    format!("{v:032x}")
}

/// Random dashed UUID, the way Nova renders its ids.
pub fn new_dashed_uuid() -> String {
    dash(&new_hex_uuid())
}

fn dash(hex: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Parse a UUID the way Python's `uuid.UUID` does (dashes anywhere, braces, `urn:uuid:`, any case)
/// and render it as 32 lowercase hex characters.
pub fn normalize_uuid(input: &str) -> Option<String> {
    let s = input.trim();
    let s = s.strip_prefix("urn:uuid:").unwrap_or(s);
    let s = s.trim_start_matches('{').trim_end_matches('}');
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Some(hex.to_ascii_lowercase())
    } else {
        None
    }
}

/// Deterministic 32-hex id from a seed (two chained FNV-1a hashes), for owner records that must
/// not change between runs.
pub fn derive_hex(seed: &str, salt: &str) -> String {
    fn fnv(bytes: impl Iterator<Item = u8>) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
    let first = fnv(seed.bytes().chain(salt.bytes()));
    let second = fnv(first
        .to_le_bytes()
        .into_iter()
        .chain(salt.bytes())
        .chain(seed.bytes()));
    format!("{first:016x}{second:016x}")
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 in UTC with microseconds, as Django REST framework renders datetimes.
pub fn format_micros(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The full `OpenStackServerGroup` object as the schema describes it.
pub fn render_row(row: &Row, tenant: Option<&Tenant>, vocabulary: Vocabulary, base: &str) -> Value {
    let fallback;
    let tenant = match tenant {
        Some(t) => t,
        None => {
            fallback = Tenant::new(&row.tenant_uuid, false, 0);
            &fallback
        }
    };
    let instances: Vec<Value> = row
        .instances
        .iter()
        .map(|i| json!({"backend_id": i.backend_id, "name": i.name, "uuid": i.uuid}))
        .collect();
    json!({
        "url": format!("{base}/api/openstack-server-groups/{}/", row.uuid),
        "uuid": row.uuid,
        "name": row.name,
        "description": row.description,
        "service_name": tenant.name,
        "service_settings": format!("{base}/api/service-settings/{}/", tenant.service_settings_uuid),
        "service_settings_uuid": tenant.service_settings_uuid,
        "service_settings_state": "OK",
        "service_settings_error_message": "",
        "project": format!("{base}/api/projects/{}/", tenant.project_uuid),
        "project_name": tenant.project_name,
        "project_uuid": tenant.project_uuid,
        "customer": format!("{base}/api/customers/{}/", tenant.customer_uuid),
        "customer_uuid": tenant.customer_uuid,
        "customer_name": tenant.customer_name,
        "customer_native_name": "",
        "customer_abbreviation": "",
        "error_message": row.error_message,
        "error_traceback": row.error_traceback,
        "resource_type": "OpenStack.ServerGroup",
        "state": row.state.label(vocabulary),
        "created": format_micros(row.created),
        "modified": format_micros(row.modified),
        "backend_id": row.backend_id,
        "access_url": null,
        "tenant": format!("{base}/api/openstack-tenants/{}/", tenant.uuid),
        "tenant_name": tenant.name,
        "tenant_uuid": tenant.uuid,
        "policy": row.policy,
        "display_name": row.name,
        "instances": instances,
        "marketplace_offering_uuid": null,
        "marketplace_offering_name": null,
        "marketplace_offering_plugin_options": null,
        "marketplace_category_uuid": null,
        "marketplace_category_name": null,
        "marketplace_resource_uuid": null,
        "marketplace_plan_uuid": null,
        "marketplace_resource_state": null,
        "is_usage_based": null,
        "is_limit_based": null,
    })
}

/// An `OpenStackTenant` object: the fields a client of the tenant endpoints reads (a real
/// server sends more: quotas, network ids, ...; clients must ignore what they do not know).
pub fn render_tenant(t: &Tenant, vocabulary: Vocabulary, base: &str) -> Value {
    json!({
        "url": format!("{base}/api/openstack-tenants/{}/", t.uuid),
        "uuid": t.uuid,
        "name": t.name,
        "description": "",
        "service_name": t.name,
        "service_settings": format!("{base}/api/service-settings/{}/", t.service_settings_uuid),
        "service_settings_uuid": t.service_settings_uuid,
        "service_settings_state": "OK",
        "service_settings_error_message": "",
        "project": format!("{base}/api/projects/{}/", t.project_uuid),
        "project_name": t.project_name,
        "project_uuid": t.project_uuid,
        "customer": format!("{base}/api/customers/{}/", t.customer_uuid),
        "customer_uuid": t.customer_uuid,
        "customer_name": t.customer_name,
        "customer_native_name": "",
        "customer_abbreviation": "",
        "error_message": t.error_message,
        "error_traceback": t.error_traceback,
        "resource_type": "OpenStack.Tenant",
        "state": t.state.label(vocabulary),
        "created": format_micros(t.created),
        "modified": format_micros(t.modified),
        "backend_id": t.backend_id,
        "access_url": null,
        "availability_zone": "",
        "internal_network_id": "",
        "external_network_id": "",
        "marketplace_offering_uuid": null,
        "marketplace_offering_name": null,
        "marketplace_resource_uuid": null,
        "marketplace_resource_state": null,
    })
}

/// Keep only the requested fields (`?field=`); unknown names are ignored. No fields requested
/// means all of them; only unknown names gives `{}`, as Waldur's RestrictedSerializerMixin does.
pub fn restrict_fields(value: Value, fields: &[String]) -> Value {
    if fields.is_empty() {
        return value;
    }
    match value {
        Value::Object(map) => {
            let kept: Map<String, Value> = map
                .into_iter()
                .filter(|(k, _)| fields.iter().any(|f| f == k))
                .collect();
            Value::Object(kept)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_timestamps_like_drf() {
        assert_eq!(format_micros(0), "1970-01-01T00:00:00.000000Z");
        // 2026-11-27T12:00:00.123456Z
        assert_eq!(
            format_micros(1_795_780_800_123_456),
            "2026-11-27T12:00:00.123456Z"
        );
        assert_eq!(
            format_micros(951_782_400_000_001),
            "2000-02-29T00:00:00.000001Z"
        );
    }

    #[test]
    fn normalizes_uuids_like_python() {
        let hex = "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e";
        assert_eq!(normalize_uuid(hex).as_deref(), Some(hex));
        assert_eq!(
            normalize_uuid("6B2A0C4E-9F1D-4B7A-8C3E-2F1A0B9C8D7E").as_deref(),
            Some(hex)
        );
        assert_eq!(
            normalize_uuid("{6b2a0c4e-9f1d-4b7a-8c3e-2f1a0b9c8d7e}").as_deref(),
            Some(hex)
        );
        assert_eq!(normalize_uuid("not-a-uuid"), None);
        assert_eq!(normalize_uuid(&hex[..31]), None);
        let fresh = new_hex_uuid();
        assert_eq!(fresh.len(), 32);
        assert_eq!(
            normalize_uuid(&new_dashed_uuid()).map(|s| s.len()),
            Some(32)
        );
    }

    #[test]
    fn parses_both_vocabularies() {
        for st in State::ALL {
            assert_eq!(State::parse_any(st.label(Vocabulary::Legacy)), Some(st));
            assert_eq!(State::parse_any(st.label(Vocabulary::Modern)), Some(st));
            assert_eq!(
                State::parse_label(st.label(Vocabulary::Legacy), Vocabulary::Legacy),
                Some(st)
            );
        }
        assert_eq!(State::parse_label("ERRED", Vocabulary::Legacy), None);
        assert_eq!(State::parse_label("Erred", Vocabulary::Modern), None);
    }
}
