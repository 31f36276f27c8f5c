//! [`Embed`] on the local BERT model (`ragd-embedder`), on its own OS thread.
//!
//! Model code is CPU-bound and synchronous, so the model lives on one thread
//! fed by a bounded channel and never runs on the async runtime. The thread
//! loads the model first and reports success or the load error on a oneshot.
//! It batches dynamically: it takes a job, then everything already queued up
//! to a budget, embeds it in one go and skips jobs whose caller has gone.

use std::path::PathBuf;
use std::sync::Arc;

use ragd_core::{async_trait, BackendError, Embed, EmbedderInfo, TextKind};
use ragd_embedder::{Embedder, EmbedderConfig, TextTokenizer};
use tokio::sync::{mpsc, oneshot};

use crate::LoadError;

/// A tokenizer vocabulary at least this large covers many languages.
const MULTILINGUAL_VOCAB: usize = 100_000;

/// Texts taken from the queue for one embedding pass.
const EMBED_DRAIN_BUDGET: usize = 256;

/// Called with the size of every embedding batch (for metrics).
pub type BatchObserver = Arc<dyn Fn(usize) + Send + Sync>;

struct EmbedJob {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// Handle to the embedder thread.
#[derive(Clone)]
pub struct LocalEmbedder {
    tx: mpsc::Sender<EmbedJob>,
    /// The model's tokenizer without truncation or padding, for counting.
    counter: TokenCounter,
    info: EmbedderInfo,
}

impl std::fmt::Debug for LocalEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEmbedder")
            .field("name", &self.info.name)
            .field("dim", &self.info.dim)
            .finish()
    }
}

/// A model's tokenizer, shared with the embedder, for [`Embed::count_tokens`]
/// (by the local and the remote embedder).
#[derive(Debug, Clone)]
pub(crate) struct TokenCounter(TextTokenizer);

impl TokenCounter {
    pub(crate) fn of(tokenizer: &TextTokenizer) -> Self {
        Self(tokenizer.clone())
    }

    pub(crate) fn count(&self, text: &str) -> usize {
        // Encoding plain text does not fail with the tokenizers ragd loads; if
        // one ever did, the byte length is an upper bound on the token count,
        // so a chunk sized with it still fits the window.
        self.0.count(text).unwrap_or(text.len())
    }
}

/// What the pipeline needs to know of a model.
fn describe(
    name: &str,
    dim: usize,
    max_length: usize,
    query_prefix: &str,
    passage_prefix: &str,
    tokenizer: &TextTokenizer,
) -> EmbedderInfo {
    EmbedderInfo {
        name: name.to_string(),
        dim,
        max_length,
        query_prefix: query_prefix.to_string(),
        passage_prefix: passage_prefix.to_string(),
        // English BERT vocabularies hold ~30k word pieces; multilingual ones
        // (mBERT 119k, XLM-R 250k) far more.
        multilingual: tokenizer.vocab_size() >= MULTILINGUAL_VOCAB,
    }
}

/// [`describe`] for a model directory's card (the remote embedder's model).
pub(crate) fn info_of(card: &ragd_embedder::ModelCard) -> EmbedderInfo {
    describe(
        &card.name,
        card.dim,
        card.max_length,
        &card.query_prefix,
        &card.passage_prefix,
        &card.tokenizer,
    )
}

impl LocalEmbedder {
    /// Starts the embedder thread; the receiver yields the handle once the
    /// model is loaded, or why it could not be.
    pub fn spawn(
        dir: PathBuf,
        config: EmbedderConfig,
        on_batch: Option<BatchObserver>,
    ) -> oneshot::Receiver<Result<LocalEmbedder, LoadError>> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("ragd-embedder".into())
            .spawn(move || {
                let embedder = match Embedder::load(&dir, &config) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send(Err(LoadError::Model {
                            what: "embedder",
                            path: dir,
                            message: e.to_string(),
                        }));
                        return;
                    }
                };
                let counter = TokenCounter::of(embedder.tokenizer());
                let (tx, rx) = mpsc::channel::<EmbedJob>(1024);
                let handle = LocalEmbedder {
                    tx,
                    counter,
                    info: describe(
                        embedder.name(),
                        embedder.dim(),
                        embedder.max_length(),
                        embedder.prefix(TextKind::Query),
                        embedder.prefix(TextKind::Passage),
                        embedder.tokenizer(),
                    ),
                };
                tracing::info!(
                    model = %handle.info.name,
                    dim = handle.info.dim,
                    precision = embedder.precision(),
                    "embedder loaded"
                );
                if ready_tx.send(Ok(handle)).is_err() {
                    return;
                }
                // What loading allocated and dropped (the tokenizer's
                // build, the weights before quantization).
                crate::release_freed_memory();
                serve(&embedder, rx, on_batch.as_deref());
            });
        if let Err(e) = spawned {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(LoadError::Thread {
                what: "embedder",
                message: e.to_string(),
            }));
            return rx;
        }
        ready_rx
    }
}

/// Texts embedded since the thread last handed back its freed memory, at or
/// past which it does so when the queue runs empty: a batch's activations
/// (tens of megabytes for 32 passages) are worth returning once ingest pauses;
/// a question's are not worth a call each time. Returning them while a stream
/// of ingest requests kept the thread busy cost nothing measurable (`ragd
/// bench ingest --limit 600`: 19.4 → 19.3–19.4 chunks/s).
const RELEASE_AFTER_TEXTS: usize = 32;

/// The embedder thread's loop: a job, then whatever else is queued, in one pass.
fn serve(
    embedder: &Embedder,
    mut rx: mpsc::Receiver<EmbedJob>,
    on_batch: Option<&(dyn Fn(usize) + Send + Sync)>,
) {
    let mut unreleased = 0;
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        let mut queued = jobs[0].texts.len();
        while queued < EMBED_DRAIN_BUDGET {
            match rx.try_recv() {
                Ok(job) => {
                    queued += job.texts.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let texts: Vec<&str> = jobs
            .iter()
            .flat_map(|j| j.texts.iter().map(String::as_str))
            .collect();
        if let Some(observe) = on_batch {
            observe(texts.len());
        }
        unreleased += texts.len();
        match embedder.embed(&texts) {
            Ok(mut vectors) => {
                for job in jobs {
                    let rest = vectors.split_off(job.texts.len());
                    let _ = job.reply.send(Ok(std::mem::replace(&mut vectors, rest)));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "embedding failed");
                for job in jobs {
                    let _ = job.reply.send(Err(e.to_string()));
                }
            }
        }
        if unreleased >= RELEASE_AFTER_TEXTS && rx.is_empty() {
            crate::release_freed_memory();
            unreleased = 0;
        }
    }
}

#[async_trait]
impl Embed for LocalEmbedder {
    fn info(&self) -> &EmbedderInfo {
        &self.info
    }

    fn count_tokens(&self, text: &str) -> usize {
        self.counter.count(text)
    }

    async fn embed(
        &self,
        kind: TextKind,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, BackendError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = match kind {
            TextKind::Query => &self.info.query_prefix,
            TextKind::Passage => &self.info.passage_prefix,
        };
        let texts = if prefix.is_empty() {
            texts
        } else {
            texts.into_iter().map(|t| format!("{prefix}{t}")).collect()
        };
        let stopped = || BackendError::server("the embedder thread has stopped");
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(EmbedJob { texts, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await
            .map_err(|_| stopped())?
            .map_err(BackendError::server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// Calls of the registered release, and on which threads.
    static RELEASES: AtomicUsize = AtomicUsize::new(0);
    static ON_EMBEDDER_THREAD: AtomicUsize = AtomicUsize::new(0);

    fn count_release() {
        RELEASES.fetch_add(1, Ordering::SeqCst);
        if std::thread::current().name() == Some("ragd-embedder") {
            ON_EMBEDDER_THREAD.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn releases_reach(n: usize) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if RELEASES.load(Ordering::SeqCst) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The embedder thread hands its freed memory back once loaded, and
    /// again when the queue runs empty after a batch's worth of texts — not
    /// after each question.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn embedder_thread_releases_freed_memory_when_idle() {
        crate::set_memory_release(count_release);
        let dir = std::env::var_os("RAGD_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"))
            .join("all-MiniLM-L6-v2");
        assert!(
            dir.exists(),
            "{} is missing: run scripts/fetch-models",
            dir.display()
        );
        let embedder = LocalEmbedder::spawn(dir, EmbedderConfig::default(), None)
            .await
            .expect("thread")
            .expect("model");
        assert!(releases_reach(1), "no release after loading");
        let after_load = RELEASES.load(Ordering::SeqCst);

        // Single questions, fewer than a batch in all: nothing more.
        for i in 0..RELEASE_AFTER_TEXTS - 1 {
            let v = embedder
                .embed(TextKind::Query, vec![format!("question {i}")])
                .await
                .expect("embed");
            assert_eq!(v.len(), 1);
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(RELEASES.load(Ordering::SeqCst), after_load);

        // A batch of passages: released once the thread is idle again.
        let passages = (0..RELEASE_AFTER_TEXTS)
            .map(|i| format!("passage number {i} about the release of memory"))
            .collect();
        let v = embedder
            .embed(TextKind::Passage, passages)
            .await
            .expect("embed");
        assert_eq!(v.len(), RELEASE_AFTER_TEXTS);
        assert!(releases_reach(after_load + 1), "no release after the batch");
        assert_eq!(
            ON_EMBEDDER_THREAD.load(Ordering::SeqCst),
            RELEASES.load(Ordering::SeqCst),
            "released on another thread than the one that freed the memory"
        );
    }
}
