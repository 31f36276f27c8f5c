//! [`Embed`] on an OpenAI-compatible `/v1/embeddings` server
//! (`embedder.backend = "openai"`): text-embeddings-inference, vLLM, llama.cpp's
//! server, Ollama — the way to take ingest's embedding off the machine that
//! serves questions.
//!
//! The model directory (`models.embedder`) is still read, but not its
//! weights: its tokenizer counts tokens for chunking and cuts texts to the
//! model's window before they are sent (servers differ in what they do with
//! longer ones), its prompts give the query and passage prefixes, and its
//! vector size is what the server must answer with — checked with one request
//! at start-up, so a server running another model is a clear start-up error.
//! The stored vectors' identity is `embedder.model`: a data directory made
//! with the local model of that name reads the remote one's vectors (and
//! back), as long as they agree (cosine ≥ 0.99 for the packaged
//! all-MiniLM-L6-v2 served by llama.cpp from a GGUF; see the end-to-end test).
//!
//! Requests carry at most `embedder.batch_size` texts; a connection error,
//! timeout, 429 or 5xx is retried `embedder.retries` times with backoff, then
//! the caller gets [`BackendError::upstream`] (502).

use std::path::Path;
use std::time::Duration;

use ragd_core::{async_trait, BackendError, Embed, EmbedderInfo, TextKind};
use ragd_embedder::{EmbedderConfig, ModelCard, TextTokenizer};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::embed_local::TokenCounter;
use crate::LoadError;

/// The server and how to talk to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteEmbedConfig {
    /// Base URL, e.g. `http://127.0.0.1:8081` (`/v1/embeddings` is added).
    pub url: String,
    /// The `model` field of each request, and the stored vectors' identity.
    pub model: String,
    /// Bearer token (empty: none).
    pub api_key: String,
    /// Longest wait for one request, seconds.
    pub timeout_s: f64,
    /// Attempts after the first for a request that failed on the way.
    pub retries: usize,
    /// Texts per request.
    pub batch_size: usize,
}

/// Embeddings from an OpenAI-compatible server.
#[derive(Debug)]
pub struct RemoteEmbedder {
    client: reqwest::Client,
    config: RemoteEmbedConfig,
    /// The model's tokenizer, cutting at its window (for what is sent).
    window: TextTokenizer,
    /// The same without cutting or padding (for counting).
    counter: TokenCounter,
    info: EmbedderInfo,
}

#[derive(Deserialize)]
struct Response {
    data: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

/// Whether a failed request is worth another try.
fn transient(status: reqwest::StatusCode) -> bool {
    status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS
}

impl RemoteEmbedder {
    /// Reads the model directory `dir`, then asks the server for one vector
    /// and checks its size against the model's.
    pub async fn connect(
        dir: &Path,
        settings: &EmbedderConfig,
        config: RemoteEmbedConfig,
    ) -> Result<Self, LoadError> {
        let (dir, settings) = (dir.to_path_buf(), settings.clone());
        let card = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || ModelCard::read(&dir, &settings)
        })
        .await
        .map_err(|e| LoadError::Remote(format!("embedder: {e}")))?
        .map_err(|e| LoadError::Model {
            what: "embedder",
            path: dir.clone(),
            message: e.to_string(),
        })?;
        let mut info = crate::embed_local::info_of(&card);
        info.name = config.model.clone();
        let counter = TokenCounter::of(&card.tokenizer);
        let window = card.tokenizer.clone();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(config.timeout_s))
            .build()
            .map_err(|e| LoadError::Remote(format!("HTTP client: {e}")))?;
        let me = Self {
            client,
            config,
            window,
            counter,
            info,
        };
        let probe = me.request(&["ragd".to_string()]).await.map_err(|e| {
            LoadError::Remote(format!("embedder.url {}: {}", me.config.url, e.message))
        })?;
        let got = probe.first().map_or(0, Vec::len);
        if got != me.info.dim {
            return Err(LoadError::Remote(format!(
                "embedder.url {}: the server's vectors for embedder.model {:?} have {got} dimensions; models.embedder ({}) has {}: serve the same model",
                me.config.url,
                me.config.model,
                card.name,
                me.info.dim
            )));
        }
        tracing::info!(url = %me.config.url, model = %me.info.name, dim = me.info.dim, "embeddings on a remote server");
        Ok(me)
    }

    /// `text` cut to the model's window (at a token boundary).
    fn fit(&self, text: String) -> String {
        match self.window.encode(text.as_str()) {
            Ok(enc) if enc.get_overflowing().is_empty() => text,
            Ok(enc) => {
                let end = enc
                    .get_offsets()
                    .iter()
                    .map(|(_, e)| *e)
                    .max()
                    .unwrap_or(text.len());
                let mut end = end.min(text.len());
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text[..end].to_string()
            }
            Err(_) => text,
        }
    }

    /// One request (with its retries): the vectors of `texts`, L2-normalised.
    async fn request(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, BackendError> {
        let url = format!("{}/v1/embeddings", self.config.url.trim_end_matches('/'));
        let body = json!({ "model": self.config.model, "input": texts });
        let mut last = String::new();
        for attempt in 0..=self.config.retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
            }
            let mut req = self.client.post(&url).json(&body);
            if !self.config.api_key.is_empty() {
                req = req.bearer_auth(&self.config.api_key);
            }
            let res = match req.send().await {
                Ok(res) => res,
                Err(e) => {
                    last = format!("{e}");
                    continue;
                }
            };
            let status = res.status();
            if !status.is_success() {
                let text = res.text().await.unwrap_or_default();
                last = format!("{status}: {}", text.chars().take(300).collect::<String>());
                if transient(status) {
                    continue;
                }
                return Err(BackendError::upstream(format!("embeddings server: {last}")));
            }
            let parsed: Response = res.json().await.map_err(|e| {
                BackendError::upstream(format!("embeddings server: unreadable answer: {e}"))
            })?;
            if parsed.data.len() != texts.len() {
                return Err(BackendError::upstream(format!(
                    "embeddings server: {} vectors for {} texts",
                    parsed.data.len(),
                    texts.len()
                )));
            }
            let mut items = parsed.data;
            if items.iter().all(|i| i.index.is_some()) {
                items.sort_by_key(|i| i.index);
            }
            return items
                .into_iter()
                .map(|i| {
                    let mut v = i.embedding;
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    if !(norm.is_finite() && norm > 0.0) {
                        return Err(BackendError::upstream(
                            "embeddings server: a zero or non-finite vector",
                        ));
                    }
                    v.iter_mut().for_each(|x| *x /= norm);
                    Ok(v)
                })
                .collect();
        }
        Err(BackendError::upstream(format!(
            "embeddings server {url}: {last} (after {} attempts)",
            self.config.retries + 1
        )))
    }
}

#[async_trait]
impl Embed for RemoteEmbedder {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    fn count_tokens(&self, text: &str) -> usize {
        self.counter.count(text)
    }

    async fn embed(
        &self,
        kind: TextKind,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        let prefix = match kind {
            TextKind::Query => &self.info.query_prefix,
            TextKind::Passage => &self.info.passage_prefix,
        };
        let prepared: Vec<String> = texts
            .into_iter()
            .map(|t| self.fit(format!("{prefix}{t}")))
            .collect();
        let mut out = Vec::with_capacity(prepared.len());
        for batch in prepared.chunks(self.config.batch_size.max(1)) {
            let vectors = self.request(batch).await?;
            if vectors.iter().any(|v| v.len() != self.info.dim) {
                return Err(BackendError::upstream(format!(
                    "embeddings server: vectors of another size than {}",
                    self.info.dim
                )));
            }
            out.extend(vectors);
        }
        Ok(out)
    }
}
