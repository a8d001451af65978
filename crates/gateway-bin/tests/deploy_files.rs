//! The configs shipped in `deploy/` stay valid as the config grows: each is parsed with the
//! same code `gateway config check` and `gateway serve` use, with its `${VAR}`s set as the
//! compose file and the Kubernetes Secret set them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test that cannot go on should fail on the spot"
)]

use gateway_bin::GatewayConfig;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn environment(name: &str) -> Option<String> {
    Some(match name {
        "DATABASE_URL" => "postgres://gateway:secret@postgres:5432/gateway".into(),
        "REDIS_URL" => "redis://redis:6379".into(),
        _ => format!("value-of-{name}"),
    })
}

fn check(name: &str, text: &str) {
    if let Err(err) = GatewayConfig::parse(text, &environment) {
        panic!(
            "{name} is not a valid config:\n  {}",
            err.errors().join("\n  ")
        );
    }
}

#[test]
fn the_compose_config_is_valid() {
    let path = repo().join("deploy/compose/gateway.toml");
    check(
        "deploy/compose/gateway.toml",
        &std::fs::read_to_string(path).unwrap(),
    );
}

#[test]
fn the_kubernetes_configmap_holds_a_valid_config() {
    let yaml = std::fs::read_to_string(repo().join("deploy/k8s/configmap.yaml")).unwrap();
    // The file is a literal block (`gateway.toml: |`) indented by four spaces.
    let (_, block) = yaml
        .split_once("gateway.toml: |\n")
        .expect("configmap.yaml has a gateway.toml block");
    let text: String = block
        .lines()
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
        .collect();
    assert!(text.contains("[server]"), "{text}");
    check("deploy/k8s/configmap.yaml", &text);
}

#[test]
fn the_default_config_is_valid() {
    let path = repo().join("config/gateway.toml");
    check(
        "config/gateway.toml",
        &std::fs::read_to_string(path).unwrap(),
    );
}
