//! Budgets: USD spending limits per project and per API key, per UTC day and per UTC month,
//! that hold across gateway replicas.
//!
//! # Reserve, then settle
//! Before a request goes upstream the caller reserves its most expensive outcome (the prompt
//! estimate plus `max_tokens` at the output price) with [`Budgets::reserve`]. Every budget
//! that applies (the project's day and month, the key's day and month) is checked and
//! charged at once: the request is admitted only if, for each of them,
//! `spent + reserved + max_cost <= limit`; otherwise nothing is charged and the caller gets
//! [`BudgetError::Exceeded`] (the gateway answers 429 `insufficient_quota`). When the request
//! ends, [`BudgetReservation::settle`] replaces the reservation by the real cost. A real cost
//! above the reservation is counted in full and may take `spent` over the limit: a request
//! that already ran is never refused after the fact; the next ones are.
//!
//! A reservation that is never settled (its replica crashed, or the request outlived
//! `reservation_ttl_secs`) expires and stops counting. A late settlement still adds its cost.
//!
//! # Periods
//! UTC days and UTC calendar months. A reservation belongs to the periods its `now` falls in,
//! and so does its settlement, even when the request ends after midnight. A new period starts
//! from zero. Old periods are kept (database) or expire a week after they end (Redis).
//!
//! # Money
//! Amounts are [`Decimal`]s at the API and are counted in whole nano-USD (10^-9) inside, so
//! the three backends agree to the last digit: costs and reservations are rounded up to the
//! next nano-USD (a request is never counted as cheaper than it was), limits down. Negative
//! costs count as 0.
//!
//! # Unpriced models
//! A caller without a price passes `max_cost = 0`. Such a request is not held back by its own
//! cost, but it still needs room: it is refused once `spent + reserved` has reached a limit,
//! like every other request of the budget (so an exhausted budget stops everything it
//! covers, and a limit of 0 admits nothing). If the real cost becomes known (a price, or a
//! cost the vendor reports), settling with it counts it; settling with 0 counts nothing.
//!
//! # Backends (`[budget].backend`)
//! - `database`, the `[database]` store. Postgres: one transaction takes the rows of the
//!   request's budgets for this period with `INSERT .. ON CONFLICT DO UPDATE` (a row lock,
//!   always in the same order, so replicas never deadlock), sums the live reservations of
//!   those budgets, and inserts its own only if all of them have room; settling updates the
//!   same rows under the same locks, so no check can see a settlement half done. SQLite: the
//!   same steps in a `BEGIN IMMEDIATE` transaction, which holds the database's write lock.
//!   Reservations are rows with `expires_at`; expired ones are ignored by the sum and deleted
//!   by any replica, about once a minute. The tables come from migration `0004_budgets`,
//!   applied on first use if the usage writer has not applied it yet.
//! - `redis`: one Lua script checks and reserves every budget of a request, another settles
//!   (`budget/reserve.lua`, `budget/settle.lua`). Each budget and period is a hash (`spent`,
//!   `reserved`, alert flags) and a sorted set of live reservations scored by expiry; the
//!   reserve script releases expired ones before checking. Keys are
//!   `<key_prefix><p|k>:<day|month>:<period start>:<len(project)>:<project>:<key id>` and
//!   expire a week after their period ends.
//! - `local`: the same rules in this process's memory; for a single gateway.
//!
//! Expiry is judged by the caller's clock (`now`), in every backend, so a test can move time;
//! replicas with clocks a few seconds apart disagree on expiry by as much, which a TTL of
//! minutes absorbs.
//!
//! # When the backend fails
//! Every call runs under `timeout_ms`; after a failure the backend is taken as down for
//! `down_secs` without trying. `on_failure = "fail-open"` (default) admits the request
//! without a reservation (counted in [`BudgetStats`], logged at the 1st, 2nd, 4th...
//! failure) and its settlement still tries to count the cost; `"fail-closed"` refuses with
//! [`BudgetError::Unavailable`] (the gateway answers 503). A settlement that fails is
//! counted and logged, not retried: a retry after an unclear failure could count twice.
//!
//! # Alerts
//! When settled spending reaches a threshold of `[budget].alerts` (percent of the limit) the
//! first time in a period, the budget logs a `tracing::warn!`, counts it in
//! [`BudgetStats::alerts`] and, with `alert_webhook`, POSTs a JSON object (fire and forget,
//! `webhook_timeout_ms`, failures logged and counted). The settlement that records the alert
//! (a primary key in `budget_alerts`, `HSETNX` in Redis) in the same transaction or script
//! that adds the cost is the one that sends it, so each threshold fires once per budget and
//! period across replicas. Thresholds are recorded by percent: one that fired before a
//! reload changed the limit does not fire again in that period. The webhook body:
//! `{"type": "budget_alert", "project", "key_id" (null for a project budget), "scope",
//! "period", "period_start", "threshold_percent", "limit_usd", "spent_usd", "fired_at"}`,
//! amounts as decimal strings.

mod config;
mod database;
mod local;
mod redis_store;

pub use config::{
    BudgetBackend, BudgetEntry, BudgetFailureMode, BudgetSettings, BudgetTable, check_settings,
};

use crate::config::DatabaseConfig;
use database::DatabaseStore;
use gateway_core::config::ConfigError;
use local::LocalStore;
use redis_store::RedisStore;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

/// Nano-USD in one USD: the unit every backend counts in.
const NANOS_PER_USD: i64 = 1_000_000_000;
/// The largest amount a budget counts (10^9 USD), far from `i64` overflow when summed.
const MAX_NANOS: i64 = NANOS_PER_USD * 1_000_000_000;
/// How often a replica deletes expired reservation rows.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// Whose budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetScope {
    Project,
    Key,
}

impl BudgetScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Project => "project",
            Self::Key => "key",
        }
    }
}

impl fmt::Display for BudgetScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The period a budget's limit is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetPeriod {
    /// A UTC day.
    Day,
    /// A UTC calendar month.
    Month,
}

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
        }
    }
}

impl fmt::Display for BudgetPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first day of the period `day` is in.
fn period_start(period: BudgetPeriod, day: Date) -> Date {
    match period {
        BudgetPeriod::Day => day,
        BudgetPeriod::Month => day.replace_day(1).unwrap_or(day),
    }
}

/// The first day after the period that starts on `start`.
fn period_end(period: BudgetPeriod, start: Date) -> Date {
    match period {
        BudgetPeriod::Day => start.next_day().unwrap_or(start),
        BudgetPeriod::Month => {
            let (year, month) = match start.month() {
                time::Month::December => (start.year() + 1, time::Month::January),
                month => (start.year(), month.next()),
            };
            Date::from_calendar_date(year, month, 1).unwrap_or(start)
        }
    }
}

/// One budget in one period: what every backend keys its state by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LineKey {
    project: Arc<str>,
    /// `""` for the project's own budget.
    key_id: Arc<str>,
    period: BudgetPeriod,
    start: Date,
}

/// One budget that applies to a request, with its limit as configured when it was reserved
/// (a reload in between must not change how the reservation is settled).
#[derive(Debug, Clone)]
struct Line {
    key: LineKey,
    scope: BudgetScope,
    /// Nano-USD.
    limit: i64,
    webhook: Option<Arc<str>>,
}

/// What a reservation asks of a backend.
struct ReserveRequest<'a> {
    id: Uuid,
    lines: &'a [Line],
    /// Nano-USD, 0 or more.
    amount: i64,
    now: OffsetDateTime,
    expires: OffsetDateTime,
}

/// A backend's answer to a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Admitted,
    /// `index` is the first line without room; nothing was reserved.
    Exceeded {
        index: usize,
        spent: i64,
        reserved: i64,
    },
}

/// An alert threshold of one line: `at` is the spending (nano-USD) that reaches it, `None`
/// when it is not to be checked (a limit of 0, or known to have fired already).
#[derive(Debug, Clone, Copy)]
struct Threshold {
    percent: u32,
    at: Option<i64>,
}

/// What a settlement asks of a backend.
struct SettleRequest<'a> {
    id: Uuid,
    lines: &'a [Line],
    /// The amount reserved under `id`, to release if it is still held.
    reserved: i64,
    actual: i64,
    /// Per line, the same thresholds in the same order.
    thresholds: Vec<Vec<Threshold>>,
    now: OffsetDateTime,
}

/// What a settlement did: the new spending of each line, and the thresholds whose alert this
/// settlement recorded (line index, percent).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SettleOutcome {
    spent: Vec<i64>,
    fired: Vec<(usize, u32)>,
}

/// Whether a request of `amount` fits: see "Unpriced models" above for why 0 needs room too.
fn fits(spent: i64, reserved: i64, amount: i64, limit: i64) -> bool {
    let used = i128::from(spent) + i128::from(reserved);
    if amount > 0 {
        used + i128::from(amount) <= i128::from(limit)
    } else {
        used < i128::from(limit)
    }
}

/// The spending at which `percent` of `limit` is reached, rounded up; `None` for a limit of 0.
fn threshold_at(limit: i64, percent: u32) -> Option<i64> {
    if limit <= 0 {
        return None;
    }
    let at = (i128::from(limit) * i128::from(percent) + 99) / 100;
    i64::try_from(at).ok()
}

/// A cost in nano-USD, rounded up; negative counts as 0.
fn cost_nanos(cost: Decimal) -> i64 {
    if cost <= Decimal::ZERO {
        return 0;
    }
    cost.checked_mul(Decimal::from(NANOS_PER_USD))
        .and_then(|nanos| nanos.ceil().to_i64())
        .map_or(MAX_NANOS, |nanos| nanos.min(MAX_NANOS))
}

fn usd(nanos: i64) -> Decimal {
    Decimal::new(nanos, 9).normalize()
}

/// Unix milliseconds, which the SQLite and Redis backends store.
fn unix_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Why a backend call gave no answer.
#[derive(Debug, thiserror::Error)]
enum BackendError {
    #[error("the budget store is marked down after a recent failure")]
    MarkedDown,
    #[error("the budget store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("applying the budget migrations: {0}")]
    Migrate(#[from] crate::StoreError),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the budget store answered something unexpected: {0}")]
    Malformed(&'static str),
}

enum Store {
    Local(LocalStore),
    Database(DatabaseStore),
    Redis(RedisStore),
}

impl Store {
    async fn reserve(&self, request: &ReserveRequest<'_>) -> Result<Verdict, BackendError> {
        match self {
            Self::Local(store) => Ok(store.reserve(request)),
            Self::Database(store) => store.reserve(request).await,
            Self::Redis(store) => store.reserve(request).await,
        }
    }

    async fn settle(&self, request: &SettleRequest<'_>) -> Result<SettleOutcome, BackendError> {
        match self {
            Self::Local(store) => Ok(store.settle(request)),
            Self::Database(store) => store.settle(request).await,
            Self::Redis(store) => store.settle(request).await,
        }
    }

    /// Settled spending and live reservations of one line, nano-USD.
    async fn usage(&self, key: &LineKey, now: OffsetDateTime) -> Result<(i64, i64), BackendError> {
        match self {
            Self::Local(store) => Ok(store.usage(key, now)),
            Self::Database(store) => store.usage(key, now).await,
            Self::Redis(store) => store.usage(key, now).await,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The budget has no room for the request (nothing was reserved).
    #[error(
        "the {period} budget of {scope} {name:?} ({limit} USD) has no room: {spent} USD spent, \
         {reserved} USD reserved by requests in flight"
    )]
    Exceeded {
        scope: BudgetScope,
        /// The project, or `project/key id`.
        name: String,
        period: BudgetPeriod,
        limit: Decimal,
        /// Settled spending in the period.
        spent: Decimal,
        /// Held by requests in flight.
        reserved: Decimal,
    },
    /// `fail-closed` and the backend cannot be reached.
    #[error("budgets cannot be checked: the budget store is unavailable")]
    Unavailable,
}

/// Why [`Budgets::new`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum BudgetSetupError {
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
    #[error("budgets: unsupported database url (expected sqlite://PATH or postgres://...)")]
    UnsupportedDatabaseUrl,
    #[error("budgets: creating the database directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("budgets: database url: {0}")]
    Database(#[source] sqlx::Error),
    // The URL itself is left out: it may hold a password.
    #[error("budgets: redis_url is not usable: {0}")]
    Redis(#[source] redis::RedisError),
    #[error("budgets: building the webhook client: {0}")]
    Webhook(#[source] reqwest::Error),
    #[error("budgets: the database and redis backends must be set up inside a tokio runtime")]
    NoRuntime,
}

/// Counters since the budgets were created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetStats {
    /// Reservations admitted by the backend (requests without a budget are not counted).
    pub admitted: u64,
    /// [`BudgetError::Exceeded`] answers.
    pub rejected: u64,
    /// Backend calls (reservations and settlements) that got no answer.
    pub backend_failures: u64,
    /// Requests admitted unchecked because the backend failed (`fail-open`).
    pub fail_open_admissions: u64,
    /// [`BudgetError::Unavailable`] answers (`fail-closed`).
    pub fail_closed_rejections: u64,
    /// Settlements whose cost could not be counted.
    pub settle_failures: u64,
    /// Alerts this instance fired (each threshold fires on one replica only).
    pub alerts: u64,
    pub webhooks_sent: u64,
    pub webhook_failures: u64,
}

#[derive(Default)]
struct Counters {
    admitted: AtomicU64,
    rejected: AtomicU64,
    backend_failures: AtomicU64,
    fail_open_admissions: AtomicU64,
    fail_closed_rejections: AtomicU64,
    settle_failures: AtomicU64,
    alerts: AtomicU64,
    webhooks_sent: AtomicU64,
    webhook_failures: AtomicU64,
}

fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed) + 1
}

/// One budget as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetUsage {
    pub limit: Decimal,
    /// Settled spending in the period.
    pub spent: Decimal,
    /// Held by live reservations.
    pub reserved: Decimal,
}

/// The budgets. Cheap to clone; keep one for the life of the process (it holds the backend's
/// connections and, with `backend = "local"`, the state itself).
#[derive(Clone)]
pub struct Budgets {
    inner: Arc<Inner>,
}

struct Inner {
    table: RwLock<Arc<BudgetTable>>,
    store: Store,
    backend: BudgetBackend,
    ttl: time::Duration,
    timeout: Duration,
    down_for: Duration,
    on_failure: BudgetFailureMode,
    /// Sorted, without repeats.
    alerts: Vec<u32>,
    /// Alerts fired per threshold, in the order of `alerts`.
    fired_by_threshold: Vec<AtomicU64>,
    webhook: reqwest::Client,
    origin: Instant,
    /// Nanoseconds since `origin` until which the backend is taken as down; 0 = up.
    down_until: AtomicU64,
    /// Thresholds known to have fired, so a settlement does not ask the backend again. Only a
    /// shortcut: the backend's record decides.
    fired: Mutex<HashSet<(LineKey, u32)>>,
    counters: Counters,
}

impl fmt::Debug for Budgets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budgets")
            .field("backend", &self.inner.backend)
            .field("on_failure", &self.inner.on_failure)
            .finish_non_exhaustive()
    }
}

impl Budgets {
    /// Checks the config and prepares the backend; nothing is connected until the first
    /// request, so the gateway starts while the database or Redis is down. The `database`
    /// and `redis` backends must be created inside a tokio runtime.
    pub fn new(
        settings: &BudgetSettings,
        budgets: &[BudgetEntry],
        database: &DatabaseConfig,
    ) -> Result<Self, BudgetSetupError> {
        let mut errors = check_settings(settings);
        let table = BudgetTable::build(budgets)
            .map_err(|mut problems| errors.append(&mut problems))
            .unwrap_or_default();
        let mut alerts = settings.alerts.clone();
        alerts.sort_unstable();
        alerts.dedup();
        if !errors.is_empty() {
            return Err(BudgetSetupError::Invalid(errors));
        }
        let timeout = Duration::from_millis(settings.timeout_ms);
        let store = match settings.backend {
            BudgetBackend::Local => Store::Local(LocalStore::default()),
            BudgetBackend::Database => {
                // sqlx's pool spawns its maintenance task, and would panic outside a runtime.
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(BudgetSetupError::NoRuntime);
                }
                Store::Database(DatabaseStore::new(
                    &database.url,
                    database.max_connections,
                    timeout,
                )?)
            }
            BudgetBackend::Redis => {
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(BudgetSetupError::NoRuntime);
                }
                let url = settings.redis_url.as_deref().unwrap_or_default();
                Store::Redis(
                    RedisStore::new(
                        url,
                        settings.key_prefix.clone(),
                        timeout,
                        settings.reservation_ttl_secs,
                    )
                    .map_err(BudgetSetupError::Redis)?,
                )
            }
        };
        let webhook = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.webhook_timeout_ms))
            .build()
            .map_err(BudgetSetupError::Webhook)?;
        let ttl_secs = i64::try_from(settings.reservation_ttl_secs).unwrap_or(i64::MAX);
        Ok(Self {
            inner: Arc::new(Inner {
                table: RwLock::new(Arc::new(table)),
                store,
                backend: settings.backend,
                ttl: time::Duration::seconds(ttl_secs),
                timeout,
                down_for: Duration::from_secs(settings.down_secs),
                on_failure: settings.on_failure,
                fired_by_threshold: alerts.iter().map(|_| AtomicU64::new(0)).collect(),
                alerts,
                webhook,
                origin: Instant::now(),
                down_until: AtomicU64::new(0),
                fired: Mutex::new(HashSet::new()),
                counters: Counters::default(),
            }),
        })
    }

    /// Replaces the limits (a config reload). Spending carries on: it is keyed by project,
    /// key and period, not by the entry. Reservations made before keep the limits they were
    /// made under until they are settled.
    pub fn set_budgets(&self, budgets: &[BudgetEntry]) -> Result<(), Vec<ConfigError>> {
        let table = Arc::new(BudgetTable::build(budgets)?);
        *self
            .inner
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner) = table;
        Ok(())
    }

    fn table(&self) -> Arc<BudgetTable> {
        self.inner
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether any budget applies to this key of this project: without one, the caller need
    /// not work out a cost ([`Budgets::reserve`] would admit at once anyway).
    pub fn applies(&self, project: &str, key_id: &str) -> bool {
        self.table().applies(project, key_id)
    }

    pub fn backend(&self) -> BudgetBackend {
        self.inner.backend
    }

    /// Checks every budget of the request and reserves `max_cost` in all of them, or in none.
    /// `now` picks the day and month (UTC) and starts the reservation's TTL. See the module
    /// documentation for `max_cost = 0` (an unpriced model).
    pub async fn reserve(
        &self,
        project: &str,
        key_id: &str,
        max_cost: Decimal,
        now: OffsetDateTime,
    ) -> Result<BudgetReservation, BudgetError> {
        let amount = cost_nanos(max_cost);
        let lines = self.table().lines_for(project, key_id, now);
        if lines.is_empty() {
            return Ok(BudgetReservation {
                amount,
                pending: None,
            });
        }
        let inner = &self.inner;
        let id = Uuid::now_v7();
        let request = ReserveRequest {
            id,
            lines: &lines,
            amount,
            now,
            expires: now.saturating_add(inner.ttl),
        };
        let backed = match inner.call(inner.store.reserve(&request)).await {
            Ok(Verdict::Admitted) => {
                bump(&inner.counters.admitted);
                true
            }
            Ok(Verdict::Exceeded {
                index,
                spent,
                reserved,
            }) => {
                bump(&inner.counters.rejected);
                let Some(line) = lines.get(index) else {
                    return Err(BudgetError::Unavailable);
                };
                let name = match line.scope {
                    BudgetScope::Project => line.key.project.to_string(),
                    BudgetScope::Key => format!("{}/{}", line.key.project, line.key.key_id),
                };
                return Err(BudgetError::Exceeded {
                    scope: line.scope,
                    name,
                    period: line.key.period,
                    limit: usd(line.limit),
                    spent: usd(spent),
                    reserved: usd(reserved),
                });
            }
            Err(err) => {
                inner.failed(&err, "reserve");
                match inner.on_failure {
                    BudgetFailureMode::FailClosed => {
                        bump(&inner.counters.fail_closed_rejections);
                        return Err(BudgetError::Unavailable);
                    }
                    BudgetFailureMode::FailOpen => {
                        bump(&inner.counters.fail_open_admissions);
                        false
                    }
                }
            }
        };
        Ok(BudgetReservation {
            amount,
            pending: Some(Pending {
                inner: self.inner.clone(),
                id,
                lines,
                backed,
            }),
        })
    }

    /// Where a budget stands: `key_id = None` for the project's own budget. `None` when no
    /// such budget is configured.
    pub async fn usage(
        &self,
        project: &str,
        key_id: Option<&str>,
        period: BudgetPeriod,
        now: OffsetDateTime,
    ) -> Result<Option<BudgetUsage>, BudgetError> {
        let scope = if key_id.is_some() {
            BudgetScope::Key
        } else {
            BudgetScope::Project
        };
        let lines = self.table().lines_for(project, key_id.unwrap_or(""), now);
        let Some(line) = lines
            .into_iter()
            .find(|line| line.scope == scope && line.key.period == period)
        else {
            return Ok(None);
        };
        let inner = &self.inner;
        match inner.call(inner.store.usage(&line.key, now)).await {
            Ok((spent, reserved)) => Ok(Some(BudgetUsage {
                limit: usd(line.limit),
                spent: usd(spent),
                reserved: usd(reserved),
            })),
            Err(err) => {
                inner.failed(&err, "usage");
                Err(BudgetError::Unavailable)
            }
        }
    }

    /// Alerts this instance fired, per threshold (percent) of `[budget].alerts`, every
    /// threshold listed.
    pub fn alerts_by_threshold(&self) -> Vec<(u32, u64)> {
        self.inner
            .alerts
            .iter()
            .zip(&self.inner.fired_by_threshold)
            .map(|(&percent, count)| (percent, count.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn stats(&self) -> BudgetStats {
        let c = &self.inner.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        BudgetStats {
            admitted: load(&c.admitted),
            rejected: load(&c.rejected),
            backend_failures: load(&c.backend_failures),
            fail_open_admissions: load(&c.fail_open_admissions),
            fail_closed_rejections: load(&c.fail_closed_rejections),
            settle_failures: load(&c.settle_failures),
            alerts: load(&c.alerts),
            webhooks_sent: load(&c.webhooks_sent),
            webhook_failures: load(&c.webhook_failures),
        }
    }
}

impl Inner {
    /// Runs one backend call under the timeout, unless the backend is marked down.
    async fn call<T>(
        &self,
        operation: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        if matches!(self.store, Store::Local(_)) {
            return operation.await;
        }
        let now = self.now_nanos();
        let until = self.down_until.load(Ordering::Acquire);
        if until != 0 && now < until {
            return Err(BackendError::MarkedDown);
        }
        let result = match tokio::time::timeout(self.timeout, operation).await {
            Ok(result) => result,
            Err(_elapsed) => Err(BackendError::Timeout(self.timeout)),
        };
        match &result {
            Ok(_) if until != 0 => self.down_until.store(0, Ordering::Release),
            Ok(_) => {}
            Err(_) => {
                let down_for = u64::try_from(self.down_for.as_nanos()).unwrap_or(u64::MAX);
                self.down_until
                    .store(now.saturating_add(down_for).max(1), Ordering::Release);
            }
        }
        result
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn failed(&self, err: &BackendError, during: &'static str) {
        let failures = bump(&self.counters.backend_failures);
        // An outage fails every request; logging each would flood the log.
        if failures.is_power_of_two() {
            tracing::warn!(
                failures,
                during,
                error = %err,
                backend = self.backend.as_str(),
                on_failure = self.on_failure.as_str(),
                "budgets: backend unavailable (logged at the 1st, 2nd, 4th, 8th... failure)"
            );
        }
    }

    /// `reserved` is released even when fail-open admitted the request without a backed
    /// reservation: the backend may have stored it after all (a reply lost to the timeout).
    async fn settle(self: &Arc<Self>, pending: Pending, reserved: i64, actual: i64) {
        if actual == 0 && reserved == 0 {
            return;
        }
        let thresholds = {
            let fired = self.fired.lock().unwrap_or_else(PoisonError::into_inner);
            pending
                .lines
                .iter()
                .map(|line| {
                    self.alerts
                        .iter()
                        .map(|&percent| Threshold {
                            percent,
                            at: threshold_at(line.limit, percent)
                                .filter(|_| !fired.contains(&(line.key.clone(), percent))),
                        })
                        .collect()
                })
                .collect()
        };
        let request = SettleRequest {
            id: pending.id,
            lines: &pending.lines,
            reserved,
            actual,
            thresholds,
            now: OffsetDateTime::now_utc(),
        };
        let outcome = match self.call(self.store.settle(&request)).await {
            Ok(outcome) => outcome,
            Err(err) => {
                bump(&self.counters.settle_failures);
                self.failed(&err, "settle");
                return;
            }
        };
        {
            // Whoever recorded them, these thresholds have fired: no need to ask again.
            let mut fired = self.fired.lock().unwrap_or_else(PoisonError::into_inner);
            if fired.len() > 100_000 {
                fired.clear();
            }
            for ((line, thresholds), &spent) in pending
                .lines
                .iter()
                .zip(&request.thresholds)
                .zip(&outcome.spent)
            {
                for threshold in thresholds {
                    if threshold.at.is_some_and(|at| spent >= at) {
                        fired.insert((line.key.clone(), threshold.percent));
                    }
                }
            }
        }
        for &(index, percent) in &outcome.fired {
            if let (Some(line), Some(&spent)) = (pending.lines.get(index), outcome.spent.get(index))
            {
                self.alert(line, percent, spent);
            }
        }
    }

    fn alert(self: &Arc<Self>, line: &Line, percent: u32, spent: i64) {
        bump(&self.counters.alerts);
        if let Some(counter) = self
            .alerts
            .iter()
            .position(|&threshold| threshold == percent)
            .and_then(|index| self.fired_by_threshold.get(index))
        {
            bump(counter);
        }
        let key_id = (line.scope == BudgetScope::Key).then(|| line.key.key_id.to_string());
        tracing::warn!(
            project = %line.key.project,
            key_id = key_id.as_deref().unwrap_or(""),
            scope = line.scope.as_str(),
            period = line.key.period.as_str(),
            period_start = %line.key.start,
            percent,
            spent_usd = %usd(spent),
            limit_usd = %usd(line.limit),
            "budget alert: {percent}% of the {} budget reached",
            line.key.period
        );
        let Some(url) = line.webhook.clone() else {
            return;
        };
        let payload = serde_json::json!({
            "type": "budget_alert",
            "project": &*line.key.project,
            "key_id": key_id,
            "scope": line.scope.as_str(),
            "period": line.key.period.as_str(),
            "period_start": line.key.start.to_string(),
            "threshold_percent": percent,
            "limit_usd": usd(line.limit).to_string(),
            "spent_usd": usd(spent).to_string(),
            "fired_at": OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        });
        let inner = self.clone();
        let project = line.key.project.clone();
        tokio::spawn(async move {
            let sent = inner.webhook.post(&*url).json(&payload).send().await;
            let problem = match sent {
                Ok(response) if response.status().is_success() => None,
                Ok(response) => Some(format!("status {}", response.status())),
                // Without the URL: a webhook URL often carries a token.
                Err(err) => Some(err.without_url().to_string()),
            };
            match problem {
                None => {
                    bump(&inner.counters.webhooks_sent);
                }
                Some(problem) => {
                    bump(&inner.counters.webhook_failures);
                    tracing::warn!(
                        project = %project,
                        percent,
                        problem,
                        "budget alert webhook failed"
                    );
                }
            }
        });
    }
}

/// An admitted request's hold on its budgets. Settle it with the real cost when the request
/// ends; dropped unsettled, it holds the budgets until `reservation_ttl_secs` passes.
#[must_use = "settle the reservation with the real cost, or it holds the budget until it expires"]
pub struct BudgetReservation {
    amount: i64,
    /// `None` when no budget applies.
    pending: Option<Pending>,
}

struct Pending {
    inner: Arc<Inner>,
    id: Uuid,
    lines: Vec<Line>,
    /// The backend holds the reservation (false: admitted by fail-open without one).
    backed: bool,
}

impl fmt::Debug for BudgetReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetReservation")
            .field("amount", &usd(self.amount))
            .field(
                "budgets",
                &self.pending.as_ref().map_or(0, |p| p.lines.len()),
            )
            .field("backed", &self.pending.as_ref().is_some_and(|p| p.backed))
            .finish()
    }
}

impl BudgetReservation {
    /// What was reserved, rounded up to the nano-USD.
    pub fn amount(&self) -> Decimal {
        usd(self.amount)
    }

    /// Whether any budget applies to the request.
    pub fn is_budgeted(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether the backend holds the reservation: false without a budget, and when the request
    /// was admitted by `fail-open` while the backend was down.
    pub fn is_backed(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.backed)
    }

    /// Replaces the reservation by `actual_cost`, which may exceed it (then spending goes over
    /// the reservation, and maybe over the limit). Fires the alerts this crosses.
    pub async fn settle(self, actual_cost: Decimal) {
        if let Some(pending) = self.pending {
            let inner = pending.inner.clone();
            inner
                .settle(pending, self.amount, cost_nanos(actual_cost))
                .await;
        }
    }

    /// [`BudgetReservation::settle`] in a spawned task, for places that cannot wait (such as
    /// `Drop`). Outside a tokio runtime the settlement is dropped (logged) and the reservation
    /// expires.
    pub fn settle_in_background(self, actual_cost: Decimal) {
        if self.pending.is_none() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(self.settle(actual_cost));
            }
            Err(_) => tracing::warn!(
                "budgets: no tokio runtime to settle in; the reservation will expire"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;
    use std::str::FromStr;
    use time::macros::date;

    #[test]
    fn periods_are_utc_days_and_calendar_months() {
        let day = date!(2026 - 12 - 31);
        assert_eq!(period_start(BudgetPeriod::Day, day), day);
        assert_eq!(period_end(BudgetPeriod::Day, day), date!(2027 - 01 - 01));
        let month = period_start(BudgetPeriod::Month, day);
        assert_eq!(month, date!(2026 - 12 - 01));
        assert_eq!(
            period_end(BudgetPeriod::Month, month),
            date!(2027 - 01 - 01)
        );
        assert_eq!(
            period_end(BudgetPeriod::Month, date!(2028 - 02 - 01)),
            date!(2028 - 03 - 01)
        );
    }

    #[test]
    fn amounts_round_towards_the_budget() {
        let d = |s| Decimal::from_str(s).unwrap();
        assert_eq!(cost_nanos(d("0.10")), 100_000_000);
        assert_eq!(cost_nanos(d("0.0000000001")), 1);
        assert_eq!(cost_nanos(d("-3")), 0);
        assert_eq!(cost_nanos(d("1e20")), MAX_NANOS);
        assert_eq!(usd(100_000_000), d("0.1"));
        assert_eq!(threshold_at(1000, 50), Some(500));
        assert_eq!(threshold_at(1001, 50), Some(501));
        assert_eq!(threshold_at(0, 50), None);
    }

    #[test]
    fn a_request_needs_room_even_when_unpriced() {
        assert!(fits(50, 40, 10, 100));
        assert!(!fits(50, 40, 11, 100));
        assert!(fits(50, 49, 0, 100));
        assert!(!fits(60, 40, 0, 100));
        assert!(!fits(0, 0, 0, 0));
        assert!(!fits(0, 0, 1, 0));
    }
}
