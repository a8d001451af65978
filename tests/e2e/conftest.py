"""End-to-end harness: the real `gateway` binary in front of the real `mock-upstream` binary.

Both binaries come from environment variables so CI can point at release or debug builds:

    GATEWAY_BIN=target/debug/gateway MOCK_UPSTREAM_BIN=target/debug/mock-upstream \
        python -m pytest tests/e2e

A missing variable is an error, not a skip: a suite that silently skips proves nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

CLIENT_KEY = "sk-e2e-test"
UPSTREAM_KEY = "sk-upstream-secret"
READY_TIMEOUT_SECS = 30.0
STOP_TIMEOUT_SECS = 10.0
LOG_TAIL_CHARS = 20_000

# Where the harness keeps process logs, so the report hook can attach them to a failure.
LOGS_KEY = pytest.StashKey[list]()


def _binary(env_var: str) -> str:
    path = os.environ.get(env_var)
    if not path:
        pytest.fail(
            f"{env_var} is not set: point it at the built binary, e.g. "
            f"{env_var}=target/debug/{'gateway' if env_var == 'GATEWAY_BIN' else 'mock-upstream'}",
            pytrace=False,
        )
    resolved = Path(path).resolve()
    if not resolved.is_file() or not os.access(resolved, os.X_OK):
        pytest.fail(f"{env_var}={path} is not an executable file", pytrace=False)
    return str(resolved)


def _free_port() -> int:
    # Racy by nature (someone could take it before the gateway binds), but the gateway has no
    # way to report a port it picked itself, and the window is tiny on a test machine.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"<cannot read {path}: {err}>"
    return text[-LOG_TAIL_CHARS:]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_SECS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclasses.dataclass(frozen=True)
class MockUpstreamProcess:
    base_url: str
    log: Path


@dataclasses.dataclass(frozen=True)
class Gateway:
    base_url: str
    admin_url: str
    db_path: Path
    log: Path
    upstream: MockUpstreamProcess

    def output(self) -> str:
        return _tail(self.log)


@pytest.fixture(scope="session")
def mock_upstream(tmp_path_factory, pytestconfig) -> MockUpstreamProcess:
    binary = _binary("MOCK_UPSTREAM_BIN")
    workdir = tmp_path_factory.mktemp("mock-upstream")
    log = workdir / "mock-upstream.log"
    pytestconfig.stash.setdefault(LOGS_KEY, []).append(("mock-upstream", log))
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [binary, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=workdir,
        )
    try:
        # A thread, because a pipe read has no timeout and a hung binary must not hang the suite.
        lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(
            target=lambda: lines.put(process.stdout.readline()), daemon=True
        ).start()
        try:
            line = lines.get(timeout=READY_TIMEOUT_SECS).decode().strip()
        except queue.Empty:
            pytest.fail(
                f"mock-upstream printed nothing in {READY_TIMEOUT_SECS}s\n{_tail(log)}",
                pytrace=False,
            )
        prefix = "listening "
        if not line.startswith(prefix):
            pytest.fail(
                f"unexpected first line from mock-upstream: {line!r}\n"
                f"exit code: {process.poll()}\n{_tail(log)}",
                pytrace=False,
            )
        yield MockUpstreamProcess(base_url=line[len(prefix) :], log=log)
    finally:
        _stop(process)


def _gateway_config(listen: int, admin: int, workdir: Path, upstream_url: str) -> str:
    key_hash = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
    return f"""\
[server]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"

[database]
url = "sqlite://{workdir}/usage.db"
spool_dir = "{workdir}/spool"

[[providers]]
name = "upstream"
kind = "openai"
base_urls = ["{upstream_url}"]
api_keys = ["{UPSTREAM_KEY}"]
timeout_secs = 5

[[providers]]
name = "mock"
kind = "mock"

[[providers]]
name = "claude-upstream"
kind = "anthropic"
base_urls = ["{upstream_url}"]
api_keys = ["{UPSTREAM_KEY}"]
timeout_secs = 5

[[providers]]
name = "gemini-upstream"
kind = "gemini"
base_urls = ["{upstream_url.removesuffix("/v1")}/v1beta"]
api_keys = ["{UPSTREAM_KEY}"]
timeout_secs = 5

[[models]]
alias = "chat"
targets = [{{ provider = "upstream", model = "mock-model", weight = 100 }}]

[[models]]
alias = "claude"
targets = [{{ provider = "claude-upstream", model = "claude-test" }}]

[[models]]
alias = "gem"
targets = [{{ provider = "gemini-upstream", model = "gemini-test" }}]

[[models]]
alias = "local"
targets = [{{ provider = "mock", model = "mock-1" }}]

[[models]]
alias = "secret-alias"
targets = [{{ provider = "mock", model = "mock-1" }}]

[[projects]]
name = "e2e"
api_keys = [{{ id = "e2e-key", sha256 = "{key_hash}" }}]
models = ["chat", "local", "claude", "gem"]
tags = {{ team = "qa", business_line = "testing" }}
"""


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, pytestconfig, mock_upstream) -> Gateway:
    binary = _binary("GATEWAY_BIN")
    workdir = tmp_path_factory.mktemp("gateway")
    listen, admin = _free_port(), _free_port()
    while admin == listen:
        admin = _free_port()
    config = workdir / "gateway.toml"
    config.write_text(_gateway_config(listen, admin, workdir, mock_upstream.base_url))
    log = workdir / "gateway.log"
    pytestconfig.stash.setdefault(LOGS_KEY, []).append(("gateway", log))

    with open(log, "wb") as output:
        process = subprocess.Popen(
            [binary, "serve", "--config", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    try:
        base = f"http://127.0.0.1:{listen}"
        deadline = time.monotonic() + READY_TIMEOUT_SECS
        while not _ready(f"{base}/readyz"):
            if process.poll() is not None:
                pytest.fail(
                    f"gateway exited with code {process.returncode} before it was ready\n"
                    f"config:\n{config.read_text()}\noutput:\n{_tail(log)}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"gateway not ready on {base}/readyz after {READY_TIMEOUT_SECS}s\n"
                    f"output:\n{_tail(log)}",
                    pytrace=False,
                )
            time.sleep(0.1)
        yield Gateway(
            base_url=f"{base}/v1",
            admin_url=f"http://127.0.0.1:{admin}",
            db_path=workdir / "usage.db",
            log=log,
            upstream=mock_upstream,
        )
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def client(gateway) -> openai.OpenAI:
    # No retries: a retried request would hide the first answer and double the usage rows.
    with openai.OpenAI(
        base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30
    ) as sdk:
        yield sdk


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for name, path in item.config.stash.get(LOGS_KEY, []):
            report.sections.append((f"{name} output ({path})", _tail(path)))
    return report
