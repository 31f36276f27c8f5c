//! Ingest stage: a document's text into passages that fit the embedder's window.
//!
//! The splitting is text-splitter's `MarkdownSplitter`: it takes the largest
//! semantic units that fit — sections under a heading, then blocks (paragraphs,
//! lists, code), then lines, sentences (Unicode sentence boundaries, so CJK full
//! stops count), words — and packs them up to the size limit. Sizes are counted in
//! the embedder's own tokens, so a chunk of `max_tokens` tokens is never truncated
//! by the model (which would make its tail unsearchable). Consecutive chunks share
//! up to `overlap` tokens so a fact split across a cut is still whole in one of them.
//! Plain text is valid Markdown, so the same splitter serves every document; HTML
//! is turned into Markdown headings by the extractor before it gets here.
//!
//! Each chunk also carries the headings in force where it starts (its section
//! path), which ragd embeds and indexes with the chunk: a passage deep in a
//! section still knows what the section is about.

use serde::{Deserialize, Serialize};
use text_splitter::{ChunkConfig, ChunkSizer, MarkdownSplitter};

use crate::error::ConfigError;

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
        Self {
            max_tokens: 200,
            overlap: 40,
        }
    }
}

impl ChunkerConfig {
    /// Checks the sizes against the embedder's window (`max_length` includes the
    /// two special tokens a BERT model adds).
    pub fn validate(&self, max_length: usize) -> Result<(), ConfigError> {
        if self.max_tokens < 16 {
            return Err(ConfigError(format!(
                "chunking.max_tokens = {} is below the minimum of 16",
                self.max_tokens
            )));
        }
        if self.max_tokens + 2 > max_length {
            return Err(ConfigError(format!(
                "chunking.max_tokens = {} does not fit the embedder's window of {} tokens (at most {})",
                self.max_tokens,
                max_length,
                max_length.saturating_sub(2)
            )));
        }
        if self.overlap * 2 >= self.max_tokens {
            return Err(ConfigError(format!(
                "chunking.overlap = {} must be less than half of max_tokens = {}",
                self.overlap, self.max_tokens
            )));
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
    /// The headings in force where the passage starts, outermost first (including
    /// one the passage itself starts with).
    pub headings: Vec<String>,
}

impl Chunk {
    /// The heading path as one line, `"Install > From source"`; empty when none.
    pub fn section(&self) -> String {
        self.headings.join(" > ")
    }
}

/// The chunk sizes cannot be used (an overlap as large as a chunk).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunking: {0}")]
pub struct ChunkError(String);

/// Counts chunk sizes in the embedder's tokens (see [`ragd_core::Embed::count_tokens`]).
struct TokenSizer<F>(F);

impl<F: Fn(&str) -> usize> ChunkSizer for TokenSizer<F> {
    fn size(&self, chunk: &str) -> usize {
        (self.0)(chunk)
    }
}

/// A heading: where it starts in the text, its level (1–6) and its text.
#[derive(Debug)]
struct Heading {
    start: usize,
    end: usize,
    level: usize,
    text: String,
}

/// The document's headings in order (ATX `#` and setext underlined ones, as
/// CommonMark reads them).
fn headings(text: &str) -> Vec<Heading> {
    use pulldown_cmark::{Event, Parser, Tag, TagEnd};
    let mut out = Vec::new();
    let mut current: Option<Heading> = None;
    for (event, range) in Parser::new(text).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                current = Some(Heading {
                    start: range.start,
                    end: range.end,
                    level: level as usize,
                    text: String::new(),
                })
            }
            Event::End(TagEnd::Heading(_)) => {
                if let Some(mut h) = current.take() {
                    h.text = h.text.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !h.text.is_empty() {
                        out.push(h);
                    }
                }
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = current.as_mut() {
                    h.text.push_str(&t);
                }
            }
            Event::SoftBreak | Event::HardBreak => {
                if let Some(h) = current.as_mut() {
                    h.text.push(' ');
                }
            }
            _ => {}
        }
    }
    out
}

/// Whether everything in `chunk` but white space lies inside headings.
fn is_only_headings(chunk: &Chunk, heads: &[Heading]) -> bool {
    let mut pos = chunk.start;
    let mut rest = String::new();
    for h in heads
        .iter()
        .filter(|h| h.end > chunk.start && h.start < chunk.end)
    {
        if h.start > pos {
            rest.push_str(&chunk.text[pos - chunk.start..h.start - chunk.start]);
        }
        pos = pos.max(h.end.min(chunk.end));
    }
    rest.push_str(&chunk.text[pos - chunk.start..]);
    pos > chunk.start && rest.trim().is_empty()
}

/// Splits `text` into chunks of at most `config.max_tokens` tokens as
/// `count_tokens` counts them (the embedder's tokens, no special tokens, no
/// truncation).
pub fn chunk_text(
    count_tokens: impl Fn(&str) -> usize,
    text: &str,
    config: &ChunkerConfig,
) -> Result<Vec<Chunk>, ChunkError> {
    let sizer = TokenSizer(count_tokens);
    let chunk_config = ChunkConfig::new(config.max_tokens.max(1))
        .with_overlap(config.overlap)
        .map_err(|e| ChunkError(e.to_string()))?
        .with_sizer(&sizer);
    let splitter = MarkdownSplitter::new(chunk_config);
    let heads = headings(text);
    let mut stack: Vec<&Heading> = Vec::new();
    let mut next = 0;
    let mut chunks: Vec<Chunk> = Vec::new();
    for (start, chunk) in splitter.chunk_indices(text) {
        if chunk.trim().is_empty() {
            continue;
        }
        // A chunk that is only headings says nothing the next chunk's section
        // path does not; drop it unless it turns out to be the last one.
        if chunks.last().is_some_and(|c| is_only_headings(c, &heads)) {
            chunks.pop();
        }
        // The section path at `start`: every heading that begins at or before it,
        // each closing the deeper or equal ones before it.
        while next < heads.len() && heads[next].start <= start {
            let h = &heads[next];
            while stack.last().is_some_and(|top| top.level >= h.level) {
                stack.pop();
            }
            stack.push(h);
            next += 1;
        }
        chunks.push(Chunk {
            text: chunk.to_string(),
            start,
            end: start + chunk.len(),
            tokens: sizer.size(chunk),
            headings: stack.iter().map(|h| h.text.clone()).collect(),
        });
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token counts of a BERT-style tokenizer in which every word and
    /// punctuation mark is one token ([UNK]), so counts are easy to reason about.
    fn words() -> impl Fn(&str) -> usize {
        let json = r###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":{"type":"BertNormalizer","clean_text":true,"handle_chinese_chars":true,"strip_accents":null,"lowercase":false},"pre_tokenizer":{"type":"BertPreTokenizer"},"post_processor":null,"decoder":null,
            "model":{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##",
                     "max_input_chars_per_word":100,"vocab":{"[UNK]":0}}}"###;
        let tokenizer: tokenizers::Tokenizer = json.parse().unwrap();
        move |text| tokenizer.encode_fast(text, false).unwrap().len()
    }

    fn cfg(max_tokens: usize, overlap: usize) -> ChunkerConfig {
        ChunkerConfig {
            max_tokens,
            overlap,
        }
    }

    #[test]
    fn short_text_is_one_chunk() {
        let text = "  Debian is a free operating system.  ";
        let chunks = chunk_text(words(), text, &cfg(20, 4)).unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].text, "Debian is a free operating system.");
        assert_eq!(chunks[0].tokens, 7);
    }

    #[test]
    fn empty_text_has_no_chunks() {
        assert!(chunk_text(words(), "", &cfg(20, 4)).unwrap().is_empty());
        assert!(chunk_text(words(), " \n\t ", &cfg(20, 4))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn one_word_is_one_chunk() {
        let chunks = chunk_text(words(), "\nDebian\n", &cfg(20, 4)).unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            (
                chunks[0].text.as_str(),
                chunks[0].start,
                chunks[0].end,
                chunks[0].tokens
            ),
            ("Debian", 1, 7, 1)
        );
        assert!(chunks[0].headings.is_empty());
    }

    #[test]
    fn a_word_longer_than_a_chunk_is_cut() {
        // No boundary at all: the splitter falls back to characters.
        let text = "x".repeat(500);
        let t = words();
        let chunks = chunk_text(&t, &text, &cfg(16, 0)).unwrap();
        assert_eq!(chunks.iter().map(|c| c.text.len()).sum::<usize>(), 500);
        assert!(chunks.iter().all(|c| c.tokens <= 16));
    }

    #[test]
    fn chunks_carry_their_section_path() {
        let body = "Alpha beta gamma delta. Epsilon zeta eta theta. Iota kappa lambda mu.";
        let text = format!(
            "Intro text before any heading.\n\n# Install\n\n{body}\n\n## From source\n\n{body}\n\n{body}\n\n\
             ### Build flags\n\n{body}\n\n{body}\n\n## From packages\n\n{body}\n\nSetext title\n============\n\n{body}\n"
        );
        let chunks = chunk_text(words(), &text, &cfg(24, 0)).unwrap();
        let find = |needle_start: usize| chunks.iter().find(|c| c.start == needle_start).unwrap();
        for c in &chunks {
            assert_eq!(&text[c.start..c.end], c.text);
            assert!(c.tokens <= 24, "{c:?}");
        }
        assert!(chunks[0].headings.is_empty());
        // A chunk that starts with a heading is in that heading's section.
        let install = find(text.find("# Install").unwrap());
        assert!(install.text.starts_with("# Install"), "{install:?}");
        assert_eq!(install.headings, vec!["Install".to_string()]);
        let flags = text.find("### Build flags").unwrap();
        assert_eq!(find(flags).section(), "Install > From source > Build flags");
        let in_flags = chunks.iter().find(|c| c.start > flags).unwrap();
        assert_eq!(in_flags.section(), "Install > From source > Build flags");
        let packages = text.find("## From packages").unwrap();
        let after = chunks.iter().find(|c| c.start >= packages).unwrap();
        assert_eq!(
            after.section(),
            "Install > From packages",
            "a sibling closes its predecessor: {after:?}"
        );
        let last = chunks.last().unwrap();
        assert_eq!(last.section(), "Setext title");
        // A chunk of nothing but a heading is dropped: the next chunk carries it.
        assert!(
            chunks.iter().all(|c| !c.text.starts_with("Setext")),
            "{chunks:#?}"
        );
    }

    #[test]
    fn cjk_text_without_spaces_fits() {
        let t = words();
        let text = "北京是中国的首都也是政治文化中心".repeat(8);
        let chunks = chunk_text(&t, &text, &cfg(20, 0)).unwrap();
        assert!(chunks.len() > 1);
        assert_eq!(
            chunks.iter().map(|c| c.text.as_str()).collect::<String>(),
            text
        );
        assert!(chunks.iter().all(|c| c.tokens <= 20 && c.tokens > 0));
    }

    #[test]
    fn chunks_respect_bounds_overlap_and_sentence_ends() {
        let sentence = "One two three four five six seven eight nine.";
        let text = std::iter::repeat_n(sentence, 12)
            .collect::<Vec<_>>()
            .join(" ");
        // Sentences of 10 tokens: three fit in 32; an overlap of 12 repeats one.
        let chunks = chunk_text(words(), &text, &cfg(32, 12)).unwrap();
        assert!(chunks.len() >= 5, "{chunks:#?}");
        for (i, c) in chunks.iter().enumerate() {
            assert!(c.tokens <= 32, "chunk {i} has {} tokens", c.tokens);
            assert_eq!(&text[c.start..c.end], c.text);
            if i + 1 < chunks.len() {
                assert!(
                    c.text.ends_with('.'),
                    "chunk {i} ends mid-sentence: {:?}",
                    c.text
                );
                assert!(
                    chunks[i + 1].start < c.end,
                    "chunk {i} and the next overlap"
                );
            }
        }
        assert_eq!(chunks.last().unwrap().end, text.len());
    }

    #[test]
    fn paragraph_break_beats_sentence_end() {
        let text = format!(
            "{}\n\n{}",
            "a b c d e f g h i j k l. m n o p", "q r s t u v w x y z"
        );
        let chunks = chunk_text(words(), &text, &cfg(20, 2)).unwrap();
        assert_eq!(chunks[0].text, "a b c d e f g h i j k l. m n o p");
    }

    #[test]
    fn cjk_text_is_cut_at_full_stops() {
        let text = "中国的首都是北京。".repeat(10);
        let chunks = chunk_text(words(), &text, &cfg(20, 3)).unwrap();
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
