//! The service's own routes: the web page, liveness and readiness probes,
//! Prometheus metrics, and the JSON answers for unknown routes and methods.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::json;

use crate::auth::Access;
use crate::error::ApiError;
use crate::AppState;

/// `/`, `/health`, `/ready`, `/metrics`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
}

/// `GET /`: the chat page (one static file, no build step).
#[utoipa::path(get, path = "/", tag = "page", responses((status = 200, description = "The chat page (HTML)", content_type = "text/html")))]
pub(crate) async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("web/index.html"),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text format (see [`crate::metrics`]).
#[utoipa::path(get, path = "/metrics", tag = "service", responses((status = 200, description = "Prometheus text format", content_type = "text/plain"), (status = 401, description = "Collection keys are configured and the key presented does not reach every collection", body = crate::error::ErrorBody)))]
pub(crate) async fn metrics(
    State(state): State<AppState>,
    access: Option<Extension<Access>>,
) -> Response {
    // Counts of every collection: not for a key that reaches only some.
    if !counts_allowed(&state, access.as_ref().map(|Extension(a)| a)) {
        return ApiError::Unauthorized(
            "with collection keys configured, /metrics needs a read, write or admin key (one that reaches every collection)"
                .into(),
        )
        .into_response();
    }
    let status = match state.pipeline.get() {
        Some(pipeline) => crate::json::to_value(&pipeline.status().await).ok(),
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

#[utoipa::path(get, path = "/health", tag = "service", responses((status = 200, description = "The process is up", body = Object)))]
pub(crate) async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

#[utoipa::path(get, path = "/ready", tag = "service", responses((status = 200, description = "Models loaded: documents, chunks, generation slots", body = Object), (status = 503, description = "Still loading, or the document store cannot be reached", body = crate::error::ErrorBody)))]
pub(crate) async fn ready(
    State(state): State<AppState>,
    access: Option<Extension<Access>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let status = state.pipeline()?.status().await;
    if status.documents.is_none() {
        // The store did not answer (a database that cannot be reached): a
        // load balancer should send requests elsewhere meanwhile.
        return Err(ApiError::Pipeline(ragd_pipeline::Error::Unavailable(
            "the document store did not answer".into(),
        )));
    }
    let mut status = crate::json::to_value(&status).map_err(ApiError::internal)?;
    status["status"] = json!("ready");
    if !counts_allowed(&state, access.as_ref().map(|Extension(a)| a)) {
        if let Some(o) = status.as_object_mut() {
            o.remove("documents");
            o.remove("chunks");
        }
    }
    Ok(Json(status))
}

/// Whether the request may see counts over every collection: always, unless
/// some keys reach only some collections; then only with a key that reaches
/// them all.
fn counts_allowed(state: &AppState, access: Option<&Access>) -> bool {
    !state.keys.has_collection_keys() || access.is_some_and(Access::reaches_all)
}

/// The answer for a route that does not exist.
pub(crate) async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

/// The answer for a method a route does not serve.
pub(crate) async fn method_not_allowed() -> Response {
    let body =
        json!({ "error": "method not allowed on this endpoint", "type": "method_not_allowed" });
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}
