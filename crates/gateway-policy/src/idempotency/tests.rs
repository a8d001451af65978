//! In-process backend tests, on paused tokio time wherever timing is the point.

use super::*;
use tokio::time::Instant;

fn config() -> IdempotencyConfig {
    IdempotencyConfig::default()
}

fn store(config: &IdempotencyConfig) -> IdempotencyStore {
    IdempotencyStore::new(config).unwrap()
}

fn fp(body: &str) -> Fingerprint {
    IdempotencyStore::fingerprint("POST", "/v1/chat/completions", body.as_bytes())
}

fn response(body: &'static str) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from_static(body.as_bytes()),
        request_id: "req-first".into(),
    }
}

fn local_len(store: &IdempotencyStore) -> usize {
    match &store.inner.backend {
        BackendImpl::Local(local) => local.len(),
        BackendImpl::Redis(_) => panic!("local store expected"),
    }
}

async fn owner(store: &IdempotencyStore, key: &str, body: &str) -> ClaimGuard {
    match store.claim("proj", key, fp(body)).await.unwrap() {
        Claim::Owner(guard) => guard,
        other => panic!("expected owner, got {other:?}"),
    }
}

async fn expect_replay(store: &IdempotencyStore, key: &str, body: &str) -> StoredResponse {
    match store.claim("proj", key, fp(body)).await.unwrap() {
        Claim::Replay(response) => response,
        other => panic!("expected replay, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn first_claim_owns_and_a_later_duplicate_replays() {
    let store = store(&config());
    let guard = owner(&store, "k1", "body").await;
    assert!(guard.is_tracked());
    assert!(guard.complete(response("{\"answer\":1}")).await);
    let replay = expect_replay(&store, "k1", "body").await;
    assert_eq!(replay, response("{\"answer\":1}"));
    let stats = store.stats();
    assert_eq!((stats.claims, stats.replays), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn concurrent_duplicate_waits_and_replays_the_moment_the_owner_completes() {
    let store = store(&config());
    let guard = owner(&store, "k", "body").await;
    let waiter = tokio::spawn({
        let store = store.clone();
        async move {
            let claim = store.claim("proj", "k", fp("body")).await.unwrap();
            (claim, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        !waiter.is_finished(),
        "the duplicate must wait for the owner"
    );
    let completed_at = Instant::now();
    assert!(guard.complete(response("done")).await);
    let (claim, answered_at) = waiter.await.unwrap();
    assert!(matches!(claim, Claim::Replay(r) if r.body == "done"));
    assert_eq!(answered_at, completed_at, "woken at once, not on a poll");
    assert_eq!(store.stats().claims, 1, "one upstream call");
}

#[tokio::test(start_paused = true)]
async fn duplicate_gives_up_after_wait_with_retry_after() {
    let config = IdempotencyConfig {
        wait_secs: 5,
        ..config()
    };
    let store = store(&config);
    let _guard = owner(&store, "k", "body").await;
    let started = Instant::now();
    let claim = store.claim("proj", "k", fp("body")).await.unwrap();
    assert!(matches!(
        claim,
        Claim::StillInFlight { retry_after } if retry_after == Duration::from_secs(2)
    ));
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(store.stats().still_in_flight, 1);
}

#[tokio::test(start_paused = true)]
async fn different_body_conflicts_in_flight_and_completed() {
    let store = store(&config());
    let guard = owner(&store, "k", "body").await;
    let started = Instant::now();
    let claim = store.claim("proj", "k", fp("other")).await.unwrap();
    assert!(matches!(claim, Claim::Conflict));
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "a conflict does not wait"
    );
    assert!(guard.complete(response("done")).await);
    let claim = store.claim("proj", "k", fp("other")).await.unwrap();
    assert!(matches!(claim, Claim::Conflict));
    // Same body on another path is another request too.
    let other_path = IdempotencyStore::fingerprint("POST", "/v1/embeddings", b"body");
    let claim = store.claim("proj", "k", other_path).await.unwrap();
    assert!(matches!(claim, Claim::Conflict));
    assert_eq!(store.stats().conflicts, 3);
}

#[tokio::test(start_paused = true)]
async fn release_lets_the_next_claim_own() {
    let store = store(&config());
    owner(&store, "k", "body").await.release();
    let guard = owner(&store, "k", "body").await;
    // A duplicate waiting while the owner releases becomes the owner itself.
    let waiter = tokio::spawn({
        let store = store.clone();
        async move { store.claim("proj", "k", fp("body")).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    guard.release();
    let claim = waiter.await.unwrap();
    assert!(matches!(claim, Claim::Owner(ref g) if g.is_tracked()));
}

#[tokio::test(start_paused = true)]
async fn dropped_guard_releases() {
    let store = store(&config());
    let guard = owner(&store, "k", "body").await;
    let waiter = tokio::spawn({
        let store = store.clone();
        async move { store.claim("proj", "k", fp("body")).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(guard);
    assert!(matches!(waiter.await.unwrap(), Claim::Owner(_)));
}

#[tokio::test(start_paused = true)]
async fn completed_entry_expires_after_ttl() {
    let config = IdempotencyConfig {
        ttl_secs: 100,
        ..config()
    };
    let store = store(&config);
    assert!(
        owner(&store, "k", "body")
            .await
            .complete(response("r"))
            .await
    );
    tokio::time::sleep(Duration::from_secs(99)).await;
    expect_replay(&store, "k", "body").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _guard = owner(&store, "k", "body").await;
}

#[tokio::test(start_paused = true)]
async fn abandoned_claim_expires_after_in_flight_ttl() {
    let config = IdempotencyConfig {
        in_flight_ttl_secs: 10,
        wait_secs: 60,
        ..config()
    };
    let store = store(&config);
    let stale = owner(&store, "k", "body").await;
    // The waiter is let in when the claim lapses, not only at the end of its wait.
    let started = Instant::now();
    let fresh = owner(&store, "k", "body").await;
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    // The lapsed owner finishing late must not take the key from the new owner.
    assert!(!stale.complete(response("late")).await);
    let claim = store
        .claim_waiting("proj", "k", fp("body"), Duration::ZERO)
        .await
        .unwrap();
    assert!(matches!(claim, Claim::StillInFlight { .. }));
    assert!(fresh.complete(response("fresh")).await);
    assert_eq!(expect_replay(&store, "k", "body").await.body, "fresh");
}

#[tokio::test(start_paused = true)]
async fn lapsed_claim_nobody_took_still_stores_its_response() {
    let config = IdempotencyConfig {
        in_flight_ttl_secs: 10,
        ..config()
    };
    let store = store(&config);
    let slow = owner(&store, "k", "body").await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(slow.complete(response("slow")).await);
    assert_eq!(expect_replay(&store, "k", "body").await.body, "slow");
}

#[tokio::test(start_paused = true)]
async fn too_large_body_is_not_stored_and_the_key_is_released() {
    let config = IdempotencyConfig {
        max_body_bytes: 4,
        ..config()
    };
    let store = store(&config);
    assert!(
        !owner(&store, "k", "body")
            .await
            .complete(response("12345"))
            .await
    );
    assert_eq!(store.stats().too_large, 1);
    let guard = owner(&store, "k", "body").await;
    assert!(guard.complete(response("1234")).await);
    expect_replay(&store, "k", "body").await;
}

#[tokio::test(start_paused = true)]
async fn entries_are_bounded_oldest_completed_evicted_first() {
    let config = IdempotencyConfig {
        max_entries: 3,
        ..config()
    };
    let store = store(&config);
    let in_flight = owner(&store, "in-flight", "body").await;
    for i in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let guard = owner(&store, &format!("k{i}"), "body").await;
        assert!(guard.complete(response("r")).await);
        assert!(local_len(&store) <= 3);
    }
    assert_eq!(store.stats().evicted, 8);
    expect_replay(&store, "k9", "body").await;
    expect_replay(&store, "k8", "body").await;
    let _k0 = owner(&store, "k0", "body").await;
    // The in-flight claim outlived ten completed entries: evicting it could let a duplicate in.
    let claim = store
        .claim_waiting("proj", "in-flight", fp("body"), Duration::ZERO)
        .await
        .unwrap();
    assert!(matches!(claim, Claim::StillInFlight { .. }));
    drop(in_flight);
}

#[tokio::test(start_paused = true)]
async fn stored_bytes_are_bounded() {
    let config = IdempotencyConfig {
        max_stored_bytes: 1000,
        ..config()
    };
    let store = store(&config);
    let body: &'static str = "x".repeat(300).leak();
    for i in 0..10 {
        let guard = owner(&store, &format!("k{i}"), "body").await;
        assert!(guard.complete(response(body)).await);
    }
    assert_eq!(local_len(&store), 2, "two 351-byte entries fit in 1000");
    expect_replay(&store, "k9", "body").await;
}

#[tokio::test(start_paused = true)]
async fn expired_entries_are_swept_when_room_is_made() {
    let config = IdempotencyConfig {
        ttl_secs: 10,
        ..config()
    };
    let store = store(&config);
    for i in 0..50 {
        let guard = owner(&store, &format!("k{i}"), "body").await;
        assert!(guard.complete(response("r")).await);
    }
    assert_eq!(local_len(&store), 50);
    tokio::time::sleep(Duration::from_secs(11)).await;
    let _guard = owner(&store, "new", "body").await;
    assert_eq!(local_len(&store), 1);
    assert_eq!(store.stats().evicted, 0, "expiry is not eviction");
}

#[tokio::test(start_paused = true)]
async fn keys_are_per_project() {
    let store = store(&config());
    let a = store.claim("a", "k", fp("body")).await.unwrap();
    let b = store.claim("b", "k", fp("body")).await.unwrap();
    assert!(matches!((a, b), (Claim::Owner(_), Claim::Owner(_))));
}

#[tokio::test]
async fn invalid_keys_are_rejected() {
    let store = store(&config());
    let long = "k".repeat(256);
    for key in ["", "has space", "tab\t", "caf\u{e9}", long.as_str()] {
        let err = store.claim("proj", key, fp("b")).await.unwrap_err();
        assert!(matches!(err, IdempotencyError::InvalidKey), "{key:?}");
    }
    let longest = "k".repeat(255);
    assert!(matches!(
        store.claim("proj", &longest, fp("b")).await.unwrap(),
        Claim::Owner(_)
    ));
}

#[tokio::test]
async fn disabled_store_tracks_nothing() {
    let config = IdempotencyConfig {
        enabled: false,
        ..config()
    };
    let store = store(&config);
    for _ in 0..2 {
        let claim = store
            .claim("proj", "not a valid key", fp("b"))
            .await
            .unwrap();
        let Claim::Owner(guard) = claim else {
            panic!("expected owner")
        };
        assert!(!guard.is_tracked());
        assert!(!guard.complete(response("r")).await);
    }
    assert_eq!(store.stats(), IdempotencyStats::default());
}

#[test]
fn fingerprint_covers_method_path_and_body() {
    let base = IdempotencyStore::fingerprint("POST", "/v1/a", b"x");
    assert_eq!(base, IdempotencyStore::fingerprint("POST", "/v1/a", b"x"));
    assert_ne!(base, IdempotencyStore::fingerprint("PUT", "/v1/a", b"x"));
    assert_ne!(base, IdempotencyStore::fingerprint("POST", "/v1/b", b"x"));
    assert_ne!(base, IdempotencyStore::fingerprint("POST", "/v1/a", b"y"));
    assert_eq!(base.to_hex().len(), 64);
}

#[test]
fn config_defaults_and_names() {
    let parsed: IdempotencyConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(parsed, IdempotencyConfig::default());
    assert_eq!(parsed.key_prefix, "gw:idem:");
    let parsed: IdempotencyConfig = serde_json::from_str(
        r#"{"backend":"redis","redis_url":"redis://x","on_redis_failure":"fail-closed"}"#,
    )
    .unwrap();
    assert_eq!(parsed.backend, Backend::Redis);
    assert_eq!(parsed.on_redis_failure, OnRedisFailure::FailClosed);
    assert!(serde_json::from_str::<IdempotencyConfig>(r#"{"ttl":1}"#).is_err());
}

#[test]
fn redis_backend_needs_a_url() {
    let config = IdempotencyConfig {
        backend: Backend::Redis,
        ..config()
    };
    assert!(matches!(
        IdempotencyStore::new(&config),
        Err(IdempotencyError::Config(_))
    ));
}
