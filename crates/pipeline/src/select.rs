//! Ask and search stage: from the retrieved chunks to the passages a client
//! sees and the model reads.
//!
//! A chunk whose text or embedding repeats a better-ranked one (shared
//! boilerplate, copies) is left out; a chunk overlapping a better-ranked
//! neighbour of the same document is merged into it (the overlap is not shown
//! twice and the passage reads on). Then the reranker ([`ragd_core::Rerank`])
//! orders what is left and the best `top_k` are numbered from 1.

use ragd_core::{Filter, TextKind};
use serde::Serialize;

use crate::check::CitedBy;
use crate::error::Error;
use crate::retrieve::{self, Mode, Strategy};
use crate::Pipeline;

/// Characters of a chunk shown as a citation's snippet.
const SNIPPET_CHARS: usize = 240;

/// A retrieved passage, as reported to the client.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Source {
    /// Its number in the prompt, from 1.
    pub n: usize,
    /// The document.
    pub document_id: String,
    /// `{document_id}#{index}`.
    pub chunk_id: String,
    /// Neighbouring chunks that overlapped this one and were merged into it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merged_with: Vec<String>,
    /// The document's title.
    pub title: Option<String>,
    /// The section the passage is in ("Heading > Subheading"), when the document has headings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    /// The start of the passage.
    pub snippet: String,
    /// Cosine similarity with the question.
    pub score: f32,
    /// In citations: whether the model's marker or ragd's matching found it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cited_by: Option<CitedBy>,
    /// In citations: whether the passage was checked to support the sentences
    /// citing it (false only when the check could not run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Position of its first chunk in the document (0-based).
    #[serde(skip)]
    pub index: usize,
    /// Byte offset of the passage in the document text.
    #[serde(skip)]
    pub start: usize,
    /// Byte offset just past the passage.
    #[serde(skip)]
    pub end: usize,
    /// The passage as the model read it (neighbours merged in).
    pub text: String,
    /// The embedding of its best chunk, for the answer check.
    #[serde(skip)]
    pub vector: Vec<f32>,
}

/// The first characters of a passage, cut at a character boundary.
pub(crate) fn snippet(text: &str) -> String {
    match text.char_indices().nth(SNIPPET_CHARS) {
        Some((i, _)) => format!("{}…", text[..i].trim_end()),
        None => text.to_string(),
    }
}

impl Pipeline {
    /// Embeds `query`, retrieves, selects and reranks: the `top_k` best
    /// passages passing `filter` and scoring at least `min_score`, numbered
    /// from 1, and the query's vector.
    pub(crate) async fn passages(
        &self,
        query: &str,
        top_k: usize,
        filter: &Filter,
        mode: Mode,
        min_score: f32,
    ) -> Result<(Vec<Source>, Vec<f32>), Error> {
        let r = &self.config.retrieval;
        let strategy = Strategy {
            mode,
            fusion: r.fusion,
            dense_weight: r.dense_weight,
            candidates: r.candidates,
        };
        let vector = self
            .embedder
            .embed(TextKind::Query, vec![query.to_string()])
            .await?
            .pop()
            .ok_or_else(|| Error::internal("the embedder returned no vector"))?;
        // Ask for more than top_k so that dropping near-duplicates still leaves top_k.
        let wanted = (top_k * 2).min(top_k + 20);
        let hits =
            retrieve::retrieve(&*self.store, query, &vector, wanted, filter, &strategy).await?;
        let chunks: Vec<_> = hits
            .into_iter()
            .filter(|(_, score)| *score >= min_score)
            .collect();
        let keep = distinct(
            &chunks
                .iter()
                .map(|(c, _)| (c.text.as_str(), c.vector.as_slice()))
                .collect::<Vec<_>>(),
        );
        let mut chunks: Vec<_> = chunks.into_iter().map(Some).collect();
        let chunks: Vec<_> = keep.into_iter().filter_map(|i| chunks[i].take()).collect();
        let groups = merge_overlapping(
            &chunks
                .iter()
                .map(|(c, _)| (c.document_id.as_str(), c.start, c.end))
                .collect::<Vec<_>>(),
        );
        let mut passages: Vec<Source> = groups
            .into_iter()
            .map(|members| {
                let (c, score) = &chunks[members[0]];
                let (mut start, mut text) = (c.start, c.text.clone());
                let mut merged_with = Vec::new();
                for &m in &members[1..] {
                    let (other, _) = &chunks[m];
                    (start, text) = union_text((start, &text), (other.start, &other.text));
                    merged_with.push(other.chunk_id());
                }
                Source {
                    n: 0,
                    document_id: c.document_id.clone(),
                    chunk_id: c.chunk_id(),
                    merged_with,
                    title: c.title.clone(),
                    section: (!c.section.is_empty()).then(|| c.section.clone()),
                    snippet: snippet(&text),
                    score: *score,
                    cited_by: None,
                    verified: None,
                    index: c.index,
                    end: start + text.len(),
                    start,
                    text,
                    vector: c.vector.clone(),
                }
            })
            .collect();
        // Rerank, then keep the best top_k, numbered as the prompt numbers them.
        let order = {
            let texts: Vec<&str> = passages.iter().map(|p| p.text.as_str()).collect();
            self.reranker.rerank(query, &texts).await?
        };
        let mut slots: Vec<Option<Source>> = passages.drain(..).map(Some).collect();
        let passages = order
            .into_iter()
            .filter_map(|i| slots.get_mut(i).and_then(Option::take))
            .take(top_k)
            .enumerate()
            .map(|(i, p)| Source { n: i + 1, ..p })
            .collect();
        Ok((passages, vector))
    }
}

/// Two chunks whose vectors are this close say the same thing (repeated
/// boilerplate, copies of a passage); only the better-ranked one is returned.
const NEAR_DUPLICATE: f32 = 0.98;

/// Indices of `items` (text, vector), in order, leaving out any whose text is
/// the same as an earlier one's (ignoring case and spacing) or whose vector is a
/// near-duplicate of an earlier one's.
pub fn distinct(items: &[(&str, &[f32])]) -> Vec<usize> {
    let norm = |t: &str| {
        t.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    let mut kept: Vec<usize> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, (text, vector)) in items.iter().enumerate() {
        let near = kept.iter().any(|&j| {
            let dot: f32 = items[j]
                .1
                .iter()
                .zip(vector.iter())
                .map(|(a, b)| a * b)
                .sum();
            dot >= NEAR_DUPLICATE
        });
        if seen.insert(norm(text)) && !near {
            kept.push(i);
        }
    }
    kept
}

/// Groups best-first chunks `(document, start, end)` so that a chunk overlapping
/// a better-ranked chunk of the same document joins that one's group instead of
/// being returned again (consecutive chunks share their overlap region). Returns
/// the groups best first, each as indices into `items` with the best one first.
pub fn merge_overlapping(items: &[(&str, usize, usize)]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Vec<usize>, usize, usize)> = Vec::new();
    for (i, &(doc, start, end)) in items.iter().enumerate() {
        let joined = groups
            .iter_mut()
            .find(|(members, s, e)| items[members[0]].0 == doc && start < *e && *s < end);
        match joined {
            Some((members, s, e)) => {
                members.push(i);
                *s = (*s).min(start);
                *e = (*e).max(end);
            }
            None => groups.push((vec![i], start, end)),
        }
    }
    groups.into_iter().map(|(members, _, _)| members).collect()
}

/// The text covering two overlapping verbatim slices of one document, each
/// given as (byte offset, text); returns the combined (offset, text).
pub fn union_text(a: (usize, &str), b: (usize, &str)) -> (usize, String) {
    let (first, second) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let first_end = first.0 + first.1.len();
    let second_end = second.0 + second.1.len();
    if second_end <= first_end || second.0 > first_end {
        // Contained, or (not expected) apart: the first slice is kept as is.
        return (first.0, first.1.to_string());
    }
    let skip = first_end - second.0;
    match second.1.get(skip..) {
        Some(rest) => (first.0, format!("{}{rest}", first.1)),
        None => (first.0, first.1.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_are_cut_on_char_boundaries() {
        let long = "北".repeat(300);
        let s = snippet(&long);
        assert_eq!(s.chars().count(), SNIPPET_CHARS + 1);
        assert!(s.ends_with('…'));
        assert_eq!(snippet("short"), "short");
    }

    #[test]
    fn overlapping_neighbours_are_merged_into_the_better_one() {
        // doc a: chunks [0,100) and [80,180) overlap; [300,400) does not; doc b shares offsets only.
        let items = [
            ("a", 80, 180),
            ("b", 0, 100),
            ("a", 0, 100),
            ("a", 300, 400),
            ("a", 170, 260),
        ];
        assert_eq!(
            merge_overlapping(&items),
            vec![vec![0, 2, 4], vec![1], vec![3]]
        );
        let doc = "0123456789abcdefghij";
        let (start, text) = union_text((5, &doc[5..12]), (2, &doc[2..8]));
        assert_eq!((start, text.as_str()), (2, &doc[2..12]));
        assert_eq!(
            union_text((0, &doc[0..10]), (3, &doc[3..6])),
            (0, doc[0..10].to_string())
        );
        // Multi-byte text: the cut is at a character boundary of the document.
        let zh = "北京是中国的首都";
        assert_eq!(
            union_text((0, &zh[0..12]), (6, &zh[6..24])),
            (0, zh.to_string())
        );
    }

    #[test]
    fn near_duplicates_keep_the_first() {
        let a = [1.0f32, 0.0];
        let b = [0.999f32, 0.0447];
        let c = [0.0f32, 1.0];
        let items: Vec<(&str, &[f32])> = vec![
            ("Same  text", &a),
            ("same text", &c),
            ("other", &b),
            ("third", &c),
            ("fourth", &c),
        ];
        assert_eq!(distinct(&items), vec![0, 3]);
    }
}
