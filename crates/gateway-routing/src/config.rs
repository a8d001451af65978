//! The `[[models]]` section as it is written in the config file.
//!
//! These types only describe; [`crate::RoutingTable::build`] validates them as a whole (paths,
//! cross-alias references, prices) so that every problem is reported at once.

use http::HeaderName;
use serde::Deserialize;

/// One `[[models]]` entry: an alias clients send as `model`, and where it goes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send as `model`. Required.
    pub alias: String,
    /// Where requests for the alias go. Required, at least one.
    pub targets: Vec<TargetConfig>,
    /// How the targets are ordered for a request. Default: `weighted`.
    #[serde(default)]
    pub strategy: Strategy,
    /// Keeps one caller on one target of a `weighted` alias: `"key"` (the API key id),
    /// `"user"` (the request's `user` field) or `"header:NAME"`. Default: none (random).
    #[serde(default)]
    pub sticky: Option<Sticky>,
    /// Aliases whose targets are tried, in order, after this alias's own. Default: none.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Failure classes that move a request on to the next target or fallback: any of
    /// `connect`, `timeout`, `rate_limit`, `server_error`. Default: all four.
    #[serde(default = "default_fallback_on")]
    pub fallback_on: Vec<FailureClass>,
    /// Automatic rollback thresholds for targets with `canary = true`. Default: the
    /// [`CanaryConfig`] defaults.
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
    /// `[models.rate_limit]`: requests and tokens per minute for this alias, all callers
    /// together (a vendor quota shared by every project). Checked for the alias the client
    /// named. Default: none.
    #[serde(default)]
    pub rate_limit: Option<gateway_core::RateLimit>,
}

impl Default for ModelConfig {
    /// An alias with no targets and every default; a base for struct-update syntax.
    fn default() -> Self {
        Self {
            alias: String::new(),
            targets: Vec::new(),
            strategy: Strategy::default(),
            sticky: None,
            fallbacks: Vec::new(),
            fallback_on: default_fallback_on(),
            canary: None,
            rate_limit: None,
        }
    }
}

fn default_fallback_on() -> Vec<FailureClass> {
    FailureClass::RECOVERABLE.to_vec()
}

/// How the targets of an alias are ordered for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// First choice random in proportion to the weights (or sticky); the rest by weight.
    #[default]
    Weighted,
    /// Config order, skipping unhealthy targets.
    Priority,
    /// Ascending moving average of time to first token; unmeasured targets first.
    LeastLatency,
    /// Ascending price from the [`crate::CostLookup`] given to the table.
    LowestCost,
}

/// What identifies a caller for sticky routing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Sticky {
    /// The authenticated API key's id.
    Key,
    /// The request's `user` field.
    User,
    /// The value of one request header.
    Header(HeaderName),
}

impl TryFrom<String> for Sticky {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.as_str() {
            "key" => Ok(Self::Key),
            "user" => Ok(Self::User),
            other => match other.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                    .map(Self::Header)
                    .map_err(|_| format!("`{name}` is not a valid header name")),
                None => Err(format!(
                    "expected `key`, `user` or `header:NAME`, found `{other}`"
                )),
            },
        }
    }
}

/// Why an attempt on a target failed, as the caller classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The connection could not be opened.
    Connect,
    /// No answer within the deadline.
    Timeout,
    /// The vendor answered 429 or out of quota.
    RateLimit,
    /// The vendor answered 5xx.
    ServerError,
    /// The request itself was at fault (4xx other than 429): another target would fail too.
    Client,
}

impl FailureClass {
    /// The classes another target may cure; they count against a target's health.
    pub const RECOVERABLE: [Self; 4] = [
        Self::Connect,
        Self::Timeout,
        Self::RateLimit,
        Self::ServerError,
    ];

    pub const fn is_recoverable(self) -> bool {
        !matches!(self, Self::Client)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::RateLimit => "rate_limit",
            Self::ServerError => "server_error",
            Self::Client => "client",
        }
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of [`FailureClass`]es, copied into every attempt so checking it costs nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FailureClasses(u8);

impl FailureClasses {
    pub const fn contains(self, class: FailureClass) -> bool {
        self.0 & class.bit() != 0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl FromIterator<FailureClass> for FailureClasses {
    fn from_iter<I: IntoIterator<Item = FailureClass>>(iter: I) -> Self {
        Self(iter.into_iter().fold(0, |bits, class| bits | class.bit()))
    }
}

/// One upstream of an alias.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Name of a `[[providers]]` entry. Required.
    pub provider: String,
    /// The model name sent upstream. Required.
    pub model: String,
    /// Relative share of traffic. Default 100; 0 takes the target out of every plan.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Watched against the alias's other targets and rolled back when it does worse.
    /// Default false.
    #[serde(default)]
    pub canary: bool,
}

impl TargetConfig {
    /// A target with the default weight, not a canary.
    pub fn new(provider: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            provider: provider.into(),
            model: model.into(),
            weight: default_weight(),
            canary: false,
        }
    }
}

const fn default_weight() -> u32 {
    100
}

/// `[models.canary]`: when a canary target is rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// Rolled back when its share of failed requests in the window exceeds this. Default 0.05.
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    /// Rolled back when its p95 latency exceeds this multiple of the other targets' p95.
    /// Default 1.5.
    #[serde(default = "default_max_p95_ratio")]
    pub max_p95_ratio: f64,
    /// How far back the comparison looks, in seconds. Default 300.
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Requests the canary needs in the window before it is judged (at most 512, the number of
    /// samples kept). Default 50.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        Self {
            max_error_rate: default_max_error_rate(),
            max_p95_ratio: default_max_p95_ratio(),
            window_secs: default_window_secs(),
            min_requests: default_min_requests(),
        }
    }
}

const fn default_max_error_rate() -> f64 {
    0.05
}

const fn default_max_p95_ratio() -> f64 {
    1.5
}

const fn default_window_secs() -> u64 {
    300
}

const fn default_min_requests() -> u32 {
    50
}
