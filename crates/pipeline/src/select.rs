//! Ask and search stage: from the retrieved chunks to the passages a client
//! sees and the model reads.
//!
//! A chunk whose text or embedding repeats a better-ranked one (shared
//! boilerplate, copies) is left out; a chunk overlapping a better-ranked
//! neighbour of the same document is merged into it (the overlap is not shown
//! twice and the passage reads on). Then the reranker ([`ragd_core::Rerank`])
//! orders what is left and the best `top_k` are numbered from 1.

use ragd_core::Filter;
use serde::Serialize;

use crate::check::CitedBy;
use crate::error::Error;
use crate::language::Lang;
use crate::retrieve::{self, Mode, Strategy};
use crate::route::{QueryVector, Side};
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
    /// The strips of the passage the model was given (evidence selection),
    /// as byte ranges of the document; empty when it read the whole passage.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<crate::evidence::Strip>,
    /// The model whose cosine is `score` (its thresholds apply).
    #[serde(skip)]
    pub side: Side,
    /// The embedding of its best chunk, for the answer check.
    #[serde(skip)]
    pub vector: Vec<f32>,
    /// For a document of a synced source: the page or file it was read from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_url: Option<String>,
    /// For a document of a synced source: when this version was fetched
    /// (RFC 3339, UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetched_at: Option<String>,
}

/// The first characters of a passage, cut at a character boundary.
pub(crate) fn snippet(text: &str) -> String {
    match text.char_indices().nth(SNIPPET_CHARS) {
        Some((i, _)) => format!("{}…", text[..i].trim_end()),
        None => text.to_string(),
    }
}

impl Pipeline {
    /// Embeds `query` (written in `lang`) by the models that read it,
    /// retrieves, selects and reranks: the `top_k` best passages passing
    /// `filter` (and, with `thresholds`, scoring at least the `min_score` of
    /// the side that scored them), numbered from 1, and the query's vectors.
    pub(crate) async fn passages(
        &self,
        query: &str,
        lang: Lang,
        top_k: usize,
        filter: &Filter,
        mode: Mode,
        thresholds: bool,
    ) -> Result<(Vec<Source>, Queries), Error> {
        let r = &self.config.retrieval;
        let strategy = Strategy {
            mode,
            fusion: r.fusion,
            dense_weight: r.dense_weight,
            candidates: r.candidates,
        };
        let mut dense = self.embedder.query(query, lang).await?;
        let mut texts = vec![query.to_string()];
        if let Some(english) = self.english_query(query, lang).await {
            tracing::debug!(%english, "question translated for retrieval");
            dense.extend(self.embedder.query(&english, Lang::En).await?);
            texts.push(english);
        }
        // Ask for more than top_k so that dropping near-duplicates still leaves top_k.
        let wanted = (top_k * 2).min(top_k + 20);
        let hits =
            retrieve::retrieve(&*self.store, &texts, &dense, wanted, filter, &strategy).await?;
        // With no dense query the scores say nothing: no threshold applies.
        let thresholds = thresholds && !dense.is_empty();
        let chunks: Vec<_> = hits
            .into_iter()
            .filter(|(_, score, side)| {
                !thresholds
                    || self
                        .side_thresholds(*side)
                        .is_none_or(|t| *score >= t.min_score)
            })
            .collect();
        let queries = Queries(dense);
        let keep = distinct(
            &chunks
                .iter()
                .map(|(c, _, _)| (c.text.as_str(), c.vector.as_slice()))
                .collect::<Vec<_>>(),
        );
        let mut chunks: Vec<_> = chunks.into_iter().map(Some).collect();
        let chunks: Vec<_> = keep.into_iter().filter_map(|i| chunks[i].take()).collect();
        let groups = merge_overlapping(
            &chunks
                .iter()
                .map(|(c, _, _)| (c.document_id.as_str(), c.start, c.end))
                .collect::<Vec<_>>(),
        );
        let mut passages: Vec<Source> = groups
            .into_iter()
            .map(|members| {
                let (c, score, side) = &chunks[members[0]];
                let (mut start, mut text) = (c.start, c.text.clone());
                let mut merged_with = Vec::new();
                for &m in &members[1..] {
                    let (other, _, _) = &chunks[m];
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
                    evidence: Vec::new(),
                    side: *side,
                    vector: c.vector.clone(),
                    source_url: None,
                    fetched_at: None,
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
        let collection = filter.collection().unwrap_or(ragd_core::DEFAULT_COLLECTION);
        let passages = self.with_origins(collection, passages).await;
        Ok((passages, queries))
    }
}

impl Pipeline {
    /// `passages` with the page or file and the fetch time of those whose
    /// document came from a synced source (its metadata's `source_url` and
    /// `fetched_at`): one record read per document.
    pub(crate) async fn with_origins(
        &self,
        collection: &str,
        mut passages: Vec<Source>,
    ) -> Vec<Source> {
        let mut seen: std::collections::HashMap<String, (Option<String>, Option<String>)> =
            std::collections::HashMap::new();
        for p in &mut passages {
            if !seen.contains_key(&p.document_id) {
                let origin = match self.store.document(collection, &p.document_id).await {
                    // Only a synced source's documents (the reserved key says
                    // so; clients cannot set it) carry where they came from.
                    Ok(Some(d)) if d.metadata.contains_key("ragd_source") => {
                        let get = |k: &str| {
                            d.metadata
                                .get(k)
                                .and_then(|v| v.as_str())
                                .map(str::to_string)
                        };
                        (get("source_url"), get("fetched_at"))
                    }
                    // Without the record the passage is still good evidence.
                    _ => (None, None),
                };
                seen.insert(p.document_id.clone(), origin);
            }
            let (url, at) = &seen[&p.document_id];
            p.source_url = url.clone();
            p.fetched_at = at.clone();
        }
        passages
    }
}

/// A question's dense queries (see [`crate::route`]), for the stages after
/// retrieval that compare texts with it.
#[derive(Debug, Clone, Default)]
pub struct Queries(Vec<QueryVector>);

impl Queries {
    /// The query vector on `side` (the question's own, or on the English side
    /// its translation); empty when there is none.
    pub fn vector(&self, side: Side) -> Vec<f32> {
        self.0
            .iter()
            .find(|q| q.side == side)
            .map(|q| q.vector.clone())
            .unwrap_or_default()
    }
}

impl Pipeline {
    /// `query` in English, for retrieval, when it is in another language,
    /// `retrieval.translate_queries` is on and the answer model can do it
    /// (see [`crate::translate`]).
    async fn english_query(&self, query: &str, lang: Lang) -> Option<String> {
        if lang == Lang::En || !self.config.retrieval.translate_queries {
            return None;
        }
        let generator = self.generator.as_ref()?;
        crate::translate::to_english(&**generator, query, TRANSLATE_WITHIN).await
    }
}

/// Longest wait for a question's translation (queue included); after that it
/// is searched as written.
const TRANSLATE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

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
        // Cosine, not the dot product: stored vectors of passages that only
        // one of two routed embedders reads are not unit vectors.
        let near = kept.iter().any(|&j| {
            let dot = |a: &[f32], b: &[f32]| -> f32 { a.iter().zip(b).map(|(x, y)| x * y).sum() };
            let (a, b) = (items[j].1, *vector);
            let norms = (dot(a, a) * dot(b, b)).sqrt();
            norms > 0.0 && dot(a, b) / norms >= NEAR_DUPLICATE
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
