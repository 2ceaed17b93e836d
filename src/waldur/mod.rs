//! The Waldur REST client for OpenStack server groups. No Kubernetes types live here.
//!
//! Real Waldur differs from its public docs page in ways this module absorbs: creation goes
//! through the tenant action, DELETE answers 202, states come in two vocabularies, pages are
//! clamped at 300 and UUIDs come with or without dashes.

pub mod breaker;
mod client;
mod error;
mod limiter;
mod model;
mod query;

pub use breaker::Breaker;
pub use client::{
    ClientSettings, Endpoint, MAX_BODY, MAX_ERROR_BODY, MAX_PAGE_SIZE, Observer, Token,
    WaldurClient, normalise_base,
};
pub use error::{ErrorKind, FieldMessage, FieldMessages, WaldurError};
pub use limiter::{Limiter, Limits, Slot};
pub use model::{
    Instance, InvalidUuid, NewServerGroup, Policy, ServerGroup, State, Tenant, WaldurUuid,
};
pub use query::ListQuery;
