//! HTTP routes. Handlers parse, call one [`Engine`] method and map the result;
//! errors become JSON through [`ApiError`].

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use tower_http::trace::TraceLayer;

use crate::engine::{AskProgress, AskRequest, Engine, IngestRequest};
use crate::error::ApiError;
use crate::workers::GenEvent;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Set once the models are loaded and the documents replayed.
    pub engine: Arc<OnceLock<Arc<Engine>>>,
    /// Largest request body.
    pub body_limit: usize,
}

impl AppState {
    fn engine(&self) -> Result<&Arc<Engine>, ApiError> {
        self.engine.get().ok_or(ApiError::NotReady)
    }
}

/// The API's routes.
pub fn app(state: AppState) -> Router {
    let limit = state.body_limit;
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/ingest", post(ingest))
        .route("/ask", post(ask))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// JSON body extractor whose rejections use the API's error format: syntax errors
/// are 400, well-formed JSON of the wrong shape (missing or unknown fields, wrong
/// types) is 422, an oversized body 413.
#[derive(Debug)]
pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(AppJson(v)),
            Err(rejection) => Err(match rejection {
                JsonRejection::JsonSyntaxError(e) => ApiError::MalformedJson(e.body_text()),
                JsonRejection::JsonDataError(e) => ApiError::Invalid(e.body_text()),
                JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                    "expected a JSON body with the header Content-Type: application/json".into(),
                ),
                JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    ApiError::PayloadTooLarge("the request body is larger than the configured limit".into())
                }
                JsonRejection::BytesRejection(e) => ApiError::MalformedJson(e.body_text()),
                other => ApiError::MalformedJson(other.body_text()),
            }),
        }
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let engine = state.engine()?;
    Ok(Json(json!({ "status": "ready", "models": engine.models() })))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

async fn method_not_allowed() -> Response {
    let body = json!({ "error": "method not allowed on this endpoint", "type": "method_not_allowed" });
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

async fn ingest(
    State(state): State<AppState>,
    AppJson(req): AppJson<IngestRequest>,
) -> Result<Json<crate::engine::IngestResponse>, ApiError> {
    let engine = state.engine()?;
    Ok(Json(engine.ingest(req).await?))
}

fn wants_stream(headers: &HeaderMap, req: &AskRequest) -> bool {
    req.stream.unwrap_or_else(|| {
        headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().starts_with("text/event-stream")))
    })
}

async fn ask(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppJson(req): AppJson<AskRequest>,
) -> Result<Response, ApiError> {
    let engine = state.engine()?;
    let stream = wants_stream(&headers, &req);
    let run = engine.ask(&req).await?;
    let (events, progress) = run.into_parts();
    if stream {
        return Ok(sse_response(events, progress));
    }
    let Some(mut events) = events else {
        return Ok(Json(progress.no_sources()).into_response());
    };
    let mut progress = progress;
    while let Some(event) = events.recv().await {
        match event {
            GenEvent::Prompt { passages_used, prompt_ms, .. } => progress.prompt_ready(passages_used, prompt_ms),
            GenEvent::Token(_) => progress.token(),
            GenEvent::Done(generation) => return Ok(Json(progress.finish(generation)).into_response()),
            GenEvent::Failed { message, client_fault: true } => return Err(ApiError::Invalid(message)),
            GenEvent::Failed { message, client_fault: false } => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal("the generator stopped without an answer"))
}

fn event(name: &str, data: &serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// SSE: `sources`, then `token` events, then `done` (or `error`). Everything that
/// can be refused with a status was checked before this point.
fn sse_response(
    events: Option<tokio::sync::mpsc::UnboundedReceiver<GenEvent>>,
    mut progress: AskProgress,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let Some(mut events) = events else {
            let _ = tx.send(Ok(event("sources", &json!({ "sources": [] })))).await;
            let done = serde_json::to_value(progress.no_sources()).unwrap_or_default();
            let _ = tx.send(Ok(event("done", &done))).await;
            return;
        };
        // A failed send means the client has gone: returning drops `events`, which
        // stops the generator at its next token.
        while let Some(ev) = events.recv().await {
            let out = match ev {
                GenEvent::Prompt { passages_used, prompt_ms, .. } => {
                    progress.prompt_ready(passages_used, prompt_ms);
                    event("sources", &json!({ "sources": progress.sources() }))
                }
                GenEvent::Token(text) => {
                    progress.token();
                    event("token", &json!({ "text": text }))
                }
                GenEvent::Done(generation) => {
                    let done = serde_json::to_value(progress.finish(generation)).unwrap_or_default();
                    let _ = tx.send(Ok(event("done", &done))).await;
                    return;
                }
                GenEvent::Failed { message, client_fault } => {
                    let e = if client_fault { ApiError::Invalid(message) } else { ApiError::internal(message) };
                    let _ = tx.send(Ok(event("error", &e.body()))).await;
                    return;
                }
            };
            if tx.send(Ok(out)).await.is_err() {
                return;
            }
        }
        let e = ApiError::internal("the generator stopped without an answer");
        let _ = tx.send(Ok(event("error", &e.body()))).await;
    });
    let sse = Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default());
    let mut response = sse.into_response();
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
