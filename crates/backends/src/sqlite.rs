//! [`DocumentStore`] on SQLite (`ragd-store`, the source of truth) and an HNSW
//! graph over the chunk vectors (`ragd-index`, derived data): the one-machine
//! default, with no server to run.
//!
//! The graph is loaded from its dump at start-up when the dump covers the
//! store's generation, else rebuilt from the stored vectors; it is dumped
//! again at shutdown ([`DocumentStore::flush`]). A replaced or deleted
//! document's chunks stay in the graph as tombstones, hidden by the live set,
//! until they pass `index.compact_fraction` and the graph is rebuilt.
//!
//! SQLite waits on the disk and the graph is CPU work, so every call runs on a
//! blocking thread, with the store and the graph behind one mutex (they change
//! together).
//!
//! Dense search: the graph is approximate, and its filtered search can return
//! fewer than k hits when most nodes are filtered out (tombstones, or a narrow
//! metadata filter). So when the allowed set is small it is searched exactly
//! (cheap); otherwise the graph is searched with a wider candidate list, and
//! exactly again if it still comes back short.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ragd_core::{
    async_trait, BackendError, CollectionInfo, DocumentInfo, DocumentStore, Embedded, Filter, Hit,
    NewDocument, StoreStats, StoredChunk, UpsertFailure, UpsertStatus,
};
use ragd_index::{IndexConfig, VectorIndex};
use ragd_store::Store;

use crate::LoadError;

/// Allowed sets up to this size are searched exactly.
const EXACT_LIMIT: usize = 4096;

/// The store and the graph derived from it, changed together.
struct Indexed {
    store: Store,
    graph: VectorIndex,
    /// The store generation of the last dump written or loaded.
    dumped: Option<u64>,
}

/// Documents in SQLite, vectors also in an HNSW graph.
pub struct SqliteStore {
    inner: Arc<Mutex<Indexed>>,
    index_dir: PathBuf,
    config: IndexConfig,
    /// Where the graph came from at start-up.
    index_at_start: &'static str,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("index_dir", &self.index_dir)
            .field("index_at_start", &self.index_at_start)
            .finish_non_exhaustive()
    }
}

/// A new graph over `vectors` (keys and vectors).
fn build_graph(
    vectors: &[(usize, &[f32])],
    dim: usize,
    config: &IndexConfig,
) -> Result<VectorIndex, BackendError> {
    let graph = VectorIndex::new(dim, config.clone()).map_err(BackendError::server)?;
    graph
        .insert_many(vectors)
        .map_err(|e| BackendError::server(format!("stored vectors: {e}")))?;
    Ok(graph)
}

/// A new graph over the store's chunks, their vectors read from the database
/// (at open, where no dump could be used).
fn build_graph_from_store(
    store: &Store,
    dim: usize,
    config: &IndexConfig,
) -> Result<VectorIndex, BackendError> {
    let vectors = store.vectors().map_err(BackendError::server)?;
    let items: Vec<(usize, &[f32])> = vectors.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    build_graph(&items, dim, config)
}

impl Indexed {
    fn dump(&mut self, dir: &Path) -> Result<(), ragd_index::IndexError> {
        let generation = self.store.generation();
        if self.dumped == Some(generation) {
            return Ok(());
        }
        if self.graph.is_empty() {
            // hnsw_rs cannot dump an empty graph; an empty one rebuilds instantly.
            let _ = std::fs::remove_dir_all(dir);
            self.dumped = Some(generation);
            return Ok(());
        }
        let started = Instant::now();
        self.graph.dump(dir, generation)?;
        self.dumped = Some(generation);
        tracing::info!(
            generation,
            points = self.graph.len(),
            ms = started.elapsed().as_millis() as u64,
            "index dumped"
        );
        Ok(())
    }

    /// Rebuilds the graph from the live chunks when tombstones pass the
    /// configured fraction.
    fn compact_if_needed(&mut self, config: &IndexConfig) -> Result<(), BackendError> {
        let indexed = self.graph.len();
        let dead = indexed.saturating_sub(self.store.live_count());
        if dead < 64 || (dead as f32) <= config.compact_fraction * indexed as f32 {
            return Ok(());
        }
        let started = Instant::now();
        // The live chunks' vectors, from the graph itself (the only copy
        // in memory).
        let mut live: Vec<(usize, Vec<f32>)> = Vec::with_capacity(self.store.live_count());
        self.graph.for_each_vector(|key, v| {
            if self.store.is_live(key) {
                live.push((key, v.to_vec()));
            }
        });
        let items: Vec<(usize, &[f32])> = live.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let graph = build_graph(&items, self.graph.dim(), config)?;
        tracing::info!(
            dead,
            live = self.store.live_count(),
            ms = started.elapsed().as_millis() as u64,
            "index compacted"
        );
        self.graph = graph;
        Ok(())
    }

    /// Whether live chunk `key` passes `filter`.
    fn allowed(&self, key: usize, filter: &Filter) -> bool {
        match self.store.document_of(key) {
            Some((collection, doc)) => {
                filter.is_empty()
                    || filter.matches(collection, doc, self.store.metadata_of(collection, doc))
            }
            None => false,
        }
    }

    fn dense(
        &self,
        query: &[f32],
        k: usize,
        filter: &Filter,
        ef_search: usize,
    ) -> Result<Vec<Hit>, BackendError> {
        let store = &self.store;
        let allowed_count = if filter.is_empty() {
            store.live_count()
        } else if let (false, Some(c)) = (filter.has_conditions(), filter.collection()) {
            store.live_count_in(c)
        } else {
            store
                .live()
                .filter(|(_, c, doc)| filter.matches(c, doc, store.metadata_of(c, doc)))
                .count()
        };
        // Over the graph's vectors: every live chunk is in the graph (removed
        // ones too, until a rebuild; `allowed` leaves those out).
        let exact = || {
            self.graph
                .exact_search(query, k, &|key| self.allowed(key, filter))
                .map_err(BackendError::server)
        };
        if allowed_count <= EXACT_LIMIT.max(k) {
            return exact();
        }
        let hits = self
            .graph
            .search_with_ef(query, k, ef_search.max(2 * k), &|key| {
                self.allowed(key, filter)
            })
            .map_err(BackendError::server)?;
        if hits.len() < k.min(allowed_count) {
            return exact();
        }
        Ok(hits)
    }

    fn lexical(&self, query: &str, k: usize, filter: &Filter) -> Result<Vec<Hit>, BackendError> {
        // Each collection has its own full-text table (BM25 statistics of its
        // own). Without a collection (no request does that; tools may), each
        // is searched and the hits merged by score.
        let collections: Vec<String> = match filter.collection() {
            Some(c) => vec![c.to_string()],
            None => self
                .store
                .collections()
                .map_err(BackendError::server)?
                .into_iter()
                .map(|c| c.name)
                .collect(),
        };
        let mut hits = Vec::new();
        for collection in &collections {
            hits.extend(self.lexical_in(collection, query, k, filter)?);
        }
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        hits.truncate(k);
        Ok(hits)
    }

    /// Lexical search in `collection`. The filter's other conditions are
    /// applied to what the full-text table returns: over-fetch so that
    /// filtering still leaves k, and fetch more while it leaves fewer and
    /// there are more.
    fn lexical_in(
        &self,
        collection: &str,
        query: &str,
        k: usize,
        filter: &Filter,
    ) -> Result<Vec<Hit>, BackendError> {
        if k == 0 {
            return Ok(Vec::new());
        }
        let mut n = if filter.has_conditions() {
            (k * 10).max(200)
        } else {
            k
        };
        loop {
            let raw = self
                .store
                .lexical_search(collection, query, n)
                .map_err(BackendError::server)?;
            let exhausted = raw.len() < n || n >= self.store.live_count_in(collection);
            let hits: Vec<Hit> = raw
                .into_iter()
                .filter(|(key, _)| self.allowed(*key, filter))
                .take(k)
                .map(|(id, score)| Hit { id, score })
                .collect();
            if hits.len() >= k || exhausted {
                return Ok(hits);
            }
            n *= 4;
        }
    }
}

impl SqliteStore {
    /// Opens the database in `data_dir` for vectors of `embedder` (its
    /// identity) with `dim` dimensions, and loads or rebuilds the graph.
    /// Blocking: call from a blocking context.
    pub fn open(
        data_dir: &Path,
        embedder: &str,
        dim: usize,
        config: IndexConfig,
    ) -> Result<Self, LoadError> {
        let store = Store::open(data_dir, embedder, dim).map_err(LoadError::Store)?;
        let started = Instant::now();
        let index_dir = data_dir.join("index");
        let (graph, from_dump) =
            match VectorIndex::load_dump(&index_dir, config.clone(), store.generation(), dim) {
                Ok(graph) => (graph, true),
                Err(why) => {
                    tracing::info!(reason = %why, "rebuilding the vector index from the store");
                    let graph = build_graph_from_store(&store, dim, &config)
                        .map_err(|e| LoadError::Index(e.message))?;
                    (graph, false)
                }
            };
        let documents = store.document_count().map_err(LoadError::Store)?;
        tracing::info!(
            documents,
            chunks = store.live_count(),
            from_dump,
            index_ms = started.elapsed().as_millis() as u64,
            data_dir = %data_dir.display(),
            "documents loaded"
        );
        let dumped = from_dump.then(|| store.generation());
        let mut inner = Indexed {
            store,
            graph,
            dumped,
        };
        if !from_dump {
            if let Err(e) = inner.dump(&index_dir) {
                tracing::warn!(error = %e, "cannot write the index dump; the next start rebuilds it");
            }
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(inner)),
            index_dir,
            config,
            index_at_start: if from_dump { "dump" } else { "rebuilt" },
        })
    }

    /// Runs `f` with the store and graph on a blocking thread.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Indexed, &Context) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let inner = Arc::clone(&self.inner);
        let context = Context {
            config: self.config.clone(),
            index_dir: self.index_dir.clone(),
        };
        tokio::task::spawn_blocking(move || {
            let mut guard = inner
                .lock()
                .map_err(|_| BackendError::server("data lock poisoned"))?;
            f(&mut guard, &context)
        })
        .await
        .map_err(BackendError::server)?
    }
}

/// A failed write: 507 when the disk is full, else a server error.
fn write_error(e: ragd_store::StoreError) -> BackendError {
    if e.is_storage_full() {
        BackendError::storage_full(e)
    } else {
        BackendError::server(e)
    }
}

/// What a blocking call needs besides the data.
struct Context {
    config: IndexConfig,
    index_dir: PathBuf,
}

#[async_trait]
impl DocumentStore for SqliteStore {
    async fn prior_versions(
        &self,
        collection: &str,
        documents: &[(String, String)],
    ) -> Result<Vec<Option<HashMap<String, Embedded>>>, BackendError> {
        let (collection, documents) = (collection.to_string(), documents.to_vec());
        self.with(move |data, _| {
            let mut out = Vec::with_capacity(documents.len());
            for (id, hash) in &documents {
                let same = data
                    .store
                    .hash_of(&collection, id)
                    .map_err(BackendError::server)?
                    .as_deref()
                    == Some(hash.as_str());
                out.push(if same {
                    None
                } else {
                    Some(
                        data.store
                            .vectors_by_embed_hash(&collection, id)
                            .map_err(BackendError::server)?,
                    )
                });
            }
            Ok(out)
        })
        .await
    }

    async fn upsert(
        &self,
        documents: Vec<NewDocument>,
    ) -> Result<Vec<Result<UpsertStatus, UpsertFailure>>, BackendError> {
        if documents.is_empty() {
            return Ok(Vec::new());
        }
        self.with(move |data, context| {
            let mut out = Vec::with_capacity(documents.len());
            for doc in documents {
                if let Err(e) = data
                    .graph
                    .check_all(doc.chunks.iter().map(|c| c.vector.as_slice()))
                {
                    out.push(Err(UpsertFailure::Vector(e.to_string())));
                    continue;
                }
                match data.store.upsert(&doc) {
                    Ok((status, new)) => {
                        for (key, vector) in &new {
                            // Checked above; a failure here would be a bug in the index.
                            if let Err(e) = data.graph.insert(*key, vector) {
                                tracing::error!(id = %doc.id, error = %e, "index insert failed");
                            }
                        }
                        out.push(Ok(status));
                    }
                    // A full disk fails the request (507), not the one
                    // document: every later one would fail the same way. The
                    // documents stored before it stay (and are "unchanged"
                    // when the client sends the request again).
                    Err(e) if e.is_storage_full() => {
                        return Err(BackendError::storage_full(e));
                    }
                    Err(e) => out.push(Err(UpsertFailure::Storage(e.to_string()))),
                }
            }
            data.compact_if_needed(&context.config)?;
            Ok(out)
        })
        .await
    }

    async fn delete(&self, collection: &str, id: &str) -> Result<bool, BackendError> {
        let (collection, id) = (collection.to_string(), id.to_string());
        self.with(move |data, context| {
            let deleted = data.store.delete(&collection, &id).map_err(write_error)?;
            if deleted {
                data.compact_if_needed(&context.config)?;
            }
            Ok(deleted)
        })
        .await
    }

    async fn document(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Option<DocumentInfo>, BackendError> {
        let (collection, id) = (collection.to_string(), id.to_string());
        self.with(move |data, _| {
            data.store
                .document(&collection, &id)
                .map_err(BackendError::server)
        })
        .await
    }

    async fn list(
        &self,
        collection: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DocumentInfo>, BackendError> {
        let (collection, after) = (collection.to_string(), after.map(str::to_string));
        self.with(move |data, _| {
            data.store
                .list(&collection, after.as_deref(), limit)
                .map_err(BackendError::server)
        })
        .await
    }

    async fn collections(&self) -> Result<Vec<CollectionInfo>, BackendError> {
        self.with(move |data, _| data.store.collections().map_err(BackendError::server))
            .await
    }

    async fn collection_exists(&self, name: &str) -> Result<bool, BackendError> {
        let name = name.to_string();
        self.with(move |data, _| {
            data.store
                .has_collection(&name)
                .map_err(BackendError::server)
        })
        .await
    }

    async fn create_collection(&self, name: &str) -> Result<bool, BackendError> {
        let name = name.to_string();
        self.with(move |data, _| data.store.create_collection(&name).map_err(write_error))
            .await
    }

    async fn delete_collection(&self, name: &str) -> Result<Option<usize>, BackendError> {
        let name = name.to_string();
        self.with(move |data, context| {
            let deleted = data.store.delete_collection(&name).map_err(write_error)?;
            if deleted.is_some() {
                data.compact_if_needed(&context.config)?;
            }
            Ok(deleted.map(|(documents, _)| documents))
        })
        .await
    }

    async fn dense_search(
        &self,
        vector: &[f32],
        k: usize,
        filter: &Filter,
    ) -> Result<Vec<Hit>, BackendError> {
        let (vector, filter) = (vector.to_vec(), filter.clone());
        self.with(move |data, context| data.dense(&vector, k, &filter, context.config.ef_search))
            .await
    }

    async fn lexical_search(
        &self,
        query: &str,
        k: usize,
        filter: &Filter,
    ) -> Result<Vec<Hit>, BackendError> {
        let (query, filter) = (query.to_string(), filter.clone());
        self.with(move |data, _| data.lexical(&query, k, &filter))
            .await
    }

    async fn chunks(&self, keys: &[usize]) -> Result<Vec<StoredChunk>, BackendError> {
        let keys = keys.to_vec();
        self.with(move |data, _| data.store.chunks(&keys).map_err(BackendError::server))
            .await
    }

    async fn document_chunks(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Vec<StoredChunk>, BackendError> {
        let (collection, id) = (collection.to_string(), id.to_string());
        self.with(move |data, _| {
            data.store
                .document_chunks(&collection, &id)
                .map_err(BackendError::server)
        })
        .await
    }

    async fn cached_summary(
        &self,
        collection: &str,
        id: &str,
        key: &str,
    ) -> Result<Option<String>, BackendError> {
        let (collection, id, key) = (collection.to_string(), id.to_string(), key.to_string());
        self.with(move |data, _| {
            data.store
                .cached_summary(&collection, &id, &key)
                .map_err(BackendError::server)
        })
        .await
    }

    async fn keep_summary(
        &self,
        collection: &str,
        id: &str,
        hash: &str,
        key: &str,
        summary: &str,
    ) -> Result<(), BackendError> {
        let owned = [collection, id, hash, key, summary].map(str::to_string);
        self.with(move |data, _| {
            let [collection, id, hash, key, summary] = &owned;
            data.store
                .keep_summary(collection, id, hash, key, summary)
                .map(|_| ())
                .map_err(BackendError::server)
        })
        .await
    }

    async fn sources(&self) -> Result<Vec<(String, String)>, BackendError> {
        self.with(move |data, _| data.store.sources().map_err(BackendError::server))
            .await
    }

    async fn keep_source(&self, name: &str, record: &str) -> Result<(), BackendError> {
        let (name, record) = (name.to_string(), record.to_string());
        self.with(move |data, _| {
            data.store
                .keep_source(&name, &record)
                .map_err(BackendError::server)
        })
        .await
    }

    async fn forget_source(&self, name: &str) -> Result<bool, BackendError> {
        let name = name.to_string();
        self.with(move |data, _| {
            data.store
                .forget_source(&name)
                .map_err(BackendError::server)
        })
        .await
    }

    async fn stats(&self) -> Result<StoreStats, BackendError> {
        let index_at_start = self.index_at_start;
        self.with(move |data, _| {
            Ok(StoreStats {
                documents: data.store.document_count().map_err(BackendError::server)?,
                chunks: data.store.live_count(),
                index_at_start: Some(index_at_start),
            })
        })
        .await
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.with(move |data, context| data.dump(&context.index_dir).map_err(BackendError::server))
            .await
    }
}
