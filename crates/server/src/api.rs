//! HTTP routes. Handlers parse, call one [`Engine`] method and map the result;
//! errors become JSON through [`ApiError`].

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
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
    /// API keys (none: every request passes).
    pub keys: Arc<crate::auth::Keys>,
    /// Origins allowed by CORS.
    pub cors_origins: Vec<String>,
    /// Longest time before a response starts.
    pub request_timeout: std::time::Duration,
}

impl AppState {
    fn engine(&self) -> Result<&Arc<Engine>, ApiError> {
        self.engine.get().ok_or(ApiError::NotReady)
    }
}

/// The API's routes.
pub fn app(state: AppState) -> Router {
    let limit = state.body_limit;
    let keys = Arc::clone(&state.keys);
    let cors = cors_layer(&state.cors_origins);
    let timeout = state.request_timeout;
    Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/chat/completions", post(crate::openai::chat_completions))
        .route("/v1/embeddings", post(crate::openai::embeddings))
        .route("/v1/models", get(crate::openai::models))
        .route("/ingest", post(ingest))
        .route("/ask", post(ask))
        .route("/search", post(search))
        .route("/documents", get(list_documents))
        .route("/documents/{id}", get(get_document).delete(delete_document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(keys, crate::auth::check))
        .route_layer(axum::middleware::from_fn(crate::metrics::track))
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(cors)
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id)
        }))
        // Every response carries `x-request-id` (the client's, or a new UUID),
        // and the request's log lines carry the same id.
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            tower_http::request_id::MakeRequestUuid,
        ))
        .with_state(state)
}

/// `GET /`: the chat page (one static file, no build step).
#[utoipa::path(get, path = "/", tag = "page", responses((status = 200, description = "The chat page (HTML)", content_type = "text/html")))]
async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("web/index.html"),
    )
        .into_response()
}

/// `GET /openapi.json`: this API, generated from the code.
#[utoipa::path(get, path = "/openapi.json", tag = "service", responses((status = 200, description = "OpenAPI 3.1 document", body = Object)))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}

/// The API's OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi as _;
    #[derive(utoipa::OpenApi)]
    #[openapi(
        info(title = "ragd", description = "Retrieval-augmented question answering over your documents."),
        paths(
            index, health, ready, metrics, openapi_json, ingest, search, list_documents, get_document,
            delete_document, ask, crate::openai::chat_completions, crate::openai::embeddings,
            crate::openai::models
        ),
        modifiers(&BearerAuth)
    )]
    struct ApiDoc;
    ApiDoc::openapi()
}

/// Declares the bearer API keys (see [`crate::auth`]).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("read or write API key, when the server has keys"))
                    .build(),
            ),
        );
        openapi.security = Some(vec![SecurityRequirement::new(
            "api_key",
            Vec::<String>::new(),
        )]);
    }
}

/// `GET /metrics`: Prometheus text format (see [`crate::metrics`]).
#[utoipa::path(get, path = "/metrics", tag = "service", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> Response {
    let status = match state.engine.get() {
        Some(engine) => {
            let engine = Arc::clone(engine);
            tokio::task::spawn_blocking(move || engine.status())
                .await
                .ok()
        }
        None => None,
    };
    let body = crate::metrics::get().render(status.as_ref());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// CORS for `server.cors_origins`: none (the default) sends no CORS headers,
/// so browsers keep pages from other origins out.
fn cors_layer(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let layer = CorsLayer::new()
        .allow_methods([
            axum::http::Method::GET,
            axum::http::Method::POST,
            axum::http::Method::DELETE,
        ])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT]);
    if origins.iter().any(|o| o == "*") {
        layer.allow_origin(AllowOrigin::any())
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        layer.allow_origin(AllowOrigin::list(list))
    }
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
                    ApiError::PayloadTooLarge(
                        "the request body is larger than the configured limit".into(),
                    )
                }
                JsonRejection::BytesRejection(e) => ApiError::MalformedJson(e.body_text()),
                other => ApiError::MalformedJson(other.body_text()),
            }),
        }
    }
}

#[utoipa::path(get, path = "/health", tag = "service", responses((status = 200, description = "The process is up", body = Object)))]
async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

#[utoipa::path(get, path = "/ready", tag = "service", responses((status = 200, description = "Models loaded: documents, chunks, generation slots", body = Object), (status = 503, description = "Still loading", body = crate::error::ErrorBody)))]
async fn ready(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let engine = Arc::clone(state.engine()?);
    let mut status = tokio::task::spawn_blocking(move || engine.status())
        .await
        .map_err(ApiError::internal)?;
    status["status"] = json!("ready");
    Ok(Json(status))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

async fn method_not_allowed() -> Response {
    let body =
        json!({ "error": "method not allowed on this endpoint", "type": "method_not_allowed" });
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// `POST /ingest`: a JSON body of documents, or `multipart/form-data` files.
#[utoipa::path(post, path = "/ingest", tag = "documents", request_body(content((crate::engine::IngestRequest = "application/json"), (Object = "multipart/form-data")), description = "Documents as JSON, or files as multipart/form-data"), responses((status = 200, description = "One status per document", body = crate::engine::IngestResponse), (status = 413, description = "Body too large", body = crate::error::ErrorBody), (status = 403, description = "Read key on a write route", body = crate::error::ErrorBody), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading", body = crate::error::ErrorBody)))]
async fn ingest(
    State(state): State<AppState>,
    req: Request,
) -> Result<Json<crate::engine::IngestResponse>, ApiError> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    if !multipart {
        let AppJson(body) = AppJson::<IngestRequest>::from_request(req, &state).await?;
        return Ok(Json(state.engine()?.ingest(body).await?));
    }
    let too_large_or_malformed = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge("the request body is larger than the configured limit".into())
        } else {
            ApiError::MalformedMultipart(format!(
                "cannot read the multipart body: {}",
                e.body_text()
            ))
        }
    };
    let mut form = Multipart::from_request(req, &state)
        .await
        .map_err(|e| ApiError::MalformedMultipart(e.body_text()))?;
    let mut files = Vec::new();
    while let Some(field) = form.next_field().await.map_err(too_large_or_malformed)? {
        let Some(name) = field.file_name().map(str::to_string) else {
            return Err(ApiError::Invalid(format!(
                "multipart part {:?} is not a file: send files as parts with a filename",
                field.name().unwrap_or("")
            )));
        };
        let content_type = field.content_type().map(str::to_string);
        let bytes = field.bytes().await.map_err(too_large_or_malformed)?;
        files.push(crate::engine::UploadedFile {
            name,
            content_type,
            bytes: bytes.to_vec(),
        });
    }
    if files.is_empty() {
        return Err(ApiError::Invalid(
            "the multipart body holds no files".into(),
        ));
    }
    Ok(Json(state.engine()?.ingest_files(files).await?))
}

#[utoipa::path(post, path = "/search", tag = "retrieval", request_body = crate::engine::SearchRequest, responses((status = 200, description = "Passages, best first", body = crate::engine::SearchResponse), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading", body = crate::error::ErrorBody)))]
async fn search(
    State(state): State<AppState>,
    AppJson(req): AppJson<crate::engine::SearchRequest>,
) -> Result<Json<crate::engine::SearchResponse>, ApiError> {
    Ok(Json(state.engine()?.search(req).await?))
}

/// Query of `GET /documents`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Return documents with ids after this one (the previous page's `next`).
    after: Option<String>,
    /// Page size, 1..=1000 (default 100).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/documents", tag = "documents", params(("after" = Option<String>, Query, description = "List after this id"), ("limit" = Option<usize>, Query, description = "Most documents")), responses((status = 200, description = "Documents in id order", body = Object), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading", body = crate::error::ErrorBody)))]
async fn list_documents(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    let engine = state.engine()?;
    Ok(Json(engine.list_documents(q.after, q.limit).await?))
}

#[utoipa::path(get, path = "/documents/{id}", tag = "documents", params(("id" = String, Path, description = "Document id")), responses((status = 200, description = "The document's record", body = Object), (status = 404, description = "No such document", body = crate::error::ErrorBody), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading", body = crate::error::ErrorBody)))]
async fn get_document(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(state.engine()?.get_document(id).await?))
}

#[utoipa::path(delete, path = "/documents/{id}", tag = "documents", params(("id" = String, Path, description = "Document id")), responses((status = 200, description = "Deleted", body = Object), (status = 404, description = "No such document", body = crate::error::ErrorBody), (status = 403, description = "Read key on a write route", body = crate::error::ErrorBody), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading", body = crate::error::ErrorBody)))]
async fn delete_document(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(state.engine()?.delete_document(id).await?))
}

fn wants_stream(headers: &HeaderMap, req: &AskRequest) -> bool {
    req.stream.unwrap_or_else(|| {
        headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().starts_with("text/event-stream"))
            })
    })
}

#[utoipa::path(post, path = "/ask", tag = "answers", request_body = crate::engine::AskRequest, responses((status = 200, description = "The answer (JSON), or with `stream: true` / `Accept: text/event-stream` server-sent events: `queued`, `sources`, `token`..., then `done` with this object or `error`", body = crate::engine::AskResponse), (status = 429, description = "Generation queue full (Retry-After)", body = crate::error::ErrorBody), (status = 502, description = "Remote generation server failed", body = crate::error::ErrorBody), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading", body = crate::error::ErrorBody)))]
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
        return Ok(sse_response(Arc::clone(engine), events, progress));
    }
    Ok(Json(engine.collect(events, progress).await?).into_response())
}

fn event(name: &str, data: &serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// SSE: `queued` (only while every generation slot is busy), `sources`, then
/// `token` events, then `done` (or `error`). Everything that
/// can be refused with a status was checked before this point.
fn sse_response(
    engine: Arc<Engine>,
    events: Option<tokio::sync::mpsc::UnboundedReceiver<GenEvent>>,
    mut progress: AskProgress,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let Some(mut events) = events else {
            let _ = tx
                .send(Ok(event("sources", &json!({ "sources": [] }))))
                .await;
            let done = serde_json::to_value(progress.no_sources()).unwrap_or_default();
            let _ = tx.send(Ok(event("done", &done))).await;
            return;
        };
        // Content rules hold back the last few characters of the stream so a
        // match split across tokens is redacted whole.
        let mut filter = engine.content_rules().stream();
        // A failed send means the client has gone: returning drops `events`, which
        // stops the generator at its next token.
        // The queue position is sent after the job is handed over, so the
        // generator may already have started it: a late position is stale.
        let mut started = false;
        while let Some(ev) = events.recv().await {
            let out = match ev {
                GenEvent::Queued { .. } if started => continue,
                GenEvent::Queued { position } => event("queued", &json!({ "position": position })),
                GenEvent::Prompt {
                    passages_used,
                    trimmed,
                    prompt_ms,
                    ..
                } => {
                    started = true;
                    progress.prompt_ready(passages_used, trimmed, prompt_ms);
                    event(
                        "sources",
                        &json!({ "sources": progress.sources_for_client(&engine.content_rules()) }),
                    )
                }
                GenEvent::Token(text) => {
                    progress.token();
                    let text = filter.push(&text);
                    if text.is_empty() {
                        continue;
                    }
                    event("token", &json!({ "text": text }))
                }
                GenEvent::Done(generation) => {
                    let rest = filter.finish();
                    if !rest.is_empty()
                        && tx
                            .send(Ok(event("token", &json!({ "text": rest }))))
                            .await
                            .is_err()
                    {
                        return;
                    }
                    let done = serde_json::to_value(engine.answer(progress, generation).await)
                        .unwrap_or_default();
                    let _ = tx.send(Ok(event("done", &done))).await;
                    return;
                }
                GenEvent::Failed { message, fault } => {
                    let e = fault.error(message);
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
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// A router whose models never load: enough for everything decided before
    /// the engine is reached.
    fn unloaded(limit: usize) -> Router {
        app(AppState {
            engine: Arc::new(OnceLock::new()),
            body_limit: limit,
            keys: Arc::new(crate::auth::Keys::default()),
            cors_origins: Vec::new(),
            request_timeout: std::time::Duration::from_secs(60),
        })
    }

    const READ: &str = "read-key-0123456789";
    const WRITE: &str = "write-key-0123456789";

    fn guarded(cors: &[&str]) -> Router {
        app(AppState {
            engine: Arc::new(OnceLock::new()),
            body_limit: 1 << 20,
            keys: Arc::new(crate::auth::Keys::new(&crate::config::AuthConfig {
                read_keys: vec![READ.into()],
                write_keys: vec![WRITE.into()],
                allow_unauthenticated: false,
            })),
            cors_origins: cors.iter().map(|s| s.to_string()).collect(),
            request_timeout: std::time::Duration::from_secs(60),
        })
    }

    async fn status_with(
        router: Router,
        method: &str,
        uri: &str,
        key: Option<&str>,
    ) -> (StatusCode, HeaderMap) {
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(k) = key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let res = router
            .oneshot(req.body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        (res.status(), res.headers().clone())
    }

    /// No key and a wrong key are 401 (with `WWW-Authenticate`), a read key on a
    /// write route is 403, the right keys pass (to a server still loading: 503
    /// or a body error), and the probes need no key.
    /// Every route the router serves (read from this file's `.route(...)`
    /// calls, with their methods) is in the OpenAPI document with the same
    /// methods, and the document names no route the router lacks.
    #[tokio::test]
    async fn openapi_lists_every_route_the_router_serves() {
        let source = include_str!("api.rs");
        let app_fn =
            &source[source.find("pub fn app(").unwrap()..source.find("fn cors_layer(").unwrap()];
        let mut served: Vec<(String, String)> = Vec::new();
        for line in app_fn
            .lines()
            .filter(|l| l.trim_start().starts_with(".route(\""))
        {
            let path = line.split('"').nth(1).unwrap().to_string();
            for (needle, method) in [("get(", "get"), ("post(", "post"), ("delete(", "delete")] {
                if line.contains(needle) {
                    served.push((path.clone(), method.to_string()));
                }
            }
        }
        assert!(served.len() >= 14, "{served:?}");
        let doc = serde_json::to_value(openapi()).unwrap();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.push((path.clone(), method.clone()));
            }
        }
        served.sort();
        documented.sort();
        assert_eq!(served, documented);
        // Every documented route answers on the router (not 404 or 405).
        for (path, method) in &documented {
            let uri = path.replace("{id}", "some-id");
            let (status, _) =
                status_with(unloaded(1 << 20), &method.to_uppercase(), &uri, None).await;
            assert!(
                status != StatusCode::NOT_FOUND || path.contains("{id}"),
                "{method} {path}: {status}"
            );
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        }
        // The schemas the bodies refer to are in the document.
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in [
            "AskRequest",
            "AskResponse",
            "Source",
            "Grounding",
            "SearchResponse",
            "IngestRequest",
            "ErrorBody",
            "ChatRequest",
        ] {
            assert!(schemas.contains_key(name), "{name} missing");
        }
    }

    #[tokio::test]
    async fn the_auth_matrix() {
        let r = guarded(&[]);
        let (s, h) = status_with(r.clone(), "POST", "/search", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(h.get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
        let (s, _) = status_with(r.clone(), "POST", "/search", Some("not-a-key-0123456789")).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _) = status_with(r.clone(), "POST", "/ingest", Some(READ)).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, _) = status_with(r.clone(), "DELETE", "/documents/x", Some(READ)).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        for (method, uri, key) in [
            ("POST", "/search", READ),
            ("GET", "/documents", READ),
            ("POST", "/ingest", WRITE),
            ("POST", "/search", WRITE),
            ("DELETE", "/documents/x", WRITE),
        ] {
            let (s, _) = status_with(r.clone(), method, uri, Some(key)).await;
            assert!(
                s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN,
                "{method} {uri}: {s}"
            );
        }
        for uri in ["/health", "/ready"] {
            let (s, _) = status_with(r.clone(), "GET", uri, None).await;
            assert!(s != StatusCode::UNAUTHORIZED, "{uri}: {s}");
        }
        // Without keys nothing is asked for.
        let (s, _) = status_with(unloaded(1 << 20), "POST", "/search", None).await;
        assert_ne!(s, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn cors_allows_only_configured_origins() {
        let preflight = |router: Router, origin: &'static str| async move {
            let req = axum::http::Request::builder()
                .method("OPTIONS")
                .uri("/ask")
                .header(header::ORIGIN, origin)
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
                .body(Body::empty())
                .unwrap();
            router
                .oneshot(req)
                .await
                .unwrap()
                .headers()
                .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
                .cloned()
        };
        let r = guarded(&["https://intranet.example.org"]);
        assert_eq!(
            preflight(r.clone(), "https://intranet.example.org")
                .await
                .unwrap(),
            "https://intranet.example.org"
        );
        assert!(preflight(r, "https://evil.example.com").await.is_none());
        assert!(preflight(guarded(&[]), "https://intranet.example.org")
            .await
            .is_none());
    }

    async fn call(
        router: Router,
        method: &str,
        uri: &str,
        body: &str,
        json: bool,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        if json {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let res = router
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn health_is_up_and_ready_is_503_while_loading() {
        let (s, body) = call(unloaded(1 << 20), "GET", "/health", "", false).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["status"], "ok");
        let (s, body) = call(unloaded(1 << 20), "GET", "/ready", "", false).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["type"], "not_ready");
        let (s, body) = call(
            unloaded(1 << 20),
            "POST",
            "/ask",
            r#"{"question":"x"}"#,
            true,
        )
        .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["type"], "not_ready");
    }

    #[tokio::test]
    async fn bad_bodies_get_json_errors_with_fitting_statuses() {
        let cases: &[(&str, &str, bool, StatusCode, &str)] = &[
            (
                "/ingest",
                "{not json",
                true,
                StatusCode::BAD_REQUEST,
                "malformed_json",
            ),
            (
                "/ingest",
                r#"{"documents":[{"title":"no text"}]}"#,
                true,
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
            ),
            (
                "/ingest",
                r#"{"documents":[{"text":"x","colour":"red"}]}"#,
                true,
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
            ),
            (
                "/ingest",
                r#"{"documents":[{"text":42}]}"#,
                true,
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
            ),
            (
                "/ask",
                r#"{}"#,
                true,
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
            ),
            (
                "/ask",
                r#"{"question":"q","top_k":-1}"#,
                true,
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
            ),
            (
                "/ask",
                r#"{"question":"q"}"#,
                false,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
            ),
        ];
        for (uri, body, json, status, kind) in cases {
            let (s, b) = call(unloaded(1 << 20), "POST", uri, body, *json).await;
            assert_eq!(
                (s, b["type"].as_str()),
                (*status, Some(*kind)),
                "{uri} {body}: {b}"
            );
            assert!(b["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        let big = format!(r#"{{"documents":[{{"text":"{}"}}]}}"#, "a".repeat(5000));
        let (s, b) = call(unloaded(2048), "POST", "/ingest", &big, true).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
        assert_eq!(b["type"], "payload_too_large");
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_are_json_errors() {
        let (s, b) = call(unloaded(1 << 20), "GET", "/nope", "", false).await;
        assert_eq!(
            (s, b["type"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
        let (s, b) = call(unloaded(1 << 20), "GET", "/ask", "", false).await;
        assert_eq!(
            (s, b["type"].as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
        );
    }
}
