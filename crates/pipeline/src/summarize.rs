//! The summary flow (`POST /summarize`): one document, the documents a filter
//! picks, or the passages a query retrieves → their passages in order →
//! prompt → generate → check every sentence against the passages and cite
//! it, as answers are → deliver only what the passages support.
//!
//! **Map, then reduce.** Passages that fit [`SECTION_TOKENS`] are summarised
//! in one pass, the one the client sees stream. A longer text is cut into
//! consecutive sections that each fit; each section is summarised first
//! (not streamed), then the section summaries are joined into one summary,
//! streamed. That last text is checked against the *passages* (not the
//! section summaries, which are the model's own words): every citation
//! points into the documents, and a sentence no passage supports is left out.
//!
//! **Kept.** A document's summary is kept with it
//! ([`ragd_core::DocumentStore::keep_summary`]) under what it was made with
//! (content hash, style, language, length, model): the next request for the
//! same replays the model's text through the same check without generating,
//! and any change to the document drops it.

use std::time::{Duration, Instant};

use ragd_core::{
    Embed, Filter, FinishReason, GenEvent, GenerateParams, Generation, StoredChunk,
    DEFAULT_COLLECTION,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::answer::{Answer, SummaryMode};
use crate::check;
use crate::complete::{complete, Completion};
use crate::error::Error;
use crate::language::{self, Lang};
use crate::prompt::{self, Passage, Style};
use crate::retrieve::Mode;
use crate::route::Side;
use crate::select::{snippet, Source};
use crate::Pipeline;

/// Most tokens (the embedder's count) of passages read in one pass. Prefill
/// on a two-core machine reads about 120 prompt tokens a second, so one pass
/// takes some 15 s; a longer text is summarised section by section, each
/// pass of this size, which bounds the time to each section's end and keeps
/// small models within what they summarise well.
pub const SECTION_TOKENS: usize = 1536;
/// Most tokens of one section's summary (the reduce step reads them all).
const SECTION_SUMMARY_TOKENS: usize = 160;
/// Most passages a summary reads (a 64-passage text is some 12,000 tokens).
pub const MAX_PASSAGES: usize = 64;
/// Most documents a filter's summary reads.
const MAX_FILTER_DOCUMENTS: usize = 32;
/// Documents a filter's summary looks through for matches (pages of the
/// collection's list), so one request stays bounded in a large collection.
const MAX_FILTER_SCAN: usize = 10_000;

/// Body of `POST /summarize`: exactly one of `document_id`, `filter` and
/// `query`.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SummarizeRequest {
    /// Summarise this document (kept with it and reused until it changes).
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub document_id: Option<String>,
    /// Summarise the documents meeting these conditions (as `/ask`'s
    /// `filter`), in id order, their passages in order: at most 32
    /// documents and 64 passages.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub filter: Option<Value>,
    /// Summarise what the documents say about this: the `top_k` passages it
    /// retrieves, best first.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, pattern = r"\S"))]
    pub query: Option<String>,
    /// Passages a `query` retrieves (at most `retrieval.max_top_k`; read
    /// only with `query`).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 20))]
    pub top_k: Option<usize>,
    /// `concise` (default: two to four sentences) or `detailed`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^(concise|detailed)$"))]
    pub style: Option<String>,
    /// The summary's language (default: the language of the passages, or
    /// of the query).
    pub language: Option<Lang>,
    /// Longest summary in tokens (at most `generation.max_tokens_limit`).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2048))]
    pub max_tokens: Option<usize>,
    /// Stream the summary as server-sent events (as `/ask` does).
    pub stream: Option<bool>,
}

/// What a kept summary holds: the model's text, to be checked again.
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    text: String,
    finish_reason: FinishReason,
}

/// A stored chunk as a numbered passage of a summary.
fn source(n: usize, c: StoredChunk) -> Source {
    Source {
        n,
        document_id: c.document_id.clone(),
        chunk_id: c.chunk_id(),
        merged_with: Vec::new(),
        title: c.title,
        section: (!c.section.is_empty()).then_some(c.section),
        snippet: snippet(&c.text),
        // Read by position, not found by a question.
        score: 0.0,
        cited_by: None,
        verified: None,
        index: c.index,
        start: c.start,
        end: c.end,
        text: c.text,
        evidence: Vec::new(),
        side: Side::Primary,
        vector: c.vector,
        source_url: None,
        fetched_at: None,
    }
}

/// Consecutive runs of `tokens` (each passage's count) of at most `budget`
/// tokens each (a passage larger than that alone), as index ranges.
pub(crate) fn sections(tokens: &[usize], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut sum) = (0, 0);
    for (i, &t) in tokens.iter().enumerate() {
        if i > start && sum + t > budget {
            out.push(start..i);
            (start, sum) = (i, 0);
        }
        sum += t;
    }
    if start < tokens.len() {
        out.push(start..tokens.len());
    }
    out
}

/// A section summary as the joining step reads it: without citation markers
/// (`[3]`, `[1, 2]`: its numbers would mean nothing there), Markdown heading
/// lines or bold marks (a small model echoes the passages' headings, and the
/// join would echo them again).
fn without_markers(text: &str) -> String {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(r"\s*\[\d+(?:\s*[,，]\s*\d+)*\]").expect("the pattern is valid")
    });
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    re.replace_all(&kept.join("\n"), "")
        .replace("**", "")
        .trim()
        .to_string()
}

impl Pipeline {
    /// [`Self::summarize_in`] on the default collection.
    pub async fn summarize(&self, req: &SummarizeRequest) -> Result<Answer, Error> {
        self.summarize_in(DEFAULT_COLLECTION, req).await
    }

    /// Validates a summary request, gathers its passages, summarises long
    /// texts section by section, and hands the last prompt to the generation
    /// backend; the summary comes as [`Answer`]'s events (the same as an
    /// answer's: `Sources`, tokens, then the checked result).
    pub async fn summarize_in(
        &self,
        collection: &str,
        req: &SummarizeRequest,
    ) -> Result<Answer, Error> {
        self.require_collection(collection).await?;
        let started = Instant::now();
        let style = Style::parse(req.style.as_deref())?;
        let given = [
            req.document_id.is_some(),
            req.filter.is_some(),
            req.query.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(Error::Invalid(
                "give exactly one of document_id, filter and query".into(),
            ));
        }
        let top_k = self.top_k(req.top_k)?;
        let g = &self.config.generation;
        let mut params = g.defaults();
        params.max_tokens = self.max_tokens(req.max_tokens, style)?;
        params.steer = Some(check::steer_answer);
        // Each pass (a section, the join) has generation.timeout_s of its
        // own: a long text's passes together may take longer than one answer.
        let pass_time = Duration::from_secs_f64(g.timeout_s);
        let generator = self
            .generator
            .as_ref()
            .ok_or_else(|| Error::internal("no generator is loaded"))?;

        // The passages, in the order they are summarised.
        let mut document_hash = None;
        let (sources, query_language) = if let Some(id) = &req.document_id {
            let missing = || Error::NotFound(format!("no document with id {id:?}"));
            if !crate::documents::could_be_stored(id) {
                return Err(missing());
            }
            let info = self
                .store
                .document(collection, id)
                .await?
                .ok_or_else(missing)?;
            document_hash = Some(info.hash);
            let chunks = self.store.document_chunks(collection, id).await?;
            if chunks.len() > MAX_PASSAGES {
                return Err(Error::Invalid(format!(
                    "document_id: {id:?} has {} passages; a summary reads at most {MAX_PASSAGES} \
                     (summarise what a query retrieves from it instead)",
                    chunks.len()
                )));
            }
            let sources = chunks
                .into_iter()
                .enumerate()
                .map(|(i, c)| source(i + 1, c))
                .collect::<Vec<_>>();
            (sources, None)
        } else if let Some(filter) = &req.filter {
            let filter = Filter::parse(Some(filter))?.within(collection);
            (self.filtered_passages(collection, &filter).await?, None)
        } else {
            let query = crate::ask::query_text("query", req.query.as_deref().unwrap_or(""))?;
            let language = language::detect(query);
            let filter = Filter::default().within(collection);
            let (sources, _) = self
                .passages(
                    query,
                    language,
                    top_k,
                    &filter,
                    Mode::parse(None, self.config.retrieval.mode)?,
                    true,
                )
                .await?;
            (sources, Some(language))
        };
        // (Retrieved passages have their origins already.)
        let sources = if query_language.is_none() {
            self.with_origins(collection, sources).await
        } else {
            sources
        };
        let language = req.language.or(query_language).unwrap_or_else(|| {
            let sample: String = sources
                .iter()
                .take(3)
                .map(|s| s.text.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            language::detect(&sample)
        });
        let retrieval_ms = started.elapsed().as_secs_f64() * 1e3;
        let answer = Answer::new(self, started, retrieval_ms, language, style);
        if sources.is_empty() {
            return Ok(answer.declined());
        }

        // A document's summary made before with the same settings.
        let model = generator.info().name.clone();
        let kept_key = document_hash.as_ref().map(|hash| {
            format!(
                "{hash}|{}|{}|{}|{model}",
                match style {
                    Style::Concise => "concise",
                    Style::Detailed => "detailed",
                },
                language.code(),
                params.max_tokens
            )
        });
        if let (Some(id), Some(key)) = (&req.document_id, &kept_key) {
            match self.store.cached_summary(collection, id, key).await {
                Ok(Some(json)) => match serde_json::from_str::<Kept>(&json) {
                    Ok(kept) => return Ok(replay(answer, sources, kept)),
                    Err(e) => {
                        tracing::warn!(error = %e, document = %id, "kept summary unreadable; made again")
                    }
                },
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, document = %id, "kept summary not read"),
            }
        }

        // Map: each section of a long text summarised on its own.
        let counts: Vec<usize> = sources
            .iter()
            .map(|s| self.embedder.count_tokens(&s.text))
            .collect();
        let ranges = sections(&counts, SECTION_TOKENS);
        let located = |s: &Source| {
            (
                s.n,
                Passage::located(s.title.as_deref(), s.section.as_deref(), &s.text),
            )
        };
        let final_prompt = if ranges.len() == 1 {
            prompt::summary(
                &sources.iter().map(located).collect::<Vec<_>>(),
                style,
                language,
            )
        } else {
            let mut summaries = Vec::with_capacity(ranges.len());
            for range in &ranges {
                let section: Vec<(usize, Passage)> =
                    sources[range.clone()].iter().map(located).collect();
                let section_params = GenerateParams {
                    max_tokens: SECTION_SUMMARY_TOKENS.min(params.max_tokens.max(64)),
                    steer: None,
                    deadline: Some(Instant::now() + pass_time),
                    ..params.clone()
                };
                let text = match complete(
                    generator.as_ref(),
                    prompt::summary(&section, Style::Detailed, language),
                    section_params,
                )
                .await
                {
                    Completion::Text(t) => without_markers(&t),
                    Completion::Busy => {
                        return Err(Error::Busy {
                            retry_after_secs: 2,
                        })
                    }
                    Completion::Failed(Some(e)) => return Err(e.into()),
                    // No reply in time (a section cut at its deadline
                    // still sends what it wrote): the others carry on.
                    Completion::Failed(None) => String::new(),
                };
                if !text.is_empty() {
                    summaries.push(text);
                }
            }
            if summaries.is_empty() {
                // The generator wrote nothing for any section in time: it
                // is too busy for this text now.
                return Err(Error::Busy {
                    retry_after_secs: 10,
                });
            }
            tracing::debug!(sections = ranges.len(), "summary sections written");
            prompt::combine(&summaries, style, language)
        };

        // Reduce (or the one pass): streamed, then checked.
        params.deadline = Some(Instant::now() + pass_time);
        let rx = self.submit(generator.as_ref(), final_prompt, params)?;
        let keep = match (&req.document_id, kept_key, document_hash) {
            (Some(id), Some(key), Some(hash)) => {
                let store = self.store.clone();
                let (collection, id) = (collection.to_string(), id.clone());
                Some(Box::new(move |g: &Generation| {
                    let kept = Kept {
                        text: g.text.clone(),
                        finish_reason: g.finish_reason,
                    };
                    let Ok(json) = serde_json::to_string(&kept) else {
                        return;
                    };
                    tokio::spawn(async move {
                        if let Err(e) = store
                            .keep_summary(&collection, &id, &hash, &key, &json)
                            .await
                        {
                            tracing::warn!(error = %e, document = %id, "summary not kept");
                        }
                    });
                })
                    as Box<dyn FnOnce(&Generation) + Send + Sync>)
            }
            _ => None,
        };
        Ok(answer
            .summarizing(SummaryMode {
                all_sources: ranges.len() > 1,
                keep,
                replayed: false,
            })
            .generating("", sources, Vec::new(), f32::MIN, rx))
    }

    /// The passages of the documents of `collection` that `filter` picks, in
    /// id order, each document's in order (bounded: see the constants).
    async fn filtered_passages(
        &self,
        collection: &str,
        filter: &Filter,
    ) -> Result<Vec<Source>, Error> {
        let mut ids = Vec::new();
        let (mut after, mut scanned) = (None::<String>, 0);
        while ids.len() < MAX_FILTER_DOCUMENTS && scanned < MAX_FILTER_SCAN {
            let page = self.store.list(collection, after.as_deref(), 500).await?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.id.clone());
            scanned += page.len();
            ids.extend(
                page.into_iter()
                    .filter(|d| filter.matches(collection, &d.id, Some(&d.metadata)))
                    .map(|d| d.id),
            );
        }
        ids.truncate(MAX_FILTER_DOCUMENTS);
        let mut sources = Vec::new();
        for id in ids {
            for c in self.store.document_chunks(collection, &id).await? {
                if sources.len() == MAX_PASSAGES {
                    return Ok(sources);
                }
                sources.push(source(sources.len() + 1, c));
            }
        }
        Ok(sources)
    }
}

/// A kept summary's text, read back through the same check.
fn replay(answer: Answer, sources: Vec<Source>, kept: Kept) -> Answer {
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(GenEvent::Prompt {
        passages_used: sources.len(),
        trimmed: false,
        prompt_tokens: 0,
        prompt_ms: 0.0,
    });
    let _ = tx.send(GenEvent::Token(kept.text.clone()));
    let _ = tx.send(GenEvent::Done(Generation {
        text: kept.text,
        prompt_tokens: 0,
        completion_tokens: 0,
        finish_reason: kept.finish_reason,
        prefill_ms: 0.0,
        decode_ms: 0.0,
        cached_tokens: 0,
        drafted_tokens: 0,
        accepted_tokens: 0,
    }));
    answer
        .summarizing(SummaryMode {
            all_sources: true,
            keep: None,
            replayed: true,
        })
        .generating("", sources, Vec::new(), f32::MIN, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_consecutive_runs_within_the_budget() {
        assert_eq!(sections(&[100, 100, 100], 1000), vec![0..3]);
        assert_eq!(sections(&[600, 600, 300, 100], 1000), vec![0..1, 1..4]);
        // A passage over the budget stands alone.
        assert_eq!(sections(&[50, 2000, 50], 1000), vec![0..1, 1..2, 2..3]);
        assert!(sections(&[], 1000).is_empty());
    }

    #[test]
    fn markers_are_taken_out_of_section_summaries() {
        assert_eq!(
            without_markers("Apt installs packages [3]. It resolves dependencies [1, 2]."),
            "Apt installs packages. It resolves dependencies."
        );
        assert_eq!(without_markers("软件包 [2]。"), "软件包。");
        assert_eq!(
            without_markers("#### Chapter 3 > 3.1\n**Stable** is tested [4]."),
            "Stable is tested."
        );
    }

    #[test]
    fn languages_are_the_codes_answers_know() {
        let req: SummarizeRequest =
            serde_json::from_value(serde_json::json!({ "query": "x", "language": "zh" })).unwrap();
        assert_eq!(req.language, Some(Lang::Zh));
        assert!(serde_json::from_value::<SummarizeRequest>(
            serde_json::json!({ "query": "x", "language": "xx" })
        )
        .is_err());
    }
}
