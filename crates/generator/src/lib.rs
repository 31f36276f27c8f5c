//! Chat generation with GGUF models on the CPU.
//!
//! A GGUF file holds everything a chat model needs: quantized weights, the
//! tokenizer ([`gguf_tokenizer`]) and the prompt format ([`chat`]). This crate
//! loads the weights into quantized qwen2/llama/gemma3 models
//! (copies with a faster Q8_0 kernel, [`q8_0`], and an in-place KV cache),
//! picked from `general.architecture`, renders a conversation with the model's own template,
//! and generates with greedy or temperature/top-p sampling, reporting text as it
//! is produced through a callback ([`stream`] keeps multi-byte characters whole).
//!
//! A [`Generator`] owns one KV cache and is driven from one thread; the server
//! runs it on a dedicated OS thread, never on the async runtime.

#![deny(missing_docs)]

pub mod chat;
pub mod draft;
pub mod gguf_tokenizer;
mod models;
pub use ragd_kernels::{kquant, q5_0, q8_0};
pub mod prepared;
pub mod requant;
pub mod stream;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::models::llama as quantized_llama;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::models::qwen2 as quantized_qwen2;
pub use chat::ChatTemplate;
pub use gguf_tokenizer::GgufTokenizer;
pub use ragd_core::{FinishReason, GenerateParams, Generation, Message, Steer};
pub use stream::Utf8Stream;

/// Temperatures below this sample greedily (see [`Generator`]'s sampling).
pub const MIN_TEMPERATURE: f64 = 1e-3;

/// What went wrong loading a model or generating.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The model file cannot be read (operator's fault).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a model this crate can run (operator's fault).
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The chat template failed to compile or render (the model file's fault).
    #[error("chat template: {0}")]
    Template(String),
    /// Tokenisation failed (ours).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The prompt leaves no room to generate within the model's context (caller's fault).
    #[error("the prompt has {prompt} tokens; the model's context holds {context}")]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt: usize,
        /// The context window.
        context: usize,
    },
    /// A sampling parameter is out of range (caller's fault).
    #[error("invalid parameter: {0}")]
    InvalidParams(String),
    /// The tensor computation failed (ours).
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

/// The model with its KV cache. Cloning shares the weights and the cached keys
/// and values (tensor handles), which is how a prefilled prompt prefix is reused.
#[derive(Clone)]
enum Weights {
    Qwen2(quantized_qwen2::ModelWeights),
    Llama(quantized_llama::ModelWeights),
    Gemma3(models::gemma3::ModelWeights),
}

impl Weights {
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Qwen2(m) => m.forward(x, pos),
            Weights::Llama(m) => m.forward(x, pos),
            Weights::Gemma3(m) => m.forward(x, pos),
        }
    }

    fn forward_rows(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Qwen2(m) => m.forward_rows(x, pos),
            Weights::Llama(m) => m.forward_rows(x, pos),
            Weights::Gemma3(m) => m.forward_rows(x, pos),
        }
    }

    fn clear(&mut self) {
        match self {
            Weights::Qwen2(m) => m.clear_kv_cache(),
            Weights::Llama(m) => m.clear_kv_cache(),
            Weights::Gemma3(m) => m.clear_kv_cache(),
        }
    }
}

/// Holds back generated text that could be the start of a stop string, and
/// finds stop strings across the pieces the model produces.
struct StopStrings<'a> {
    stops: &'a [String],
    held: String,
    stopped: bool,
}

impl<'a> StopStrings<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Adds `piece`; returns the text that can be shown now and whether a stop
    /// string was reached (the text before it is returned, the rest dropped).
    fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() || self.stopped {
            return (
                if self.stopped {
                    String::new()
                } else {
                    piece.to_string()
                },
                self.stopped,
            );
        }
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let ready = self.held[..at].to_string();
            self.held.clear();
            return (ready, true);
        }
        // Keep the shortest tail that some stop string starts with.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let ready = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        (ready, false)
    }

    /// The text still held back (at the end of generation).
    fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Tokens fed to the model per forward pass while reading the prompt; bounds the
/// attention matrices' memory for long prompts.
const PREFILL_CHUNK: usize = 512;

/// Tokens drafted per forward pass unless [`Generator::set_draft_tokens`] says
/// otherwise.
pub const DEFAULT_DRAFT_TOKENS: usize = 8;

/// A loaded GGUF chat model with one KV cache.
#[derive(Clone)]
pub struct Generator {
    weights: Weights,
    /// Prompt prefixes and the model state after reading each (see
    /// [`Generator::cache_prefix`]), at most [`MAX_PREFIXES`].
    prefixes: Vec<(Vec<u32>, Weights)>,
    tokenizer: GgufTokenizer,
    template: ChatTemplate,
    stop_ids: Vec<u32>,
    context: usize,
    architecture: String,
    name: String,
    device: Device,
    /// Most tokens drafted per forward pass ([`draft`]); 0 = none.
    draft_tokens: usize,
    /// See [`Generator::prepared_weights_mapped`].
    prepared_mapped: bool,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("name", &self.name)
            .field("architecture", &self.architecture)
            .field("context", &self.context)
            .finish()
    }
}

/// The model file mapped into memory, so the weights the kernels re-lay out
/// are read in place while it loads, and K-quant weights (multiplied in the
/// file's own blocks) are read from it for as long as the model is served
/// (`None` if it cannot be mapped: they are then read through the file).
#[allow(unsafe_code)]
fn map_file(file: &std::fs::File) -> Option<std::sync::Arc<memmap2::Mmap>> {
    // SAFETY: the map is only read; ragd never writes a model file in place
    // (a re-quantized copy is written beside it and renamed, as
    // `scripts/fetch-models` does with its downloads). Someone truncating or
    // rewriting the file in place while it is mapped would make the process
    // fault, as it would llama.cpp, which maps its model files the same way;
    // the README says to replace a model file by renaming a new one over it.
    unsafe { memmap2::Mmap::map(file) }
        .ok()
        .map(std::sync::Arc::new)
}

/// Drops from the process's resident set the model file's pages the load
/// touched (tensors copied or re-laid out from the map, the small f32 ones);
/// the K-quant weights read in place from the map (if any keep it) fault
/// theirs back in from the page cache as they are used. Without this,
/// Qwen2.5-Coder-0.5B's Q6_K tensors, copied at load on AVX-512 VNNI, stayed
/// counted twice while its Q4_K ones kept the map: 0.08 GB more resident
/// after wiki-en-10k (`bench/serve-memory --docs 10000`).
#[allow(unsafe_code)]
fn release_load_pages(map: &memmap2::Mmap) {
    // SAFETY: a read-only shared file mapping: MADV_DONTNEED only drops this
    // process's page table entries, and a later read maps the same file
    // contents again from the page cache (nothing is written through it).
    let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, map.len()) };
}

/// How [`Generator::load_with`] loads a model.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Map the weights from the prepared file beside the model
    /// (`NAME.ragd-prepared`), writing it at the first load, instead of laying
    /// them out in fresh memory at every start. Default: on.
    pub prepared_weights: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            prepared_weights: true,
        }
    }
}

/// Most prompt prefixes a generator keeps read (the answers' and the
/// question translations' starts, with room to spare): each holds its
/// tokens' keys and values, a few MB.
pub const MAX_PREFIXES: usize = 4;

/// The template for files without one (base models): BOS where the file asks
/// for it, then the messages' texts, a blank line between them, nothing after.
const PLAIN_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if not loop.first %}{{ \"\\n\\n\" }}{% endif %}{{ m.content }}{% endfor %}";

/// Texts of end-of-turn tokens across common chat formats; llama.cpp treats the
/// same set as "end of generation".
const EOG_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "</s>",
];

impl Generator {
    /// Loads a GGUF model file, with its prepared weights beside it (read
    /// where valid, else written: see [`prepared`]).
    pub fn load(path: &Path) -> Result<Self, GenerateError> {
        Self::load_with(path, &LoadOptions::default())
    }

    /// Loads a GGUF model file as `options` say.
    pub fn load_with(path: &Path, options: &LoadOptions) -> Result<Self, GenerateError> {
        let io = |source| GenerateError::Io {
            path: path.to_owned(),
            source,
        };
        // Buffered: the metadata is read a few bytes at a time (a tokenizer's
        // 150,000 tokens and merges are one small read each), which unbuffered
        // was hundreds of thousands of system calls at every start.
        let mut file =
            std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).map_err(io)?);
        let ct = gguf_file::Content::read(&mut file).map_err(|e| {
            GenerateError::Unsupported(format!(
                "{} is not a readable GGUF file: {e}",
                path.display()
            ))
        })?;
        let architecture = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok().cloned())
            .ok_or_else(|| {
                GenerateError::Unsupported("GGUF metadata has no general.architecture".into())
            })?;
        let name = ct
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        let ctx_key = format!("{architecture}.context_length");
        let file_context = ct
            .metadata
            .get(&ctx_key)
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(2048) as usize;

        let tokenizer = GgufTokenizer::from_gguf(&ct)?;
        let template_src = match ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned())
        {
            Some(src) => src,
            None => {
                // A base model (no chat tuning): the messages as plain text.
                tracing::warn!(
                    model = %path.display(),
                    "the file has no chat template (a base model?): messages are given to it as plain text"
                );
                PLAIN_TEMPLATE.replace(
                    "{{ bos_token }}",
                    if tokenizer.add_bos {
                        "{{ bos_token }}"
                    } else {
                        ""
                    },
                )
            }
        };
        let tok_text = |id: Option<u32>| {
            id.and_then(|i| tokenizer.tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        let template = ChatTemplate::new(
            &template_src,
            &tok_text(tokenizer.bos_id),
            &tok_text(tokenizer.eos_id),
        )?;

        let mut stop_ids: Vec<u32> = [tokenizer.eos_id, tokenizer.eot_id]
            .into_iter()
            .flatten()
            .collect();
        for t in EOG_TEXTS {
            if let Some(id) = tokenizer.token_id(t) {
                if tokenizer.control[id as usize] && !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }

        let device = Device::Cpu;
        let mapped = map_file(file.get_ref());
        let handle = file.get_ref().try_clone().map_err(io)?;
        let preparation = if options.prepared_weights && mapped.is_some() {
            prepared::Preparation::open(path)
        } else {
            prepared::Preparation::none()
        };
        let map = mapped.as_ref().map(|shared| models::layers::Mapped {
            bytes: &shared[..],
            shared,
            file: &handle,
            prepared: &preparation,
        });
        let (weights, context) = match architecture.as_str() {
            "qwen2" => (
                Weights::Qwen2(quantized_qwen2::ModelWeights::from_gguf(
                    ct, &mut file, &device, map,
                )?),
                file_context,
            ),
            "llama" => (
                Weights::Llama(quantized_llama::ModelWeights::from_gguf(
                    ct, &mut file, &device, map,
                )?),
                // candle's quantized llama precomputes rotary tables for this many positions.
                file_context.min(quantized_llama::MAX_SEQ_LEN),
            ),
            "gemma3" => (
                Weights::Gemma3(models::gemma3::from_gguf(ct, &mut file, &device, map)?),
                file_context,
            ),
            other => {
                return Err(GenerateError::Unsupported(format!(
                    "general.architecture = {other:?}; supported: qwen2, llama, gemma3"
                )))
            }
        };
        if options.prepared_weights {
            preparation.write(path);
        }
        if let Some(map) = &mapped {
            release_load_pages(map);
        }
        let prepared_mapped = preparation.mapped();
        tracing::debug!(model = %path.display(), prepared = prepared_mapped, "weights loaded");
        Ok(Self {
            weights,
            prefixes: Vec::new(),
            tokenizer,
            template,
            stop_ids,
            context,
            architecture,
            name,
            device,
            draft_tokens: DEFAULT_DRAFT_TOKENS,
            prepared_mapped,
        })
    }

    /// Most tokens to draft per forward pass (0 turns drafting off). Drafting
    /// never changes the output; it pays where answers repeat their prompt.
    pub fn set_draft_tokens(&mut self, n: usize) {
        self.draft_tokens = n;
    }

    /// Whether this load mapped its weights from a valid prepared file
    /// (`false`: laid out now, and the file written where it could be).
    pub fn prepared_weights_mapped(&self) -> bool {
        self.prepared_mapped
    }

    /// The model's context window, in tokens.
    pub fn context_length(&self) -> usize {
        self.context
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> &str {
        &self.architecture
    }

    /// `general.name`, or the file name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tokens that end the model's turn.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The tokenizer built from the file.
    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tokenizer
    }

    /// Renders `messages` with the model's template and tokenizes the prompt.
    ///
    /// The template's own markup is tokenized with special tokens recognised; the
    /// messages' contents are tokenized as plain text, so a document that contains
    /// `<|im_start|>` cannot forge a turn of the conversation.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, GenerateError> {
        // Render with placeholders (private-use characters no text contains) and
        // splice the real contents in between the template's pieces.
        let marker = |i: usize| format!("\u{F8F0}{i}\u{F8F1}");
        let placeholders: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message {
                role: m.role.clone(),
                content: marker(i),
            })
            .collect();
        let rendered = self.template.render(&placeholders)?;
        let mut ids = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(open) = rest.find('\u{F8F0}') {
            let Some(close_rel) = rest[open..].find('\u{F8F1}') else {
                break;
            };
            let close = open + close_rel;
            let Ok(i) = rest[open + '\u{F8F0}'.len_utf8()..close].parse::<usize>() else {
                break;
            };
            let Some(msg) = messages.get(i) else { break };
            ids.extend(self.tokenizer.encode_special(&rest[..open])?);
            ids.extend(self.tokenizer.encode_plain(&msg.content)?);
            rest = &rest[close + '\u{F8F1}'.len_utf8()..];
        }
        if rest.contains('\u{F8F0}') {
            // The template transformed the contents (e.g. upper-cased them): render for real.
            let rendered = self.template.render(messages)?;
            return self.tokenizer.encode_special(&rendered);
        }
        ids.extend(self.tokenizer.encode_special(rest)?);
        Ok(ids)
    }

    /// Feeds `ids` at positions `start..` of the KV cache (`start == 0` begins a new
    /// sequence) and returns the logits for the token that follows. For scoring and
    /// tests; [`Generator::generate`] is the way to generate.
    pub fn feed(&mut self, ids: &[u32], start: usize) -> Result<Vec<f32>, GenerateError> {
        if ids.is_empty() || start + ids.len() >= self.context {
            return Err(GenerateError::PromptTooLong {
                prompt: start + ids.len(),
                context: self.context,
            });
        }
        if start == 0 {
            self.weights.clear();
        }
        Ok(self
            .prefill(ids, start)?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?)
    }

    /// Reads `ids` once and keeps the model state after them: a later
    /// [`Generator::generate`] whose prompt starts with `ids` starts from that
    /// state and reads only the rest. Meant for the fixed start of every prompt
    /// of a kind (chat markup, system instruction): each call adds one prefix
    /// (the same ids again replace theirs; past [`MAX_PREFIXES`] the oldest
    /// goes), and a prompt starts from the longest that it begins with. An
    /// empty `ids` drops them all.
    pub fn cache_prefix(&mut self, ids: &[u32]) -> Result<(), GenerateError> {
        if ids.is_empty() {
            self.prefixes.clear();
            return Ok(());
        }
        if ids.len() + 1 >= self.context {
            return Err(GenerateError::PromptTooLong {
                prompt: ids.len(),
                context: self.context,
            });
        }
        self.prefixes.retain(|(p, _)| p != ids);
        self.weights.clear();
        self.prefill(ids, 0)?;
        if self.prefixes.len() >= MAX_PREFIXES {
            self.prefixes.remove(0);
        }
        self.prefixes.push((ids.to_vec(), self.weights.clone()));
        self.weights.clear();
        Ok(())
    }

    /// Reads `prompt` from the cached prefix when it begins with it (and goes on:
    /// the last prompt token's logits are needed), else from scratch. Returns the
    /// logits after the prompt and how many tokens came from the cache.
    fn start(&mut self, prompt: &[u32]) -> Result<(Tensor, usize), GenerateError> {
        if prompt.is_empty() || prompt.len() >= self.context {
            return Err(GenerateError::PromptTooLong {
                prompt: prompt.len(),
                context: self.context,
            });
        }
        let best = self
            .prefixes
            .iter()
            .filter(|(ids, _)| ids.len() < prompt.len() && prompt.starts_with(ids))
            .max_by_key(|(ids, _)| ids.len());
        let cached = match best {
            Some((ids, state)) => {
                self.weights = state.clone();
                ids.len()
            }
            None => {
                self.weights.clear();
                0
            }
        };
        Ok((self.prefill(&prompt[cached..], cached)?, cached))
    }

    /// Reads `prompt` as [`Generator::generate`] does (from the cached prefix
    /// when it applies) and returns the next-token logits and how many prompt
    /// tokens came from the cache.
    pub fn read_prompt(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize), GenerateError> {
        let (logits, cached) = self.start(prompt)?;
        Ok((
            logits
                .squeeze(0)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?,
            cached,
        ))
    }

    /// A second generator on the same weights (shared, not copied) with its own
    /// KV cache, and the same cached prompt prefix: one per generation slot.
    pub fn fork(&self) -> Generator {
        let mut g = self.clone();
        g.weights.clear();
        g
    }

    /// Drops the KV cache of the last generation (the cached prefix stays):
    /// the next generation starts from the prefix or from nothing anyway, so
    /// an idle generator need not hold a long prompt's keys and values.
    pub fn release_cache(&mut self) {
        self.weights.clear();
    }

    /// Lengths of the cached prefixes, oldest first.
    pub fn cached_prefix_lens(&self) -> Vec<usize> {
        self.prefixes.iter().map(|(ids, _)| ids.len()).collect()
    }

    fn prefill(&mut self, ids: &[u32], start: usize) -> Result<Tensor, GenerateError> {
        let mut logits = None;
        for (i, piece) in ids.chunks(PREFILL_CHUNK).enumerate() {
            let input = Tensor::new(piece, &self.device)?.unsqueeze(0)?;
            logits = Some(self.weights.forward(&input, start + i * PREFILL_CHUNK)?);
        }
        logits.ok_or(GenerateError::PromptTooLong {
            prompt: 0,
            context: self.context,
        })
    }

    /// Generates a reply to `messages`; see [`Generator::generate`].
    pub fn chat(
        &mut self,
        messages: &[Message],
        params: &GenerateParams,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, GenerateError> {
        let prompt = self.encode_chat(messages)?;
        self.generate(&prompt, params, on_text)
    }

    /// `logits` limited as `steer` says: minus infinity for the end-of-turn
    /// tokens unless it may end, and for every token whose text (after leading
    /// white space) starts with one of `steer.avoid`.
    fn apply_steer(&self, logits: Tensor, steer: Steer) -> Result<Tensor, GenerateError> {
        if steer == Steer::FREE {
            return Ok(logits);
        }
        let mut values = logits.to_vec1::<f32>()?;
        if !steer.may_end {
            for &id in &self.stop_ids {
                if let Some(v) = values.get_mut(id as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        if !steer.avoid.is_empty() {
            for (v, bytes) in values.iter_mut().zip(&self.tokenizer.token_bytes) {
                let text = String::from_utf8_lossy(bytes);
                let text = text.trim_start();
                if !text.is_empty() && steer.avoid.iter().any(|a| text.starts_with(a)) {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Tensor::new(values, logits.device())?)
    }

    /// Generates from `prompt` token ids. `on_text` receives each complete piece of
    /// text as soon as it is produced and returns `false` to stop generation.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, GenerateError> {
        params
            .validate()
            .map_err(|e| GenerateError::InvalidParams(e.0))?;
        let started = Instant::now();
        let (mut logits, cached) = self.start(prompt)?;
        let max_new = params.max_tokens.min(self.context - prompt.len());
        let (temperature, p, k) = (params.temperature, params.top_p, params.top_k);
        // Below MIN_TEMPERATURE sampling is greedy: dividing the logits by a
        // temperature near zero (1.2e-38, as schemathesis sent) overflows
        // them to infinity and the sampler refused the weights (a 500); at
        // 0.001 the most likely token already takes all the mass.
        let sampling = match (temperature < MIN_TEMPERATURE, k > 0, p < 1.0) {
            (true, _, _) => Sampling::ArgMax,
            (false, true, true) => Sampling::TopKThenTopP { k, p, temperature },
            (false, true, false) => Sampling::TopK { k, temperature },
            (false, false, true) => Sampling::TopP { p, temperature },
            (false, false, false) => Sampling::All { temperature },
        };
        let mut stops = StopStrings::new(&params.stop);
        let mut sampler = LogitsProcessor::from_sampling(params.seed, sampling);
        let mut text = String::new();
        let mut utf8 = Utf8Stream::new();
        let mut completion = 0usize;
        let mut finish = FinishReason::Length;
        let mut first_token_at = None;
        let mut history: Vec<u32> = prompt.to_vec();
        // Logits computed ahead for drafted tokens, in order: each is valid
        // when the token before it is the one drafted.
        let mut ahead: std::collections::VecDeque<(u32, Tensor)> = Default::default();
        let (mut drafted, mut accepted) = (0usize, 0usize);
        let mut draft_len = draft::START_LEN;
        loop {
            let mut step = logits.squeeze(0)?.to_dtype(candle_core::DType::F32)?;
            if params.repeat_penalty != 1.0 {
                let recent = &history[history.len().saturating_sub(params.repeat_last_n)..];
                step = candle_transformers::utils::apply_repeat_penalty(
                    &step,
                    params.repeat_penalty,
                    recent,
                )?;
            }
            if let Some(steer) = params.steer {
                step = self.apply_steer(step, steer(&text))?;
            }
            let next = sampler.sample(&step)?;
            history.push(next);
            first_token_at.get_or_insert_with(Instant::now);
            if self.stop_ids.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            completion += 1;
            let bytes = self
                .tokenizer
                .token_bytes
                .get(next as usize)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if let Some(piece) = utf8.push(bytes) {
                let (ready, stopped) = stops.push(&piece);
                text.push_str(&ready);
                if !ready.is_empty() && !on_text(&ready) {
                    finish = FinishReason::Cancelled;
                    break;
                }
                if stopped {
                    finish = FinishReason::Stop;
                    break;
                }
            }
            if completion >= max_new {
                break;
            }
            if params.deadline.is_some_and(|d| Instant::now() >= d) {
                finish = FinishReason::Timeout;
                break;
            }
            // The logits after `next`, which goes at position `pos`.
            let pos = history.len() - 1;
            match ahead.pop_front() {
                Some((token, row)) if token == next => {
                    accepted += 1;
                    logits = row;
                    if ahead.is_empty() {
                        draft_len = (draft_len * 2).min(self.draft_tokens.max(1));
                    }
                }
                missed => {
                    if missed.is_some() {
                        draft_len = (draft_len / 2).max(1);
                    }
                    ahead.clear();
                    // Draft no further than the answer may go (the logits
                    // after `next` give its next token, each drafted one's the
                    // one after), within the context.
                    let room = (max_new - completion - 1)
                        .min(self.context.saturating_sub(pos + 2))
                        .min(self.draft_tokens)
                        .min(draft_len);
                    let guess = draft::lookup(&history, room);
                    if guess.is_empty() {
                        let input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
                        logits = self.weights.forward(&input, pos)?;
                    } else {
                        let mut ids = Vec::with_capacity(guess.len() + 1);
                        ids.push(next);
                        ids.extend_from_slice(guess);
                        let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
                        let rows = self.weights.forward_rows(&input, pos)?.squeeze(0)?;
                        logits = rows.narrow(0, 0, 1)?;
                        for (i, &token) in guess.iter().enumerate() {
                            ahead.push_back((token, rows.narrow(0, i + 1, 1)?));
                        }
                        drafted += guess.len();
                    }
                }
            }
        }
        if finish != FinishReason::Stop || !stops.stopped {
            let mut rest = utf8.finish().map(|p| stops.push(&p).0).unwrap_or_default();
            if !stops.stopped {
                rest.push_str(&stops.flush());
            }
            text.push_str(&rest);
            if finish != FinishReason::Cancelled && !rest.is_empty() {
                on_text(&rest);
            }
            if stops.stopped {
                finish = FinishReason::Stop;
            }
        }
        let first = first_token_at.unwrap_or_else(Instant::now);
        Ok(Generation {
            text,
            prompt_tokens: prompt.len(),
            completion_tokens: completion,
            finish_reason: finish,
            prefill_ms: (first - started).as_secs_f64() * 1e3,
            decode_ms: first.elapsed().as_secs_f64() * 1e3,
            cached_tokens: cached,
            drafted_tokens: drafted,
            accepted_tokens: accepted,
        })
    }
}

#[cfg(test)]
mod stop_tests {
    use super::StopStrings;

    #[test]
    fn stop_strings_across_pieces() {
        let stops = vec!["\n\nQuestion:".to_string(), "END".to_string()];
        let mut s = StopStrings::new(&stops);
        assert_eq!(s.push("Hello"), ("Hello".into(), false));
        assert_eq!(s.push(" wor"), (" wor".into(), false));
        assert_eq!(
            s.push("ld\n"),
            ("ld".into(), false),
            "a newline may start a stop string"
        );
        assert_eq!(s.push("\nQue"), ("".into(), false));
        assert_eq!(s.push("stion: next"), ("".into(), true));
        let mut s = StopStrings::new(&stops);
        assert_eq!(
            s.push("a\nb"),
            ("a\nb".into(), false),
            "no stop string continues with b"
        );
        assert_eq!(s.push("xEN"), ("x".into(), false));
        assert_eq!(s.flush(), "EN", "held text comes out at the end");
        let none: Vec<String> = Vec::new();
        assert_eq!(
            StopStrings::new(&none).push("ENDLESS"),
            ("ENDLESS".into(), false)
        );
    }
}
