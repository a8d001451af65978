//! Reports, invoices and reconciliation against real SQLite and Postgres: a known set of
//! usage rows, and the exact sums each output must show.
//!
//! The `spend_daily` / `spend_monthly` views are made here from a minimal `usage_events`, to
//! the contract of migration 0003 (same names, columns and types); the real migration
//! replaces this setup once both are merged.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

mod common;

use gateway_business::reconcile::{self, Detection, ReconcileQuery, Vendor};
use gateway_business::report::{self, Dimension, Format, InvoiceQuery, ReportQuery};
use gateway_business::{DatabaseConfig, UsageStore};
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::BTreeMap;
use std::str::FromStr;
use time::macros::date;

/// Ledger rows, one a line: time, project, team, business line, provider, model, alias,
/// input, output, cached and reasoning tokens (`-`: a failed request, no usage), currency and
/// cost (`-`: not priced).
///
/// November 2026 of two projects, with a row just outside on each side, a failed request, an
/// unpriced one and one priced in another currency.
const SPEND: &str = "
2026-11-01T10:00:00Z alpha red  retail    openai    gpt-4o        chat 1000 200  100 0  USD 0.012500000
2026-11-01T11:00:00Z alpha red  retail    openai    gpt-4o        chat 2000 300  0   0  USD 0.020000000
2026-11-02T09:00:00Z alpha red  retail    anthropic claude-sonnet chat 500  50   0   0  USD 0.003000001
2026-11-02T12:00:00Z beta  blue wholesale openai    gpt-4o-mini   fast 4000 1000 0   10 USD 0.000900000
2026-11-03T00:00:00Z beta  blue wholesale openai    gpt-4o        chat 100  10   0   0  -   -
2026-11-03T01:00:00Z beta  blue wholesale openai    gpt-4o        chat -    -    -   -  -   -
2026-11-30T23:59:59Z alpha red  retail    openai    gpt-4o        chat 300  30   0   0  EUR 0.005
2026-10-31T23:59:59Z alpha red  retail    openai    gpt-4o        chat 7    7    0   0  USD 7
2026-12-01T00:00:00Z alpha red  retail    openai    gpt-4o        chat 9    9    0   0  USD 9
";

/// What two vendors' exports are reconciled against (see the fixtures below); the last row is
/// outside the exports' days, so not reconciled.
const LEDGER: &str = "
2026-11-01T08:00:00Z alpha red  retail    openai    gpt-4o          chat   1000  200  0   0 USD 0.0125
2026-11-01T20:00:00Z beta  blue wholesale openai    gpt-4o          chat   2000  300  0   0 USD 0.02
2026-11-01T09:00:00Z alpha red  retail    openai    gpt-4o-mini     fast   10000 2000 0   0 USD 0.0027
2026-11-02T09:00:00Z alpha red  retail    openai    gpt-4o          chat   5000  1000 0   0 USD 0.0225
2026-11-02T10:00:00Z beta  blue wholesale openai    gpt-4o-mini     fast   800   100  0   0 USD 0.00018
2026-11-01T09:00:00Z alpha red  retail    anthropic claude-sonnet-4 claude 1200  300  200 0 USD 0.0081
2026-11-02T09:00:00Z alpha red  retail    anthropic claude-sonnet-4 claude 2000  400  0   0 USD 0.012
2026-11-02T11:00:00Z beta  blue wholesale anthropic claude-haiku    small  1000  100  0   0 USD 0.0012
2026-11-05T11:00:00Z beta  blue wholesale anthropic claude-haiku    small  1     1    0   0 USD 1
";

/// One request of the ledger.
struct Usage<'a> {
    at: &'a str,
    project: &'a str,
    team: &'a str,
    business_line: &'a str,
    provider: &'a str,
    model: &'a str,
    alias: &'a str,
    tokens: [Option<i64>; 4],
    currency: Option<&'a str>,
    cost: Option<&'a str>,
}

fn rows(table: &str) -> Vec<Usage<'_>> {
    table
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            let optional = |index: usize| Some(cells[index]).filter(|cell| *cell != "-");
            Usage {
                at: cells[0],
                project: cells[1],
                team: cells[2],
                business_line: cells[3],
                provider: cells[4],
                model: cells[5],
                alias: cells[6],
                tokens: [7, 8, 9, 10].map(|index| optional(index).map(|n| n.parse().unwrap())),
                currency: optional(11),
                cost: optional(12),
            }
        })
        .collect()
}

/// OpenAI's usage export (Usage API columns): tokens, no cost. Two projects on one day and
/// model are added up.
const OPENAI_USAGE: &str = "\
start_time,end_time,start_time_iso,end_time_iso,project_id,num_model_requests,input_tokens,output_tokens,input_cached_tokens,input_audio_tokens,output_audio_tokens,model,batch
1793491200,1793577600,2026-11-01T00:00:00+00:00,2026-11-02T00:00:00+00:00,proj_a,1,1000,200,0,0,0,gpt-4o,false
1793491200,1793577600,2026-11-01T00:00:00+00:00,2026-11-02T00:00:00+00:00,proj_b,1,2000,300,0,0,0,gpt-4o,false
1793491200,1793577600,2026-11-01T00:00:00+00:00,2026-11-02T00:00:00+00:00,proj_a,1,10050,2000,0,0,0,gpt-4o-mini,false
1793577600,1793664000,2026-11-02T00:00:00+00:00,2026-11-03T00:00:00+00:00,proj_a,1,5000,1100,0,0,0,gpt-4o,false
1793577600,1793664000,2026-11-02T00:00:00+00:00,2026-11-03T00:00:00+00:00,proj_b,1,800,100,0,0,0,gpt-4o-mini,false
1793664000,1793750400,2026-11-03T00:00:00+00:00,2026-11-04T00:00:00+00:00,proj_b,1,10,5,0,0,0,gpt-4o-mini,false
";

/// OpenAI's cost export (Costs API columns): amounts per line item, no tokens.
const OPENAI_COSTS: &str = "\
start_time_iso,end_time_iso,amount.value,amount.currency,line_item,project_id
2026-11-01T00:00:00Z,2026-11-02T00:00:00Z,0.0075,usd,\"gpt-4o, input\",proj_a
2026-11-01T00:00:00Z,2026-11-02T00:00:00Z,0.025,usd,\"gpt-4o, output\",proj_a
2026-11-01T00:00:00Z,2026-11-02T00:00:00Z,0.0027,usd,\"gpt-4o-mini, input\",proj_a
2026-11-02T00:00:00Z,2026-11-03T00:00:00Z,0.0225,usd,\"gpt-4o, input\",proj_a
2026-11-02T00:00:00Z,2026-11-03T00:00:00Z,0.00019,usd,\"gpt-4o-mini, input\",proj_b
2026-11-03T00:00:00Z,2026-11-04T00:00:00Z,0.00001,usd,\"gpt-4o-mini, output\",proj_b
";

/// Anthropic's console export: cache reads and writes apart from input, a total line.
const ANTHROPIC_EXPORT: &str = "\
Date,Model,Workspace,API Key,Input Tokens (No Cache),Cache Read Tokens,Cache Write Tokens,Output Tokens,Cost (USD)
2026-11-01,claude-sonnet-4,Default,key-1,900,200,100,300,0.0081
2026-11-02,claude-sonnet-4,Default,key-1,2010,0,0,400,0.012
2026-11-02,claude-haiku,Default,key-1,1000,0,0,100,0.0015
Total,,,,3910,200,100,800,0.0216
";

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

/// The views of migration 0003, over this file's minimal `usage_events`.
fn sqlite_setup() -> String {
    let view = |name: &str, period: &str| {
        format!(
            "CREATE VIEW {name} AS SELECT {period}, project, \
             json_extract(tags, '$.team') AS team, \
             json_extract(tags, '$.business_line') AS business_line, \
             provider, upstream_model AS model, alias, currency, \
             COUNT(*) AS requests, \
             COALESCE(SUM(input_tokens), 0) AS input_tokens, \
             COALESCE(SUM(output_tokens), 0) AS output_tokens, \
             COALESCE(SUM(cached_tokens), 0) AS cached_tokens, \
             COALESCE(SUM(reasoning_tokens), 0) AS reasoning_tokens, \
             CASE WHEN COUNT(cost_nanos) = 0 THEN NULL ELSE \
               printf('%d.%09d', SUM(cost_nanos) / 1000000000, SUM(cost_nanos) % 1000000000) \
             END AS cost, \
             SUM(CASE WHEN input_tokens IS NOT NULL AND cost_nanos IS NULL THEN 1 ELSE 0 END) \
               AS unpriced_requests \
             FROM usage_events GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;"
        )
    };
    format!(
        "CREATE TABLE usage_events (request_id INTEGER PRIMARY KEY, created_at TEXT NOT NULL, \
         project TEXT, tags TEXT NOT NULL DEFAULT '{{}}', alias TEXT, provider TEXT, \
         upstream_model TEXT, input_tokens INTEGER, output_tokens INTEGER, \
         cached_tokens INTEGER, reasoning_tokens INTEGER, currency TEXT, cost TEXT, \
         cost_nanos INTEGER);\n{}\n{}",
        view("spend_daily", "substr(created_at, 1, 10) AS day"),
        view(
            "spend_monthly",
            "substr(created_at, 1, 7) || '-01' AS month"
        ),
    )
}

fn postgres_setup() -> String {
    let view = |name: &str, period: &str| {
        format!(
            "CREATE VIEW {name} AS SELECT {period}, project, tags->>'team' AS team, \
             tags->>'business_line' AS business_line, provider, upstream_model AS model, \
             alias, currency, COUNT(*)::bigint AS requests, \
             COALESCE(SUM(input_tokens), 0)::bigint AS input_tokens, \
             COALESCE(SUM(output_tokens), 0)::bigint AS output_tokens, \
             COALESCE(SUM(cached_tokens), 0)::bigint AS cached_tokens, \
             COALESCE(SUM(reasoning_tokens), 0)::bigint AS reasoning_tokens, \
             SUM(cost) AS cost, \
             COUNT(*) FILTER (WHERE input_tokens IS NOT NULL AND cost IS NULL)::bigint \
               AS unpriced_requests \
             FROM usage_events GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;"
        )
    };
    format!(
        "CREATE TABLE usage_events (request_id BIGSERIAL PRIMARY KEY, \
         created_at TIMESTAMPTZ NOT NULL, project TEXT, tags JSONB NOT NULL DEFAULT '{{}}', \
         alias TEXT, provider TEXT, upstream_model TEXT, input_tokens BIGINT, \
         output_tokens BIGINT, cached_tokens BIGINT, reasoning_tokens BIGINT, currency TEXT, \
         cost NUMERIC);\n{}\n{}",
        view(
            "spend_daily",
            "(created_at AT TIME ZONE 'UTC')::date AS day"
        ),
        view(
            "spend_monthly",
            "date_trunc('month', created_at AT TIME ZONE 'UTC')::date AS month"
        ),
    )
}

fn tags(row: &Usage) -> String {
    serde_json::json!({"team": row.team, "business_line": row.business_line}).to_string()
}

async fn fill(store: &UsageStore, table: &str) {
    let rows = rows(table);
    match store {
        UsageStore::Sqlite(pool) => {
            sqlx::raw_sql(&sqlite_setup()).execute(pool).await.unwrap();
            for row in &rows {
                let tokens = row.tokens;
                let nanos = row.cost.map(|amount| {
                    i64::try_from(dec(amount) * Decimal::from(1_000_000_000)).unwrap()
                });
                sqlx::query(
                    "INSERT INTO usage_events (created_at, project, tags, provider, \
                     upstream_model, alias, input_tokens, output_tokens, cached_tokens, \
                     reasoning_tokens, currency, cost, cost_nanos) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(row.at)
                .bind(row.project)
                .bind(tags(row))
                .bind(row.provider)
                .bind(row.model)
                .bind(row.alias)
                .bind(tokens[0])
                .bind(tokens[1])
                .bind(tokens[2])
                .bind(tokens[3])
                .bind(row.currency)
                .bind(row.cost)
                .bind(nanos)
                .execute(pool)
                .await
                .unwrap();
            }
        }
        UsageStore::Postgres(pool) => {
            sqlx::raw_sql(&postgres_setup())
                .execute(pool)
                .await
                .unwrap();
            for row in &rows {
                let tokens = row.tokens;
                sqlx::query(
                    "INSERT INTO usage_events (created_at, project, tags, provider, \
                     upstream_model, alias, input_tokens, output_tokens, cached_tokens, \
                     reasoning_tokens, currency, cost) \
                     VALUES ($1::timestamptz, $2, $3::jsonb, $4, $5, $6, $7, $8, $9, $10, $11, \
                     $12::numeric)",
                )
                .bind(row.at)
                .bind(row.project)
                .bind(tags(row))
                .bind(row.provider)
                .bind(row.model)
                .bind(row.alias)
                .bind(tokens[0])
                .bind(tokens[1])
                .bind(tokens[2])
                .bind(tokens[3])
                .bind(row.currency)
                .bind(row.cost)
                .execute(pool)
                .await
                .unwrap();
            }
        }
    }
}

async fn connect(url: String) -> UsageStore {
    UsageStore::connect(&DatabaseConfig {
        url,
        ..DatabaseConfig::default()
    })
    .await
    .unwrap()
}

async fn sqlite(rows: &str) -> (UsageStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = connect(common::sqlite_url(dir.path())).await;
    fill(&store, rows).await;
    (store, dir)
}

async fn postgres(rows: &str) -> UsageStore {
    let store = connect(common::fresh_postgres_database().await).await;
    fill(&store, rows).await;
    store
}

fn csv_records(text: &str) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes())
        .records()
        .map(|record| record.unwrap().iter().map(str::to_owned).collect())
        .collect()
}

const COUNTS: [&str; 5] = [
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
];

/// Checks a report in all three formats against `expected`: its CSV after the header (the
/// last record the total), the key columns then the counts, cost in EUR and in USD, unpriced.
async fn check_report(store: &UsageStore, group_by: &[Dimension], expected: &str) {
    let expected = csv_records(expected);
    let query = ReportQuery {
        from: date!(2026 - 11 - 01),
        to: date!(2026 - 11 - 30),
        group_by: group_by.to_vec(),
    };
    let report = report::report(store, &query).await.unwrap();
    let keys = group_by.len();
    let mut header: Vec<&str> = group_by.iter().map(|d| d.name()).collect();
    header.extend(COUNTS);
    header.extend(["cost_EUR", "cost_USD", "unpriced_requests"]);

    // CSV: exactly the expected records.
    let csv = csv_records(&report.render(Format::Csv).unwrap());
    assert_eq!(csv[0], header);
    assert_eq!(csv[1..], expected[..], "{csv:?}");

    // JSON: the same numbers, amounts as exact decimals.
    let json: Value = serde_json::from_str(&report.render(Format::Json).unwrap()).unwrap();
    assert_eq!(json["from"], "2026-11-01");
    assert_eq!(json["currencies"], serde_json::json!(["EUR", "USD"]));
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len() + 1, expected.len());
    for (object, record) in rows.iter().chain([&json["total"]]).zip(&expected) {
        for (index, dim) in group_by.iter().enumerate() {
            if record[0] != "TOTAL" {
                assert_eq!(object[dim.name()].as_str().unwrap_or(""), record[index]);
            }
        }
        for (offset, name) in COUNTS.into_iter().enumerate() {
            assert_eq!(
                object[name].as_i64().unwrap().to_string(),
                record[keys + offset],
                "{name} of {object}"
            );
        }
        let cost: BTreeMap<String, Decimal> = object["cost"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(currency, amount)| (currency.clone(), dec(amount.as_str().unwrap())))
            .collect();
        let mut wanted = BTreeMap::new();
        for (currency, cell) in ["EUR", "USD"].into_iter().zip(&record[keys + 5..keys + 7]) {
            if !cell.is_empty() {
                wanted.insert(currency.to_owned(), dec(cell));
            }
        }
        assert_eq!(cost, wanted, "{object}");
        assert_eq!(
            object["unpriced_requests"].as_i64().unwrap().to_string(),
            record[keys + 7]
        );
    }

    // Table: each record on its own line, in order, empty cells shown as `-`.
    let table = report.render(Format::Table).unwrap();
    let lines: Vec<Vec<&str>> = table
        .lines()
        .filter(|line| !line.starts_with('-') || line.contains(' '))
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], header);
    let shown: Vec<Vec<&str>> = expected
        .iter()
        .map(|record| {
            record
                .iter()
                .map(|cell| if cell.is_empty() { "-" } else { cell.as_str() })
                .collect()
        })
        .collect();
    assert_eq!(lines[1..], shown[..], "{table}");
}

async fn report_sums_exactly(store: &UsageStore) {
    let by_project_and_model = "\
alpha,claude-sonnet,1,500,50,0,0,,0.003000001,0
alpha,gpt-4o,3,3300,530,100,0,0.005,0.0325,0
beta,gpt-4o,2,100,10,0,0,,,1
beta,gpt-4o-mini,1,4000,1000,0,10,,0.0009,0
TOTAL,,7,7900,1590,100,10,0.005,0.036400001,1
";
    let by_team_and_day = "\
blue,2026-11-02,1,4000,1000,0,10,,0.0009,0
blue,2026-11-03,2,100,10,0,0,,,1
red,2026-11-01,2,3000,500,100,0,,0.0325,0
red,2026-11-02,1,500,50,0,0,,0.003000001,0
red,2026-11-30,1,300,30,0,0,0.005,,0
TOTAL,,7,7900,1590,100,10,0.005,0.036400001,1
";
    use Dimension::{Day, Model, Project, Team};
    check_report(store, &[Project, Model], by_project_and_model).await;
    check_report(store, &[Team, Day], by_team_and_day).await;
}

const INVOICE_HEADER: &[&str] = &[
    "project",
    "month",
    "provider",
    "model",
    "currency",
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost",
    "unpriced_requests",
];

async fn invoice_lines_and_totals_are_exact(store: &UsageStore) {
    let invoice = |project: &str| {
        let query = InvoiceQuery {
            project: project.into(),
            month: date!(2026 - 11 - 17),
        };
        async move {
            let invoice = report::invoice(store, &query).await.unwrap();
            csv_records(&invoice.to_csv().unwrap())
        }
    };
    let alpha = invoice("alpha").await;
    assert_eq!(alpha[0], INVOICE_HEADER);
    let expected = "\
alpha,2026-11,anthropic,claude-sonnet,USD,1,500,50,0,0,0.003000001,0
alpha,2026-11,openai,gpt-4o,EUR,1,300,30,0,0,0.005,0
alpha,2026-11,openai,gpt-4o,USD,2,3000,500,100,0,0.0325,0
alpha,2026-11,TOTAL,,EUR,1,300,30,0,0,0.005,0
alpha,2026-11,TOTAL,,USD,3,3500,550,100,0,0.035500001,0
";
    assert_eq!(alpha[1..], csv_records(expected)[..]);
    // The unpriced request and the failed one stay visible, their cost empty rather than 0.
    let expected = "\
beta,2026-11,openai,gpt-4o,,2,100,10,0,0,,1
beta,2026-11,openai,gpt-4o-mini,USD,1,4000,1000,0,10,0.0009,0
beta,2026-11,TOTAL,,USD,1,4000,1000,0,10,0.0009,0
beta,2026-11,TOTAL,,,2,100,10,0,0,,1
";
    assert_eq!(invoice("beta").await[1..], csv_records(expected)[..]);
    assert_eq!(invoice("nobody").await.len(), 1);
}

fn openai_exports() -> Vec<reconcile::VendorExport> {
    [("usage.csv", OPENAI_USAGE), ("costs.csv", OPENAI_COSTS)]
        .into_iter()
        .map(|(name, text)| reconcile::parse_export(name, text.as_bytes(), None, None).unwrap())
        .collect()
}

fn query(provider: &str, tolerance: &str) -> ReconcileQuery {
    ReconcileQuery {
        provider: provider.into(),
        from: None,
        to: None,
        tolerance_percent: dec(tolerance),
        model_map: BTreeMap::new(),
    }
}

fn flagged(reconciliation: &reconcile::Reconciliation) -> Vec<(String, String)> {
    reconciliation
        .lines
        .iter()
        .filter(|line| line.flagged)
        .map(|line| (line.day.to_string(), line.model.clone()))
        .collect()
}

fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(day, model)| ((*day).to_owned(), (*model).to_owned()))
        .collect()
}

async fn reconcile_openai_flags_only_what_differs(store: &UsageStore) {
    let exports = openai_exports();
    assert_eq!(exports[0].vendor, Vendor::OpenAi);
    assert!(
        exports
            .iter()
            .all(|export| export.detection == Detection::Header)
    );
    assert!(
        exports[0]
            .describe()
            .contains("input tokens <- input_tokens")
    );
    assert!(exports[0].describe().contains("no column for: cost"));
    assert!(exports[1].describe().contains("cost <- amount.value"));

    let result = reconcile::reconcile(store, &query("openai", "1"), &exports)
        .await
        .unwrap();
    assert_eq!(
        (result.from, result.to),
        (date!(2026 - 11 - 01), date!(2026 - 11 - 03))
    );
    assert_eq!(result.lines.len(), 5);
    assert_eq!(
        flagged(&result),
        pairs(&[
            ("2026-11-02", "gpt-4o"),      // output tokens 9% short
            ("2026-11-02", "gpt-4o-mini"), // cost 5% off
            ("2026-11-03", "gpt-4o-mini"), // only the vendor has it
        ])
    );
    let mini = &result.lines[1];
    assert_eq!(mini.model, "gpt-4o-mini");
    assert_eq!(
        (
            mini.input_tokens.ledger,
            mini.input_tokens.vendor,
            mini.input_tokens.difference
        ),
        (Some(10000), Some(10050), Some(-50))
    );
    assert!(!mini.input_tokens.beyond_tolerance);
    let cost = &result.lines[3].cost;
    assert_eq!(
        (cost.ledger, cost.vendor, cost.difference),
        (
            Some(dec("0.00018")),
            Some(dec("0.00019")),
            Some(dec("-0.00001"))
        )
    );
    assert_eq!(result.lines[3].currency.as_deref(), Some("USD"));

    // CSV and JSON say the same.
    let csv = csv_records(&result.render(Format::Csv).unwrap());
    let flagged_csv: Vec<(String, String)> = csv[1..]
        .iter()
        .filter(|record| record[2] == "FLAG")
        .map(|record| (record[0].clone(), record[1].clone()))
        .collect();
    assert_eq!(flagged_csv, flagged(&result));
    let json: Value = serde_json::from_str(&result.render(Format::Json).unwrap()).unwrap();
    assert_eq!(json["flagged"], 3);
    assert_eq!(json["lines"][1]["input_tokens"]["difference"], -50);
    assert_eq!(json["lines"][3]["cost"]["difference"], "-0.00001");

    // A wider tolerance keeps only the pair the ledger has nothing of.
    let result = reconcile::reconcile(store, &query("openai", "10"), &exports)
        .await
        .unwrap();
    assert_eq!(flagged(&result), pairs(&[("2026-11-03", "gpt-4o-mini")]));
}

async fn reconcile_anthropic_flags_only_what_differs(store: &UsageStore) {
    let export =
        reconcile::parse_export("anthropic.csv", ANTHROPIC_EXPORT.as_bytes(), None, None).unwrap();
    assert_eq!(
        (export.vendor, export.detection),
        (Vendor::Anthropic, Detection::Header)
    );
    assert_eq!((export.rows.len(), export.skipped_rows), (3, 1));
    assert!(
        export
            .describe()
            .contains("cache read tokens <- Cache Read Tokens")
    );
    let result = reconcile::reconcile(store, &query("anthropic", "1"), &[export])
        .await
        .unwrap();
    assert_eq!(result.lines.len(), 3);
    assert_eq!(flagged(&result), pairs(&[("2026-11-02", "claude-haiku")]));
    // Cache reads and writes are part of the ledger's input, so they are added to the vendor's.
    let sonnet = &result.lines[0];
    assert_eq!(
        (sonnet.input_tokens.ledger, sonnet.input_tokens.vendor),
        (Some(1200), Some(1200))
    );
    let haiku = &result.lines[1];
    assert_eq!(haiku.cost.difference, Some(dec("-0.0003")));
    assert!(haiku.cost.beyond_tolerance && !haiku.input_tokens.beyond_tolerance);
}

#[tokio::test]
async fn report_sums_exactly_on_sqlite() {
    let (store, _dir) = sqlite(SPEND).await;
    report_sums_exactly(&store).await;
}

#[tokio::test]
async fn report_sums_exactly_on_postgres() {
    report_sums_exactly(&postgres(SPEND).await).await;
}

#[tokio::test]
async fn invoice_lines_and_totals_are_exact_on_sqlite() {
    let (store, _dir) = sqlite(SPEND).await;
    invoice_lines_and_totals_are_exact(&store).await;
}

#[tokio::test]
async fn invoice_lines_and_totals_are_exact_on_postgres() {
    invoice_lines_and_totals_are_exact(&postgres(SPEND).await).await;
}

#[tokio::test]
async fn reconcile_openai_flags_only_what_differs_on_sqlite() {
    let (store, _dir) = sqlite(LEDGER).await;
    reconcile_openai_flags_only_what_differs(&store).await;
}

#[tokio::test]
async fn reconcile_openai_flags_only_what_differs_on_postgres() {
    reconcile_openai_flags_only_what_differs(&postgres(LEDGER).await).await;
}

#[tokio::test]
async fn reconcile_anthropic_flags_only_what_differs_on_sqlite() {
    let (store, _dir) = sqlite(LEDGER).await;
    reconcile_anthropic_flags_only_what_differs(&store).await;
}

#[tokio::test]
async fn reconcile_anthropic_flags_only_what_differs_on_postgres() {
    reconcile_anthropic_flags_only_what_differs(&postgres(LEDGER).await).await;
}

#[tokio::test]
async fn a_store_without_the_views_says_to_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let store = connect(common::sqlite_url(dir.path())).await;
    let query = ReportQuery {
        from: date!(2026 - 11 - 01),
        to: date!(2026 - 11 - 30),
        group_by: vec![Dimension::Project],
    };
    let err = report::report(&store, &query).await.unwrap_err();
    assert!(err.to_string().contains("gateway migrate"), "{err}");
    let backwards = ReportQuery {
        from: date!(2026 - 11 - 30),
        to: date!(2026 - 11 - 01),
        ..query
    };
    assert!(report::report(&store, &backwards).await.is_err());
}
