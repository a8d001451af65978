//! The database budget store (`backend = "database"`): Postgres with row locks taken in a
//! fixed order, SQLite with `BEGIN IMMEDIATE`. Postgres counts exact NUMERIC USD, SQLite
//! integer nano-USD; both are converted to nano-USD here.

use super::{
    BackendError, BudgetSetupError, CLEANUP_EVERY, Line, LineKey, NANOS_PER_USD, ReserveRequest,
    SettleOutcome, SettleRequest, Verdict, fits, unix_ms,
};
use crate::store::UsageStore;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Postgres, QueryBuilder};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::{Duration, Instant};
use time::{Date, OffsetDateTime};
use tokio::sync::OnceCell;

pub(super) struct DatabaseStore {
    pool: Pool,
    migrated: OnceCell<()>,
    last_cleanup: Mutex<Option<Instant>>,
}

enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl DatabaseStore {
    /// A pool of its own on the `[database]` URL, connected lazily: budget checks must not
    /// queue behind the usage writer's batches, and must not wait longer than `timeout` for a
    /// connection.
    pub fn new(
        url: &str,
        max_connections: u32,
        timeout: Duration,
    ) -> Result<Self, BudgetSetupError> {
        let pool = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(BudgetSetupError::Database)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(timeout);
            if let Some(parent) = options.get_filename().parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|source| BudgetSetupError::CreateDir {
                    path: parent.display().to_string(),
                    source,
                })?;
            }
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(max_connections.max(1))
                    .acquire_timeout(timeout)
                    .connect_lazy_with(options),
            )
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(max_connections.max(1))
                    .acquire_timeout(timeout)
                    .connect_lazy(url)
                    .map_err(BudgetSetupError::Database)?,
            )
        } else {
            return Err(BudgetSetupError::UnsupportedDatabaseUrl);
        };
        Ok(Self {
            pool,
            migrated: OnceCell::new(),
            last_cleanup: Mutex::new(None),
        })
    }

    /// Applies the migrations once, on first use: budgets may be checked before the usage
    /// writer (which migrates in the background) got there.
    async fn ready(&self) -> Result<(), BackendError> {
        self.migrated
            .get_or_try_init(|| async {
                let store = match &self.pool {
                    Pool::Sqlite(pool) => UsageStore::Sqlite(pool.clone()),
                    Pool::Postgres(pool) => UsageStore::Postgres(pool.clone()),
                };
                // `migrate` itself retries the SQLite race with the usage writer.
                store.migrate().await
            })
            .await?;
        Ok(())
    }

    /// Whether this call should also delete expired reservations (about once a minute).
    fn cleanup_due(&self) -> bool {
        let mut last = self
            .last_cleanup
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < CLEANUP_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    pub async fn reserve(&self, request: &ReserveRequest<'_>) -> Result<Verdict, BackendError> {
        self.ready().await?;
        let cleanup = self.cleanup_due();
        match &self.pool {
            Pool::Postgres(pool) => pg_reserve(pool, request, cleanup).await,
            Pool::Sqlite(pool) => sqlite_reserve(pool, request, cleanup).await,
        }
    }

    pub async fn settle(&self, request: &SettleRequest<'_>) -> Result<SettleOutcome, BackendError> {
        self.ready().await?;
        match &self.pool {
            Pool::Postgres(pool) => pg_settle(pool, request).await,
            Pool::Sqlite(pool) => sqlite_settle(pool, request).await,
        }
    }

    pub async fn usage(
        &self,
        key: &LineKey,
        now: OffsetDateTime,
    ) -> Result<(i64, i64), BackendError> {
        self.ready().await?;
        match &self.pool {
            Pool::Postgres(pool) => {
                let spent: Option<Decimal> = sqlx::query_scalar(
                    "SELECT spent_usd FROM budget_spend \
                     WHERE project = $1 AND key_id = $2 AND period = $3 AND period_start = $4",
                )
                .bind(&*key.project)
                .bind(&*key.key_id)
                .bind(key.period.as_str())
                .bind(key.start)
                .fetch_optional(pool)
                .await?;
                let reserved: Option<Decimal> = sqlx::query_scalar(
                    "SELECT SUM(amount_usd) FROM budget_reservations WHERE project = $1 \
                     AND key_id = $2 AND period = $3 AND period_start = $4 AND expires_at > $5",
                )
                .bind(&*key.project)
                .bind(&*key.key_id)
                .bind(key.period.as_str())
                .bind(key.start)
                .bind(now)
                .fetch_one(pool)
                .await?;
                Ok((nanos(spent)?, nanos(reserved)?))
            }
            Pool::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let (spent, reserved) = sqlite_state(&mut conn, key, unix_ms(now)).await?;
                Ok((spent, reserved))
            }
        }
    }
}

/// A NUMERIC amount in nano-USD. Every amount written is whole nano-USD, so this is exact.
fn nanos(amount: Option<Decimal>) -> Result<i64, BackendError> {
    let Some(amount) = amount else {
        return Ok(0);
    };
    amount
        .checked_mul(Decimal::from(NANOS_PER_USD))
        .and_then(|nanos| nanos.round().to_i64())
        .ok_or(BackendError::Malformed(
            "an amount beyond the range of a budget",
        ))
}

fn numeric(nanos: i64) -> Decimal {
    Decimal::new(nanos, 9)
}

/// Rows that name a budget line, as Postgres returns them.
type LineRow<T> = (String, String, String, Date, T);

fn same_line<T>(row: &LineRow<T>, key: &LineKey) -> bool {
    row.0 == *key.project
        && row.1 == *key.key_id
        && row.2 == key.period.as_str()
        && row.3 == key.start
}

/// `(project, key_id, period, period_start)` of each line, as a `VALUES` list.
fn push_lines<'args>(query: &mut QueryBuilder<'args, Postgres>, lines: &'args [Line]) {
    query.push_values(lines, |mut row, line| {
        row.push_bind(&*line.key.project)
            .push_bind(&*line.key.key_id)
            .push_bind(line.key.period.as_str())
            .push_bind(line.key.start);
    });
}

async fn pg_reserve(
    pool: &PgPool,
    request: &ReserveRequest<'_>,
    cleanup: bool,
) -> Result<Verdict, BackendError> {
    let mut tx = pool.begin().await?;
    // Locks every line's row (creating it at 0 when the period is new), in the order of the
    // lines, which every replica uses: the checks of one budget queue here, one at a time.
    let mut lock = QueryBuilder::<Postgres>::new(
        "INSERT INTO budget_spend (project, key_id, period, period_start) ",
    );
    push_lines(&mut lock, request.lines);
    lock.push(
        " ON CONFLICT (project, key_id, period, period_start) \
         DO UPDATE SET spent_usd = budget_spend.spent_usd \
         RETURNING project, key_id, period, period_start, spent_usd",
    );
    let spent: Vec<LineRow<Decimal>> = lock.build_query_as().fetch_all(&mut *tx).await?;
    // A statement of its own, after the locks: it sees every reservation committed before.
    let mut sums = QueryBuilder::<Postgres>::new(
        "SELECT project, key_id, period, period_start, SUM(amount_usd) FROM budget_reservations \
         WHERE (project, key_id, period, period_start) IN (",
    );
    push_lines(&mut sums, request.lines);
    sums.push(") AND expires_at > ")
        .push_bind(request.now)
        .push(" GROUP BY project, key_id, period, period_start");
    let reserved: Vec<LineRow<Option<Decimal>>> = sums.build_query_as().fetch_all(&mut *tx).await?;

    for (index, line) in request.lines.iter().enumerate() {
        let line_spent = spent
            .iter()
            .find(|row| same_line(row, &line.key))
            .ok_or(BackendError::Malformed("a budget row was not returned"))?;
        let line_spent = nanos(Some(line_spent.4))?;
        let line_reserved = nanos(
            reserved
                .iter()
                .find(|row| same_line(row, &line.key))
                .and_then(|row| row.4),
        )?;
        if !fits(line_spent, line_reserved, request.amount, line.limit) {
            tx.rollback().await?;
            return Ok(Verdict::Exceeded {
                index,
                spent: line_spent,
                reserved: line_reserved,
            });
        }
    }
    if request.amount > 0 {
        let amount = numeric(request.amount);
        let mut insert = QueryBuilder::<Postgres>::new(
            "INSERT INTO budget_reservations \
             (reservation_id, project, key_id, period, period_start, amount_usd, expires_at) ",
        );
        insert.push_values(request.lines, |mut row, line| {
            row.push_bind(request.id)
                .push_bind(&*line.key.project)
                .push_bind(&*line.key.key_id)
                .push_bind(line.key.period.as_str())
                .push_bind(line.key.start)
                .push_bind(amount)
                .push_bind(request.expires);
        });
        insert.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    if cleanup {
        // Expired rows no longer count, so deleting them needs no budget lock. Rows a
        // settlement is deleting are skipped rather than waited for (waiting on several
        // settlements at once could deadlock with them), and the request does not wait.
        let pool = pool.clone();
        let now = request.now;
        tokio::spawn(async move {
            let deleted = sqlx::query(
                "DELETE FROM budget_reservations WHERE (reservation_id, project, key_id, period, \
                 period_start) IN (SELECT reservation_id, project, key_id, period, period_start \
                 FROM budget_reservations WHERE expires_at <= $1 LIMIT 10000 \
                 FOR UPDATE SKIP LOCKED)",
            )
            .bind(now)
            .execute(&pool)
            .await;
            if let Err(err) = deleted {
                tracing::debug!(error = %err, "budgets: deleting expired reservations failed");
            }
        });
    }
    Ok(Verdict::Admitted)
}

async fn pg_settle(
    pool: &PgPool,
    request: &SettleRequest<'_>,
) -> Result<SettleOutcome, BackendError> {
    let mut tx = pool.begin().await?;
    let actual = numeric(request.actual);
    // The same row locks in the same order as a reservation, so a check never sees the cost
    // added without the reservation released, or the other way round.
    let mut add = QueryBuilder::<Postgres>::new(
        "INSERT INTO budget_spend (project, key_id, period, period_start, spent_usd) ",
    );
    add.push_values(request.lines, |mut row, line| {
        row.push_bind(&*line.key.project)
            .push_bind(&*line.key.key_id)
            .push_bind(line.key.period.as_str())
            .push_bind(line.key.start)
            .push_bind(actual);
    });
    add.push(
        " ON CONFLICT (project, key_id, period, period_start) \
         DO UPDATE SET spent_usd = budget_spend.spent_usd + EXCLUDED.spent_usd \
         RETURNING project, key_id, period, period_start, spent_usd",
    );
    let rows: Vec<LineRow<Decimal>> = add.build_query_as().fetch_all(&mut *tx).await?;
    let mut spent = Vec::with_capacity(request.lines.len());
    for line in request.lines {
        let row = rows
            .iter()
            .find(|row| same_line(row, &line.key))
            .ok_or(BackendError::Malformed("a budget row was not returned"))?;
        spent.push(nanos(Some(row.4))?);
    }
    if request.reserved > 0 {
        sqlx::query("DELETE FROM budget_reservations WHERE reservation_id = $1")
            .bind(request.id)
            .execute(&mut *tx)
            .await?;
    }
    let candidates = candidates(request, &spent);
    let mut fired = Vec::new();
    if !candidates.is_empty() {
        let mut record = QueryBuilder::<Postgres>::new(
            "INSERT INTO budget_alerts (project, key_id, period, period_start, \
             threshold_percent, limit_usd, spent_usd, fired_at) ",
        );
        record.push_values(&candidates, |mut row, &(index, percent)| {
            let line = &request.lines[index];
            row.push_bind(&*line.key.project)
                .push_bind(&*line.key.key_id)
                .push_bind(line.key.period.as_str())
                .push_bind(line.key.start)
                .push_bind(i32::try_from(percent).unwrap_or(i32::MAX))
                .push_bind(numeric(line.limit))
                .push_bind(numeric(spent[index]))
                .push_bind(request.now);
        });
        record.push(
            " ON CONFLICT DO NOTHING \
             RETURNING project, key_id, period, period_start, threshold_percent",
        );
        let recorded: Vec<LineRow<i32>> = record.build_query_as().fetch_all(&mut *tx).await?;
        fired = candidates
            .into_iter()
            .filter(|&(index, percent)| {
                recorded.iter().any(|row| {
                    same_line(row, &request.lines[index].key)
                        && i64::from(row.4) == i64::from(percent)
                })
            })
            .collect();
    }
    tx.commit().await?;
    Ok(SettleOutcome { spent, fired })
}

/// The thresholds (line index, percent) the new spending reaches and nobody is known to have
/// recorded yet.
fn candidates(request: &SettleRequest<'_>, spent: &[i64]) -> Vec<(usize, u32)> {
    request
        .thresholds
        .iter()
        .zip(spent)
        .enumerate()
        .flat_map(|(index, (thresholds, &spent))| {
            thresholds
                .iter()
                .filter(move |t| t.at.is_some_and(|at| spent >= at))
                .map(move |t| (index, t.percent))
        })
        .collect()
}

/// Spent and live reserved nano-USD of one line, inside the caller's transaction.
async fn sqlite_state(
    conn: &mut sqlx::SqliteConnection,
    key: &LineKey,
    now_ms: i64,
) -> Result<(i64, i64), sqlx::Error> {
    let start = key.start.to_string();
    let spent: Option<i64> = sqlx::query_scalar(
        "SELECT spent_nanos FROM budget_spend \
         WHERE project = ? AND key_id = ? AND period = ? AND period_start = ?",
    )
    .bind(&*key.project)
    .bind(&*key.key_id)
    .bind(key.period.as_str())
    .bind(&start)
    .fetch_optional(&mut *conn)
    .await?;
    let reserved: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(amount_nanos), 0) FROM budget_reservations WHERE project = ? \
         AND key_id = ? AND period = ? AND period_start = ? AND expires_at_ms > ?",
    )
    .bind(&*key.project)
    .bind(&*key.key_id)
    .bind(key.period.as_str())
    .bind(&start)
    .bind(now_ms)
    .fetch_one(&mut *conn)
    .await?;
    Ok((spent.unwrap_or(0), reserved))
}

async fn sqlite_reserve(
    pool: &SqlitePool,
    request: &ReserveRequest<'_>,
    cleanup: bool,
) -> Result<Verdict, BackendError> {
    // IMMEDIATE takes the write lock at once: with a deferred transaction, two checks could
    // both read and then one would fail to upgrade to writing.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let now_ms = unix_ms(request.now);
    for (index, line) in request.lines.iter().enumerate() {
        let (spent, reserved) = sqlite_state(&mut tx, &line.key, now_ms).await?;
        if !fits(spent, reserved, request.amount, line.limit) {
            tx.rollback().await?;
            return Ok(Verdict::Exceeded {
                index,
                spent,
                reserved,
            });
        }
    }
    if request.amount > 0 {
        let id = request.id.hyphenated().to_string();
        let expires_ms = unix_ms(request.expires);
        for line in request.lines {
            sqlx::query(
                "INSERT INTO budget_reservations (reservation_id, project, key_id, period, \
                 period_start, amount_nanos, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&id)
            .bind(&*line.key.project)
            .bind(&*line.key.key_id)
            .bind(line.key.period.as_str())
            .bind(line.key.start.to_string())
            .bind(request.amount)
            .bind(expires_ms)
            .execute(&mut *tx)
            .await?;
        }
    }
    if cleanup {
        sqlx::query("DELETE FROM budget_reservations WHERE expires_at_ms <= ?")
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Verdict::Admitted)
}

async fn sqlite_settle(
    pool: &SqlitePool,
    request: &SettleRequest<'_>,
) -> Result<SettleOutcome, BackendError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut spent = Vec::with_capacity(request.lines.len());
    for line in request.lines {
        let total: i64 = sqlx::query_scalar(
            "INSERT INTO budget_spend (project, key_id, period, period_start, spent_nanos) \
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (project, key_id, period, period_start) \
             DO UPDATE SET spent_nanos = spent_nanos + excluded.spent_nanos \
             RETURNING spent_nanos",
        )
        .bind(&*line.key.project)
        .bind(&*line.key.key_id)
        .bind(line.key.period.as_str())
        .bind(line.key.start.to_string())
        .bind(request.actual)
        .fetch_one(&mut *tx)
        .await?;
        spent.push(total);
    }
    if request.reserved > 0 {
        sqlx::query("DELETE FROM budget_reservations WHERE reservation_id = ?")
            .bind(request.id.hyphenated().to_string())
            .execute(&mut *tx)
            .await?;
    }
    let fired_at = request
        .now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut fired = Vec::new();
    for (index, percent) in candidates(request, &spent) {
        let line = &request.lines[index];
        let recorded = sqlx::query(
            "INSERT INTO budget_alerts (project, key_id, period, period_start, threshold_percent, \
             limit_nanos, spent_nanos, fired_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&*line.key.project)
        .bind(&*line.key.key_id)
        .bind(line.key.period.as_str())
        .bind(line.key.start.to_string())
        .bind(i64::from(percent))
        .bind(line.limit)
        .bind(spent[index])
        .bind(&fired_at)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if recorded == 1 {
            fired.push((index, percent));
        }
    }
    tx.commit().await?;
    Ok(SettleOutcome { spent, fired })
}
