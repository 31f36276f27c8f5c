//! Reranking: the stage between retrieval and the prompt, the [`Rerank`] seam.

use crate::error::BackendError;

/// Orders retrieved passages for a question, best first. Retrieval ranks by
/// embedding similarity and word overlap; a reranker may read question and
/// passage together (a cross-encoder, or the answer model's own judgement).
#[async_trait::async_trait]
pub trait Rerank: Send + Sync + std::fmt::Debug {
    /// The reranker's name, for logs and `/ready`.
    fn name(&self) -> &str;

    /// The indices of `passages` (each a passage's text), best first; indices
    /// left out drop those passages.
    async fn rerank(&self, question: &str, passages: &[&str]) -> Result<Vec<usize>, BackendError>;
}

/// Keeps retrieval's order: the stage exists, and does nothing yet.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRerank;

#[async_trait::async_trait]
impl Rerank for NoRerank {
    fn name(&self) -> &str {
        "none"
    }

    async fn rerank(&self, _question: &str, passages: &[&str]) -> Result<Vec<usize>, BackendError> {
        Ok((0..passages.len()).collect())
    }
}
