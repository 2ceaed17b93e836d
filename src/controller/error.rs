//! Reconcile failures. Each knows its category, which becomes the `Synced` reason and the
//! Event reason, so users see the same word in `kubectl describe` and `kubectl get -o yaml`.

use crate::api::conditions::synced_reason;
use crate::waldur::{ErrorKind, WaldurError};

use super::plan::SpecProblem;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Waldur(#[from] WaldurError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    CredentialsNotFound(String),
    #[error("{0}")]
    DefaultCredentialsNotAllowed(String),
    #[error("invalid spec: {0}")]
    Spec(#[from] SpecProblem),
    /// This resource's Waldur (named by its credentials) already has its share of the
    /// workers: try again shortly, without reporting a failure (review N5).
    #[error("the workers for Waldur at {0} are all busy")]
    WorkersBusy(String),
    /// The resource changed since the cache handed it over, in a way the reconcile's decision
    /// rests on: try again from a fresher view shortly, without reporting a failure.
    #[error("the resource changed since it was read ({0})")]
    StaleView(String),
    /// These credentials cannot see what the resource is bound to: Waldur's 404 proves
    /// nothing, so a deletion waits (review m4).
    #[error("{0}")]
    CannotSee(String),
}

impl Error {
    /// The `Synced` condition reason and Event reason for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Waldur(e) => match e.kind() {
                ErrorKind::Transient => synced_reason::WALDUR_UNAVAILABLE,
                ErrorKind::Unauthorized => synced_reason::UNAUTHORIZED,
                ErrorKind::Forbidden => synced_reason::FORBIDDEN,
                ErrorKind::Conflict => synced_reason::CONFLICT,
                ErrorKind::Invalid => "InvalidSpec",
                ErrorKind::Unsupported => synced_reason::UNSUPPORTED,
                ErrorKind::NotFound | ErrorKind::Unexpected => synced_reason::ERROR,
            },
            Self::Kube(e) if crd_outdated(e) => synced_reason::CRD_OUTDATED,
            Self::Kube(_) => synced_reason::ERROR,
            Self::CredentialsNotFound(_) => synced_reason::CREDENTIALS_NOT_FOUND,
            Self::DefaultCredentialsNotAllowed(_) => synced_reason::DEFAULT_CREDENTIALS_NOT_ALLOWED,
            Self::Spec(_) => "InvalidSpec",
            Self::CannotSee(_) => synced_reason::FORBIDDEN,
            Self::WorkersBusy(_) | Self::StaleView(_) => synced_reason::ERROR,
        }
    }

    /// Whether retrying cannot help until the user changes something (the spec, or the
    /// admin's settings): such a failure concludes the generation it happened in.
    pub fn needs_the_user(&self) -> bool {
        match self {
            Self::Waldur(e) => e.kind() == ErrorKind::Invalid,
            Self::Spec(_) | Self::DefaultCredentialsNotAllowed(_) => true,
            _ => false,
        }
    }

    /// The message for conditions and Events: Waldur's words when Waldur said something.
    pub fn message(&self) -> String {
        match self {
            Self::Waldur(e) => e.to_string(),
            Self::Kube(e) if crd_outdated(e) => format!(
                "the ServerGroup CRD installed in this cluster is older than this operator: \
                 install this version's CRD (`helm upgrade` with crds.enabled=true, the default, \
                 or `waldur-operator crd | kubectl apply --server-side -f -`). \
                 The API server said: {e}"
            ),
            other => other.to_string(),
        }
    }
}

/// A server-side apply the API server could not type against the installed CRD: a field this
/// operator writes is not declared there (kube-apiserver answers 500 for that, whatever the
/// field validation setting).
fn crd_outdated(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 500
        && (s.message.contains("field not declared in schema")
            || s.message.contains("failed to create typed patch object")))
}
