//! API keys: bearer tokens with two scopes. `read` keys may ask, search and
//! read documents; `write` keys may also ingest and delete. `/health`, `/ready`
//! and `/metrics` are open (probes and scrapers). With no keys configured every
//! request passes — the configuration allows that only on a loopback address
//! unless `auth.allow_unauthenticated` says otherwise.
//!
//! A presented key is compared with every configured key, by SHA-256 digest and
//! in constant time (`subtle`), so the time a request takes does not tell how
//! much of a key was right.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;
use crate::error::ApiError;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Ask, search, read documents.
    Read,
    /// Also ingest and delete.
    Write,
}

/// The configured keys, as digests.
#[derive(Debug, Default)]
pub struct Keys {
    keys: Vec<([u8; 32], Scope)>,
}

impl Keys {
    /// The keys of `[auth]`.
    pub fn new(config: &AuthConfig) -> Self {
        let digest = |k: &String| -> [u8; 32] { Sha256::digest(k.as_bytes()).into() };
        let keys = config
            .read_keys
            .iter()
            .map(|k| (digest(k), Scope::Read))
            .chain(config.write_keys.iter().map(|k| (digest(k), Scope::Write)))
            .collect();
        Self { keys }
    }

    /// Whether requests need a key.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The widest scope `presented` has; `None` when it is no configured key.
    pub fn scope_of(&self, presented: &str) -> Option<Scope> {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (key, scope) in &self.keys {
            if bool::from(key.ct_eq(&d)) {
                found = found.max(Some(*scope));
            }
        }
        found
    }
}

/// The scope a route needs; `None` for the open ones.
pub fn required_scope(method: &Method, path: &str) -> Option<Scope> {
    match path {
        "/" | "/health" | "/ready" | "/metrics" => None,
        "/ingest" => Some(Scope::Write),
        p if p.starts_with("/documents/") && method == Method::DELETE => Some(Scope::Write),
        _ => Some(Scope::Read),
    }
}

/// The middleware: 401 without a valid key, 403 with a key lacking the scope.
pub async fn check(State(keys): State<Arc<Keys>>, request: Request, next: Next) -> Response {
    if !keys.enabled() {
        return next.run(request).await;
    }
    let Some(needed) = required_scope(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match presented.map(|k| keys.scope_of(k)) {
        None => {
            ApiError::Unauthorized("an API key is required: send Authorization: Bearer KEY".into())
                .into_response()
        }
        Some(None) => ApiError::Unauthorized("the API key is not valid".into()).into_response(),
        Some(Some(have)) if have < needed => ApiError::Forbidden(
            "this API key may read but not ingest or delete (it is not a write key)".into(),
        )
        .into_response(),
        Some(Some(_)) => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_scopes_and_routes_need_them() {
        let keys = Keys::new(&AuthConfig {
            read_keys: vec!["r".repeat(20)],
            write_keys: vec!["w".repeat(20)],
            allow_unauthenticated: false,
        });
        assert!(keys.enabled());
        assert_eq!(keys.scope_of(&"r".repeat(20)), Some(Scope::Read));
        assert_eq!(keys.scope_of(&"w".repeat(20)), Some(Scope::Write));
        assert_eq!(keys.scope_of(&"r".repeat(19)), None);
        assert_eq!(keys.scope_of(""), None);
        assert_eq!(required_scope(&Method::POST, "/ingest"), Some(Scope::Write));
        assert_eq!(
            required_scope(&Method::DELETE, "/documents/x"),
            Some(Scope::Write)
        );
        assert_eq!(
            required_scope(&Method::GET, "/documents/x"),
            Some(Scope::Read)
        );
        assert_eq!(required_scope(&Method::POST, "/ask"), Some(Scope::Read));
        assert_eq!(required_scope(&Method::GET, "/ready"), None);
        assert!(!Keys::default().enabled());
    }
}
