//! Splits a document into passages that fit the embedder's window.
//!
//! Lengths are counted in the embedder's own tokens, so a chunk of `max_tokens`
//! tokens is never truncated by the model (which would make its tail
//! unsearchable). Within the last part of each window the cut goes to the best
//! boundary available — a blank line, then a line break, then the end of a
//! sentence (Latin or CJK punctuation), then any space — so passages read as
//! whole sentences where the text allows. Consecutive chunks share `overlap`
//! tokens so that a fact split across a cut is still whole in one of them.

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::EmbedError;

/// Chunk sizes, in embedder tokens (special tokens not counted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkerConfig {
    /// Most tokens in one chunk.
    pub max_tokens: usize,
    /// Tokens shared by consecutive chunks; less than half of `max_tokens`.
    pub overlap: usize,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        Self { max_tokens: 200, overlap: 40 }
    }
}

impl ChunkerConfig {
    /// Checks the sizes against the embedder's window (`max_length` includes the
    /// two special tokens a BERT model adds).
    pub fn validate(&self, max_length: usize) -> Result<(), String> {
        if self.max_tokens < 16 {
            return Err(format!("chunking.max_tokens = {} is below the minimum of 16", self.max_tokens));
        }
        if self.max_tokens + 2 > max_length {
            return Err(format!(
                "chunking.max_tokens = {} does not fit the embedder's window of {} tokens (at most {})",
                self.max_tokens,
                max_length,
                max_length.saturating_sub(2)
            ));
        }
        if self.overlap * 2 >= self.max_tokens {
            return Err(format!(
                "chunking.overlap = {} must be less than half of max_tokens = {}",
                self.overlap, self.max_tokens
            ));
        }
        Ok(())
    }
}

/// One passage of a document.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The passage, a verbatim slice of the document.
    pub text: String,
    /// Byte offset of the passage in the document.
    pub start: usize,
    /// Byte offset just past the passage.
    pub end: usize,
    /// Number of embedder tokens in the passage.
    pub tokens: usize,
}

/// How good a cut between `prev` (a token's text) and the gap after it is.
fn boundary_score(prev: &str, gap: &str) -> u8 {
    if gap.contains("\n\n") {
        5
    } else if gap.contains('\n') {
        4
    } else if prev.ends_with(['.', '!', '?', '。', '！', '？']) {
        3
    } else if prev.ends_with([';', ':', '；', '：', ',', '，', '、']) {
        2
    } else if !gap.is_empty() {
        1
    } else {
        0
    }
}

/// Splits `text` into chunks of at most `config.max_tokens` tokens of `tokenizer`.
///
/// `tokenizer` is used without truncation or padding whatever its settings.
pub fn chunk_text(tokenizer: &Tokenizer, text: &str, config: &ChunkerConfig) -> Result<Vec<Chunk>, EmbedError> {
    let mut tokenizer = tokenizer.clone();
    tokenizer.with_truncation(None).map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
    tokenizer.with_padding(None);
    let encoding = tokenizer.encode(text, false).map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
    // Offsets are byte offsets into `text`; drop zero-width tokens, which have no place.
    let offsets: Vec<(usize, usize)> = encoding.get_offsets().iter().copied().filter(|(s, e)| e > s).collect();
    let n = offsets.len();
    let max = config.max_tokens.max(1);
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let limit = (start + max).min(n);
        let end = if limit == n {
            n
        } else {
            // Look for the best cut in the last 40% of the window; later wins ties.
            let earliest = start + (max * 3 / 5).max(1);
            let mut best = (0u8, limit);
            for e in earliest..=limit {
                let prev = &text[offsets[e - 1].0..offsets[e - 1].1];
                let gap = &text[offsets[e - 1].1..offsets[e].0];
                let score = boundary_score(prev, gap);
                if score >= best.0 {
                    best = (score, e);
                }
            }
            best.1
        };
        let (s, e) = (offsets[start].0, offsets[end - 1].1);
        chunks.push(Chunk { text: text[s..e].to_string(), start: s, end: e, tokens: end - start });
        if end == n {
            break;
        }
        start = end.saturating_sub(config.overlap).max(start + 1);
    }
    Ok(chunks)
}
