//! The in-memory view of the live chunks (their documents and vectors, by key)
//! and of every document's metadata, read at open and kept current by each
//! committed write.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rusqlite::Connection;
use serde_json::{Map, Value};

use crate::{blob_to_vector, db_error, decode_metadata, KeyedVector, Store, StoreError};

/// What retrieval needs of a live chunk, kept in memory: filters and exact
/// search must not wait on the disk.
#[derive(Debug, Clone)]
struct LiveChunk {
    document: Arc<str>,
    vector: Arc<[f32]>,
}

/// The live chunks by key and every document's metadata.
#[derive(Debug, Default)]
pub(crate) struct LiveSet {
    /// `chunks[key]`: the chunk with that key, if it exists.
    chunks: Vec<Option<LiveChunk>>,
    /// How many of `chunks` are there.
    count: usize,
    /// Every document's metadata, for filters.
    metadata: HashMap<Arc<str>, Map<String, Value>>,
}

impl LiveSet {
    /// Reads the live set from the database at `path` (at open).
    pub(crate) fn load(conn: &Connection, path: &Path) -> Result<Self, StoreError> {
        let db = db_error(path);
        let mut live = LiveSet::default();
        let docs: Vec<(String, String)> = {
            let mut stmt = conn
                .prepare("SELECT id, metadata FROM documents")
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)?
        };
        for (id, metadata) in docs {
            let metadata = decode_metadata(path, &id, &metadata)?;
            live.metadata.insert(Arc::from(id.as_str()), metadata);
        }
        let chunks: Vec<(usize, String, Vec<u8>)> = {
            let mut stmt = conn
                .prepare("SELECT key, document_id, vector FROM chunks ORDER BY key")
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, i64>(0)? as usize, r.get(1)?, r.get(2)?))
                })
                .map_err(db)?;
            rows.collect::<Result<_, _>>().map_err(db)?
        };
        for (key, document, blob) in chunks {
            let vector = blob_to_vector(&blob).ok_or_else(|| StoreError::Corrupt {
                path: path.to_owned(),
                message: format!("vector of chunk {key}"),
            })?;
            let document = live
                .metadata
                .get_key_value(document.as_str())
                .map(|(k, _)| Arc::clone(k))
                .unwrap_or_else(|| Arc::from(document.as_str()));
            live.set(
                key,
                Some(LiveChunk {
                    document,
                    vector: vector.into(),
                }),
            );
        }
        Ok(live)
    }

    fn set(&mut self, key: usize, chunk: Option<LiveChunk>) {
        if self.chunks.len() <= key {
            self.chunks.resize(key + 1, None);
        }
        match (&self.chunks[key], &chunk) {
            (None, Some(_)) => self.count += 1,
            (Some(_), None) => self.count -= 1,
            _ => {}
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

    /// After a committed upsert of document `id`: its chunks `old` are gone,
    /// `new` are live, and its metadata is `metadata`.
    pub(crate) fn replace_document(
        &mut self,
        id: &str,
        metadata: Map<String, Value>,
        old: &[usize],
        new: &[KeyedVector],
    ) {
        for &k in old {
            self.set(k, None);
        }
        let document: Arc<str> = Arc::from(id);
        self.metadata.insert(Arc::clone(&document), metadata);
        for (k, v) in new {
            self.set(
                *k,
                Some(LiveChunk {
                    document: Arc::clone(&document),
                    vector: v.as_slice().into(),
                }),
            );
        }
    }

    /// After a committed delete of document `id` with chunks `keys`.
    pub(crate) fn remove_document(&mut self, id: &str, keys: &[usize]) {
        for &k in keys {
            self.set(k, None);
        }
        self.metadata.remove(id);
    }
}

impl Store {
    /// Whether chunk `key` exists.
    pub fn is_live(&self, key: usize) -> bool {
        self.live.get(key).is_some()
    }

    /// Every live chunk: key, document id and vector, in key order.
    pub fn live(&self) -> impl Iterator<Item = (usize, &str, &[f32])> + '_ {
        self.live
            .chunks
            .iter()
            .enumerate()
            .filter_map(|(k, c)| c.as_ref().map(|c| (k, &*c.document, &*c.vector)))
    }

    /// Number of live chunks.
    pub fn live_count(&self) -> usize {
        self.live.count()
    }

    /// The document that chunk `key` belongs to, if the chunk is live.
    pub fn document_of(&self, key: usize) -> Option<&str> {
        self.live.get(key).map(|c| &*c.document)
    }

    /// The vector of chunk `key`, if the chunk is live.
    pub fn vector_of(&self, key: usize) -> Option<&[f32]> {
        self.live.get(key).map(|c| &*c.vector)
    }

    /// The metadata of document `id`.
    pub fn metadata_of(&self, id: &str) -> Option<&Map<String, Value>> {
        self.live.metadata.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_follows_replacements_and_removals() {
        let mut live = LiveSet::default();
        live.replace_document("a", Map::new(), &[], &[(2, vec![1.0]), (3, vec![2.0])]);
        assert_eq!(live.count(), 2);
        assert!(live.get(1).is_none() && live.get(99).is_none());
        live.replace_document("a", Map::new(), &[2, 3], &[(4, vec![3.0])]);
        assert_eq!(live.count(), 1);
        assert_eq!(live.get(4).map(|c| &*c.document), Some("a"));
        live.remove_document("a", &[4]);
        assert_eq!(live.count(), 0);
        assert!(live.metadata.is_empty());
    }
}
