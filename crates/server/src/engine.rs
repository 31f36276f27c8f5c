//! The request flow: ingest (validate → chunk → embed → store → index) and ask
//! (embed the question → search → assemble the prompt → generate → cite).
//!
//! Handlers in [`crate::api`] parse requests and call one method here; this
//! module knows nothing of HTTP beyond the [`ApiError`] it returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ragd_embedder::{chunker, TextKind};
use ragd_index::VectorIndex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::citations::{self, CitedBy};
use crate::config::Config;
use crate::content::{self, ContentRules, Tally};
use crate::error::ApiError;
use crate::language::{self, Lang};
use crate::prompt::{Passage, Style};
use crate::retrieval::{self, Filter, Mode, Strategy};
use crate::workers::{EmbedWorker, GenEvent, GenJob, GenWorker};
use ragd_store::{NewChunk, NewDocument, Store, UpsertStatus};

/// Longest document id accepted.
const MAX_ID_LEN: usize = 256;
/// Longest title accepted, in bytes.
const MAX_TITLE_LEN: usize = 1024;
/// Longest question accepted, in characters.
const MAX_QUESTION_CHARS: usize = 4000;
/// Characters of a chunk shown as a citation's snippet.
const SNIPPET_CHARS: usize = 240;

/// One document of `POST /ingest`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocumentIn {
    /// Caller's id; derived from the text when absent.
    pub id: Option<String>,
    /// Optional title, shown in citations and given to the model.
    pub title: Option<String>,
    /// Where the document came from (kept in its metadata).
    pub source: Option<String>,
    /// The text.
    pub text: String,
    /// Any JSON object.
    pub metadata: Option<Map<String, Value>>,
}

/// Body of `POST /ingest`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestRequest {
    /// The documents.
    pub documents: Vec<DocumentIn>,
}

/// Outcome for one document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IngestedDocument {
    /// The document's id.
    pub id: String,
    /// What happened.
    pub status: IngestStatus,
    /// Chunks the document has now.
    pub chunks: usize,
    /// Chunks embedded for this request (unchanged chunks keep their vectors).
    pub embedded: usize,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `created`, `updated`, `unchanged` or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IngestStatus {
    /// New id.
    Created,
    /// Existing id, new content.
    Updated,
    /// Existing id, same content.
    Unchanged,
    /// Not stored.
    Failed,
}

/// Response of `POST /ingest`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IngestResponse {
    /// One entry per document, in request order.
    pub documents: Vec<IngestedDocument>,
}

/// Body of `POST /ask`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AskRequest {
    /// The question.
    pub question: String,
    /// Passages to retrieve.
    pub top_k: Option<usize>,
    /// Longest answer in tokens.
    pub max_tokens: Option<usize>,
    /// 0 = greedy.
    pub temperature: Option<f64>,
    /// Nucleus mass.
    pub top_p: Option<f64>,
    /// Sampler seed.
    pub seed: Option<u64>,
    /// Sample among this many most likely tokens only (0 = no limit).
    pub sample_top_k: Option<usize>,
    /// Repetition penalty, 1 (off) to 2.
    pub repeat_penalty: Option<f32>,
    /// Up to 4 strings that end the answer (not included).
    pub stop: Option<Vec<String>>,
    /// Conditions on `document_id` / `metadata.<key>` the passages must meet.
    pub filter: Option<Value>,
    /// `dense`, `lexical` or `hybrid` (default: `retrieval.mode`).
    pub mode: Option<String>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// `concise` (default: one to three sentences) or `detailed`.
    pub style: Option<String>,
    /// Earlier turns of the conversation, oldest first (`user` and `assistant`
    /// messages); retrieval uses the question alone.
    #[schema(value_type = Option<Vec<ChatMessage>>)]
    pub history: Option<Vec<ragd_generator::Message>>,
}

/// A chat message (`role`: `user` or `assistant`, and its `content`), for the
/// API documentation.
#[derive(Debug, Clone, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ChatMessage {
    /// `user` or `assistant` (`system` is accepted and ignored on `/v1`).
    pub role: String,
    /// The text.
    pub content: String,
}

/// A retrieved passage, as reported to the client.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Source {
    /// Its number in the prompt, from 1.
    pub n: usize,
    /// The document.
    pub document_id: String,
    /// `{document_id}#{index}`.
    pub chunk_id: String,
    /// Neighbouring chunks that overlapped this one and were merged into it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merged_with: Vec<String>,
    /// The document's title.
    pub title: Option<String>,
    /// The section the passage is in ("Heading > Subheading"), when the document has headings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    /// The start of the passage.
    pub snippet: String,
    /// Cosine similarity with the question.
    pub score: f32,
    /// In citations: whether the model's marker or ragd's matching found it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cited_by: Option<CitedBy>,
    /// In citations: whether the passage was checked to support the sentences
    /// citing it (false only when the check could not run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    #[serde(skip)]
    index: usize,
    #[serde(skip)]
    start: usize,
    #[serde(skip)]
    end: usize,
    /// The passage as the model read it (neighbours merged in).
    pub text: String,
    #[serde(skip)]
    vector: Vec<f32>,
}

/// Token counts.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
}

/// Per-stage times in milliseconds.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Grounding {
    /// The sentences' best support, averaged by length (0–1).
    pub score: f32,
    /// Whether sentences making up at least half of the answer are supported by
    /// some passage. False marks an answer the passages do not back.
    pub supported: bool,
    /// Each sentence, its best support and the passage giving it.
    pub sentences: Vec<citations::SentenceSupport>,
}

/// The answer to `POST /ask` (also the `done` event of a stream).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AskResponse {
    /// The answer text (after the citation check and the content rules).
    pub answer: String,
    /// False when ragd found nothing relevant enough and did not ask the model
    /// (the answer then says so in the question's language), or when the
    /// model's answer says the passages do not hold the answer.
    pub answerable: bool,
    /// The question's language and whether the answer is in it.
    pub language: LanguageCheck,
    /// The answer style asked for.
    pub style: Style,
    /// Passages the answer cites, in order of first citation.
    pub citations: Vec<Source>,
    /// Citations the check removed or pointed at another passage.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub citation_changes: Vec<citations::Change>,
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
    /// Why generation ended: `stop`, `length`, `timeout`, `cancelled` or `no_sources`.
    pub finish_reason: String,
    /// The generator's model name.
    pub model: String,
    /// Token counts.
    pub usage: Usage,
    /// Stage times.
    pub timings: Timings,
}

/// An ask in progress: the retrieved sources and the generator's events.
#[derive(Debug)]
pub struct AskRun {
    /// Retrieved passages, best first (the prompt may use a prefix of them).
    pub sources: Vec<Source>,
    /// `None` when nothing was retrieved: there is nothing to generate from.
    pub events: Option<mpsc::UnboundedReceiver<GenEvent>>,
    started: Instant,
    retrieval_ms: f64,
    model: String,
    language: Lang,
    style: Style,
}

/// Accumulates an ask's events into the final answer.
#[derive(Debug)]
pub struct AskProgress {
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
}

/// The loaded service: models, index and documents.
pub struct Engine {
    config: Arc<Config>,
    embedder: EmbedWorker,
    /// `None` for ingest-only use (`ragd ingest` without a server).
    generator: Option<GenWorker>,
    data: Mutex<Data>,
    /// Where the index came from at start-up: `dump` or `rebuilt`.
    index_source: &'static str,
    /// Redaction and block list for answers and snippets.
    content: Arc<ContentRules>,
    /// The retrieval score thresholds for this embedder.
    thresholds: crate::config::Thresholds,
}

/// The store and the index derived from it, changed together under one lock.
pub struct Data {
    /// Documents, chunks and vectors.
    pub store: Store,
    /// The HNSW graph over the chunk vectors (with tombstones).
    pub index: VectorIndex,
    /// The store generation of the last dump written or loaded.
    dumped: Option<u64>,
}

impl Data {
    fn dump(&mut self, dir: &std::path::Path) -> Result<(), ragd_index::IndexError> {
        let generation = self.store.generation();
        if self.dumped == Some(generation) {
            return Ok(());
        }
        if self.index.is_empty() {
            // hnsw_rs cannot dump an empty graph; an empty one rebuilds instantly.
            let _ = std::fs::remove_dir_all(dir);
            self.dumped = Some(generation);
            return Ok(());
        }
        let started = Instant::now();
        self.index.dump(dir, generation)?;
        self.dumped = Some(generation);
        tracing::info!(
            generation,
            points = self.index.len(),
            ms = started.elapsed().as_millis() as u64,
            "index dumped"
        );
        Ok(())
    }

    /// Rebuilds the graph from the live chunks when tombstones pass the
    /// configured fraction.
    fn compact_if_needed(&mut self, config: &ragd_index::IndexConfig) -> Result<(), ApiError> {
        let indexed = self.index.len();
        let dead = indexed.saturating_sub(self.store.live_count());
        if dead < 64 || (dead as f32) <= config.compact_fraction * indexed as f32 {
            return Ok(());
        }
        let started = Instant::now();
        let index =
            build_index(&self.store, self.index.dim(), config).map_err(ApiError::internal)?;
        tracing::info!(
            dead,
            live = self.store.live_count(),
            ms = started.elapsed().as_millis() as u64,
            "index compacted"
        );
        self.index = index;
        Ok(())
    }
}

/// A new graph over the store's live chunks.
fn build_index(
    store: &Store,
    dim: usize,
    config: &ragd_index::IndexConfig,
) -> Result<VectorIndex, String> {
    let index = VectorIndex::new(dim, config.clone()).map_err(|e| e.to_string())?;
    let items: Vec<(usize, &[f32])> = store.live().map(|(key, _, v)| (key, v)).collect();
    index
        .insert_many(&items)
        .map_err(|e| format!("stored vectors: {e}"))?;
    Ok(index)
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("embedder", &self.embedder)
            .field("generator", &self.generator)
            .finish()
    }
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The trimmed text of a question or query, refused when empty or too long.
fn query_text<'a>(field: &str, text: &'a str) -> Result<&'a str, ApiError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ApiError::Invalid(format!("{field}: must not be empty")));
    }
    if text.chars().count() > MAX_QUESTION_CHARS {
        return Err(ApiError::Invalid(format!(
            "{field}: longer than {MAX_QUESTION_CHARS} characters"
        )));
    }
    Ok(text)
}

fn snippet(text: &str) -> String {
    match text.char_indices().nth(SNIPPET_CHARS) {
        Some((i, _)) => format!("{}…", text[..i].trim_end()),
        None => text.to_string(),
    }
}

impl Engine {
    /// Opens the store in the configured data directory, builds the index from
    /// its vectors, and assembles the engine. Blocking: call from a blocking context.
    pub fn open(
        config: Arc<Config>,
        embedder: EmbedWorker,
        generator: Option<GenWorker>,
    ) -> Result<Self, String> {
        config.chunking.validate(
            embedder
                .max_length
                .saturating_sub(embedder.passage_prefix_tokens()),
        )?;
        let store = Store::open(&config.server.data_dir, &embedder.identity(), embedder.dim)
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let index_dir = config.server.data_dir.join("index");
        let (index, from_dump) = match VectorIndex::load_dump(
            &index_dir,
            config.index.clone(),
            store.generation(),
            embedder.dim,
        ) {
            Ok(index) => (index, true),
            Err(why) => {
                tracing::info!(reason = %why, "rebuilding the vector index from the store");
                (build_index(&store, embedder.dim, &config.index)?, false)
            }
        };
        let documents = store.document_count().map_err(|e| e.to_string())?;
        tracing::info!(
            documents,
            chunks = store.live_count(),
            from_dump,
            index_ms = started.elapsed().as_millis() as u64,
            data_dir = %config.server.data_dir.display(),
            "documents loaded"
        );
        let dumped = from_dump.then(|| store.generation());
        let mut data = Data {
            store,
            index,
            dumped,
        };
        if !from_dump {
            if let Err(e) = data.dump(&index_dir) {
                tracing::warn!(error = %e, "cannot write the index dump; the next start rebuilds it");
            }
        }
        let index_source = if from_dump { "dump" } else { "rebuilt" };
        let content = Arc::new(ContentRules::new(
            &config.answers.redact,
            &config.answers.block_terms,
        )?);
        let thresholds = crate::config::Thresholds::for_embedder(&config.retrieval, &embedder.name);
        if thresholds.calibrated {
            tracing::info!(
                embedder = %embedder.name,
                min_score = thresholds.min_score,
                abstain_below = thresholds.abstain_below,
                "retrieval thresholds"
            );
        } else {
            tracing::warn!(
                embedder = %embedder.name,
                min_score = thresholds.min_score,
                abstain_below = thresholds.abstain_below,
                "no calibrated retrieval thresholds for this embedder: all-MiniLM-L6-v2's are used; \
                 set retrieval.min_score and retrieval.abstain_below (measure with `ragd eval qa`)"
            );
        }
        Ok(Self {
            config,
            embedder,
            generator,
            data: Mutex::new(data),
            index_source,
            content,
            thresholds,
        })
    }

    /// Writes the index dump if the store changed since the last one (at
    /// shutdown, so the next start need not rebuild the graph).
    pub fn save_index(&self) -> Result<(), String> {
        let mut data = self
            .data
            .lock()
            .map_err(|_| "data lock poisoned".to_string())?;
        data.dump(&self.config.server.data_dir.join("index"))
            .map_err(|e| e.to_string())
    }

    /// What `/ready` reports: the models, the documents and where the index came from.
    pub fn status(&self) -> Value {
        let (documents, chunks) = match self.data.lock() {
            Ok(d) => (d.store.document_count().ok(), Some(d.store.live_count())),
            Err(_) => (None, None),
        };
        serde_json::json!({
            "models": { "embedder": self.embedder.name, "generator": self.generator.as_ref().map(|g| &g.name) },
            "thresholds": { "min_score": self.thresholds.min_score, "abstain_below": self.thresholds.abstain_below },
            "documents": documents,
            "chunks": chunks,
            "index_at_start": self.index_source,
            "generation": self.generator.as_ref().map(|g| g.load()),
        })
    }

    fn validate_ingest(&self, req: &IngestRequest) -> Result<Vec<(String, String)>, ApiError> {
        let max = self.config.server.max_documents_per_request;
        if req.documents.is_empty() {
            return Err(ApiError::Invalid(
                "documents: at least one document is required".into(),
            ));
        }
        if req.documents.len() > max {
            return Err(ApiError::Invalid(format!(
                "documents: at most {max} documents per request"
            )));
        }
        let mut ids = Vec::with_capacity(req.documents.len());
        for (i, d) in req.documents.iter().enumerate() {
            let at = |m: &str| ApiError::Invalid(format!("documents[{i}].{m}"));
            if d.text.trim().is_empty() {
                return Err(at("text: must not be empty"));
            }
            if let Some(t) = &d.title {
                if t.len() > MAX_TITLE_LEN {
                    return Err(at(&format!("title: longer than {MAX_TITLE_LEN} bytes")));
                }
            }
            let metadata = serde_json::to_vec(&d.metadata).unwrap_or_default();
            let hash = sha256_hex(&[
                d.title.as_deref().unwrap_or("").as_bytes(),
                d.source.as_deref().unwrap_or("").as_bytes(),
                d.text.as_bytes(),
                &metadata,
            ]);
            let id = match &d.id {
                Some(id) => {
                    if id.trim().is_empty()
                        || id.len() > MAX_ID_LEN
                        || id.chars().any(char::is_control)
                    {
                        return Err(at(&format!(
                            "id: must be 1..={MAX_ID_LEN} bytes without control characters"
                        )));
                    }
                    id.clone()
                }
                None => format!("doc-{}", &sha256_hex(&[d.text.as_bytes()])[..16]),
            };
            if ids.iter().any(|(other, _)| other == &id) {
                return Err(at(&format!("id: {id:?} appears twice in this request")));
            }
            ids.push((id, hash));
        }
        Ok(ids)
    }

    /// Runs `f` with the store and index on a blocking thread (SQLite waits on the disk).
    async fn with_data<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Engine, &mut Data) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let engine = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut data = engine
                .data
                .lock()
                .map_err(|_| ApiError::internal("data lock poisoned"))?;
            f(&engine, &mut data)
        })
        .await
        .map_err(ApiError::internal)?
    }

    /// Ingests documents: all are validated before anything is stored.
    ///
    /// Unchanged documents cost one hash lookup; in a changed document only the
    /// chunks whose embedded text changed are embedded again.
    pub async fn ingest(self: &Arc<Self>, req: IngestRequest) -> Result<IngestResponse, ApiError> {
        let ids = self.validate_ingest(&req)?;
        let lookup = ids.clone();
        let (unchanged, mut known): (Vec<bool>, Vec<HashMap<String, Vec<f32>>>) = self
            .with_data(move |_, data| {
                let store = &data.store;
                let mut unchanged = Vec::new();
                let mut known = Vec::new();
                for (id, hash) in &lookup {
                    let same = store.hash_of(id).map_err(ApiError::internal)?.as_deref()
                        == Some(hash.as_str());
                    unchanged.push(same);
                    known.push(if same {
                        HashMap::new()
                    } else {
                        store
                            .vectors_by_embed_hash(id)
                            .map_err(ApiError::internal)?
                    });
                }
                Ok((unchanged, known))
            })
            .await?;

        // Chunk the new and changed documents (CPU work, off the runtime).
        let tokenizer = self.embedder.tokenizer.clone();
        let chunking = self.config.chunking.clone();
        let texts: Vec<Option<String>> = req
            .documents
            .iter()
            .zip(&unchanged)
            .map(|(d, &u)| (!u).then(|| d.text.clone()))
            .collect();
        let chunked = tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .map(|t| match t {
                    Some(t) => chunker::chunk_text(&tokenizer, t, &chunking).map(Some),
                    None => Ok(None),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;

        // What each chunk is embedded as: the title and the section path in front of
        // the chunk, so that a passage is found by what its document and section are about.
        let mut embed_inputs: Vec<Vec<(String, String)>> = Vec::new();
        for (d, chunks) in req.documents.iter().zip(&chunked) {
            let title = d.title.as_deref().map(str::trim).filter(|t| !t.is_empty());
            embed_inputs.push(
                chunks
                    .iter()
                    .flatten()
                    .map(|c| {
                        let mut input = String::with_capacity(c.text.len() + 128);
                        for part in [title.unwrap_or(""), &c.section()] {
                            if !part.is_empty() {
                                input.push_str(part);
                                input.push('\n');
                            }
                        }
                        input.push_str(&c.text);
                        let hash = sha256_hex(&[input.as_bytes()]);
                        (input, hash)
                    })
                    .collect(),
            );
        }
        let missing: Vec<String> = embed_inputs
            .iter()
            .zip(&known)
            .flat_map(|(inputs, known)| {
                inputs
                    .iter()
                    .filter(|(_, h)| !known.contains_key(h))
                    .map(|(i, _)| i.clone())
            })
            .collect();
        let reused = embed_inputs.iter().map(Vec::len).sum::<usize>() - missing.len();
        let mut fresh = self
            .embedder
            .embed(TextKind::Passage, missing)
            .await
            .map_err(ApiError::internal)?
            .into_iter();
        if reused > 0 {
            tracing::debug!(reused, "chunk vectors reused from the previous versions");
        }

        let mut docs = Vec::new();
        for (((d, chunks), (id, hash)), (inputs, known)) in req
            .documents
            .into_iter()
            .zip(chunked)
            .zip(ids)
            .zip(embed_inputs.into_iter().zip(known.iter_mut()))
        {
            let embedded = inputs
                .iter()
                .filter(|(_, h)| !known.contains_key(h))
                .count();
            let stored = chunks.map(|chunks| {
                let mut metadata = d.metadata.unwrap_or_default();
                if let Some(source) = d.source {
                    metadata.insert("source".into(), Value::String(source));
                }
                NewDocument {
                    id: id.clone(),
                    title: d.title,
                    text: d.text,
                    metadata,
                    hash,
                    chunks: chunks
                        .into_iter()
                        .zip(inputs)
                        .map(|(c, (_, embed_hash))| NewChunk {
                            section: c.section(),
                            text: c.text,
                            start: c.start,
                            end: c.end,
                            vector: known
                                .get(&embed_hash)
                                .cloned()
                                .or_else(|| fresh.next())
                                .unwrap_or_default(),
                            embed_hash,
                        })
                        .collect(),
                }
            });
            docs.push((id, stored, embedded));
        }

        // Store (one transaction per document), then index; one document failing
        // does not undo the others.
        let results = self
            .with_data(move |engine, data| {
                let mut out = Vec::new();
                for (id, doc, embedded) in docs {
                    let Some(doc) = doc else {
                        let chunks = data
                            .store
                            .document(&id)
                            .ok()
                            .flatten()
                            .map(|d| d.chunks)
                            .unwrap_or(0);
                        out.push(IngestedDocument {
                            id,
                            status: IngestStatus::Unchanged,
                            chunks,
                            embedded: 0,
                            error: None,
                        });
                        continue;
                    };
                    if let Err(e) = data
                        .index
                        .check_all(doc.chunks.iter().map(|c| c.vector.as_slice()))
                    {
                        tracing::error!(%id, error = %e, "embedding produced an unusable vector");
                        out.push(failed(id, "embedding failed"));
                        continue;
                    }
                    match data.store.upsert(&doc) {
                        Ok((status, new)) => {
                            for (key, vector) in &new {
                                // Checked above; a failure here would be a bug in the index.
                                if let Err(e) = data.index.insert(*key, vector) {
                                    tracing::error!(%id, error = %e, "index insert failed");
                                }
                            }
                            let status = match status {
                                UpsertStatus::Created => IngestStatus::Created,
                                UpsertStatus::Updated => IngestStatus::Updated,
                                UpsertStatus::Unchanged => IngestStatus::Unchanged,
                            };
                            let embedded = if status == IngestStatus::Unchanged {
                                0
                            } else {
                                embedded
                            };
                            out.push(IngestedDocument {
                                id,
                                status,
                                chunks: doc.chunks.len(),
                                embedded,
                                error: None,
                            });
                        }
                        Err(e) => {
                            tracing::error!(%id, error = %e, "storing a document failed");
                            out.push(failed(id, "storage failed"));
                        }
                    }
                }
                data.compact_if_needed(&engine.config.index)?;
                Ok(out)
            })
            .await?;
        Ok(IngestResponse { documents: results })
    }

    /// One page of documents, in id order, after `after`.
    pub async fn list_documents(
        self: &Arc<Self>,
        after: Option<String>,
        limit: Option<usize>,
    ) -> Result<Value, ApiError> {
        let limit = limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::Invalid("limit: must be within 1..=1000".into()));
        }
        self.with_data(move |_, data| {
            let docs = data
                .store
                .list(after.as_deref(), limit)
                .map_err(ApiError::internal)?;
            let next = (docs.len() == limit)
                .then(|| docs.last().map(|d| d.id.clone()))
                .flatten();
            Ok(serde_json::json!({ "documents": docs, "next": next }))
        })
        .await
    }

    /// Document `id`'s record.
    pub async fn get_document(self: &Arc<Self>, id: String) -> Result<Value, ApiError> {
        self.with_data(move |_, data| {
            match data.store.document(&id).map_err(ApiError::internal)? {
                Some(d) => Ok(serde_json::to_value(d).unwrap_or_default()),
                None => Err(ApiError::NotFound(format!("no document with id {id:?}"))),
            }
        })
        .await
    }

    /// Deletes document `id`; its chunks are hidden from search at once.
    pub async fn delete_document(self: &Arc<Self>, id: String) -> Result<Value, ApiError> {
        self.with_data(move |engine, data| {
            if data.store.delete(&id).map_err(ApiError::internal)? {
                data.compact_if_needed(&engine.config.index)?;
                Ok(serde_json::json!({ "id": id, "deleted": true }))
            } else {
                Err(ApiError::NotFound(format!("no document with id {id:?}")))
            }
        })
        .await
    }

    /// Validates an ask, retrieves, and queues generation.
    pub async fn ask(self: &Arc<Self>, req: &AskRequest) -> Result<AskRun, ApiError> {
        let started = Instant::now();
        let question = query_text("question", &req.question)?;
        let style = Style::parse(req.style.as_deref()).map_err(ApiError::Invalid)?;
        let history = req.history.clone().unwrap_or_default();
        if history.len() > 40 {
            return Err(ApiError::Invalid("history: at most 40 messages".into()));
        }
        if let Some(m) = history
            .iter()
            .find(|m| m.role != "user" && m.role != "assistant")
        {
            return Err(ApiError::Invalid(format!(
                "history: role {:?} is not \"user\" or \"assistant\"",
                m.role
            )));
        }
        let language = language::detect(question);
        let r = &self.config.retrieval;
        let top_k = req.top_k.unwrap_or(r.top_k);
        if !(1..=r.max_top_k).contains(&top_k) {
            return Err(ApiError::Invalid(format!(
                "top_k: must be within 1..={}",
                r.max_top_k
            )));
        }
        let g = &self.config.generation;
        let mut params = self.config.generation_defaults();
        if style == Style::Concise {
            params.max_tokens = g.concise_max_tokens;
        }
        // Not markers alone, nor a passage heading echoed (see the function).
        params.steer = Some(citations::steer_answer);
        params.deadline =
            Some(std::time::Instant::now() + std::time::Duration::from_secs_f64(g.timeout_s));
        if let Some(m) = req.max_tokens {
            if !(1..=g.max_tokens_limit).contains(&m) {
                return Err(ApiError::Invalid(format!(
                    "max_tokens: must be within 1..={}",
                    g.max_tokens_limit
                )));
            }
            params.max_tokens = m;
        }
        if let Some(t) = req.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::Invalid(
                    "temperature: must be within 0..=2".into(),
                ));
            }
            params.temperature = t;
        }
        if let Some(p) = req.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::Invalid("top_p: must be within (0, 1]".into()));
            }
            params.top_p = p;
        }
        if let Some(s) = req.seed {
            params.seed = s;
        }
        if let Some(k) = req.sample_top_k {
            if k > 1000 {
                return Err(ApiError::Invalid(
                    "sample_top_k: must be within 0..=1000".into(),
                ));
            }
            params.top_k = k;
        }
        if let Some(rp) = req.repeat_penalty {
            if !(1.0..=2.0).contains(&rp) {
                return Err(ApiError::Invalid(
                    "repeat_penalty: must be within 1..=2".into(),
                ));
            }
            params.repeat_penalty = rp;
        }
        if let Some(stop) = &req.stop {
            if stop.len() > 4 || stop.iter().any(|s| s.is_empty() || s.chars().count() > 64) {
                return Err(ApiError::Invalid(
                    "stop: at most 4 strings of 1 to 64 characters".into(),
                ));
            }
            params.stop = stop.clone();
        }

        let filter = Filter::parse(req.filter.as_ref())?;
        let mode = Mode::parse(req.mode.as_deref(), r.mode)?;
        let generator = self
            .generator
            .as_ref()
            .ok_or_else(|| ApiError::internal("no generator is loaded"))?;
        let sources = self
            .retrieve(question, top_k, filter, mode, self.thresholds.min_score)
            .await?;
        let retrieval_ms = started.elapsed().as_secs_f64() * 1e3;
        let model = generator.name.clone();
        // Nothing relevant enough: decline without asking the model.
        if sources
            .first()
            .is_none_or(|s| s.score < self.thresholds.abstain_below)
        {
            return Ok(AskRun {
                sources: Vec::new(),
                events: None,
                started,
                retrieval_ms,
                model,
                language,
                style,
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let passages = sources
            .iter()
            .map(|s| Passage::located(s.title.as_deref(), s.section.as_deref(), &s.text))
            .collect();
        let queued_tx = tx.clone();
        let ahead = generator
            .submit(GenJob {
                question: question.to_string(),
                passages,
                history,
                style,
                language,
                params,
                context_budget: self.config.generation.max_context_tokens,
                events: tx,
            })
            .map_err(|_| ApiError::Busy {
                retry_after_secs: 2,
            })?;
        if ahead > 0 {
            let _ = queued_tx.send(GenEvent::Queued { position: ahead });
        }
        Ok(AskRun {
            sources,
            events: Some(rx),
            started,
            retrieval_ms,
            model,
            language,
            style,
        })
    }
}

impl Engine {
    /// Post-processing: checks the answer's citation markers against what its
    /// sentences say, re-points or removes unsupported ones, attributes
    /// unmarked sentences, measures grounding (see [`citations`]), notes a
    /// refusal and the answer's language, and applies the content rules.
    pub async fn answer(
        &self,
        progress: AskProgress,
        g: ragd_generator::Generation,
    ) -> AskResponse {
        let sources = progress.sources();
        let segments = citations::segments(&g.text, sources.len());
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
                let support = citations::support_matrix(&sentences, &passages);
                Some(citations::check(
                    &g.text,
                    &segments,
                    &support,
                    self.config.answers.min_support,
                ))
            }
            Err(e) => {
                tracing::warn!(error = %e, "citation check skipped");
                None
            }
        };
        progress.finish(g, checked, &self.content)
    }

    /// Runs an ask to its end without streaming: the final answer, or the
    /// generator's error (shared by `POST /ask` and `/v1/chat/completions`).
    pub async fn collect(
        &self,
        events: Option<mpsc::UnboundedReceiver<GenEvent>>,
        mut progress: AskProgress,
    ) -> Result<AskResponse, ApiError> {
        let Some(mut events) = events else {
            return Ok(progress.no_sources());
        };
        while let Some(event) = events.recv().await {
            match event {
                GenEvent::Prompt {
                    passages_used,
                    trimmed,
                    prompt_ms,
                    ..
                } => progress.prompt_ready(passages_used, trimmed, prompt_ms),
                GenEvent::Queued { .. } => {}
                GenEvent::Token(_) => progress.token(),
                GenEvent::Done(generation) => return Ok(self.answer(progress, generation).await),
                GenEvent::Failed { message, fault } => return Err(fault.error(message)),
            }
        }
        Err(ApiError::internal(
            "the generator stopped without an answer",
        ))
    }

    /// Embeds `texts` as passages: the vectors and the tokens read.
    pub async fn embeddings(&self, texts: Vec<String>) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        if texts.is_empty() || texts.len() > 256 {
            return Err(ApiError::Invalid("input: 1 to 256 texts".into()));
        }
        if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(ApiError::Invalid(format!("input[{i}]: empty text")));
        }
        let tokens = texts.iter().map(|t| self.embedder.count_tokens(t)).sum();
        let vectors = self
            .embedder
            .embed(TextKind::Passage, texts)
            .await
            .map_err(ApiError::internal)?;
        Ok((vectors, tokens))
    }

    /// The names of the generator (when one is loaded) and the embedder.
    pub fn model_names(&self) -> (Option<String>, String) {
        (
            self.generator.as_ref().map(|g| g.name.clone()),
            self.embedder.name.clone(),
        )
    }

    /// The content rules, for streamed answers.
    pub fn content_rules(&self) -> Arc<ContentRules> {
        Arc::clone(&self.content)
    }
}

impl Engine {
    /// Embeds `query` and returns the `top_k` best chunks passing `filter` and
    /// scoring at least `min_score`, numbered from 1.
    async fn retrieve(
        self: &Arc<Self>,
        query: &str,
        top_k: usize,
        filter: Filter,
        mode: Mode,
        min_score: f32,
    ) -> Result<Vec<Source>, ApiError> {
        let r = &self.config.retrieval;
        let strategy = Strategy {
            mode,
            fusion: r.fusion,
            dense_weight: r.dense_weight,
            candidates: r.candidates,
            ef_search: self.config.index.ef_search,
        };
        let text = query.to_string();
        let vector = self
            .embedder
            .embed(TextKind::Query, vec![query.to_string()])
            .await
            .map_err(ApiError::internal)?
            .pop()
            .ok_or_else(|| ApiError::internal("the embedder returned no vector"))?;
        self.with_data(move |_, data| {
            // Ask for more than top_k so that dropping near-duplicates still leaves top_k.
            let wanted = (top_k * 2).min(top_k + 20);
            let hits = retrieval::search_with(
                &data.store,
                &data.index,
                &text,
                &vector,
                wanted,
                &filter,
                &strategy,
            )?;
            let hits: Vec<_> = hits.into_iter().filter(|h| h.score >= min_score).collect();
            let keys: Vec<usize> = hits.iter().map(|h| h.id).collect();
            let chunks = data.store.chunks(&keys).map_err(ApiError::internal)?;
            let keep = retrieval::distinct(
                &chunks
                    .iter()
                    .map(|(_, c)| (c.text.as_str(), c.vector.as_slice()))
                    .collect::<Vec<_>>(),
            );
            let mut chunks: Vec<_> = chunks.into_iter().map(Some).collect();
            let chunks: Vec<_> = keep.into_iter().filter_map(|i| chunks[i].take()).collect();
            // A chunk overlapping a better-ranked one of the same document is merged
            // into it: the overlap is not shown twice and the passage reads on.
            let groups = retrieval::merge_overlapping(
                &chunks
                    .iter()
                    .map(|(_, c)| (c.document_id.as_str(), c.start, c.end))
                    .collect::<Vec<_>>(),
            );
            let score_of: HashMap<usize, f32> = hits.iter().map(|h| (h.id, h.score)).collect();
            Ok(groups
                .into_iter()
                .take(top_k)
                .enumerate()
                .map(|(i, members)| {
                    let (key, c) = &chunks[members[0]];
                    let (mut start, mut text) = (c.start, c.text.clone());
                    let mut merged_with = Vec::new();
                    for &m in &members[1..] {
                        let (_, other) = &chunks[m];
                        (start, text) =
                            retrieval::union_text((start, &text), (other.start, &other.text));
                        merged_with.push(other.chunk_id());
                    }
                    Source {
                        n: i + 1,
                        document_id: c.document_id.clone(),
                        chunk_id: c.chunk_id(),
                        merged_with,
                        title: c.title.clone(),
                        section: (!c.section.is_empty()).then(|| c.section.clone()),
                        snippet: snippet(&text),
                        score: score_of.get(key).copied().unwrap_or(0.0),
                        cited_by: None,
                        verified: None,
                        index: c.index,
                        end: start + text.len(),
                        start,
                        text,
                        vector: c.vector.clone(),
                    }
                })
                .collect())
        })
        .await
    }

    /// Retrieval only: `POST /search`.
    pub async fn search(self: &Arc<Self>, req: SearchRequest) -> Result<SearchResponse, ApiError> {
        let query = query_text("query", &req.query)?;
        let r = &self.config.retrieval;
        let top_k = req.top_k.unwrap_or(10);
        if !(1..=r.max_top_k.max(100)).contains(&top_k) {
            return Err(ApiError::Invalid(format!(
                "top_k: must be within 1..={}",
                r.max_top_k.max(100)
            )));
        }
        let mode = Mode::parse(req.mode.as_deref(), r.mode)?;
        let filter = Filter::parse(req.filter.as_ref())?;
        let sources = self.retrieve(query, top_k, filter, mode, -1.0).await?;
        let mut tally = Tally::default();
        Ok(SearchResponse {
            results: sources
                .into_iter()
                .map(|s| SearchResult {
                    document_id: s.document_id,
                    chunk_id: s.chunk_id,
                    title: s.title,
                    merged_with: s.merged_with,
                    section: s.section,
                    index: s.index,
                    start: s.start,
                    end: s.end,
                    text: self.content.apply(&s.text, &mut tally),
                    score: s.score,
                })
                .collect(),
            content_rules: tally.applied(),
        })
    }
}

/// A file posted to `/ingest` as `multipart/form-data`.
#[derive(Debug, Clone)]
pub struct UploadedFile {
    /// The part's file name; it becomes the document id.
    pub name: String,
    /// The declared content type.
    pub content_type: Option<String>,
    /// The contents.
    pub bytes: Vec<u8>,
}

impl Engine {
    /// Ingests files: each is identified by its name, its text extracted
    /// ([`crate::extract`]); a file that cannot be read is reported as failed and
    /// the others still go in.
    pub async fn ingest_files(
        self: &Arc<Self>,
        files: Vec<UploadedFile>,
    ) -> Result<IngestResponse, ApiError> {
        let max = self.config.server.max_documents_per_request;
        if files.len() > max {
            return Err(ApiError::Invalid(format!(
                "at most {max} files per request"
            )));
        }
        let extracted = tokio::task::spawn_blocking(move || {
            files
                .into_iter()
                .map(|f| {
                    let e = crate::extract::extract(&f.name, f.content_type.as_deref(), &f.bytes);
                    (f.name, e)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(ApiError::internal)?;
        let mut slots: Vec<Result<usize, IngestedDocument>> = Vec::new();
        let mut documents = Vec::new();
        for (name, result) in extracted {
            let bad_name = name.trim().is_empty()
                || name.len() > MAX_ID_LEN
                || name.chars().any(char::is_control);
            let duplicate = documents
                .iter()
                .any(|d: &DocumentIn| d.id.as_deref() == Some(name.as_str()));
            match result {
                _ if bad_name => slots.push(Err(failed(
                    name,
                    "the file name must be 1..=256 bytes without control characters",
                ))),
                _ if duplicate => slots.push(Err(failed(
                    name,
                    "the same file name appears twice in this request",
                ))),
                Err(why) => slots.push(Err(failed(name, &why))),
                Ok(e) => {
                    let mut metadata = Map::new();
                    metadata.insert("file_name".into(), Value::String(name.clone()));
                    metadata.insert("format".into(), Value::String(e.kind.into()));
                    let stem = std::path::Path::new(&name)
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned());
                    // Titles are display strings: keep them short whatever the file says.
                    let title = e
                        .title
                        .or(stem)
                        .map(|t| t.chars().take(200).collect::<String>());
                    slots.push(Ok(documents.len()));
                    documents.push(DocumentIn {
                        id: Some(name),
                        title,
                        source: None,
                        text: e.text,
                        metadata: Some(metadata),
                    });
                }
            }
        }
        let mut stored = if documents.is_empty() {
            Vec::new()
        } else {
            self.ingest(IngestRequest { documents }).await?.documents
        }
        .into_iter()
        .map(Some)
        .collect::<Vec<_>>();
        let documents = slots
            .into_iter()
            .map(|slot| match slot {
                Ok(i) => stored[i]
                    .take()
                    .unwrap_or_else(|| failed(String::new(), "lost")),
                Err(f) => f,
            })
            .collect();
        Ok(IngestResponse { documents })
    }
}

/// Body of `POST /search`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// The query text.
    pub query: String,
    /// Results to return (default 10).
    pub top_k: Option<usize>,
    /// Conditions on `document_id` / `metadata.<key>`.
    pub filter: Option<Value>,
    /// `dense`, `lexical` or `hybrid` (default: `retrieval.mode`).
    pub mode: Option<String>,
}

/// One result of `POST /search`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SearchResult {
    /// The document.
    pub document_id: String,
    /// `{document_id}#{index}`.
    pub chunk_id: String,
    /// Neighbouring chunks that overlapped this one and were merged into it
    /// (`start`, `end` and `text` then cover them all).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub merged_with: Vec<String>,
    /// The document's title.
    pub title: Option<String>,
    /// The section the chunk is in ("Heading > Subheading"), when the document has headings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section: Option<String>,
    /// Position of the chunk in its document (0-based).
    pub index: usize,
    /// Byte offset of the chunk in the document text.
    pub start: usize,
    /// Byte offset just past the chunk.
    pub end: usize,
    /// The chunk's text.
    pub text: String,
    /// Cosine similarity with the query.
    pub score: f32,
}

/// Response of `POST /search`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SearchResponse {
    /// Best first.
    pub results: Vec<SearchResult>,
    /// Content rules that changed the results' text, with counts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub content_rules: Vec<content::Applied>,
}

fn failed(id: String, why: &str) -> IngestedDocument {
    IngestedDocument {
        id,
        status: IngestStatus::Failed,
        chunks: 0,
        embedded: 0,
        error: Some(why.to_string()),
    }
}

impl AskRun {
    /// Splits the run into its event stream and the state that turns events into
    /// the final answer.
    pub fn into_parts(self) -> (Option<mpsc::UnboundedReceiver<GenEvent>>, AskProgress) {
        let progress = AskProgress {
            used: self.sources.len(),
            trimmed: false,
            run_sources: self.sources,
            prompt_ms: 0.0,
            first_token_ms: None,
            started: self.started,
            retrieval_ms: self.retrieval_ms,
            model: self.model,
            language: self.language,
            style: self.style,
            defused: 0,
        };
        let defused = progress
            .sources()
            .iter()
            .map(|s| crate::prompt::defuse(&s.text).1)
            .sum();
        let progress = AskProgress {
            defused,
            ..progress
        };
        (self.events, progress)
    }
}

impl AskProgress {
    /// Notes that the prompt uses the first `used` sources.
    pub fn prompt_ready(&mut self, used: usize, trimmed: bool, prompt_ms: f64) {
        self.used = used.min(self.run_sources.len());
        self.trimmed = trimmed;
        self.prompt_ms = prompt_ms;
    }

    /// Notes an answer token.
    pub fn token(&mut self) {
        self.first_token_ms
            .get_or_insert_with(|| self.started.elapsed().as_secs_f64() * 1e3);
    }

    /// The sources the prompt uses.
    pub fn sources(&self) -> &[Source] {
        &self.run_sources[..self.used]
    }

    /// The sources the prompt uses, as a client may see them (content rules
    /// applied to their snippets).
    pub fn sources_for_client(&self, rules: &ContentRules) -> Vec<Source> {
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
    pub fn no_sources(self) -> AskResponse {
        AskResponse {
            answer: self.language.not_in_documents().into(),
            answerable: false,
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
            finish_reason: "no_sources".into(),
            model: self.model,
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
                total_tokens: 0,
                cached_tokens: 0,
            },
            timings: Timings {
                retrieval_ms: self.retrieval_ms,
                prompt_ms: 0.0,
                generation_ms: 0.0,
                first_token_ms: None,
                total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            },
        }
    }

    /// The final answer: the checked text with its citations and grounding,
    /// content rules applied.
    fn finish(
        self,
        g: ragd_generator::Generation,
        checked: Option<citations::Checked>,
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
                let citations = citations::cited(&g.text, sources.len())
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
        crate::metrics::get().answer(self.first_token_ms, g.completion_tokens);
        let answer_language = language::detect(&answer);
        let sources: Vec<Source> = sources.iter().map(|s| redacted(s, &mut tally)).collect();
        AskResponse {
            answerable: !language::is_refusal(&answer),
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
            finish_reason: g.finish_reason.as_str().to_string(),
            model: self.model.clone(),
            usage: Usage {
                prompt_tokens: g.prompt_tokens,
                completion_tokens: g.completion_tokens,
                total_tokens: g.prompt_tokens + g.completion_tokens,
                cached_tokens: g.cached_tokens,
            },
            timings: Timings {
                retrieval_ms: self.retrieval_ms,
                prompt_ms: self.prompt_ms,
                generation_ms: g.prefill_ms + g.decode_ms,
                first_token_ms: self.first_token_ms,
                total_ms: self.started.elapsed().as_secs_f64() * 1e3,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_are_cut_on_char_boundaries() {
        let long = "北".repeat(300);
        let s = snippet(&long);
        assert_eq!(s.chars().count(), SNIPPET_CHARS + 1);
        assert!(s.ends_with('…'));
        assert_eq!(snippet("short"), "short");
    }

    #[test]
    fn content_hash_separates_fields() {
        assert_ne!(sha256_hex(&[b"ab", b"c"]), sha256_hex(&[b"a", b"bc"]));
    }
}
