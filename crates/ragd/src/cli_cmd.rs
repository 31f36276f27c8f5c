//! `ragd ask` (a question to a running server, the answer streamed to the
//! terminal, then its sources), `ragd summarize` (the same for a summary)
//! and `ragd models fetch|list`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The path prefix of `collection`'s routes (none for the default one).
pub(crate) fn collection_prefix(collection: Option<&str>) -> String {
    match collection {
        None | Some(ragd_core::DEFAULT_COLLECTION) => String::new(),
        Some(c) => format!("/collections/{c}"),
    }
}

/// Asks `question` at `url` and prints the answer as it streams in.
pub(crate) async fn ask(
    url: &str,
    question: &str,
    api_key: Option<String>,
    style: Option<String>,
    top_k: Option<usize>,
    collection: Option<String>,
) -> Result<()> {
    let body = json!({ "question": question, "stream": true, "style": style, "top_k": top_k });
    streamed(url, collection.as_deref(), "/ask", &body, api_key).await
}

/// What `ragd summarize` summarises: exactly one of these.
#[derive(Debug, Clone, Default)]
pub(crate) struct SummaryOf {
    pub document: Option<String>,
    pub filter: Option<String>,
    pub query: Option<String>,
}

/// Asks the server at `url` for a summary and prints it as it streams in.
pub(crate) async fn summarize(
    url: &str,
    of: SummaryOf,
    api_key: Option<String>,
    style: Option<String>,
    language: Option<String>,
    collection: Option<String>,
) -> Result<()> {
    let filter: Option<Value> = of
        .filter
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .context("--filter: not JSON (for example '{\"metadata.lang\": \"en\"}')")?;
    let body = json!({
        "document_id": of.document,
        "filter": filter,
        "query": of.query,
        "stream": true,
        "style": style,
        "language": language,
    });
    streamed(url, collection.as_deref(), "/summarize", &body, api_key).await
}

/// Posts `body` to `path` (of `collection`) at `url` as a streamed request
/// and prints the answer or summary as it arrives, then its sources.
async fn streamed(
    url: &str,
    collection: Option<&str>,
    path: &str,
    body: &Value,
    api_key: Option<String>,
) -> Result<()> {
    let client = reqwest::Client::new();
    let mut req = client
        .post(format!(
            "{}{}{path}",
            url.trim_end_matches('/'),
            collection_prefix(collection)
        ))
        .header("accept", "text/event-stream")
        .json(body);
    if let Some(k) = api_key.filter(|k| !k.is_empty()) {
        req = req.bearer_auth(k);
    }
    let mut res = req
        .send()
        .await
        .with_context(|| format!("cannot reach ragd at {url} (is `ragd serve` running?)"))?;
    if !res.status().is_success() {
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        bail!(
            "{status}: {}",
            body["error"].as_str().unwrap_or("request failed")
        );
    }
    let mut buffer = String::new();
    let mut out = std::io::stdout();
    let mut done = Value::Null;
    while let Some(bytes) = res.chunk().await? {
        buffer.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut event = "";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = if v.trim() == "token" {
                        "token"
                    } else if v.trim() == "done" {
                        "done"
                    } else if v.trim() == "error" {
                        "error"
                    } else {
                        ""
                    };
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            let data: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            match event {
                "token" => {
                    print!("{}", data["text"].as_str().unwrap_or_default());
                    out.flush()?;
                }
                "done" => done = data,
                "error" => bail!("{}", data["error"].as_str().unwrap_or("the answer failed")),
                _ => {}
            }
        }
    }
    if done.is_null() {
        bail!("the stream ended without an answer");
    }
    // The streamed text is the model's; the checked answer may differ (a
    // citation re-pointed or removed, or a declined question).
    if done["finish_reason"] == "no_sources" {
        println!("{}", done["answer"].as_str().unwrap_or_default());
    } else {
        println!();
        if done["citation_changes"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
            || done["model_answer"].is_string()
        {
            println!("\nchecked: {}", done["answer"].as_str().unwrap_or_default());
        }
    }
    let cited: Vec<u64> = done["citations"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["n"].as_u64()).collect())
        .unwrap_or_default();
    if let Some(sources) = done["sources"].as_array().filter(|s| !s.is_empty()) {
        println!("\nsources:");
        for s in sources {
            let n = s["n"].as_u64().unwrap_or(0);
            println!(
                "  [{n}]{} {} — {} (score {:.2})",
                if cited.contains(&n) { "*" } else { " " },
                s["title"].as_str().unwrap_or("(untitled)"),
                s["document_id"].as_str().unwrap_or_default(),
                s["score"].as_f64().unwrap_or(0.0)
            );
        }
        println!("  (* cited)");
    }
    Ok(())
}

/// `ragd models fetch`: runs the repository's fetch script.
pub(crate) fn fetch(models: &[String], models_dir: Option<PathBuf>) -> Result<()> {
    let script = Path::new("scripts/fetch-models");
    if !script.exists() {
        bail!("scripts/fetch-models not found: run this from the ragd repository root");
    }
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(script).args(models);
    if let Some(d) = models_dir {
        cmd.arg("--models-dir").arg(d);
    }
    let status = cmd.status().context("cannot run python3")?;
    if !status.success() {
        bail!("fetching models failed ({status})");
    }
    Ok(())
}

/// `ragd models list`: the model files present, and which the config uses.
pub(crate) fn list(dir: &Path, config: &ragd::Config) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {} (run `ragd models fetch`)", dir.display()))?;
    let mut rows: Vec<(String, u64, bool)> = Vec::new();
    for e in entries {
        let e = e?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let size = if path.is_dir() {
            walkdir::WalkDir::new(&path)
                .into_iter()
                .filter_map(|x| x.ok())
                .filter_map(|x| x.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        } else {
            e.metadata()?.len()
        };
        let used = [
            &config.models.embedder,
            &config.models.multilingual_embedder,
            &config.models.generator,
        ]
        .iter()
        .any(|p| p.file_name().is_some_and(|f| f.to_string_lossy() == name));
        rows.push((name, size, used));
    }
    rows.sort();
    for (name, size, used) in rows {
        println!(
            "{} {:>9.1} MB  {name}",
            if used { "*" } else { " " },
            size as f64 / 1e6
        );
    }
    println!(
        "(* configured: models.embedder = {}, models.multilingual_embedder = {}, models.generator = {})",
        config.models.embedder.display(),
        config.models.multilingual_embedder.display(),
        config.models.generator.display()
    );
    Ok(())
}
