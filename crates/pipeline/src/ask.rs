//! The ask flow: validate → retrieve → select → rerank → assemble the prompt →
//! generate → check the answer → apply the content rules.
//!
//! [`Pipeline::ask`] runs everything up to handing the prompt to the
//! generation backend, and returns the [`Answer`]: one stream of
//! [`AnswerEvent`]s that the JSON answer, the SSE stream and the OpenAI-style
//! API all read (see [`crate::answer`]). Everything that can be refused with an
//! HTTP status is decided before that stream starts.

use std::time::{Duration, Instant};

use ragd_core::{Filter, GenEvent, GenJob, Message, DEFAULT_COLLECTION};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::answer::Answer;
pub use crate::answer::{AskResponse, Grounding, LanguageCheck, Timings, Usage};
use crate::check;
use crate::error::Error;
use crate::language;
use crate::prompt::{self, Passage, Style};
use crate::retrieve::Mode;
use crate::route::Side;
pub use crate::select::Source;
use crate::Pipeline;

/// Longest question accepted, in characters.
const MAX_QUESTION_CHARS: usize = 4000;
/// Most earlier turns of a conversation.
const MAX_HISTORY: usize = 40;

/// Body of `POST /ask`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AskRequest {
    /// The question (not blank; at most 4,000 characters once trimmed).
    #[cfg_attr(feature = "openapi", schema(min_length = 1, pattern = r"\S"))]
    pub question: String,
    /// Passages to retrieve (at most `retrieval.max_top_k`, 20 by default).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 20))]
    pub top_k: Option<usize>,
    /// Longest answer in tokens (at most `generation.max_tokens_limit`, 2048 by default).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2048))]
    pub max_tokens: Option<usize>,
    /// 0 = greedy.
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 2))]
    pub temperature: Option<f64>,
    /// Nucleus mass.
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0, maximum = 1))]
    pub top_p: Option<f64>,
    /// Sampler seed.
    #[cfg_attr(feature = "openapi", schema(maximum = 9223372036854775807_u64))]
    pub seed: Option<u64>,
    /// Sample among this many most likely tokens only (0 = no limit).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1000))]
    pub sample_top_k: Option<usize>,
    /// Repetition penalty, 1 (off) to 2.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2))]
    pub repeat_penalty: Option<f32>,
    /// Up to 4 strings of 1 to 64 characters that end the answer (not included).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<StopText>>, max_items = 4))]
    pub stop: Option<Vec<String>>,
    /// Conditions on `document_id` / `metadata.<key>` the passages must meet
    /// (an object such as `{"metadata.lang": "en"}`).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub filter: Option<Value>,
    /// `dense`, `lexical` or `hybrid` (default: `retrieval.mode`).
    #[cfg_attr(feature = "openapi", schema(pattern = "^(dense|lexical|hybrid)$"))]
    pub mode: Option<String>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// `concise` (default: one to three sentences) or `detailed`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^(concise|detailed)$"))]
    pub style: Option<String>,
    /// Earlier turns of the conversation, oldest first (`user` and `assistant`
    /// messages); retrieval uses the question alone.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<HistoryMessage>>, max_items = 40))]
    pub history: Option<Vec<Message>>,
}

/// One `stop` string: 1 to 64 characters (for the OpenAPI document).
#[cfg(feature = "openapi")]
struct StopText;

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for StopText {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(64))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for StopText {}

/// A chat message of `/v1/chat/completions` (`role`: `system`, `user` or
/// `assistant`, and its `content`), for the API documentation.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[allow(dead_code)]
pub struct ChatMessage {
    /// `user` or `assistant` (`system` is accepted and ignored).
    #[cfg_attr(feature = "openapi", schema(pattern = "^(system|user|assistant)$"))]
    pub role: String,
    /// The text.
    pub content: String,
}

/// An earlier turn of `/ask`'s `history` (`role`: `user` or `assistant`, and
/// its `content`), for the API documentation.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[allow(dead_code)]
pub struct HistoryMessage {
    /// `user` or `assistant`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^(user|assistant)$"))]
    pub role: String,
    /// The text.
    pub content: String,
}

/// The trimmed text of a question or query, refused when empty or too long.
pub(crate) fn query_text<'a>(field: &str, text: &'a str) -> Result<&'a str, Error> {
    let text = text.trim();
    if text.is_empty() {
        return Err(Error::Invalid(format!("{field}: must not be empty")));
    }
    if text.chars().count() > MAX_QUESTION_CHARS {
        return Err(Error::Invalid(format!(
            "{field}: longer than {MAX_QUESTION_CHARS} characters"
        )));
    }
    Ok(text)
}

impl Pipeline {
    /// `top_k` as asked (default `retrieval.top_k`), refused outside
    /// `1..=retrieval.max_top_k`.
    pub(crate) fn top_k(&self, asked: Option<usize>) -> Result<usize, Error> {
        let r = &self.config.retrieval;
        let top_k = asked.unwrap_or(r.top_k);
        if !(1..=r.max_top_k).contains(&top_k) {
            return Err(Error::Invalid(format!(
                "top_k: must be within 1..={}",
                r.max_top_k
            )));
        }
        Ok(top_k)
    }

    /// `max_tokens` as asked (default: the style's), refused outside
    /// `1..=generation.max_tokens_limit`.
    pub(crate) fn max_tokens(&self, asked: Option<usize>, style: Style) -> Result<usize, Error> {
        let g = &self.config.generation;
        match asked {
            Some(m) if !(1..=g.max_tokens_limit).contains(&m) => Err(Error::Invalid(format!(
                "max_tokens: must be within 1..={}",
                g.max_tokens_limit
            ))),
            Some(m) => Ok(m),
            None if style == Style::Concise => Ok(g.concise_max_tokens),
            None => Ok(g.max_tokens),
        }
    }

    /// Hands `prompt` to the generation backend as a streamed job within the
    /// context budget: its events (a `Queued` first when it has to wait), or
    /// 429 when the queue is full.
    pub(crate) fn submit(
        &self,
        generator: &dyn ragd_core::Generate,
        prompt: ragd_core::Prompt,
        params: ragd_core::GenerateParams,
    ) -> Result<mpsc::UnboundedReceiver<GenEvent>, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = tx.clone();
        let ahead = generator
            .submit(GenJob {
                prompt,
                params,
                context_budget: self.config.generation.max_context_tokens,
                events: tx,
            })
            .map_err(|_| Error::Busy {
                retry_after_secs: 2,
            })?;
        if ahead > 0 {
            let _ = queued.send(GenEvent::Queued { position: ahead });
        }
        Ok(rx)
    }

    /// Validates a question, retrieves and selects its passages, and hands the
    /// prompt to the generation backend. The answer comes as [`Answer`]'s
    /// events; a question whose best passage scores under the abstention
    /// threshold is declined without asking the model.
    pub async fn ask(&self, req: &AskRequest) -> Result<Answer, Error> {
        self.ask_in(DEFAULT_COLLECTION, req).await
    }

    /// [`Self::ask`] over the documents of `collection` alone.
    pub async fn ask_in(&self, collection: &str, req: &AskRequest) -> Result<Answer, Error> {
        self.require_collection(collection).await?;
        let started = Instant::now();
        let question = query_text("question", &req.question)?;
        let style = Style::parse(req.style.as_deref())?;
        let history = req.history.clone().unwrap_or_default();
        if history.len() > MAX_HISTORY {
            return Err(Error::Invalid(format!(
                "history: at most {MAX_HISTORY} messages"
            )));
        }
        if let Some(m) = history
            .iter()
            .find(|m| m.role != "user" && m.role != "assistant")
        {
            return Err(Error::Invalid(format!(
                "history: role {:?} is not \"user\" or \"assistant\"",
                m.role
            )));
        }
        let language = language::detect(question);
        let r = &self.config.retrieval;
        let top_k = self.top_k(req.top_k)?;
        let g = &self.config.generation;
        let mut params = g.defaults();
        params.max_tokens = self.max_tokens(req.max_tokens, style)?;
        // Not markers alone, nor a passage heading echoed (see the function).
        params.steer = Some(check::steer_answer);
        params.deadline = Some(Instant::now() + Duration::from_secs_f64(g.timeout_s));
        if let Some(t) = req.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(Error::Invalid("temperature: must be within 0..=2".into()));
            }
            params.temperature = t;
        }
        if let Some(p) = req.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Invalid("top_p: must be within (0, 1]".into()));
            }
            params.top_p = p;
        }
        if let Some(s) = req.seed {
            // JSON clients and the OpenAPI integer format stop at i64.
            if s > i64::MAX as u64 {
                return Err(Error::Invalid(format!("seed: at most {}", i64::MAX)));
            }
            params.seed = s;
        }
        if let Some(k) = req.sample_top_k {
            if k > 1000 {
                return Err(Error::Invalid(
                    "sample_top_k: must be within 0..=1000".into(),
                ));
            }
            params.top_k = k;
        }
        if let Some(rp) = req.repeat_penalty {
            if !(1.0..=2.0).contains(&rp) {
                return Err(Error::Invalid(
                    "repeat_penalty: must be within 1..=2".into(),
                ));
            }
            params.repeat_penalty = rp;
        }
        if let Some(stop) = &req.stop {
            if stop.len() > 4 || stop.iter().any(|s| s.is_empty() || s.chars().count() > 64) {
                return Err(Error::Invalid(
                    "stop: at most 4 strings of 1 to 64 characters".into(),
                ));
            }
            params.stop = stop.clone();
        }
        let filter = Filter::parse(req.filter.as_ref())?.within(collection);
        let mode = Mode::parse(req.mode.as_deref(), r.mode)?;
        let generator = self
            .generator
            .as_ref()
            .ok_or_else(|| Error::internal("no generator is loaded"))?;

        // Retrieve, select and rerank.
        let (sources, queries) = self
            .passages(question, language, top_k, &filter, mode, true)
            .await?;
        // The top passage's scoring model decides (see retrieve::score_side);
        // with no dense query (no model reads the language) no threshold does.
        let top_side = sources.first().map(|s| s.side).unwrap_or(Side::Primary);
        let query_vector = queries.vector(top_side);
        let thresholds = if query_vector.is_empty() {
            None
        } else {
            self.side_thresholds(top_side)
        };
        let retrieval_ms = started.elapsed().as_secs_f64() * 1e3;
        let answer = Answer::new(self, started, retrieval_ms, language, style);
        // Nothing relevant enough: decline without asking the model. (With no
        // model reading the question's language, only an empty result says so.)
        if sources
            .first()
            .is_none_or(|s| thresholds.is_some_and(|t| s.score < t.abstain_below))
        {
            return Ok(answer.declined());
        }
        let sources = self.evidence(question, &queries, sources).await;

        // Assemble the prompt and hand it to the generation backend.
        let passages: Vec<Passage> = sources
            .iter()
            .map(|s| Passage::located(s.title.as_deref(), s.section.as_deref(), &s.text))
            .collect();
        let prompt = prompt::build(question, &passages, style, language, &history);
        let rx = self.submit(generator.as_ref(), prompt, params)?;
        let min_score = thresholds.map_or(f32::MIN, |t| t.min_score);
        Ok(answer.generating(question, sources, query_vector, min_score, rx))
    }
}
