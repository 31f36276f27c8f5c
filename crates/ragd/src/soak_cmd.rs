//! `ragd bench soak`: a `ragd serve` child under mixed concurrent load for a
//! bounded time and request count, on loopback; then a check that nothing
//! acknowledged was lost.
//!
//! Documents go to three collections (`default` through today's routes,
//! `soak-a` and `soak-b` under `/collections/NAME/`). Each client owns its
//! documents (ids `c{client}-{n}`, each in one collection), so its own
//! ingest, update and delete of one id happen in order and the acknowledged
//! state of every id is known exactly; searches and questions go to a
//! collection at random, and every search result must be a document of the
//! collection searched (a result from another is a leak, and fails the run).
//! Now and then a client creates a collection, ingests into it and deletes
//! it. Questions are JSON, streamed (SSE) to the end, or streamed and dropped
//! after the first token (a client that goes away mid-answer). At the end
//! every acknowledged document must be there with the acknowledged version
//! (metadata `version`, text length, chunk count) and every acknowledged
//! delete gone; an id whose last request got no answer is left out of the
//! check (either state is right) and counted; each collection's document
//! count must lie between what is surely there and what may be.
//!
//! Pass: no 5xx but 503 while starting, resident memory at the end within
//! `--memory-growth` of the start's, nothing lost, nothing leaked across
//! collections; the command exits non-zero otherwise.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The load.
#[derive(Debug, Clone)]
pub(crate) struct Soak {
    pub minutes: f64,
    pub clients: usize,
    pub max_requests: usize,
    pub config: Option<PathBuf>,
    pub seed: u64,
    /// Allowed growth of resident memory from ready to the end, as a share
    /// of the start's (0.5 = 50 %).
    pub memory_growth: f64,
}

/// The collections documents go to (`default` first, served by today's
/// routes too).
const COLLECTIONS: [&str; 3] = ["default", "soak-a", "soak-b"];

/// The path prefix of `collection`'s routes.
fn prefix(collection: &str) -> String {
    if collection == "default" {
        String::new()
    } else {
        format!("/collections/{collection}")
    }
}

/// A document: (collection, id).
type DocKey = (String, String);

/// What the client last had acknowledged for one of its ids.
#[derive(Debug, Clone, PartialEq)]
enum Known {
    Present {
        version: u64,
        bytes: usize,
        chunks: u64,
    },
    Deleted,
    /// The last request got no answer: either state may be right.
    Uncertain,
}

#[derive(Default)]
struct Tally {
    /// Requests by operation and status (`error` when no status came back).
    by_status: BTreeMap<(String, String), usize>,
    /// Latencies in ms by operation.
    latency: BTreeMap<String, Vec<f64>>,
    requests: usize,
    /// Search results from a collection other than the one searched.
    leaks: Vec<String>,
}

impl Tally {
    fn record(&mut self, op: &str, status: &str, ms: f64) {
        *self
            .by_status
            .entry((op.to_string(), status.to_string()))
            .or_default() += 1;
        self.latency.entry(op.to_string()).or_default().push(ms);
    }
}

/// Resident memory of `pid` in MB (`VmRSS`), where /proc has it.
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Texts to ingest: a few sentences on a topic picked by `n`, with the id in
/// it so that a search can find this very document.
fn text_for(id: &str, version: u64, rng: &mut impl Rng) -> String {
    const TOPICS: &[&str] = &[
        "Lighthouses guide ships past rocks at night with rotating lamps.",
        "Sourdough starters need flour and water every day to stay active.",
        "Honey bees swarm in late spring when the colony grows too large.",
        "Glaciers carve valleys as they move slowly downhill over centuries.",
        "Bicycle chains should be cleaned and oiled every few hundred kilometres.",
        "Tomatoes grow best in full sun with regular deep watering.",
        "Owls hunt at night and locate prey by sound alone.",
        "Rust's borrow checker enforces ownership rules at compile time.",
    ];
    let sentences = rng.random_range(2..40);
    let mut text = format!("Record {id}, version {version}. ");
    for _ in 0..sentences {
        text.push_str(TOPICS[rng.random_range(0..TOPICS.len())]);
        text.push(' ');
    }
    text
}

/// Starts `ragd serve` on a free loopback port over `data`; returns the child
/// and its base URL.
fn start_server(config: Option<&Path>, data: &Path) -> Result<(std::process::Child, String)> {
    use std::io::{BufRead, BufReader};
    let exe = std::env::current_exe().context("finding the ragd binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["serve", "--host", "127.0.0.1", "--port", "0", "--data-dir"])
        .arg(data)
        .env("RAGD_LOG", "warn,ragd=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let mut child = cmd.spawn().context("starting ragd serve")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let Some(line) = lines.next() else {
            bail!("ragd serve stopped before it listened");
        };
        let line = line?;
        if let Some(at) = line.find("listening addr=") {
            break line[at + "listening addr=".len()..].trim().to_string();
        }
    };
    // Keep reading so the child never blocks on a full pipe; its warnings
    // and errors are shown.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            // (Not /ready's 503 while the models load: expected, and counted.)
            if (line.contains("WARN") || line.contains("ERROR")) && !line.contains("uri=/ready") {
                eprintln!("server: {line}");
            }
        }
    });
    Ok((child, format!("http://{addr}")))
}

pub(crate) async fn run(s: Soak) -> Result<()> {
    anyhow::ensure!(s.clients >= 1, "--clients must be at least 1");
    anyhow::ensure!(
        s.minutes > 0.0 && s.minutes <= 24.0 * 60.0,
        "--minutes must be in (0, 1440]"
    );
    let data = tempfile::tempdir().context("a temporary data directory")?;
    let started = Instant::now();
    let (mut child, base) = start_server(s.config.as_deref(), data.path())?;
    let pid = child.id();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    // Which collection each id went to (ids are unique across them), for the
    // leak check of every search.
    let owners: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    // 503 while the models load is expected; it is counted apart.
    let mut not_ready = 0usize;
    loop {
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            bail!("ragd did not become ready in 300 s");
        }
        match client.get(format!("{base}/ready")).send().await {
            Ok(r) if r.status() == 200 => break,
            Ok(r) if r.status() == 503 => not_ready += 1,
            Ok(r) => bail!("/ready answered {}", r.status()),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready_in = started.elapsed().as_secs_f64();
    for name in &COLLECTIONS[1..] {
        let r = client
            .post(format!("{base}/collections"))
            .json(&json!({ "name": name }))
            .send()
            .await?;
        if r.status() != 200 {
            let _ = child.kill();
            bail!("creating collection {name}: {}", r.status());
        }
    }
    let rss_start = rss_mb(pid);
    println!(
        "soak: ragd ready in {ready_in:.1} s (pid {pid}, resident {}); {} clients for {} min or {} requests",
        rss_start.map_or("?".into(), |m| format!("{m:.0} MB")),
        s.clients,
        s.minutes,
        s.max_requests
    );

    let deadline = Instant::now() + Duration::from_secs_f64(s.minutes * 60.0);
    let budget = Arc::new(std::sync::atomic::AtomicUsize::new(s.max_requests));
    let peak = Arc::new(Mutex::new(rss_start.unwrap_or(0.0)));
    let sampler = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            while Instant::now() < deadline {
                if let Some(m) = rss_mb(pid) {
                    let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                    *p = p.max(m);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for c in 0..s.clients {
        let shared = Shared {
            client: client.clone(),
            base: base.clone(),
            tally: Arc::clone(&tally),
            budget: Arc::clone(&budget),
            owners: Arc::clone(&owners),
            deadline,
        };
        let seed = s.seed.wrapping_add(c as u64);
        tasks.push(tokio::spawn(
            async move { one_client(c, seed, shared).await },
        ));
    }
    let mut known: HashMap<DocKey, Known> = HashMap::new();
    for t in tasks {
        known.extend(t.await.context("a client task failed")?);
    }
    sampler.abort();
    let elapsed = started.elapsed().as_secs_f64() - ready_in;
    let rss_end = rss_mb(pid);

    // The check: every acknowledged state, as the server now reports it.
    let (mut whole, mut gone, mut uncertain, mut lost) = (0usize, 0usize, 0usize, Vec::new());
    for ((collection, id), k) in &known {
        let res = client
            .get(format!("{base}{}/documents/{id}", prefix(collection)))
            .send()
            .await?;
        let status = res.status().as_u16();
        let doc: Value = res.json().await.unwrap_or(Value::Null);
        match k {
            Known::Uncertain => uncertain += 1,
            Known::Deleted if status == 404 => gone += 1,
            Known::Present {
                version,
                bytes,
                chunks,
            } if status == 200
                && doc["metadata"]["version"].as_u64() == Some(*version)
                && doc["text_bytes"].as_u64() == Some(*bytes as u64)
                && doc["chunks"].as_u64() == Some(*chunks) =>
            {
                whole += 1
            }
            _ => lost.push(format!(
                "{collection}/{id}: acknowledged {k:?}, now {status} {doc}"
            )),
        }
    }
    // Each collection's count: at least what is surely there, at most that
    // and what may be.
    let listed: Value = client
        .get(format!("{base}/collections"))
        .send()
        .await?
        .json()
        .await?;
    let mut miscounted = Vec::new();
    for name in COLLECTIONS {
        let count =
            |f: fn(&Known) -> bool| known.iter().filter(|((c, _), k)| c == name && f(k)).count();
        let surely = count(|k| matches!(k, Known::Present { .. }));
        let maybe = count(|k| matches!(k, Known::Uncertain));
        let reported = listed["collections"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .and_then(|c| c["documents"].as_u64());
        println!(
            "collection {name}: {reported:?} documents ({surely} acknowledged, {maybe} unanswered)"
        );
        if !reported.is_some_and(|n| (surely..=surely + maybe).contains(&(n as usize))) {
            miscounted.push(format!(
                "{name} reports {reported:?} documents, {surely} acknowledged, {maybe} unanswered"
            ));
        }
    }
    let _ = child.kill();
    let _ = child.wait();

    let tally = tally.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "{} requests in {elapsed:.0} s ({:.1}/s); 503 before ready: {not_ready}",
        tally.requests,
        tally.requests as f64 / elapsed.max(1e-9)
    );
    println!("requests by status:");
    let (mut server_errors, mut kept) = (0, 0);
    for ((op, status), n) in &tally.by_status {
        println!("  {op:<14} {status:<6} {n}");
        if status.starts_with('5') {
            server_errors += n;
        }
        if status.starts_with("kept") {
            kept += n;
        }
    }
    println!("latency, ms (p50 / p95 / p99 / max):");
    for (op, l) in tally.latency.iter() {
        let mut l = l.clone();
        l.sort_by(f64::total_cmp);
        println!(
            "  {op:<14} {:>8.1} {:>8.1} {:>8.1} {:>8.1}  ({} requests)",
            percentile(&l, 0.5),
            percentile(&l, 0.95),
            percentile(&l, 0.99),
            l.last().copied().unwrap_or(f64::NAN),
            l.len()
        );
    }
    let peak = *peak.lock().unwrap_or_else(|e| e.into_inner());
    let fmt = |m: Option<f64>| m.map_or("?".into(), |m| format!("{m:.0} MB"));
    println!(
        "resident memory: {} at ready, {} at the end, peak {peak:.0} MB",
        fmt(rss_start),
        fmt(rss_end)
    );
    println!(
        "documents checked: {} ({whole} whole, {gone} deleted and gone, {uncertain} unanswered and left out), {} lost or wrong",
        known.len(),
        lost.len()
    );
    let mut failures = Vec::new();
    for l in lost.iter().take(10) {
        eprintln!("lost: {l}");
    }
    if !lost.is_empty() {
        failures.push(format!("{} documents lost or wrong", lost.len()));
    }
    if server_errors > 0 {
        failures.push(format!("{server_errors} server errors"));
    }
    if kept > 0 {
        failures.push(format!(
            "{kept} documents still served after their collection was deleted"
        ));
    }
    println!(
        "search results from another collection: {}",
        tally.leaks.len()
    );
    for l in tally.leaks.iter().take(10) {
        eprintln!("leak: {l}");
    }
    if !tally.leaks.is_empty() {
        failures.push(format!(
            "{} results leaked across collections",
            tally.leaks.len()
        ));
    }
    failures.extend(miscounted);
    if let (Some(a), Some(b)) = (rss_start, rss_end) {
        if b > a * (1.0 + s.memory_growth) {
            failures.push(format!(
                "resident memory grew from {a:.0} to {b:.0} MB (more than {:.0} %)",
                s.memory_growth * 100.0
            ));
        }
    }
    if failures.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        bail!("soak: FAIL: {}", failures.join("; "))
    }
}

/// What every client shares.
struct Shared {
    client: reqwest::Client,
    base: String,
    tally: Arc<Mutex<Tally>>,
    budget: Arc<std::sync::atomic::AtomicUsize>,
    owners: Arc<Mutex<HashMap<String, String>>>,
    deadline: Instant,
}

/// One client's loop until the deadline or the shared request budget runs
/// out; returns the acknowledged state of its documents.
async fn one_client(c: usize, seed: u64, shared: Shared) -> HashMap<DocKey, Known> {
    let Shared {
        client,
        base,
        tally,
        budget,
        owners,
        deadline,
    } = shared;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut known: HashMap<DocKey, Known> = HashMap::new();
    let mut versions: HashMap<DocKey, u64> = HashMap::new();
    let mut next_id = 0usize;
    let take = || {
        budget
            .fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |b| b.checked_sub(1),
            )
            .is_ok()
    };
    while Instant::now() < deadline && take() {
        let ids: Vec<DocKey> = known
            .iter()
            .filter(|(_, k)| matches!(k, Known::Present { .. }))
            .map(|(key, _)| key.clone())
            .collect();
        // Where searches and questions go.
        let searched = COLLECTIONS[rng.random_range(0..COLLECTIONS.len())];
        let roll = rng.random_range(0..100);
        let t0 = Instant::now();
        let (op, status) = match roll {
            // Ingest a new document, or update one of ours.
            0..=39 => {
                let (op, key) = if roll < 28 || ids.is_empty() {
                    next_id += 1;
                    let id = format!("c{c}-{next_id}");
                    let collection = COLLECTIONS[rng.random_range(0..COLLECTIONS.len())];
                    owners
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id.clone(), collection.to_string());
                    ("ingest", (collection.to_string(), id))
                } else {
                    ("update", ids[rng.random_range(0..ids.len())].clone())
                };
                let version = versions.get(&key).copied().unwrap_or(0) + 1;
                versions.insert(key.clone(), version);
                let (collection, id) = &key;
                let text = text_for(id, version, &mut rng);
                let body = json!({ "documents": [{
                    "id": id, "text": text, "metadata": { "version": version }
                }]});
                match client
                    .post(format!("{base}{}/ingest", prefix(collection)))
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        let d = &v["documents"][0];
                        let state = match (status, d["status"].as_str()) {
                            (200, Some("created" | "updated" | "unchanged")) => Known::Present {
                                version,
                                bytes: text.len(),
                                chunks: d["chunks"].as_u64().unwrap_or(0),
                            },
                            // Refused before anything was stored, or failed
                            // alone: the previous state holds.
                            (200 | 400 | 401 | 403 | 413 | 415 | 422 | 429, _) => {
                                known.get(&key).cloned().unwrap_or(Known::Deleted)
                            }
                            // A timeout (408) or a server error: the write may
                            // or may not have happened.
                            _ => Known::Uncertain,
                        };
                        known.insert(key, state);
                        (op, status.to_string())
                    }
                    Err(_) => {
                        known.insert(key, Known::Uncertain);
                        (op, "error".to_string())
                    }
                }
            }
            40..=47 if !ids.is_empty() => {
                let key = ids[rng.random_range(0..ids.len())].clone();
                let url = format!("{base}{}/documents/{}", prefix(&key.0), key.1);
                match client.delete(url).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        if status == 200 {
                            known.insert(key, Known::Deleted);
                        } else if status >= 500 {
                            known.insert(key, Known::Uncertain);
                        }
                        ("delete", status.to_string())
                    }
                    Err(_) => {
                        known.insert(key, Known::Uncertain);
                        ("delete", "error".to_string())
                    }
                }
            }
            40..=84 => {
                let mode = ["hybrid", "dense", "lexical"][rng.random_range(0..3)];
                let body =
                    json!({ "query": "Which birds hunt at night?", "top_k": 5, "mode": mode });
                let r = client
                    .post(format!("{base}{}/search", prefix(searched)))
                    .json(&body)
                    .send()
                    .await;
                match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        let owners = owners.lock().unwrap_or_else(|e| e.into_inner());
                        let results = v["results"].as_array().cloned().unwrap_or_default();
                        for hit in results {
                            let id = hit["document_id"].as_str().unwrap_or("");
                            let owner = owners.get(id).map(String::as_str);
                            if owner != Some(searched) {
                                tally
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .leaks
                                    .push(format!("{id} (of {owner:?}) found in {searched}"));
                            }
                        }
                        ("search", status.to_string())
                    }
                    Err(_) => ("search", "error".to_string()),
                }
            }
            85..=90 => {
                let body = json!({ "question": "How do owls find their prey?", "max_tokens": 24 });
                let r = client
                    .post(format!("{base}{}/ask", prefix(searched)))
                    .json(&body)
                    .send()
                    .await;
                ("ask", status_of(r).await)
            }
            91..=97 => {
                // Streamed; a third of them go away after the first event.
                let drop_early = rng.random_range(0..3) == 0;
                let body = json!({ "question": "What do sourdough starters need?", "max_tokens": 24, "stream": true });
                let op = if drop_early {
                    "ask-sse-drop"
                } else {
                    "ask-sse"
                };
                let url = format!("{base}{}/ask", prefix(searched));
                match client.post(url).json(&body).send().await {
                    Ok(mut r) => {
                        let status = r.status().as_u16();
                        if drop_early {
                            let _ = r.chunk().await;
                            drop(r);
                        } else {
                            while let Ok(Some(_)) = r.chunk().await {}
                        }
                        (op, status.to_string())
                    }
                    Err(_) => (op, "error".to_string()),
                }
            }
            _ => {
                // A collection made, written, searched and deleted; its
                // document must go with it.
                next_id += 1;
                let name = format!("tmp-c{c}-{next_id}");
                let status = collection_churn(&client, &base, &name).await;
                ("collection", status)
            }
        };
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
        t.requests += 1;
        t.record(op, &status, ms);
    }
    known
}

/// Creates collection `name`, ingests a document into it, searches it,
/// deletes it and checks that the document went too; the first status that
/// is not 200 (or 404 for the document after), or `ok`.
async fn collection_churn(client: &reqwest::Client, base: &str, name: &str) -> String {
    let steps = [
        (
            "POST",
            format!("{base}/collections"),
            json!({ "name": name }),
        ),
        (
            "POST",
            format!("{base}/collections/{name}/ingest"),
            json!({ "documents": [{ "id": "only", "text": "Owls hunt at night by sound." }] }),
        ),
        (
            "POST",
            format!("{base}/collections/{name}/search"),
            json!({ "query": "owls", "top_k": 3 }),
        ),
        ("DELETE", format!("{base}/collections/{name}"), Value::Null),
    ];
    for (method, url, body) in steps {
        let request = if method == "POST" {
            client.post(url).json(&body)
        } else {
            client.delete(url)
        };
        match request.send().await {
            Ok(r) if r.status() == 200 => {
                let _ = r.bytes().await;
            }
            Ok(r) => return r.status().as_u16().to_string(),
            Err(_) => return "error".to_string(),
        }
    }
    match client
        .get(format!("{base}/collections/{name}/documents/only"))
        .send()
        .await
    {
        Ok(r) if r.status() == 404 => "ok".to_string(),
        Ok(r) => format!("kept-{}", r.status().as_u16()),
        Err(_) => "error".to_string(),
    }
}

async fn status_of(r: reqwest::Result<reqwest::Response>) -> String {
    match r {
        Ok(r) => {
            let s = r.status().as_u16();
            let _ = r.bytes().await;
            s.to_string()
        }
        Err(_) => "error".to_string(),
    }
}
