//! Billing through the real gateway: every served request lands in the ledger priced from
//! `[[prices]]`, and a project's daily budget turns further requests into 429
//! `insufficient_quota` before the spending passes it.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use gateway_bin::{GatewayConfig, RunningGateway};
use gateway_test_support::MockUpstream;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::Row;
use std::str::FromStr;

const KEY: &str = "sk-billing-test";

#[tokio::test]
async fn requests_are_priced_and_a_budget_stops_the_spending() {
    let up = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("usage.db");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[database]
url = "sqlite://{database}"
spool_dir = "{spool}"
[observability]
log_level = "error"
access_log = false

[[providers]]
name = "up"
kind = "openai"
base_urls = ["{url}"]

[[models]]
alias = "chat"
targets = [{{ provider = "up", model = "m" }}]

[[prices]]
provider = "up"
model = "m"
input_per_million = "1000"
output_per_million = "2000"

[[projects]]
name = "p"
api_keys = [{{ id = "k", sha256 = "{hash}" }}]

[[budgets]]
project = "p"
daily_usd = "0.5"
"#,
        database = database.display(),
        spool = dir.path().join("spool").display(),
        url = up.base_url(),
        hash = gateway_access::hash_key(KEY),
    );
    let config = GatewayConfig::parse(&text, &|_| None).unwrap();
    let gateway = RunningGateway::start(config).await.unwrap();
    let client = reqwest::Client::new();
    let mut served = 0;
    let mut refused = None;
    for _ in 0..100 {
        let response = client
            .post(format!(
                "http://{}/v1/chat/completions",
                gateway.local_addr()
            ))
            .bearer_auth(KEY)
            .json(&json!({"model": "chat", "max_tokens": 20,
                "messages": [{"role": "user", "content": "hello there"}]}))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            served += 1;
            response.bytes().await.unwrap();
            continue;
        }
        assert_eq!(response.status(), 429);
        refused = Some(response.json::<Value>().await.unwrap());
        break;
    }
    let refused = refused.expect("the budget never refused a request");
    assert_eq!(refused["error"]["code"], "insufficient_quota", "{refused}");
    assert_eq!(refused["error"]["type"], "insufficient_quota", "{refused}");
    assert!(served >= 3, "only {served} requests fit a $0.50 budget");
    let writer = gateway.shutdown().await;

    // The ledger: every served request priced, and the day's spending within the budget.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", database.display()))
        .await
        .unwrap();
    let rows = sqlx::query(
        "SELECT input_tokens, output_tokens, CAST(cost AS TEXT) AS cost, currency \
         FROM usage_events WHERE status = 200",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), served, "{writer:?}");
    let mut total = Decimal::ZERO;
    for row in &rows {
        let input: i64 = row.get("input_tokens");
        let output: i64 = row.get("output_tokens");
        let cost = Decimal::from_str(row.get::<&str, _>("cost")).unwrap();
        let expected = (Decimal::from(input) * Decimal::from(1000)
            + Decimal::from(output) * Decimal::from(2000))
            / Decimal::from(1_000_000);
        assert_eq!(cost, expected, "input {input}, output {output}");
        assert_eq!(row.get::<&str, _>("currency"), "USD");
        total += cost;
    }
    assert!(
        total <= Decimal::from_str("0.5").unwrap(),
        "spent {total} against a budget of 0.5"
    );
    let refused_rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM usage_events WHERE status = 429")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        refused_rows, 1,
        "the refused request is in the ledger, unpriced"
    );
}
