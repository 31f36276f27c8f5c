//! The answer's one event loop: the generation backend's events become
//! [`AnswerEvent`]s — the passages the model read, the answer's text with the
//! content rules applied as it streams, then the checked answer — which the
//! JSON answer, the SSE stream and the OpenAI-style API each encode in their
//! own format. Dropping an [`Answer`] drops the backend's event channel, which
//! stops generation at its next token (a client that goes away costs nothing
//! more).

use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use ragd_core::{Embed, GenEvent, Generation, TextKind};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::check::{self, CitedBy};
use crate::content::{self, ContentRules, StreamFilter, Tally};
use crate::error::Error;
use crate::language::{self, Lang};
use crate::prompt::Style;
use crate::select::Source;
use crate::Pipeline;

/// What a client learns about an answer, in order: perhaps `Queued`, then
/// `Sources`, any number of `Token`s, then `Done` or `Failed`.
#[derive(Debug)]
pub enum AnswerEvent {
    /// Every generation slot is busy: this many questions go first.
    Queued {
        /// 1 = next.
        position: usize,
    },
    /// The passages the model reads (content rules applied).
    Sources(Vec<Source>),
    /// A piece of the answer's text (content rules applied; never a split
    /// UTF-8 character).
    Token(String),
    /// The checked answer.
    Done(Box<AskResponse>),
    /// Generation failed after the stream started.
    Failed(Error),
}

/// Keeps a summary's finished text for the next request.
pub(crate) type KeepText = Box<dyn FnOnce(&Generation) + Send + Sync>;

/// What makes a summary's answer differ from a question's (see
/// [`crate::summarize`]).
pub(crate) struct SummaryMode {
    /// Every source is checked against, whatever the prompt held (a reduce
    /// step's prompt holds section summaries, not the passages).
    pub all_sources: bool,
    /// Called with the model's text when it ended by itself or by length:
    /// keeps it for the next request.
    pub keep: Option<KeepText>,
    /// The text was kept from an earlier request: no tokens were spent.
    pub replayed: bool,
}

impl std::fmt::Debug for SummaryMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SummaryMode")
            .field("all_sources", &self.all_sources)
            .field("keep", &self.keep.is_some())
            .field("replayed", &self.replayed)
            .finish()
    }
}

/// Token counts.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// Prompt tokens not read again: the fixed start of the prompt, read once
    /// when the model loaded.
    pub cached_tokens: usize,
    /// Tokens guessed ahead from the prompt and checked with a generated one
    /// in the same forward pass (`generation.draft_tokens`; 0 when off or remote).
    pub drafted_tokens: usize,
    /// Of those, the tokens the model chose too (forward passes saved).
    pub accepted_tokens: usize,
}

impl Usage {
    /// No tokens: nothing was generated.
    fn none() -> Self {
        Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            cached_tokens: 0,
            drafted_tokens: 0,
            accepted_tokens: 0,
        }
    }
}

/// Per-stage times in milliseconds.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Timings {
    /// Embedding the question and searching.
    pub retrieval_ms: f64,
    /// Rendering and tokenizing the prompt (after waiting for the generator).
    pub prompt_ms: f64,
    /// Prefill and decoding.
    pub generation_ms: f64,
    /// From the request to the first answer token.
    pub first_token_ms: Option<f64>,
    /// The whole request.
    pub total_ms: f64,
}

/// The languages of a question and its answer.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LanguageCheck {
    /// The question's language (the one the answer is asked for).
    pub question: Lang,
    /// The answer's, when it was generated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<Lang>,
    /// Whether they are the same.
    pub matches: bool,
}

/// How well an answer is supported by its passages.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Grounding {
    /// The sentences' best support, averaged by length (0–1).
    pub score: f32,
    /// Whether sentences making up at least half of the answer are supported by
    /// some passage. False marks an answer the passages do not back.
    pub supported: bool,
    /// Each sentence, its best support and the passage giving it.
    pub sentences: Vec<check::SentenceSupport>,
}

/// The answer to `POST /ask` (also the `done` event of a stream).
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AskResponse {
    /// The answer ragd delivers (after the citation check and the content
    /// rules): the model's when its sentences are supported by the passages,
    /// else a quote from the top passage, else a statement, in the question's
    /// language, that the documents do not hold the answer (see `answer_kind`).
    pub answer: String,
    /// True only when the delivered answer is supported by the passages (a
    /// checked generated answer, or a quote); false when ragd declined.
    pub answerable: bool,
    /// What the answer is: `generated` (the model's, checked and supported),
    /// `extractive` (the model's was not supported: the best sentences of the
    /// top passage, quoted with their citation) or `declined`.
    pub answer_kind: AnswerKind,
    /// The model's own answer (checked, content rules applied) when ragd
    /// delivers something else; a streamed answer's tokens were this text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_answer: Option<String>,
    /// The question's language and whether the answer is in it.
    pub language: LanguageCheck,
    /// The answer style asked for.
    pub style: Style,
    /// Passages the answer cites, in order of first citation.
    pub citations: Vec<Source>,
    /// Citations the check removed or pointed at another passage.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub citation_changes: Vec<check::Change>,
    /// How well the passages support each sentence of the answer; absent when
    /// no answer was generated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grounding: Option<Grounding>,
    /// Content rules that changed the answer or the snippets, with counts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub content_rules: Vec<content::Applied>,
    /// The passages the model was given, best first, numbered as in the prompt.
    pub sources: Vec<Source>,
    /// Retrieved passages left out of the prompt to fit the context budget
    /// (chunk ids, lowest-ranked last); empty when all fitted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
    /// The chunk id of the passage shortened to fit, when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trimmed: Option<String>,
    /// What the generation backend did not apply to this answer (only a
    /// remote backend leaves anything out): `context_budget` (the prompt was
    /// sent whole, not fitted to the context) and `steering` (the answer was
    /// not kept from being citation markers alone).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_applied: Vec<String>,
    /// Why generation ended: `stop`, `length`, `timeout`, `cancelled` or `no_sources`.
    pub finish_reason: String,
    /// The generator's model name.
    pub model: String,
    /// Token counts.
    pub usage: Usage,
    /// Stage times.
    pub timings: Timings,
    /// A summary kept from an earlier request, checked again but not
    /// generated again (`usage` is then zero).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
}

/// What a delivered answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AnswerKind {
    /// The model's answer, its sentences supported by the passages.
    Generated,
    /// Sentences quoted from the top passage, because the model's answer was
    /// not supported.
    Extractive,
    /// No answer: nothing relevant enough was found, the model said the
    /// passages do not answer, or neither its answer nor a quote holds up.
    Declined,
}

/// Where the loop is.
#[derive(Debug)]
enum State {
    /// Declined without the model: `Sources` (none), then `Done`.
    Declined { sources_sent: bool },
    /// Reading the backend's events; `started` once the prompt is read.
    Running { started: bool },
    /// The text is complete and its held-back tail was sent: check it next.
    Checking(Generation),
    /// `Done` or `Failed` was sent.
    Finished,
}

/// An answer in progress. Read it with [`Answer::next`], as a stream with
/// [`Answer::into_stream`], or to its end with [`Answer::collect`].
#[derive(Debug)]
pub struct Answer {
    embedder: Arc<crate::route::RoutedEmbedder>,
    /// The cosine of unrelated texts for the primary and the multilingual
    /// model (see [`check::support_matrix`]).
    floors: [f32; 2],
    content: Arc<ContentRules>,
    min_support: f32,
    /// Below this cosine with the question a sentence is no answer to it
    /// (the retrieval threshold for passages, `Thresholds::min_score`).
    min_score: f32,
    events: Option<mpsc::UnboundedReceiver<GenEvent>>,
    filter: StreamFilter,
    progress: Progress,
    state: State,
    /// Set for a summary.
    summary: Option<SummaryMode>,
}

/// Accumulates an answer's events into the final response.
#[derive(Debug)]
struct Progress {
    run_sources: Vec<Source>,
    used: usize,
    trimmed: bool,
    prompt_ms: f64,
    first_token_ms: Option<f64>,
    started: Instant,
    retrieval_ms: f64,
    model: String,
    language: Lang,
    style: Style,
    /// Sentences addressed to the model taken out of the passages.
    defused: usize,
    /// What the generation backend does not apply (see `AskResponse::not_applied`).
    not_applied: Vec<String>,
    /// The question's embedding, to find the sentences that answer it.
    query_vector: Vec<f32>,
    /// The question, for the words a quote must share with it.
    question: String,
}

impl Answer {
    /// An answer to a question asked at `started`, before its passages are known.
    pub(crate) fn new(
        pipeline: &Pipeline,
        started: Instant,
        retrieval_ms: f64,
        language: Lang,
        style: Style,
    ) -> Self {
        let info = pipeline.generator.as_ref().map(|g| g.info());
        let model = info.map(|i| i.name.clone()).unwrap_or_default();
        let mut not_applied = Vec::new();
        if info.is_some_and(|i| !i.fits_context) {
            not_applied.push("context_budget".to_string());
        }
        if info.is_some_and(|i| !i.steers) {
            not_applied.push("steering".to_string());
        }
        Self {
            embedder: pipeline.embedder.clone(),
            floors: [
                crate::route::Side::Primary,
                crate::route::Side::Multilingual,
            ]
            .map(|side| pipeline.side_thresholds(side).map_or(0.0, |t| t.unrelated)),
            content: Arc::clone(&pipeline.content),
            min_support: pipeline.config.answers.min_support,
            // Set with the passages (`generating`).
            min_score: f32::MIN,
            events: None,
            filter: pipeline.content.stream(),
            progress: Progress {
                run_sources: Vec::new(),
                used: 0,
                trimmed: false,
                prompt_ms: 0.0,
                first_token_ms: None,
                started,
                retrieval_ms,
                model,
                language,
                style,
                defused: 0,
                not_applied,
                query_vector: Vec::new(),
                question: String::new(),
            },
            state: State::Finished,
            summary: None,
        }
    }

    /// A summary rather than an answer: checked and delivered as
    /// [`SummaryMode`] says.
    pub(crate) fn summarizing(mut self, mode: SummaryMode) -> Self {
        self.summary = Some(mode);
        self
    }

    /// Declined without asking the model.
    pub(crate) fn declined(self) -> Self {
        Self {
            state: State::Declined {
                sources_sent: false,
            },
            ..self
        }
    }

    /// Generating from `sources`, the backend's events on `events`.
    pub(crate) fn generating(
        mut self,
        question: &str,
        sources: Vec<Source>,
        query_vector: Vec<f32>,
        min_score: f32,
        events: mpsc::UnboundedReceiver<GenEvent>,
    ) -> Self {
        self.min_score = min_score;
        self.progress.question = question.to_string();
        self.progress.query_vector = query_vector;
        self.progress.defused = sources
            .iter()
            .map(|s| crate::prompt::defuse(&s.text).1)
            .sum();
        self.progress.used = sources.len();
        self.progress.run_sources = sources;
        self.events = Some(events);
        self.state = State::Running { started: false };
        self
    }

    /// The next event; `None` after `Done` or `Failed`.
    pub async fn next(&mut self) -> Option<AnswerEvent> {
        loop {
            match std::mem::replace(&mut self.state, State::Finished) {
                State::Finished => return None,
                State::Declined {
                    sources_sent: false,
                } => {
                    self.state = State::Declined { sources_sent: true };
                    return Some(AnswerEvent::Sources(Vec::new()));
                }
                State::Declined { sources_sent: true } => {
                    let progress = std::mem::replace(&mut self.progress, Progress::empty());
                    return Some(AnswerEvent::Done(Box::new(progress.no_sources())));
                }
                State::Checking(generation) => {
                    let response = self.check(generation).await;
                    return Some(AnswerEvent::Done(Box::new(response)));
                }
                State::Running { started } => {
                    let events = self.events.as_mut()?;
                    let Some(event) = events.recv().await else {
                        return Some(AnswerEvent::Failed(Error::internal(
                            "the generator stopped without an answer",
                        )));
                    };
                    self.state = State::Running { started };
                    match event {
                        // A position that arrives after the answer started is stale.
                        GenEvent::Queued { .. } if started => continue,
                        GenEvent::Queued { position } => {
                            return Some(AnswerEvent::Queued { position })
                        }
                        GenEvent::Prompt {
                            passages_used,
                            trimmed,
                            prompt_ms,
                            ..
                        } => {
                            self.state = State::Running { started: true };
                            let used = match &self.summary {
                                Some(m) if m.all_sources => usize::MAX,
                                _ => passages_used,
                            };
                            self.progress.prompt_ready(used, trimmed, prompt_ms);
                            return Some(AnswerEvent::Sources(
                                self.progress.sources_for_client(&self.content),
                            ));
                        }
                        GenEvent::Token(text) => {
                            self.progress.token();
                            // The content rules hold back the last few characters
                            // so that a match split across tokens is caught whole.
                            let text = self.filter.push(&text);
                            if !text.is_empty() {
                                return Some(AnswerEvent::Token(text));
                            }
                        }
                        GenEvent::Done(generation) => {
                            if let Some(keep) = self.summary.as_mut().and_then(|m| m.keep.take()) {
                                if matches!(
                                    generation.finish_reason,
                                    ragd_core::FinishReason::Stop | ragd_core::FinishReason::Length
                                ) {
                                    keep(&generation);
                                }
                            }
                            let rest = self.filter.finish();
                            if rest.is_empty() {
                                let response = self.check(generation).await;
                                self.state = State::Finished;
                                return Some(AnswerEvent::Done(Box::new(response)));
                            }
                            self.state = State::Checking(generation);
                            return Some(AnswerEvent::Token(rest));
                        }
                        GenEvent::Failed(e) => {
                            self.state = State::Finished;
                            return Some(AnswerEvent::Failed(e.into()));
                        }
                    }
                }
            }
        }
    }

    /// The events as a stream (ends after `Done` or `Failed`).
    pub fn into_stream(self) -> impl Stream<Item = AnswerEvent> + Send {
        futures::stream::unfold(self, |mut answer| async move {
            answer.next().await.map(|event| (event, answer))
        })
    }

    /// Reads the answer to its end: the checked answer, or why it failed.
    pub async fn collect(mut self) -> Result<AskResponse, Error> {
        while let Some(event) = self.next().await {
            match event {
                AnswerEvent::Done(response) => return Ok(*response),
                AnswerEvent::Failed(e) => return Err(e),
                AnswerEvent::Queued { .. } | AnswerEvent::Sources(_) | AnswerEvent::Token(_) => {}
            }
        }
        Err(Error::internal("the answer ended without a result"))
    }

    /// Ask stage "check the answer": reads the answer's citation markers
    /// against what its sentences say, re-points or removes unsupported ones,
    /// attributes unmarked sentences, measures grounding (see [`check`]),
    /// notes a refusal and the answer's language, applies the content rules,
    /// and decides what is delivered ([`Answer::deliver`]).
    async fn check(&mut self, g: Generation) -> AskResponse {
        let mut progress = std::mem::replace(&mut self.progress, Progress::empty());
        let query_vector = std::mem::take(&mut progress.query_vector);
        let question = std::mem::take(&mut progress.question);
        let sources = progress.sources();
        let segments = check::segments(&g.text, sources.len());
        let texts: Vec<String> = segments.iter().map(|s| s.text.clone()).collect();
        let checked = match self.embedder.embed(TextKind::Query, texts).await {
            Ok(vectors) => {
                let sentences: Vec<(&str, &[f32])> = segments
                    .iter()
                    .zip(&vectors)
                    .map(|(seg, v)| (seg.text.as_str(), v.as_slice()))
                    .collect();
                let passages: Vec<(&str, &[f32])> = sources
                    .iter()
                    .map(|s| (s.text.as_str(), s.vector.as_slice()))
                    .collect();
                // Each sentence was embedded by its own language's model.
                let floors: Vec<f32> = segments
                    .iter()
                    .map(|seg| {
                        match self
                            .embedder
                            .scoring_side(crate::language::detect(&seg.text))
                        {
                            crate::route::Side::Primary => self.floors[0],
                            crate::route::Side::Multilingual => self.floors[1],
                        }
                    })
                    .collect();
                let support = check::support_matrix(&sentences, &floors, &passages);
                Some(check::check(&g.text, &segments, &support, self.min_support))
            }
            Err(e) => {
                tracing::warn!(error = %e, "citation check skipped");
                None
            }
        };
        let mut response = progress.finish(g, checked, &self.content);
        if let Some(mode) = &self.summary {
            if mode.replayed {
                response.cached = true;
                response.usage = Usage::none();
                response.timings.generation_ms = 0.0;
            }
            return deliver_summary(response);
        }
        self.deliver(response, &question, &query_vector).await
    }

    /// Delivers the model's answer only when the check found its sentences
    /// supported by the passages. A refusal is declined in the question's
    /// language. An unsupported answer is replaced by the sentences of the top
    /// passage that best match the question, quoted with their citation —
    /// when one matches it at least as well as a passage must to be shown to
    /// the model at all — and is declined otherwise. An answer the check could
    /// not run on (the embedder failed) stays, its citations marked unverified.
    async fn deliver(&self, response: AskResponse, question: &str, query: &[f32]) -> AskResponse {
        if language::is_refusal(&response.answer) {
            return declined(response);
        }
        match &response.grounding {
            None => response,
            Some(g) if g.supported => response,
            Some(_) => match self.extract(&response, question, query).await {
                Some(quoted) => quoted,
                None => declined(response),
            },
        }
    }

    /// The extractive answer: the sentences of the top passage closest to the
    /// question (one for a concise answer, two for a detailed one, in the
    /// passage's order), quoted, with the passage's citation; `None` when no
    /// sentence is close enough to the question to answer it.
    async fn extract(
        &self,
        response: &AskResponse,
        question: &str,
        query: &[f32],
    ) -> Option<AskResponse> {
        let top = response.sources.first()?;
        let sentences: Vec<String> = check::segments(&top.text, 0)
            .into_iter()
            .map(|s| s.text)
            .collect();
        if sentences.is_empty() || query.is_empty() {
            return None;
        }
        // Each sentence is embedded with the passage's title in front, as
        // chunks are: "Its summit is 8,849 metres high" says what "its" is.
        let inputs: Vec<String> = sentences
            .iter()
            .map(
                |s| match top.title.as_deref().filter(|t| !t.trim().is_empty()) {
                    Some(title) => format!("{}\n{s}", title.trim()),
                    None => s.clone(),
                },
            )
            .collect();
        let vectors = match self.embedder.embed(TextKind::Passage, inputs).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "extractive answer skipped");
                return None;
            }
        };
        // A sentence that shares no content word with the question (the same
        // words the support check counts) cannot be shown to address it,
        // however close its embedding: on the Debian FAQ such quotes answered
        // 5 of the 6 near-topic questions the corpus does not answer.
        let asked: std::collections::HashSet<String> =
            check::content_words(question).into_iter().collect();
        let mut scored: Vec<(usize, f32)> = vectors
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                check::content_words(&sentences[*i])
                    .iter()
                    .any(|w| asked.contains(w))
            })
            .map(|(i, v)| (i, v.iter().zip(query).map(|(a, b)| a * b).sum()))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        let keep = match response.style {
            Style::Concise => 1,
            Style::Detailed => 2,
        };
        let mut chosen: Vec<usize> = scored
            .iter()
            .take(keep)
            .filter(|(_, score)| *score >= self.min_score)
            .map(|(i, _)| *i)
            .collect();
        if chosen.is_empty() {
            return None;
        }
        // A sentence ending in a colon announces what follows (a list, a
        // command): quote the line after it too.
        for i in chosen.clone() {
            if sentences[i].trim_end().ends_with(':') && i + 1 < sentences.len() {
                chosen.push(i + 1);
            }
        }
        chosen.sort_unstable();
        chosen.dedup();
        let quote = chosen
            .iter()
            .map(|&i| sentences[i].as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let answer = format!("“{quote}” [{}]", top.n);
        let answer_language = language::detect(&answer);
        let mut quoted = response.clone();
        quoted.model_answer = Some(response.answer.clone());
        quoted.answer = answer;
        quoted.answer_kind = AnswerKind::Extractive;
        quoted.answerable = true;
        quoted.language.answer = Some(answer_language);
        quoted.language.matches = answer_language == quoted.language.question;
        quoted.citations = vec![Source {
            cited_by: Some(CitedBy::Quoted),
            verified: Some(true),
            ..top.clone()
        }];
        quoted.citation_changes = Vec::new();
        quoted.grounding = Some(Grounding {
            score: 1.0,
            supported: true,
            sentences: chosen
                .iter()
                .map(|&i| check::SentenceSupport {
                    text: sentences[i].clone(),
                    score: 1.0,
                    passage: Some(top.n),
                    supported: true,
                })
                .collect(),
        });
        Some(quoted)
    }
}

/// A summary as delivered: only its sentences some passage supports, each
/// with the passage that does (the model's whole text kept aside when any
/// was left out); declined when none is supported, or the model said the
/// passages hold nothing to summarise. A summary the check could not run on
/// stays, its citations marked unverified, as an answer's would.
fn deliver_summary(mut response: AskResponse) -> AskResponse {
    if language::is_refusal(&response.answer) {
        return declined(response);
    }
    let Some(grounding) = &response.grounding else {
        return response;
    };
    if grounding.sentences.iter().all(|s| s.supported) && !grounding.sentences.is_empty() {
        return response;
    }
    let kept: Vec<&check::SentenceSupport> =
        grounding.sentences.iter().filter(|s| s.supported).collect();
    if kept.is_empty() {
        return declined(response);
    }
    let text = kept
        .iter()
        .map(|s| match s.passage {
            Some(n) => format!("{} [{n}]", s.text.trim()),
            None => s.text.trim().to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ");
    let cited: std::collections::HashSet<usize> = kept.iter().filter_map(|s| s.passage).collect();
    response.citations.retain(|c| cited.contains(&c.n));
    for n in kept.iter().filter_map(|s| s.passage) {
        if !response.citations.iter().any(|c| c.n == n) {
            if let Some(source) = response.sources.iter().find(|s| s.n == n) {
                response.citations.push(Source {
                    cited_by: Some(CitedBy::Similarity),
                    verified: Some(true),
                    ..source.clone()
                });
            }
        }
    }
    response.model_answer = Some(std::mem::replace(&mut response.answer, text));
    let language = language::detect(&response.answer);
    response.language.answer = Some(language);
    response.language.matches = language == response.language.question;
    if let Some(g) = response.grounding.as_mut() {
        g.supported = true;
    }
    response
}

/// `response` declined: the answer says, in the question's language, that the
/// documents do not hold it; the model's text is kept aside.
fn declined(mut response: AskResponse) -> AskResponse {
    response.model_answer = Some(std::mem::replace(
        &mut response.answer,
        response.language.question.not_in_documents().to_string(),
    ));
    response.answer_kind = AnswerKind::Declined;
    response.answerable = false;
    response.citations = Vec::new();
    response.citation_changes = Vec::new();
    response
}

impl Progress {
    /// A placeholder left behind when the real progress is consumed.
    fn empty() -> Self {
        Progress {
            run_sources: Vec::new(),
            used: 0,
            trimmed: false,
            prompt_ms: 0.0,
            first_token_ms: None,
            started: Instant::now(),
            retrieval_ms: 0.0,
            model: String::new(),
            language: Lang::En,
            style: Style::Concise,
            defused: 0,
            not_applied: Vec::new(),
            query_vector: Vec::new(),
            question: String::new(),
        }
    }
}

impl Progress {
    /// Notes that the prompt uses the first `used` sources.
    fn prompt_ready(&mut self, used: usize, trimmed: bool, prompt_ms: f64) {
        self.used = used.min(self.run_sources.len());
        self.trimmed = trimmed;
        self.prompt_ms = prompt_ms;
    }

    /// Notes an answer token.
    fn token(&mut self) {
        self.first_token_ms
            .get_or_insert_with(|| self.started.elapsed().as_secs_f64() * 1e3);
    }

    /// The sources the prompt uses.
    fn sources(&self) -> &[Source] {
        &self.run_sources[..self.used]
    }

    /// The sources the prompt uses, as a client may see them (content rules
    /// applied to their snippets).
    fn sources_for_client(&self, rules: &ContentRules) -> Vec<Source> {
        let mut tally = Tally::default();
        self.sources()
            .iter()
            .map(|s| Source {
                snippet: rules.apply(&s.snippet, &mut tally),
                text: rules.apply(&s.text, &mut tally),
                ..s.clone()
            })
            .collect()
    }

    /// The answer when nothing relevant enough was retrieved: ragd says, in the
    /// question's language, that the documents do not hold the answer.
    fn no_sources(self) -> AskResponse {
        AskResponse {
            answer: self.language.not_in_documents().into(),
            answerable: false,
            answer_kind: AnswerKind::Declined,
            model_answer: None,
            language: LanguageCheck {
                question: self.language,
                answer: None,
                matches: true,
            },
            style: self.style,
            citations: Vec::new(),
            citation_changes: Vec::new(),
            grounding: None,
            content_rules: Vec::new(),
            sources: Vec::new(),
            dropped: Vec::new(),
            trimmed: None,
            not_applied: Vec::new(),
            finish_reason: "no_sources".into(),
            model: self.model,
            usage: Usage::none(),
            timings: Timings {
                retrieval_ms: self.retrieval_ms,
                prompt_ms: 0.0,
                generation_ms: 0.0,
                first_token_ms: None,
                total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            },
            cached: false,
        }
    }

    /// The final answer: the checked text with its citations and grounding,
    /// content rules applied.
    fn finish(
        self,
        g: Generation,
        checked: Option<check::Checked>,
        rules: &ContentRules,
    ) -> AskResponse {
        let sources = self.sources();
        let mut tally = Tally::default();
        let redacted = |s: &Source, tally: &mut Tally| Source {
            snippet: rules.apply(&s.snippet, tally),
            text: rules.apply(&s.text, tally),
            ..s.clone()
        };
        let (text, citations, changes, grounding) = match checked {
            Some(c) => {
                let citations: Vec<Source> = c
                    .citations
                    .iter()
                    .map(|&(n, by)| Source {
                        cited_by: Some(by),
                        verified: Some(true),
                        ..redacted(&sources[n - 1], &mut tally)
                    })
                    .collect();
                let chars = |t: &str| t.chars().count().max(1) as f32;
                let total: f32 = c.sentences.iter().map(|s| chars(&s.text)).sum();
                let score = c
                    .sentences
                    .iter()
                    .map(|s| s.score * chars(&s.text))
                    .sum::<f32>()
                    / total.max(1.0);
                let supported: f32 = c
                    .sentences
                    .iter()
                    .filter(|s| s.supported)
                    .map(|s| chars(&s.text))
                    .sum();
                let grounding = Grounding {
                    score: if c.sentences.is_empty() { 0.0 } else { score },
                    supported: !c.sentences.is_empty() && supported * 2.0 >= total,
                    sentences: c.sentences,
                };
                (c.text, citations, c.changes, Some(grounding))
            }
            // The check could not run: the model's in-range markers, unverified.
            None => {
                let citations = check::cited(&g.text, sources.len())
                    .into_iter()
                    .map(|n| Source {
                        cited_by: Some(CitedBy::Model),
                        verified: Some(false),
                        ..redacted(&sources[n - 1], &mut tally)
                    })
                    .collect();
                (g.text.trim().to_string(), citations, Vec::new(), None)
            }
        };
        let answer = rules.apply(&text, &mut tally);
        tally.add("document_instructions", self.defused);
        let answer_language = language::detect(&answer);
        let sources: Vec<Source> = sources.iter().map(|s| redacted(s, &mut tally)).collect();
        AskResponse {
            answerable: true,
            answer_kind: AnswerKind::Generated,
            model_answer: None,
            language: LanguageCheck {
                question: self.language,
                answer: Some(answer_language),
                matches: answer_language == self.language,
            },
            style: self.style,
            answer,
            citations,
            citation_changes: changes,
            grounding,
            content_rules: tally.applied(),
            dropped: self.run_sources[self.used..]
                .iter()
                .map(|s| s.chunk_id.clone())
                .collect(),
            trimmed: if self.trimmed {
                sources.last().map(|s| s.chunk_id.clone())
            } else {
                None
            },
            sources,
            not_applied: self.not_applied.clone(),
            finish_reason: g.finish_reason.as_str().to_string(),
            model: self.model.clone(),
            usage: Usage {
                prompt_tokens: g.prompt_tokens,
                completion_tokens: g.completion_tokens,
                total_tokens: g.prompt_tokens + g.completion_tokens,
                cached_tokens: g.cached_tokens,
                drafted_tokens: g.drafted_tokens,
                accepted_tokens: g.accepted_tokens,
            },
            timings: Timings {
                retrieval_ms: self.retrieval_ms,
                prompt_ms: self.prompt_ms,
                generation_ms: g.prefill_ms + g.decode_ms,
                first_token_ms: self.first_token_ms,
                total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            },
            cached: false,
        }
    }
}
