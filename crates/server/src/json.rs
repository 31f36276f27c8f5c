//! A JSON body extractor that answers bad bodies in the API's error format.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

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
        // Through a JSON value first: an integer may be written `15.0` (JSON
        // has one number type, and the OpenAPI document's `integer` admits
        // it), which serde refuses for a Rust integer.
        match Json::<serde_json::Value>::from_request(req, state).await {
            Ok(Json(mut v)) => {
                integral_floats_to_integers(&mut v);
                serde_path_to_error::deserialize(v)
                    .map(AppJson)
                    .map_err(|e| {
                        ApiError::Invalid(format!(
                            "Failed to deserialize the JSON body into the target type: {e}"
                        ))
                    })
            }
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

/// Numbers with no fractional part written as floats (`15.0`) become
/// integers, everywhere but under `metadata` and `filter`: those are the
/// user's own data, stored and compared as written.
fn integral_floats_to_integers(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64() {
                // Within ±2^53 every integer is exact in an f64.
                if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 {
                    *v = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if key != "metadata" && key != "filter" {
                    integral_floats_to_integers(value);
                }
            }
        }
        _ => {}
    }
}

/// `value` as a JSON value, numbers as `serde_json` writes them: through
/// text, because `serde_json::to_value` widens an f32 to the f64 nearest it
/// (a threshold of 0.33 came out as 0.33000001311302185), while the text
/// form keeps the shortest digits that read back as the same f32.
pub fn to_value(value: &impl serde::Serialize) -> serde_json::Result<serde_json::Value> {
    serde_json::from_str(&serde_json::to_string(value)?)
}
