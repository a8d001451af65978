"""The gateway as the official OpenAI Python SDK sees it, and the usage rows it leaves behind.

The upstream is `mock-upstream`, whose answers are deterministic: the text is
"tok0 tok1 tok2 tok3 tok4 ", completion_tokens is 5, and prompt_tokens is
ceil(characters of all string contents / 4) + 1 (see the gateway-test-support crate docs).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

import openai
import pytest
from conftest import CLIENT_KEY, UPSTREAM_KEY

MOCK_TEXT = "tok0 tok1 tok2 tok3 tok4 "
MOCK_COMPLETION_TOKENS = 5
USAGE_WAIT_SECS = 10.0
PROJECT_TAGS = {"team": "qa", "business_line": "testing"}


def messages(text: str) -> list[dict]:
    return [
        {"role": "system", "content": "You are a test."},
        {"role": "user", "content": text},
    ]


def mock_prompt_tokens(sent: list[dict]) -> int:
    chars = sum(len(m["content"]) for m in sent if isinstance(m.get("content"), str))
    return -(-chars // 4) + 1


def request_id_of(raw) -> str:
    """Our x-request-id, normalised to how the usage table stores it."""
    header = raw.headers.get("x-request-id")
    assert header, f"no x-request-id in {dict(raw.headers)}"
    assert not header.startswith("req-up-"), "the vendor's request id leaked as ours"
    parsed = uuid.UUID(header)
    assert str(parsed) == header.lower(), f"not a hyphenated UUID: {header}"
    return str(parsed)


def stream_content(chunks) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def plain(client: openai.OpenAI, model: str, text: str):
    sent = messages(text)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=sent)
    return request_id_of(raw), raw.parse(), sent


def streamed(client: openai.OpenAI, model: str, text: str, include_usage: bool | None):
    sent = messages(text)
    extra = {} if include_usage is None else {"stream_options": {"include_usage": include_usage}}
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=sent, stream=True, **extra
    )
    chunks = list(raw.parse())
    return request_id_of(raw), chunks, sent


@pytest.fixture(scope="session")
def plain_chat(client):
    return plain(client, "chat", "Say something deterministic.")


@pytest.fixture(scope="session")
def streamed_chat_with_usage(client):
    return streamed(client, "chat", "Stream it, with usage.", include_usage=True)


@pytest.fixture(scope="session")
def streamed_chat_without_usage(client):
    return streamed(client, "chat", "Stream it, no usage.", include_usage=None)


def usage_rows(gateway, request_ids: list[str]) -> dict[str, dict]:
    """Polls the usage table until every id has its row: the gateway writes rows in the background."""
    deadline = time.monotonic() + USAGE_WAIT_SECS
    rows: dict[str, dict] = {}
    last_error = None
    while True:
        try:
            # mode=rw: never create an empty database if the gateway has not made one.
            with sqlite3.connect(f"file:{gateway.db_path}?mode=rw", uri=True, timeout=5) as db:
                db.row_factory = sqlite3.Row
                marks = ",".join("?" * len(request_ids))
                found = db.execute(
                    f"SELECT * FROM usage_events WHERE request_id IN ({marks})", request_ids
                ).fetchall()
                rows = {row["request_id"]: dict(row) for row in found}
            last_error = None
        except sqlite3.Error as err:
            last_error = err
        if all(request_id in rows for request_id in request_ids):
            return rows
        if time.monotonic() > deadline:
            missing = [request_id for request_id in request_ids if request_id not in rows]
            pytest.fail(
                f"no usage rows for {missing} after {USAGE_WAIT_SECS}s "
                f"(found {list(rows)}, last sqlite error: {last_error})"
            )
        time.sleep(0.2)


def query(gateway, sql: str, params=()) -> list[tuple]:
    with sqlite3.connect(f"file:{gateway.db_path}?mode=rw", uri=True, timeout=5) as db:
        return db.execute(sql, params).fetchall()


# 1. Plain completion through the OpenAI provider.


def test_plain_completion(plain_chat):
    _request_id, completion, sent = plain_chat
    assert completion.choices[0].message.content == MOCK_TEXT
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens == MOCK_COMPLETION_TOKENS
    assert completion.usage.prompt_tokens == mock_prompt_tokens(sent)
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_request_ids_are_ours_and_unique(client):
    first, _, _ = plain(client, "chat", "one")
    second, _, _ = plain(client, "chat", "two")
    assert first != second


# 2. Streaming, with and without the client asking for usage.


def test_stream_with_include_usage(streamed_chat_with_usage):
    _request_id, chunks, sent = streamed_chat_with_usage
    assert stream_content(chunks) == MOCK_TEXT
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None, f"last chunk has no usage: {last}"
    assert last.usage.completion_tokens == MOCK_COMPLETION_TOKENS
    assert last.usage.prompt_tokens == mock_prompt_tokens(sent)
    assert [chunk for chunk in chunks[:-1] if chunk.usage is not None] == []
    assert any(chunk.choices and chunk.choices[0].finish_reason == "stop" for chunk in chunks)


def test_stream_without_include_usage_has_no_usage_chunk(streamed_chat_without_usage):
    _request_id, chunks, _ = streamed_chat_without_usage
    assert stream_content(chunks) == MOCK_TEXT
    with_usage = [chunk for chunk in chunks if chunk.usage is not None]
    assert with_usage == [], "the gateway must strip the usage chunk it asked the upstream for"
    assert all(chunk.choices for chunk in chunks), "a choices-less (usage) chunk leaked"


# 3. The built-in mock provider.


def test_local_alias_plain_and_streamed(client):
    _, completion, _ = plain(client, "local", "hello local")
    text = completion.choices[0].message.content
    assert "hello local" in text, text
    assert completion.usage.completion_tokens > 0

    _, chunks, _ = streamed(client, "local", "hello local", include_usage=True)
    assert stream_content(chunks) == text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


# 4. Errors, in OpenAI's shape so the SDK raises its own exception types.


def test_wrong_key_is_401(gateway):
    with openai.OpenAI(base_url=gateway.base_url, api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.chat.completions.create(model="chat", messages=messages("hi"))
    assert caught.value.status_code == 401


def test_unknown_alias_is_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=messages("hi"))
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found", caught.value.body


def test_alias_not_allowed_for_project_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="secret-alias", messages=messages("hi"))
    assert caught.value.status_code == 404


@pytest.mark.parametrize(
    ("extra_body", "field"),
    [({"max_tokens": "ten"}, "max_tokens"), ({"messages": "hi"}, "messages")],
)
def test_malformed_request_names_the_field(client, extra_body, field):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="chat", messages=messages("hi"), extra_body=extra_body
        )
    assert caught.value.status_code == 400
    assert field in caught.value.message, caught.value.message


# 5. and 6. Usage rows.


def test_usage_row_of_plain_request(gateway, client, plain_chat):
    # Sent first, so by the time the later rows are written a row for it would be there too.
    with openai.OpenAI(base_url=gateway.base_url, api_key="sk-not-e2e", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="chat", messages=messages("unauthorised"))
    local_id, _, _ = plain(client, "local", "usage row for local")

    request_id, completion, _ = plain_chat
    rows = usage_rows(gateway, [request_id, local_id])
    row = rows[request_id]
    assert row["project"] == "e2e"
    assert row["key_id"] == "e2e-key"
    assert row["alias"] == "chat"
    assert row["provider"] == "upstream"
    assert row["upstream_model"] == "mock-model"
    assert row["status"] == 200
    assert row["error_type"] is None
    assert row["input_tokens"] == completion.usage.prompt_tokens
    assert row["output_tokens"] == completion.usage.completion_tokens
    assert row["streamed"] == 0
    assert row["client_aborted"] == 0
    assert row["attempts"] == 1
    assert row["elapsed_ms"] is not None and row["elapsed_ms"] >= 0
    assert row["created_at"] is not None
    assert str(row["vendor_request_id"]).startswith("req-up-"), row
    assert str(row["vendor_response_id"]).startswith("chatcmpl-up-"), row
    assert json.loads(row["tags"]).items() >= PROJECT_TAGS.items(), row["tags"]

    local = rows[local_id]
    assert (local["alias"], local["provider"], local["upstream_model"]) == (
        "local",
        "mock",
        "mock-1",
    )

    assert query(gateway, "SELECT COUNT(*) FROM usage_events WHERE status = 401") == [(0,)]
    assert query(gateway, "SELECT COUNT(*) FROM usage_events WHERE project IS NULL") == [(0,)]


def test_usage_rows_of_streamed_requests(
    gateway, streamed_chat_with_usage, streamed_chat_without_usage
):
    with_usage_id, chunks, sent = streamed_chat_with_usage
    without_usage_id, _, sent_without = streamed_chat_without_usage
    rows = usage_rows(gateway, [with_usage_id, without_usage_id])

    row = rows[with_usage_id]
    assert row["streamed"] == 1
    assert row["ttft_ms"] is not None
    assert row["status"] == 200
    assert row["client_aborted"] == 0
    assert row["alias"] == "chat"
    assert row["output_tokens"] == chunks[-1].usage.completion_tokens
    assert row["input_tokens"] == mock_prompt_tokens(sent)

    # The client did not ask for usage, but the gateway did, so the stream is still billed.
    row = rows[without_usage_id]
    assert row["streamed"] == 1
    assert row["ttft_ms"] is not None
    assert row["output_tokens"] == MOCK_COMPLETION_TOKENS
    assert row["input_tokens"] == mock_prompt_tokens(sent_without)



def test_log_never_holds_keys_or_prompts(gateway, client):
    """The access log names the request, never what was in it or who holds which key."""
    prompt = f"confidential-prompt-{uuid.uuid4()}"
    request_id, _reply, _sent = plain(client, "chat", prompt)
    wrong_key = f"sk-wrong-{uuid.uuid4()}"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.base_url, api_key=wrong_key, max_retries=0).models.list()

    deadline = time.monotonic() + USAGE_WAIT_SECS
    while request_id not in gateway.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = gateway.log.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("request_id") == request_id]
    assert len(access) == 1, f"expected one access line for {request_id}"
    assert access[0]["target"] == "access"
    assert access[0]["project"] == "e2e" and access[0]["status"] == 200
    assert access[0]["input_tokens"] > 0 and access[0]["output_tokens"] == MOCK_COMPLETION_TOKENS
    for secret in (prompt, CLIENT_KEY, UPSTREAM_KEY, wrong_key):
        assert secret not in log, "a key or a prompt reached the log"
