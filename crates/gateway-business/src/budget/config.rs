//! The `[[budgets]]` and `[budget]` config sections, their checks, and the table of limits
//! built from them.

use super::{BudgetPeriod, BudgetScope, Line, LineKey, MAX_NANOS, period_start};
use gateway_core::config::ConfigError;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use time::OffsetDateTime;

/// One `[[budgets]]` entry: the budget of a project, or of one API key of a project.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetEntry {
    /// The project's name, as in `[[projects]].name`.
    pub project: String,
    /// An API key id of the project (`[[projects]].api_keys[].id`): the budget is then that
    /// key's, on top of the project's own. Default: none, the budget is the project's.
    #[serde(default)]
    pub key: Option<String>,
    /// USD per UTC day, as a string (`"10.00"`). Default: no daily budget.
    #[serde(default, deserialize_with = "money::optional")]
    pub daily_usd: Option<Decimal>,
    /// USD per UTC calendar month, as a string (`"200"`). Default: no monthly budget.
    #[serde(default, deserialize_with = "money::optional")]
    pub monthly_usd: Option<Decimal>,
    /// `http://` or `https://` URL that receives a JSON POST for every alert of this budget.
    /// Default: none (alerts are still logged and counted).
    #[serde(default)]
    pub alert_webhook: Option<String>,
}

/// `[budget]`: where budget state lives and how it behaves. Changing it needs a restart; the
/// `[[budgets]]` limits themselves reload ([`super::Budgets::set_budgets`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetSettings {
    /// `"database"` (the `[database]` store, shared by every replica using it), `"redis"`
    /// (shared through `redis_url`) or `"local"` (this process only). Default `"database"`.
    pub backend: BudgetBackend,
    /// Required with `backend = "redis"`, e.g. `"redis://127.0.0.1:6379"`. Default none.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key. On Redis Cluster, put a hash tag in it (`"{gw}:budget:"`):
    /// one script touches the keys of a project and of its key together. Default
    /// `"gw:budget:"`.
    pub key_prefix: String,
    /// How long a reservation counts when it is never settled (a replica crashed, or a
    /// request outlived it): then it expires and stops holding the budget. Must exceed the
    /// longest request, streaming included. Default 600.
    pub reservation_ttl_secs: u64,
    /// Alert thresholds, percent of a budget's limit reached by settled spending. Each fires
    /// once per budget and period, across replicas. Default `[50, 80, 100]`.
    pub alerts: Vec<u32>,
    /// What to do when the backend cannot be reached: `"fail-open"` admits (counted in
    /// [`super::BudgetStats`], logged) and `"fail-closed"` refuses with
    /// [`super::BudgetError::Unavailable`]. Default `"fail-open"`.
    pub on_failure: BudgetFailureMode,
    /// Deadline of one call to the backend, connecting included. Default 1000.
    pub timeout_ms: u64,
    /// After a failure, how long the backend is taken as down without trying, so an outage
    /// costs requests nothing beyond one timeout per period. Default 1.
    pub down_secs: u64,
    /// Deadline of one alert webhook POST. Default 3000.
    pub webhook_timeout_ms: u64,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        Self {
            backend: BudgetBackend::Database,
            redis_url: None,
            key_prefix: "gw:budget:".into(),
            reservation_ttl_secs: 600,
            alerts: vec![50, 80, 100],
            on_failure: BudgetFailureMode::FailOpen,
            timeout_ms: 1000,
            down_secs: 1,
            webhook_timeout_ms: 3000,
        }
    }
}

/// Where budget state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetBackend {
    /// The `[database]` store: row locks in Postgres, `BEGIN IMMEDIATE` in SQLite.
    #[default]
    Database,
    /// Redis, through one Lua script per reservation and per settlement.
    Redis,
    /// In this process only: right for a single gateway, wrong for replicas.
    Local,
}

impl BudgetBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Database => "database",
            Self::Redis => "redis",
            Self::Local => "local",
        }
    }
}

/// What to do when the budget backend cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BudgetFailureMode {
    /// Admit without a budget check: an outage of the budget store must not become an
    /// outage of the gateway. Costs settled once it is back are still counted.
    #[default]
    FailOpen,
    /// Refuse every request that has a budget.
    FailClosed,
}

impl BudgetFailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailOpen => "fail-open",
            Self::FailClosed => "fail-closed",
        }
    }
}

/// Amounts must be strings: a TOML float has already lost exactness before any decimal sees it.
mod money {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer};
    use std::str::FromStr;

    pub fn optional<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Decimal>, D::Error> {
        let Some(text) = Option::<String>::deserialize(deserializer)? else {
            return Ok(None);
        };
        Decimal::from_str(text.trim()).map(Some).map_err(|err| {
            serde::de::Error::custom(format!(
                "expected a decimal amount such as \"10.00\": {err}"
            ))
        })
    }
}

/// Checks `[budget]`; the problems are reported with their paths.
pub fn check_settings(settings: &BudgetSettings) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if settings.backend == BudgetBackend::Redis && settings.redis_url.is_none() {
        errors.push(ConfigError::new(
            "budget.redis_url",
            "required with backend = \"redis\"",
        ));
    }
    if let Some(url) = &settings.redis_url
        && let Err(err) = redis::Client::open(url.as_str())
    {
        // The URL itself is left out: it may hold a password.
        errors.push(ConfigError::new(
            "budget.redis_url",
            format!("not usable: {err}"),
        ));
    }
    if settings.reservation_ttl_secs == 0 {
        errors.push(ConfigError::new(
            "budget.reservation_ttl_secs",
            "must be at least 1",
        ));
    }
    if settings.timeout_ms == 0 {
        errors.push(ConfigError::new("budget.timeout_ms", "must be at least 1"));
    }
    if settings.webhook_timeout_ms == 0 {
        errors.push(ConfigError::new(
            "budget.webhook_timeout_ms",
            "must be at least 1",
        ));
    }
    let distinct: HashSet<u32> = settings.alerts.iter().copied().collect();
    // Redis reports the fired thresholds as the bits of a Lua number.
    if distinct.len() > 16 {
        errors.push(ConfigError::new("budget.alerts", "at most 16 thresholds"));
    }
    for (index, percent) in settings.alerts.iter().enumerate() {
        if !(1..=1000).contains(percent) {
            errors.push(ConfigError::new(
                format!("budget.alerts[{index}]"),
                "must be a percentage from 1 to 1000",
            ));
        }
    }
    errors
}

/// The limits of one budget, in nano-USD.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Limits {
    daily: Option<i64>,
    monthly: Option<i64>,
    webhook: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct ProjectBudgets {
    own: Option<Limits>,
    keys: HashMap<Arc<str>, Limits>,
}

/// Every configured budget, by project and key.
#[derive(Debug, Default)]
pub struct BudgetTable {
    projects: HashMap<Arc<str>, ProjectBudgets>,
}

impl BudgetTable {
    /// Builds the table, reporting every invalid or duplicated entry with its path.
    pub fn build(entries: &[BudgetEntry]) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut table = Self::default();
        let mut seen = HashSet::new();
        for (index, entry) in entries.iter().enumerate() {
            let path = format!("budgets[{index}]");
            if entry.project.is_empty() {
                errors.push(ConfigError::new(
                    format!("{path}.project"),
                    "must not be empty",
                ));
            }
            if entry.key.as_deref() == Some("") {
                errors.push(ConfigError::new(format!("{path}.key"), "must not be empty"));
            }
            if entry.daily_usd.is_none() && entry.monthly_usd.is_none() {
                errors.push(ConfigError::new(
                    path.clone(),
                    "needs daily_usd, monthly_usd or both",
                ));
            }
            let mut limit = |field: &str, amount: Option<Decimal>| {
                let amount = amount?;
                let nanos = limit_nanos(amount);
                if nanos.is_none() {
                    errors.push(ConfigError::new(
                        format!("{path}.{field}"),
                        "must be from 0 to 1000000000",
                    ));
                }
                nanos
            };
            let daily = limit("daily_usd", entry.daily_usd);
            let monthly = limit("monthly_usd", entry.monthly_usd);
            if let Some(url) = &entry.alert_webhook {
                let scheme_ok = reqwest::Url::parse(url)
                    .is_ok_and(|url| matches!(url.scheme(), "http" | "https"));
                if !scheme_ok {
                    errors.push(ConfigError::new(
                        format!("{path}.alert_webhook"),
                        "must be an http:// or https:// URL",
                    ));
                }
            }
            if !seen.insert((entry.project.clone(), entry.key.clone())) {
                let whose = match &entry.key {
                    Some(key) => format!("key `{key}` of project `{}`", entry.project),
                    None => format!("project `{}`", entry.project),
                };
                errors.push(ConfigError::new(
                    path,
                    format!("a second budget for {whose}"),
                ));
            }
            let limits = Limits {
                daily,
                monthly,
                webhook: entry.alert_webhook.as_deref().map(Arc::from),
            };
            let project = table
                .projects
                .entry(Arc::from(entry.project.as_str()))
                .or_default();
            match &entry.key {
                Some(key) => {
                    project.keys.insert(Arc::from(key.as_str()), limits);
                }
                None => project.own = Some(limits),
            }
        }
        if errors.is_empty() {
            Ok(table)
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.projects.is_empty()
    }

    /// Whether any budget applies to a key of a project.
    pub fn applies(&self, project: &str, key_id: &str) -> bool {
        self.projects
            .get(project)
            .is_some_and(|p| p.own.is_some() || p.keys.contains_key(key_id))
    }

    /// The budgets of one request in the periods `now` falls in, in the order every backend
    /// uses: project before key, day before month. Databases lock rows in this order, so two
    /// replicas never wait for each other the other way round.
    pub(super) fn lines_for(&self, project: &str, key_id: &str, now: OffsetDateTime) -> Vec<Line> {
        let Some(budgets) = self.projects.get_key_value(project) else {
            return Vec::new();
        };
        let (project, budgets) = budgets;
        let today = now.to_offset(time::UtcOffset::UTC).date();
        let mut lines = Vec::new();
        let mut add = |scope: BudgetScope, key: &Arc<str>, limits: &Limits| {
            for (period, limit) in [
                (BudgetPeriod::Day, limits.daily),
                (BudgetPeriod::Month, limits.monthly),
            ] {
                if let Some(limit) = limit {
                    lines.push(Line {
                        key: LineKey {
                            project: project.clone(),
                            key_id: key.clone(),
                            period,
                            start: period_start(period, today),
                        },
                        scope,
                        limit,
                        webhook: limits.webhook.clone(),
                    });
                }
            }
        };
        if let Some(own) = &budgets.own {
            add(BudgetScope::Project, &Arc::from(""), own);
        }
        if let Some((key, limits)) = budgets.keys.get_key_value(key_id) {
            add(BudgetScope::Key, key, limits);
        }
        lines
    }
}

/// A limit in nano-USD, rounded down (a budget is never larger than written); `None` when it
/// is negative or beyond 10^9 USD.
fn limit_nanos(amount: Decimal) -> Option<i64> {
    if amount.is_sign_negative() && !amount.is_zero() {
        return None;
    }
    let nanos = amount
        .checked_mul(Decimal::from(super::NANOS_PER_USD))?
        .floor()
        .to_i64()?;
    (nanos <= MAX_NANOS).then_some(nanos)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        budgets: Vec<BudgetEntry>,
        #[serde(default)]
        budget: BudgetSettings,
    }

    #[test]
    fn settings_default_and_parse() {
        let file: File = toml::from_str("").unwrap();
        assert_eq!(file.budget, BudgetSettings::default());
        assert_eq!(file.budget.backend, BudgetBackend::Database);
        assert_eq!(file.budget.reservation_ttl_secs, 600);
        assert_eq!(file.budget.alerts, [50, 80, 100]);
        assert_eq!(file.budget.on_failure, BudgetFailureMode::FailOpen);
        let file: File = toml::from_str(
            r#"
            [budget]
            backend = "redis"
            redis_url = "redis://127.0.0.1:6379"
            reservation_ttl_secs = 30
            alerts = [90]
            on_failure = "fail-closed"

            [[budgets]]
            project = "team-a"
            daily_usd = "10.00"
            monthly_usd = "200"
            alert_webhook = "http://127.0.0.1:9/hook"

            [[budgets]]
            project = "team-a"
            key = "ci"
            daily_usd = "1.5"
            "#,
        )
        .unwrap();
        assert!(check_settings(&file.budget).is_empty());
        assert_eq!(file.budget.on_failure, BudgetFailureMode::FailClosed);
        assert_eq!(file.budgets[0].daily_usd, Some(Decimal::new(1000, 2)));
        assert_eq!(file.budgets[1].key.as_deref(), Some("ci"));
        let table = BudgetTable::build(&file.budgets).unwrap();
        assert!(table.applies("team-a", "other"));
        assert!(!table.applies("team-b", "ci"));
        let now = time::macros::datetime!(2026-06-15 12:00 UTC);
        let lines = table.lines_for("team-a", "ci", now);
        let shape: Vec<_> = lines
            .iter()
            .map(|l| (l.scope, l.key.period, l.key.start.to_string(), l.limit))
            .collect();
        assert_eq!(
            shape,
            [
                (
                    BudgetScope::Project,
                    BudgetPeriod::Day,
                    "2026-06-15".into(),
                    10_000_000_000
                ),
                (
                    BudgetScope::Project,
                    BudgetPeriod::Month,
                    "2026-06-01".into(),
                    200_000_000_000
                ),
                (
                    BudgetScope::Key,
                    BudgetPeriod::Day,
                    "2026-06-15".into(),
                    1_500_000_000
                ),
            ]
        );
        assert_eq!(table.lines_for("team-a", "other", now).len(), 2);
    }

    #[test]
    fn floats_and_unknown_keys_are_refused() {
        for bad in [
            "[[budgets]]\nproject = \"a\"\ndaily_usd = 10.0",
            "[[budgets]]\nproject = \"a\"\ndaily = \"10\"",
            "[budget]\nbackend = \"memcached\"",
            "[budget]\non_failure = \"open\"",
            "[budget]\nttl = 5",
        ] {
            assert!(toml::from_str::<File>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let file: File = toml::from_str(
            r#"
            [budget]
            backend = "redis"
            reservation_ttl_secs = 0
            alerts = [50, 0]

            [[budgets]]
            project = "a"

            [[budgets]]
            project = "a"
            key = ""
            daily_usd = "-1"
            alert_webhook = "ftp://x"

            [[budgets]]
            project = "a"
            monthly_usd = "5"
            "#,
        )
        .unwrap();
        let paths: Vec<_> = check_settings(&file.budget)
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(
            paths,
            [
                "budget.redis_url",
                "budget.reservation_ttl_secs",
                "budget.alerts[1]"
            ]
        );
        let errors = BudgetTable::build(&file.budgets).unwrap_err();
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "budgets[0]",
                "budgets[1].key",
                "budgets[1].daily_usd",
                "budgets[1].alert_webhook",
                "budgets[2]"
            ]
        );
    }
}
