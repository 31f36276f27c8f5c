//! The OpenAI-compatible API, so OpenAI client libraries can talk to ragd:
//!
//! * `POST /v1/chat/completions`: the last `user` message is the question,
//!   earlier `user`/`assistant` messages are the conversation so far (`system`
//!   messages are ignored: ragd's own instruction applies). The answer is
//!   ragd's — retrieved, generated, checked — and its citations, sources and
//!   grounding travel in the extension field `ragd`. `stream: true` gives
//!   `chat.completion.chunk` events and `data: [DONE]`.
//! * `POST /v1/embeddings`: the embedder's vectors (`input`: a string or a list
//!   of strings), embedded as passages.
//! * `GET /v1/models`: the generator and the embedder.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use futures::{stream, StreamExt};
use ragd_core::Message;
use ragd_pipeline::{Answer, AnswerEvent, AskRequest, AskResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::collections::InCollection;
use crate::deadline::Deadline;
use crate::error::ApiError;
use crate::json::AppJson;
use crate::AppState;

/// `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ChatRequest {
    /// Accepted and echoed; ragd answers with its configured model.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation; the last `user` message is the question.
    #[schema(value_type = Vec<ragd_pipeline::ask::ChatMessage>, min_items = 1)]
    pub messages: Vec<Message>,
    /// Stream `chat.completion.chunk` events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Longest answer in tokens (at most `generation.max_tokens_limit`, 2048 by default).
    #[serde(default, alias = "max_completion_tokens")]
    #[schema(minimum = 1, maximum = 2048)]
    pub max_tokens: Option<usize>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Sampler seed.
    #[serde(default)]
    #[schema(maximum = 9223372036854775807_u64)]
    pub seed: Option<u64>,
    /// A string or up to 4 strings that end the answer.
    #[serde(default)]
    pub stop: Option<Value>,
    /// Options OpenAI clients send that ragd does not use (`n` must be 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    /// Ignored OpenAI fields.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: serde_json::Map<String, Value>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn completion_id() -> String {
    format!("chatcmpl-{}", uuid_like())
}

/// 32 hex digits from the clock and a counter: unique per process and time.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:016x}{:016x}",
        t as u64,
        n ^ (std::process::id() as u64) << 32
    )
}

/// The ask that a chat request stands for.
fn to_ask(req: &ChatRequest) -> Result<AskRequest, ApiError> {
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::Invalid("n: only 1 is supported".into()));
    }
    let turns: Vec<&Message> = req.messages.iter().filter(|m| m.role != "system").collect();
    let Some((last, earlier)) = turns.split_last() else {
        return Err(ApiError::Invalid(
            "messages: a user message is required".into(),
        ));
    };
    if last.role != "user" {
        return Err(ApiError::Invalid(
            "messages: the last message must be the user's question".into(),
        ));
    }
    let stop = match &req.stop {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ApiError::Invalid("stop: strings only".into()))?,
        ),
        Some(_) => {
            return Err(ApiError::Invalid(
                "stop: a string or a list of strings".into(),
            ))
        }
    };
    let request = json!({
        "question": last.content,
        "history": earlier,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "stop": stop,
    });
    serde_json::from_value(request).map_err(|e| ApiError::Invalid(e.to_string()))
}

fn finish_reason(r: &str) -> &'static str {
    match r {
        "length" | "timeout" => "length",
        _ => "stop",
    }
}

/// ragd's extension field: what the answer rests on.
fn extension(a: &AskResponse) -> Value {
    // (Scores are f32: through `json::to_value`, so they print as computed.)
    let jv = |v: Result<Value, serde_json::Error>| v.unwrap_or(Value::Null);
    let mut ext = json!({
        "answerable": a.answerable,
        "citations": jv(crate::json::to_value(&a.citations)),
        "sources": jv(crate::json::to_value(&a.sources)),
        "grounding": jv(crate::json::to_value(&a.grounding)),
        "citation_changes": jv(crate::json::to_value(&a.citation_changes)),
        "finish_reason": a.finish_reason,
    });
    if !a.not_applied.is_empty() {
        ext["not_applied"] = json!(a.not_applied);
    }
    ext["answer_kind"] = json!(a.answer_kind);
    // A streamed answer's chunks were the model's text: when ragd delivers
    // something else, the last chunk says what.
    if let Some(model_answer) = &a.model_answer {
        ext["answer"] = json!(a.answer);
        ext["model_answer"] = json!(model_answer);
    }
    ext
}

fn completion(id: &str, model: &str, a: &AskResponse) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": a.answer },
            "finish_reason": finish_reason(&a.finish_reason),
            "logprobs": null,
        }],
        "usage": {
            "prompt_tokens": a.usage.prompt_tokens,
            "completion_tokens": a.usage.completion_tokens,
            "total_tokens": a.usage.total_tokens,
        },
        "ragd": extension(a),
    })
}

/// `POST /v1/chat/completions`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", request_body = ChatRequest, responses((status = 200, description = "A chat.completion (with the extension field `ragd`: citations, sources, grounding), or with `stream: true` chat.completion.chunk events and `data: [DONE]`", content((Object = "application/json"), (serde_json::Value = "text/event-stream"))), (status = 429, description = "Generation queue full (Retry-After)", body = crate::error::ErrorBody), (status = 502, description = "Remote generation server failed", body = crate::error::ErrorBody), (status = 422, description = "Invalid request", body = crate::error::ErrorBody)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    InCollection(collection): InCollection,
    deadline: Option<Extension<Deadline>>,
    AppJson(req): AppJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let pipeline = state.pipeline()?;
    if let (Some(true), Some(Extension(s))) = (req.stream, deadline) {
        s.lift();
    }
    let ask = to_ask(&req)?;
    let model = pipeline.model_names().0.unwrap_or_else(|| "ragd".into());
    let answer = pipeline.ask_in(&collection, &ask).await?;
    let id = completion_id();
    if req.stream.unwrap_or(false) {
        return Ok(stream_response(answer, id, model));
    }
    let answer = answer.collect().await?;
    crate::metrics::get().answered(&answer);
    Ok(Json(completion(&id, &model, &answer)).into_response())
}

fn chunk(id: &str, model: &str, delta: Value) -> Event {
    let c = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "choices": [{ "index": 0, "delta": delta, "finish_reason": null, "logprobs": null }],
    });
    Event::default().data(c.to_string())
}

/// The `chat.completion.chunk` encoding of an answer: a first chunk with the
/// role, one chunk per piece of text, a last chunk with the finish reason,
/// the usage and ragd's extension, then `data: [DONE]`.
fn stream_response(answer: Answer, id: String, model: String) -> Response {
    let first = chunk(&id, &model, json!({ "role": "assistant", "content": "" }));
    let events = answer.into_stream().flat_map(move |e| {
        let out: Vec<Event> = match e {
            AnswerEvent::Queued { .. } | AnswerEvent::Sources(_) => Vec::new(),
            AnswerEvent::Token(text) => vec![chunk(&id, &model, json!({ "content": text }))],
            AnswerEvent::Done(done) => {
                crate::metrics::get().answered(&done);
                let mut out = Vec::new();
                // A declined question has no streamed tokens: its answer is the content.
                if done.finish_reason == "no_sources" {
                    out.push(chunk(&id, &model, json!({ "content": done.answer })));
                }
                let usage = json!({
                    "prompt_tokens": done.usage.prompt_tokens,
                    "completion_tokens": done.usage.completion_tokens,
                    "total_tokens": done.usage.total_tokens,
                });
                // The last chunk carries the finish reason, the usage (as OpenAI's do
                // with stream_options.include_usage) and ragd's extension.
                out.push(Event::default().data(
                    json!({
                        "id": id, "object": "chat.completion.chunk", "created": now(), "model": model,
                        "choices": [{ "index": 0, "delta": {}, "finish_reason": finish_reason(&done.finish_reason), "logprobs": null }],
                        "usage": usage,
                        "ragd": extension(&done),
                    })
                    .to_string(),
                ));
                out.push(Event::default().data("[DONE]"));
                out
            }
            AnswerEvent::Failed(e) => {
                vec![Event::default().data(json!({ "error": ApiError::from(e).body() }).to_string())]
            }
        };
        stream::iter(out)
    });
    Sse::new(
        stream::once(async { first })
            .chain(events)
            .map(Ok::<_, Infallible>),
    )
    .keep_alive(KeepAlive::default())
    .into_response()
}

/// `input` of `POST /v1/embeddings`, for the document only (the handler
/// reads the JSON value and says what is wrong with it): a text, or a list of
/// 1 to 256 texts, none blank.
struct EmbeddingsInput;

impl utoipa::PartialSchema for EmbeddingsInput {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        let text = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .pattern(Some(r"\S"))
        };
        OneOfBuilder::new()
            .item(text())
            .item(
                ArrayBuilder::new()
                    .items(text())
                    .min_items(Some(1))
                    .max_items(Some(256)),
            )
            .description(Some("A text, or a list of 1 to 256 texts; none blank."))
            .into()
    }
}

impl utoipa::ToSchema for EmbeddingsInput {}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct EmbeddingsRequest {
    /// A string or a list of 1 to 256 strings, none empty.
    #[schema(value_type = EmbeddingsInput)]
    pub input: Value,
    /// Accepted and echoed.
    #[serde(default)]
    pub model: Option<String>,
    /// `float` (default) or `base64` (little-endian f32).
    #[serde(default)]
    #[schema(pattern = "^(float|base64)$")]
    pub encoding_format: Option<String>,
    /// Ignored OpenAI fields.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: serde_json::Map<String, Value>,
}

/// `POST /v1/embeddings`.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai", request_body = EmbeddingsRequest, responses((status = 200, description = "A list of embeddings (float arrays or base64)", body = Object), (status = 422, description = "Invalid request", body = crate::error::ErrorBody)))]
pub async fn embeddings(
    State(state): State<AppState>,
    AppJson(req): AppJson<EmbeddingsRequest>,
) -> Result<Json<Value>, ApiError> {
    let pipeline = state.pipeline()?;
    // OpenAI's clients ask for base64 (little-endian f32) by default.
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::Invalid(format!(
                "encoding_format: {other:?} is not \"float\" or \"base64\""
            )))
        }
    };
    let texts: Vec<String> = match req.input {
        Value::String(s) => vec![s],
        Value::Array(a) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::Invalid(
                    "input: strings only (token arrays are not supported)".into(),
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::Invalid(
                "input: a string or a list of strings".into(),
            ))
        }
    };
    let (vectors, tokens) = pipeline.embeddings(texts).await?;
    let model = pipeline.model_names().1;
    Ok(Json(json!({
        "object": "list",
        "data": vectors.into_iter().enumerate().map(|(i, v)| {
            let embedding = if base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                crate::json::to_value(&v).unwrap_or(Value::Null)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        }).collect::<Vec<_>>(),
        "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    })))
}

/// `GET /v1/models`.
#[utoipa::path(get, path = "/v1/models", tag = "openai", responses((status = 200, description = "The generator and the embedder", body = Object)))]
pub async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (generator, embedder) = state.pipeline()?.model_names();
    let data: Vec<Value> = generator
        .into_iter()
        .chain(std::iter::once(embedder))
        .map(|id| json!({ "id": id, "object": "model", "created": 0, "owned_by": "ragd" }))
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> ChatRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_last_user_message_is_the_question_and_the_rest_history() {
        let a = to_ask(&req(json!({ "model": "x", "messages": [
            { "role": "system", "content": "be nice" },
            { "role": "user", "content": "What is Debian?" },
            { "role": "assistant", "content": "An OS [1]." },
            { "role": "user", "content": "Who makes it?" }
        ], "stop": "END", "max_tokens": 20, "frequency_penalty": 0 })))
        .unwrap();
        assert_eq!(a.question, "Who makes it?");
        let h = a.history.unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].role, "user");
        assert_eq!(a.stop, Some(vec!["END".to_string()]));
        assert_eq!(a.max_tokens, Some(20));
        assert!(to_ask(&req(json!({ "messages": [] }))).is_err());
        assert!(to_ask(&req(
            json!({ "messages": [{ "role": "assistant", "content": "hi" }] })
        ))
        .is_err());
        assert!(to_ask(&req(
            json!({ "messages": [{ "role": "user", "content": "q" }], "n": 2 })
        ))
        .is_err());
    }
}
