//! Ask and search stage: the chunks that best match a query.
//!
//! Three retrievers: dense (embedding similarity, the store's vector search),
//! lexical (BM25 over title, section and text, the store's full-text search),
//! and hybrid, which fuses the two rankings. Whichever ranked a chunk, it is
//! scored by its cosine with the query, so `min_score` means the same in every
//! mode. How the store searches (an HNSW graph with tombstones, SQL) is the
//! store's business ([`ragd_core::DocumentStore`]).

use std::collections::HashMap;

use ragd_core::{DocumentStore, Filter, Hit, StoredChunk};
use serde::{Deserialize, Serialize};

use crate::error::Error;

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
    pub fn parse(s: Option<&str>, default: Mode) -> Result<Mode, Error> {
        match s {
            None => Ok(default),
            Some("dense") => Ok(Mode::Dense),
            Some("lexical") => Ok(Mode::Lexical),
            Some("hybrid") => Ok(Mode::Hybrid),
            Some(other) => Err(Error::Invalid(format!(
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
}

/// The `k` best live chunks for a query (its text and its vector) that pass
/// `filter`, best first, each with its cosine similarity to the query.
pub async fn retrieve(
    store: &dyn DocumentStore,
    text: &str,
    vector: &[f32],
    k: usize,
    filter: &Filter,
    strategy: &Strategy,
) -> Result<Vec<(StoredChunk, f32)>, Error> {
    let ranked: Vec<Hit> = match strategy.mode {
        Mode::Dense => store.dense_search(vector, k, filter).await?,
        Mode::Lexical => store.lexical_search(text, k, filter).await?,
        Mode::Hybrid => {
            let n = strategy.candidates.max(k);
            let dense = store.dense_search(vector, n, filter).await?;
            let lexical = store.lexical_search(text, n, filter).await?;
            fuse(&dense, &lexical, strategy.fusion, strategy.dense_weight)
                .into_iter()
                .take(k)
                .map(|id| Hit { id, score: 0.0 })
                .collect()
        }
    };
    let keys: Vec<usize> = ranked.iter().map(|h| h.id).collect();
    let dense_score: HashMap<usize, f32> = ranked.iter().map(|h| (h.id, h.score)).collect();
    let chunks = store.chunks(&keys).await?;
    Ok(chunks
        .into_iter()
        .map(|c| {
            let score = match strategy.mode {
                // The vector search's own score is the cosine.
                Mode::Dense => dense_score.get(&c.key).copied().unwrap_or(0.0),
                Mode::Lexical | Mode::Hybrid => {
                    c.vector.iter().zip(vector).map(|(a, b)| a * b).sum()
                }
            };
            (c, score)
        })
        .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn modes_parse() {
        assert_eq!(Mode::parse(None, Mode::Hybrid).unwrap(), Mode::Hybrid);
        assert_eq!(
            Mode::parse(Some("lexical"), Mode::Dense).unwrap(),
            Mode::Lexical
        );
        assert!(Mode::parse(Some("fuzzy"), Mode::Dense).is_err());
    }
}
