//! API keys kept in the database: created, listed, revoked and rotated by operators
//! (`gateway keys ...`, the admin API), and read by every replica as a [`KeyDirectory`].
//!
//! Only a key's SHA-256 is stored. Every change bumps `api_key_changes.version` in the same
//! transaction, first, so its row lock orders concurrent changes; a replica that saw version
//! `v` and then read the keys can only be behind, never miss a change for good.

use super::{Dialect, StoreError, UsageStore, rfc3339, sql};
use futures_util::future::BoxFuture;
use gateway_core::{DirectoryKey, KeyDirectory, KeyDirectoryError, KeySet};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What every generated secret starts with, so a leaked one is recognisable (secret scanners,
/// log redaction) as a key of this gateway.
pub const SECRET_PREFIX: &str = "sk-gw-";

/// Random bytes in a secret: 160 bits, well past guessing.
const SECRET_BYTES: usize = 20;
const _: () = assert!(SECRET_BYTES * 8 >= 128, "secrets carry at least 128 bits");

/// Hex characters of the secret shown in lists after [`SECRET_PREFIX`].
const DISPLAY_HEX: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no database key with id `{0}`")]
    NotFound(String),
    #[error("key `{0}` is already revoked")]
    Revoked(String),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for KeyError {
    fn from(err: sqlx::Error) -> Self {
        Self::Store(StoreError::Database(err))
    }
}

/// A key to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub project: String,
    /// The project's tags (JSON object), for its `projects` row if the gateway never synced it.
    pub project_tags_json: String,
    /// A label for people (`ci-runner`, `alice laptop`).
    pub name: Option<String>,
    /// Aliases the key may use, within its project's. `None`: the project's.
    pub models: Option<Vec<String>>,
    pub expires_at: Option<OffsetDateTime>,
    /// Who made it: `cli`, `admin`.
    pub created_by: String,
}

/// A key just made: the only time its secret exists outside the caller's hands.
pub struct CreatedKey {
    pub key: StoredKey,
    pub secret: String,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// A row of `api_keys` as lists show it: never the secret nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredKey {
    pub key_id: String,
    pub project: String,
    /// `config` (from `[[projects]].api_keys`) or `database`.
    pub source: &'static str,
    pub name: Option<String>,
    /// The secret's first characters (`sk-gw-1a2b3c…`); `None` for config keys.
    pub display_prefix: Option<String>,
    pub models: Option<Vec<String>>,
    /// `active`, `expired` or `revoked`.
    pub status: &'static str,
    pub created_by: Option<String>,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// The key that replaced this one when it was rotated.
    pub rotated_to: Option<String>,
}

/// A fresh secret from the operating system's CSPRNG, and the id of the key that holds it.
fn generate() -> Result<(String, String), KeyError> {
    let mut bytes = [0u8; SECRET_BYTES + 6];
    getrandom::fill(&mut bytes).map_err(|err| KeyError::Random(err.to_string()))?;
    let secret = format!("{SECRET_PREFIX}{}", hex::encode(&bytes[..SECRET_BYTES]));
    let key_id = format!("key_{}", hex::encode(&bytes[SECRET_BYTES..]));
    Ok((secret, key_id))
}

fn display_prefix(secret: &str) -> String {
    let end = (SECRET_PREFIX.len() + DISPLAY_HEX).min(secret.len());
    format!("{}…", &secret[..end])
}

fn parse_time(text: Option<String>) -> Option<OffsetDateTime> {
    text.and_then(|text| OffsetDateTime::parse(&text, &Rfc3339).ok())
}

fn status(
    expires_at: Option<OffsetDateTime>,
    revoked_at: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> &'static str {
    if revoked_at.is_some() {
        "revoked"
    } else if expires_at.is_some_and(|at| at <= now) {
        "expired"
    } else {
        "active"
    }
}

const BUMP_VERSION: &str =
    "UPDATE api_key_changes SET version = version + 1 WHERE id = 1 RETURNING version";
const SELECT_VERSION: &str = "SELECT version FROM api_key_changes WHERE id = 1";
const ENSURE_PROJECT: &str = "INSERT INTO projects (name, tags, first_seen_at, last_seen_at) \
    VALUES ($1, $2::jsonb, $3::timestamptz, $3::timestamptz) ON CONFLICT (name) DO NOTHING";
const INSERT_KEY: &str = "INSERT INTO api_keys (project, key_id, sha256, first_seen_at, \
    last_seen_at, expires_at, created_by, name, display_prefix, models, created_at, updated_at) \
    VALUES ($1, $2, $3, $4::timestamptz, $4::timestamptz, $5::timestamptz, $6, $7, $8, \
    $9::jsonb, $4::timestamptz, $4::timestamptz)";
const REVOKE_KEY: &str = "UPDATE api_keys SET revoked_at = $1::timestamptz, \
    updated_at = $1::timestamptz WHERE key_id = $2 AND display_prefix IS NOT NULL \
    AND revoked_at IS NULL";
const END_ROTATED_KEY: &str = "UPDATE api_keys SET expires_at = $1::timestamptz, \
    rotated_to = $2, updated_at = $3::timestamptz WHERE key_id = $4 \
    AND display_prefix IS NOT NULL";

/// Columns of a listed key; Postgres formats its times as RFC 3339 in UTC, SQLite stores them so.
fn select_keys(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Postgres => {
            "SELECT key_id, project, name, display_prefix, models::text, created_by, \
            to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
            to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
            to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
            to_char(revoked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
            rotated_to, sha256 FROM api_keys"
        }
        Dialect::Sqlite => {
            "SELECT key_id, project, name, display_prefix, models, created_by, created_at, \
            updated_at, expires_at, revoked_at, rotated_to, sha256 FROM api_keys"
        }
    }
}

/// A listed row with what the directory also needs.
struct KeyRow {
    key: StoredKey,
    sha256: String,
    expires_at: Option<OffsetDateTime>,
}

fn key_row(row: &impl KeyRowAccess, now: OffsetDateTime) -> Result<KeyRow, sqlx::Error> {
    let display_prefix: Option<String> = row.text(3)?;
    let models: Option<String> = row.text(4)?;
    let [created_at, updated_at, expires_at, revoked_at] =
        [6, 7, 8, 9].map(|index| row.text(index).map(parse_time));
    let (expires_at, revoked_at) = (expires_at?, revoked_at?);
    let iso = |at: Option<OffsetDateTime>| at.map(rfc3339);
    Ok(KeyRow {
        key: StoredKey {
            key_id: row.text(0)?.unwrap_or_default(),
            project: row.text(1)?.unwrap_or_default(),
            source: if display_prefix.is_some() {
                "database"
            } else {
                "config"
            },
            name: row.text(2)?,
            display_prefix,
            models: models.and_then(|text| serde_json::from_str(&text).ok()),
            status: status(expires_at, revoked_at, now),
            created_by: row.text(5)?,
            created_at: iso(created_at?),
            updated_at: iso(updated_at?),
            expires_at: iso(expires_at),
            revoked_at: iso(revoked_at),
            rotated_to: row.text(10)?,
        },
        sha256: row.text(11)?.unwrap_or_default(),
        expires_at,
    })
}

/// Reads a nullable text column of either store's rows.
trait KeyRowAccess {
    fn text(&self, index: usize) -> Result<Option<String>, sqlx::Error>;
}

impl KeyRowAccess for sqlx::postgres::PgRow {
    fn text(&self, index: usize) -> Result<Option<String>, sqlx::Error> {
        self.try_get(index)
    }
}

impl KeyRowAccess for sqlx::sqlite::SqliteRow {
    fn text(&self, index: usize) -> Result<Option<String>, sqlx::Error> {
        self.try_get(index)
    }
}

impl UsageStore {
    /// Makes a key with a fresh secret. The project's row is added if the gateway never synced
    /// it (a key made before the first start).
    pub async fn create_key(&self, new: &NewKey) -> Result<CreatedKey, KeyError> {
        self.create_key_at(new, OffsetDateTime::now_utc()).await
    }

    async fn create_key_at(
        &self,
        new: &NewKey,
        now: OffsetDateTime,
    ) -> Result<CreatedKey, KeyError> {
        let (secret, key_id) = generate()?;
        let prefix = display_prefix(&secret);
        let digest = hex::encode(Sha256::digest(secret.as_bytes()));
        let models = match &new.models {
            Some(models) => Some(serde_json::to_string(models).map_err(|err| {
                KeyError::Store(StoreError::Database(sqlx::Error::Encode(Box::new(err))))
            })?),
            None => None,
        };
        let stamp = rfc3339(now);
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin().await?;
            sqlx::query(BUMP_VERSION).execute(&mut *tx).await?;
            sqlx::query(&sql(dialect, ENSURE_PROJECT))
                .bind(&new.project)
                .bind(&new.project_tags_json)
                .bind(&stamp)
                .execute(&mut *tx)
                .await?;
            sqlx::query(&sql(dialect, INSERT_KEY))
                .bind(&new.project)
                .bind(&key_id)
                .bind(&digest)
                .bind(&stamp)
                .bind(new.expires_at.map(rfc3339))
                .bind(&new.created_by)
                .bind(&new.name)
                .bind(&prefix)
                .bind(&models)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        let expires_at = new.expires_at.map(rfc3339);
        Ok(CreatedKey {
            key: StoredKey {
                key_id,
                project: new.project.clone(),
                source: "database",
                name: new.name.clone(),
                display_prefix: Some(prefix),
                models: new.models.clone(),
                status: status(new.expires_at, None, now),
                created_by: Some(new.created_by.clone()),
                created_at: Some(stamp.clone()),
                updated_at: Some(stamp),
                expires_at,
                revoked_at: None,
                rotated_to: None,
            },
            secret,
        })
    }

    /// Every key of the project (or of all), config keys included, by project then creation.
    pub async fn list_keys(&self, project: Option<&str>) -> Result<Vec<StoredKey>, KeyError> {
        Ok(self
            .key_rows(project, OffsetDateTime::now_utc())
            .await?
            .into_iter()
            .map(|row| row.key)
            .collect())
    }

    async fn key_rows(
        &self,
        project: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Vec<KeyRow>, KeyError> {
        on_pool!(self, |pool, dialect| {
            let mut query = sqlx::QueryBuilder::new(select_keys(dialect));
            if let Some(project) = project {
                query.push(" WHERE project = ").push_bind(project);
            }
            query.push(" ORDER BY project, created_at, key_id");
            let rows = query.build().fetch_all(pool).await?;
            Ok(rows
                .iter()
                .map(|row| key_row(row, now))
                .collect::<Result<_, _>>()?)
        })
    }

    /// One database key by id.
    pub async fn get_key(&self, key_id: &str) -> Result<StoredKey, KeyError> {
        self.key_rows(None, OffsetDateTime::now_utc())
            .await?
            .into_iter()
            .map(|row| row.key)
            .find(|key| key.key_id == key_id && key.source == "database")
            .ok_or_else(|| KeyError::NotFound(key_id.to_owned()))
    }

    /// Revokes a database key at once: every replica refuses it at its next poll. Config keys
    /// are revoked by removing them from the config.
    pub async fn revoke_key(&self, key_id: &str) -> Result<StoredKey, KeyError> {
        let stamp = rfc3339(OffsetDateTime::now_utc());
        let changed = on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin().await?;
            sqlx::query(BUMP_VERSION).execute(&mut *tx).await?;
            let changed = sqlx::query(&sql(dialect, REVOKE_KEY))
                .bind(&stamp)
                .bind(key_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            changed
        });
        let key = self.get_key(key_id).await?;
        if changed == 0 && key.status == "revoked" {
            return Err(KeyError::Revoked(key_id.to_owned()));
        }
        Ok(key)
    }

    /// Replaces a key by a new one of the same project, name, models and expiry; the old one
    /// keeps working until now + `grace` (or its own expiry, if sooner), then is refused.
    pub async fn rotate_key(&self, key_id: &str, grace: Duration) -> Result<CreatedKey, KeyError> {
        self.rotate_key_at(key_id, grace, OffsetDateTime::now_utc())
            .await
    }

    async fn rotate_key_at(
        &self,
        key_id: &str,
        grace: Duration,
        now: OffsetDateTime,
    ) -> Result<CreatedKey, KeyError> {
        let rows = self.key_rows(None, now).await?;
        let old = rows
            .into_iter()
            .find(|row| row.key.key_id == key_id && row.key.source == "database")
            .ok_or_else(|| KeyError::NotFound(key_id.to_owned()))?;
        if old.key.status == "revoked" {
            return Err(KeyError::Revoked(key_id.to_owned()));
        }
        let created = self
            .create_key_at(
                &NewKey {
                    project: old.key.project.clone(),
                    project_tags_json: "{}".into(),
                    name: old.key.name.clone(),
                    models: old.key.models.clone(),
                    expires_at: old.expires_at,
                    created_by: old.key.created_by.clone().unwrap_or_else(|| "cli".into()),
                },
                now,
            )
            .await?;
        let grace_end = now + grace;
        let old_end = old.expires_at.map_or(grace_end, |at| at.min(grace_end));
        let stamp = rfc3339(now);
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin().await?;
            sqlx::query(BUMP_VERSION).execute(&mut *tx).await?;
            sqlx::query(&sql(dialect, END_ROTATED_KEY))
                .bind(rfc3339(old_end))
                .bind(&created.key.key_id)
                .bind(&stamp)
                .bind(key_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(created)
    }

    /// The change version of the database keys (bumped by every create, revoke, rotate).
    pub async fn key_version(&self) -> Result<i64, StoreError> {
        on_pool!(self, |pool, _dialect| {
            Ok(sqlx::query(SELECT_VERSION)
                .fetch_one(pool)
                .await?
                .try_get(0)?)
        })
    }

    /// The database keys that can still authenticate: not revoked, not yet expired.
    pub async fn active_keys(&self) -> Result<Vec<DirectoryKey>, KeyError> {
        let now = OffsetDateTime::now_utc();
        let rows = self.key_rows(None, now).await?;
        Ok(rows
            .into_iter()
            .filter(|row| row.key.source == "database" && row.key.status == "active")
            .filter_map(|row| {
                let mut sha256 = [0u8; 32];
                hex::decode_to_slice(row.sha256.trim(), &mut sha256).ok()?;
                Some(DirectoryKey {
                    project: row.key.project,
                    key_id: row.key.key_id,
                    sha256,
                    models: row.key.models,
                    expires_at: row.expires_at.map(SystemTime::from),
                })
            })
            .collect())
    }
}

impl KeyDirectory for UsageStore {
    fn changed_since(
        &self,
        known: Option<i64>,
    ) -> BoxFuture<'_, Result<Option<KeySet>, KeyDirectoryError>> {
        Box::pin(async move {
            let fail = |err: &dyn std::fmt::Display| KeyDirectoryError(err.to_string());
            // The version first: keys read after it are at least that new, so a change that
            // lands in between is seen again at the next poll rather than lost.
            let version = self.key_version().await.map_err(|err| fail(&err))?;
            if known == Some(version) {
                return Ok(None);
            }
            let keys = self.active_keys().await.map_err(|err| fail(&err))?;
            Ok(Some(KeySet { version, keys }))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;
    use crate::DatabaseConfig;

    async fn store() -> (UsageStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = DatabaseConfig {
            url: format!("sqlite://{}", dir.path().join("keys.db").display()),
            ..DatabaseConfig::default()
        };
        let store = UsageStore::connect(&config).await.unwrap();
        store.migrate().await.unwrap();
        (store, dir)
    }

    fn new_key(project: &str) -> NewKey {
        NewKey {
            project: project.into(),
            project_tags_json: "{}".into(),
            name: Some("ci".into()),
            models: Some(vec!["chat".into()]),
            expires_at: None,
            created_by: "cli".into(),
        }
    }

    #[test]
    fn secrets_are_long_random_and_recognisable() {
        let (a, id_a) = generate().unwrap();
        let (b, id_b) = generate().unwrap();
        assert_ne!(a, b);
        assert_ne!(id_a, id_b);
        assert!(a.starts_with(SECRET_PREFIX));
        assert_eq!(a.len() - SECRET_PREFIX.len(), SECRET_BYTES * 2);
        let shown = display_prefix(&a);
        assert!(a.starts_with(shown.trim_end_matches('…')));
        assert_eq!(shown.chars().count(), SECRET_PREFIX.len() + DISPLAY_HEX + 1);
    }

    #[tokio::test]
    async fn create_revoke_and_rotate_move_the_version_and_the_active_set() {
        let (store, _dir) = store().await;
        let v0 = store.key_version().await.unwrap();
        assert!(store.changed_since(Some(v0)).await.unwrap().is_none());

        let created = store.create_key(&new_key("p")).await.unwrap();
        let hash: [u8; 32] = Sha256::digest(created.secret.as_bytes()).into();
        let set = store.changed_since(Some(v0)).await.unwrap().unwrap();
        assert!(set.version > v0);
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].sha256, hash);
        assert_eq!(set.keys[0].models, Some(vec!["chat".to_string()]));
        let listed = store.list_keys(Some("p")).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].status, "active");
        assert!(
            !serde_json::to_string(&listed)
                .unwrap()
                .contains(&created.secret[6..])
        );

        let rotated = store
            .rotate_key(&created.key.key_id, Duration::from_secs(3600))
            .await
            .unwrap();
        let keys = store.active_keys().await.unwrap();
        assert_eq!(keys.len(), 2, "the old key stays during the grace");
        let old = keys
            .iter()
            .find(|k| k.key_id == created.key.key_id)
            .unwrap();
        let grace_left = old
            .expires_at
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(grace_left > Duration::from_secs(3500), "{grace_left:?}");
        let old_row = store.get_key(&created.key.key_id).await.unwrap();
        assert_eq!(old_row.rotated_to.as_deref(), Some(&*rotated.key.key_id));

        store.revoke_key(&created.key.key_id).await.unwrap();
        assert!(matches!(
            store.revoke_key(&created.key.key_id).await,
            Err(KeyError::Revoked(_))
        ));
        assert!(matches!(
            store.revoke_key("key_nope").await,
            Err(KeyError::NotFound(_))
        ));
        let keys = store.active_keys().await.unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key_id, rotated.key.key_id);
    }

    #[tokio::test]
    async fn expired_keys_are_listed_as_expired_and_not_served() {
        let (store, _dir) = store().await;
        let mut key = new_key("p");
        key.expires_at = Some(OffsetDateTime::now_utc() - time::Duration::seconds(1));
        let created = store.create_key(&key).await.unwrap();
        assert!(store.active_keys().await.unwrap().is_empty());
        assert_eq!(
            store.get_key(&created.key.key_id).await.unwrap().status,
            "expired"
        );
    }
}
