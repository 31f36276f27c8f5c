//! Lexical search: the full-text index (SQLite FTS5, Porter-stemmed, CJK runs
//! as character bigrams) over each chunk's title, section and text, and BM25
//! queries on it.

use rusqlite::{params, Connection};

use crate::{Store, StoreError};

/// Whether `c` is written without spaces between words (Chinese, Japanese,
/// Korean), so that FTS5's unicode61 tokenizer would see a whole run as one token.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0xAC00..=0xD7AF | 0x20000..=0x2FFFF)
}

/// Text as the full-text index sees it: CJK runs become overlapping character
/// bigrams (the usual segmentation-free indexing for Chinese), the rest is kept
/// for FTS5's unicode61 tokenizer.
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

/// What the full-text index holds for a chunk: its title, section, generated
/// questions and text.
fn lexical_body(title: Option<&str>, section: &str, text: &str, questions: &[String]) -> String {
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

/// The English stop words, shared with the answer check.
pub use ragd_core::STOP_WORDS;

/// An FTS5 query matching any term of `query` (BM25 ranks by how many and how
/// rare; the index stems English words, so "packages" finds "package"); `None`
/// when the query has no terms. Stop words are dropped unless nothing else is left.
fn match_expression(query: &str) -> Option<String> {
    let mut all: Vec<String> = lexical_text(query)
        .split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_lowercase)
        .collect();
    all.sort();
    all.dedup();
    let content: Vec<&String> = all
        .iter()
        .filter(|t| !STOP_WORDS.contains(&t.as_str()))
        .collect();
    let terms: Vec<&String> = if content.is_empty() {
        all.iter().collect()
    } else {
        content
    };
    (!terms.is_empty()).then(|| {
        terms
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(" OR ")
    })
}

/// Adds chunk `key` (of a document titled `title`) to the full-text index.
pub(crate) fn index_chunk(
    conn: &Connection,
    key: i64,
    title: Option<&str>,
    section: &str,
    text: &str,
    questions: &[String],
) -> rusqlite::Result<()> {
    // Cached: an upsert and the backfill run it once a chunk.
    conn.prepare_cached("INSERT INTO chunks_fts (rowid, body) VALUES (?1, ?2)")?
        .execute(params![key, lexical_body(title, section, text, questions)])
        .map(|_| ())
}

/// Removes chunks `keys` from the full-text index. The FTS5 table has no
/// foreign key to `chunks`, so deleting chunk rows does not cascade to it.
pub(crate) fn forget_chunks(conn: &Connection, keys: &[usize]) -> rusqlite::Result<()> {
    for k in keys {
        conn.execute("DELETE FROM chunks_fts WHERE rowid = ?1", [*k as i64])?;
    }
    Ok(())
}

impl Store {
    /// BM25 search (SQLite FTS5) over titles and chunk texts: up to `limit`
    /// chunk keys with their scores, best first (higher is better).
    pub fn lexical_search(
        &self,
        query: &str,
        limit: usize,
    ) -> Result<Vec<(usize, f32)>, StoreError> {
        let Some(expr) = match_expression(query) else {
            return Ok(Vec::new());
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ?1
                 ORDER BY bm25(chunks_fts) LIMIT ?2",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map(params![expr, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)? as usize, r.get::<_, f64>(1)? as f32))
            })
            .map_err(self.db())?;
        rows.collect::<Result<_, _>>().map_err(self.db())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::doc;

    #[test]
    fn lexical_search_ranks_by_bm25_and_forgets_deleted_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        s.upsert(&doc("a", &["the quick brown fox jumps", "lazy dogs sleep"]))
            .unwrap();
        s.upsert(&doc("b", &["a fox den in the forest", "中国的首都是北京"]))
            .unwrap();
        let hits = s.lexical_search("Fox jumps!", 10).unwrap();
        assert_eq!(hits.first().map(|h| h.0), Some(1), "{hits:?}");
        assert!(hits.iter().any(|h| h.0 == 3));
        // Chinese by bigrams.
        let hits = s.lexical_search("首都北京", 10).unwrap();
        assert_eq!(hits.first().map(|h| h.0), Some(4), "{hits:?}");
        assert!(s.lexical_search("  ?! ", 10).unwrap().is_empty());
        s.delete("a").unwrap();
        assert!(s.lexical_search("jumps", 10).unwrap().is_empty());
        s.upsert(&doc("b", &["only wolves here"])).unwrap();
        assert!(
            s.lexical_search("fox", 10).unwrap().is_empty(),
            "replaced chunks are gone"
        );
    }

    #[test]
    fn cjk_runs_become_bigrams() {
        assert_eq!(
            lexical_text("Hi 北京大学!")
                .split_whitespace()
                .collect::<Vec<_>>(),
            vec!["Hi", "北京", "京大", "大学", "!"]
        );
        assert_eq!(lexical_text("中").trim(), "中");
    }

    #[test]
    fn stop_words_are_dropped_unless_nothing_else_is_left() {
        assert_eq!(
            match_expression("What is the Fox? the fox!").as_deref(),
            Some("\"fox\"")
        );
        assert_eq!(
            match_expression("to be or not to be").as_deref(),
            Some("\"be\" OR \"not\" OR \"or\" OR \"to\"")
        );
        assert_eq!(match_expression(" ?! "), None);
    }
}
