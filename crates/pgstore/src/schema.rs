//! The database's layout, created and brought up to date by ragd: the
//! `vector` extension, ragd's tables (all named `ragd_*`, so a database can be
//! shared with other applications), and `ragd_meta` (schema version, the
//! embedder that made the vectors). Every replica runs this at start-up; an
//! advisory lock makes concurrent starts take turns.

use deadpool_postgres::Client;

use crate::PgError;

/// The schema this build writes. Each entry of [`migrations`] brings the
/// database from its index to the next version; a database of a newer schema
/// is refused rather than misread.
pub(crate) const SCHEMA_VERSION: i64 = 6;

/// Key of the advisory lock that serialises migrations (any constant that
/// other applications are unlikely to use: "ragd" in ASCII).
const MIGRATION_LOCK: i64 = 0x7261_6764;

/// The migrations, in order (entry i brings schema i to i + 1); `dim` is the
/// embedder's vector size, fixed in the
/// column type (pgvector's HNSW index needs one).
fn migrations(dim: usize, m: usize, ef_construction: usize) -> Vec<String> {
    vec![
        // 1: documents, chunks with their vectors, postings.
        format!(
        "CREATE TABLE ragd_documents (
             id TEXT PRIMARY KEY,
             title TEXT,
             text TEXT NOT NULL,
             metadata JSONB NOT NULL,
             hash TEXT NOT NULL,
             created_at BIGINT NOT NULL,
             updated_at BIGINT NOT NULL);
         CREATE INDEX ragd_documents_metadata ON ragd_documents USING gin (metadata jsonb_path_ops);
         CREATE TABLE ragd_chunks (
             key BIGSERIAL PRIMARY KEY,
             document_id TEXT NOT NULL REFERENCES ragd_documents(id) ON DELETE CASCADE,
             idx INTEGER NOT NULL,
             text TEXT NOT NULL,
             start_byte BIGINT NOT NULL,
             end_byte BIGINT NOT NULL,
             section TEXT NOT NULL,
             questions TEXT NOT NULL,
             embed_hash TEXT NOT NULL,
             embedding vector({dim}) NOT NULL,
             lexical_length INTEGER NOT NULL);
         CREATE INDEX ragd_chunks_by_document ON ragd_chunks (document_id, idx);
         CREATE INDEX ragd_chunks_embedding ON ragd_chunks
             USING hnsw (embedding vector_ip_ops) WITH (m = {m}, ef_construction = {ef_construction});
         CREATE TABLE ragd_postings (
             term TEXT NOT NULL,
             chunk_key BIGINT NOT NULL REFERENCES ragd_chunks(key) ON DELETE CASCADE,
             tf INTEGER NOT NULL,
             PRIMARY KEY (term, chunk_key));
         CREATE INDEX ragd_postings_by_chunk ON ragd_postings (chunk_key);"
        ),
        // 2: BM25's chunk count and total length, kept by every write rather
        // than counted by every query (10 ms of a 20 ms query at 10,000 chunks).
        "CREATE TABLE ragd_lexical_totals (
             one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
             chunks BIGINT NOT NULL,
             length BIGINT NOT NULL);
         INSERT INTO ragd_lexical_totals (chunks, length)
             SELECT count(*), coalesce(sum(lexical_length), 0) FROM ragd_chunks;"
            .to_string(),
        // 3: collections; documents keyed by (collection, id), every existing
        // one in `default`.
        "CREATE TABLE ragd_collections (name TEXT PRIMARY KEY, created_at BIGINT NOT NULL);
         INSERT INTO ragd_collections (name, created_at) VALUES ('default', 0);
         ALTER TABLE ragd_documents ADD COLUMN collection TEXT NOT NULL DEFAULT 'default'
             REFERENCES ragd_collections(name);
         ALTER TABLE ragd_chunks ADD COLUMN collection TEXT NOT NULL DEFAULT 'default';
         ALTER TABLE ragd_chunks DROP CONSTRAINT ragd_chunks_document_id_fkey;
         ALTER TABLE ragd_documents DROP CONSTRAINT ragd_documents_pkey;
         ALTER TABLE ragd_documents ADD PRIMARY KEY (collection, id);
         ALTER TABLE ragd_chunks ADD FOREIGN KEY (collection, document_id)
             REFERENCES ragd_documents(collection, id) ON DELETE CASCADE;
         DROP INDEX ragd_chunks_by_document;
         CREATE INDEX ragd_chunks_by_document ON ragd_chunks (collection, document_id, idx);"
            .to_string(),
        // 4: BM25 statistics per collection, so that one collection's content
        // cannot move another's ranking (nor be probed through it): each
        // posting names its collection (and is found by it first), each
        // collection keeps its chunk count and total length.
        "ALTER TABLE ragd_collections ADD COLUMN chunks BIGINT NOT NULL DEFAULT 0,
             ADD COLUMN lexical_length BIGINT NOT NULL DEFAULT 0;
         UPDATE ragd_collections k SET chunks = t.n, lexical_length = t.l
             FROM (SELECT collection, count(*) AS n, coalesce(sum(lexical_length), 0) AS l
                   FROM ragd_chunks GROUP BY collection) t
             WHERE t.collection = k.name;
         DROP TABLE ragd_lexical_totals;
         ALTER TABLE ragd_postings ADD COLUMN collection TEXT;
         UPDATE ragd_postings p SET collection = c.collection
             FROM ragd_chunks c WHERE c.key = p.chunk_key;
         ALTER TABLE ragd_postings ALTER COLUMN collection SET NOT NULL;
         ALTER TABLE ragd_postings DROP CONSTRAINT ragd_postings_pkey;
         ALTER TABLE ragd_postings ADD PRIMARY KEY (collection, term, chunk_key);"
            .to_string(),
        // 5: summaries kept with their documents (gone with a change or a
        // delete).
        "CREATE TABLE ragd_summaries (
             collection TEXT NOT NULL,
             document_id TEXT NOT NULL,
             key TEXT NOT NULL,
             summary TEXT NOT NULL,
             created_at BIGINT NOT NULL,
             PRIMARY KEY (collection, document_id, key),
             FOREIGN KEY (collection, document_id)
                 REFERENCES ragd_documents(collection, id) ON DELETE CASCADE);"
            .to_string(),
        // 6: registered sources (their documents are ordinary documents).
        "CREATE TABLE ragd_sources (name TEXT PRIMARY KEY, record TEXT NOT NULL);".to_string(),
    ]
}

/// Makes the database ready for vectors of `embedder` (its identity) with
/// `dim` dimensions; returns pgvector's version.
pub(crate) async fn prepare(
    client: &mut Client,
    embedder: &str,
    dim: usize,
    m: usize,
    ef_construction: usize,
) -> Result<String, PgError> {
    let tx = client.transaction().await.map_err(PgError::db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(PgError::db)?;
    if let Err(e) = tx
        .batch_execute("CREATE EXTENSION IF NOT EXISTS vector")
        .await
    {
        return Err(PgError::Extension(PgError::db(e).to_string()));
    }
    let version: String = tx
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'",
            &[],
        )
        .await
        .map_err(PgError::db)?
        .get(0);
    if !supports_hnsw(&version) {
        return Err(PgError::Extension(format!(
            "pgvector {version} has no HNSW index; ragd needs 0.5 or later (0.8 recommended)"
        )));
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS ragd_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    )
    .await
    .map_err(PgError::db)?;
    let meta: Vec<(String, String)> = tx
        .query("SELECT key, value FROM ragd_meta", &[])
        .await
        .map_err(PgError::db)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let get = |k: &str| {
        meta.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let identity = format!("{embedder} ({dim} dims)");
    match get("embedder") {
        Some(found) if found != identity => {
            return Err(PgError::ModelMismatch {
                found,
                expected: identity,
            })
        }
        Some(_) => {}
        None => {
            tx.execute(
                "INSERT INTO ragd_meta (key, value) VALUES ('embedder', $1)",
                &[&identity],
            )
            .await
            .map_err(PgError::db)?;
        }
    }
    let current: i64 = match get("schema_version") {
        None => 0,
        Some(v) => v
            .parse()
            .map_err(|_| PgError::Corrupt(format!("ragd_meta.schema_version is {v:?}")))?,
    };
    if current > SCHEMA_VERSION {
        return Err(PgError::Corrupt(format!(
            "the database has ragd schema {current}; this ragd knows up to {SCHEMA_VERSION}: upgrade ragd"
        )));
    }
    let steps = migrations(dim, m, ef_construction);
    for (version, step) in steps.iter().enumerate().skip(current as usize) {
        tx.batch_execute(step).await.map_err(PgError::db)?;
        tracing::info!(
            schema_version = version + 1,
            "PostgreSQL schema brought up to date"
        );
    }
    tx.execute(
        "INSERT INTO ragd_meta (key, value) VALUES ('schema_version', $1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        &[&SCHEMA_VERSION.to_string()],
    )
    .await
    .map_err(PgError::db)?;
    tx.commit().await.map_err(PgError::db)?;
    Ok(version)
}

/// `major.minor` of a pgvector version string.
fn major_minor(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// HNSW indexes came with pgvector 0.5.
fn supports_hnsw(version: &str) -> bool {
    major_minor(version) >= (0, 5)
}

/// Iterative index scans (filtered searches that keep looking until they
/// have enough rows) came with pgvector 0.8.
pub(crate) fn supports_iterative_scan(version: &str) -> bool {
    major_minor(version) >= (0, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_version_is_the_number_of_migrations() {
        assert_eq!(migrations(3, 16, 64).len() as i64, SCHEMA_VERSION);
    }

    #[test]
    fn versions_are_compared_by_number() {
        assert!(supports_hnsw("0.5.1") && supports_hnsw("0.8.0") && supports_hnsw("1.0"));
        assert!(!supports_hnsw("0.4.4"));
        assert!(supports_iterative_scan("0.8.0") && supports_iterative_scan("0.10.2"));
        assert!(!supports_iterative_scan("0.7.4"));
    }
}
