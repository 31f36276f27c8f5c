//! `ragd eval summaries --dataset DIR`: summary quality over a FAQ in BEIR
//! layout whose chapters have introductions (`debian-faq-en`,
//! `debian-faq-zh`).
//!
//! Each chapter with an introduction (section `N.0`) becomes one document:
//! its other sections in order, each under its title, up to `--max-chars`
//! (so that no document passes the 64 passages a summary reads). The
//! introduction is the reference summary: it says what the chapter is about,
//! which is what a concise summary should say too — though an introduction
//! also points elsewhere ("see chapter 8"), so ROUGE-L against it has a
//! ceiling well under 1. Starts ragd in-process on a fresh data directory,
//! ingests the chapters, asks `POST /summarize` for each (then again, to
//! time the kept summary), and prints per chapter and overall:
//!
//! * ROUGE-L (F1 of the longest common subsequence of words; Han characters
//!   are words) of the delivered summary against the introduction;
//! * the share of the model's sentences some passage supports, and of the
//!   summaries delivered with every sentence supported;
//! * the passages read, the latency, and the latency of the kept summary.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use ragd::Config;
use serde_json::{json, Value};

use crate::eval_cmd::read_jsonl;
use crate::eval_qa::{rouge_l, tokens};

/// What `ragd eval summaries` is given.
pub(crate) struct Args {
    pub dataset: PathBuf,
    pub max_chars: usize,
    pub limit: Option<usize>,
    pub json: bool,
}

/// One chapter to summarise.
struct Chapter {
    id: String,
    title: String,
    text: String,
    reference: String,
}

/// The chapter number of a FAQ section id (`debfaq-en-3.1.2` → `3`) and
/// whether it is the chapter's introduction (`N.0`).
fn chapter_of(id: &str) -> Option<(String, bool)> {
    let number = id.rsplit('-').next()?;
    let mut parts = number.split('.');
    let chapter = parts.next()?.to_string();
    let intro = parts.next() == Some("0") && parts.next().is_none();
    Some((chapter, intro))
}

/// The chapters with an introduction, from the corpus in its order.
fn chapters(corpus: &[Value], max_chars: usize) -> Vec<Chapter> {
    let mut out: Vec<Chapter> = Vec::new();
    let intros: std::collections::HashMap<String, (String, String)> = corpus
        .iter()
        .filter_map(|d| {
            let id = d["_id"].as_str()?;
            let (chapter, intro) = chapter_of(id)?;
            intro.then(|| {
                let title = d["title"].as_str().unwrap_or_default();
                // "Debian FAQ — Chapter 3. Choosing … — 3.0": the chapter's name.
                let name = title.split(" — ").nth(1).unwrap_or(title).to_string();
                (
                    chapter,
                    (name, d["text"].as_str().unwrap_or_default().to_string()),
                )
            })
        })
        .collect();
    for d in corpus {
        let Some(id) = d["_id"].as_str() else {
            continue;
        };
        let Some((chapter, intro)) = chapter_of(id) else {
            continue;
        };
        let Some((name, reference)) = intros.get(&chapter) else {
            continue;
        };
        if intro {
            continue;
        }
        let section = format!(
            "## {}\n\n{}\n\n",
            d["title"]
                .as_str()
                .unwrap_or_default()
                .rsplit(" — ")
                .next()
                .unwrap_or_default(),
            d["text"].as_str().unwrap_or_default().trim()
        );
        let at = match out
            .iter()
            .position(|c| c.id == format!("chapter-{chapter}"))
        {
            Some(at) => at,
            None => {
                out.push(Chapter {
                    id: format!("chapter-{chapter}"),
                    title: name.clone(),
                    text: String::new(),
                    reference: reference.clone(),
                });
                out.len() - 1
            }
        };
        let c = &mut out[at];
        if c.text.chars().count() + section.chars().count() <= max_chars {
            c.text.push_str(&section);
        }
    }
    out.retain(|c| !c.text.is_empty());
    out
}

/// One summary's figures.
struct Record {
    id: String,
    passages: usize,
    latency_s: f64,
    kept_latency_s: f64,
    cached: bool,
    kind: String,
    rouge: f64,
    sentences: usize,
    supported: usize,
}

pub(crate) async fn run(args: Args, mut config: Config) -> Result<()> {
    let corpus = read_jsonl(&args.dataset.join("corpus.jsonl"))?;
    let mut chapters = chapters(&corpus, args.max_chars);
    chapters.truncate(args.limit.unwrap_or(usize::MAX));
    anyhow::ensure!(
        !chapters.is_empty(),
        "{}: no chapter with an introduction (a section N.0)",
        args.dataset.display()
    );
    let data = std::env::temp_dir().join(format!("ragd-eval-summaries-{}", std::process::id()));
    config.server.data_dir = data.clone();
    config.server.port = 0;
    let mut server = ragd::start(config).await?;
    server.wait_ready().await?;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(1800))
        .build()?;
    let documents: Vec<Value> = chapters
        .iter()
        .map(|c| json!({ "id": c.id, "title": c.title, "text": c.text }))
        .collect();
    let res = client
        .post(format!("{base}/ingest"))
        .json(&json!({ "documents": documents }))
        .send()
        .await?;
    let status = res.status();
    let ingested: Value = res.json().await?;
    anyhow::ensure!(status.is_success(), "/ingest answered {status}: {ingested}");

    let summarize = |id: String| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let t = Instant::now();
            let res = client
                .post(format!("{base}/summarize"))
                .json(&json!({ "document_id": id }))
                .send()
                .await?;
            let status = res.status();
            let body: Value = res.json().await?;
            anyhow::ensure!(status.is_success(), "/summarize answered {status}: {body}");
            Ok::<_, anyhow::Error>((body, t.elapsed().as_secs_f64()))
        }
    };
    let mut records = Vec::new();
    for (i, c) in chapters.iter().enumerate() {
        let (res, latency_s) = summarize(c.id.clone()).await?;
        // The kept summary, once the server has kept it.
        let mut kept = (Value::Null, 0.0);
        for _ in 0..20 {
            kept = summarize(c.id.clone()).await?;
            if kept.0["cached"] == true {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let summary = res["answer"].as_str().unwrap_or_default();
        let kind = res["answer_kind"].as_str().unwrap_or_default().to_string();
        let sentences = res["grounding"]["sentences"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let record = Record {
            id: c.id.clone(),
            passages: res["sources"].as_array().map_or(0, Vec::len),
            latency_s,
            kept_latency_s: kept.1,
            cached: kept.0["cached"] == true,
            rouge: if kind == "declined" {
                0.0
            } else {
                rouge_l(&tokens(summary), &tokens(&c.reference))
            },
            kind,
            sentences: sentences.len(),
            supported: sentences.iter().filter(|s| s["supported"] == true).count(),
        };
        eprintln!(
            "{:>2}/{} {} ({} passages): {} in {:.1} s (kept: {:.2} s), ROUGE-L {:.3}, {}/{} sentences supported: {summary}",
            i + 1,
            chapters.len(),
            c.id,
            record.passages,
            record.kind,
            record.latency_s,
            record.kept_latency_s,
            record.rouge,
            record.supported,
            record.sentences,
        );
        records.push(record);
    }
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(&data);

    let n = records.len() as f64;
    let sentences: usize = records.iter().map(|r| r.sentences).sum();
    let supported: usize = records.iter().map(|r| r.supported).sum();
    let figures = json!({
        "dataset": args.dataset.display().to_string(),
        "summaries": records.len(),
        "rouge_l": records.iter().map(|r| r.rouge).sum::<f64>() / n,
        "supported_sentences": supported as f64 / sentences.max(1) as f64,
        "wholly_supported": records.iter().filter(|r| r.sentences > 0 && r.supported == r.sentences).count() as f64 / n,
        "declined": records.iter().filter(|r| r.kind == "declined").count(),
        "kept_and_reused": records.iter().filter(|r| r.cached).count(),
        "by_document": records.iter().map(|r| json!({
            "id": r.id, "passages": r.passages, "latency_s": r.latency_s,
            "kept_latency_s": r.kept_latency_s, "rouge_l": r.rouge,
            "sentences": r.sentences, "supported": r.supported, "kind": r.kind,
        })).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        println!(
            "{}: {} summaries, ROUGE-L {:.3}, supported sentences {:.1} % ({supported}/{sentences}), wholly supported {:.0} %, declined {}, kept and reused {}",
            figures["dataset"].as_str().unwrap_or_default(),
            records.len(),
            figures["rouge_l"].as_f64().unwrap_or(0.0),
            100.0 * figures["supported_sentences"].as_f64().unwrap_or(0.0),
            100.0 * figures["wholly_supported"].as_f64().unwrap_or(0.0),
            figures["declined"],
            figures["kept_and_reused"],
        );
        println!("passages  latency_s  kept_s  rouge_l  supported  id");
        for r in &records {
            println!(
                "{:>8}  {:>9.1}  {:>6.2}  {:>7.3}  {:>4}/{:<4}  {}",
                r.passages, r.latency_s, r.kept_latency_s, r.rouge, r.supported, r.sentences, r.id
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chapters_gather_their_sections_under_the_introduction() {
        let corpus: Vec<Value> = [
            ("faq-en-1.1", "no introduction"),
            ("faq-en-3.0", "Chapter three is about choosing."),
            ("faq-en-3.1", "Stable is tested."),
            ("faq-en-3.1.1", "Testing moves."),
            ("faq-en-30.1", "Not chapter three."),
        ]
        .iter()
        .map(|(id, text)| json!({ "_id": id, "title": format!("FAQ — Chapter 3. Choosing — {id}"), "text": text }))
        .collect();
        let c = chapters(&corpus, 10_000);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].id, "chapter-3");
        assert_eq!(c[0].reference, "Chapter three is about choosing.");
        assert!(c[0].text.contains("Stable is tested.") && c[0].text.contains("Testing moves."));
        assert!(!c[0].text.contains("Not chapter three"));
        assert_eq!(c[0].title, "Chapter 3. Choosing");
        // Cut at the character budget, whole sections only.
        let c = chapters(&corpus, 60);
        assert!(c[0].text.contains("Stable") && !c[0].text.contains("Testing"));
    }
}
