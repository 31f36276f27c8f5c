//! One sync of one source: list what it holds, fetch what changed, ingest
//! the changed documents, delete the vanished ones, count everything.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use ragd_pipeline::ingest::{DocumentIn, IngestRequest, IngestStatus};
use ragd_pipeline::{Error, Pipeline};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use url::Url;

use crate::fetch::{Fetched, Fetcher, Page, Session, Validators};
use crate::listing::{self, Listing};
use crate::{SourceKind, SourceSpec, SourcesConfig};

/// Documents handed to the ingest flow at once (one embedding batch's worth
/// of work between progress points; well under `ingest.max_documents_per_request`).
const BATCH: usize = 32;
/// Failures listed in a report (all are counted).
const MAX_FAILURES: usize = 20;
/// Longest document id (the ingest flow's limit).
const MAX_ID_LEN: usize = 256;
/// The metadata key naming the source that wrote a document: reserved
/// (clients cannot set `ragd_` keys), so a sync only ever deletes or
/// replaces documents it wrote itself.
pub const SOURCE_KEY: &str = "ragd_source";

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyncReport {
    /// When it started (RFC 3339, UTC).
    pub started_at: String,
    /// When it ended.
    pub finished_at: String,
    /// How long it took.
    pub seconds: f64,
    /// Why the source could not be read at all (its documents were all
    /// kept); `null` when it was.
    pub error: Option<String>,
    /// What the source turned out to be.
    pub kind: Option<SourceKind>,
    /// Files or pages it lists.
    pub listed: usize,
    /// Documents new in this sync.
    pub created: usize,
    /// Documents whose content changed.
    pub updated: usize,
    /// Documents found as they were (not fetched again, or fetched and the same).
    pub unchanged: usize,
    /// Documents whose file or page is gone.
    pub deleted: usize,
    /// Files or pages that could not be read (their last good version kept).
    pub failed: usize,
    /// Chunks embedded (a changed document's unchanged chunks keep their vectors).
    pub embedded: usize,
    /// The first failures, with why.
    pub failures: Vec<ItemFailure>,
    /// The source lists more than `sources.max_documents`: only the first
    /// were read, and nothing was deleted.
    #[serde(default)]
    pub truncated: bool,
}

/// A file or page that could not be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ItemFailure {
    /// The file's path in the folder, or the page's URL.
    pub item: String,
    /// Why.
    pub error: String,
}

impl SyncReport {
    fn fail(&mut self, item: impl Into<String>, error: impl Into<String>) {
        self.failed += 1;
        if self.failures.len() < MAX_FAILURES {
            self.failures.push(ItemFailure {
                item: item.into(),
                error: error.into(),
            });
        }
    }
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).unwrap_or_default()
}

fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// `id` cut to the ingest flow's limit: long ids keep their start and a hash
/// of the whole, so that two long ids stay apart.
fn bounded_id(id: String) -> String {
    if id.chars().count() <= MAX_ID_LEN {
        return id;
    }
    let head: String = id.chars().take(MAX_ID_LEN - 17).collect();
    let hash = sha256(id.as_bytes());
    format!("{head}#{}", &hash[7..23])
}

/// Every document of `spec`'s collection that came from it, by id, with its
/// metadata.
pub(crate) async fn documents_of(
    pipeline: &Pipeline,
    spec: &SourceSpec,
) -> Result<HashMap<String, Map<String, Value>>, Error> {
    let mut out = HashMap::new();
    let mut after = None;
    loop {
        let page = pipeline
            .list_documents_in(spec.collection(), after, Some(1000))
            .await?;
        for d in page.documents {
            if d.metadata.get(SOURCE_KEY).and_then(Value::as_str) == Some(spec.name.as_str()) {
                out.insert(d.id, d.metadata);
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(out),
        }
    }
}

/// One sync in progress.
struct Run<'a> {
    pipeline: &'a Pipeline,
    spec: &'a SourceSpec,
    config: &'a SourcesConfig,
    existing: HashMap<String, Map<String, Value>>,
    /// Ids the source still holds (documents not among them are deleted).
    seen: HashSet<String>,
    batch: Vec<DocumentIn>,
    report: SyncReport,
    /// Pages that answered 404 or 410: deleted whatever the listing.
    gone: Vec<String>,
    /// Set when the source is being removed: the sync ends at the next item.
    stop: &'a AtomicBool,
    /// Whether what is not seen may be deleted (not for feeds: an entry
    /// that leaves the feed is still a page; not for a cut listing).
    delete_unseen: bool,
}

/// Syncs `spec`; never fails as a whole: a source that cannot be read says
/// why in the report's `error`, and keeps its documents.
pub(crate) async fn run(
    pipeline: &Pipeline,
    fetcher: &Fetcher,
    config: &SourcesConfig,
    spec: &SourceSpec,
    stop: &AtomicBool,
) -> SyncReport {
    let started = now();
    let clock = std::time::Instant::now();
    let mut run = Run {
        pipeline,
        spec,
        config,
        existing: HashMap::new(),
        seen: HashSet::new(),
        batch: Vec::new(),
        report: SyncReport {
            started_at: started.to_string(),
            ..SyncReport::default()
        },
        stop,
        delete_unseen: true,
        gone: Vec::new(),
    };
    let outcome = run.all(fetcher).await;
    let mut report = run.report;
    if let Err(e) = outcome {
        report.error = Some(e);
    }
    report.finished_at = now().to_string();
    report.seconds = clock.elapsed().as_secs_f64();
    report
}

impl Run<'_> {
    fn stopped(&self) -> Result<(), String> {
        if self.stop.load(Ordering::SeqCst) {
            Err("stopped: the source is being removed".into())
        } else {
            Ok(())
        }
    }

    async fn all(&mut self, fetcher: &Fetcher) -> Result<(), String> {
        self.existing = documents_of(self.pipeline, self.spec)
            .await
            .map_err(|e| format!("reading the source's documents: {e}"))?;
        match (&self.spec.path, &self.spec.url) {
            (Some(path), _) => {
                self.report.kind = Some(SourceKind::Folder);
                self.folder(PathBuf::from(path)).await?
            }
            (None, Some(url)) => {
                let url = Url::parse(url).map_err(|e| format!("url: {e}"))?;
                let mut session = fetcher.session();
                self.web(&mut session, url).await?
            }
            (None, None) => return Err("the source has neither url nor path".into()),
        }
        self.flush().await?;
        // Pages that answered 404/410 go; the rest of what was not seen only
        // when the source was read to the end (and is not a feed).
        let mut gone = std::mem::take(&mut self.gone);
        if self.delete_unseen && !self.report.truncated {
            let unseen: Vec<String> = self
                .existing
                .keys()
                .filter(|id| !self.seen.contains(*id) && !gone.contains(*id))
                .cloned()
                .collect();
            gone.extend(unseen);
        }
        for id in gone {
            match self
                .pipeline
                .delete_document_in(self.spec.collection(), &id)
                .await
            {
                Ok(_) => self.report.deleted += 1,
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(format!("deleting {id:?}: {e}")),
            }
        }
        Ok(())
    }

    /// A folder: files whose modification time and size are as stored are
    /// not read; the others are read and compared by content hash.
    async fn folder(&mut self, root: PathBuf) -> Result<(), String> {
        // The folder as registered (canonical then): a folder since swapped
        // for a link elsewhere is not followed.
        let real = tokio::fs::canonicalize(&root)
            .await
            .map_err(|e| format!("{}: {e}", root.display()))?;
        if real != root {
            return Err(format!(
                "{} now leads to {} (a symbolic link): not followed",
                root.display(),
                real.display()
            ));
        }
        let max = self.config.max_documents;
        let listed_root = root.clone();
        let (files, truncated) =
            tokio::task::spawn_blocking(move || listing::folder(&listed_root, max))
                .await
                .map_err(|e| e.to_string())??;
        self.report.listed = files.len();
        self.report.truncated = truncated;
        for f in files {
            self.stopped()?;
            let id = bounded_id(format!("{}/{}", self.spec.name, f.relative));
            self.seen.insert(id.clone());
            if f.modified_ns < 0 {
                self.report
                    .fail(&f.relative, "its size and modification time cannot be read");
                continue;
            }
            let known = self.existing.get(&id);
            let same_stat = known.is_some_and(|m| {
                m.get("modified_ns").and_then(Value::as_i64) == Some(f.modified_ns as i64)
                    && m.get("size").and_then(Value::as_u64) == Some(f.size)
            });
            if same_stat {
                self.report.unchanged += 1;
                continue;
            }
            let too_large = || {
                format!(
                    "larger than sources.max_bytes ({} bytes)",
                    self.config.max_bytes
                )
            };
            if f.size as usize > self.config.max_bytes {
                self.report.fail(&f.relative, too_large());
                continue;
            }
            let bytes = match read_beneath(&root, &f.path, self.config.max_bytes).await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    self.report.fail(&f.relative, too_large());
                    continue;
                }
                Err(e) => {
                    self.report.fail(&f.relative, e);
                    continue;
                }
            };
            let hash = sha256(&bytes);
            if known
                .and_then(|m| m.get("content_hash"))
                .and_then(Value::as_str)
                == Some(hash.as_str())
            {
                self.report.unchanged += 1;
                continue;
            }
            let source_url = Url::from_file_path(&f.path)
                .map(|u| u.to_string())
                .unwrap_or_else(|_| f.path.display().to_string());
            let mut metadata = Map::new();
            metadata.insert("source_url".into(), source_url.into());
            metadata.insert("file_name".into(), f.relative.clone().into());
            metadata.insert("modified_ns".into(), (f.modified_ns as i64).into());
            metadata.insert("size".into(), f.size.into());
            let name = f.relative.clone();
            self.add(id, &name, None, bytes, hash, metadata, &f.relative)
                .await?;
        }
        Ok(())
    }

    /// A URL: a page, or a sitemap (index) or feed whose pages are fetched.
    async fn web(&mut self, session: &mut Session<'_>, url: Url) -> Result<(), String> {
        let root_id = bounded_id(url.to_string());
        let was_page = self.existing.contains_key(&root_id);
        let validators = self.validators(&root_id);
        let fetched = session
            .get(&url, &validators)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let page = match fetched {
            Fetched::NotModified => {
                self.report.kind = Some(SourceKind::Page);
                self.report.listed = 1;
                self.seen.insert(root_id);
                self.report.unchanged += 1;
                return Ok(());
            }
            Fetched::Gone(_) if was_page || self.spec.kind == SourceKind::Page => {
                // The page is gone: its document goes with it.
                self.report.kind = Some(SourceKind::Page);
                self.gone.push(root_id);
                return Ok(());
            }
            Fetched::Gone(code) => return Err(format!("{url}: HTTP {code}")),
            Fetched::Page(p) => p,
        };
        let listing = match self.spec.kind {
            SourceKind::Page => None,
            _ => listing::parse(&page.bytes),
        };
        let urls = match (self.spec.kind, listing) {
            (SourceKind::Auto | SourceKind::Page, None) => {
                self.report.kind = Some(SourceKind::Page);
                self.report.listed = 1;
                self.seen.insert(root_id.clone());
                return self.page(root_id, page).await;
            }
            (SourceKind::Sitemap, Some(Listing::Feed(_)))
            | (SourceKind::Feed, Some(Listing::Sitemap(_) | Listing::SitemapIndex(_)))
            | (_, None) => {
                return Err(format!(
                    "{url} is not a {}",
                    if self.spec.kind == SourceKind::Feed {
                        "feed"
                    } else {
                        "sitemap"
                    }
                ))
            }
            (_, Some(Listing::Feed(urls))) => {
                self.report.kind = Some(SourceKind::Feed);
                // An entry that leaves the feed is still a page: kept (it goes
                // when the page itself is gone, or with the source).
                self.delete_unseen = false;
                urls
            }
            (_, Some(Listing::Sitemap(urls))) => {
                self.report.kind = Some(SourceKind::Sitemap);
                urls
            }
            (_, Some(Listing::SitemapIndex(maps))) => {
                self.report.kind = Some(SourceKind::Sitemap);
                let mut urls = Vec::new();
                for m in maps {
                    let at = page
                        .url
                        .join(&m)
                        .map_err(|e| format!("sitemap {m:?}: {e}"))?;
                    // A part that cannot be read fails the sync: its pages
                    // would otherwise read as gone.
                    match session.get(&at, &Validators::default()).await {
                        Ok(Fetched::Page(p)) => match listing::parse(&p.bytes) {
                            Some(Listing::Sitemap(more)) => urls.extend(more),
                            _ => return Err(format!("{at} is not a sitemap")),
                        },
                        Ok(_) => return Err(format!("{at}: not found")),
                        Err(e) => return Err(format!("{at}: {e}")),
                    }
                    if urls.len() >= self.config.max_documents {
                        break;
                    }
                }
                urls
            }
        };
        let mut listed = HashSet::new();
        for u in urls {
            self.stopped()?;
            if listed.len() >= self.config.max_documents {
                self.report.truncated = true;
                break;
            }
            let Ok(at) = page.url.join(&u) else {
                self.report.fail(u, "not a URL");
                continue;
            };
            if !listed.insert(at.to_string()) {
                continue;
            }
            let id = bounded_id(at.to_string());
            self.seen.insert(id.clone());
            let validators = self.validators(&id);
            match session.get(&at, &validators).await {
                Err(e) => self.report.fail(at.as_str(), e),
                Ok(Fetched::NotModified) => self.report.unchanged += 1,
                Ok(Fetched::Gone(code)) => {
                    // Listed but gone: a stored version goes; else it is a dead link.
                    self.seen.remove(&id);
                    if self.existing.contains_key(&id) {
                        self.gone.push(id);
                    } else {
                        self.report.fail(at.as_str(), format!("HTTP {code}"));
                    }
                }
                Ok(Fetched::Page(p)) => self.page(id, p).await?,
            }
        }
        self.report.listed = listed.len();
        Ok(())
    }

    fn validators(&self, id: &str) -> Validators {
        let m = self.existing.get(id);
        let get = |k: &str| {
            m.and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Validators {
            etag: get("etag"),
            last_modified: get("last_modified"),
        }
    }

    /// A fetched page: ingested unless its content is what is stored.
    async fn page(&mut self, id: String, page: Page) -> Result<(), String> {
        let hash = sha256(&page.bytes);
        let known = self
            .existing
            .get(&id)
            .and_then(|m| m.get("content_hash"))
            .and_then(Value::as_str);
        if known == Some(hash.as_str()) {
            self.report.unchanged += 1;
            return Ok(());
        }
        let mut metadata = Map::new();
        metadata.insert("source_url".into(), page.url.to_string().into());
        if let Some(e) = &page.etag {
            metadata.insert("etag".into(), e.clone().into());
        }
        if let Some(lm) = &page.last_modified {
            metadata.insert("last_modified".into(), lm.clone().into());
        }
        let name = page
            .url
            .path_segments()
            .and_then(|mut s| s.next_back().map(str::to_string))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| page.url.host_str().unwrap_or("page").to_string());
        let item = page.url.to_string();
        self.add(
            id,
            &name,
            page.content_type,
            page.bytes,
            hash,
            metadata,
            &item,
        )
        .await
    }

    /// Extracts the text of a changed file or page and queues it for ingest.
    #[allow(clippy::too_many_arguments)]
    async fn add(
        &mut self,
        id: String,
        name: &str,
        content_type: Option<String>,
        bytes: Vec<u8>,
        hash: String,
        mut metadata: Map<String, Value>,
        item: &str,
    ) -> Result<(), String> {
        let owned = name.to_string();
        let extracted = tokio::task::spawn_blocking(move || {
            ragd_pipeline::extract::extract(&owned, content_type.as_deref(), &bytes)
        })
        .await
        .map_err(|e| e.to_string())?;
        let e = match extracted {
            Ok(e) => e,
            Err(why) => {
                self.report.fail(item, why.to_string());
                return Ok(());
            }
        };
        metadata.insert(SOURCE_KEY.into(), self.spec.name.clone().into());
        metadata.insert("fetched_at".into(), now().to_string().into());
        metadata.insert("content_hash".into(), hash.into());
        metadata.insert("format".into(), e.kind.into());
        let title = ragd_pipeline::ingest::file_title(e.title, name);
        self.batch.push(DocumentIn {
            id: Some(id),
            title,
            source: None,
            text: e.text,
            metadata: Some(metadata),
        });
        if self.batch.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Ingests the queued documents. A batch the ingest flow refuses as a
    /// whole (one document with an id it does not take, say) is sent again one
    /// document at a time, so that one bad file fails alone.
    async fn flush(&mut self) -> Result<(), String> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let documents = std::mem::take(&mut self.batch);
        let collection = self.spec.collection().to_string();
        let outcome = self
            .pipeline
            .ingest_synced(
                &collection,
                IngestRequest {
                    documents: documents.clone(),
                },
            )
            .await;
        let responses = match outcome {
            Ok(r) => vec![r],
            Err(Error::Invalid(_)) if documents.len() > 1 => {
                let mut out = Vec::new();
                for d in documents {
                    let id = d.id.clone().unwrap_or_default();
                    match self
                        .pipeline
                        .ingest_synced(&collection, IngestRequest { documents: vec![d] })
                        .await
                    {
                        Ok(r) => out.push(r),
                        Err(Error::Invalid(why)) => self.report.fail(id, why),
                        Err(e) => return Err(format!("storing documents: {e}")),
                    }
                }
                out
            }
            Err(Error::Invalid(why)) => {
                let id = documents[0].id.clone().unwrap_or_default();
                self.report.fail(id, why);
                Vec::new()
            }
            Err(e) => return Err(format!("storing documents: {e}")),
        };
        for d in responses.into_iter().flat_map(|r| r.documents) {
            self.report.embedded += d.embedded;
            match d.status {
                IngestStatus::Created => self.report.created += 1,
                IngestStatus::Updated => self.report.updated += 1,
                IngestStatus::Unchanged => self.report.unchanged += 1,
                IngestStatus::Failed => {
                    let why = d.error.unwrap_or_else(|| "not stored".into());
                    self.report.fail(d.id, why)
                }
            }
        }
        Ok(())
    }
}

/// Reads `path` if it still lies beneath `root` (a file or folder swapped
/// for a link after the listing is not followed out of it); `None` when it
/// holds more than `max` bytes.
async fn read_beneath(root: &Path, path: &Path, max: usize) -> Result<Option<Vec<u8>>, String> {
    use tokio::io::AsyncReadExt;
    let real = tokio::fs::canonicalize(path)
        .await
        .map_err(|e| e.to_string())?;
    if !real.starts_with(root) {
        return Err(format!("now leads outside the folder ({})", real.display()));
    }
    let file = tokio::fs::File::open(&real)
        .await
        .map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| e.to_string())?;
    Ok((bytes.len() <= max).then_some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_ids_stay_within_the_limit_and_apart() {
        let a = bounded_id(format!("https://a.example/{}", "x".repeat(400)));
        let b = bounded_id(format!("https://a.example/{}y", "x".repeat(400)));
        assert_eq!(a.chars().count(), MAX_ID_LEN);
        assert_ne!(a, b);
        assert_eq!(bounded_id("short".into()), "short");
    }
}
