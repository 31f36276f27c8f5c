//! Retrieval alone (`POST /search`): retrieve → select, no generation.

use ragd_core::{Filter, DEFAULT_COLLECTION};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::content::{self, Tally};
use crate::error::Error;
use crate::retrieve::Mode;
use crate::Pipeline;

/// Body of `POST /search`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// The query text (not blank; at most 4,000 characters once trimmed).
    #[cfg_attr(feature = "openapi", schema(min_length = 1, pattern = r"\S"))]
    pub query: String,
    /// Results to return (default 10; at most 100, or `retrieval.max_top_k` when larger).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100))]
    pub top_k: Option<usize>,
    /// Conditions on `document_id` / `metadata.<key>` (an object such as
    /// `{"metadata.lang": "en"}`).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub filter: Option<Value>,
    /// `dense`, `lexical` or `hybrid` (default: `retrieval.mode`).
    #[cfg_attr(feature = "openapi", schema(pattern = "^(dense|lexical|hybrid)$"))]
    pub mode: Option<String>,
}

/// One result of `POST /search`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SearchResult {
    /// The document.
    pub document_id: String,
    /// `{document_id}#{index}`.
    pub chunk_id: String,
    /// Neighbouring chunks that overlapped this one and were merged into it
    /// (`start`, `end` and `text` then cover them all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merged_with: Vec<String>,
    /// The document's title.
    pub title: Option<String>,
    /// The section the chunk is in ("Heading > Subheading"), when the document has headings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    /// Position of the chunk in its document (0-based).
    pub index: usize,
    /// Byte offset of the chunk in the document text.
    pub start: usize,
    /// Byte offset just past the chunk.
    pub end: usize,
    /// The chunk's text.
    pub text: String,
    /// Cosine similarity with the query, by the model in `scored_by`.
    pub score: f32,
    /// Whose cosine `score` is: `primary` (`models.embedder`) or
    /// `multilingual` (`models.multilingual_embedder`); their thresholds differ.
    pub scored_by: crate::route::Side,
}

/// Response of `POST /search`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SearchResponse {
    /// Best first.
    pub results: Vec<SearchResult>,
    /// Content rules that changed the results' text, with counts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub content_rules: Vec<content::Applied>,
}

impl Pipeline {
    /// Retrieval only: `POST /search`.
    pub async fn search(&self, req: SearchRequest) -> Result<SearchResponse, Error> {
        self.search_in(DEFAULT_COLLECTION, req).await
    }

    /// [`Self::search`] over the documents of `collection` alone.
    pub async fn search_in(
        &self,
        collection: &str,
        req: SearchRequest,
    ) -> Result<SearchResponse, Error> {
        self.require_collection(collection).await?;
        let query = crate::ask::query_text("query", &req.query)?;
        let r = &self.config.retrieval;
        let top_k = req.top_k.unwrap_or(10);
        if !(1..=r.max_top_k.max(100)).contains(&top_k) {
            return Err(Error::Invalid(format!(
                "top_k: must be within 1..={}",
                r.max_top_k.max(100)
            )));
        }
        let mode = Mode::parse(req.mode.as_deref(), r.mode)?;
        let filter = Filter::parse(req.filter.as_ref())?.within(collection);
        let lang = crate::language::detect(query);
        let (sources, _) = self
            .passages(query, lang, top_k, &filter, mode, false)
            .await?;
        let mut tally = Tally::default();
        Ok(SearchResponse {
            results: sources
                .into_iter()
                .map(|s| SearchResult {
                    document_id: s.document_id,
                    chunk_id: s.chunk_id,
                    title: s.title,
                    merged_with: s.merged_with,
                    section: s.section,
                    index: s.index,
                    start: s.start,
                    end: s.end,
                    text: self.content.apply(&s.text, &mut tally),
                    score: s.score,
                    scored_by: s.side,
                })
                .collect(),
            content_rules: tally.applied(),
        })
    }
}
