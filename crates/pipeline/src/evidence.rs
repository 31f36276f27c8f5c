//! Ask stage: evidence selection — from the top passages to the few short
//! strips of them that bear on the question, which are what the model reads.
//!
//! A small model given four whole passages (some 900 prompt tokens) often
//! answers from the wrong one or strings pieces of several together, and
//! reading them is most of the time to the first token. So each passage is
//! cut into strips (sentences; short ones joined to the next), each strip is
//! scored by
//!
//! * its embedding's cosine with the question (the model that scores the
//!   question's language, [`crate::route`]), min-max scaled over the strips
//!   so that models with different cosine ranges weigh the same,
//! * the weighted share of the question's content words it contains (the
//!   words the answer check counts), and
//! * its passage's rank (1 / (1 + rank)),
//!
//! and the best strips are kept, best first, until a budget of embedder
//! tokens is spent or the strips score below 60 % of the best; a strip ending
//! in a colon brings the next one (what it announces). Each passage is then given as its kept strips in document
//! order, joined by " … " where something was left out; passages with none
//! are left out and the others renumbered. The response reports every
//! passage's strips as byte ranges of its document (`evidence`).

use std::collections::HashSet;
use std::ops::Range;

use ragd_core::Embed;
use serde::Serialize;

use crate::check;
use crate::route::Side;
use crate::select::{snippet, Queries, Source};
use crate::Pipeline;

/// A strip narrower than this is joined to the next one: a heading or a
/// two-word line says little alone. Width counts a Latin character as 1 and
/// a wide one (Han, kana, Hangul) as 3, as it reads about as much.
const MIN_STRIP_WIDTH: usize = 60;

fn width(s: &str) -> usize {
    s.chars()
        .map(|c| if (c as u32) < 0x2E80 { 1 } else { 3 })
        .sum()
}

/// Weights of the three scores. The rank term is 1/(1 + rank): the first
/// passage is the relevant one far more often than the others (on the Debian
/// FAQ, 63 % of questions against 18 % for the next three together), and a
/// single well-matching sentence of a lower passage is what a small model
/// most often cites wrongly.
const W_COSINE: f32 = 0.45;
const W_WORDS: f32 = 0.25;
const W_RANK: f32 = 0.3;

/// Strips scoring below this share of the best strip's score are left out
/// even when the budget has room: fewer pieces, less to misread.
const RELATIVE_FLOOR: f32 = 0.6;

/// A strip given to the model: a byte range of its document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Strip {
    /// Byte offset of the strip in the document text.
    pub start: usize,
    /// Byte offset just past it.
    pub end: usize,
}

/// `text` cut into strips: byte ranges of sentences (ended by `.`, `!`, `?`
/// before white space, by `。！？`, or by a line break), trimmed, a short one
/// joined to the next.
pub fn strips(text: &str) -> Vec<Range<usize>> {
    let mut cuts = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let next_is_space = chars.peek().is_none_or(|(_, n)| n.is_whitespace());
        if c == '\n'
            || matches!(c, '。' | '！' | '？')
            || (matches!(c, '.' | '!' | '?') && next_is_space)
        {
            let end = i + c.len_utf8();
            cuts.push(start..end);
            start = end;
        }
    }
    cuts.push(start..text.len());
    let trimmed = cuts.into_iter().filter_map(|r| {
        let s = &text[r.clone()];
        let lead = s.len() - s.trim_start().len();
        let body = s.trim();
        (!body.is_empty()).then(|| r.start + lead..r.start + lead + body.len())
    });
    let mut out: Vec<Range<usize>> = Vec::new();
    let mut pending: Option<Range<usize>> = None;
    for r in trimmed {
        let r = match pending.take() {
            Some(p) => p.start..r.end,
            None => r,
        };
        if width(&text[r.clone()]) < MIN_STRIP_WIDTH {
            pending = Some(r);
        } else {
            out.push(r);
        }
    }
    if let Some(p) = pending {
        match out.last_mut() {
            // A short tail joins the strip before it.
            Some(last) if last.end <= p.start => last.end = p.end,
            _ => out.push(p),
        }
    }
    out
}

/// One candidate strip.
struct Candidate {
    /// Index of its passage in the ranked list.
    passage: usize,
    /// Byte range in the passage's text.
    range: Range<usize>,
    score: f32,
    tokens: usize,
}

/// Scores strips: `cosines` (any scale), `words` (0–1) and `ranks` (0 = top
/// passage), blended as the module says.
fn blend(cosines: &[f32], words: &[f32], ranks: &[usize]) -> Vec<f32> {
    let max = cosines.iter().copied().fold(f32::MIN, f32::max);
    let min = cosines.iter().copied().fold(f32::MAX, f32::min);
    let span = max - min;
    cosines
        .iter()
        .zip(words)
        .zip(ranks)
        .map(|((&c, &w), &r)| {
            let c = if span > 1e-6 { (c - min) / span } else { 1.0 };
            let rank = 1.0 / (1.0 + r as f32);
            W_COSINE * c + W_WORDS * w + W_RANK * rank
        })
        .collect()
}

impl Pipeline {
    /// The evidence for `question` from `sources` (ranked, numbered from 1):
    /// the sources whose strips were kept, renumbered, each with the text of
    /// its kept strips and their ranges. Unchanged when selection is off
    /// (`retrieval.evidence_tokens = 0`) or the strips cannot be embedded.
    pub(crate) async fn evidence(
        &self,
        question: &str,
        queries: &Queries,
        sources: Vec<Source>,
    ) -> Vec<Source> {
        let budget = self.config.retrieval.evidence_tokens;
        if budget == 0 || sources.is_empty() {
            return sources;
        }
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut inputs: Vec<String> = Vec::new();
        let mut word_sets: Vec<HashSet<String>> = Vec::new();
        for (p, s) in sources.iter().enumerate() {
            for range in strips(&s.text) {
                let strip = &s.text[range.clone()];
                // Embedded with the title in front, as chunks are.
                inputs.push(match s.title.as_deref().filter(|t| !t.trim().is_empty()) {
                    Some(t) => format!("{}\n{strip}", t.trim()),
                    None => strip.to_string(),
                });
                word_sets.push(check::content_words(strip).into_iter().collect());
                candidates.push(Candidate {
                    passage: p,
                    tokens: self.embedder.count_tokens(strip),
                    range,
                    score: 0.0,
                });
            }
        }
        // Each strip is compared with the question by the model that scored
        // its passage.
        let mut cosines = vec![0.0f32; inputs.len()];
        for side in [Side::Primary, Side::Multilingual] {
            let query = queries.vector(side);
            let (idx, texts): (Vec<usize>, Vec<String>) = candidates
                .iter()
                .enumerate()
                .filter(|(_, c)| sources[c.passage].side == side)
                .map(|(i, _)| (i, inputs[i].clone()))
                .unzip();
            if texts.is_empty() {
                continue;
            }
            if query.is_empty() {
                // No model reads the question: no strip can be scored by it.
                return sources;
            }
            match self.embedder.embed_passages_on(side, texts).await {
                Ok(vectors) => {
                    for (i, v) in idx.into_iter().zip(vectors) {
                        cosines[i] = v.iter().zip(&query).map(|(a, b)| a * b).sum();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "evidence selection skipped");
                    return sources;
                }
            }
        }
        // The answer check's measure, with the question as the sentence.
        let words = check::lexical_support(question, &word_sets);
        let ranks: Vec<usize> = candidates.iter().map(|c| c.passage).collect();
        for (c, score) in candidates.iter_mut().zip(blend(&cosines, &words, &ranks)) {
            c.score = score;
        }
        let chosen = choose(&candidates, budget, |c| {
            sources[c.passage].text[c.range.clone()]
                .trim_end()
                .ends_with([':', '：'])
        });
        assemble(sources, &candidates, &chosen)
    }
}

/// Indices of the candidates kept: best first within `budget` tokens (the
/// best one always) and above [`RELATIVE_FLOOR`] of the best score, each
/// colon-ended strip with the one after it.
fn choose(
    candidates: &[Candidate],
    budget: usize,
    announces: impl Fn(&Candidate) -> bool,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| candidates[b].score.total_cmp(&candidates[a].score));
    let floor = order
        .first()
        .map_or(0.0, |&b| candidates[b].score * RELATIVE_FLOOR);
    let mut kept: Vec<usize> = Vec::new();
    let mut spent = 0;
    for i in order {
        if kept.contains(&i) {
            continue;
        }
        if candidates[i].score < floor {
            break;
        }
        let mut group = vec![i];
        let next = i + 1;
        if announces(&candidates[i])
            && candidates
                .get(next)
                .is_some_and(|n| n.passage == candidates[i].passage)
            && !kept.contains(&next)
        {
            group.push(next);
        }
        let cost: usize = group.iter().map(|&g| candidates[g].tokens).sum();
        if !kept.is_empty() && spent + cost > budget {
            continue;
        }
        spent += cost;
        kept.extend(group);
    }
    kept
}

/// The sources with kept strips, in rank order and renumbered, each holding
/// its kept strips' text (document order, " … " between strips that are not
/// neighbours) and their ranges in the document.
fn assemble(sources: Vec<Source>, candidates: &[Candidate], chosen: &[usize]) -> Vec<Source> {
    let mut out = Vec::new();
    for (p, mut s) in sources.into_iter().enumerate() {
        let mut mine: Vec<usize> = chosen
            .iter()
            .copied()
            .filter(|&i| candidates[i].passage == p)
            .collect();
        if mine.is_empty() {
            continue;
        }
        mine.sort_unstable();
        let mut text = String::new();
        let mut evidence: Vec<Strip> = Vec::new();
        let mut previous: Option<usize> = None;
        for i in mine {
            let r = &candidates[i].range;
            match previous {
                // Neighbours keep the text between them (a space, a line break).
                Some(prev) if prev + 1 == i => {
                    text.push_str(&s.text[candidates[prev].range.end..r.start])
                }
                Some(_) => text.push_str(" … "),
                None => {}
            }
            text.push_str(&s.text[r.clone()]);
            match evidence.last_mut() {
                Some(last) if previous.is_some_and(|prev| prev + 1 == i) => {
                    last.end = s.start + r.end
                }
                _ => evidence.push(Strip {
                    start: s.start + r.start,
                    end: s.start + r.end,
                }),
            }
            previous = Some(i);
        }
        s.snippet = snippet(&text);
        s.text = text;
        s.evidence = evidence;
        s.n = out.len() + 1;
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_are_sentences_with_short_ones_joined() {
        let text =
            "Intro:\nDebian is a free operating system made by volunteers all over the world. \
                    It uses the Linux kernel and many GNU tools that come with it.\nOk.";
        let got: Vec<&str> = strips(text).into_iter().map(|r| &text[r]).collect();
        assert_eq!(
            got,
            vec![
                "Intro:\nDebian is a free operating system made by volunteers all over the world.",
                "It uses the Linux kernel and many GNU tools that come with it.\nOk.",
            ]
        );
        let zh = "Debian 是一个由志愿者共同维护的自由操作系统，已经有三十年历史了，被广泛使用在服务器上。它使用 Linux 内核，也提供很多其他的软件包，适合桌面和服务器使用，社区非常活跃。";
        assert_eq!(strips(zh).len(), 2, "{:?}", strips(zh));
        assert!(strips("   ").is_empty());
    }

    #[test]
    fn blend_weighs_cosine_words_and_rank() {
        // Same words and rank: the closer embedding wins.
        let s = blend(&[0.9, 0.8], &[0.5, 0.5], &[0, 0]);
        assert!(s[0] > s[1]);
        // Cosines on another scale give the same order.
        let t = blend(&[0.3, 0.2], &[0.5, 0.5], &[0, 0]);
        assert_eq!(s, t);
        // All the question's words outweigh a small cosine lead.
        let u = blend(&[0.9, 0.88, 0.5], &[0.0, 1.0, 0.0], &[0, 0, 0]);
        assert!(u[1] > u[0]);
        // The top passage's strip beats an equal one further down.
        let v = blend(&[0.9, 0.9], &[0.5, 0.5], &[0, 2]);
        assert!(v[0] > v[1]);
    }

    fn cand(passage: usize, score: f32, tokens: usize) -> Candidate {
        Candidate {
            passage,
            range: 0..0,
            score,
            tokens,
        }
    }

    #[test]
    fn choosing_spends_the_budget_best_first_and_keeps_announced_lines() {
        let c = vec![
            cand(0, 0.9, 50),
            cand(0, 0.2, 50),
            cand(1, 0.8, 60),
            cand(1, 0.7, 200),
        ];
        let mut kept = choose(&c, 120, |_| false);
        kept.sort_unstable();
        assert_eq!(kept, vec![0, 2]);
        // The best one is kept even over budget.
        assert_eq!(choose(&c, 10, |_| false), vec![0]);
        // Strips far below the best are left out even within budget.
        let far = vec![cand(0, 0.9, 10), cand(1, 0.5, 10)];
        assert_eq!(choose(&far, 100, |_| false), vec![0]);
        // A strip ending in a colon brings the next one.
        let mut kept = choose(&c, 120, |x| x.score == 0.9);
        kept.sort_unstable();
        assert_eq!(kept, vec![0, 1]);
    }
}
