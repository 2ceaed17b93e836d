//! A Kubernetes API **test server**: an in-process, plain-HTTP stand-in for kube-apiserver that
//! implements the API semantics an operator relies on, for integration tests and local
//! sandboxes where no real cluster can run. It is not a cluster: there are no nodes, no
//! controllers (other than CRD/namespace cleanup), no authentication, RBAC or admission webhooks.
//!
//! What it serves: CRDs registered at run time (with their discovery, schema validation,
//! defaulting, pruning and CEL rules), core/v1 Namespaces, Secrets, ConfigMaps and Events,
//! events.k8s.io/v1 Events and coordination.k8s.io/v1 Leases; get, list (label and field
//! selectors, `limit`/`continue`), watch (resourceVersion, bookmarks, 410 Gone, initial
//! events), create, replace (optimistic concurrency), delete with finalizers, merge / JSON /
//! strategic (as merge) patches and server-side apply with `managedFields`, the status
//! subresource and `metadata.generation`. See the crate's README for what is approximated.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use kube_test_server::TestServer;
//! let server = TestServer::start().await?;
//! let kubeconfig = server.kubeconfig_yaml("default");
//! # let _ = kubeconfig;
//! server.fail_next(2, "patch", "widgets", Some("status"), 409);
//! server.shutdown();
//! # Ok(()) }
//! ```
//!
//! Test hooks are also served over HTTP under `/__test/` (see [`TEST_HELP`]).

mod discovery;
mod error;
mod hooks;
mod http;
mod managed;
mod proto;
mod resources;
mod schema;
mod selector;
mod server;
mod store;
mod table;
mod util;

pub use error::ApiError;
pub use http::TEST_HELP;
pub use server::{Config, TestServer, kubeconfig_yaml};
