//! The HTTP service's settings: the `[server]` and `[auth]` sections of
//! `config/ragd.toml`, with their checks.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A setting out of range; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

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
    /// Bearer keys that may ask, search and read documents, in every collection.
    pub read_keys: Vec<String>,
    /// Bearer keys that may also ingest and delete, in every collection.
    pub write_keys: Vec<String>,
    /// Bearer keys that may also create and delete collections.
    #[serde(default)]
    pub admin_keys: Vec<String>,
    /// Keys that read or write some collections only.
    #[serde(default)]
    pub collection_keys: Vec<CollectionKey>,
    /// Serve without keys on an address other machines can reach.
    pub allow_unauthenticated: bool,
}

/// `[[auth.collection_keys]]`: a key for some collections only. Another
/// collection is, to this key, one that does not exist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionKey {
    /// The bearer key.
    pub key: String,
    /// The collections it reaches (`default` among them only if named).
    pub collections: Vec<String>,
    /// `read` (ask, search, read documents) or `write` (also ingest and delete).
    pub scope: String,
}

impl AuthConfig {
    /// Whether requests need a key.
    pub fn enabled(&self) -> bool {
        !(self.read_keys.is_empty()
            && self.write_keys.is_empty()
            && self.admin_keys.is_empty()
            && self.collection_keys.is_empty())
    }

    /// Every configured key.
    fn all_keys(&self) -> impl Iterator<Item = &String> {
        self.read_keys
            .iter()
            .chain(&self.write_keys)
            .chain(&self.admin_keys)
            .chain(self.collection_keys.iter().map(|k| &k.key))
    }

    /// Checks the keys' form, and the collection keys' scopes and names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for key in self.all_keys() {
            if key.len() < 16 || key.chars().any(char::is_whitespace) {
                return Err(ConfigError(
                    "auth: every key must be at least 16 characters without spaces (e.g. `openssl rand -hex 24`)".into(),
                ));
            }
        }
        for (i, k) in self.collection_keys.iter().enumerate() {
            if !matches!(k.scope.as_str(), "read" | "write") {
                return Err(ConfigError(format!(
                    "auth.collection_keys[{i}].scope = {:?}: use \"read\" or \"write\"",
                    k.scope
                )));
            }
            if k.collections.is_empty() {
                return Err(ConfigError(format!(
                    "auth.collection_keys[{i}].collections is empty: name the collections it reaches"
                )));
            }
            if let Some(bad) = k
                .collections
                .iter()
                .find(|c| ragd_core::invalid_collection_name(c).is_some())
            {
                return Err(ConfigError(format!(
                    "auth.collection_keys[{i}].collections: {bad:?} is not a collection name"
                )));
            }
        }
        Ok(())
    }
}

/// Whether `host` is reachable only from this machine.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl ServerConfig {
    /// Checks the ranges, and that an address other machines can reach has
    /// keys (or an explicit opt-out in `auth`).
    pub fn validate(&self, auth: &AuthConfig) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError(m));
        if self.body_limit_bytes < 1024 {
            return invalid("server.body_limit_bytes must be at least 1024".into());
        }
        auth.validate()?;
        if !is_loopback(&self.host) && !auth.enabled() && !auth.allow_unauthenticated {
            return invalid(format!(
                "server.host = {:?} can be reached from other machines: set auth.read_keys / auth.write_keys, \
                 or auth.allow_unauthenticated = true to serve without keys",
                self.host
            ));
        }
        if !(self.request_timeout_s > 0.0 && self.request_timeout_s <= 86400.0) {
            return invalid(format!(
                "server.request_timeout_s = {} must be within (0, 86400]",
                self.request_timeout_s
            ));
        }
        if self.max_documents_per_request == 0 {
            return invalid("server.max_documents_per_request must be at least 1".into());
        }
        Ok(())
    }
}
