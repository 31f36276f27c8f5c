//! Generation: sampling settings, results, and the [`Generate`] seam.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::BackendError;
use crate::prompt::Prompt;

/// A sampling parameter out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidParams(pub String);

/// Sampling and length settings of one generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 for greedy decoding; otherwise the softmax temperature.
    pub temperature: f64,
    /// Nucleus sampling mass, in (0, 1]; used when `temperature > 0`.
    pub top_p: f64,
    /// Sample among the `top_k` most likely tokens only (0: no limit); used when
    /// `temperature > 0`, before `top_p`.
    pub top_k: usize,
    /// The answer ends before the first occurrence of any of these strings
    /// (which is not included), with finish reason `stop`.
    pub stop: Vec<String>,
    /// Seed of the sampler.
    pub seed: u64,
    /// Divides the logits of tokens seen in the last `repeat_last_n` tokens
    /// (prompt included, as llama.cpp does); 1.0 turns it off.
    pub repeat_penalty: f32,
    /// How many recent tokens `repeat_penalty` looks at.
    pub repeat_last_n: usize,
    /// Called before each token with the text so far; what it returns limits
    /// the next token (see [`Steer`]). A retrieval answer uses it so that a
    /// small model cannot answer with citation markers alone.
    #[serde(skip)]
    pub steer: Option<fn(&str) -> Steer>,
    /// Stop with [`FinishReason::Timeout`] after the token being produced when
    /// this moment has passed.
    #[serde(skip)]
    pub deadline: Option<Instant>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 0.9,
            top_k: 0,
            stop: Vec::new(),
            seed: 42,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            steer: None,
            deadline: None,
        }
    }
}

impl GenerateParams {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), InvalidParams> {
        let invalid = |m: &str| Err(InvalidParams(m.to_string()));
        if self.max_tokens == 0 {
            return invalid("max_tokens must be at least 1");
        }
        if !(0.0..=5.0).contains(&self.temperature) {
            return invalid("temperature must be within 0..=5");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("top_p must be within (0, 1]");
        }
        if self.stop.iter().any(String::is_empty) {
            return invalid("stop strings must not be empty");
        }
        if !(1.0..=2.0).contains(&self.repeat_penalty) {
            return invalid("repeat_penalty must be within 1..=2");
        }
        Ok(())
    }
}

/// What the next token may be (returned by [`GenerateParams::steer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steer {
    /// Whether an end-of-turn token may come next (the length limit applies
    /// either way).
    pub may_end: bool,
    /// A token whose text, leading white space aside, starts with one of these
    /// may not come next (tokens of white space only stay allowed).
    pub avoid: &'static [&'static str],
}

impl Steer {
    /// No limit.
    pub const FREE: Steer = Steer {
        may_end: true,
        avoid: &[],
    };
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The caller asked to stop (for example, the client went away).
    Cancelled,
    /// The request's deadline passed.
    Timeout,
}

impl FinishReason {
    /// `stop`, `length`, `cancelled` or `timeout`, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Timeout => "timeout",
        }
    }
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// The generated text.
    pub text: String,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (the end-of-turn token not counted).
    pub completion_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Time to process the prompt and sample the first token, ms.
    pub prefill_ms: f64,
    /// Time spent generating after the first token, ms.
    pub decode_ms: f64,
    /// Prompt tokens taken from the cached prefix instead of being read again.
    pub cached_tokens: usize,
    /// Tokens guessed ahead (copied from earlier in the prompt or answer) and
    /// checked in the same forward pass as a generated one; 0 without drafting.
    pub drafted_tokens: usize,
    /// Of those, how many were the tokens the model then chose (each one a
    /// forward pass saved).
    pub accepted_tokens: usize,
}

/// What a generation backend reports about one job, in order: `Prompt`, any
/// number of `Token`s, then `Done` or `Failed` (the pipeline itself may put a
/// `Queued` first).
#[derive(Debug)]
pub enum GenEvent {
    /// Every slot is busy: this many questions go first.
    Queued {
        /// 1 = next.
        position: usize,
    },
    /// The job left the queue and its prompt is ready.
    Prompt {
        /// How many of the prompt's passages fit the context budget.
        passages_used: usize,
        /// Whether the last of them was shortened to fit.
        trimmed: bool,
        /// Tokens in the prompt (0 when the backend cannot count them).
        prompt_tokens: usize,
        /// Time to render and tokenize the prompt, ms.
        prompt_ms: f64,
    },
    /// A piece of the answer (never a split UTF-8 character).
    Token(String),
    /// Generation finished.
    Done(Generation),
    /// Generation failed.
    Failed(BackendError),
}

/// One answer to generate.
#[derive(Debug)]
pub struct GenJob {
    /// The prompt, passages best first.
    pub prompt: Prompt,
    /// Sampling settings.
    pub params: GenerateParams,
    /// Most tokens for prompt and answer together (0: the model's context).
    pub context_budget: usize,
    /// Where the events go; when the receiver is gone the backend stops.
    pub events: mpsc::UnboundedSender<GenEvent>,
}

/// What a generation backend is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratorInfo {
    /// The model's name.
    pub name: String,
    /// Its context window in tokens (0: not known here).
    pub context: usize,
    /// Answers generated at the same time.
    pub slots: usize,
    /// Whether the backend counts the prompt's tokens and fits it to the
    /// context budget ([`crate::Prompt::fit`]); when false the prompt is sent
    /// whole and a prompt too long for the model is the backend's error.
    pub fits_context: bool,
    /// Whether [`GenerateParams::steer`] is applied.
    pub steers: bool,
}

/// Slots busy and questions waiting, as `/ready` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotLoad {
    /// Generation slots.
    pub slots: usize,
    /// Slots generating now.
    pub busy: usize,
    /// Questions in the queue.
    pub waiting: usize,
}

/// The generation queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the generation queue is full")]
pub struct QueueFull;

/// A prompt in, a stream of [`GenEvent`]s out: the seam between the pipeline
/// and the language model.
///
/// Implementations serve a bounded queue with a fixed number of slots; a full
/// queue is refused at once ([`QueueFull`], a 429 for the client). A job whose
/// `events` receiver is dropped (the client went away) stops at its next token.
pub trait Generate: Send + Sync + std::fmt::Debug {
    /// The model and what the backend honours.
    fn info(&self) -> &GeneratorInfo;

    /// Busy slots and waiting questions now.
    fn load(&self) -> SlotLoad;

    /// Queues `job`; returns how many jobs start before it once a slot frees
    /// (0: a slot is free now).
    fn submit(&self, job: GenJob) -> Result<usize, QueueFull>;
}
