//! The engines behind ragd's seams (the traits of `ragd-core`):
//!
//! * [`LocalEmbedder`] — [`ragd_core::Embed`] on the local BERT model, on its
//!   own thread with dynamic batching;
//! * [`RemoteEmbedder`] — [`ragd_core::Embed`] on an OpenAI-compatible
//!   `/v1/embeddings` server;
//! * [`LocalGenerator`] — [`ragd_core::Generate`] on a local GGUF model, in
//!   slot threads sharing the weights;
//! * [`RemoteGenerator`] — [`ragd_core::Generate`] on an OpenAI-compatible
//!   server, in async tasks;
//!
//!   both serve one bounded queue and hand out the same handle,
//!   [`GenerationSlots`];
//! * [`SqliteStore`] — [`ragd_core::DocumentStore`] on SQLite with an HNSW
//!   graph over the vectors (one process);
//! * [`PgStore`] — [`ragd_core::DocumentStore`] on PostgreSQL with pgvector
//!   (crate `ragd-pgstore`; any number of processes).
//!
//! Each says in its module what it does with the context budget and steering
//! (the generators) or how it searches (the store). The pipeline never names
//! them: the program picks them from the configuration and hands them over as
//! trait objects.

#![deny(missing_docs)]

pub mod embed_local;
pub mod embed_remote;
pub mod generate_local;
mod queue;
pub mod remote;
pub mod sqlite;

use std::path::PathBuf;

pub use embed_local::{BatchObserver, LocalEmbedder};
pub use embed_remote::{RemoteEmbedConfig, RemoteEmbedder};
pub use generate_local::{LocalGenerator, LocalOptions};
pub use queue::GenerationSlots;
pub use ragd_pgstore::{redact_url, PgConfig, PgError, PgStore};
pub use remote::{RemoteConfig, RemoteGenerator};
pub use sqlite::SqliteStore;

/// How a model thread hands the memory it has freed back to the system, set
/// once by the program (the `ragd` binary registers its allocator's collect);
/// without one, [`release_freed_memory`] does nothing.
static RELEASE_FREED: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Registers how [`release_freed_memory`] works. Only the first call counts.
pub fn set_memory_release(release: fn()) {
    let _ = RELEASE_FREED.set(release);
}

/// Hands back the freed memory the calling thread's allocator holds.
///
/// Why: the allocator keeps what a thread frees for that thread's next
/// allocations (a forward pass frees and allocates buffers of megabytes per
/// layer, and faulting them in again each time cost ~10 % of a prefill), so
/// a model thread that has gone idle still holds the buffers of its last
/// work: a loaded model's temporary copies, an embedding batch's
/// activations. `bench/serve-memory`: after 100 ingested documents the
/// embedder threads held about 75 MB of such pages.
pub(crate) fn release_freed_memory() {
    if let Some(release) = RELEASE_FREED.get() {
        release();
    }
}

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A model file is missing, unreadable or not a supported model.
    #[error("{what} {}: {message}", path.display())]
    Model {
        /// `embedder` or `generator`.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A model thread could not be started.
    #[error("cannot start the {what} thread: {message}")]
    Thread {
        /// `embedder` or `generator`.
        what: &'static str,
        /// The OS error.
        message: String,
    },
    /// The database cannot be opened (or was written with another embedder).
    #[error("{0}")]
    Store(#[from] ragd_store::StoreError),
    /// The PostgreSQL store cannot be opened.
    #[error("{0}")]
    Postgres(#[from] ragd_pgstore::PgError),
    /// The vector index cannot be built from the stored vectors.
    #[error("{0}")]
    Index(String),
    /// The remote server's client cannot be set up.
    #[error("{0}")]
    Remote(String),
}
