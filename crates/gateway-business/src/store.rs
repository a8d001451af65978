//! The usage store: SQLite or Postgres, its embedded migrations, and batched idempotent inserts.

use crate::config::DatabaseConfig;
use crate::record::UsageRecord;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::query_builder::Separated;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Encode, Postgres, QueryBuilder, Sqlite, Type};
use std::str::FromStr;
use std::time::Duration;

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database url (expected sqlite://PATH or postgres://...)")]
    UnsupportedUrl,
    #[error("creating the database directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The database usage records are written to.
#[derive(Debug, Clone)]
pub enum UsageStore {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl UsageStore {
    pub async fn connect(config: &DatabaseConfig) -> Result<Self, StoreError> {
        let url = config.url.as_str();
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                // WAL lets finance read while the gateway writes; NORMAL sync is durable across
                // a process crash, which is what the write path needs.
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5));
            if let Some(parent) = options.get_filename().parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
                    path: parent.display().to_string(),
                    source,
                })?;
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(config.max_connections.max(1))
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await?;
            Ok(Self::Sqlite(pool))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let pool = PgPoolOptions::new()
                .max_connections(config.max_connections.max(1))
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await?;
            Ok(Self::Postgres(pool))
        } else {
            Err(StoreError::UnsupportedUrl)
        }
    }

    /// Applies the embedded migrations of this store's kind.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await?,
            Self::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    /// Writes a batch in one statement. A record already present (same request id) is skipped,
    /// so retrying a batch after an unclear failure never bills twice.
    pub async fn insert(&self, records: &[UsageRecord]) -> Result<u64, StoreError> {
        if records.is_empty() {
            return Ok(0);
        }
        let affected = match self {
            Self::Sqlite(pool) => {
                let mut query = QueryBuilder::<Sqlite>::new(INSERT_PREFIX);
                query.push_values(records, |row, record| {
                    push_record(row, record, Dialect::Sqlite)
                });
                query.push(INSERT_SUFFIX);
                query.build().execute(pool).await?.rows_affected()
            }
            Self::Postgres(pool) => {
                let mut query = QueryBuilder::<Postgres>::new(INSERT_PREFIX);
                query.push_values(records, |row, record| {
                    push_record(row, record, Dialect::Postgres)
                });
                query.push(INSERT_SUFFIX);
                query.build().execute(pool).await?.rows_affected()
            }
        };
        Ok(affected)
    }

    pub async fn close(&self) {
        match self {
            Self::Sqlite(pool) => pool.close().await,
            Self::Postgres(pool) => pool.close().await,
        }
    }
}

const INSERT_PREFIX: &str = "INSERT INTO usage_events (request_id, created_at, project, key_id, \
    tags, alias, provider, upstream_model, attempts, status, error_type, input_tokens, \
    output_tokens, cached_tokens, reasoning_tokens, usage_source, elapsed_ms, ttft_ms, streamed, \
    client_aborted, vendor_response_id, vendor_request_id) ";
const INSERT_SUFFIX: &str = " ON CONFLICT (request_id) DO NOTHING";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// Binds one record's values. Both stores get the same Rust types; Postgres casts the id,
/// time and tags to its own types in SQL, so a single function serves both.
fn push_record<'args, DB>(
    mut row: Separated<'_, 'args, DB, &'static str>,
    record: &'args UsageRecord,
    dialect: Dialect,
) where
    DB: sqlx::Database,
    String: Encode<'args, DB> + Type<DB>,
    &'args str: Encode<'args, DB> + Type<DB>,
    Option<&'args str>: Encode<'args, DB> + Type<DB>,
    i32: Encode<'args, DB> + Type<DB>,
    Option<i64>: Encode<'args, DB> + Type<DB>,
    f64: Encode<'args, DB> + Type<DB>,
    Option<f64>: Encode<'args, DB> + Type<DB>,
    bool: Encode<'args, DB> + Type<DB>,
{
    let cast = |sql_type: &'static str| match dialect {
        Dialect::Sqlite => "",
        Dialect::Postgres => sql_type,
    };
    row.push_bind(record.request_id.hyphenated().to_string())
        .push_unseparated(cast("::uuid"))
        .push_bind(rfc3339(record.created_at))
        .push_unseparated(cast("::timestamptz"))
        .push_bind(record.project.as_deref())
        .push_bind(record.key_id.as_deref())
        .push_bind(&*record.tags)
        .push_unseparated(cast("::jsonb"))
        .push_bind(record.alias.as_deref())
        .push_bind(record.provider.as_deref())
        .push_bind(record.upstream_model.as_deref())
        .push_bind(record.attempts)
        .push_bind(record.status)
        .push_bind(record.error_type.as_deref())
        .push_bind(record.input_tokens)
        .push_bind(record.output_tokens)
        .push_bind(record.cached_tokens)
        .push_bind(record.reasoning_tokens)
        .push_bind(record.usage_source.as_deref())
        .push_bind(record.elapsed_ms)
        .push_bind(record.ttft_ms)
        .push_bind(record.streamed)
        .push_bind(record.client_aborted)
        .push_bind(record.vendor_response_id.as_deref())
        .push_bind(record.vendor_request_id.as_deref());
}

/// RFC 3339 in UTC: sorts and compares as text in SQLite, casts to `timestamptz` in Postgres.
fn rfc3339(at: time::OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
