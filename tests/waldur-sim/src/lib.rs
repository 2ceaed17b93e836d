//! A faithful, stateful simulator of the Waldur OpenStack server-group API.
//!
//! It reproduces what real Waldur servers do (not what the published schema claims): 201 from the
//! tenant's `create_server_group` action and 500 from the collection POST, 202 on DELETE, 409 for
//! operations in transitional states, asynchronous state transitions, both state vocabularies,
//! the pre-8.0.4 affinity-only policy set, staff and non-staff tokens, pagination clamped at 300
//! with `Link` and `X-Result-Count`, sparse fields, Waldur's periodic tenant re-sync, injected
//! faults, and per-endpoint request counters.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use waldur_sim::{Delays, SimConfig, Simulator};
//! let sim = Simulator::start(SimConfig { delays: Delays::fast(), ..SimConfig::default() }).await?;
//! let url = format!("{}/api/openstack-server-groups/", sim.base_url());
//! # let _ = url;
//! sim.shutdown();
//! # Ok(()) }
//! ```
//!
//! The same control operations are available over HTTP under `/__sim/` (see [`CONTROL_HELP`]).

mod api;
mod config;
mod control;
mod error;
mod faults;
mod model;
mod server;
mod world;

pub use config::{DEFAULT_TENANT, Delays, SimConfig, Vocabulary};
pub use control::CONTROL_HELP;
pub use faults::ENDPOINTS;
pub use server::Simulator;
pub use world::ResyncReport;
