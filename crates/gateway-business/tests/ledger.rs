//! The ledger against real SQLite and Postgres: costs priced at record time down to the last
//! decimal, unpriced records, the spend views' exact sums, the price and project catalog, and
//! the finance queries of docs/billing.md.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

mod common;

use common::*;
use gateway_business::{
    Cost, KeyEntry, PriceConfig, PriceTable, ProjectEntry, UsageRecord, UsageRecorder, UsageStore,
    UsageWriter, WriterStats,
};
use rust_decimal::Decimal;
use sqlx::Row;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use time::macros::{date, datetime};
use uuid::Uuid;

const GRACE: Duration = Duration::from_secs(10);

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

fn price(provider: &str, model: &str, input: &str, output: &str) -> PriceConfig {
    PriceConfig {
        provider: provider.into(),
        model: model.into(),
        input_per_million: dec(input),
        output_per_million: dec(output),
        cached_input_per_million: None,
        cache_write_per_million: None,
        reasoning_per_million: None,
        currency: "USD".into(),
        effective_from: None,
    }
}

/// `openai/o-mini`: every bucket priced, and a price change on 2026-06-01 (UTC).
/// `anthropic/claude`: cache writes dearer than input, in euros.
fn prices() -> Vec<PriceConfig> {
    let mut may = price("openai", "o-mini", "1.10", "4.40");
    may.cached_input_per_million = Some(dec("0.275"));
    may.reasoning_per_million = Some(dec("5"));
    let mut june = price("openai", "o-mini", "1.00", "4.00");
    june.cached_input_per_million = Some(dec("0.25"));
    june.effective_from = Some(date!(2026 - 06 - 01));
    let mut claude = price("anthropic", "claude", "3", "15");
    claude.cached_input_per_million = Some(dec("0.30"));
    claude.cache_write_per_million = Some(dec("3.75"));
    claude.currency = "EUR".into();
    vec![may, june, claude]
}

struct Tokens {
    input: i64,
    cached: i64,
    cache_write: i64,
    output: i64,
    reasoning: i64,
}

fn usage_record(
    at: OffsetDateTime,
    provider: &str,
    model: &str,
    project: &str,
    tags: &str,
    tokens: &Tokens,
) -> UsageRecord {
    let mut record = record(Uuid::now_v7());
    record.created_at = at;
    record.provider = Some(provider.into());
    record.upstream_model = Some(model.into());
    record.project = Some(project.into());
    record.tags = tags.into();
    record.input_tokens = Some(tokens.input);
    record.cached_tokens = Some(tokens.cached);
    record.cache_write_tokens = Some(tokens.cache_write);
    record.output_tokens = Some(tokens.output);
    record.reasoning_tokens = Some(tokens.reasoning);
    record
}

fn no_usage(mut record: UsageRecord) -> UsageRecord {
    record.input_tokens = None;
    record.output_tokens = None;
    record.cached_tokens = None;
    record.cache_write_tokens = None;
    record.reasoning_tokens = None;
    record.usage_source = None;
    record
}

/// Prices every record with the recorder, spools it, and waits until the database has all.
async fn ship(
    recorder: &UsageRecorder,
    writer: &UsageWriter,
    records: &mut [UsageRecord],
) -> WriterStats {
    let before = writer.stats().written;
    for record in records.iter_mut() {
        recorder.price(record);
        assert!(recorder.record(record));
    }
    let expected = before + records.len() as u64;
    wait_for(writer, "records shipped", |s| {
        s.spool_open && s.spool_entries == 0 && s.written == expected
    })
    .await;
    writer.stats()
}

/// What a row of `usage_events` says about money.
#[derive(Debug, Clone, PartialEq)]
struct Money {
    cost: Option<Decimal>,
    cost_nanos: Option<i64>,
    currency: Option<String>,
    price_from: Option<Option<String>>,
}

async fn money(url: &str) -> HashMap<Uuid, Money> {
    let sql = if url.starts_with("sqlite:") {
        "SELECT e.request_id, e.cost, e.cost_nanos, e.currency, e.price_id, p.effective_from \
         FROM usage_events e LEFT JOIN prices p ON p.id = e.price_id"
    } else {
        "SELECT e.request_id::text, CAST(e.cost AS TEXT), e.cost_nanos, e.currency, e.price_id, \
         to_char(p.effective_from, 'YYYY-MM-DD') \
         FROM usage_events e LEFT JOIN prices p ON p.id = e.price_id"
    };
    let rows = fetch(url, sql, |row| {
        let id: String = row.0.get(0);
        let cost: Option<String> = row.0.get(1);
        let price_id: Option<i64> = row.0.get(4);
        (
            Uuid::parse_str(&id).unwrap(),
            Money {
                cost: cost.map(|text| dec(&text)),
                cost_nanos: row.0.get(2),
                currency: row.0.get(3),
                price_from: price_id.map(|_| row.0.get(5)),
            },
        )
    })
    .await;
    rows.into_iter().collect()
}

/// A row of either database, read by column index.
struct AnyRow<'a>(RowRef<'a>);

enum RowRef<'a> {
    Sqlite(&'a sqlx::sqlite::SqliteRow),
    Postgres(&'a sqlx::postgres::PgRow),
}

impl RowRef<'_> {
    fn get<T>(&self, index: usize) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Sqlite>
            + sqlx::Type<sqlx::Sqlite>
            + for<'r> sqlx::Decode<'r, sqlx::Postgres>
            + sqlx::Type<sqlx::Postgres>,
    {
        match self {
            Self::Sqlite(row) => row.try_get(index).unwrap(),
            Self::Postgres(row) => row.try_get(index).unwrap(),
        }
    }
}

async fn fetch<T>(url: &str, sql: &str, map: impl Fn(AnyRow<'_>) -> T) -> Vec<T> {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        let rows = sqlx::query(sql).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows.iter()
            .map(|row| map(AnyRow(RowRef::Sqlite(row))))
            .collect()
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let rows = sqlx::query(sql).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows.iter()
            .map(|row| map(AnyRow(RowRef::Postgres(row))))
            .collect()
    }
}

fn is_sqlite(url: &str) -> bool {
    url.starts_with("sqlite:")
}

// ---------------------------------------------------------------------------------------------

/// Known usage at known prices, worked out by hand: every bucket, and the two sides of the
/// price change at midnight UTC.
async fn costs_are_exact(url: &str) {
    let spool = tempfile::tempdir().unwrap();
    let (recorder, writer) = UsageWriter::spawn(config(url, spool.path()));
    recorder.set_prices(Arc::new(PriceTable::build(&prices()).unwrap()));
    let tokens = Tokens {
        input: 12_345,
        cached: 2_000,
        cache_write: 0,
        output: 6_789,
        reasoning: 1_000,
    };
    let tags = r#"{"team":"search"}"#;
    // The last nanosecond of May in UTC, written in another offset: still May's price.
    let may = datetime!(2026-06-01 01:59:59.999_999_999 +02:00);
    let june = datetime!(2026-06-01 00:00:00 UTC);
    let mut records = vec![
        usage_record(may, "openai", "o-mini", "p", tags, &tokens),
        usage_record(june, "openai", "o-mini", "p", tags, &tokens),
        usage_record(
            june,
            "anthropic",
            "claude",
            "p",
            tags,
            &Tokens {
                input: 10_000,
                cached: 6_000,
                cache_write: 1_500,
                output: 700,
                reasoning: 0,
            },
        ),
    ];
    // An estimate is priced like a vendor count.
    records[1].usage_source = Some(Cow::Borrowed("estimate"));
    let stats = ship(&recorder, &writer, &mut records).await;
    assert_eq!(stats.unpriced, 0, "{stats:?}");
    writer.shutdown(GRACE).await;

    // May: (10345*1.10 + 2000*0.275 + 5789*4.40 + 1000*5) / 1e6
    //    = (11379.5 + 550 + 25471.6 + 5000) / 1e6 = 0.0424011
    // June: (10345*1.00 + 2000*0.25 + 5789*4.00 + 1000*4.00) / 1e6 = 0.038001
    // Claude: (2500*3 + 6000*0.30 + 1500*3.75 + 700*15) / 1e6 = 0.025425
    let expected = [
        (dec("0.0424011"), 42_401_100, "USD", None),
        (dec("0.038001"), 38_001_000, "USD", Some("2026-06-01")),
        (dec("0.025425"), 25_425_000, "EUR", None),
    ];
    let rows = money(url).await;
    for (record, (cost, nanos, currency, from)) in records.iter().zip(expected) {
        assert_eq!(record.cost.as_ref().map(Cost::amount), Some(cost));
        let row = &rows[&record.request_id];
        assert_eq!(
            row,
            &Money {
                cost: Some(cost),
                cost_nanos: Some(nanos),
                currency: Some(currency.into()),
                price_from: Some(from.map(str::to_owned)),
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costs_are_exact_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    costs_are_exact(&sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costs_are_exact_in_postgres() {
    costs_are_exact(&fresh_postgres_database().await).await;
}

/// Usage without a price has a NULL cost and is counted; a request without usage has a NULL
/// cost and is not.
async fn unpriced_records_are_null_and_counted(url: &str) {
    let spool = tempfile::tempdir().unwrap();
    let (recorder, writer) = UsageWriter::spawn(config(url, spool.path()));
    recorder.set_prices(Arc::new(PriceTable::build(&prices()).unwrap()));
    let at = datetime!(2026-05-10 12:00 UTC);
    let tokens = Tokens {
        input: 100,
        cached: 0,
        cache_write: 0,
        output: 10,
        reasoning: 0,
    };
    let mut records = vec![
        usage_record(at, "openai", "unknown-model", "p", "{}", &tokens),
        usage_record(at, "openai", "unknown-model", "p", "{}", &tokens),
        no_usage(usage_record(at, "openai", "o-mini", "p", "{}", &tokens)),
        usage_record(at, "openai", "o-mini", "p", "{}", &tokens),
    ];
    let stats = ship(&recorder, &writer, &mut records).await;
    assert_eq!(stats.unpriced, 2, "{stats:?}");
    writer.shutdown(GRACE).await;

    let rows = money(url).await;
    let unknown = Money {
        cost: None,
        cost_nanos: None,
        currency: None,
        price_from: None,
    };
    for record in &records[..3] {
        assert!(record.cost.is_none());
        assert_eq!(rows[&record.request_id], unknown);
    }
    assert_eq!(rows[&records[3].request_id].cost, Some(dec("0.000154")));

    let lines = spend(url, "spend_daily").await;
    let unpriced: Vec<_> = lines.iter().filter(|l| l.currency.is_none()).collect();
    assert_eq!(unpriced.len(), 2, "{lines:?}");
    assert!(unpriced.iter().all(|l| l.cost.is_none()));
    let count = |model: &str| {
        lines
            .iter()
            .find(|l| l.model.as_deref() == Some(model) && l.currency.is_none())
            .map(|l| (l.requests, l.unpriced_requests))
    };
    assert_eq!(count("unknown-model"), Some((2, 2)));
    assert_eq!(count("o-mini"), Some((1, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpriced_records_are_null_and_counted_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    unpriced_records_are_null_and_counted(&sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpriced_records_are_null_and_counted_in_postgres() {
    unpriced_records_are_null_and_counted(&fresh_postgres_database().await).await;
}

/// One line of `spend_daily` or `spend_monthly`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Line {
    period: String,
    project: Option<String>,
    team: Option<String>,
    business_line: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    alias: Option<String>,
    currency: Option<String>,
    requests: i64,
    input_tokens: i64,
    output_tokens: i64,
    cached_tokens: i64,
    reasoning_tokens: i64,
    cost: Option<Decimal>,
    unpriced_requests: i64,
}

async fn spend(url: &str, view: &str) -> Vec<Line> {
    let period = if view == "spend_daily" {
        "day"
    } else {
        "month"
    };
    let (period, cost) = if is_sqlite(url) {
        (period.to_owned(), "cost".to_owned())
    } else {
        (
            format!("to_char({period}, 'YYYY-MM-DD')"),
            "CAST(cost AS TEXT)".to_owned(),
        )
    };
    let sql = format!(
        "SELECT {period}, project, team, business_line, provider, model, alias, currency, \
         requests, input_tokens, output_tokens, cached_tokens, reasoning_tokens, {cost}, \
         unpriced_requests FROM {view}"
    );
    let mut lines = fetch(url, &sql, |row| {
        let row = row.0;
        let cost: Option<String> = row.get(13);
        Line {
            period: row.get(0),
            project: row.get(1),
            team: row.get(2),
            business_line: row.get(3),
            provider: row.get(4),
            model: row.get(5),
            alias: row.get(6),
            currency: row.get(7),
            requests: row.get(8),
            input_tokens: row.get(9),
            output_tokens: row.get(10),
            cached_tokens: row.get(11),
            reasoning_tokens: row.get(12),
            cost: cost.map(|text| dec(&text)),
            unpriced_requests: row.get(14),
        }
    })
    .await;
    lines.sort();
    lines
}

/// The lines the views should show, summed here with decimals: Postgres sums the exact costs,
/// SQLite the costs rounded to 1e-9.
fn expected_lines(records: &[UsageRecord], monthly: bool, nanos: bool) -> Vec<Line> {
    let mut lines: BTreeMap<Vec<Option<String>>, Line> = BTreeMap::new();
    for record in records {
        let day = record.created_at.to_offset(time::UtcOffset::UTC).date();
        let period = if monthly {
            day.replace_day(1).unwrap()
        } else {
            day
        };
        let tags: serde_json::Value = serde_json::from_str(&record.tags).unwrap();
        let tag = |name: &str| tags.get(name).and_then(|v| v.as_str()).map(str::to_owned);
        let currency = record.cost.as_ref().map(|c| c.currency().to_owned());
        let line = Line {
            period: period.to_string(),
            project: record.project.as_deref().map(str::to_owned),
            team: tag("team"),
            business_line: tag("business_line"),
            provider: record.provider.as_deref().map(str::to_owned),
            model: record.upstream_model.as_deref().map(str::to_owned),
            alias: record.alias.as_deref().map(str::to_owned),
            currency,
            requests: 0,
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost: None,
            unpriced_requests: 0,
        };
        let key = vec![
            Some(line.period.clone()),
            line.project.clone(),
            line.team.clone(),
            line.business_line.clone(),
            line.provider.clone(),
            line.model.clone(),
            line.alias.clone(),
            line.currency.clone(),
        ];
        let line = lines.entry(key).or_insert(line);
        line.requests += 1;
        line.input_tokens += record.input_tokens.unwrap_or(0);
        line.output_tokens += record.output_tokens.unwrap_or(0);
        line.cached_tokens += record.cached_tokens.unwrap_or(0);
        line.reasoning_tokens += record.reasoning_tokens.unwrap_or(0);
        if let Some(cost) = &record.cost {
            let amount = if nanos {
                Decimal::new(cost.nanos(), 9)
            } else {
                cost.amount()
            };
            line.cost = Some(line.cost.unwrap_or_default() + amount);
        } else if record.has_usage() {
            line.unpriced_requests += 1;
        }
    }
    let mut lines: Vec<Line> = lines.into_values().collect();
    lines.sort();
    lines
}

/// Many records across days, months, projects, tags and prices whose costs have more decimals
/// than a nano-unit: each view line equals the decimal sum, to the last place.
async fn spend_views_sum_exactly(url: &str) {
    let spool = tempfile::tempdir().unwrap();
    let (recorder, writer) = UsageWriter::spawn(config(url, spool.path()));
    let mut table = prices();
    // 1 token here costs 3.75e-8: ten decimals, below the nano-unit.
    let mut cheap = price("local", "tiny", "0.0375", "0.0625");
    cheap.cached_input_per_million = Some(dec("0.00375"));
    table.push(cheap);
    recorder.set_prices(Arc::new(PriceTable::build(&table).unwrap()));

    let targets = [
        ("openai", "o-mini"),
        ("anthropic", "claude"),
        ("local", "tiny"),
        ("local", "unpriced"),
    ];
    let projects = [
        ("search", r#"{"team":"search","business_line":"consumer"}"#),
        ("ads", r#"{"team":"ads","business_line":"b2b"}"#),
        ("misc", "{}"),
    ];
    let start = datetime!(2026-05-30 22:00 UTC);
    let mut records = Vec::new();
    for i in 0..240i64 {
        let (provider, model) = targets[(i % 4) as usize];
        let (project, tags) = projects[(i % 3) as usize];
        // Every 7 hours, so the records cross day and month boundaries (May into June, July).
        let at = start + time::Duration::hours(7 * i) + time::Duration::nanoseconds(i * 1_013);
        let tokens = Tokens {
            input: 1 + i * 37 % 5_003,
            cached: i * 11 % 400,
            cache_write: if provider == "anthropic" { i % 90 } else { 0 },
            output: 3 + i * 53 % 2_011,
            reasoning: i * 5 % 300,
        };
        let mut record = usage_record(at, provider, model, project, tags, &tokens);
        record.alias = Some(if i % 5 == 0 { "fast" } else { "chat" }.into());
        if i % 17 == 0 {
            record = no_usage(record);
        }
        records.push(record);
    }
    ship(&recorder, &writer, &mut records).await;
    writer.shutdown(GRACE).await;

    let nanos = is_sqlite(url);
    for (view, monthly) in [("spend_daily", false), ("spend_monthly", true)] {
        let lines = spend(url, view).await;
        let expected = expected_lines(&records, monthly, nanos);
        assert_eq!(lines.len(), expected.len(), "{view}");
        for (line, expected) in lines.iter().zip(&expected) {
            assert_eq!(line, expected, "{view}");
        }
        let months: std::collections::BTreeSet<&str> =
            lines.iter().map(|l| &l.period[..7]).collect();
        assert_eq!(months.len(), 4, "{view}: {months:?}");
    }
    // Some costs really have digits below the nano-unit, so the two sums are different tests.
    assert!(records.iter().any(|r| {
        r.cost
            .as_ref()
            .is_some_and(|c| c.amount() != Decimal::new(c.nanos(), 9))
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_views_sum_exactly_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    spend_views_sum_exactly(&sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_views_sum_exactly_in_postgres() {
    spend_views_sum_exactly(&fresh_postgres_database().await).await;
}

/// Syncing the same prices twice adds nothing; a changed price adds a row and closes the one
/// it replaces; a later-dated price closes the earlier one on its first day.
async fn price_sync_keeps_history(url: &str) {
    let store = UsageStore::connect(&config(url, std::path::Path::new("unused")))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let today = OffsetDateTime::now_utc().date();
    let mut config = prices();
    let first = store.sync_prices(&config).await.unwrap();
    assert_eq!(
        (first.added, first.updated),
        (3, 1),
        "May's row closes at June"
    );
    let again = store.sync_prices(&config).await.unwrap();
    assert_eq!((again.added, again.updated), (0, 0));
    // The same amounts written differently are the same price.
    config[2].cached_input_per_million = Some(dec("0.3000"));
    let same = store.sync_prices(&config).await.unwrap();
    assert_eq!((same.added, same.updated), (0, 0));
    let rows = store.stored_prices().await.unwrap();
    let window = |rows: &[gateway_business::StoredPrice], id: i64| {
        let row = rows.iter().find(|r| r.id == id).unwrap();
        (row.price.effective_from, row.effective_to)
    };
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(window(&rows, ids[0]), (None, Some(date!(2026 - 06 - 01))));
    assert_eq!(window(&rows, ids[1]), (Some(date!(2026 - 06 - 01)), None));

    // Claude's price changes: a new row, and the old one priced requests until today.
    config[2].output_per_million = dec("16");
    let changed = store.sync_prices(&config).await.unwrap();
    assert_eq!((changed.added, changed.updated), (1, 1));
    // A price from September for o-mini: June's row now ends there.
    let mut september = config[1].clone();
    september.input_per_million = dec("0.9");
    september.effective_from = Some(date!(2026 - 09 - 01));
    config.push(september);
    let later = store.sync_prices(&config).await.unwrap();
    assert_eq!((later.added, later.updated), (1, 1));
    assert_eq!(store.sync_prices(&config).await.unwrap().added, 0);

    let rows = store.stored_prices().await.unwrap();
    assert_eq!(rows.len(), 5);
    let old_claude = rows.iter().find(|r| r.id == ids[2]).unwrap();
    assert_eq!(
        old_claude.price.output_per_million,
        dec("15"),
        "never edited"
    );
    assert_eq!(old_claude.effective_to, Some(today));
    let new_claude = rows
        .iter()
        .find(|r| r.price.provider == "anthropic" && r.id != ids[2])
        .unwrap();
    assert_eq!(
        (new_claude.price.output_per_million, new_claude.effective_to),
        (dec("16"), None)
    );
    assert_eq!(
        window(&rows, ids[1]),
        (Some(date!(2026 - 06 - 01)), Some(date!(2026 - 09 - 01)))
    );
    assert_eq!(
        window(&rows, ids[0]),
        (None, Some(date!(2026 - 06 - 01))),
        "untouched"
    );

    // A record priced by a row the database never saw (spooled under an older config) brings
    // its row along, so price_id is set whenever cost is.
    let mut old = price("openai", "o-mini", "2", "8");
    old.effective_from = Some(date!(2025 - 01 - 01));
    let mut record = usage_record(
        datetime!(2025-03-01 00:00 UTC),
        "openai",
        "o-mini",
        "p",
        "{}",
        &Tokens {
            input: 1_000_000,
            cached: 0,
            cache_write: 0,
            output: 0,
            reasoning: 0,
        },
    );
    record.cost = Cost::new(dec("2"), Arc::new(old.clone()));
    assert_eq!(store.insert(&[record.clone()]).await.unwrap(), 1);
    let rows = store.stored_prices().await.unwrap();
    let brought = rows.iter().find(|r| r.price == old).unwrap();
    assert_eq!(brought.effective_to, None);
    // The next sync closes it: it is not in the config.
    let closing = store.sync_prices(&config).await.unwrap();
    assert_eq!((closing.added, closing.updated), (0, 1));
    let money = money(url).await;
    assert_eq!(money[&record.request_id].cost, Some(dec("2")));
    assert_eq!(
        money[&record.request_id].price_from,
        Some(Some("2025-01-01".into()))
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_sync_keeps_history_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    price_sync_keeps_history(&sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_sync_keeps_history_in_postgres() {
    price_sync_keeps_history(&fresh_postgres_database().await).await;
}

/// The writer syncs what the recorder is handed, in the background: prices and projects at
/// start, again after a reload, and never a key itself.
async fn writer_syncs_the_catalog(url: &str) {
    let spool = tempfile::tempdir().unwrap();
    let (recorder, writer) = UsageWriter::spawn(config(url, spool.path()));
    let project = |tags: &str, hash: &str| ProjectEntry {
        name: "search".into(),
        tags_json: tags.into(),
        keys: vec![KeyEntry {
            key_id: "ci".into(),
            sha256: hash.into(),
        }],
    };
    recorder.set_projects(vec![project(r#"{"team":"search"}"#, &"AB".repeat(32))]);
    recorder.set_prices(Arc::new(PriceTable::build(&prices()).unwrap()));
    // The database appears (and is migrated) in the background: until then, no rows.
    let count = || async move {
        let sql = "SELECT COUNT(*) FROM prices";
        let count: Result<i64, sqlx::Error> = if is_sqlite(url) {
            match sqlx::SqlitePool::connect(url).await {
                Ok(pool) => {
                    let count = sqlx::query_scalar(sql).fetch_one(&pool).await;
                    pool.close().await;
                    count
                }
                Err(err) => Err(err),
            }
        } else {
            match sqlx::PgPool::connect(url).await {
                Ok(pool) => {
                    let count = sqlx::query_scalar(sql).fetch_one(&pool).await;
                    pool.close().await;
                    count
                }
                Err(err) => Err(err),
            }
        };
        count.unwrap_or(0)
    };
    wait_until("prices synced", || async { count().await == 3 }).await;

    recorder.set_projects(vec![project(
        r#"{"team":"search","business_line":"consumer"}"#,
        &"cd".repeat(32),
    )]);
    let mut reloaded = prices();
    reloaded[0].output_per_million = dec("4.5");
    recorder.set_prices(Arc::new(PriceTable::build(&reloaded).unwrap()));
    wait_until("reloaded prices synced", || async { count().await == 4 }).await;
    writer.shutdown(GRACE).await;

    let tags_sql = if is_sqlite(url) {
        "SELECT json_extract(tags, '$.business_line') FROM projects"
    } else {
        "SELECT tags ->> 'business_line' FROM projects"
    };
    let tags = fetch(url, tags_sql, |row| row.0.get::<Option<String>>(0)).await;
    assert_eq!(tags, [Some("consumer".to_owned())]);
    let keys = fetch(
        url,
        "SELECT project, key_id, sha256, created_by FROM api_keys",
        |row| {
            (
                row.0.get::<String>(0),
                row.0.get::<String>(1),
                row.0.get::<String>(2),
                row.0.get::<Option<String>>(3),
            )
        },
    )
    .await;
    assert_eq!(
        keys,
        [(
            "search".to_owned(),
            "ci".to_owned(),
            "cd".repeat(32),
            Some("config".to_owned())
        )]
    );
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, done: impl Fn() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_syncs_the_catalog_to_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    writer_syncs_the_catalog(&sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_syncs_the_catalog_to_postgres() {
    writer_syncs_the_catalog(&fresh_postgres_database().await).await;
}

/// Every `sql` block of docs/billing.md runs on Postgres against a ledger with data in it,
/// and returns rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finance_queries_in_the_docs_run_on_postgres() {
    let url = fresh_postgres_database().await;
    let spool = tempfile::tempdir().unwrap();
    let (recorder, writer) = UsageWriter::spawn(config(&url, spool.path()));
    recorder.set_prices(Arc::new(PriceTable::build(&prices()).unwrap()));
    // The docs ask about "this month" and about a named project and month (2026-05).
    let now = OffsetDateTime::now_utc();
    let mut records = Vec::new();
    for (i, at) in [now, datetime!(2026-05-20 10:00 UTC)]
        .into_iter()
        .enumerate()
    {
        for (model, provider) in [("o-mini", "openai"), ("claude", "anthropic"), ("x", "y")] {
            let mut record = usage_record(
                at,
                provider,
                model,
                "search",
                r#"{"team":"search","business_line":"consumer"}"#,
                &Tokens {
                    input: 1_000,
                    cached: 100,
                    cache_write: 0,
                    output: 200,
                    reasoning: 0,
                },
            );
            if i == 1 {
                record.usage_source = Some(Cow::Borrowed("estimate"));
            }
            records.push(record);
        }
    }
    ship(&recorder, &writer, &mut records).await;
    writer.shutdown(GRACE).await;

    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/billing.md"
    ))
    .unwrap();
    let queries: Vec<&str> = docs
        .split("```sql\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap())
        .collect();
    assert!(queries.len() >= 6, "{}", queries.len());
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    for query in queries {
        let rows = sqlx::query(query)
            .fetch_all(&pool)
            .await
            .unwrap_or_else(|err| panic!("{err}\n{query}"));
        assert!(!rows.is_empty(), "no rows from\n{query}");
    }
    pool.close().await;
}
