//! The ingest flow: validate → extract (files) → chunk → (generate questions,
//! [`crate::enrich`]) → embed → store.
//!
//! Every document of a request is validated before anything is stored. An
//! unchanged document (same content hash) costs one lookup; in a changed one
//! only the chunks whose embedded text changed are embedded again. Each
//! document is stored in its own transaction, so one failing does not undo
//! the others.

use std::collections::HashMap;

use ragd_core::{
    Embed, Embedded, NewChunk, NewDocument, TextKind, UpsertFailure, UpsertStatus,
    DEFAULT_COLLECTION,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::chunk::{self, Chunk};
use crate::error::Error;
use crate::Pipeline;

/// Longest document id accepted.
pub(crate) const MAX_ID_LEN: usize = 256;
/// Metadata keys with this prefix are ragd's own: clients cannot set them
/// (`ragd_source` names the source that wrote a document, and only such
/// documents are ever deleted or shown as fetched by a sync).
pub const RESERVED_PREFIX: &str = "ragd_";
/// Longest title accepted, in bytes.
const MAX_TITLE_LEN: usize = 1024;

/// One document of `POST /ingest`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DocumentIn {
    /// Caller's id (1 to 256 characters, not blank, no control characters);
    /// derived from the text when absent.
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 256,
            pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
        )
    )]
    pub id: Option<String>,
    /// Optional title (at most 1,024 characters), shown in citations and given to the model.
    #[cfg_attr(feature = "openapi", schema(max_length = 1024))]
    pub title: Option<String>,
    /// Where the document came from (kept in its metadata).
    pub source: Option<String>,
    /// The text (not blank).
    #[cfg_attr(feature = "openapi", schema(min_length = 1, pattern = r"\S"))]
    pub text: String,
    /// Any JSON object.
    pub metadata: Option<Map<String, Value>>,
}

/// Body of `POST /ingest`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct IngestRequest {
    /// The documents: 1 to `ingest.max_documents_per_request` (1,000 by
    /// default), each id at most once (a document without an id gets one
    /// derived from its text: two such documents of one text are refused;
    /// the OpenAPI document says `uniqueItems`).
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 1000))]
    pub documents: Vec<DocumentIn>,
}

/// Outcome for one document.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

impl IngestedDocument {
    /// A document that was not stored, and why.
    fn refused(id: String, why: &str) -> Self {
        IngestedDocument {
            id,
            status: IngestStatus::Failed,
            chunks: 0,
            embedded: 0,
            error: Some(why.to_string()),
        }
    }
}

/// `created`, `updated`, `unchanged` or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

impl From<UpsertStatus> for IngestStatus {
    fn from(s: UpsertStatus) -> Self {
        match s {
            UpsertStatus::Created => IngestStatus::Created,
            UpsertStatus::Updated => IngestStatus::Updated,
            UpsertStatus::Unchanged => IngestStatus::Unchanged,
        }
    }
}

/// Response of `POST /ingest`.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IngestResponse {
    /// One entry per document, in request order.
    pub documents: Vec<IngestedDocument>,
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

/// The title of a file named `name` whose text gave `title`: that, else the
/// file's stem; titles are display strings, kept short whatever the file says.
pub fn file_title(title: Option<String>, name: &str) -> Option<String> {
    let stem = std::path::Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned());
    title.or(stem).map(|t| t.chars().take(200).collect())
}

/// A SHA-256 over `parts`, each prefixed with its length so that moving bytes
/// from one part to the next changes the hash.
pub(crate) fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A document that passed validation: its id and content hash.
#[derive(Debug, Clone)]
struct Validated {
    id: String,
    hash: String,
}

/// A chunk to embed: what it is embedded as (the title and the section path
/// in front of the chunk, so that a passage is found by what its document and
/// section are about), its text alone (what questions are written from), and
/// the hash that decides whether a stored vector and questions can be reused:
/// of the embedded text, and of how many questions are asked for when any are.
struct EmbedInput {
    /// Title and section lines, then the text.
    whole: String,
    /// The chunk's text.
    text: String,
    hash: String,
}

impl EmbedInput {
    fn new(title: Option<&str>, chunk: &Chunk, questions: usize) -> Self {
        let mut head = String::with_capacity(128);
        for part in [title.unwrap_or(""), &chunk.section()] {
            if !part.is_empty() {
                head.push_str(part);
                head.push('\n');
            }
        }
        let whole = format!("{head}{}", chunk.text);
        let hash = if questions == 0 {
            sha256_hex(&[whole.as_bytes()])
        } else {
            sha256_hex(&[whole.as_bytes(), b"questions", &questions.to_le_bytes()])
        };
        EmbedInput {
            whole,
            text: chunk.text.clone(),
            hash,
        }
    }
}

impl Pipeline {
    /// Stage 1: every document's id and content hash, or the first problem.
    fn validate_ingest(&self, req: &IngestRequest) -> Result<Vec<Validated>, Error> {
        let max = self.config.max_documents_per_request;
        if req.documents.is_empty() {
            return Err(Error::Invalid(
                "documents: at least one document is required".into(),
            ));
        }
        if req.documents.len() > max {
            return Err(Error::Invalid(format!(
                "documents: at most {max} documents per request"
            )));
        }
        let mut out: Vec<Validated> = Vec::with_capacity(req.documents.len());
        for (i, d) in req.documents.iter().enumerate() {
            let at = |m: &str| Error::Invalid(format!("documents[{i}].{m}"));
            if d.text.trim().is_empty() {
                return Err(at("text: must not be empty"));
            }
            // Lengths in characters, as the OpenAPI document's maxLength counts.
            if let Some(t) = &d.title {
                if t.chars().count() > MAX_TITLE_LEN {
                    return Err(at(&format!(
                        "title: longer than {MAX_TITLE_LEN} characters"
                    )));
                }
            }
            let metadata = serde_json::to_vec(&d.metadata).map_err(Error::internal)?;
            let hash = sha256_hex(&[
                d.title.as_deref().unwrap_or("").as_bytes(),
                d.source.as_deref().unwrap_or("").as_bytes(),
                d.text.as_bytes(),
                &metadata,
            ]);
            let id = match &d.id {
                Some(id) => {
                    if id.trim().is_empty()
                        || id.chars().count() > MAX_ID_LEN
                        || id.chars().any(char::is_control)
                    {
                        return Err(at(&format!(
                            "id: must be 1..={MAX_ID_LEN} characters, not blank, without control characters"
                        )));
                    }
                    id.clone()
                }
                None => format!("doc-{}", &sha256_hex(&[d.text.as_bytes()])[..16]),
            };
            if out.iter().any(|v| v.id == id) {
                return Err(at(&format!("id: {id:?} appears twice in this request")));
            }
            out.push(Validated { id, hash });
        }
        Ok(out)
    }

    /// Ingests documents: validate, chunk the new and changed ones, embed what
    /// is not embedded yet, store.
    pub async fn ingest(&self, req: IngestRequest) -> Result<IngestResponse, Error> {
        self.ingest_into(DEFAULT_COLLECTION, req).await
    }

    /// [`Self::ingest`] into `collection`.
    pub async fn ingest_into(
        &self,
        collection: &str,
        req: IngestRequest,
    ) -> Result<IngestResponse, Error> {
        if let Some((i, key)) = req.documents.iter().enumerate().find_map(|(i, d)| {
            d.metadata
                .as_ref()
                .and_then(|m| m.keys().find(|k| k.starts_with(RESERVED_PREFIX)))
                .map(|k| (i, k))
        }) {
            return Err(Error::Invalid(format!(
                "documents[{i}].metadata.{key}: keys starting with {RESERVED_PREFIX:?} are ragd's own (a synced source's documents carry them)"
            )));
        }
        self.ingest_synced(collection, req).await
    }

    /// [`Self::ingest_into`] for a synced source (`ragd-sources`), whose
    /// documents carry the reserved metadata keys that say which source wrote
    /// them.
    pub async fn ingest_synced(
        &self,
        collection: &str,
        req: IngestRequest,
    ) -> Result<IngestResponse, Error> {
        self.require_collection(collection).await?;
        let validated = self.validate_ingest(&req)?;
        let keys: Vec<(String, String)> = validated
            .iter()
            .map(|v| (v.id.clone(), v.hash.clone()))
            .collect();
        // `None`: stored with this hash already; else vectors to reuse.
        let prior = self.store.prior_versions(collection, &keys).await?;

        // Stage 2: chunk the new and changed documents (CPU work, off the runtime).
        let texts: Vec<Option<String>> = req
            .documents
            .iter()
            .zip(&prior)
            .map(|(d, p)| p.is_some().then(|| d.text.clone()))
            .collect();
        let embedder = std::sync::Arc::clone(&self.embedder);
        let chunking = self.config.chunking.clone();
        let chunked = tokio::task::spawn_blocking(move || {
            let count = |t: &str| embedder.count_tokens(t);
            texts
                .iter()
                .map(|t| match t {
                    Some(t) => chunk::chunk_text(count, t, &chunking).map(Some),
                    None => Ok(None),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(Error::internal)?
        .map_err(Error::internal)?;

        // Stage 3: for the chunks with no stored vector, questions (when
        // enabled and a model is loaded), then their embeddings.
        let n_questions = if self.writes_questions() {
            self.config.generate_questions
        } else {
            if self.config.generate_questions > 0 {
                tracing::warn!("ingest.generate_questions is set but no answer model is loaded: no questions are generated");
            }
            0
        };
        let inputs: Vec<Vec<EmbedInput>> = req
            .documents
            .iter()
            .zip(&chunked)
            .map(|(d, chunks)| {
                let title = d.title.as_deref().map(str::trim).filter(|t| !t.is_empty());
                chunks
                    .iter()
                    .flatten()
                    .map(|c| EmbedInput::new(title, c, n_questions))
                    .collect()
            })
            .collect();
        let no_vectors = HashMap::new();
        let known = |i: usize| prior[i].as_ref().unwrap_or(&no_vectors);
        let mut missing: Vec<(Option<&str>, &EmbedInput)> = Vec::new();
        for (i, inputs) in inputs.iter().enumerate() {
            let title = req.documents[i].title.as_deref();
            for input in inputs {
                if !known(i).contains_key(&input.hash) {
                    missing.push((title, input));
                }
            }
        }
        let reused = inputs.iter().map(Vec::len).sum::<usize>() - missing.len();
        if reused > 0 {
            tracing::debug!(reused, "chunk vectors reused from the previous versions");
        }
        let mut generated: Vec<Vec<String>> = Vec::with_capacity(missing.len());
        if let (Some(generator), true) = (&self.generator, n_questions > 0) {
            let started = std::time::Instant::now();
            for (title, input) in &missing {
                generated.push(
                    crate::enrich::questions(&**generator, *title, &input.text, n_questions).await,
                );
            }
            tracing::info!(
                chunks = missing.len(),
                seconds = started.elapsed().as_secs_f64(),
                "questions generated"
            );
        }
        generated.resize(missing.len(), Vec::new());
        // The questions are not embedded with the passage: on the Debian FAQ
        // that lowered dense nDCG@10 from 0.757 to 0.711 (the model's
        // questions are partly about what the passage does not say); indexed
        // for words alone they lift BM25 (see README).
        let texts: Vec<String> = missing
            .iter()
            .map(|(_, input)| input.whole.clone())
            .collect();
        let mut fresh = self
            .embedder
            .embed(TextKind::Passage, texts)
            .await?
            .into_iter()
            .zip(generated)
            .map(|(vector, questions)| Embedded { vector, questions });

        // Stage 4: store (one transaction per document).
        let mut new_documents = Vec::new();
        let mut embedded_counts = Vec::new();
        let mut slots = Vec::new(); // per request document: index into new_documents, or unchanged
        for (i, ((d, chunks), (v, inputs))) in req
            .documents
            .into_iter()
            .zip(chunked)
            .zip(validated.iter().zip(inputs))
            .enumerate()
        {
            let Some(chunks) = chunks else {
                slots.push(None);
                continue;
            };
            let known = known(i);
            let embedded = inputs
                .iter()
                .filter(|input| !known.contains_key(&input.hash))
                .count();
            let mut metadata = d.metadata.unwrap_or_default();
            if let Some(source) = d.source {
                metadata.insert("source".into(), Value::String(source));
            }
            let chunks = chunks
                .into_iter()
                .zip(inputs)
                .map(|(c, input)| {
                    let Embedded { vector, questions } = match known.get(&input.hash) {
                        Some(e) => e.clone(),
                        None => fresh.next().unwrap_or_default(),
                    };
                    NewChunk {
                        section: c.section(),
                        text: c.text,
                        start: c.start,
                        end: c.end,
                        vector,
                        questions,
                        embed_hash: input.hash,
                    }
                })
                .collect();
            slots.push(Some(new_documents.len()));
            embedded_counts.push(embedded);
            new_documents.push(NewDocument {
                collection: collection.to_string(),
                id: v.id.clone(),
                title: d.title,
                text: d.text,
                metadata,
                hash: v.hash.clone(),
                chunks,
            });
        }
        let chunk_counts: Vec<usize> = new_documents.iter().map(|d| d.chunks.len()).collect();
        let stored = self.store.upsert(new_documents).await?;
        let mut documents = Vec::with_capacity(slots.len());
        for (slot, v) in slots.into_iter().zip(validated) {
            let outcome = match slot {
                None => {
                    let chunks = self
                        .store
                        .document(collection, &v.id)
                        .await?
                        .map(|d| d.chunks)
                        .unwrap_or(0);
                    IngestedDocument {
                        id: v.id,
                        status: IngestStatus::Unchanged,
                        chunks,
                        embedded: 0,
                        error: None,
                    }
                }
                Some(k) => match &stored[k] {
                    Ok(status) => {
                        let status = IngestStatus::from(*status);
                        IngestedDocument {
                            id: v.id,
                            status,
                            chunks: chunk_counts[k],
                            embedded: if status == IngestStatus::Unchanged {
                                0
                            } else {
                                embedded_counts[k]
                            },
                            error: None,
                        }
                    }
                    Err(e) => {
                        match e {
                            UpsertFailure::Vector(why) => {
                                tracing::error!(id = %v.id, error = %why, "embedding produced an unusable vector")
                            }
                            UpsertFailure::Storage(why) => {
                                tracing::error!(id = %v.id, error = %why, "storing a document failed")
                            }
                        }
                        IngestedDocument::refused(v.id, &e.to_string())
                    }
                },
            };
            documents.push(outcome);
        }
        Ok(IngestResponse { documents })
    }

    /// Ingests files: each is identified by its name, its text extracted
    /// ([`crate::extract`]); a file that cannot be read is reported as failed
    /// and the others still go in.
    pub async fn ingest_files(&self, files: Vec<UploadedFile>) -> Result<IngestResponse, Error> {
        self.ingest_files_into(DEFAULT_COLLECTION, files).await
    }

    /// [`Self::ingest_files`] into `collection`.
    pub async fn ingest_files_into(
        &self,
        collection: &str,
        files: Vec<UploadedFile>,
    ) -> Result<IngestResponse, Error> {
        self.require_collection(collection).await?;
        let max = self.config.max_documents_per_request;
        if files.len() > max {
            return Err(Error::Invalid(format!("at most {max} files per request")));
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
        .map_err(Error::internal)?;
        let mut slots: Vec<Result<usize, IngestedDocument>> = Vec::new();
        let mut documents = Vec::new();
        for (name, result) in extracted {
            let bad_name = name.trim().is_empty()
                || name.chars().count() > MAX_ID_LEN
                || name.chars().any(char::is_control);
            let duplicate = documents
                .iter()
                .any(|d: &DocumentIn| d.id.as_deref() == Some(name.as_str()));
            match result {
                _ if bad_name => slots.push(Err(IngestedDocument::refused(
                    name,
                    "the file name must be 1..=256 characters without control characters",
                ))),
                _ if duplicate => slots.push(Err(IngestedDocument::refused(
                    name,
                    "the same file name appears twice in this request",
                ))),
                Err(why) => slots.push(Err(IngestedDocument::refused(name, &why.to_string()))),
                Ok(e) => {
                    let mut metadata = Map::new();
                    metadata.insert("file_name".into(), Value::String(name.clone()));
                    metadata.insert("format".into(), Value::String(e.kind.into()));
                    let title = file_title(e.title, &name);
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
            self.ingest_into(collection, IngestRequest { documents })
                .await?
                .documents
        }
        .into_iter()
        .map(Some)
        .collect::<Vec<_>>();
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            out.push(match slot {
                Ok(i) => stored
                    .get_mut(i)
                    .and_then(Option::take)
                    .ok_or_else(|| Error::internal("an ingested file has no outcome"))?,
                Err(refused) => refused,
            });
        }
        Ok(IngestResponse { documents: out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_hash_separates_fields() {
        assert_ne!(sha256_hex(&[b"ab", b"c"]), sha256_hex(&[b"a", b"bc"]));
    }
}
