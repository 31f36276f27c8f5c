//! Documents, chunks and vectors in PostgreSQL with pgvector: the store for
//! more than one machine. Any number of ragd processes can serve one database:
//! nothing is kept in process memory, so a document ingested through one is
//! found through every other at once.
//!
//! * documents and chunks are rows (`ragd_documents`, `ragd_chunks`); an
//!   upsert is one transaction per document, under an advisory lock on its id
//!   so that two replicas writing the same document take turns;
//! * vectors live in a `vector(dim)` column with an HNSW index on the inner
//!   product (the stored vectors are unit length or half-zero routed halves,
//!   see `ragd_pipeline::route`: the inner product is each model's cosine);
//! * the lexical index is a postings table of ragd's own terms (`terms`) and
//!   BM25 is computed in SQL with FTS5's formula and constants, so both
//!   backends rank alike, each collection with its own statistics;
//! * metadata filters are SQL (`filter`): JSONB containment on the documents.
//!
//! The schema is created and migrated by ragd (`schema`).

#![deny(missing_docs)]

mod filter;
mod schema;
mod terms;

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::{
    Client, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use pgvector::Vector;
use ragd_core::{
    async_trait, BackendError, CollectionInfo, DocumentInfo, DocumentStore, Embedded, Fault,
    Filter, Hit, NewDocument, StoreStats, StoredChunk, UpsertFailure, UpsertStatus,
    DEFAULT_COLLECTION,
};
use serde_json::{Map, Value};
use tokio_postgres::{NoTls, Row};

use filter::Sql;

/// BM25's term-frequency saturation and length normalisation: SQLite FTS5's
/// `bm25()` defaults, so that both backends score alike.
const BM25_K1: f64 = 1.2;
const BM25_B: f64 = 0.75;

/// How to reach the database and size the pool.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    /// Connections in the pool.
    pub max_connections: u32,
    /// Longest wait for a connection (and for a connect), seconds.
    pub connect_timeout_s: u64,
    /// HNSW `m` (pgvector allows 2..=100).
    pub hnsw_m: usize,
    /// HNSW `ef_construction`.
    pub hnsw_ef_construction: usize,
    /// HNSW `ef_search` (raised to twice the results asked for).
    pub hnsw_ef_search: usize,
}

/// Why the store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The URL does not parse.
    #[error("store.url: {0}")]
    Url(String),
    /// The server cannot be reached or refused the login.
    #[error("store.url: cannot connect to PostgreSQL at {url}: {message}")]
    Connect {
        /// The URL without its password.
        url: String,
        /// The driver's message.
        message: String,
    },
    /// pgvector is missing, too old, or may not be created by this role.
    #[error("store.url: PostgreSQL's vector extension (pgvector) is not usable in this database: {0}. Install pgvector 0.5 or later on the server (Debian: postgresql-NN-pgvector) or have a superuser run CREATE EXTENSION vector in the database")]
    Extension(String),
    /// The database holds vectors of another model.
    #[error("store.url: the database holds vectors of {found}; this server embeds with {expected} (models.embedder): use another database or the same model")]
    ModelMismatch {
        /// The model recorded in the database.
        found: String,
        /// The configured model.
        expected: String,
    },
    /// Stored data is not what this ragd writes.
    #[error("the database is not usable: {0}")]
    Corrupt(String),
    /// Any other database error.
    #[error("PostgreSQL: {0}")]
    Db(String),
}

impl PgError {
    /// The server's own message where there is one (tokio-postgres's
    /// `Display` says only "db error").
    fn db(e: tokio_postgres::Error) -> Self {
        PgError::Db(describe(&e))
    }
}

/// A tokio-postgres error with the server's message and code.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// `url` with its password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((auth, host)) => match auth.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// A failure of a query: a database that cannot be reached (the connection
/// broke, the server is shutting down or starting) is
/// [`BackendError::unavailable`] (503, retry), anything else the server's.
fn backend(e: tokio_postgres::Error) -> BackendError {
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    let unavailable = e.is_closed()
        || io
        || e.code().is_some_and(|c| {
            // Class 08: connection exception; 57P01..57P03: admin shutdown,
            // crash shutdown, cannot connect now.
            let c = c.code();
            c.starts_with("08") || c.starts_with("57P")
        });
    // 53100 disk_full, 53200 out_of_memory... class 53 is insufficient
    // resources; only the disk is the client's to act on (free space).
    let full = e.code().is_some_and(|c| c.code() == "53100");
    if unavailable {
        BackendError::unavailable(format!("the database cannot be reached: {}", describe(&e)))
    } else if full {
        BackendError::storage_full(format!("database: {}", describe(&e)))
    } else {
        BackendError::server(format!("database: {}", describe(&e)))
    }
}

/// No connection could be had from the pool: the database is down or
/// restarting (the pool keeps trying on the next request).
fn pool_error(e: PoolError) -> BackendError {
    match e {
        PoolError::Backend(e) => backend(e),
        other => BackendError::unavailable(format!("no database connection: {other}")),
    }
}

/// The PostgreSQL store; cheap to clone (a pool).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    dim: usize,
    ef_search: usize,
    iterative_scan: bool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

/// A stored document's record from a row of [`PgStore::INFO_COLUMNS`].
fn info(row: &Row) -> Result<DocumentInfo, tokio_postgres::Error> {
    let metadata: Value = row.try_get(2)?;
    Ok(DocumentInfo {
        collection: row.try_get(8)?,
        id: row.try_get(0)?,
        title: row.try_get(1)?,
        metadata: match metadata {
            Value::Object(m) => m,
            _ => Map::new(),
        },
        hash: row.try_get(3)?,
        created_at: row.try_get(4)?,
        updated_at: row.try_get(5)?,
        text_bytes: row.try_get::<_, i32>(6)? as usize,
        chunks: row.try_get::<_, i64>(7)? as usize,
    })
}

impl PgStore {
    /// Connects, checks pgvector and the embedder, and creates or migrates
    /// the schema for vectors of `embedder` (its identity) with `dim`
    /// dimensions.
    pub async fn open(config: &PgConfig, embedder: &str, dim: usize) -> Result<Self, PgError> {
        let mut pg: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| PgError::Url(describe(&e)))?;
        let timeout = Duration::from_secs(config.connect_timeout_s.max(1));
        pg.application_name("ragd").connect_timeout(timeout);
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                // A connection that broke while PostgreSQL restarted is found
                // out before use, not by the request that draws it.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.max_connections.max(1) as usize)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| PgError::Url(e.to_string()))?;
        let connect_error = |message: String| PgError::Connect {
            url: redact_url(&config.url),
            message,
        };
        let mut client = pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => connect_error(describe(&e)),
            other => connect_error(other.to_string()),
        })?;
        let m = config.hnsw_m.clamp(2, 100);
        let ef_construction = config.hnsw_ef_construction.clamp(2 * m, 1000);
        let version = schema::prepare(&mut client, embedder, dim, m, ef_construction).await?;
        drop(client);
        tracing::info!(
            url = %redact_url(&config.url),
            pgvector = %version,
            "PostgreSQL store open"
        );
        Ok(Self {
            pool,
            dim,
            ef_search: config.hnsw_ef_search.clamp(1, 1000),
            iterative_scan: schema::supports_iterative_scan(&version),
        })
    }

    async fn client(&self) -> Result<Client, BackendError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Why `doc` cannot be stored as it is, if it cannot.
    fn check_vectors(&self, doc: &NewDocument) -> Option<UpsertFailure> {
        doc.chunks.iter().enumerate().find_map(|(i, c)| {
            if c.vector.len() != self.dim {
                Some(UpsertFailure::Vector(format!(
                    "chunk {i}: {} dimensions, the store holds {}",
                    c.vector.len(),
                    self.dim
                )))
            } else if c.vector.iter().any(|x| !x.is_finite()) {
                Some(UpsertFailure::Vector(format!(
                    "chunk {i}: a component is not finite"
                )))
            } else {
                None
            }
        })
    }

    /// Stores one document in its own transaction.
    async fn upsert_one(
        &self,
        client: &mut Client,
        doc: &NewDocument,
    ) -> Result<UpsertStatus, tokio_postgres::Error> {
        let tx = client.transaction().await?;
        // Two replicas writing the same document take turns; others proceed.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&lock_name(&doc.collection, &doc.id)],
        )
        .await?;
        // The collection's row held (shared) until the commit: deleting the
        // collection waits for this document, then takes it too, rather
        // than miss chunks committed meanwhile (an update writes no row that
        // refers to the collection, so the foreign key alone would not wait).
        tx.execute(
            "SELECT 1 FROM ragd_collections WHERE name = $1 FOR KEY SHARE",
            &[&doc.collection],
        )
        .await?;
        let existing: Option<(String, i64)> = tx
            .query_opt(
                "SELECT hash, created_at FROM ragd_documents WHERE collection = $1 AND id = $2",
                &[&doc.collection, &doc.id],
            )
            .await?
            .map(|r| (r.get(0), r.get(1)));
        if existing.as_ref().is_some_and(|(h, _)| *h == doc.hash) {
            return Ok(UpsertStatus::Unchanged);
        }
        let t = now();
        let created_at = existing.as_ref().map(|(_, c)| *c).unwrap_or(t);
        forget_chunks(&tx, &doc.collection, Some(&doc.id)).await?;
        // Summaries of the old version go with it.
        tx.execute(
            "DELETE FROM ragd_summaries WHERE collection = $1 AND document_id = $2",
            &[&doc.collection, &doc.id],
        )
        .await?;
        let metadata = Value::Object(doc.metadata.clone());
        tx.execute(
            "INSERT INTO ragd_documents (collection, id, title, text, metadata, hash, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (collection, id) DO UPDATE SET title = excluded.title, text = excluded.text,
                 metadata = excluded.metadata, hash = excluded.hash, updated_at = excluded.updated_at",
            &[&doc.collection, &doc.id, &doc.title, &doc.text, &metadata, &doc.hash, &created_at, &t],
        )
        .await?;
        let insert = tx
            .prepare(
                "INSERT INTO ragd_chunks (document_id, idx, text, start_byte, end_byte, section,
                     questions, embed_hash, embedding, lexical_length, collection)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING key",
            )
            .await?;
        let (mut terms, mut keys, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        let mut total_length = 0i64;
        for (i, c) in doc.chunks.iter().enumerate() {
            let (chunk_terms, length) =
                terms::chunk_terms(doc.title.as_deref(), &c.section, &c.text, &c.questions);
            let key: i64 = tx
                .query_one(
                    &insert,
                    &[
                        &doc.id,
                        &(i as i32),
                        &c.text,
                        &(c.start as i64),
                        &(c.end as i64),
                        &c.section,
                        &c.questions.join("\n"),
                        &c.embed_hash,
                        &Vector::from(c.vector.clone()),
                        &length,
                        &doc.collection,
                    ],
                )
                .await?
                .get(0);
            total_length += i64::from(length);
            for (term, tf) in chunk_terms {
                terms.push(term);
                keys.push(key);
                counts.push(tf);
            }
        }
        tx.execute(
            "UPDATE ragd_collections SET chunks = chunks + $1, lexical_length = lexical_length + $2
             WHERE name = $3",
            &[&(doc.chunks.len() as i64), &total_length, &doc.collection],
        )
        .await?;
        if !terms.is_empty() {
            tx.execute(
                "INSERT INTO ragd_postings (collection, term, chunk_key, tf)
                 SELECT $4, t, k, f FROM UNNEST($1::text[], $2::int8[], $3::int4[]) AS u(t, k, f)",
                &[&terms, &keys, &counts, &doc.collection],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(if existing.is_some() {
            UpsertStatus::Updated
        } else {
            UpsertStatus::Created
        })
    }

    /// Runs a dense search; `exact` turns the HNSW index off (a full scan).
    async fn dense(
        &self,
        vector: &[f32],
        k: usize,
        filter: &Filter,
        exact: bool,
    ) -> Result<Vec<Hit>, BackendError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        let ef = self.ef_search.max(2 * k).min(1000);
        let mut settings = format!("SET LOCAL hnsw.ef_search = {ef};");
        if exact {
            settings.push_str("SET LOCAL enable_indexscan = off;");
        } else if self.iterative_scan && !filter.is_empty() {
            settings.push_str("SET LOCAL hnsw.iterative_scan = strict_order;");
        }
        tx.batch_execute(&settings).await.map_err(backend)?;
        let query = Vector::from(vector.to_vec());
        let mut sql = Sql::new("SELECT c.key, (-(c.embedding <#> ");
        sql.bind(query.clone())
            .push("))::float4 FROM ragd_chunks c WHERE TRUE");
        filter::push(&mut sql, filter);
        sql.push(" ORDER BY c.embedding <#> ")
            .bind(query)
            .push(" LIMIT ")
            .bind(k as i64);
        let rows = tx.query(&sql.text, &sql.params()).await.map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(hits(&rows))
    }

    const INFO_COLUMNS: &'static str =
        "d.id, d.title, d.metadata, d.hash, d.created_at, d.updated_at, octet_length(d.text),
         (SELECT count(*) FROM ragd_chunks c WHERE c.collection = d.collection AND c.document_id = d.id),
         d.collection";
}

/// Search hits from rows of (chunk key, score).
fn hits(rows: &[Row]) -> Vec<Hit> {
    rows.iter()
        .map(|r| Hit {
            id: r.get::<_, i64>(0) as usize,
            score: r.get(1),
        })
        .collect()
}

/// Deletes the chunks of document `id` of `collection` (their postings go
/// with them) in `tx`, and takes them out of the collection's lexical
/// totals; `id` `None`: every document of the collection.
async fn forget_chunks(
    tx: &deadpool_postgres::Transaction<'_>,
    collection: &str,
    id: Option<&str>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "WITH gone AS (DELETE FROM ragd_chunks WHERE collection = $1
                           AND ($2::text IS NULL OR document_id = $2)
                       RETURNING lexical_length)
         UPDATE ragd_collections SET
             chunks = chunks - (SELECT count(*) FROM gone),
             lexical_length = lexical_length - (SELECT coalesce(sum(lexical_length), 0) FROM gone)
         WHERE name = $1",
        &[&collection, &id],
    )
    .await
    .map(|_| ())
}

/// The advisory lock of document `id` of `collection`: two replicas writing
/// the same document take turns.
fn lock_name(collection: &str, id: &str) -> String {
    format!("{collection}\u{1f}{id}")
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[async_trait]
impl DocumentStore for PgStore {
    async fn prior_versions(
        &self,
        collection: &str,
        documents: &[(String, String)],
    ) -> Result<Vec<Option<HashMap<String, Embedded>>>, BackendError> {
        let client = self.client().await?;
        let mut out = Vec::with_capacity(documents.len());
        for (id, hash) in documents {
            let stored: Option<String> = client
                .query_opt(
                    "SELECT hash FROM ragd_documents WHERE collection = $1 AND id = $2",
                    &[&collection, id],
                )
                .await
                .map_err(backend)?
                .map(|r| r.get(0));
            if stored.as_deref() == Some(hash.as_str()) {
                out.push(None);
                continue;
            }
            let rows = client
                .query(
                    "SELECT embed_hash, embedding, questions FROM ragd_chunks
                     WHERE collection = $1 AND document_id = $2",
                    &[&collection, id],
                )
                .await
                .map_err(backend)?;
            out.push(Some(
                rows.iter()
                    .map(|r| {
                        let vector: Vector = r.get(1);
                        let questions: String = r.get(2);
                        (
                            r.get(0),
                            Embedded {
                                vector: vector.to_vec(),
                                questions: questions.lines().map(String::from).collect(),
                            },
                        )
                    })
                    .collect(),
            ));
        }
        Ok(out)
    }

    async fn upsert(
        &self,
        documents: Vec<NewDocument>,
    ) -> Result<Vec<Result<UpsertStatus, UpsertFailure>>, BackendError> {
        let mut client = self.client().await?;
        let mut out = Vec::with_capacity(documents.len());
        for doc in &documents {
            if let Some(failure) = self.check_vectors(doc) {
                out.push(Err(failure));
                continue;
            }
            match self.upsert_one(&mut client, doc).await {
                Ok(status) => out.push(Ok(status)),
                Err(e) => {
                    let e = backend(e);
                    if matches!(e.fault, Fault::Unavailable | Fault::StorageFull) {
                        // The database is gone: the caller is told so and
                        // retries; what committed so far stays (and is
                        // "unchanged" then).
                        return Err(e);
                    }
                    tracing::error!(document = %doc.id, error = %e, "storing a document failed");
                    out.push(Err(UpsertFailure::Storage(e.message)));
                }
            }
        }
        Ok(out)
    }

    async fn delete(&self, collection: &str, id: &str) -> Result<bool, BackendError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&lock_name(collection, id)],
        )
        .await
        .map_err(backend)?;
        forget_chunks(&tx, collection, Some(id))
            .await
            .map_err(backend)?;
        let n = tx
            .execute(
                "DELETE FROM ragd_documents WHERE collection = $1 AND id = $2",
                &[&collection, &id],
            )
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(n > 0)
    }

    async fn document(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Option<DocumentInfo>, BackendError> {
        let sql = format!(
            "SELECT {} FROM ragd_documents d WHERE d.collection = $1 AND d.id = $2",
            Self::INFO_COLUMNS
        );
        let client = self.client().await?;
        let row = client
            .query_opt(&sql, &[&collection, &id])
            .await
            .map_err(backend)?;
        row.as_ref().map(info).transpose().map_err(backend)
    }

    async fn list(
        &self,
        collection: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DocumentInfo>, BackendError> {
        // `COLLATE "C"`: byte order, as SQLite sorts, whatever the database's
        // collation.
        let sql = format!(
            "SELECT {} FROM ragd_documents d WHERE d.collection = $1 AND d.id COLLATE \"C\" > $2
             ORDER BY d.id COLLATE \"C\" LIMIT $3",
            Self::INFO_COLUMNS
        );
        // PostgreSQL text cannot hold U+0000, so no id has it: in byte order
        // the ids after "P\0R" are the ids after "P" (a 500 schemathesis
        // found).
        let after = after.unwrap_or("");
        let after = after.split('\0').next().unwrap_or("");
        let client = self.client().await?;
        let rows = client
            .query(&sql, &[&collection, &after, &(limit as i64)])
            .await
            .map_err(backend)?;
        rows.iter()
            .map(info)
            .collect::<Result<_, _>>()
            .map_err(backend)
    }

    async fn collections(&self) -> Result<Vec<CollectionInfo>, BackendError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT c.name, c.created_at,
                     (SELECT count(*) FROM ragd_documents d WHERE d.collection = c.name)
                 FROM ragd_collections c ORDER BY c.name COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| CollectionInfo {
                name: r.get(0),
                created_at: r.get(1),
                documents: r.get::<_, i64>(2) as usize,
            })
            .collect())
    }

    async fn collection_exists(&self, name: &str) -> Result<bool, BackendError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM ragd_collections WHERE name = $1)",
                &[&name],
            )
            .await
            .map_err(backend)?;
        Ok(row.get(0))
    }

    async fn create_collection(&self, name: &str) -> Result<bool, BackendError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "INSERT INTO ragd_collections (name, created_at) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING",
                &[&name, &now()],
            )
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    async fn delete_collection(&self, name: &str) -> Result<Option<usize>, BackendError> {
        if name == DEFAULT_COLLECTION {
            return Ok(None);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        // Other replicas' writes to it finish first (and fail after).
        tx.execute(
            "SELECT 1 FROM ragd_collections WHERE name = $1 FOR UPDATE",
            &[&name],
        )
        .await
        .map_err(backend)?;
        forget_chunks(&tx, name, None).await.map_err(backend)?;
        let documents = tx
            .execute("DELETE FROM ragd_documents WHERE collection = $1", &[&name])
            .await
            .map_err(backend)?;
        let existed = tx
            .execute("DELETE FROM ragd_collections WHERE name = $1", &[&name])
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok((existed == 1).then_some(documents as usize))
    }

    async fn dense_search(
        &self,
        vector: &[f32],
        k: usize,
        filter: &Filter,
    ) -> Result<Vec<Hit>, BackendError> {
        if vector.len() != self.dim {
            return Err(BackendError::server(format!(
                "query vector of {} dimensions, the store holds {}",
                vector.len(),
                self.dim
            )));
        }
        if k == 0 {
            return Ok(Vec::new());
        }
        let hits = self.dense(vector, k, filter, false).await?;
        if hits.len() >= k || filter.is_empty() {
            return Ok(hits);
        }
        // A filtered graph search can come back short (pgvector before 0.8
        // stops at ef_search candidates); an exact scan finds them all.
        self.dense(vector, k, filter, true).await
    }

    async fn lexical_search(
        &self,
        query: &str,
        k: usize,
        filter: &Filter,
    ) -> Result<Vec<Hit>, BackendError> {
        let terms = terms::query_terms(query);
        if terms.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        // BM25 as SQLite FTS5 computes it, over the collection alone (as
        // SQLite's table per collection does): IDF ln((N - n + 0.5) / (n +
        // 0.5)), at least 1e-6; N and the average length, kept on the
        // collection's row by every write. The postings of the query's terms
        // in the collection are read once (the CTE is used twice, so it is
        // materialised: one index scan), then their chunks by key. Without a
        // collection (no request does that; tools may), every collection's.
        let mut sql = Sql::new("WITH q AS (SELECT term, chunk_key, tf FROM ragd_postings WHERE ");
        if let Some(collection) = filter.collection() {
            sql.push("collection = ")
                .bind(collection.to_string())
                .push(" AND ");
        }
        sql.push("term = ANY(").bind(terms).push(
            ")),
             df AS (SELECT term, count(*)::float8 AS n FROM q GROUP BY term),
             stats AS (
                 SELECT coalesce(sum(chunks), 0)::float8 AS n,
                        GREATEST(coalesce(sum(lexical_length), 0)::float8
                                 / GREATEST(coalesce(sum(chunks), 0), 1), 1) AS avgdl
                 FROM ragd_collections",
        );
        if let Some(collection) = filter.collection() {
            sql.push(" WHERE name = ").bind(collection.to_string());
        }
        sql.push(&format!(
            ")
             SELECT c.key, sum(GREATEST(ln((s.n - df.n + 0.5) / (df.n + 0.5)), 1e-6)
                     * q.tf * {k1p1:.3} / (q.tf + {k1:.3} * ({one_b:.3} + {b:.3} * c.lexical_length / s.avgdl)))::float4 AS score
             FROM q JOIN df ON df.term = q.term
             JOIN ragd_chunks c ON c.key = q.chunk_key CROSS JOIN stats s
             WHERE TRUE",
            k1p1 = BM25_K1 + 1.0,
            k1 = BM25_K1,
            one_b = 1.0 - BM25_B,
            b = BM25_B,
        ));
        filter::push(&mut sql, filter);
        sql.push(" GROUP BY c.key ORDER BY score DESC, c.key LIMIT ")
            .bind(k as i64);
        let client = self.client().await?;
        let rows = client
            .query(&sql.text, &sql.params())
            .await
            .map_err(backend)?;
        Ok(hits(&rows))
    }

    async fn document_chunks(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<Vec<StoredChunk>, BackendError> {
        let client = self.client().await?;
        let keys: Vec<usize> = client
            .query(
                "SELECT key FROM ragd_chunks WHERE collection = $1 AND document_id = $2 ORDER BY idx",
                &[&collection, &id],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|r| r.get::<_, i64>(0) as usize)
            .collect();
        drop(client);
        self.chunks(&keys).await
    }

    async fn cached_summary(
        &self,
        collection: &str,
        id: &str,
        key: &str,
    ) -> Result<Option<String>, BackendError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT summary FROM ragd_summaries
                 WHERE collection = $1 AND document_id = $2 AND key = $3",
                &[&collection, &id, &key],
            )
            .await
            .map_err(backend)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn keep_summary(
        &self,
        collection: &str,
        id: &str,
        hash: &str,
        key: &str,
        summary: &str,
    ) -> Result<(), BackendError> {
        // The document's row is held (shared) while the summary goes in: an
        // update committed first leaves no row of this hash (nothing kept);
        // one committing after waits, then deletes the summary with the rest.
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO ragd_summaries (collection, document_id, key, summary, created_at)
                 SELECT d.collection, d.id, $3, $4, $5 FROM ragd_documents d
                 WHERE d.collection = $1 AND d.id = $2 AND d.hash = $6 FOR SHARE
                 ON CONFLICT (collection, document_id, key) DO UPDATE SET
                     summary = excluded.summary, created_at = excluded.created_at",
                &[&collection, &id, &key, &summary, &now(), &hash],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn sources(&self) -> Result<Vec<(String, String)>, BackendError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT name, record FROM ragd_sources ORDER BY name", &[])
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn keep_source(&self, name: &str, record: &str) -> Result<(), BackendError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO ragd_sources (name, record) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET record = excluded.record",
                &[&name, &record],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn forget_source(&self, name: &str) -> Result<bool, BackendError> {
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM ragd_sources WHERE name = $1", &[&name])
            .await
            .map_err(backend)?;
        Ok(n == 1)
    }

    async fn chunks(&self, keys: &[usize]) -> Result<Vec<StoredChunk>, BackendError> {
        let wanted: Vec<i64> = keys.iter().map(|&k| k as i64).collect();
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT c.key, c.document_id, c.idx, d.title, c.section, c.text, c.start_byte,
                        c.end_byte, c.embedding, c.collection
                 FROM ragd_chunks c
                 JOIN ragd_documents d ON d.collection = c.collection AND d.id = c.document_id
                 WHERE c.key = ANY($1)",
                &[&wanted],
            )
            .await
            .map_err(backend)?;
        let mut found: HashMap<usize, StoredChunk> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let vector: Vector = row.get(8);
            let chunk = StoredChunk {
                key: row.get::<_, i64>(0) as usize,
                collection: row.get(9),
                document_id: row.get(1),
                index: row.get::<_, i32>(2) as usize,
                title: row.get(3),
                section: row.get(4),
                text: row.get(5),
                start: row.get::<_, i64>(6) as usize,
                end: row.get::<_, i64>(7) as usize,
                vector: vector.to_vec(),
            };
            found.insert(chunk.key, chunk);
        }
        Ok(keys.iter().filter_map(|k| found.get(k).cloned()).collect())
    }

    async fn stats(&self) -> Result<StoreStats, BackendError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM ragd_documents), (SELECT count(*) FROM ragd_chunks)",
                &[],
            )
            .await
            .map_err(backend)?;
        Ok(StoreStats {
            documents: row.get::<_, i64>(0) as usize,
            chunks: row.get::<_, i64>(1) as usize,
            index_at_start: None,
        })
    }

    async fn flush(&self) -> Result<(), BackendError> {
        // Nothing is kept in memory: every write committed when it returned.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact_url("postgres://ragd:secret@db:5432/ragd"),
            "postgres://ragd:***@db:5432/ragd"
        );
        assert_eq!(redact_url("postgres://db/ragd"), "postgres://db/ragd");
    }
}
