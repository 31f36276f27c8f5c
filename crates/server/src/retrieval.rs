//! Finding the chunks for a query: filters, tombstones, and when to trust the
//! graph.
//!
//! The HNSW graph is approximate and its filtered search can return fewer than
//! k hits when most nodes are filtered out (tombstones of replaced documents, or
//! a narrow metadata filter). So: when the allowed set is small, search it
//! exactly (it is cheap); otherwise search the graph with a wider candidate list
//! and fall back to exact search if it still comes back short.

use ragd_index::{exact_top_k, Hit, VectorIndex};
use ragd_store::Store;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Allowed sets up to this size are searched exactly.
const EXACT_LIMIT: usize = 4096;

/// One condition of a filter.
#[derive(Debug, Clone, PartialEq)]
enum Condition {
    Eq(Value),
    In(Vec<Value>),
}

/// Which field a condition tests.
#[derive(Debug, Clone, PartialEq)]
enum Field {
    DocumentId,
    Metadata(String),
}

/// A conjunction of conditions on `document_id` and `metadata.<key>`:
/// `{"document_id": "x"}`, `{"metadata.lang": "en"}`,
/// `{"metadata.tag": {"in": ["a", "b"]}}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    conditions: Vec<(Field, Condition)>,
}

fn scalar(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

impl Filter {
    /// Parses the `filter` of a request; a malformed filter is the client's error.
    pub fn parse(value: Option<&Value>) -> Result<Self, ApiError> {
        let Some(value) = value else { return Ok(Self::default()) };
        let bad = |m: String| ApiError::Invalid(format!("filter: {m}"));
        let Value::Object(map) = value else {
            return Err(bad("must be an object such as {\"metadata.lang\": \"en\"}".into()));
        };
        let mut conditions = Vec::new();
        for (key, v) in map {
            let field = if key == "document_id" {
                Field::DocumentId
            } else if let Some(k) = key.strip_prefix("metadata.").filter(|k| !k.is_empty()) {
                Field::Metadata(k.to_string())
            } else {
                return Err(bad(format!("unknown field {key:?}; use \"document_id\" or \"metadata.<key>\"")));
            };
            let condition = match v {
                v if scalar(v) => Condition::Eq(v.clone()),
                Value::Object(op) => match (op.len(), op.get("in")) {
                    (1, Some(Value::Array(values))) if !values.is_empty() && values.iter().all(scalar) => {
                        Condition::In(values.clone())
                    }
                    _ => return Err(bad(format!("{key}: the only operator is {{\"in\": [values]}}"))),
                },
                _ => return Err(bad(format!("{key}: expected a string, number, boolean or {{\"in\": [...]}}"))),
            };
            conditions.push((field, condition));
        }
        Ok(Self { conditions })
    }

    /// Whether the filter lets everything through.
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// Whether a chunk of document `id` with `metadata` passes.
    pub fn matches(&self, id: &str, metadata: Option<&Map<String, Value>>) -> bool {
        self.conditions.iter().all(|(field, condition)| {
            let actual = match field {
                Field::DocumentId => Some(Value::String(id.to_string())),
                Field::Metadata(k) => metadata.and_then(|m| m.get(k)).cloned(),
            };
            let Some(actual) = actual else { return false };
            // A metadata array (tags) matches when any element does.
            let candidates: Vec<&Value> = match &actual {
                Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            match condition {
                Condition::Eq(want) => candidates.contains(&want),
                Condition::In(wanted) => wanted.iter().any(|w| candidates.contains(&w)),
            }
        })
    }
}

/// The `k` best live chunks for `query` that pass `filter`.
pub fn search(
    store: &Store,
    index: &VectorIndex,
    query: &[f32],
    k: usize,
    filter: &Filter,
    ef_search: usize,
) -> Result<Vec<Hit>, ApiError> {
    let allowed = |key: usize| match store.document_of(key) {
        Some(doc) => filter.is_empty() || filter.matches(doc, store.metadata_of(doc)),
        None => false,
    };
    let allowed_count = if filter.is_empty() {
        store.live_count()
    } else {
        store.live().filter(|(_, doc, _)| filter.matches(doc, store.metadata_of(doc))).count()
    };
    let exact = || {
        exact_top_k(query, store.live().filter(|(key, _, _)| allowed(*key)).map(|(key, _, v)| (key, v)), k)
            .map_err(ApiError::internal)
    };
    if allowed_count <= EXACT_LIMIT.max(k) {
        return exact();
    }
    let hits = index.search_with_ef(query, k, ef_search.max(2 * k), &allowed).map_err(ApiError::internal)?;
    if hits.len() < k.min(allowed_count) {
        return exact();
    }
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn parses_and_matches_the_documented_forms() {
        let m = meta(json!({ "lang": "en", "tag": ["a", "c"], "year": 2020 }));
        let f = |v: Value| Filter::parse(Some(&v)).unwrap();
        assert!(f(json!({ "document_id": "x" })).matches("x", Some(&m)));
        assert!(!f(json!({ "document_id": "x" })).matches("y", Some(&m)));
        assert!(f(json!({ "metadata.lang": "en" })).matches("x", Some(&m)));
        assert!(!f(json!({ "metadata.lang": "zh" })).matches("x", Some(&m)));
        assert!(f(json!({ "metadata.tag": { "in": ["b", "c"] } })).matches("x", Some(&m)));
        assert!(f(json!({ "metadata.tag": "a" })).matches("x", Some(&m)));
        assert!(f(json!({ "metadata.year": 2020, "metadata.lang": "en" })).matches("x", Some(&m)));
        assert!(!f(json!({ "metadata.year": 2020, "metadata.lang": "zh" })).matches("x", Some(&m)));
        assert!(!f(json!({ "metadata.missing": "x" })).matches("x", Some(&m)));
        assert!(Filter::parse(None).unwrap().matches("x", None));
    }

    #[test]
    fn malformed_filters_are_client_errors() {
        for v in [
            json!("en"),
            json!({ "lang": "en" }),
            json!({ "metadata.": "en" }),
            json!({ "metadata.lang": { "eq": "en" } }),
            json!({ "metadata.lang": { "in": [] } }),
            json!({ "metadata.lang": { "in": [["nested"]] } }),
            json!({ "metadata.lang": null }),
        ] {
            assert!(matches!(Filter::parse(Some(&v)), Err(ApiError::Invalid(_))), "{v}");
        }
    }
}
