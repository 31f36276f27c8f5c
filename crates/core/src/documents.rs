//! Documents, chunks and their vectors, and the [`DocumentStore`] seam.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::BackendError;
use crate::filter::Filter;

/// A chunk to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewChunk {
    /// The passage.
    pub text: String,
    /// The headings in force where the passage starts, outermost first, joined with " > "; empty
    /// when the document has none.
    pub section: String,
    /// Byte offset in the document.
    pub start: usize,
    /// Byte offset past the end.
    pub end: usize,
    /// Hash of what was embedded (decides whether a vector can be reused).
    pub embed_hash: String,
    /// The embedding.
    pub vector: Vec<f32>,
    /// Questions the answer model wrote that the passage answers
    /// (`ingest.generate_questions`; empty when off): searched with the
    /// passage, never shown to the model as document text.
    pub questions: Vec<String>,
}

/// What a stored chunk's embedding step produced, kept for reuse when its
/// document changes elsewhere.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Embedded {
    /// The embedding.
    pub vector: Vec<f32>,
    /// The generated questions embedded and indexed with it.
    pub questions: Vec<String>,
}

/// The collection of documents that requests name no other.
pub const DEFAULT_COLLECTION: &str = "default";

/// Why `name` cannot name a collection, if it cannot: 1 to 64 ASCII letters,
/// digits, `-`, `_` and `.`, starting with a letter or digit (it appears in
/// URL paths and metric labels as written).
pub fn invalid_collection_name(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    (!ok).then(|| {
        "a collection name is 1 to 64 ASCII letters, digits, '-', '_' and '.', starting with a letter or digit"
            .to_string()
    })
}

/// A collection: a named set of documents, searched apart from the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CollectionInfo {
    /// Its name.
    pub name: String,
    /// Documents in it.
    pub documents: usize,
    /// Created, seconds since the Unix epoch (0 for `default`, which always exists).
    pub created_at: i64,
}

/// A document to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDocument {
    /// The collection it belongs to.
    pub collection: String,
    /// The id (unique within the collection).
    pub id: String,
    /// Optional title.
    pub title: Option<String>,
    /// The full text.
    pub text: String,
    /// The caller's metadata.
    pub metadata: Map<String, Value>,
    /// Hash of everything that makes a document "unchanged".
    pub hash: String,
    /// Its chunks, in order.
    pub chunks: Vec<NewChunk>,
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpsertStatus {
    /// A new id.
    Created,
    /// An existing id with different content; its chunks were replaced.
    Updated,
    /// An existing id with the same content: nothing written.
    Unchanged,
}

/// Why one document of an upsert was not stored (the others still are).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpsertFailure {
    /// A vector cannot be indexed (wrong size, not finite): the embedder's fault.
    #[error("embedding failed")]
    Vector(String),
    /// Writing failed.
    #[error("storage failed")]
    Storage(String),
}

/// A stored chunk, as retrieval reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredChunk {
    /// Its key: unique, never reused, the id search hits carry.
    pub key: usize,
    /// The owning document's collection.
    pub collection: String,
    /// The owning document.
    pub document_id: String,
    /// Position in the document.
    pub index: usize,
    /// The document's title.
    pub title: Option<String>,
    /// The headings in force where the passage starts (" > "-joined; empty when none).
    pub section: String,
    /// The passage.
    pub text: String,
    /// Byte offset of the passage in the document text.
    pub start: usize,
    /// Byte offset just past the passage.
    pub end: usize,
    /// Its embedding.
    pub vector: Vec<f32>,
}

impl StoredChunk {
    /// Public chunk id: `{document_id}#{index}`.
    pub fn chunk_id(&self) -> String {
        format!("{}#{}", self.document_id, self.index)
    }
}

/// A document's record, without its text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocumentInfo {
    /// The collection it belongs to.
    pub collection: String,
    /// The id.
    pub id: String,
    /// The title.
    pub title: Option<String>,
    /// The metadata.
    pub metadata: Map<String, Value>,
    /// The content hash.
    pub hash: String,
    /// Number of chunks.
    pub chunks: usize,
    /// Length of the text in bytes.
    pub text_bytes: usize,
    /// First stored, seconds since the Unix epoch.
    pub created_at: i64,
    /// Last changed, seconds since the Unix epoch.
    pub updated_at: i64,
}

/// A search hit: a chunk key and its score (higher is better).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// The chunk's key.
    pub id: usize,
    /// Its score: cosine similarity for dense search, BM25 for lexical search.
    pub score: f32,
}

/// What a store holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStats {
    /// Documents.
    pub documents: usize,
    /// Live chunks.
    pub chunks: usize,
    /// Where the vector index came from at start-up (`dump` or `rebuilt`),
    /// for stores that keep one.
    pub index_at_start: Option<&'static str>,
}

/// Documents, their chunks and vectors, and search over them: the seam between
/// the pipeline and storage.
///
/// A store keeps every document wholly in one version: an upsert is one
/// transaction per document, and a replaced or deleted document's chunks are
/// not returned by any search from the moment the call returns. Chunk keys are
/// never reused.
#[async_trait::async_trait]
pub trait DocumentStore: Send + Sync + std::fmt::Debug {
    /// For each `(id, hash)` of `collection`: `None` when the document is
    /// stored with that content hash (unchanged), else the vectors of its
    /// stored chunks by the hash of what was embedded (empty for a new
    /// document), for reuse.
    async fn prior_versions(
        &self,
        collection: &str,
        documents: &[(String, String)],
    ) -> Result<Vec<Option<HashMap<String, Embedded>>>, BackendError>;

    /// Stores the documents (each in the collection it names, which exists),
    /// each in its own transaction, replacing older versions; one failing
    /// does not undo the others.
    async fn upsert(
        &self,
        documents: Vec<NewDocument>,
    ) -> Result<Vec<Result<UpsertStatus, UpsertFailure>>, BackendError>;

    /// Deletes a document of `collection` and its chunks; whether it existed.
    async fn delete(&self, collection: &str, id: &str) -> Result<bool, BackendError>;

    /// A document's record.
    async fn document(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Option<DocumentInfo>, BackendError>;

    /// Up to `limit` documents of `collection` with ids after `after`, in id order.
    async fn list(
        &self,
        collection: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DocumentInfo>, BackendError>;

    /// Every collection, by name ([`DEFAULT_COLLECTION`] always among them).
    async fn collections(&self) -> Result<Vec<CollectionInfo>, BackendError>;

    /// Whether collection `name` exists (cheaper than [`Self::collections`],
    /// which counts documents: asked on every request to a collection).
    async fn collection_exists(&self, name: &str) -> Result<bool, BackendError>;

    /// Creates collection `name`; `false` when it exists already.
    async fn create_collection(&self, name: &str) -> Result<bool, BackendError>;

    /// Deletes collection `name` (not [`DEFAULT_COLLECTION`]) with its
    /// documents, in one transaction; the number of documents deleted, `None`
    /// when there was no such collection.
    async fn delete_collection(&self, name: &str) -> Result<Option<usize>, BackendError>;

    /// The `k` live chunks nearest to `vector` that pass `filter`, best first,
    /// scored by cosine similarity.
    async fn dense_search(
        &self,
        vector: &[f32],
        k: usize,
        filter: &Filter,
    ) -> Result<Vec<Hit>, BackendError>;

    /// The `k` live chunks best matching `query`'s words (BM25 over title,
    /// section and text) that pass `filter`, best first.
    async fn lexical_search(
        &self,
        query: &str,
        k: usize,
        filter: &Filter,
    ) -> Result<Vec<Hit>, BackendError>;

    /// The live chunks with these keys, in the given order (missing ones are
    /// left out).
    async fn chunks(&self, keys: &[usize]) -> Result<Vec<StoredChunk>, BackendError>;

    /// The chunks of document `id` of `collection`, in the document's order
    /// (empty when there is no such document).
    async fn document_chunks(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Vec<StoredChunk>, BackendError>;

    /// A summary kept for document `id` of `collection` under `key` (what
    /// it was made with: content hash, style, language, model), if one is.
    /// The default keeps none.
    async fn cached_summary(
        &self,
        _collection: &str,
        _id: &str,
        _key: &str,
    ) -> Result<Option<String>, BackendError> {
        Ok(None)
    }

    /// Keeps `summary` (JSON) for document `id` of `collection` under `key`
    /// while the document has content hash `hash`: a summary of an older
    /// version is never stored, and a changed or deleted document's
    /// summaries go with the change. The default keeps nothing.
    async fn keep_summary(
        &self,
        _collection: &str,
        _id: &str,
        _hash: &str,
        _key: &str,
        _summary: &str,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    /// Every registered source (see `ragd-sources`): its name and its
    /// record as JSON, by name. The default keeps none.
    async fn sources(&self) -> Result<Vec<(String, String)>, BackendError> {
        Ok(Vec::new())
    }

    /// Registers source `name` with `record` (JSON), or replaces its record.
    /// The default refuses: this store keeps no sources.
    async fn keep_source(&self, _name: &str, _record: &str) -> Result<(), BackendError> {
        Err(BackendError::server("this store keeps no sources"))
    }

    /// Forgets source `name` (its documents stay); whether it was registered.
    async fn forget_source(&self, _name: &str) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// Counts, for `/ready` and `/metrics`.
    async fn stats(&self) -> Result<StoreStats, BackendError>;

    /// Writes what is kept only in memory (an index dump) so that the next
    /// start is fast; called at shutdown.
    async fn flush(&self) -> Result<(), BackendError>;
}
