//! Reconciliation: the ledger's daily spend with one provider against that vendor's own usage
//! export, per (day, model).
//!
//! The exports' columns are taken from the vendors' documentation (see
//! `docs/reconciliation.md`), not from real files, so the parsers are deliberately lenient:
//! headers are matched case-insensitively and with punctuation ignored, each measure has a few
//! known names, and what was found or not is reported rather than guessed at. A measure no
//! export has (a usage export has no cost, a cost export no tokens) is not compared at all,
//! which is different from comparing against zero. Several exports of one vendor (its usage
//! export and its cost export) can be given together; their rows are added up.
//!
//! Input tokens are compared the way the ledger counts them: the whole prompt, cache reads and
//! cache writes included (OpenAI's convention). Anthropic reports those three apart, so its
//! columns are added up before comparing.

use crate::report::{
    Filter, Format, ReportError, View, csv_text, fetch, money, parse_money, pretty_json, table,
};
use crate::store::UsageStore;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use time::macros::format_description;
use time::{Date, OffsetDateTime, UtcOffset};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{file}: not readable as CSV: {source}")]
    Csv { file: String, source: csv::Error },
    #[error(
        "{file}: the header does not tell an OpenAI export from an Anthropic one ({header}); \
         name the format (--export-format openai or anthropic)"
    )]
    UnknownVendor { file: String, header: String },
    #[error(
        "{file}: no {role} column in this {vendor} export (accepted: {accepted}); its header: {header}"
    )]
    MissingColumn {
        file: String,
        vendor: Vendor,
        role: &'static str,
        accepted: String,
        header: String,
    },
    #[error(
        "{file}: no input token, output token or cost column in this {vendor} export, so \
         nothing to compare; its header: {header}"
    )]
    NothingToCompare {
        file: String,
        vendor: Vendor,
        header: String,
    },
    #[error("{file}, line {line}: {column} is {value:?}, which is not {expected}")]
    BadValue {
        file: String,
        line: u64,
        column: String,
        value: String,
        expected: &'static str,
    },
    #[error("the exports hold no usage rows in the range")]
    Empty,
    #[error("the tolerance must not be negative (got {0}%)")]
    NegativeTolerance(Decimal),
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// Whose export a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    OpenAi,
    Anthropic,
}

impl Vendor {
    pub const fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "OpenAI",
            Self::Anthropic => "Anthropic",
        }
    }

    fn specs(self) -> &'static [Spec] {
        match self {
            Self::OpenAi => OPENAI,
            Self::Anthropic => ANTHROPIC,
        }
    }

    /// Header names only this vendor's exports use: what detection counts.
    fn markers(self) -> &'static [&'static str] {
        match self {
            Self::OpenAi => OPENAI_MARKERS,
            Self::Anthropic => ANTHROPIC_MARKERS,
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown export format {0:?}: expected openai or anthropic")]
pub struct UnknownVendor(pub String);

impl FromStr for Vendor {
    type Err = UnknownVendor;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "openai" => Ok(Self::OpenAi),
            "anthropic" => Ok(Self::Anthropic),
            _ => Err(UnknownVendor(text.to_owned())),
        }
    }
}

/// What a column of an export is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Day,
    Model,
    /// OpenAI: the whole prompt. Anthropic: the prompt less cache reads and writes.
    InputTokens,
    CacheReadTokens,
    CacheWriteTokens,
    OutputTokens,
    Cost,
    Currency,
}

impl Role {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Model => "model",
            Self::InputTokens => "input tokens",
            Self::CacheReadTokens => "cache read tokens",
            Self::CacheWriteTokens => "cache write tokens",
            Self::OutputTokens => "output tokens",
            Self::Cost => "cost",
            Self::Currency => "currency",
        }
    }
}

/// The accepted header names of one role, best first, normalised (see [`normalise`]).
struct Spec {
    role: Role,
    aliases: &'static [&'static str],
    /// Every matching column is added up rather than the first taken: Anthropic may split
    /// cache writes by cache lifetime.
    sum_all: bool,
    /// The amounts are in cents (hundredths of the currency unit).
    cents: bool,
}

const fn spec(role: Role, aliases: &'static [&'static str]) -> Spec {
    Spec {
        role,
        aliases,
        sum_all: false,
        cents: false,
    }
}

// docs/reconciliation.md lists these; keep the two in step.
const OPENAI: &[Spec] = &[
    spec(
        Role::Day,
        &[
            "start_time_iso",
            "date",
            "day",
            "usage_date",
            "start_date",
            "start_time",
            "bucket_start_time",
            "aggregation_timestamp",
            "timestamp",
        ],
    ),
    spec(
        Role::Model,
        &[
            "model",
            "snapshot_id",
            "model_name",
            "model_id",
            "line_item",
        ],
    ),
    spec(
        Role::InputTokens,
        &[
            "input_tokens",
            "n_context_tokens_total",
            "context_tokens",
            "prompt_tokens",
            "total_input_tokens",
        ],
    ),
    spec(
        Role::OutputTokens,
        &[
            "output_tokens",
            "n_generated_tokens_total",
            "generated_tokens",
            "completion_tokens",
            "total_output_tokens",
        ],
    ),
    spec(
        Role::Cost,
        &[
            "amount_value",
            "cost",
            "cost_usd",
            "amount",
            "amount_usd",
            "total_cost",
            "spend",
        ],
    ),
    spec(Role::Currency, &["amount_currency", "currency"]),
];

const OPENAI_MARKERS: &[&str] = &[
    "start_time",
    "start_time_iso",
    "end_time",
    "end_time_iso",
    "input_cached_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "num_model_requests",
    "n_requests",
    "n_context_tokens_total",
    "n_generated_tokens_total",
    "n_cached_context_tokens_total",
    "snapshot_id",
    "aggregation_timestamp",
    "amount_value",
    "amount_currency",
    "line_item",
    "project_id",
    "project_name",
    "organization_id",
];

const ANTHROPIC: &[Spec] = &[
    spec(
        Role::Day,
        &[
            "usage_date_utc",
            "date",
            "day",
            "usage_date",
            "date_utc",
            "starting_at",
            "start_date",
            "start_time",
            "timestamp",
        ],
    ),
    spec(
        Role::Model,
        &["model", "model_version", "model_name", "model_id"],
    ),
    spec(
        Role::InputTokens,
        &[
            "uncached_input_tokens",
            "input_tokens_no_cache",
            "input_tokens_uncached",
            "input_tokens",
            "prompt_tokens",
        ],
    ),
    spec(
        Role::CacheReadTokens,
        &[
            "cache_read_input_tokens",
            "input_tokens_cache_read",
            "cache_read_tokens",
            "cache_read",
        ],
    ),
    spec(
        Role::CacheWriteTokens,
        &[
            "cache_creation_input_tokens",
            "input_tokens_cache_write",
            "cache_write_tokens",
            "cache_creation_tokens",
            "cache_write",
        ],
    ),
    Spec {
        role: Role::CacheWriteTokens,
        aliases: &[
            "cache_creation_ephemeral_5m_input_tokens",
            "cache_creation_ephemeral_1h_input_tokens",
            "input_tokens_cache_write_5m",
            "input_tokens_cache_write_1h",
        ],
        sum_all: true,
        cents: false,
    },
    spec(Role::OutputTokens, &["output_tokens", "completion_tokens"]),
    spec(
        Role::Cost,
        &[
            "cost_usd",
            "cost",
            "amount_usd",
            "total_cost",
            "cost_in_usd",
            "amount",
        ],
    ),
    Spec {
        role: Role::Cost,
        aliases: &["amount_cents", "cost_cents", "cost_in_cents"],
        sum_all: false,
        cents: true,
    },
    spec(Role::Currency, &["currency"]),
];

const ANTHROPIC_MARKERS: &[&str] = &[
    "usage_date_utc",
    "uncached_input_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "input_tokens_no_cache",
    "input_tokens_uncached",
    "input_tokens_cache_read",
    "input_tokens_cache_write",
    "input_tokens_cache_write_5m",
    "input_tokens_cache_write_1h",
    "cache_creation_ephemeral_5m_input_tokens",
    "cache_creation_ephemeral_1h_input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "model_version",
    "workspace",
    "workspace_id",
    "workspace_name",
    "starting_at",
    "context_window",
];

/// Lower case, every run of other characters than letters and digits made one `_`: so
/// `Input Tokens`, `input-tokens` and `input_tokens` are one name, as are `amount.value` and
/// `amount_value`, or `Cost (USD)` and `cost_usd`.
pub fn normalise(header: &str) -> String {
    let mut name = String::with_capacity(header.len());
    for c in header.trim_start_matches('\u{feff}').chars() {
        if c.is_alphanumeric() {
            name.extend(c.to_lowercase());
        } else if !name.is_empty() && !name.ends_with('_') {
            name.push('_');
        }
    }
    name.truncate(name.trim_end_matches('_').len());
    name
}

/// The columns an export was read with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMatch {
    pub role: Role,
    /// The export's own header names (more than one when they are added up).
    pub columns: Vec<String>,
}

/// One (day, model) row of an export, its measures `None` where the export has no column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VendorUsage {
    pub day: Date,
    pub model: String,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cost: Option<Decimal>,
    pub currency: Option<String>,
}

/// How the vendor of an export was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    /// Its header has names only this vendor uses.
    Header,
    /// The caller named it.
    Named,
    /// The header fits both; the provider's kind decided.
    Hint,
}

/// A parsed export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VendorExport {
    pub file: String,
    pub vendor: Vendor,
    pub detection: Detection,
    pub found: Vec<ColumnMatch>,
    /// Roles with no column. Input tokens missing their cache parts count only what is there.
    pub missing: Vec<Role>,
    pub rows: Vec<VendorUsage>,
    /// Rows without a model (fees that are no model's, such as web search) or a total line.
    pub skipped_rows: usize,
}

impl VendorExport {
    /// A line for the operator: which vendor, which column serves what, what is missing.
    pub fn describe(&self) -> String {
        let how = match self.detection {
            Detection::Header => "told by its header",
            Detection::Named => "as named",
            Detection::Hint => "the header fits both; going by the provider's kind",
        };
        let found: Vec<String> = self
            .found
            .iter()
            .map(|found| format!("{} <- {}", found.role.name(), found.columns.join(" + ")))
            .collect();
        let mut text = format!(
            "{}: {} export ({how}); {}",
            self.file,
            self.vendor,
            found.join(", ")
        );
        if !self.missing.is_empty() {
            let missing: Vec<&str> = self.missing.iter().map(|role| role.name()).collect();
            text.push_str(&format!("; no column for: {}", missing.join(", ")));
        }
        text.push_str(&format!("; {} rows", self.rows.len()));
        if self.skipped_rows > 0 {
            text.push_str(&format!(
                " ({} without a model or a day skipped)",
                self.skipped_rows
            ));
        }
        text
    }

    fn has(&self, role: Role) -> bool {
        self.found.iter().any(|found| found.role == role)
    }
}

/// Reads a vendor's usage or cost export. `named` forces the vendor; otherwise the header
/// decides, and `hint` (the provider's kind in the config) settles a header that fits both.
pub fn parse_export(
    file: &str,
    data: &[u8],
    named: Option<Vendor>,
    hint: Option<Vendor>,
) -> Result<VendorExport, ReconcileError> {
    let csv_error = |source| ReconcileError::Csv {
        file: file.to_owned(),
        source,
    };
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(data);
    let header: Vec<String> = reader
        .headers()
        .map_err(csv_error)?
        .iter()
        .map(str::to_owned)
        .collect();
    let names: Vec<String> = header.iter().map(|h| normalise(h)).collect();
    let header_text = header.join(",");

    let (vendor, detection) = match named {
        Some(vendor) => (vendor, Detection::Named),
        None => {
            let score = |vendor: Vendor| {
                names
                    .iter()
                    .filter(|name| vendor.markers().contains(&name.as_str()))
                    .count()
            };
            let (openai, anthropic) = (score(Vendor::OpenAi), score(Vendor::Anthropic));
            match (openai.cmp(&anthropic), hint) {
                (std::cmp::Ordering::Greater, _) => (Vendor::OpenAi, Detection::Header),
                (std::cmp::Ordering::Less, _) => (Vendor::Anthropic, Detection::Header),
                (std::cmp::Ordering::Equal, Some(vendor)) => (vendor, Detection::Hint),
                (std::cmp::Ordering::Equal, None) => {
                    return Err(ReconcileError::UnknownVendor {
                        file: file.to_owned(),
                        header: header_text,
                    });
                }
            }
        }
    };

    // Each role takes its first matching spec; a later spec of the same role is a fallback.
    let mut columns: BTreeMap<Role, (Vec<usize>, bool)> = BTreeMap::new();
    for spec in vendor.specs() {
        if columns.contains_key(&spec.role) {
            continue;
        }
        let mut matched = Vec::new();
        for alias in spec.aliases {
            let new: Vec<usize> = names
                .iter()
                .enumerate()
                .filter(|(index, name)| name == alias && !matched.contains(index))
                .map(|(index, _)| index)
                .collect();
            matched.extend(new);
            if !matched.is_empty() && !spec.sum_all {
                matched.truncate(1);
                break;
            }
        }
        if !matched.is_empty() {
            columns.insert(spec.role, (matched, spec.cents));
        }
    }
    let missing_column = |role: Role| ReconcileError::MissingColumn {
        file: file.to_owned(),
        vendor,
        role: role.name(),
        accepted: vendor
            .specs()
            .iter()
            .filter(|spec| spec.role == role)
            .flat_map(|spec| spec.aliases.iter().copied())
            .collect::<Vec<_>>()
            .join(", "),
        header: header_text.clone(),
    };
    let single = |role: Role| {
        columns
            .get(&role)
            .and_then(|(found, _)| found.first().copied())
    };
    let day_column = single(Role::Day).ok_or_else(|| missing_column(Role::Day))?;
    let model_column = single(Role::Model).ok_or_else(|| missing_column(Role::Model))?;
    let input_columns: Vec<usize> = [
        Role::InputTokens,
        Role::CacheReadTokens,
        Role::CacheWriteTokens,
    ]
    .iter()
    .filter_map(|role| columns.get(role))
    .flat_map(|(found, _)| found.iter().copied())
    .collect();
    let output_column = single(Role::OutputTokens);
    let cost_column = columns
        .get(&Role::Cost)
        .and_then(|(found, cents)| Some((*found.first()?, *cents)));
    let currency_column = single(Role::Currency);
    if input_columns.is_empty() && output_column.is_none() && cost_column.is_none() {
        return Err(ReconcileError::NothingToCompare {
            file: file.to_owned(),
            vendor,
            header: header_text,
        });
    }

    let found = columns
        .iter()
        .map(|(role, (indices, _))| ColumnMatch {
            role: *role,
            columns: indices.iter().map(|&i| header[i].clone()).collect(),
        })
        .collect();
    let roles: &[Role] = match vendor {
        Vendor::OpenAi => &[
            Role::InputTokens,
            Role::OutputTokens,
            Role::Cost,
            Role::Currency,
        ],
        Vendor::Anthropic => &[
            Role::InputTokens,
            Role::CacheReadTokens,
            Role::CacheWriteTokens,
            Role::OutputTokens,
            Role::Cost,
            Role::Currency,
        ],
    };
    let missing = roles
        .iter()
        .copied()
        .filter(|role| !columns.contains_key(role))
        .collect();

    let mut rows = Vec::new();
    let mut skipped_rows = 0;
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = record.position().map_or(0, csv::Position::line);
        let cell = |index: usize| record.get(index).unwrap_or("");
        let bad = |index: usize, expected: &'static str| ReconcileError::BadValue {
            file: file.to_owned(),
            line,
            column: header.get(index).cloned().unwrap_or_default(),
            value: cell(index).to_owned(),
            expected,
        };
        let day_text = cell(day_column);
        // Spreadsheet-made exports end in a total line; it has no day to reconcile.
        if record.iter().all(str::is_empty)
            || day_text.is_empty()
            || day_text.to_ascii_lowercase().starts_with("total")
        {
            skipped_rows += 1;
            continue;
        }
        let day = parse_day(day_text)
            .ok_or_else(|| bad(day_column, "a date (YYYY-MM-DD, RFC 3339 or Unix seconds)"))?;
        // OpenAI's cost line items read `gpt-4o-2024-08-06, input`: the model is before the
        // comma, and no model name has one.
        let model = cell(model_column)
            .split(',')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        if model.is_empty() {
            skipped_rows += 1;
            continue;
        }
        let tokens = |index: usize| parse_count(cell(index)).ok_or_else(|| bad(index, "a count"));
        let input_tokens = if input_columns.is_empty() {
            None
        } else {
            let mut sum = 0_i64;
            for &index in &input_columns {
                sum = sum.saturating_add(tokens(index)?);
            }
            Some(sum)
        };
        let output_tokens = output_column.map(tokens).transpose()?;
        let cost = match cost_column {
            None => None,
            Some((index, cents)) => {
                let amount = parse_amount(cell(index)).ok_or_else(|| bad(index, "an amount"))?;
                Some(if cents {
                    amount / Decimal::ONE_HUNDRED
                } else {
                    amount
                })
            }
        };
        let currency = currency_column
            .map(|index| cell(index).to_ascii_uppercase())
            .filter(|currency| !currency.is_empty());
        rows.push(VendorUsage {
            day,
            model,
            input_tokens,
            output_tokens,
            cost,
            currency,
        });
    }
    Ok(VendorExport {
        file: file.to_owned(),
        vendor,
        detection,
        found,
        missing,
        rows,
        skipped_rows,
    })
}

/// `YYYY-MM-DD` (anything after it, such as a time, ignored), RFC 3339 (its UTC day), or Unix
/// seconds (milliseconds when too large for seconds), the bucket starts of the vendors' APIs.
fn parse_day(text: &str) -> Option<Date> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let number: i64 = text.parse().ok()?;
        let seconds = if number > 100_000_000_000 {
            number / 1000
        } else {
            number
        };
        return OffsetDateTime::from_unix_timestamp(seconds)
            .ok()
            .map(OffsetDateTime::date);
    }
    if let Ok(at) = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339) {
        return Some(at.to_offset(UtcOffset::UTC).date());
    }
    Date::parse(text.get(..10)?, format_description!("[year]-[month]-[day]")).ok()
}

/// A token count: empty is 0; thousands separators and a `.0` a spreadsheet added are fine.
fn parse_count(text: &str) -> Option<i64> {
    let digits: String = text
        .chars()
        .filter(|c| !matches!(c, ',' | '_' | ' '))
        .collect();
    if digits.is_empty() {
        return Some(0);
    }
    let value = parse_money(&digits)?;
    if !value.fract().is_zero() {
        return None;
    }
    i64::try_from(value).ok()
}

/// An amount: empty is 0; a `$` and thousands separators are dropped.
fn parse_amount(text: &str) -> Option<Decimal> {
    let digits: String = text
        .chars()
        .filter(|c| !matches!(c, ',' | '$' | ' '))
        .collect();
    if digits.is_empty() {
        return Some(Decimal::ZERO);
    }
    parse_money(&digits)
}

/// What to reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileQuery {
    /// The provider's name in the gateway config (`spend_daily.provider`).
    pub provider: String,
    /// Default: the first day of the exports.
    pub from: Option<Date>,
    /// Default: the last day of the exports.
    pub to: Option<Date>,
    /// A difference is flagged when larger than this share of the vendor's figure.
    pub tolerance_percent: Decimal,
    /// Vendor model name -> the ledger's, for vendors that report a dated snapshot
    /// (`gpt-4o-2024-08-06`) where the gateway sent `gpt-4o`.
    pub model_map: BTreeMap<String, String>,
}

/// One measure of a line. `vendor` is `None` when no export has the measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison<T> {
    /// `None` for a cost the ledger cannot state (unpriced, or in several currencies).
    pub ledger: Option<T>,
    pub vendor: Option<T>,
    /// Ledger minus vendor, when both are known.
    pub difference: Option<T>,
    pub beyond_tolerance: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileLine {
    pub day: Date,
    pub model: String,
    pub input_tokens: Comparison<i64>,
    pub output_tokens: Comparison<i64>,
    pub cost: Comparison<Decimal>,
    /// The currency the costs were compared in.
    pub currency: Option<String>,
    pub notes: Vec<String>,
    pub flagged: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    pub provider: String,
    pub from: Date,
    pub to: Date,
    pub tolerance_percent: Decimal,
    /// Sorted by day, then model.
    pub lines: Vec<ReconcileLine>,
}

#[derive(Debug, Default)]
struct VendorSums {
    input: i64,
    output: i64,
    cost: Decimal,
    currencies: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct LedgerSums {
    input: i64,
    output: i64,
    cost: BTreeMap<String, Decimal>,
    unpriced: i64,
}

/// Compares the ledger of `query.provider` with the exports over their days (or the query's).
pub async fn reconcile(
    store: &UsageStore,
    query: &ReconcileQuery,
    exports: &[VendorExport],
) -> Result<Reconciliation, ReconcileError> {
    if query.tolerance_percent.is_sign_negative() && !query.tolerance_percent.is_zero() {
        return Err(ReconcileError::NegativeTolerance(query.tolerance_percent));
    }
    let in_range = |day: Date| {
        query.from.is_none_or(|from| day >= from) && query.to.is_none_or(|to| day <= to)
    };
    let mut vendor: BTreeMap<(Date, String), VendorSums> = BTreeMap::new();
    for row in exports.iter().flat_map(|export| &export.rows) {
        if !in_range(row.day) {
            continue;
        }
        let model = query
            .model_map
            .get(&row.model)
            .cloned()
            .unwrap_or_else(|| row.model.clone());
        let sums = vendor.entry((row.day, model)).or_default();
        sums.input += row.input_tokens.unwrap_or(0);
        sums.output += row.output_tokens.unwrap_or(0);
        sums.cost += row.cost.unwrap_or_default();
        sums.currencies.extend(row.currency.clone());
    }
    let first = vendor.keys().next().map(|(day, _)| *day);
    let last = vendor.keys().next_back().map(|(day, _)| *day);
    let (Some(from), Some(to)) = (query.from.or(first), query.to.or(last)) else {
        return Err(ReconcileError::Empty);
    };
    let filter = Filter {
        provider: Some(&query.provider),
        ..Filter::days(from, to)?
    };
    let mut ledger: BTreeMap<(Date, String), LedgerSums> = BTreeMap::new();
    for row in fetch(store, View::Daily, &filter).await? {
        let sums = ledger
            .entry((row.period, row.model.clone().unwrap_or_default()))
            .or_default();
        sums.input += row.input_tokens;
        sums.output += row.output_tokens;
        sums.unpriced += row.unpriced_requests;
        if let Some(cost) = row.cost {
            *sums
                .cost
                .entry(row.currency.clone().unwrap_or_default())
                .or_default() += cost;
        }
    }

    let has = |role: Role| exports.iter().any(|export| export.has(role));
    let compared = Compared {
        input: has(Role::InputTokens) || has(Role::CacheReadTokens) || has(Role::CacheWriteTokens),
        output: has(Role::OutputTokens),
        cost: has(Role::Cost),
        tolerance: query.tolerance_percent,
    };
    let keys: BTreeSet<&(Date, String)> = ledger.keys().chain(vendor.keys()).collect();
    let lines = keys
        .into_iter()
        .map(|key| compared.line(key, ledger.get(key), vendor.get(key)))
        .collect();
    Ok(Reconciliation {
        provider: query.provider.clone(),
        from,
        to,
        tolerance_percent: query.tolerance_percent,
        lines,
    })
}

/// Which measures the exports have, and the tolerance they are held to.
struct Compared {
    input: bool,
    output: bool,
    cost: bool,
    tolerance: Decimal,
}

impl Compared {
    fn line(
        &self,
        (day, model): &(Date, String),
        ledger: Option<&LedgerSums>,
        vendor: Option<&VendorSums>,
    ) -> ReconcileLine {
        let empty_ledger = LedgerSums::default();
        let empty_vendor = VendorSums::default();
        let mut notes = Vec::new();
        if ledger.is_none() {
            notes.push("not in the ledger".to_owned());
        }
        if vendor.is_none() {
            notes.push("not in the export".to_owned());
        }
        let (ledger, vendor) = (
            ledger.unwrap_or(&empty_ledger),
            vendor.unwrap_or(&empty_vendor),
        );
        let input_tokens = self.tokens(ledger.input, self.input.then_some(vendor.input));
        let output_tokens = self.tokens(ledger.output, self.output.then_some(vendor.output));

        // Exports that state no currency are in USD: both vendors bill in it.
        let vendor_currencies: Vec<&str> = if vendor.currencies.is_empty() {
            vec!["USD"]
        } else {
            vendor.currencies.iter().map(String::as_str).collect()
        };
        let mut cost_unknown = false;
        let (ledger_cost, currency) = match ledger.cost.len() {
            // Nothing priced and nothing unpriced: requests without usage cost nothing.
            0 if ledger.unpriced == 0 => (
                Some(Decimal::ZERO),
                vendor_currencies.first().map(|c| (*c).to_owned()),
            ),
            0 => {
                notes.push(format!("ledger: {} unpriced request(s)", ledger.unpriced));
                cost_unknown = true;
                (None, None)
            }
            1 => {
                if ledger.unpriced > 0 {
                    notes.push(format!(
                        "ledger cost leaves out {} unpriced request(s)",
                        ledger.unpriced
                    ));
                }
                let (currency, amount) = ledger
                    .cost
                    .first_key_value()
                    .map(|(c, a)| (c.clone(), *a))
                    .unwrap_or_default();
                (Some(amount), Some(currency))
            }
            _ => {
                let currencies: Vec<&str> = ledger.cost.keys().map(String::as_str).collect();
                notes.push(format!("ledger cost in {}", currencies.join(" and ")));
                cost_unknown = true;
                (None, None)
            }
        };
        if let Some(currency) = &currency
            && self.cost
            && vendor_currencies != [currency.as_str()]
        {
            notes.push(format!(
                "ledger cost in {currency}, export in {}",
                vendor_currencies.join(" and ")
            ));
            cost_unknown = true;
        }
        let vendor_cost = self.cost.then_some(vendor.cost);
        let cost = if cost_unknown {
            Comparison {
                ledger: ledger_cost,
                vendor: vendor_cost,
                difference: None,
                // A cost that cannot be compared is flagged unless there is nothing to owe.
                beyond_tolerance: vendor_cost.is_some_and(|cost| !cost.is_zero())
                    || ledger_cost.is_some_and(|cost| !cost.is_zero()),
            }
        } else {
            self.compare(ledger_cost, vendor_cost)
        };
        let flagged = input_tokens.beyond_tolerance
            || output_tokens.beyond_tolerance
            || cost.beyond_tolerance;
        ReconcileLine {
            day: *day,
            model: model.clone(),
            input_tokens,
            output_tokens,
            cost,
            currency,
            notes,
            flagged,
        }
    }

    fn tokens(&self, ledger: i64, vendor: Option<i64>) -> Comparison<i64> {
        let decimal = self.compare(Some(Decimal::from(ledger)), vendor.map(Decimal::from));
        Comparison {
            ledger: Some(ledger),
            vendor,
            difference: vendor.map(|vendor| ledger - vendor),
            beyond_tolerance: decimal.beyond_tolerance,
        }
    }

    /// Beyond tolerance: |ledger - vendor| > tolerance% of |vendor|. Against a vendor figure
    /// of 0, any difference is.
    fn compare(&self, ledger: Option<Decimal>, vendor: Option<Decimal>) -> Comparison<Decimal> {
        let difference = ledger.zip(vendor).map(|(l, v)| l - v);
        let beyond_tolerance = match (difference, vendor) {
            (Some(difference), Some(vendor)) => {
                !difference.is_zero()
                    && difference.abs() * Decimal::ONE_HUNDRED > self.tolerance * vendor.abs()
            }
            _ => false,
        };
        Comparison {
            ledger,
            vendor,
            difference,
            beyond_tolerance,
        }
    }
}

impl Reconciliation {
    pub fn flagged(&self) -> usize {
        self.lines.iter().filter(|line| line.flagged).count()
    }

    pub fn render(&self, format: Format) -> Result<String, ReportError> {
        let header: Vec<String> = [
            "day",
            "model",
            "status",
            "input_ledger",
            "input_vendor",
            "input_diff",
            "output_ledger",
            "output_vendor",
            "output_diff",
            "cost_ledger",
            "cost_vendor",
            "cost_diff",
            "currency",
            "notes",
        ]
        .map(str::to_owned)
        .to_vec();
        let count = |value: Option<i64>| value.map(|v| v.to_string()).unwrap_or_default();
        let amount = |value: Option<Decimal>| value.map(money).unwrap_or_default();
        let rows: Vec<Vec<String>> = self
            .lines
            .iter()
            .map(|line| {
                vec![
                    line.day.to_string(),
                    line.model.clone(),
                    if line.flagged { "FLAG" } else { "ok" }.to_owned(),
                    count(line.input_tokens.ledger),
                    count(line.input_tokens.vendor),
                    count(line.input_tokens.difference),
                    count(line.output_tokens.ledger),
                    count(line.output_tokens.vendor),
                    count(line.output_tokens.difference),
                    amount(line.cost.ledger),
                    amount(line.cost.vendor),
                    amount(line.cost.difference),
                    line.currency.clone().unwrap_or_default(),
                    line.notes.join("; "),
                ]
            })
            .collect();
        match format {
            Format::Table => {
                let numeric: Vec<bool> = (0..header.len()).map(|i| (3..12).contains(&i)).collect();
                let mut text = table(&header, &rows, None, &numeric);
                text.push_str(&format!(
                    "\n{provider}, {from} to {to}: {flagged} of {total} (day, model) pairs differ \
                     by more than {tolerance}% of the vendor's figure (diff = ledger - vendor)\n",
                    provider = self.provider,
                    from = self.from,
                    to = self.to,
                    flagged = self.flagged(),
                    total = self.lines.len(),
                    tolerance = money(self.tolerance_percent),
                ));
                Ok(text)
            }
            Format::Csv => csv_text(&header, &rows),
            Format::Json => {
                let tokens = |c: &Comparison<i64>| {
                    json!({"ledger": c.ledger, "vendor": c.vendor, "difference": c.difference,
                           "beyond_tolerance": c.beyond_tolerance})
                };
                let lines: Vec<Value> = self
                    .lines
                    .iter()
                    .map(|line| {
                        json!({
                            "day": line.day.to_string(),
                            "model": line.model,
                            "flagged": line.flagged,
                            "input_tokens": tokens(&line.input_tokens),
                            "output_tokens": tokens(&line.output_tokens),
                            "cost": {
                                "ledger": line.cost.ledger.map(money),
                                "vendor": line.cost.vendor.map(money),
                                "difference": line.cost.difference.map(money),
                                "beyond_tolerance": line.cost.beyond_tolerance,
                            },
                            "currency": line.currency,
                            "notes": line.notes,
                        })
                    })
                    .collect();
                Ok(pretty_json(&json!({
                    "provider": self.provider,
                    "from": self.from.to_string(),
                    "to": self.to.to_string(),
                    "tolerance_percent": money(self.tolerance_percent),
                    "flagged": self.flagged(),
                    "lines": lines,
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;
    use time::macros::date;

    #[test]
    fn headers_are_normalised() {
        assert_eq!(normalise("\u{feff}Input Tokens"), "input_tokens");
        assert_eq!(normalise("amount.value"), "amount_value");
        assert_eq!(normalise(" Cost (USD) "), "cost_usd");
        assert_eq!(
            normalise("cache_creation.ephemeral_5m_input_tokens"),
            "cache_creation_ephemeral_5m_input_tokens"
        );
    }

    #[test]
    fn days_parse_in_the_vendors_shapes() {
        assert_eq!(parse_day("2026-11-02"), Some(date!(2026 - 11 - 02)));
        assert_eq!(parse_day("1793577600"), Some(date!(2026 - 11 - 02)));
        assert_eq!(parse_day("1793577600000"), Some(date!(2026 - 11 - 02)));
        assert_eq!(
            parse_day("2026-11-02T23:30:00-02:00"),
            Some(date!(2026 - 11 - 03))
        );
        assert_eq!(
            parse_day("2026-11-02 00:00:00 UTC"),
            Some(date!(2026 - 11 - 02))
        );
        assert_eq!(parse_day("yesterday"), None);
    }

    #[test]
    fn counts_and_amounts_tolerate_spreadsheet_formatting() {
        assert_eq!(parse_count("1,234"), Some(1234));
        assert_eq!(parse_count("12.0"), Some(12));
        assert_eq!(parse_count(""), Some(0));
        assert_eq!(parse_count("1.5"), None);
        assert_eq!(parse_amount("$1,234.50"), Decimal::from_str("1234.50").ok());
        assert_eq!(parse_amount(""), Some(Decimal::ZERO));
    }

    #[test]
    fn an_ambiguous_header_needs_a_name_or_a_hint() {
        let data = b"date,model,input_tokens,output_tokens,cost\n2026-11-01,m,1,2,0.5\n";
        let err = parse_export("x.csv", data, None, None).unwrap_err();
        assert!(matches!(err, ReconcileError::UnknownVendor { .. }), "{err}");
        let export = parse_export("x.csv", data, None, Some(Vendor::Anthropic)).unwrap();
        assert_eq!(
            (export.vendor, export.detection),
            (Vendor::Anthropic, Detection::Hint)
        );
        assert_eq!(
            export.missing,
            [
                Role::CacheReadTokens,
                Role::CacheWriteTokens,
                Role::Currency
            ]
        );
    }

    #[test]
    fn anthropic_cache_writes_split_by_lifetime_are_added() {
        let data = b"usage_date_utc,model,uncached_input_tokens,cache_read_input_tokens,\
cache_creation.ephemeral_5m_input_tokens,cache_creation.ephemeral_1h_input_tokens,output_tokens\n\
2026-11-01,claude,10,100,20,30,5\n";
        let export = parse_export("a.csv", data, None, None).unwrap();
        assert_eq!(export.detection, Detection::Header);
        assert_eq!(export.rows[0].input_tokens, Some(160));
        assert_eq!(export.rows[0].cost, None);
        assert_eq!(export.missing, [Role::Cost, Role::Currency]);
    }

    #[test]
    fn a_missing_model_column_is_named() {
        let data = b"start_time,input_tokens\n1793491200,5\n";
        let err = parse_export("o.csv", data, None, None).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("no model column"), "{text}");
        assert!(text.contains("snapshot_id"), "{text}");
    }
}
