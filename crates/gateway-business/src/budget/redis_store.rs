//! The Redis budget store (`backend = "redis"`): `reserve.lua` and `settle.lua` (EVALSHA,
//! loaded on first use) each handle every budget of one request in one atomic call.

use super::{
    BackendError, LineKey, ReserveRequest, SettleOutcome, SettleRequest, Verdict, period_end,
    unix_ms,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use std::time::Duration;
use time::OffsetDateTime;

/// How long a budget's keys outlive its period: late settlements still find the period, and
/// an operator can still look at it.
const KEEP_AFTER_PERIOD: time::Duration = time::Duration::days(7);

pub(super) struct RedisStore {
    manager: ConnectionManager,
    reserve: Script,
    settle: Script,
    prefix: String,
    ttl_secs: i64,
}

impl RedisStore {
    /// Parses the URL and prepares a lazily connected link: nothing is dialled until the first
    /// request, so the gateway starts while Redis is down.
    pub fn new(
        url: &str,
        prefix: String,
        timeout: Duration,
        ttl_secs: u64,
    ) -> Result<Self, RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let manager = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            manager,
            reserve: Script::new(include_str!("reserve.lua")),
            settle: Script::new(include_str!("settle.lua")),
            prefix,
            ttl_secs: i64::try_from(ttl_secs).unwrap_or(i64::MAX),
        })
    }

    /// The hash and the reservation set of one budget and period. The project's length comes
    /// before it, so no project or key name can make two budgets share a key.
    fn keys(&self, key: &LineKey) -> (String, String) {
        let scope = if key.key_id.is_empty() { "p" } else { "k" };
        let hash = format!(
            "{}{scope}:{}:{}:{}:{}:{}",
            self.prefix,
            key.period.as_str(),
            key.start,
            key.project.len(),
            key.project,
            key.key_id
        );
        let live = format!("{hash}:r");
        (hash, live)
    }

    /// When a budget's keys may go: a week after its period, and never before the last
    /// reservation of the period could expire.
    fn expire_at(&self, key: &LineKey) -> i64 {
        let end = period_end(key.period, key.start)
            .midnight()
            .assume_utc()
            .saturating_add(KEEP_AFTER_PERIOD)
            .saturating_add(time::Duration::seconds(self.ttl_secs));
        end.unix_timestamp()
    }

    pub async fn reserve(&self, request: &ReserveRequest<'_>) -> Result<Verdict, BackendError> {
        let mut invocation = self.reserve.prepare_invoke();
        invocation
            .arg(unix_ms(request.now))
            .arg(format!("{}:{}", request.id.simple(), request.amount))
            .arg(request.amount)
            .arg(unix_ms(request.expires));
        for line in request.lines {
            let (hash, live) = self.keys(&line.key);
            invocation
                .key(hash)
                .key(live)
                .arg(line.limit)
                .arg(self.expire_at(&line.key));
        }
        let mut conn = self.manager.clone();
        let reply: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        let n = request.lines.len();
        if reply.len() != 1 + 2 * n {
            return Err(BackendError::Malformed("reserve script reply"));
        }
        let failed = reply[0];
        if failed == 0 {
            return Ok(Verdict::Admitted);
        }
        let index = usize::try_from(failed - 1)
            .ok()
            .filter(|&index| index < n)
            .ok_or(BackendError::Malformed("reserve script reply"))?;
        Ok(Verdict::Exceeded {
            index,
            spent: reply[1 + index],
            reserved: reply[1 + n + index],
        })
    }

    pub async fn settle(&self, request: &SettleRequest<'_>) -> Result<SettleOutcome, BackendError> {
        let per_line = request.thresholds.first().map_or(0, Vec::len);
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .arg(format!("{}:{}", request.id.simple(), request.reserved))
            .arg(request.reserved)
            .arg(request.actual)
            .arg(per_line);
        for (line, thresholds) in request.lines.iter().zip(&request.thresholds) {
            let (hash, live) = self.keys(&line.key);
            invocation
                .key(hash)
                .key(live)
                .arg(self.expire_at(&line.key));
            for threshold in thresholds {
                invocation
                    .arg(threshold.percent)
                    .arg(threshold.at.unwrap_or(-1));
            }
        }
        let mut conn = self.manager.clone();
        let reply: Vec<i64> = invocation.invoke_async(&mut conn).await?;
        if reply.len() != 2 * request.lines.len() {
            return Err(BackendError::Malformed("settle script reply"));
        }
        let mut outcome = SettleOutcome {
            spent: Vec::with_capacity(request.lines.len()),
            fired: Vec::new(),
        };
        for (index, (pair, thresholds)) in
            reply.chunks_exact(2).zip(&request.thresholds).enumerate()
        {
            outcome.spent.push(pair[0]);
            for (bit, threshold) in thresholds.iter().enumerate() {
                if pair[1] >> bit & 1 == 1 {
                    outcome.fired.push((index, threshold.percent));
                }
            }
        }
        Ok(outcome)
    }

    pub async fn usage(
        &self,
        key: &LineKey,
        now: OffsetDateTime,
    ) -> Result<(i64, i64), BackendError> {
        let (hash, live) = self.keys(key);
        let mut conn = self.manager.clone();
        let (state, expired): ((Option<i64>, Option<i64>), Vec<String>) = redis::pipe()
            .atomic()
            .cmd("HMGET")
            .arg(&hash)
            .arg("spent")
            .arg("reserved")
            .cmd("ZRANGEBYSCORE")
            .arg(&live)
            .arg("-inf")
            .arg(unix_ms(now))
            .query_async(&mut conn)
            .await?;
        // Expired reservations still in the set until the next check releases them.
        let expired: i64 = expired
            .iter()
            .filter_map(|member| member.rsplit_once(':')?.1.parse::<i64>().ok())
            .sum();
        Ok((
            state.0.unwrap_or(0),
            state.1.unwrap_or(0).saturating_sub(expired),
        ))
    }
}
