//! `ragd ingest PATH...`: feed files and folders to ragd, through the same code
//! path as `POST /ingest` with files — directly on the data directory, or
//! against a running server with `--url`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ragd::Config;
use ragd_pipeline::{Pipeline, UploadedFile};
use serde_json::Value;

/// Files per request.
const BATCH_FILES: usize = 16;
/// Bytes per request, below the default body limit.
const BATCH_BYTES: usize = 8 << 20;

enum Target {
    Direct(Arc<Pipeline>, String),
    Server {
        client: reqwest::Client,
        /// The server's URL with the collection's prefix.
        url: String,
        /// Sent as `Authorization: Bearer` (a write key), when given.
        api_key: Option<String>,
    },
}

/// Every file under `paths`, hidden files and folders left out, in a stable
/// order, each with its document id: its path relative to the folder given
/// (`sub/a.md` for `docs/sub/a.md` fed as `docs`), or its file name for a file
/// given by itself. Ids so made stay the same when the folder moves or is fed
/// through another path (`~/docs`, `./docs`, `/home/me/docs`), so feeding it
/// again finds the documents unchanged. Two files that would get one id (the
/// same relative path under two folders given) are refused before anything is
/// sent.
fn collect(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    let mut seen: std::collections::HashMap<String, PathBuf> = std::collections::HashMap::new();
    for root in paths {
        if !root.exists() {
            anyhow::bail!("{} does not exist", root.display());
        }
        let walker = walkdir::WalkDir::new(root)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| {
                e.depth() == 0 || !e.file_name().to_str().is_some_and(|n| n.starts_with('.'))
            });
        for entry in walker {
            let entry = entry.with_context(|| format!("walking {}", root.display()))?;
            if !entry.file_type().is_file() {
                continue;
            }
            let id = id_of(root, entry.path());
            if let Some(other) = seen.insert(id.clone(), entry.path().to_path_buf()) {
                anyhow::bail!(
                    "{} and {} would both be the document {id:?}: ingest the folders one at a time, or give their parent",
                    other.display(),
                    entry.path().display()
                );
            }
            files.push((entry.into_path(), id));
        }
    }
    Ok(files)
}

/// The id of `path`, found under `root`: the path relative to `root` with
/// `/` between its parts, or the file name when `root` is the file itself.
fn id_of(root: &Path, path: &Path) -> String {
    let relative = match path.strip_prefix(root) {
        Ok(r) if !r.as_os_str().is_empty() => r,
        _ => Path::new(path.file_name().unwrap_or(path.as_os_str())),
    };
    relative
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Runs the command; returns whether every file went in.
pub(crate) async fn run(
    paths: Vec<PathBuf>,
    url: Option<String>,
    api_key: Option<String>,
    collection: Option<String>,
    config: Config,
) -> Result<bool> {
    if let Some(why) = collection
        .as_deref()
        .and_then(ragd_core::invalid_collection_name)
    {
        anyhow::bail!("--collection: {why}");
    }
    let files = collect(&paths)?;
    if files.is_empty() {
        anyhow::bail!(
            "no files found under {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let target = match url {
        Some(url) => Target::Server {
            client: reqwest::Client::new(),
            url: format!(
                "{}{}",
                url.trim_end_matches('/'),
                crate::cli_cmd::collection_prefix(collection.as_deref())
            ),
            api_key: api_key.filter(|k| !k.is_empty()),
        },
        None => Target::Direct(
            ragd::open_for_ingest(config).await?,
            collection.unwrap_or_else(|| ragd_core::DEFAULT_COLLECTION.into()),
        ),
    };
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} files {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let (mut created, mut updated, mut unchanged, mut failed) = (0, 0, 0, Vec::new());
    let mut batch: Vec<UploadedFile> = Vec::new();
    let mut batch_bytes = 0;
    let mut index = 0;
    while index < files.len() || !batch.is_empty() {
        let flush =
            index == files.len() || batch.len() >= BATCH_FILES || batch_bytes >= BATCH_BYTES;
        if !flush {
            let (path, id) = &files[index];
            index += 1;
            match std::fs::read(path) {
                Ok(bytes) => {
                    batch_bytes += bytes.len();
                    batch.push(UploadedFile {
                        name: id.clone(),
                        content_type: None,
                        bytes,
                    });
                }
                Err(e) => {
                    failed.push((id.clone(), e.to_string()));
                    bar.inc(1);
                }
            }
            continue;
        }
        let sent: Vec<UploadedFile> = std::mem::take(&mut batch);
        batch_bytes = 0;
        let names: Vec<String> = sent.iter().map(|f| f.name.clone()).collect();
        let n = sent.len() as u64;
        match send(&target, sent).await {
            Ok(docs) => {
                for d in docs {
                    match d["status"].as_str() {
                        Some("created") => created += 1,
                        Some("updated") => updated += 1,
                        Some("unchanged") => unchanged += 1,
                        _ => failed.push((
                            d["id"].as_str().unwrap_or("?").to_string(),
                            d["error"].as_str().unwrap_or("failed").to_string(),
                        )),
                    }
                }
            }
            Err(e) => failed.extend(names.into_iter().map(|name| (name, format!("{e:#}")))),
        }
        bar.inc(n);
        bar.set_message(format!(
            "{created} created, {updated} updated, {unchanged} unchanged, {} failed",
            failed.len()
        ));
    }
    bar.finish_and_clear();
    if let Target::Direct(engine, _) = &target {
        if let Err(e) = engine.flush().await {
            eprintln!("warning: cannot write the index dump: {e}");
        }
    }
    for (id, why) in &failed {
        eprintln!("failed: {id}: {why}");
    }
    println!(
        "{} files in {:.1} s: {created} created, {updated} updated, {unchanged} unchanged, {} failed",
        files.len(),
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    Ok(failed.is_empty())
}

async fn send(target: &Target, files: Vec<UploadedFile>) -> Result<Vec<Value>> {
    let body: Value = match target {
        Target::Direct(engine, collection) => serde_json::to_value(
            engine
                .ingest_files_into(collection, files)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )?,
        Target::Server {
            client,
            url,
            api_key,
        } => {
            let mut form = reqwest::multipart::Form::new();
            for f in files {
                form = form.part(
                    "file",
                    reqwest::multipart::Part::bytes(f.bytes).file_name(f.name),
                );
            }
            let mut req = client.post(format!("{url}/ingest")).multipart(form);
            if let Some(k) = api_key {
                req = req.bearer_auth(k);
            }
            let res = req.send().await.context("sending to the server")?;
            let status = res.status();
            let body: Value = res.json().await.context("reading the server's answer")?;
            if !status.is_success() {
                anyhow::bail!(
                    "the server answered {status}: {}",
                    body["error"].as_str().unwrap_or("")
                );
            }
            body
        }
    };
    Ok(body["documents"].as_array().cloned().unwrap_or_default())
}
