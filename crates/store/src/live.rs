//! The in-memory view of the live chunks (their collection and document, by
//! key) and of every document's metadata, read at open and kept current by
//! each committed write. The vectors are not kept here: the service's graph
//! holds them in memory (`ragd_index::VectorIndex`), and a second copy was a
//! quarter of what each ingested chunk cost in memory (3 KB of about 12 KB
//! with the two default embedders).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rusqlite::Connection;
use serde_json::{Map, Value};

use crate::{db_error, decode_metadata, Store, StoreError};

/// What retrieval needs of a live chunk, kept in memory: filters must not
/// wait on the disk.
#[derive(Debug, Clone)]
struct LiveChunk {
    collection: Arc<str>,
    document: Arc<str>,
}

/// Documents' metadata by id, in one collection.
type CollectionMetadata = HashMap<Arc<str>, Map<String, Value>>;

/// The live chunks by key and every document's metadata.
#[derive(Debug, Default)]
pub(crate) struct LiveSet {
    /// `chunks[key]`: the chunk with that key, if it exists.
    chunks: Vec<Option<LiveChunk>>,
    /// How many of `chunks` are there.
    count: usize,
    /// How many of them each collection has.
    per_collection: HashMap<Arc<str>, usize>,
    /// Every document's metadata, for filters, by collection and id.
    metadata: HashMap<Arc<str>, CollectionMetadata>,
}

impl LiveSet {
    /// Reads the live set from the database at `path` (at open).
    pub(crate) fn load(conn: &Connection, path: &Path) -> Result<Self, StoreError> {
        let db = db_error(path);
        let mut live = LiveSet::default();
        let docs: Vec<(String, String, String)> = {
            let mut stmt = conn
                .prepare("SELECT collection, id, metadata FROM documents")
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)?
        };
        for (collection, id, metadata) in docs {
            let metadata = decode_metadata(path, &id, &metadata)?;
            let collection = live.collection_name(&collection);
            live.metadata
                .entry(collection)
                .or_default()
                .insert(Arc::from(id.as_str()), metadata);
        }
        let chunks: Vec<(usize, String, String)> = {
            let mut stmt = conn
                .prepare("SELECT key, collection, document_id FROM chunks ORDER BY key")
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, i64>(0)? as usize, r.get(1)?, r.get(2)?))
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)?
        };
        for (key, collection, document) in chunks {
            let (collection, document) = live.names(&collection, &document);
            live.set(
                key,
                Some(LiveChunk {
                    collection,
                    document,
                }),
            );
        }
        Ok(live)
    }

    /// The shared name of `collection` (one allocation per collection).
    fn collection_name(&self, collection: &str) -> Arc<str> {
        self.metadata
            .get_key_value(collection)
            .map(|(k, _)| Arc::clone(k))
            .unwrap_or_else(|| Arc::from(collection))
    }

    /// The shared names of `collection` and document `id` (one allocation
    /// per document, not per chunk).
    fn names(&self, collection: &str, id: &str) -> (Arc<str>, Arc<str>) {
        let c = self.collection_name(collection);
        let d = self
            .metadata
            .get(collection)
            .and_then(|docs| docs.get_key_value(id))
            .map(|(k, _)| Arc::clone(k))
            .unwrap_or_else(|| Arc::from(id));
        (c, d)
    }

    fn set(&mut self, key: usize, chunk: Option<LiveChunk>) {
        if self.chunks.len() <= key {
            self.chunks.resize(key + 1, None);
        }
        if let Some(old) = &self.chunks[key] {
            self.count -= 1;
            if let Some(n) = self.per_collection.get_mut(&old.collection) {
                *n -= 1;
            }
        }
        if let Some(new) = &chunk {
            self.count += 1;
            *self
                .per_collection
                .entry(Arc::clone(&new.collection))
                .or_default() += 1;
        }
        self.chunks[key] = chunk;
    }

    fn get(&self, key: usize) -> Option<&LiveChunk> {
        self.chunks.get(key).and_then(Option::as_ref)
    }

    /// Number of live chunks.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Number of live chunks of `collection`.
    pub(crate) fn count_in(&self, collection: &str) -> usize {
        self.per_collection.get(collection).copied().unwrap_or(0)
    }

    /// After a committed upsert of document `id` of `collection`: its chunks
    /// `old` are gone, `new` are live, and its metadata is `metadata`.
    pub(crate) fn replace_document(
        &mut self,
        collection: &str,
        id: &str,
        metadata: Map<String, Value>,
        old: &[usize],
        new: &[usize],
    ) {
        for &k in old {
            self.set(k, None);
        }
        let collection = self.collection_name(collection);
        let document: Arc<str> = Arc::from(id);
        self.metadata
            .entry(Arc::clone(&collection))
            .or_default()
            .insert(Arc::clone(&document), metadata);
        for &k in new {
            self.set(
                k,
                Some(LiveChunk {
                    collection: Arc::clone(&collection),
                    document: Arc::clone(&document),
                }),
            );
        }
    }

    /// After a committed delete of document `id` of `collection` with chunks `keys`.
    pub(crate) fn remove_document(&mut self, collection: &str, id: &str, keys: &[usize]) {
        for &k in keys {
            self.set(k, None);
        }
        if let Some(docs) = self.metadata.get_mut(collection) {
            docs.remove(id);
        }
    }

    /// After a committed delete of `collection`, whose chunks were `keys`.
    pub(crate) fn remove_collection(&mut self, collection: &str, keys: &[usize]) {
        for &k in keys {
            self.set(k, None);
        }
        self.metadata.remove(collection);
    }
}

impl Store {
    /// Whether chunk `key` exists.
    pub fn is_live(&self, key: usize) -> bool {
        self.live.get(key).is_some()
    }

    /// Every live chunk: key, collection and document id, in key order.
    pub fn live(&self) -> impl Iterator<Item = (usize, &str, &str)> + '_ {
        self.live
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(k, c)| c.as_ref().map(|c| (k, &*c.collection, &*c.document)))
    }

    /// Number of live chunks.
    pub fn live_count(&self) -> usize {
        self.live.count()
    }

    /// Number of live chunks of `collection`.
    pub fn live_count_in(&self, collection: &str) -> usize {
        self.live.count_in(collection)
    }

    /// The collection and document that chunk `key` belongs to, if the chunk is live.
    pub fn document_of(&self, key: usize) -> Option<(&str, &str)> {
        self.live.get(key).map(|c| (&*c.collection, &*c.document))
    }

    /// The metadata of document `id` of `collection`.
    pub fn metadata_of(&self, collection: &str, id: &str) -> Option<&Map<String, Value>> {
        self.live.metadata.get(collection)?.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_follows_replacements_and_removals() {
        let mut live = LiveSet::default();
        live.replace_document("c", "a", Map::new(), &[], &[2, 3]);
        assert_eq!(live.count(), 2);
        assert!(live.get(1).is_none() && live.get(99).is_none());
        live.replace_document("c", "a", Map::new(), &[2, 3], &[4]);
        assert_eq!(live.count(), 1);
        assert_eq!(live.get(4).map(|c| &*c.document), Some("a"));
        live.remove_document("c", "a", &[4]);
        assert_eq!(live.count(), 0);
        assert!(live.metadata["c"].is_empty());
        live.replace_document("d", "a", Map::new(), &[], &[5]);
        assert_eq!((live.count_in("d"), live.count_in("c")), (1, 0));
        live.remove_collection("d", &[5]);
        assert_eq!(live.count(), 0);
        assert_eq!(live.count_in("d"), 0);
        assert!(!live.metadata.contains_key("d"));
    }
}
