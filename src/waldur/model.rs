//! Typed shapes of Waldur's server-group payloads.
//!
//! Waldur marks every field optional, sends `null` for some of them, returns a sparse subset
//! when asked with `field=`, and grows new fields between releases. So every field here has a
//! default, `null` reads as that default, and unknown fields are ignored.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Reads `null` as the type's default, so `"backend_id": null` is the same as `""`.
fn null_as_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}

/// A Waldur UUID in its canonical form: 32 lower-case hex digits, no dashes.
///
/// Waldur answers with undashed UUIDs but accepts dashed ones in paths and filters, and users
/// copy either form into manifests, so two UUIDs are equal when their canonical forms are.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WaldurUuid(String);

/// A string that is not a UUID in either the dashed or the undashed form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a UUID: expected 32 hex digits, with or without dashes")]
pub struct InvalidUuid(pub String);

impl WaldurUuid {
    /// Parses a dashed or undashed UUID strictly.
    pub fn parse(s: &str) -> Result<Self, InvalidUuid> {
        let canonical = Self::canonical(s);
        let dashes_ok = !s.contains('-') || is_dashed_layout(s.trim());
        if canonical.len() == 32 && dashes_ok && canonical.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(canonical))
        } else {
            Err(InvalidUuid(s.to_string()))
        }
    }

    /// A UUID already in canonical form (taken from another `WaldurUuid`).
    pub(crate) fn from_canonical(s: &str) -> Self {
        Self(s.to_string())
    }

    /// Canonicalises without validating: what Waldur sends is taken as it is, even if odd.
    fn lenient(s: &str) -> Self {
        Self(Self::canonical(s))
    }

    fn canonical(s: &str) -> String {
        s.trim()
            .chars()
            .filter(|c| *c != '-')
            .map(|c| c.to_ascii_lowercase())
            .collect()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `s`, dashed or not, in either case, is this UUID: without allocating, for the
    /// walks over every cached resource.
    pub fn is(&self, s: &str) -> bool {
        let mut theirs = s
            .trim()
            .bytes()
            .filter(|b| *b != b'-')
            .map(|b| b.to_ascii_lowercase());
        self.0.bytes().all(|b| theirs.next() == Some(b)) && theirs.next().is_none()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn is_dashed_layout(s: &str) -> bool {
    let groups: Vec<usize> = s.split('-').map(str::len).collect();
    groups == [8, 4, 4, 4, 12]
}

impl fmt::Display for WaldurUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for WaldurUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::str::FromStr for WaldurUuid {
    type Err = InvalidUuid;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for WaldurUuid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for WaldurUuid {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let raw: Option<String> = Option::deserialize(de)?;
        Ok(Self::lenient(raw.as_deref().unwrap_or_default()))
    }
}

/// The lifecycle state of a Waldur resource, whichever vocabulary the server speaks.
///
/// Servers from about March 2025 send `CREATION_SCHEDULED`, older ones `Creation Scheduled`.
/// Both parse to the same variant; a label neither knows is kept, not rejected, so a newer
/// server cannot break the operator.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum State {
    CreationScheduled,
    Creating,
    UpdateScheduled,
    Updating,
    DeletionScheduled,
    Deleting,
    Ok,
    Erred,
    /// A label neither vocabulary has, normalised to upper case with underscores.
    Unknown(String),
}

impl State {
    pub fn parse(label: &str) -> Self {
        let normalised = label.trim().to_ascii_uppercase().replace([' ', '-'], "_");
        match normalised.as_str() {
            "CREATION_SCHEDULED" => Self::CreationScheduled,
            "CREATING" => Self::Creating,
            "UPDATE_SCHEDULED" => Self::UpdateScheduled,
            "UPDATING" => Self::Updating,
            "DELETION_SCHEDULED" => Self::DeletionScheduled,
            "DELETING" => Self::Deleting,
            "OK" => Self::Ok,
            "ERRED" => Self::Erred,
            _ => Self::Unknown(normalised),
        }
    }

    /// The upper-case label, the vocabulary the operator reports in status.
    pub fn as_str(&self) -> &str {
        match self {
            Self::CreationScheduled => "CREATION_SCHEDULED",
            Self::Creating => "CREATING",
            Self::UpdateScheduled => "UPDATE_SCHEDULED",
            Self::Updating => "UPDATING",
            Self::DeletionScheduled => "DELETION_SCHEDULED",
            Self::Deleting => "DELETING",
            Self::Ok => "OK",
            Self::Erred => "ERRED",
            Self::Unknown(label) => label,
        }
    }

    /// OK and ERRED are the only states in which Waldur accepts pull and delete.
    pub fn is_settled(&self) -> bool {
        matches!(self, Self::Ok | Self::Erred)
    }

    /// A background worker is (or will soon be) changing the object.
    pub fn is_transitional(&self) -> bool {
        !self.is_settled()
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for State {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        Ok(Self::parse(&String::deserialize(de)?))
    }
}

/// The part of a Waldur OpenStack tenant the operator reads: its state says whether Waldur
/// will run tenant actions (creates and re-syncs of server groups are refused with 409 while
/// it is not OK), and whether a re-sync the operator asked for has run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Tenant {
    #[serde(default)]
    pub uuid: WaldurUuid,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    /// `None` when the server sent no state.
    #[serde(default)]
    pub state: Option<State>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub error_message: String,
}

/// The four server-group policies of Nova. Servers before Waldur 8.0.4 accept `affinity` only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    Affinity,
    AntiAffinity,
    SoftAffinity,
    SoftAntiAffinity,
}

impl Policy {
    pub const ALL: [Policy; 4] = [
        Policy::Affinity,
        Policy::AntiAffinity,
        Policy::SoftAffinity,
        Policy::SoftAntiAffinity,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Affinity => "affinity",
            Self::AntiAffinity => "anti-affinity",
            Self::SoftAffinity => "soft-affinity",
            Self::SoftAntiAffinity => "soft-anti-affinity",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM that is a member of a server group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub uuid: WaldurUuid,
    #[serde(default, deserialize_with = "null_as_default")]
    pub backend_id: String,
}

/// A Waldur OpenStack server group, as much of it as the operator reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerGroup {
    #[serde(default, deserialize_with = "null_as_default")]
    pub url: String,
    #[serde(default)]
    pub uuid: WaldurUuid,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub description: String,
    /// As Waldur reports it: one of the four policies, or `""` when a group was made without one.
    #[serde(default, deserialize_with = "null_as_default")]
    pub policy: String,
    /// `None` when the field was not asked for (sparse fields) or not sent.
    #[serde(default)]
    pub state: Option<State>,
    /// The Nova server-group id; `""` until creation succeeds.
    #[serde(default, deserialize_with = "null_as_default")]
    pub backend_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub instances: Vec<Instance>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub error_message: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub error_traceback: String,
    /// The tenant's URL.
    #[serde(default, deserialize_with = "null_as_default")]
    pub tenant: String,
    #[serde(default)]
    pub tenant_uuid: WaldurUuid,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tenant_name: String,
    #[serde(default)]
    pub project_uuid: WaldurUuid,
    #[serde(default)]
    pub customer_uuid: WaldurUuid,
    /// RFC 3339 timestamps, kept as Waldur wrote them.
    #[serde(default, deserialize_with = "null_as_default")]
    pub created: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub modified: String,
}

/// The body of a create request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NewServerGroup {
    pub name: String,
    /// Always sent: an empty policy is accepted by Waldur but the group then fails in OpenStack.
    pub policy: Policy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The `{"detail": "..."}` body of Waldur's action answers.
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct Detail {
    #[serde(default, deserialize_with = "null_as_default")]
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_compare_equal_dashed_or_not_and_in_any_case() {
        let dashed = WaldurUuid::parse("6B2A0C4E-9F1D-4B7A-8C3E-2F1A0B9C8D7E").unwrap();
        let plain = WaldurUuid::parse("6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e").unwrap();
        assert_eq!(dashed, plain);
        assert_eq!(dashed.to_string(), "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e");
        // `is` compares a string the same way, without parsing it.
        assert!(plain.is("6B2A0C4E-9F1D-4B7A-8C3E-2F1A0B9C8D7E"));
        assert!(plain.is(" 6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e"));
        assert!(!plain.is("6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7"));
        assert!(!plain.is("6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7ee"));
        assert!(!plain.is("7b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e"));
    }

    #[test]
    fn malformed_uuids_are_rejected_with_the_input_named() {
        for bad in [
            "",
            "xyz",
            "6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7",
            "6b2a0c4e-9f1d4b7a-8c3e-2f1a0b9c8d7e",
            "g".repeat(32).as_str(),
        ] {
            let err = WaldurUuid::parse(bad).unwrap_err();
            assert!(err.to_string().contains("is not a UUID"), "{err}");
        }
    }

    #[test]
    fn both_state_vocabularies_parse_to_one_enum() {
        let pairs = [
            (
                "CREATION_SCHEDULED",
                "Creation Scheduled",
                State::CreationScheduled,
            ),
            ("CREATING", "Creating", State::Creating),
            (
                "UPDATE_SCHEDULED",
                "Update Scheduled",
                State::UpdateScheduled,
            ),
            ("UPDATING", "Updating", State::Updating),
            (
                "DELETION_SCHEDULED",
                "Deletion Scheduled",
                State::DeletionScheduled,
            ),
            ("DELETING", "Deleting", State::Deleting),
            ("OK", "OK", State::Ok),
            ("ERRED", "Erred", State::Erred),
        ];
        for (modern, legacy, want) in pairs {
            assert_eq!(State::parse(modern), want);
            assert_eq!(State::parse(legacy), want);
            assert_eq!(want.as_str(), modern);
        }
    }

    #[test]
    fn an_unknown_state_is_kept_not_fatal() {
        let s: State = serde_json::from_str("\"Quarantined Soon\"").unwrap();
        assert_eq!(s, State::Unknown("QUARANTINED_SOON".into()));
        assert!(s.is_transitional());
        assert_eq!(s.to_string(), "QUARANTINED_SOON");
    }

    #[test]
    fn server_group_tolerates_nulls_missing_and_unknown_fields() {
        let g: ServerGroup = serde_json::from_value(serde_json::json!({
            "uuid": "4C3E0000-0000-0000-0000-000000000001",
            "backend_id": null,
            "instances": null,
            "error_message": null,
            "state": "Erred",
            "brand_new_field": {"nested": [1, 2]},
            "marketplace_offering_plugin_options": null
        }))
        .unwrap();
        assert_eq!(g.uuid.as_str(), "4c3e0000000000000000000000000001");
        assert_eq!(g.backend_id, "");
        assert!(g.instances.is_empty());
        assert_eq!(g.state, Some(State::Erred));
        assert_eq!(g.name, "");
        let sparse: ServerGroup = serde_json::from_str(r#"{"uuid":"ab"}"#).unwrap();
        assert_eq!(sparse.state, None);
    }

    #[test]
    fn policies_round_trip_in_waldur_spelling() {
        for p in Policy::ALL {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(Policy::parse(p.as_str()), Some(p));
        }
        assert_eq!(Policy::parse("anti_affinity"), None);
    }
}
