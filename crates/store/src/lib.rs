//! The source of truth for documents: an embedded SQLite database.
//!
//! Documents, their chunks, the chunks' vectors, content hashes and metadata live
//! in `ragd.sqlite3` in the data directory (WAL mode, `synchronous = FULL`): an
//! ingest is acknowledged only after its transaction has committed, so a crash
//! or `kill -9` loses nothing acknowledged, and a document is always either
//! wholly in its old version or wholly in its new one.
//!
//! The HNSW index is derived data. Each chunk has an integer `key` that never
//! gets reused (`AUTOINCREMENT`), which is also its id in the index; deleting or
//! replacing a document deletes its chunk rows, and searches hide keys that are
//! not live ([`Store::is_live`]) until the index is rebuilt without them.
//!
//! The store is synchronous and not `Sync` (SQLite connections are not): the
//! server keeps it behind a mutex and calls it from blocking threads.
//!
//! One module a job: this file holds [`Store`] and the documents (open, upsert,
//! delete, reads); `schema` the tables, the `meta` table (embedder identity,
//! schema version, generation counter) and bringing older databases up to date;
//! `lexical` the full-text index (FTS5) and BM25 search; `live` the in-memory
//! view of the live chunks and every document's metadata.

#![deny(missing_docs)]

mod lexical;
mod live;
mod schema;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::{Map, Value};

use live::LiveSet;

pub use lexical::{lexical_text, STOP_WORDS};
pub use ragd_core::{
    CollectionInfo, DocumentInfo, Embedded, NewChunk, NewDocument, StoredChunk, UpsertStatus,
    DEFAULT_COLLECTION,
};

/// The database file in the data directory.
pub const DB_FILE: &str = "ragd.sqlite3";

/// Storage failures: the disk's or ours, never the API user's.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("database {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The data directory cannot be created.
    #[error("data directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The database was written with another embedding model.
    #[error("{path} holds vectors of {found}; this server embeds with {expected}: use another data_dir or the same model")]
    ModelMismatch {
        /// The database file.
        path: PathBuf,
        /// The model recorded in the database.
        found: String,
        /// The configured model.
        expected: String,
    },
    /// Stored data does not decode.
    #[error("database {path} is damaged: {message}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl StoreError {
    /// Whether the write failed because the disk is full (SQLite's
    /// `SQLITE_FULL`, or the OS's "no space left on device"): the transaction
    /// was rolled back, and the same write succeeds once space is freed.
    pub fn is_storage_full(&self) -> bool {
        match self {
            StoreError::Db { source, .. } => {
                source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
            }
            StoreError::Io { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }
}

/// A stored chunk's key (its HNSW id) and vector.
pub type KeyedVector = (usize, Vec<f32>);

/// The SQLite store plus an in-memory view of the live chunks.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// The live chunks and every document's metadata.
    live: LiveSet,
    /// Bumped by every committed change; tells whether an index dump is current.
    generation: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Wraps SQLite's errors with the database file `path`.
fn db_error(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
    move |source| StoreError::Db {
        path: path.to_owned(),
        source,
    }
}

/// Document `id`'s metadata as stored (a JSON object). A value that does not
/// decode is damage to report, not an empty map: that would drop the user's
/// metadata without a word and make filters miss the document.
fn decode_metadata(path: &Path, id: &str, json: &str) -> Result<Map<String, Value>, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        path: path.to_owned(),
        message: format!("metadata of document {id:?}: {e}"),
    })
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn vector_to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn blob_to_vector(b: &[u8]) -> Option<Vec<f32>> {
    b.len().is_multiple_of(4).then(|| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// Deletes the chunks of document `id` of `collection` and their full-text
/// entries in `tx`; returns the chunks' keys.
fn delete_chunks(tx: &Transaction<'_>, collection: &str, id: &str) -> rusqlite::Result<Vec<usize>> {
    let keys: Vec<usize> = {
        let mut stmt =
            tx.prepare("SELECT key FROM chunks WHERE collection = ?1 AND document_id = ?2")?;
        let keys = stmt.query_map([collection, id], |r| r.get::<_, i64>(0))?;
        keys.map(|k| k.map(|k| k as usize))
            .collect::<Result<_, _>>()?
    };
    lexical::forget_chunks(tx, collection, &keys)?;
    tx.execute(
        "DELETE FROM chunks WHERE collection = ?1 AND document_id = ?2",
        [collection, id],
    )?;
    Ok(keys)
}

impl Store {
    /// Opens (creating if needed) the database in `dir` for vectors of model
    /// `embedder` with `dim` dimensions.
    pub fn open(dir: &Path, embedder: &str, dim: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let db = db_error(&path);
        let conn = Connection::open(&path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        let generation = schema::prepare(&conn, &path, embedder, dim)?;
        let live = LiveSet::load(&conn, &path)?;
        let mut store = Store {
            conn,
            path,
            live,
            generation,
        };
        schema::backfill_lexical(&mut store.conn, &store.path, &store.live)?;
        Ok(store)
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
        db_error(&self.path)
    }

    /// The store generation: changes with every committed write.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The content hash of document `id` of `collection`, if stored.
    pub fn hash_of(&self, collection: &str, id: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row(
                "SELECT hash FROM documents WHERE collection = ?1 AND id = ?2",
                [collection, id],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())
    }

    /// The vectors (and generated questions) of document `id`'s current chunks
    /// by what was embedded, so an update re-embeds only chunks that changed.
    pub fn vectors_by_embed_hash(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<HashMap<String, Embedded>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT embed_hash, vector, questions FROM chunks
                 WHERE collection = ?1 AND document_id = ?2",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map([collection, id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(self.db())?;
        let mut out = HashMap::new();
        for row in rows {
            let (h, blob, questions) = row.map_err(self.db())?;
            if let Some(vector) = blob_to_vector(&blob) {
                let questions = questions.lines().map(String::from).collect();
                out.insert(h, Embedded { vector, questions });
            }
        }
        Ok(out)
    }

    /// The chunks of document `id` of `collection`, in the document's order.
    pub fn document_chunks(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Vec<StoredChunk>, StoreError> {
        let keys: Vec<usize> = {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT key FROM chunks WHERE collection = ?1 AND document_id = ?2 ORDER BY idx",
                )
                .map_err(self.db())?;
            let keys = stmt
                .query_map([collection, id], |r| r.get::<_, i64>(0))
                .map_err(self.db())?;
            keys.map(|k| k.map(|k| k as usize))
                .collect::<Result<_, _>>()
                .map_err(self.db())?
        };
        self.chunks(&keys)
    }

    /// The summary kept for document `id` of `collection` under `key`.
    pub fn cached_summary(
        &self,
        collection: &str,
        id: &str,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row(
                "SELECT summary FROM summaries WHERE collection = ?1 AND document_id = ?2 AND key = ?3",
                [collection, id, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())
    }

    /// Keeps `summary` for document `id` of `collection` under `key`, only
    /// while the document's content hash is `hash` (a summary of a version
    /// replaced meanwhile is not kept); whether it was kept.
    pub fn keep_summary(
        &mut self,
        collection: &str,
        id: &str,
        hash: &str,
        key: &str,
        summary: &str,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "INSERT INTO summaries (collection, document_id, key, summary, created_at)
                 SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS
                     (SELECT 1 FROM documents WHERE collection = ?1 AND id = ?2 AND hash = ?6)
                 ON CONFLICT (collection, document_id, key) DO UPDATE SET
                     summary = excluded.summary, created_at = excluded.created_at",
                params![collection, id, key, summary, now(), hash],
            )
            .map_err(self.db())?;
        Ok(n == 1)
    }

    /// Every registered source: its name and record (JSON), by name.
    pub fn sources(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, record FROM sources ORDER BY name")
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.db())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.db())
    }

    /// Registers source `name` with `record`, or replaces its record.
    pub fn keep_source(&mut self, name: &str, record: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO sources (name, record) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET record = excluded.record",
                [name, record],
            )
            .map_err(self.db())?;
        Ok(())
    }

    /// Forgets source `name`; whether it was registered.
    pub fn forget_source(&mut self, name: &str) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute("DELETE FROM sources WHERE name = ?1", [name])
            .map_err(self.db())?;
        Ok(n == 1)
    }

    /// Stores `doc` in one transaction, replacing an older version of the same id.
    /// Returns the status and the new chunks' keys with their vectors, for the index.
    pub fn upsert(
        &mut self,
        doc: &NewDocument,
    ) -> Result<(UpsertStatus, Vec<KeyedVector>), StoreError> {
        let db = db_error(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let existing: Option<(String, i64)> = tx
            .query_row(
                "SELECT hash, created_at FROM documents WHERE collection = ?1 AND id = ?2",
                [&doc.collection, &doc.id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        if existing.as_ref().is_some_and(|(h, _)| *h == doc.hash) {
            return Ok((UpsertStatus::Unchanged, Vec::new()));
        }
        let t = now();
        let created_at = existing.as_ref().map(|(_, c)| *c).unwrap_or(t);
        // Cannot fail: the keys are strings, a `Value` holds nothing that JSON
        // cannot write (non-finite numbers are not representable in it), and
        // writing into a `String` has no I/O error.
        let metadata = serde_json::to_string(&doc.metadata)
            .expect("a JSON object with string keys always serialises");
        let old_keys = delete_chunks(&tx, &doc.collection, &doc.id).map_err(db)?;
        // Summaries of the old version go with it.
        tx.execute(
            "DELETE FROM summaries WHERE collection = ?1 AND document_id = ?2",
            [&doc.collection, &doc.id],
        )
        .map_err(db)?;
        tx.execute(
            "INSERT INTO documents (collection, id, title, text, metadata, hash, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(collection, id) DO UPDATE SET title = excluded.title, text = excluded.text,
                 metadata = excluded.metadata, hash = excluded.hash, updated_at = excluded.updated_at",
            params![doc.collection, doc.id, doc.title, doc.text, metadata, doc.hash, created_at, t],
        )
        .map_err(db)?;
        let mut new = Vec::with_capacity(doc.chunks.len());
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO chunks (collection, document_id, idx, text, start, end, embed_hash, vector, section, questions)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(db)?;
            for (i, c) in doc.chunks.iter().enumerate() {
                insert
                    .execute(params![
                        doc.collection,
                        doc.id,
                        i as i64,
                        c.text,
                        c.start as i64,
                        c.end as i64,
                        c.embed_hash,
                        vector_to_blob(&c.vector),
                        c.section,
                        c.questions.join("\n")
                    ])
                    .map_err(db)?;
                let key = tx.last_insert_rowid();
                lexical::index_chunk(
                    &tx,
                    &doc.collection,
                    key,
                    doc.title.as_deref(),
                    &c.section,
                    &c.text,
                    &c.questions,
                )
                .map_err(db)?;
                new.push((key as usize, c.vector.clone()));
            }
        }
        schema::bump_generation(&tx, self.generation + 1).map_err(db)?;
        tx.commit().map_err(db)?;
        self.generation += 1;
        self.live.replace_document(
            &doc.collection,
            &doc.id,
            doc.metadata.clone(),
            &old_keys,
            &new.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        );
        let status = if existing.is_some() {
            UpsertStatus::Updated
        } else {
            UpsertStatus::Created
        };
        Ok((status, new))
    }

    /// Deletes document `id` of `collection` and its chunks; returns whether it existed.
    pub fn delete(&mut self, collection: &str, id: &str) -> Result<bool, StoreError> {
        let db = db_error(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let keys = delete_chunks(&tx, collection, id).map_err(db)?;
        let n = tx
            .execute(
                "DELETE FROM documents WHERE collection = ?1 AND id = ?2",
                [collection, id],
            )
            .map_err(db)?;
        if n == 0 {
            return Ok(false);
        }
        schema::bump_generation(&tx, self.generation + 1).map_err(db)?;
        tx.commit().map_err(db)?;
        self.generation += 1;
        self.live.remove_document(collection, id, &keys);
        Ok(true)
    }

    /// Every collection with its document count, by name.
    pub fn collections(&self) -> Result<Vec<CollectionInfo>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT c.name, c.created_at,
                     (SELECT count(*) FROM documents d WHERE d.collection = c.name)
                 FROM collections c ORDER BY c.name",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(CollectionInfo {
                    name: r.get(0)?,
                    created_at: r.get(1)?,
                    documents: r.get::<_, i64>(2)? as usize,
                })
            })
            .map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }

    /// Whether collection `name` exists.
    pub fn has_collection(&self, name: &str) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT count(*) > 0 FROM collections WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .map_err(self.db())
    }

    /// Creates collection `name` with its full-text table, in one
    /// transaction; `false` when it exists.
    pub fn create_collection(&mut self, name: &str) -> Result<bool, StoreError> {
        let db = db_error(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let n = tx
            .execute(
                "INSERT OR IGNORE INTO collections (name, created_at) VALUES (?1, ?2)",
                params![name, now()],
            )
            .map_err(db)?;
        if n == 0 {
            return Ok(false);
        }
        lexical::create_fts(&tx, name).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(true)
    }

    /// Deletes collection `name` (never `default`) and its documents in one
    /// transaction: the number of documents and the chunk keys that went, or
    /// `None` when there was no such collection.
    pub fn delete_collection(
        &mut self,
        name: &str,
    ) -> Result<Option<(usize, Vec<usize>)>, StoreError> {
        if name == DEFAULT_COLLECTION {
            return Ok(None);
        }
        let db = db_error(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let keys: Vec<usize> = {
            let mut stmt = tx
                .prepare("SELECT key FROM chunks WHERE collection = ?1")
                .map_err(db)?;
            let keys = stmt.query_map([name], |r| r.get::<_, i64>(0)).map_err(db)?;
            keys.map(|k| k.map(|k| k as usize))
                .collect::<Result<_, _>>()
                .map_err(db)?
        };
        lexical::drop_fts(&tx, name).map_err(db)?;
        tx.execute("DELETE FROM chunks WHERE collection = ?1", [name])
            .map_err(db)?;
        let documents = tx
            .execute("DELETE FROM documents WHERE collection = ?1", [name])
            .map_err(db)?;
        if tx
            .execute("DELETE FROM collections WHERE name = ?1", [name])
            .map_err(db)?
            == 0
        {
            return Ok(None);
        }
        schema::bump_generation(&tx, self.generation + 1).map_err(db)?;
        tx.commit().map_err(db)?;
        self.generation += 1;
        self.live.remove_collection(name, &keys);
        Ok(Some((documents, keys)))
    }

    /// Chunk `key`'s stored vector, decoded (a blob that is not one is
    /// [`StoreError::Corrupt`]).
    fn chunk_vector(&self, key: usize, blob: &[u8]) -> Result<Vec<f32>, StoreError> {
        blob_to_vector(blob).ok_or_else(|| StoreError::Corrupt {
            path: self.path.clone(),
            message: format!("vector of chunk {key}"),
        })
    }

    /// Every chunk's key and vector, in key order, read from the database
    /// (for building a graph at open: the vectors are not kept in memory
    /// here).
    pub fn vectors(&self) -> Result<Vec<KeyedVector>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT key, vector FROM chunks ORDER BY key")
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as usize, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(self.db())?;
        let mut out = Vec::new();
        for row in rows {
            let (key, blob) = row.map_err(self.db())?;
            let vector = self.chunk_vector(key, &blob)?;
            out.push((key, vector));
        }
        Ok(out)
    }

    /// The live chunks with these keys (missing ones are left out), in the given order.
    pub fn chunks(&self, keys: &[usize]) -> Result<Vec<StoredChunk>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT c.document_id, c.idx, d.title, c.text, c.start, c.end, c.section, c.collection, c.vector
                 FROM chunks c JOIN documents d ON d.collection = c.collection AND d.id = c.document_id
                 WHERE c.key = ?1",
            )
            .map_err(self.db())?;
        let mut out = Vec::with_capacity(keys.len());
        for &key in keys {
            let row = stmt
                .query_row([key as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, Vec<u8>>(8)?,
                    ))
                })
                .optional()
                .map_err(self.db())?;
            if let Some((document_id, idx, title, text, start, end, section, collection, blob)) =
                row
            {
                let vector = self.chunk_vector(key, &blob)?;
                let (start, end) = (start as usize, end as usize);
                out.push(StoredChunk {
                    key,
                    collection,
                    document_id,
                    index: idx as usize,
                    title,
                    section,
                    text,
                    start,
                    end,
                    vector,
                });
            }
        }
        Ok(out)
    }

    /// A row of [`Self::INFO_COLUMNS`], with the metadata still as stored (JSON
    /// text): a row mapper can only return SQLite's errors, and a value that
    /// does not decode is [`StoreError::Corrupt`] (see [`Self::decode_info`]).
    fn info_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(DocumentInfo, String)> {
        let info = DocumentInfo {
            collection: r.get(8)?,
            id: r.get(0)?,
            title: r.get(1)?,
            metadata: Map::new(),
            hash: r.get(3)?,
            created_at: r.get(4)?,
            updated_at: r.get(5)?,
            text_bytes: r.get::<_, i64>(6)? as usize,
            chunks: r.get::<_, i64>(7)? as usize,
        };
        Ok((info, r.get(2)?))
    }

    /// A document's record with the metadata that [`Self::info_from_row`] left
    /// as stored decoded.
    fn decode_info(
        &self,
        (info, metadata): (DocumentInfo, String),
    ) -> Result<DocumentInfo, StoreError> {
        let metadata = decode_metadata(&self.path, &info.id, &metadata)?;
        Ok(DocumentInfo { metadata, ..info })
    }

    const INFO_COLUMNS: &'static str = "d.id, d.title, d.metadata, d.hash, d.created_at, d.updated_at, length(CAST(d.text AS BLOB)),
         (SELECT count(*) FROM chunks c WHERE c.collection = d.collection AND c.document_id = d.id),
         d.collection";

    /// The record of document `id` of `collection`.
    pub fn document(&self, collection: &str, id: &str) -> Result<Option<DocumentInfo>, StoreError> {
        let sql = format!(
            "SELECT {} FROM documents d WHERE d.collection = ?1 AND d.id = ?2",
            Self::INFO_COLUMNS
        );
        self.conn
            .query_row(&sql, [collection, id], Self::info_from_row)
            .optional()
            .map_err(self.db())?
            .map(|row| self.decode_info(row))
            .transpose()
    }

    /// Up to `limit` documents of `collection` with ids after `after`, in id order.
    pub fn list(
        &self,
        collection: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DocumentInfo>, StoreError> {
        let sql = format!(
            "SELECT {} FROM documents d WHERE d.collection = ?1 AND d.id > ?2 ORDER BY d.id LIMIT ?3",
            Self::INFO_COLUMNS
        );
        let mut stmt = self.conn.prepare(&sql).map_err(self.db())?;
        let rows = stmt
            .query_map(
                params![collection, after.unwrap_or(""), limit as i64],
                Self::info_from_row,
            )
            .map_err(self.db())?;
        rows.map(|row| self.decode_info(row.map_err(self.db())?))
            .collect()
    }

    /// Number of documents.
    pub fn document_count(&self) -> Result<usize, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM documents", [], |r| r.get::<_, i64>(0))
            .map(|n| n as usize)
            .map_err(self.db())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A document `id` with one chunk a text; chunks after the first have a section.
    pub(crate) fn doc(id: &str, texts: &[&str]) -> NewDocument {
        NewDocument {
            collection: DEFAULT_COLLECTION.into(),
            id: id.into(),
            title: Some(format!("T {id}")),
            text: texts.join(" "),
            metadata: Map::new(),
            hash: format!("h-{}", texts.join("|")),
            chunks: texts
                .iter()
                .enumerate()
                .map(|(i, t)| NewChunk {
                    text: t.to_string(),
                    section: if i == 0 {
                        String::new()
                    } else {
                        format!("Part {i}")
                    },
                    start: i,
                    end: i + 1,
                    embed_hash: format!("e-{t}"),
                    vector: vec![i as f32, 1.0],
                    questions: Vec::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn upsert_statuses_keys_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), "m", 2).unwrap();
            let (st, new) = s.upsert(&doc("a", &["x", "y"])).unwrap();
            assert_eq!(
                (st, new.iter().map(|n| n.0).collect::<Vec<_>>()),
                (UpsertStatus::Created, vec![1, 2])
            );
            assert_eq!(
                s.upsert(&doc("a", &["x", "y"])).unwrap().0,
                UpsertStatus::Unchanged
            );
            let (st, new) = s.upsert(&doc("a", &["x", "z"])).unwrap();
            assert_eq!(st, UpsertStatus::Updated);
            assert_eq!(
                new.iter().map(|n| n.0).collect::<Vec<_>>(),
                vec![3, 4],
                "keys are never reused"
            );
            assert!(!s.is_live(1) && !s.is_live(2) && s.is_live(3));
            assert_eq!(s.vectors_by_embed_hash("default", "a").unwrap().len(), 2);
            s.upsert(&doc("b", &["w"])).unwrap();
        }
        let s = Store::open(dir.path(), "m", 2).unwrap();
        assert_eq!(s.document_count().unwrap(), 2);
        assert_eq!(
            s.live().map(|(k, _, _)| k).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(s.live_count(), 3);
        assert_eq!(s.document_of(5), Some(("default", "b")));
        assert_eq!(s.generation(), 3, "three committed changes");
        let chunks = s.chunks(&[4, 1, 5]).unwrap();
        assert_eq!(chunks.len(), 2, "dead key 1 is left out");
        assert_eq!(chunks[0].text, "z");
        assert_eq!(chunks[0].chunk_id(), "a#1");
        let info = s.document("default", "a").unwrap().unwrap();
        assert_eq!((info.chunks, info.title.as_deref()), (2, Some("T a")));
    }

    #[test]
    fn delete_removes_everything_and_keys_stay_dead_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        s.upsert(&doc("a", &["x"])).unwrap();
        s.upsert(&doc("b", &["y"])).unwrap();
        assert!(s.delete("default", "a").unwrap());
        assert!(!s.delete("default", "a").unwrap());
        assert!(!s.is_live(1));
        drop(s);
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        assert!(!s.is_live(1) && s.is_live(2));
        assert!(s.document("default", "a").unwrap().is_none());
        // A new document after the delete does not take the deleted key.
        let (_, new) = s.upsert(&doc("c", &["q"])).unwrap();
        assert_eq!(new[0].0, 3);
    }

    #[test]
    fn list_pages_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        for id in ["c", "a", "d", "b"] {
            s.upsert(&doc(id, &["t"])).unwrap();
        }
        let page = s.list("default", None, 3).unwrap();
        assert_eq!(
            page.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            vec!["a", "b", "c"]
        );
        let page = s.list("default", Some("c"), 3).unwrap();
        assert_eq!(
            page.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            vec!["d"]
        );
    }

    #[test]
    fn metadata_round_trips_and_damaged_metadata_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        let mut a = doc("a", &["x"]);
        a.metadata.insert("lang".into(), "en".into());
        s.upsert(&a).unwrap();
        s.upsert(&doc("b", &["y"])).unwrap();
        assert_eq!(
            s.document("default", "a").unwrap().unwrap().metadata,
            a.metadata
        );
        assert_eq!(s.metadata_of("default", "a"), Some(&a.metadata));
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute(
                "UPDATE documents SET metadata = '{\"lang\": ' WHERE id = 'a'",
                [],
            )
            .unwrap();
        }
        fn corrupt<T>(r: Result<T, StoreError>) -> bool {
            matches!(r, Err(StoreError::Corrupt { message, .. }) if message.contains("\"a\""))
        }
        assert!(corrupt(s.document("default", "a")));
        assert!(corrupt(s.list("default", None, 10)));
        assert!(
            s.document("default", "b").unwrap().is_some(),
            "other documents still read"
        );
        drop(s);
        assert!(corrupt(Store::open(dir.path(), "m", 2)));
    }

    #[test]
    fn collections_keep_their_documents_apart() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        assert!(s.create_collection("team-a").unwrap());
        assert!(!s.create_collection("team-a").unwrap(), "exists already");
        s.upsert(&doc("x", &["p"])).unwrap();
        let mut a = doc("x", &["q", "r"]);
        a.collection = "team-a".into();
        assert_eq!(
            s.upsert(&a).unwrap().0,
            UpsertStatus::Created,
            "same id, other collection"
        );
        assert_eq!(s.document("default", "x").unwrap().unwrap().chunks, 1);
        assert_eq!(s.document("team-a", "x").unwrap().unwrap().chunks, 2);
        assert_eq!(s.list("team-a", None, 10).unwrap().len(), 1);
        assert_eq!(s.document_of(2), Some(("team-a", "x")));
        assert_eq!(s.chunks(&[3]).unwrap()[0].collection, "team-a");
        let names: Vec<(String, usize)> = s
            .collections()
            .unwrap()
            .into_iter()
            .map(|c| (c.name, c.documents))
            .collect();
        assert_eq!(names, vec![("default".into(), 1), ("team-a".into(), 1)]);
        // A document of a collection that does not exist is refused.
        let mut b = doc("y", &["s"]);
        b.collection = "nowhere".into();
        assert!(s.upsert(&b).is_err());
        assert!(
            s.delete_collection("default").unwrap().is_none(),
            "default stays"
        );
        assert_eq!(
            s.delete_collection("team-a").unwrap(),
            Some((1, vec![2, 3]))
        );
        assert!(s.delete_collection("team-a").unwrap().is_none());
        assert!(!s.is_live(2) && s.is_live(1));
        drop(s);
        let s = Store::open(dir.path(), "m", 2).unwrap();
        assert!(!s.has_collection("team-a").unwrap() && s.has_collection("default").unwrap());
        assert_eq!(s.document_count().unwrap(), 1);
        assert_eq!(s.live_count(), 1);
    }

    /// A schema 3 database (documents keyed by id alone) opens with every
    /// document in `default`, chunk keys and the key counter kept.
    #[test]
    fn a_schema_3_database_is_migrated_to_collections() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 INSERT INTO meta VALUES ('embedder', 'm (2 dims)'), ('schema', '3'), ('generation', '7');
                 CREATE TABLE documents (id TEXT PRIMARY KEY, title TEXT, text TEXT NOT NULL,
                     metadata TEXT NOT NULL, hash TEXT NOT NULL, created_at INTEGER NOT NULL,
                     updated_at INTEGER NOT NULL);
                 CREATE TABLE chunks (key INTEGER PRIMARY KEY AUTOINCREMENT,
                     document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
                     idx INTEGER NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL,
                     end INTEGER NOT NULL, embed_hash TEXT NOT NULL, vector BLOB NOT NULL,
                     section TEXT NOT NULL DEFAULT '', questions TEXT NOT NULL DEFAULT '');
                 CREATE INDEX chunks_by_document ON chunks(document_id, idx);
                 CREATE VIRTUAL TABLE chunks_fts USING fts5(body, tokenize = 'porter unicode61 remove_diacritics 2');
                 INSERT INTO documents VALUES ('a', 'T a', 'hello', '{\"lang\":\"en\"}', 'h', 1, 2);",
            )
            .unwrap();
            let blob = vector_to_blob(&[0.5, 1.0]);
            for key in [4, 9] {
                conn.execute(
                    "INSERT INTO chunks (key, document_id, idx, text, start, end, embed_hash, vector)
                     VALUES (?1, 'a', ?1, 'hello', 0, 5, 'e', ?2)",
                    params![key, blob],
                )
                .unwrap();
            }
            // Key 12 was used and deleted: the counter is past it.
            conn.execute(
                "UPDATE sqlite_sequence SET seq = 12 WHERE name = 'chunks'",
                [],
            )
            .unwrap();
        }
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        let info = s.document("default", "a").unwrap().unwrap();
        assert_eq!((info.chunks, info.collection.as_str()), (2, "default"));
        assert_eq!(info.metadata["lang"], "en");
        assert_eq!(s.document_of(9), Some(("default", "a")));
        assert_eq!(s.generation(), 7);
        let (_, new) = s.upsert(&doc("b", &["w"])).unwrap();
        assert_eq!(new[0].0, 13, "keys are never reused across the migration");
        assert!(s.create_collection("c").unwrap());
        // The full-text index was empty: filled on open, in default's table.
        let hits: Vec<usize> = s
            .lexical_search("default", "hello", 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(hits.len(), 2);
        assert!(hits.contains(&4) && hits.contains(&9), "{hits:?}");
        drop(s);
        let s = Store::open(dir.path(), "m", 2).unwrap();
        assert_eq!(s.document_count().unwrap(), 2);
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let (schema, shared): (String, i64) = conn
            .query_row(
                "SELECT (SELECT value FROM meta WHERE key = 'schema'),
                        (SELECT count(*) FROM sqlite_master WHERE name = 'chunks_fts')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((schema.as_str(), shared), ("5", 0));
    }

    #[test]
    fn sources_are_kept_replaced_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), "m", 2).unwrap();
            assert!(s.sources().unwrap().is_empty());
            s.keep_source("b", "{\"x\":1}").unwrap();
            s.keep_source("a", "{}").unwrap();
            s.keep_source("b", "{\"x\":2}").unwrap();
        }
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        assert_eq!(
            s.sources().unwrap(),
            vec![("a".into(), "{}".into()), ("b".into(), "{\"x\":2}".into())]
        );
        assert!(s.forget_source("a").unwrap());
        assert!(!s.forget_source("a").unwrap());
        assert_eq!(s.sources().unwrap().len(), 1);
    }

    /// A summary is kept only for the document's current version, and goes
    /// with a change, a delete or its collection.
    #[test]
    fn summaries_are_kept_for_the_current_version_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        let a = doc("a", &["alpha"]);
        s.upsert(&a).unwrap();
        assert!(!s.keep_summary("default", "a", "stale", "k", "old").unwrap());
        assert!(s.keep_summary("default", "a", &a.hash, "k", "one").unwrap());
        assert!(
            s.keep_summary("default", "a", &a.hash, "k", "two").unwrap(),
            "replaced"
        );
        assert_eq!(
            s.cached_summary("default", "a", "k").unwrap().as_deref(),
            Some("two")
        );
        assert_eq!(s.cached_summary("default", "a", "other").unwrap(), None);
        drop(s);
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        assert_eq!(
            s.cached_summary("default", "a", "k").unwrap().as_deref(),
            Some("two")
        );
        // Unchanged content keeps it; a change drops it.
        s.upsert(&a).unwrap();
        assert!(s.cached_summary("default", "a", "k").unwrap().is_some());
        let a2 = doc("a", &["alpha", "beta"]);
        s.upsert(&a2).unwrap();
        assert_eq!(s.cached_summary("default", "a", "k").unwrap(), None);
        // A delete, and a collection's delete, take it too.
        s.keep_summary("default", "a", &a2.hash, "k", "x").unwrap();
        s.delete("default", "a").unwrap();
        assert_eq!(s.cached_summary("default", "a", "k").unwrap(), None);
        s.create_collection("t").unwrap();
        let mut t = doc("b", &["gamma"]);
        t.collection = "t".into();
        s.upsert(&t).unwrap();
        assert!(s.keep_summary("t", "b", &t.hash, "k", "y").unwrap());
        s.delete_collection("t").unwrap();
        assert_eq!(s.cached_summary("t", "b", "k").unwrap(), None);
        let chunks = s.document_chunks("t", "b").unwrap();
        assert!(chunks.is_empty());
    }

    #[test]
    fn a_documents_chunks_come_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        s.upsert(&doc("a", &["one", "two", "three"])).unwrap();
        s.upsert(&doc("b", &["other"])).unwrap();
        let texts: Vec<String> = s
            .document_chunks("default", "a")
            .unwrap()
            .into_iter()
            .map(|c| c.text)
            .collect();
        assert_eq!(texts, ["one", "two", "three"]);
        assert!(s.document_chunks("default", "missing").unwrap().is_empty());
    }

    /// A schema 4 database (one full-text table for every collection) opens
    /// with a table per collection, each filled from its own chunks.
    #[test]
    fn a_schema_4_database_gets_a_full_text_table_per_collection() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), "m", 2).unwrap();
            s.upsert(&doc("a", &["shared lighthouse", "default only"]))
                .unwrap();
            s.create_collection("t").unwrap();
            let mut t = doc("a", &["lighthouse keeper"]);
            t.collection = "t".into();
            s.upsert(&t).unwrap();
        }
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(&format!(
                "DROP TABLE {}; DROP TABLE {};
                 CREATE VIRTUAL TABLE chunks_fts USING fts5(body, tokenize = 'porter unicode61 remove_diacritics 2');
                 INSERT INTO chunks_fts (rowid, body) SELECT key, text FROM chunks;
                 UPDATE meta SET value = '4' WHERE key = 'schema';",
                lexical::fts_table("default"),
                lexical::fts_table("t"),
            ))
            .unwrap();
        }
        let s = Store::open(dir.path(), "m", 2).unwrap();
        let texts = |c: &str| -> Vec<String> {
            let keys: Vec<usize> = s
                .lexical_search(c, "lighthouse", 10)
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            s.chunks(&keys)
                .unwrap()
                .into_iter()
                .map(|c| c.text)
                .collect()
        };
        assert_eq!(texts("default"), vec!["shared lighthouse"]);
        assert_eq!(texts("t"), vec!["lighthouse keeper"]);
    }
}
