//! `ragd eval retrieval --dataset DIR`: retrieval quality on a BEIR folder.
//!
//! Ingests `corpus.jsonl` into a fresh data directory (or `--data-dir`, kept),
//! runs every query of `qrels/test.tsv` through the same path as `POST /search`,
//! and prints
//! nDCG@10, recall@1/5/10 and MRR@10 per mode (document-level: a document's
//! rank is that of its best chunk), plus queries/s.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use ragd::Config;
use ragd_pipeline::{IngestRequest, SearchRequest};
use serde_json::{json, Value};

/// The JSON values of a `.jsonl` file, one per non-empty line.
pub(crate) fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// Metrics of one ranked list of document ids against the relevant set.
fn metrics(ranked: &[String], relevant: &HashSet<String>) -> [f64; 5] {
    let hit = |i: usize| ranked.get(i).is_some_and(|d| relevant.contains(d));
    let dcg: f64 = (0..10)
        .filter(|&i| hit(i))
        .map(|i| 1.0 / (i as f64 + 2.0).log2())
        .sum();
    let idcg: f64 = (0..relevant.len().min(10))
        .map(|i| 1.0 / (i as f64 + 2.0).log2())
        .sum();
    let recall =
        |k: usize| (0..k).filter(|&i| hit(i)).count() as f64 / relevant.len().max(1) as f64;
    let mrr = (0..10)
        .find(|&i| hit(i))
        .map(|i| 1.0 / (i as f64 + 1.0))
        .unwrap_or(0.0);
    [
        if idcg > 0.0 { dcg / idcg } else { 0.0 },
        recall(1),
        recall(5),
        recall(10),
        mrr,
    ]
}

pub(crate) async fn run(
    dataset: &Path,
    modes: &[String],
    json_out: bool,
    mut config: Config,
    data_dir: Option<PathBuf>,
) -> Result<()> {
    let corpus = read_jsonl(&dataset.join("corpus.jsonl"))?;
    let queries: HashMap<String, String> = read_jsonl(&dataset.join("queries.jsonl"))?
        .into_iter()
        .filter_map(|q| {
            Some((
                q["_id"].as_str()?.to_string(),
                q["text"].as_str()?.to_string(),
            ))
        })
        .collect();
    let qrels_text = std::fs::read_to_string(dataset.join("qrels/test.tsv"))
        .context("reading qrels/test.tsv")?;
    let mut qrels: HashMap<String, HashSet<String>> = HashMap::new();
    for line in qrels_text.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() >= 3 && cols[2].trim().parse::<f64>().unwrap_or(0.0) > 0.0 {
            qrels
                .entry(cols[0].to_string())
                .or_default()
                .insert(cols[1].to_string());
        }
    }
    let mut query_ids: Vec<&String> = qrels.keys().filter(|q| queries.contains_key(*q)).collect();
    query_ids.sort();

    let temporary = data_dir.is_none();
    let data = data_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ragd-eval-{}", std::process::id())));
    if temporary {
        let _ = std::fs::remove_dir_all(&data);
    }
    config.server.data_dir = data.clone();
    let engine = ragd::open_for_ingest(config).await?;
    let started = Instant::now();
    for batch in corpus.chunks(256) {
        let documents = batch
            .iter()
            .map(|d| {
                serde_json::from_value(
                    json!({ "id": d["_id"], "title": d["title"], "text": d["text"],
                    "metadata": d.get("metadata").cloned().unwrap_or(json!({})) }),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        engine
            .ingest(IngestRequest { documents })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    eprintln!(
        "ingested {} documents in {:.1} s",
        corpus.len(),
        started.elapsed().as_secs_f64()
    );

    let mut report = Vec::new();
    for mode in modes {
        let started = Instant::now();
        let mut sums = [0.0f64; 5];
        for qid in &query_ids {
            let req = SearchRequest {
                query: queries[*qid].clone(),
                top_k: Some(50),
                filter: None,
                mode: Some(mode.clone()),
            };
            let res = engine
                .search(req)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut seen = HashSet::new();
            let ranked: Vec<String> = res
                .results
                .into_iter()
                .map(|r| r.document_id)
                .filter(|d| seen.insert(d.clone()))
                .collect();
            for (s, m) in sums.iter_mut().zip(metrics(&ranked, &qrels[*qid])) {
                *s += m;
            }
        }
        let n = query_ids.len().max(1) as f64;
        let secs = started.elapsed().as_secs_f64();
        report.push(json!({
            "mode": mode, "queries": query_ids.len(),
            "ndcg@10": sums[0] / n, "recall@1": sums[1] / n, "recall@5": sums[2] / n,
            "recall@10": sums[3] / n, "mrr@10": sums[4] / n, "queries_per_s": n / secs,
        }));
    }
    if temporary {
        let _ = std::fs::remove_dir_all(&data);
    } else {
        engine.flush().await?;
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "dataset": dataset.display().to_string(), "modes": report })
            )?
        );
    } else {
        println!(
            "{}: {} documents, {} queries",
            dataset.display(),
            corpus.len(),
            query_ids.len()
        );
        println!(
            "{:<8} {:>8} {:>9} {:>9} {:>9} {:>7} {:>10}",
            "mode", "nDCG@10", "recall@1", "recall@5", "recall@10", "MRR@10", "queries/s"
        );
        for r in &report {
            println!(
                "{:<8} {:>8.4} {:>9.4} {:>9.4} {:>9.4} {:>7.4} {:>10.1}",
                r["mode"].as_str().unwrap_or(""),
                r["ndcg@10"].as_f64().unwrap_or(0.0),
                r["recall@1"].as_f64().unwrap_or(0.0),
                r["recall@5"].as_f64().unwrap_or(0.0),
                r["recall@10"].as_f64().unwrap_or(0.0),
                r["mrr@10"].as_f64().unwrap_or(0.0),
                r["queries_per_s"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_known_rankings() {
        let rel: HashSet<String> = ["b".to_string()].into();
        let ranked: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let [ndcg, r1, r5, r10, mrr] = metrics(&ranked, &rel);
        assert!((ndcg - 1.0 / 3f64.log2()).abs() < 1e-12);
        assert_eq!((r1, r5, r10, mrr), (0.0, 1.0, 1.0, 0.5));
        assert_eq!(metrics(&["b".to_string()], &rel), [1.0, 1.0, 1.0, 1.0, 1.0]);
        assert_eq!(metrics(&[], &rel), [0.0; 5]);
    }
}
