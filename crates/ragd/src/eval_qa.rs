//! `ragd eval qa --dataset DIR`: answer quality over a `qa.jsonl`.
//!
//! Starts ragd in-process on a fresh data directory (or `--data-dir`, kept),
//! ingests the folder's `corpus.jsonl`, asks every question of `qa.jsonl`
//! (`question`, reference `answers`, relevant `doc_ids`) through `POST /ask`
//! with the default settings, then the questions of an unanswerable set (topics
//! absent from the corpus; `eval/unanswerable.jsonl` unless `--unanswerable`),
//! and prints per run:
//!
//! * answer token-F1 and ROUGE-L (F1 of the longest common subsequence) against
//!   the best-matching reference, over answered answerable questions;
//! * citation precision: cited passages whose document is relevant, over all
//!   citations of answerable questions;
//! * citation recall: answerable questions whose answer cites a relevant
//!   document;
//! * how many answerable questions were answered and how many unanswerable
//!   ones were declined (`answerable: false`);
//! * latency and time to first token, p50 and p95.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use crate::eval_cmd::read_jsonl;
use anyhow::Result;
use ragd::Config;
use serde_json::{json, Value};

/// Lower-cased words without punctuation; Han characters are words of their own.
pub(crate) fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if is_han(c) {
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            out.push(c.to_string());
        } else if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
        } else if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

fn is_han(c: char) -> bool {
    matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0xF900..=0xFAFF)
}

/// SQuAD-style token F1 (bag of words).
pub(crate) fn token_f1(answer: &[String], reference: &[String]) -> f64 {
    if answer.is_empty() || reference.is_empty() {
        return 0.0;
    }
    let mut counts: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for t in reference {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0;
    for t in answer {
        if let Some(c) = counts.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let p = common as f64 / answer.len() as f64;
    let r = common as f64 / reference.len() as f64;
    2.0 * p * r / (p + r)
}

/// ROUGE-L F1: the longest common subsequence of words.
pub(crate) fn rouge_l(answer: &[String], reference: &[String]) -> f64 {
    if answer.is_empty() || reference.is_empty() {
        return 0.0;
    }
    let mut prev = vec![0usize; reference.len() + 1];
    let mut cur = vec![0usize; reference.len() + 1];
    for a in answer {
        for (j, r) in reference.iter().enumerate() {
            cur[j + 1] = if a == r {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let lcs = prev[reference.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let p = lcs / answer.len() as f64;
    let r = lcs / reference.len() as f64;
    2.0 * p * r / (p + r)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// What one answer says, as the evaluation reads it.
struct Outcome {
    declined: bool,
    answer: String,
    cited_docs: Vec<String>,
    latency_s: f64,
    first_token_s: Option<f64>,
}

fn outcome(res: &Value, latency_s: f64) -> Outcome {
    Outcome {
        declined: res["answerable"] == json!(false) || res["finish_reason"] == "no_sources",
        answer: res["answer"].as_str().unwrap_or_default().to_string(),
        cited_docs: res["citations"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|c| c["document_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        latency_s,
        first_token_s: res["timings"]["first_token_ms"].as_f64().map(|ms| ms / 1e3),
    }
}

pub(crate) struct Args {
    pub dataset: PathBuf,
    pub unanswerable: Option<PathBuf>,
    pub limit: Option<usize>,
    pub json: bool,
    pub data_dir: Option<PathBuf>,
    pub answers_out: Option<PathBuf>,
}

pub(crate) async fn run(args: Args, mut config: Config) -> Result<()> {
    let qa = read_jsonl(&args.dataset.join("qa.jsonl"))?;
    let unanswerable_path = args
        .unanswerable
        .clone()
        .unwrap_or_else(|| PathBuf::from("eval/unanswerable.jsonl"));
    let unanswerable = read_jsonl(&unanswerable_path)?;
    let limit = args.limit.unwrap_or(usize::MAX);
    let corpus = read_jsonl(&args.dataset.join("corpus.jsonl"))?;

    let (data, temporary) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("ragd-eval-qa-{}", std::process::id())),
            true,
        ),
    };
    config.server.data_dir = data.clone();
    config.server.port = 0;
    let mut server = ragd::start(config).await?;
    server.wait_ready().await?;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()?;
    let started = Instant::now();
    for batch in corpus.chunks(256) {
        let documents: Vec<Value> = batch
            .iter()
            .map(|d| {
                json!({ "id": d["_id"], "title": d["title"], "text": d["text"],
                             "metadata": d.get("metadata").cloned().unwrap_or(json!({})) })
            })
            .collect();
        let res = client
            .post(format!("{base}/ingest"))
            .json(&json!({ "documents": documents }))
            .send()
            .await?;
        anyhow::ensure!(
            res.status().is_success(),
            "/ingest answered {}: {}",
            res.status(),
            res.text().await?
        );
    }
    eprintln!(
        "ingested {} documents in {:.1} s",
        corpus.len(),
        started.elapsed().as_secs_f64()
    );

    let mut answers_out = Vec::new();
    let ask = |question: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let t = Instant::now();
            let res = client
                .post(format!("{base}/ask"))
                .json(&json!({ "question": question }))
                .send()
                .await?;
            let status = res.status();
            let body: Value = res.json().await?;
            anyhow::ensure!(status.is_success(), "/ask answered {status}: {body}");
            Ok::<_, anyhow::Error>((body, t.elapsed().as_secs_f64()))
        }
    };

    let (mut f1, mut rouge, mut answered, mut asked) = (Vec::new(), Vec::new(), 0usize, 0usize);
    let (mut cited, mut cited_relevant, mut recall_hits) = (0usize, 0usize, 0usize);
    let (mut latency, mut ttft) = (Vec::new(), Vec::new());
    for q in qa.iter().take(limit) {
        let question = q["question"].as_str().unwrap_or_default().to_string();
        let relevant: HashSet<String> = q["doc_ids"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let (res, secs) = ask(question.clone()).await?;
        let o = outcome(&res, secs);
        asked += 1;
        latency.push(o.latency_s);
        ttft.extend(o.first_token_s);
        if !o.declined {
            answered += 1;
            let toks = tokens(&o.answer);
            let refs: Vec<Vec<String>> = q["answers"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).map(tokens).collect())
                .unwrap_or_default();
            f1.push(refs.iter().map(|r| token_f1(&toks, r)).fold(0.0, f64::max));
            rouge.push(refs.iter().map(|r| rouge_l(&toks, r)).fold(0.0, f64::max));
        }
        cited += o.cited_docs.len();
        cited_relevant += o
            .cited_docs
            .iter()
            .filter(|d| relevant.contains(*d))
            .count();
        if o.cited_docs.iter().any(|d| relevant.contains(d)) {
            recall_hits += 1;
        }
        eprintln!(
            "{:>3}/{} {} {:.1} s {:?} cites {:?} (relevant {:?})",
            asked,
            qa.len().min(limit),
            if o.declined { "declined" } else { "answered" },
            secs,
            question,
            o.cited_docs,
            relevant
        );
        answers_out.push(
            json!({ "id": q["id"], "question": question, "answerable": true, "response": res }),
        );
    }
    let (mut declined, mut asked_un) = (0usize, 0usize);
    for q in unanswerable.iter().take(limit) {
        let question = q["question"].as_str().unwrap_or_default().to_string();
        let (res, secs) = ask(question.clone()).await?;
        let o = outcome(&res, secs);
        asked_un += 1;
        latency.push(o.latency_s);
        ttft.extend(o.first_token_s);
        if o.declined {
            declined += 1;
        }
        eprintln!(
            "{:>3}/{} (unanswerable) {} {:.1} s {:?}",
            asked_un,
            unanswerable.len().min(limit),
            if o.declined { "declined" } else { "answered" },
            secs,
            question
        );
        answers_out.push(
            json!({ "id": q["id"], "question": question, "answerable": false, "response": res }),
        );
    }
    server.shutdown().await?;
    if temporary {
        let _ = std::fs::remove_dir_all(&data);
    }
    if let Some(path) = &args.answers_out {
        let lines: Vec<String> = answers_out.iter().map(|v| v.to_string()).collect();
        std::fs::write(path, lines.join("\n") + "\n")?;
    }

    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let ratio = |a: usize, b: usize| {
        if b == 0 {
            f64::NAN
        } else {
            a as f64 / b as f64
        }
    };
    let report = json!({
        "dataset": args.dataset.display().to_string(),
        "answerable_questions": asked,
        "unanswerable_questions": asked_un,
        "token_f1": mean(&f1),
        "rouge_l": mean(&rouge),
        "citation_precision": ratio(cited_relevant, cited),
        "citation_recall": ratio(recall_hits, asked),
        "answered_rate": ratio(answered, asked),
        "abstention_rate": ratio(declined, asked_un),
        "latency_p50_s": percentile(&latency, 0.5),
        "latency_p95_s": percentile(&latency, 0.95),
        "first_token_p50_s": percentile(&ttft, 0.5),
        "first_token_p95_s": percentile(&ttft, 0.95),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {asked} answerable questions, {asked_un} unanswerable ({})",
        args.dataset.display(),
        unanswerable_path.display()
    );
    for (label, key) in [
        ("answer token F1", "token_f1"),
        ("answer ROUGE-L", "rouge_l"),
        ("citation precision", "citation_precision"),
        ("citation recall", "citation_recall"),
        ("answerable questions answered", "answered_rate"),
        ("unanswerable questions declined", "abstention_rate"),
        ("latency p50 s", "latency_p50_s"),
        ("latency p95 s", "latency_p95_s"),
        ("time to first token p50 s", "first_token_p50_s"),
        ("time to first token p95 s", "first_token_p95_s"),
    ] {
        println!(
            "{label:<34} {:>8.3}",
            report[key].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f1_and_rouge_of_known_pairs() {
        let a = tokens("The cat sat on the mat.");
        let r = tokens("the cat is on the mat");
        // common: the, cat, on, the, mat = 5 of 6 and 6
        assert!((token_f1(&a, &r) - 5.0 / 6.0).abs() < 1e-12);
        // LCS: the cat on the mat = 5
        assert!((rouge_l(&a, &r) - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(token_f1(&a, &tokens("dogs bark")), 0.0);
        assert_eq!(rouge_l(&[], &r), 0.0);
        assert_eq!(tokens("北京是首都"), vec!["北", "京", "是", "首", "都"]);
        assert_eq!(rouge_l(&tokens("a b c"), &tokens("c b a")), 1.0 / 3.0);
    }
}
