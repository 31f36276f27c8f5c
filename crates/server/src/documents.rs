//! Documents: `POST /ingest` (a JSON body of documents, or files as
//! `multipart/form-data`), `GET /documents`, `GET|DELETE /documents/{id}`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use ragd_pipeline::IngestRequest;

use crate::collections::{DocumentId, InCollection};
use crate::error::ApiError;
use crate::json::AppJson;
use crate::AppState;

/// `value` as a JSON body, its keys in alphabetical order as these routes
/// have always written them.
fn json_value(value: impl serde::Serialize) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(
        crate::json::to_value(&value).map_err(ApiError::internal)?,
    ))
}

/// `/ingest`, `/documents`, `/documents/{id}`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/ingest", post(ingest))
        .route("/documents", get(list_documents))
        .route("/documents/{id}", get(get_document).delete(delete_document))
}

/// `POST /ingest` as `multipart/form-data`: one or more `file` parts and
/// nothing else (for the document only; the handler reads the form itself).
#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[derive(serde::Deserialize)]
struct UploadForm {
    /// The files; each file's name becomes its document's id.
    #[schema(value_type = Vec<String>, format = Binary, min_items = 1)]
    file: Vec<Vec<u8>>,
}

/// `POST /ingest`: a JSON body of documents, or `multipart/form-data` files.
#[utoipa::path(post, path = "/ingest", tag = "documents", request_body(content((ragd_pipeline::IngestRequest = "application/json"), (UploadForm = "multipart/form-data")), description = "Documents as JSON, or files as multipart/form-data"), responses((status = 200, description = "One status per document", body = ragd_pipeline::IngestResponse), (status = 413, description = "Body too large", body = crate::error::ErrorBody), (status = 403, description = "Read key on a write route", body = crate::error::ErrorBody), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading, or the database cannot be reached (Retry-After)", body = crate::error::ErrorBody), (status = 507, description = "The disk holding the data is full: nothing of the failed write was kept; free space and retry", body = crate::error::ErrorBody)))]
pub(crate) async fn ingest(
    State(state): State<AppState>,
    InCollection(collection): InCollection,
    req: Request,
) -> Result<Json<ragd_pipeline::IngestResponse>, ApiError> {
    // Writing questions per chunk takes seconds each: the client waits for
    // the ingest to finish rather than get a 408 that would throw it away.
    if state.pipeline.get().is_some_and(|p| p.writes_questions()) {
        if let Some(d) = req.extensions().get::<crate::deadline::Deadline>() {
            d.lift();
        }
    }
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
        return Ok(Json(
            state.pipeline()?.ingest_into(&collection, body).await?,
        ));
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
        files.push(ragd_pipeline::UploadedFile {
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
    Ok(Json(
        state
            .pipeline()?
            .ingest_files_into(&collection, files)
            .await?,
    ))
}

/// Query of `GET /documents`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// Return documents with ids after this one (the previous page's `next`).
    after: Option<String>,
    /// Page size, 1..=1000 (default 100).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/documents", tag = "documents", params(("after" = Option<String>, Query, description = "List after this id"), ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "Most documents, 1 to 1000 (default 100)")), responses((status = 200, description = "Documents in id order", body = Object), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading, or the database cannot be reached (Retry-After)", body = crate::error::ErrorBody)))]
pub(crate) async fn list_documents(
    State(state): State<AppState>,
    InCollection(collection): InCollection,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    json_value(
        state
            .pipeline()?
            .list_documents_in(&collection, q.after, q.limit)
            .await?,
    )
}

#[utoipa::path(get, path = "/documents/{id}", tag = "documents", params(("id" = String, Path, description = "Document id")), responses((status = 200, description = "The document's record", body = Object), (status = 404, description = "No such document", body = crate::error::ErrorBody), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading, or the database cannot be reached (Retry-After)", body = crate::error::ErrorBody)))]
pub(crate) async fn get_document(
    State(state): State<AppState>,
    InCollection(collection): InCollection,
    DocumentId(id): DocumentId,
) -> Result<Json<serde_json::Value>, ApiError> {
    json_value(state.pipeline()?.get_document_in(&collection, &id).await?)
}

#[utoipa::path(delete, path = "/documents/{id}", tag = "documents", params(("id" = String, Path, description = "Document id")), responses((status = 200, description = "Deleted", body = Object), (status = 404, description = "No such document", body = crate::error::ErrorBody), (status = 403, description = "Read key on a write route", body = crate::error::ErrorBody), (status = 422, description = "Invalid request", body = crate::error::ErrorBody), (status = 401, description = "Missing or unknown API key", body = crate::error::ErrorBody), (status = 503, description = "Models still loading, or the database cannot be reached (Retry-After)", body = crate::error::ErrorBody), (status = 507, description = "The disk holding the data is full: nothing of the failed write was kept; free space and retry", body = crate::error::ErrorBody)))]
pub(crate) async fn delete_document(
    State(state): State<AppState>,
    InCollection(collection): InCollection,
    DocumentId(id): DocumentId,
) -> Result<Json<serde_json::Value>, ApiError> {
    json_value(
        state
            .pipeline()?
            .delete_document_in(&collection, &id)
            .await?,
    )
}
