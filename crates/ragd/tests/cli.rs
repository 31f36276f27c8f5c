//! `ragd ingest`: folders in, the same code path as file uploads, only changes
//! re-embedded; directly on a data directory or against a server with `--url`.

mod common;

use std::path::Path;
use std::process::Command;

use common::{config_file, spawn, spawn_with_env, wait_ready};

/// Runs `ragd ARGS` in `cwd`: whether it succeeded, and its stdout and stderr.
fn ragd<S: AsRef<std::ffi::OsStr>>(args: &[S], cwd: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ragd"))
        .args(args)
        .current_dir(cwd)
        .env("RAGD_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ragd_ingest(args: &[&str], config: &Path, cwd: &Path) -> (bool, String) {
    let mut all = vec!["ingest".as_ref(), "--config".as_ref(), config.as_os_str()];
    all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
    ragd(&all, cwd)
}

#[test]
fn ingest_a_folder_twice_then_a_change() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    std::fs::create_dir_all(docs.join("sub")).unwrap();
    std::fs::create_dir_all(docs.join(".hidden")).unwrap();
    std::fs::write(docs.join("a.txt"), "Apples grow on trees in orchards.").unwrap();
    std::fs::write(docs.join("b.md"), "# Bees\nBees make honey from nectar.").unwrap();
    std::fs::write(
        docs.join("sub/c.html"),
        "<html><title>Cows</title><body><p>Cows eat grass.</p></body></html>",
    )
    .unwrap();
    std::fs::write(docs.join(".hidden/secret.txt"), "not to be ingested").unwrap();
    let config = config_file(tmp.path());
    let data = tmp.path().join("data");
    let data_arg = data.to_str().unwrap();

    let (ok, out) = ragd_ingest(&["docs", "--data-dir", data_arg], &config, tmp.path());
    assert!(ok, "{out}");
    assert!(
        out.contains("3 files") && out.contains("3 created"),
        "{out}"
    );
    let (ok, out) = ragd_ingest(&["docs", "--data-dir", data_arg], &config, tmp.path());
    assert!(ok && out.contains("3 unchanged"), "{out}");
    std::fs::write(
        docs.join("a.txt"),
        "Apples and pears grow on trees in orchards.",
    )
    .unwrap();
    std::fs::write(docs.join("sub/bin.dat"), [0u8, 159, 146, 150]).unwrap();
    let (ok, out) = ragd_ingest(&["./docs", "--data-dir", data_arg], &config, tmp.path());
    assert!(!ok, "a failed file makes the exit status non-zero: {out}");
    assert!(
        out.contains("1 updated") && out.contains("2 unchanged") && out.contains("1 failed"),
        "{out}"
    );
    assert!(out.contains("failed: sub/bin.dat: binary file"), "{out}");
    std::fs::remove_file(docs.join("sub/bin.dat")).unwrap();

    // Ids are relative to the folder given: the same folder moved, and fed
    // by its absolute path, is the same documents.
    let moved = tmp.path().join("elsewhere/notes");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(&docs, &moved).unwrap();
    let (ok, out) = ragd_ingest(
        &[moved.to_str().unwrap(), "--data-dir", data_arg],
        &config,
        tmp.path(),
    );
    assert!(
        ok && out.contains("3 files") && out.contains("3 unchanged"),
        "{out}"
    );
    // A file given by itself is named by its file name.
    let (ok, out) = ragd_ingest(
        &["elsewhere/notes/sub/c.html", "--data-dir", data_arg],
        &config,
        tmp.path(),
    );
    assert!(ok && out.contains("1 created"), "{out}");

    // Two folders holding the same relative path would make one document of
    // two files: refused before anything is sent.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("a.txt"), "Another file named a.txt.").unwrap();
    let (ok, out) = ragd_ingest(
        &["elsewhere/notes", "other", "--data-dir", data_arg],
        &config,
        tmp.path(),
    );
    assert!(
        !ok && out.contains("would both be the document \"a.txt\""),
        "{out}"
    );
    assert!(
        !out.contains("created") && !out.contains("updated"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_against_a_running_server() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(
        docs.join("d.txt"),
        "Dolphins are marine mammals that use echolocation.",
    )
    .unwrap();
    let (mut child, base) = spawn(tmp.path());
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    let config = tmp.path().join("test-config.toml");
    let cwd = tmp.path().to_path_buf();
    let url = base.clone();
    let (ok, out) =
        tokio::task::spawn_blocking(move || ragd_ingest(&["docs", "--url", &url], &config, &cwd))
            .await
            .unwrap();
    assert!(ok && out.contains("1 created"), "{out}");
    let doc: serde_json::Value = client
        .get(format!("{base}/documents/d.txt"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["id"], "d.txt", "{doc}");
    // `ragd ask` streams the answer, then lists the sources.
    let url = base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ragd"))
            .args([
                "ask",
                "What do dolphins use to find their way?",
                "--url",
                &url,
            ])
            .env("RAGD_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("sources:") && text.contains("d.txt"),
        "{text}"
    );
    // `--collection`: into and from a collection (created first), which the
    // default one does not see.
    let created = client
        .post(format!("{base}/collections"))
        .json(&serde_json::json!({ "name": "sea" }))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(created, 200);
    std::fs::write(
        docs.join("d.txt"),
        "Octopuses have three hearts and blue blood.",
    )
    .unwrap();
    let config = tmp.path().join("test-config.toml");
    let cwd = tmp.path().to_path_buf();
    let url = base.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        ragd_ingest(
            &["docs", "--url", &url, "--collection", "sea"],
            &config,
            &cwd,
        )
    })
    .await
    .unwrap();
    assert!(
        ok && out.contains("1 created"),
        "a new document there: {out}"
    );
    let doc: serde_json::Value = client
        .get(format!("{base}/collections/sea/documents/d.txt"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["collection"], "sea", "{doc}");
    let url = base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ragd"))
            .args([
                "ask",
                "How many hearts does an octopus have?",
                "--url",
                &url,
            ])
            .args(["--collection", "sea"])
            .env("RAGD_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("d.txt"), "{text}");
    let default: serde_json::Value = client
        .get(format!("{base}/documents/d.txt"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(
        default["hash"], doc["hash"],
        "the default collection's d.txt is its own"
    );
    // `ragd bench ingest|search --url` measure through a running server (the
    // scale profile's balancer, say): documents go through POST /ingest.
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::write(
        corpus.join("corpus.jsonl"),
        [
            r#"{"_id":"owl","title":"Owls","text":"Owls hunt at night and see well in the dark."}"#,
            r#"{"_id":"fig","title":"Figs","text":"Fig trees are pollinated by fig wasps."}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    std::fs::write(
        corpus.join("queries.jsonl"),
        r#"{"_id":"q1","text":"When do owls hunt?"}"#,
    )
    .unwrap();
    let cwd = tmp.path().to_path_buf();
    let bench = move |args: Vec<String>| ragd(&args, &cwd);
    let args = |cmd: &str, more: &[&str]| {
        let mut a = vec![
            "bench".to_string(),
            cmd.to_string(),
            "--url".into(),
            base.clone(),
            "--corpus".into(),
            corpus.to_str().unwrap().into(),
        ];
        a.extend(more.iter().map(|s| s.to_string()));
        a
    };
    let (ingest_args, search_args) = (
        args("ingest", &[]),
        args("search", &["--requests", "6", "--clients", "2"]),
    );
    let (ok, out) = tokio::task::spawn_blocking(move || {
        let i = bench(ingest_args);
        let s = bench(search_args);
        (i.0 && s.0, format!("{}\n{}", i.1, s.1))
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(
        out.contains(r#"ingest (cold): 2 documents"#) && out.contains(r#"{"created": 2}"#),
        "{out}"
    );
    assert!(out.contains(r#"{"unchanged": 2}"#), "{out}");
    for mode in ["dense ", "lexical ", "hybrid "] {
        assert!(out.lines().any(|l| l.starts_with(mode)), "{mode}: {out}");
    }
    let found: serde_json::Value = client
        .post(format!("{base}/search"))
        .json(&serde_json::json!({ "query": "When do owls hunt?", "top_k": 1 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["results"][0]["document_id"], "owl", "{found}");

    // A server that is not there is a clear error, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_ragd"))
        .args(["ask", "anything", "--url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach ragd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    child.kill();
}

/// A server with keys: `ragd ingest --url` sends the key from `--api-key` or
/// `RAGD_API_KEY`; without one it fails with the server's 401 and nothing goes in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_sends_the_api_key() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(
        docs.join("e.txt"),
        "Elephants remember water holes for decades.",
    )
    .unwrap();
    let key = "write-key-0123456789abcdef";
    let (mut child, base) = spawn_with_env(
        tmp.path(),
        &[("RAGD__AUTH__WRITE_KEYS".into(), format!("[\"{key}\"]"))],
    );
    let client = reqwest::Client::new();
    wait_ready(&client, &base).await;
    let run = |args: Vec<String>, env_key: Option<&'static str>| {
        let cwd = tmp.path().to_path_buf();
        let config = tmp.path().join("test-config.toml");
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_ragd"));
            cmd.arg("ingest")
                .arg("--config")
                .arg(&config)
                .args(&args)
                .current_dir(&cwd)
                .env("RAGD_LOG", "warn")
                .env_remove("RAGD_API_KEY");
            if let Some(k) = env_key {
                cmd.env("RAGD_API_KEY", k);
            }
            let out = cmd.output().unwrap();
            (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        })
    };
    let plain = vec!["docs".to_string(), "--url".into(), base.clone()];
    let (ok, out) = run(plain.clone(), None).await.unwrap();
    assert!(
        !ok && out.contains("401") && out.contains("1 failed"),
        "{out}"
    );
    let count = |body: serde_json::Value| body["documents"].as_array().map(Vec::len);
    let listed = client
        .get(format!("{base}/documents"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(count(listed), Some(0));
    let mut flagged = plain.clone();
    flagged.extend(["--api-key".to_string(), key.to_string()]);
    let (ok, out) = run(flagged, None).await.unwrap();
    assert!(ok && out.contains("1 created"), "{out}");
    let (ok, out) = run(plain, Some(key)).await.unwrap();
    assert!(ok && out.contains("1 unchanged"), "{out}");
    child.kill();
}

/// Flags beat `RAGD__` variables, which beat the file; a variable that makes
/// the configuration unsafe stops the start with a message; the effective
/// configuration is logged without the keys.
#[test]
fn serve_layers_flags_over_the_environment_and_logs_without_secrets() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let config = config_file(tmp.path());
    let serve = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ragd"));
        c.args(["serve", "--port", "0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(tmp.path().join("db"))
            .args(extra)
            .env("RAGD_LOG", "info")
            .env("RAGD__SERVER__HOST", "0.0.0.0")
            .env("RAGD__AUTH__READ_KEYS", r#"["very-secret-read-key-0123"]"#)
            .env_remove("RAGD__AUTH__ALLOW_UNAUTHENTICATED");
        c
    };
    // The environment asks for every interface: with a read key that is allowed,
    // but a key in the environment must not reach the log. The --host flag wins.
    let mut child = serve(&["--host", "127.0.0.1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("ragd logs its address").unwrap();
        log.push_str(&line);
        log.push('\n');
        if let Some(at) = line.find("listening addr=") {
            break line[at + "listening addr=".len()..].trim().to_string();
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        addr.starts_with("127.0.0.1:"),
        "the flag beats RAGD__SERVER__HOST: {addr}"
    );
    assert!(log.contains("effective configuration"), "{log}");
    assert!(
        !log.contains("very-secret-read-key"),
        "a key reached the log:\n{log}"
    );
    // Without keys, the same variable stops the start and says why.
    let out = Command::new(env!("CARGO_BIN_EXE_ragd"))
        .args(["serve", "--port", "0", "--config"])
        .arg(&config)
        .env("RAGD__SERVER__HOST", "0.0.0.0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("allow_unauthenticated"),
        "{err}"
    );
    // An unknown variable is named.
    let out = Command::new(env!("CARGO_BIN_EXE_ragd"))
        .args(["serve", "--port", "0", "--config"])
        .arg(&config)
        .env("RAGD__SERVER__PROT", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("RAGD__SERVER__PROT"),
        "{err}"
    );
}
