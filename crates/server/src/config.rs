//! Configuration: compiled-in defaults (`config/ragd.toml`), then a config file,
//! then command-line flags.
//!
//! The defaults file is the documentation of every key; a user file only needs
//! the keys it changes (it is merged over the defaults), and an unknown key is an
//! error rather than a silently ignored typo.

use std::path::{Path, PathBuf};

use ragd_embedder::{ChunkerConfig, EmbedderConfig};
use ragd_index::IndexConfig;
use serde::{Deserialize, Serialize};

/// The shipped defaults, compiled in so the binary runs without the file.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/ragd.toml");

/// Everything `ragd serve` can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP listener and limits.
    pub server: ServerConfig,
    /// Which model files to load.
    pub models: ModelsConfig,
    /// Embedder batching.
    pub embedder: EmbedderConfig,
    /// Document chunking.
    pub chunking: ChunkerConfig,
    /// HNSW parameters.
    pub index: IndexConfig,
    /// Retrieval defaults and limits.
    pub retrieval: RetrievalConfig,
    /// Generation defaults and limits.
    pub generation: GenerationConfig,
    /// The OpenAI-compatible server for `generation.backend = "openai"`.
    pub remote: crate::remote::RemoteConfig,
    /// Checking and cleaning answers.
    pub answers: AnswersConfig,
}

/// `[answers]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswersConfig {
    /// A sentence is supported by a passage at this support or above (the
    /// larger of embedding cosine and shared content words, 0–1).
    pub min_support: f32,
    /// Redaction rules: `email`, `phone`, `ipv4`, `card`.
    pub redact: Vec<String>,
    /// Terms replaced by `[blocked]` (whole words, any case).
    pub block_terms: Vec<String>,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address.
    pub host: String,
    /// Listen port (0 picks a free one).
    pub port: u16,
    /// Directory of the document database.
    pub data_dir: PathBuf,
    /// Largest request body in bytes.
    pub body_limit_bytes: usize,
    /// Most documents per ingest request.
    pub max_documents_per_request: usize,
}

/// `[models]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// Embedding model directory.
    pub embedder: PathBuf,
    /// GGUF chat model file.
    pub generator: PathBuf,
}

/// `[retrieval]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalConfig {
    /// Default number of chunks per question.
    pub top_k: usize,
    /// Largest `top_k` a request may ask for.
    pub max_top_k: usize,
    /// Passages scoring below this are left out.
    pub min_score: f32,
    /// When the best passage scores below this, ragd declines to answer
    /// without asking the model.
    pub abstain_below: f32,
    /// Default retrieval mode.
    pub mode: crate::retrieval::Mode,
    /// Hybrid fusion method.
    pub fusion: crate::retrieval::Fusion,
    /// Hybrid: weight of the dense side.
    pub dense_weight: f32,
    /// Hybrid: candidates per side.
    pub candidates: usize,
}

/// `[generation]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    /// Default answer length in tokens (`style: detailed`).
    pub max_tokens: usize,
    /// Default answer length in tokens for `style: concise` (the default style).
    pub concise_max_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Default temperature (0 = greedy).
    pub temperature: f64,
    /// Default nucleus mass.
    pub top_p: f64,
    /// Default top-k for sampling (0 = no limit).
    pub top_k: usize,
    /// Default sampler seed.
    pub seed: u64,
    /// Repetition penalty (1.0 = off).
    pub repeat_penalty: f32,
    /// Window of the repetition penalty.
    pub repeat_last_n: usize,
    /// `local` (the GGUF model in this process) or `openai` (the server in `[remote]`).
    pub backend: String,
    /// Requests that may wait for the generator.
    pub queue_size: usize,
    /// Answers generated at the same time (threads sharing the model's weights).
    pub slots: usize,
    /// Run the model from a copy whose Q4_1/Q5_0/Q5_1 tensors are re-quantized
    /// to Q8_0, which candle has fast CPU kernels for (made beside the file once).
    pub requantize: bool,
    /// Most tokens for prompt and answer together; 0 = the model's context window.
    pub max_context_tokens: usize,
    /// Seconds a request may take from arrival to its last token; an answer
    /// still being written then ends with finish_reason "timeout".
    pub timeout_s: f64,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{origin}: {message}")]
    Parse {
        /// Where the text came from.
        origin: String,
        /// The parser's complaint.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

impl Config {
    /// The compiled-in defaults.
    pub fn defaults() -> Self {
        Self::from_toml_over_defaults("", "defaults")
            .unwrap_or_else(|e| panic!("built-in config is invalid: {e}"))
    }

    /// Parses `text` (a TOML file's contents) merged over the defaults.
    pub fn from_toml_over_defaults(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parse = |t: &str, origin: &str| {
            t.parse::<toml::Value>().map_err(|e| ConfigError::Parse {
                origin: origin.to_string(),
                message: e.to_string(),
            })
        };
        let mut value = parse(DEFAULT_CONFIG, "built-in defaults")?;
        merge(&mut value, parse(text, origin)?);
        let config: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                origin: origin.to_string(),
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a config file merged over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_over_defaults(&text, &path.display().to_string())
    }

    /// Checks values that no type can express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        self.index
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.server.body_limit_bytes < 1024 {
            return invalid("server.body_limit_bytes must be at least 1024".into());
        }
        if self.server.max_documents_per_request == 0 {
            return invalid("server.max_documents_per_request must be at least 1".into());
        }
        if self.embedder.batch_size == 0 {
            return invalid("embedder.batch_size must be at least 1".into());
        }
        let r = &self.retrieval;
        if r.max_top_k == 0 || r.top_k == 0 || r.top_k > r.max_top_k {
            return invalid(format!(
                "retrieval.top_k = {} must be within 1..=max_top_k ({})",
                r.top_k, r.max_top_k
            ));
        }
        if !(0.0..=1.0).contains(&r.dense_weight) {
            return invalid(format!(
                "retrieval.dense_weight = {} must be within 0..=1",
                r.dense_weight
            ));
        }
        if r.candidates == 0 || r.candidates > 1000 {
            return invalid(format!(
                "retrieval.candidates = {} must be within 1..=1000",
                r.candidates
            ));
        }
        if !(-1.0..=1.0).contains(&r.abstain_below) {
            return invalid(format!(
                "retrieval.abstain_below = {} must be within -1..=1",
                r.abstain_below
            ));
        }
        if !(0.0..=1.0).contains(&self.answers.min_support) {
            return invalid(format!(
                "answers.min_support = {} must be within 0..=1",
                self.answers.min_support
            ));
        }
        crate::content::ContentRules::new(&self.answers.redact, &self.answers.block_terms)
            .map_err(ConfigError::Invalid)?;
        if !(-1.0..=1.0).contains(&r.min_score) {
            return invalid(format!(
                "retrieval.min_score = {} must be within -1..=1",
                r.min_score
            ));
        }
        let g = &self.generation;
        if g.max_tokens == 0 || g.max_tokens > g.max_tokens_limit {
            return invalid(format!(
                "generation.max_tokens = {} must be within 1..=max_tokens_limit ({})",
                g.max_tokens, g.max_tokens_limit
            ));
        }
        if g.concise_max_tokens == 0 || g.concise_max_tokens > g.max_tokens_limit {
            return invalid(format!(
                "generation.concise_max_tokens = {} must be within 1..=max_tokens_limit ({})",
                g.concise_max_tokens, g.max_tokens_limit
            ));
        }
        if g.queue_size == 0 {
            return invalid("generation.queue_size must be at least 1".into());
        }
        match self.generation.backend.as_str() {
            "local" => {}
            "openai" => {
                let url = &self.remote.url;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return invalid(format!(
                        "remote.url = {url:?} must start with http:// or https://"
                    ));
                }
                if self.remote.model.trim().is_empty() {
                    return invalid("remote.model must name the model to request".into());
                }
                if !(self.remote.connect_timeout_s > 0.0 && self.remote.connect_timeout_s <= 600.0)
                {
                    return invalid("remote.connect_timeout_s must be within (0, 600]".into());
                }
            }
            other => {
                return invalid(format!(
                    "generation.backend = {other:?} must be \"local\" or \"openai\""
                ))
            }
        }
        if !(1..=64).contains(&self.generation.slots) {
            return invalid(format!(
                "generation.slots = {} must be within 1..=64",
                self.generation.slots
            ));
        }
        if self.generation.max_context_tokens != 0
            && self.generation.max_context_tokens <= self.generation.max_tokens
        {
            return invalid(format!(
                "generation.max_context_tokens = {} leaves no room for a prompt with max_tokens = {}",
                self.generation.max_context_tokens, self.generation.max_tokens
            ));
        }
        if !(self.generation.timeout_s > 0.0 && self.generation.timeout_s <= 86_400.0) {
            return invalid(format!(
                "generation.timeout_s = {} must be within (0, 86400]",
                self.generation.timeout_s
            ));
        }
        self.generation_defaults()
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("generation: {e}")))?;
        Ok(())
    }

    /// The sampling settings a request starts from.
    pub fn generation_defaults(&self) -> ragd_generator::GenerateParams {
        let g = &self.generation;
        ragd_generator::GenerateParams {
            max_tokens: g.max_tokens,
            temperature: g.temperature,
            top_p: g.top_p,
            top_k: g.top_k,
            stop: Vec::new(),
            seed: g.seed,
            repeat_penalty: g.repeat_penalty,
            repeat_last_n: g.repeat_last_n,
            deadline: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_defaults_parse_and_validate() {
        let c = Config::defaults();
        assert_eq!(c.server.port, 8080);
        assert_eq!(c.retrieval.top_k, 4);
        assert_eq!(c.index, IndexConfig::default());
    }

    #[test]
    fn user_file_overrides_only_what_it_names() {
        let c = Config::from_toml_over_defaults("[server]\nport = 9000\n", "test").unwrap();
        assert_eq!(c.server.port, 9000);
        assert_eq!(c.server.host, "127.0.0.1");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = Config::from_toml_over_defaults("[server]\nprot = 9000\n", "test").unwrap_err();
        assert!(e.to_string().contains("prot"), "{e}");
        let e = Config::from_toml_over_defaults("[index]\nmax_connections = 300\n", "test")
            .unwrap_err();
        assert!(e.to_string().contains("max_connections"), "{e}");
        let e = Config::from_toml_over_defaults("[retrieval]\ntop_k = 50\n", "test").unwrap_err();
        assert!(e.to_string().contains("top_k"), "{e}");
    }
}
