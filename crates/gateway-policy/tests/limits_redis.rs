//! Rate limits against a real Redis at 127.0.0.1:6379: the behaviours of the in-process
//! limiter, atomicity across replicas, and what happens when Redis is gone.
//!
//! Every test uses its own random key prefix, so the tests run in parallel.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use gateway_core::RateLimit;
use gateway_policy::limits::{
    Backend, Dimension, FailureMode, LimitCheck, LimitError, LimitScope, Limiter, LimiterConfig,
    Rejection, WINDOW,
};
use std::time::{Duration, Instant};

const REDIS_URL: &str = "redis://127.0.0.1:6379";

fn prefix() -> String {
    format!("test:rl:{:016x}:", fastrand::u64(..))
}

/// Fail-closed with a generous timeout: a slow test machine must show up as `Unavailable`,
/// never as a silent local decision that would blur what Redis decided.
fn config(url: &str, prefix: &str) -> LimiterConfig {
    LimiterConfig {
        backend: Backend::Redis,
        redis_url: Some(url.to_string()),
        on_redis_failure: FailureMode::FailClosed,
        redis_timeout_ms: 2_000,
        key_prefix: prefix.to_string(),
        ..LimiterConfig::default()
    }
}

fn redis_limiter(prefix: &str) -> Limiter {
    Limiter::new(&config(REDIS_URL, prefix)).unwrap()
}

fn rpm(n: u64) -> RateLimit {
    RateLimit {
        requests_per_minute: Some(n),
        tokens_per_minute: None,
    }
}

fn tpm(n: u64) -> RateLimit {
    RateLimit {
        requests_per_minute: None,
        tokens_per_minute: Some(n),
    }
}

fn key(limit: RateLimit) -> LimitCheck {
    LimitCheck::new(LimitScope::Key, "k1", limit)
}

fn limited(rejection: Rejection) -> (LimitScope, Dimension, Duration, bool) {
    match rejection {
        Rejection::Limited {
            scope,
            dimension,
            retry_after,
            oversized,
            ..
        } => (scope, dimension, retry_after, oversized),
        Rejection::Unavailable => panic!("redis should be reachable"),
    }
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn redis_burst_then_reject_with_retry_after() {
    let limiter = redis_limiter(&prefix());
    let checks = [key(rpm(5))];
    for i in 0..5 {
        let admission = limiter.admit(&checks, 0).await.unwrap();
        let quota = admission.requests.unwrap();
        assert_eq!((quota.limit, quota.remaining), (5, 4 - i));
    }
    let (scope, dimension, retry_after, oversized) =
        limited(limiter.admit(&checks, 0).await.unwrap_err());
    assert_eq!(
        (scope, dimension, oversized),
        (LimitScope::Key, Dimension::Requests, false)
    );
    // One request per 12 s; a little of that has passed since the burst began.
    assert!(
        retry_after <= Duration::from_secs(12) && retry_after > Duration::from_secs(11),
        "{retry_after:?}"
    );
    let stats = limiter.stats();
    assert_eq!(
        (stats.admitted, stats.rejected, stats.redis_failures),
        (5, 1, 0)
    );
}

#[tokio::test]
async fn redis_quota_remaining_and_reset() {
    let limiter = redis_limiter(&prefix());
    let checks = [key(RateLimit {
        requests_per_minute: Some(10),
        tokens_per_minute: Some(6_000),
    })];
    let admission = limiter.admit(&checks, 1_500).await.unwrap();
    let requests = admission.requests.unwrap();
    assert_eq!((requests.limit, requests.remaining), (10, 9));
    assert!(requests.reset <= Duration::from_secs(6) && requests.reset > Duration::from_secs(5));
    let tokens = admission.tokens.unwrap();
    assert_eq!((tokens.limit, tokens.remaining), (6_000, 4_500));
    assert!(tokens.reset <= Duration::from_secs(15) && tokens.reset > Duration::from_secs(14));
}

#[tokio::test]
async fn redis_refills_as_time_passes() {
    let limiter = redis_limiter(&prefix());
    // One request per 500 ms.
    let checks = [key(rpm(120))];
    for _ in 0..120 {
        limiter.admit(&checks, 0).await.unwrap();
    }
    let retry_after = limited(limiter.admit(&checks, 0).await.unwrap_err()).2;
    assert!(retry_after <= Duration::from_millis(500), "{retry_after:?}");
    tokio::time::sleep(retry_after + Duration::from_millis(20)).await;
    limiter.admit(&checks, 0).await.unwrap();
    assert!(limiter.admit(&checks, 0).await.is_err());
}

#[tokio::test]
async fn redis_all_or_nothing_across_scopes() {
    let limiter = redis_limiter(&prefix());
    let project = LimitCheck::new(LimitScope::Project, "p1", rpm(2));
    let alias = LimitCheck::new(LimitScope::Alias, "fast", rpm(100));
    let both = [key(rpm(10)), project, alias.clone()];
    limiter.admit(&both, 0).await.unwrap();
    limiter.admit(&both, 0).await.unwrap();
    for _ in 0..5 {
        let (scope, ..) = limited(limiter.admit(&both, 0).await.unwrap_err());
        assert_eq!(scope, LimitScope::Project);
    }
    let key_only = limiter.admit(&[key(rpm(10))], 0).await.unwrap();
    assert_eq!(key_only.requests.unwrap().remaining, 7);
    let alias_only = limiter.admit(&[alias], 0).await.unwrap();
    assert_eq!(alias_only.requests.unwrap().remaining, 97);
}

#[tokio::test]
async fn redis_unused_tokens_are_refunded() {
    let limiter = redis_limiter(&prefix());
    // 100 tokens a second.
    let checks = [key(tpm(6_000))];
    let admission = limiter.admit(&checks, 5_000).await.unwrap();
    assert_eq!(admission.tokens.unwrap().remaining, 1_000);
    assert!(limiter.admit(&checks, 2_000).await.is_err());
    admission.settle(1_000).await;
    let peek = limiter.admit(&checks, 0).await.unwrap();
    let remaining = peek.tokens.unwrap().remaining;
    assert!((5_000..5_100).contains(&remaining), "{remaining}");
    limiter.admit(&checks, 2_000).await.unwrap();
}

#[tokio::test]
async fn redis_extra_tokens_are_charged_into_debt() {
    let limiter = redis_limiter(&prefix());
    let checks = [key(tpm(6_000))];
    let admission = limiter.admit(&checks, 3_000).await.unwrap();
    admission.settle(9_000).await;
    // 9 000 tokens is 90 s of a 60 s window; 600 more need 6 s: 36 s to wait.
    let (_, dimension, retry_after, oversized) =
        limited(limiter.admit(&checks, 600).await.unwrap_err());
    assert_eq!((dimension, oversized), (Dimension::Tokens, false));
    assert!(
        retry_after <= Duration::from_secs(36) && retry_after > Duration::from_secs(35),
        "{retry_after:?}"
    );
    let peek = limiter.admit(&checks, 0).await.unwrap();
    assert_eq!(
        peek.tokens.unwrap().remaining,
        0,
        "no reservation, no check"
    );
}

#[tokio::test]
async fn redis_settle_in_background() {
    let limiter = redis_limiter(&prefix());
    let checks = [key(tpm(6_000))];
    limiter
        .admit(&checks, 6_000)
        .await
        .unwrap()
        .settle_in_background(0);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let peek = limiter.admit(&checks, 0).await.unwrap();
        if peek.tokens.unwrap().remaining == 6_000 {
            break;
        }
        assert!(Instant::now() < deadline, "the refund never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn redis_oversized_reservation_is_rejected_without_charging() {
    let limiter = redis_limiter(&prefix());
    let checks = [key(RateLimit {
        requests_per_minute: Some(5),
        tokens_per_minute: Some(1_000),
    })];
    let rejection = limiter.admit(&checks, 1_001).await.unwrap_err();
    let Rejection::Limited { requests, .. } = &rejection else {
        panic!("redis should be reachable")
    };
    assert_eq!(requests.unwrap().remaining, 5, "nothing charged");
    assert_eq!(
        limited(rejection),
        (LimitScope::Key, Dimension::Tokens, WINDOW, true)
    );
    limiter.admit(&checks, 1_000).await.unwrap();
}

#[tokio::test]
async fn redis_keys_expire_when_paid_off() {
    let prefix = prefix();
    let limiter = redis_limiter(&prefix);
    let checks = [key(RateLimit {
        requests_per_minute: Some(10),
        tokens_per_minute: Some(1_000),
    })];
    limiter.admit(&checks, 100).await.unwrap().settle(0).await;
    let mut conn = redis().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{prefix}key:req:k1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((5_000..=6_001).contains(&ttl), "{ttl}");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}key:tok:k1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "a full refund leaves nothing to keep");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_n_admitted_across_three_replicas() {
    const LIMIT: u64 = 50;
    let prefix = prefix();
    let replicas: Vec<Limiter> = (0..3).map(|_| redis_limiter(&prefix)).collect();
    let checks = vec![
        key(rpm(LIMIT)),
        LimitCheck::new(LimitScope::Alias, "shared", rpm(1_000)),
    ];
    let mut tasks = Vec::new();
    for limiter in &replicas {
        for _ in 0..20 {
            let limiter = limiter.clone();
            let checks = checks.clone();
            tasks.push(tokio::spawn(async move {
                let (mut admitted, mut limited) = (0u64, 0u64);
                for _ in 0..5 {
                    match limiter.admit(&checks, 0).await {
                        Ok(_) => admitted += 1,
                        Err(Rejection::Limited { .. }) => limited += 1,
                        Err(Rejection::Unavailable) => panic!("redis should be reachable"),
                    }
                }
                (admitted, limited)
            }));
        }
    }
    let (mut admitted, mut limited) = (0, 0);
    for task in tasks {
        let (a, l) = task.await.unwrap();
        admitted += a;
        limited += l;
    }
    assert_eq!(admitted, LIMIT);
    assert_eq!(limited, 300 - LIMIT);
    // The alias was charged for the admitted requests only.
    let alias = replicas[0]
        .admit(
            &[LimitCheck::new(LimitScope::Alias, "shared", rpm(1_000))],
            0,
        )
        .await
        .unwrap();
    let remaining = alias.requests.unwrap().remaining;
    assert!(
        (1_000 - LIMIT - 1..1_000 - LIMIT + 2).contains(&remaining),
        "{remaining}"
    );
}

#[tokio::test]
async fn fail_open_admits_this_replicas_share_and_counts() {
    let mut config = config("redis://127.0.0.1:1", &prefix());
    config.on_redis_failure = FailureMode::FailOpen;
    config.replicas = 3;
    config.redis_timeout_ms = 50;
    let limiter = Limiter::new(&config).unwrap();
    let checks = [key(rpm(9))];
    let started = Instant::now();
    for _ in 0..3 {
        let admission = limiter.admit(&checks, 0).await.unwrap();
        assert_eq!(admission.requests.unwrap().limit, 3);
    }
    let (.., retry_after, _) = limited(limiter.admit(&checks, 0).await.unwrap_err());
    assert!(retry_after > Duration::from_secs(19), "{retry_after:?}");
    assert!(started.elapsed() < Duration::from_millis(500));
    let stats = limiter.stats();
    assert_eq!(stats.admitted, 3);
    assert_eq!(stats.rejected, 1);
    assert_eq!(stats.fail_open_decisions, 4);
    assert_eq!(stats.redis_failures, 4);
    assert_eq!(stats.fail_closed_rejections, 0);
}

#[tokio::test]
async fn fail_closed_is_unavailable_at_once() {
    let mut config = config("redis://127.0.0.1:1", &prefix());
    config.redis_timeout_ms = 50;
    let limiter = Limiter::new(&config).unwrap();
    for _ in 0..2 {
        let started = Instant::now();
        let rejection = limiter.admit(&[key(rpm(9))], 0).await.unwrap_err();
        assert_eq!(rejection, Rejection::Unavailable);
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
    }
    // A request with no limits never needs Redis.
    limiter
        .admit(&[key(RateLimit::default())], 0)
        .await
        .unwrap();
    let stats = limiter.stats();
    assert_eq!(stats.fail_closed_rejections, 2);
    assert_eq!(stats.redis_failures, 2);
    assert_eq!(stats.admitted, 1);
}

#[tokio::test]
async fn unresponsive_redis_costs_at_most_the_timeout() {
    // Accepts connections (the kernel does) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", silent.local_addr().unwrap());
    let mut config = config(&url, &prefix());
    config.on_redis_failure = FailureMode::FailOpen;
    config.redis_timeout_ms = 100;
    let limiter = Limiter::new(&config).unwrap();
    let started = Instant::now();
    limiter.admit(&[key(rpm(9))], 0).await.unwrap();
    let first = started.elapsed();
    assert!(first < Duration::from_millis(180), "{first:?}");
    // Marked down: the next check does not wait at all.
    let started = Instant::now();
    limiter.admit(&[key(rpm(9))], 0).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(20));
    assert_eq!(limiter.stats().fail_open_decisions, 2);
}

#[test]
fn building_outside_a_runtime_is_an_error_not_a_panic() {
    let result = Limiter::new(&config(REDIS_URL, &prefix()));
    assert!(matches!(result, Err(LimitError::NoRuntime)), "{result:?}");
}
