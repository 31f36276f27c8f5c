//! The Docker files: the Dockerfile's steps are the ones the README lists,
//! `compose.yaml` is valid, and `docker compose up` is run for real — the
//! image built (from the binary the tests were built with, over a base image
//! made with debootstrap: no registry here), the models fetched on first
//! start, documents ingested and answered, kept across a restart and a
//! `down`/`up`, removed by `down -v`. `scripts/test-setup` installs and starts
//! the Docker engine and Compose v2.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn steps(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn the_readme_lists_the_dockerfiles_steps() {
    let dockerfile = std::fs::read_to_string(root().join("docker/Dockerfile")).unwrap();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let marker = "<!-- dockerfile steps";
    let start = readme
        .find(marker)
        .expect("README has the dockerfile steps block");
    let block = &readme[start..];
    let open = block
        .find("```dockerfile\n")
        .expect("a dockerfile code block")
        + "```dockerfile\n".len();
    let close = block[open..].find("```").expect("the block closes");
    let listed = steps(&block[open..open + close]);
    assert_eq!(
        listed,
        steps(&dockerfile),
        "README's Docker steps differ from docker/Dockerfile"
    );
    // What the issue asks of the image.
    let d = steps(&dockerfile);
    assert!(
        d.iter().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    assert!(
        d.iter()
            .any(|l| l.starts_with("USER ") && !l.ends_with("root")),
        "non-root"
    );
    assert!(
        d.iter()
            .any(|l| l.starts_with("HEALTHCHECK") && l.contains("/ready")),
        "health check on /ready"
    );
    assert!(
        d.iter().any(|l| l.contains("debian:bookworm-slim")),
        "slim runtime image"
    );
    let cargo = std::fs::read_to_string(root().join(".cargo/config.toml")).unwrap();
    assert!(cargo.contains("x86-64-v3"), "built for x86-64-v3");
}

#[test]
fn compose_file_is_valid_with_volumes_for_models_and_data() {
    let out = Command::new("docker")
        .args([
            "compose",
            "-f",
            "compose.yaml",
            "config",
            "--format",
            "json",
        ])
        .current_dir(root())
        .output()
        .expect("docker is installed (run scripts/test-setup)");
    assert!(
        out.status.success(),
        "docker compose config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ragd = &config["services"]["ragd"];
    assert_eq!(ragd["build"]["dockerfile"], "docker/Dockerfile", "{ragd}");
    for (volume, target) in [
        ("ragd-models", "/var/lib/ragd/models"),
        ("ragd-data", "/var/lib/ragd/data"),
    ] {
        assert!(
            ragd["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["type"] == "volume" && v["source"] == volume && v["target"] == target),
            "{volume}:{target} missing from {ragd}"
        );
        assert!(config["volumes"].get(volume).is_some(), "{config}");
    }
    assert_eq!(
        ragd["ports"][0]["host_ip"], "127.0.0.1",
        "loopback only without keys: {ragd}"
    );
    assert!(
        config["services"].get("balancer").is_none(),
        "without --profile only the one-machine service runs: {config}"
    );

    // The scale profile: PostgreSQL, two replicas on it behind HAProxy, llama.cpp's
    // server for the answers and the embeddings; and not the one-machine service.
    let out = Command::new("docker")
        .args([
            "compose",
            "-f",
            "compose.yaml",
            "--profile",
            "scale",
            "config",
            "--format",
            "json",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = &config["services"];
    assert!(services.get("ragd").is_none(), "{services}");
    let replica = &services["ragd-replica"];
    assert_eq!(replica["deploy"]["replicas"], 2, "{replica}");
    let env = &replica["environment"];
    assert_eq!(env["RAGD__STORE__BACKEND"], "postgres", "{env}");
    assert_eq!(env["RAGD__EMBEDDER__BACKEND"], "openai", "{env}");
    assert_eq!(env["RAGD__GENERATION__BACKEND"], "openai", "{env}");
    assert!(
        replica.get("ports").is_none(),
        "replicas are reached through the balancer"
    );
    assert_eq!(
        services["balancer"]["ports"][0]["host_ip"], "127.0.0.1",
        "{services}"
    );
    for s in ["postgres", "llm", "embed", "balancer"] {
        assert!(services.get(s).is_some(), "{s} missing: {services}");
    }
}

/// A Compose project of the test's own, taken down with its volumes and the
/// images it built (those without a fixed tag) when dropped (also when the
/// test fails).
struct Project {
    name: String,
    env: Vec<(String, String)>,
    /// Compose files, the README's first.
    files: &'static [&'static str],
    /// `--profile`; none: the default of `.env`.
    profile: Option<&'static str>,
}

impl Project {
    fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new("docker");
        command.args(["compose", "-p", &self.name]);
        for f in self.files {
            command.args(["-f", f]);
        }
        if let Some(p) = self.profile {
            command.args(["--profile", p]);
        }
        command
            .args(args)
            .current_dir(root())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command.output().expect("docker runs")
    }

    /// Runs `args` and fails the test, with Compose's output, if it fails.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "docker compose {args:?}:\n{text}");
        text
    }

    fn volumes(&self) -> Vec<String> {
        let out = Command::new("docker")
            .args([
                "volume",
                "ls",
                "-q",
                "--filter",
                &format!("name={}_", self.name),
            ])
            .output()
            .expect("docker runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.run(&["down", "-v", "--rmi", "local", "--timeout", "5"]);
    }
}

/// Ingests three short documents; each is new.
async fn ingest_three_documents(client: &reqwest::Client, base: &str) {
    let documents = json!({ "documents": [
        { "id": "everest", "title": "Mount Everest",
          "text": "Mount Everest is Earth's highest mountain above sea level. Its summit is 8,849 metres high." },
        { "id": "cats", "title": "Domestic cats",
          "text": "Cats purr when they are content, and an adult cat sleeps twelve to sixteen hours a day." },
        { "id": "rust", "title": "Rust",
          "text": "Rust's borrow checker enforces ownership and borrowing rules at compile time." }
    ]});
    let ingest = post_json(client, &format!("{base}/ingest"), &documents).await;
    assert!(
        ingest["documents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["status"] == "created"),
        "{ingest}"
    );
}

/// The images take the binary from target/release: the one these tests were
/// built with when the suite runs in release, as the README's command does.
fn assert_release_binary() {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_ragd"));
    assert_eq!(
        binary.canonicalize().unwrap(),
        root().join("target/release/ragd").canonicalize().unwrap(),
        "run the tests with --release: the image is built from target/release/ragd"
    );
}

/// A streamed answer: tokens, then `done`.
async fn assert_streams_an_answer(client: &reqwest::Client, base: &str) {
    let r = client
        .post(format!("{base}/ask"))
        .header("Accept", "text/event-stream")
        .json(
            &json!({ "question": "How long does a cat sleep?", "stream": true, "max_tokens": 40 }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("event: token") && body.contains("event: done"),
        "{body}"
    );
}

/// The base image of a Debian suite (scripts/docker-base-images: made with
/// debootstrap once, then kept under its tag).
fn base_image(suite: &str) -> String {
    let out = Command::new(root().join("scripts/docker-base-images"))
        .arg(suite)
        .output()
        .expect("scripts/docker-base-images runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `base/ready` says 200 (at most `limit`); the time it took.
async fn wait_ready(client: &reqwest::Client, base: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await {
            if r.status().is_success() {
                return start.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{base}/ready did not answer 200 within {limit:?}");
}

async fn post_json(client: &reqwest::Client, url: &str, body: &Value) -> Value {
    client
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn document_count(client: &reqwest::Client, base: &str) -> u64 {
    let ready: Value = client
        .get(format!("{base}/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    ready["documents"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_up_serves_answers_keeps_documents_and_down_v_removes_them() {
    assert_release_binary();
    let started = Instant::now();
    let base_image = base_image("bookworm");
    let base_s = started.elapsed();
    let port = free_port();
    let project = Project {
        name: format!("ragdtest{}", std::process::id()),
        env: vec![
            ("RAGD_TEST_BASE_IMAGE".into(), base_image),
            ("RAGD_TEST_PORT".into(), port.to_string()),
        ],
        files: &["compose.yaml", "docker/compose.test.yaml"],
        profile: None,
    };
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    // The README's `docker compose up` (detached), image built first.
    let t = Instant::now();
    project.ok(&["build"]);
    let build_s = t.elapsed();
    project.ok(&["up", "-d"]);
    let first_ready = wait_ready(&client, &base, Duration::from_secs(900)).await;
    let logs = project.ok(&["logs", "ragd"]);
    assert!(
        logs.contains("fetching the models"),
        "the first start fetches the models:\n{logs}"
    );

    ingest_three_documents(&client, &base).await;
    let answer: Value = post_json(
        &client,
        &format!("{base}/ask"),
        &json!({ "question": "How high is Mount Everest?", "max_tokens": 40 }),
    )
    .await;
    assert_eq!(answer["sources"][0]["document_id"], "everest", "{answer}");
    assert!(
        answer["answer"].as_str().unwrap().contains("8,849")
            || answer["answer_kind"] != "generated",
        "{answer}"
    );
    assert_streams_an_answer(&client, &base).await;

    // A restart keeps the documents (the named data volume).
    project.ok(&["restart"]);
    wait_ready(&client, &base, Duration::from_secs(300)).await;
    assert_eq!(document_count(&client, &base).await, 3);

    // down + up: new containers, same volumes; the models are not fetched again.
    project.ok(&["down"]);
    project.ok(&["up", "-d"]);
    let second_ready = wait_ready(&client, &base, Duration::from_secs(300)).await;
    assert_eq!(document_count(&client, &base).await, 3);
    let logs = project.ok(&["logs", "ragd"]);
    assert!(
        !logs.contains("fetching the models"),
        "the models volume is kept:\n{logs}"
    );
    let search: Value = post_json(
        &client,
        &format!("{base}/search"),
        &json!({ "query": "borrow checker", "top_k": 1 }),
    )
    .await;
    assert_eq!(search["results"][0]["document_id"], "rust", "{search}");

    // down -v removes the volumes, and with them the documents (and the
    // image this test built goes too).
    assert_eq!(project.volumes().len(), 2, "{:?}", project.volumes());
    project.ok(&["down", "-v", "--rmi", "local"]);
    assert!(project.volumes().is_empty(), "{:?}", project.volumes());
    println!(
        "docker compose: base image {:.1} s (cached after the first run), image build {:.1} s, first start with the model fetch {:.1} s, start with the models in their volume {:.1} s",
        base_s.as_secs_f64(),
        build_s.as_secs_f64(),
        first_ready.as_secs_f64(),
        second_ready.as_secs_f64()
    );
}

/// `docker compose --profile scale up` for real: PostgreSQL + pgvector, two ragd
/// replicas behind HAProxy, llama.cpp's server (Debian's) generating the answers
/// and, from a GGUF its own converter made of all-MiniLM-L6-v2, the embeddings.
/// Documents ingested through the balancer are found and answered by both
/// replicas; a delete through one is seen by the other; `down` + `up` keeps the
/// documents (the PostgreSQL volume) and `down -v` removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_scale_profile_answers_from_both_replicas_behind_the_balancer() {
    assert_release_binary();
    let started = Instant::now();
    let bases = ["bookworm", "trixie", "sid"].map(base_image);
    let base_s = started.elapsed();
    let port = free_port();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let project = Project {
        name: format!("ragdscale{}", std::process::id()),
        env: vec![
            ("RAGD_TEST_BASE_IMAGE".into(), bases[0].clone()),
            ("RAGD_TEST_TRIXIE_IMAGE".into(), bases[1].clone()),
            ("RAGD_TEST_SID_IMAGE".into(), bases[2].clone()),
            ("RAGD_TEST_PORT".into(), port.to_string()),
            (
                "RAGD_POSTGRES_PASSWORD".into(),
                format!("pw-{nanos:x}-{}", std::process::id()),
            ),
        ],
        files: &["compose.yaml", "docker/compose.scale-test.yaml"],
        profile: Some("scale"),
    };
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();

    let t = Instant::now();
    project.ok(&["build"]);
    let build_s = t.elapsed();
    let t = Instant::now();
    project.ok(&["up", "-d"]);
    wait_ready(&client, &base, Duration::from_secs(900)).await;
    // Both replicas ready: the balancer sends /ready to each in turn.
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "only {seen:?} became ready"
        );
        if let Ok(r) = client.get(format!("{base}/ready")).send().await {
            if r.status().is_success() {
                if let Some(h) = r.headers().get("x-ragd-replica") {
                    seen.insert(h.to_str().unwrap().to_string());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let first_ready = t.elapsed();
    let logs = project.ok(&["logs", "models", "embedding-gguf"]);
    assert!(logs.contains("fetching the models"), "{logs}");
    assert!(
        logs.contains("converting /models/all-MiniLM-L6-v2"),
        "{logs}"
    );

    ingest_three_documents(&client, &base).await;

    // Every replica finds them at once (embeddings from llama.cpp's server).
    let mut searched = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let r = client
            .post(format!("{base}/search"))
            .json(&json!({ "query": "What does the borrow checker enforce?", "top_k": 1, "mode": "dense" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        searched.insert(r.headers()["x-ragd-replica"].to_str().unwrap().to_string());
        let found: Value = r.json().await.unwrap();
        assert_eq!(found["results"][0]["document_id"], "rust", "{found}");
    }
    assert_eq!(searched.len(), 2, "searched through {searched:?}");

    // Answers (written by llama.cpp's server) from both replicas.
    let mut answered = std::collections::BTreeSet::new();
    for (question, id) in [
        ("How high is Mount Everest?", "everest"),
        ("How long does an adult cat sleep?", "cats"),
        ("How high is the summit of Everest?", "everest"),
        ("Why do cats purr?", "cats"),
    ] {
        let r = client
            .post(format!("{base}/ask"))
            .json(&json!({ "question": question, "max_tokens": 40 }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        answered.insert(r.headers()["x-ragd-replica"].to_str().unwrap().to_string());
        let answer: Value = r.json().await.unwrap();
        assert_eq!(answer["sources"][0]["document_id"], id, "{answer}");
        assert_eq!(answer["model"], "Qwen2.5-Coder-0.5B-Instruct", "{answer}");
    }
    assert_eq!(answered.len(), 2, "answered by {answered:?}");
    assert_streams_an_answer(&client, &base).await;

    // A delete through one replica is seen by every replica.
    let r = client
        .delete(format!("{base}/documents/cats"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
    for _ in 0..2 {
        let r = client
            .get(format!("{base}/documents/cats"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
        assert_eq!(document_count(&client, &base).await, 2);
    }

    // down + up: the documents stay in the PostgreSQL volume.
    project.ok(&["down"]);
    let t = Instant::now();
    project.ok(&["up", "-d"]);
    wait_ready(&client, &base, Duration::from_secs(300)).await;
    let second_ready = t.elapsed();
    assert_eq!(document_count(&client, &base).await, 2);
    let found: Value = post_json(
        &client,
        &format!("{base}/search"),
        &json!({ "query": "highest mountain", "top_k": 1 }),
    )
    .await;
    assert_eq!(found["results"][0]["document_id"], "everest", "{found}");

    // down -v removes the volumes (documents, models, the GGUF).
    assert!(
        project
            .volumes()
            .iter()
            .any(|v| v.ends_with("_ragd-postgres")),
        "{:?}",
        project.volumes()
    );
    project.ok(&["down", "-v", "--rmi", "local"]);
    assert!(project.volumes().is_empty(), "{:?}", project.volumes());
    println!(
        "docker compose --profile scale: base images {:.1} s (cached after the first run), images {:.1} s, first start (model fetch, GGUF conversion, PostgreSQL created, both replicas ready) {:.1} s, start with the volumes in place {:.1} s",
        base_s.as_secs_f64(),
        build_s.as_secs_f64(),
        first_ready.as_secs_f64(),
        second_ready.as_secs_f64()
    );
}
