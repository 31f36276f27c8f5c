//! `ragd bench sources`: sync throughput of a folder source. A corpus is
//! written out as one Markdown file per document, registered as a folder
//! source of a fresh service, and synced three times: cold (every file new),
//! unchanged (nothing read again: modification time and size), and changed
//! (a share of the files edited, a few deleted, a few added).

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::bench_cmd::{config_from, corpus_texts};

/// What to measure.
pub(crate) struct Args<'a> {
    pub corpus: &'a Path,
    pub limit: usize,
    pub changed: f64,
    pub config: Option<&'a Path>,
}

fn write_doc(dir: &Path, d: &Value, extra: &str) -> Result<()> {
    let id = d["_id"].as_str().unwrap_or("doc");
    let title = d["title"].as_str().unwrap_or(id);
    let text = d["text"].as_str().unwrap_or("");
    std::fs::write(
        dir.join(format!("{id}.md")),
        format!("# {title}\n\n{text}{extra}\n"),
    )?;
    Ok(())
}

fn line(phase: &str, r: &ragd_sources::SyncReport, files: usize) {
    println!(
        "{phase:<10} {files:>6} files {:>8.3} s {:>9.1} files/s  created {:>5} updated {:>5} unchanged {:>6} deleted {:>4} failed {:>3}  embedded {:>6} chunks ({:.1}/s)",
        r.seconds,
        files as f64 / r.seconds.max(1e-9),
        r.created,
        r.updated,
        r.unchanged,
        r.deleted,
        r.failed,
        r.embedded,
        r.embedded as f64 / r.seconds.max(1e-9),
    );
}

/// Runs the three syncs and prints a line for each.
pub(crate) async fn run(args: Args<'_>) -> Result<()> {
    let base = std::env::temp_dir().join(format!("ragd-bench-sources-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let folder = base.join("files");
    std::fs::create_dir_all(&folder)?;
    let mut docs = corpus_texts(args.corpus)?;
    if args.limit > 0 {
        docs.truncate(args.limit);
    }
    anyhow::ensure!(docs.len() >= 10, "the corpus has fewer than 10 documents");
    // A hundredth held back, to be added in the changed sync.
    let held = (docs.len() / 100).max(1);
    let (first, added) = docs.split_at(docs.len() - held);
    for d in first {
        write_doc(&folder, d, "")?;
    }
    let mut config = config_from(args.config)?;
    config.server.data_dir = base.join("data");
    config.server.port = 0;
    config.sources.schedule = false;
    config.sources.declare = vec![ragd_sources::SourceSpec {
        name: "bench".into(),
        url: None,
        path: Some(folder.display().to_string()),
        kind: ragd_sources::SourceKind::Folder,
        collection: None,
        interval_s: Some(0),
        watch: false,
    }];
    println!(
        "store {}, embedder {}; {} files from {}",
        config.store.backend,
        config.models.embedder.display(),
        first.len(),
        args.corpus.display()
    );
    let mut server = ragd::start(config).await?;
    server.wait_ready().await?;
    let sources = server
        .state
        .sources
        .get()
        .context("the sources did not start")?
        .clone();
    let cold = sources.sync("bench").await?;
    anyhow::ensure!(cold.error.is_none(), "cold sync: {:?}", cold.error);
    line("cold", &cold, first.len());
    let same = sources.sync("bench").await?;
    line("unchanged", &same, first.len());
    // Edit a share of the files (a sentence appended: one chunk changes),
    // delete as many as are added.
    let step = ((1.0 / args.changed.clamp(0.001, 1.0)) as usize).max(1);
    let mut edited = 0;
    for (i, d) in first.iter().enumerate() {
        if i % step == 0 {
            write_doc(
                &folder,
                d,
                "\n\nThis paragraph was added after the first sync.",
            )?;
            edited += 1;
        }
    }
    for d in first.iter().rev().take(held) {
        let id = d["_id"].as_str().unwrap_or("doc");
        std::fs::remove_file(folder.join(format!("{id}.md")))?;
    }
    for d in added {
        write_doc(&folder, d, "")?;
    }
    let changed = sources.sync("bench").await?;
    println!("({edited} files edited, {held} deleted, {held} added)");
    line("changed", &changed, first.len());
    let same = sources.sync("bench").await?;
    line("unchanged", &same, first.len());
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
