//! Faults a service meets in the field, each injected for real: the data
//! directory's disk fills up during ingest; the database file or the index
//! dump is damaged or cut short; a model file is missing or damaged. Each must
//! end in a clear status or a start-up error naming the file, with nothing
//! half-written and nothing acknowledged lost. Needs `scripts/fetch-models`;
//! the full-disk case mounts a small tmpfs, which needs root (it says so and
//! is skipped without it).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{config_file, get_json, models_dir, post_json, spawn, wait_ready};
use serde_json::{json, Value};

/// `ragd serve` on `data` with `config`, expected to refuse to start: its
/// exit status and everything it printed (bounded to 60 s).
fn refused_start(config: &Path, data: &Path) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ragd"))
        .args(["serve", "--port", "0", "--host", "127.0.0.1", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .env("RAGD_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status.success(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ragd kept running on damaged data: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn ingest(client: &reqwest::Client, base: &str, body: &Value) -> (u16, Value) {
    post_json(client, &format!("{base}/ingest"), body).await
}

async fn document(client: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    get_json(client, &format!("{base}/documents/{id}")).await
}

/// Text of about `words` words, different for each `seed`.
fn long_text(seed: &str, words: usize) -> String {
    (0..words)
        .map(|i| format!("{seed}{}", i % 997))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The disk fills during ingest: the request is 507 with a message that says
/// so, the document is not there at all, what was stored before is intact,
/// and once space is freed the same request goes in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_507_and_nothing_half_written() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    std::fs::create_dir_all(&db).unwrap();
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=8m",
            "ragd-test-full",
            db.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root): the full-disk case did not run"
        );
        return;
    }
    let _mount = Mount(db.clone());
    let (mut child, base) = spawn(tmp.path());
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    let (status, body) = ingest(
        &client,
        &base,
        &json!({ "documents": [{ "id": "kept", "text": "Otters hold hands while they sleep so they do not drift apart." }] }),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Fill the disk but for a little room, then send more than fits.
    let filler = db.join("filler");
    let free = |p: &Path| {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .unwrap()
    };
    let room = free(&db).saturating_sub(64 * 1024);
    std::fs::write(&filler, vec![7u8; room as usize]).unwrap();
    let big = json!({ "documents": [
        { "id": "big", "text": long_text("word", 12_000) }
    ]});
    let (status, body) = ingest(&client, &base, &big).await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["type"], "insufficient_storage", "{body}");
    assert!(body["error"].as_str().unwrap().contains("full"), "{body}");
    assert_eq!(document(&client, &base, "big").await.0, 404);
    let (status, kept) = document(&client, &base, "kept").await;
    assert_eq!((status, kept["chunks"].as_u64()), (200, Some(1)), "{kept}");
    let (_, found) = post_json(
        &client,
        &format!("{base}/search"),
        &json!({ "query": "big", "top_k": 5 }),
    )
    .await;
    assert!(
        found["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["document_id"] != "big"),
        "a refused document is searchable: {found}"
    );

    // Space freed: the same request goes in, whole.
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = ingest(&client, &base, &big).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["documents"][0]["status"], "created", "{body}");
    let (status, doc) = document(&client, &base, "big").await;
    assert_eq!(status, 200, "{doc}");
    assert!(doc["chunks"].as_u64().unwrap() > 1, "{doc}");
    child.kill();

    // And it is all there after a restart.
    let (mut child, base) = spawn(tmp.path());
    wait_ready(&client, &base).await;
    assert_eq!(document(&client, &base, "kept").await.0, 200);
    assert_eq!(document(&client, &base, "big").await, (200, doc));
    child.kill();
}

/// A data directory holding two documents, made by a server that then stops.
async fn stored_data(dir: &Path) -> PathBuf {
    let (mut child, base) = spawn(dir);
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    let (status, body) = ingest(
        &client,
        &base,
        &json!({ "documents": [
            { "id": "owls", "text": "Owls hunt at night and see well in the dark." },
            { "id": "figs", "text": "Fig trees are pollinated by fig wasps." }
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // SIGTERM: a clean stop writes the index dump.
    let _ = Command::new("kill").arg(child.0.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill();
    let db = dir.join("db");
    assert!(db.join("index").exists(), "no index dump was written");
    db
}

/// A damaged or cut-short database file stops the start with a message
/// naming the file; a damaged index dump is rebuilt from the database (safe:
/// the database is the record) and every document is still found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_files_in_the_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let db = stored_data(tmp.path()).await;
    let config = config_file(tmp.path());

    // Every file of the index dump overwritten with garbage.
    for entry in std::fs::read_dir(db.join("index")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let len = std::fs::metadata(&path).unwrap().len() as usize;
            std::fs::write(&path, vec![0xA5u8; len.max(16)]).unwrap();
        }
    }
    let (mut child, base) = spawn(tmp.path());
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    let (_, ready) = get_json(&client, &format!("{base}/ready")).await;
    assert_eq!(ready["index_at_start"], "rebuilt", "{ready}");
    let (_, found) = post_json(
        &client,
        &format!("{base}/search"),
        &json!({ "query": "Which insects pollinate fig trees?", "top_k": 1, "mode": "dense" }),
    )
    .await;
    assert_eq!(found["results"][0]["document_id"], "figs", "{found}");
    child.kill();

    // The database file cut short, then overwritten in its middle.
    let file = db.join("ragd.sqlite3");
    // Fold the write-ahead log in first, as a clean stop leaves it.
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() > 8192, "{}", bytes.len());
    for (what, damaged) in [
        ("cut short", bytes[..bytes.len() / 3].to_vec()),
        ("overwritten", {
            let mut b = bytes.clone();
            b[..100].copy_from_slice(&[0x5Au8; 100]);
            b
        }),
    ] {
        std::fs::write(&file, &damaged).unwrap();
        for side in ["ragd.sqlite3-wal", "ragd.sqlite3-shm"] {
            let _ = std::fs::remove_file(db.join(side));
        }
        let (ok, out) = refused_start(&config, &db);
        assert!(!ok, "{what}: ragd started on a damaged database: {out}");
        assert!(
            out.contains(file.to_str().unwrap()),
            "{what}: the message does not name the file: {out}"
        );
        assert!(
            !out.contains("panicked"),
            "{what}: a panic instead of a message: {out}"
        );
    }
}

/// A missing or damaged model file stops the start with a message naming it.
#[test]
fn missing_or_damaged_models_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let models = models_dir();
    let write_config = |embedder: &Path, generator: &Path| {
        let config = tmp.path().join("faults.toml");
        std::fs::write(
            &config,
            format!(
                "[models]\nembedder = {embedder:?}\nmultilingual_embedder = \"\"\ngenerator = {generator:?}\n"
            ),
        )
        .unwrap();
        config
    };
    let embedder = models.join("all-MiniLM-L6-v2");
    let generator = models.join("SmolLM2-135M-Instruct.Q4_1.gguf");

    let missing = tmp.path().join("no-such-model.gguf");
    let (ok, out) = refused_start(&write_config(&embedder, &missing), &tmp.path().join("d1"));
    assert!(!ok && out.contains(missing.to_str().unwrap()), "{out}");

    // A GGUF file cut short: the header is there, the tensors are not.
    let cut = tmp.path().join("cut.gguf");
    let bytes = std::fs::read(&generator).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, out) = refused_start(&write_config(&embedder, &cut), &tmp.path().join("d2"));
    assert!(!ok && out.contains(cut.to_str().unwrap()), "{out}");
    assert!(!out.contains("panicked"), "{out}");

    // An embedder folder whose weights are not safetensors.
    let bad = tmp.path().join("bad-embedder");
    std::fs::create_dir_all(&bad).unwrap();
    for f in std::fs::read_dir(&embedder).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, bad.join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(bad.join("model.safetensors"), b"not safetensors at all").unwrap();
    let (ok, out) = refused_start(&write_config(&bad, &generator), &tmp.path().join("d3"));
    assert!(!ok && out.contains(bad.to_str().unwrap()), "{out}");
    assert!(!out.contains("panicked"), "{out}");
}
