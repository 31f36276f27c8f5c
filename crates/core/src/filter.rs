//! Filters on documents, as data: a backend applies them in memory or turns
//! them into its query language.

use serde_json::{Map, Value};

/// A filter the client wrote wrongly; the message says how to write it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter: {0}")]
pub struct InvalidFilter(pub String);

/// One condition of a filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The field equals the value (a metadata array: any element does).
    Eq(Value),
    /// The field equals one of the values.
    In(Vec<Value>),
    /// The field is a time (RFC 3339, UTC, whole seconds, as ragd writes
    /// `fetched_at`) at or after this one, written the same way: such times
    /// sort as text.
    Since(String),
}

/// The metadata key ragd writes the time a synced document was fetched under.
pub const FETCHED_AT: &str = "fetched_at";

/// Whether `t` is a time as ragd writes it: `YYYY-MM-DDTHH:MM:SSZ` (such
/// times sort as text).
pub fn canonical_form(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// `t` (RFC 3339 with any offset, a date `YYYY-MM-DD` read as midnight UTC,
/// or seconds since the Unix epoch) as ragd writes times in metadata: UTC,
/// whole seconds (`2026-12-06T08:00:00Z`).
pub fn canonical_time(t: &Value) -> Option<String> {
    let ts = match t {
        Value::Number(n) => jiff::Timestamp::from_second(n.as_i64()?).ok()?,
        Value::String(s) if s.len() == 10 => format!("{s}T00:00:00Z").parse().ok()?,
        Value::String(s) => s.parse::<jiff::Timestamp>().ok()?,
        _ => return None,
    };
    jiff::Timestamp::from_second(ts.as_second())
        .ok()
        .map(|t| t.to_string())
}

/// Which field a condition tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// The document's id.
    DocumentId,
    /// A key of the document's metadata.
    Metadata(String),
}

/// A conjunction of conditions on `document_id` and `metadata.<key>`:
/// `{"document_id": "x"}`, `{"metadata.lang": "en"}`,
/// `{"metadata.tag": {"in": ["a", "b"]}}`, `{"metadata.fetched_after":
/// "2026-12-01"}` (documents of a source fetched at or after that time); and the collection searched, which
/// the service sets (never the client's filter): every search of a request
/// stays within its collection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    conditions: Vec<(Field, Condition)>,
    collection: Option<String>,
}

fn scalar(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

impl Filter {
    /// Parses the `filter` of a request.
    pub fn parse(value: Option<&Value>) -> Result<Self, InvalidFilter> {
        let Some(value) = value else {
            return Ok(Self::default());
        };
        let bad = |m: String| InvalidFilter(m);
        let Value::Object(map) = value else {
            return Err(bad(
                "must be an object such as {\"metadata.lang\": \"en\"}".into()
            ));
        };
        let mut conditions = Vec::new();
        for (key, v) in map {
            if key == "metadata.fetched_after" {
                let Some(since) = canonical_time(v) else {
                    return Err(bad(format!(
                        "{key}: expected a time such as \"2026-12-01T00:00:00Z\", a date \"2026-12-01\" or seconds since 1970"
                    )));
                };
                conditions.push((
                    Field::Metadata(FETCHED_AT.to_string()),
                    Condition::Since(since),
                ));
                continue;
            }
            let field = if key == "document_id" {
                Field::DocumentId
            } else if let Some(k) = key.strip_prefix("metadata.").filter(|k| !k.is_empty()) {
                Field::Metadata(k.to_string())
            } else {
                return Err(bad(format!(
                    "unknown field {key:?}; use \"document_id\" or \"metadata.<key>\""
                )));
            };
            let condition = match v {
                v if scalar(v) => Condition::Eq(v.clone()),
                Value::Object(op) => match (op.len(), op.get("in")) {
                    (1, Some(Value::Array(values)))
                        if !values.is_empty() && values.iter().all(scalar) =>
                    {
                        Condition::In(values.clone())
                    }
                    _ => {
                        return Err(bad(format!(
                            "{key}: the only operator is {{\"in\": [values]}}"
                        )))
                    }
                },
                _ => {
                    return Err(bad(format!(
                        "{key}: expected a string, number, boolean or {{\"in\": [...]}}"
                    )))
                }
            };
            conditions.push((field, condition));
        }
        Ok(Self {
            conditions,
            collection: None,
        })
    }

    /// The filter, limited to documents of `collection`.
    pub fn within(mut self, collection: &str) -> Self {
        self.collection = Some(collection.to_string());
        self
    }

    /// The collection the filter keeps to (`None`: every collection).
    pub fn collection(&self) -> Option<&str> {
        self.collection.as_deref()
    }

    /// Whether the filter has conditions besides its collection.
    pub fn has_conditions(&self) -> bool {
        !self.conditions.is_empty()
    }

    /// Whether the filter lets everything through.
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty() && self.collection.is_none()
    }

    /// The conditions, for a backend that translates them.
    pub fn conditions(&self) -> &[(Field, Condition)] {
        &self.conditions
    }

    /// Whether a chunk of document `id` of `collection` with `metadata` passes.
    pub fn matches(
        &self,
        collection: &str,
        id: &str,
        metadata: Option<&Map<String, Value>>,
    ) -> bool {
        if self.collection.as_deref().is_some_and(|c| c != collection) {
            return false;
        }
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
                // A time as ragd writes it (not an array of them: the SQL
                // of PostgreSQL compares the same way).
                Condition::Since(since) => actual
                    .as_str()
                    .is_some_and(|t| canonical_form(t) && t >= since.as_str()),
            }
        })
    }
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
        assert!(f(json!({ "document_id": "x" })).matches("default", "x", Some(&m)));
        assert!(!f(json!({ "document_id": "x" })).matches("default", "y", Some(&m)));
        assert!(f(json!({ "metadata.lang": "en" })).matches("default", "x", Some(&m)));
        assert!(!f(json!({ "metadata.lang": "zh" })).matches("default", "x", Some(&m)));
        assert!(f(json!({ "metadata.tag": { "in": ["b", "c"] } })).matches(
            "default",
            "x",
            Some(&m)
        ));
        assert!(f(json!({ "metadata.tag": "a" })).matches("default", "x", Some(&m)));
        assert!(
            f(json!({ "metadata.year": 2020, "metadata.lang": "en" })).matches(
                "default",
                "x",
                Some(&m)
            )
        );
        assert!(
            !f(json!({ "metadata.year": 2020, "metadata.lang": "zh" })).matches(
                "default",
                "x",
                Some(&m)
            )
        );
        assert!(!f(json!({ "metadata.missing": "x" })).matches("default", "x", Some(&m)));
        assert!(Filter::parse(None).unwrap().matches("default", "x", None));
    }

    #[test]
    fn fetched_after_compares_times_whatever_their_offset() {
        let m = meta(json!({ "fetched_at": "2026-12-06T08:00:00Z" }));
        let f = |v: Value| Filter::parse(Some(&json!({ "metadata.fetched_after": v })));
        assert!(f(json!("2026-12-06T08:00:00Z"))
            .unwrap()
            .matches("d", "x", Some(&m)));
        assert!(f(json!("2026-12-06")).unwrap().matches("d", "x", Some(&m)));
        assert!(f(json!("2026-12-06T15:59:59+08:00"))
            .unwrap()
            .matches("d", "x", Some(&m)));
        assert!(!f(json!("2026-12-06T16:00:01+08:00"))
            .unwrap()
            .matches("d", "x", Some(&m)));
        assert!(!f(json!("2026-12-07")).unwrap().matches("d", "x", Some(&m)));
        // Only times written as ragd writes them are compared.
        let odd = meta(json!({ "fetched_at": "2026-12-06T08:00:00.5Z" }));
        assert!(!f(json!("2020-01-01"))
            .unwrap()
            .matches("d", "x", Some(&odd)));
        let listed = meta(json!({ "fetched_at": ["2026-12-06T08:00:00Z"] }));
        assert!(!f(json!("2020-01-01"))
            .unwrap()
            .matches("d", "x", Some(&listed)));
        assert!(f(json!(1_796_515_200)).unwrap().matches("d", "x", Some(&m)));
        // A document never fetched (no `fetched_at`) is not "fetched after".
        assert!(!f(json!("1970-01-01")).unwrap().matches("d", "x", None));
        assert!(f(json!("yesterday")).is_err());
        assert!(f(json!(true)).is_err());
    }

    #[test]
    fn a_filter_within_a_collection_passes_nothing_of_another() {
        let f = Filter::parse(Some(&json!({ "document_id": "x" })))
            .unwrap()
            .within("a");
        assert!(!f.is_empty());
        assert_eq!(f.collection(), Some("a"));
        assert!(f.matches("a", "x", None));
        assert!(!f.matches("b", "x", None));
        assert!(!f.matches("a", "y", None));
        assert!(Filter::default().within("a").matches("a", "y", None));
    }

    #[test]
    fn malformed_filters_are_refused_with_the_reason() {
        for v in [
            json!("en"),
            json!({ "lang": "en" }),
            json!({ "metadata.": "en" }),
            json!({ "metadata.lang": { "eq": "en" } }),
            json!({ "metadata.lang": { "in": [] } }),
            json!({ "metadata.lang": { "in": [["nested"]] } }),
            json!({ "metadata.lang": null }),
        ] {
            let e = Filter::parse(Some(&v)).unwrap_err();
            assert!(e.to_string().starts_with("filter: "), "{v}: {e}");
        }
    }
}
