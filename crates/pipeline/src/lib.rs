//! ragd's request flow, as stages a reader can name.
//!
//! **Ingest** ([`ingest`]): validate → [`extract`] (files) → [`chunk`] →
//! optionally [`enrich`] (questions each chunk answers, by the answer model) →
//! embed ([`route`]: one or two [`ragd_core::Embed`] models) → store
//! ([`ragd_core::DocumentStore`]).
//!
//! **Ask** ([`ask`]): validate → [`route`] (which model reads the question's
//! language; [`translate`] for other languages) → [`retrieve`] → [`select`] (near-duplicates
//! out, overlapping neighbours merged) → rerank ([`ragd_core::Rerank`]) →
//! [`prompt`] → generate ([`ragd_core::Generate`]) → [`check`] the answer
//! (citations, grounding, refusal, [`language`]) → [`content`] rules. The
//! answer is one stream of events ([`answer`]) that every API encodes.
//!
//! **Summarize** ([`summarize`]): a document, a filter's documents or a
//! query's passages → sections within the context ([`prompt`]) → generate
//! (section summaries, then one of them) → [`check`] every sentence against
//! the passages → only supported sentences delivered; a document's summary
//! kept with it until it changes.
//!
//! Retrieval alone is [`search`]; listing and deleting, [`documents`].
//!
//! The pipeline knows no model framework, storage engine or web framework: the
//! engines are behind `ragd-core`'s traits (implemented in `ragd-backends`),
//! and the HTTP API (`ragd-server`) maps [`Error`] to statuses. Its unit tests
//! run the whole flow on small in-memory implementations of those traits.

#![deny(missing_docs)]

pub mod answer;
pub mod ask;
pub mod check;
pub mod chunk;
pub mod collections;
mod complete;
pub mod config;
pub mod content;
pub mod documents;
pub mod enrich;
pub mod error;
pub mod evidence;
pub mod extract;
pub mod ingest;
pub mod language;
pub mod prompt;
pub mod retrieve;
pub mod route;
pub mod search;
pub mod select;
pub mod summarize;
pub mod translate;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use ragd_core::{DocumentStore, Embed, Generate, Rerank, SlotLoad, TextKind};

use route::{RoutedEmbedder, Side};
use serde::Serialize;

pub use answer::{Answer, AnswerEvent, AnswerKind};
pub use ask::{AskRequest, AskResponse};
pub use config::{PipelineConfig, Thresholds};
pub use error::ConfigError;
pub use error::Error;
pub use ingest::{IngestRequest, IngestResponse, UploadedFile};
pub use search::{SearchRequest, SearchResponse};
pub use summarize::SummarizeRequest;

use content::ContentRules;

/// The loaded pipeline: its settings and the engines behind its seams.
#[derive(Debug)]
pub struct Pipeline {
    config: PipelineConfig,
    embedder: Arc<RoutedEmbedder>,
    /// `None` for ingest-only use (`ragd ingest` without a server).
    generator: Option<Arc<dyn Generate>>,
    reranker: Arc<dyn Rerank>,
    store: Arc<dyn DocumentStore>,
    /// Redaction and block list for answers and snippets.
    content: Arc<ContentRules>,
    /// The retrieval score thresholds of the primary embedder.
    primary_thresholds: Thresholds,
    /// Those of the multilingual embedder, when there is one.
    multilingual_thresholds: Option<Thresholds>,
}

/// The engines a pipeline runs on.
#[derive(Debug)]
pub struct Engines {
    /// Text to vectors: one model, or two routed by language.
    pub embedder: Arc<RoutedEmbedder>,
    /// Prompts to answers; `None` to ingest and search only.
    pub generator: Option<Arc<dyn Generate>>,
    /// Orders retrieved passages ([`ragd_core::NoRerank`] keeps retrieval's order).
    pub reranker: Arc<dyn Rerank>,
    /// Documents, chunks and vectors.
    pub store: Arc<dyn DocumentStore>,
}

/// What `/ready` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Chunks stored.
    pub chunks: Option<usize>,
    /// Documents stored.
    pub documents: Option<usize>,
    /// Generation slots and queue; absent without a generator.
    pub generation: Option<SlotLoad>,
    /// Where the vector index came from at start-up.
    pub index_at_start: Option<&'static str>,
    /// The models' names.
    pub models: Models,
    /// The retrieval thresholds in force, by the languages they apply to.
    pub thresholds: Vec<ThresholdsInForce>,
}

/// The models' names.
#[derive(Debug, Clone, Serialize)]
pub struct Models {
    /// The embedder (both, joined by " + ", when two are routed by language).
    pub embedder: String,
    /// The generator, if one is loaded.
    pub generator: Option<String>,
}

/// The retrieval thresholds for questions in some languages.
#[derive(Debug, Clone, Serialize)]
pub struct ThresholdsInForce {
    /// Which questions: `"en"`, `"all but en"` or `"all"`.
    pub languages: &'static str,
    /// The model whose cosine they bound.
    pub embedder: String,
    /// The thresholds.
    #[serde(flatten)]
    pub thresholds: Thresholds,
}

impl Pipeline {
    /// Assembles the pipeline: checks the chunk sizes against the embedder's
    /// window, compiles the content rules and settles the retrieval thresholds
    /// for this embedder (logged; a warning when it has no calibrated ones).
    pub fn new(config: PipelineConfig, engines: Engines) -> Result<Self, ConfigError> {
        let info = engines.embedder.info();
        let prefix_tokens = if info.passage_prefix.is_empty() {
            0
        } else {
            engines.embedder.count_tokens(&info.passage_prefix)
        };
        config
            .chunking
            .validate(info.max_length.saturating_sub(prefix_tokens))?;
        let content = Arc::new(ContentRules::new(
            &config.answers.redact,
            &config.answers.block_terms,
        )?);
        let r = &config.retrieval;
        let primary_thresholds = Thresholds::for_model(
            &engines.embedder.model(Side::Primary).name,
            Side::Primary,
            r.min_score,
            r.abstain_below,
        );
        let multilingual_thresholds = engines.embedder.is_paired().then(|| {
            Thresholds::for_model(
                &engines.embedder.model(Side::Multilingual).name,
                Side::Multilingual,
                r.multilingual_min_score,
                r.multilingual_abstain_below,
            )
        });
        for t in [Some(primary_thresholds), multilingual_thresholds]
            .into_iter()
            .flatten()
        {
            if !t.calibrated {
                tracing::warn!(
                    min_score = %t.min_score,
                    abstain_below = %t.abstain_below,
                    "no calibrated retrieval thresholds for an embedder: all-MiniLM-L6-v2's are used; \
                     set them in [retrieval] (measure with `ragd eval qa`)"
                );
            }
        }
        Ok(Self {
            config,
            embedder: engines.embedder,
            generator: engines.generator,
            reranker: engines.reranker,
            store: engines.store,
            content,
            primary_thresholds,
            multilingual_thresholds,
        })
    }

    /// The thresholds for scores given by `side`'s model.
    pub(crate) fn side_thresholds(&self, side: Side) -> Option<Thresholds> {
        match side {
            Side::Multilingual => self.multilingual_thresholds,
            Side::Primary => Some(self.primary_thresholds),
        }
    }

    /// The thresholds by the languages they apply to, for `/ready`.
    fn thresholds_in_force(&self) -> Vec<ThresholdsInForce> {
        let e = &self.embedder;
        let mut out = vec![ThresholdsInForce {
            languages: match (e.is_paired(), e.model(Side::Primary).multilingual) {
                (true, _) | (false, false) => "en",
                (false, true) => "all",
            },
            embedder: e.model(Side::Primary).name.clone(),
            thresholds: self.primary_thresholds,
        }];
        if let Some(t) = self.multilingual_thresholds {
            out.push(ThresholdsInForce {
                languages: "all but en",
                embedder: e.model(Side::Multilingual).name.clone(),
                thresholds: t,
            });
        }
        out
    }

    /// What `/ready` reports: the models, the thresholds, the documents, and
    /// the generation slots.
    pub async fn status(&self) -> Status {
        let stats = self.store.stats().await.ok();
        Status {
            chunks: stats.as_ref().map(|s| s.chunks),
            documents: stats.as_ref().map(|s| s.documents),
            generation: self.generator.as_ref().map(|g| g.load()),
            index_at_start: stats.and_then(|s| s.index_at_start),
            models: Models {
                embedder: self.embedder.info().name.clone(),
                generator: self.generator.as_ref().map(|g| g.info().name.clone()),
            },
            thresholds: self.thresholds_in_force(),
        }
    }

    /// Whether ingest has the answer model write questions per chunk
    /// (`ingest.generate_questions`, with a model loaded).
    pub fn writes_questions(&self) -> bool {
        self.generator.is_some() && self.config.generate_questions > 0
    }

    /// The names of the generator (when one is loaded) and the embedder.
    pub fn model_names(&self) -> (Option<String>, String) {
        (
            self.generator.as_ref().map(|g| g.info().name.clone()),
            self.embedder.info().name.clone(),
        )
    }

    /// Writes what the store keeps only in memory, so the next start is fast.
    pub async fn flush(&self) -> Result<(), Error> {
        Ok(self.store.flush().await?)
    }

    /// Embeds `texts` as passages: the vectors and the tokens read.
    pub async fn embeddings(&self, texts: Vec<String>) -> Result<(Vec<Vec<f32>>, usize), Error> {
        if texts.is_empty() || texts.len() > 256 {
            return Err(Error::Invalid("input: 1 to 256 texts".into()));
        }
        if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(Error::Invalid(format!("input[{i}]: empty text")));
        }
        // The model reads at most its window of each text.
        let window = self.embedder.info().max_length;
        let tokens = texts
            .iter()
            .map(|t| self.embedder.count_tokens(t).min(window))
            .sum();
        let vectors = self.embedder.embed(TextKind::Passage, texts).await?;
        Ok((vectors, tokens))
    }
}
