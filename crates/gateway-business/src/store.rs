//! The usage store: SQLite or Postgres, its embedded migrations, batched idempotent inserts,
//! and the catalog (prices, projects, keys) synced from the config.
//!
//! Most statements are written once, in Postgres's dialect with `$n` parameters and `::type`
//! casts, and bound with text and integers only: SQLite reads `$n` as numbered parameters, and
//! [`sql`] drops the casts for it (its columns are text anyway). So the two stores cannot drift
//! apart statement by statement.

use crate::config::DatabaseConfig;
use crate::cost::Cost;
use crate::prices::PriceConfig;
use crate::record::UsageRecord;
use rust_decimal::Decimal;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::query::Query;
use sqlx::query_builder::Separated;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Encode, Postgres, QueryBuilder, Row, Sqlite, Type};
use std::borrow::Cow;
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;
use time::macros::format_description;
use time::{Date, OffsetDateTime, UtcOffset};

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
    #[error("no row of prices matches a price of {provider}/{model}, and none can be added")]
    PriceNotFound { provider: String, model: String },
    #[error("the prices table holds an unreadable {column}: {value:?}")]
    BadPriceRow { column: &'static str, value: String },
}

/// A `[[projects]]` entry as the database keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectEntry {
    pub name: String,
    /// The project's tags as a JSON object (`{}` when there are none).
    pub tags_json: String,
    pub keys: Vec<KeyEntry>,
}

/// One of a project's keys: its id and the hex SHA-256 of the secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub key_id: String,
    pub sha256: String,
}

/// What a price sync changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PriceSync {
    /// Price rows inserted: new prices, or changed ones.
    pub added: u64,
    /// Rows whose `effective_to` was set or moved.
    pub updated: u64,
}

/// One row of `prices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPrice {
    pub id: i64,
    pub price: PriceConfig,
    /// The first UTC day the row is no longer in force; `None`: open.
    pub effective_to: Option<Date>,
}

/// Runs `$body` with `$pool` bound to the store's pool and `$dialect` to its [`Dialect`]: the
/// body is written once and compiled for each database.
macro_rules! on_pool {
    ($store:expr, |$pool:ident, $dialect:ident| $body:expr) => {
        match $store {
            UsageStore::Sqlite($pool) => {
                let $dialect = Dialect::Sqlite;
                $body
            }
            UsageStore::Postgres($pool) => {
                let $dialect = Dialect::Postgres;
                $body
            }
        }
    };
}

mod keys;
pub use keys::{CreatedKey, KeyError, NewKey, SECRET_PREFIX, StoredKey};

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

    /// A store whose connections are opened on first use, so a gateway starts (and serves its
    /// config keys) while the database is away. `max_connections` is the pool's size.
    pub fn connect_lazy(config: &DatabaseConfig, max_connections: u32) -> Result<Self, StoreError> {
        let url = config.url.as_str();
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
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
            Ok(Self::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(max_connections.max(1))
                    .acquire_timeout(Duration::from_secs(2))
                    .connect_lazy_with(options),
            ))
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Self::Postgres(
                PgPoolOptions::new()
                    .max_connections(max_connections.max(1))
                    .acquire_timeout(Duration::from_secs(2))
                    .connect_lazy(url)?,
            ))
        } else {
            Err(StoreError::UnsupportedUrl)
        }
    }

    /// Applies the embedded migrations of this store's kind.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(pool) => {
                // SQLite has no migration lock (Postgres takes an advisory one): when the
                // budgets and the usage writer of one gateway, or two gateways, migrate one
                // file at once, the loser fails on a migration the other has just applied. A
                // moment later it finds it done; failing here would send the usage writer
                // into its reconnect back-off and leave records in the spool for seconds.
                let mut attempt = 0;
                loop {
                    match SQLITE_MIGRATIONS.run(pool).await {
                        Ok(()) => break,
                        Err(err) if attempt >= 4 => return Err(err.into()),
                        Err(_) => {
                            attempt += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(20 * attempt))
                                .await;
                        }
                    }
                }
            }
            Self::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    /// Writes a batch in one statement. A record already present (same request id) is skipped,
    /// so retrying a batch after an unclear failure never bills twice. The price row of each
    /// priced record is looked up in `prices` (and added if a sync never brought it, as for
    /// records spooled under an older config), so `price_id` is set whenever `cost` is.
    pub async fn insert(&self, records: &[UsageRecord]) -> Result<u64, StoreError> {
        Ok(self.insert_batch(records).await?.0)
    }

    /// [`UsageStore::insert`], also saying how many price rows it had to add.
    pub(crate) async fn insert_batch(
        &self,
        records: &[UsageRecord],
    ) -> Result<(u64, u64), StoreError> {
        if records.is_empty() {
            return Ok((0, 0));
        }
        let (price_ids, added) = self.price_ids(records).await?;
        let rows: Vec<(&UsageRecord, Option<i64>)> =
            records.iter().zip(price_ids.iter().copied()).collect();
        let affected = match self {
            Self::Sqlite(pool) => {
                let mut query = QueryBuilder::<Sqlite>::new(INSERT_PREFIX);
                query.push_values(&rows, |row, (record, price_id)| {
                    push_record(row, record, *price_id, Dialect::Sqlite)
                });
                query.push(INSERT_SUFFIX);
                query.build().execute(pool).await?.rows_affected()
            }
            Self::Postgres(pool) => {
                let mut query = QueryBuilder::<Postgres>::new(INSERT_PREFIX);
                query.push_values(&rows, |row, (record, price_id)| {
                    push_record(row, record, *price_id, Dialect::Postgres)
                });
                query.push(INSERT_SUFFIX);
                query.build().execute(pool).await?.rows_affected()
            }
        };
        Ok((affected, added))
    }

    /// The `prices.id` of each record's price row (`None` when unpriced), and how many rows
    /// had to be added. A batch holds a handful of distinct prices, so a linear search is the
    /// cheapest map.
    async fn price_ids(
        &self,
        records: &[UsageRecord],
    ) -> Result<(Vec<Option<i64>>, u64), StoreError> {
        let mut known: Vec<(&PriceConfig, i64)> = Vec::new();
        let mut ids = Vec::with_capacity(records.len());
        let mut added = 0;
        let now = rfc3339(OffsetDateTime::now_utc());
        for record in records {
            let Some(price) = record.cost.as_ref().map(|cost| &**cost.price()) else {
                ids.push(None);
                continue;
            };
            if let Some(&(_, id)) = known.iter().find(|(row, _)| *row == price) {
                ids.push(Some(id));
                continue;
            }
            let (id, inserted) = self.price_id(price, &now).await?;
            added += u64::from(inserted);
            known.push((price, id));
            ids.push(Some(id));
        }
        Ok((ids, added))
    }

    /// The id of `price`'s row, adding the row if it is missing.
    async fn price_id(&self, price: &PriceConfig, now: &str) -> Result<(i64, bool), StoreError> {
        let text = PriceText::of(price);
        on_pool!(self, |pool, dialect| {
            let mut inserted = false;
            for attempt in 0..2 {
                let found = text
                    .bind(sqlx::query(&sql(dialect, SELECT_PRICE_ID)))
                    .fetch_optional(pool)
                    .await?;
                if let Some(row) = found {
                    return Ok((row.try_get(0)?, inserted));
                }
                if attempt == 0 {
                    // A row added by another gateway between the two statements is a
                    // conflict, skipped: the second look finds it.
                    let result = text
                        .bind(sqlx::query(&sql(dialect, INSERT_PRICE)))
                        .bind(now)
                        .execute(pool)
                        .await?;
                    inserted = result.rows_affected() > 0;
                }
            }
            // Only a row written by hand that the unique index sees as this price and the
            // lookup does not (a negative amount where NULL is meant) gets here.
            Err(StoreError::PriceNotFound {
                provider: price.provider.clone(),
                model: price.model.clone(),
            })
        })
    }

    /// Brings `prices` in line with the config's `[[prices]]`: each row not yet stored is added
    /// (the same config twice adds nothing; a changed amount is a new row, the old one kept),
    /// then `effective_to` is set so the rows of the config follow each other, and a row that
    /// left the config is closed on today's UTC date. Nothing else of a stored row changes.
    pub async fn sync_prices(&self, prices: &[PriceConfig]) -> Result<PriceSync, StoreError> {
        self.sync_prices_at(prices, OffsetDateTime::now_utc()).await
    }

    pub(crate) async fn sync_prices_at(
        &self,
        prices: &[PriceConfig],
        now: OffsetDateTime,
    ) -> Result<PriceSync, StoreError> {
        let today = now.to_offset(UtcOffset::UTC).date();
        let now = rfc3339(now);
        let mut sync = PriceSync::default();
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin().await?;
            if dialect == Dialect::Postgres {
                // Two gateways syncing different configs at once would each close the other's
                // rows half-way; one at a time, the last one wins whole.
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PRICE_SYNC_LOCK)
                    .execute(&mut *tx)
                    .await?;
            }
            for price in prices {
                let result = PriceText::of(price)
                    .bind(sqlx::query(&sql(dialect, INSERT_PRICE)))
                    .bind(&now)
                    .execute(&mut *tx)
                    .await?;
                sync.added += result.rows_affected();
            }
            let rows = sqlx::query(select_prices(dialect))
                .fetch_all(&mut *tx)
                .await?;
            let stored = rows
                .iter()
                .map(|row| {
                    stored_price(
                        row.try_get(0)?,
                        [
                            row.try_get(1)?,
                            row.try_get(2)?,
                            row.try_get(3)?,
                            row.try_get(4)?,
                            row.try_get(8)?,
                        ],
                        [row.try_get(5)?, row.try_get(6)?, row.try_get(7)?],
                        [row.try_get(9)?, row.try_get(10)?],
                    )
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            for (id, effective_to) in plan_effective_to(&stored, prices, today) {
                sqlx::query(&sql(dialect, UPDATE_EFFECTIVE_TO))
                    .bind(effective_to.map(date_text))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sync.updated += 1;
            }
            tx.commit().await?;
        });
        Ok(sync)
    }

    /// Every row of `prices`, oldest first.
    pub async fn stored_prices(&self) -> Result<Vec<StoredPrice>, StoreError> {
        on_pool!(self, |pool, dialect| {
            let rows = sqlx::query(select_prices(dialect)).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    stored_price(
                        row.try_get(0)?,
                        [
                            row.try_get(1)?,
                            row.try_get(2)?,
                            row.try_get(3)?,
                            row.try_get(4)?,
                            row.try_get(8)?,
                        ],
                        [row.try_get(5)?, row.try_get(6)?, row.try_get(7)?],
                        [row.try_get(9)?, row.try_get(10)?],
                    )
                })
                .collect()
        })
    }

    /// Adds or refreshes the config's projects and their keys: tags and key hashes as the
    /// config says now, `last_seen_at` now. Rows absent from the config are kept (old usage
    /// rows name them), and the columns the config does not own (`expires_at`, `revoked_at`,
    /// `created_by`) are left as they are.
    pub async fn sync_projects(&self, projects: &[ProjectEntry]) -> Result<(), StoreError> {
        let now = rfc3339(OffsetDateTime::now_utc());
        on_pool!(self, |pool, dialect| {
            let mut tx = pool.begin().await?;
            for project in projects {
                sqlx::query(&sql(dialect, UPSERT_PROJECT))
                    .bind(&project.name)
                    .bind(&project.tags_json)
                    .bind(&now)
                    .execute(&mut *tx)
                    .await?;
                for key in &project.keys {
                    sqlx::query(&sql(dialect, UPSERT_KEY))
                        .bind(&project.name)
                        .bind(&key.key_id)
                        .bind(key.sha256.trim().to_ascii_lowercase())
                        .bind(&now)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// [`UsageStore::sync_prices`] and [`UsageStore::sync_projects`].
    pub async fn sync_catalog(
        &self,
        prices: &[PriceConfig],
        projects: &[ProjectEntry],
    ) -> Result<PriceSync, StoreError> {
        let sync = self.sync_prices(prices).await?;
        self.sync_projects(projects).await?;
        Ok(sync)
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
    client_aborted, vendor_response_id, vendor_request_id, cache_write_tokens, cost, cost_nanos, \
    currency, price_id) ";
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
    price_id: Option<i64>,
    dialect: Dialect,
) where
    DB: sqlx::Database,
    String: Encode<'args, DB> + Type<DB>,
    Option<String>: Encode<'args, DB> + Type<DB>,
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
        .push_bind(record.vendor_request_id.as_deref())
        .push_bind(record.cache_write_tokens)
        .push_bind(record.cost.as_ref().map(|cost| cost.amount().to_string()))
        .push_unseparated(cast("::numeric"))
        .push_bind(record.cost.as_ref().map(Cost::nanos))
        .push_bind(record.cost.as_ref().map(Cost::currency))
        .push_bind(price_id);
}

/// Key of the advisory lock that makes price syncs take turns (Postgres).
const PRICE_SYNC_LOCK: i64 = 0x6777_7072_6963_6573; // "gwprices"

/// `statement` for `dialect`: as written for Postgres, without its `::type` casts for SQLite.
fn sql(dialect: Dialect, statement: &'static str) -> Cow<'static, str> {
    match dialect {
        Dialect::Postgres => Cow::Borrowed(statement),
        Dialect::Sqlite => {
            let mut out = String::with_capacity(statement.len());
            let mut rest = statement;
            while let Some(at) = rest.find("::") {
                out.push_str(&rest[..at]);
                rest = rest[at + 2..]
                    .trim_start_matches(|c: char| c.is_ascii_alphanumeric() || c == '_');
            }
            out.push_str(rest);
            Cow::Owned(out)
        }
    }
}

/// Parameters 1-9 are a price ([`PriceText::bind`]), 10 the time it is first seen.
const INSERT_PRICE: &str = "INSERT INTO prices (provider, model, input_per_million, \
    output_per_million, cached_input_per_million, cache_write_per_million, reasoning_per_million, \
    currency, effective_from, first_seen_at) VALUES ($1, $2, $3::numeric, $4::numeric, \
    $5::numeric, $6::numeric, $7::numeric, $8, $9::date, $10::timestamptz) ON CONFLICT DO NOTHING";

/// Equality as the unique index `prices_identity` sees it: numeric in Postgres, normalised text
/// in SQLite, NULL equal to NULL.
const SELECT_PRICE_ID: &str = "SELECT id FROM prices WHERE provider = $1 AND model = $2 \
    AND input_per_million = $3::numeric AND output_per_million = $4::numeric \
    AND cached_input_per_million IS NOT DISTINCT FROM $5::numeric \
    AND cache_write_per_million IS NOT DISTINCT FROM $6::numeric \
    AND reasoning_per_million IS NOT DISTINCT FROM $7::numeric \
    AND currency = $8 AND effective_from IS NOT DISTINCT FROM $9::date";

const UPDATE_EFFECTIVE_TO: &str = "UPDATE prices SET effective_to = $1::date WHERE id = $2";

/// Every price row, amounts and dates as text (`to_char`, so no `DateStyle` can change them).
fn select_prices(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Postgres => {
            "SELECT id, provider, model, input_per_million::text, \
            output_per_million::text, cached_input_per_million::text, \
            cache_write_per_million::text, reasoning_per_million::text, currency, \
            to_char(effective_from, 'YYYY-MM-DD'), to_char(effective_to, 'YYYY-MM-DD') \
            FROM prices ORDER BY id"
        }
        Dialect::Sqlite => {
            "SELECT id, provider, model, input_per_million, output_per_million, \
            cached_input_per_million, cache_write_per_million, reasoning_per_million, currency, \
            effective_from, effective_to FROM prices ORDER BY id"
        }
    }
}

const UPSERT_PROJECT: &str = "INSERT INTO projects (name, tags, first_seen_at, last_seen_at) \
    VALUES ($1, $2::jsonb, $3::timestamptz, $3::timestamptz) \
    ON CONFLICT (name) DO UPDATE SET tags = excluded.tags, last_seen_at = excluded.last_seen_at";

const UPSERT_KEY: &str = "INSERT INTO api_keys (project, key_id, sha256, first_seen_at, \
    last_seen_at, created_by) VALUES ($1, $2, $3, $4::timestamptz, $4::timestamptz, 'config') \
    ON CONFLICT (project, key_id) DO UPDATE SET sha256 = excluded.sha256, \
    last_seen_at = excluded.last_seen_at";

/// A price as bound to statements: amounts as normalised decimal text (`0.60` is `0.6`), so
/// SQLite's text columns compare equal prices equal; Postgres casts them to `numeric`.
struct PriceText<'a> {
    provider: &'a str,
    model: &'a str,
    amounts: [String; 2],
    optional: [Option<String>; 3],
    currency: &'a str,
    effective_from: Option<String>,
}

impl<'a> PriceText<'a> {
    fn of(price: &'a PriceConfig) -> Self {
        let money = |amount: Decimal| amount.normalize().to_string();
        Self {
            provider: &price.provider,
            model: &price.model,
            amounts: [
                money(price.input_per_million),
                money(price.output_per_million),
            ],
            optional: [
                price.cached_input_per_million.map(money),
                price.cache_write_per_million.map(money),
                price.reasoning_per_million.map(money),
            ],
            currency: &price.currency,
            effective_from: price.effective_from.map(date_text),
        }
    }

    /// Binds parameters 1-9: provider, model, the five amounts as in the table, currency,
    /// effective_from.
    fn bind<'q, DB>(
        &'q self,
        query: Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    ) -> Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
    where
        DB: sqlx::Database,
        &'q str: Encode<'q, DB> + Type<DB>,
        Option<&'q str>: Encode<'q, DB> + Type<DB>,
    {
        let [input, output] = &self.amounts;
        let [cached, cache_write, reasoning] = &self.optional;
        query
            .bind(self.provider)
            .bind(self.model)
            .bind(input.as_str())
            .bind(output.as_str())
            .bind(cached.as_deref())
            .bind(cache_write.as_deref())
            .bind(reasoning.as_deref())
            .bind(self.currency)
            .bind(self.effective_from.as_deref())
    }
}

fn date_text(day: Date) -> String {
    day.format(format_description!("[year]-[month]-[day]"))
        .unwrap_or_default()
}

/// A `prices` row read back as text: `required` is provider, model, input, output, currency;
/// `optional` the cached-input, cache-write and reasoning amounts; `dates` effective from, to.
fn stored_price(
    id: i64,
    required: [String; 5],
    optional: [Option<String>; 3],
    dates: [Option<String>; 2],
) -> Result<StoredPrice, StoreError> {
    let money = |column: &'static str, text: &str| {
        Decimal::from_str(text.trim()).map_err(|_| StoreError::BadPriceRow {
            column,
            value: text.to_owned(),
        })
    };
    let day = |column: &'static str, text: Option<String>| {
        text.map(|text| {
            Date::parse(&text, format_description!("[year]-[month]-[day]")).map_err(|_| {
                StoreError::BadPriceRow {
                    column,
                    value: text.clone(),
                }
            })
        })
        .transpose()
    };
    let [provider, model, input, output, currency] = required;
    let [cached, cache_write, reasoning] = optional;
    let [from, to] = dates;
    Ok(StoredPrice {
        id,
        price: PriceConfig {
            provider,
            model,
            input_per_million: money("input_per_million", &input)?,
            output_per_million: money("output_per_million", &output)?,
            cached_input_per_million: cached
                .map(|text| money("cached_input_per_million", &text))
                .transpose()?,
            cache_write_per_million: cache_write
                .map(|text| money("cache_write_per_million", &text))
                .transpose()?,
            reasoning_per_million: reasoning
                .map(|text| money("reasoning_per_million", &text))
                .transpose()?,
            currency,
            effective_from: day("effective_from", from)?,
        },
        effective_to: day("effective_to", to)?,
    })
}

/// The `effective_to` each stored row should have, for the rows where it differs.
///
/// Rows of the config follow each other: for each provider and model, sorted by first day
/// (an undated row first), each ends where the next begins and the last stays open. A row no
/// longer in the config that is still open is closed `today`: the day it stopped pricing
/// requests. Rows already closed and out of the config are history and stay as they are.
/// Decimal equality is numeric, so `0.6` in the config matches `0.60` read back.
pub(crate) fn plan_effective_to(
    stored: &[StoredPrice],
    config: &[PriceConfig],
    today: Date,
) -> Vec<(i64, Option<Date>)> {
    let mut live: HashMap<(&str, &str), Vec<&StoredPrice>> = HashMap::new();
    let mut changes = Vec::new();
    for row in stored {
        if config.contains(&row.price) {
            live.entry((&row.price.provider, &row.price.model))
                .or_default()
                .push(row);
        } else if row.effective_to.is_none() {
            changes.push((row.id, Some(today)));
        }
    }
    for rows in live.values_mut() {
        // `None` (always) sorts before every date.
        rows.sort_by_key(|row| (row.price.effective_from, row.id));
        let starts: Vec<Option<Date>> = rows
            .iter()
            .skip(1)
            .map(|row| row.price.effective_from)
            .chain(std::iter::once(None))
            .collect();
        for (row, next_start) in rows.iter().zip(starts) {
            if row.effective_to != next_start {
                changes.push((row.id, next_start));
            }
        }
    }
    changes.sort_unstable();
    changes
}

/// RFC 3339 in UTC: sorts and compares as text in SQLite, casts to `timestamptz` in Postgres.
fn rfc3339(at: time::OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;
    use time::macros::date;

    fn price(from: Option<Date>, input: &str) -> PriceConfig {
        PriceConfig {
            provider: "p".into(),
            model: "m".into(),
            input_per_million: Decimal::from_str(input).unwrap(),
            output_per_million: Decimal::ONE,
            cached_input_per_million: None,
            cache_write_per_million: None,
            reasoning_per_million: None,
            currency: "USD".into(),
            effective_from: from,
        }
    }

    fn stored(id: i64, price: PriceConfig, effective_to: Option<Date>) -> StoredPrice {
        StoredPrice {
            id,
            price,
            effective_to,
        }
    }

    #[test]
    fn config_rows_follow_each_other_and_departed_rows_close_today() {
        let today = date!(2026 - 07 - 15);
        let june = Some(date!(2026 - 06 - 01));
        let august = Some(date!(2026 - 08 - 01));
        let config = [price(None, "1"), price(june, "2"), price(august, "3")];
        let rows = [
            stored(1, price(None, "1.0"), None),
            // Replaced by row 4 for the same day: it priced requests until today.
            stored(2, price(june, "1.5"), None),
            // Closed long ago: history, untouched.
            stored(3, price(june, "1.2"), Some(date!(2026 - 06 - 10))),
            stored(4, price(june, "2"), Some(date!(2026 - 06 - 20))),
            stored(5, price(august, "3"), None),
        ];
        assert_eq!(
            plan_effective_to(&rows, &config, today),
            [(1, june), (2, Some(today)), (4, august)]
        );
        let settled = [
            stored(1, price(None, "1"), june),
            stored(2, price(june, "1.5"), Some(today)),
            stored(3, price(june, "1.2"), Some(date!(2026 - 06 - 10))),
            stored(4, price(june, "2"), august),
            stored(5, price(august, "3"), None),
        ];
        assert!(plan_effective_to(&settled, &config, today).is_empty());
    }

    #[test]
    fn sqlite_statements_lose_only_their_casts() {
        assert_eq!(
            sql(
                Dialect::Sqlite,
                "VALUES ($1::numeric, $2, $3::timestamptz) -- a::b"
            ),
            "VALUES ($1, $2, $3) -- a"
        );
        assert_eq!(sql(Dialect::Postgres, "$1::date"), "$1::date");
    }
}
