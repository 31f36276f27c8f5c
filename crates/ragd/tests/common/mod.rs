//! Helpers for tests that run the `ragd` binary as a child process.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn models_dir() -> PathBuf {
    std::env::var_os("RAGD_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

/// A config file for the packaged test models, written into `dir`: one
/// embedder (the second, multilingual one is tested end to end in
/// `tests/e2e`).
pub fn config_file(dir: &Path) -> PathBuf {
    let models = models_dir();
    assert!(
        models.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists(),
        "run scripts/fetch-models"
    );
    let config = dir.join("test-config.toml");
    std::fs::write(
        &config,
        format!(
            "[models]\nembedder = {:?}\nmultilingual_embedder = \"\"\ngenerator = {:?}\n",
            models.join("all-MiniLM-L6-v2"),
            models.join("SmolLM2-135M-Instruct.Q4_1.gguf")
        ),
    )
    .unwrap();
    config
}

/// A child process that is killed when dropped, so a failing test leaves no
/// server behind.
pub struct Running(pub Child);

impl Running {
    /// Kills the child with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `ragd serve` on a free port with its data in `data/db`; returns the
/// child and its base URL.
pub fn spawn(data: &Path) -> (Running, String) {
    spawn_with_env(data, &[])
}

/// [`spawn`] with more environment variables (`RAGD__SECTION__KEY` settings).
pub fn spawn_with_env(data: &Path, env: &[(String, String)]) -> (Running, String) {
    let config = config_file(data);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ragd"))
        .args(["serve", "--port", "0", "--host", "127.0.0.1", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(data.join("db"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RAGD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ragd starts");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("ragd printed its address").unwrap();
        if let Some(at) = line.find("listening addr=") {
            break line[at + "listening addr=".len()..].trim().to_string();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Running(child), format!("http://{addr}"))
}

pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("ragd did not become ready");
}

/// GET `url`: its status and JSON body (null when there is none).
pub async fn get_json(client: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let res = client.get(url).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(serde_json::Value::Null))
}

/// POST `body` as JSON to `url`: its status and JSON body.
pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let res = client.post(url).json(body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(serde_json::Value::Null))
}
