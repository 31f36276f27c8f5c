//! The words the lexical index holds, made by ragd rather than by
//! PostgreSQL's text search configurations, so that both store backends index
//! and query the same terms: CJK runs as character bigrams
//! ([`ragd_core::lexical_text`]), other text split into runs of letters and
//! digits, lowercased, diacritics removed, English words stemmed with Porter's algorithm — what
//! SQLite's FTS5 tokenizer `porter unicode61 remove_diacritics 2` does for the
//! SQLite backend. (PostgreSQL's `to_tsvector('english', …)` would drop stop
//! words from documents and segment Chinese not at all, and `ts_rank` is not
//! BM25: figures would differ between the backends.)

use std::collections::HashMap;

use unicode_normalization::{char::is_combining_mark, UnicodeNormalization};

/// A word as indexed: lowercased, without diacritics, and stemmed when it is
/// made of three or more ASCII letters (FTS5's porter tokenizer leaves
/// shorter words, and words with other characters, as they are).
fn normalise(word: &str) -> String {
    let plain: String = word
        .nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect();
    if plain.len() >= 3 && plain.bytes().all(|b| b.is_ascii_alphabetic()) {
        porter_stemmer::stem(&plain)
    } else {
        plain
    }
}

/// The indexed words of `text`, in order (with repeats).
fn words(text: &str) -> Vec<String> {
    ragd_core::lexical_text(text)
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(normalise)
        .collect()
}

/// A chunk's terms with their counts, and its length in words (BM25's
/// document length).
pub(crate) fn chunk_terms(
    title: Option<&str>,
    section: &str,
    text: &str,
    questions: &[String],
) -> (HashMap<String, i32>, i32) {
    let all = words(&ragd_core::lexical_body(title, section, text, questions));
    let len = i32::try_from(all.len()).unwrap_or(i32::MAX);
    let mut counts = HashMap::new();
    for w in all {
        *counts.entry(w).or_insert(0i32) += 1;
    }
    (counts, len)
}

/// The distinct terms a query searches for: [`ragd_core::query_words`]
/// (stop words out unless nothing else is left), normalised like the index.
pub(crate) fn query_terms(query: &str) -> Vec<String> {
    let mut terms: Vec<String> = ragd_core::query_words(query)
        .iter()
        .map(|w| normalise(w))
        .collect();
    terms.sort();
    terms.dedup();
    terms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_stemmed_folded_and_chinese_is_paired() {
        let (terms, len) = chunk_terms(
            Some("Packages"),
            "",
            "Installing packages: café 北京大学 amd64",
            &[],
        );
        assert_eq!(terms.get("packag"), Some(&2), "{terms:?}");
        assert_eq!(terms.get("instal"), Some(&1), "{terms:?}");
        assert_eq!(terms.get("cafe"), Some(&1), "{terms:?}");
        for pair in ["北京", "京大", "大学"] {
            assert_eq!(terms.get(pair), Some(&1), "{terms:?}");
        }
        assert_eq!(terms.get("amd64"), Some(&1), "mixed words are kept whole");
        assert_eq!(len, 8);
    }

    #[test]
    fn queries_match_the_index_forms_and_drop_stop_words() {
        assert_eq!(
            query_terms("How do I install the packages?"),
            ["instal", "packag"]
        );
        assert_eq!(query_terms("to be or not"), ["be", "not", "or", "to"]);
        assert!(query_terms(" ?! ").is_empty());
    }
}
