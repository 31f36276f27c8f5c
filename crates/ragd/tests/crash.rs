//! Crash safety: a `ragd serve` child process ingests in a loop and is killed
//! with SIGKILL at a random moment, again and again. After every restart each
//! document whose ingest was acknowledged must be fully present, and no
//! document may be partly present. Needs `scripts/fetch-models`. With
//! `RAGD_TEST_STORE=postgres` the server keeps its documents in PostgreSQL
//! (`RAGD_TEST_POSTGRES_URL`, as `scripts/with-postgres` sets it), in a
//! database of the test's own: a replica killed mid-ingest.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{models_dir, spawn_with_env, wait_ready};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const ROUNDS: usize = 5;

fn text_of(id: &str) -> String {
    format!("Record {id}: the shipment numbered {id} left the warehouse on time and was delivered intact.")
}

/// Checks that every acknowledged document is whole and no other document is
/// present in part; returns how many documents are stored.
async fn check(
    client: &reqwest::Client,
    base: &str,
    acked: &[String],
    sent: &HashMap<String, ()>,
) -> usize {
    let mut stored = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/documents?limit=1000");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        for d in page["documents"].as_array().unwrap() {
            stored.push((
                d["id"].as_str().unwrap().to_string(),
                d["chunks"].as_u64().unwrap(),
            ));
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    let present: HashMap<&str, u64> = stored.iter().map(|(id, c)| (id.as_str(), *c)).collect();
    for id in acked {
        assert!(
            present.contains_key(id.as_str()),
            "acknowledged document {id} is missing"
        );
    }
    for (id, chunks) in &stored {
        assert!(sent.contains_key(id), "unknown document {id}");
        assert_eq!(*chunks, 1, "document {id} has {chunks} chunks");
        let r: Value = client
            .post(format!("{base}/search"))
            .json(&json!({ "query": "shipment", "top_k": 5, "filter": { "document_id": id } }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let results = r["results"].as_array().unwrap();
        assert_eq!(
            results.len(),
            1,
            "document {id} is searchable exactly once: {r}"
        );
        assert_eq!(
            results[0]["text"].as_str().unwrap(),
            text_of(id),
            "document {id} is whole"
        );
    }
    stored.len()
}

/// The settings that put the server's documents in a fresh PostgreSQL
/// database when `RAGD_TEST_STORE=postgres`; none for the SQLite store.
async fn store_settings() -> Vec<(String, String)> {
    if std::env::var("RAGD_TEST_STORE").as_deref() != Ok("postgres") {
        return Vec::new();
    }
    let server = std::env::var("RAGD_TEST_POSTGRES_URL")
        .expect("RAGD_TEST_STORE=postgres needs RAGD_TEST_POSTGRES_URL (scripts/with-postgres)");
    let name = format!("ragd_crash_{}", std::process::id());
    let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
        .await
        .expect("the test PostgreSQL accepts connections");
    tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (base, _) = server.rsplit_once('/').unwrap();
    vec![
        ("RAGD__STORE__BACKEND".into(), "postgres".into()),
        ("RAGD__STORE__URL".into(), format!("{base}/{name}")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_ingests_survive_sigkill() {
    assert!(
        models_dir()
            .join("SmolLM2-135M-Instruct.Q4_1.gguf")
            .exists(),
        "run scripts/fetch-models"
    );
    let data = tempfile::tempdir().unwrap();
    let store = store_settings().await;
    let client = reqwest::Client::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut sent = HashMap::new();
    let mut next_id = 0usize;
    let mut kills = 0;
    for round in 0..ROUNDS {
        let (mut child, base) = spawn_with_env(data.path(), &store);
        wait_ready(&client, &base).await;
        let acked_now = acked.lock().unwrap().clone();
        let stored = check(&client, &base, &acked_now, &sent).await;
        println!(
            "round {round}: {} acknowledged, {stored} stored after restart",
            acked_now.len()
        );

        // Ingest batches of 4 until the kill.
        let batches: Vec<Vec<String>> = (0..400)
            .map(|_| {
                (0..4)
                    .map(|_| {
                        next_id += 1;
                        format!("doc-{next_id:06}")
                    })
                    .collect()
            })
            .collect();
        for b in &batches {
            for id in b {
                sent.insert(id.clone(), ());
            }
        }
        let loop_acked = Arc::clone(&acked);
        let loop_client = client.clone();
        let loop_base = base.clone();
        let ingest_loop = tokio::spawn(async move {
            for batch in batches {
                let docs: Vec<Value> = batch
                    .iter()
                    .map(|id| json!({ "id": id, "text": text_of(id) }))
                    .collect();
                let res = loop_client
                    .post(format!("{loop_base}/ingest"))
                    .json(&json!({ "documents": docs }))
                    .send()
                    .await;
                let Ok(res) = res else { return };
                let Ok(body) = res.json::<Value>().await else {
                    return;
                };
                for d in body["documents"].as_array().into_iter().flatten() {
                    if d["status"] == "created" {
                        loop_acked
                            .lock()
                            .unwrap()
                            .push(d["id"].as_str().unwrap().to_string());
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        child.kill(); // SIGKILL
        kills += 1;
        let _ = ingest_loop.await;
    }
    let (mut child, base) = spawn_with_env(data.path(), &store);
    wait_ready(&client, &base).await;
    let acked_now = acked.lock().unwrap().clone();
    let stored = check(&client, &base, &acked_now, &sent).await;
    child.kill();
    println!("survived {kills} kills with SIGKILL; {} acknowledged documents, all present ({stored} stored)", acked_now.len());
    assert!(!acked_now.is_empty(), "some ingests were acknowledged");
}
