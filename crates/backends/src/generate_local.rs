//! [`Generate`] on a local GGUF model (`ragd-generator`), on its own threads.
//!
//! Model code is CPU-bound and synchronous, so generation runs on dedicated
//! OS threads ("slots"), never on the async runtime. Every slot takes the next
//! job from one bounded queue; the weights are shared, each slot has its own
//! KV cache. A slot streams text back on the job's channel and stops when the
//! caller has gone (a failed send).
//!
//! Context budget: honoured. The slot counts the prompt's tokens with the
//! model's own tokenizer and chat template and fits the prompt
//! ([`ragd_core::Prompt::fit`]): passages are left out lowest-ranked first,
//! then the last one is shortened, until prompt and answer fit.
//! Steering: honoured ([`ragd_core::GenerateParams::steer`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use ragd_core::{BackendError, Fault, GenEvent, GenJob, GenerateParams, GeneratorInfo, Message};
use ragd_generator::{GenerateError, Generator};
use tokio::sync::{mpsc, oneshot};

use crate::queue::{GenerationSlots, Queue, SlotCounters};
use crate::LoadError;

/// How to load the local model.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The GGUF file.
    pub path: PathBuf,
    /// Questions that may wait for a slot.
    pub queue_size: usize,
    /// Answers generated at the same time.
    pub slots: usize,
    /// Run from a copy with Q4_1/Q5_0/Q5_1 tensors re-quantized to Q8_0.
    pub requantize: bool,
    /// Map the prepared weights beside the model (see
    /// `ragd_generator::prepared`).
    pub prepared_weights: bool,
    /// Most tokens drafted per forward pass (see `ragd_generator::draft`).
    pub draft_tokens: usize,
    /// Sets of prompts of one kind for unlike questions (answers, question
    /// translations): the tokens each set's prompts all start with are read
    /// once at load and reused by every prompt of that kind.
    pub prefix_samples: Vec<Vec<Vec<Message>>>,
}

/// Generation on a local GGUF model.
#[derive(Debug, Clone, Copy)]
pub struct LocalGenerator;

impl LocalGenerator {
    /// Loads the model on a new thread and starts the slots; the receiver
    /// yields the slots' handle once the model is loaded, or why it could not be.
    pub fn spawn(options: LocalOptions) -> oneshot::Receiver<Result<GenerationSlots, LoadError>> {
        let slots = options.slots.max(1);
        let (ready_tx, ready_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("ragd-generator".into())
            .spawn(move || {
                let path = &options.path;
                let file = if options.requantize {
                    match ragd_generator::requant::fast_copy(path) {
                        Ok((file, _)) => file,
                        Err(e) => {
                            tracing::warn!(error = %e, model = %path.display(), "cannot re-quantize; using the file as it is");
                            path.clone()
                        }
                    }
                } else {
                    path.clone()
                };
                let load = ragd_generator::LoadOptions {
                    prepared_weights: options.prepared_weights,
                };
                let mut generator = match Generator::load_with(&file, &load) {
                    Ok(mut g) => {
                        g.set_draft_tokens(options.draft_tokens);
                        g
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(LoadError::Model {
                            what: "generator",
                            path: path.clone(),
                            message: e.to_string(),
                        }));
                        return;
                    }
                };
                // The start every prompt shares (chat markup, system instruction) is
                // read once now; each question then reads only what follows it.
                for samples in &options.prefix_samples {
                    match common_prefix(&generator, samples) {
                        Ok(prefix) if prefix.is_empty() => {}
                        Ok(prefix) => match generator.cache_prefix(&prefix) {
                            Ok(()) => tracing::info!(tokens = prefix.len(), "prompt prefix cached"),
                            Err(e) => tracing::warn!(error = %e, "cannot cache a prompt prefix"),
                        },
                        Err(e) => tracing::warn!(error = %e, "cannot cache a prompt prefix"),
                    }
                }
                let (queue, rx) = Queue::new(options.queue_size, slots);
                let handle = GenerationSlots {
                    queue,
                    info: GeneratorInfo {
                        name: generator.name().to_string(),
                        context: generator.context_length(),
                        slots,
                        fits_context: true,
                        steers: true,
                    },
                };
                tracing::info!(
                    model = %handle.info.name,
                    architecture = generator.architecture(),
                    context = handle.info.context,
                    slots,
                    "generator loaded"
                );
                let rx = Arc::new(std::sync::Mutex::new(rx));
                for i in 1..slots {
                    let (mut g, rx, counters) = (
                        generator.fork(),
                        Arc::clone(&rx),
                        Arc::clone(&handle.queue.counters),
                    );
                    let spawned = std::thread::Builder::new()
                        .name(format!("ragd-generator-{i}"))
                        .spawn(move || serve_slot(&mut g, &rx, &counters));
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, slot = i, "cannot start a generation slot");
                    }
                }
                let counters = Arc::clone(&handle.queue.counters);
                if ready_tx.send(Ok(handle)).is_err() {
                    return;
                }
                // What loading and reading the prefixes allocated and dropped.
                crate::release_freed_memory();
                serve_slot(&mut generator, &rx, &counters);
            });
        if let Err(e) = spawned {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(LoadError::Thread {
                what: "generator",
                message: e.to_string(),
            }));
            return rx;
        }
        ready_rx
    }
}

/// One generation slot: takes jobs from the shared queue until it closes.
fn serve_slot(
    generator: &mut Generator,
    rx: &std::sync::Mutex<mpsc::Receiver<GenJob>>,
    counters: &SlotCounters,
) {
    loop {
        let job = match rx.lock() {
            Ok(mut rx) => rx.blocking_recv(),
            Err(_) => return,
        };
        let Some(job) = job else { return };
        let _busy = counters.take();
        if !job.events.is_closed() {
            // (Else the caller left while queued.)
            run_job(generator, job);
            // Idle until the next job: its keys and values go back to the
            // allocator (bench/serve-memory after 300 documents and one
            // /ask: 0.95 GB resident with this, 0.97 GB without).
            generator.release_cache();
            // The pass's buffers stay with the allocator for the next
            // question: handing them back here too (with no question
            // waiting) kept 30 MB fewer resident after an answer, but the
            // next question's first token came 1.6 % later as it faulted
            // them in again (`ragd bench ask --questions 6`, twice each).
        }
    }
}

/// The tokens every prompt starts with: the common start of `samples`
/// rendered with the model's template. `generate` checks that a prompt really
/// starts with them before it uses the cached state, so a sample that happens
/// to share a token more than real prompts do costs a cache miss, never a
/// wrong answer.
fn common_prefix(
    generator: &Generator,
    samples: &[Vec<Message>],
) -> Result<Vec<u32>, GenerateError> {
    let mut prefix: Option<Vec<u32>> = None;
    for messages in samples {
        let ids = generator.encode_chat(messages)?;
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

/// A generation error as the pipeline sees it: the request's fault (a prompt
/// too long, a bad parameter: the message is shown) or ours (logged).
fn backend_error(e: GenerateError) -> BackendError {
    match e {
        GenerateError::PromptTooLong { .. } | GenerateError::InvalidParams(_) => {
            BackendError::client(e)
        }
        other => {
            tracing::error!(error = %other, "generation failed");
            BackendError {
                fault: Fault::Server,
                message: "generation failed".into(),
            }
        }
    }
}

fn run_job(generator: &mut Generator, job: GenJob) {
    let GenJob {
        mut prompt,
        params,
        context_budget,
        events,
    } = job;
    let fail = |e: GenerateError| {
        let _ = events.send(GenEvent::Failed(backend_error(e)));
    };
    // The prompt and the room reserved for the answer must fit the budget.
    let started = Instant::now();
    let budget = match context_budget {
        0 => generator.context_length(),
        n => n.min(generator.context_length()),
    };
    let fitted = prompt.fit(|messages| {
        let ids = generator.encode_chat(messages)?;
        let excess = (ids.len() + params.max_tokens).saturating_sub(budget);
        Ok::<_, GenerateError>((ids, excess))
    });
    let fitted = match fitted {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let ids = fitted.tokens;
    if ids.len() + 1 >= budget {
        return fail(GenerateError::PromptTooLong {
            prompt: ids.len(),
            context: budget,
        });
    }
    let params = GenerateParams {
        max_tokens: params.max_tokens.min(budget - ids.len()),
        ..params
    };
    let prompt_ms = started.elapsed().as_secs_f64() * 1e3;
    if events
        .send(GenEvent::Prompt {
            passages_used: fitted.used,
            trimmed: fitted.trimmed,
            prompt_tokens: ids.len(),
            prompt_ms,
        })
        .is_err()
    {
        return;
    }
    match generator.generate(&ids, &params, |piece| {
        events.send(GenEvent::Token(piece.to_string())).is_ok()
    }) {
        Ok(generation) => {
            let _ = events.send(GenEvent::Done(generation));
        }
        Err(e) => fail(e),
    }
}
