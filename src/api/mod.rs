//! The `ServerGroup` custom resource: what users write (spec) and what the operator reports
//! (status). The CRD generated from these types is checked in under `crds/`.

pub mod conditions;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::waldur::Policy;
pub use conditions::{
    ConditionStatus, READY, STALLED, SYNCED, ready_reason, set_condition, set_stalled,
};

/// API group of every Waldur resource kind of this operator.
pub const GROUP: &str = "openstack.waldur.com";
/// Prefix of the operator's annotations.
pub const ANNOTATION_PREFIX: &str = "openstack.waldur.com/";
/// `"true"` stops all Waldur calls for the resource.
pub const ANNOTATION_PAUSED: &str = "openstack.waldur.com/paused";
/// A new token asks Waldur once to pull the group from OpenStack.
pub const ANNOTATION_REQUEST_PULL: &str = "openstack.waldur.com/request-pull";
/// A new token asks Waldur once to mark the group OK (staff).
pub const ANNOTATION_REQUEST_SET_OK: &str = "openstack.waldur.com/request-set-ok";
/// A new token asks Waldur once to mark the group ERRED (staff).
pub const ANNOTATION_REQUEST_SET_ERRED: &str = "openstack.waldur.com/request-set-erred";
/// A new token makes a new group now for a resource whose group vanished, without waiting
/// for evidence that Waldur will not bring it back (the user knows it was deleted).
pub const ANNOTATION_REQUEST_RECREATE: &str = "openstack.waldur.com/request-recreate";
/// Written by the operator just before it asks Waldur to create a group, in the same
/// Kubernetes write as the finalizer when it can: if the create's answer is lost, the group
/// found later is recognised as this resource's own (Crossplane's create-pending, refined).
pub const ANNOTATION_CREATE_INTENT: &str = "openstack.waldur.com/create-intent";
/// Held while the Waldur group may still exist.
pub const FINALIZER: &str = "openstack.waldur.com/server-group";

/// A Waldur OpenStack server group: a set of VMs placed together (affinity) or apart
/// (anti-affinity) by Nova. The operator creates it in Waldur, keeps its status true to what
/// Waldur reports, and deletes it as `deletionPolicy` says.
// clippy reads the repeated `type_ = "string"` of the printer columns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "openstack.waldur.com",
    doc = "A Waldur OpenStack server group, declared in Kubernetes. See spec for what to set and status for what Waldur reports.",
    version = "v1alpha1",
    kind = "ServerGroup",
    plural = "servergroups",
    singular = "servergroup",
    shortname = "wsg",
    category = "waldur",
    namespaced,
    status = "ServerGroupStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Policy", type_ = "string", json_path = ".status.policy"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Synced",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Synced\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Instances",
        type_ = "integer",
        json_path = ".status.instanceCount"
    ),
    printcolumn(
        name = "Backend-ID",
        type_ = "string",
        json_path = ".status.backendId",
        priority = "1"
    ),
    printcolumn(
        name = "Sync-Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Synced\")].reason",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// `import` is a CEL reserved word: Kubernetes exposes that property to rules as `__import__`.
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.__import__) || (has(self.tenant) && has(self.policy))",
        "message": "spec.tenant and spec.policy are required unless spec.import binds an existing group"
    },
    {
        "rule": "has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)",
        "message": "spec.name is immutable: Waldur cannot rename a server group; create a new ServerGroup instead"
    },
    {
        "rule": "has(self.description) == has(oldSelf.description) && (!has(self.description) || self.description == oldSelf.description)",
        "message": "spec.description is immutable: Waldur cannot update a server group; create a new ServerGroup instead"
    },
    {
        "rule": "has(self.policy) == has(oldSelf.policy) && (!has(self.policy) || self.policy == oldSelf.policy)",
        "message": "spec.policy is immutable: Waldur cannot change a server group's policy; create a new ServerGroup instead"
    },
    {
        "rule": "has(self.tenant) == has(oldSelf.tenant) && (!has(self.tenant) || self.tenant == oldSelf.tenant)",
        "message": "spec.tenant is immutable: a server group cannot move between tenants; create a new ServerGroup instead"
    },
    {
        "rule": "has(self.__import__) == has(oldSelf.__import__) && (!has(self.__import__) || self.__import__ == oldSelf.__import__)",
        "message": "spec.import is immutable: to bind another group, create a new ServerGroup"
    },
    {
        "rule": "self.managementPolicy == oldSelf.managementPolicy",
        "message": "spec.managementPolicy is immutable: create a new ServerGroup to change who manages the group"
    }
]))]
pub struct ServerGroupSpec {
    /// How Nova places the group's VMs: affinity (same hypervisor), anti-affinity (different
    /// hypervisors), or their soft variants (best effort). Waldur before 8.0.4 accepts affinity
    /// only. Required unless import is set. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,

    /// UUID of the Waldur OpenStack tenant to create the group in, dashed or not. Required
    /// unless import is set. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
    ))]
    pub tenant: Option<String>,

    /// Name of the group in Waldur; defaults to metadata.name. Unique within the tenant,
    /// 1 to 150 characters, not only spaces. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 150), regex(pattern = r"\S"))]
    pub name: Option<String>,

    /// Free text stored with the group in Waldur. Immutable. Waldur 8.x accepts up to 4096
    /// characters, Waldur 7.0.x up to 2000 (a longer one is refused with InvalidSpec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub description: Option<String>,

    /// A Secret in this namespace with the Waldur API token under key `token` and optionally
    /// the Waldur address under key `url`. Defaults to the operator's own credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_ref: Option<CredentialsRef>,

    /// What happens in Waldur when this resource is deleted: Delete deletes the group, Orphan
    /// leaves it, Unlink removes only Waldur's record and leaves OpenStack alone (needs a staff
    /// token). May be changed at any time, for example to Orphan to release a stuck deletion.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Managed: the operator creates, recovers and deletes the group. Observe: the operator
    /// only reads an existing group (set import) and never writes to Waldur. Immutable.
    #[serde(default)]
    pub management_policy: ManagementPolicy,

    /// Bind an existing Waldur group instead of creating one: exactly one of uuid or
    /// backendId. Immutable.
    #[serde(default, rename = "import", skip_serializing_if = "Option::is_none")]
    pub import: Option<ImportSource>,

    /// How often a settled group is re-read from Waldur, as a duration such as 30s, 10m or
    /// 1h; at least 30s, so that no namespace can make the operator poll Waldur without pause.
    /// Defaults to the operator's --resync-period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(ms|s|m|h))+$"),
        extend("x-kubernetes-validations" = [{
            "rule": "duration(self) >= duration('30s')",
            "message": "spec.resyncPeriod must be at least 30s: a shorter period would poll Waldur without pause for every resource; leave it unset for the operator's default"
        }])
    )]
    pub resync_period: Option<String>,
}

/// A Secret in the resource's namespace holding Waldur credentials.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct CredentialsRef {
    /// Name of the Secret. Key `token` holds the API token; optional key `url` the Waldur address.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Which existing Waldur group to bind.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.uuid) != has(self.backendId)",
    "message": "spec.import must name exactly one of uuid or backendId"
}]))]
pub struct ImportSource {
    /// The Waldur UUID of the group, dashed or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
    ))]
    pub uuid: Option<String>,
    /// The Nova server-group id (Waldur's backend_id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub backend_id: Option<String>,
}

/// What to do in Waldur when the resource is deleted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the group in Waldur and OpenStack; the resource goes once Waldur confirms.
    #[default]
    Delete,
    /// Leave the group in Waldur.
    Orphan,
    /// Remove only Waldur's record (staff token); OpenStack keeps the group.
    Unlink,
}

/// The shortest resync period, for `spec.resyncPeriod` (the CRD's rule) and
/// `--resync-period` alike.
pub const MIN_RESYNC_PERIOD: std::time::Duration = std::time::Duration::from_secs(30);

/// Who manages the Waldur group.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ManagementPolicy {
    /// Create, recover and delete as the spec says.
    #[default]
    Managed,
    /// Only read; never write to Waldur.
    Observe,
}

/// What Waldur reports about the group, and how the last reconcile went.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerGroupStatus {
    /// The metadata.generation the status was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The group's Waldur UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// The group's Waldur API address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The UUID of the group's tenant in Waldur (for an imported group too), so that a group
    /// that vanished can be waited for in its tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_uuid: Option<String>,
    /// The Nova server-group id; empty until creation succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_id: Option<String>,
    /// Waldur's state, in upper case: CREATION_SCHEDULED, CREATING, UPDATE_SCHEDULED, UPDATING,
    /// DELETION_SCHEDULED, DELETING, OK or ERRED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The name as observed in Waldur.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The policy as observed in Waldur.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The VMs in the group, as Waldur reports them once the group is OK.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceStatus>,
    /// How many VMs are in the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_count: Option<i64>,
    /// Waldur's error message when the group is ERRED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// When a read from Waldur last changed this status, or at least hourly while reads
    /// succeed. Unchanged reads in between are not written, to keep Kubernetes writes low, so
    /// this may lag the last read by up to an hour; it stops moving while Waldur cannot be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("description" = "When a read from Waldur last changed this status, or at least hourly while reads succeed. Unchanged reads in between are not written, to keep Kubernetes writes low, so this may lag the last read by up to an hour; it stops moving while Waldur cannot be read."))]
    pub last_sync_time: Option<Time>,
    /// Ready (the group exists in Waldur and is usable), Synced (the last reconcile reached
    /// Waldur and applied the spec) and, only while True, Stalled (nothing will change without
    /// a change of spec or of Waldur), in the metav1.Condition shape, one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
    /// The request-* annotation tokens already acted on, so each request runs once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Boxed: usually absent, and a status lives in the cache once per resource.
    pub handled_requests: Option<Box<HandledRequests>>,
    /// When the operator last asked Waldur to pull this ERRED group by itself, and how many
    /// times in a row, to back off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pull: Option<AutoPull>,
    /// The group's UUID answered 404 while its OpenStack group may survive (an unlink): the
    /// operator asked Waldur to re-sync the tenant, and makes a new group only if the old one
    /// is still not back after the wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reimport: Option<Reimport>,
}

/// A group that vanished from Waldur while OpenStack may still hold it, and what the operator
/// has learnt since about whether Waldur will bring it back.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Reimport {
    /// The Nova server-group id expected back; empty when the group vanished before Waldur
    /// reported one (it is then looked for by name).
    #[serde(default)]
    pub backend_id: String,
    /// When the operator first found the group gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("description" = "When the operator first found the group gone."))]
    pub since: Option<Time>,
    /// When Waldur accepted the operator's request to re-sync the tenant (202); absent while
    /// none was accepted since the group vanished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("description" = "When Waldur accepted the operator's request to re-sync the tenant (202); absent while none was accepted since the group vanished."))]
    pub requested_at: Option<Time>,
    /// When a first re-sync had run without bringing the group back. A re-sync that failed
    /// and was repaired before the operator looked again leaves the tenant just as one that
    /// ran, so a second re-sync, accepted after this time, must agree before a new group is
    /// made (or, deleting, the group is let go).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("description" = "When a first re-sync had run without bringing the group back. A re-sync that failed and was repaired before the operator looked again leaves the tenant just as one that ran, so a second re-sync, accepted after this time, must agree before a new group is made (or, deleting, the group is let go)."))]
    pub checked_at: Option<Time>,
    /// When the group was last seen in Waldur (status.lastSyncTime when it was found gone).
    /// A re-import by name counts from here: a resource paused, or an operator down, may
    /// notice long after Waldur re-imported the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("description" = "When the group was last seen in Waldur (status.lastSyncTime when it was found gone). A re-import by name counts from here: a resource paused, or an operator down, may notice long after Waldur re-imported the group."))]
    pub last_seen: Option<Time>,
}

impl Reimport {
    /// When the group was first found gone (older statuses recorded only the request).
    pub fn since(&self) -> Option<&Time> {
        self.since.as_ref().or(self.requested_at.as_ref())
    }
}

/// What the operator wrote into `openstack.waldur.com/create-intent` before a create: where,
/// under which name, when, and which groups of that name already existed then (not its own).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct CreateIntent {
    /// The tenant UUID, canonical.
    pub tenant: String,
    /// The name in Waldur.
    pub name: String,
    /// When the create was decided (the operator's clock, RFC 3339).
    pub at: String,
    /// The status UUID this create replaces (a recreate), or empty for a first create: an
    /// intent stands only until a group is bound.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replaces: String,
    /// UUIDs of groups with this name seen in the tenant when the create was decided.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign: Vec<String>,
}

/// A VM in the group.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// The VM's name in Waldur.
    pub name: String,
    /// The VM's Waldur UUID.
    pub uuid: String,
    /// The Nova server id of the VM; empty while Waldur has none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backend_id: String,
}

/// The last token acted on for each request annotation.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HandledRequests {
    /// The last openstack.waldur.com/request-pull token acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<String>,
    /// The last openstack.waldur.com/request-set-ok token acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_ok: Option<String>,
    /// The last openstack.waldur.com/request-set-erred token acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_erred: Option<String>,
    /// The last openstack.waldur.com/request-recreate token acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreate: Option<String>,
}

/// Bookkeeping of the automatic pulls of an ERRED group.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoPull {
    /// When the operator last asked Waldur to pull the ERRED group.
    #[schemars(extend("description" = "When the operator last asked Waldur to pull the ERRED group."))]
    pub last_time: Time,
    /// How many pulls in a row did not bring the group back to OK; the wait before the next
    /// one grows with it.
    pub attempts: u32,
}

impl ServerGroup {
    /// The name the group has (or will have) in Waldur.
    pub fn waldur_name(&self) -> String {
        self.waldur_name_str().unwrap_or_default().to_string()
    }

    /// [`Self::waldur_name`] borrowed: for the walks and indexes that must not allocate.
    pub fn waldur_name_str(&self) -> Option<&str> {
        self.spec.name.as_deref().or(self.metadata.name.as_deref())
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    }

    /// The create intent the operator recorded, when readable.
    pub fn create_intent(&self) -> Option<CreateIntent> {
        serde_json::from_str(self.annotation(ANNOTATION_CREATE_INTENT)?).ok()
    }

    pub fn is_paused(&self) -> bool {
        self.annotation(ANNOTATION_PAUSED)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }
}

/// The CRD as the operator installs and documents it.
///
/// schemars marks every `Option` as `nullable` (and adds `null` to enums). Kubernetes keeps an
/// explicit `null` for nullable fields, which would make `name: null` a value that CEL rules and
/// the controller must treat apart from "absent". Without `nullable`, the API server drops
/// nulls, so absent is the only way to leave a field unset.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = ServerGroup::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            strip_nullable(schema);
            default_status(schema);
        }
    }
    crd
}

/// A ServerGroup the operator has not written yet reads as `status: {observedGeneration: 0}`
/// (the API server defaults it on every read), so kstatus (Flux) calls it InProgress, not
/// Current, from the first instant: a creation's first status waits while Waldur makes the
/// group (`plan::first_status_waits`), and an object without any status would be taken for
/// one that is done.
fn default_status(schema: &mut JSONSchemaProps) {
    if let Some(status) = schema.properties.as_mut().and_then(|p| p.get_mut("status")) {
        status.default = Some(
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSON(
                serde_json::json!({"observedGeneration": 0}),
            ),
        );
    }
}

fn strip_nullable(schema: &mut JSONSchemaProps) {
    schema.nullable = None;
    if let Some(values) = schema.enum_.as_mut() {
        values.retain(|v| !v.0.is_null());
    }
    for prop in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        strip_nullable(prop);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        strip_nullable(items);
    }
}

/// The CRD as YAML, as `waldur-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    serde_yaml_ng::to_string(&crd())
}

#[cfg(test)]
mod tests;
