//! Slowing down key guessing: refused keys are counted per client IP in a fixed window that
//! opens with the IP's first failure; past the limit the IP gets 429 without its key being
//! looked at until the window ends.
//!
//! Why not a GCRA limiter (governor): it can only be charged, not asked, and successful
//! requests must not be charged (a busy, well-behaved client would be throttled), while a
//! blocked IP must be refused before its key is checked. A small map with a hard size bound
//! does both.

use crate::config::AuthFailureConfig;
use gateway_core::{ClientIp, PeerAddr};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The client IP a request's failures are counted against.
///
/// The client IP the server resolved (behind trusted proxies, the address they reported),
/// else the TCP peer: throttling the load balancer's own address would throttle everyone.
/// IPv6 clients are counted per /64, the block one host usually holds, so walking through its
/// addresses does not reset the count.
pub(crate) fn throttle_key<B>(request: &http::Request<B>) -> Option<IpAddr> {
    let extensions = request.extensions();
    let ip = match extensions.get::<ClientIp>() {
        Some(client) => client.0,
        None => extensions.get::<PeerAddr>()?.0.ip(),
    };
    Some(match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::from(segments)
        }
        v4 @ IpAddr::V4(_) => v4,
    })
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// Counters of the throttle, for the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ThrottleStats {
    /// Requests refused with 429 because their IP failed too often.
    pub throttled: u64,
    /// Refused keys counted.
    pub failures: u64,
    /// IPs currently remembered.
    pub tracked_ips: usize,
    /// Failures not counted because the table was full of live windows.
    pub untracked: u64,
}

#[derive(Debug)]
pub struct AuthThrottle {
    max_failures: u32,
    window: Duration,
    max_tracked: usize,
    windows: Mutex<HashMap<IpAddr, Window>>,
    throttled: AtomicU64,
    failures: AtomicU64,
    untracked: AtomicU64,
}

impl AuthThrottle {
    pub fn new(config: &AuthFailureConfig) -> Self {
        Self {
            max_failures: config.max_failures,
            window: Duration::from_secs(config.window_secs.max(1)),
            max_tracked: config.max_tracked_ips.max(1),
            windows: Mutex::new(HashMap::new()),
            throttled: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            untracked: AtomicU64::new(0),
        }
    }

    fn enabled(&self) -> bool {
        self.max_failures > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Window>> {
        // The map holds counters only: one a panicking thread left half-updated is still fine.
        self.windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long `ip` must wait, when it has used up its failures for the current window.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if !self.enabled() {
            return None;
        }
        let windows = self.lock();
        let window = windows.get(&ip)?;
        let ends = window.started + self.window;
        (window.failures >= self.max_failures && now < ends).then(|| {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            ends - now
        })
    }

    /// Counts a refused key from `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        if !self.enabled() {
            return;
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut windows = self.lock();
        if !windows.contains_key(&ip) && windows.len() >= self.max_tracked {
            let window = self.window;
            windows.retain(|_, w| now.saturating_duration_since(w.started) < window);
            if windows.len() >= self.max_tracked {
                self.untracked.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let entry = windows.entry(ip).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.saturating_duration_since(entry.started) >= self.window {
            *entry = Window {
                started: now,
                failures: 0,
            };
        }
        entry.failures = entry.failures.saturating_add(1);
    }

    pub fn stats(&self) -> ThrottleStats {
        ThrottleStats {
            throttled: self.throttled.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            tracked_ips: self.lock().len(),
            untracked: self.untracked.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;
    use std::net::SocketAddr;

    fn throttle(max_failures: u32, max_tracked_ips: usize) -> AuthThrottle {
        AuthThrottle::new(&AuthFailureConfig {
            max_failures,
            window_secs: 60,
            max_tracked_ips,
        })
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let throttle = throttle(3, 100);
        let start = Instant::now();
        for n in 0..3 {
            assert_eq!(throttle.check(ip(1), start), None, "failure {n}");
            throttle.record_failure(ip(1), start + Duration::from_secs(n));
        }
        let wait = throttle
            .check(ip(1), start + Duration::from_secs(10))
            .unwrap();
        assert_eq!(wait, Duration::from_secs(50));
        assert_eq!(
            throttle.check(ip(2), start),
            None,
            "other IPs are not affected"
        );
        assert_eq!(throttle.check(ip(1), start + Duration::from_secs(60)), None);
        // A new window starts from zero.
        throttle.record_failure(ip(1), start + Duration::from_secs(61));
        assert_eq!(throttle.check(ip(1), start + Duration::from_secs(62)), None);
        assert_eq!(throttle.stats().throttled, 1);
    }

    #[test]
    fn memory_is_bounded_and_expired_windows_make_room() {
        let throttle = throttle(1, 2);
        let start = Instant::now();
        throttle.record_failure(ip(1), start);
        throttle.record_failure(ip(2), start);
        throttle.record_failure(ip(3), start);
        assert_eq!(throttle.stats().tracked_ips, 2);
        assert_eq!(throttle.stats().untracked, 1);
        assert!(throttle.check(ip(3), start).is_none());
        let later = start + Duration::from_secs(61);
        throttle.record_failure(ip(3), later);
        assert_eq!(throttle.stats().tracked_ips, 1);
        assert!(throttle.check(ip(3), later).is_some());
    }

    #[test]
    fn zero_turns_it_off() {
        let throttle = throttle(0, 10);
        let now = Instant::now();
        for _ in 0..100 {
            throttle.record_failure(ip(1), now);
        }
        assert_eq!(throttle.check(ip(1), now), None);
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let request = |addr: &str| {
            let mut request = http::Request::new(());
            let addr: SocketAddr = addr.parse().unwrap();
            request.extensions_mut().insert(PeerAddr(addr));
            request
        };
        let a = throttle_key(&request("[2001:db8:1:2:aaaa::1]:5000")).unwrap();
        let b = throttle_key(&request("[2001:db8:1:2:bbbb::9]:6000")).unwrap();
        let c = throttle_key(&request("[2001:db8:1:3::1]:6000")).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            throttle_key(&request("[::ffff:192.0.2.1]:1")).unwrap(),
            IpAddr::from([192, 0, 2, 1])
        );
        assert_eq!(throttle_key(&http::Request::new(())), None);
    }
}
