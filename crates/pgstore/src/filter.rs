//! SQL text with numbered parameters, built up piece by piece, and metadata
//! filters written in it: the same meaning as [`Filter::matches`] (a
//! condition on a metadata key holds when the value equals the wanted one or,
//! for a list value, contains it), as JSONB containment on the documents,
//! which the GIN index on `metadata` serves. One difference: PostgreSQL
//! compares JSON numbers by value, so `2020` matches `2020.0`.

use std::fmt::Write as _;

use ragd_core::filter::{Condition, Field};
use ragd_core::Filter;
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;

/// A statement and its parameters (`$1`, `$2`, … in the order bound).
#[derive(Default)]
pub(crate) struct Sql {
    pub(crate) text: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Sql {
    pub(crate) fn new(text: &str) -> Self {
        Self {
            text: text.to_string(),
            params: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends a placeholder for `value`.
    pub(crate) fn bind<T: ToSql + Sync + Send + 'static>(&mut self, value: T) -> &mut Self {
        self.params.push(Box::new(value));
        // Writing into a String cannot fail.
        let _ = write!(self.text, "${}", self.params.len());
        self
    }

    pub(crate) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// Appends ` AND …` conditions on the chunk row `c` for every condition of
/// `filter` and its collection (nothing for an empty filter).
pub(crate) fn push(sql: &mut Sql, filter: &Filter) {
    if let Some(collection) = filter.collection() {
        sql.push(" AND c.collection = ")
            .bind(collection.to_string());
    }
    for (field, condition) in filter.conditions() {
        // PostgreSQL text and JSONB cannot hold U+0000, so no stored id or
        // metadata has it; a wanted value with it matches nothing, and sent
        // as a parameter it would fail the query (a 500 schemathesis found).
        if let (Field::Metadata(key), Condition::Since(since)) = (field, condition) {
            // As in memory (`Filter::matches`): a JSON string in ragd's own
            // form (`YYYY-MM-DDTHH:MM:SSZ`), compared byte by byte.
            sql.push(
                " AND (c.collection, c.document_id) IN
                     (SELECT d.collection, d.id FROM ragd_documents d WHERE jsonb_typeof(d.metadata -> ",
            )
            .bind(key.clone())
            .push(") = 'string' AND (d.metadata ->> ")
            .bind(key.clone())
            .push(") COLLATE \"C\" ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$' AND (d.metadata ->> ")
            .bind(key.clone())
            .push(") COLLATE \"C\" >= ")
            .bind(since.clone())
            .push(")");
            continue;
        }
        let wanted: Vec<&Value> = match condition {
            Condition::Eq(v) => vec![v],
            Condition::In(vs) => vs.iter().collect(),
            Condition::Since(_) => Vec::new(),
        }
        .into_iter()
        .filter(|v| !v.as_str().is_some_and(|s| s.contains('\0')))
        .collect();
        match field {
            Field::Metadata(key) if key.contains('\0') => {
                sql.push(" AND FALSE");
            }
            Field::DocumentId => {
                // Ids are strings: a number or boolean names no document.
                let ids: Vec<String> = wanted
                    .iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect();
                sql.push(" AND c.document_id = ANY(").bind(ids).push(")");
            }
            Field::Metadata(key) => {
                sql.push(
                    " AND (c.collection, c.document_id) IN
                         (SELECT d.collection, d.id FROM ragd_documents d WHERE FALSE",
                );
                for v in wanted {
                    sql.push(" OR d.metadata @> ")
                        .bind(json!({ key.as_str(): v }))
                        .push(" OR d.metadata @> ")
                        .bind(json!({ key.as_str(): [v] }));
                }
                sql.push(")");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_become_numbered_placeholders() {
        let filter = Filter::parse(Some(&json!({
            "document_id": { "in": ["a", "b"] },
            "metadata.lang": "en"
        })))
        .unwrap();
        let mut sql = Sql::new("SELECT 1 FROM ragd_chunks c WHERE TRUE");
        push(&mut sql, &filter);
        assert_eq!(sql.params().len(), 3);
        assert!(sql.text.contains("c.document_id = ANY($1)"), "{}", sql.text);
        assert!(
            sql.text.contains("d.metadata @> $2 OR d.metadata @> $3)"),
            "{}",
            sql.text
        );
        let mut empty = Sql::new("x");
        push(&mut empty, &Filter::default());
        assert_eq!(empty.text, "x");
    }
}
