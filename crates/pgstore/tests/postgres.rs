//! The PostgreSQL store against a real PostgreSQL with pgvector: the URL of a
//! server whose user may create databases in `RAGD_TEST_POSTGRES_URL` (run
//! the tests under `scripts/with-postgres`, as the README's test command
//! does). Each test makes its own database.

use std::sync::atomic::{AtomicUsize, Ordering};

use ragd_core::{
    DocumentStore, Filter, NewChunk, NewDocument, UpsertFailure, UpsertStatus, DEFAULT_COLLECTION,
};
use ragd_pgstore::{PgConfig, PgError, PgStore};
use serde_json::{json, Map, Value};

/// The server's URL; `None` (the test is skipped, loudly) when none is
/// configured outside CI. Under CI a missing server fails the test.
fn server_url() -> Option<String> {
    match std::env::var("RAGD_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("RAGD_TEST_POSTGRES_URL is not set: run the tests under scripts/with-postgres")
        }
        _ => {
            eprintln!(
                "SKIPPED: RAGD_TEST_POSTGRES_URL is not set (run under scripts/with-postgres)"
            );
            None
        }
    }
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("a URL with a database");
    format!("{base}/{name}")
}

/// Runs each of `statements` on the server's own database (one at a time:
/// CREATE DATABASE cannot run in the implicit transaction of a batch).
async fn admin(url: &str, statements: &[&str]) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("the test server accepts connections");
    tokio::spawn(connection);
    for sql in statements {
        client.batch_execute(sql).await.expect(sql);
    }
}

static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// A new, empty database; its URL.
async fn fresh_database() -> Option<String> {
    let url = server_url()?;
    let name = format!(
        "ragd_store_{}_{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::SeqCst)
    );
    admin(
        &url,
        &[
            &format!("DROP DATABASE IF EXISTS {name}"),
            &format!("CREATE DATABASE {name}"),
        ],
    )
    .await;
    Some(with_database(&url, &name))
}

fn config(url: &str) -> PgConfig {
    PgConfig {
        url: url.to_string(),
        max_connections: 4,
        connect_timeout_s: 5,
        hnsw_m: 16,
        hnsw_ef_construction: 64,
        hnsw_ef_search: 40,
    }
}

async fn open(url: &str) -> PgStore {
    PgStore::open(&config(url), "test-model", 3)
        .await
        .expect("the store opens")
}

/// A document `id` whose chunks are `texts`, chunk i with vector `vectors[i]`.
fn doc(id: &str, texts: &[&str], vectors: &[[f32; 3]], metadata: Value) -> NewDocument {
    NewDocument {
        collection: DEFAULT_COLLECTION.into(),
        id: id.into(),
        title: Some(format!("Title {id}")),
        text: texts.join(" "),
        metadata: metadata.as_object().cloned().unwrap_or_else(Map::new),
        hash: format!("h-{}-{texts:?}-{metadata}", id),
        chunks: texts
            .iter()
            .zip(vectors)
            .enumerate()
            .map(|(i, (t, v))| NewChunk {
                text: t.to_string(),
                section: format!("Part {i}"),
                start: i * 10,
                end: i * 10 + t.len(),
                embed_hash: format!("e-{t}"),
                vector: v.to_vec(),
                questions: if i == 0 {
                    vec!["what about it?".into()]
                } else {
                    Vec::new()
                },
            })
            .collect(),
    }
}

fn unit(v: [f32; 3]) -> [f32; 3] {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.map(|x| x / n)
}

#[tokio::test]
async fn documents_are_created_unchanged_updated_listed_and_deleted() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let store = open(&url).await;
    let a = doc(
        "a",
        &["apples are red", "pears are green"],
        &[unit([1.0, 0.0, 0.0]), unit([0.0, 1.0, 0.0])],
        json!({"lang": "en"}),
    );
    let b = doc(
        "b",
        &["bananas are yellow"],
        &[unit([0.0, 0.0, 1.0])],
        json!({}),
    );
    let statuses = store.upsert(vec![a.clone(), b.clone()]).await.unwrap();
    assert_eq!(
        statuses,
        vec![Ok(UpsertStatus::Created), Ok(UpsertStatus::Created)]
    );
    assert_eq!(
        store.upsert(vec![a.clone()]).await.unwrap(),
        vec![Ok(UpsertStatus::Unchanged)]
    );
    // Prior versions: unchanged → None; changed → the stored vectors by embed hash.
    let prior = store
        .prior_versions(
            DEFAULT_COLLECTION,
            &[
                ("a".into(), a.hash.clone()),
                ("a".into(), "other".into()),
                ("new".into(), "x".into()),
            ],
        )
        .await
        .unwrap();
    assert!(prior[0].is_none());
    let vectors = prior[1].as_ref().unwrap();
    assert_eq!(vectors.len(), 2);
    assert_eq!(
        vectors["e-apples are red"].questions,
        vec!["what about it?".to_string()]
    );
    assert!((vectors["e-pears are green"].vector[1] - 1.0).abs() < 1e-6);
    assert!(prior[2].as_ref().unwrap().is_empty());

    let info = store
        .document(DEFAULT_COLLECTION, "a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((info.chunks, info.text_bytes), (2, a.text.len()));
    assert_eq!(info.metadata["lang"], "en");
    let only_a = Filter::parse(Some(&json!({"document_id": "a"}))).unwrap();
    let first_keys: Vec<usize> = store
        .dense_search(&unit([1.0, 0.0, 0.0]), 10, &only_a)
        .await
        .unwrap()
        .iter()
        .map(|h| h.id)
        .collect();
    assert_eq!(first_keys.len(), 2);

    // An update replaces the chunks under new keys; the old ones are gone.
    let a2 = doc(
        "a",
        &["apples are sweet"],
        &[unit([1.0, 0.1, 0.0])],
        json!({"lang": "en"}),
    );
    assert_eq!(
        store.upsert(vec![a2]).await.unwrap(),
        vec![Ok(UpsertStatus::Updated)]
    );
    let again = store
        .document(DEFAULT_COLLECTION, "a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.chunks, again.created_at), (1, info.created_at));
    let hits = store
        .dense_search(&unit([1.0, 0.0, 0.0]), 10, &Filter::default())
        .await
        .unwrap();
    assert_eq!(hits.len(), 2);
    assert!(hits.iter().all(|h| !first_keys.contains(&h.id)), "new keys");
    let chunks = store.chunks(&[hits[0].id]).await.unwrap();
    assert_eq!(chunks[0].text, "apples are sweet");
    assert_eq!(chunks[0].document_id, "a");
    assert_eq!(chunks[0].title.as_deref(), Some("Title a"));
    assert_eq!(
        (chunks[0].start, chunks[0].end, chunks[0].index),
        (0, 16, 0)
    );
    assert!(store.chunks(&first_keys).await.unwrap().is_empty());

    // Listing pages in byte order of the ids.
    for id in ["Z", "c", "ä"] {
        store
            .upsert(vec![doc(id, &["x"], &[unit([1.0, 1.0, 1.0])], json!({}))])
            .await
            .unwrap();
    }
    let ids = |v: Vec<ragd_core::DocumentInfo>| v.into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list(DEFAULT_COLLECTION, None, 3).await.unwrap()),
        ["Z", "a", "b"]
    );
    assert_eq!(
        ids(store.list(DEFAULT_COLLECTION, Some("b"), 10).await.unwrap()),
        ["c", "ä"]
    );

    // Delete: gone from every read, and its keys stay dead.
    assert!(store.delete(DEFAULT_COLLECTION, "a").await.unwrap());
    assert!(!store.delete(DEFAULT_COLLECTION, "a").await.unwrap());
    assert!(store
        .document(DEFAULT_COLLECTION, "a")
        .await
        .unwrap()
        .is_none());
    assert!(store.chunks(&[hits[0].id]).await.unwrap().is_empty());
    assert!(store
        .lexical_search("apples", 10, &Filter::default())
        .await
        .unwrap()
        .is_empty());
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.documents, stats.chunks), (4, 4));

    // Reopened (another process would see the same): everything is there.
    let reopened = open(&url).await;
    assert_eq!(
        ids(reopened.list(DEFAULT_COLLECTION, None, 10).await.unwrap()),
        ["Z", "b", "c", "ä"]
    );
    assert_lexical_totals_are_exact(&url).await;
    // A page cursor with U+0000 (PostgreSQL text cannot hold it) reads as
    // the ids after its part before the NUL, as byte order says.
    assert_eq!(
        ids(reopened
            .list(DEFAULT_COLLECTION, Some("b\0x"), 10)
            .await
            .unwrap()),
        ["c", "ä"]
    );
    assert_eq!(
        ids(reopened
            .list(DEFAULT_COLLECTION, Some("\0"), 10)
            .await
            .unwrap()),
        ["Z", "b", "c", "ä"]
    );
}

/// BM25's kept totals of every collection equal its chunks' own count and
/// length, and every posting names its chunk's collection.
async fn assert_lexical_totals_are_exact(url: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r.get::<_, String>(0),
                        r.get::<_, i64>(1),
                        r.get::<_, i64>(2),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let kept =
        rows("SELECT name, chunks, lexical_length FROM ragd_collections ORDER BY name").await;
    let actual = rows(
        "SELECT k.name, count(c.key), coalesce(sum(c.lexical_length), 0)::bigint
         FROM ragd_collections k LEFT JOIN ragd_chunks c ON c.collection = k.name
         GROUP BY k.name ORDER BY k.name",
    )
    .await;
    assert_eq!(kept, actual);
    let strays: i64 = client
        .query_one(
            "SELECT count(*) FROM ragd_postings p JOIN ragd_chunks c ON c.key = p.chunk_key
             WHERE p.collection <> c.collection",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(strays, 0);
}

#[tokio::test]
async fn a_schema_1_database_is_migrated_on_open() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let store = open(&url).await;
    store
        .upsert(vec![doc(
            "old",
            &["an older lighthouse", "two chunks"],
            &[unit([1.0, 0.0, 0.0]); 2],
            json!({}),
        )])
        .await
        .unwrap();
    drop(store);
    // What schema 1 was: no kept totals, no collections (documents keyed by
    // id alone, postings by term and chunk), no summaries, no sources.
    admin(
        &url,
        &[
            "DROP TABLE ragd_sources",
            "DROP TABLE ragd_summaries",
            "ALTER TABLE ragd_postings DROP CONSTRAINT ragd_postings_pkey",
            "ALTER TABLE ragd_postings DROP COLUMN collection",
            "ALTER TABLE ragd_postings ADD PRIMARY KEY (term, chunk_key)",
            "ALTER TABLE ragd_chunks DROP COLUMN collection",
            "ALTER TABLE ragd_documents DROP CONSTRAINT ragd_documents_pkey",
            "ALTER TABLE ragd_documents ADD PRIMARY KEY (id)",
            "ALTER TABLE ragd_chunks ADD FOREIGN KEY (document_id) REFERENCES ragd_documents(id) ON DELETE CASCADE",
            "ALTER TABLE ragd_documents DROP COLUMN collection",
            "DROP TABLE ragd_collections",
            "DROP INDEX IF EXISTS ragd_chunks_by_document",
            "CREATE INDEX ragd_chunks_by_document ON ragd_chunks (document_id, idx)",
            "UPDATE ragd_meta SET value = '1' WHERE key = 'schema_version'",
        ],
    )
    .await;
    let store = open(&url).await;
    assert_lexical_totals_are_exact(&url).await;
    let old = store
        .document(DEFAULT_COLLECTION, "old")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((old.collection.as_str(), old.chunks), ("default", 2));
    assert!(store.create_collection("after").await.unwrap());
    let hits = store
        .lexical_search("lighthouse", 5, &Filter::default())
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    // A schema newer than this ragd's is refused, not misread.
    drop(store);
    admin(
        &url,
        &["UPDATE ragd_meta SET value = '99' WHERE key = 'schema_version'"],
    )
    .await;
    let e = PgStore::open(&config(&url), "test-model", 3)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("schema 99"), "{e}");
}

#[tokio::test]
async fn bad_vectors_fail_alone() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let store = open(&url).await;
    let mut short = doc("short", &["x"], &[[1.0, 0.0, 0.0]], json!({}));
    short.chunks[0].vector = vec![1.0, 0.0];
    let mut nan = doc("nan", &["y"], &[[1.0, 0.0, 0.0]], json!({}));
    nan.chunks[0].vector[1] = f32::NAN;
    let good = doc("good", &["z"], &[[1.0, 0.0, 0.0]], json!({}));
    let out = store.upsert(vec![short, nan, good]).await.unwrap();
    assert!(matches!(out[0], Err(UpsertFailure::Vector(_))), "{out:?}");
    assert!(matches!(out[1], Err(UpsertFailure::Vector(_))), "{out:?}");
    assert_eq!(out[2], Ok(UpsertStatus::Created));
    assert_eq!(store.stats().await.unwrap().documents, 1);
}

#[tokio::test]
async fn filters_are_applied_in_sql_for_both_searches() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let store = open(&url).await;
    let v = unit([1.0, 0.2, 0.0]);
    store
        .upsert(vec![
            doc(
                "en1",
                &["the lighthouse keeper"],
                &[v],
                json!({"lang": "en", "tags": ["sea", "light"], "year": 2020}),
            ),
            doc(
                "de1",
                &["der Leuchtturm lighthouse"],
                &[v],
                json!({"lang": "de", "tags": ["sea"], "year": 2021}),
            ),
            doc("none", &["a lighthouse without metadata"], &[v], json!({})),
        ])
        .await
        .unwrap();
    let f = |v: Value| Filter::parse(Some(&v)).unwrap();
    let docs_of = |hits: Vec<ragd_core::Hit>| {
        let store = store.clone();
        async move {
            let keys: Vec<usize> = hits.iter().map(|h| h.id).collect();
            let mut ids: Vec<String> = store
                .chunks(&keys)
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.document_id)
                .collect();
            ids.sort();
            ids
        }
    };
    let cases = [
        (json!({"metadata.lang": "en"}), vec!["en1"]),
        (
            json!({"metadata.lang": {"in": ["en", "de"]}}),
            vec!["de1", "en1"],
        ),
        (json!({"metadata.tags": "light"}), vec!["en1"]),
        (
            json!({"metadata.tags": {"in": ["sea", "x"]}}),
            vec!["de1", "en1"],
        ),
        (json!({"metadata.year": 2021}), vec!["de1"]),
        (json!({"document_id": "none"}), vec!["none"]),
        (
            json!({"document_id": {"in": ["none", "en1"]}, "metadata.lang": "en"}),
            vec!["en1"],
        ),
        (json!({"metadata.missing": "x"}), vec![]),
        // U+0000 cannot be stored in PostgreSQL: such a value or key matches
        // nothing (and is not an error).
        (json!({"metadata.lang": "e\0n"}), vec![]),
        (json!({"metadata.la\0ng": "en"}), vec![]),
        (
            json!({"document_id": {"in": ["en\u{0}1", "de1"]}}),
            vec!["de1"],
        ),
    ];
    for (filter, want) in cases {
        let dense = store
            .dense_search(&v, 10, &f(filter.clone()))
            .await
            .unwrap();
        assert_eq!(docs_of(dense).await, want, "dense {filter}");
        let lexical = store
            .lexical_search("lighthouse", 10, &f(filter.clone()))
            .await
            .unwrap();
        assert_eq!(docs_of(lexical).await, want, "lexical {filter}");
    }
}

/// BM25 scores match SQLite FTS5's on the same chunks (words both stemmers
/// treat alike), and Chinese is searched by character pairs.
#[tokio::test]
async fn lexical_scores_match_sqlite_fts5() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let store = open(&url).await;
    let texts = [
        ("fox", "the quick brown fox jumps over the lazy dog"),
        ("den", "a fox den in the forest, and another fox den by the river"),
        ("dogs", "lazy dogs sleep all day"),
        ("zh", "中国的首都是北京，北京有很多大学"),
        ("long", "packages are installed with apt; apt resolves dependencies between packages and fetches them from the mirrors listed in sources"),
    ];
    let docs: Vec<NewDocument> = texts
        .iter()
        .map(|(id, t)| {
            let mut d = doc(id, &[t], &[unit([1.0, 0.0, 0.0])], json!({}));
            d.chunks[0].questions.clear();
            d.chunks[0].section.clear();
            d
        })
        .collect();
    store.upsert(docs.clone()).await.unwrap();
    // Another collection's content, sharing every query's words, moves
    // nothing: each collection's BM25 has its own statistics (the SQLite
    // store below has only the one collection).
    assert!(store.create_collection("noise").await.unwrap());
    let noise: Vec<NewDocument> = (0..25)
        .map(|i| {
            let mut d = doc(
                &format!("n{i}"),
                &["fox dog lazy 北京 大学 packages apt forest river den jumps"],
                &[unit([1.0, 0.0, 0.0])],
                json!({}),
            );
            d.collection = "noise".into();
            d
        })
        .collect();
    store.upsert(noise).await.unwrap();
    let in_default = Filter::default().within(DEFAULT_COLLECTION);
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite = ragd_store::Store::open(dir.path(), "test-model", 3).unwrap();
    for d in &docs {
        sqlite.upsert(d).unwrap();
    }
    for query in [
        "fox jumps",
        "lazy dog",
        "北京大学",
        "installing packages with apt",
        "forest river den",
    ] {
        let pg = store.lexical_search(query, 10, &in_default).await.unwrap();
        let lite = sqlite
            .lexical_search(DEFAULT_COLLECTION, query, 10)
            .unwrap();
        let pg_docs: Vec<(String, f32)> = {
            let keys: Vec<usize> = pg.iter().map(|h| h.id).collect();
            let chunks = store.chunks(&keys).await.unwrap();
            chunks
                .into_iter()
                .zip(&pg)
                .map(|(c, h)| (c.document_id, h.score))
                .collect()
        };
        let lite_docs: Vec<(String, f32)> = {
            let keys: Vec<usize> = lite.iter().map(|h| h.0).collect();
            let chunks = sqlite.chunks(&keys).unwrap();
            chunks
                .into_iter()
                .zip(&lite)
                .map(|(c, h)| (c.document_id, h.1))
                .collect()
        };
        assert_eq!(
            pg_docs.iter().map(|d| &d.0).collect::<Vec<_>>(),
            lite_docs.iter().map(|d| &d.0).collect::<Vec<_>>(),
            "{query}: {pg_docs:?} vs {lite_docs:?}"
        );
        for ((_, a), (_, b)) in pg_docs.iter().zip(&lite_docs) {
            assert!(
                (a - b).abs() < 1e-3 * b.abs().max(1.0),
                "{query}: {pg_docs:?} vs {lite_docs:?}"
            );
        }
        assert!(!pg_docs.is_empty(), "{query}");
    }
}

#[tokio::test]
async fn two_stores_on_one_database_see_each_others_writes_at_once() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let (one, two) = (open(&url).await, open(&url).await);
    one.upsert(vec![doc(
        "x",
        &["written by one"],
        &[unit([0.0, 1.0, 0.0])],
        json!({}),
    )])
    .await
    .unwrap();
    let hits = two
        .lexical_search("written", 5, &Filter::default())
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(two.chunks(&[hits[0].id]).await.unwrap()[0].document_id, "x");
    // The same document written through both at once: one version wins whole.
    let versions: Vec<NewDocument> = (0..8)
        .map(|i| {
            let texts: Vec<String> = (0..=i % 3)
                .map(|j| format!("version {i} part {j}"))
                .collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            doc(
                "same",
                &refs,
                &vec![unit([1.0, 0.0, 0.0]); refs.len()],
                json!({}),
            )
        })
        .collect();
    let mut tasks = Vec::new();
    for (i, v) in versions.into_iter().enumerate() {
        let store = if i % 2 == 0 { one.clone() } else { two.clone() };
        tasks.push(tokio::spawn(async move { store.upsert(vec![v]).await }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap()[0].is_ok());
    }
    assert_lexical_totals_are_exact(&url).await;
    let info = one
        .document(DEFAULT_COLLECTION, "same")
        .await
        .unwrap()
        .unwrap();
    let hits = two
        .dense_search(
            &unit([1.0, 0.0, 0.0]),
            50,
            &Filter::parse(Some(&json!({"document_id": "same"}))).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(hits.len(), info.chunks, "chunks of exactly one version");
    assert!(one.delete(DEFAULT_COLLECTION, "x").await.unwrap());
    assert!(two
        .document(DEFAULT_COLLECTION, "x")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_database_of_another_embedder_is_refused_by_name() {
    let Some(url) = fresh_database().await else {
        return;
    };
    drop(open(&url).await);
    let e = PgStore::open(&config(&url), "other-model", 3)
        .await
        .unwrap_err();
    assert!(matches!(e, PgError::ModelMismatch { .. }), "{e}");
    assert!(e.to_string().contains("test-model (3 dims)"), "{e}");
    let e = PgStore::open(&config(&url), "test-model", 4)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("(4 dims)"), "{e}");
}

#[tokio::test]
async fn unreachable_servers_and_missing_rights_are_clear_start_up_errors() {
    let Some(url) = server_url() else {
        return;
    };
    // Nothing listens on port 1.
    let mut bad = config("postgres://ragd:secret@127.0.0.1:1/ragd");
    bad.connect_timeout_s = 2;
    let e = PgStore::open(&bad, "m", 3).await.unwrap_err();
    let message = e.to_string();
    assert!(
        message.starts_with("store.url: cannot connect"),
        "{message}"
    );
    assert!(
        !message.contains("secret"),
        "the password stays out: {message}"
    );
    let e = PgStore::open(&config("mysql://x"), "m", 3)
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("store.url"), "{e}");

    // A role that may not create the extension, in a database without it.
    let n = DATABASES.fetch_add(1, Ordering::SeqCst);
    let (role, db) = (
        format!("plain_{}_{n}", std::process::id()),
        format!("ragd_plain_{}_{n}", std::process::id()),
    );
    admin(
        &url,
        &[
            &format!("CREATE ROLE {role} LOGIN PASSWORD 'plain'"),
            &format!("CREATE DATABASE {db} OWNER {role}"),
        ],
    )
    .await;
    let plain = with_database(&url, &db).replacen("ragd:ragd@", &format!("{role}:plain@"), 1);
    let e = PgStore::open(&config(&plain), "m", 3).await.unwrap_err();
    assert!(matches!(e, PgError::Extension(_)), "{e}");
    assert!(e.to_string().contains("pgvector"), "{e}");
}

/// Collections keep documents apart: the same id in two, searches within
/// one see nothing of the other (dense, lexical, with a metadata filter),
/// deleting one takes its documents and chunks (and their BM25 counts) only.
#[tokio::test]
async fn summaries_are_kept_for_the_current_version_only() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let store = open(&url).await;
    let v = [unit([1.0, 0.0, 0.0]); 3];
    let a = doc("a", &["one", "two", "three"], &v, json!({}));
    store.upsert(vec![a.clone()]).await.unwrap();
    let texts: Vec<String> = store
        .document_chunks(DEFAULT_COLLECTION, "a")
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.text)
        .collect();
    assert_eq!(texts, ["one", "two", "three"]);
    store
        .keep_summary(DEFAULT_COLLECTION, "a", "stale", "k", "old")
        .await
        .unwrap();
    assert_eq!(
        store
            .cached_summary(DEFAULT_COLLECTION, "a", "k")
            .await
            .unwrap(),
        None
    );
    for text in ["one", "two"] {
        store
            .keep_summary(DEFAULT_COLLECTION, "a", &a.hash, "k", text)
            .await
            .unwrap();
    }
    assert_eq!(
        store
            .cached_summary(DEFAULT_COLLECTION, "a", "k")
            .await
            .unwrap()
            .as_deref(),
        Some("two")
    );
    // Unchanged content keeps it; a change drops it; so does a delete.
    store.upsert(vec![a.clone()]).await.unwrap();
    assert!(store
        .cached_summary(DEFAULT_COLLECTION, "a", "k")
        .await
        .unwrap()
        .is_some());
    let a2 = doc("a", &["one", "two"], &v[..2], json!({}));
    store.upsert(vec![a2.clone()]).await.unwrap();
    assert_eq!(
        store
            .cached_summary(DEFAULT_COLLECTION, "a", "k")
            .await
            .unwrap(),
        None
    );
    store
        .keep_summary(DEFAULT_COLLECTION, "a", &a2.hash, "k", "x")
        .await
        .unwrap();
    assert!(store.delete(DEFAULT_COLLECTION, "a").await.unwrap());
    assert_eq!(
        store
            .cached_summary(DEFAULT_COLLECTION, "a", "k")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn collections_keep_documents_apart() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let store = open(&url).await;
    assert!(store.create_collection("team-a").await.unwrap());
    assert!(!store.create_collection("team-a").await.unwrap());
    let v = [unit([1.0, 0.0, 0.0])];
    let shared = doc("same", &["zebras graze here"], &v, json!({"lang": "en"}));
    let mut other = doc(
        "same",
        &["zebras graze elsewhere"],
        &v,
        json!({"lang": "en"}),
    );
    other.collection = "team-a".into();
    let statuses = store.upsert(vec![shared, other]).await.unwrap();
    assert_eq!(
        statuses,
        vec![Ok(UpsertStatus::Created), Ok(UpsertStatus::Created)]
    );
    let within = |c: &str, f: Value| Filter::parse(Some(&f)).unwrap().within(c);
    for (collection, text) in [
        ("default", "zebras graze here"),
        ("team-a", "zebras graze elsewhere"),
    ] {
        for filter in [
            within(collection, json!({})),
            within(collection, json!({"metadata.lang": "en"})),
        ] {
            let dense = store.dense_search(&v[0], 5, &filter).await.unwrap();
            let lexical = store.lexical_search("zebras", 5, &filter).await.unwrap();
            for hits in [dense, lexical] {
                assert_eq!(hits.len(), 1, "{collection}");
                let chunk = &store.chunks(&[hits[0].id]).await.unwrap()[0];
                assert_eq!(
                    (chunk.collection.as_str(), chunk.text.as_str()),
                    (collection, text)
                );
            }
        }
    }
    assert_eq!(
        store.list("team-a", None, 10).await.unwrap()[0].collection,
        "team-a"
    );
    let names: Vec<(String, usize)> = store
        .collections()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.name, c.documents))
        .collect();
    assert_eq!(names, vec![("default".into(), 1), ("team-a".into(), 1)]);
    assert_eq!(store.delete_collection("team-a").await.unwrap(), Some(1));
    assert_eq!(store.delete_collection("team-a").await.unwrap(), None);
    assert_eq!(store.delete_collection("default").await.unwrap(), None);
    assert!(store
        .document(DEFAULT_COLLECTION, "same")
        .await
        .unwrap()
        .is_some());
    let hits = store
        .lexical_search("zebras", 5, &Filter::default())
        .await
        .unwrap();
    assert_eq!(hits.len(), 1, "only the default collection's chunk is left");
    assert_lexical_totals_are_exact(&url).await;
    // A document of a collection that does not exist is not stored.
    let mut lost = doc("x", &["nowhere"], &v, json!({}));
    lost.collection = "gone".into();
    assert!(store.upsert(vec![lost]).await.unwrap()[0].is_err());
}

/// Metadata numbers at the edge of f64 come back (PostgreSQL writes them as
/// long decimals, which must parse back to the same number); `fetched_after`
/// is applied in SQL; sources are registered, replaced and forgotten.
#[tokio::test]
async fn extreme_numbers_fetch_times_and_sources() {
    let Some(url) = fresh_database().await else {
        return;
    };
    let store = open(&url).await;
    let v = unit([1.0, 0.0, 0.0]);
    let meta = json!({ "big": f64::MAX, "small": 5e-324, "fetched_at": "2026-12-06T08:00:00Z" });
    store
        .upsert(vec![
            doc("new", &["lighthouse"], &[v], meta.clone()),
            doc(
                "old",
                &["lighthouse"],
                &[v],
                json!({ "fetched_at": "2026-01-01T00:00:00Z" }),
            ),
        ])
        .await
        .unwrap();
    let listed = store.list(DEFAULT_COLLECTION, None, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].metadata["big"], json!(f64::MAX));
    assert_eq!(listed[0].metadata["small"], json!(5e-324));
    let filter = |after: &str| {
        Filter::parse(Some(&json!({ "metadata.fetched_after": after })))
            .unwrap()
            .within(DEFAULT_COLLECTION)
    };
    let hits = store
        .dense_search(&v, 5, &filter("2026-12-01"))
        .await
        .unwrap();
    let chunks = store
        .chunks(&hits.iter().map(|h| h.id).collect::<Vec<_>>())
        .await
        .unwrap();
    let ids: Vec<&str> = chunks.iter().map(|c| c.document_id.as_str()).collect();
    assert_eq!(ids, ["new"]);
    let lexical = store
        .lexical_search("lighthouse", 5, &filter("2025-01-01T00:00:00+08:00"))
        .await
        .unwrap();
    assert_eq!(lexical.len(), 2);
    assert!(store.sources().await.unwrap().is_empty());
    store.keep_source("b", "{\"x\":1}").await.unwrap();
    store.keep_source("a", "{}").await.unwrap();
    store.keep_source("b", "{\"x\":2}").await.unwrap();
    assert_eq!(
        store.sources().await.unwrap(),
        vec![
            ("a".to_string(), "{}".to_string()),
            ("b".to_string(), "{\"x\":2}".to_string())
        ]
    );
    assert!(store.forget_source("a").await.unwrap());
    assert!(!store.forget_source("a").await.unwrap());
}
