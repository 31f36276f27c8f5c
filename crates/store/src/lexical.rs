//! Lexical search: the full-text index (SQLite FTS5, Porter-stemmed, CJK runs
//! as character bigrams) over each chunk's title, section and text, and BM25
//! queries on it.
//!
//! Each collection has its own FTS5 table. FTS5's `bm25()` takes its
//! statistics (how many rows, how many hold a term, their average length)
//! from the whole table, so one table shared by every collection would let
//! one team's documents move the order of another's results, and let a key
//! probe how common a word is in collections it cannot see.

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

/// The FTS5 table of `collection`: its name in hex, because SQLite compares
/// table names without case while collection names keep theirs ("Docs" and
/// "docs" are two collections), and so that no name can reach the SQL.
pub(crate) fn fts_table(collection: &str) -> String {
    let hex: String = collection.bytes().map(|b| format!("{b:02x}")).collect();
    format!("fts_{hex}")
}

/// Creates the full-text table of `collection` when it is missing.
pub(crate) fn create_fts(conn: &Connection, collection: &str) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE VIRTUAL TABLE IF NOT EXISTS {} USING fts5(body, tokenize = 'porter unicode61 remove_diacritics 2');",
        fts_table(collection)
    ))
}

/// Drops the full-text table of `collection` (with its rows).
pub(crate) fn drop_fts(conn: &Connection, collection: &str) -> rusqlite::Result<()> {
    conn.execute_batch(&format!("DROP TABLE IF EXISTS {};", fts_table(collection)))
}

/// Adds chunk `key` of `collection` (of a document titled `title`) to the
/// full-text index.
pub(crate) fn index_chunk(
    conn: &Connection,
    collection: &str,
    key: i64,
    title: Option<&str>,
    section: &str,
    text: &str,
    questions: &[String],
) -> rusqlite::Result<()> {
    // Cached: an upsert and the backfill run it once a chunk.
    conn.prepare_cached(&format!(
        "INSERT INTO {} (rowid, body) VALUES (?1, ?2)",
        fts_table(collection)
    ))?
    .execute(params![key, lexical_body(title, section, text, questions)])
    .map(|_| ())
}

/// Removes chunks `keys` of `collection` from the full-text index. The FTS5
/// table has no foreign key to `chunks`, so deleting chunk rows does not
/// cascade to it.
pub(crate) fn forget_chunks(
    conn: &Connection,
    collection: &str,
    keys: &[usize],
) -> rusqlite::Result<()> {
    let mut delete = conn.prepare_cached(&format!(
        "DELETE FROM {} WHERE rowid = ?1",
        fts_table(collection)
    ))?;
    for k in keys {
        delete.execute([*k as i64])?;
    }
    Ok(())
}

impl Store {
    /// BM25 search (SQLite FTS5) over the titles and chunk texts of
    /// `collection`, with its statistics alone: up to `limit` chunk keys with
    /// their scores, best first (higher is better). A collection that does
    /// not exist has none.
    pub fn lexical_search(
        &self,
        collection: &str,
        query: &str,
        limit: usize,
    ) -> Result<Vec<(usize, f32)>, StoreError> {
        let Some(expr) = match_expression(query) else {
            return Ok(Vec::new());
        };
        if !self.has_collection(collection)? {
            return Ok(Vec::new());
        }
        let table = fts_table(collection);
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT rowid, -bm25({table}) FROM {table} WHERE {table} MATCH ?1
                 ORDER BY bm25({table}) LIMIT ?2"
            ))
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
        let hits = s.lexical_search("default", "Fox jumps!", 10).unwrap();
        assert_eq!(hits.first().map(|h| h.0), Some(1), "{hits:?}");
        assert!(hits.iter().any(|h| h.0 == 3));
        // Chinese by bigrams.
        let hits = s.lexical_search("default", "首都北京", 10).unwrap();
        assert_eq!(hits.first().map(|h| h.0), Some(4), "{hits:?}");
        assert!(s.lexical_search("default", "  ?! ", 10).unwrap().is_empty());
        s.delete("default", "a").unwrap();
        assert!(s.lexical_search("default", "jumps", 10).unwrap().is_empty());
        s.upsert(&doc("b", &["only wolves here"])).unwrap();
        assert!(
            s.lexical_search("default", "fox", 10).unwrap().is_empty(),
            "replaced chunks are gone"
        );
    }

    /// BM25 in one collection is computed from that collection alone: adding
    /// documents to another changes neither which chunks it finds nor their
    /// scores, and each sees only its own.
    #[test]
    fn bm25_statistics_are_per_collection() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), "m", 2).unwrap();
        s.upsert(&doc("a", &["apples and pears", "pears alone"]))
            .unwrap();
        s.upsert(&doc("b", &["an apple tree with apples", "plums"]))
            .unwrap();
        let before = s.lexical_search("default", "apples pears", 10).unwrap();
        assert_eq!(before.len(), 3, "{before:?}");
        assert!(s.create_collection("Other").unwrap());
        assert!(
            s.create_collection("other").unwrap(),
            "names keep their case"
        );
        for i in 0..30 {
            let mut d = doc(&format!("o{i}"), &["apples apples apples", "more pears"]);
            d.collection = "Other".into();
            s.upsert(&d).unwrap();
        }
        let after = s.lexical_search("default", "apples pears", 10).unwrap();
        assert_eq!(
            before, after,
            "scores in default moved with Other's content"
        );
        let other = s.lexical_search("Other", "apples", 100).unwrap();
        assert_eq!(other.len(), 30);
        let default_keys: Vec<usize> = before.iter().map(|h| h.0).collect();
        assert!(other.iter().all(|h| !default_keys.contains(&h.0)));
        assert!(s.lexical_search("other", "apples", 10).unwrap().is_empty());
        assert!(s
            .lexical_search("missing", "apples", 10)
            .unwrap()
            .is_empty());
        // Gone with its collection; the others keep theirs, across a reopen.
        s.delete_collection("Other").unwrap();
        assert!(s.lexical_search("Other", "apples", 10).unwrap().is_empty());
        drop(s);
        let s = Store::open(dir.path(), "m", 2).unwrap();
        assert_eq!(
            s.lexical_search("default", "apples pears", 10).unwrap(),
            before
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
