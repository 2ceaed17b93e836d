//! Keeps a credentials Secret in place while ServerGroups still need it to clean up.
//!
//! Deleting a namespace deletes its Secrets and its ServerGroups together. A ServerGroup with
//! `deletionPolicy: Delete` (or `Unlink`) needs its `credentialsRef` Secret to reach Waldur
//! before its finalizer can go; without a guard the Secret may go first, cleanup fails with
//! CredentialsNotFound for ever, and the namespace stays Terminating. So, as the OpenStack
//! resource controller does, the operator puts a finalizer of its own on a Secret while any
//! ServerGroup holding the operator's finalizer names it, and takes it off when none does.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::error::Error;
use crate::api::{DeletionPolicy, FINALIZER, ServerGroup};

/// The finalizer the operator puts on credentials Secrets in use.
pub const SECRET_FINALIZER: &str = "openstack.waldur.com/credentials-in-use";

/// Whether the resource will need its credentials to clean up: it holds the operator's
/// finalizer and its deletion reaches Waldur (not `Orphan`).
pub fn needs_credentials_to_clean_up(sg: &ServerGroup) -> bool {
    sg.finalizers().iter().any(|f| f == FINALIZER)
        && sg.spec.deletion_policy != DeletionPolicy::Orphan
}

/// Whether some ServerGroup of `namespace`, other than `except` (a uid), names the Secret
/// `name` and will need it to clean up.
pub fn in_use(
    groups: &[Arc<ServerGroup>],
    namespace: &str,
    name: &str,
    except: Option<&str>,
) -> bool {
    groups.iter().any(|sg| {
        sg.metadata.namespace.as_deref() == Some(namespace)
            && sg.spec.credentials_ref.as_ref().map(|r| r.name.as_str()) == Some(name)
            && needs_credentials_to_clean_up(sg)
            && (except.is_none() || sg.metadata.uid.as_deref() != except)
    })
}

/// The JSON patch that adds the finalizer to a Secret whose finalizers are `current`, guarded
/// so that a concurrent change fails instead of being overwritten; `None` when it is there.
pub fn add_patch(current: Option<&Vec<String>>) -> Option<serde_json::Value> {
    match current {
        Some(list) if list.iter().any(|f| f == SECRET_FINALIZER) => None,
        Some(list) => Some(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": list},
            {"op": "add", "path": "/metadata/finalizers/-", "value": SECRET_FINALIZER},
        ])),
        None => Some(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [SECRET_FINALIZER]},
        ])),
    }
}

/// The JSON patch that removes the finalizer; `None` when it is not there.
pub fn remove_patch(current: &[String]) -> Option<serde_json::Value> {
    let index = current.iter().position(|f| f == SECRET_FINALIZER)?;
    Some(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": SECRET_FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
    ]))
}

async fn json_patch(
    kube: &Client,
    namespace: &str,
    name: &str,
    patch: serde_json::Value,
) -> Result<(), Error> {
    let patch: json_patch::Patch =
        serde_json::from_value(patch).map_err(|e| Error::Kube(kube::Error::SerdeError(e)))?;
    let secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(kube.clone(), namespace);
    match secrets
        .patch_metadata(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
    {
        Ok(_) => Ok(()),
        // Gone already: nothing to hold or release.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Puts the finalizer on the Secret (read as `secret`) if it is not there yet.
pub async fn hold(kube: &Client, namespace: &str, secret: &Secret) -> Result<(), Error> {
    let Some(patch) = add_patch(secret.metadata.finalizers.as_ref()) else {
        return Ok(());
    };
    if secret.metadata.deletion_timestamp.is_some() {
        // Being deleted: a new finalizer would be refused; the one it has (if any) holds it.
        return Ok(());
    }
    json_patch(kube, namespace, &secret.name_any(), patch).await
}

/// Takes the finalizer off the Secret `namespace/name` unless a ServerGroup other than
/// `except` still needs it.
pub async fn release_if_unused(
    kube: &Client,
    groups: &Store<ServerGroup>,
    namespace: &str,
    name: &str,
    except: Option<&str>,
) -> Result<(), Error> {
    if in_use(&groups.state(), namespace, name, except) {
        return Ok(());
    }
    let secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(kube.clone(), namespace);
    let Some(secret) = secrets.get_metadata_opt(name).await? else {
        return Ok(());
    };
    match remove_patch(secret.finalizers()) {
        Some(patch) => json_patch(kube, namespace, name, patch).await,
        None => Ok(()),
    }
}

/// Releases every Secret that carries the finalizer and that no ServerGroup needs any more
/// (a credentialsRef changed, a resource orphaned or gone while the operator was down).
pub async fn release_unused(
    kube: &Client,
    secrets: &Store<PartialObjectMeta<Secret>>,
    groups: &Store<ServerGroup>,
) {
    let state = groups.state();
    for secret in secrets.state() {
        let (Some(namespace), name) = (secret.namespace(), secret.name_any()) else {
            continue;
        };
        if !secret.finalizers().iter().any(|f| f == SECRET_FINALIZER)
            || in_use(&state, &namespace, &name, None)
        {
            continue;
        }
        if let Some(patch) = remove_patch(secret.finalizers())
            && let Err(e) = json_patch(kube, &namespace, &name, patch).await
        {
            tracing::warn!(namespace, name, error = %e, "cannot release the credentials Secret");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CredentialsRef, ServerGroupSpec};

    fn sg(ns: &str, uid: &str, secret: Option<&str>, finalized: bool) -> Arc<ServerGroup> {
        let mut sg = ServerGroup::new(
            uid,
            ServerGroupSpec {
                credentials_ref: secret.map(|s| CredentialsRef { name: s.into() }),
                ..Default::default()
            },
        );
        sg.metadata.namespace = Some(ns.into());
        sg.metadata.uid = Some(uid.into());
        if finalized {
            sg.metadata.finalizers = Some(vec![FINALIZER.into()]);
        }
        Arc::new(sg)
    }

    #[test]
    fn a_secret_is_in_use_while_a_finalized_resource_of_its_namespace_names_it() {
        let groups = vec![
            sg("a", "1", Some("waldur"), true),
            sg("a", "2", Some("waldur"), false),
            sg("b", "3", Some("other"), true),
        ];
        assert!(in_use(&groups, "a", "waldur", None));
        assert!(
            !in_use(&groups, "a", "waldur", Some("1")),
            "its last user is going"
        );
        assert!(
            !in_use(&groups, "b", "waldur", None),
            "same name, other namespace"
        );
        assert!(!in_use(&groups, "a", "other", None));
        let mut orphan = (*sg("c", "4", Some("waldur"), true)).clone();
        orphan.spec.deletion_policy = DeletionPolicy::Orphan;
        assert!(
            !in_use(&[Arc::new(orphan)], "c", "waldur", None),
            "Orphan needs no credentials to clean up"
        );
    }

    #[test]
    fn the_patches_are_guarded_and_idempotent() {
        assert_eq!(
            add_patch(None).unwrap()[0],
            json!({"op": "test", "path": "/metadata/finalizers", "value": null})
        );
        let empty: Vec<String> = vec![];
        assert_eq!(
            add_patch(Some(&empty)).unwrap()[1],
            json!({"op": "add", "path": "/metadata/finalizers/-", "value": SECRET_FINALIZER}),
            "a stored empty list is appended to, not tested against null"
        );
        assert!(add_patch(Some(&vec![SECRET_FINALIZER.to_string()])).is_none());
        assert!(remove_patch(&["x".to_string()]).is_none());
        assert_eq!(
            remove_patch(&["x".to_string(), SECRET_FINALIZER.to_string()]).unwrap()[1],
            json!({"op": "remove", "path": "/metadata/finalizers/1"})
        );
    }
}
