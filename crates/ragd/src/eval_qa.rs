//! `ragd eval qa --dataset DIR`: answer quality over a `qa.jsonl`.
//!
//! Starts ragd in-process on a fresh data directory (or `--data-dir`, kept),
//! ingests the folder's `corpus.jsonl`, asks every question of `qa.jsonl`
//! (`question`, reference `answers`, relevant `doc_ids`) through `POST /ask`
//! with the default settings, then the questions of one or more unanswerable
//! sets (`eval/unanswerable.jsonl`, topics far from the corpus, and
//! `eval/unanswerable-near.jsonl`, technology questions it does not answer,
//! unless `--unanswerable` names others), and prints, overall and per
//! question language:
//!
//! * answer token-F1 and ROUGE-L (F1 of the longest common subsequence) against
//!   the best-matching reference, over answered answerable questions;
//! * citation precision: cited passages whose document is relevant, over all
//!   citations of answerable questions;
//! * citation recall: answerable questions whose answer cites a relevant
//!   document;
//! * how many answerable questions were answered and how many unanswerable
//!   ones were declined (`answerable: false`), per unanswerable file too;
//! * what was delivered (`answer_kind`: generated, extractive, declined) and
//!   the share of delivered answers the passages do not support (grounding
//!   not `supported`) — the answers given as fact without backing;
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
    /// `generated`, `extractive` or `declined`.
    kind: String,
    /// Whether the delivered answer's grounding says it is supported.
    supported: bool,
    /// The question's language, as ragd detected it.
    language: String,
}

fn outcome(res: &Value, latency_s: f64) -> Outcome {
    Outcome {
        kind: res["answer_kind"].as_str().unwrap_or("unknown").to_string(),
        supported: res["grounding"]["supported"] == json!(true),
        language: res["language"]["question"]
            .as_str()
            .unwrap_or("?")
            .to_string(),
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

/// One question's result, for the figures.
struct Record {
    /// `answerable`, or the unanswerable file it came from.
    set: String,
    outcome: Outcome,
    /// Answerable questions: best token F1 and ROUGE-L when answered.
    f1: Option<f64>,
    rouge: Option<f64>,
    /// Answerable questions: citations, and those of a relevant document.
    cited: usize,
    cited_relevant: usize,
}

pub(crate) struct Args {
    pub dataset: PathBuf,
    pub unanswerable: Vec<PathBuf>,
    pub limit: Option<usize>,
    pub json: bool,
    pub data_dir: Option<PathBuf>,
    pub answers_out: Option<PathBuf>,
}

pub(crate) async fn run(args: Args, mut config: Config) -> Result<()> {
    let qa = read_jsonl(&args.dataset.join("qa.jsonl"))?;
    let mut unanswerable = Vec::new();
    for path in &args.unanswerable {
        unanswerable.push((path.display().to_string(), read_jsonl(path)?));
    }
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

    let mut records: Vec<Record> = Vec::new();
    let total = qa.len().min(limit);
    for (n, q) in qa.iter().take(limit).enumerate() {
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
        let (mut f1, mut rouge) = (None, None);
        if !o.declined {
            let toks = tokens(&o.answer);
            let refs: Vec<Vec<String>> = q["answers"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).map(tokens).collect())
                .unwrap_or_default();
            f1 = Some(refs.iter().map(|r| token_f1(&toks, r)).fold(0.0, f64::max));
            rouge = Some(refs.iter().map(|r| rouge_l(&toks, r)).fold(0.0, f64::max));
        }
        let cited_relevant = o
            .cited_docs
            .iter()
            .filter(|d| relevant.contains(*d))
            .count();
        eprintln!(
            "{:>3}/{total} {} {:.1} s {:?} cites {:?} (relevant {:?})",
            n + 1,
            o.kind,
            secs,
            question,
            o.cited_docs,
            relevant
        );
        answers_out.push(
            json!({ "id": q["id"], "question": question, "answerable": true, "response": res }),
        );
        records.push(Record {
            set: "answerable".into(),
            cited: o.cited_docs.len(),
            cited_relevant,
            outcome: o,
            f1,
            rouge,
        });
    }
    for (file, questions) in &unanswerable {
        let total = questions.len().min(limit);
        for (n, q) in questions.iter().take(limit).enumerate() {
            let question = q["question"].as_str().unwrap_or_default().to_string();
            let (res, secs) = ask(question.clone()).await?;
            let o = outcome(&res, secs);
            eprintln!(
                "{:>3}/{total} (unanswerable, {file}) {} {:.1} s {:?}",
                n + 1,
                o.kind,
                secs,
                question
            );
            answers_out.push(
                json!({ "id": q["id"], "question": question, "answerable": false, "response": res }),
            );
            records.push(Record {
                set: file.clone(),
                outcome: o,
                f1: None,
                rouge: None,
                cited: 0,
                cited_relevant: 0,
            });
        }
    }
    server.shutdown().await?;
    if temporary {
        let _ = std::fs::remove_dir_all(&data);
    }
    if let Some(path) = &args.answers_out {
        let lines: Vec<String> = answers_out.iter().map(|v| v.to_string()).collect();
        std::fs::write(path, lines.join("\n") + "\n")?;
    }

    let files: Vec<String> = unanswerable.iter().map(|(f, _)| f.clone()).collect();
    let overall = figures(&records, &files, |_| true);
    let mut languages: Vec<String> = records.iter().map(|r| r.outcome.language.clone()).collect();
    languages.sort();
    languages.dedup();
    let by_language: serde_json::Map<String, Value> = languages
        .iter()
        .map(|l| {
            (
                l.clone(),
                figures(&records, &files, |r| &r.outcome.language == l),
            )
        })
        .collect();
    let mut report = overall.clone();
    report["dataset"] = json!(args.dataset.display().to_string());
    report["by_language"] = Value::Object(by_language.clone());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {} answerable questions, {} unanswerable ({})",
        args.dataset.display(),
        overall["answerable_questions"],
        overall["unanswerable_questions"],
        files.join(", ")
    );
    let mut columns = vec![("all".to_string(), overall)];
    columns.extend(by_language);
    print!("{:<38}", "");
    for (name, _) in &columns {
        print!(" {name:>8}");
    }
    println!();
    let mut rows: Vec<(String, String)> = vec![
        ("answerable questions".into(), "answerable_questions".into()),
        (
            "unanswerable questions".into(),
            "unanswerable_questions".into(),
        ),
        ("answer token F1".into(), "token_f1".into()),
        ("answer ROUGE-L".into(), "rouge_l".into()),
        ("citation precision".into(), "citation_precision".into()),
        ("citation recall".into(), "citation_recall".into()),
        (
            "answerable questions answered".into(),
            "answered_rate".into(),
        ),
        (
            "unanswerable questions declined".into(),
            "abstention_rate".into(),
        ),
    ];
    for f in &files {
        rows.push((
            format!("  declined, {}", short(f)),
            format!("abstention_rate:{f}"),
        ));
    }
    rows.extend([
        (
            "delivered answers unsupported".into(),
            "unsupported_delivered_rate".into(),
        ),
        ("answers generated".into(), "kind:generated".into()),
        ("answers extractive".into(), "kind:extractive".into()),
        ("answers declined".into(), "kind:declined".into()),
        ("latency p50 s".into(), "latency_p50_s".into()),
        ("latency p95 s".into(), "latency_p95_s".into()),
        (
            "time to first token p50 s".into(),
            "first_token_p50_s".into(),
        ),
        (
            "time to first token p95 s".into(),
            "first_token_p95_s".into(),
        ),
    ]);
    for (label, key) in rows {
        print!("{label:<38}");
        for (_, c) in &columns {
            let v = match key.split_once(':') {
                Some((group, name)) => {
                    &c[if group == "kind" {
                        "answer_kinds"
                    } else {
                        "abstention_by_file"
                    }][name]
                }
                None => &c[key.as_str()],
            };
            match v.as_f64() {
                Some(x) if v.is_u64() => print!(" {:>8}", x as u64),
                Some(x) => print!(" {x:>8.3}"),
                None => print!(" {:>8}", "-"),
            }
        }
        println!();
    }
    Ok(())
}

/// The file name alone, for a row label.
fn short(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The figures over the records `keep` selects.
fn figures(records: &[Record], files: &[String], keep: impl Fn(&Record) -> bool) -> Value {
    let chosen: Vec<&Record> = records.iter().filter(|r| keep(r)).collect();
    let answerable: Vec<&&Record> = chosen.iter().filter(|r| r.set == "answerable").collect();
    let unanswerable: Vec<&&Record> = chosen.iter().filter(|r| r.set != "answerable").collect();
    let mean = |v: Vec<f64>| {
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
    let cited: usize = answerable.iter().map(|r| r.cited).sum();
    let cited_relevant: usize = answerable.iter().map(|r| r.cited_relevant).sum();
    let delivered: Vec<&&Record> = chosen.iter().filter(|r| !r.outcome.declined).collect();
    let latency: Vec<f64> = chosen.iter().map(|r| r.outcome.latency_s).collect();
    let ttft: Vec<f64> = chosen
        .iter()
        .filter_map(|r| r.outcome.first_token_s)
        .collect();
    let mut kinds = serde_json::Map::new();
    for r in &chosen {
        let n = kinds.entry(r.outcome.kind.clone()).or_insert(json!(0));
        *n = json!(n.as_u64().unwrap_or(0) + 1);
    }
    let by_file: serde_json::Map<String, Value> = files
        .iter()
        .map(|f| {
            let asked = unanswerable.iter().filter(|r| &r.set == f).count();
            let declined = unanswerable
                .iter()
                .filter(|r| &r.set == f && r.outcome.declined)
                .count();
            (f.clone(), json!(ratio(declined, asked)))
        })
        .collect();
    json!({
        "answerable_questions": answerable.len(),
        "unanswerable_questions": unanswerable.len(),
        "token_f1": mean(answerable.iter().filter_map(|r| r.f1).collect()),
        "rouge_l": mean(answerable.iter().filter_map(|r| r.rouge).collect()),
        "citation_precision": ratio(cited_relevant, cited),
        "citation_recall": ratio(answerable.iter().filter(|r| r.cited_relevant > 0).count(), answerable.len()),
        "answered_rate": ratio(answerable.iter().filter(|r| !r.outcome.declined).count(), answerable.len()),
        "abstention_rate": ratio(unanswerable.iter().filter(|r| r.outcome.declined).count(), unanswerable.len()),
        "abstention_by_file": by_file,
        "unsupported_delivered_rate": ratio(delivered.iter().filter(|r| !r.outcome.supported).count(), delivered.len()),
        "delivered_answers": delivered.len(),
        "answer_kinds": kinds,
        "latency_p50_s": percentile(&latency, 0.5),
        "latency_p95_s": percentile(&latency, 0.95),
        "first_token_p50_s": percentile(&ttft, 0.5),
        "first_token_p95_s": percentile(&ttft, 0.95),
    })
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
