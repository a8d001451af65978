//! Three `gateway` processes sharing one Postgres race for the last dollars of a project's
//! daily budget: together they spend no more than the budget plus one request's reservation,
//! the budget table agrees with the ledger to the nano-dollar, and every refusal is OpenAI's
//! `insufficient_quota`.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]
#![allow(
    clippy::print_stdout,
    reason = "the test prints its figures so a run can be compared with the next"
)]

mod common;
mod process;

use common::fresh_postgres_database;
use gateway_test_support::MockUpstream;
use process::{GatewayProcess, free_port};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::str::FromStr;
use std::time::Duration;

const KEY: &str = "sk-budget-replicas";
const BUDGET: &str = "0.5";
const PROMPT: &str = "how much is left in the budget?";
const MAX_TOKENS: u64 = 20;
const INPUT_PER_MILLION: u64 = 1000;
const OUTPUT_PER_MILLION: u64 = 2000;
const RACERS_PER_REPLICA: usize = 20;

/// One request's reservation, as docs/billing.md defines it: the prompt estimate (a quarter
/// of its characters, plus 4 per message) at the input price plus `max_tokens` at the output
/// price.
fn reservation() -> Decimal {
    let prompt_estimate = (PROMPT.chars().count() as u64).div_ceil(4) + 4;
    Decimal::from(prompt_estimate * INPUT_PER_MILLION + MAX_TOKENS * OUTPUT_PER_MILLION)
        / Decimal::from(1_000_000u32)
}

fn config(
    port: u16,
    admin: u16,
    database: &str,
    spool: &std::path::Path,
    upstream: &str,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
[database]
url = "{database}"
spool_dir = "{spool}"
[observability]
log_level = "error"
access_log = false
[budget]
backend = "database"
on_failure = "fail-closed"

[[providers]]
name = "up"
kind = "openai"
base_urls = ["{upstream}"]

[[models]]
alias = "chat"
targets = [{{ provider = "up", model = "m" }}]

[[prices]]
provider = "up"
model = "m"
input_per_million = "{INPUT_PER_MILLION}"
output_per_million = "{OUTPUT_PER_MILLION}"

[[projects]]
name = "racing"
api_keys = [{{ id = "k", sha256 = "{hash}" }}]

[[budgets]]
project = "racing"
daily_usd = "{BUDGET}"
"#,
        spool = spool.display(),
        hash = gateway_access::hash_key(KEY),
    )
}

async fn ask(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "chat", "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": PROMPT}]}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_processes_overshoot_a_nearly_spent_budget_by_at_most_one_reservation() {
    let upstream = MockUpstream::start().await.unwrap();
    let database = fresh_postgres_database().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for dir in &dirs {
        let (port, admin) = (free_port(), free_port());
        let text = config(
            port,
            admin,
            &database,
            &dir.path().join("spool"),
            &upstream.base_url(),
        );
        replicas.push(GatewayProcess::start(dir.path(), port, &text).await);
    }
    let client = reqwest::Client::new();

    // Spend most of the budget one request at a time, through the first replica.
    let budget = Decimal::from_str(BUDGET).unwrap();
    let (mut warm_up, mut warm_up_cost) = (0i32, Decimal::ZERO);
    while budget - warm_up_cost > Decimal::from(3) * reservation() {
        let (status, body) = ask(&client, &replicas[0].url).await;
        assert_eq!(status, 200, "{body}");
        let tokens = |field: &str| body["usage"][field].as_u64().unwrap();
        warm_up_cost += Decimal::from(
            tokens("prompt_tokens") * INPUT_PER_MILLION
                + tokens("completion_tokens") * OUTPUT_PER_MILLION,
        ) / Decimal::from(1_000_000u32);
        warm_up += 1;
    }

    // Then all three at once, many more requests than the rest can pay for.
    let mut racers = Vec::new();
    for replica in &replicas {
        for _ in 0..RACERS_PER_REPLICA {
            let (client, url) = (client.clone(), replica.url.clone());
            racers.push(tokio::spawn(async move { ask(&client, &url).await }));
        }
    }
    let (mut served, mut refused) = (0i32, 0i32);
    for racer in racers {
        let (status, body) = racer.await.unwrap();
        match status {
            200 => served += 1,
            429 => {
                assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
                refused += 1;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    for replica in &mut replicas {
        replica.stop().await;
    }

    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    // Each replica wrote its ledger before exiting; settlement runs in the background after
    // each response, so the budget's spend may need a moment more.
    let (mut ledger, mut ledger_rows, mut spent) = (Decimal::ZERO, 0i64, Decimal::ZERO);
    for _ in 0..100 {
        (ledger, ledger_rows) = sqlx::query_as(
            "SELECT COALESCE(SUM(cost), 0), COUNT(*) FROM usage_events \
             WHERE project = 'racing' AND status = 200",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        spent = sqlx::query_scalar(
            "SELECT COALESCE(SUM(spent_usd), 0) FROM budget_spend \
             WHERE project = 'racing' AND key_id = '' AND period = 'day'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if spent == ledger && ledger_rows == i64::from(warm_up + served) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pool.close().await;

    let overshoot = (ledger - budget).max(Decimal::ZERO);
    println!(
        "three replicas: {warm_up} warm-up requests spent {warm_up_cost}, then {served} of {} racing requests served \
         and {refused} refused; spent {ledger} of {budget} (overshoot {overshoot}, one \
         reservation {})",
        3 * RACERS_PER_REPLICA,
        reservation()
    );
    assert_eq!(i64::from(warm_up + served), ledger_rows);
    assert!(served > 0, "the race served nothing: the budget had room");
    assert!(
        refused > 0,
        "the race refused nothing: the budget was not nearly spent"
    );
    assert!(
        overshoot <= reservation(),
        "spent {ledger} against a budget of {budget}: more than one reservation over"
    );
    assert_eq!(
        spent, ledger,
        "the budget's spend disagrees with the ledger"
    );
}
