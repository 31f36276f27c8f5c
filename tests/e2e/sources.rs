//! Sources that stay fresh, end to end: a web site the test serves on
//! loopback and changes between syncs (a sitemap, a feed, pages that change,
//! vanish, fail, time out, redirect inward or grow too large), and a watched
//! folder whose files are created, edited, renamed and deleted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::*;

/// One page of the test site.
#[derive(Clone)]
struct Resp {
    status: u16,
    body: String,
    content_type: &'static str,
    delay: Duration,
    location: Option<String>,
}

fn html(title: &str, text: &str) -> Resp {
    Resp {
        status: 200,
        body: format!("<!doctype html><html><head><title>{title}</title></head><body><h1>{title}</h1><p>{text}</p></body></html>"),
        content_type: "text/html; charset=utf-8",
        delay: Duration::ZERO,
        location: None,
    }
}

fn xml(body: String) -> Resp {
    Resp {
        content_type: "application/xml",
        body,
        ..html("", "")
    }
}

fn failing(code: u16) -> Resp {
    Resp {
        status: code,
        ..html("", "")
    }
}

fn sitemap(base: &str, paths: &[&str]) -> Resp {
    let urls: String = paths
        .iter()
        .map(|p| format!("<url><loc>{base}{p}</loc></url>"))
        .collect();
    xml(format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{urls}</urlset>"#
    ))
}

/// The test site: its pages, and how often each was asked for and sent whole.
#[derive(Default)]
struct Site {
    pages: HashMap<String, Resp>,
    sent: HashMap<String, usize>,
}

type Shared = Arc<Mutex<Site>>;

async fn page(State(site): State<Shared>, headers: HeaderMap, uri: Uri) -> Response {
    let path = uri.path().to_string();
    let found = site.lock().unwrap().pages.get(&path).cloned();
    let Some(p) = found else {
        return (StatusCode::NOT_FOUND, "no such page").into_response();
    };
    if !p.delay.is_zero() {
        tokio::time::sleep(p.delay).await;
    }
    if let Some(to) = p.location {
        return (StatusCode::FOUND, [(header::LOCATION, to)]).into_response();
    }
    if p.status != 200 {
        return (StatusCode::from_u16(p.status).unwrap(), "broken").into_response();
    }
    let etag = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        p.body.hash(&mut h);
        format!("\"{:016x}\"", h.finish())
    };
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    *site.lock().unwrap().sent.entry(path).or_default() += 1;
    (
        [
            (header::CONTENT_TYPE, p.content_type.to_string()),
            (header::ETAG, etag),
        ],
        p.body,
    )
        .into_response()
}

/// Serves `site` on 127.0.0.1; its base URL.
async fn serve(site: Shared) -> String {
    let app = axum::Router::new().fallback(page).with_state(site);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://127.0.0.1:{port}")
}

fn set(site: &Shared, path: &str, r: Resp) {
    site.lock().unwrap().pages.insert(path.to_string(), r);
}

fn sent(site: &Shared, path: &str) -> usize {
    site.lock().unwrap().sent.get(path).copied().unwrap_or(0)
}

/// Syncs source `name` now; its report.
async fn sync(client: &reqwest::Client, base: &str, name: &str) -> Value {
    let (status, report) = post(client, &format!("{base}/sources/{name}/sync"), &json!({})).await;
    assert_eq!(status, 200, "{report}");
    report
}

/// Waits (at most 60 s) for the first sync of source `name` (started when it
/// was added); its report.
pub(super) async fn first_sync(client: &reqwest::Client, base: &str, name: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let info = get_json(client, &format!("{base}/sources/{name}")).await;
        if !info["last_sync"].is_null() {
            return info["last_sync"].clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("source {name} was not synced within 60 s of being added");
}

fn counts(report: &Value) -> [u64; 5] {
    ["created", "updated", "unchanged", "deleted", "failed"].map(|k| report[k].as_u64().unwrap())
}

async fn document_ids(client: &reqwest::Client, base: &str) -> Vec<String> {
    let page = get_json(client, &format!("{base}/documents?limit=1000")).await;
    page["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

fn encoded(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn document(client: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    let res = client
        .get(format!("{base}/documents/{}", encoded(id)))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

fn sources_config(data_dir: &std::path::Path) -> Config {
    let mut c = config(SMOLLM, data_dir);
    // The site is on loopback: this test's server may fetch from it (by
    // address; the name `localhost` stays refused).
    c.sources.allow_private_hosts = vec!["127.0.0.1".into()];
    c.sources.per_host_interval_ms = 0;
    c.sources.timeout_s = 2.0;
    c.sources.max_bytes = 64 * 1024;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sitemap_source_follows_changes_deletions_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let site = Shared::default();
    let web = serve(Arc::clone(&site)).await;
    set(
        &site,
        "/robots.txt",
        Resp {
            content_type: "text/plain",
            body: "User-agent: *\nDisallow: /private\n".into(),
            ..html("", "")
        },
    );
    set(&site, "/a", html("Lighthouse keeping", "The lighthouse on Skerry Point is lit every evening at dusk by the keeper, who winds the clockwork that turns the lens."));
    set(&site, "/b", html("Sourdough starter", "A sourdough starter is fed equal weights of flour and water every twelve hours and kept at room temperature."));
    set(&site, "/c", html("Beekeeping", "Honey bees cluster in winter and keep the queen warm by shivering their flight muscles."));
    set(&site, "/private", html("Secret", "Nothing for crawlers."));
    set(
        &site,
        "/sitemap.xml",
        sitemap(&web, &["/a", "/b", "/c", "/private"]),
    );
    let (server, base) = start_with(sources_config(dir.path())).await;
    let client = reqwest::Client::new();

    let (status, info) = post(
        &client,
        &format!("{base}/sources"),
        &json!({
            "name": "site", "url": format!("{web}/sitemap.xml"), "interval_s": 0
        }),
    )
    .await;
    assert_eq!(status, 201, "{info}");
    let first = first_sync(&client, &base, "site").await;
    assert_eq!(first["error"], Value::Null, "{first}");
    assert_eq!(first["kind"], "sitemap", "{first}");
    assert_eq!(first["listed"], 4, "{first}");
    assert_eq!(counts(&first), [3, 0, 0, 0, 1], "{first}");
    assert!(
        first["failures"][0]["error"]
            .as_str()
            .unwrap()
            .contains("robots.txt"),
        "{first}"
    );
    assert_eq!(sent(&site, "/private"), 0, "robots.txt is honoured");
    let embedded_first = first["embedded"].as_u64().unwrap();
    assert!(embedded_first >= 3, "{first}");
    let (a, b, c, d) = (
        format!("{web}/a"),
        format!("{web}/b"),
        format!("{web}/c"),
        format!("{web}/d"),
    );
    let mut ids = document_ids(&client, &base).await;
    ids.sort();
    assert_eq!(ids, [a.clone(), b.clone(), c.clone()]);
    let (_, doc_a) = document(&client, &base, &a).await;
    let meta = &doc_a["metadata"];
    assert_eq!(meta["ragd_source"], "site", "{doc_a}");
    assert_eq!(meta["source_url"], a.as_str(), "{doc_a}");
    let fetched_at = meta["fetched_at"].as_str().unwrap().to_string();
    assert!(
        fetched_at.ends_with('Z') && fetched_at.len() == 20,
        "{fetched_at}"
    );

    // Answers carry where their passages came from, and when.
    let answer = ask_json(
        &client,
        &base,
        "When is the lighthouse on Skerry Point lit?",
    )
    .await;
    let source = answer["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["document_id"] == a.as_str())
        .unwrap_or_else(|| panic!("the lighthouse page is a source: {answer}"));
    assert_eq!(source["source_url"], a.as_str(), "{source}");
    assert_eq!(source["fetched_at"], fetched_at.as_str(), "{source}");
    // "The latest": only what was fetched after a time.
    let search = |after: &'static str| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let (status, found) = post(
                &client,
                &format!("{base}/search"),
                &json!({
                    "query": "lighthouse keeper", "top_k": 5,
                    "filter": { "metadata.fetched_after": after }
                }),
            )
            .await;
            assert_eq!(status, 200, "{found}");
            found["results"].as_array().unwrap().len()
        }
    };
    assert!(search("2020-01-01").await >= 1);
    assert_eq!(search("2999-01-01T00:00:00+08:00").await, 0);

    // Nothing changed: every page answers 304, nothing is embedded.
    let sent_before: usize = ["/a", "/b", "/c"].iter().map(|p| sent(&site, p)).sum();
    let same = sync(&client, &base, "site").await;
    assert_eq!(counts(&same), [0, 0, 3, 0, 1], "{same}");
    assert_eq!(same["embedded"], 0, "{same}");
    let sent_after: usize = ["/a", "/b", "/c"].iter().map(|p| sent(&site, p)).sum();
    assert_eq!(
        sent_after, sent_before,
        "unchanged pages are not sent again"
    );

    // A page changes, one leaves the sitemap, one joins it.
    set(&site, "/b", html("Sourdough starter", "A sourdough starter is fed equal weights of rye flour and water every eight hours and kept in a cool larder."));
    set(
        &site,
        "/d",
        html(
            "Tide tables",
            "Spring tides follow the new and the full moon; neap tides follow the quarter moons.",
        ),
    );
    set(
        &site,
        "/sitemap.xml",
        sitemap(&web, &["/a", "/b", "/d", "/private"]),
    );
    let changed = sync(&client, &base, "site").await;
    assert_eq!(counts(&changed), [1, 1, 1, 1, 1], "{changed}");
    assert!(changed["embedded"].as_u64().unwrap() >= 2, "{changed}");
    assert!(
        changed["embedded"].as_u64().unwrap() < embedded_first + 2,
        "only the changed and new pages' chunks are embedded: {changed}"
    );
    assert_eq!(
        document(&client, &base, &c).await.0,
        404,
        "a page gone from the sitemap goes"
    );
    let (_, doc_b) = document(&client, &base, &b).await;
    assert_ne!(doc_b["metadata"]["content_hash"], Value::Null);
    assert!(document(&client, &base, &d).await.0 == 200);

    // A page that fails keeps its last good version.
    let hash_a = document(&client, &base, &a).await.1["metadata"]["content_hash"].clone();
    set(&site, "/a", failing(500));
    let broken = sync(&client, &base, "site").await;
    assert_eq!(counts(&broken), [0, 0, 2, 0, 2], "{broken}");
    let failures = broken["failures"].to_string();
    assert!(failures.contains("500"), "{broken}");
    let (status_a, kept) = document(&client, &base, &a).await;
    assert_eq!(
        (status_a, &kept["metadata"]["content_hash"]),
        (200, &hash_a)
    );

    // So does one that times out (sources.timeout_s = 2).
    set(
        &site,
        "/a",
        Resp {
            delay: Duration::from_secs(4),
            ..html("Lighthouse keeping", "A slow version.")
        },
    );
    let slow = sync(&client, &base, "site").await;
    assert_eq!(counts(&slow), [0, 0, 2, 0, 2], "{slow}");
    assert!(slow["failures"].to_string().contains("timed out"), "{slow}");
    assert_eq!(
        document(&client, &base, &a).await.1["metadata"]["content_hash"],
        hash_a
    );

    // A sitemap that cannot be read fails the sync and deletes nothing.
    set(&site, "/sitemap.xml", failing(503));
    let down = sync(&client, &base, "site").await;
    assert!(down["error"].as_str().unwrap().contains("503"), "{down}");
    assert_eq!(down["deleted"], 0, "{down}");
    assert_eq!(document_ids(&client, &base).await.len(), 3);
    let listed = get_json(&client, &format!("{base}/sources")).await;
    let s = &listed["sources"][0];
    assert_eq!(s["name"], "site");
    assert!(
        s["last_sync"]["error"].is_string(),
        "the failure is reported: {s}"
    );
    assert!(s["last_success_at"].is_string(), "{s}");

    // Removing the source removes its documents.
    let res = client
        .delete(format!("{base}/sources/site"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let removed: Value = res.json().await.unwrap();
    assert_eq!(removed["documents_deleted"], 3, "{removed}");
    assert!(document_ids(&client, &base).await.is_empty());
    let res = client
        .get(format!("{base}/sources/site"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetching_refuses_the_inside_network_oversized_pages_and_bad_sources() {
    let dir = tempfile::tempdir().unwrap();
    let site = Shared::default();
    let web = serve(Arc::clone(&site)).await;
    let port = web.rsplit(':').next().unwrap().to_string();
    // An RSS feed: one good entry, one redirecting to `localhost` (a name
    // that resolves inside the network, not in allow_private_hosts), one
    // too large.
    set(
        &site,
        "/feed.xml",
        xml(format!(
            r#"<?xml version="1.0"?><rss version="2.0"><channel><title>News</title><link>{web}/</link>
        <item><title>One</title><link>{web}/news/1</link></item>
        <item><title>Two</title><link>{web}/news/2</link></item>
        <item><title>Three</title><link>{web}/news/3</link></item>
        </channel></rss>"#
        )),
    );
    set(
        &site,
        "/news/1",
        html(
            "Harbour reopens",
            "The harbour reopened on Monday after the storm wall was repaired.",
        ),
    );
    set(
        &site,
        "/news/2",
        Resp {
            location: Some(format!("http://localhost:{port}/news/1")),
            ..html("", "")
        },
    );
    set(&site, "/news/3", html("Huge", &"word ".repeat(20_000)));
    let (server, base) = start_with(sources_config(dir.path())).await;
    let client = reqwest::Client::new();

    let (status, info) = post(
        &client,
        &format!("{base}/sources"),
        &json!({
            "name": "news", "url": format!("{web}/feed.xml"), "interval_s": 0
        }),
    )
    .await;
    assert_eq!(status, 201, "{info}");
    let report = first_sync(&client, &base, "news").await;
    assert_eq!(report["kind"], "feed", "{report}");
    assert_eq!(counts(&report), [1, 0, 0, 0, 2], "{report}");
    let failures = report["failures"].to_string();
    assert!(
        failures.contains("inside this network"),
        "a redirect inward is refused: {report}"
    );
    assert!(failures.contains("max_bytes"), "{report}");
    assert_eq!(
        document_ids(&client, &base).await,
        [format!("{web}/news/1")]
    );

    // Sources at addresses inside the network are refused before any request.
    for (name, url) in [
        ("by-name", format!("http://localhost:{port}/news/1")),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/".to_string(),
        ),
    ] {
        let (status, _) = post(
            &client,
            &format!("{base}/sources"),
            &json!({
                "name": name, "url": url, "interval_s": 0
            }),
        )
        .await;
        assert_eq!(status, 201);
        let r = first_sync(&client, &base, name).await;
        assert!(
            r["error"].as_str().unwrap().contains("inside this network"),
            "{r}"
        );
    }

    // Bad registrations are refused and change nothing.
    let folder = tempfile::tempdir().unwrap();
    for (body, why) in [
        (
            json!({ "name": "x y", "url": format!("{web}/feed.xml") }),
            "name",
        ),
        (json!({ "name": "x", "url": "ftp://example.org/" }), "http"),
        (json!({ "name": "x" }), "exactly one"),
        (
            json!({ "name": "x", "url": format!("{web}/feed.xml"), "watch": true }),
            "watch",
        ),
        (
            json!({ "name": "x", "path": folder.path() }),
            "folder_roots",
        ),
        (json!({ "name": "x", "path": "relative/dir" }), "absolute"),
        (
            json!({ "name": "x", "url": format!("{web}/feed.xml"), "collection": "nope" }),
            "nope",
        ),
        // A name is registered once (replacing would drop what it gave).
        (
            json!({ "name": "news", "url": format!("{web}/other.xml") }),
            "exists",
        ),
    ] {
        let (status, err) = post(&client, &format!("{base}/sources"), &body).await;
        assert_eq!(status, 422, "{body} → {err}");
        assert!(
            err["error"].as_str().unwrap().contains(why),
            "{body} → {err}"
        );
    }
    let listed = get_json(&client, &format!("{base}/sources")).await;
    assert_eq!(listed["sources"].as_array().unwrap().len(), 3, "{listed}");
    // Clients cannot write the key that says which source wrote a document
    // (only such documents are ever deleted by a sync).
    let (status, err) = post(
        &client,
        &format!("{base}/ingest"),
        &json!({ "documents": [
            { "id": "forged", "text": "x", "metadata": { "ragd_source": "news" } }
        ]}),
    )
    .await;
    assert_eq!(status, 422, "{err}");
    // An entry that leaves the feed is still a page: kept.
    set(
        &site,
        "/feed.xml",
        xml(format!(
            r#"<?xml version="1.0"?><rss version="2.0"><channel><title>News</title>
        <item><title>Three</title><link>{web}/news/3</link></item></channel></rss>"#
        )),
    );
    let later = sync(&client, &base, "news").await;
    assert_eq!(later["deleted"], 0, "{later}");
    assert_eq!(
        document_ids(&client, &base).await,
        [format!("{web}/news/1")]
    );
    let res = client
        .post(format!("{base}/sources/none/sync"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    server.shutdown().await.unwrap();
}

/// Polls `check` every 50 ms for at most `limit`; how long it took.
async fn within(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not reflected within {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_folder_follows_creates_edits_renames_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let roots = tempfile::tempdir().unwrap();
    let notes = roots.path().join("notes");
    std::fs::create_dir_all(notes.join("sub")).unwrap();
    std::fs::write(
        notes.join("a.md"),
        "# Kettles\n\nA kettle whistles when the water boils.\n",
    )
    .unwrap();
    std::fs::write(
        notes.join("sub/b.txt"),
        "Bicycle chains are oiled every two hundred kilometres.\n",
    )
    .unwrap();
    let mut c = sources_config(dir.path());
    c.sources.folder_roots = vec![roots.path().to_path_buf()];
    c.sources.watch_debounce_ms = 200;
    let (server, base) = start_with(c).await;
    let client = reqwest::Client::new();
    let (status, info) = post(
        &client,
        &format!("{base}/sources"),
        &json!({
            "name": "notes", "path": notes, "watch": true, "interval_s": 0
        }),
    )
    .await;
    assert_eq!(status, 201, "{info}");
    let first = first_sync(&client, &base, "notes").await;
    assert_eq!(counts(&first), [2, 0, 0, 0, 0], "{first}");
    let mut ids = document_ids(&client, &base).await;
    ids.sort();
    assert_eq!(ids, ["notes/a.md", "notes/sub/b.txt"]);
    // A summary's passages say where they were read, too.
    let (status, summary) = post(
        &client,
        &format!("{base}/summarize"),
        &json!({ "document_id": "notes/a.md" }),
    )
    .await;
    assert_eq!(status, 200, "{summary}");
    let url = summary["sources"][0]["source_url"]
        .as_str()
        .unwrap_or_default();
    assert!(
        url.starts_with("file://") && url.ends_with("/notes/a.md"),
        "{summary}"
    );

    // The stated delay: sources.watch_debounce_ms of quiet, then the sync
    // (one small file embedded): well within 10 s.
    let limit = Duration::from_secs(10);
    let has = |id: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        async move { document_ids(&client, &base).await.iter().any(|d| d == id) }
    };
    std::fs::write(notes.join("c.md"), "Copper pans are lined with tin.\n").unwrap();
    let created = within(limit, "a new file", async || has("notes/c.md").await).await;

    let hash_a = document(&client, &base, "notes/a.md").await.1["metadata"]["content_hash"].clone();
    std::fs::write(
        notes.join("a.md"),
        "# Kettles\n\nA kettle whistles when the water boils; descale it monthly.\n",
    )
    .unwrap();
    let edited = within(limit, "an edit", async || {
        document(&client, &base, "notes/a.md").await.1["metadata"]["content_hash"] != hash_a
    })
    .await;

    std::fs::rename(notes.join("sub/b.txt"), notes.join("sub/b2.txt")).unwrap();
    let renamed = within(limit, "a rename", async || {
        has("notes/sub/b2.txt").await && !has("notes/sub/b.txt").await
    })
    .await;

    std::fs::remove_file(notes.join("c.md")).unwrap();
    let deleted = within(limit, "a delete", async || !has("notes/c.md").await).await;
    println!(
        "watched folder, change reflected after: create {created:?}, edit {edited:?}, rename {renamed:?}, delete {deleted:?}"
    );

    // Synced again with nothing changed: nothing is read or embedded.
    let same = sync(&client, &base, "notes").await;
    assert_eq!(counts(&same), [0, 0, 2, 0, 0], "{same}");
    assert_eq!(same["embedded"], 0, "{same}");
    let _ = info;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_sources_come_and_go_with_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let folder = tempfile::tempdir().unwrap();
    std::fs::write(
        folder.path().join("tea.md"),
        "Green tea is steeped at eighty degrees.\n",
    )
    .unwrap();
    // A file whose name ingest refuses as an id fails alone.
    std::fs::write(
        folder.path().join("bad\u{1}name.md"),
        "A control character in the name.\n",
    )
    .unwrap();
    let declared = |c: &mut Config| {
        c.sources.declare = vec![ragd_sources::SourceSpec {
            name: "handbook".into(),
            url: None,
            path: Some(folder.path().display().to_string()),
            kind: ragd_sources::SourceKind::Auto,
            collection: None,
            interval_s: Some(0),
            watch: false,
        }];
    };
    // Declared: any folder (no folder_roots), synced once at start by the
    // schedule, and not removable or replaceable through the API.
    let mut c = sources_config(dir.path());
    c.sources.check_every_s = 0.1;
    declared(&mut c);
    let (server, base) = start_with(c).await;
    let client = reqwest::Client::new();
    let report = first_sync(&client, &base, "handbook").await;
    assert_eq!(counts(&report), [1, 0, 0, 0, 1], "{report}");
    assert!(
        report["failures"][0]["error"]
            .as_str()
            .unwrap()
            .contains("control"),
        "{report}"
    );
    let info = get_json(&client, &format!("{base}/sources/handbook")).await;
    assert_eq!(info["declared"], true, "{info}");
    let res = client
        .delete(format!("{base}/sources/handbook"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    let (status, _) = post(
        &client,
        &format!("{base}/sources"),
        &json!({
            "name": "handbook", "url": "https://example.org/"
        }),
    )
    .await;
    assert_eq!(status, 422);
    server.shutdown().await.unwrap();

    // Gone from the file: no longer a source; its documents stay.
    let (server, base) = start_with(sources_config(dir.path())).await;
    let listed = get_json(&client, &format!("{base}/sources")).await;
    assert_eq!(listed["sources"], json!([]), "{listed}");
    assert_eq!(document_ids(&client, &base).await, ["handbook/tea.md"]);
    server.shutdown().await.unwrap();
}
