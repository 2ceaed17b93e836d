//! The ServerGroup controller: planning (pure), reconcile (effects), status, credentials.

pub mod claims;
pub mod credentials;
mod error;
pub mod events;
pub mod finalizers;
pub mod index;
pub mod names;
pub mod plan;
mod reconcile;
pub mod released;
pub mod secret_guard;
pub mod status;
pub mod tenant_pulls;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource};

use crate::api::ServerGroup;
use crate::metrics::Metrics;
use crate::server::Health;
use crate::sharding::Shard;
pub use credentials::{ClientCache, DefaultCredentials, DefaultScope};
pub use error::Error;
pub use plan::Settings;
pub use reconcile::reconcile;

/// The annotation in which `kubectl apply` keeps the last manifest it applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The field manager of the operator's server-side-apply writes.
pub const MANAGER: &str = "waldur-operator";

mod context;
mod predicates;
mod runtime;

pub use context::*;
use predicates::*;
pub use runtime::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// Review N5: one Waldur's reconciles hold at most its share of the workers; another
    /// Waldur's are not held up by them, and a worker given back is free again.
    #[test]
    fn a_waldur_holds_at_most_its_share_of_the_workers() {
        let workers = Arc::new(UrlWorkers::new(2));
        let a1 = workers.try_take("https://slow");
        let a2 = workers.try_take("https://slow");
        assert!(a1.is_some() && a2.is_some());
        assert!(workers.try_take("https://slow").is_none(), "its share is 2");
        assert!(
            workers.try_take("https://other").is_some(),
            "another Waldur is not held up"
        );
        drop(a1);
        assert!(
            workers.try_take("https://slow").is_some(),
            "given back on drop"
        );
    }
}
