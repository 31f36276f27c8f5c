//! API keys: bearer tokens with a scope and a reach. `read` keys may ask,
//! search and read documents; `write` keys may also ingest and delete;
//! `admin` keys may also create and delete collections. Read, write and admin
//! keys reach every collection; a collection key (`[[auth.collection_keys]]`)
//! reaches the collections it names, and to it every other collection is one
//! that does not exist: the same 404 as an unknown name, never a 403 that
//! would say it is there. `/health`, `/ready` and `/metrics` are open (probes
//! and scrapers; `/metrics` and the counts of `/ready` need a key that reaches
//! every collection once collection keys exist). With no keys configured
//! every request passes — the configuration allows that only on a loopback
//! address unless `auth.allow_unauthenticated` says otherwise.
//!
//! A presented key is compared with every configured key, by SHA-256 digest and
//! in constant time (`subtle`), so the time a request takes does not tell how
//! much of a key was right.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ragd_core::DEFAULT_COLLECTION;
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
    /// Also create and delete collections.
    Admin,
}

/// One configured key.
#[derive(Debug)]
struct Key {
    digest: [u8; 32],
    scope: Scope,
    /// `None`: every collection.
    collections: Option<Vec<String>>,
}

/// The configured keys, as digests.
#[derive(Debug, Default)]
pub struct Keys {
    keys: Vec<Key>,
}

/// What the request's key may do, where: put in the request's extensions by
/// [`check`] for the handlers that answer differently per key (the list of
/// collections, the counts of `/ready` and `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The scope in every collection.
    everywhere: Option<Scope>,
    /// Scopes in single collections.
    collections: Vec<(String, Scope)>,
}

impl Access {
    /// Everything: a server without keys.
    pub fn everything() -> Self {
        Access {
            everywhere: Some(Scope::Admin),
            collections: Vec::new(),
        }
    }

    /// The key's scope in `collection`, if it reaches it.
    pub fn scope_in(&self, collection: &str) -> Option<Scope> {
        self.collections
            .iter()
            .filter(|(c, _)| c == collection)
            .map(|(_, s)| *s)
            .chain(self.everywhere)
            .max()
    }

    /// Whether the key reaches every collection (it may count them all).
    pub fn reaches_all(&self) -> bool {
        self.everywhere.is_some()
    }

    /// Whether any key matched.
    fn is_key(&self) -> bool {
        self.everywhere.is_some() || !self.collections.is_empty()
    }
}

impl Keys {
    /// The keys of `[auth]`.
    pub fn new(config: &AuthConfig) -> Self {
        let digest = |k: &String| -> [u8; 32] { Sha256::digest(k.as_bytes()).into() };
        let everywhere = |keys: &[String], scope: Scope| -> Vec<Key> {
            keys.iter()
                .map(|k| Key {
                    digest: digest(k),
                    scope,
                    collections: None,
                })
                .collect()
        };
        let mut keys = everywhere(&config.read_keys, Scope::Read);
        keys.extend(everywhere(&config.write_keys, Scope::Write));
        keys.extend(everywhere(&config.admin_keys, Scope::Admin));
        keys.extend(config.collection_keys.iter().map(|k| Key {
            digest: digest(&k.key),
            scope: if k.scope == "write" {
                Scope::Write
            } else {
                Scope::Read
            },
            collections: Some(k.collections.clone()),
        }));
        Self { keys }
    }

    /// Whether requests need a key.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether some keys reach only some collections.
    pub fn has_collection_keys(&self) -> bool {
        self.keys.iter().any(|k| k.collections.is_some())
    }

    /// What `presented` may do (nothing when it is no configured key). Every
    /// configured key is compared, in constant time each.
    pub fn access_of(&self, presented: &str) -> Access {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut access = Access::default();
        for key in &self.keys {
            if !bool::from(key.digest.ct_eq(&d)) {
                continue;
            }
            match &key.collections {
                None => access.everywhere = access.everywhere.max(Some(key.scope)),
                Some(names) => access
                    .collections
                    .extend(names.iter().map(|c| (c.clone(), key.scope))),
            }
        }
        access
    }
}

/// Where a route acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach<'a> {
    /// On one collection's documents.
    Collection(&'a str),
    /// On no collection's documents (the service, the models, the list of
    /// collections).
    Service,
    /// On any collection's documents (sources): only keys that reach every
    /// collection.
    Everywhere,
}

/// The scope a route needs and where; `None` for the open ones. Routes under
/// `/collections/{name}/` act on that collection, the others on documents on
/// `default`.
pub fn requirement<'a>(method: &Method, path: &'a str) -> Option<(Scope, Reach<'a>)> {
    fn on_documents(method: &Method, path: &str) -> Option<Scope> {
        match path {
            "/ingest" => Some(Scope::Write),
            p if p.starts_with("/documents/") && method == Method::DELETE => Some(Scope::Write),
            "/documents" | "/search" | "/ask" | "/summarize" | "/v1/chat/completions" => {
                Some(Scope::Read)
            }
            p if p.starts_with("/documents/") => Some(Scope::Read),
            _ => None,
        }
    }
    match path {
        "/" | "/health" | "/ready" | "/metrics" => return None,
        "/collections" if method == Method::POST => return Some((Scope::Admin, Reach::Service)),
        "/collections" => return Some((Scope::Read, Reach::Service)),
        _ => {}
    }
    // Sources read folders and fetch URLs on the server's behalf: changing
    // them is an admin's; reading them (their paths and URLs) needs a key
    // that reaches every collection.
    if path == "/sources" || path.starts_with("/sources/") {
        let scope = if method == Method::GET {
            Scope::Read
        } else {
            Scope::Admin
        };
        return Some((scope, Reach::Everywhere));
    }
    if let Some(rest) = path.strip_prefix("/collections/") {
        let (name, tail) = rest.split_once('/').map_or((rest, ""), |(n, t)| (n, t));
        if tail.is_empty() {
            let scope = if method == Method::DELETE {
                Scope::Admin
            } else {
                Scope::Read
            };
            return Some((scope, Reach::Service));
        }
        let scope =
            on_documents(method, &path[path.len() - tail.len() - 1..]).unwrap_or(Scope::Read);
        return Some((scope, Reach::Collection(name)));
    }
    match on_documents(method, path) {
        Some(scope) => Some((scope, Reach::Collection(DEFAULT_COLLECTION))),
        None => Some((Scope::Read, Reach::Service)),
    }
}

/// The middleware: 401 without a valid key, 404 for a collection the key does
/// not reach (as for one that does not exist), 403 with a key lacking the
/// scope. Every request gets the key's [`Access`] in its extensions.
pub async fn check(State(keys): State<Arc<Keys>>, mut request: Request, next: Next) -> Response {
    if !keys.enabled() {
        request.extensions_mut().insert(Access::everything());
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let access = presented.map(|k| keys.access_of(k)).unwrap_or_default();
    let path = request.uri().path().to_string();
    let Some((needed, reach)) = requirement(request.method(), &path) else {
        request.extensions_mut().insert(access);
        return next.run(request).await;
    };
    if presented.is_none() {
        return ApiError::Unauthorized(
            "an API key is required: send Authorization: Bearer KEY".into(),
        )
        .into_response();
    }
    if !access.is_key() {
        return ApiError::Unauthorized("the API key is not valid".into()).into_response();
    }
    let have = match reach {
        Reach::Service if needed == Scope::Admin => access.everywhere,
        Reach::Service => Some(Scope::Admin),
        Reach::Everywhere => access.everywhere,
        Reach::Collection(c) => match access.scope_in(c) {
            Some(s) => Some(s),
            // Percent-decoded as the router will; an undecodable name
            // reaches nothing either way.
            None => {
                let name = percent_encoding::percent_decode_str(c).decode_utf8_lossy();
                return ApiError::from(ragd_pipeline::collections::not_found(&name))
                    .into_response();
            }
        },
    };
    if have < Some(needed) {
        let why = match needed {
            Scope::Admin if path.starts_with("/sources") => {
                "only an admin key may add, remove or sync sources"
            }
            Scope::Admin => "only an admin key may create or delete collections",
            _ if reach == Reach::Everywhere => "sources need a key that reaches every collection",
            _ => "this API key may read but not ingest or delete here (it is not a write key)",
        };
        return ApiError::Forbidden(why.into()).into_response();
    }
    request.extensions_mut().insert(access);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CollectionKey;

    impl Keys {
        /// The widest scope `presented` has anywhere; `None` when it is no key.
        fn scope_of(&self, presented: &str) -> Option<Scope> {
            let access = self.access_of(presented);
            access
                .collections
                .iter()
                .map(|(_, s)| *s)
                .chain(access.everywhere)
                .max()
        }
    }

    #[test]
    fn keys_have_scopes_and_routes_need_them() {
        let keys = Keys::new(&AuthConfig {
            read_keys: vec!["r".repeat(20)],
            write_keys: vec!["w".repeat(20)],
            admin_keys: vec!["a".repeat(20)],
            collection_keys: vec![CollectionKey {
                key: "c".repeat(20),
                collections: vec!["team-a".into(), "team-b".into()],
                scope: "write".into(),
            }],
            allow_unauthenticated: false,
        });
        assert!(keys.enabled() && keys.has_collection_keys());
        assert_eq!(keys.scope_of(&"r".repeat(20)), Some(Scope::Read));
        assert_eq!(keys.scope_of(&"w".repeat(20)), Some(Scope::Write));
        assert_eq!(keys.scope_of(&"a".repeat(20)), Some(Scope::Admin));
        assert_eq!(keys.scope_of(&"r".repeat(19)), None);
        assert_eq!(keys.scope_of(""), None);
        let c = keys.access_of(&"c".repeat(20));
        assert_eq!(c.scope_in("team-b"), Some(Scope::Write));
        assert_eq!(c.scope_in("default"), None);
        assert!(!c.reaches_all() && keys.access_of(&"r".repeat(20)).reaches_all());
        let default = Reach::Collection("default");
        assert_eq!(
            requirement(&Method::POST, "/ingest"),
            Some((Scope::Write, default))
        );
        assert_eq!(
            requirement(&Method::DELETE, "/documents/x"),
            Some((Scope::Write, default))
        );
        assert_eq!(
            requirement(&Method::GET, "/documents/x"),
            Some((Scope::Read, default))
        );
        assert_eq!(
            requirement(&Method::POST, "/ask"),
            Some((Scope::Read, default))
        );
        assert_eq!(
            requirement(&Method::POST, "/v1/chat/completions"),
            Some((Scope::Read, default))
        );
        assert_eq!(
            requirement(&Method::POST, "/v1/embeddings"),
            Some((Scope::Read, Reach::Service))
        );
        let a = Reach::Collection("team-a");
        assert_eq!(
            requirement(&Method::POST, "/collections/team-a/ingest"),
            Some((Scope::Write, a))
        );
        assert_eq!(
            requirement(&Method::POST, "/collections/team-a/ask"),
            Some((Scope::Read, a))
        );
        assert_eq!(
            requirement(&Method::DELETE, "/collections/team-a/documents/x"),
            Some((Scope::Write, a))
        );
        assert_eq!(
            requirement(&Method::POST, "/collections/team-a/v1/chat/completions"),
            Some((Scope::Read, a))
        );
        assert_eq!(
            requirement(&Method::POST, "/collections"),
            Some((Scope::Admin, Reach::Service))
        );
        // Sources: read with a key that reaches everything, changed by admins.
        assert_eq!(
            requirement(&Method::GET, "/sources"),
            Some((Scope::Read, Reach::Everywhere))
        );
        for (method, path) in [
            (Method::POST, "/sources"),
            (Method::POST, "/sources/x/sync"),
            (Method::DELETE, "/sources/x"),
        ] {
            assert_eq!(
                requirement(&method, path),
                Some((Scope::Admin, Reach::Everywhere)),
                "{method} {path}"
            );
        }
        assert_eq!(
            requirement(&Method::GET, "/collections"),
            Some((Scope::Read, Reach::Service))
        );
        assert_eq!(
            requirement(&Method::DELETE, "/collections/team-a"),
            Some((Scope::Admin, Reach::Service))
        );
        assert_eq!(requirement(&Method::GET, "/ready"), None);
        assert!(!Keys::default().enabled());
    }
}
