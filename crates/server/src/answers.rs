//! Answers: `POST /ask` — the answer as JSON, or as server-sent events
//! (`queued`, `sources`, `token`…, then `done` or `error`) — summaries,
//! `POST /summarize` (the same two encodings of the same stream), and
//! retrieval alone, `POST /search`. Both encoders read the pipeline's one
//! answer stream.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Extension;
use axum::{Json, Router};
use futures::StreamExt;
use ragd_pipeline::{Answer, AnswerEvent, AskRequest};
use serde::Serialize;
use serde_json::json;

use crate::collections::InCollection;
use crate::deadline::Deadline;
use crate::error::ApiError;
use crate::json::AppJson;
use crate::AppState;

/// `/ask`, `/search`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/ask", post(ask))
        .route("/search", post(search))
        .route("/summarize", post(summarize))
}

#[utoipa::path(post, path = "/search", tag = "retrieval", request_body = ragd_pipeline::SearchRequest, responses((status = 200, description = "Passages, best first", body = ragd_pipeline::SearchResponse), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading, or the database cannot be reached (Retry-After)", body = crate::error::ErrorBody)))]
pub(crate) async fn search(
    State(state): State<AppState>,
    InCollection(collection): InCollection,
    AppJson(req): AppJson<ragd_pipeline::SearchRequest>,
) -> Result<Json<ragd_pipeline::SearchResponse>, ApiError> {
    Ok(Json(state.pipeline()?.search_in(&collection, req).await?))
}

fn wants_stream(headers: &HeaderMap, stream: Option<bool>) -> bool {
    stream.unwrap_or_else(|| {
        headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().starts_with("text/event-stream"))
            })
    })
}

#[utoipa::path(post, path = "/ask", tag = "answers", request_body = ragd_pipeline::AskRequest, responses((status = 200, description = "The answer (JSON), or with `stream: true` / `Accept: text/event-stream` server-sent events: `queued`, `sources`, `token`..., then `done` with this object or `error`", content((ragd_pipeline::AskResponse = "application/json"), (serde_json::Value = "text/event-stream"))), (status = 429, description = "Generation queue full (Retry-After)", body = crate::error::ErrorBody), (status = 502, description = "Remote generation server failed", body = crate::error::ErrorBody), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading, or the database cannot be reached (Retry-After)", body = crate::error::ErrorBody)))]
pub(crate) async fn ask(
    State(state): State<AppState>,
    InCollection(collection): InCollection,
    headers: HeaderMap,
    deadline: Option<Extension<Deadline>>,
    AppJson(req): AppJson<AskRequest>,
) -> Result<Response, ApiError> {
    let pipeline = state.pipeline()?;
    let stream = wants_stream(&headers, req.stream);
    if let (true, Some(Extension(s))) = (stream, deadline) {
        s.lift();
    }
    let answer = pipeline.ask_in(&collection, &req).await?;
    if stream {
        return Ok(sse_response(answer));
    }
    let response = answer.collect().await?;
    crate::metrics::get().answered(&response);
    Ok(Json(response).into_response())
}

#[utoipa::path(post, path = "/summarize", tag = "answers", request_body = ragd_pipeline::SummarizeRequest, responses((status = 200, description = "The summary, as `/ask`'s answer object (`answer` is the summary: only its sentences the passages support, each cited; `cached` when it was kept from an earlier request), or with `stream: true` / `Accept: text/event-stream` the same server-sent events as `/ask`", content((ragd_pipeline::AskResponse = "application/json"), (serde_json::Value = "text/event-stream"))), (status = 404, description = "No such document (or collection)", body = crate::error::ErrorBody), (status = 429, description = "Generation queue full, or no section of a long text summarised in time (Retry-After)", body = crate::error::ErrorBody), (status = 502, description = "Remote generation server failed", body = crate::error::ErrorBody), (status = 422, description = "Invalid request (also: a document of more than 64 passages)", body = crate::error::ErrorBody), (status = 503, description = "Models still loading, or the database cannot be reached (Retry-After)", body = crate::error::ErrorBody)))]
pub(crate) async fn summarize(
    State(state): State<AppState>,
    InCollection(collection): InCollection,
    headers: HeaderMap,
    deadline: Option<Extension<Deadline>>,
    AppJson(req): AppJson<ragd_pipeline::SummarizeRequest>,
) -> Result<Response, ApiError> {
    let pipeline = state.pipeline()?;
    let stream = wants_stream(&headers, req.stream);
    if let (true, Some(Extension(s))) = (stream, deadline) {
        s.lift();
    }
    let summary = pipeline.summarize_in(&collection, &req).await?;
    if stream {
        return Ok(sse_response(summary));
    }
    Ok(Json(summary.collect().await?).into_response())
}

/// An SSE event whose data is `data` as JSON (keys in order, as every event
/// writes them); a value that cannot be written becomes an `error` event.
fn event(name: &str, data: &impl Serialize) -> Event {
    match serde_json::to_string(data) {
        Ok(text) => Event::default().event(name).data(text),
        Err(e) => {
            let body = ApiError::internal(format!("cannot encode the {name} event: {e}")).body();
            Event::default().event("error").data(body.to_string())
        }
    }
}

/// The SSE encoding of an answer: `queued` (only while every generation slot
/// is busy), `sources`, then `token` events, then `done` (or `error`).
/// Everything that can be refused with a status was checked before this point.
fn sse_response(answer: Answer) -> Response {
    let events = answer.into_stream().map(|e| {
        Ok::<_, Infallible>(match e {
            AnswerEvent::Queued { position } => event("queued", &json!({ "position": position })),
            AnswerEvent::Sources(sources) => event("sources", &json!({ "sources": sources })),
            AnswerEvent::Token(text) => event("token", &json!({ "text": text })),
            AnswerEvent::Done(response) => {
                crate::metrics::get().answered(&response);
                event("done", &response)
            }
            AnswerEvent::Failed(e) => event("error", &ApiError::from(e).body()),
        })
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    // No proxy buffering, no caching: the events must arrive as they are sent.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
