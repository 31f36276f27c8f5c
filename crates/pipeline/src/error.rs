//! The pipeline's errors, each saying whose fault it is; the HTTP crate maps
//! each variant to a status in one exhaustive match.

use ragd_core::{BackendError, Fault};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid: a value out of range, a malformed filter, a
    /// prompt too long for the model. The message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// No such document.
    #[error("{0}")]
    NotFound(String),
    /// The generation queue is full; the client should retry shortly.
    #[error("too many requests are waiting for the generator; retry shortly")]
    Busy {
        /// Seconds the client should wait.
        retry_after_secs: u64,
    },
    /// A remote server ragd relies on failed or cannot be reached; the detail
    /// is logged, not returned.
    #[error("the generation server failed or cannot be reached")]
    Upstream(String),
    /// A service ragd depends on (the database) cannot be reached for now;
    /// the client should retry shortly. The detail is logged, not returned.
    #[error("the database cannot be reached at the moment; retry shortly")]
    Unavailable(String),
    /// The disk holding the data is full: the write was not kept; the client
    /// may retry once space is freed. The detail is logged, not returned.
    #[error("the disk holding ragd's data is full: free space, then send the request again (documents it had already stored are then reported unchanged)")]
    StorageFull(String),
    /// A failure on our side; the detail is logged, not returned.
    #[error("internal error")]
    Internal(String),
}

impl Error {
    /// An internal error, logged with its detail.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        let detail = detail.to_string();
        tracing::error!(%detail, "internal error");
        Error::Internal(detail)
    }

    /// Whose fault it is.
    pub fn fault(&self) -> Fault {
        match self {
            Error::Invalid(_) | Error::NotFound(_) | Error::Busy { .. } => Fault::Client,
            Error::Upstream(_) => Fault::Upstream,
            Error::Unavailable(_) => Fault::Unavailable,
            Error::StorageFull(_) => Fault::StorageFull,
            Error::Internal(_) => Fault::Server,
        }
    }
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Self {
        match e.fault {
            Fault::Client => Error::Invalid(e.message),
            Fault::Server => Error::internal(e.message),
            Fault::Upstream => {
                tracing::warn!(detail = %e.message, "a remote server failed");
                Error::Upstream(e.message)
            }
            Fault::Unavailable => {
                tracing::warn!(detail = %e.message, "a service ragd depends on is unavailable");
                Error::Unavailable(e.message)
            }
            Fault::StorageFull => {
                tracing::error!(detail = %e.message, "the disk holding the data is full");
                Error::StorageFull(e.message)
            }
        }
    }
}

impl From<ragd_core::InvalidFilter> for Error {
    fn from(e: ragd_core::InvalidFilter) -> Self {
        Error::Invalid(e.to_string())
    }
}

/// A setting out of range; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);
