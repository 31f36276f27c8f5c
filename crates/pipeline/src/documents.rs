//! Listing, reading and deleting stored documents.

use ragd_core::{DocumentInfo, DEFAULT_COLLECTION};
use serde::Serialize;

use crate::error::Error;
use crate::Pipeline;

/// One page of `GET /documents`.
#[derive(Debug, Serialize)]
pub struct DocumentPage {
    /// Documents in id order.
    pub documents: Vec<DocumentInfo>,
    /// The id to pass as `after` for the next page; `None` on the last page.
    pub next: Option<String>,
}

/// The answer to `DELETE /documents/{id}`.
#[derive(Debug, Serialize)]
pub struct Deleted {
    /// Always true: a missing document is an error instead.
    pub deleted: bool,
    /// The document's id.
    pub id: String,
}

impl Pipeline {
    /// One page of documents, in id order, after `after`.
    pub async fn list_documents(
        &self,
        after: Option<String>,
        limit: Option<usize>,
    ) -> Result<DocumentPage, Error> {
        self.list_documents_in(DEFAULT_COLLECTION, after, limit)
            .await
    }

    /// [`Self::list_documents`] of `collection`.
    pub async fn list_documents_in(
        &self,
        collection: &str,
        after: Option<String>,
        limit: Option<usize>,
    ) -> Result<DocumentPage, Error> {
        self.require_collection(collection).await?;
        let limit = limit.unwrap_or(100);
        if !(1..=1000).contains(&limit) {
            return Err(Error::Invalid("limit: must be within 1..=1000".into()));
        }
        let documents = self.store.list(collection, after.as_deref(), limit).await?;
        let next = (documents.len() == limit)
            .then(|| documents.last().map(|d| d.id.clone()))
            .flatten();
        Ok(DocumentPage { documents, next })
    }

    /// Document `id`'s record.
    pub async fn get_document(&self, id: &str) -> Result<DocumentInfo, Error> {
        self.get_document_in(DEFAULT_COLLECTION, id).await
    }

    /// The record of document `id` of `collection`.
    pub async fn get_document_in(&self, collection: &str, id: &str) -> Result<DocumentInfo, Error> {
        self.require_collection(collection).await?;
        if !could_be_stored(id) {
            return Err(Error::NotFound(format!("no document with id {id:?}")));
        }
        self.store
            .document(collection, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no document with id {id:?}")))
    }

    /// Deletes document `id`; its chunks are hidden from search at once.
    pub async fn delete_document(&self, id: &str) -> Result<Deleted, Error> {
        self.delete_document_in(DEFAULT_COLLECTION, id).await
    }

    /// Deletes document `id` of `collection`.
    pub async fn delete_document_in(&self, collection: &str, id: &str) -> Result<Deleted, Error> {
        self.require_collection(collection).await?;
        if could_be_stored(id) && self.store.delete(collection, id).await? {
            Ok(Deleted {
                deleted: true,
                id: id.to_string(),
            })
        } else {
            Err(Error::NotFound(format!("no document with id {id:?}")))
        }
    }
}

/// Whether a document could have id `id`: ingest refuses ids with control
/// characters, so one with them names no document, and is not sent to a
/// store (PostgreSQL text cannot even hold U+0000: a 500 otherwise).
pub(crate) fn could_be_stored(id: &str) -> bool {
    !id.chars().any(char::is_control)
}

/// The registry of sources (`ragd-sources`): records kept by the store for
/// the crate that syncs them, which owns their format.
impl Pipeline {
    /// Every registered source's name and record (JSON), by name.
    pub async fn source_records(&self) -> Result<Vec<(String, String)>, Error> {
        Ok(self.store.sources().await?)
    }

    /// Registers source `name` with `record`, or replaces its record.
    pub async fn keep_source_record(&self, name: &str, record: &str) -> Result<(), Error> {
        Ok(self.store.keep_source(name, record).await?)
    }

    /// Forgets source `name`; whether it was registered.
    pub async fn forget_source_record(&self, name: &str) -> Result<bool, Error> {
        Ok(self.store.forget_source(name).await?)
    }
}
