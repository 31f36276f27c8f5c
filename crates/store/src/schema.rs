//! The database's layout: the tables, the `meta` table (which embedder made the
//! vectors, the schema version, the generation counter), and bringing older
//! databases up to date (the migration from schema 1, the full-text backfill).

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::live::LiveSet;
use crate::{db_error, lexical, StoreError};

/// 2: chunks.section (the heading path of a chunk) and Porter stemming in the
/// full-text index. 3: chunks.questions (generated questions, one per line).
/// 4: collections; documents keyed by (collection, id). 5: a full-text table
/// per collection (BM25 statistics of its own; `lexical`).
/// Older databases are migrated on open.
const SCHEMA_VERSION: i64 = 5;

/// The documents table of schema 4, named `NAME`.
const DOCUMENTS: &str = "CREATE TABLE IF NOT EXISTS NAME (
                 collection TEXT NOT NULL DEFAULT 'default' REFERENCES collections(name),
                 id TEXT NOT NULL,
                 title TEXT,
                 text TEXT NOT NULL,
                 metadata TEXT NOT NULL,
                 hash TEXT NOT NULL,
                 created_at INTEGER NOT NULL,
                 updated_at INTEGER NOT NULL,
                 PRIMARY KEY (collection, id));";

/// The chunks table of schema 4, named `NAME`.
const CHUNKS: &str = "CREATE TABLE IF NOT EXISTS NAME (
                 key INTEGER PRIMARY KEY AUTOINCREMENT,
                 collection TEXT NOT NULL DEFAULT 'default',
                 document_id TEXT NOT NULL,
                 idx INTEGER NOT NULL,
                 text TEXT NOT NULL,
                 start INTEGER NOT NULL,
                 end INTEGER NOT NULL,
                 embed_hash TEXT NOT NULL,
                 vector BLOB NOT NULL,
                 section TEXT NOT NULL DEFAULT '',
                 questions TEXT NOT NULL DEFAULT '',
                 FOREIGN KEY (collection, document_id) REFERENCES documents(collection, id) ON DELETE CASCADE);";

/// The tables other than documents and chunks, each created when missing.
const TABLES: &str = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS collections (name TEXT PRIMARY KEY, created_at INTEGER NOT NULL);
             INSERT OR IGNORE INTO collections (name, created_at) VALUES ('default', 0);";

/// The indexes of schema 4, the summaries kept with documents and the
/// registered sources (created once the tables have the current layout;
/// tables that older versions do not know and would not touch, so no version
/// of their own).
const INDEXES: &str =
    "CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(collection, document_id, idx);
     CREATE TABLE IF NOT EXISTS summaries (
         collection TEXT NOT NULL,
         document_id TEXT NOT NULL,
         key TEXT NOT NULL,
         summary TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         PRIMARY KEY (collection, document_id, key),
         FOREIGN KEY (collection, document_id) REFERENCES documents(collection, id) ON DELETE CASCADE);
     CREATE TABLE IF NOT EXISTS sources (name TEXT PRIMARY KEY, record TEXT NOT NULL);";

/// Makes the database at `path` ready for vectors of model `embedder` with
/// `dim` dimensions: creates missing tables, records the model in a new
/// database and refuses one written with another, migrates an older schema.
/// Returns the generation counter.
pub(crate) fn prepare(
    conn: &Connection,
    path: &Path,
    embedder: &str,
    dim: usize,
) -> Result<u64, StoreError> {
    let db = db_error(path);
    let fresh: bool = conn
        .query_row(
            "SELECT count(*) = 0 FROM sqlite_master WHERE name = 'documents'",
            [],
            |r| r.get(0),
        )
        .map_err(db)?;
    conn.execute_batch(TABLES).map_err(db)?;
    if fresh {
        conn.execute_batch(&format!(
            "{}{}",
            DOCUMENTS.replace("NAME", "documents"),
            CHUNKS.replace("NAME", "chunks")
        ))
        .map_err(db)?;
    }
    check_embedder(conn, path, &format!("{embedder} ({dim} dims)"))?;
    migrate(conn, path)?;
    conn.execute_batch(INDEXES).map_err(db)?;
    for name in collection_names(conn).map_err(db)? {
        lexical::create_fts(conn, &name).map_err(db)?;
    }
    Ok(meta(conn, path, "generation")?
        .and_then(|g| g.parse().ok())
        .unwrap_or(0))
}

/// The `meta` value under `key`.
fn meta(conn: &Connection, path: &Path, key: &str) -> Result<Option<String>, StoreError> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(db_error(path))
}

/// Records `expected` (model and dimensions) in a new database; refuses a
/// database whose vectors another model made.
fn check_embedder(conn: &Connection, path: &Path, expected: &str) -> Result<(), StoreError> {
    match meta(conn, path, "embedder")? {
        Some(found) if found != expected => Err(StoreError::ModelMismatch {
            path: path.to_owned(),
            found,
            expected: expected.to_owned(),
        }),
        Some(_) => Ok(()),
        None => conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('embedder', ?1), ('schema', ?2)",
                params![expected, SCHEMA_VERSION.to_string()],
            )
            .map(|_| ())
            .map_err(db_error(path)),
    }
}

/// Brings a schema 1 or 2 database to the current schema; refuses an unknown
/// version.
fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    if meta(conn, path, "schema")?.as_deref() == Some("1") {
        {
            // The old full-text table goes: `backfill_lexical` fills the
            // collections' tables, sections included, once the store is open.
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE chunks ADD COLUMN section TEXT NOT NULL DEFAULT '';
                 DROP TABLE IF EXISTS chunks_fts;
                 UPDATE meta SET value = '2' WHERE key = 'schema';
                 COMMIT;",
            )
            .map_err(db_error(path))?;
            tracing::info!(path = %path.display(), "database migrated to schema 2 (chunk sections)");
        }
    }
    if meta(conn, path, "schema")?.as_deref() == Some("2") {
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE chunks ADD COLUMN questions TEXT NOT NULL DEFAULT '';
             UPDATE meta SET value = '3' WHERE key = 'schema';
             COMMIT;",
        )
        .map_err(db_error(path))?;
        tracing::info!(path = %path.display(), "database migrated to schema 3 (generated questions)");
    }
    if meta(conn, path, "schema")?.as_deref() == Some("3") {
        to_collections(conn, path)?;
        tracing::info!(path = %path.display(), "database migrated to schema 4 (collections; every document in \"default\")");
    }
    match meta(conn, path, "schema")?.as_deref() {
        Some("4") => {
            // One full-text table for every collection becomes one each:
            // `prepare` creates them, `backfill_lexical` fills them.
            conn.execute_batch(
                "BEGIN;
                 DROP TABLE IF EXISTS chunks_fts;
                 UPDATE meta SET value = '5' WHERE key = 'schema';
                 COMMIT;",
            )
            .map_err(db_error(path))?;
            tracing::info!(path = %path.display(), "database migrated to schema 5 (a full-text index per collection)");
            Ok(())
        }
        Some(v) if v != SCHEMA_VERSION.to_string() => Err(StoreError::Corrupt {
            path: path.to_owned(),
            message: format!("unknown schema version {v}"),
        }),
        _ => Ok(()),
    }
}

/// Schema 3 to 4: documents keyed by (collection, id), every existing one in
/// `default`. SQLite cannot change a primary key in place, so both tables are
/// copied into the new layout in one transaction, chunk keys kept, and the
/// key counter with them (keys are never reused, deleted ones included).
fn to_collections(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let db = db_error(path);
    // Foreign keys cannot be switched inside a transaction; off while the
    // tables are swapped, checked before the commit, on again after.
    conn.pragma_update(None, "foreign_keys", "OFF")
        .map_err(db)?;
    let result = conn.execute_batch(&format!(
        "BEGIN;
         {documents}
         INSERT INTO documents_v4 (collection, id, title, text, metadata, hash, created_at, updated_at)
             SELECT 'default', id, title, text, metadata, hash, created_at, updated_at FROM documents;
         {chunks}
         INSERT INTO chunks_v4 (key, collection, document_id, idx, text, start, end, embed_hash, vector, section, questions)
             SELECT key, 'default', document_id, idx, text, start, end, embed_hash, vector, section, questions FROM chunks;
         DELETE FROM sqlite_sequence WHERE name = 'chunks_v4';
         INSERT INTO sqlite_sequence (name, seq) SELECT 'chunks_v4', seq FROM sqlite_sequence WHERE name = 'chunks';
         DROP TABLE chunks;
         DROP TABLE documents;
         ALTER TABLE documents_v4 RENAME TO documents;
         ALTER TABLE chunks_v4 RENAME TO chunks;
         UPDATE meta SET value = '4' WHERE key = 'schema';",
        documents = DOCUMENTS.replace("NAME", "documents_v4"),
        chunks = CHUNKS.replace("NAME", "chunks_v4"),
    ));
    let checked = result.and_then(|()| {
        let broken: i64 =
            conn.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
                r.get(0)
            })?;
        if broken > 0 {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
                Some(format!(
                    "{broken} rows break a foreign key after the migration"
                )),
            ));
        }
        conn.execute_batch("COMMIT;")
    });
    if checked.is_err() {
        let _ = conn.execute_batch("ROLLBACK;");
    }
    conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
    checked.map_err(db)
}

/// Records `generation` as the generation counter, within the write `tx` that
/// makes it current.
pub(crate) fn bump_generation(tx: &Transaction<'_>, generation: u64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('generation', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [generation.to_string()],
    )
    .map(|_| ())
}

/// The names of the collections.
fn collection_names(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM collections")?;
    let names = stmt.query_map([], |r| r.get(0))?;
    names.collect()
}

/// Fills the full-text table of each collection that has chunks but an empty
/// table (a database written before the table existed).
pub(crate) fn backfill_lexical(
    conn: &mut Connection,
    path: &Path,
    live: &LiveSet,
) -> Result<(), StoreError> {
    let db = db_error(path);
    for collection in collection_names(conn).map_err(db)? {
        let indexed: i64 = conn
            .query_row(
                &format!("SELECT count(*) FROM {}", lexical::fts_table(&collection)),
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        if indexed > 0 || live.count_in(&collection) == 0 {
            continue;
        }
        let tx = conn.transaction().map_err(db)?;
        {
            let mut select = tx
                .prepare(
                    "SELECT c.key, d.title, c.section, c.text, c.questions FROM chunks c
                     JOIN documents d ON d.collection = c.collection AND d.id = c.document_id
                     WHERE c.collection = ?1",
                )
                .map_err(db)?;
            let rows: Vec<(i64, Option<String>, String, String, String)> = select
                .query_map([&collection], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .map_err(db)?
                .collect::<Result<_, _>>()
                .map_err(db)?;
            for (key, title, section, text, questions) in rows {
                let questions: Vec<String> = questions.lines().map(String::from).collect();
                lexical::index_chunk(
                    &tx,
                    &collection,
                    key,
                    title.as_deref(),
                    &section,
                    &text,
                    &questions,
                )
                .map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        tracing::info!(path = %path.display(), collection, "full-text index rebuilt");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::tests::doc;
    use crate::{Store, StoreError, DB_FILE};
    use rusqlite::Connection;

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
                "ALTER TABLE chunks DROP COLUMN section; ALTER TABLE chunks DROP COLUMN questions;
                 UPDATE meta SET value = '1' WHERE key = 'schema';",
            )
            .unwrap();
        }
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        let keys: Vec<usize> = s.live().map(|(k, _, _)| k).collect();
        let chunks = s.chunks(&keys).unwrap();
        assert_eq!(chunks.len(), 2);
        assert!(
            chunks.iter().all(|c| c.section.is_empty()),
            "migrated rows have no section"
        );
        s.upsert(&doc("b", &["gamma", "delta"])).unwrap();
        let hits: Vec<usize> = s
            .lexical_search("default", "part", 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let found = s.chunks(&hits).unwrap();
        assert!(
            found.iter().any(
                |c| (c.document_id.as_str(), c.section.as_str(), c.text.as_str())
                    == ("b", "Part 1", "delta")
            ),
            "the section is in the full-text index: {found:?}"
        );
    }

    /// A schema 2 database gains the questions column; questions stored after
    /// that are searchable and come back for reuse.
    #[test]
    fn schema_2_is_migrated_and_questions_are_searchable_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Store::open(dir.path(), "m", 2).unwrap();
            s.upsert(&doc("a", &["alpha"])).unwrap();
        }
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(
                "ALTER TABLE chunks DROP COLUMN questions; UPDATE meta SET value = '2' WHERE key = 'schema';",
            )
            .unwrap();
        }
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        let mut b = doc("b", &["gamma"]);
        b.chunks[0].questions = vec!["Which zebra crosses?".into(), "Why so?".into()];
        s.upsert(&b).unwrap();
        let hits = s.lexical_search("default", "zebra", 10).unwrap();
        let found = s
            .chunks(&hits.iter().map(|(k, _)| *k).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(
            found.iter().map(|c| c.text.as_str()).collect::<Vec<_>>(),
            vec!["gamma"],
            "a generated question finds its chunk"
        );
        let prior = s.vectors_by_embed_hash("default", "b").unwrap();
        assert_eq!(prior["e-gamma"].questions, b.chunks[0].questions);
        assert!(s.vectors_by_embed_hash("default", "a").unwrap()["e-alpha"]
            .questions
            .is_empty());
    }
}
