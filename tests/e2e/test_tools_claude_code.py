"""Claude Code, the real CLI (npm `@anthropic-ai/claude-code`, pinned in package.json), run
headless against the gateway as a new user would: `claude -p "Say hello" --output-format json`
with `ANTHROPIC_BASE_URL` at the gateway, the project key as `ANTHROPIC_API_KEY` and every model
variable set to one alias.

Two ways through the gateway:
- `claude`: an Anthropic-format vendor, so the request is passed through natively (body,
  unknown fields such as `thinking` and `context_management`, `anthropic-beta` headers);
- `chat`: an OpenAI-format vendor, so the request is translated both ways, stream included.

Claude Code sends what real sessions send: a dozen tools, adaptive thinking, context
management, effort, beta headers, cache_control markers and, with the
`mid-conversation-tool-changes` beta, `role: "system"` turns inside `messages`. The mock answers
its first request with a call to the FIRST tool (Claude Code's `Agent`) with
`{"location":"Paris"}`; Claude Code rejects that input with a tool_result error, and the mock
answers that with text. So one run is two model turns and ends with the mock's text; no mock
directive is needed.

Each alias is run once (module scope) and checked twice: the outcome a user sees, and the
gateway's own records (access log and usage rows) of every request the run made.
"""

from __future__ import annotations

import pytest
from tools_conftest import MOCK_TEXT, claude_code_bin, run_claude_code, usage_rows  # noqa: F401

PROVIDERS = {"claude": "claude-upstream", "chat": "upstream"}


@pytest.fixture(scope="module", params=["claude", "chat"])
def claude_code_run(request, gateway, claude_code_bin, tmp_path_factory):  # noqa: F811
    alias = request.param
    return run_claude_code(
        claude_code_bin, gateway, alias, tmp_path_factory.mktemp(f"claude-code-{alias}")
    )


def test_claude_code_answers_with_the_mock_text(claude_code_run):
    run = claude_code_run
    assert run.returncode == 0, run.describe()
    assert run.result is not None, f"stdout is not JSON\n{run.describe()}"
    assert run.result.get("type") == "result", run.describe()
    assert run.result.get("subtype") == "success", run.describe()
    assert run.result.get("is_error") is False, run.describe()
    assert run.result.get("result") == MOCK_TEXT, run.describe()
    # The mock's tool call and the answer to Claude Code's tool error: two model turns.
    assert run.result.get("num_turns") == 2, run.describe()


def test_claude_code_requests_all_succeed_and_are_billed(gateway, claude_code_run):
    """Every request Claude Code made got a 200 and a usage row with the vendor's usage, and
    Claude Code's own token totals are those rows' sums."""
    run = claude_code_run
    # Claude Code sometimes probes `GET /v1/models?limit=1000` ("gateway discovery"). It sends
    # credentials there only from ANTHROPIC_AUTH_TOKEN or an apiKeyHelper, never from
    # ANTHROPIC_API_KEY, so with an API key the probe arrives without one and the gateway must
    # refuse it (401); Claude Code logs it and goes on. Every other request must succeed.
    discovery = [
        entry
        for entry in run.requests
        if entry.get("method") == "GET" and entry.get("path") == "/v1/models"
    ]
    assert all(entry.get("status") == 401 for entry in discovery), run.describe()
    messages = [entry for entry in run.requests if entry not in discovery]
    assert messages, f"no request reached the gateway\n{run.describe()}"
    refused = [entry for entry in messages if entry.get("status") != 200]
    assert not refused, (
        f"the gateway answered {len(refused)} of Claude Code's {len(messages)} requests "
        f"with an error (Claude Code may have recovered, but a request was refused)\n"
        f"{run.describe()}"
    )
    for entry in messages:
        assert entry["method"] == "POST" and entry["path"] == "/v1/messages", run.describe()

    ids = [entry["request_id"] for entry in messages]
    rows = usage_rows(gateway, ids)
    assert sorted(rows) == sorted(ids), f"usage rows missing\n{run.describe()}"
    for row in rows.values():
        assert row["status"] == 200, row
        assert row["alias"] == run.alias, row
        assert row["provider"] == PROVIDERS[run.alias], row
        assert row["project"] == "e2e" and row["key_id"] == "e2e-key", row
        assert row["streamed"] == 1, row
        assert row["client_aborted"] == 0, row
        assert row["usage_source"] == "vendor", row
        assert row["output_tokens"] == 5, row
        assert row["input_tokens"] is not None and row["input_tokens"] >= 1, row
        assert row["error_type"] is None, row

    usage = run.result["usage"]
    assert usage["output_tokens"] == sum(row["output_tokens"] for row in rows.values()), (
        usage,
        rows,
    )
    assert usage["input_tokens"] == sum(row["input_tokens"] for row in rows.values()), (
        usage,
        rows,
    )
