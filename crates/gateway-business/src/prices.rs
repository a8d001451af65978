//! The `[[prices]]` config section: what each provider's model costs, in decimal money.
//!
//! Prices are strings in the config (`"0.15"`), parsed straight into decimals: a TOML float
//! would pass through `f64` and could not say 0.1 exactly. Each row has the date it takes
//! effect, so a price change is a new row rather than an edit of history.

use gateway_core::config::ConfigError;
use rust_decimal::Decimal;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use time::Date;

/// One `[[prices]]` entry: USD (or `currency`) per million tokens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub provider: String,
    /// The upstream model name, as in `[[models]].targets[].model`.
    pub model: String,
    #[serde(deserialize_with = "money::required")]
    pub input_per_million: Decimal,
    #[serde(deserialize_with = "money::required")]
    pub output_per_million: Decimal,
    /// Prompt tokens read from the vendor's cache. Default: the input price.
    #[serde(default, deserialize_with = "money::optional")]
    pub cached_input_per_million: Option<Decimal>,
    /// Prompt tokens written to the vendor's cache. Default: the input price.
    #[serde(default, deserialize_with = "money::optional")]
    pub cache_write_per_million: Option<Decimal>,
    /// Reasoning tokens. Default: the output price (vendors bill them as output).
    #[serde(default, deserialize_with = "money::optional")]
    pub reasoning_per_million: Option<Decimal>,
    /// ISO 4217 code. Default `USD`.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// The first day (UTC) the price applies, `YYYY-MM-DD`. Default: always.
    #[serde(default, with = "optional_date")]
    pub effective_from: Option<Date>,
}

fn default_currency() -> String {
    "USD".into()
}

/// Amounts must be strings: a TOML float has already lost exactness before any decimal sees it.
mod money {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer};
    use std::str::FromStr;

    fn parse<E: serde::de::Error>(text: &str) -> Result<Decimal, E> {
        Decimal::from_str(text.trim())
            .map_err(|err| E::custom(format!("expected a decimal amount such as \"0.15\": {err}")))
    }

    pub fn required<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
        parse(&String::deserialize(deserializer)?)
    }

    pub fn optional<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Decimal>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| parse(&text))
            .transpose()
    }
}

mod optional_date {
    use serde::{Deserialize, Deserializer};
    use time::Date;
    use time::macros::format_description;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Date>, D::Error> {
        let Some(text) = Option::<String>::deserialize(deserializer)? else {
            return Ok(None);
        };
        Date::parse(&text, format_description!("[year]-[month]-[day]"))
            .map(Some)
            .map_err(|err| serde::de::Error::custom(format!("expected YYYY-MM-DD: {err}")))
    }
}

impl PriceConfig {
    /// The cached-input price in force: its own, or the input price.
    pub fn cached_input_price(&self) -> Decimal {
        self.cached_input_per_million
            .unwrap_or(self.input_per_million)
    }

    /// The cache-write price in force: its own, or the input price.
    pub fn cache_write_price(&self) -> Decimal {
        self.cache_write_per_million
            .unwrap_or(self.input_per_million)
    }

    /// The reasoning price in force: its own, or the output price.
    pub fn reasoning_price(&self) -> Decimal {
        self.reasoning_per_million
            .unwrap_or(self.output_per_million)
    }
}

/// Every configured price, by provider and model, newest effective date first.
///
/// Rows are shared (`Arc`) so a usage record can name the row that priced it without copying
/// it on the request path.
#[derive(Debug, Default)]
pub struct PriceTable {
    /// Provider, then model: nested so a lookup borrows the names instead of allocating a key.
    by_target: HashMap<String, HashMap<String, Vec<Arc<PriceConfig>>>>,
    /// In config order, for syncing to the database.
    rows: Vec<Arc<PriceConfig>>,
}

impl PriceTable {
    /// Builds the table, reporting every invalid or duplicated price with its path.
    pub fn build(prices: &[PriceConfig]) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut by_target: HashMap<String, HashMap<String, Vec<Arc<PriceConfig>>>> = HashMap::new();
        let mut all = Vec::with_capacity(prices.len());
        for (index, price) in prices.iter().enumerate() {
            let path = format!("prices[{index}]");
            let amounts = [
                ("input_per_million", Some(price.input_per_million)),
                ("output_per_million", Some(price.output_per_million)),
                ("cached_input_per_million", price.cached_input_per_million),
                ("cache_write_per_million", price.cache_write_per_million),
                ("reasoning_per_million", price.reasoning_per_million),
            ];
            for (field, amount) in amounts {
                if amount.is_some_and(|amount| amount.is_sign_negative()) {
                    errors.push(ConfigError::new(
                        format!("{path}.{field}"),
                        "must not be negative",
                    ));
                }
            }
            if price.currency.len() != 3 || !price.currency.bytes().all(|b| b.is_ascii_uppercase())
            {
                errors.push(ConfigError::new(
                    format!("{path}.currency"),
                    "must be an ISO 4217 code such as USD",
                ));
            }
            let rows = by_target
                .entry(price.provider.clone())
                .or_default()
                .entry(price.model.clone())
                .or_default();
            if rows
                .iter()
                .any(|row| row.effective_from == price.effective_from)
            {
                errors.push(ConfigError::new(
                    path,
                    format!(
                        "a second price for {}/{} from the same date",
                        price.provider, price.model
                    ),
                ));
            }
            let price = Arc::new(price.clone());
            all.push(price.clone());
            rows.push(price);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        for rows in by_target.values_mut().flat_map(HashMap::values_mut) {
            // Newest first; an undated row (always in force) sorts last.
            rows.sort_by_key(|row| std::cmp::Reverse(row.effective_from));
        }
        Ok(Self {
            by_target,
            rows: all,
        })
    }

    /// The price in force on `day` for a provider's model.
    pub fn price_on(&self, provider: &str, model: &str, day: Date) -> Option<&PriceConfig> {
        self.row_on(provider, model, day).map(|row| &**row)
    }

    /// The row in force on `day`, shared.
    pub fn row_on(&self, provider: &str, model: &str, day: Date) -> Option<&Arc<PriceConfig>> {
        self.by_target
            .get(provider)?
            .get(model)?
            .iter()
            .find(|row| row.effective_from.is_none_or(|from| from <= day))
    }

    /// Every row, in config order.
    pub fn rows(&self) -> impl Iterator<Item = &PriceConfig> {
        self.rows.iter().map(|row| &**row)
    }

    /// Input plus output price per million tokens today, for ranking targets by cost.
    pub fn blended_per_million(&self, provider: &str, model: &str) -> Option<Decimal> {
        let today = time::OffsetDateTime::now_utc().date();
        self.price_on(provider, model, today)
            .map(|price| price.input_per_million + price.output_per_million)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_target.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use time::macros::date;

    fn parse(text: &str) -> Vec<PriceConfig> {
        #[derive(Deserialize)]
        struct File {
            prices: Vec<PriceConfig>,
        }
        toml::from_str::<File>(text).unwrap().prices
    }

    #[test]
    fn decimals_are_exact_and_history_is_kept() {
        let table = PriceTable::build(&parse(
            r#"
            [[prices]]
            provider = "openai"
            model = "gpt-4o-mini"
            input_per_million = "0.1"
            output_per_million = "0.2"

            [[prices]]
            provider = "openai"
            model = "gpt-4o-mini"
            input_per_million = "0.15"
            output_per_million = "0.60"
            effective_from = "2026-06-01"
            "#,
        ))
        .unwrap();
        let old = table
            .price_on("openai", "gpt-4o-mini", date!(2026 - 05 - 31))
            .unwrap();
        // 0.1 + 0.2 is exactly 0.3 in decimal (in f64 it is 0.30000000000000004).
        assert_eq!(
            old.input_per_million + old.output_per_million,
            Decimal::from_str("0.3").unwrap()
        );
        let new = table
            .price_on("openai", "gpt-4o-mini", date!(2026 - 06 - 01))
            .unwrap();
        assert_eq!(new.output_per_million, Decimal::from_str("0.60").unwrap());
        assert!(
            table
                .price_on("openai", "other", date!(2026 - 06 - 01))
                .is_none()
        );
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let errors = PriceTable::build(&parse(
            r#"
            [[prices]]
            provider = "a"
            model = "m"
            input_per_million = "-1"
            output_per_million = "1"
            currency = "dollars"

            [[prices]]
            provider = "a"
            model = "m"
            input_per_million = "1"
            output_per_million = "1"
            "#,
        ))
        .unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "prices[0].input_per_million",
                "prices[0].currency",
                "prices[1]"
            ]
        );
    }

    #[test]
    fn floats_and_bad_dates_are_refused() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct File {
            prices: Vec<PriceConfig>,
        }
        for bad in [
            r#"[[prices]]
               provider = "a"
               model = "m"
               input_per_million = 0.1
               output_per_million = "1""#,
            r#"[[prices]]
               provider = "a"
               model = "m"
               input_per_million = "1"
               output_per_million = "1"
               effective_from = "June 1st""#,
        ] {
            assert!(toml::from_str::<File>(bad).is_err(), "{bad}");
        }
    }
}
