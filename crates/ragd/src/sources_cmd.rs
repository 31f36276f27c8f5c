//! `ragd sources add|list|sync|remove`: the sources of a running server
//! (`/sources`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// What `ragd sources add` registers.
#[derive(Debug, Clone)]
pub(crate) struct Add {
    pub name: Option<String>,
    pub location: String,
    pub kind: Option<String>,
    pub collection: Option<String>,
    pub interval_s: Option<u64>,
    pub watch: bool,
}

async fn call(
    url: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    api_key: Option<String>,
) -> Result<Value> {
    let client = reqwest::Client::new();
    let mut req = client.request(method, format!("{}{path}", url.trim_end_matches('/')));
    if let Some(b) = body {
        req = req.json(&b);
    }
    if let Some(k) = api_key.filter(|k| !k.is_empty()) {
        req = req.bearer_auth(k);
    }
    let res = req
        .send()
        .await
        .with_context(|| format!("cannot reach ragd at {url} (is `ragd serve` running?)"))?;
    let status = res.status();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "{status}: {}",
            body["error"].as_str().unwrap_or("request failed")
        );
    }
    Ok(body)
}

/// A name from a folder's last part or a URL's host (what a user would type).
fn default_name(location: &str) -> String {
    let raw = match url::Url::parse(location) {
        Ok(u) if u.host_str().is_some() => u.host_str().unwrap_or("source").to_string(),
        _ => Path::new(location)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "source".into()),
    };
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        "source".into()
    } else {
        name
    }
}

/// `ragd sources add`.
pub(crate) async fn add(url: &str, add: Add, api_key: Option<String>) -> Result<()> {
    let is_url = add.location.starts_with("http://") || add.location.starts_with("https://");
    let (web, folder) = if is_url {
        (Some(add.location.clone()), None)
    } else {
        // The server reads the folder: send it as an absolute path.
        let abs = std::fs::canonicalize(&add.location)
            .with_context(|| format!("{}: no such folder", add.location))?;
        (None, Some(abs.to_string_lossy().into_owned()))
    };
    let name = add.name.unwrap_or_else(|| default_name(&add.location));
    let body = json!({
        "name": name,
        "url": web,
        "path": folder,
        "kind": add.kind.unwrap_or_else(|| "auto".into()),
        "collection": add.collection,
        "interval_s": add.interval_s,
        "watch": add.watch,
    });
    let info = call(url, reqwest::Method::POST, "/sources", Some(body), api_key).await?;
    println!(
        "source {} registered; its first sync has started (see `ragd sources list`)",
        info["name"].as_str().unwrap_or(&name)
    );
    Ok(())
}

fn print_report(r: &Value) {
    if r.is_null() {
        println!("    never synced");
        return;
    }
    println!(
        "    {} ({:.1} s): {} listed, {} created, {} updated, {} unchanged, {} deleted, {} failed; {} chunks embedded",
        r["finished_at"].as_str().unwrap_or("?"),
        r["seconds"].as_f64().unwrap_or(0.0),
        r["listed"], r["created"], r["updated"], r["unchanged"], r["deleted"], r["failed"], r["embedded"],
    );
    if let Some(e) = r["error"].as_str() {
        println!("    FAILED, documents kept: {e}");
    }
    for f in r["failures"].as_array().into_iter().flatten() {
        println!(
            "    - {}: {}",
            f["item"].as_str().unwrap_or("?"),
            f["error"].as_str().unwrap_or("?")
        );
    }
}

/// `ragd sources list`.
pub(crate) async fn list(url: &str, api_key: Option<String>) -> Result<()> {
    let body = call(url, reqwest::Method::GET, "/sources", None, api_key).await?;
    let sources = body["sources"].as_array().cloned().unwrap_or_default();
    if sources.is_empty() {
        println!("no sources (add one with `ragd sources add PATH|URL`)");
    }
    for s in sources {
        println!(
            "{} — {} → {}{}{}",
            s["name"].as_str().unwrap_or("?"),
            s["url"].as_str().or(s["path"].as_str()).unwrap_or("?"),
            s["collection"].as_str().unwrap_or("default"),
            if s["watch"] == true { ", watched" } else { "" },
            if s["syncing"] == true {
                ", syncing now"
            } else {
                ""
            },
        );
        print_report(&s["last_sync"]);
    }
    Ok(())
}

/// `ragd sources sync NAME`: waits for the sync and prints its report.
pub(crate) async fn sync(url: &str, name: &str, api_key: Option<String>) -> Result<bool> {
    let path = format!("/sources/{}/sync", urlencode(name));
    let report = call(url, reqwest::Method::POST, &path, None, api_key).await?;
    println!("{name}:");
    print_report(&report);
    Ok(report["error"].is_null())
}

/// `ragd sources remove NAME`.
pub(crate) async fn remove(
    url: &str,
    name: &str,
    keep_documents: bool,
    api_key: Option<String>,
) -> Result<()> {
    let path = format!(
        "/sources/{}?keep_documents={keep_documents}",
        urlencode(name)
    );
    let body = call(url, reqwest::Method::DELETE, &path, None, api_key).await?;
    println!(
        "source {name} removed; {} documents deleted",
        body["documents_deleted"]
    );
    Ok(())
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_come_from_the_host_or_the_folder() {
        assert_eq!(
            default_name("https://blog.example.org/feed.xml"),
            "blog.example.org"
        );
        assert_eq!(default_name("/srv/team docs"), "team-docs");
        assert_eq!(default_name("/"), "source");
    }
}
