//! Config hot reload: one path from the file on disk to a published [`Snapshot`].
//!
//! Reading, parsing and building happen off to the side; the running gateway only ever sees
//! the result of one `ArcSwap` store, and each request keeps the snapshot it started with, so a
//! request is never half old config, half new. Anything that fails along the way leaves the
//! last good config in force.
//!
//! The triggers (a watcher on the config file's directory and SIGHUP) only send a [`Trigger`]
//! into one channel, drained by one task: two reloads never run at once, and a burst of events
//! collapses into the reloads needed to catch up with the file.

use crate::config::{ConfigLoadError, GatewayConfig};
use crate::service::AppState;
use crate::state::Snapshot;
use anyhow::Context as _;
use arc_swap::ArcSwap;
use gateway_core::config::ConfigError;
use gateway_providers::UpstreamClient;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use serde::Serialize;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Editors and deploy tools touch the file several times per save; waiting this long after the
/// first event turns one save into one reload. The window starts at the first event and is not
/// extended by later ones, so a file rewritten without pause is still reloaded every window
/// rather than never (a quiet-period debouncer, as `notify-debouncer-full`, starves then).
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Kubernetes mounts a ConfigMap as `NAME -> ..data/NAME` and updates it by swapping the
/// `..data` symlink, so the config file's own name never shows up in the event.
const CONFIGMAP_DATA: &str = "..data";

/// What the admin API and the tests see of the reloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadStatus {
    /// Hex SHA-256 of the config file in force.
    pub version: String,
    /// When that version went live (RFC 3339, UTC).
    pub loaded_at: String,
    /// Reloads that succeeded since start (a SIGHUP with an unchanged file counts).
    pub reloads: u64,
    /// Reloads refused because the file was invalid; the previous config stayed live.
    pub failed_reloads: u64,
}

impl ReloadStatus {
    pub(crate) fn new(version: &str) -> Self {
        Self {
            version: version.to_owned(),
            loaded_at: now_rfc3339(),
            reloads: 0,
            failed_reloads: 0,
        }
    }
}

/// Why a reload runs. A file event with unchanged content is not worth a log line or a count
/// (editors touch files without changing them); an operator's SIGHUP always gets an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Catching up with a change made between loading the file and watching it.
    Startup,
    FileChanged,
    Signal,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::FileChanged => "file_changed",
            Self::Signal => "sighup",
        }
    }
}

/// What one reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    Applied,
    Unchanged,
    Rejected,
}

/// The one reload path. Owned by the reload task, so it needs no lock.
#[derive(Debug)]
pub(crate) struct Reloader {
    path: PathBuf,
    state: Arc<AppState>,
    /// Kept across versions so a reload does not throw away warm upstream connections.
    client: UpstreamClient,
    /// The config in force, with the values that cannot change live as they were at start.
    live: GatewayConfig,
    status: Arc<ArcSwap<ReloadStatus>>,
}

impl Reloader {
    pub(crate) fn new(
        path: PathBuf,
        state: Arc<AppState>,
        client: UpstreamClient,
        live: GatewayConfig,
        status: Arc<ArcSwap<ReloadStatus>>,
    ) -> Self {
        Self {
            path,
            state,
            client,
            live,
            status,
        }
    }

    /// Reads the file and, if it is valid, publishes the snapshot it describes.
    pub(crate) async fn reload(&mut self, trigger: Trigger) -> ReloadOutcome {
        let text = match self.read().await {
            Ok(text) => text,
            Err(errors) => return self.reject(trigger, &errors),
        };
        let new = match GatewayConfig::parse(&text, &|name| std::env::var(name).ok()) {
            Ok(config) => config,
            Err(err) => return self.reject(trigger, &load_errors(err)),
        };
        if new.version == self.live.version {
            return self.unchanged(trigger);
        }

        let refused = frozen_changes(&self.live, &new);
        let effective = GatewayConfig {
            server: self.live.server.clone(),
            database: self.live.database.clone(),
            observability: self.live.observability.clone(),
            policy: new.policy.clone().keeping_frozen(&self.live.policy),
            budget: self.live.budget.clone(),
            ..new
        };
        let snapshot = match Snapshot::build(&effective, &self.client) {
            Ok(snapshot) => snapshot,
            Err(err) => return self.reject(trigger, &load_errors(err)),
        };
        // Warned only once the file is known to be usable: for a rejected file these would be
        // noise next to the errors that matter.
        for key in &refused {
            tracing::warn!(
                path = %self.path.display(),
                key = %key,
                "config setting cannot change while running; keeping the running value until restart"
            );
        }
        self.state.policy.apply(&effective.policy);
        if let Err(problems) = self.state.budgets.set_budgets(&effective.budgets) {
            // Snapshot::build checked the same entries, so this cannot happen; say so if it does.
            tracing::error!(problems = ?problems, "budgets not reloaded");
        }
        self.state.usage.set_prices(snapshot.prices.clone());
        self.state
            .usage
            .set_projects(crate::state::project_entries(&effective.projects));
        self.state.metrics.set_aliases(snapshot.routes.aliases());
        self.state.snapshot.store(Arc::new(snapshot));

        let models = diff(&self.live.models, &effective.models, |m| &m.alias);
        let providers = diff(&self.live.providers, &effective.providers, |p| &p.name);
        let projects = diff(&self.live.projects, &effective.projects, |p| &p.name);
        let previous = std::mem::replace(&mut self.live, effective);
        let status = self.status.load();
        self.status.store(Arc::new(ReloadStatus {
            version: self.live.version.clone(),
            loaded_at: now_rfc3339(),
            reloads: status.reloads + 1,
            failed_reloads: status.failed_reloads,
        }));
        tracing::info!(
            path = %self.path.display(),
            trigger = trigger.as_str(),
            config_version = %self.live.version,
            previous_version = %previous.version,
            aliases = self.live.models.len(),
            aliases_added = models.added,
            aliases_removed = models.removed,
            aliases_changed = models.changed,
            providers = self.live.providers.len(),
            providers_added = providers.added,
            providers_removed = providers.removed,
            providers_changed = providers.changed,
            projects = self.live.projects.len(),
            projects_added = projects.added,
            projects_removed = projects.removed,
            projects_changed = projects.changed,
            refused_settings = refused.len(),
            "config reloaded"
        );
        ReloadOutcome::Applied
    }

    async fn read(&self) -> Result<String, Vec<ConfigError>> {
        let bytes = tokio::fs::read(&self.path)
            .await
            .map_err(|err| vec![ConfigError::new("file", format!("reading: {err}"))])?;
        let text = String::from_utf8(bytes)
            .map_err(|err| vec![ConfigError::new("file", format!("not UTF-8: {err}"))])?;
        // An empty file parses as "every default": no projects, no aliases, every request
        // refused. It is nearly always a write caught between truncate and write, never an
        // intended config.
        if text.trim().is_empty() {
            return Err(vec![ConfigError::new(
                "file",
                "the file is empty (a write in progress?)",
            )]);
        }
        Ok(text)
    }

    fn reject(&self, trigger: Trigger, errors: &[ConfigError]) -> ReloadOutcome {
        for error in errors {
            tracing::error!(
                path = %self.path.display(),
                key = %error.path,
                error = %error.message,
                "invalid config"
            );
        }
        let status = self.status.load();
        let failed_reloads = status.failed_reloads + 1;
        self.status.store(Arc::new(ReloadStatus {
            failed_reloads,
            ..ReloadStatus::clone(&status)
        }));
        tracing::error!(
            path = %self.path.display(),
            trigger = trigger.as_str(),
            errors = errors.len(),
            failed_reloads,
            config_version = %self.live.version,
            "config reload rejected; the last good config stays live"
        );
        ReloadOutcome::Rejected
    }

    fn unchanged(&self, trigger: Trigger) -> ReloadOutcome {
        if trigger == Trigger::Signal {
            let status = self.status.load();
            self.status.store(Arc::new(ReloadStatus {
                reloads: status.reloads + 1,
                ..ReloadStatus::clone(&status)
            }));
            tracing::info!(
                path = %self.path.display(),
                trigger = trigger.as_str(),
                config_version = %self.live.version,
                "config reloaded: unchanged"
            );
        } else {
            tracing::debug!(
                path = %self.path.display(),
                trigger = trigger.as_str(),
                "config file event without a change"
            );
        }
        ReloadOutcome::Unchanged
    }
}

fn load_errors(err: ConfigLoadError) -> Vec<ConfigError> {
    match err {
        ConfigLoadError::Invalid(errors) => errors,
        read @ ConfigLoadError::Read { .. } => vec![ConfigError::new("file", read.to_string())],
    }
}

/// The settings of `new` that differ from the running ones but are fixed at start: the
/// listeners are bound, the usage writer and the logger are running, and the body limit, the
/// grace period live in `AppState`, outside the snapshot; `[policy]` names its own.
fn frozen_changes(live: &GatewayConfig, new: &GatewayConfig) -> Vec<String> {
    let (old_server, new_server) = (&live.server, &new.server);
    let (old_db, new_db) = (&live.database, &new.database);
    let (old_obs, new_obs) = (&live.observability, &new.observability);
    let server = [
        ("server.listen", old_server.listen != new_server.listen),
        (
            "server.admin_listen",
            old_server.admin_listen != new_server.admin_listen,
        ),
        (
            "server.max_body_bytes",
            old_server.max_body_bytes != new_server.max_body_bytes,
        ),
        (
            "server.shutdown_grace_secs",
            old_server.shutdown_grace_secs != new_server.shutdown_grace_secs,
        ),
        (
            "server.admin_token",
            old_server.admin_token != new_server.admin_token,
        ),
        (
            "server.key_refresh_ms",
            old_server.key_refresh_ms != new_server.key_refresh_ms,
        ),
        (
            "server.auth_failures",
            old_server.auth_failures != new_server.auth_failures,
        ),
    ];
    let database = [
        ("database.url", old_db.url != new_db.url),
        (
            "database.max_connections",
            old_db.max_connections != new_db.max_connections,
        ),
        (
            "database.batch_size",
            old_db.batch_size != new_db.batch_size,
        ),
        (
            "database.flush_interval_ms",
            old_db.flush_interval_ms != new_db.flush_interval_ms,
        ),
        (
            "database.queue_capacity",
            old_db.queue_capacity != new_db.queue_capacity,
        ),
        ("database.spool_dir", old_db.spool_dir != new_db.spool_dir),
        (
            "database.spool_fsync_ms",
            old_db.spool_fsync_ms != new_db.spool_fsync_ms,
        ),
        (
            "database.spool_max_bytes",
            old_db.spool_max_bytes != new_db.spool_max_bytes,
        ),
        (
            "database.spool_full",
            old_db.spool_full != new_db.spool_full,
        ),
        (
            "database.spool_segment_bytes",
            old_db.spool_segment_bytes != new_db.spool_segment_bytes,
        ),
    ];
    let observability = [
        (
            "observability.log_format",
            old_obs.log_format != new_obs.log_format,
        ),
        (
            "observability.log_level",
            old_obs.log_level != new_obs.log_level,
        ),
        (
            "observability.access_log",
            old_obs.access_log != new_obs.access_log,
        ),
        (
            "observability.log_flush_interval_ms",
            old_obs.log_flush_interval_ms != new_obs.log_flush_interval_ms,
        ),
        ("observability.tracing", old_obs.tracing != new_obs.tracing),
        (
            "observability.redact_patterns",
            old_obs.redact_patterns != new_obs.redact_patterns,
        ),
        (
            "observability.capture_max_bytes",
            old_obs.capture_max_bytes != new_obs.capture_max_bytes,
        ),
    ];
    let mut changed = Vec::new();
    // A key added to a section after this list was written still differs as a whole section,
    // so it is refused by the section's name instead of silently ignored.
    for (section, keys, differs) in [
        ("server", &server[..], old_server != new_server),
        ("database", &database[..], old_db != new_db),
        ("observability", &observability[..], old_obs != new_obs),
    ] {
        let before = changed.len();
        changed.extend(
            keys.iter()
                .filter(|(_, differs)| *differs)
                .map(|(key, _)| (*key).to_owned()),
        );
        if differs && changed.len() == before {
            changed.push(section.to_owned());
        }
    }
    if live.budget != new.budget {
        changed.push("budget".to_owned());
    }
    changed.extend(
        live.policy
            .frozen_changes(&new.policy)
            .into_iter()
            .map(str::to_owned),
    );
    changed
}

#[derive(Debug, Default)]
struct Diff {
    added: usize,
    removed: usize,
    changed: usize,
}

fn diff<T: PartialEq>(old: &[T], new: &[T], name: impl Fn(&T) -> &String) -> Diff {
    let old: HashMap<&String, &T> = old.iter().map(|item| (name(item), item)).collect();
    let mut result = Diff::default();
    let mut seen = 0;
    for item in new {
        match old.get(name(item)) {
            Some(previous) => {
                seen += 1;
                if *previous != item {
                    result.changed += 1;
                }
            }
            None => result.added += 1,
        }
    }
    result.removed = old.len().saturating_sub(seen);
    result
}

fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    // Rfc3339 fails only for years past 9999; the Unix time still orders reloads then.
    now.format(&Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

/// The reload triggers, set up before anything is spawned so that a gateway that cannot
/// watch its config refuses to start instead of silently never reloading.
pub(crate) struct Triggers {
    sender: mpsc::Sender<Trigger>,
    receiver: mpsc::Receiver<Trigger>,
    /// Dropping it stops notify's thread, which is how the watcher ends with the task.
    watcher: RecommendedWatcher,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl std::fmt::Debug for Triggers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Triggers").finish_non_exhaustive()
    }
}

impl Triggers {
    /// Watches the file's directory, not the file: a rename (editors, `mv`) or a ConfigMap's
    /// symlink swap replaces the file's inode, and a watch on the old inode would go silent.
    pub(crate) fn install(path: &Path) -> anyhow::Result<Self> {
        let name = path
            .file_name()
            .with_context(|| format!("config path {} has no file name", path.display()))?
            .to_owned();
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // One pending trigger is enough: the reload it causes reads the file as it is then,
        // which covers every event that arrived meanwhile.
        let (sender, receiver) = mpsc::channel(1);
        let events = sender.clone();
        let mut watcher = notify::recommended_watcher(move |result| {
            on_event(result, &name, &events);
        })
        .context("starting the config file watcher")?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        #[cfg(unix)]
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("listening for SIGHUP")?;
        Ok(Self {
            sender,
            receiver,
            watcher,
            #[cfg(unix)]
            hangup,
        })
    }
}

/// Runs on notify's own thread: it must never block, hence `try_send`.
fn on_event(
    result: notify::Result<notify::Event>,
    name: &OsString,
    sender: &mpsc::Sender<Trigger>,
) {
    match result {
        Ok(event) => {
            if is_relevant(&event, name) {
                // Full means a reload is already pending, and it will read this change too.
                let _pending = sender.try_send(Trigger::FileChanged);
            }
        }
        Err(error) => tracing::warn!(error = %error, "config file watcher error"),
    }
}

fn is_relevant(event: &notify::Event, name: &OsStr) -> bool {
    // Reading the file ourselves raises open/close events; reacting to them would reload
    // forever. Closing after a write is the one access that means new content.
    if let EventKind::Access(kind) = event.kind
        && kind != AccessKind::Close(AccessMode::Write)
    {
        return false;
    }
    event.paths.iter().any(|path| {
        path.file_name()
            .is_some_and(|file| file == name || file == CONFIGMAP_DATA)
    })
}

/// Starts the reload task: every trigger goes through one channel to this one task, so
/// reloads never overlap. It ends when `stopped` changes.
pub(crate) fn spawn(
    mut reloader: Reloader,
    triggers: Triggers,
    mut stopped: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let Triggers {
        sender,
        mut receiver,
        watcher,
        #[cfg(unix)]
        hangup,
    } = triggers;
    #[cfg(unix)]
    let forwarder = tokio::spawn(forward_hangups(hangup, sender, stopped.clone()));
    #[cfg(not(unix))]
    drop(sender);
    tokio::spawn(async move {
        let _watching = watcher;
        reloader.reload(Trigger::Startup).await;
        loop {
            let trigger = tokio::select! {
                trigger = receiver.recv() => match trigger {
                    Some(trigger) => trigger,
                    None => break,
                },
                _ = stopped.changed() => break,
            };
            let trigger = match trigger {
                Trigger::FileChanged => {
                    tokio::select! {
                        () = tokio::time::sleep(DEBOUNCE) => {}
                        _ = stopped.changed() => break,
                    }
                    // The reload below reads the file after this point, so it covers every
                    // event drained here; later events queue the next round.
                    let mut trigger = Trigger::FileChanged;
                    while let Ok(pending) = receiver.try_recv() {
                        if pending == Trigger::Signal {
                            trigger = Trigger::Signal;
                        }
                    }
                    trigger
                }
                other => other,
            };
            reloader.reload(trigger).await;
        }
        #[cfg(unix)]
        forwarder.abort();
    })
}

#[cfg(unix)]
async fn forward_hangups(
    mut hangup: tokio::signal::unix::Signal,
    sender: mpsc::Sender<Trigger>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            received = hangup.recv() => {
                // Waiting for room (instead of `try_send`) so that a SIGHUP is answered by a
                // reload of its own even when a file event is already pending.
                if received.is_none() || sender.send(Trigger::Signal).await.is_err() {
                    break;
                }
            }
            _ = stopped.changed() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind, RenameMode};

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        let mut event = notify::Event::new(kind);
        event.paths = paths.iter().map(PathBuf::from).collect();
        event
    }

    #[test]
    fn only_the_config_file_and_configmap_swaps_are_relevant() {
        let name = OsStr::new("gateway.toml");
        let write = EventKind::Modify(ModifyKind::Any);
        assert!(is_relevant(&event(write, &["/etc/gw/gateway.toml"]), name));
        assert!(!is_relevant(&event(write, &["/etc/gw/other.toml"]), name));
        assert!(!is_relevant(
            &event(write, &["/etc/gw/.gateway.toml.swp"]),
            name
        ));
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert!(is_relevant(
            &event(rename, &["/etc/gw/.tmp", "/etc/gw/gateway.toml"]),
            name
        ));
        assert!(is_relevant(
            &event(rename, &["/etc/gw/..data_tmp", "/etc/gw/..data"]),
            name
        ));
        let create = EventKind::Create(CreateKind::File);
        assert!(is_relevant(&event(create, &["gateway.toml"]), name));
    }

    #[test]
    fn our_own_reads_do_not_trigger_reloads() {
        let name = OsStr::new("gateway.toml");
        let path = ["/etc/gw/gateway.toml"];
        for kind in [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Close(AccessMode::Read),
            AccessKind::Read,
        ] {
            assert!(!is_relevant(&event(EventKind::Access(kind), &path), name));
        }
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(is_relevant(&event(written, &path), name));
    }

    #[test]
    fn diff_counts_added_removed_and_changed_entries() {
        let old = vec![
            ("a".to_owned(), 1),
            ("b".to_owned(), 2),
            ("c".to_owned(), 3),
        ];
        let new = vec![
            ("a".to_owned(), 1),
            ("b".to_owned(), 9),
            ("d".to_owned(), 4),
        ];
        let result = diff(&old, &new, |(name, _)| name);
        assert_eq!(
            (result.added, result.removed, result.changed),
            (1, 1, 1),
            "{result:?}"
        );
    }

    #[test]
    fn frozen_changes_name_each_key() {
        let live = GatewayConfig::parse("", &|_| None).unwrap_or_else(|err| {
            unreachable!("an empty config parses: {err}");
        });
        let mut new = live.clone();
        new.server.listen = "127.0.0.1:1".parse().unwrap_or(new.server.listen);
        new.database.batch_size += 1;
        new.observability.access_log = !new.observability.access_log;
        new.policy.timeouts.connect_ms += 1;
        new.policy.stream_drain_secs += 1;
        assert_eq!(
            frozen_changes(&live, &new),
            [
                "server.listen",
                "database.batch_size",
                "observability.access_log",
                "policy.timeouts.connect_ms"
            ]
        );
        assert!(frozen_changes(&live, &live).is_empty());
    }
}
