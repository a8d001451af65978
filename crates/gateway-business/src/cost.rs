//! Pricing a usage record: its token counts times the `[[prices]]` row in force on the
//! request's UTC day, in exact decimals.
//!
//! The record is priced when the request finishes, with the prices of the config in force
//! then, and carries the amount and the row that made it into the spool. Pricing later (at
//! insert, or in a report) would bill yesterday's traffic at today's price after a reload.

use crate::prices::{PriceConfig, PriceTable};
use crate::record::UsageRecord;
use rust_decimal::{Decimal, RoundingStrategy};
use std::sync::Arc;
use time::UtcOffset;

/// Decimal places kept of a cost: those of `usage_events.cost NUMERIC(30, 12)`. A price with
/// at most six decimals per million tokens costs a whole number of 1e-12 per token, so real
/// costs are never rounded.
pub const COST_SCALE: u32 = 12;
/// Decimal places of `usage_events.cost_nanos`.
const NANO_SCALE: u32 = 9;

/// What one request cost, in its price row's currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    amount: Decimal,
    nanos: i64,
    price: Arc<PriceConfig>,
}

impl Cost {
    /// Rounds `amount` to [`COST_SCALE`] places, half away from zero (as Postgres rounds into
    /// the column, so both stores keep the value computed here). `None` when it is negative or
    /// too large for `cost_nanos` (over nine billion): no real request costs that, so such a
    /// number is a broken count or price, and an unknown cost is better than a wrong one.
    pub fn new(amount: Decimal, price: Arc<PriceConfig>) -> Option<Self> {
        if amount.is_sign_negative() && !amount.is_zero() {
            return None;
        }
        let mut amount =
            amount.round_dp_with_strategy(COST_SCALE, RoundingStrategy::MidpointAwayFromZero);
        amount.rescale(COST_SCALE);
        let nanos =
            amount.round_dp_with_strategy(NANO_SCALE, RoundingStrategy::MidpointAwayFromZero);
        let nanos = nanos
            .mantissa()
            .checked_mul(10i128.pow(NANO_SCALE.saturating_sub(nanos.scale())))
            .and_then(|nanos| i64::try_from(nanos).ok())?;
        Some(Self {
            amount,
            nanos,
            price,
        })
    }

    /// The amount, with exactly [`COST_SCALE`] decimal places.
    pub fn amount(&self) -> Decimal {
        self.amount
    }

    /// The amount rounded to 1e-9 (half away from zero), in units of 1e-9.
    pub fn nanos(&self) -> i64 {
        self.nanos
    }

    /// The price row that made the amount.
    pub fn price(&self) -> &Arc<PriceConfig> {
        &self.price
    }

    pub fn currency(&self) -> &str {
        &self.price.currency
    }
}

/// A request's token counts as billed: each token in exactly one bucket, each bucket at its
/// own price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BilledTokens {
    /// Prompt tokens neither read from nor written to the cache: the input price.
    pub input: u64,
    /// Prompt tokens read from the cache: the cached-input price.
    pub cached_input: u64,
    /// Prompt tokens written to the cache: the cache-write price.
    pub cache_write: u64,
    /// Completion tokens other than reasoning: the output price.
    pub output: u64,
    /// Reasoning tokens: the reasoning price.
    pub reasoning: u64,
}

impl BilledTokens {
    /// Splits the counts as the vendors report them: cached and cache-write tokens are part of
    /// the prompt count, reasoning tokens part of the completion count (OpenAI's convention,
    /// which the providers convert to). A vendor whose parts exceed their whole is
    /// inconsistent; its whole is then billed at the plain price rather than guessing a split
    /// (as `anthropic_usage_json` does).
    pub fn split(
        prompt: u64,
        cached: u64,
        cache_write: u64,
        completion: u64,
        reasoning: u64,
    ) -> Self {
        let (input, cached_input, cache_write) = match prompt
            .checked_sub(cached)
            .and_then(|rest| rest.checked_sub(cache_write))
        {
            Some(input) => (input, cached, cache_write),
            None => (prompt, 0, 0),
        };
        let (output, reasoning) = match completion.checked_sub(reasoning) {
            Some(output) => (output, reasoning),
            None => (completion, 0),
        };
        Self {
            input,
            cached_input,
            cache_write,
            output,
            reasoning,
        }
    }

    /// The billed counts of a record, `None` when it has no usage.
    pub fn of(record: &UsageRecord) -> Option<Self> {
        if !record.has_usage() {
            return None;
        }
        let count = |tokens: Option<i64>| tokens.map_or(0, |n| u64::try_from(n).unwrap_or(0));
        Some(Self::split(
            count(record.input_tokens),
            count(record.cached_tokens),
            count(record.cache_write_tokens),
            count(record.output_tokens),
            count(record.reasoning_tokens),
        ))
    }

    /// What these tokens cost at `price`, unrounded; `None` on overflow.
    pub fn cost_at(&self, price: &PriceConfig) -> Option<Decimal> {
        let buckets = [
            (self.input, price.input_per_million),
            (self.cached_input, price.cached_input_price()),
            (self.cache_write, price.cache_write_price()),
            (self.output, price.output_per_million),
            (self.reasoning, price.reasoning_price()),
        ];
        let mut per_million_total = Decimal::ZERO;
        for (tokens, per_million) in buckets {
            let part = Decimal::from(tokens).checked_mul(per_million)?;
            per_million_total = per_million_total.checked_add(part)?;
        }
        // Dividing by a power of ten only moves the decimal point: exact within 28 digits.
        per_million_total.checked_div(Decimal::from(1_000_000u32))
    }
}

/// The cost of `record` from the row of `prices` in force on its UTC day for its provider and
/// upstream model. `None` when it has no usage, no target, or no price. Estimated usage is
/// priced like vendor usage: `usage_source` tells them apart.
pub fn cost_of(record: &UsageRecord, prices: &PriceTable) -> Option<Cost> {
    let tokens = BilledTokens::of(record)?;
    let (provider, model) = (
        record.provider.as_deref()?,
        record.upstream_model.as_deref()?,
    );
    let day = record.created_at.to_offset(UtcOffset::UTC).date();
    let price = prices.row_on(provider, model, day)?;
    let amount = tokens.cost_at(price);
    if amount.is_none() {
        tracing::warn!(
            provider,
            model,
            "usage cost overflowed the decimal range; recorded as unknown"
        );
    }
    Cost::new(amount?, price.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;
    use std::str::FromStr;

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    fn price(input: &str, output: &str) -> PriceConfig {
        PriceConfig {
            provider: "p".into(),
            model: "m".into(),
            input_per_million: dec(input),
            output_per_million: dec(output),
            cached_input_per_million: None,
            cache_write_per_million: None,
            reasoning_per_million: None,
            currency: "USD".into(),
            effective_from: None,
        }
    }

    #[test]
    fn every_bucket_has_its_price_and_falls_back() {
        let mut full = price("2.5", "10");
        full.cached_input_per_million = Some(dec("1.25"));
        full.cache_write_per_million = Some(dec("3.75"));
        full.reasoning_per_million = Some(dec("12"));
        let tokens = BilledTokens::split(1000, 300, 100, 500, 200);
        assert_eq!(
            tokens,
            BilledTokens {
                input: 600,
                cached_input: 300,
                cache_write: 100,
                output: 300,
                reasoning: 200
            }
        );
        // (600*2.5 + 300*1.25 + 100*3.75 + 300*10 + 200*12) / 1e6
        assert_eq!(tokens.cost_at(&full).unwrap(), dec("0.00765"));
        // Without their own prices, cache tokens cost the input price, reasoning the output.
        assert_eq!(tokens.cost_at(&price("2.5", "10")).unwrap(), dec("0.0075"));
    }

    #[test]
    fn inconsistent_parts_bill_the_whole_at_the_plain_price() {
        assert_eq!(
            BilledTokens::split(10, 8, 5, 3, 4),
            BilledTokens {
                input: 10,
                output: 3,
                ..BilledTokens::default()
            }
        );
    }

    #[test]
    fn amounts_are_rounded_once_to_twelve_places_and_nanos_half_away_from_zero() {
        let row = Arc::new(price("1", "1"));
        let cost = Cost::new(dec("0.0000000375"), row.clone()).unwrap();
        assert_eq!(cost.amount().to_string(), "0.000000037500");
        assert_eq!(cost.nanos(), 38);
        let tiny = Cost::new(dec("0.0000000000004999"), row.clone()).unwrap();
        assert_eq!(tiny.amount().to_string(), "0.000000000000");
        assert_eq!(tiny.nanos(), 0);
        assert_eq!(
            Cost::new(dec("12.5"), row.clone()).unwrap().nanos(),
            12_500_000_000
        );
        assert!(Cost::new(dec("-1"), row.clone()).is_none());
        assert!(Cost::new(dec("10000000000"), row).is_none());
    }
}
