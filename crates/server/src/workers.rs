//! The model threads.
//!
//! Model code is CPU-bound and synchronous, so each model lives on its own OS
//! thread, fed by a bounded channel, and never runs on the async runtime. A thread
//! loads its model first and reports success or the load error on a oneshot; the
//! server is ready only when every model has reported.
//!
//! * The embedder batches dynamically: it takes a job, then everything already
//!   queued up to a budget, embeds it in one go and skips jobs whose caller has
//!   gone.
//! * The generator serves one request at a time from a bounded queue (a full
//!   queue is a 429 for the caller) and streams text back on a per-request
//!   channel; when the caller goes away the send fails and generation stops.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ragd_embedder::{Embedder, EmbedderConfig, TextKind};
use ragd_generator::{GenerateError, GenerateParams, Generation, Generator};
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, oneshot};

use crate::prompt::{self, Passage};

/// Texts taken from the queue for one embedding pass.
const EMBED_DRAIN_BUDGET: usize = 256;

struct EmbedJob {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// Handle to the embedder thread.
#[derive(Clone)]
pub struct EmbedWorker {
    tx: mpsc::Sender<EmbedJob>,
    /// The model's tokenizer, for chunking on the caller's side.
    pub tokenizer: Tokenizer,
    /// Model name (its directory name).
    pub name: String,
    /// Vector dimension.
    pub dim: usize,
    /// Longest input in tokens.
    pub max_length: usize,
    /// Put in front of queries (`query: ` for E5 models, usually empty).
    pub query_prefix: String,
    /// Put in front of passages (`passage: ` for E5 models, usually empty).
    pub passage_prefix: String,
}

impl std::fmt::Debug for EmbedWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbedWorker")
            .field("name", &self.name)
            .field("dim", &self.dim)
            .finish()
    }
}

impl EmbedWorker {
    /// Starts the embedder thread; the receiver yields the handle once the model is loaded.
    pub fn spawn(
        dir: PathBuf,
        config: EmbedderConfig,
    ) -> oneshot::Receiver<Result<EmbedWorker, String>> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("ragd-embedder".into())
            .spawn(move || {
                let embedder = match Embedder::load(&dir, &config) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("embedder {}: {e}", dir.display())));
                        return;
                    }
                };
                let (tx, mut rx) = mpsc::channel::<EmbedJob>(1024);
                let handle = EmbedWorker {
                    tx,
                    tokenizer: embedder.tokenizer().clone(),
                    name: embedder.name().to_string(),
                    dim: embedder.dim(),
                    max_length: embedder.max_length(),
                    query_prefix: embedder.prefix(TextKind::Query).to_string(),
                    passage_prefix: embedder.prefix(TextKind::Passage).to_string(),
                };
                tracing::info!(model = %handle.name, dim = handle.dim, "embedder loaded");
                if ready_tx.send(Ok(handle)).is_err() {
                    return;
                }
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
                    crate::metrics::get().embedding_batch(texts.len());
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
                }
            });
        if let Err(e) = spawned {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(format!("cannot start the embedder thread: {e}")));
            return rx;
        }
        ready_rx
    }

    /// The model's identity for stored vectors: its name, and the passage prefix
    /// when there is one (vectors made with another prefix are not comparable).
    pub fn identity(&self) -> String {
        if self.passage_prefix.is_empty() {
            self.name.clone()
        } else {
            format!(
                "{} with passage prefix {:?}",
                self.name, self.passage_prefix
            )
        }
    }

    /// Tokens of `text` (without special tokens), as the embedder counts them.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.len())
            .unwrap_or(0)
    }

    /// Tokens the passage prefix adds to every chunk.
    pub fn passage_prefix_tokens(&self) -> usize {
        if self.passage_prefix.is_empty() {
            return 0;
        }
        self.tokenizer
            .encode(self.passage_prefix.as_str(), false)
            .map(|e| e.len())
            .unwrap_or(0)
    }

    /// Embeds `texts` as `kind` on the embedder thread, the model's prefix in front.
    pub async fn embed(&self, kind: TextKind, texts: Vec<String>) -> Result<Vec<Vec<f32>>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = match kind {
            TextKind::Query => &self.query_prefix,
            TextKind::Passage => &self.passage_prefix,
        };
        let texts = if prefix.is_empty() {
            texts
        } else {
            texts.into_iter().map(|t| format!("{prefix}{t}")).collect()
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(EmbedJob { texts, reply })
            .await
            .map_err(|_| "the embedder thread has stopped".to_string())?;
        rx.await
            .map_err(|_| "the embedder thread has stopped".to_string())?
    }
}

/// What the generator thread reports about one request, in order: `Prompt`,
/// any number of `Token`s, then `Done` or `Failed`.
#[derive(Debug)]
pub enum GenEvent {
    /// Every slot is busy: this many questions go first.
    Queued {
        /// 1 = next.
        position: usize,
    },
    /// The prompt is assembled.
    Prompt {
        /// How many of the passages fit in the context budget.
        passages_used: usize,
        /// Whether the last of them was shortened to fit.
        trimmed: bool,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Time to render and tokenize the prompt, ms.
        prompt_ms: f64,
    },
    /// A piece of the answer (never a split UTF-8 character).
    Token(String),
    /// Generation finished.
    Done(Generation),
    /// Generation failed.
    Failed {
        /// What to tell the client (or, for `Fault::Upstream`, to log).
        message: String,
        /// Whose fault it was.
        fault: Fault,
    },
}

/// Who caused a failed generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request (a prompt too long, a bad parameter): 422.
    Client,
    /// This server: 500.
    Server,
    /// The remote generation server: 502.
    Upstream,
}

impl Fault {
    /// The API error for a failure with `message`.
    pub fn error(self, message: String) -> crate::error::ApiError {
        use crate::error::ApiError;
        match self {
            Fault::Client => ApiError::Invalid(message),
            Fault::Server => ApiError::internal(message),
            Fault::Upstream => {
                tracing::warn!(detail = %message, "generation server failed");
                ApiError::Upstream(message)
            }
        }
    }
}

/// One question for the generator.
#[derive(Debug)]
pub struct GenJob {
    /// The question.
    pub question: String,
    /// Retrieved passages, best first; the tail is dropped if the context is too small.
    pub passages: Vec<Passage>,
    /// Earlier turns of the conversation (user and assistant messages).
    pub history: Vec<ragd_generator::Message>,
    /// How long the answer should be.
    pub style: prompt::Style,
    /// The language to answer in (the question's).
    pub language: crate::language::Lang,
    /// Sampling settings.
    pub params: GenerateParams,
    /// Most tokens for prompt and answer together (0: the model's context).
    pub context_budget: usize,
    /// Where events go.
    pub events: mpsc::UnboundedSender<GenEvent>,
}

/// Handle to the generator thread.
#[derive(Clone, Debug)]
pub struct GenWorker {
    tx: mpsc::Sender<GenJob>,
    /// Questions waiting and slots busy.
    load: Arc<SlotLoad>,
    /// Generation slots (threads sharing the weights).
    pub slots: usize,
    /// `general.name` of the model.
    pub name: String,
    /// Context window in tokens.
    pub context: usize,
}

/// The generation queue is full.
#[derive(Debug)]
pub struct QueueFull;

impl GenWorker {
    /// Starts the generator thread; the receiver yields the handle once the model is loaded.
    pub fn spawn(
        path: PathBuf,
        queue_size: usize,
        requantize: bool,
        slots: usize,
    ) -> oneshot::Receiver<Result<GenWorker, String>> {
        let slots = slots.max(1);
        let (ready_tx, ready_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new().name("ragd-generator".into()).spawn(move || {
            let file = if requantize {
                match ragd_generator::requant::fast_copy(&path) {
                    Ok((file, _)) => file,
                    Err(e) => {
                        tracing::warn!(error = %e, model = %path.display(), "cannot re-quantize; using the file as it is");
                        path.clone()
                    }
                }
            } else {
                path.clone()
            };
            let mut generator = match Generator::load(&file) {
                Ok(g) => g,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("generator {}: {e}", path.display())));
                    return;
                }
            };
            // The start every prompt shares (chat markup, system instruction) is
            // read once now; each question then reads only what follows it.
            match fixed_prompt_prefix(&generator) {
                Ok(prefix) => match generator.cache_prefix(&prefix) {
                    Ok(()) => tracing::info!(tokens = prefix.len(), "prompt prefix cached"),
                    Err(e) => tracing::warn!(error = %e, "cannot cache the prompt prefix"),
                },
                Err(e) => tracing::warn!(error = %e, "cannot cache the prompt prefix"),
            }
            let (handle, rx) =
                GenWorker::with_queue(queue_size, slots, generator.name().to_string(), generator.context_length());
            tracing::info!(model = %handle.name, architecture = generator.architecture(), context = handle.context, slots, "generator loaded");
            // Every slot takes the next job from the one queue; the weights are
            // shared, each slot has its own KV cache.
            let rx = Arc::new(std::sync::Mutex::new(rx));
            for i in 1..slots {
                let (mut g, rx, load) = (generator.fork(), Arc::clone(&rx), Arc::clone(&handle.load));
                let spawned = std::thread::Builder::new()
                    .name(format!("ragd-generator-{i}"))
                    .spawn(move || serve_slot(&mut g, &rx, &load));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, slot = i, "cannot start a generation slot");
                }
            }
            let load = Arc::clone(&handle.load);
            if ready_tx.send(Ok(handle)).is_err() {
                return;
            }
            serve_slot(&mut generator, &rx, &load);
        });
        if let Err(e) = spawned {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(format!("cannot start the generator thread: {e}")));
            return rx;
        }
        ready_rx
    }

    /// Slots that send generation to an OpenAI-compatible server.
    pub fn remote(
        config: crate::remote::RemoteConfig,
        queue_size: usize,
        slots: usize,
    ) -> Result<GenWorker, String> {
        let (handle, rx) = GenWorker::with_queue(queue_size, slots, config.model.clone(), 0);
        tracing::info!(url = %config.url, model = %handle.name, slots = handle.slots, "generation on a remote server");
        crate::remote::spawn_slots(config, handle.slots, rx, Arc::clone(&handle.load))?;
        Ok(handle)
    }

    /// The handle and the receiving end of its queue, for slots to take jobs from.
    fn with_queue(
        queue_size: usize,
        slots: usize,
        name: String,
        context: usize,
    ) -> (GenWorker, mpsc::Receiver<GenJob>) {
        let (tx, rx) = mpsc::channel::<GenJob>(queue_size.max(1));
        let load = Arc::new(SlotLoad {
            waiting: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
        });
        (
            GenWorker {
                tx,
                load,
                slots: slots.max(1),
                name,
                context,
            },
            rx,
        )
    }

    /// Slots, busy slots and questions waiting, as JSON for `/ready`.
    pub fn load(&self) -> serde_json::Value {
        serde_json::json!({
            "slots": self.slots,
            "busy": self.load.busy.load(Ordering::SeqCst),
            "waiting": self.load.waiting.load(Ordering::SeqCst),
        })
    }

    /// Queues a job, or fails at once when the queue is full. Returns how many
    /// jobs will be started before this one once a slot frees (0: a slot is free).
    pub fn submit(&self, job: GenJob) -> Result<usize, QueueFull> {
        // Free slots are counted before the job is handed over: afterwards a
        // slot may already be busy with this very job.
        let free = self
            .slots
            .saturating_sub(self.load.busy.load(Ordering::SeqCst));
        let ahead = self.load.waiting.fetch_add(1, Ordering::SeqCst);
        if self.tx.try_send(job).is_err() {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueFull);
        }
        Ok((ahead + 1).saturating_sub(free))
    }
}

/// Questions waiting in the queue and slots generating, shared by the handle
/// (which counts questions in) and the slots (which take them out).
#[derive(Debug)]
pub(crate) struct SlotLoad {
    waiting: AtomicUsize,
    busy: AtomicUsize,
}

impl SlotLoad {
    /// A slot took a job off the queue; it is busy until the guard drops.
    pub(crate) fn take(&self) -> BusySlot<'_> {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        BusySlot(self)
    }
}

/// A slot at work; dropping it frees the slot.
pub(crate) struct BusySlot<'a>(&'a SlotLoad);

impl Drop for BusySlot<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One generation slot: takes jobs from the shared queue until it closes.
fn serve_slot(
    generator: &mut Generator,
    rx: &std::sync::Mutex<mpsc::Receiver<GenJob>>,
    load: &SlotLoad,
) {
    loop {
        let job = match rx.lock() {
            Ok(mut rx) => rx.blocking_recv(),
            Err(_) => return,
        };
        let Some(job) = job else { return };
        let _busy = load.take();
        if !job.events.is_closed() {
            run_job(generator, job); // else the caller left while queued
        }
    }
}

/// The tokens every prompt starts with: the common start of prompts rendered for
/// unlike questions and passages. `generate` checks that a prompt really starts
/// with them before it uses the cached state, so a sample that happens to share
/// a token more than real prompts do costs a cache miss, never a wrong answer.
fn fixed_prompt_prefix(generator: &Generator) -> Result<Vec<u32>, GenerateError> {
    let samples = [
        (
            "Why is the sky blue?",
            Passage {
                title: Some("Sky".into()),
                text: "Rayleigh scattering.".into(),
            },
        ),
        (
            "2 + 2?",
            Passage {
                title: None,
                text: "(4)".into(),
            },
        ),
        (
            "天空为什么是蓝色的？",
            Passage {
                title: Some("[x]".into()),
                text: "瑞利散射。".into(),
            },
        ),
    ];
    let mut prefix: Option<Vec<u32>> = None;
    for (question, passage) in samples {
        let ids = generator.encode_chat(&prompt::messages(
            question,
            &[passage],
            prompt::Style::Concise,
            crate::language::Lang::En,
            &[],
        ))?;
        prefix = Some(match prefix {
            None => ids,
            Some(p) => p
                .iter()
                .zip(&ids)
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| *a)
                .collect(),
        });
    }
    Ok(prefix.unwrap_or_default())
}

fn run_job(generator: &mut Generator, job: GenJob) {
    let GenJob {
        question,
        passages,
        history,
        style,
        language,
        params,
        context_budget,
        events,
    } = job;
    let fail = |e: GenerateError| {
        let client_fault = matches!(
            e,
            GenerateError::PromptTooLong { .. } | GenerateError::InvalidParams(_)
        );
        if !client_fault {
            tracing::error!(error = %e, "generation failed");
        }
        let message = if client_fault {
            e.to_string()
        } else {
            "generation failed".to_string()
        };
        let fault = if client_fault {
            Fault::Client
        } else {
            Fault::Server
        };
        let _ = events.send(GenEvent::Failed { message, fault });
    };
    // The prompt and the room reserved for the answer must fit the budget: drop
    // the lowest-ranked passages, then trim the last one, until they do.
    let started = Instant::now();
    let budget = match context_budget {
        0 => generator.context_length(),
        n => n.min(generator.context_length()),
    };
    let mut passages = passages;
    let mut used = passages.len();
    let mut trimmed = false;
    let prompt = loop {
        let ids = match generator.encode_chat(&prompt::messages(
            &question,
            &passages[..used],
            style,
            language,
            &history,
        )) {
            Ok(ids) => ids,
            Err(e) => return fail(e),
        };
        let excess = (ids.len() + params.max_tokens).saturating_sub(budget);
        if excess == 0 {
            break ids;
        }
        if used > 1 {
            used -= 1;
            continue;
        }
        // One passage left and still too long: shorten its text by about the
        // excess (a token is at least one byte), at a character boundary.
        let text = match passages.first_mut() {
            Some(p) if !p.text.is_empty() => &mut p.text,
            _ => break ids, // nothing left to trim: generate reports the overflow
        };
        let mut cut = text.len().saturating_sub(excess.max(8) * 2);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        trimmed = true;
    };
    if prompt.len() + 1 >= budget {
        return fail(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            context: budget,
        });
    }
    let params = GenerateParams {
        max_tokens: params.max_tokens.min(budget - prompt.len()),
        ..params
    };
    let prompt_ms = started.elapsed().as_secs_f64() * 1e3;
    if events
        .send(GenEvent::Prompt {
            passages_used: used,
            trimmed,
            prompt_tokens: prompt.len(),
            prompt_ms,
        })
        .is_err()
    {
        return;
    }
    match generator.generate(&prompt, &params, |piece| {
        events.send(GenEvent::Token(piece.to_string())).is_ok()
    }) {
        Ok(generation) => {
            let _ = events.send(GenEvent::Done(generation));
        }
        Err(e) => fail(e),
    }
}
