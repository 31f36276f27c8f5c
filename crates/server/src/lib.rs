//! ragd's HTTP API: routes, authentication, metrics, the OpenAPI document,
//! and the one place errors become statuses. Handlers parse the request, call
//! one [`Pipeline`] method and encode the result; the request flow itself is
//! `ragd-pipeline`'s.
//!
//! Each module serves its own routes:
//!
//! * [`documents`] — `POST /ingest` (JSON or files), `GET /documents`,
//!   `GET|DELETE /documents/{id}`;
//! * [`answers`] — `POST /ask` (JSON or server-sent events), `POST /search`;
//! * [`openai`] — `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`;
//! * [`service`] — the web page, `/health`, `/ready`, `/metrics`;
//! * [`sources`] — `/sources`: folders and URLs kept in sync;
//! * [`openapi`] — `GET /openapi.json`, generated from the handlers.
//!
//! An answer is one stream of events from the pipeline
//! ([`ragd_pipeline::Answer`]); `/ask` as JSON, `/ask` as SSE and
//! `/v1/chat/completions` are three encoders of it.
//!
//! [`Http::bind`] listens at once, so `/health` answers and `/ready` says 503
//! until the program [installs](Http::install) the loaded pipeline.

#![deny(missing_docs)]

pub mod answers;
pub mod auth;
pub mod collections;
pub mod config;
pub mod deadline;
pub mod documents;
pub mod error;
pub mod json;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod service;
pub mod sources;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderValue};
use axum::Router;
use ragd_pipeline::Pipeline;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower_http::trace::TraceLayer;

pub use config::{AuthConfig, ServerConfig};
pub use error::ApiError;

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Set once the models are loaded and the documents are back.
    pub pipeline: Arc<OnceLock<Arc<Pipeline>>>,
    /// The registered sources, set with the pipeline.
    pub sources: Arc<OnceLock<Arc<ragd_sources::Sources>>>,
    /// Largest request body.
    pub body_limit: usize,
    /// API keys (none: every request passes).
    pub keys: Arc<auth::Keys>,
    /// Origins allowed by CORS.
    pub cors_origins: Vec<String>,
    /// Longest time before a response starts.
    pub request_timeout: Duration,
    /// The configured bounds on request fields, stated in the OpenAPI document.
    pub limits: RequestLimits,
}

/// Bounds on request fields that come from the configuration: the OpenAPI
/// document states these, so a client generated from it (or a contract
/// tester) knows this server's limits rather than the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// `generation.max_tokens_limit`: the longest answer a request may ask for.
    pub max_tokens: usize,
    /// `retrieval.max_top_k`: the most passages `/ask` may retrieve.
    pub max_top_k: usize,
}

impl RequestLimits {
    /// The limits `generation` and `retrieval` set.
    pub fn new(
        generation: &ragd_pipeline::config::GenerationConfig,
        retrieval: &ragd_pipeline::config::RetrievalConfig,
    ) -> Self {
        RequestLimits {
            max_tokens: generation.max_tokens_limit,
            max_top_k: retrieval.max_top_k,
        }
    }
}

impl AppState {
    /// The state for `server`, `auth` and the request `limits`, with no pipeline yet.
    pub fn new(server: &ServerConfig, auth: &AuthConfig, limits: RequestLimits) -> Self {
        AppState {
            pipeline: Arc::new(OnceLock::new()),
            sources: Arc::new(OnceLock::new()),
            body_limit: server.body_limit_bytes,
            keys: Arc::new(auth::Keys::new(auth)),
            cors_origins: server.cors_origins.clone(),
            request_timeout: Duration::from_secs_f64(server.request_timeout_s),
            limits,
        }
    }

    /// The pipeline, or 503 while it loads.
    pub fn pipeline(&self) -> Result<&Arc<Pipeline>, ApiError> {
        self.pipeline.get().ok_or(ApiError::NotReady)
    }
}

/// The API's routes, with authentication, metrics, limits, CORS, request ids
/// and tracing.
pub fn app(state: AppState) -> Router {
    let limit = state.body_limit;
    let keys = Arc::clone(&state.keys);
    let cors = cors_layer(&state.cors_origins);
    let timeout = state.request_timeout;
    Router::new()
        .merge(service::routes())
        .merge(openapi::routes())
        .merge(openai::routes())
        .merge(documents::routes())
        .merge(answers::routes())
        .merge(collections::routes())
        .merge(sources::routes())
        .fallback(service::not_found)
        .method_not_allowed_fallback(service::method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(keys, auth::check))
        .route_layer(axum::middleware::from_fn(metrics::track))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(timeout, deadline::limit))
        .layer(cors)
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id)
        }).on_failure(log_failure))
        // Every response carries `x-request-id` (the client's, or a new UUID),
        // and the request's log lines carry the same id.
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(
            tower_http::request_id::MakeRequestUuid,
        ))
        .with_state(state)
}

/// How a failed request is logged. tower-http logs every 5xx at ERROR; a
/// 503 is a deliberate answer (the models still loading, the queue full, the
/// database away for a moment: the client is told to retry, and the cause
/// was logged where it arose), so it is a warning: an operator's ERROR lines
/// stay the faults.
fn log_failure(
    class: tower_http::classify::ServerErrorsFailureClass,
    latency: std::time::Duration,
    _span: &tracing::Span,
) {
    use tower_http::classify::ServerErrorsFailureClass;
    let latency_ms = latency.as_millis() as u64;
    match class {
        ServerErrorsFailureClass::StatusCode(status)
            if status == axum::http::StatusCode::SERVICE_UNAVAILABLE =>
        {
            tracing::warn!(status = status.as_u16(), latency_ms, "service unavailable")
        }
        class => tracing::error!(classification = %class, latency_ms, "response failed"),
    }
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

/// The HTTP server, listening.
#[derive(Debug)]
pub struct Http {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Shared state (the pipeline appears once installed).
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Http {
    /// Binds `server.host:port` and starts serving the API.
    pub async fn bind(
        server: &ServerConfig,
        auth: &AuthConfig,
        limits: RequestLimits,
    ) -> std::io::Result<Http> {
        let listener = TcpListener::bind((server.host.as_str(), server.port)).await?;
        let addr = listener.local_addr()?;
        let state = AppState::new(server, auth, limits);
        let router = app(state.clone());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = shutdown_rx.await;
                })
                .await
        });
        Ok(Http {
            addr,
            state,
            shutdown: Some(shutdown_tx),
            serving,
        })
    }

    /// Serves `pipeline` from now on; false if one was installed already.
    pub fn install(&self, pipeline: Arc<Pipeline>) -> bool {
        self.state.pipeline.set(pipeline).is_ok()
    }

    /// Stops accepting connections and waits for the open requests to finish.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.serving.await.map_err(std::io::Error::other)?
    }
}
