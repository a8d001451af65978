//! Real `gateway` processes for the tests that need them: started from a config file as
//! `gateway serve` starts them, stopped with SIGTERM or SIGKILL, never left running.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Any child process (a private `redis-server`, say), killed when the test ends, passed or
/// not.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `gateway --config CONFIG ARGS...` in the config's directory with `env` set; returns
/// whether it succeeded, its stdout and its stderr.
pub fn gateway_cli_status(
    config: &Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(config)
        .args(args)
        .current_dir(config.parent().unwrap())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// [`gateway_cli_status`] that must succeed; returns stdout.
pub fn gateway_cli(config: &Path, env: &[(&str, &str)], args: &[&str]) -> String {
    let (ok, stdout, stderr) = gateway_cli_status(config, env, args);
    assert!(ok, "gateway {args:?} failed: {stderr}");
    stdout
}

/// The `name: value` line of `gateway keys create` / `keys rotate` output.
pub fn output_field(output: &str, name: &str) -> String {
    output
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in {output:?}"))
        .to_owned()
}

/// A `gateway serve` child process, killed if the test ends while it runs.
pub struct GatewayProcess {
    child: Option<Child>,
    pub url: String,
    pub config: PathBuf,
}

impl GatewayProcess {
    /// Writes `config` to `dir/gateway.toml`, starts `gateway serve` on it in `dir`, and waits
    /// until `/readyz` answers 200 on `port`.
    pub async fn start(dir: &Path, port: u16, config: &str) -> Self {
        Self::start_with_env(dir, port, config, &[]).await
    }

    /// [`GatewayProcess::start`] with environment variables set (secrets the config names as
    /// `${VAR}`).
    pub async fn start_with_env(dir: &Path, port: u16, config: &str, env: &[(&str, &str)]) -> Self {
        let path = dir.join("gateway.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .current_dir(dir)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut process = Self {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            config: path,
        };
        process.wait_ready().await;
        process
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let ready = format!("{}/readyz", self.url);
        let started = Instant::now();
        loop {
            if let Ok(response) = client.get(&ready).send().await
                && response.status() == 200
            {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the gateway exited before it was ready: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the gateway did not get ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, as an orchestrator stops it, then waits for the graceful exit.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "the gateway exited with {status}");
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the gateway did not stop within 60 s of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
