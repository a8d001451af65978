//! The finance commands (`report`, `invoice`, `reconcile`) of the real `gateway` binary, run
//! against a SQLite ledger filled here.
//!
//! The `spend_daily` / `spend_monthly` views are made from a minimal `usage_events` to the
//! contract of migration 0003; the real migration replaces this setup once both are merged.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Time, project, team, business line, provider, model, alias, input, output, cached and
/// reasoning tokens, currency and cost (`-`: not priced).
const LEDGER: &str = "
2026-11-01T10:00:00Z alpha red  retail    openai    gpt-4o          chat   1000 200  100 0  USD 0.012500000
2026-11-01T11:00:00Z beta  blue wholesale openai    gpt-4o          chat   2000 300  0   0  USD 0.020000000
2026-11-02T09:00:00Z alpha red  retail    anthropic claude-sonnet-4 claude 1200 300  200 0  USD 0.008100000
2026-11-02T12:00:00Z beta  blue wholesale openai    gpt-4o-mini     fast   4000 1000 0   10 USD 0.000900000
2026-11-03T00:00:00Z beta  blue wholesale openai    gpt-4o          chat   100  10   0   0  -   -
2026-12-01T00:00:00Z beta  blue wholesale openai    gpt-4o          chat   9    9    0   0  USD 9
";

fn view(name: &str, period: &str) -> String {
    format!(
        "CREATE VIEW {name} AS SELECT {period}, project, \
         json_extract(tags, '$.team') AS team, \
         json_extract(tags, '$.business_line') AS business_line, \
         provider, upstream_model AS model, alias, currency, COUNT(*) AS requests, \
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
}

/// A directory with `usage.db` (the ledger above, unless `empty`) and `gateway.toml` pointing
/// at it.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    async fn new(empty: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("usage.db");
        let url = format!("sqlite://{}", db.display());
        let options = url
            .parse::<sqlx::sqlite::SqliteConnectOptions>()
            .unwrap()
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        if !empty {
            fill(&pool).await;
        }
        pool.close().await;
        // The vendor keys are unset variables: the finance commands must not need them.
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[database]
url = "{url}"
spool_dir = "{spool}"

[[providers]]
name = "openai"
kind = "openai"
base_urls = ["https://api.openai.com/v1"]
api_keys = ["${{GATEWAY_TEST_UNSET_OPENAI_KEY}}"]

[[providers]]
name = "anthropic"
kind = "anthropic"
base_urls = ["https://api.anthropic.com/v1"]
api_keys = ["${{GATEWAY_TEST_UNSET_ANTHROPIC_KEY}}"]
"#,
                spool = dir.path().join("spool").display(),
            ),
        )
        .unwrap();
        Self { dir, config }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("GATEWAY_TEST_UNSET_OPENAI_KEY")
            .env_remove("GATEWAY_TEST_UNSET_ANTHROPIC_KEY")
            .output()
            .unwrap()
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

async fn fill(pool: &sqlx::SqlitePool) {
    let setup = format!(
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
    );
    sqlx::raw_sql(&setup).execute(pool).await.unwrap();
    for line in LEDGER.lines().filter(|line| !line.trim().is_empty()) {
        let c: Vec<&str> = line.split_whitespace().collect();
        let optional = |i: usize| Some(c[i]).filter(|cell| *cell != "-");
        let nanos = optional(12).map(|amount| {
            let (units, fraction) = amount.split_once('.').unwrap_or((amount, ""));
            units.parse::<i64>().unwrap() * 1_000_000_000
                + format!("{fraction:0<9}").parse::<i64>().unwrap()
        });
        let tags = serde_json::json!({"team": c[2], "business_line": c[3]}).to_string();
        sqlx::query(
            "INSERT INTO usage_events (created_at, project, tags, provider, upstream_model, \
             alias, input_tokens, output_tokens, cached_tokens, reasoning_tokens, currency, \
             cost, cost_nanos) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(c[0])
        .bind(c[1])
        .bind(tags)
        .bind(c[4])
        .bind(c[5])
        .bind(c[6])
        .bind(c[7].parse::<i64>().unwrap())
        .bind(c[8].parse::<i64>().unwrap())
        .bind(c[9].parse::<i64>().unwrap())
        .bind(c[10].parse::<i64>().unwrap())
        .bind(optional(11))
        .bind(optional(12))
        .bind(nanos)
        .execute(pool)
        .await
        .unwrap();
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Checks the exit code, showing what the command said when it is not the one wanted.
fn expect_code(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(output),
        stderr(output)
    );
}

/// None of the CSV here has a quoted field, so a split is a parse.
fn csv_lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_owned).collect()
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn report_prints_exact_sums_in_every_format() {
    let setup = Setup::new(false).await;
    let range = ["report", "--from", "2026-11-01", "--to", "2026-11-30"];
    let by = |group: &'static str, format: &'static str| {
        let mut args = range.to_vec();
        args.extend(["--group-by", group, "--format", format]);
        let output = setup.run(&args);
        expect_code(&output, 0);
        stdout(&output)
    };

    let expected = "\
project,model,requests,input_tokens,output_tokens,cached_tokens,reasoning_tokens,cost_USD,unpriced_requests
alpha,claude-sonnet-4,1,1200,300,200,0,0.0081,0
alpha,gpt-4o,1,1000,200,100,0,0.0125,0
beta,gpt-4o,2,2100,310,0,0,0.02,1
beta,gpt-4o-mini,1,4000,1000,0,10,0.0009,0
TOTAL,,5,8300,1810,300,10,0.0415,1
";
    assert_eq!(csv_lines(&by("project,model", "csv")), lines(expected));

    let expected = "\
provider,requests,input_tokens,output_tokens,cached_tokens,reasoning_tokens,cost_USD,unpriced_requests
anthropic,1,1200,300,200,0,0.0081,0
openai,4,7100,1510,100,10,0.0334,1
TOTAL,5,8300,1810,300,10,0.0415,1
";
    assert_eq!(csv_lines(&by("provider", "csv")), lines(expected));

    let json: serde_json::Value = serde_json::from_str(&by("provider", "json")).unwrap();
    assert_eq!(json["group_by"], serde_json::json!(["provider"]));
    assert_eq!(json["rows"][1]["provider"], "openai");
    assert_eq!(json["rows"][1]["requests"], 4);
    assert_eq!(json["rows"][1]["input_tokens"], 7100);
    assert_eq!(json["rows"][1]["cost"]["USD"], "0.0334");
    assert_eq!(json["rows"][1]["unpriced_requests"], 1);
    assert_eq!(json["total"]["cost"]["USD"], "0.0415");
    assert_eq!(json["total"]["output_tokens"], 1810);

    let table = by("provider", "table");
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[2],
        ["anthropic", "1", "1200", "300", "200", "0", "0.0081", "0"]
    );
    assert_eq!(
        rows[5],
        ["TOTAL", "5", "8300", "1810", "300", "10", "0.0415", "1"]
    );
    // Aligned: numbers are right-aligned in the last column, so every line, rules included,
    // ends at the same place.
    let ends: Vec<usize> = table.lines().map(str::len).collect();
    assert!(ends.iter().all(|end| *end == ends[0]), "{table}");
}

#[tokio::test]
async fn invoice_prints_lines_and_a_total_per_currency() {
    let setup = Setup::new(false).await;
    let output = setup.run(&["invoice", "--project", "beta", "--month", "2026-11"]);
    expect_code(&output, 0);
    let expected = "\
project,month,provider,model,currency,requests,input_tokens,output_tokens,cached_tokens,reasoning_tokens,cost,unpriced_requests
beta,2026-11,openai,gpt-4o,,1,100,10,0,0,,1
beta,2026-11,openai,gpt-4o,USD,1,2000,300,0,0,0.02,0
beta,2026-11,openai,gpt-4o-mini,USD,1,4000,1000,0,10,0.0009,0
beta,2026-11,TOTAL,,USD,2,6000,1300,0,10,0.0209,0
beta,2026-11,TOTAL,,,1,100,10,0,0,,1
";
    assert_eq!(csv_lines(&stdout(&output)), lines(expected));

    let output = setup.run(&["invoice", "--project", "nobody", "--month", "2026-11"]);
    expect_code(&output, 0);
    assert_eq!(csv_lines(&stdout(&output)).len(), 1);
    assert!(stderr(&output).contains("no usage"), "{}", stderr(&output));
}

/// OpenAI's legacy usage export: tokens per 5-minute bucket, no cost.
const OPENAI_EXPORT: &str = "\
organization_id,aggregation_timestamp,n_requests,operation,snapshot_id,n_context_tokens_total,n_generated_tokens_total
org-1,1793491200,1,completion,gpt-4o,1000,200
org-1,1793491500,1,completion,gpt-4o,2000,300
org-1,1793577600,1,completion,gpt-4o-mini,4200,1000
org-1,1793664000,1,completion,gpt-4o,100,10
";

#[tokio::test]
async fn reconcile_exits_1_on_a_difference_beyond_tolerance_and_0_within() {
    let setup = Setup::new(false).await;
    let export = setup.file("openai.csv", OPENAI_EXPORT);
    let output = setup.run(&["reconcile", "--provider", "openai", "--export", &export]);
    expect_code(&output, 1);
    let err = stderr(&output);
    assert!(err.contains("OpenAI export (told by its header)"), "{err}");
    assert!(
        err.contains("input tokens <- n_context_tokens_total"),
        "{err}"
    );
    assert!(err.contains("no column for: cost, currency"), "{err}");
    let table = stdout(&output);
    let flagged: Vec<&str> = table.lines().filter(|line| line.contains("FLAG")).collect();
    assert_eq!(flagged.len(), 1, "{table}");
    let cells: Vec<&str> = flagged[0].split_whitespace().collect();
    assert_eq!(
        cells[..9],
        [
            "2026-11-02",
            "gpt-4o-mini",
            "FLAG",
            "4000",
            "4200",
            "-200",
            "1000",
            "1000",
            "0"
        ]
    );
    assert!(table.contains("1 of 3 (day, model) pairs"), "{table}");

    // 200 of 4200 is 4.8%: within 5%.
    let output = setup.run(&[
        "reconcile",
        "--provider",
        "openai",
        "--export",
        &export,
        "--tolerance-percent",
        "5",
        "--format",
        "json",
    ]);
    expect_code(&output, 0);
    let json: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(json["flagged"], 0);
    assert_eq!(json["lines"][1]["input_tokens"]["difference"], -200);
    assert_eq!(json["lines"][1]["cost"]["vendor"], serde_json::Value::Null);
}

#[tokio::test]
async fn reconcile_reads_anthropic_exports_and_goes_by_the_provider_kind_when_unsure() {
    let setup = Setup::new(false).await;
    let export = setup.file(
        "anthropic.csv",
        "usage_date_utc,model,uncached_input_tokens,cache_read_input_tokens,\
         cache_creation_input_tokens,output_tokens,cost_usd\n\
         2026-11-02,claude-sonnet-4,1000,200,0,300,0.0081\n",
    );
    let output = setup.run(&["reconcile", "--provider", "anthropic", "--export", &export]);
    expect_code(&output, 0);
    assert!(stderr(&output).contains("Anthropic export (told by its header)"));

    // A header either vendor could have written: the config says `anthropic` is Anthropic.
    let export = setup.file(
        "plain.csv",
        "date,model,input_tokens,output_tokens,cost\n2026-11-02,claude-sonnet-4,1000,300,0.0090\n",
    );
    let output = setup.run(&[
        "reconcile",
        "--provider",
        "anthropic",
        "--export",
        &export,
        "--format",
        "csv",
    ]);
    expect_code(&output, 1);
    let err = stderr(&output);
    assert!(
        err.contains("Anthropic export (the header fits both"),
        "{err}"
    );
    assert!(
        err.contains("no column for: cache read tokens, cache write tokens"),
        "{err}"
    );
    let csv = csv_lines(&stdout(&output));
    assert!(
        csv[1].starts_with(
            "2026-11-02,claude-sonnet-4,FLAG,1200,1000,200,300,300,0,0.0081,0.009,-0.0009,USD"
        ),
        "{csv:?}"
    );
}

#[tokio::test]
async fn reconcile_errors_exit_2_and_name_the_columns() {
    let setup = Setup::new(false).await;
    let export = setup.file("bad.csv", "start_time,input_tokens\n1793491200,5\n");
    let output = setup.run(&["reconcile", "--provider", "openai", "--export", &export]);
    expect_code(&output, 2);
    let err = stderr(&output);
    assert!(err.contains("no model column"), "{err}");
    assert!(err.contains("snapshot_id"), "{err}");

    let export = setup.file("what.csv", "date,model,tokens\n2026-11-01,m,5\n");
    let output = setup.run(&["reconcile", "--provider", "nowhere", "--export", &export]);
    expect_code(&output, 2);
    assert!(
        stderr(&output).contains("--export-format"),
        "{}",
        stderr(&output)
    );

    let missing = setup.dir.path().join("missing.csv");
    let output = setup.run(&[
        "reconcile",
        "--provider",
        "openai",
        "--export",
        Path::new(&missing).to_str().unwrap(),
    ]);
    expect_code(&output, 2);
}

#[tokio::test]
async fn bad_arguments_and_a_database_without_views_are_reported() {
    let setup = Setup::new(false).await;
    let output = setup.run(&[
        "report",
        "--from",
        "2026-11-01",
        "--to",
        "2026-11-30",
        "--group-by",
        "colour",
    ]);
    expect_code(&output, 2);
    assert!(
        stderr(&output).contains("unknown group"),
        "{}",
        stderr(&output)
    );
    let output = setup.run(&["invoice", "--project", "beta", "--month", "November"]);
    expect_code(&output, 2);
    assert!(stderr(&output).contains("YYYY-MM"), "{}", stderr(&output));

    let empty = Setup::new(true).await;
    let output = empty.run(&["report", "--from", "2026-11-01", "--to", "2026-11-30"]);
    expect_code(&output, 1);
    assert!(
        stderr(&output).contains("gateway migrate"),
        "{}",
        stderr(&output)
    );
}
