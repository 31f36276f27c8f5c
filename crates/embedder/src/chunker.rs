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

#[cfg(test)]
mod tests {
    use super::*;

    /// A BERT-style tokenizer in which every word and punctuation mark is one
    /// token ([UNK]), so token counts are easy to reason about.
    fn words() -> Tokenizer {
        let json = r###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":{"type":"BertNormalizer","clean_text":true,"handle_chinese_chars":true,"strip_accents":null,"lowercase":false},"pre_tokenizer":{"type":"BertPreTokenizer"},"post_processor":null,"decoder":null,
            "model":{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##",
                     "max_input_chars_per_word":100,"vocab":{"[UNK]":0}}}"###;
        json.parse().unwrap()
    }

    fn cfg(max_tokens: usize, overlap: usize) -> ChunkerConfig {
        ChunkerConfig { max_tokens, overlap }
    }

    #[test]
    fn short_text_is_one_chunk() {
        let text = "  Debian is a free operating system.  ";
        let chunks = chunk_text(&words(), text, &cfg(20, 4)).unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].text, "Debian is a free operating system.");
        assert_eq!(chunks[0].tokens, 7);
    }

    #[test]
    fn empty_text_has_no_chunks() {
        assert!(chunk_text(&words(), " \n\t ", &cfg(20, 4)).unwrap().is_empty());
    }

    #[test]
    fn chunks_respect_bounds_overlap_and_sentence_ends() {
        let sentence = "one two three four five six seven eight nine.";
        let text = std::iter::repeat_n(sentence, 12).collect::<Vec<_>>().join(" ");
        let chunks = chunk_text(&words(), &text, &cfg(32, 8)).unwrap();
        assert!(chunks.len() >= 4);
        for (i, c) in chunks.iter().enumerate() {
            assert!(c.tokens <= 32, "chunk {i} has {} tokens", c.tokens);
            assert_eq!(&text[c.start..c.end], c.text);
            if i + 1 < chunks.len() {
                assert!(c.text.ends_with('.'), "chunk {i} ends mid-sentence: {:?}", c.text);
                assert!(chunks[i + 1].start < c.end, "chunk {i} and the next overlap");
            }
        }
        assert_eq!(chunks.last().unwrap().end, text.len());
    }

    #[test]
    fn paragraph_break_beats_sentence_end() {
        let text = format!("{}\n\n{}", "a b c d e f g h i j k l. m n o p", "q r s t u v w x y z");
        let chunks = chunk_text(&words(), &text, &cfg(20, 2)).unwrap();
        assert_eq!(chunks[0].text, "a b c d e f g h i j k l. m n o p");
    }

    #[test]
    fn cjk_text_is_cut_at_full_stops() {
        let text = "中国的首都是北京。".repeat(10);
        let chunks = chunk_text(&words(), &text, &cfg(20, 3)).unwrap();
        assert!(chunks.len() > 1);
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.text.ends_with('。'), "{:?}", c.text);
            assert!(c.tokens <= 20);
        }
    }

    #[test]
    fn validate_against_window() {
        assert!(cfg(200, 40).validate(256).is_ok());
        assert!(cfg(255, 40).validate(256).is_err());
        assert!(cfg(100, 50).validate(256).is_err());
        assert!(cfg(8, 0).validate(256).is_err());
    }
}
