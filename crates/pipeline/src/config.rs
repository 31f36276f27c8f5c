//! The pipeline's settings: the `[retrieval]`, `[generation]`, `[answers]` and
//! `[chunking]` sections of `config/ragd.toml`, each with the checks no type
//! can express. The program reads the file and its layers; each section is
//! owned and checked here.

use ragd_core::GenerateParams;
use serde::{Deserialize, Serialize};

pub use crate::chunk::ChunkerConfig;
pub use crate::error::ConfigError;
use crate::retrieve::{Fusion, Mode};
use crate::route::Side;

/// What the pipeline is told: its sections and a limit of the ingest flow.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// `[retrieval]`
    pub retrieval: RetrievalConfig,
    /// `[generation]`
    pub generation: GenerationConfig,
    /// `[answers]`
    pub answers: AnswersConfig,
    /// `[chunking]`
    pub chunking: ChunkerConfig,
    /// Most documents (or files) in one ingest.
    pub max_documents_per_request: usize,
    /// `[ingest] generate_questions`: questions the answer model writes for
    /// each new chunk ([`crate::enrich`]); 0 = none.
    pub generate_questions: usize,
}

/// `[retrieval]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalConfig {
    /// Default number of chunks per question.
    pub top_k: usize,
    /// Largest `top_k` a request may ask for.
    pub max_top_k: usize,
    /// Passages scoring below this (the cosine of `models.embedder`) are
    /// left out. `None`: the model's calibrated value ([`Thresholds::for_model`]).
    #[serde(default)]
    pub min_score: Option<f32>,
    /// When the best passage scores below this, ragd declines to answer
    /// without asking the model. `None`: the model's calibrated value.
    #[serde(default)]
    pub abstain_below: Option<f32>,
    /// `min_score` for questions scored by `models.multilingual_embedder`
    /// (those not in English).
    #[serde(default)]
    pub multilingual_min_score: Option<f32>,
    /// `abstain_below` for questions scored by `models.multilingual_embedder`.
    #[serde(default)]
    pub multilingual_abstain_below: Option<f32>,
    /// Default retrieval mode.
    pub mode: Mode,
    /// Hybrid fusion method.
    pub fusion: Fusion,
    /// Hybrid: weight of the dense side.
    pub dense_weight: f32,
    /// Hybrid: candidates per side.
    pub candidates: usize,
    /// Also search with an English translation of a question in another
    /// language, made by the answer model ([`crate::translate`]).
    #[serde(default)]
    pub translate_queries: bool,
    /// Evidence selection: the model reads the passages' best strips up to
    /// this many embedder tokens ([`crate::evidence`]); 0 = whole passages.
    #[serde(default)]
    pub evidence_tokens: usize,
}

impl RetrievalConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError(m));
        if self.max_top_k == 0 || self.top_k == 0 || self.top_k > self.max_top_k {
            return invalid(format!(
                "retrieval.top_k = {} must be within 1..=max_top_k ({})",
                self.top_k, self.max_top_k
            ));
        }
        if !(0.0..=1.0).contains(&self.dense_weight) {
            return invalid(format!(
                "retrieval.dense_weight = {} must be within 0..=1",
                self.dense_weight
            ));
        }
        if self.candidates == 0 || self.candidates > 1000 {
            return invalid(format!(
                "retrieval.candidates = {} must be within 1..=1000",
                self.candidates
            ));
        }
        for (key, value) in [
            ("abstain_below", self.abstain_below),
            ("min_score", self.min_score),
            (
                "multilingual_abstain_below",
                self.multilingual_abstain_below,
            ),
            ("multilingual_min_score", self.multilingual_min_score),
        ] {
            if let Some(v) = value.filter(|v| !(-1.0..=1.0).contains(v)) {
                return invalid(format!("retrieval.{key} = {v} must be within -1..=1"));
            }
        }
        Ok(())
    }
}

/// `[generation]`: the answer's defaults and limits (read by the pipeline) and
/// the generation backend's queue and slots (read by the backend).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    /// Default answer length in tokens (`style: detailed`).
    pub max_tokens: usize,
    /// Default answer length in tokens for `style: concise` (the default style).
    pub concise_max_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Default temperature (0 = greedy).
    pub temperature: f64,
    /// Default nucleus mass.
    pub top_p: f64,
    /// Default top-k for sampling (0 = no limit).
    pub top_k: usize,
    /// Default sampler seed.
    pub seed: u64,
    /// Repetition penalty (1.0 = off).
    pub repeat_penalty: f32,
    /// Window of the repetition penalty.
    pub repeat_last_n: usize,
    /// `local` (the GGUF model in this process) or `openai` (the server in `[remote]`).
    pub backend: String,
    /// Requests that may wait for the generator.
    pub queue_size: usize,
    /// Answers generated at the same time (threads sharing the model's weights).
    pub slots: usize,
    /// Run the model from a copy whose Q4_1/Q5_0/Q5_1 tensors are re-quantized
    /// to Q8_0, which candle has fast CPU kernels for (made beside the file once).
    pub requantize: bool,
    /// Map the weights, laid out for the kernels, from a file written beside
    /// the model at the first start (`NAME.ragd-prepared`), instead of laying
    /// them out in fresh memory at every start.
    pub prepared_weights: bool,
    /// Most tokens drafted per forward pass of the local model (prompt
    /// lookup; 0 = off). Never changes the answer.
    pub draft_tokens: usize,
    /// Most tokens for prompt and answer together; 0 = the model's context window.
    pub max_context_tokens: usize,
    /// Seconds a request may take from arrival to its last token; an answer
    /// still being written then ends with finish_reason "timeout".
    pub timeout_s: f64,
}

impl GenerationConfig {
    /// Checks the ranges (the backend's name is checked with its own section).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError(m));
        if self.max_tokens == 0 || self.max_tokens > self.max_tokens_limit {
            return invalid(format!(
                "generation.max_tokens = {} must be within 1..=max_tokens_limit ({})",
                self.max_tokens, self.max_tokens_limit
            ));
        }
        if self.concise_max_tokens == 0 || self.concise_max_tokens > self.max_tokens_limit {
            return invalid(format!(
                "generation.concise_max_tokens = {} must be within 1..=max_tokens_limit ({})",
                self.concise_max_tokens, self.max_tokens_limit
            ));
        }
        if self.queue_size == 0 {
            return invalid("generation.queue_size must be at least 1".into());
        }
        if self.draft_tokens > 32 {
            return invalid(format!(
                "generation.draft_tokens = {} must be within 0..=32",
                self.draft_tokens
            ));
        }
        if !(1..=64).contains(&self.slots) {
            return invalid(format!(
                "generation.slots = {} must be within 1..=64",
                self.slots
            ));
        }
        if self.max_context_tokens != 0 && self.max_context_tokens <= self.max_tokens {
            return invalid(format!(
                "generation.max_context_tokens = {} leaves no room for a prompt with max_tokens = {}",
                self.max_context_tokens, self.max_tokens
            ));
        }
        if !(self.timeout_s > 0.0 && self.timeout_s <= 86_400.0) {
            return invalid(format!(
                "generation.timeout_s = {} must be within (0, 86400]",
                self.timeout_s
            ));
        }
        self.defaults()
            .validate()
            .map_err(|e| ConfigError(format!("generation: {e}")))
    }

    /// The sampling settings a request starts from.
    pub fn defaults(&self) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            stop: Vec::new(),
            seed: self.seed,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            steer: None,
            deadline: None,
        }
    }
}

/// `[ingest]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Questions the answer model writes for each new chunk, searched with it
    /// ([`crate::enrich`]); 0 = none, at most [`crate::enrich::MAX_QUESTIONS`].
    pub generate_questions: usize,
}

/// `[answers]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswersConfig {
    /// A sentence is supported by a passage at this support or above (the
    /// mean of embedding cosine and shared content words, 0–1).
    pub min_support: f32,
    /// Redaction rules: `email`, `phone`, `ipv4`, `card`.
    pub redact: Vec<String>,
    /// Terms replaced by `[blocked]` (whole words, any case).
    pub block_terms: Vec<String>,
}

impl AnswersConfig {
    /// Checks the range and that the content rules compile.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.min_support) {
            return Err(ConfigError(format!(
                "answers.min_support = {} must be within 0..=1",
                self.min_support
            )));
        }
        crate::content::ContentRules::new(&self.redact, &self.block_terms)?;
        Ok(())
    }
}

/// The retrieval score thresholds in force for one embedding model: the
/// configured ones, else the model's calibrated ones. Cosine similarity means
/// different things for different models (all-MiniLM-L6-v2 scores unrelated
/// text around 0, multilingual-e5-small around 0.75), so one number cannot
/// serve both.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Thresholds {
    /// Passages below this are not given to the model.
    pub min_score: f32,
    /// Below this best score ragd declines without asking the model.
    pub abstain_below: f32,
    /// The cosine of unrelated texts for this model (about 0 for
    /// all-MiniLM-L6-v2, 0.75 for multilingual-e5-small): the answer check
    /// measures support above it.
    pub unrelated: f32,
    /// Whether the values came from a calibration or the configuration
    /// (false: an unknown model fell back to all-MiniLM-L6-v2's).
    pub calibrated: bool,
}

impl Thresholds {
    /// Best-passage cosines under hybrid retrieval (`ragd eval thresholds`),
    /// answerable questions against questions the documents do not answer
    /// (far- and near-topic, `eval/unanswerable*.jsonl`), on the Debian FAQ:
    /// - all-MiniLM-L6-v2, English passages (English questions and Chinese
    ///   ones translated): answerable min 0.25, p5 0.38 (2 of 123 below 0.33);
    ///   unanswerable at most 0.29 in English, 0.327 translated from Chinese
    ///   (4 near-topic ones between 0.317 and 0.327, the check let them
    ///   through: hence 0.33, not 0.3).
    /// - multilingual-e5-small alone, English questions and passages:
    ///   answerable 0.818-0.94, unanswerable at most 0.810.
    /// - multilingual-e5-small beside an English model, so scoring the
    ///   passages that model does not read (the Chinese FAQ, Chinese and
    ///   English questions): answerable min 0.864, p5 0.875; unanswerable p95
    ///   0.862, at most 0.872. Cosines between Chinese texts run higher than
    ///   between English ones, hence other values than alone.
    const KNOWN: &[(&str, Side, f32, f32)] = &[
        ("all-MiniLM-L6-v2", Side::Primary, 0.2, 0.33),
        ("multilingual-e5-small", Side::Primary, 0.8, 0.81),
        ("multilingual-e5-small", Side::Multilingual, 0.85, 0.87),
    ];

    /// The cosine of unrelated texts, by model (another model: 0).
    const UNRELATED: &[(&str, f32)] = &[("multilingual-e5-small", 0.75)];

    /// The thresholds for the model named `model` (its directory name) in
    /// the role `side`, with the configured values taking precedence.
    pub fn for_model(
        model: &str,
        side: Side,
        min_score: Option<f32>,
        abstain_below: Option<f32>,
    ) -> Self {
        let known = Self::KNOWN
            .iter()
            .find(|(name, role, _, _)| model.eq_ignore_ascii_case(name) && *role == side)
            .or_else(|| {
                Self::KNOWN
                    .iter()
                    .find(|(name, _, _, _)| model.eq_ignore_ascii_case(name))
            });
        let (_, _, min, abstain) = known.copied().unwrap_or(Self::KNOWN[0]);
        let unrelated = Self::UNRELATED
            .iter()
            .find(|(name, _)| model.eq_ignore_ascii_case(name))
            .map_or(0.0, |(_, u)| *u);
        Self {
            min_score: min_score.unwrap_or(min),
            abstain_below: abstain_below.unwrap_or(abstain),
            unrelated,
            calibrated: known.is_some() || (min_score.is_some() && abstain_below.is_some()),
        }
    }
}
