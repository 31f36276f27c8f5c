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

impl ServerConfig {
    /// Checks the ranges, and that an address other machines can reach has
    /// keys (or an explicit opt-out in `auth`).
    pub fn validate(&self, auth: &AuthConfig) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError(m));
        if self.body_limit_bytes < 1024 {
            return invalid("server.body_limit_bytes must be at least 1024".into());
        }
        for key in auth.read_keys.iter().chain(&auth.write_keys) {
            if key.len() < 16 || key.chars().any(char::is_whitespace) {
                return invalid(
                    "auth: every key must be at least 16 characters without spaces (e.g. `openssl rand -hex 24`)".into(),
                );
            }
        }
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
