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

/// A BEIR folder's queries by id and relevant documents by query id.
pub(crate) struct Dataset {
    pub corpus: Vec<Value>,
    pub queries: HashMap<String, String>,
    pub qrels: HashMap<String, HashSet<String>>,
}

impl Dataset {
    pub(crate) fn read(dataset: &Path) -> Result<Self> {
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
        Ok(Self {
            corpus,
            queries,
            qrels,
        })
    }

    /// The ids of the queries with relevant documents, sorted.
    pub(crate) fn query_ids(&self) -> Vec<&String> {
        let mut ids: Vec<&String> = self
            .qrels
            .keys()
            .filter(|q| self.queries.contains_key(*q))
            .collect();
        ids.sort();
        ids
    }
}

/// A pipeline over the corpus ingested into `data_dir` (or a temporary
/// directory, removed by [`Ingested::finish`]).
pub(crate) struct Ingested {
    pub engine: std::sync::Arc<ragd_pipeline::Pipeline>,
    data: PathBuf,
    temporary: bool,
}

impl Ingested {
    pub(crate) async fn open(
        corpus: &[Value],
        mut config: Config,
        data_dir: Option<PathBuf>,
    ) -> Result<Self> {
        let temporary = data_dir.is_none();
        let data = data_dir.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("ragd-eval-{}", std::process::id()))
        });
        if temporary {
            let _ = std::fs::remove_dir_all(&data);
        }
        config.server.data_dir = data.clone();
        // The answer model only when retrieval uses it (open_for_ingest
        // loads it for ingest.generate_questions).
        let engine = if config.retrieval.translate_queries {
            ragd::open_for_eval(config).await?
        } else {
            ragd::open_for_ingest(config).await?
        };
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
        // A store shared with other documents (a PostgreSQL database, a kept
        // data directory) would rank them too: the figures would not be this
        // set's.
        let ids: std::collections::HashSet<&str> =
            corpus.iter().filter_map(|d| d["_id"].as_str()).collect();
        let stored = engine.status().await.documents.unwrap_or(0);
        anyhow::ensure!(
            stored <= ids.len(),
            "the store holds {stored} documents, the set {}: evaluate on an empty store (a new \
             data directory, or for store.backend = \"postgres\" an empty database)",
            ids.len()
        );
        Ok(Self {
            engine,
            data,
            temporary,
        })
    }

    /// Removes a temporary data directory; flushes a kept one.
    pub(crate) async fn finish(self) -> Result<()> {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.data);
        } else {
            self.engine.flush().await?;
        }
        Ok(())
    }
}

pub(crate) async fn run(
    dataset: &Path,
    modes: &[String],
    json_out: bool,
    config: Config,
    data_dir: Option<PathBuf>,
) -> Result<()> {
    let set = Dataset::read(dataset)?;
    let (corpus, queries, qrels) = (&set.corpus, &set.queries, &set.qrels);
    let query_ids = set.query_ids();
    let ingested = Ingested::open(corpus, config, data_dir).await?;
    let engine = &ingested.engine;
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
            let m = metrics(&ranked, &qrels[*qid]);
            if std::env::var_os("RAGD_EVAL_MISSES").is_some() && m[2] < 1.0 {
                // A development aid: which queries miss at 5, and what came first.
                eprintln!(
                    "miss@5 {mode} {qid}: {:?} → {:?} (want {:?})",
                    queries[*qid],
                    &ranked[..ranked.len().min(5)],
                    qrels[*qid]
                );
            }
            for (s, m) in sums.iter_mut().zip(m) {
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
    ingested.finish().await?;
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
