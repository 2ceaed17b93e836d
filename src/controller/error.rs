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
    #[error("invalid spec: {0}")]
    Spec(#[from] SpecProblem),
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
            Self::Kube(_) => synced_reason::ERROR,
            Self::CredentialsNotFound(_) => synced_reason::CREDENTIALS_NOT_FOUND,
            Self::Spec(_) => "InvalidSpec",
        }
    }

    /// The message for conditions and Events: Waldur's words when Waldur said something.
    pub fn message(&self) -> String {
        match self {
            Self::Waldur(e) => e.to_string(),
            other => other.to_string(),
        }
    }
}
