//! Spend reports and invoices, read from the `spend_daily` and `spend_monthly` views.
//!
//! The views hold one row per day (or month) and attribution (project, team, provider,
//! model, ...); everything here re-adds those rows in Rust with exact decimals. Adding in SQL
//! is not an option: SQLite keeps cost as text, and its `SUM` would go through `f64`.
//!
//! Money in different currencies is never added together: costs are kept per currency, and a
//! report grows one cost column per currency it meets. A row with usage but no price is
//! counted in `unpriced_requests` and adds nothing to any cost, so a gap in the price table
//! shows up as such instead of as a smaller bill.

use crate::store::UsageStore;
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use time::Date;
use time::macros::format_description;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("the {view} view is missing: apply the migrations first (`gateway migrate`): {source}")]
    MissingView {
        view: &'static str,
        source: sqlx::Error,
    },
    #[error("reading {view}: {source}")]
    Database {
        view: &'static str,
        source: sqlx::Error,
    },
    #[error("{view}.{column} holds {value:?}, which is not {expected}")]
    BadValue {
        view: &'static str,
        column: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the range is empty: {from} is after {to}")]
    EmptyRange { from: Date, to: Date },
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
}

/// How a report, invoice or reconciliation is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Aligned text for a terminal.
    #[default]
    Table,
    Csv,
    /// Amounts are strings, so no decimal goes through a float on the reader's side either.
    Json,
}

/// What a report can be grouped by: the attribution columns of `spend_daily`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dimension {
    Project,
    Team,
    BusinessLine,
    Provider,
    Model,
    Alias,
    Currency,
    Day,
}

impl Dimension {
    pub const ALL: [Self; 8] = [
        Self::Project,
        Self::Team,
        Self::BusinessLine,
        Self::Provider,
        Self::Model,
        Self::Alias,
        Self::Currency,
        Self::Day,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Project => "project",
            Self::Team => "team",
            Self::BusinessLine => "business_line",
            Self::Provider => "provider",
            Self::Model => "model",
            Self::Alias => "alias",
            Self::Currency => "currency",
            Self::Day => "day",
        }
    }

    fn of(self, row: &SpendRow) -> Option<String> {
        match self {
            Self::Project => row.project.clone(),
            Self::Team => row.team.clone(),
            Self::BusinessLine => row.business_line.clone(),
            Self::Provider => row.provider.clone(),
            Self::Model => row.model.clone(),
            Self::Alias => row.alias.clone(),
            Self::Currency => row.currency.clone(),
            Self::Day => Some(row.period.to_string()),
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown group {0:?}: expected project, team, business_line, provider, model, alias, currency or day"
)]
pub struct UnknownDimension(pub String);

impl FromStr for Dimension {
    type Err = UnknownDimension;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let wanted = text.trim().to_ascii_lowercase().replace('-', "_");
        Self::ALL
            .into_iter()
            .find(|dimension| dimension.name() == wanted)
            .ok_or_else(|| UnknownDimension(text.to_owned()))
    }
}

/// A report over `[from, to]`, both inclusive, UTC days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportQuery {
    pub from: Date,
    pub to: Date,
    /// In column order. Empty: a single total.
    pub group_by: Vec<Dimension>,
}

/// Requests, tokens and money of a set of ledger rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    pub reasoning_tokens: i64,
    /// Per currency; a currency appears once something in it was priced.
    pub cost: BTreeMap<String, Decimal>,
    /// Requests with usage but no price: their cost is missing from `cost`.
    pub unpriced_requests: i64,
}

impl Totals {
    fn add(&mut self, row: &SpendRow) {
        self.requests += row.requests;
        self.input_tokens += row.input_tokens;
        self.output_tokens += row.output_tokens;
        self.cached_tokens += row.cached_tokens;
        self.reasoning_tokens += row.reasoning_tokens;
        self.unpriced_requests += row.unpriced_requests;
        if let Some(cost) = row.cost {
            *self
                .cost
                .entry(row.currency.clone().unwrap_or_default())
                .or_default() += cost;
        }
    }

    fn counts(&self) -> [i64; 5] {
        [
            self.requests,
            self.input_tokens,
            self.output_tokens,
            self.cached_tokens,
            self.reasoning_tokens,
        ]
    }
}

const COUNT_COLUMNS: [&str; 5] = [
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    /// One value per `group_by` dimension; `None` where the ledger has none (no project, no
    /// team tag, a request that failed before a provider was chosen...).
    pub key: Vec<Option<String>>,
    pub totals: Totals,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub query: ReportQuery,
    /// Sorted by key.
    pub rows: Vec<ReportRow>,
    pub total: Totals,
}

/// Spend over `query.from..=query.to`, grouped as asked.
pub async fn report(store: &UsageStore, query: &ReportQuery) -> Result<Report, ReportError> {
    let rows = fetch(store, View::Daily, &Filter::days(query.from, query.to)?).await?;
    let mut groups: BTreeMap<Vec<Option<String>>, Totals> = BTreeMap::new();
    let mut total = Totals::default();
    for row in &rows {
        let key = query.group_by.iter().map(|dim| dim.of(row)).collect();
        groups.entry(key).or_default().add(row);
        total.add(row);
    }
    Ok(Report {
        query: query.clone(),
        rows: groups
            .into_iter()
            .map(|(key, totals)| ReportRow { key, totals })
            .collect(),
        total,
    })
}

impl Report {
    /// Every currency met, sorted: one cost column each.
    pub fn currencies(&self) -> Vec<String> {
        self.total.cost.keys().cloned().collect()
    }

    pub fn render(&self, format: Format) -> Result<String, ReportError> {
        let currencies = self.currencies();
        let mut header: Vec<String> = self
            .query
            .group_by
            .iter()
            .map(|dim| dim.name().to_owned())
            .collect();
        header.extend(COUNT_COLUMNS.map(str::to_owned));
        header.extend(cost_columns(&currencies));
        header.push("unpriced_requests".into());
        let cells = |key: Vec<String>, totals: &Totals| {
            let mut cells = key;
            cells.extend(totals.counts().map(|count| count.to_string()));
            cells.extend(cost_cells(&currencies, &totals.cost));
            cells.push(totals.unpriced_requests.to_string());
            cells
        };
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| {
                let key = row.key.iter().map(|v| v.clone().unwrap_or_default());
                cells(key.collect(), &row.totals)
            })
            .collect();
        // The total line names itself in the first key column; with no key column there is
        // only that line, so nothing needs telling apart.
        let mut total_key = vec![String::new(); self.query.group_by.len()];
        if let Some(first) = total_key.first_mut() {
            "TOTAL".clone_into(first);
        }
        let total = cells(total_key, &self.total);
        match format {
            Format::Table => {
                let numeric = (0..header.len())
                    .map(|column| column >= self.query.group_by.len())
                    .collect::<Vec<_>>();
                Ok(table(&header, &rows, Some(&total), &numeric))
            }
            Format::Csv => {
                let mut all = rows;
                all.push(total);
                csv_text(&header, &all)
            }
            Format::Json => Ok(pretty_json(&self.to_json())),
        }
    }

    /// The report as JSON (what `--format json` prints, and the admin API answers).
    pub fn to_json(&self) -> Value {
        let json_row = |key: Option<&[Option<String>]>, totals: &Totals| {
            let mut object = Map::new();
            if let Some(key) = key {
                for (dim, value) in self.query.group_by.iter().zip(key) {
                    object.insert(dim.name().into(), json!(value));
                }
            }
            totals_json(&mut object, totals);
            Value::Object(object)
        };
        json!({
            "from": self.query.from.to_string(),
            "to": self.query.to.to_string(),
            "group_by": self.query.group_by.iter().map(|d| d.name()).collect::<Vec<_>>(),
            "currencies": self.currencies(),
            "rows": self.rows.iter().map(|row| json_row(Some(&row.key), &row.totals))
                .collect::<Vec<_>>(),
            "total": json_row(None, &self.total),
        })
    }
}

fn totals_json(object: &mut Map<String, Value>, totals: &Totals) {
    for (name, count) in COUNT_COLUMNS.into_iter().zip(totals.counts()) {
        object.insert(name.into(), json!(count));
    }
    let cost: Map<String, Value> = totals
        .cost
        .iter()
        .map(|(currency, amount)| (currency.clone(), json!(money(*amount))))
        .collect();
    object.insert("cost".into(), Value::Object(cost));
    object.insert("unpriced_requests".into(), json!(totals.unpriced_requests));
}

fn cost_columns(currencies: &[String]) -> Vec<String> {
    if currencies.is_empty() {
        return vec!["cost".into()];
    }
    currencies
        .iter()
        .map(|currency| {
            if currency.is_empty() {
                "cost".into()
            } else {
                format!("cost_{currency}")
            }
        })
        .collect()
}

fn cost_cells(currencies: &[String], cost: &BTreeMap<String, Decimal>) -> Vec<String> {
    if currencies.is_empty() {
        return vec![String::new()];
    }
    currencies
        .iter()
        .map(|currency| cost.get(currency).map(|c| money(*c)).unwrap_or_default())
        .collect()
}

/// One project's month: what an invoice to that project lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceQuery {
    pub project: String,
    /// Any day of the month; the first is what counts.
    pub month: Date,
}

/// One (provider, model, currency) of an invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceLine {
    pub provider: Option<String>,
    pub model: Option<String>,
    /// `None` for requests nothing was priced for (unpriced, or without usage).
    pub currency: Option<String>,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    pub reasoning_tokens: i64,
    /// `None`: nothing on this line was priced. Never shown as 0.
    pub cost: Option<Decimal>,
    pub unpriced_requests: i64,
}

impl InvoiceLine {
    fn empty(provider: Option<String>, model: Option<String>, currency: Option<String>) -> Self {
        Self {
            provider,
            model,
            currency,
            requests: 0,
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost: None,
            unpriced_requests: 0,
        }
    }

    fn add(&mut self, row: &SpendRow) {
        self.requests += row.requests;
        self.input_tokens += row.input_tokens;
        self.output_tokens += row.output_tokens;
        self.cached_tokens += row.cached_tokens;
        self.reasoning_tokens += row.reasoning_tokens;
        self.unpriced_requests += row.unpriced_requests;
        if let Some(cost) = row.cost {
            *self.cost.get_or_insert_default() += cost;
        }
    }

    fn add_line(&mut self, line: &Self) {
        self.requests += line.requests;
        self.input_tokens += line.input_tokens;
        self.output_tokens += line.output_tokens;
        self.cached_tokens += line.cached_tokens;
        self.reasoning_tokens += line.reasoning_tokens;
        self.unpriced_requests += line.unpriced_requests;
        if let Some(cost) = line.cost {
            *self.cost.get_or_insert_default() += cost;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub project: String,
    /// The first day of the month.
    pub month: Date,
    /// Sorted by provider, model, currency.
    pub lines: Vec<InvoiceLine>,
    /// One per currency (sorted, the currency-less one last); `provider` and `model` are
    /// `None`.
    pub totals: Vec<InvoiceLine>,
}

/// Provider, model, currency.
type LineKey = (Option<String>, Option<String>, Option<String>);

pub async fn invoice(store: &UsageStore, query: &InvoiceQuery) -> Result<Invoice, ReportError> {
    let month = query.month.replace_day(1).unwrap_or(query.month);
    let filter = Filter {
        from: month,
        to: month,
        project: Some(&query.project),
        provider: None,
    };
    let rows = fetch(store, View::Monthly, &filter).await?;
    let mut lines: BTreeMap<LineKey, InvoiceLine> = BTreeMap::new();
    for row in &rows {
        let key = (
            row.provider.clone(),
            row.model.clone(),
            row.currency.clone(),
        );
        lines
            .entry(key.clone())
            .or_insert_with(|| InvoiceLine::empty(key.0, key.1, key.2))
            .add(row);
    }
    let lines: Vec<InvoiceLine> = lines.into_values().collect();
    // `Option`'s order puts `None` first; the currency-less total reads better last.
    let mut totals: BTreeMap<(bool, Option<String>), InvoiceLine> = BTreeMap::new();
    for line in &lines {
        totals
            .entry((line.currency.is_none(), line.currency.clone()))
            .or_insert_with(|| InvoiceLine::empty(None, None, line.currency.clone()))
            .add_line(line);
    }
    Ok(Invoice {
        project: query.project.clone(),
        month,
        lines,
        totals: totals.into_values().collect(),
    })
}

impl Invoice {
    /// The header, one line per (provider, model, currency), then one `TOTAL` line per
    /// currency. A cost left empty means nothing there was priced; `unpriced_requests` says
    /// how many requests with usage that covers.
    pub fn to_csv(&self) -> Result<String, ReportError> {
        let header = [
            "project",
            "month",
            "provider",
            "model",
            "currency",
            "requests",
            "input_tokens",
            "output_tokens",
            "cached_tokens",
            "reasoning_tokens",
            "cost",
            "unpriced_requests",
        ]
        .map(str::to_owned);
        let month = format!("{}-{:02}", self.month.year(), u8::from(self.month.month()));
        let record = |provider: String, line: &InvoiceLine| {
            vec![
                self.project.clone(),
                month.clone(),
                provider,
                line.model.clone().unwrap_or_default(),
                line.currency.clone().unwrap_or_default(),
                line.requests.to_string(),
                line.input_tokens.to_string(),
                line.output_tokens.to_string(),
                line.cached_tokens.to_string(),
                line.reasoning_tokens.to_string(),
                line.cost.map(money).unwrap_or_default(),
                line.unpriced_requests.to_string(),
            ]
        };
        let mut records: Vec<Vec<String>> = self
            .lines
            .iter()
            .map(|line| record(line.provider.clone().unwrap_or_default(), line))
            .collect();
        records.extend(self.totals.iter().map(|line| record("TOTAL".into(), line)));
        csv_text(&header, &records)
    }
}

/// A decimal amount as printed: exact, without the trailing zeros of the stored scale.
pub fn money(amount: Decimal) -> String {
    amount.normalize().to_string()
}

pub(crate) fn parse_money(text: &str) -> Option<Decimal> {
    Decimal::from_str(text)
        .or_else(|_| Decimal::from_scientific(text))
        .ok()
}

pub(crate) fn csv_text(header: &[String], records: &[Vec<String>]) -> Result<String, ReportError> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(header)?;
    for record in records {
        writer.write_record(record)?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|err| csv::Error::from(err.into_error()))?;
    // Every field came from a `String`, so the bytes are UTF-8.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

pub(crate) fn pretty_json(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// Aligned columns: text left, numbers right, a rule under the header and above the footer.
pub(crate) fn table(
    header: &[String],
    rows: &[Vec<String>],
    footer: Option<&Vec<String>>,
    numeric: &[bool],
) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows.iter().chain(footer) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(shown(cell).chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut text = String::new();
        for (index, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if index > 0 {
                text.push_str("  ");
            }
            let cell = shown(cell);
            let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
            if numeric.get(index).copied().unwrap_or(false) {
                text.push_str(&pad);
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.push_str(&pad);
            }
        }
        text.truncate(text.trim_end().len());
        text.push('\n');
        text
    };
    let rule = {
        let width = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        let mut rule = "-".repeat(width);
        rule.push('\n');
        rule
    };
    let mut text = line(header);
    text.push_str(&rule);
    for row in rows {
        text.push_str(&line(row));
    }
    if let Some(footer) = footer {
        text.push_str(&rule);
        text.push_str(&line(footer));
    }
    text
}

/// An empty cell would leave a hole that looks like misalignment; a dash says "none".
fn shown(cell: &str) -> &str {
    if cell.is_empty() { "-" } else { cell }
}

/// One row of `spend_daily` (`period` is the day) or `spend_monthly` (the month's first day).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpendRow {
    pub period: Date,
    pub project: Option<String>,
    pub team: Option<String>,
    pub business_line: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub alias: Option<String>,
    pub currency: Option<String>,
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost: Option<Decimal>,
    pub unpriced_requests: i64,
}

/// The row as the database gives it: every value cast to text or BIGINT in SQL, so that one
/// decoding serves SQLite (text dates and money) and Postgres (`date`, `NUMERIC`).
#[derive(Debug, sqlx::FromRow)]
struct RawRow {
    period: String,
    project: Option<String>,
    team: Option<String>,
    business_line: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    alias: Option<String>,
    currency: Option<String>,
    requests: i64,
    input_tokens: i64,
    output_tokens: i64,
    cached_tokens: i64,
    reasoning_tokens: i64,
    cost: Option<String>,
    unpriced_requests: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    Daily,
    Monthly,
}

impl View {
    const fn name(self) -> &'static str {
        match self {
            Self::Daily => "spend_daily",
            Self::Monthly => "spend_monthly",
        }
    }

    const fn period(self) -> &'static str {
        match self {
            Self::Daily => "day",
            Self::Monthly => "month",
        }
    }
}

/// Rows of a view with `period` in `[from, to]`, optionally of one project or provider.
pub(crate) struct Filter<'a> {
    pub from: Date,
    pub to: Date,
    pub project: Option<&'a str>,
    pub provider: Option<&'a str>,
}

impl Filter<'_> {
    pub(crate) fn days(from: Date, to: Date) -> Result<Self, ReportError> {
        if from > to {
            return Err(ReportError::EmptyRange { from, to });
        }
        Ok(Self {
            from,
            to,
            project: None,
            provider: None,
        })
    }
}

pub(crate) async fn fetch(
    store: &UsageStore,
    view: View,
    filter: &Filter<'_>,
) -> Result<Vec<SpendRow>, ReportError> {
    let (from, to) = (filter.from.to_string(), filter.to.to_string());
    let mut binds = vec![from.as_str(), to.as_str()];
    binds.extend(filter.project);
    binds.extend(filter.provider);
    let raw: Result<Vec<RawRow>, sqlx::Error> = match store {
        UsageStore::Sqlite(pool) => {
            let sql = select(view, filter, Dialect::Sqlite);
            let mut query = sqlx::query_as::<_, RawRow>(&sql);
            for value in &binds {
                query = query.bind(*value);
            }
            query.fetch_all(pool).await
        }
        UsageStore::Postgres(pool) => {
            let sql = select(view, filter, Dialect::Postgres);
            let mut query = sqlx::query_as::<_, RawRow>(&sql);
            for value in &binds {
                query = query.bind(*value);
            }
            query.fetch_all(pool).await
        }
    };
    let raw = raw.map_err(|source| {
        if is_missing_relation(&source) {
            ReportError::MissingView {
                view: view.name(),
                source,
            }
        } else {
            ReportError::Database {
                view: view.name(),
                source,
            }
        }
    })?;
    raw.into_iter().map(|row| decode(view, row)).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// The select of a view. Casting every column pins down the types the decoding expects,
/// whatever each engine's `SUM` returns (Postgres widens a BIGINT sum to NUMERIC).
fn select(view: View, filter: &Filter<'_>, dialect: Dialect) -> String {
    let period = view.period();
    let mut next = 0;
    let mut param = |as_date: bool| {
        next += 1;
        match (dialect, as_date) {
            (Dialect::Sqlite, _) => "?".to_owned(),
            (Dialect::Postgres, true) => format!("CAST(${next} AS DATE)"),
            (Dialect::Postgres, false) => format!("${next}"),
        }
    };
    let mut sql = format!(
        "SELECT CAST({period} AS TEXT) AS period, \
         CAST(project AS TEXT) AS project, CAST(team AS TEXT) AS team, \
         CAST(business_line AS TEXT) AS business_line, CAST(provider AS TEXT) AS provider, \
         CAST(model AS TEXT) AS model, CAST(alias AS TEXT) AS alias, \
         CAST(currency AS TEXT) AS currency, \
         CAST(COALESCE(requests, 0) AS BIGINT) AS requests, \
         CAST(COALESCE(input_tokens, 0) AS BIGINT) AS input_tokens, \
         CAST(COALESCE(output_tokens, 0) AS BIGINT) AS output_tokens, \
         CAST(COALESCE(cached_tokens, 0) AS BIGINT) AS cached_tokens, \
         CAST(COALESCE(reasoning_tokens, 0) AS BIGINT) AS reasoning_tokens, \
         CAST(cost AS TEXT) AS cost, \
         CAST(COALESCE(unpriced_requests, 0) AS BIGINT) AS unpriced_requests \
         FROM {view} WHERE {period} >= {from} AND {period} <= {to}",
        view = view.name(),
        from = param(true),
        to = param(true),
    );
    if filter.project.is_some() {
        sql.push_str(&format!(" AND project = {}", param(false)));
    }
    if filter.provider.is_some() {
        sql.push_str(&format!(" AND provider = {}", param(false)));
    }
    sql
}

fn decode(view: View, raw: RawRow) -> Result<SpendRow, ReportError> {
    let bad = |column: &'static str, value: &str, expected: &'static str| ReportError::BadValue {
        view: view.name(),
        column,
        value: value.to_owned(),
        expected,
    };
    let period = raw
        .period
        .get(..10)
        .and_then(|text| Date::parse(text, format_description!("[year]-[month]-[day]")).ok())
        .ok_or_else(|| bad(view.period(), &raw.period, "a date (YYYY-MM-DD)"))?;
    let cost = match raw.cost.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(parse_money(text).ok_or_else(|| bad("cost", text, "a decimal"))?),
    };
    Ok(SpendRow {
        period,
        project: raw.project,
        team: raw.team,
        business_line: raw.business_line,
        provider: raw.provider,
        model: raw.model,
        alias: raw.alias,
        currency: raw.currency,
        requests: raw.requests,
        input_tokens: raw.input_tokens,
        output_tokens: raw.output_tokens,
        cached_tokens: raw.cached_tokens,
        reasoning_tokens: raw.reasoning_tokens,
        cost,
        unpriced_requests: raw.unpriced_requests,
    })
}

/// SQLite says "no such table", Postgres reports SQLSTATE 42P01 (undefined table).
fn is_missing_relation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("42P01") || db.message().contains("no such table")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail on the spot")]
    use super::*;

    #[test]
    fn dimensions_parse_by_name() {
        assert_eq!(
            "business-line".parse::<Dimension>(),
            Ok(Dimension::BusinessLine)
        );
        assert_eq!(" Model ".parse::<Dimension>(), Ok(Dimension::Model));
        assert!("colour".parse::<Dimension>().is_err());
    }

    #[test]
    fn money_is_exact_and_trimmed() {
        assert_eq!(money(parse_money("12.000000450").unwrap()), "12.00000045");
        assert_eq!(money(parse_money("3.000000000").unwrap()), "3");
        assert_eq!(money(parse_money("1e-9").unwrap()), "0.000000001");
    }

    #[test]
    fn table_aligns_numbers_right() {
        let text = table(
            &["name".into(), "n".into()],
            &[
                vec!["a".into(), "100".into()],
                vec![String::new(), "5".into()],
            ],
            Some(&vec!["TOTAL".into(), "105".into()]),
            &[false, true],
        );
        assert_eq!(
            text,
            "name     n\n----------\na      100\n-        5\n----------\nTOTAL  105\n"
        );
    }
}
