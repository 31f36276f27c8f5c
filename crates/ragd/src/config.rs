//! Configuration: compiled-in defaults (`config/ragd.toml`), then a config file,
//! then command-line flags.
//!
//! The defaults file is the documentation of every key; a user file only needs
//! the keys it changes (it is merged over the defaults), and an unknown key is an
//! error rather than a silently ignored typo.

use std::path::{Path, PathBuf};

use ragd_backends::RemoteConfig;
use ragd_embedder::EmbedderConfig;
use ragd_index::IndexConfig;
use ragd_pipeline::config::{
    AnswersConfig, ChunkerConfig, GenerationConfig, IngestConfig, PipelineConfig, RetrievalConfig,
};
use ragd_server::config::ServerConfig;
pub use ragd_server::config::{AuthConfig, CollectionKey};
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
    /// The embedder: local batching and window, or a remote server.
    pub embedder: EmbedderSection,
    /// Document chunking.
    pub chunking: ChunkerConfig,
    /// Optional ingest enrichment.
    pub ingest: IngestConfig,
    /// Where documents are kept.
    pub store: StoreConfig,
    /// HNSW parameters.
    pub index: IndexConfig,
    /// Retrieval defaults and limits.
    pub retrieval: RetrievalConfig,
    /// Generation defaults and limits.
    pub generation: GenerationConfig,
    /// The OpenAI-compatible server for `generation.backend = "openai"`.
    pub remote: RemoteConfig,
    /// Checking and cleaning answers.
    pub answers: AnswersConfig,
    /// API keys.
    pub auth: AuthConfig,
    /// Folders and URLs kept in sync.
    pub sources: ragd_sources::SourcesConfig,
}

/// `[models]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// Embedding model directory.
    pub embedder: PathBuf,
    /// A second, multilingual embedding model directory, routed to by
    /// language (see `ragd_pipeline::route`); empty for none.
    #[serde(default)]
    pub multilingual_embedder: PathBuf,
    /// GGUF chat model file.
    pub generator: PathBuf,
}

/// `[embedder]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedderSection {
    /// `"local"` (the model in `models.embedder`, on this machine) or
    /// `"openai"` (an OpenAI-compatible `/v1/embeddings` server).
    pub backend: String,
    /// Texts per forward pass (local) or per request (remote).
    pub batch_size: usize,
    /// Longest text in tokens; default: the model's own.
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Put in front of queries; default: the model's own prompt.
    #[serde(default)]
    pub query_prefix: Option<String>,
    /// Put in front of passages; default: the model's own prompt.
    #[serde(default)]
    pub passage_prefix: Option<String>,
    /// Local embedders' linear layers in int8 (faster; vectors within cosine
    /// 0.999 of fp32). On in the built-in defaults.
    #[serde(default)]
    pub int8: bool,
    /// For `"openai"`: the server's base URL.
    pub url: String,
    /// For `"openai"`: the model to request (also the stored vectors' identity).
    pub model: String,
    /// For `"openai"`: bearer token (empty: none).
    pub api_key: String,
    /// For `"openai"`: longest wait for one request, seconds.
    pub timeout_s: f64,
    /// For `"openai"`: attempts after the first for a failed request.
    pub retries: usize,
}

impl EmbedderSection {
    /// The local model's settings (also what the remote model's directory is
    /// read with).
    pub fn local(&self) -> EmbedderConfig {
        EmbedderConfig {
            batch_size: self.batch_size,
            max_length: self.max_length,
            query_prefix: self.query_prefix.clone(),
            passage_prefix: self.passage_prefix.clone(),
            int8: self.int8,
        }
    }

    /// The remote server's settings.
    pub fn remote(&self) -> ragd_backends::RemoteEmbedConfig {
        ragd_backends::RemoteEmbedConfig {
            url: self.url.clone(),
            model: self.model.clone(),
            api_key: self.api_key.clone(),
            timeout_s: self.timeout_s,
            retries: self.retries,
            batch_size: self.batch_size,
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `"sqlite"` or `"postgres"`.
    pub backend: String,
    /// The PostgreSQL URL for `"postgres"`.
    pub url: String,
    /// Pool size for `"postgres"`.
    pub max_connections: u32,
    /// Longest wait for a PostgreSQL connection, seconds.
    pub connect_timeout_s: u64,
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

impl From<ragd_pipeline::ConfigError> for ConfigError {
    fn from(e: ragd_pipeline::ConfigError) -> Self {
        ConfigError::Invalid(e.0)
    }
}

impl From<ragd_server::config::ConfigError> for ConfigError {
    fn from(e: ragd_server::config::ConfigError) -> Self {
        ConfigError::Invalid(e.0)
    }
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
        // The configuration is plain data (strings, numbers, lists): it always
        // serialises; should that ever change, the log says so instead. f32
        // settings keep their digits (0.2, not 0.20000000298023224).
        let mut v = ragd_server::json::to_value(self)
            .unwrap_or_else(|e| serde_json::json!({ "unprintable": e.to_string() }));
        for key in ["/remote/api_key", "/embedder/api_key"] {
            if let Some(k) = v
                .pointer_mut(key)
                .filter(|k| k.as_str().is_some_and(|s| !s.is_empty()))
            {
                *k = "***".into();
            }
        }
        if let Some(url) = v.pointer_mut("/store/url") {
            if let Some(s) = url.as_str() {
                *url = ragd_backends::redact_url(s).into();
            }
        }
        for list in ["/auth/read_keys", "/auth/write_keys", "/auth/admin_keys"] {
            if let Some(serde_json::Value::Array(keys)) = v.pointer_mut(list) {
                for k in keys.iter_mut() {
                    *k = "***".into();
                }
            }
        }
        if let Some(serde_json::Value::Array(entries)) = v.pointer_mut("/auth/collection_keys") {
            for entry in entries.iter_mut() {
                if let Some(k) = entry.get_mut("key") {
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

    /// Checks values that no type can express, section by section (each
    /// section's owner checks its own), then what spans sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        self.index
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.server.validate(&self.auth)?;
        if self.embedder.batch_size == 0 {
            return invalid("embedder.batch_size must be at least 1".into());
        }
        match self.embedder.backend.as_str() {
            "local" => {}
            "openai" => {
                let url = &self.embedder.url;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return invalid(format!(
                        "embedder.url = {url:?} must start with http:// or https:// for embedder.backend = \"openai\""
                    ));
                }
                if self.embedder.model.trim().is_empty() {
                    return invalid("embedder.model must name the model to request".into());
                }
                if !(self.embedder.timeout_s > 0.0 && self.embedder.timeout_s <= 600.0) {
                    return invalid("embedder.timeout_s must be within (0, 600]".into());
                }
            }
            other => {
                return invalid(format!(
                    "embedder.backend = {other:?} must be \"local\" or \"openai\""
                ))
            }
        }
        let most = ragd_pipeline::enrich::MAX_QUESTIONS;
        if self.ingest.generate_questions > most {
            return invalid(format!(
                "ingest.generate_questions = {} must be within 0..={most}",
                self.ingest.generate_questions
            ));
        }
        match self.store.backend.as_str() {
            "sqlite" => {}
            "postgres" => {
                let url = &self.store.url;
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return invalid(format!(
                        "store.url = {:?} must be postgres://USER:PASSWORD@HOST:PORT/DATABASE for store.backend = \"postgres\"",
                        ragd_backends::redact_url(url)
                    ));
                }
                if self.store.max_connections == 0 {
                    return invalid("store.max_connections must be at least 1".into());
                }
                if !(1..=600).contains(&self.store.connect_timeout_s) {
                    return invalid("store.connect_timeout_s must be within 1..=600".into());
                }
            }
            other => {
                return invalid(format!(
                    "store.backend = {other:?} must be \"sqlite\" or \"postgres\""
                ))
            }
        }
        self.retrieval.validate()?;
        self.answers.validate()?;
        self.generation.validate()?;
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
        Ok(())
    }

    /// The pipeline's sections.
    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig {
            retrieval: self.retrieval.clone(),
            generation: self.generation.clone(),
            answers: self.answers.clone(),
            chunking: self.chunking.clone(),
            max_documents_per_request: self.server.max_documents_per_request,
            generate_questions: self.ingest.generate_questions,
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
        let t = |c: &Config, name| {
            ragd_pipeline::Thresholds::for_model(
                name,
                ragd_pipeline::route::Side::Primary,
                c.retrieval.min_score,
                c.retrieval.abstain_below,
            )
        };
        let minilm = t(&c, "all-MiniLM-L6-v2");
        assert_eq!(
            (minilm.min_score, minilm.abstain_below, minilm.calibrated),
            (0.2, 0.33, true)
        );
        let e5 = t(&c, "multilingual-e5-small");
        assert_eq!(
            (e5.min_score, e5.abstain_below, e5.calibrated),
            (0.8, 0.81, true)
        );
        let other = t(&c, "bge-small-en");
        assert_eq!(
            (other.min_score, other.abstain_below, other.calibrated),
            (0.2, 0.33, false)
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
        // Beside an English model, e5 scores the other languages' passages,
        // whose cosines run higher.
        let beside = ragd_pipeline::Thresholds::for_model(
            "multilingual-e5-small",
            ragd_pipeline::route::Side::Multilingual,
            None,
            None,
        );
        assert_eq!((beside.min_score, beside.abstain_below), (0.85, 0.87));
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
        assert_eq!(c.retrieval.mode, ragd_pipeline::retrieve::Mode::Dense);
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

    /// Admin and collection keys are read from the file, checked, and never
    /// logged.
    #[test]
    fn collection_keys_are_read_checked_and_redacted() {
        let file = "[auth]\nadmin_keys = [\"adminadminadmin0123\"]\n\
                    [[auth.collection_keys]]\nkey = \"teamteamteam0123456\"\n\
                    collections = [\"team-a\"]\nscope = \"write\"\n";
        let c = Config::from_layers(file, "test", &env(&[])).unwrap();
        assert_eq!(
            c.auth.collection_keys[0].collections,
            vec!["team-a".to_string()]
        );
        let logged = c.redacted().to_string();
        assert!(
            !logged.contains("adminadmin") && !logged.contains("teamteam"),
            "{logged}"
        );
        for (bad, says) in [
            ("scope = \"admin\"\ncollections = [\"a\"]", "scope"),
            ("scope = \"read\"\ncollections = []", "is empty"),
            (
                "scope = \"read\"\ncollections = [\"../a\"]",
                "not a collection name",
            ),
        ] {
            let file = format!("[[auth.collection_keys]]\nkey = \"teamteamteam0123456\"\n{bad}\n");
            let e = Config::from_layers(&file, "test", &env(&[])).unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }

    /// An f32 setting is logged as written, not as the f64 nearest it.
    #[test]
    fn numbers_are_logged_as_configured() {
        let c = Config::from_layers("[retrieval]\nmin_score = 0.2\n", "test", &env(&[])).unwrap();
        let logged = c.redacted().to_string();
        assert!(logged.contains(r#""min_score":0.2,"#), "{logged}");
        assert!(!logged.contains("0.2000000"), "{logged}");
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
        assert!(
            ragd_server::config::is_loopback("::1")
                && ragd_server::config::is_loopback("localhost")
                && !ragd_server::config::is_loopback("10.0.0.1")
        );
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

    #[test]
    fn the_store_backend_and_its_url_are_checked_and_the_password_never_logged() {
        let e =
            Config::from_toml_over_defaults("[store]\nbackend = \"mysql\"\n", "test").unwrap_err();
        assert!(e.to_string().contains("store.backend"), "{e}");
        let e = Config::from_toml_over_defaults("[store]\nbackend = \"postgres\"\n", "test")
            .unwrap_err();
        assert!(e.to_string().contains("store.url"), "{e}");
        let e = Config::from_toml_over_defaults(
            "[store]\nbackend = \"postgres\"\nurl = \"mysql://u:hunter2@db/x\"\n",
            "test",
        )
        .unwrap_err();
        assert!(e.to_string().contains("store.url"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let env = [(
            "RAGD__STORE__URL".to_string(),
            "postgres://ragd:hunter2@db:5432/ragd".to_string(),
        )];
        let c = Config::from_layers("[store]\nbackend = \"postgres\"\n", "test", &env).unwrap();
        assert_eq!(c.store.url, "postgres://ragd:hunter2@db:5432/ragd");
        let logged = c.redacted().to_string();
        assert!(!logged.contains("hunter2"), "{logged}");
        assert!(
            logged.contains("postgres://ragd:***@db:5432/ragd"),
            "{logged}"
        );
        assert_eq!(Config::defaults().store.backend, "sqlite");
    }
}
