//! The Redis idempotency backend across replicas: two stores on one Redis behave as one.
//!
//! Needs a Redis on 127.0.0.1:6379. Every test uses its own key prefix, so tests can run in
//! parallel and against a Redis that holds other data.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use bytes::Bytes;
use gateway_policy::idempotency::{
    Backend, Claim, ClaimGuard, Fingerprint, IdempotencyConfig, IdempotencyError, IdempotencyStore,
    OnRedisFailure, StoredResponse,
};
use std::time::{Duration, Instant};

const REDIS_URL: &str = "redis://127.0.0.1:6379";

fn config(test: &str) -> IdempotencyConfig {
    IdempotencyConfig {
        backend: Backend::Redis,
        redis_url: Some(REDIS_URL.to_string()),
        // A per-run nonce, so a rerun never sees an earlier run's keys.
        key_prefix: format!("test:idem:{test}:{:016x}:", fastrand::u64(..)),
        ..IdempotencyConfig::default()
    }
}

/// Two replicas: separate stores (and connections) on the same Redis and prefix.
fn replicas(config: &IdempotencyConfig) -> (IdempotencyStore, IdempotencyStore) {
    (
        IdempotencyStore::new(config).unwrap(),
        IdempotencyStore::new(config).unwrap(),
    )
}

fn fp(body: &str) -> Fingerprint {
    IdempotencyStore::fingerprint("POST", "/v1/chat/completions", body.as_bytes())
}

fn response(body: &'static [u8]) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("openai-processing-ms".into(), "12".into()),
        ],
        body: Bytes::from_static(body),
        request_id: "req-first".into(),
    }
}

async fn owner(store: &IdempotencyStore, key: &str, body: &str) -> ClaimGuard {
    match store.claim("proj", key, fp(body)).await.unwrap() {
        Claim::Owner(guard) => {
            assert!(guard.is_tracked(), "redis is up: the claim must be tracked");
            guard
        }
        other => panic!("expected owner, got {other:?}"),
    }
}

async fn claim_now(store: &IdempotencyStore, key: &str, body: &str) -> Claim {
    store
        .claim_waiting("proj", key, fp(body), Duration::ZERO)
        .await
        .unwrap()
}

#[tokio::test]
async fn one_replica_owns_the_other_waits_and_replays() {
    let (a, b) = replicas(&config("replay"));
    let guard = owner(&a, "k", "body").await;
    let waiter = tokio::spawn({
        let b = b.clone();
        async move {
            let claim = b.claim("proj", "k", fp("body")).await.unwrap();
            (claim, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !waiter.is_finished(),
        "the duplicate must wait for the owner"
    );
    let completed_at = Instant::now();
    // Binary bytes survive the encoding.
    assert!(guard.complete(response(b"{\"x\":1}\0\xff")).await);
    let (claim, answered_at) = waiter.await.unwrap();
    let Claim::Replay(replayed) = claim else {
        panic!("expected replay, got {claim:?}")
    };
    assert_eq!(replayed, response(b"{\"x\":1}\0\xff"));
    assert!(
        answered_at.duration_since(completed_at) < Duration::from_millis(300),
        "polling must notice the completion promptly"
    );
    // Later duplicates on either replica replay at once.
    assert!(matches!(claim_now(&a, "k", "body").await, Claim::Replay(_)));
    assert!(matches!(claim_now(&b, "k", "body").await, Claim::Replay(_)));
    assert_eq!(a.stats().claims + b.stats().claims, 1, "one upstream call");
    assert_eq!(b.stats().replays, 2);
}

#[tokio::test]
async fn conflict_across_replicas_in_flight_and_completed() {
    let (a, b) = replicas(&config("conflict"));
    let guard = owner(&a, "k", "body").await;
    let started = Instant::now();
    let claim = b.claim("proj", "k", fp("other")).await.unwrap();
    assert!(matches!(claim, Claim::Conflict), "{claim:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a conflict does not wait"
    );
    assert!(guard.complete(response(b"r")).await);
    assert!(matches!(claim_now(&b, "k", "other").await, Claim::Conflict));
    assert_eq!(b.stats().conflicts, 2);
}

#[tokio::test]
async fn release_across_replicas_lets_the_waiter_own() {
    let (a, b) = replicas(&config("release"));
    let guard = owner(&a, "k", "body").await;
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.claim("proj", "k", fp("body")).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    guard.release();
    let claim = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .unwrap()
        .unwrap();
    let Claim::Owner(second) = claim else {
        panic!("expected the waiter to own after release, got {claim:?}")
    };
    assert!(second.is_tracked());
    assert!(second.complete(response(b"second")).await);
    let Claim::Replay(replayed) = claim_now(&a, "k", "body").await else {
        panic!("expected replay")
    };
    assert_eq!(replayed.body, "second");
}

#[tokio::test]
async fn dropped_guard_releases_across_replicas() {
    let (a, b) = replicas(&config("drop"));
    drop(owner(&a, "k", "body").await);
    let claim = tokio::time::timeout(Duration::from_secs(2), b.claim("proj", "k", fp("body")))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(claim, Claim::Owner(ref g) if g.is_tracked()),
        "{claim:?}"
    );
}

#[tokio::test]
async fn abandoned_claim_expires_and_a_new_owner_gets_in() {
    let config = IdempotencyConfig {
        in_flight_ttl_secs: 1,
        ..config("expiry")
    };
    let (a, b) = replicas(&config);
    let stale = owner(&a, "k", "body").await;
    let claim = claim_now(&b, "k", "body").await;
    assert!(
        matches!(claim, Claim::StillInFlight { retry_after } if retry_after == Duration::from_secs(1)),
        "{claim:?}"
    );
    let started = Instant::now();
    let fresh = owner(&b, "k", "body").await;
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_millis(500) && waited < Duration::from_secs(2),
        "the waiter gets in when the claim lapses ({waited:?})"
    );
    // The lapsed owner's late completion must not take the key from the new owner.
    assert!(!stale.complete(response(b"late")).await);
    assert!(matches!(
        claim_now(&a, "k", "body").await,
        Claim::StillInFlight { .. }
    ));
    assert!(fresh.complete(response(b"fresh")).await);
    let Claim::Replay(replayed) = claim_now(&a, "k", "body").await else {
        panic!("expected replay")
    };
    assert_eq!(replayed.body, "fresh");
}

#[tokio::test]
async fn completed_entry_lives_ttl_and_too_large_is_not_stored() {
    let config = IdempotencyConfig {
        ttl_secs: 1,
        max_body_bytes: 8,
        ..config("ttl")
    };
    let (a, b) = replicas(&config);
    assert!(
        !owner(&a, "big", "body")
            .await
            .complete(response(b"123456789"))
            .await
    );
    assert_eq!(a.stats().too_large, 1);
    // The release after a too-large response runs in the background; the retry must get in.
    let retry = tokio::time::timeout(Duration::from_secs(2), b.claim("proj", "big", fp("body")))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(retry, Claim::Owner(_)), "{retry:?}");

    assert!(
        owner(&a, "k", "body")
            .await
            .complete(response(b"small"))
            .await
    );
    assert!(matches!(claim_now(&b, "k", "body").await, Claim::Replay(_)));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let _again = owner(&b, "k", "body").await;
}

#[tokio::test]
async fn projects_and_prefixes_keep_keys_apart() {
    let config = config("apart");
    let (a, _) = replicas(&config);
    // ("p:x", "k") and ("p", "x:k") must not share an entry.
    let first = a.claim("p:x", "k", fp("body")).await.unwrap();
    let second = a.claim("p", "x:k", fp("body")).await.unwrap();
    assert!(matches!(
        (&first, &second),
        (Claim::Owner(_), Claim::Owner(_))
    ));
    let other_prefix = IdempotencyConfig {
        key_prefix: format!("{}other:", config.key_prefix),
        ..config.clone()
    };
    let c = IdempotencyStore::new(&other_prefix).unwrap();
    assert!(matches!(
        c.claim("p:x", "k", fp("body")).await.unwrap(),
        Claim::Owner(_)
    ));
}

fn unreachable(on_redis_failure: OnRedisFailure) -> IdempotencyStore {
    IdempotencyStore::new(&IdempotencyConfig {
        backend: Backend::Redis,
        redis_url: Some("redis://127.0.0.1:1".to_string()),
        on_redis_failure,
        ..IdempotencyConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn fail_open_goes_on_untracked_and_quickly() {
    let store = unreachable(OnRedisFailure::FailOpen);
    for _ in 0..3 {
        let started = Instant::now();
        let claim = store.claim("proj", "k", fp("body")).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        let Claim::Owner(guard) = claim else {
            panic!("fail-open must let the request through, got {claim:?}")
        };
        assert!(!guard.is_tracked());
        assert!(!guard.complete(response(b"r")).await);
    }
    let stats = store.stats();
    assert_eq!(stats.redis_failures, 3);
    assert_eq!(stats.claims, 0);
}

#[tokio::test]
async fn fail_closed_refuses_quickly() {
    let store = unreachable(OnRedisFailure::FailClosed);
    for _ in 0..3 {
        let started = Instant::now();
        let err = store.claim("proj", "k", fp("body")).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(matches!(err, IdempotencyError::Unavailable(_)), "{err:?}");
    }
    assert_eq!(store.stats().redis_failures, 3);
}
