//! Facts about text that more than one stage relies on.

/// English function words: left out of lexical queries (in an OR query every
/// term matches somewhere, and these add matches without meaning; BM25's IDF
/// only dampens them) and of the words that tie an answer's sentence to a
/// passage. Lucene's English stop set plus question words and auxiliaries.
pub const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "can", "do", "does", "for", "how", "i",
    "if", "in", "into", "is", "it", "me", "my", "no", "not", "of", "on", "or", "such", "that",
    "the", "their", "then", "there", "these", "they", "this", "to", "was", "what", "when", "where",
    "which", "who", "why", "will", "with", "you",
];
