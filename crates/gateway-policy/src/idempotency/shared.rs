//! The Redis backend, shared by every replica.
//!
//! One string per (project, key): `p:<fingerprint>:<owner token>` while in flight (PX
//! `in_flight_ttl`), then `d:<fingerprint>:<encoded response>` (PX `ttl`). Every step is one
//! Lua script, so claim-or-read, complete-if-still-mine and release-if-still-mine are atomic.
//! The owner token makes a late completion or release from an owner whose claim lapsed
//! harmless to the owner that came after it.
//!
//! Duplicates wait by re-running the claim script on a short, growing interval. That is
//! simpler than pub/sub to keep correct across reconnects, and it has a useful property: a
//! waiter whose owner released or expired becomes the new owner in the same atomic step.

use super::codec;
use super::{
    Counters, Fingerprint, IdempotencyError, Lease, OnRedisFailure, Outcome,
    STILL_IN_FLIGHT_RETRY_AFTER, StoredResponse, retry_after,
};
use crate::redis_link::{RedisLink, RedisUnavailable};
use redis::Script;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

const FIRST_POLL: Duration = Duration::from_millis(25);
const MAX_POLL: Duration = Duration::from_millis(200);

/// KEYS[1] the entry; ARGV fingerprint, owner token, in-flight TTL in ms.
/// Returns {tag, payload}: owner | conflict | replay + encoded response | pending + PTTL.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'p:' .. ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
  return {'owner', ''}
end
if string.sub(v, 3, 66) ~= ARGV[1] then
  return {'conflict', ''}
end
if string.sub(v, 1, 2) == 'd:' then
  return {'replay', string.sub(v, 68)}
end
return {'pending', tostring(redis.call('PTTL', KEYS[1]))}
";

/// KEYS[1] the entry; ARGV our pending value, the completed value, TTL in ms. Stores when
/// the claim is still ours or has lapsed with nobody after it; 1 when stored.
const COMPLETE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or not v then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// KEYS[1] the entry; ARGV our pending value. Deletes it only if it is still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

pub(super) struct RedisBackend {
    link: RedisLink,
    prefix: String,
    ttl_ms: u64,
    in_flight_ttl_ms: u64,
    on_failure: OnRedisFailure,
    counters: Arc<Counters>,
    claim: Script,
    complete: Script,
    release: Script,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("link", &self.link)
            .field("prefix", &self.prefix)
            .field("on_failure", &self.on_failure)
            .finish_non_exhaustive()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl RedisBackend {
    pub(super) fn new(
        link: RedisLink,
        prefix: String,
        ttl: Duration,
        in_flight_ttl: Duration,
        on_failure: OnRedisFailure,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            link,
            prefix,
            ttl_ms: millis(ttl),
            in_flight_ttl_ms: millis(in_flight_ttl),
            on_failure,
            counters,
            claim: Script::new(CLAIM),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
        }
    }

    /// The project's length goes first so `("a:b", "c")` and `("a", "b:c")` stay apart.
    fn entry_key(&self, project: &str, key: &str) -> String {
        format!("{}{}:{project}:{key}", self.prefix, project.len())
    }

    pub(super) async fn claim(
        self: &Arc<Self>,
        project: &str,
        key: &str,
        fingerprint: Fingerprint,
        deadline: Instant,
    ) -> Result<Outcome, IdempotencyError> {
        let entry = self.entry_key(project, key);
        let fingerprint_hex = fingerprint.to_hex();
        let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let mut poll = FIRST_POLL;
        loop {
            let answer = self
                .link
                .run(|mut conn| {
                    let script = &self.claim;
                    let (entry, fingerprint_hex, token) = (&entry, &fingerprint_hex, &token);
                    let ttl = self.in_flight_ttl_ms;
                    async move {
                        let mut call = script.key(entry);
                        call.arg(fingerprint_hex).arg(token).arg(ttl);
                        call.invoke_async::<(String, Vec<u8>)>(&mut conn).await
                    }
                })
                .await;
            let (tag, payload) = match answer {
                Ok(answer) => answer,
                Err(err) => return self.unavailable(err),
            };
            match tag.as_str() {
                "owner" => {
                    return Ok(Outcome::Owner(Lease::Redis(RedisLease {
                        pending: format!("p:{fingerprint_hex}:{token}"),
                        fingerprint_hex,
                        entry,
                        backend: self.clone(),
                    })));
                }
                "conflict" => return Ok(Outcome::Conflict),
                "replay" => match codec::decode(&payload) {
                    Ok(response) => return Ok(Outcome::Replay(response)),
                    Err(err) => {
                        // Written by a replica with another layout: proceed as if it were not
                        // there rather than replay something misread.
                        tracing::warn!(%err, "unreadable idempotency entry; not replaying it");
                        return Ok(Outcome::Owner(Lease::Noop));
                    }
                },
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                let claim_left = std::str::from_utf8(&payload)
                    .ok()
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .map_or(STILL_IN_FLIGHT_RETRY_AFTER, Duration::from_millis);
                return Ok(Outcome::StillInFlight {
                    retry_after: retry_after(claim_left),
                });
            }
            tokio::time::sleep(poll.min(deadline - now)).await;
            poll = (poll * 2).min(MAX_POLL);
        }
    }

    fn unavailable(&self, err: RedisUnavailable) -> Result<Outcome, IdempotencyError> {
        self.counters
            .redis_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // While the link is marked down every request lands here; one warning per outage
        // (the one that marked it down) is enough.
        if matches!(err, RedisUnavailable::MarkedDown) {
            tracing::debug!(%err, "idempotency store unavailable");
        } else {
            tracing::warn!(%err, on_failure = ?self.on_failure, "idempotency store unavailable");
        }
        match self.on_failure {
            OnRedisFailure::FailOpen => Ok(Outcome::Owner(Lease::Noop)),
            OnRedisFailure::FailClosed => Err(IdempotencyError::Unavailable(err)),
        }
    }

    fn lost(&self, what: &str, err: &RedisUnavailable) {
        self.counters
            .redis_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(%err, "idempotency {what} not written to redis; the claim will expire");
    }
}

/// An owner's handle on its Redis claim.
#[derive(Debug)]
pub(super) struct RedisLease {
    backend: Arc<RedisBackend>,
    entry: String,
    /// The exact pending value we wrote: the proof of ownership.
    pending: String,
    fingerprint_hex: String,
}

impl RedisLease {
    pub(super) async fn complete(self, response: StoredResponse) -> bool {
        let encoded = codec::encode(&response);
        let mut done = Vec::with_capacity(encoded.len() + 67);
        done.extend_from_slice(b"d:");
        done.extend_from_slice(self.fingerprint_hex.as_bytes());
        done.push(b':');
        done.extend_from_slice(&encoded);
        let backend = &self.backend;
        let answer = backend
            .link
            .run(|mut conn| {
                let (script, entry, pending, done) =
                    (&backend.complete, &self.entry, &self.pending, &done);
                let ttl = backend.ttl_ms;
                async move {
                    let mut call = script.key(entry);
                    call.arg(pending).arg(done).arg(ttl);
                    call.invoke_async::<i64>(&mut conn).await
                }
            })
            .await;
        match answer {
            Ok(1) => true,
            Ok(_) => {
                tracing::debug!("idempotency claim was taken over before completion; not stored");
                false
            }
            Err(err) => {
                backend.lost("completion", &err);
                false
            }
        }
    }

    /// Releases in a spawned task (`Drop` cannot await). Without a runtime the pending
    /// claim's TTL frees the key instead.
    pub(super) fn release_in_background(self) {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(self.release());
            }
            Err(_) => tracing::debug!("no runtime to release an idempotency claim; it will expire"),
        }
    }

    async fn release(self) {
        let backend = &self.backend;
        let answer = backend
            .link
            .run(|mut conn| {
                let (script, entry, pending) = (&backend.release, &self.entry, &self.pending);
                async move {
                    let mut call = script.key(entry);
                    call.arg(pending);
                    call.invoke_async::<i64>(&mut conn).await
                }
            })
            .await;
        if let Err(err) = answer {
            backend.lost("release", &err);
        }
    }
}
