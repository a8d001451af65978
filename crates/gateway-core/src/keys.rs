//! The contract between the access layer, which authenticates with keys kept in the database,
//! and the business layer, which owns that database.
//!
//! Access holds the whole set of active database keys in memory and asks a [`KeyDirectory`]
//! for a fresh copy only when the directory's change version moved; the request path never
//! waits for the database.

use futures_util::future::BoxFuture;
use std::time::SystemTime;

/// One active key of the directory: never the secret, only its digest.
#[derive(Clone, PartialEq, Eq)]
pub struct DirectoryKey {
    pub project: String,
    pub key_id: String,
    /// SHA-256 of the secret.
    pub sha256: [u8; 32],
    /// Aliases the key may use, within its project's. `None`: the project's.
    pub models: Option<Vec<String>>,
    /// After this instant the key is refused (expiry, or the end of a rotation's grace).
    pub expires_at: Option<SystemTime>,
}

impl std::fmt::Debug for DirectoryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectoryKey")
            .field("project", &self.project)
            .field("key_id", &self.key_id)
            .field("models", &self.models)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The active keys as of one change version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    /// The directory's change version these keys reflect.
    pub version: i64,
    pub keys: Vec<DirectoryKey>,
}

/// Why the directory could not answer.
#[derive(Debug, thiserror::Error)]
#[error("key directory unavailable: {0}")]
pub struct KeyDirectoryError(pub String);

/// Where the keys created at run time live (the database).
pub trait KeyDirectory: Send + Sync + 'static {
    /// The active keys (neither revoked nor already expired), or `None` when the change
    /// version is still `known`: the cheap answer a poll gets almost every time.
    fn changed_since(
        &self,
        known: Option<i64>,
    ) -> BoxFuture<'_, Result<Option<KeySet>, KeyDirectoryError>>;
}
