//! The errors the API returns, and the one place they become HTTP statuses.
//!
//! Every error is the client's fault (4xx, with a message that helps fix the
//! request) or ours (5xx, with a generic message; the detail goes to the log).
//! The pipeline's errors ([`ragd_pipeline::Error`]) say whose fault they are;
//! the HTTP layer adds its own (bodies it cannot read, keys, start-up).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ragd_pipeline::Error;
use serde_json::json;

/// The JSON body of every error response.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// For a program: `invalid_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `overloaded`, `not_ready`, `upstream_error`, ...
    #[serde(rename = "type")]
    pub r#type: String,
}

/// An error as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON.
    #[error("{0}")]
    MalformedJson(String),
    /// A `multipart/form-data` body cannot be read.
    #[error("{0}")]
    MalformedMultipart(String),
    /// The body is JSON of the wrong shape.
    #[error("{0}")]
    Invalid(String),
    /// The body is larger than `server.body_limit_bytes`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The body is not declared as JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No such route.
    #[error("{0}")]
    NotFound(String),
    /// No API key, or one that is not configured.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key without the scope the route needs.
    #[error("{0}")]
    Forbidden(String),
    /// No response within `server.request_timeout_s` (seconds).
    #[error("no response within server.request_timeout_s = {0} s; ask with \"stream\": true to watch a long answer arrive")]
    Timeout(f64),
    /// The models are still loading.
    #[error("the service is starting: models are still loading")]
    NotReady,
    /// A failure in the HTTP layer itself; the detail is logged, not returned.
    #[error("internal error")]
    Internal(String),
    /// What the pipeline refused or failed at.
    #[error(transparent)]
    Pipeline(#[from] Error),
}

impl ApiError {
    /// An internal error, logged with its detail.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        let detail = detail.to_string();
        tracing::error!(%detail, "internal error");
        ApiError::Internal(detail)
    }

    /// Status code and `type` of the error.
    pub fn status_and_type(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            ApiError::MalformedMultipart(_) => (StatusCode::BAD_REQUEST, "malformed_multipart"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            ApiError::Pipeline(e) => match e {
                Error::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
                Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
                Error::Busy { .. } => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
                Error::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream_error"),
                Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                Error::StorageFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
                Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            },
        }
    }

    /// The JSON body: `{"error": ..., "type": ...}`.
    pub fn body(&self) -> serde_json::Value {
        json!({ "error": self.to_string(), "type": self.status_and_type().1 })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_type();
        let mut response = (status, Json(self.body())).into_response();
        match &self {
            ApiError::Pipeline(Error::Busy { retry_after_secs }) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::NotReady | ApiError::Pipeline(Error::Unavailable(_)) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(5u64));
            }
            ApiError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}
