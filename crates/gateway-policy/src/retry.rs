//! Retrying recoverable upstream errors: the back-off between attempts, the vendor's
//! `Retry-After`, and a process-wide retry budget.
//!
//! Which errors are recoverable is the caller's call; this module answers "how long to wait"
//! and "may anything be retried at all". The budget (Finagle's and Envoy's idea) keeps retries
//! from multiplying the load on a vendor that is already failing: over a sliding window,
//! retries and fallbacks may add at most `budget_percent` of the requests, plus a small
//! per-second floor so that low traffic can still retry.

use serde::Deserialize;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// `[policy.retry]`: how often and how patiently failed upstream attempts are retried.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Calls on the last target of a plan, the first one included; 1 means no retry (0 is
    /// taken as 1). Earlier targets get one call each, since moving on to the next one is the
    /// better retry. Every call after a request's first also needs the retry budget. Default 3.
    pub max_attempts: u32,
    /// Back-off cap before the first retry, in milliseconds; doubles with each further retry.
    /// The actual wait is drawn uniformly between 0 and the cap ("full jitter") so that
    /// clients failing together do not retry together. Default 100.
    pub backoff_base_ms: u64,
    /// Upper bound of the back-off cap, in milliseconds. Default 2000.
    pub backoff_max_ms: u64,
    /// Longest vendor `Retry-After` that is waited out before retrying the same upstream; a
    /// vendor asking for longer is not retried (another target may still be tried).
    /// Default 10.
    pub retry_after_cap_secs: u64,
    /// Retries and fallbacks may add at most this share, in percent, of the requests seen over
    /// the budget window. Default 20.
    pub budget_percent: u32,
    /// Retries per second of window allowed on top of the percentage, so that low traffic can
    /// still retry. Default 10.
    pub budget_min_retries_per_sec: u32,
    /// The budget's sliding window in seconds, kept in one-second buckets (the current,
    /// partial second included); taken into 1..=300. Default 10.
    pub budget_window_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_base_ms: 100,
            backoff_max_ms: 2000,
            retry_after_cap_secs: 10,
            budget_percent: 20,
            budget_min_retries_per_sec: 10,
            budget_window_secs: 10,
        }
    }
}

/// The wait before retry number `retry_number` (1 for the first retry; 0 is taken as 1):
/// uniform in `[0, min(backoff_max_ms, backoff_base_ms * 2^(retry_number - 1))]`.
pub fn backoff(config: &RetryConfig, retry_number: u32) -> Duration {
    let doublings = retry_number.max(1) - 1;
    let factor = 1u64.checked_shl(doublings).unwrap_or(u64::MAX);
    let cap_ms = config
        .backoff_base_ms
        .saturating_mul(factor)
        .min(config.backoff_max_ms);
    let cap_nanos = cap_ms.saturating_mul(1_000_000);
    Duration::from_nanos(fastrand::u64(0..=cap_nanos))
}

/// The wait before retry number `retry_number` on the same upstream, given the vendor's
/// `Retry-After` if it sent one: the longer of the back-off and `Retry-After`. `None` when the
/// vendor asked for more than `retry_after_cap_secs`: do not retry that upstream.
pub fn delay_before_retry(
    config: &RetryConfig,
    retry_number: u32,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    let backoff = backoff(config, retry_number);
    match retry_after {
        None => Some(backoff),
        Some(asked) if asked <= Duration::from_secs(config.retry_after_cap_secs) => {
            Some(backoff.max(asked))
        }
        Some(_) => None,
    }
}

/// Reads a `Retry-After` header value: delta-seconds (fractions accepted, as some vendors
/// send them) or an IMF-fixdate HTTP-date (`Sun, 06 Nov 1994 08:49:37 GMT`; a date in the
/// past gives zero). The obsolete RFC 850 and asctime date forms are not read. `None` when
/// the value is not understood.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    parse_retry_after_at(value, SystemTime::now())
}

/// Reads OpenAI's `retry-after-ms` header value: milliseconds, fractions accepted.
pub fn parse_retry_after_ms(value: &str) -> Option<Duration> {
    parse_decimal(value.trim(), 1e-3)
}

fn parse_retry_after_at(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Some(delay) = parse_decimal(value, 1.0) {
        return Some(delay);
    }
    let at = UNIX_EPOCH + Duration::from_secs(parse_imf_fixdate(value)?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A plain non-negative decimal (no sign, exponent, `inf` or `nan`, which `f64` parsing
/// would take) times `unit` seconds. Too large for a `Duration` saturates: it is a real
/// request to wait very long.
fn parse_decimal(value: &str, unit: f64) -> Option<Duration> {
    let mut dots = 0;
    let mut digits = 0;
    for byte in value.bytes() {
        match byte {
            b'0'..=b'9' => digits += 1,
            b'.' => dots += 1,
            _ => return None,
        }
    }
    if digits == 0 || dots > 1 {
        return None;
    }
    let number: f64 = value.parse().ok()?;
    Some(Duration::try_from_secs_f64(number * unit).unwrap_or(Duration::MAX))
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Seconds since the Unix epoch of an IMF-fixdate, the form HTTP senders must use.
fn parse_imf_fixdate(value: &str) -> Option<u64> {
    let mut parts = value.split_ascii_whitespace();
    let weekday = parts.next()?;
    let day = parse_fixed_digits(parts.next()?, 2)?;
    let month_name = parts.next()?;
    let month = MONTHS.iter().position(|name| *name == month_name)?;
    let year = parse_fixed_digits(parts.next()?, 4)?;
    let mut clock = parts.next()?.split(':');
    let hour = parse_fixed_digits(clock.next()?, 2)?;
    let minute = parse_fixed_digits(clock.next()?, 2)?;
    let second = parse_fixed_digits(clock.next()?, 2)?;
    let well_formed = weekday.len() == 4
        && weekday.ends_with(',')
        && parts.next() == Some("GMT")
        && parts.next().is_none()
        && clock.next().is_none()
        && (1..=31).contains(&day)
        && year >= 1970
        && hour < 24
        && minute < 60
        // 60 is a leap second.
        && second <= 60;
    if !well_formed {
        return None;
    }
    let days = days_since_epoch(year, month as u64 + 1, day);
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

fn parse_fixed_digits(text: &str, len: usize) -> Option<u64> {
    if text.len() != len || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Days from 1970-01-01 to a proleptic Gregorian date from 1970 on (Howard Hinnant's
/// `days_from_civil`, with years counted from March so the leap day comes last).
fn days_since_epoch(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year % 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    (era * 146_097 + day_of_era).saturating_sub(719_468)
}

/// Longest budget window; the ring of buckets is allocated once at this size so that a
/// reload can change the window without losing what was counted.
pub const MAX_BUDGET_WINDOW_SECS: u64 = 300;
const RING: usize = MAX_BUDGET_WINDOW_SECS as usize;

/// The retry budget of the whole process, shared by every request. Lock-free: each second
/// of the window is one bucket per counter, and a bucket is one atomic holding the second it
/// counts (high 32 bits) and its count (low 32 bits), so a stale bucket is recognised and
/// restarted in the same compare-and-swap that counts.
///
/// The check and the spend of [`try_withdraw`](Self::try_withdraw) are two steps, so
/// withdrawals racing at the very edge of the budget can overshoot it by at most the number
/// of racing threads.
#[derive(Debug)]
pub struct RetryBudget {
    origin: Instant,
    percent: AtomicU32,
    floor_per_sec: AtomicU32,
    window_secs: AtomicU32,
    requests: Box<[AtomicU64]>,
    retries: Box<[AtomicU64]>,
    requests_total: AtomicU64,
    retries_total: AtomicU64,
    exhausted_total: AtomicU64,
}

/// Counters since the process started, and what the window allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RetryBudgetStats {
    pub requests: u64,
    /// Withdrawals granted.
    pub retries: u64,
    /// Withdrawals refused.
    pub exhausted: u64,
    /// Withdrawals the window would grant right now.
    pub available: u64,
}

impl RetryBudget {
    pub fn new(config: &RetryConfig) -> Self {
        let ring = || (0..RING).map(|_| AtomicU64::new(0)).collect();
        let budget = Self {
            origin: Instant::now(),
            percent: AtomicU32::new(0),
            floor_per_sec: AtomicU32::new(0),
            window_secs: AtomicU32::new(1),
            requests: ring(),
            retries: ring(),
            requests_total: AtomicU64::new(0),
            retries_total: AtomicU64::new(0),
            exhausted_total: AtomicU64::new(0),
        };
        budget.set_config(config);
        budget
    }

    /// Applies new budget settings; what was counted in the window is kept.
    pub fn set_config(&self, config: &RetryConfig) {
        let window = config.budget_window_secs.clamp(1, MAX_BUDGET_WINDOW_SECS);
        self.percent.store(config.budget_percent, Ordering::Relaxed);
        self.floor_per_sec
            .store(config.budget_min_retries_per_sec, Ordering::Relaxed);
        self.window_secs
            .store(u32::try_from(window).unwrap_or(1), Ordering::Relaxed);
    }

    /// Counts one client request (not each attempt): it adds `budget_percent / 100` of a
    /// retry to the budget.
    pub fn record_request(&self) {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        count(&self.requests, self.second());
    }

    /// Spends one retry (or fallback attempt) if the window still allows it; `false` means the
    /// budget is exhausted and the request should fail with what it has.
    pub fn try_withdraw(&self) -> bool {
        let second = self.second();
        if self.available(second) == 0 {
            self.exhausted_total.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        count(&self.retries, second);
        self.retries_total.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn stats(&self) -> RetryBudgetStats {
        RetryBudgetStats {
            requests: self.requests_total.load(Ordering::Relaxed),
            retries: self.retries_total.load(Ordering::Relaxed),
            exhausted: self.exhausted_total.load(Ordering::Relaxed),
            available: self.available(self.second()),
        }
    }

    /// Whole retries left in the window ending at `second`. Worked in hundredths so that the
    /// percentage is exact: `requests * percent / 100 + floor * window - retries`.
    fn available(&self, second: u32) -> u64 {
        let window = self.window_secs.load(Ordering::Relaxed);
        let requests = sum(&self.requests, second, window);
        let retries = sum(&self.retries, second, window);
        let percent = u64::from(self.percent.load(Ordering::Relaxed));
        let floor = u64::from(self.floor_per_sec.load(Ordering::Relaxed));
        let allowance = requests
            .saturating_mul(percent)
            .saturating_add(floor.saturating_mul(u64::from(window)).saturating_mul(100));
        allowance.saturating_sub(retries.saturating_mul(100)) / 100
    }

    /// Seconds since the budget was made. Kept in 32 bits, wrapping after 136 years; buckets
    /// are told apart by equality, so the wrap is harmless.
    fn second(&self) -> u32 {
        Instant::now()
            .saturating_duration_since(self.origin)
            .as_secs() as u32
    }
}

fn pack(second: u32, count: u32) -> u64 {
    u64::from(second) << 32 | u64::from(count)
}

fn unpack(bucket: u64) -> (u32, u32) {
    ((bucket >> 32) as u32, bucket as u32)
}

fn slot(ring: &[AtomicU64], second: u32) -> Option<&AtomicU64> {
    ring.get(usize::try_from(second).ok()? % ring.len())
}

fn count(ring: &[AtomicU64], second: u32) {
    let Some(slot) = slot(ring, second) else {
        return;
    };
    // The closure always returns `Some`, so the update cannot fail.
    let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bucket| {
        let (stamp, count) = unpack(bucket);
        // A thread delayed past a second boundary may find its bucket already restarted for
        // a later second; it counts there rather than wiping the newer count.
        let current_or_newer = stamp.wrapping_sub(second) < u32::MAX / 2;
        Some(if current_or_newer {
            pack(stamp, count.saturating_add(1))
        } else {
            pack(second, 1)
        })
    });
}

fn sum(ring: &[AtomicU64], second: u32, window: u32) -> u64 {
    (0..window)
        .filter_map(|age| {
            let wanted = second.checked_sub(age)?;
            let (stamp, count) = unpack(slot(ring, wanted)?.load(Ordering::Relaxed));
            (stamp == wanted).then_some(u64::from(count))
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    fn config() -> RetryConfig {
        RetryConfig::default()
    }

    fn budget_config(percent: u32, floor: u32, window: u64) -> RetryConfig {
        RetryConfig {
            budget_percent: percent,
            budget_min_retries_per_sec: floor,
            budget_window_secs: window,
            ..config()
        }
    }

    fn withdraw_all(budget: &RetryBudget) -> u32 {
        let mut granted = 0;
        while budget.try_withdraw() {
            granted += 1;
            assert!(granted <= 100_000, "budget never refuses");
        }
        granted
    }

    #[test]
    fn backoff_stays_under_the_cap_and_spreads_over_the_range() {
        let config = config();
        let samples: Vec<Duration> = (0..10_000).map(|_| backoff(&config, 1)).collect();
        let cap = Duration::from_millis(100);
        assert!(samples.iter().all(|sample| *sample <= cap));
        assert!(
            samples
                .iter()
                .any(|sample| *sample < Duration::from_millis(5))
        );
        assert!(
            samples
                .iter()
                .any(|sample| *sample > Duration::from_millis(95))
        );
        let mean = samples.iter().sum::<Duration>() / 10_000;
        assert!(
            (Duration::from_millis(45)..Duration::from_millis(55)).contains(&mean),
            "{mean:?}"
        );
    }

    #[test]
    fn backoff_grows_with_the_retry_number_up_to_the_max() {
        let config = config();
        let max_of = |retry_number| {
            (0..5_000)
                .map(|_| backoff(&config, retry_number))
                .max()
                .unwrap()
        };
        let expected_caps = [(0, 100), (1, 100), (2, 200), (3, 400), (5, 1600), (6, 2000)];
        for (retry_number, cap_ms) in expected_caps {
            let max = max_of(retry_number);
            let cap = Duration::from_millis(cap_ms);
            assert!(max <= cap, "retry {retry_number}: {max:?} > {cap:?}");
            assert!(
                max > cap * 9 / 10,
                "retry {retry_number}: {max:?} never near {cap:?}"
            );
        }
        for retry_number in [7, 64, 65, u32::MAX] {
            assert!(max_of(retry_number) <= Duration::from_millis(2000));
        }
    }

    #[test]
    fn delay_before_retry_honours_and_caps_retry_after() {
        let config = config();
        assert!(delay_before_retry(&config, 1, None).unwrap() <= Duration::from_millis(100));
        assert_eq!(
            delay_before_retry(&config, 1, Some(Duration::from_secs(5))),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            delay_before_retry(&config, 1, Some(Duration::from_secs(10))),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            delay_before_retry(&config, 1, Some(Duration::from_millis(10_001))),
            None
        );
        // A Retry-After shorter than the back-off does not shorten it.
        let config = RetryConfig {
            backoff_base_ms: 1000,
            ..config
        };
        let delays: Vec<_> = (0..1000)
            .map(|_| delay_before_retry(&config, 1, Some(Duration::from_millis(1))).unwrap())
            .collect();
        assert!(
            delays
                .iter()
                .all(|delay| *delay >= Duration::from_millis(1))
        );
        assert!(
            delays
                .iter()
                .any(|delay| *delay > Duration::from_millis(500))
        );
    }

    #[test]
    fn parses_retry_after_seconds() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(
            parse_retry_after("99999999999999999999999999"),
            Some(Duration::MAX)
        );
        for bad in [
            "", " ", "-1", "+1", "1e3", "inf", "NaN", "1.2.3", ".", "abc", "5s",
        ] {
            assert_eq!(parse_retry_after(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_retry_after_ms() {
        assert_eq!(
            parse_retry_after_ms("1500"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after_ms("250.5"),
            Some(Duration::from_micros(250_500))
        );
        assert_eq!(parse_retry_after_ms("-5"), None);
    }

    #[test]
    fn parses_retry_after_http_date() {
        // 1994-11-06T08:49:37Z
        let date = UNIX_EPOCH + Duration::from_secs(784_111_777);
        let value = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(
            parse_retry_after_at(value, date - Duration::from_secs(90)),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after_at(value, date + Duration::from_secs(5)),
            Some(Duration::ZERO)
        );
        // Leap day and year-end boundaries.
        assert_eq!(
            parse_imf_fixdate("Thu, 29 Feb 2024 00:00:00 GMT"),
            Some(1_709_164_800)
        );
        assert_eq!(parse_imf_fixdate("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_imf_fixdate("Fri, 31 Dec 1999 23:59:59 GMT"),
            Some(946_684_799)
        );
        let malformed = [
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun 06 Nov 1994 08:49:37 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT extra",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ];
        for value in malformed {
            assert_eq!(parse_retry_after(value), None, "{value:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_its_percentage_of_requests_then_refuses() {
        let budget = RetryBudget::new(&budget_config(20, 0, 10));
        assert!(!budget.try_withdraw());
        for _ in 0..100 {
            budget.record_request();
        }
        assert_eq!(withdraw_all(&budget), 20);
        // A few more requests earn a fraction of a retry each.
        for _ in 0..4 {
            budget.record_request();
        }
        assert!(!budget.try_withdraw());
        budget.record_request();
        assert!(budget.try_withdraw());
        assert_eq!(
            budget.stats(),
            RetryBudgetStats {
                requests: 105,
                retries: 21,
                exhausted: 3,
                available: 0,
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budget_floor_adds_retries_per_second_of_window() {
        let budget = RetryBudget::new(&budget_config(20, 10, 10));
        assert_eq!(withdraw_all(&budget), 100);
        for _ in 0..100 {
            budget.record_request();
        }
        assert_eq!(withdraw_all(&budget), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_refills_as_the_window_slides() {
        // The floor alone: 10 retries per 10 s window, half spent at 0 s, half at 3 s.
        let budget = RetryBudget::new(&budget_config(0, 1, 10));
        for _ in 0..5 {
            assert!(budget.try_withdraw());
        }
        advance(Duration::from_secs(3)).await;
        assert_eq!(withdraw_all(&budget), 5);
        advance(Duration::from_millis(6_999)).await;
        assert!(!budget.try_withdraw());
        advance(Duration::from_millis(1)).await;
        assert_eq!(withdraw_all(&budget), 5);
        advance(Duration::from_secs(3)).await;
        assert_eq!(withdraw_all(&budget), 5);

        let budget = RetryBudget::new(&budget_config(20, 0, 10));
        for _ in 0..100 {
            budget.record_request();
        }
        assert_eq!(withdraw_all(&budget), 20);
        advance(Duration::from_secs(5)).await;
        for _ in 0..50 {
            budget.record_request();
        }
        assert_eq!(withdraw_all(&budget), 10);
        // The first second's requests and retries leave the window together.
        advance(Duration::from_secs(5)).await;
        assert_eq!(budget.stats().available, 0);
        for _ in 0..50 {
            budget.record_request();
        }
        assert_eq!(withdraw_all(&budget), 10);
        advance(Duration::from_secs(10)).await;
        assert_eq!(budget.stats().available, 0);
        budget.record_request();
        advance(Duration::from_secs(1)).await;
        for _ in 0..9 {
            budget.record_request();
        }
        assert_eq!(withdraw_all(&budget), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_ignores_buckets_left_from_a_lap_of_the_ring_ago() {
        let budget = RetryBudget::new(&budget_config(20, 0, 10));
        for _ in 0..100 {
            budget.record_request();
        }
        advance(Duration::from_secs(MAX_BUDGET_WINDOW_SECS)).await;
        assert_eq!(budget.stats().available, 0);
        assert!(!budget.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn budget_set_config_changes_the_share() {
        let budget = RetryBudget::new(&budget_config(20, 0, 10));
        for _ in 0..100 {
            budget.record_request();
        }
        budget.set_config(&budget_config(50, 0, 10));
        assert_eq!(withdraw_all(&budget), 50);
        budget.set_config(&budget_config(50, 0, 100_000));
        assert_eq!(budget.window_secs.load(Ordering::Relaxed), 300);
    }

    /// Every attempt fails, and every request retries until the budget or `max_attempts`
    /// stops it: the budget must bound the extra load.
    async fn always_failing(requests: u32, spacing: Duration) -> (u64, u64) {
        let config = config();
        let budget = RetryBudget::new(&config);
        let mut attempts = 0u64;
        for _ in 0..requests {
            budget.record_request();
            attempts += 1;
            let mut made = 1;
            while made < config.max_attempts && budget.try_withdraw() {
                attempts += 1;
                made += 1;
            }
            advance(spacing).await;
        }
        (attempts, budget.stats().retries)
    }

    #[tokio::test(start_paused = true)]
    async fn always_failing_upstream_is_bounded_by_the_budget_within_a_window() {
        let (attempts, retries) = always_failing(1000, Duration::from_millis(10)).await;
        // 1000 requests in 10 s, one window: 20% of them plus 10/s for 10 s.
        let bound = 1000 + 1000 * 20 / 100 + 10 * 10;
        assert!(attempts <= bound, "{attempts} > {bound}");
        assert!(attempts >= bound - 5, "budget left unused: {attempts}");
        assert_eq!(attempts, 1000 + retries);
    }

    #[tokio::test(start_paused = true)]
    async fn always_failing_upstream_is_bounded_by_the_budget_over_many_windows() {
        let (attempts, _) = always_failing(10_000, Duration::from_millis(10)).await;
        // 100 s of traffic: the share of all requests plus the floor over the whole time,
        // and one window of slack because the window slides rather than steps.
        let bound = 10_000 + 10_000 * 20 / 100 + 10 * (100 + 10) + 100 * 20 / 100;
        assert!(attempts <= bound, "{attempts} > {bound}");
        assert!(attempts >= 10_000 + 10_000 * 20 / 100, "budget left unused");
    }

    #[test]
    fn budget_counts_from_many_threads() {
        let budget = std::sync::Arc::new(RetryBudget::new(&budget_config(20, 0, 10)));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let budget = std::sync::Arc::clone(&budget);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        budget.record_request();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // Real time: the requests may straddle a second boundary, but not leave the window.
        assert_eq!(budget.stats().requests, 8000);
        assert_eq!(budget.stats().available, 1600);
    }

    #[test]
    fn config_deserializes_with_defaults_and_rejects_unknown_keys() {
        let parsed: RetryConfig = serde_json::from_str(r#"{"max_attempts": 1}"#).unwrap();
        assert_eq!(
            parsed,
            RetryConfig {
                max_attempts: 1,
                ..config()
            }
        );
        assert!(serde_json::from_str::<RetryConfig>(r#"{"attempts": 1}"#).is_err());
    }
}
