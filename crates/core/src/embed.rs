//! Embedding: text to vectors, the [`Embed`] seam.

use crate::error::BackendError;

/// What a text is, for models that embed queries and passages differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// A search query (or any text compared against passages).
    Query,
    /// A passage to be found.
    Passage,
}

/// What an embedding model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedderInfo {
    /// The model's name (its directory name for a local model).
    pub name: String,
    /// Vector dimension.
    pub dim: usize,
    /// Longest input in tokens, special tokens included; longer texts are cut.
    pub max_length: usize,
    /// Put in front of queries (`query: ` for E5 models, usually empty).
    pub query_prefix: String,
    /// Put in front of passages (`passage: ` for E5 models, usually empty).
    pub passage_prefix: String,
    /// Whether the model reads languages besides English (its vocabulary
    /// covers them): an English-only model gives texts in other languages
    /// vectors that carry no meaning.
    pub multilingual: bool,
}

impl EmbedderInfo {
    /// The identity of stored vectors: the model's name, and the passage
    /// prefix when there is one (vectors made with another prefix are not
    /// comparable).
    pub fn identity(&self) -> String {
        if self.passage_prefix.is_empty() {
            self.name.clone()
        } else {
            format!(
                "{} with passage prefix {:?}",
                self.name, self.passage_prefix
            )
        }
    }
}

/// Texts to L2-normalised vectors: the seam between the pipeline and the
/// embedding model. Chunk sizes are measured in the model's own tokens
/// ([`Embed::count_tokens`]), so a chunk is never cut by the model's window.
#[async_trait::async_trait]
pub trait Embed: Send + Sync + std::fmt::Debug {
    /// The model.
    fn info(&self) -> &EmbedderInfo;

    /// Tokens of `text` as the model counts them, without special tokens and
    /// without cutting it to the window.
    fn count_tokens(&self, text: &str) -> usize;

    /// One vector per text, in order, each embedded as `kind` (the model's
    /// prefix for that kind in front).
    async fn embed(
        &self,
        kind: TextKind,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, BackendError>;
}
