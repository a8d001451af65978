//! The command line: `serve` (default), `config check`, `migrate`, `keys hash|create|list|
//! revoke|rotate` (database keys: `gateway_business::UsageStore`'s key methods), and the finance
//! commands `report`, `invoice` and `reconcile` (the work is in `gateway_business::report` and
//! `gateway_business::reconcile`; here they are parsed and printed).

use crate::config::{ConfigLoadError, GatewayConfig};
use crate::server::RunningGateway;
use crate::state::Snapshot;
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use gateway_business::UsageStore;
use gateway_business::reconcile::{self, ReconcileQuery, Vendor};
use gateway_business::report::{self, Dimension, Format, InvoiceQuery, ReportQuery};
use gateway_core::config::ConfigError;
use gateway_providers::{ProviderKind, UpstreamClient};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use time::Date;
use time::macros::format_description;

#[derive(Debug, Parser)]
#[command(name = "gateway", version, about = "An OpenAI-compatible LLM gateway")]
pub struct Cli {
    /// Config file. Relative paths inside it are resolved against the working directory.
    #[arg(
        long,
        global = true,
        default_value = "config/gateway.toml",
        env = "GATEWAY_CONFIG"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API (the default). The config file is reloaded when it changes and on SIGHUP.
    Serve,
    /// Config file tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Apply the database migrations and exit.
    Migrate,
    /// API key tools.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Spend over a range of days, from the ledger (`spend_daily`), grouped as asked, with a
    /// total line. Costs are exact and kept apart per currency.
    Report {
        /// First day, inclusive, UTC (YYYY-MM-DD).
        #[arg(long, value_parser = parse_day)]
        from: Date,
        /// Last day, inclusive, UTC (YYYY-MM-DD).
        #[arg(long, value_parser = parse_day)]
        to: Date,
        /// Comma-separated, any of: project, team, business_line, provider, model, alias,
        /// currency, day.
        #[arg(long, value_delimiter = ',', default_value = "project")]
        group_by: Vec<Dimension>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// One project's month as CSV (`spend_monthly`): a line per provider, model and currency,
    /// then a total line per currency. An empty cost means nothing there was priced.
    Invoice {
        #[arg(long)]
        project: String,
        /// YYYY-MM (UTC).
        #[arg(long, value_parser = parse_month)]
        month: Date,
    },
    /// Compare the ledger of one provider with the vendor's usage export, per day and model.
    /// Exit 1 when a difference is beyond the tolerance, 2 on an error, 0 otherwise.
    Reconcile {
        /// The provider's name in the config (`[[providers]].name`).
        #[arg(long)]
        provider: String,
        /// The vendor's export (CSV; OpenAI or Anthropic, told by the header). Repeat it to
        /// give a usage export and a cost export together.
        #[arg(long = "export", required = true)]
        exports: Vec<PathBuf>,
        /// Largest difference not flagged, in percent of the vendor's figure.
        #[arg(long, default_value = "1")]
        tolerance_percent: Decimal,
        /// Whose export it is, when the header does not tell.
        #[arg(long, value_enum, default_value_t = ExportFormat::Auto)]
        export_format: ExportFormat,
        /// First day compared (default: the exports' first).
        #[arg(long, value_parser = parse_day)]
        from: Option<Date>,
        /// Last day compared (default: the exports' last).
        #[arg(long, value_parser = parse_day)]
        to: Option<Date>,
        /// VENDOR_MODEL=LEDGER_MODEL: the vendor's name for a model the ledger knows by
        /// another (a dated snapshot, say). Repeatable.
        #[arg(long = "model-map", value_parser = parse_model_map)]
        model_map: Vec<(String, String)>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns.
    Table,
    Csv,
    Json,
}

impl From<OutputFormat> for Format {
    fn from(format: OutputFormat) -> Self {
        match format {
            OutputFormat::Table => Self::Table,
            OutputFormat::Csv => Self::Csv,
            OutputFormat::Json => Self::Json,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// Told by the header; a header that fits both goes by the provider's kind in the config.
    Auto,
    Openai,
    Anthropic,
}

fn parse_day(text: &str) -> Result<Date, String> {
    Date::parse(text, format_description!("[year]-[month]-[day]"))
        .map_err(|err| format!("expected YYYY-MM-DD: {err}"))
}

fn parse_month(text: &str) -> Result<Date, String> {
    parse_day(&format!("{text}-01")).map_err(|_| format!("expected YYYY-MM, got {text:?}"))
}

fn parse_model_map(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((vendor, ledger)) if !vendor.trim().is_empty() && !ledger.trim().is_empty() => {
            Ok((vendor.trim().to_owned(), ledger.trim().to_owned()))
        }
        _ => Err(format!("expected VENDOR_MODEL=LEDGER_MODEL, got {text:?}")),
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file: every error is printed with its path; exit 1 if any.
    Check {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print the SHA-256 to paste into `[[projects]].api_keys`. Reads the key from stdin when
    /// it is omitted or `-`, which keeps it out of shell history.
    Hash { key: Option<String> },
    /// Create a key in the database and print its secret, once (only its hash is stored).
    /// Every gateway using the database accepts it within `[server] key_refresh_ms`.
    Create {
        /// The project (it must be in the config's [[projects]]).
        #[arg(long)]
        project: String,
        /// Lifetime: 30m, 24h, 90d, 2w... Default: no expiry.
        #[arg(long, value_parser = crate::keys::parse_span)]
        expires: Option<Duration>,
        /// Comma-separated aliases the key may use (within the project's). Default: the
        /// project's.
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// A label for people: who or what uses the key.
        #[arg(long)]
        name: Option<String>,
    },
    /// List keys (config and database ones): ids, display prefixes, status; never a secret.
    List {
        #[arg(long)]
        project: Option<String>,
        #[arg(long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
    },
    /// Revoke a database key: every gateway refuses it within `[server] key_refresh_ms`.
    Revoke { key_id: String },
    /// Replace a database key by a new one (printed once); the old one keeps working for the
    /// grace period, then is refused.
    Rotate {
        key_id: String,
        /// How long the old key stays valid: 30m, 24h, 7d...
        #[arg(long, default_value = "24h", value_parser = crate::keys::parse_span)]
        grace: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    /// Aligned columns.
    Table,
    Json,
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => with_runtime(serve(&cli.config)),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let path = file.unwrap_or(cli.config);
            // Building providers needs a runtime (connection pools are created on it).
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(async { check(&path) }),
                Err(err) => {
                    report(&format!("starting the runtime: {err}"));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate => with_runtime(migrate(&cli.config)),
        Command::Keys {
            command: KeysCommand::Hash { key },
        } => hash(key),
        Command::Keys { command } => with_runtime(manage_keys(&cli.config, command)),
        Command::Report {
            from,
            to,
            group_by,
            format,
        } => {
            let query = ReportQuery { from, to, group_by };
            with_runtime(spend_report(&cli.config, query, format.into()))
        }
        Command::Invoice { project, month } => {
            with_runtime(invoice(&cli.config, InvoiceQuery { project, month }))
        }
        Command::Reconcile {
            provider,
            exports,
            tolerance_percent,
            export_format,
            from,
            to,
            model_map,
            format,
        } => {
            let query = ReconcileQuery {
                provider,
                from,
                to,
                tolerance_percent,
                model_map: model_map.into_iter().collect::<BTreeMap<_, _>>(),
            };
            let work = reconcile_exports(&cli.config, query, exports, export_format, format);
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => match runtime.block_on(work) {
                    Ok(code) => code,
                    Err(err) => {
                        report(&format!("{err:#}"));
                        ExitCode::from(2)
                    }
                },
                Err(err) => {
                    report(&format!("starting the runtime: {err}"));
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn with_runtime(work: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            report(&format!("starting the runtime: {err}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(&format!("{err:#}"));
            ExitCode::FAILURE
        }
    }
}

fn report(message: &str) {
    let _ignored = writeln!(std::io::stderr(), "error: {message}");
}

fn load(path: &Path) -> anyhow::Result<GatewayConfig> {
    GatewayConfig::load(path).map_err(|err| {
        anyhow::anyhow!(
            "invalid config {}:\n  {}",
            path.display(),
            err.errors().join("\n  ")
        )
    })
}

async fn serve(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    let _log_guard = gateway_observability::init_tracing(&config.observability);
    let gateway = RunningGateway::start_with_reload(config, path.to_path_buf()).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops");
                let _ignored = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ignored = tokio::signal::ctrl_c().await;
    }
}

/// Parses the file and builds the runtime state it describes (without serving), so every
/// error `serve` would hit is reported here.
fn check(path: &Path) -> ExitCode {
    let result = GatewayConfig::load(path).and_then(|config| {
        let client = UpstreamClient::new(Duration::from_secs(10)).map_err(|err| {
            ConfigLoadError::Invalid(vec![ConfigError::new("tls", err.to_string())])
        })?;
        Snapshot::build(&config, &client)?;
        // The policy state checks its own settings (a Redis backend needs a URL, ...); its
        // Redis links connect lazily, so nothing is dialled.
        gateway_policy::Policy::new(&config.policy).map_err(|err| {
            ConfigLoadError::Invalid(vec![ConfigError::new("policy", err.to_string())])
        })?;
        Ok(config)
    });
    match result {
        Ok(config) => {
            let _ignored = writeln!(
                std::io::stdout(),
                "{}: ok ({} providers, {} aliases, {} projects, version {})",
                path.display(),
                config.providers.len(),
                config.models.len(),
                config.projects.len(),
                &config.version[..12]
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            let mut stderr = std::io::stderr().lock();
            let _ignored = writeln!(stderr, "{}: invalid", path.display());
            for line in err.errors() {
                let _ignored = writeln!(stderr, "  {line}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn migrate(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    let store = UsageStore::connect(&config.database)
        .await
        .context("connecting to the database")?;
    store.migrate().await.context("applying migrations")?;
    // The config's projects, keys and prices go in too, so finance sees the catalog before
    // the first gateway starts (a serving gateway syncs it at start and on every reload).
    let prices = store
        .sync_catalog(
            &config.prices,
            &crate::state::project_entries(&config.projects),
        )
        .await
        .context("writing the projects and prices")?;
    store.close().await;
    let _ignored = writeln!(
        std::io::stdout(),
        "migrations applied; {} projects, {} price rows added, {} updated",
        config.projects.len(),
        prices.added,
        prices.updated
    );
    Ok(())
}

/// The finance commands need `[database]` (and a provider's kind) only. A vendor key that is
/// not set in a finance user's shell must not stop them, so unset variables read as empty
/// here; a database URL that needed one then fails to connect, which says so.
async fn finance_store(path: &Path) -> anyhow::Result<(GatewayConfig, UsageStore)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config {}", path.display()))?;
    let config = GatewayConfig::parse(&text, &|name| Some(std::env::var(name).unwrap_or_default()))
        .map_err(|err| {
            anyhow::anyhow!(
                "invalid config {}:\n  {}",
                path.display(),
                err.errors().join("\n  ")
            )
        })?;
    let store = UsageStore::connect(&config.database)
        .await
        .context("connecting to the database")?;
    Ok((config, store))
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

async fn spend_report(path: &Path, query: ReportQuery, format: Format) -> anyhow::Result<()> {
    let (_, store) = finance_store(path).await?;
    let result = report::report(&store, &query).await;
    store.close().await;
    print(&result?.render(format)?)
}

async fn invoice(path: &Path, query: InvoiceQuery) -> anyhow::Result<()> {
    let (_, store) = finance_store(path).await?;
    let result = report::invoice(&store, &query).await;
    store.close().await;
    let invoice = result?;
    if invoice.lines.is_empty() {
        let _ignored = writeln!(
            std::io::stderr(),
            "note: no usage for project {:?} in {}-{:02}",
            invoice.project,
            invoice.month.year(),
            u8::from(invoice.month.month())
        );
    }
    print(&invoice.to_csv()?)
}

async fn reconcile_exports(
    path: &Path,
    query: ReconcileQuery,
    files: Vec<PathBuf>,
    export_format: ExportFormat,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let (config, store) = finance_store(path).await?;
    let named = match export_format {
        ExportFormat::Auto => None,
        ExportFormat::Openai => Some(Vendor::OpenAi),
        ExportFormat::Anthropic => Some(Vendor::Anthropic),
    };
    let hint = config
        .providers
        .iter()
        .find(|provider| provider.name == query.provider)
        .and_then(|provider| match provider.kind {
            ProviderKind::Openai => Some(Vendor::OpenAi),
            ProviderKind::Anthropic => Some(Vendor::Anthropic),
            _ => None,
        });
    let mut exports = Vec::new();
    for file in &files {
        let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let export = reconcile::parse_export(&file.display().to_string(), &data, named, hint)?;
        // Which columns were used goes to stderr, so stdout stays the CSV or JSON asked for.
        let _ignored = writeln!(std::io::stderr(), "{}", export.describe());
        exports.push(export);
    }
    let result = reconcile::reconcile(&store, &query, &exports).await;
    store.close().await;
    let reconciliation = result?;
    print(&reconciliation.render(format.into())?)?;
    Ok(if reconciliation.flagged() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `keys create|list|revoke|rotate`: the database of the config's `[database]`, migrated
/// first so a key can be made before the gateway ever ran.
async fn manage_keys(path: &Path, command: KeysCommand) -> anyhow::Result<()> {
    let (config, store) = finance_store(path).await?;
    let result = async {
        store.migrate().await.context("applying migrations")?;
        // What a starting gateway does: so a list made before any start shows the config's
        // keys too, and a new key's project row exists.
        store
            .sync_projects(&crate::state::project_entries(&config.projects))
            .await
            .context("syncing the config's projects")?;
        run_keys_command(&config, &store, command).await
    }
    .await;
    store.close().await;
    result
}

async fn run_keys_command(
    config: &GatewayConfig,
    store: &UsageStore,
    command: KeysCommand,
) -> anyhow::Result<()> {
    match command {
        KeysCommand::Hash { .. } => Ok(()),
        KeysCommand::Create {
            project,
            expires,
            models,
            name,
        } => {
            let keys = gateway_access::KeyStore::build(&config.projects).map_err(|errors| {
                anyhow::anyhow!(
                    "invalid [[projects]]: {}",
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            })?;
            let aliases = |alias: &str| config.models.iter().any(|model| model.alias == alias);
            let new = crate::keys::new_key(&keys, aliases, &project, name, models, expires, "cli")
                .map_err(|refused| anyhow::anyhow!("--{}: {}", refused.param, refused.message))?;
            let created = store.create_key(&new).await.context("creating the key")?;
            print_created(&created)
        }
        KeysCommand::List { project, format } => {
            let keys = store
                .list_keys(project.as_deref())
                .await
                .context("listing keys")?;
            match format {
                ListFormat::Json => print(&format!("{}\n", serde_json::to_string_pretty(&keys)?)),
                ListFormat::Table => print(&key_table(&keys)),
            }
        }
        KeysCommand::Revoke { key_id } => {
            let key = store.revoke_key(&key_id).await?;
            print(&format!(
                "revoked {} (project {}) at {}\n",
                key.key_id,
                key.project,
                key.revoked_at.as_deref().unwrap_or("now")
            ))
        }
        KeysCommand::Rotate { key_id, grace } => {
            let created = store.rotate_key(&key_id, grace).await?;
            let old = store.get_key(&key_id).await?;
            print_created(&created)?;
            let _ignored = writeln!(
                std::io::stderr(),
                "the old key {} stays valid until {}",
                old.key_id,
                old.expires_at.as_deref().unwrap_or("-")
            );
            Ok(())
        }
    }
}

/// The secret goes to stdout (for a pipe into a secret store); the advice to stderr.
fn print_created(created: &gateway_business::CreatedKey) -> anyhow::Result<()> {
    print(&format!(
        "key_id: {}\nproject: {}\nexpires_at: {}\nsecret: {}\n",
        created.key.key_id,
        created.key.project,
        created.key.expires_at.as_deref().unwrap_or("never"),
        created.secret
    ))?;
    let _ignored = writeln!(
        std::io::stderr(),
        "the secret is shown only now: only its hash is stored"
    );
    Ok(())
}

fn key_table(keys: &[gateway_business::StoredKey]) -> String {
    let header = [
        "KEY_ID",
        "PROJECT",
        "SOURCE",
        "NAME",
        "PREFIX",
        "STATUS",
        "EXPIRES_AT",
        "MODELS",
        "CREATED_AT",
    ];
    let rows: Vec<[String; 9]> = keys
        .iter()
        .map(|key| {
            [
                key.key_id.clone(),
                key.project.clone(),
                key.source.to_owned(),
                key.name.clone().unwrap_or_else(|| "-".into()),
                key.display_prefix.clone().unwrap_or_else(|| "-".into()),
                key.status.to_owned(),
                key.expires_at.clone().unwrap_or_else(|| "-".into()),
                key.models
                    .as_ref()
                    .map_or_else(|| "*".into(), |models| models.join(",")),
                key.created_at.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(|title| title.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let text: Vec<String> = cells
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn hash(key: Option<String>) -> ExitCode {
    let key = match key.filter(|key| key != "-") {
        Some(key) => key,
        None => {
            let mut line = String::new();
            if let Err(err) = std::io::stdin().lock().read_line(&mut line) {
                report(&format!("reading the key from stdin: {err}"));
                return ExitCode::FAILURE;
            }
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if key.is_empty() {
        report("the key is empty");
        return ExitCode::FAILURE;
    }
    let _ignored = writeln!(std::io::stdout(), "{}", gateway_access::hash_key(&key));
    ExitCode::SUCCESS
}
