//! Collections: `GET /collections` (those the key reaches), `POST
//! /collections` and `DELETE /collections/{collection}` (admin keys), and
//! every document route again under `/collections/{collection}/…`
//! (`ingest`, `documents`, `documents/{id}`, `search`, `ask`, `summarize`,
//! `v1/chat/completions`): the same handlers, which read the collection from
//! the path ([`InCollection`]); the routes without the prefix act on
//! `default`.

use axum::extract::{FromRequestParts, RawPathParams, State};
use axum::http::request::Parts;
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use ragd_core::DEFAULT_COLLECTION;
use ragd_pipeline::collections::{CollectionCreated, CollectionDeleted, CreateCollection};

use crate::auth::Access;
use crate::error::ApiError;
use crate::json::AppJson;
use crate::AppState;

/// The routes that act on one collection's documents, without their prefix
/// (the OpenAPI document repeats them under `/collections/{collection}`).
pub(crate) const SCOPED_PATHS: [&str; 7] = [
    "/ingest",
    "/documents",
    "/documents/{id}",
    "/search",
    "/ask",
    "/summarize",
    "/v1/chat/completions",
];

/// `/collections`, `/collections/{collection}`, and the document routes
/// under `/collections/{collection}/`.
pub(crate) fn routes() -> Router<AppState> {
    let scoped = Router::new()
        .merge(crate::documents::routes())
        .merge(crate::answers::routes())
        .route(
            "/v1/chat/completions",
            post(crate::openai::chat_completions),
        );
    Router::new()
        .route("/collections", get(list).post(create))
        .route("/collections/{collection}", delete(remove))
        .nest("/collections/{collection}", scoped)
}

/// The collection a request acts on: the `{collection}` of its path, else
/// `default`.
#[derive(Debug, Clone)]
pub struct InCollection(pub String);

/// The path parameter `name` of the request, percent-decoded, if the route has one.
async fn path_param<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
    name: &str,
) -> Result<Option<String>, ApiError> {
    let params = RawPathParams::from_request_parts(parts, state)
        .await
        .map_err(|e| ApiError::Invalid(e.body_text()))?;
    Ok(params
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string()))
}

impl<S: Send + Sync> FromRequestParts<S> for InCollection {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Ok(InCollection(
            path_param(parts, state, "collection")
                .await?
                .unwrap_or_else(|| DEFAULT_COLLECTION.to_string()),
        ))
    }
}

/// The `{id}` of a document route (a plain `Path<String>` cannot be used:
/// under `/collections/{collection}` the path has two parameters).
#[derive(Debug, Clone)]
pub struct DocumentId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for DocumentId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        path_param(parts, state, "id")
            .await?
            .map(DocumentId)
            .ok_or_else(|| ApiError::internal("a document route without {id}"))
    }
}

/// `GET /collections`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct CollectionList {
    /// The collections this key reaches, by name, with their document counts.
    #[schema(value_type = Vec<Object>)]
    collections: Vec<ragd_core::CollectionInfo>,
}

#[utoipa::path(get, path = "/collections", tag = "collections", responses((status = 200, description = "The collections this key reaches, by name", body = CollectionList)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    access: Option<Extension<Access>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let access = access.map(|Extension(a)| a).unwrap_or_default();
    let collections: Vec<_> = state
        .pipeline()?
        .collections()
        .await?
        .into_iter()
        .filter(|c| access.scope_in(&c.name).is_some())
        .collect();
    Ok(Json(
        crate::json::to_value(&CollectionList { collections }).map_err(ApiError::internal)?,
    ))
}

#[utoipa::path(post, path = "/collections", tag = "collections", request_body = CreateCollection, responses((status = 200, description = "Created, or there already (`created: false`)", body = CollectionCreated), (status = 403, description = "Not an admin key", body = crate::error::ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    AppJson(req): AppJson<CreateCollection>,
) -> Result<Json<CollectionCreated>, ApiError> {
    Ok(Json(state.pipeline()?.create_collection(req).await?))
}

#[utoipa::path(delete, path = "/collections/{collection}", tag = "collections", params(("collection" = String, Path, description = "Collection name")), responses((status = 200, description = "Deleted, with its documents", body = CollectionDeleted), (status = 404, description = "No such collection", body = crate::error::ErrorBody), (status = 403, description = "Not an admin key", body = crate::error::ErrorBody), (status = 507, description = "The disk holding the data is full: nothing was deleted; free space and retry", body = crate::error::ErrorBody)))]
pub(crate) async fn remove(
    State(state): State<AppState>,
    InCollection(name): InCollection,
) -> Result<Json<CollectionDeleted>, ApiError> {
    Ok(Json(state.pipeline()?.delete_collection(&name).await?))
}
