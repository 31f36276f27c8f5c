//! Lexical search: the full-text index (SQLite FTS5, Porter-stemmed, CJK runs
//! as character bigrams) over each chunk's title, section and text, and BM25
//! queries on it.

use rusqlite::{params, Connection};

use crate::{Store, StoreError};

use ragd_core::lexical_body;
pub use ragd_core::lexical_text;

/// The English stop words, shared with the answer check.
pub use ragd_core::STOP_WORDS;

/// An FTS5 query matching any term of `query` (BM25 ranks by how many and how
/// rare; the index stems English words, so "packages" finds "package"); `None`
/// when the query has no terms.
fn match_expression(query: &str) -> Option<String> {
    let terms = ragd_core::query_words(query);
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
        s.delete("default", "a").unwrap();
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
