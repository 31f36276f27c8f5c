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
    /// API keys.
    pub auth: AuthConfig,
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
    /// Origins allowed to call the API from a browser (CORS); `["*"]` for any.
    pub cors_origins: Vec<String>,
    /// Longest time a request may take before its response starts (408);
    /// streamed answers are bounded by `generation.timeout_s` instead.
    pub request_timeout_s: f64,
}

/// `[auth]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer keys that may ask, search and read documents.
    pub read_keys: Vec<String>,
    /// Bearer keys that may also ingest and delete.
    pub write_keys: Vec<String>,
    /// Serve without keys on an address other machines can reach.
    pub allow_unauthenticated: bool,
}

impl AuthConfig {
    /// Whether requests need a key.
    pub fn enabled(&self) -> bool {
        !(self.read_keys.is_empty() && self.write_keys.is_empty())
    }
}

/// Whether `host` is reachable only from this machine.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
    /// Passages scoring below this are left out. `None`: the embedder's
    /// calibrated value ([`Thresholds::for_embedder`]).
    #[serde(default)]
    pub min_score: Option<f32>,
    /// When the best passage scores below this, ragd declines to answer
    /// without asking the model. `None`: the embedder's calibrated value.
    #[serde(default)]
    pub abstain_below: Option<f32>,
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

/// Environment variables that override settings: `RAGD__SECTION__KEY`.
pub const ENV_PREFIX: &str = "RAGD__";

/// Applies `RAGD__SECTION__KEY=value` variables to `value` (the merged tree).
/// A value is read as TOML (`8080`, `true`, `["a", "b"]`) and otherwise taken as
/// a string; a variable naming no setting is an error naming it.
fn apply_env(value: &mut toml::Value, vars: &[(String, String)]) -> Result<(), ConfigError> {
    for (name, raw) in vars {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        let unknown = || ConfigError::Parse {
            origin: format!("environment variable {name}"),
            message: format!("no setting is called {}", keys.join(".")),
        };
        if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) {
            return Err(unknown());
        }
        let mut slot = &mut *value;
        for k in &keys {
            slot = slot.get_mut(k.as_str()).ok_or_else(unknown)?;
        }
        let parsed = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        // A string setting takes the text as written ("0123" stays "0123").
        *slot = match slot {
            toml::Value::String(_) => toml::Value::String(match parsed {
                toml::Value::String(s) => s,
                _ => raw.clone(),
            }),
            _ => parsed,
        };
    }
    Ok(())
}

impl Config {
    /// The layers in order: built-in defaults, the file's text (`origin` names
    /// it in errors), then `RAGD__SECTION__KEY` variables from `env`.
    pub fn from_layers(
        text: &str,
        origin: &str,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let parse = |t: &str, origin: &str| {
            t.parse::<toml::Value>().map_err(|e| ConfigError::Parse {
                origin: origin.to_string(),
                message: e.to_string(),
            })
        };
        let mut value = parse(DEFAULT_CONFIG, "built-in defaults")?;
        merge(&mut value, parse(text, origin)?);
        apply_env(&mut value, env)?;
        let from_env = env.iter().any(|(k, _)| k.starts_with(ENV_PREFIX));
        let config: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                origin: if from_env {
                    format!("{origin} with RAGD__ variables")
                } else {
                    origin.to_string()
                },
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as JSON with secrets (API keys) replaced by `"***"`,
    /// for the start-up log.
    pub fn redacted(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(k) = v
            .pointer_mut("/remote/api_key")
            .filter(|k| k.as_str().is_some_and(|s| !s.is_empty()))
        {
            *k = "***".into();
        }
        for list in ["/auth/read_keys", "/auth/write_keys"] {
            if let Some(serde_json::Value::Array(keys)) = v.pointer_mut(list) {
                for k in keys.iter_mut() {
                    *k = "***".into();
                }
            }
        }
        v
    }

    /// The compiled-in defaults.
    pub fn defaults() -> Self {
        Self::from_toml_over_defaults("", "defaults")
            .unwrap_or_else(|e| panic!("built-in config is invalid: {e}"))
    }

    /// Parses `text` (a TOML file's contents) merged over the defaults.
    pub fn from_toml_over_defaults(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::from_layers(text, origin, &[])
    }

    /// Reads `file` (when given) merged over the defaults, then the
    /// `RAGD__SECTION__KEY` variables among `env`.
    pub fn load(file: Option<&Path>, env: &[(String, String)]) -> Result<Self, ConfigError> {
        match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                    path: path.to_owned(),
                    source,
                })?;
                Self::from_layers(&text, &path.display().to_string(), env)
            }
            None => Self::from_layers("", "defaults", env),
        }
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
        let a = &self.auth;
        for key in a.read_keys.iter().chain(&a.write_keys) {
            if key.len() < 16 || key.chars().any(char::is_whitespace) {
                return invalid(
                    "auth: every key must be at least 16 characters without spaces (e.g. `openssl rand -hex 24`)".into(),
                );
            }
        }
        if !is_loopback(&self.server.host) && !a.enabled() && !a.allow_unauthenticated {
            return invalid(format!(
                "server.host = {:?} can be reached from other machines: set auth.read_keys / auth.write_keys, \
                 or auth.allow_unauthenticated = true to serve without keys",
                self.server.host
            ));
        }
        if !(self.server.request_timeout_s > 0.0 && self.server.request_timeout_s <= 86400.0) {
            return invalid(format!(
                "server.request_timeout_s = {} must be within (0, 86400]",
                self.server.request_timeout_s
            ));
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
        if let Some(a) = r.abstain_below.filter(|a| !(-1.0..=1.0).contains(a)) {
            return invalid(format!(
                "retrieval.abstain_below = {a} must be within -1..=1"
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
        if let Some(m) = r.min_score.filter(|m| !(-1.0..=1.0).contains(m)) {
            return invalid(format!("retrieval.min_score = {m} must be within -1..=1"));
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
            steer: None,
            deadline: None,
        }
    }
}

/// The retrieval score thresholds in force: the configured ones, else the
/// embedder's calibrated ones. Cosine similarity means different things for
/// different embedders (all-MiniLM-L6-v2 scores unrelated text around 0,
/// multilingual-e5-small around 0.75), so one number cannot serve both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Passages below this are not given to the model.
    pub min_score: f32,
    /// Below this best score ragd declines without asking the model.
    pub abstain_below: f32,
    /// Whether the embedder's values came from a calibration (false: an
    /// unknown embedder fell back to all-MiniLM-L6-v2's).
    pub calibrated: bool,
}

impl Thresholds {
    /// Measured with the Debian FAQ's 123 questions and the 40 questions of
    /// `eval/unanswerable.jsonl` (top passage cosine; hybrid retrieval):
    /// all-MiniLM-L6-v2 scores the FAQ's questions 0.25-0.9 (all but one above
    /// 0.33) and the others 0.24 at most; multilingual-e5-small scores them
    /// 0.818-0.94 and 0.71-0.810 — a narrow gap, so calibrate on your own
    /// questions with `ragd eval qa` where it matters.
    const KNOWN: &[(&str, f32, f32)] = &[
        ("all-MiniLM-L6-v2", 0.2, 0.3),
        ("multilingual-e5-small", 0.8, 0.81),
    ];

    /// The thresholds for the embedder named `embedder` (its directory name),
    /// with the configured values taking precedence.
    pub fn for_embedder(retrieval: &RetrievalConfig, embedder: &str) -> Self {
        let known = Self::KNOWN
            .iter()
            .find(|(name, _, _)| embedder.eq_ignore_ascii_case(name));
        let (_, min_score, abstain_below) = known.copied().unwrap_or(Self::KNOWN[0]);
        Self {
            min_score: retrieval.min_score.unwrap_or(min_score),
            abstain_below: retrieval.abstain_below.unwrap_or(abstain_below),
            calibrated: known.is_some()
                || (retrieval.min_score.is_some() && retrieval.abstain_below.is_some()),
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
    fn thresholds_follow_the_embedder_unless_configured() {
        let c = Config::defaults();
        assert_eq!(
            (c.retrieval.min_score, c.retrieval.abstain_below),
            (None, None)
        );
        let t = |c: &Config, name| Thresholds::for_embedder(&c.retrieval, name);
        let minilm = t(&c, "all-MiniLM-L6-v2");
        assert_eq!(
            (minilm.min_score, minilm.abstain_below, minilm.calibrated),
            (0.2, 0.3, true)
        );
        let e5 = t(&c, "multilingual-e5-small");
        assert_eq!(
            (e5.min_score, e5.abstain_below, e5.calibrated),
            (0.8, 0.81, true)
        );
        let other = t(&c, "bge-small-en");
        assert_eq!(
            (other.min_score, other.abstain_below, other.calibrated),
            (0.2, 0.3, false)
        );
        let set =
            Config::from_toml_over_defaults("[retrieval]\nabstain_below = 0.5\n", "test").unwrap();
        let e5 = t(&set, "multilingual-e5-small");
        assert_eq!((e5.min_score, e5.abstain_below), (0.8, 0.5));
        let both = Config::from_toml_over_defaults(
            "[retrieval]\nmin_score = 0.4\nabstain_below = 0.5\n",
            "test",
        )
        .unwrap();
        assert!(t(&both, "bge-small-en").calibrated, "both set by the user");
        assert!(
            Config::from_toml_over_defaults("[retrieval]\nabstain_below = 1.5\n", "test").is_err()
        );
    }

    #[test]
    fn user_file_overrides_only_what_it_names() {
        let c = Config::from_toml_over_defaults("[server]\nport = 9000\n", "test").unwrap();
        assert_eq!(c.server.port, 9000);
        assert_eq!(c.server.host, "127.0.0.1");
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_the_file_which_overrides_the_defaults() {
        let file = "[server]\nport = 9000\ndata_dir = \"from-file\"\n";
        let c = Config::from_layers(
            file,
            "test",
            &env(&[
                ("RAGD__SERVER__PORT", "9100"),
                ("RAGD__RETRIEVAL__MODE", "dense"),
                ("RAGD__AUTH__READ_KEYS", r#"["0123456789abcdef"]"#),
                ("RAGD__REMOTE__API_KEY", "12345"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.port, 9100, "the environment beats the file");
        assert_eq!(
            c.server.data_dir,
            PathBuf::from("from-file"),
            "the file beats the defaults"
        );
        assert_eq!(c.server.host, "127.0.0.1", "defaults fill the rest");
        assert_eq!(c.retrieval.mode, crate::retrieval::Mode::Dense);
        assert_eq!(c.auth.read_keys, vec!["0123456789abcdef".to_string()]);
        assert_eq!(
            c.remote.api_key, "12345",
            "a string setting keeps digits as text"
        );
        // Secrets never reach the log.
        let logged = c.redacted().to_string();
        assert!(
            !logged.contains("0123456789abcdef") && !logged.contains("12345"),
            "{logged}"
        );
    }

    #[test]
    fn bad_environment_variables_are_named() {
        let e = Config::from_layers("", "test", &env(&[("RAGD__SERVER__PROT", "1")])).unwrap_err();
        assert!(
            e.to_string().contains("RAGD__SERVER__PROT") && e.to_string().contains("server.prot"),
            "{e}"
        );
        let e =
            Config::from_layers("", "test", &env(&[("RAGD__SERVER__PORT", "eighty")])).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
        let e = Config::from_layers("", "test", &env(&[("RAGD__PORT", "1")])).unwrap_err();
        assert!(e.to_string().contains("RAGD__PORT"), "{e}");
    }

    #[test]
    fn a_public_address_needs_keys_or_an_explicit_opt_out() {
        let e =
            Config::from_toml_over_defaults("[server]\nhost = \"0.0.0.0\"\n", "test").unwrap_err();
        assert!(e.to_string().contains("allow_unauthenticated"), "{e}");
        Config::from_toml_over_defaults(
            "[server]\nhost = \"0.0.0.0\"\n[auth]\nallow_unauthenticated = true\n",
            "test",
        )
        .unwrap();
        Config::from_toml_over_defaults(
            "[server]\nhost = \"0.0.0.0\"\n[auth]\nwrite_keys = [\"0123456789abcdef\"]\n",
            "test",
        )
        .unwrap();
        let e = Config::from_toml_over_defaults("[auth]\nread_keys = [\"short\"]\n", "test")
            .unwrap_err();
        assert!(e.to_string().contains("16 characters"), "{e}");
        assert!(is_loopback("::1") && is_loopback("localhost") && !is_loopback("10.0.0.1"));
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
