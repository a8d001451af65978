//! Budgets against real Postgres, SQLite and Redis (and the in-process store): replicas racing
//! for the last dollar, settlement, expiry, period rollover, alerts sent once across replicas,
//! and an unreachable backend.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

mod common;

use gateway_business::budget::{
    BudgetBackend, BudgetEntry, BudgetError, BudgetFailureMode, BudgetPeriod, BudgetScope,
    BudgetSettings, Budgets,
};
use gateway_business::{DatabaseConfig, UsageStore};
use rust_decimal::Decimal;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

fn usd(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

/// A day far enough ahead that Redis keys (which expire a week after their period) live.
const NOON: OffsetDateTime = datetime!(2031-06-15 12:00 UTC);

fn redis_url() -> String {
    std::env::var("GATEWAY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Postgres,
    Sqlite,
    Redis,
    Local,
}

/// One shared store for a test: every instance made from it is a replica of the others
/// (except with `Local`, which shares nothing).
struct Setup {
    settings: BudgetSettings,
    database: DatabaseConfig,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn new(kind: Kind) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = BudgetSettings {
            // Generous: 150 transactions queue on the same rows, on a busy test machine.
            timeout_ms: 10_000,
            ..BudgetSettings::default()
        };
        let mut database = DatabaseConfig::default();
        match kind {
            Kind::Postgres => {
                settings.backend = BudgetBackend::Database;
                database.url = common::fresh_postgres_database().await;
            }
            Kind::Sqlite => {
                settings.backend = BudgetBackend::Database;
                database.url = common::sqlite_url(dir.path());
                // Migrated up front: budgets would migrate on first use, but three instances
                // racing to create the same tables on one SQLite file is not what is tested.
                let store = UsageStore::connect(&database).await.unwrap();
                store.migrate().await.unwrap();
                store.close().await;
            }
            Kind::Redis => {
                settings.backend = BudgetBackend::Redis;
                settings.redis_url = Some(redis_url());
                settings.key_prefix = format!("gw:test:budget:{}:", Uuid::now_v7().simple());
            }
            Kind::Local => settings.backend = BudgetBackend::Local,
        }
        Self {
            settings,
            database,
            _dir: dir,
        }
    }

    fn instance(&self, budgets: &[BudgetEntry]) -> Budgets {
        Budgets::new(&self.settings, budgets, &self.database).unwrap()
    }

    /// Deletes this test's Redis keys (their own expiry is years away).
    async fn cleanup(&self) {
        if self.settings.backend != BudgetBackend::Redis {
            return;
        }
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.settings.key_prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
}

fn project_budget(project: &str, daily: Option<&str>, monthly: Option<&str>) -> BudgetEntry {
    BudgetEntry {
        project: project.into(),
        key: None,
        daily_usd: daily.map(usd),
        monthly_usd: monthly.map(usd),
        alert_webhook: None,
    }
}

fn key_budget(project: &str, key: &str, daily: Option<&str>, monthly: Option<&str>) -> BudgetEntry {
    BudgetEntry {
        key: Some(key.into()),
        ..project_budget(project, daily, monthly)
    }
}

async fn usage(
    budgets: &Budgets,
    project: &str,
    key: Option<&str>,
    period: BudgetPeriod,
    now: OffsetDateTime,
) -> (Decimal, Decimal) {
    let usage = budgets
        .usage(project, key, period, now)
        .await
        .unwrap()
        .unwrap();
    (usage.spent, usage.reserved)
}

// ---------------------------------------------------------------------------------------------
// Replicas racing for the last dollar.

/// Three replicas, 50 concurrent reservations each, against a project budget that fits
/// exactly `FITS` of them. Each replica reserves for its own key, which has a budget too, so
/// every reservation takes two budgets (and, on Postgres, two row locks).
async fn race(kind: Kind) {
    const FITS: usize = 37;
    let setup = Setup::new(kind).await;
    let budgets = vec![
        project_budget("team", Some("3.70"), None),
        key_budget("team", "k0", None, Some("100")),
        key_budget("team", "k1", None, Some("100")),
        key_budget("team", "k2", None, Some("100")),
    ];
    let replicas: Vec<Budgets> = (0..3).map(|_| setup.instance(&budgets)).collect();
    let mut tasks = Vec::new();
    for (index, replica) in replicas.iter().enumerate() {
        for _ in 0..50 {
            let replica = replica.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("k{index}");
                (
                    index,
                    replica.reserve("team", &key, usd("0.10"), NOON).await,
                )
            }));
        }
    }
    let mut admitted = Vec::new();
    let mut per_key = [0usize; 3];
    for task in tasks {
        let (index, result) = task.await.unwrap();
        match result {
            Ok(reservation) => {
                assert!(reservation.is_backed());
                per_key[index] += 1;
                admitted.push(reservation);
            }
            Err(BudgetError::Exceeded {
                scope,
                period,
                limit,
                ..
            }) => {
                assert_eq!(
                    (scope, period, limit),
                    (BudgetScope::Project, BudgetPeriod::Day, usd("3.7"))
                );
            }
            Err(other) => panic!("{kind:?}: {other}"),
        }
    }
    assert_eq!(admitted.len(), FITS, "{kind:?}");
    let stats: Vec<_> = replicas.iter().map(Budgets::stats).collect();
    assert_eq!(stats.iter().map(|s| s.admitted).sum::<u64>(), FITS as u64);
    assert_eq!(
        stats.iter().map(|s| s.rejected).sum::<u64>(),
        150 - FITS as u64
    );
    assert!(stats.iter().all(|s| s.backend_failures == 0), "{stats:?}");
    // Spent + reserved is exactly the limit, and each key holds what its replica got.
    let observer = &replicas[0];
    assert_eq!(
        usage(observer, "team", None, BudgetPeriod::Day, NOON).await,
        (usd("0"), usd("3.7"))
    );
    for (index, count) in per_key.iter().enumerate() {
        let key = format!("k{index}");
        let (_, reserved) = usage(observer, "team", Some(&key), BudgetPeriod::Month, NOON).await;
        assert_eq!(
            reserved,
            usd("0.10") * Decimal::from(*count),
            "{kind:?} {key}"
        );
    }
    // Nothing more fits, not even an unpriced request.
    assert!(
        observer
            .reserve("team", "k0", usd("0"), NOON)
            .await
            .is_err()
    );

    // Settling at half the reservation frees the rest, which fits again exactly.
    for reservation in admitted {
        reservation.settle(usd("0.05")).await;
    }
    assert_eq!(
        usage(observer, "team", None, BudgetPeriod::Day, NOON).await,
        (usd("1.85"), usd("0"))
    );
    let mut again = 0;
    for replica in replicas.iter().cycle().take(30) {
        if replica
            .reserve("team", "k1", usd("0.10"), NOON)
            .await
            .is_ok()
        {
            again += 1;
        }
    }
    assert_eq!(again, 18, "{kind:?}: 1.85 of 3.70 left room for 18 at 0.10");
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_replicas_admit_exactly_what_fits() {
    race(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_replicas_admit_exactly_what_fits() {
    race(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_replicas_admit_exactly_what_fits() {
    race(Kind::Redis).await;
}

// ---------------------------------------------------------------------------------------------
// The same rules on every backend.

const ALL: [Kind; 4] = [Kind::Postgres, Kind::Sqlite, Kind::Redis, Kind::Local];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_budget_refuses_without_charging_the_project() {
    for kind in ALL {
        let setup = Setup::new(kind).await;
        let budgets = setup.instance(&[
            project_budget("team", Some("10"), None),
            key_budget("team", "ci", Some("0.25"), None),
        ]);
        let first = budgets
            .reserve("team", "ci", usd("0.10"), NOON)
            .await
            .unwrap();
        let _second = budgets
            .reserve("team", "ci", usd("0.10"), NOON)
            .await
            .unwrap();
        let refused = budgets
            .reserve("team", "ci", usd("0.10"), NOON)
            .await
            .unwrap_err();
        let BudgetError::Exceeded {
            scope,
            name,
            period,
            spent,
            reserved,
            ..
        } = refused
        else {
            panic!("{kind:?}: {refused}");
        };
        assert_eq!(
            (scope, name.as_str(), period, spent, reserved),
            (
                BudgetScope::Key,
                "team/ci",
                BudgetPeriod::Day,
                usd("0"),
                usd("0.2")
            ),
            "{kind:?}"
        );
        assert_eq!(
            usage(&budgets, "team", None, BudgetPeriod::Day, NOON).await,
            (usd("0"), usd("0.2")),
            "{kind:?}: the refused request charged the project"
        );
        // Another key of the project has only the project's budget.
        let other = budgets
            .reserve("team", "web", usd("5"), NOON)
            .await
            .unwrap();
        assert!(other.is_budgeted());
        // A project without budgets is not checked at all.
        let free = budgets
            .reserve("other", "ci", usd("1000"), NOON)
            .await
            .unwrap();
        assert!(!free.is_budgeted());
        first.settle(usd("0.10")).await;
        assert_eq!(
            usage(&budgets, "team", Some("ci"), BudgetPeriod::Day, NOON).await,
            (usd("0.1"), usd("0.1")),
            "{kind:?}"
        );
        setup.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_lower_or_higher_replaces_the_reservation() {
    for kind in ALL {
        let setup = Setup::new(kind).await;
        let budgets = setup.instance(&[project_budget("team", Some("1.00"), None)]);
        let big = budgets
            .reserve("team", "k", usd("0.60"), NOON)
            .await
            .unwrap();
        assert_eq!(big.amount(), usd("0.6"));
        assert!(
            budgets
                .reserve("team", "k", usd("0.50"), NOON)
                .await
                .is_err(),
            "{kind:?}: 0.60 + 0.50 > 1.00"
        );
        big.settle(usd("0.20")).await;
        assert_eq!(
            usage(&budgets, "team", None, BudgetPeriod::Day, NOON).await,
            (usd("0.2"), usd("0")),
            "{kind:?}"
        );
        // The real cost may exceed the reservation: it is counted in full, over the limit.
        let small = budgets
            .reserve("team", "k", usd("0.50"), NOON)
            .await
            .unwrap();
        small.settle(usd("1.5")).await;
        assert_eq!(
            usage(&budgets, "team", None, BudgetPeriod::Day, NOON).await,
            (usd("1.7"), usd("0")),
            "{kind:?}"
        );
        // An exhausted budget refuses everything, unpriced requests included.
        for cost in ["0.01", "0"] {
            let refused = budgets.reserve("team", "k", usd(cost), NOON).await;
            assert!(
                matches!(refused, Err(BudgetError::Exceeded { spent, .. }) if spent == usd("1.7")),
                "{kind:?} {cost}: {refused:?}"
            );
        }
        setup.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpriced_request_needs_room_and_is_counted_when_priced() {
    for kind in ALL {
        let setup = Setup::new(kind).await;
        let budgets = setup.instance(&[project_budget("team", Some("1"), None)]);
        let unpriced = budgets.reserve("team", "k", usd("0"), NOON).await.unwrap();
        assert!(unpriced.is_budgeted());
        assert_eq!(
            usage(&budgets, "team", None, BudgetPeriod::Day, NOON).await,
            (usd("0"), usd("0"))
        );
        // The cost became known afterwards (a vendor-reported cost, say): it counts.
        unpriced.settle(usd("0.4")).await;
        // Settling an unpriced request with 0 counts nothing.
        let unknown = budgets.reserve("team", "k", usd("0"), NOON).await.unwrap();
        unknown.settle(usd("0")).await;
        assert_eq!(
            usage(&budgets, "team", None, BudgetPeriod::Day, NOON).await,
            (usd("0.4"), usd("0")),
            "{kind:?}"
        );
        // Costs are rounded up to the nano-dollar, never down.
        let tiny = budgets.reserve("team", "k", usd("0"), NOON).await.unwrap();
        tiny.settle(usd("0.0000000001")).await;
        assert_eq!(
            usage(&budgets, "team", None, BudgetPeriod::Day, NOON).await,
            (usd("0.400000001"), usd("0")),
            "{kind:?}"
        );
        setup.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_reservation_expires() {
    for kind in ALL {
        let mut setup = Setup::new(kind).await;
        setup.settings.reservation_ttl_secs = 60;
        let budgets = setup.instance(&[project_budget("team", Some("1"), Some("10"))]);
        // Its replica "crashes": the reservation is never settled.
        let orphan = budgets.reserve("team", "k", usd("1"), NOON).await.unwrap();
        let later = NOON + time::Duration::seconds(59);
        assert!(
            budgets
                .reserve("team", "k", usd("0.5"), later)
                .await
                .is_err(),
            "{kind:?}: still held"
        );
        let expired = NOON + time::Duration::seconds(61);
        assert_eq!(
            usage(&budgets, "team", None, BudgetPeriod::Day, expired).await,
            (usd("0"), usd("0")),
            "{kind:?}"
        );
        let next = budgets
            .reserve("team", "k", usd("0.5"), expired)
            .await
            .unwrap();
        // A settlement that arrives after the expiry still counts its cost, once.
        orphan.settle(usd("0.3")).await;
        next.settle(usd("0.5")).await;
        assert_eq!(
            usage(&budgets, "team", None, BudgetPeriod::Day, expired).await,
            (usd("0.8"), usd("0")),
            "{kind:?}"
        );
        setup.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn days_and_months_roll_over_at_utc_midnight() {
    for kind in ALL {
        let setup = Setup::new(kind).await;
        let budgets = setup.instance(&[project_budget("team", Some("1"), Some("1.5"))]);
        let june_29 = datetime!(2031-06-29 23:59:59 UTC);
        let spend = |now: OffsetDateTime, cost: &'static str| {
            let budgets = budgets.clone();
            async move {
                let reservation = budgets.reserve("team", "k", usd(cost), now).await?;
                reservation.settle(usd(cost)).await;
                Ok::<(), BudgetError>(())
            }
        };
        spend(june_29, "1").await.unwrap();
        assert!(spend(june_29, "0.01").await.is_err(), "{kind:?}");
        // A new day: the daily budget starts from zero, the month goes on (0.50 left).
        let june_30 = datetime!(2031-06-30 00:00:01 UTC);
        let Err(BudgetError::Exceeded { period, spent, .. }) = spend(june_30, "0.6").await else {
            panic!("{kind:?}: the month had 0.50 left");
        };
        assert_eq!((period, spent), (BudgetPeriod::Month, usd("1")));
        spend(june_30, "0.5").await.unwrap();
        // Local time does not matter: 01:30 at +02:00 is still June 30 in UTC.
        let late = datetime!(2031-07-01 01:30 +02:00);
        assert!(spend(late, "0.01").await.is_err(), "{kind:?}");
        // A new month: both start from zero.
        let july_1 = datetime!(2031-07-01 00:00 UTC);
        spend(july_1, "1").await.unwrap();
        assert_eq!(
            usage(&budgets, "team", None, BudgetPeriod::Month, july_1).await,
            (usd("1"), usd("0"))
        );
        assert_eq!(
            usage(&budgets, "team", None, BudgetPeriod::Month, june_30).await,
            (usd("1.5"), usd("0")),
            "{kind:?}: June is kept as it was"
        );
        setup.cleanup().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Alerts.

/// A tiny HTTP server that stores the JSON body of every request and answers 204.
struct Hook {
    url: String,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn hook() -> Hook {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/alerts", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let store = bodies.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let read = stream.read(&mut buf).await.unwrap();
                    if read == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..read]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length: usize = head
                        .lines()
                        .find_map(|line| {
                            let (name, value) = line.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() < length {
                        continue;
                    }
                    store
                        .lock()
                        .unwrap()
                        .push(serde_json::from_str(body).unwrap());
                    stream
                        .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                        .await
                        .unwrap();
                    return;
                }
            });
        }
    });
    Hook { url, bodies }
}

impl Hook {
    /// Waits for `count` alerts, then a little longer to catch any extra one.
    async fn received(&self, count: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.bodies.lock().unwrap().len() < count && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.bodies.lock().unwrap().drain(..).collect()
    }
}

fn percents(bodies: &[serde_json::Value], period: &str) -> Vec<u64> {
    let mut percents: Vec<u64> = bodies
        .iter()
        .filter(|body| body["period"] == period)
        .map(|body| body["threshold_percent"].as_u64().unwrap())
        .collect();
    percents.sort_unstable();
    percents
}

/// Three replicas settle 30 requests at once; together they cross 50, 80 and 100 % of the
/// daily budget (10) and 50 % of the monthly one (30). Each alert is sent once, by one of
/// them. The next day the daily thresholds fire again.
async fn alerts_once(kind: Kind) {
    let setup = Setup::new(kind).await;
    let hook = hook().await;
    let entry = BudgetEntry {
        alert_webhook: Some(hook.url.clone()),
        ..project_budget("team", Some("10"), Some("30"))
    };
    let replicas: Vec<Budgets> = (0..if kind == Kind::Local { 1 } else { 3 })
        .map(|_| setup.instance(std::slice::from_ref(&entry)))
        .collect();
    let mut reservations = Vec::new();
    for replica in replicas.iter().cycle().take(30) {
        // 30 x 0.30 = 9 fits; each then costs more than it reserved: 30 x 0.50 = 15.
        reservations.push(
            replica
                .reserve("team", "k", usd("0.30"), NOON)
                .await
                .unwrap(),
        );
    }
    let tasks: Vec<_> = reservations
        .into_iter()
        .map(|reservation| tokio::spawn(reservation.settle(usd("0.50"))))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let bodies = hook.received(4).await;
    assert_eq!(
        percents(&bodies, "day"),
        [50, 80, 100],
        "{kind:?}: {bodies:?}"
    );
    assert_eq!(percents(&bodies, "month"), [50], "{kind:?}: {bodies:?}");
    let alerts: u64 = replicas.iter().map(|r| r.stats().alerts).sum();
    assert_eq!(alerts, 4, "{kind:?}");
    // By threshold: 50 % fired twice (day and month), 80 and 100 % once (day).
    let mut by_threshold = std::collections::BTreeMap::new();
    for replica in &replicas {
        for (percent, count) in replica.alerts_by_threshold() {
            *by_threshold.entry(percent).or_insert(0) += count;
        }
    }
    assert_eq!(
        by_threshold.into_iter().collect::<Vec<_>>(),
        [(50, 2), (80, 1), (100, 1)],
        "{kind:?}"
    );
    let sent: u64 = replicas.iter().map(|r| r.stats().webhooks_sent).sum();
    assert_eq!(sent, 4, "{kind:?}");
    let daily_full = bodies
        .iter()
        .find(|b| b["period"] == "day" && b["threshold_percent"] == 100)
        .unwrap();
    assert_eq!(daily_full["project"], "team");
    assert_eq!(daily_full["key_id"], serde_json::Value::Null);
    assert_eq!(daily_full["scope"], "project");
    assert_eq!(daily_full["period_start"], "2031-06-15");
    assert_eq!(daily_full["limit_usd"], "10");
    assert!(usd(daily_full["spent_usd"].as_str().unwrap()) >= usd("10"));

    // More spending the same day fires nothing new.
    let more = replicas[0]
        .reserve("team", "k", usd("0"), NOON)
        .await
        .unwrap_err();
    assert!(matches!(more, BudgetError::Exceeded { .. }));
    // The next day starts again: 6 of 10 is 50 % of the day, and the month reaches 21 of 30.
    let tomorrow = NOON + time::Duration::days(1);
    for replica in &replicas {
        let reservation = replica
            .reserve("team", "k", usd("2"), tomorrow)
            .await
            .unwrap();
        reservation.settle(usd("2")).await;
    }
    let expected = if kind == Kind::Local { 0 } else { 1 };
    let bodies = hook.received(expected).await;
    let day: Vec<_> = bodies
        .iter()
        .filter(|b| b["period"] == "day")
        .map(|b| {
            (
                b["threshold_percent"].as_u64().unwrap(),
                b["period_start"].clone(),
            )
        })
        .collect();
    if kind == Kind::Local {
        // One replica: 2 of 10 crosses nothing.
        assert!(day.is_empty(), "{day:?}");
    } else {
        assert_eq!(day, [(50, "2031-06-16".into())], "{kind:?}");
        assert_eq!(percents(&bodies, "month"), [] as [u64; 0], "{kind:?}");
    }
    setup.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_alerts_fire_once_across_replicas() {
    alerts_once(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_alerts_fire_once_across_replicas() {
    alerts_once(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_alerts_fire_once_across_replicas() {
    alerts_once(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_alerts_fire_once() {
    alerts_once(Kind::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_is_counted_and_changes_nothing_else() {
    let setup = Setup::new(Kind::Local).await;
    // Nothing listens on port 1.
    let entry = BudgetEntry {
        alert_webhook: Some("http://127.0.0.1:1/alerts".into()),
        ..project_budget("team", Some("1"), None)
    };
    let budgets = setup.instance(&[entry]);
    let reservation = budgets.reserve("team", "k", usd("1"), NOON).await.unwrap();
    reservation.settle(usd("1")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while budgets.stats().webhook_failures < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = budgets.stats();
    assert_eq!((stats.alerts, stats.webhook_failures), (3, 3), "{stats:?}");
    assert_eq!(stats.webhooks_sent, 0);
}

// ---------------------------------------------------------------------------------------------
// An unreachable backend.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_backend_fails_open_or_closed() {
    for kind in [Kind::Postgres, Kind::Redis] {
        for mode in [BudgetFailureMode::FailOpen, BudgetFailureMode::FailClosed] {
            let dir = tempfile::tempdir().unwrap();
            let mut settings = BudgetSettings {
                on_failure: mode,
                timeout_ms: 500,
                down_secs: 30,
                ..BudgetSettings::default()
            };
            let mut database = DatabaseConfig::default();
            // Nothing listens on port 1: every connection attempt fails at once.
            match kind {
                Kind::Postgres => database.url = "postgres://postgres@127.0.0.1:1/none".into(),
                _ => {
                    settings.backend = BudgetBackend::Redis;
                    settings.redis_url = Some("redis://127.0.0.1:1".into());
                }
            }
            database.spool_dir = dir.path().to_owned();
            let budgets = Budgets::new(
                &settings,
                &[project_budget("team", Some("1"), None)],
                &database,
            )
            .unwrap();
            let started = Instant::now();
            let first = budgets.reserve("team", "k", usd("5"), NOON).await;
            assert!(started.elapsed() < Duration::from_secs(2), "{kind:?}");
            // Marked down: the next answers come without trying.
            let started = Instant::now();
            let second = budgets.reserve("team", "k", usd("5"), NOON).await;
            assert!(started.elapsed() < Duration::from_millis(50), "{kind:?}");
            let stats = budgets.stats();
            assert_eq!(stats.backend_failures, 2, "{kind:?} {stats:?}");
            match mode {
                BudgetFailureMode::FailOpen => {
                    let (first, second) = (first.unwrap(), second.unwrap());
                    assert!(first.is_budgeted() && !first.is_backed());
                    assert_eq!(stats.fail_open_admissions, 2);
                    first.settle(usd("5")).await;
                    second.settle(usd("0")).await;
                    let stats = budgets.stats();
                    // Both tried: the second to release what the backend might hold.
                    assert_eq!(stats.settle_failures, 2, "{kind:?} {stats:?}");
                }
                BudgetFailureMode::FailClosed => {
                    assert_eq!(first.unwrap_err(), BudgetError::Unavailable);
                    assert_eq!(second.unwrap_err(), BudgetError::Unavailable);
                    assert_eq!(stats.fail_closed_rejections, 2);
                }
            }
            // A project without a budget never touches the backend.
            assert!(budgets.reserve("free", "k", usd("5"), NOON).await.is_ok());
            assert_eq!(budgets.stats().admitted, 0);
        }
    }
}

#[tokio::test]
async fn bad_settings_are_refused_with_their_paths() {
    let settings = BudgetSettings {
        backend: BudgetBackend::Redis,
        ..BudgetSettings::default()
    };
    let err = Budgets::new(
        &settings,
        &[project_budget("team", None, None)],
        &DatabaseConfig::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("budget.redis_url"), "{text}");
    assert!(text.contains("budgets[0]"), "{text}");
}
