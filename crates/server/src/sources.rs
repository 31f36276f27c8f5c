//! Sources that stay fresh (`ragd-sources`): `GET /sources`, `POST /sources`
//! (register, or replace one of that name; its first sync starts at once),
//! `GET|DELETE /sources/{name}` and `POST /sources/{name}/sync` (sync now and
//! answer with the report). Reading them needs a key that reaches every
//! collection; changing them an admin key: a source makes the server read
//! folders and fetch URLs.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use ragd_sources::{SourceInfo, SourceRemoved, SourceSpec, SyncReport};
use serde::Deserialize;

use crate::error::ApiError;
use crate::json::AppJson;
use crate::AppState;

/// `/sources`, `/sources/{name}`, `/sources/{name}/sync`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/sources", get(list_sources).post(add_source))
        .route("/sources/{name}", get(get_source).delete(remove_source))
        .route("/sources/{name}/sync", post(sync_source))
}

fn sources(state: &AppState) -> Result<&std::sync::Arc<ragd_sources::Sources>, ApiError> {
    state.sources.get().ok_or(ApiError::NotReady)
}

/// `GET /sources`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct SourceList {
    /// Every source, by name, with its last sync.
    sources: Vec<SourceInfo>,
}

#[utoipa::path(get, path = "/sources", tag = "sources", responses((status = 200, description = "Every source with its last sync", body = SourceList)))]
pub(crate) async fn list_sources(
    State(state): State<AppState>,
) -> Result<Json<SourceList>, ApiError> {
    Ok(Json(SourceList {
        sources: sources(&state)?.list().await?,
    }))
}

#[utoipa::path(post, path = "/sources", tag = "sources", request_body = SourceSpec, responses((status = 201, description = "Registered; its first sync has started", body = SourceInfo), (status = 200, description = "A source of that name was there: its settings replaced", body = SourceInfo), (status = 422, description = "Invalid: name, url or path, collection, a folder outside sources.folder_roots", body = crate::error::ErrorBody), (status = 403, description = "Not an admin key", body = crate::error::ErrorBody)))]
pub(crate) async fn add_source(
    State(state): State<AppState>,
    AppJson(spec): AppJson<SourceSpec>,
) -> Result<(StatusCode, Json<SourceInfo>), ApiError> {
    let (info, created) = sources(&state)?.add(spec).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info)))
}

#[utoipa::path(get, path = "/sources/{name}", tag = "sources", params(("name" = String, Path, description = "Source name")), responses((status = 200, description = "The source with its last sync", body = SourceInfo), (status = 404, description = "No such source", body = crate::error::ErrorBody)))]
pub(crate) async fn get_source(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<SourceInfo>, ApiError> {
    Ok(Json(sources(&state)?.get(&name).await?))
}

/// Query of `DELETE /sources/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RemoveQuery {
    /// Keep the documents it gave (they are no longer synced).
    #[serde(default)]
    keep_documents: bool,
}

#[utoipa::path(delete, path = "/sources/{name}", tag = "sources", params(("name" = String, Path, description = "Source name"), ("keep_documents" = Option<bool>, Query, description = "Keep the documents it gave (default false)")), responses((status = 200, description = "Removed, with its documents unless kept", body = SourceRemoved), (status = 404, description = "No such source", body = crate::error::ErrorBody), (status = 422, description = "Declared in the configuration file", body = crate::error::ErrorBody)))]
pub(crate) async fn remove_source(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<RemoveQuery>, QueryRejection>,
) -> Result<Json<SourceRemoved>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    Ok(Json(
        sources(&state)?.remove(&name, q.keep_documents).await?,
    ))
}

#[utoipa::path(post, path = "/sources/{name}/sync", tag = "sources", params(("name" = String, Path, description = "Source name")), responses((status = 200, description = "The sync's report (`error` set when the source could not be read: its documents were kept)", body = SyncReport), (status = 404, description = "No such source", body = crate::error::ErrorBody)))]
pub(crate) async fn sync_source(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<SyncReport>, ApiError> {
    // The sync runs on its own: a client that goes away (or a response
    // past `server.request_timeout_s`) does not cut it short; its report is
    // kept with the source either way.
    let sources = std::sync::Arc::clone(sources(&state)?);
    let report = tokio::spawn(async move { sources.sync(&name).await })
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(report))
}
