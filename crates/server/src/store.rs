//! Documents, their chunks and vectors: the in-memory view and its journal.
//!
//! Every acknowledged ingest is first appended to `journal.jsonl` in the data
//! directory and fsynced; only then does it become visible and get acknowledged.
//! At start-up the journal is replayed and the HNSW index rebuilt from the stored
//! vectors, so nothing acknowledged is lost on restart or `kill -9`. A torn last
//! line (a crash mid-write, never acknowledged) is cut off; damage anywhere else
//! stops the start with an error instead of silently dropping documents.
//!
//! Chunks are addressed by a dense `usize` key, which is also their id in the
//! vector index. Replacing a document marks its old chunks dead (the index search
//! filters them out) and appends the new ones, all in one journal record.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

const JOURNAL: &str = "journal.jsonl";
const FORMAT_VERSION: u32 = 1;

/// A chunk as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredChunk {
    /// The passage text.
    pub text: String,
    /// Byte offset in the document.
    pub start: usize,
    /// Byte offset past the end.
    pub end: usize,
    /// The embedding.
    pub vector: Vec<f32>,
}

/// A document as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDocument {
    /// Caller-given or content-derived id.
    pub id: String,
    /// Optional title.
    pub title: Option<String>,
    /// The full text.
    pub text: String,
    /// Caller's metadata object.
    pub metadata: Map<String, Value>,
    /// sha256 of the content that decides "unchanged".
    pub hash: String,
    /// Its chunks, in document order.
    pub chunks: Vec<StoredChunk>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    Header { version: u32, embedder: String, dim: usize },
    Put { document: StoredDocument },
}

/// A live chunk, as retrieval sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkView {
    /// The owning document.
    pub document_id: String,
    /// Position of the chunk in its document.
    pub index: usize,
    /// The document's title.
    pub title: Option<String>,
    /// The passage.
    pub text: String,
    /// Its embedding.
    pub vector: Vec<f32>,
}

impl ChunkView {
    /// Stable public id of the chunk: `{document_id}#{index}`.
    pub fn chunk_id(&self) -> String {
        format!("{}#{}", self.document_id, self.index)
    }
}

struct DocEntry {
    hash: String,
    keys: Vec<usize>,
}

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpsertStatus {
    /// A new id.
    Created,
    /// An existing id with different content.
    Updated,
    /// An existing id with the same content: nothing written.
    Unchanged,
}

/// Storage failures: always ours or the disk's.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the journal failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The journal is damaged before its last line.
    #[error("journal {path} is damaged at line {line}: {message}")]
    Corrupt {
        /// The journal file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parser's complaint.
        message: String,
    },
    /// The journal was written with another embedding model.
    #[error("journal {path} holds vectors of {found}; this server embeds with {expected}: use another data_dir or the same model")]
    ModelMismatch {
        /// The journal file.
        path: PathBuf,
        /// The model in the journal.
        found: String,
        /// The configured model.
        expected: String,
    },
}

/// Documents and chunks in memory, backed by the journal.
pub struct Store {
    journal: File,
    /// Length of the journal's good prefix: a failed append is cut back to it.
    len: u64,
    path: PathBuf,
    docs: HashMap<String, DocEntry>,
    /// Indexed by chunk key; `None` for chunks of replaced documents.
    chunks: Vec<Option<ChunkView>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).field("documents", &self.docs.len()).finish()
    }
}

/// The live chunks replayed from the journal, to be put in the vector index.
pub type Replayed = Vec<(usize, Vec<f32>)>;

impl Store {
    /// Opens (or creates) the journal in `dir` and replays it. Returns the store
    /// and the vectors of live chunks by key.
    pub fn open(dir: &Path, embedder: &str, dim: usize) -> Result<(Self, Replayed), StoreError> {
        let path = dir.join(JOURNAL);
        let io = |source| StoreError::Io { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut journal =
            OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io)?;
        let mut store = Store { journal: journal.try_clone().map_err(io)?, len: 0, path: path.clone(), docs: HashMap::new(), chunks: Vec::new() };
        let mut vectors: HashMap<usize, Vec<f32>> = HashMap::new();

        let mut reader = BufReader::new(&mut journal);
        let mut good_len = 0u64;
        let mut line_no = 0usize;
        let mut saw_header = false;
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(io)?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let complete = line.ends_with('\n');
            match serde_json::from_str::<Record>(line.trim_end()) {
                Ok(_) if !complete => break, // unterminated: a torn write
                Ok(Record::Header { version, embedder: found, dim: found_dim }) => {
                    if version != FORMAT_VERSION {
                        return Err(StoreError::Corrupt {
                            path,
                            line: line_no,
                            message: format!("unsupported journal version {version}"),
                        });
                    }
                    if found != embedder || found_dim != dim {
                        return Err(StoreError::ModelMismatch {
                            path,
                            found: format!("{found} ({found_dim} dims)"),
                            expected: format!("{embedder} ({dim} dims)"),
                        });
                    }
                    saw_header = true;
                }
                Ok(Record::Put { document }) => {
                    let (_, old, new) = store.apply(document);
                    for k in old {
                        vectors.remove(&k);
                    }
                    vectors.extend(new);
                }
                Err(e) => {
                    // Only the last line may be damaged (a crash mid-append).
                    let mut rest = String::new();
                    reader.read_line(&mut rest).map_err(io)?;
                    if !rest.is_empty() {
                        return Err(StoreError::Corrupt { path, line: line_no, message: e.to_string() });
                    }
                    break;
                }
            }
            good_len += n as u64;
        }
        drop(reader);
        let file_len = journal.metadata().map_err(io)?.len();
        if good_len < file_len {
            tracing::warn!(path = %path.display(), dropped_bytes = file_len - good_len, "cutting a torn last journal record (never acknowledged)");
            journal.set_len(good_len).map_err(io)?;
            journal.sync_all().map_err(io)?;
        }
        store.len = good_len;
        store.journal.seek(SeekFrom::End(0)).map_err(io)?;
        if !saw_header {
            if good_len > 0 {
                return Err(StoreError::Corrupt { path, line: 1, message: "no header record".into() });
            }
            store.append(&Record::Header { version: FORMAT_VERSION, embedder: embedder.to_string(), dim })?;
        }
        let mut replayed: Replayed = vectors.into_iter().collect();
        replayed.sort_by_key(|(k, _)| *k);
        Ok((store, replayed))
    }

    fn append(&mut self, record: &Record) -> Result<(), StoreError> {
        let io = |source| StoreError::Io { path: self.path.clone(), source };
        let mut line = serde_json::to_vec(record).map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        let written = self.journal.write_all(&line).and_then(|()| self.journal.sync_data());
        if let Err(e) = written {
            // Never leave a partial record for the next append to follow.
            let _ = self.journal.set_len(self.len);
            return Err(io(e));
        }
        self.len += line.len() as u64;
        Ok(())
    }

    /// Applies a document in memory; returns its status, the keys it retired and
    /// the new keys with their vectors.
    fn apply(&mut self, doc: StoredDocument) -> (UpsertStatus, Vec<usize>, Vec<(usize, Vec<f32>)>) {
        let status = if self.docs.contains_key(&doc.id) { UpsertStatus::Updated } else { UpsertStatus::Created };
        let old = self.docs.remove(&doc.id).map(|d| d.keys).unwrap_or_default();
        for &k in &old {
            self.chunks[k] = None;
        }
        let mut new = Vec::with_capacity(doc.chunks.len());
        for (index, c) in doc.chunks.into_iter().enumerate() {
            let key = self.chunks.len();
            self.chunks.push(Some(ChunkView {
                document_id: doc.id.clone(),
                index,
                title: doc.title.clone(),
                text: c.text,
                vector: c.vector.clone(),
            }));
            new.push((key, c.vector));
        }
        self.docs.insert(doc.id, DocEntry { hash: doc.hash, keys: new.iter().map(|(k, _)| *k).collect() });
        (status, old, new)
    }

    /// Whether `id` is stored with content hash `hash`.
    pub fn is_unchanged(&self, id: &str, hash: &str) -> bool {
        self.docs.get(id).is_some_and(|d| d.hash == hash)
    }

    /// Writes `doc` durably, then makes it visible. Returns the status and the new
    /// chunk keys with their vectors, for the index.
    pub fn put(&mut self, doc: StoredDocument) -> Result<(UpsertStatus, Vec<(usize, Vec<f32>)>), StoreError> {
        if self.is_unchanged(&doc.id, &doc.hash) {
            return Ok((UpsertStatus::Unchanged, Vec::new()));
        }
        let record = Record::Put { document: doc };
        self.append(&record)?;
        let Record::Put { document } = record else { unreachable!("constructed above") };
        let (status, _, new) = self.apply(document);
        Ok((status, new))
    }

    /// The live chunk with key `key`.
    pub fn chunk(&self, key: usize) -> Option<&ChunkView> {
        self.chunks.get(key).and_then(Option::as_ref)
    }

    /// Whether `key` is a live chunk.
    pub fn is_live(&self, key: usize) -> bool {
        self.chunk(key).is_some()
    }

    /// Number of documents.
    pub fn document_count(&self) -> usize {
        self.docs.len()
    }

    /// Number of chunks of `id`, if stored.
    pub fn chunk_count(&self, id: &str) -> Option<usize> {
        self.docs.get(id).map(|d| d.keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, text: &str) -> StoredDocument {
        StoredDocument {
            id: id.into(),
            title: None,
            text: text.into(),
            metadata: Map::new(),
            hash: format!("h-{text}"),
            chunks: vec![StoredChunk { text: text.into(), start: 0, end: text.len(), vector: vec![1.0, 0.0] }],
        }
    }

    fn tmp() -> PathBuf {
        let p = std::env::temp_dir().join(format!("ragd-store-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    }

    #[test]
    fn upserts_survive_reopen_and_replaced_chunks_stay_dead() {
        let dir = tmp();
        {
            let (mut s, replayed) = Store::open(&dir, "m", 2).unwrap();
            assert!(replayed.is_empty());
            assert_eq!(s.put(doc("a", "one")).unwrap().0, UpsertStatus::Created);
            assert_eq!(s.put(doc("b", "two")).unwrap().0, UpsertStatus::Created);
            assert_eq!(s.put(doc("a", "one")).unwrap().0, UpsertStatus::Unchanged);
            assert_eq!(s.put(doc("a", "uno")).unwrap().0, UpsertStatus::Updated);
            assert!(!s.is_live(0));
        }
        let (s, replayed) = Store::open(&dir, "m", 2).unwrap();
        assert_eq!(s.document_count(), 2);
        assert_eq!(replayed.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(s.chunk(2).unwrap().text, "uno");
        assert!(s.is_unchanged("a", "h-uno"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn torn_last_line_is_cut_and_damage_elsewhere_is_refused() {
        let dir = tmp();
        {
            let (mut s, _) = Store::open(&dir, "m", 2).unwrap();
            s.put(doc("a", "one")).unwrap();
        }
        let path = dir.join(JOURNAL);
        let good = std::fs::read(&path).unwrap();
        let mut torn = good.clone();
        torn.extend_from_slice(br#"{"op":"put","document":{"id":"b","#);
        std::fs::write(&path, &torn).unwrap();
        let (mut s, replayed) = Store::open(&dir, "m", 2).unwrap();
        assert_eq!(replayed.len(), 1);
        assert_eq!(std::fs::read(&path).unwrap(), good, "torn record cut off");
        s.put(doc("c", "three")).unwrap();
        drop(s);
        assert_eq!(Store::open(&dir, "m", 2).unwrap().0.document_count(), 2);

        // Damage in the middle is not silently skipped.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text = text.replacen(r#""op":"put""#, r#""op":"pu"#, 1);
        std::fs::write(&path, text).unwrap();
        assert!(matches!(Store::open(&dir, "m", 2), Err(StoreError::Corrupt { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn another_embedder_is_refused() {
        let dir = tmp();
        drop(Store::open(&dir, "m", 2).unwrap());
        assert!(matches!(Store::open(&dir, "other", 2), Err(StoreError::ModelMismatch { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
