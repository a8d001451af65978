//! The `gateway` binary's commands, run as a user would.

#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use std::process::Command;

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn config_check_accepts_the_default_config() {
    let default = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/gateway.toml");
    let output = gateway()
        .args(["config", "check", default])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok"));
}

#[test]
fn config_check_reports_every_error_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "bad.toml",
        r#"
[server]
listen = "not an address"

[[providers]]
name = "openai"
kind = "openai"
base_urls = ["ftp://nowhere"]
api_keys = ["${GATEWAY_TEST_UNSET_VARIABLE}"]
timeout_secs = "slow"

[[providers]]
name = "mock"
kind = "mock"
colour = "blue"

[[models]]
alias = "chat"
targets = [{ provider = "missing", model = "m" }]

[[projects]]
name = "demo"
api_keys = [{ id = "k", sha256 = "zz" }]
models = ["chat", "ghost"]

[surprise]
x = 1
"#,
    );
    let output = gateway()
        .args(["config", "check"])
        .arg(&path)
        .env_remove("GATEWAY_TEST_UNSET_VARIABLE")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "server.listen",
        "providers[0].api_keys[0]: environment variable `GATEWAY_TEST_UNSET_VARIABLE` is not set",
        "providers[0].timeout_secs",
        "providers[1]",
        "colour",
        "surprise: unknown section",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn config_check_reports_semantic_errors_of_a_well_formed_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "bad.toml",
        r#"
[[providers]]
name = "openai"
kind = "openai"
base_urls = ["ftp://nowhere"]

[[models]]
alias = "chat"
targets = [{ provider = "missing", model = "m" }]

[[projects]]
name = "demo"
api_keys = [{ id = "k", sha256 = "zz" }]
models = ["chat", "ghost"]
"#,
    );
    // --config after the subcommand works too.
    let output = gateway()
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "providers[0].base_urls[0]",
        "models[0].targets[0].provider: no provider named `missing`",
        "projects[0].api_keys[0].sha256",
        "projects[0].models[1]: no alias named `ghost`",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    // `serve` refuses the same file.
    let output = gateway()
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn keys_hash_prints_the_sha256() {
    let output = gateway().args(["keys", "hash", "abc"]).output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn migrate_creates_the_sqlite_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "gateway.toml",
        r#"
[database]
url = "sqlite://data/nested/usage.db"

[[providers]]
name = "up"
kind = "mock"

[[models]]
alias = "chat"
targets = [{ provider = "up", model = "m" }]

[[prices]]
provider = "up"
model = "m"
input_per_million = "0.15"
output_per_million = "0.60"

[[projects]]
name = "finance-sees-me"
api_keys = [{ id = "k", sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" }]
"#,
    );
    // Relative paths in the config resolve against the working directory.
    let output = gateway()
        .current_dir(dir.path())
        .args(["migrate", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(dir.path().join("data/nested/usage.db").exists());
    // The catalog is there before any gateway ran: finance can join on it.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("1 projects, 1 price rows added"),
        "{stdout}"
    );
    let database = dir.path().join("data/nested/usage.db");
    let catalog: (String, String, String) = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async {
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", database.display()))
                .await
                .unwrap();
            let row = sqlx::query_as(
                "SELECT (SELECT group_concat(name) FROM projects), \
                 (SELECT group_concat(key_id) FROM api_keys), \
                 (SELECT group_concat(model || '=' || CAST(input_per_million AS TEXT)) FROM prices)",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            pool.close().await;
            row
        });
    assert_eq!(
        catalog,
        ("finance-sees-me".into(), "k".into(), "m=0.15".into())
    );
}
