//! A faithful, stateful simulator of the Waldur OpenStack server-group API.
//!
//! It reproduces what real Waldur servers do (not what the published schema claims): 201 from the
//! tenant's `create_server_group` action and 500 from the collection POST, 202 on DELETE, 409 for
//! operations in transitional states, asynchronous state transitions, both state vocabularies,
//! the pre-8.0.4 affinity-only policy set, staff and non-staff tokens, pagination clamped at 300
//! with `Link` and `X-Result-Count`, sparse fields, Waldur's periodic tenant re-sync, injected
//! faults, and per-endpoint request counters. It also copies what a real 7.0.7 server showed: the
//! list without `o=` is ordered by tenant name only (rows of a tenant reshuffle per request, see
//! [`DefaultOrder`]), HTML 404s for URLs without a route, 301 for a missing trailing slash,
//! `{"detail": "JSON parse error - ..."}` 400s, DELETE from ERRED dropping the row even when
//! OpenStack refuses, and a whole 7.0.x mode ([`WaldurVersion::V7_0`]). Tenants are resources
//! with a state: `pull_server_groups` holds its tenant (409 on every tenant action until the
//! re-sync ran), a failed one leaves it Erred until staff or the periodic re-sync repair it, and
//! Waldur's clock can be set off ([`Simulator::set_clock_offset`]).
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

pub use config::{DEFAULT_TENANT, DefaultOrder, Delays, SimConfig, Vocabulary, WaldurVersion};
pub use control::CONTROL_HELP;
pub use faults::ENDPOINTS;
pub use server::Simulator;
pub use world::ResyncReport;
