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

use super::error::Error;
pub use super::finalizers::{add_patch, remove_patch};
use crate::api::{DeletionPolicy, FINALIZER, ServerGroup};
use crate::sharding::Shard;

/// The finalizer the operator puts on credentials Secrets in use (an unsharded operator's, and
/// shard 0's; other shards add `-shard-<i>`, see [`crate::sharding::Shard::secret_finalizer`]).
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

/// Puts `finalizer` (this shard's) on the Secret (read as `secret`) if it is not there yet.
pub async fn hold(
    kube: &Client,
    namespace: &str,
    secret: &Secret,
    finalizer: &str,
) -> Result<(), Error> {
    let Some(patch) = add_patch(secret.metadata.finalizers.as_ref(), finalizer) else {
        return Ok(());
    };
    if secret.metadata.deletion_timestamp.is_some() {
        // Being deleted: a new finalizer would be refused; the one it has (if any) holds it.
        return Ok(());
    }
    json_patch(kube, namespace, &secret.name_any(), patch).await
}

/// Takes `finalizer` (this shard's) off the Secret `namespace/name` unless a ServerGroup of
/// this shard other than `except` still needs it.
pub async fn release_if_unused(
    kube: &Client,
    groups: &Store<ServerGroup>,
    namespace: &str,
    name: &str,
    except: Option<&str>,
    finalizer: &str,
) -> Result<(), Error> {
    if in_use(&groups.state(), namespace, name, except) {
        return Ok(());
    }
    let secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(kube.clone(), namespace);
    let Some(secret) = secrets.get_metadata_opt(name).await? else {
        return Ok(());
    };
    match remove_patch(secret.finalizers(), finalizer) {
        Some(patch) => json_patch(kube, namespace, name, patch).await,
        None => Ok(()),
    }
}

/// The finalizers of a Secret that `shard` should take off now: its own when none of its
/// resources needs the Secret (a credentialsRef changed, a resource orphaned or gone while the
/// operator was down), and, for shard 0 once `settled`, those of shards that no longer exist
/// (the operator now runs fewer shards; their resources moved to shards that hold Secrets
/// with finalizers of their own, added when they reconciled).
pub fn releasable(
    finalizers: &[String],
    in_use: impl Fn() -> bool,
    shard: Shard,
    settled: bool,
) -> Vec<&str> {
    let mut used = None;
    finalizers
        .iter()
        .filter(|f| match Shard::of_secret_finalizer(f) {
            Some(i) if i == shard.index => !*used.get_or_insert_with(&in_use),
            Some(i) => shard.index == 0 && settled && i >= shard.total,
            None => false,
        })
        .map(String::as_str)
        .collect()
}

/// Takes off every finalizer [`releasable`] names, on every Secret the operator sees.
pub async fn release_unused(
    kube: &Client,
    secrets: &Store<PartialObjectMeta<Secret>>,
    groups: &Store<ServerGroup>,
    shard: Shard,
    settled: bool,
) {
    let state = groups.state();
    for secret in secrets.state() {
        let (Some(namespace), name) = (secret.namespace(), secret.name_any()) else {
            continue;
        };
        let release = releasable(
            secret.finalizers(),
            || in_use(&state, &namespace, &name, None),
            shard,
            settled,
        );
        if release.is_empty() {
            continue;
        }
        // The cache may lag a resource that just started to use this Secret (review N12a):
        // ask the API server before letting go, and keep the finalizer when in doubt.
        match Api::<ServerGroup>::namespaced(kube.clone(), &namespace)
            .list(&Default::default())
            .await
        {
            Ok(list) => {
                let fresh: Vec<Arc<ServerGroup>> = list.items.into_iter().map(Arc::new).collect();
                if in_use(&fresh, &namespace, &name, None) {
                    continue;
                }
            }
            Err(e) => {
                tracing::warn!(namespace, name, error = %e, "cannot list the ServerGroups that may use the credentials Secret");
                continue;
            }
        }
        for finalizer in release {
            // One patch each: the indexes of a guarded remove change with every removal.
            let current = match Api::<PartialObjectMeta<Secret>>::namespaced(
                kube.clone(),
                &namespace,
            )
            .get_metadata_opt(&name)
            .await
            {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(namespace, name, error = %e, "cannot read the credentials Secret");
                    break;
                }
            };
            if let Some(patch) = remove_patch(current.finalizers(), finalizer)
                && let Err(e) = json_patch(kube, &namespace, &name, patch).await
            {
                tracing::warn!(namespace, name, error = %e, "cannot release the credentials Secret");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CredentialsRef, ServerGroupSpec};
    use serde_json::json;

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
        let f = SECRET_FINALIZER;
        assert_eq!(
            add_patch(None, f).unwrap()[0],
            json!({"op": "test", "path": "/metadata/finalizers", "value": null})
        );
        let empty: Vec<String> = vec![];
        assert_eq!(
            add_patch(Some(&empty), f).unwrap()[1],
            json!({"op": "add", "path": "/metadata/finalizers/-", "value": SECRET_FINALIZER}),
            "a stored empty list is appended to, not tested against null"
        );
        assert!(add_patch(Some(&vec![SECRET_FINALIZER.to_string()]), f).is_none());
        assert!(remove_patch(&["x".to_string()], f).is_none());
        assert_eq!(
            remove_patch(&["x".to_string(), SECRET_FINALIZER.to_string()], f).unwrap()[1],
            json!({"op": "remove", "path": "/metadata/finalizers/1"})
        );
    }

    #[test]
    fn each_shard_releases_its_own_finalizer_and_shard_0_those_of_shards_gone() {
        let shard = |i, n| Shard::new(i, n).unwrap();
        let on_secret: Vec<String> = [0, 1, 2, 3]
            .map(|i| shard(i, 4).secret_finalizer().into_owned())
            .into_iter()
            .chain(["kubernetes.io/other".to_string()])
            .collect();
        let unused = || false;
        let used = || true;
        assert_eq!(
            releasable(&on_secret, unused, shard(1, 4), true),
            [on_secret[1].as_str()]
        );
        assert!(releasable(&on_secret, used, shard(1, 4), true).is_empty());
        // Down to 2 shards: shard 0 takes off the finalizers of shards 2 and 3, once settled.
        assert_eq!(
            releasable(&on_secret, used, shard(0, 2), true),
            [on_secret[2].as_str(), on_secret[3].as_str()]
        );
        assert!(releasable(&on_secret, used, shard(0, 2), false).is_empty());
        assert!(
            releasable(&on_secret, unused, shard(1, 2), true) == [on_secret[1].as_str()],
            "only shard 0 cleans up after shards gone"
        );
        assert_eq!(
            releasable(&on_secret, unused, Shard::ALL, true),
            [0, 1, 2, 3].map(|i| on_secret[i].as_str()),
            "one process: every other shard is gone"
        );
    }
}
