//! Tests of the router on a server whose models never load: everything that
//! is decided before the pipeline is reached.

use std::sync::{Arc, OnceLock};

use axum::http::{header, HeaderMap, StatusCode};
use axum::Router;

use crate::{app, openapi::openapi, AppState};
use axum::body::Body;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// A router whose models never load: enough for everything decided before
/// the engine is reached.
fn unloaded(limit: usize) -> Router {
    app(AppState {
        pipeline: Arc::new(OnceLock::new()),
        sources: Arc::new(OnceLock::new()),
        body_limit: limit,
        keys: Arc::new(crate::auth::Keys::default()),
        cors_origins: Vec::new(),
        request_timeout: std::time::Duration::from_secs(60),
        limits: crate::RequestLimits {
            max_tokens: 2048,
            max_top_k: 20,
        },
    })
}

const READ: &str = "read-key-0123456789";
const WRITE: &str = "write-key-0123456789";
const ADMIN: &str = "admin-key-0123456789";
/// Writes `team-a` and reads `team-b`, nothing else.
const TEAM: &str = "team-key-0123456789";

fn guarded(cors: &[&str]) -> Router {
    app(AppState {
        pipeline: Arc::new(OnceLock::new()),
        sources: Arc::new(OnceLock::new()),
        body_limit: 1 << 20,
        keys: Arc::new(crate::auth::Keys::new(&crate::config::AuthConfig {
            read_keys: vec![READ.into()],
            write_keys: vec![WRITE.into()],
            admin_keys: vec![ADMIN.into()],
            collection_keys: vec![
                crate::config::CollectionKey {
                    key: TEAM.into(),
                    collections: vec!["team-a".into()],
                    scope: "write".into(),
                },
                crate::config::CollectionKey {
                    key: TEAM.into(),
                    collections: vec!["team-b".into()],
                    scope: "read".into(),
                },
            ],
            allow_unauthenticated: false,
        })),
        cors_origins: cors.iter().map(|s| s.to_string()).collect(),
        request_timeout: std::time::Duration::from_secs(60),
        limits: crate::RequestLimits {
            max_tokens: 2048,
            max_top_k: 20,
        },
    })
}

/// `method uri` with `key` and an empty JSON object: status and JSON body.
async fn call_with_key(
    router: Router,
    method: &str,
    uri: &str,
    key: &str,
) -> (StatusCode, serde_json::Value) {
    let req = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {key}"));
    let res = router
        .oneshot(req.body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

async fn status_with(
    router: Router,
    method: &str,
    uri: &str,
    key: Option<&str>,
) -> (StatusCode, HeaderMap) {
    let mut req = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let res = router
        .oneshot(req.body(Body::from("{}")).unwrap())
        .await
        .unwrap();
    (res.status(), res.headers().clone())
}

/// No key and a wrong key are 401 (with `WWW-Authenticate`), a read key on a
/// write route is 403, the right keys pass (to a server still loading: 503
/// or a body error), and the probes need no key.
/// Every route the router serves (read from this file's `.route(...)`
/// calls, with their methods) is in the OpenAPI document with the same
/// methods, and the document names no route the router lacks.
#[tokio::test]
async fn openapi_lists_every_route_the_router_serves() {
    // Each module's `routes()` function, as written.
    let mut routes_fns = String::new();
    for source in [
        include_str!("service.rs"),
        include_str!("openapi.rs"),
        include_str!("openai.rs"),
        include_str!("documents.rs"),
        include_str!("answers.rs"),
        include_str!("collections.rs"),
        include_str!("sources.rs"),
    ] {
        let start = source.find("pub(crate) fn routes()").unwrap();
        let end = start + source[start..].find("\n}\n").unwrap();
        routes_fns.push_str(&source[start..end]);
    }
    let mut served: Vec<(String, String)> = Vec::new();
    for call in routes_fns.split(".route(\"").skip(1) {
        let path = call.split('"').next().unwrap().to_string();
        for (needle, method) in [("get(", "get"), ("post(", "post"), ("delete(", "delete")] {
            if call.contains(needle) {
                served.push((path.clone(), method.to_string()));
            }
        }
    }
    // The document routes again under `/collections/{collection}` (nested).
    let nested: Vec<(String, String)> = served
        .iter()
        .filter(|(path, _)| crate::collections::SCOPED_PATHS.contains(&path.as_str()))
        .map(|(path, method)| (format!("/collections/{{collection}}{path}"), method.clone()))
        .collect();
    served.extend(nested);
    served.sort();
    served.dedup();
    assert!(served.len() >= 24, "{served:?}");
    let doc = serde_json::to_value(openapi()).unwrap();
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((path.clone(), method.clone()));
        }
    }
    served.sort();
    documented.sort();
    assert_eq!(served, documented);
    // Every documented route answers on the router (not 404 or 405).
    for (path, method) in &documented {
        let uri = path
            .replace("{id}", "some-id")
            .replace("{collection}", "some-collection");
        let (status, _) = status_with(unloaded(1 << 20), &method.to_uppercase(), &uri, None).await;
        assert!(
            status != StatusCode::NOT_FOUND || path.contains("{id}"),
            "{method} {path}: {status}"
        );
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
    }
    // The schemas the bodies refer to are in the document.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "AskRequest",
        "AskResponse",
        "Source",
        "Grounding",
        "SearchResponse",
        "IngestRequest",
        "ErrorBody",
        "ChatRequest",
    ] {
        assert!(schemas.contains_key(name), "{name} missing");
    }
}

/// `/openapi.json` states this server's configured limits on `max_tokens`
/// and `top_k`, not the defaults' (a generated client or a contract tester
/// would otherwise send what the server refuses).
#[tokio::test]
async fn the_served_document_states_the_configured_limits() {
    let router = app(AppState {
        pipeline: Arc::new(OnceLock::new()),
        sources: Arc::new(OnceLock::new()),
        body_limit: 1 << 20,
        keys: Arc::new(crate::auth::Keys::default()),
        cors_origins: Vec::new(),
        request_timeout: std::time::Duration::from_secs(60),
        limits: crate::RequestLimits {
            max_tokens: 16,
            max_top_k: 7,
        },
    });
    let (status, doc) = call(router, "GET", "/openapi.json", "", false).await;
    assert_eq!(status, StatusCode::OK);
    let field = |schema: &str, name: &str| {
        let f = &doc["components"]["schemas"][schema]["properties"][name];
        (f["minimum"].as_u64(), f["maximum"].as_u64())
    };
    assert_eq!(field("AskRequest", "max_tokens"), (Some(1), Some(16)));
    assert_eq!(field("ChatRequest", "max_tokens"), (Some(1), Some(16)));
    assert_eq!(field("AskRequest", "top_k"), (Some(1), Some(7)));
    assert_eq!(field("SearchRequest", "top_k"), (Some(1), Some(100)));
    // The static document keeps the defaults.
    let doc = serde_json::to_value(openapi()).unwrap();
    let f = &doc["components"]["schemas"]["ChatRequest"]["properties"]["max_tokens"];
    assert_eq!(f["maximum"].as_u64(), Some(2048));
}

/// The document states what the layers answer and the bounds the handlers
/// enforce (what schemathesis found missing): the open routes need no key,
/// every other says 401, 408, 500 and 503, a body route 400, 413, 415 and
/// 422, a write route 403, /ingest 507; the request bounds are there.
#[test]
fn openapi_states_statuses_security_and_bounds() {
    let doc = serde_json::to_value(openapi()).unwrap();
    let op = |path: &str, method: &str| doc["paths"][path][method].clone();
    for (path, method) in [
        ("/", "get"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
    ] {
        assert_eq!(
            op(path, method)["security"],
            serde_json::json!([]),
            "{path}"
        );
    }
    let statuses = |path: &str, method: &str| -> Vec<String> {
        op(path, method)["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    let search = statuses("/search", "post");
    for s in [
        "200", "400", "401", "408", "413", "415", "422", "500", "503",
    ] {
        assert!(search.contains(&s.to_string()), "/search {s}: {search:?}");
    }
    assert!(!search.contains(&"403".to_string()), "{search:?}");
    let ingest = statuses("/ingest", "post");
    for s in ["403", "507"] {
        assert!(ingest.contains(&s.to_string()), "/ingest {s}: {ingest:?}");
    }
    let limit = op("/documents", "get")["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .cloned()
        .unwrap();
    assert_eq!(
        (&limit["schema"]["minimum"], &limit["schema"]["maximum"]),
        (&serde_json::json!(1), &serde_json::json!(1000)),
        "{limit}"
    );
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["IngestRequest"]["properties"]["documents"]["minItems"],
        1
    );
    assert_eq!(
        schemas["IngestRequest"]["properties"]["documents"]["uniqueItems"],
        true
    );
    assert_eq!(
        schemas["AskRequest"]["properties"]["question"]["minLength"],
        1
    );
    assert_eq!(
        schemas["SearchRequest"]["properties"]["top_k"]["maximum"],
        100
    );
    assert_eq!(schemas["AskRequest"]["properties"]["stop"]["maxItems"], 4);
    // The filter grammar: which keys, which values.
    for request in ["SearchRequest", "AskRequest"] {
        let filter = &schemas[request]["properties"]["filter"];
        assert_eq!(
            filter["propertyNames"]["pattern"], r"^(document_id|metadata\.[\s\S]+)$",
            "{request}: {filter}"
        );
        let forms = filter["additionalProperties"]["oneOf"].as_array().unwrap();
        assert_eq!(forms.len(), 2, "{filter}");
        assert_eq!(forms[1]["required"], serde_json::json!(["in"]));
        assert_eq!(forms[1]["properties"]["in"]["minItems"], 1);
        assert!(filter["description"].as_str().unwrap().contains("metadata"));
    }
}

/// f32 values keep their shortest form in JSON bodies (not the widened f64).
#[test]
fn f32_values_keep_their_digits() {
    let v = crate::json::to_value(&serde_json::json!(null)).unwrap();
    assert!(v.is_null());
    #[derive(serde::Serialize)]
    struct S {
        score: f32,
    }
    let v = crate::json::to_value(&S { score: 0.33 }).unwrap();
    assert_eq!(v.to_string(), r#"{"score":0.33}"#);
}

#[tokio::test]
async fn the_auth_matrix() {
    let r = guarded(&[]);
    let (s, h) = status_with(r.clone(), "POST", "/search", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(h.get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
    let (s, _) = status_with(r.clone(), "POST", "/search", Some("not-a-key-0123456789")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = status_with(r.clone(), "POST", "/ingest", Some(READ)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = status_with(r.clone(), "DELETE", "/documents/x", Some(READ)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    for (method, uri, key) in [
        ("POST", "/search", READ),
        ("GET", "/documents", READ),
        ("POST", "/ingest", WRITE),
        ("POST", "/search", WRITE),
        ("DELETE", "/documents/x", WRITE),
    ] {
        let (s, _) = status_with(r.clone(), method, uri, Some(key)).await;
        assert!(
            s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN,
            "{method} {uri}: {s}"
        );
    }
    for uri in ["/health", "/ready"] {
        let (s, _) = status_with(r.clone(), "GET", uri, None).await;
        assert!(s != StatusCode::UNAUTHORIZED, "{uri}: {s}");
    }
    // Collections: a collection key reaches its collections with its scope;
    // any other, `default` included, is "not found" (as one that does not
    // exist), never "forbidden"; only admin keys create and delete them.
    let passes = |s: StatusCode| {
        s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN && s != StatusCode::NOT_FOUND
    };
    for (method, uri, key) in [
        ("POST", "/collections/team-a/ingest", TEAM),
        ("DELETE", "/collections/team-a/documents/x", TEAM),
        ("POST", "/collections/team-b/ask", TEAM),
        ("POST", "/collections/team-b/v1/chat/completions", TEAM),
        ("GET", "/collections", TEAM),
        ("POST", "/v1/embeddings", TEAM),
        ("POST", "/collections/team-c/search", READ),
        ("POST", "/collections", ADMIN),
        ("DELETE", "/collections/team-a", ADMIN),
        ("POST", "/ingest", ADMIN),
        ("GET", "/metrics", READ),
        ("GET", "/sources", READ),
        ("POST", "/sources", ADMIN),
        ("POST", "/sources/x/sync", ADMIN),
    ] {
        let (s, _) = status_with(r.clone(), method, uri, Some(key)).await;
        assert!(passes(s), "{method} {uri}: {s}");
    }
    for (method, uri, key, want) in [
        (
            "POST",
            "/collections/team-b/ingest",
            TEAM,
            StatusCode::FORBIDDEN,
        ),
        (
            "POST",
            "/collections/team-c/search",
            TEAM,
            StatusCode::NOT_FOUND,
        ),
        ("POST", "/search", TEAM, StatusCode::NOT_FOUND),
        ("GET", "/documents/x", TEAM, StatusCode::NOT_FOUND),
        ("POST", "/v1/chat/completions", TEAM, StatusCode::NOT_FOUND),
        ("POST", "/collections", WRITE, StatusCode::FORBIDDEN),
        ("DELETE", "/collections/team-a", TEAM, StatusCode::FORBIDDEN),
        ("GET", "/metrics", TEAM, StatusCode::UNAUTHORIZED),
        // Sources read folders and fetch URLs: admins change them, and a
        // collection key does not even read them.
        ("POST", "/sources", WRITE, StatusCode::FORBIDDEN),
        ("DELETE", "/sources/x", WRITE, StatusCode::FORBIDDEN),
        ("POST", "/sources/x/sync", READ, StatusCode::FORBIDDEN),
        ("GET", "/sources", TEAM, StatusCode::FORBIDDEN),
    ] {
        let (s, _) = status_with(r.clone(), method, uri, Some(key)).await;
        assert_eq!(s, want, "{method} {uri}");
    }
    // The 404 for a collection out of reach says what one that does not
    // exist says.
    let (_, body) = call_with_key(r.clone(), "POST", "/collections/team-c/search", TEAM).await;
    assert_eq!(
        body["error"],
        "no collection \"team-c\" (create it with POST /collections)"
    );
    // Without keys nothing is asked for.
    let (s, _) = status_with(unloaded(1 << 20), "POST", "/search", None).await;
    assert_ne!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let preflight = |router: Router, origin: &'static str| async move {
        let req = axum::http::Request::builder()
            .method("OPTIONS")
            .uri("/ask")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .body(Body::empty())
            .unwrap();
        router
            .oneshot(req)
            .await
            .unwrap()
            .headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .cloned()
    };
    let r = guarded(&["https://intranet.example.org"]);
    assert_eq!(
        preflight(r.clone(), "https://intranet.example.org")
            .await
            .unwrap(),
        "https://intranet.example.org"
    );
    assert!(preflight(r, "https://evil.example.com").await.is_none());
    assert!(preflight(guarded(&[]), "https://intranet.example.org")
        .await
        .is_none());
}

async fn call(
    router: Router,
    method: &str,
    uri: &str,
    body: &str,
    json: bool,
) -> (StatusCode, serde_json::Value) {
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    if json {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let res = router
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn health_is_up_and_ready_is_503_while_loading() {
    let (s, body) = call(unloaded(1 << 20), "GET", "/health", "", false).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    let (s, body) = call(unloaded(1 << 20), "GET", "/ready", "", false).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["type"], "not_ready");
    let (s, body) = call(
        unloaded(1 << 20),
        "POST",
        "/ask",
        r#"{"question":"x"}"#,
        true,
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["type"], "not_ready");
}

/// An integer written as `3.0` is the integer (JSON has one number type);
/// `3.5` where an integer belongs is 422 naming the field.
#[tokio::test]
async fn integral_floats_are_integers() {
    for (body, want) in [
        // Past the body: the server is still loading.
        (
            r#"{"query":"x","top_k":3.0}"#,
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            r#"{"query":"x","top_k":3.5}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        // Unknown fields are still refused.
        (
            r#"{"query":"x","tok_k":3}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let (s, reply) = call(unloaded(1 << 20), "POST", "/search", body, true).await;
        assert_eq!(s, want, "{body}: {reply}");
        if body.contains("3.5") {
            assert!(
                reply["error"].as_str().unwrap().contains("top_k"),
                "{reply}"
            );
        }
    }
}

#[tokio::test]
async fn bad_bodies_get_json_errors_with_fitting_statuses() {
    let cases: &[(&str, &str, bool, StatusCode, &str)] = &[
        (
            "/ingest",
            "{not json",
            true,
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            "/ingest",
            r#"{"documents":[{"title":"no text"}]}"#,
            true,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/ingest",
            r#"{"documents":[{"text":"x","colour":"red"}]}"#,
            true,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/ingest",
            r#"{"documents":[{"text":42}]}"#,
            true,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/ask",
            r#"{}"#,
            true,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/ask",
            r#"{"question":"q","top_k":-1}"#,
            true,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "/ask",
            r#"{"question":"q"}"#,
            false,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ];
    for (uri, body, json, status, kind) in cases {
        let (s, b) = call(unloaded(1 << 20), "POST", uri, body, *json).await;
        assert_eq!(
            (s, b["type"].as_str()),
            (*status, Some(*kind)),
            "{uri} {body}: {b}"
        );
        assert!(b["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let big = format!(r#"{{"documents":[{{"text":"{}"}}]}}"#, "a".repeat(5000));
    let (s, b) = call(unloaded(2048), "POST", "/ingest", &big, true).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
    assert_eq!(b["type"], "payload_too_large");
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_errors() {
    let (s, b) = call(unloaded(1 << 20), "GET", "/nope", "", false).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (s, b) = call(unloaded(1 << 20), "GET", "/ask", "", false).await;
    assert_eq!(
        (s, b["type"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
}

/// The deadline middleware: a handler slower than the deadline is 408 with a
/// JSON error, unless it marked its request as a stream, which then finishes.
#[tokio::test]
async fn a_late_response_is_408_unless_the_handler_streams() {
    use crate::deadline::{limit, Deadline};
    use axum::routing::get;
    use axum::Extension;
    use std::time::Duration;

    async fn slow(Extension(s): Extension<Deadline>, uri: axum::http::Uri) -> &'static str {
        if uri.path() == "/stream" {
            s.lift();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        "finished"
    }
    let router = Router::new()
        .route("/json", get(slow))
        .route("/stream", get(slow))
        .layer(axum::middleware::from_fn_with_state(
            Duration::from_millis(50),
            limit,
        ));
    let get = |uri: &str| {
        axum::http::Request::builder()
            .uri(uri)
            .body(Body::empty())
            .unwrap()
    };
    let res = router.clone().oneshot(get("/json")).await.unwrap();
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["type"], "timeout", "{body}");
    let res = router.oneshot(get("/stream")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"finished");
}
