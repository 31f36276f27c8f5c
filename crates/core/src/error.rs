//! Failures of the engines behind the traits, with whose fault each is.

/// Whose fault a failure is; decides the HTTP status family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request's (a prompt too long for the model, a bad parameter): 4xx.
    Client,
    /// This server's (a model or the disk failed): 5xx, detail only in the log.
    Server,
    /// A remote server's (generation, embeddings): 502.
    Upstream,
    /// A service ragd depends on cannot be reached for now (the database is
    /// restarting): 503, retry shortly.
    Unavailable,
    /// The disk that holds the data is full: nothing of the failed write was
    /// kept; 507, retry once space is freed.
    StorageFull,
}

/// A failure of an engine behind one of the traits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// Whose fault it is.
    pub fault: Fault,
    /// What went wrong. For [`Fault::Client`] it is shown to the client; for the
    /// others it goes to the log and the client gets a generic message.
    pub message: String,
}

impl BackendError {
    /// A failure caused by the request.
    pub fn client(message: impl std::fmt::Display) -> Self {
        Self {
            fault: Fault::Client,
            message: message.to_string(),
        }
    }

    /// A failure on this server.
    pub fn server(message: impl std::fmt::Display) -> Self {
        Self {
            fault: Fault::Server,
            message: message.to_string(),
        }
    }

    /// A service that cannot be reached for now.
    pub fn unavailable(message: impl std::fmt::Display) -> Self {
        Self {
            fault: Fault::Unavailable,
            message: message.to_string(),
        }
    }

    /// The disk that holds the data is full.
    pub fn storage_full(message: impl std::fmt::Display) -> Self {
        Self {
            fault: Fault::StorageFull,
            message: message.to_string(),
        }
    }

    /// A failure of a remote server.
    pub fn upstream(message: impl std::fmt::Display) -> Self {
        Self {
            fault: Fault::Upstream,
            message: message.to_string(),
        }
    }
}
