//! [`Generate`] on an OpenAI-compatible server (`generation.backend =
//! "openai"`): llama.cpp's server, vLLM, TGI, Ollama — the way to put
//! generation on other machines. Each slot is an async task that takes jobs
//! from a queue like the local slots' and streams `POST {url}/v1/chat/completions`
//! back as [`GenEvent`]s. A request that fails before its first token
//! (connection refused, 5xx, 429) is retried with backoff; after that it fails,
//! as a local generation would. A client that goes away drops the HTTP stream,
//! which ends the remote generation.
//!
//! Context budget: not applied. The remote model's tokenizer is not known
//! here, so the prompt is sent with every passage and a prompt too long for
//! the server's context is its error (a 4xx, reported as the client's). The
//! answer says so (`not_applied`).
//! Steering: not applied. The OpenAI API can only bias token ids, which are
//! the remote model's own; the answer says so too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ragd_core::{BackendError, FinishReason, GenEvent, GenJob, Generation, GeneratorInfo};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};

use crate::queue::{GenerationSlots, Queue, SlotCounters};

/// `[remote]`: the OpenAI-compatible server used when `generation.backend = "openai"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000` (the `/v1/...` paths are added).
    pub url: String,
    /// The `model` field sent with each request.
    pub model: String,
    /// Bearer token, if the server wants one (empty: none).
    pub api_key: String,
    /// Seconds to wait for a connection.
    pub connect_timeout_s: f64,
    /// Attempts after the first when a request fails before its first token.
    pub retries: usize,
}

fn failed(events: &mpsc::UnboundedSender<GenEvent>, message: String, client_fault: bool) {
    let error = if client_fault {
        BackendError::client(message)
    } else {
        BackendError::upstream(message)
    };
    let _ = events.send(GenEvent::Failed(error));
}

/// Generation on an OpenAI-compatible server.
#[derive(Debug, Clone, Copy)]
pub struct RemoteGenerator;

impl RemoteGenerator {
    /// Starts `slots` tasks (on the current runtime) answering from a queue
    /// of `queue_size` on the server in `config`.
    pub fn spawn(
        config: RemoteConfig,
        queue_size: usize,
        slots: usize,
    ) -> Result<GenerationSlots, crate::LoadError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs_f64(config.connect_timeout_s))
            .build()
            .map_err(|e| crate::LoadError::Remote(format!("HTTP client: {e}")))?;
        let (queue, rx) = Queue::new(queue_size, slots);
        let slots = slots.max(1);
        let info = GeneratorInfo {
            name: config.model.clone(),
            context: 0,
            slots,
            fits_context: false,
            steers: false,
        };
        tracing::info!(url = %config.url, model = %info.name, slots, "generation on a remote server");
        let rx = Arc::new(Mutex::new(rx));
        let config = Arc::new(config);
        for _ in 0..slots {
            let (client, config, rx, counters) = (
                client.clone(),
                Arc::clone(&config),
                Arc::clone(&rx),
                Arc::clone(&queue.counters),
            );
            tokio::spawn(serve_slot(client, config, rx, counters));
        }
        Ok(GenerationSlots { queue, info })
    }
}

/// One remote slot: takes jobs from the shared queue until it closes.
async fn serve_slot(
    client: reqwest::Client,
    config: Arc<RemoteConfig>,
    rx: Arc<Mutex<mpsc::Receiver<GenJob>>>,
    counters: Arc<SlotCounters>,
) {
    loop {
        let job = rx.lock().await.recv().await;
        let Some(job) = job else { return };
        let _busy = counters.take();
        if !job.events.is_closed() {
            run(&client, &config, job).await;
        }
    }
}

async fn run(client: &reqwest::Client, config: &RemoteConfig, job: GenJob) {
    let GenJob {
        prompt,
        params,
        events,
        ..
    } = job;
    let started = Instant::now();
    let passages_used = prompt.passages.len();
    let messages = prompt.messages(passages_used);
    let mut body = json!({
        "model": config.model,
        "messages": messages,
        "stream": true,
        "stream_options": { "include_usage": true },
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed,
    });
    if params.top_k > 0 {
        body["top_k"] = json!(params.top_k); // llama.cpp, vLLM and TGI read it; others ignore it
    }
    if !params.stop.is_empty() {
        body["stop"] = json!(params.stop);
    }
    if params.repeat_penalty != 1.0 {
        body["repeat_penalty"] = json!(params.repeat_penalty);
    }
    // `params.steer` is not applied (see the module doc); the larger models
    // such servers run do not answer with markers alone the way the 0.5B
    // default does.
    let url = format!("{}/v1/chat/completions", config.url.trim_end_matches('/'));
    let prompt_ms = started.elapsed().as_secs_f64() * 1e3;
    if events
        .send(GenEvent::Prompt {
            passages_used,
            trimmed: false,
            prompt_tokens: 0,
            prompt_ms,
        })
        .is_err()
    {
        return;
    }

    // Connect, retrying what fails before anything was generated.
    let mut attempt = 0;
    let response = loop {
        let mut req = client.post(&url).json(&body);
        if !config.api_key.is_empty() {
            req = req.bearer_auth(&config.api_key);
        }
        if let Some(deadline) = params.deadline {
            req = req.timeout(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            );
        }
        let outcome = match req.send().await {
            Ok(r) if r.status().is_success() => Ok(r),
            Ok(r) => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                let retry =
                    status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                Err((
                    format!(
                        "the generation server answered {status}: {}",
                        text.chars().take(300).collect::<String>()
                    ),
                    retry,
                    status.is_client_error() && !retry,
                ))
            }
            Err(e) => Err((
                format!("cannot reach the generation server {url}: {e}"),
                !e.is_timeout(),
                false,
            )),
        };
        match outcome {
            Ok(r) => break r,
            Err((message, retry, client_fault)) => {
                if !retry || attempt >= config.retries || events.is_closed() {
                    tracing::warn!(error = %message, attempt, "remote generation failed");
                    return failed(&events, message, client_fault);
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250 << attempt.min(5))).await;
            }
        }
    };

    let mut text = String::new();
    let mut finish = FinishReason::Length;
    let mut first_token_at = None;
    let (mut prompt_tokens, mut completion_tokens, mut pieces) = (0usize, None, 0usize);
    let mut buffer = String::new();
    let mut stream = response.bytes_stream();
    'read: while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let message = if e.is_timeout() {
                    None
                } else {
                    Some(format!("the generation stream broke: {e}"))
                };
                match message {
                    Some(m) => return failed(&events, m, false),
                    None => {
                        finish = FinishReason::Timeout;
                        break;
                    }
                }
            }
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find('\n') {
            let line = buffer[..end].trim_end_matches('\r').to_string();
            buffer.drain(..=end);
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                break 'read;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                completion_tokens = u["completion_tokens"].as_u64().map(|n| n as usize);
            }
            let Some(choice) = v["choices"].get(0) else {
                continue;
            };
            if let Some(piece) = choice["delta"]["content"]
                .as_str()
                .filter(|p| !p.is_empty())
            {
                first_token_at.get_or_insert_with(Instant::now);
                pieces += 1;
                text.push_str(piece);
                if events.send(GenEvent::Token(piece.to_string())).is_err() {
                    return; // the client went away; dropping the stream ends the request
                }
            }
            match choice["finish_reason"].as_str() {
                Some("stop") => finish = FinishReason::Stop,
                Some("length") => finish = FinishReason::Length,
                _ => {}
            }
        }
        if params.deadline.is_some_and(|d| Instant::now() >= d) {
            finish = FinishReason::Timeout;
            break;
        }
    }
    let first = first_token_at.unwrap_or_else(Instant::now);
    let _ = events.send(GenEvent::Done(Generation {
        text,
        prompt_tokens,
        completion_tokens: completion_tokens.unwrap_or(pieces),
        finish_reason: finish,
        prefill_ms: (first - started).as_secs_f64() * 1e3,
        decode_ms: first.elapsed().as_secs_f64() * 1e3,
        cached_tokens: 0,
        drafted_tokens: 0,
        accepted_tokens: 0,
    }));
}
