"""Helpers and fixtures for the suites that drive the gateway with real client tools.

Imported by `test_tools_claude_code.py` and `test_tools_langchain.py` (pytest picks up fixtures
a test module imports). Nothing here changes the shared `gateway` fixture: every tool talks to
the session's gateway, and what it did is read back from the gateway's own records, the JSON
access log (`gateway.log`) and the usage table (`gateway.db_path`).

Claude Code is the npm package pinned in `tests/e2e/package.json`, installed into
`tests/e2e/node_modules` by `scripts/test.sh` (`npm ci`). A missing install is a failure, not a
skip: a suite that silently skips proves nothing. `CLAUDE_CODE_BIN` points at another build.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLIENT_KEY

HERE = Path(__file__).resolve().parent
MOCK_TEXT = "tok0 tok1 tok2 tok3 tok4 "
# One Claude Code run takes well under a second against the mock; this bounds a hang.
CLAUDE_CODE_TIMEOUT_SECS = 60.0
# The usage rows are written in background batches.
USAGE_WAIT_SECS = 10.0
# The variables that select a model in Claude Code: the main one, the deprecated small/fast
# one, and the current per-family defaults (haiku for background work, sonnet/opus for the main
# loop and subagents). All point at the one alias under test, so nothing asks for a real
# Anthropic model name the gateway does not serve.
MODEL_VARIABLES = (
    "ANTHROPIC_MODEL",
    "ANTHROPIC_SMALL_FAST_MODEL",
    "ANTHROPIC_DEFAULT_HAIKU_MODEL",
    "ANTHROPIC_DEFAULT_SONNET_MODEL",
    "ANTHROPIC_DEFAULT_OPUS_MODEL",
    "CLAUDE_CODE_SUBAGENT_MODEL",
)


def pinned_claude_code_version() -> str:
    manifest = json.loads((HERE / "package.json").read_text())
    return manifest["devDependencies"]["@anthropic-ai/claude-code"]


@pytest.fixture(scope="session")
def claude_code_bin() -> str:
    """The `claude` executable, checked to be the pinned version and to start."""
    override = os.environ.get("CLAUDE_CODE_BIN")
    path = Path(override) if override else HERE / "node_modules" / ".bin" / "claude"
    if not path.exists():
        pytest.fail(
            f"Claude Code is not installed at {path}: run `npm ci --no-audit --no-fund` in "
            f"tests/e2e (scripts/test.sh does), or set CLAUDE_CODE_BIN",
            pytrace=False,
        )
    try:
        done = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=CLAUDE_CODE_TIMEOUT_SECS,
            env=_base_env(HERE),
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.fail(f"{path} --version did not run: {err}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"{path} --version exited {done.returncode}\nstdout: {done.stdout}\n"
            f"stderr: {done.stderr}",
            pytrace=False,
        )
    if not override and not done.stdout.startswith(pinned_claude_code_version() + " "):
        pytest.fail(
            f"installed Claude Code is {done.stdout.strip()!r}, package.json pins "
            f"{pinned_claude_code_version()}: run `npm ci` in tests/e2e",
            pytrace=False,
        )
    return str(path)


def _base_env(home: Path) -> dict[str, str]:
    # Built from scratch: nothing from the developer's shell (their own ANTHROPIC_* keys,
    # Bedrock/Vertex switches, proxies) may leak into the run.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "HOME": str(home),
        "NO_PROXY": "127.0.0.1,localhost",
    }


@dataclasses.dataclass
class ClaudeCodeRun:
    alias: str
    returncode: int
    stdout: str
    stderr: str
    elapsed_secs: float
    # The JSON document `--output-format json` printed, or None if stdout was not JSON.
    result: dict | None
    # Every access-log entry of a `/v1/...` request the gateway finished during the run.
    requests: list[dict]
    # Claude Code's own debug log (`--debug-file`): API errors and its recoveries.
    debug_log: str

    def api_errors(self) -> list[str]:
        return [line for line in self.debug_log.splitlines() if "API error" in line]

    def describe(self) -> str:
        """Everything needed to understand a failure, for assertion messages."""
        entries = "\n".join(
            f"  {entry.get('method')} {entry.get('path')} -> {entry.get('status')} "
            f"alias={entry.get('alias')} provider={entry.get('provider')} "
            f"error_type={entry.get('error_type')} request_id={entry.get('request_id')}"
            for entry in self.requests
        )
        errors = "\n".join(f"  {line}" for line in self.api_errors()) or "  (none)"
        return (
            f"claude -p via alias {self.alias!r}: exit {self.returncode} in "
            f"{self.elapsed_secs:.1f}s\n"
            f"gateway requests during the run:\n{entries or '  (none)'}\n"
            f"API errors in Claude Code's debug log:\n{errors}\n"
            f"stdout: {self.stdout[:4000]}\nstderr: {self.stderr[-4000:]}"
        )


def _access_entries(log: Path, offset: int) -> list[dict]:
    entries = []
    with open(log, "rb") as handle:
        handle.seek(offset)
        for line in handle.read().decode(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(entry, dict)
                and entry.get("target") == "access"
                and str(entry.get("path", "")).startswith("/v1/")
            ):
                entries.append(entry)
    return entries


def run_claude_code(
    claude_code_bin: str, gateway, alias: str, workdir: Path, prompt: str = "Say hello"
) -> ClaudeCodeRun:
    """Runs `claude -p PROMPT --output-format json` headless as a new user would, against the
    gateway, with a throwaway home, config dir and working directory."""
    home = workdir / "home"
    cwd = workdir / "project"
    home.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    debug_file = workdir / "claude-debug.txt"
    env = _base_env(home)
    env.update(
        {
            "CLAUDE_CONFIG_DIR": str(home / ".claude"),
            # The gateway's root: the Anthropic SDK inside Claude Code appends /v1/messages.
            "ANTHROPIC_BASE_URL": gateway.base_url.removesuffix("/v1"),
            "ANTHROPIC_API_KEY": CLIENT_KEY,
            # No telemetry, error reports, auto-update, or other traffic off this machine.
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_BUG_COMMAND": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            # One request per attempt: a retry would hide the first answer.
            "CLAUDE_CODE_MAX_RETRIES": "0",
        }
    )
    env.update({name: alias for name in MODEL_VARIABLES})
    offset = gateway.log.stat().st_size
    started = time.monotonic()
    try:
        done = subprocess.run(
            [
                claude_code_bin,
                "-p",
                prompt,
                "--output-format",
                "json",
                "--debug-file",
                str(debug_file),
            ],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=CLAUDE_CODE_TIMEOUT_SECS,
            stdin=subprocess.DEVNULL,
        )
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as err:
        returncode = -1
        stdout = (err.stdout or b"").decode(errors="replace") if isinstance(
            err.stdout, bytes
        ) else (err.stdout or "")
        stderr = f"timed out after {CLAUDE_CODE_TIMEOUT_SECS}s\n" + (
            (err.stderr or b"").decode(errors="replace")
            if isinstance(err.stderr, bytes)
            else (err.stderr or "")
        )
    elapsed = time.monotonic() - started
    try:
        result = json.loads(stdout)
    except ValueError:
        result = None
    # The access line of a stream is written as its last bytes go out, which can be a moment
    # after the client has them: settle until no new entry shows up for a short while.
    requests = _access_entries(gateway.log, offset)
    deadline = time.monotonic() + 2.0
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.3:
        time.sleep(0.05)
        latest = _access_entries(gateway.log, offset)
        if len(latest) != len(requests):
            requests, quiet_since = latest, time.monotonic()
    try:
        debug_log = debug_file.read_text(errors="replace")
    except OSError:
        debug_log = ""
    return ClaudeCodeRun(
        alias=alias,
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        elapsed_secs=elapsed,
        result=result,
        requests=requests,
        debug_log=debug_log,
    )


def usage_rows(gateway, request_ids: list[str]) -> dict[str, dict]:
    """The usage rows of these requests, waiting for the background writer."""
    deadline = time.monotonic() + USAGE_WAIT_SECS
    while True:
        with sqlite3.connect(gateway.db_path) as db:
            db.row_factory = sqlite3.Row
            marks = ",".join("?" * len(request_ids))
            rows = {
                row["request_id"]: dict(row)
                for row in db.execute(
                    f"SELECT * FROM usage_events WHERE request_id IN ({marks})", request_ids
                )
            }
        if len(rows) == len(set(request_ids)) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)
