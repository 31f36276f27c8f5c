//! `[sources]`: how sources are fetched and when they are synced.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::SourceSpec;

/// `[sources]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    /// Sync sources on their schedule from this server. With several
    /// replicas on one database, let one of them do it.
    pub schedule: bool,
    /// Seconds between syncs of a source that does not say (0: only on demand).
    pub default_interval_s: u64,
    /// How often the schedule looks for sources due, in seconds.
    pub check_every_s: f64,
    /// Quiet time after a change in a watched folder before it is synced.
    pub watch_debounce_ms: u64,
    /// Folders under which sources registered through the API may lie
    /// (empty: none may; sources in the configuration file may be anywhere).
    pub folder_roots: Vec<PathBuf>,
    /// Hosts (names or addresses, as in the URL) that may resolve to
    /// loopback, private or link-local addresses. Every other fetch, and
    /// every redirect, to such an address is refused.
    pub allow_private_hosts: Vec<String>,
    /// The User-Agent of every request, and the name robots.txt rules are
    /// matched against.
    pub user_agent: String,
    /// Longest time for one request, in seconds (connecting included).
    pub timeout_s: f64,
    /// Largest page or file read, in bytes; larger ones fail (and keep their
    /// last good version).
    pub max_bytes: usize,
    /// Least time between two requests to one host, in milliseconds (a
    /// robots.txt `Crawl-delay` that asks for more wins).
    pub per_host_interval_ms: u64,
    /// Most pages a sitemap or feed source takes (the first ones listed), and
    /// most files a folder source takes.
    pub max_documents: usize,
    /// Most redirects followed for one request.
    pub max_redirects: usize,
    /// Sources registered from the configuration file: `[[sources.declare]]`.
    #[serde(default)]
    pub declare: Vec<SourceSpec>,
}

impl Default for SourcesConfig {
    fn default() -> Self {
        SourcesConfig {
            schedule: true,
            default_interval_s: 3600,
            check_every_s: 5.0,
            watch_debounce_ms: 500,
            folder_roots: Vec::new(),
            allow_private_hosts: Vec::new(),
            user_agent: "ragd".into(),
            timeout_s: 30.0,
            max_bytes: 10 << 20,
            per_host_interval_ms: 500,
            max_documents: 10_000,
            max_redirects: 5,
            declare: Vec::new(),
        }
    }
}
