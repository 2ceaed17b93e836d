//! waldur-operator: a Kubernetes operator that makes Waldur OpenStack server groups declarative.

pub mod api;
pub mod controller;
pub mod kube_budget;
pub mod leader;
pub mod lease;
pub mod metrics;
pub mod operator;
pub mod server;
pub mod sharding;
pub mod telemetry;
pub mod waldur;
