//! Collections: named sets of documents, each searched, asked and listed
//! apart from the others. Every request names one (the routes under
//! `/collections/{name}/…`) or means `default`, which always exists; the
//! others are created and deleted here.

use ragd_core::{invalid_collection_name, CollectionInfo, DEFAULT_COLLECTION};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::Pipeline;

/// `POST /collections`.
#[derive(Debug, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateCollection {
    /// The name: 1 to 64 ASCII letters, digits, `-`, `_` and `.`, starting
    /// with a letter or digit.
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 64,
            pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
        )
    )]
    pub name: String,
}

/// The answer to `POST /collections`.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionCreated {
    /// The collection's name.
    pub name: String,
    /// `false` when it existed already (nothing changed).
    pub created: bool,
}

/// The answer to `DELETE /collections/{name}`.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionDeleted {
    /// The collection's name.
    pub name: String,
    /// Always true: a missing collection is an error instead.
    pub deleted: bool,
    /// Its documents, deleted with it.
    pub documents: usize,
}

impl Pipeline {
    /// 404 unless `collection` exists (`default` always does). The message
    /// is the same whether the name is unknown or malformed.
    pub async fn require_collection(&self, collection: &str) -> Result<(), Error> {
        if collection == DEFAULT_COLLECTION {
            return Ok(());
        }
        let known = invalid_collection_name(collection).is_none()
            && self.store.collection_exists(collection).await?;
        if known {
            Ok(())
        } else {
            Err(not_found(collection))
        }
    }

    /// Every collection, by name.
    pub async fn collections(&self) -> Result<Vec<CollectionInfo>, Error> {
        Ok(self.store.collections().await?)
    }

    /// Creates a collection (nothing changes when it exists).
    pub async fn create_collection(
        &self,
        req: CreateCollection,
    ) -> Result<CollectionCreated, Error> {
        if let Some(why) = invalid_collection_name(&req.name) {
            return Err(Error::Invalid(format!("name: {why}")));
        }
        let created = self.store.create_collection(&req.name).await?;
        if created {
            tracing::info!(collection = %req.name, "collection created");
        }
        Ok(CollectionCreated {
            name: req.name,
            created,
        })
    }

    /// Deletes a collection and its documents (not `default`).
    pub async fn delete_collection(&self, name: &str) -> Result<CollectionDeleted, Error> {
        if name == DEFAULT_COLLECTION {
            return Err(Error::Invalid(
                "the default collection cannot be deleted (delete its documents instead)".into(),
            ));
        }
        match self.store.delete_collection(name).await? {
            Some(documents) => {
                tracing::info!(collection = %name, documents, "collection deleted");
                Ok(CollectionDeleted {
                    name: name.to_string(),
                    deleted: true,
                    documents,
                })
            }
            None => Err(not_found(name)),
        }
    }
}

/// The one answer for a collection that is not there (or not the key's).
pub fn not_found(collection: &str) -> Error {
    Error::NotFound(format!(
        "no collection {collection:?} (create it with POST /collections)"
    ))
}
