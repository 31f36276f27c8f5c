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

#![deny(missing_docs)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use serde_json::{Map, Value};

/// The database file in the data directory.
pub const DB_FILE: &str = "ragd.sqlite3";
/// 2: chunks.section (the heading path of a chunk) and Porter stemming in the
/// full-text index. Version 1 databases are migrated on open.
const SCHEMA_VERSION: i64 = 2;

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

/// A stored chunk's key (its HNSW id) and vector.
pub type KeyedVector = (usize, Vec<f32>);

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
}

/// A document to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDocument {
    /// The id.
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

/// A live chunk, as retrieval sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkView {
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

impl ChunkView {
    /// Public chunk id: `{document_id}#{index}`.
    pub fn chunk_id(&self) -> String {
        format!("{}#{}", self.document_id, self.index)
    }
}

/// A document's record, without its text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocumentInfo {
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

/// What retrieval needs of a live chunk, kept in memory: filters and exact
/// search must not wait on the disk.
#[derive(Debug, Clone)]
struct LiveChunk {
    document: Arc<str>,
    vector: Arc<[f32]>,
}

/// The SQLite store plus an in-memory view of the live chunks.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// `live[key]`: the chunk with that key, if it exists.
    live: Vec<Option<LiveChunk>>,
    live_count: usize,
    /// Every document's metadata, for filters.
    metadata: HashMap<Arc<str>, Map<String, Value>>,
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

/// Whether `c` is written without spaces between words (Chinese, Japanese,
/// Korean), so that FTS5's unicode61 tokenizer would see a whole run as one token.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0xAC00..=0xD7AF | 0x20000..=0x2FFFF)
}

/// Text as the full-text index sees it: CJK runs become overlapping character
/// bigrams (the usual segmentation-free indexing for Chinese), the rest is kept
/// for FTS5's unicode61 tokenizer.
pub fn lexical_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    let mut run: Vec<char> = Vec::new();
    let flush = |run: &mut Vec<char>, out: &mut String| {
        if run.is_empty() {
            return;
        }
        out.push(' ');
        if run.len() == 1 {
            out.push(run[0]);
        } else {
            for pair in run.windows(2) {
                out.push(pair[0]);
                out.push(pair[1]);
                out.push(' ');
            }
        }
        out.push(' ');
        run.clear();
    };
    for c in text.chars() {
        if is_cjk(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// What the full-text index holds for a chunk: its title, section and text.
fn lexical_body(title: Option<&str>, section: &str, text: &str) -> String {
    let mut body = String::with_capacity(text.len() + section.len() + 64);
    for part in [title.unwrap_or(""), section] {
        if !part.is_empty() {
            body.push_str(part);
            body.push('\n');
        }
    }
    body.push_str(text);
    lexical_text(&body)
}

/// English function words left out of lexical queries (Lucene's English stop
/// set plus question words and auxiliaries). In an OR query every term matches
/// somewhere, and these add matches without meaning; BM25's IDF only dampens them.
pub const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "can", "do", "does", "for", "how", "i",
    "if", "in", "into", "is", "it", "me", "my", "no", "not", "of", "on", "or", "such", "that",
    "the", "their", "then", "there", "these", "they", "this", "to", "was", "what", "when", "where",
    "which", "who", "why", "will", "with", "you",
];

/// An FTS5 query matching any term of `query` (BM25 ranks by how many and how
/// rare; the index stems English words, so "packages" finds "package"); `None`
/// when the query has no terms. Stop words are dropped unless nothing else is left.
fn match_expression(query: &str) -> Option<String> {
    let mut all: Vec<String> = lexical_text(query)
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_lowercase)
        .collect();
    all.sort();
    all.dedup();
    let content: Vec<&String> = all
        .iter()
        .filter(|t| !STOP_WORDS.contains(&t.as_str()))
        .collect();
    let terms: Vec<&String> = if content.is_empty() {
        all.iter().collect()
    } else {
        content
    };
    (!terms.is_empty()).then(|| {
        terms
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(" OR ")
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

impl Store {
    /// Opens (creating if needed) the database in `dir` for vectors of model
    /// `embedder` with `dim` dimensions.
    pub fn open(dir: &Path, embedder: &str, dim: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS documents (
                 id TEXT PRIMARY KEY,
                 title TEXT,
                 text TEXT NOT NULL,
                 metadata TEXT NOT NULL,
                 hash TEXT NOT NULL,
                 created_at INTEGER NOT NULL,
                 updated_at INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS chunks (
                 key INTEGER PRIMARY KEY AUTOINCREMENT,
                 document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
                 idx INTEGER NOT NULL,
                 text TEXT NOT NULL,
                 start INTEGER NOT NULL,
                 end INTEGER NOT NULL,
                 embed_hash TEXT NOT NULL,
                 vector BLOB NOT NULL,
                 section TEXT NOT NULL DEFAULT '');
             CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id, idx);
             CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(body, tokenize = 'porter unicode61 remove_diacritics 2');",
        )
        .map_err(db)?;
        let meta = |key: &str| -> Result<Option<String>, StoreError> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(db)
        };
        let expected = format!("{embedder} ({dim} dims)");
        match meta("embedder")? {
            Some(found) if found != expected => {
                return Err(StoreError::ModelMismatch {
                    path,
                    found,
                    expected,
                });
            }
            Some(_) => {}
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('embedder', ?1), ('schema', ?2)",
                    params![expected, SCHEMA_VERSION.to_string()],
                )
                .map_err(db)?;
            }
        }
        match meta("schema")?.as_deref() {
            Some("1") => {
                conn.execute_batch(
                    "BEGIN;
                     ALTER TABLE chunks ADD COLUMN section TEXT NOT NULL DEFAULT '';
                     DROP TABLE chunks_fts;
                     CREATE VIRTUAL TABLE chunks_fts USING fts5(body, tokenize = 'porter unicode61 remove_diacritics 2');
                     UPDATE meta SET value = '2' WHERE key = 'schema';
                     COMMIT;",
                )
                .map_err(db)?;
                tracing::info!(path = %path.display(), "database migrated to schema 2 (chunk sections)");
            }
            Some(v) if v != SCHEMA_VERSION.to_string() => {
                return Err(StoreError::Corrupt {
                    path,
                    message: format!("unknown schema version {v}"),
                });
            }
            _ => {}
        }
        let generation = meta("generation")?
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        let mut store = Store {
            conn,
            path,
            live: Vec::new(),
            live_count: 0,
            metadata: HashMap::new(),
            generation,
        };
        store.load_live()?;
        store.backfill_lexical()?;
        Ok(store)
    }

    /// Fills the full-text index from the chunks when it is empty (a database
    /// written before it existed).
    fn backfill_lexical(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let indexed: i64 = self
            .conn
            .query_row("SELECT count(*) FROM chunks_fts", [], |r| r.get(0))
            .map_err(db)?;
        if indexed > 0 || self.live_count == 0 {
            return Ok(());
        }
        let tx = self.conn.transaction().map_err(db)?;
        {
            let mut select = tx
                .prepare(
                    "SELECT c.key, d.title, c.section, c.text FROM chunks c JOIN documents d ON d.id = c.document_id",
                )
                .map_err(db)?;
            let rows: Vec<(i64, Option<String>, String, String)> = select
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(db)?
                .collect::<Result<_, _>>()
                .map_err(db)?;
            let mut insert = tx
                .prepare("INSERT INTO chunks_fts (rowid, body) VALUES (?1, ?2)")
                .map_err(db)?;
            for (key, title, section, text) in rows {
                insert
                    .execute(params![
                        key,
                        lexical_body(title.as_deref(), &section, &text)
                    ])
                    .map_err(db)?;
            }
        }
        tx.commit().map_err(db)
    }

    /// BM25 search (SQLite FTS5) over titles and chunk texts: up to `limit`
    /// chunk keys with their scores, best first (higher is better).
    pub fn lexical_search(
        &self,
        query: &str,
        limit: usize,
    ) -> Result<Vec<(usize, f32)>, StoreError> {
        let Some(expr) = match_expression(query) else {
            return Ok(Vec::new());
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ?1
                 ORDER BY bm25(chunks_fts) LIMIT ?2",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map(params![expr, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)? as usize, r.get::<_, f64>(1)? as f32))
            })
            .map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }

    fn load_live(&mut self) -> Result<(), StoreError> {
        let docs: Vec<(String, String)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT id, metadata FROM documents")
                .map_err(self.db())?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(self.db())?;
            rows.collect::<Result<_, _>>().map_err(self.db())?
        };
        for (id, metadata) in docs {
            self.metadata.insert(
                Arc::from(id.as_str()),
                serde_json::from_str(&metadata).unwrap_or_default(),
            );
        }
        let chunks: Vec<(usize, String, Vec<u8>)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT key, document_id, vector FROM chunks ORDER BY key")
                .map_err(self.db())?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, i64>(0)? as usize, r.get(1)?, r.get(2)?))
                })
                .map_err(self.db())?;
            rows.collect::<Result<_, _>>().map_err(self.db())?
        };
        for (key, document, blob) in chunks {
            let vector = blob_to_vector(&blob).ok_or_else(|| StoreError::Corrupt {
                path: self.path.clone(),
                message: format!("vector of chunk {key}"),
            })?;
            let document = self
                .metadata
                .get_key_value(document.as_str())
                .map(|(k, _)| Arc::clone(k))
                .unwrap_or_else(|| Arc::from(document.as_str()));
            self.set_live(
                key,
                Some(LiveChunk {
                    document,
                    vector: vector.into(),
                }),
            );
        }
        Ok(())
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn set_live(&mut self, key: usize, chunk: Option<LiveChunk>) {
        if self.live.len() <= key {
            self.live.resize(key + 1, None);
        }
        match (&self.live[key], &chunk) {
            (None, Some(_)) => self.live_count += 1,
            (Some(_), None) => self.live_count -= 1,
            _ => {}
        }
        self.live[key] = chunk;
    }

    /// Every live chunk: key, document id and vector, in key order.
    pub fn live(&self) -> impl Iterator<Item = (usize, &str, &[f32])> + '_ {
        self.live
            .iter()
            .enumerate()
            .filter_map(|(k, c)| c.as_ref().map(|c| (k, &*c.document, &*c.vector)))
    }

    /// Number of live chunks.
    pub fn live_count(&self) -> usize {
        self.live_count
    }

    /// The document that chunk `key` belongs to, if the chunk is live.
    pub fn document_of(&self, key: usize) -> Option<&str> {
        self.live
            .get(key)
            .and_then(Option::as_ref)
            .map(|c| &*c.document)
    }

    /// The vector of chunk `key`, if the chunk is live.
    pub fn vector_of(&self, key: usize) -> Option<&[f32]> {
        self.live
            .get(key)
            .and_then(Option::as_ref)
            .map(|c| &*c.vector)
    }

    /// The metadata of document `id`.
    pub fn metadata_of(&self, id: &str) -> Option<&Map<String, Value>> {
        self.metadata.get(id)
    }

    /// The store generation: changes with every committed write.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn bump_generation(tx: &rusqlite::Transaction<'_>, generation: u64) -> rusqlite::Result<()> {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('generation', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [generation.to_string()],
        )
        .map(|_| ())
    }

    /// The content hash of document `id`, if stored.
    pub fn hash_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT hash FROM documents WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.db())
    }

    /// The vectors of document `id`'s current chunks by what was embedded, so an
    /// update re-embeds only chunks that changed.
    pub fn vectors_by_embed_hash(&self, id: &str) -> Result<HashMap<String, Vec<f32>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT embed_hash, vector FROM chunks WHERE document_id = ?1")
            .map_err(self.db())?;
        let rows = stmt
            .query_map([id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(self.db())?;
        let mut out = HashMap::new();
        for row in rows {
            let (h, blob) = row.map_err(self.db())?;
            if let Some(v) = blob_to_vector(&blob) {
                out.insert(h, v);
            }
        }
        Ok(out)
    }

    /// Stores `doc` in one transaction, replacing an older version of the same id.
    /// Returns the status and the new chunks' keys with their vectors, for the index.
    pub fn upsert(
        &mut self,
        doc: &NewDocument,
    ) -> Result<(UpsertStatus, Vec<KeyedVector>), StoreError> {
        let path = self.path.clone();
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let existing: Option<(String, i64)> = tx
            .query_row(
                "SELECT hash, created_at FROM documents WHERE id = ?1",
                [&doc.id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        if existing.as_ref().is_some_and(|(h, _)| *h == doc.hash) {
            return Ok((UpsertStatus::Unchanged, Vec::new()));
        }
        let old_keys: Vec<usize> = {
            let mut stmt = tx
                .prepare("SELECT key FROM chunks WHERE document_id = ?1")
                .map_err(db)?;
            let keys = stmt
                .query_map([&doc.id], |r| r.get::<_, i64>(0))
                .map_err(db)?;
            keys.map(|k| k.map(|k| k as usize))
                .collect::<Result<_, _>>()
                .map_err(db)?
        };
        let t = now();
        let created_at = existing.as_ref().map(|(_, c)| *c).unwrap_or(t);
        let metadata = serde_json::to_string(&doc.metadata).unwrap_or_else(|_| "{}".into());
        for k in &old_keys {
            tx.execute("DELETE FROM chunks_fts WHERE rowid = ?1", [*k as i64])
                .map_err(db)?;
        }
        tx.execute("DELETE FROM chunks WHERE document_id = ?1", [&doc.id])
            .map_err(db)?;
        tx.execute(
            "INSERT INTO documents (id, title, text, metadata, hash, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(id) DO UPDATE SET title = excluded.title, text = excluded.text,
                 metadata = excluded.metadata, hash = excluded.hash, updated_at = excluded.updated_at",
            params![doc.id, doc.title, doc.text, metadata, doc.hash, created_at, t],
        )
        .map_err(db)?;
        let mut new = Vec::with_capacity(doc.chunks.len());
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO chunks (document_id, idx, text, start, end, embed_hash, vector, section)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(db)?;
            for (i, c) in doc.chunks.iter().enumerate() {
                insert
                    .execute(params![
                        doc.id,
                        i as i64,
                        c.text,
                        c.start as i64,
                        c.end as i64,
                        c.embed_hash,
                        vector_to_blob(&c.vector),
                        c.section
                    ])
                    .map_err(db)?;
                let key = tx.last_insert_rowid();
                tx.execute(
                    "INSERT INTO chunks_fts (rowid, body) VALUES (?1, ?2)",
                    params![key, lexical_body(doc.title.as_deref(), &c.section, &c.text)],
                )
                .map_err(db)?;
                new.push((key as usize, c.vector.clone()));
            }
        }
        Self::bump_generation(&tx, self.generation + 1).map_err(db)?;
        tx.commit().map_err(db)?;
        self.generation += 1;
        for k in old_keys {
            self.set_live(k, None);
        }
        let document: Arc<str> = Arc::from(doc.id.as_str());
        self.metadata
            .insert(Arc::clone(&document), doc.metadata.clone());
        for (k, v) in &new {
            self.set_live(
                *k,
                Some(LiveChunk {
                    document: Arc::clone(&document),
                    vector: v.as_slice().into(),
                }),
            );
        }
        let status = if existing.is_some() {
            UpsertStatus::Updated
        } else {
            UpsertStatus::Created
        };
        Ok((status, new))
    }

    /// Deletes document `id` and its chunks; returns whether it existed.
    pub fn delete(&mut self, id: &str) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let keys: Vec<usize> = {
            let mut stmt = tx
                .prepare("SELECT key FROM chunks WHERE document_id = ?1")
                .map_err(db)?;
            let keys = stmt.query_map([id], |r| r.get::<_, i64>(0)).map_err(db)?;
            keys.map(|k| k.map(|k| k as usize))
                .collect::<Result<_, _>>()
                .map_err(db)?
        };
        for k in &keys {
            tx.execute("DELETE FROM chunks_fts WHERE rowid = ?1", [*k as i64])
                .map_err(db)?;
        }
        tx.execute("DELETE FROM chunks WHERE document_id = ?1", [id])
            .map_err(db)?;
        let n = tx
            .execute("DELETE FROM documents WHERE id = ?1", [id])
            .map_err(db)?;
        if n == 0 {
            return Ok(false);
        }
        Self::bump_generation(&tx, self.generation + 1).map_err(db)?;
        tx.commit().map_err(db)?;
        self.generation += 1;
        for k in keys {
            self.set_live(k, None);
        }
        self.metadata.remove(id);
        Ok(true)
    }

    /// Whether chunk `key` exists.
    pub fn is_live(&self, key: usize) -> bool {
        self.live.get(key).is_some_and(Option::is_some)
    }

    /// The live chunks with these keys (missing ones are left out), in the given order.
    pub fn chunks(&self, keys: &[usize]) -> Result<Vec<(usize, ChunkView)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT c.document_id, c.idx, d.title, c.text, c.start, c.end, c.section
                 FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.key = ?1",
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
                    ))
                })
                .optional()
                .map_err(self.db())?;
            if let Some((document_id, idx, title, text, start, end, section)) = row {
                // The live vectors are in memory; no need to read the blob again.
                let vector = self.vector_of(key).map(<[f32]>::to_vec).unwrap_or_default();
                let (start, end) = (start as usize, end as usize);
                out.push((
                    key,
                    ChunkView {
                        document_id,
                        index: idx as usize,
                        title,
                        section,
                        text,
                        start,
                        end,
                        vector,
                    },
                ));
            }
        }
        Ok(out)
    }

    fn info_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DocumentInfo> {
        let metadata: String = r.get(2)?;
        Ok(DocumentInfo {
            id: r.get(0)?,
            title: r.get(1)?,
            metadata: serde_json::from_str(&metadata).unwrap_or_default(),
            hash: r.get(3)?,
            created_at: r.get(4)?,
            updated_at: r.get(5)?,
            text_bytes: r.get::<_, i64>(6)? as usize,
            chunks: r.get::<_, i64>(7)? as usize,
        })
    }

    const INFO_COLUMNS: &'static str = "d.id, d.title, d.metadata, d.hash, d.created_at, d.updated_at, length(CAST(d.text AS BLOB)),
         (SELECT count(*) FROM chunks c WHERE c.document_id = d.id)";

    /// Document `id`'s record.
    pub fn document(&self, id: &str) -> Result<Option<DocumentInfo>, StoreError> {
        let sql = format!(
            "SELECT {} FROM documents d WHERE d.id = ?1",
            Self::INFO_COLUMNS
        );
        self.conn
            .query_row(&sql, [id], Self::info_from_row)
            .optional()
            .map_err(self.db())
    }

    /// Up to `limit` documents with ids after `after`, in id order.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<DocumentInfo>, StoreError> {
        let sql = format!(
            "SELECT {} FROM documents d WHERE d.id > ?1 ORDER BY d.id LIMIT ?2",
            Self::INFO_COLUMNS
        );
        let mut stmt = self.conn.prepare(&sql).map_err(self.db())?;
        let rows = stmt
            .query_map(
                params![after.unwrap_or(""), limit as i64],
                Self::info_from_row,
            )
            .map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
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

    fn doc(id: &str, texts: &[&str]) -> NewDocument {
        NewDocument {
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
            assert_eq!(s.vectors_by_embed_hash("a").unwrap().len(), 2);
            s.upsert(&doc("b", &["w"])).unwrap();
        }
        let s = Store::open(dir.path(), "m", 2).unwrap();
        assert_eq!(s.document_count().unwrap(), 2);
        assert_eq!(
            s.live().map(|(k, _, _)| k).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(s.live_count(), 3);
        assert_eq!(s.document_of(5), Some("b"));
        assert_eq!(s.generation(), 3, "three committed changes");
        let chunks = s.chunks(&[4, 1, 5]).unwrap();
        assert_eq!(chunks.len(), 2, "dead key 1 is left out");
        assert_eq!(chunks[0].1.text, "z");
        assert_eq!(chunks[0].1.chunk_id(), "a#1");
        let info = s.document("a").unwrap().unwrap();
        assert_eq!((info.chunks, info.title.as_deref()), (2, Some("T a")));
    }

    #[test]
    fn delete_removes_everything_and_keys_stay_dead_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        s.upsert(&doc("a", &["x"])).unwrap();
        s.upsert(&doc("b", &["y"])).unwrap();
        assert!(s.delete("a").unwrap());
        assert!(!s.delete("a").unwrap());
        assert!(!s.is_live(1));
        drop(s);
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        assert!(!s.is_live(1) && s.is_live(2));
        assert!(s.document("a").unwrap().is_none());
        // A new document after the delete does not take the deleted key.
        let (_, new) = s.upsert(&doc("c", &["q"])).unwrap();
        assert_eq!(new[0].0, 3);
    }

    #[test]
    fn lexical_search_ranks_by_bm25_and_forgets_deleted_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        s.upsert(&doc("a", &["the quick brown fox jumps", "lazy dogs sleep"]))
            .unwrap();
        s.upsert(&doc("b", &["a fox den in the forest", "中国的首都是北京"]))
            .unwrap();
        let hits = s.lexical_search("Fox jumps!", 10).unwrap();
        assert_eq!(hits.first().map(|h| h.0), Some(1), "{hits:?}");
        assert!(hits.iter().any(|h| h.0 == 3));
        // Chinese by bigrams.
        let hits = s.lexical_search("首都北京", 10).unwrap();
        assert_eq!(hits.first().map(|h| h.0), Some(4), "{hits:?}");
        assert!(s.lexical_search("  ?! ", 10).unwrap().is_empty());
        s.delete("a").unwrap();
        assert!(s.lexical_search("jumps", 10).unwrap().is_empty());
        s.upsert(&doc("b", &["only wolves here"])).unwrap();
        assert!(
            s.lexical_search("fox", 10).unwrap().is_empty(),
            "replaced chunks are gone"
        );
    }

    #[test]
    fn cjk_runs_become_bigrams() {
        assert_eq!(
            lexical_text("Hi 北京大学!")
                .split_whitespace()
                .collect::<Vec<_>>(),
            vec!["Hi", "北京", "京大", "大学", "!"]
        );
        assert_eq!(lexical_text("中").trim(), "中");
    }

    #[test]
    fn list_pages_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        for id in ["c", "a", "d", "b"] {
            s.upsert(&doc(id, &["t"])).unwrap();
        }
        let page = s.list(None, 3).unwrap();
        assert_eq!(
            page.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            vec!["a", "b", "c"]
        );
        let page = s.list(Some("c"), 3).unwrap();
        assert_eq!(
            page.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            vec!["d"]
        );
    }

    #[test]
    fn another_embedder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), "m", 2).unwrap());
        assert!(matches!(
            Store::open(dir.path(), "other", 2),
            Err(StoreError::ModelMismatch { .. })
        ));
        assert!(matches!(
            Store::open(dir.path(), "m", 3),
            Err(StoreError::ModelMismatch { .. })
        ));
    }

    #[test]
    fn schema_1_is_migrated_and_sections_are_searchable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), "m", 2).unwrap();
            s.upsert(&doc("a", &["alpha", "beta"])).unwrap();
        }
        // Turn the database back into a version 1 one.
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(
                "ALTER TABLE chunks DROP COLUMN section; UPDATE meta SET value = '1' WHERE key = 'schema';",
            )
            .unwrap();
        }
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        let keys: Vec<usize> = s.live().map(|(k, _, _)| k).collect();
        let chunks = s.chunks(&keys).unwrap();
        assert_eq!(chunks.len(), 2);
        assert!(
            chunks.iter().all(|(_, c)| c.section.is_empty()),
            "migrated rows have no section"
        );
        s.upsert(&doc("b", &["gamma", "delta"])).unwrap();
        let hits: Vec<usize> = s
            .lexical_search("part", 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let found = s.chunks(&hits).unwrap();
        assert!(
            found.iter().any(|(_, c)| (
                c.document_id.as_str(),
                c.section.as_str(),
                c.text.as_str()
            ) == ("b", "Part 1", "delta")),
            "the section is in the full-text index: {found:?}"
        );
    }
}
