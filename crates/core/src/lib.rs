//! The words ragd's crates share, and the traits at the pipeline's seams.
//!
//! ragd answers from documents in two flows (see `ARCHITECTURE.md`): ingest
//! (extract → chunk → embed → store) and ask (retrieve → select → rerank →
//! prompt → generate → check). The pipeline crate runs those stages; the work
//! that needs a model or a database is behind the four traits here, so the
//! pipeline knows no model or storage engine and the engines know no pipeline:
//!
//! * [`Embed`] — text to vectors (a local BERT model, or a remote server);
//! * [`Generate`] — a prompt to a streamed answer (local GGUF slots, or an
//!   OpenAI-compatible server);
//! * [`Rerank`] — orders retrieved passages for a question ([`NoRerank`] keeps
//!   retrieval's order);
//! * [`DocumentStore`] — documents, chunks and their vectors: upsert, delete,
//!   list, dense and lexical search under a [`Filter`], fetch chunks.
//!
//! The plain types the model crates produce and consume ([`Message`],
//! [`GenerateParams`], [`Generation`], [`TextKind`], the document records) live
//! here too, so that the pipeline can speak of them without depending on a
//! model framework. Nothing here depends on candle, axum or a database.

#![deny(missing_docs)]

pub mod chat;
pub mod documents;
pub mod embed;
pub mod error;
pub mod filter;
pub mod generate;
pub mod prompt;
pub mod rerank;
pub mod text;

pub use async_trait::async_trait;
pub use chat::Message;
pub use documents::{
    invalid_collection_name, CollectionInfo, DocumentInfo, DocumentStore, Embedded, Hit, NewChunk,
    NewDocument, StoreStats, StoredChunk, UpsertFailure, UpsertStatus, DEFAULT_COLLECTION,
};
pub use embed::{Embed, EmbedderInfo, TextKind};
pub use error::{BackendError, Fault};
pub use filter::{Filter, InvalidFilter};
pub use generate::{
    FinishReason, GenEvent, GenJob, Generate, GenerateParams, Generation, GeneratorInfo,
    InvalidParams, QueueFull, SlotLoad, Steer,
};
pub use prompt::{Fitted, Prompt, PromptPassage};
pub use rerank::{NoRerank, Rerank};
pub use text::{is_cjk, lexical_body, lexical_text, query_words, STOP_WORDS};
