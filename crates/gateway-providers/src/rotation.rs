//! Redundancy inside one provider: several base URLs tried in order of preference, several keys
//! spread over the calls, and either one set aside for a while after a failure that says the
//! next call would fail the same way. Every HTTP provider kind uses it the same way.
//!
//! A call moves on to the next base URL only when connecting failed (refused, DNS, connect
//! timeout, TLS handshake): the request was never sent, so trying again cannot charge twice.
//! Anything later (a reset after sending, an HTTP status) goes back as it is. A failed key is
//! only set aside for the calls that follow; the call that failed is not retried, since the
//! vendor has seen (and may bill) it.
//!
//! Time is [`tokio::time::Instant`], so tests run the cool-downs on a paused clock.

use crate::client::HyperClient;
use crate::http::{error_chain, unavailable};
use bytes::Bytes;
use gateway_core::GatewayError;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// When each slot (a base URL or a key) is usable again, in nanoseconds after `epoch`; a time
/// not after now (0 included) means usable. Atomics rather than a lock: every call reads the
/// state, few calls write it.
#[derive(Debug)]
struct CoolDowns {
    epoch: Instant,
    until: Vec<AtomicU64>,
}

impl CoolDowns {
    fn new(slots: usize) -> Self {
        Self {
            epoch: Instant::now(),
            until: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    /// Every slot's end of cool-down, read once so that one decision sees one state.
    fn snapshot(&self) -> Vec<u64> {
        self.until
            .iter()
            .map(|until| until.load(Ordering::Relaxed))
            .collect()
    }

    /// Never shortens a longer cool-down already running: a call still in flight that fails
    /// for a lesser reason must not bring back a key just found revoked.
    fn set_aside(&self, slot: usize, cooldown: Duration) {
        if let Some(until) = self.until.get(slot) {
            until.fetch_max(
                self.now().saturating_add(nanos(cooldown)),
                Ordering::Relaxed,
            );
        }
    }

    fn restore(&self, slot: usize) {
        if let Some(until) = self.until.get(slot) {
            // Load first: in the usual case there is nothing to restore, and a store on every
            // call would bounce the cache line between cores.
            if until.load(Ordering::Relaxed) != 0 {
                until.store(0, Ordering::Relaxed);
            }
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// One provider's base URLs (or anything a request is built from per base URL), the first
/// preferred.
#[derive(Debug)]
pub(crate) struct BaseUrls<U> {
    urls: Vec<U>,
    cooldown: Duration,
    state: CoolDowns,
}

impl<U> BaseUrls<U> {
    pub(crate) fn new(urls: Vec<U>, cooldown: Duration) -> Self {
        let state = CoolDowns::new(urls.len());
        Self {
            urls,
            cooldown,
            state,
        }
    }

    /// The configured order, with the base URLs cooling down moved to the back, the one back
    /// soonest first. They are still tried: when every other one failed to connect, trying
    /// one more beats failing.
    fn order(&self) -> Vec<usize> {
        let now = self.state.now();
        let until = self.state.snapshot();
        let mut order: Vec<usize> = (0..until.len()).filter(|&i| until[i] <= now).collect();
        let mut cooling: Vec<(u64, usize)> = until
            .iter()
            .enumerate()
            .filter(|&(_, &until)| until > now)
            .map(|(index, &until)| (until, index))
            .collect();
        cooling.sort_unstable();
        order.extend(cooling.into_iter().map(|(_, index)| index));
        order
    }

    fn connect_failed(&self, index: usize) {
        self.state.set_aside(index, self.cooldown);
    }

    /// A base URL that answered is preferred in its configured place again at once, cool-down
    /// or not.
    fn connected(&self, index: usize) {
        self.state.restore(index);
    }
}

/// Sends the request that `build` makes for each base URL, in order of preference, until one
/// is connected to. Only connect errors move on: the request was never sent. Every other
/// error, and every answer whatever its status, is returned as it is.
pub(crate) async fn send<U>(
    provider: &str,
    client: &HyperClient,
    urls: &BaseUrls<U>,
    mut build: impl FnMut(&U) -> Result<Request<Full<Bytes>>, GatewayError>,
) -> Result<Response<Incoming>, GatewayError> {
    let order = urls.order();
    let mut refused = None;
    for &index in &order {
        let Some(url) = urls.urls.get(index) else {
            continue;
        };
        match client.request(build(url)?).await {
            Ok(response) => {
                urls.connected(index);
                return Ok(response);
            }
            Err(err) if err.is_connect() => {
                urls.connect_failed(index);
                tracing::warn!(
                    provider,
                    base_url_index = index,
                    cooldown_secs = urls.cooldown.as_secs(),
                    error = %error_chain(&err),
                    "could not connect to a base URL; it goes to the back of the order",
                );
                refused = Some(err);
            }
            Err(err) => return Err(unavailable(provider, &err)),
        }
    }
    match refused {
        Some(err) if order.len() > 1 => Err(GatewayError::UpstreamUnavailable {
            provider: provider.to_owned(),
            reason: format!(
                "none of the {} base URLs could be connected to; the last: {}",
                order.len(),
                error_chain(&err)
            ),
        }),
        Some(err) => Err(unavailable(provider, &err)),
        // The config check refuses a provider without base URLs.
        None => Err(GatewayError::Internal(format!(
            "provider `{provider}` has no base URL"
        ))),
    }
}

/// Why a key is set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyFault {
    /// 401 or 403: the key is invalid, revoked or not allowed.
    Refused,
    /// The key's quota or credit is used up: unlike a short rate limit, waiting seconds will
    /// not help.
    Exhausted,
}

impl KeyFault {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Exhausted => "quota_exhausted",
        }
    }
}

/// What an error status says about the key that got it. `is_exhausted` reads the vendor's
/// error body for a quota or billing error.
pub(crate) fn key_fault(
    status: StatusCode,
    body: &[u8],
    is_exhausted: fn(&Value) -> bool,
) -> Option<KeyFault> {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Some(KeyFault::Refused),
        // Payment Required is only ever about the account's money (relays use it for "no
        // credit left").
        StatusCode::PAYMENT_REQUIRED => Some(KeyFault::Exhausted),
        _ if status.is_client_error() => serde_json::from_slice::<Value>(body)
            .ok()
            .filter(is_exhausted)
            .map(|_| KeyFault::Exhausted),
        _ => None,
    }
}

/// The key chosen for one call.
#[derive(Debug, Clone)]
pub(crate) struct Key {
    index: usize,
    pub(crate) value: HeaderValue,
}

/// One provider's keys, ready-made as sensitive header values.
#[derive(Debug)]
pub(crate) struct Keys {
    values: Vec<HeaderValue>,
    next: AtomicUsize,
    exhausted_cooldown: Duration,
    refused_cooldown: Duration,
    state: CoolDowns,
}

impl Keys {
    /// The provider's configured keys, shaped into header values by `format`, with the
    /// provider's cool-downs. Invalid keys are reported into `errors`.
    pub(crate) fn from_config(
        config: &crate::config::ProviderConfig,
        path: &str,
        format: impl Fn(&str) -> String,
        errors: &mut Vec<gateway_core::config::ConfigError>,
    ) -> Self {
        Self::new(
            crate::http::sensitive_values(config, path, format, errors),
            config.key_cooldown(),
            config.key_revoked_cooldown(),
        )
    }

    pub(crate) fn new(
        values: Vec<HeaderValue>,
        exhausted_cooldown: Duration,
        refused_cooldown: Duration,
    ) -> Self {
        let state = CoolDowns::new(values.len());
        Self {
            values,
            next: AtomicUsize::new(0),
            exhausted_cooldown,
            refused_cooldown,
            state,
        }
    }

    /// Round-robin over the keys not set aside; when all are, the one back soonest, which is
    /// likelier to work than failing the call outright. `None` when there are no keys.
    pub(crate) fn pick(&self) -> Option<Key> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let index = if self.values.len() <= 1 {
            0
        } else {
            let now = self.state.now();
            let until = self.state.snapshot();
            let ready = until.iter().filter(|&&until| until <= now).count();
            let chosen = if ready == 0 {
                until.iter().enumerate().min_by_key(|&(_, &until)| until)
            } else {
                until
                    .iter()
                    .enumerate()
                    .filter(|&(_, &until)| until <= now)
                    .nth(turn % ready)
            };
            chosen.map_or(0, |(index, _)| index)
        };
        self.values.get(index).map(|value| Key {
            index,
            value: value.clone(),
        })
    }

    /// After an error status: sets the call's key aside when the error says the next call with
    /// it would fail too.
    pub(crate) fn judge(
        &self,
        provider: &str,
        key: Option<&Key>,
        status: StatusCode,
        body: &[u8],
        is_exhausted: fn(&Value) -> bool,
    ) {
        if let Some(key) = key
            && let Some(fault) = key_fault(status, body, is_exhausted)
        {
            self.set_aside(provider, key.index, fault);
        }
    }

    /// Logs the key's index, never the key: the index is all an operator needs to find it in
    /// the config.
    fn set_aside(&self, provider: &str, index: usize, fault: KeyFault) {
        let cooldown = match fault {
            KeyFault::Refused => self.refused_cooldown,
            KeyFault::Exhausted => self.exhausted_cooldown,
        };
        self.state.set_aside(index, cooldown);
        let now = self.state.now();
        let keys_left = self
            .state
            .snapshot()
            .iter()
            .filter(|&&until| until <= now)
            .count();
        tracing::warn!(
            provider,
            key_index = index,
            reason = fault.as_str(),
            cooldown_secs = cooldown.as_secs(),
            keys_left,
            "upstream key set aside",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::time::advance;

    const SECOND: Duration = Duration::from_secs(1);

    fn keys(count: usize) -> Keys {
        let values = (0..count)
            .map(|i| HeaderValue::from_str(&format!("sk-secret-{i}")).unwrap())
            .collect();
        Keys::new(values, 60 * SECOND, 300 * SECOND)
    }

    fn picks(keys: &Keys, count: usize) -> Vec<usize> {
        (0..count).map(|_| keys.pick().unwrap().index).collect()
    }

    fn never(_: &Value) -> bool {
        false
    }

    fn always(_: &Value) -> bool {
        true
    }

    #[tokio::test(start_paused = true)]
    async fn base_urls_go_to_the_back_for_their_cooldown() {
        let urls = BaseUrls::new(vec!["a", "b", "c"], 30 * SECOND);
        assert_eq!(urls.order(), [0, 1, 2]);
        urls.connect_failed(0);
        assert_eq!(urls.order(), [1, 2, 0]);
        advance(10 * SECOND).await;
        urls.connect_failed(1);
        assert_eq!(urls.order(), [2, 0, 1], "the one back soonest comes first");
        advance(20 * SECOND).await;
        assert_eq!(urls.order(), [0, 2, 1], "the first is preferred again");
        advance(10 * SECOND).await;
        assert_eq!(urls.order(), [0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_base_url_that_connects_is_preferred_again_at_once() {
        let urls = BaseUrls::new(vec!["a", "b"], 30 * SECOND);
        urls.connect_failed(0);
        assert_eq!(urls.order(), [1, 0]);
        urls.connected(0);
        assert_eq!(urls.order(), [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_during_the_cooldown_extends_it() {
        let urls = BaseUrls::new(vec!["a", "b"], 30 * SECOND);
        urls.connect_failed(0);
        advance(20 * SECOND).await;
        urls.connect_failed(0);
        advance(20 * SECOND).await;
        assert_eq!(urls.order(), [1, 0]);
        advance(10 * SECOND).await;
        assert_eq!(urls.order(), [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_used_round_robin() {
        assert_eq!(picks(&keys(3), 7), [0, 1, 2, 0, 1, 2, 0]);
        assert!(keys(0).pick().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_key_is_skipped_until_its_cooldown_ends() {
        let keys = keys(3);
        let first = keys.pick().unwrap();
        assert_eq!(first.index, 0);
        keys.judge("p", Some(&first), StatusCode::UNAUTHORIZED, b"", never);
        assert_eq!(picks(&keys, 4), [2, 1, 2, 1], "only the keys not set aside");
        advance(299 * SECOND).await;
        assert!(!picks(&keys, 6).contains(&0));
        advance(SECOND).await;
        let mut back = picks(&keys, 3);
        back.sort_unstable();
        assert_eq!(back, [0, 1, 2], "back in the rotation after 300 s");
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_key_comes_back_sooner_than_a_refused_one() {
        let keys = keys(3);
        let exhausted = keys.pick().unwrap();
        let refused = keys.pick().unwrap();
        keys.judge(
            "p",
            Some(&exhausted),
            StatusCode::TOO_MANY_REQUESTS,
            b"{}",
            always,
        );
        keys.judge("p", Some(&refused), StatusCode::FORBIDDEN, b"", never);
        assert_eq!(picks(&keys, 3), [2, 2, 2]);
        advance(60 * SECOND).await;
        let mut seen = picks(&keys, 4);
        seen.sort_unstable();
        assert_eq!(seen, [0, 0, 2, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lesser_fault_does_not_shorten_a_revocation() {
        let keys = keys(2);
        let key = keys.pick().unwrap();
        keys.judge("p", Some(&key), StatusCode::UNAUTHORIZED, b"", never);
        keys.judge("p", Some(&key), StatusCode::PAYMENT_REQUIRED, b"", never);
        advance(61 * SECOND).await;
        assert_eq!(picks(&keys, 3), [1, 1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_key_is_set_aside_the_one_back_soonest_is_used() {
        let keys = keys(3);
        let all: Vec<Key> = (0..3).map(|_| keys.pick().unwrap()).collect();
        keys.judge("p", Some(&all[0]), StatusCode::UNAUTHORIZED, b"", never);
        keys.judge("p", Some(&all[1]), StatusCode::UNAUTHORIZED, b"", never);
        advance(SECOND).await;
        keys.judge("p", Some(&all[2]), StatusCode::PAYMENT_REQUIRED, b"", never);
        assert_eq!(picks(&keys, 3), [2, 2, 2]);
        advance(61 * SECOND).await;
        assert_eq!(picks(&keys, 2), [2, 2], "key 2 is back, the others are not");
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_key_is_used_even_when_set_aside() {
        let keys = keys(1);
        let key = keys.pick().unwrap();
        keys.judge("p", Some(&key), StatusCode::UNAUTHORIZED, b"", never);
        assert_eq!(picks(&keys, 2), [0, 0]);
    }

    #[test]
    fn which_errors_set_a_key_aside() {
        let cases = [
            (
                StatusCode::UNAUTHORIZED,
                never as fn(&Value) -> bool,
                Some(KeyFault::Refused),
            ),
            (StatusCode::FORBIDDEN, never, Some(KeyFault::Refused)),
            (
                StatusCode::PAYMENT_REQUIRED,
                never,
                Some(KeyFault::Exhausted),
            ),
            (StatusCode::TOO_MANY_REQUESTS, never, None),
            (
                StatusCode::TOO_MANY_REQUESTS,
                always,
                Some(KeyFault::Exhausted),
            ),
            (StatusCode::BAD_REQUEST, always, Some(KeyFault::Exhausted)),
            (StatusCode::INTERNAL_SERVER_ERROR, always, None),
            (StatusCode::SERVICE_UNAVAILABLE, always, None),
        ];
        for (status, is_exhausted, expected) in cases {
            assert_eq!(key_fault(status, b"{}", is_exhausted), expected, "{status}");
        }
        assert_eq!(
            key_fault(StatusCode::TOO_MANY_REQUESTS, b"not json", always),
            None,
            "an unreadable body is an ordinary rate limit"
        );
    }

    /// Records every event's fields as `name=value` text.
    struct Capture(Arc<Mutex<Vec<String>>>);

    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }

        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }

        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

        fn event(&self, event: &tracing::Event<'_>) {
            let mut line = format!("level={} ", event.metadata().level());
            event.record(
                &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                    line.push_str(&format!("{}={value:?} ", field.name()));
                },
            );
            self.0.lock().unwrap().push(line);
        }

        fn enter(&self, _: &tracing::span::Id) {}

        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn setting_a_key_aside_logs_its_index_never_the_key() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let keys = keys(2);
        tracing::subscriber::with_default(Capture(lines.clone()), || {
            let _ = keys.pick();
            let second = keys.pick().unwrap();
            keys.judge("relay", Some(&second), StatusCode::FORBIDDEN, b"", never);
            // An ordinary error logs nothing.
            keys.judge("relay", Some(&second), StatusCode::BAD_GATEWAY, b"", never);
        });
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        for expected in [
            "level=WARN",
            "provider=\"relay\"",
            "key_index=1",
            "reason=\"refused\"",
            "cooldown_secs=300",
            "keys_left=1",
        ] {
            assert!(line.contains(expected), "{expected} not in {line}");
        }
        assert!(!line.contains("sk-secret"), "{line}");
    }
}
