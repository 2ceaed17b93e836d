//! Nova groups a resource let go of (deletion policy Orphan or Unlink), recorded for a day as
//! small Leases in the operator's namespace, so that the record survives a restart.
//!
//! The Nova group stays in OpenStack, and Waldur's next tenant re-sync brings it back under its
//! old name as nobody's group. A resource whose own group vanished before its Nova id was known
//! looks for its re-import by name: without this record it took such a leftover for its own,
//! and its Delete policy later deleted it (the fault campaign's seeds 142 and 154; an in-memory
//! record was lost when the operator restarted in between).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};

use super::error::Error;
use crate::waldur::WaldurUuid;

/// Marks the records.
pub const RELEASED_LABEL: &str = "openstack.waldur.com/released-nova";
const TENANT: &str = "openstack.waldur.com/tenant";
const NAME: &str = "openstack.waldur.com/name";
const BACKEND: &str = "openstack.waldur.com/backend-id";

/// How long a record is kept: longer than any wait for a re-import.
pub const KEPT: Duration = Duration::from_secs(24 * 3600);

/// The record's name: `wsg-nova-` and a hash of the tenant and Nova id (any Nova id fits).
fn record_name(tenant: &WaldurUuid, backend_id: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in tenant
        .as_str()
        .bytes()
        .chain([b'/'])
        .chain(backend_id.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("wsg-nova-{hash:016x}")
}

/// Records that the Nova group `backend_id`, named `name` in `tenant`, was let go of.
pub async fn record(
    kube: &Client,
    namespace: &str,
    tenant: &WaldurUuid,
    name: &str,
    backend_id: &str,
) -> Result<(), Error> {
    if backend_id.is_empty() {
        return Ok(());
    }
    let leases: Api<Lease> = Api::namespaced(kube.clone(), namespace);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(record_name(tenant, backend_id)),
            labels: Some([(RELEASED_LABEL.to_string(), "true".to_string())].into()),
            annotations: Some(
                [
                    (TENANT.to_string(), tenant.to_string()),
                    (NAME.to_string(), name.to_string()),
                    (BACKEND.to_string(), backend_id.to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        spec: None,
    };
    match leases.create(&PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The Nova groups let go of in `tenant`: (name, Nova id).
pub async fn in_tenant(
    kube: &Client,
    namespace: &str,
    tenant: &WaldurUuid,
) -> Result<Vec<(String, String)>, Error> {
    let leases: Api<Lease> = Api::namespaced(kube.clone(), namespace);
    let listed = leases
        .list(&ListParams::default().labels(&format!("{RELEASED_LABEL}=true")))
        .await?;
    let tenant = tenant.to_string();
    Ok(listed
        .items
        .iter()
        .filter_map(|l| {
            let a = l.metadata.annotations.as_ref()?;
            if a.get(TENANT)? != &tenant {
                return None;
            }
            Some((a.get(NAME)?.clone(), a.get(BACKEND)?.clone()))
        })
        .collect())
}

/// Deletes the records older than [`KEPT`]. Returns how many went.
pub async fn prune(kube: &Client, namespace: &str) -> Result<usize, Error> {
    let leases: Api<Lease> = Api::namespaced(kube.clone(), namespace);
    let listed = leases
        .list(&ListParams::default().labels(&format!("{RELEASED_LABEL}=true")))
        .await?;
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut pruned = 0;
    for lease in listed.items {
        let old = lease
            .metadata
            .creation_timestamp
            .as_ref()
            .is_some_and(|t| now.duration_since(t.0).unsigned_abs() > KEPT);
        if !old {
            continue;
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: lease.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match leases.delete(&lease.name_any(), &params).await {
            Ok(_) => pruned += 1,
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_are_valid_lease_names_and_differ_by_tenant_and_nova_id() {
        let t1 = WaldurUuid::parse("6b2a0c4e9f1d4b7a8c3e2f1a0b9c8d7e").unwrap();
        let t2 = WaldurUuid::parse("3c1f9e2a7b6d4c5e8f0a1b2c3d4e5f60").unwrap();
        let a = record_name(&t1, "b5f5c20f-c57d-4cea-8666-39736f4e53ea");
        assert!(
            a.len() <= 63
                && a.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_ne!(a, record_name(&t2, "b5f5c20f-c57d-4cea-8666-39736f4e53ea"));
        assert_ne!(a, record_name(&t1, "other"));
        assert_eq!(a, record_name(&t1, "b5f5c20f-c57d-4cea-8666-39736f4e53ea"));
    }
}
