//! The command line: `serve` (default), `config check`, `migrate`, `keys hash`.

use crate::config::{ConfigLoadError, GatewayConfig};
use crate::server::RunningGateway;
use crate::state::Snapshot;
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gateway_business::UsageStore;
use gateway_core::config::ConfigError;
use gateway_providers::UpstreamClient;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

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
    store.close().await;
    let _ignored = writeln!(std::io::stdout(), "migrations applied");
    Ok(())
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
