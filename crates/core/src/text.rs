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

/// Whether `c` is written without spaces between words (Chinese, Japanese,
/// Korean), so that a word tokenizer would see a whole run as one token.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0xAC00..=0xD7AF | 0x20000..=0x2FFFF)
}

/// Text as the full-text index sees it: CJK runs become overlapping character
/// bigrams (the usual segmentation-free indexing for Chinese), the rest is kept
/// for the lexical index's word tokenizer (both store backends index this).
pub fn lexical_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    let mut run: Vec<char> = Vec::new();
    let flush = |run: &mut Vec<char>, out: &mut String| {
        if run.is_empty() {
            return;
        }
        out.push(' ');
        if run.len() == 1 {
            out.push(run[0]);
        } else {
            for pair in run.windows(2) {
                out.push(pair[0]);
                out.push(pair[1]);
                out.push(' ');
            }
        }
        out.push(' ');
        run.clear();
    };
    for c in text.chars() {
        if is_cjk(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// What the lexical index holds for a chunk (both store backends): its title,
/// section, generated questions and text, CJK runs as bigrams.
pub fn lexical_body(
    title: Option<&str>,
    section: &str,
    text: &str,
    questions: &[String],
) -> String {
    let mut body = String::with_capacity(text.len() + section.len() + 64);
    let parts = [title.unwrap_or(""), section]
        .into_iter()
        .chain(questions.iter().map(String::as_str));
    for part in parts {
        if !part.is_empty() {
            body.push_str(part);
            body.push('\n');
        }
    }
    body.push_str(text);
    lexical_text(&body)
}

/// The distinct words of a lexical query, lowercased, in sorted order: the
/// text split into runs of letters and digits (CJK runs as bigrams), English
/// stop words dropped unless nothing else is left. Both store backends search
/// for any of them (BM25 ranks by how many and how rare).
pub fn query_words(query: &str) -> Vec<String> {
    let mut all: Vec<String> = lexical_text(query)
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_lowercase)
        .collect();
    all.sort();
    all.dedup();
    if all.iter().any(|t| !STOP_WORDS.contains(&t.as_str())) {
        all.retain(|t| !STOP_WORDS.contains(&t.as_str()));
    }
    all
}
