//! Sources that stay fresh. A *source* is a folder, or a URL (a page, a
//! sitemap or an RSS/Atom feed), registered with ragd (`POST /sources`,
//! `ragd sources add`, or `[[sources.declare]]` in the configuration) and
//! re-synced into a collection: on a schedule (`interval_s`), on demand
//! (`POST /sources/{name}/sync`), and for folders with `watch` on every change
//! of a file (inotify, through `notify`).
//!
//! A sync ([`sync`]) lists what the source holds now, fetches only what
//! changed (ETag / Last-Modified for pages, modification time and size for
//! files, then a content hash), hands changed documents to the ingest flow
//! (which embeds only the chunks whose text changed) and deletes the
//! documents whose file or page is gone. A source that cannot be listed keeps
//! every document it had; a page or file that cannot be read keeps its last
//! good version. Each sync's counts are kept with the source
//! ([`SyncReport`]).
//!
//! Fetching ([`fetch`]) honours robots.txt, waits between requests to one
//! host, stops at a size limit and a timeout, and refuses addresses inside
//! the network ragd runs in (loopback, private, link-local…) unless the host
//! is listed in `sources.allow_private_hosts`: checked on every redirect and
//! at connection time, so a public name cannot redirect or resolve ragd into
//! the internal network (server-side request forgery).
//!
//! Documents from a source are ordinary documents of its collection. Their
//! metadata says where they came from: `source` (the source's name),
//! `source_url`, `fetched_at` (when this version was fetched, RFC 3339 UTC;
//! filter with `metadata.fetched_after`), `content_hash`, and the validators
//! of the next sync (`etag`, `last_modified` for pages; `modified_ns`, `size`
//! for files).

#![deny(missing_docs)]

pub mod config;
pub mod fetch;
pub mod listing;
pub mod sync;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ragd_core::DEFAULT_COLLECTION;
use ragd_pipeline::{Error, Pipeline};
use serde::{Deserialize, Serialize};

pub use config::SourcesConfig;
pub use sync::SyncReport;

/// Longest source name.
const MAX_NAME_LEN: usize = 64;

/// What a source is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Decided from what is there: a folder for `path`; for `url`, a sitemap
    /// or a feed when the document is one, else a page.
    #[default]
    Auto,
    /// A folder: every file ragd reads in it and below (hidden ones left out).
    Folder,
    /// One web page.
    Page,
    /// A sitemap (or sitemap index): each listed page.
    Sitemap,
    /// An RSS or Atom feed: each entry's page.
    Feed,
}

/// A source as registered: `POST /sources`, `[[sources.declare]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Its name: 1 to 64 letters, digits, `-`, `_` or `.`.
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._-]+$")
    )]
    pub name: String,
    /// An `http` or `https` URL (a page, a sitemap or a feed). Exactly one of
    /// `url` and `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A folder on the server (absolute). Through the API it must lie under
    /// one of `sources.folder_roots`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// How to read it (default: decided from what is there).
    #[serde(default)]
    pub kind: SourceKind,
    /// The collection its documents go to (default `default`; it must exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    /// Seconds between syncs; 0 syncs only on demand (and on changes, with
    /// `watch`). Default: `sources.default_interval_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<u64>,
    /// For folders: sync on every change of a file in it (after
    /// `sources.watch_debounce_ms` of quiet).
    #[serde(default)]
    pub watch: bool,
}

impl SourceSpec {
    /// The collection its documents go to.
    pub fn collection(&self) -> &str {
        self.collection.as_deref().unwrap_or(DEFAULT_COLLECTION)
    }
}

/// A source and its last sync: `GET /sources`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SourceInfo {
    /// What was registered.
    #[serde(flatten)]
    pub spec: SourceSpec,
    /// Whether it comes from the configuration file (it cannot be removed
    /// through the API; it is registered again at every start).
    pub declared: bool,
    /// The last sync, if any.
    pub last_sync: Option<SyncReport>,
    /// When the last sync that succeeded ended.
    pub last_success_at: Option<String>,
    /// Whether a sync is running now (on this server).
    #[serde(default)]
    pub syncing: bool,
}

/// What the store keeps for a source.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: SourceSpec,
    #[serde(default)]
    declared: bool,
    #[serde(default)]
    last_sync: Option<SyncReport>,
    #[serde(default)]
    last_success_at: Option<String>,
}

/// `DELETE /sources/{name}`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SourceRemoved {
    /// The source's name.
    pub name: String,
    /// Its documents deleted with it (0 with `keep_documents`).
    pub documents_deleted: usize,
}

/// The registered sources, their syncs, schedule and watchers.
#[derive(Debug)]
pub struct Sources {
    pipeline: Arc<Pipeline>,
    config: SourcesConfig,
    fetcher: fetch::Fetcher,
    /// One lock per source (one sync of a source at a time) and its stop flag.
    running: Mutex<HashMap<String, Slot>>,
    /// Folder watchers by source name (dropping one stops it).
    watchers: Mutex<HashMap<String, notify::RecommendedWatcher>>,
    /// Background tasks (the schedule, watch debouncers), stopped on drop.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    me: Weak<Sources>,
}

impl Drop for Sources {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

/// A source's sync lock, and the flag that ends its running sync.
#[derive(Debug, Clone, Default)]
struct Slot {
    lock: Arc<tokio::sync::Mutex<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `name` is a valid source name; else why not.
fn invalid_name(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    (!ok).then(|| {
        format!("name: 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.' (got {name:?})")
    })
}

impl Sources {
    /// The sources of `pipeline`'s store: registers the declared ones, then
    /// starts the schedule (when `config.schedule`) and the folder watchers.
    pub async fn start(pipeline: Arc<Pipeline>, config: SourcesConfig) -> Result<Arc<Self>, Error> {
        let fetcher = fetch::Fetcher::new(&config)?;
        let sources = Arc::new_cyclic(|me| Sources {
            pipeline,
            config,
            fetcher,
            running: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            me: me.clone(),
        });
        for spec in sources.config.declare.clone() {
            // One bad declaration (a folder not mounted yet) does not keep
            // the service from starting: it is logged, and the others go on.
            let name = spec.name.clone();
            if let Err(e) = sources.register(spec, Origin::Declared).await {
                tracing::error!(source = %name, error = %e, "a declared source cannot be registered");
            }
        }
        // A source once declared and now gone from the file is no longer
        // synced; its documents stay (re-declaring it takes them up again).
        for r in sources.records().await? {
            if r.declared && !sources.config.declare.iter().any(|d| d.name == r.spec.name) {
                sources.pipeline.forget_source_record(&r.spec.name).await?;
                tracing::warn!(
                    source = %r.spec.name,
                    "no longer declared in the configuration: not synced any more; its documents are kept (metadata.source names it)"
                );
            }
        }
        for record in sources.records().await? {
            sources.arm(&record.spec);
        }
        if sources.config.schedule {
            let weak = Arc::downgrade(&sources);
            let tick = Duration::from_secs_f64(sources.config.check_every_s.max(0.05));
            let task = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(tick).await;
                    let Some(sources) = weak.upgrade() else {
                        return;
                    };
                    sources.sync_due().await;
                }
            });
            lock(&sources.tasks).push(task);
        }
        Ok(sources)
    }

    /// The settings in force.
    pub fn config(&self) -> &SourcesConfig {
        &self.config
    }

    async fn records(&self) -> Result<Vec<Record>, Error> {
        let mut out = Vec::new();
        for (name, json) in self.pipeline.source_records().await? {
            match serde_json::from_str::<Record>(&json) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(source = %name, error = %e, "unreadable source record left out")
                }
            }
        }
        Ok(out)
    }

    async fn record(&self, name: &str) -> Result<Record, Error> {
        self.records()
            .await?
            .into_iter()
            .find(|r| r.spec.name == name)
            .ok_or_else(|| Error::NotFound(format!("no source named {name:?}")))
    }

    async fn keep(&self, record: &Record) -> Result<(), Error> {
        let json = serde_json::to_string(record).map_err(Error::internal)?;
        self.pipeline
            .keep_source_record(&record.spec.name, &json)
            .await
    }

    fn info(&self, r: Record) -> SourceInfo {
        let syncing = lock(&self.running)
            .get(&r.spec.name)
            .is_some_and(|slot| slot.lock.try_lock().is_err());
        SourceInfo {
            spec: r.spec,
            declared: r.declared,
            last_sync: r.last_sync,
            last_success_at: r.last_success_at,
            syncing,
        }
    }

    /// Every source, by name.
    pub async fn list(&self) -> Result<Vec<SourceInfo>, Error> {
        Ok(self
            .records()
            .await?
            .into_iter()
            .map(|r| self.info(r))
            .collect())
    }

    /// Source `name`.
    pub async fn get(&self, name: &str) -> Result<SourceInfo, Error> {
        let r = self.record(name).await?;
        Ok(self.info(r))
    }

    /// Registers a source from the API (or replaces the spec of one of that
    /// name, keeping its last sync); `true` when it is new. Its first sync
    /// starts at once, in the background.
    pub async fn add(&self, spec: SourceSpec) -> Result<(SourceInfo, bool), Error> {
        let (record, created) = self.register(spec, Origin::Api).await?;
        self.arm(&record.spec);
        if let Some(me) = self.me.upgrade() {
            let name = record.spec.name.clone();
            tokio::spawn(async move {
                // (Unless the schedule got there first.)
                if let Err(e) = me.sync_when(&name, true).await {
                    tracing::warn!(source = %name, error = %e, "first sync failed");
                }
            });
        }
        Ok((self.info(record), created))
    }

    async fn register(
        &self,
        mut spec: SourceSpec,
        origin: Origin,
    ) -> Result<(Record, bool), Error> {
        self.validate(&mut spec, origin).await?;
        let old = self
            .records()
            .await?
            .into_iter()
            .find(|r| r.spec.name == spec.name);
        if let Some(old) = &old {
            if old.declared && origin == Origin::Api {
                return Err(Error::Invalid(format!(
                    "source {:?} is declared in the configuration file; change it there",
                    spec.name
                )));
            }
            // Through the API a name is registered once: replacing a source
            // would drop what it gave, so that takes a DELETE first.
            if origin == Origin::Api {
                return Err(Error::Invalid(format!(
                    "name: a source named {:?} exists; remove it first (DELETE /sources/{}) or choose another name",
                    spec.name, spec.name
                )));
            }
        }
        let created = old.is_none();
        let record = match old {
            // The same place: its documents and last sync stay its own.
            Some(old)
                if old.spec.url == spec.url
                    && old.spec.path == spec.path
                    && old.spec.collection() == spec.collection() =>
            {
                Record {
                    spec,
                    declared: origin == Origin::Declared,
                    ..old
                }
            }
            Some(old) => {
                // Another place under the old name: what the old place gave goes.
                self.delete_documents(&old.spec).await?;
                Record {
                    spec,
                    declared: origin == Origin::Declared,
                    last_sync: None,
                    last_success_at: None,
                }
            }
            None => Record {
                spec,
                declared: origin == Origin::Declared,
                last_sync: None,
                last_success_at: None,
            },
        };
        self.keep(&record).await?;
        Ok((record, created))
    }

    /// Checks a spec and puts it in its stored form (an absolute, canonical
    /// folder path; a parsed URL).
    async fn validate(&self, spec: &mut SourceSpec, origin: Origin) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Invalid(m));
        if let Some(why) = invalid_name(&spec.name) {
            return bad(why);
        }
        if let Some(c) = &spec.collection {
            if let Some(why) = ragd_core::invalid_collection_name(c) {
                return bad(format!("collection: {why}"));
            }
        }
        match self.pipeline.require_collection(spec.collection()).await {
            Err(Error::NotFound(why)) => return bad(format!("collection: {why}")),
            other => other?,
        }
        match (&spec.url, &spec.path) {
            (Some(_), Some(_)) | (None, None) => {
                return bad(
                    "give exactly one of url (a page, sitemap or feed) and path (a folder)".into(),
                )
            }
            (Some(u), None) => {
                if spec.kind == SourceKind::Folder {
                    return bad("kind: folder needs a path, not a url".into());
                }
                if spec.watch {
                    return bad(
                        "watch: only folders are watched; a URL is synced every interval_s".into(),
                    );
                }
                let parsed = url::Url::parse(u).map_err(|e| Error::Invalid(format!("url: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                    return bad("url: must be an http or https URL with a host".into());
                }
                spec.url = Some(parsed.to_string());
            }
            (None, Some(p)) => {
                if !matches!(spec.kind, SourceKind::Auto | SourceKind::Folder) {
                    return bad(
                        "kind: a path is a folder; pages, sitemaps and feeds need a url".into(),
                    );
                }
                let path = PathBuf::from(p);
                if !path.is_absolute() {
                    return bad(format!("path: must be absolute (got {p:?})"));
                }
                let canonical = tokio::fs::canonicalize(&path)
                    .await
                    .map_err(|e| Error::Invalid(format!("path: {p:?}: {e}")))?;
                if !canonical.is_dir() {
                    return bad(format!("path: {p:?} is not a folder"));
                }
                if origin == Origin::Api && !self.under_roots(&canonical) {
                    return bad(if self.config.folder_roots.is_empty() {
                        "path: folder sources through the API are off: list the folders they may lie under in sources.folder_roots".into()
                    } else {
                        format!(
                            "path: {p:?} is not under sources.folder_roots ({})",
                            self.config
                                .folder_roots
                                .iter()
                                .map(|r| r.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    });
                }
                spec.path = Some(canonical.to_string_lossy().into_owned());
            }
        }
        Ok(())
    }

    fn under_roots(&self, path: &Path) -> bool {
        self.config
            .folder_roots
            .iter()
            .any(|root| std::fs::canonicalize(root).is_ok_and(|root| path.starts_with(root)))
    }

    /// Removes source `name` and, unless `keep_documents`, its documents.
    pub async fn remove(&self, name: &str, keep_documents: bool) -> Result<SourceRemoved, Error> {
        let declared = |r: &Record| {
            if r.declared {
                Err(Error::Invalid(format!(
                    "source {name:?} is declared in the configuration file; remove it there"
                )))
            } else {
                Ok(())
            }
        };
        declared(&self.record(name).await?)?;
        // End a running sync at its next item and wait for it, so that
        // nothing it stores outlives the source.
        let slot = self.slot_of(name);
        slot.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _held = slot.lock.lock().await;
        slot.stop.store(false, std::sync::atomic::Ordering::SeqCst);
        let record = self.record(name).await?;
        declared(&record)?;
        lock_remove(&self.watchers, name);
        // Documents first: should a delete fail, the source is still there to
        // remove again.
        let documents_deleted = if keep_documents {
            0
        } else {
            self.delete_documents(&record.spec).await?
        };
        self.pipeline.forget_source_record(name).await?;
        lock_remove(&self.running, name);
        Ok(SourceRemoved {
            name: name.to_string(),
            documents_deleted,
        })
    }

    async fn delete_documents(&self, spec: &SourceSpec) -> Result<usize, Error> {
        let ids: Vec<String> = sync::documents_of(&self.pipeline, spec)
            .await?
            .into_keys()
            .collect();
        for id in &ids {
            match self
                .pipeline
                .delete_document_in(spec.collection(), id)
                .await
            {
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(ids.len())
    }

    fn slot_of(&self, name: &str) -> Slot {
        lock(&self.running)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Syncs source `name` now (after a sync of it that is running) and
    /// keeps the report with it.
    pub async fn sync(&self, name: &str) -> Result<SyncReport, Error> {
        self.sync_when(name, false)
            .await
            .map(|r| r.unwrap_or_default())
    }

    /// [`Self::sync`]; with `only_if_due`, only when the schedule still
    /// calls for it once the lock is held (another sync may have just ended).
    async fn sync_when(&self, name: &str, only_if_due: bool) -> Result<Option<SyncReport>, Error> {
        // Only registered names get a lock.
        self.record(name).await?;
        let slot = self.slot_of(name);
        let _held = slot.lock.lock().await;
        let record = self.record(name).await?;
        if only_if_due && !self.due(&record, jiff::Timestamp::now()) {
            return Ok(None);
        }
        let report = sync::run(
            &self.pipeline,
            &self.fetcher,
            &self.config,
            &record.spec,
            &slot.stop,
        )
        .await;
        // The source may have been replaced meanwhile: keep the newest spec.
        let mut record = match self.record(name).await {
            Ok(r) => r,
            Err(Error::NotFound(_)) => return Ok(Some(report)),
            Err(e) => return Err(e),
        };
        if report.error.is_none() {
            record.last_success_at = Some(report.finished_at.clone());
        }
        record.last_sync = Some(report.clone());
        self.keep(&record).await?;
        match &report.error {
            None => tracing::info!(
                source = %name,
                created = report.created, updated = report.updated,
                unchanged = report.unchanged, deleted = report.deleted,
                failed = report.failed, embedded = report.embedded,
                seconds = report.seconds, "source synced"
            ),
            Some(e) => {
                tracing::warn!(source = %name, error = %e, "source sync failed; its documents are kept")
            }
        }
        Ok(Some(report))
    }

    /// Whether the schedule calls for a sync of `r` at `now`: never synced,
    /// or its interval passed since its last sync ended.
    fn due(&self, r: &Record, now: jiff::Timestamp) -> bool {
        let interval = r.spec.interval_s.unwrap_or(self.config.default_interval_s);
        match &r.last_sync {
            None => true,
            Some(_) if interval == 0 => false,
            Some(last) => last
                .finished_at
                .parse::<jiff::Timestamp>()
                .map_or(true, |t| now.as_second() - t.as_second() >= interval as i64),
        }
    }

    /// Starts the syncs the schedule calls for: sources never synced, and
    /// those whose interval has passed since their last sync ended.
    async fn sync_due(&self) {
        let records = match self.records().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the sources");
                return;
            }
        };
        let now = jiff::Timestamp::now();
        for r in records {
            if !self.due(&r, now) || self.slot_of(&r.spec.name).lock.try_lock().is_err() {
                continue;
            }
            let Some(me) = self.me.upgrade() else { return };
            let name = r.spec.name.clone();
            tokio::spawn(async move {
                // Checked again under the lock: a sync that ended between the
                // read above and now is not followed by another.
                if let Err(e) = me.sync_when(&name, true).await {
                    tracing::warn!(source = %name, error = %e, "scheduled sync failed");
                }
            });
        }
    }

    /// Starts watching `spec`'s folder when it asks to be watched (and stops
    /// a watch it no longer asks for).
    fn arm(&self, spec: &SourceSpec) {
        lock_remove(&self.watchers, &spec.name);
        let (true, Some(path)) = (spec.watch, &spec.path) else {
            return;
        };
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(source = %spec.name, error = %e, "cannot watch the folder");
                return;
            }
        };
        if let Err(e) = watcher.watch(Path::new(path), notify::RecursiveMode::Recursive) {
            tracing::warn!(source = %spec.name, error = %e, "cannot watch the folder");
            return;
        }
        lock(&self.watchers).insert(spec.name.clone(), watcher);
        let weak = self.me.clone();
        let name = spec.name.clone();
        let quiet = Duration::from_millis(self.config.watch_debounce_ms);
        let task = tokio::spawn(async move {
            // A burst of events (an editor's save, a copied tree) is one sync,
            // once the folder has been quiet for `quiet`.
            while rx.recv().await.is_some() {
                loop {
                    match tokio::time::timeout(quiet, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let Some(me) = weak.upgrade() else { return };
                if let Err(e) = me.sync(&name).await {
                    tracing::warn!(source = %name, error = %e, "sync on change failed");
                }
            }
        });
        lock(&self.tasks).push(task);
    }
}

fn lock_remove<V>(m: &Mutex<HashMap<String, V>>, key: &str) {
    lock(m).remove(key);
}

/// Where a registration comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The configuration file (trusted: any folder).
    Declared,
    /// The API (folders only under `sources.folder_roots`).
    Api,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain() {
        assert!(invalid_name("docs-2026.v1_x").is_none());
        assert!(invalid_name("").is_some());
        assert!(invalid_name("a/b").is_some());
        assert!(invalid_name(&"x".repeat(65)).is_some());
    }
}
