//! Finding the chunks for a query: filters, tombstones, and when to trust the
//! graph.
//!
//! The HNSW graph is approximate and its filtered search can return fewer than
//! k hits when most nodes are filtered out (tombstones of replaced documents, or
//! a narrow metadata filter). So: when the allowed set is small, search it
//! exactly (it is cheap); otherwise search the graph with a wider candidate list
//! and fall back to exact search if it still comes back short.

use std::collections::HashMap;

use ragd_index::{exact_top_k, Hit, VectorIndex};
use ragd_store::Store;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Allowed sets up to this size are searched exactly.
const EXACT_LIMIT: usize = 4096;

/// One condition of a filter.
#[derive(Debug, Clone, PartialEq)]
enum Condition {
    Eq(Value),
    In(Vec<Value>),
}

/// Which field a condition tests.
#[derive(Debug, Clone, PartialEq)]
enum Field {
    DocumentId,
    Metadata(String),
}

/// A conjunction of conditions on `document_id` and `metadata.<key>`:
/// `{"document_id": "x"}`, `{"metadata.lang": "en"}`,
/// `{"metadata.tag": {"in": ["a", "b"]}}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    conditions: Vec<(Field, Condition)>,
}

fn scalar(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

impl Filter {
    /// Parses the `filter` of a request; a malformed filter is the client's error.
    pub fn parse(value: Option<&Value>) -> Result<Self, ApiError> {
        let Some(value) = value else {
            return Ok(Self::default());
        };
        let bad = |m: String| ApiError::Invalid(format!("filter: {m}"));
        let Value::Object(map) = value else {
            return Err(bad(
                "must be an object such as {\"metadata.lang\": \"en\"}".into()
            ));
        };
        let mut conditions = Vec::new();
        for (key, v) in map {
            let field = if key == "document_id" {
                Field::DocumentId
            } else if let Some(k) = key.strip_prefix("metadata.").filter(|k| !k.is_empty()) {
                Field::Metadata(k.to_string())
            } else {
                return Err(bad(format!(
                    "unknown field {key:?}; use \"document_id\" or \"metadata.<key>\""
                )));
            };
            let condition = match v {
                v if scalar(v) => Condition::Eq(v.clone()),
                Value::Object(op) => match (op.len(), op.get("in")) {
                    (1, Some(Value::Array(values)))
                        if !values.is_empty() && values.iter().all(scalar) =>
                    {
                        Condition::In(values.clone())
                    }
                    _ => {
                        return Err(bad(format!(
                            "{key}: the only operator is {{\"in\": [values]}}"
                        )))
                    }
                },
                _ => {
                    return Err(bad(format!(
                        "{key}: expected a string, number, boolean or {{\"in\": [...]}}"
                    )))
                }
            };
            conditions.push((field, condition));
        }
        Ok(Self { conditions })
    }

    /// Whether the filter lets everything through.
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// Whether a chunk of document `id` with `metadata` passes.
    pub fn matches(&self, id: &str, metadata: Option<&Map<String, Value>>) -> bool {
        self.conditions.iter().all(|(field, condition)| {
            let actual = match field {
                Field::DocumentId => Some(Value::String(id.to_string())),
                Field::Metadata(k) => metadata.and_then(|m| m.get(k)).cloned(),
            };
            let Some(actual) = actual else { return false };
            // A metadata array (tags) matches when any element does.
            let candidates: Vec<&Value> = match &actual {
                Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            match condition {
                Condition::Eq(want) => candidates.contains(&want),
                Condition::In(wanted) => wanted.iter().any(|w| candidates.contains(&w)),
            }
        })
    }
}

/// Which retriever ranks the chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Embedding similarity (HNSW).
    Dense,
    /// BM25 over titles and texts (SQLite FTS5).
    Lexical,
    /// Both, fused.
    Hybrid,
}

impl Mode {
    /// Parses a request's `mode`.
    pub fn parse(s: Option<&str>, default: Mode) -> Result<Mode, ApiError> {
        match s {
            None => Ok(default),
            Some("dense") => Ok(Mode::Dense),
            Some("lexical") => Ok(Mode::Lexical),
            Some("hybrid") => Ok(Mode::Hybrid),
            Some(other) => Err(ApiError::Invalid(format!(
                "mode: {other:?} is not one of \"dense\", \"lexical\", \"hybrid\""
            ))),
        }
    }
}

/// How hybrid mode combines the two rankings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// Weighted reciprocal rank fusion (k = 60).
    Rrf,
    /// Weighted sum of min-max normalised scores.
    Convex,
}

/// Everything a search needs besides the query.
#[derive(Debug, Clone, Copy)]
pub struct Strategy {
    /// The retriever.
    pub mode: Mode,
    /// Hybrid: how to fuse.
    pub fusion: Fusion,
    /// Hybrid: weight of the dense side in [0, 1]; the lexical side gets the rest.
    pub dense_weight: f32,
    /// Hybrid: candidates taken from each side.
    pub candidates: usize,
    /// The graph's candidate list size.
    pub ef_search: usize,
}

/// The `k` best live chunks for a query (its text and its vector) that pass
/// `filter`, best first. Every hit's score is its cosine similarity with the
/// query, whichever mode ranked it, so scores compare across modes.
pub fn search_with(
    store: &Store,
    index: &VectorIndex,
    text: &str,
    vector: &[f32],
    k: usize,
    filter: &Filter,
    strategy: &Strategy,
) -> Result<Vec<Hit>, ApiError> {
    let cosine = |key: usize| -> f32 {
        store
            .vector_of(key)
            .map(|v| v.iter().zip(vector).map(|(a, b)| a * b).sum())
            .unwrap_or(0.0)
    };
    let lexical = |n: usize| -> Result<Vec<Hit>, ApiError> {
        let allowed = |key: usize| match store.document_of(key) {
            Some(doc) => filter.is_empty() || filter.matches(doc, store.metadata_of(doc)),
            None => false,
        };
        // Over-fetch so that filtering still leaves n.
        let raw = store
            .lexical_search(text, (n * 10).max(200))
            .map_err(ApiError::internal)?;
        Ok(raw
            .into_iter()
            .filter(|(key, _)| allowed(*key))
            .take(n)
            .map(|(id, score)| Hit { id, score })
            .collect())
    };
    let ranked: Vec<usize> = match strategy.mode {
        Mode::Dense => return search(store, index, vector, k, filter, strategy.ef_search),
        Mode::Lexical => lexical(k)?.into_iter().map(|h| h.id).collect(),
        Mode::Hybrid => {
            let n = strategy.candidates.max(k);
            let dense = search(store, index, vector, n, filter, strategy.ef_search)?;
            let lexical = lexical(n)?;
            fuse(&dense, &lexical, strategy.fusion, strategy.dense_weight)
                .into_iter()
                .take(k)
                .collect()
        }
    };
    Ok(ranked
        .into_iter()
        .map(|id| Hit {
            id,
            score: cosine(id),
        })
        .collect())
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

/// Combines two best-first rankings into one list of ids, best first.
pub fn fuse(dense: &[Hit], lexical: &[Hit], fusion: Fusion, dense_weight: f32) -> Vec<usize> {
    let w = [
        dense_weight.clamp(0.0, 1.0),
        1.0 - dense_weight.clamp(0.0, 1.0),
    ];
    let mut fused: HashMap<usize, f32> = HashMap::new();
    for (side, hits) in [dense, lexical].into_iter().enumerate() {
        match fusion {
            Fusion::Rrf => {
                for (rank, h) in hits.iter().enumerate() {
                    *fused.entry(h.id).or_default() += w[side] / (60.0 + rank as f32 + 1.0);
                }
            }
            Fusion::Convex => {
                let max = hits.iter().map(|h| h.score).fold(f32::MIN, f32::max);
                let min = hits.iter().map(|h| h.score).fold(f32::MAX, f32::min);
                let span = max - min;
                for h in hits {
                    let norm = if span > 1e-9 {
                        (h.score - min) / span
                    } else {
                        1.0
                    };
                    *fused.entry(h.id).or_default() += w[side] * norm;
                }
            }
        }
    }
    let mut out: Vec<(usize, f32)> = fused.into_iter().collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out.into_iter().map(|(id, _)| id).collect()
}

/// The `k` best live chunks for `query` that pass `filter`.
pub fn search(
    store: &Store,
    index: &VectorIndex,
    query: &[f32],
    k: usize,
    filter: &Filter,
    ef_search: usize,
) -> Result<Vec<Hit>, ApiError> {
    let allowed = |key: usize| match store.document_of(key) {
        Some(doc) => filter.is_empty() || filter.matches(doc, store.metadata_of(doc)),
        None => false,
    };
    let allowed_count = if filter.is_empty() {
        store.live_count()
    } else {
        store
            .live()
            .filter(|(_, doc, _)| filter.matches(doc, store.metadata_of(doc)))
            .count()
    };
    let exact = || {
        exact_top_k(
            query,
            store
                .live()
                .filter(|(key, _, _)| allowed(*key))
                .map(|(key, _, v)| (key, v)),
            k,
        )
        .map_err(ApiError::internal)
    };
    if allowed_count <= EXACT_LIMIT.max(k) {
        return exact();
    }
    let hits = index
        .search_with_ef(query, k, ef_search.max(2 * k), &allowed)
        .map_err(ApiError::internal)?;
    if hits.len() < k.min(allowed_count) {
        return exact();
    }
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parses_and_matches_the_documented_forms() {
        let m = meta(json!({ "lang": "en", "tag": ["a", "c"], "year": 2020 }));
        let f = |v: Value| Filter::parse(Some(&v)).unwrap();
        assert!(f(json!({ "document_id": "x" })).matches("x", Some(&m)));
        assert!(!f(json!({ "document_id": "x" })).matches("y", Some(&m)));
        assert!(f(json!({ "metadata.lang": "en" })).matches("x", Some(&m)));
        assert!(!f(json!({ "metadata.lang": "zh" })).matches("x", Some(&m)));
        assert!(f(json!({ "metadata.tag": { "in": ["b", "c"] } })).matches("x", Some(&m)));
        assert!(f(json!({ "metadata.tag": "a" })).matches("x", Some(&m)));
        assert!(f(json!({ "metadata.year": 2020, "metadata.lang": "en" })).matches("x", Some(&m)));
        assert!(!f(json!({ "metadata.year": 2020, "metadata.lang": "zh" })).matches("x", Some(&m)));
        assert!(!f(json!({ "metadata.missing": "x" })).matches("x", Some(&m)));
        assert!(Filter::parse(None).unwrap().matches("x", None));
    }

    fn hits(ids: &[(usize, f32)]) -> Vec<Hit> {
        ids.iter().map(|&(id, score)| Hit { id, score }).collect()
    }

    #[test]
    fn rrf_rewards_agreement_and_weights_sides() {
        let dense = hits(&[(1, 0.9), (2, 0.8), (3, 0.7)]);
        let lexical = hits(&[(3, 12.0), (4, 9.0), (1, 5.0)]);
        assert_eq!(fuse(&dense, &lexical, Fusion::Rrf, 0.5), vec![1, 3, 2, 4]);
        assert_eq!(fuse(&dense, &lexical, Fusion::Rrf, 1.0)[..3], [1, 2, 3]);
        assert_eq!(fuse(&dense, &lexical, Fusion::Rrf, 0.0)[..3], [3, 4, 1]);
    }

    #[test]
    fn convex_fusion_uses_normalised_scores() {
        let dense = hits(&[(1, 0.90), (2, 0.89), (3, 0.10)]);
        let lexical = hits(&[(2, 10.0), (3, 9.0), (1, 1.0)]);
        // Dense barely separates 1 and 2; the lexical side decides.
        assert_eq!(fuse(&dense, &lexical, Fusion::Convex, 0.5), vec![2, 1, 3]);
        assert_eq!(fuse(&dense, &lexical, Fusion::Convex, 1.0)[0], 1);
        assert_eq!(fuse(&[], &lexical, Fusion::Convex, 0.7), vec![2, 3, 1]);
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

    #[test]
    fn modes_parse() {
        assert_eq!(Mode::parse(None, Mode::Hybrid).unwrap(), Mode::Hybrid);
        assert_eq!(
            Mode::parse(Some("lexical"), Mode::Dense).unwrap(),
            Mode::Lexical
        );
        assert!(Mode::parse(Some("fuzzy"), Mode::Dense).is_err());
    }

    #[test]
    fn malformed_filters_are_client_errors() {
        for v in [
            json!("en"),
            json!({ "lang": "en" }),
            json!({ "metadata.": "en" }),
            json!({ "metadata.lang": { "eq": "en" } }),
            json!({ "metadata.lang": { "in": [] } }),
            json!({ "metadata.lang": { "in": [["nested"]] } }),
            json!({ "metadata.lang": null }),
        ] {
            assert!(
                matches!(Filter::parse(Some(&v)), Err(ApiError::Invalid(_))),
                "{v}"
            );
        }
    }
}
