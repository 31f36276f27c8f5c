//! `ragd eval thresholds --dataset DIR`: where to put `abstain_below`.
//!
//! Ingests the folder's corpus, asks every query of `qrels/test.tsv` (the
//! documents answer them) and every question of the unanswerable sets (they
//! do not) through the same retrieval as `POST /ask`, and prints, per question
//! model that scored the best passage (`scored_by`: the English model for an
//! English passage and an English question or translation, else the
//! multilingual one; see `ragd_pipeline::retrieve::score_side`), the
//! distribution of that score for each kind, the share answered and declined
//! at the threshold in force, and the threshold that best separates the two
//! on this data (the one that maximises answered + declined). Set them as
//! `retrieval.abstain_below` and `retrieval.multilingual_abstain_below`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use ragd::Config;
use ragd_pipeline::language;
use ragd_pipeline::route::Side;
use ragd_pipeline::SearchRequest;

use crate::eval_cmd::{read_jsonl, Dataset, Ingested};

/// Scores of one language's questions.
#[derive(Default)]
struct Scores {
    answerable: Vec<f32>,
    unanswerable: Vec<f32>,
    /// Questions by language.
    languages: BTreeMap<&'static str, usize>,
}

fn quantile(sorted: &[f32], q: f64) -> f32 {
    if sorted.is_empty() {
        return f32::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// The share of `answerable` at or above `t` and of `unanswerable` below it.
fn rates(s: &Scores, t: f32) -> (f64, f64) {
    let share = |v: &[f32], f: &dyn Fn(f32) -> bool| {
        v.iter().filter(|&&x| f(x)).count() as f64 / v.len().max(1) as f64
    };
    (
        share(&s.answerable, &|x| x >= t),
        share(&s.unanswerable, &|x| x < t),
    )
}

/// The threshold maximising answered + declined (on a tie, the one answering
/// more): midway between two neighbouring observed scores, so that it does
/// not sit on one question.
fn best_threshold(s: &Scores) -> Option<(f32, f64, f64)> {
    let mut all: Vec<f32> = s
        .answerable
        .iter()
        .chain(&s.unanswerable)
        .copied()
        .collect();
    all.sort_by(f32::total_cmp);
    all.dedup();
    let candidates = all.windows(2).map(|w| (w[0] + w[1]) / 2.0);
    candidates
        .map(|t| {
            let (a, d) = rates(s, t);
            (t, a, d)
        })
        .max_by(|x, y| {
            (x.1 + x.2)
                .total_cmp(&(y.1 + y.2))
                .then(x.1.total_cmp(&y.1))
        })
}

pub(crate) async fn run(
    dataset: &Path,
    unanswerable: &[PathBuf],
    config: Config,
    data_dir: Option<PathBuf>,
) -> Result<()> {
    let set = Dataset::read(dataset)?;
    let mut questions: Vec<(String, bool)> = set
        .query_ids()
        .into_iter()
        .map(|q| (set.queries[q].clone(), true))
        .collect();
    for file in unanswerable {
        for q in read_jsonl(file)? {
            if let Some(text) = q["question"].as_str() {
                questions.push((text.to_string(), false));
            }
        }
    }
    let ingested = Ingested::open(&set.corpus, config, data_dir).await?;
    let status = ingested.engine.status().await;
    let mut by_side: BTreeMap<String, Scores> = BTreeMap::new();
    for (text, answerable) in &questions {
        let res = ingested
            .engine
            .search(SearchRequest {
                query: text.clone(),
                top_k: Some(1),
                filter: None,
                mode: None,
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (top, side) = res
            .results
            .first()
            .map_or((f32::MIN, Side::Primary), |r| (r.score, r.scored_by));
        let s = by_side
            .entry(format!("{side:?}").to_lowercase())
            .or_default();
        *s.languages
            .entry(language::detect(text).code())
            .or_default() += 1;
        if *answerable {
            s.answerable.push(top);
        } else {
            s.unanswerable.push(top);
        }
    }
    ingested.finish().await?;

    println!(
        "{}: best passage's score (hybrid), answerable (the dataset's queries) vs unanswerable ({})",
        dataset.display(),
        unanswerable
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (side, s) in &mut by_side {
        s.answerable.sort_by(f32::total_cmp);
        s.unanswerable.sort_by(f32::total_cmp);
        let in_force = status
            .thresholds
            .get(usize::from(side == "multilingual"))
            .map(|t| (t.embedder.clone(), t.thresholds.abstain_below));
        println!("scored by the {side} model (questions: {:?}):", s.languages);
        let a = &s.answerable;
        println!(
            "  answerable   n={:<4} min {:.3}  p5 {:.3}  p10 {:.3}  median {:.3}",
            a.len(),
            quantile(a, 0.0),
            quantile(a, 0.05),
            quantile(a, 0.10),
            quantile(a, 0.5)
        );
        let u = &s.unanswerable;
        println!(
            "  unanswerable n={:<4} median {:.3}  p90 {:.3}  p95 {:.3}  max {:.3}",
            u.len(),
            quantile(u, 0.5),
            quantile(u, 0.90),
            quantile(u, 0.95),
            quantile(u, 1.0)
        );
        match in_force {
            Some((embedder, t)) => {
                let (ans, dec) = rates(s, t);
                println!(
                    "  in force: abstain_below {t:.3} ({embedder}): answered {ans:.3}, declined {dec:.3}"
                );
            }
            None => println!("  in force: none"),
        }
        if let Some((t, ans, dec)) = best_threshold(s) {
            println!("  best on this data: {t:.3}: answered {ans:.3}, declined {dec:.3}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_threshold_separates_the_two_kinds() {
        let s = Scores {
            answerable: vec![0.5, 0.6, 0.7, 0.9],
            unanswerable: vec![0.1, 0.2, 0.55],
            languages: BTreeMap::new(),
        };
        let (t, a, d) = best_threshold(&s).unwrap();
        // 0.35 (between 0.2 and 0.5): all answered, 2 of 3 declined (1.67);
        // 0.575: 3 of 4 answered, all declined (1.75).
        assert!(
            (t - 0.575).abs() < 1e-6 && a == 0.75 && d == 1.0,
            "{t} {a} {d}"
        );
        // On a tie, the threshold answering more wins.
        let tie = Scores {
            answerable: vec![0.5, 0.9],
            unanswerable: vec![0.1, 0.6],
            languages: BTreeMap::new(),
        };
        let (t, a, _) = best_threshold(&tie).unwrap();
        assert_eq!((t, a), (0.3, 1.0));
        assert_eq!(rates(&s, 0.35), (1.0, 2.0 / 3.0));
        assert_eq!(quantile(&[1.0, 2.0, 3.0], 0.5), 2.0);
        assert!(best_threshold(&Scores::default()).is_none());
    }
}
