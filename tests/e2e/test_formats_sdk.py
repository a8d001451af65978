"""Protocol adaptation as the official SDKs see it.

The Anthropic SDK talks to the gateway's `/v1/messages` and is served by an OpenAI-format
vendor; the OpenAI SDK is served by Anthropic- and Gemini-format vendors. Every vendor is the
mock upstream, whose answers are deterministic ("tok0 tok1 tok2 tok3 tok4 ", 5 output tokens;
a request offering tools gets a call to the first tool with `{"location": "Paris"}`).
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
import urllib.request

import anthropic
import openai
import pytest
from conftest import CLIENT_KEY

MOCK_TEXT = "tok0 tok1 tok2 tok3 tok4 "
WAIT_SECS = 10.0

WEATHER_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
WEATHER_ANTHROPIC = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": WEATHER_OPENAI["function"]["parameters"],
}
# A 1x1 PNG, as clients send screenshots.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
    )
).decode()


@pytest.fixture(scope="module")
def claude(gateway):
    with anthropic.Anthropic(
        base_url=gateway.base_url.removesuffix("/v1"), api_key=CLIENT_KEY, max_retries=0
    ) as sdk:
        yield sdk


def mock_stats(gateway) -> dict:
    url = gateway.upstream.base_url.removesuffix("/v1") + "/mock/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def usage_row(gateway, request_id: str) -> dict:
    deadline = time.monotonic() + WAIT_SECS
    while True:
        with sqlite3.connect(gateway.db_path) as db:
            db.row_factory = sqlite3.Row
            row = db.execute(
                "SELECT * FROM usage_events WHERE request_id = ?", (request_id,)
            ).fetchone()
        if row is not None:
            return dict(row)
        assert time.monotonic() < deadline, f"no usage row for {request_id}"
        time.sleep(0.1)


# ---------------------------------------------------------------- Anthropic SDK -> any vendor


def test_anthropic_sdk_plain_served_by_openai_vendor(gateway, claude):
    raw = claude.messages.with_raw_response.create(
        model="chat",
        max_tokens=64,
        system="be brief",
        messages=[{"role": "user", "content": "hello"}],
    )
    message = raw.parse()
    assert message.content[0].type == "text"
    assert message.content[0].text == MOCK_TEXT
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 5
    row = usage_row(gateway, raw.headers["x-request-id"])
    assert row["alias"] == "chat" and row["provider"] == "upstream"
    assert row["output_tokens"] == 5
    assert row["input_tokens"] == message.usage.input_tokens


def test_anthropic_sdk_stream_gets_the_vendors_final_usage(gateway, claude):
    with claude.messages.stream(
        model="chat", max_tokens=64, messages=[{"role": "user", "content": "hello there"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert text == MOCK_TEXT
    assert final.usage.output_tokens == 5
    row = usage_row(gateway, request_id)
    assert row["streamed"] == 1
    # The OpenAI vendor reports input tokens only at the end; the SDK's total must be that count.
    assert final.usage.input_tokens == row["input_tokens"]


def test_anthropic_sdk_tool_round_trip(claude):
    first = claude.messages.create(
        model="chat",
        max_tokens=64,
        tools=[WEATHER_ANTHROPIC],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    assert first.stop_reason == "tool_use"
    call = next(block for block in first.content if block.type == "tool_use")
    assert call.name == "get_weather"
    assert call.input == {"location": "Paris"}
    second = claude.messages.create(
        model="chat",
        max_tokens=64,
        tools=[WEATHER_ANTHROPIC],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ],
    )
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == MOCK_TEXT


def test_anthropic_sdk_streamed_tool_call(claude):
    with claude.messages.stream(
        model="chat",
        max_tokens=64,
        tools=[WEATHER_ANTHROPIC],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:
        final = stream.get_final_message()
    call = next(block for block in final.content if block.type == "tool_use")
    assert call.input == {"location": "Paris"}
    assert final.stop_reason == "tool_use"


def test_anthropic_sdk_errors(gateway, claude):
    with anthropic.Anthropic(
        base_url=gateway.base_url.removesuffix("/v1"), api_key="sk-wrong", max_retries=0
    ) as bad:
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(
                model="chat", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(
            model="nope", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )


# ---------------------------------------------------------------- OpenAI SDK -> other vendors


@pytest.mark.parametrize("alias", ["claude", "gem"])
def test_openai_sdk_plain_and_streamed(gateway, client, alias):
    raw = client.chat.completions.with_raw_response.create(
        model=alias, messages=[{"role": "user", "content": "hello"}]
    )
    reply = raw.parse()
    assert reply.choices[0].message.content == MOCK_TEXT
    assert reply.usage.completion_tokens == 5
    row = usage_row(gateway, raw.headers["x-request-id"])
    assert row["output_tokens"] == 5 and row["input_tokens"] == reply.usage.prompt_tokens

    chunks = list(
        client.chat.completions.create(
            model=alias,
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == MOCK_TEXT
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


@pytest.mark.parametrize("alias", ["claude", "gem"])
def test_openai_sdk_tool_round_trip(client, alias):
    question = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model=alias, messages=question, tools=[WEATHER_OPENAI])
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"location": "Paris"}
    second = client.chat.completions.create(
        model=alias,
        tools=[WEATHER_OPENAI],
        messages=question
        + [
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
    )
    assert second.choices[0].message.content == MOCK_TEXT


@pytest.mark.parametrize("alias", ["claude", "gem"])
def test_openai_sdk_streamed_tool_call(client, alias):
    chunks = list(
        client.chat.completions.create(
            model=alias,
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_OPENAI],
            stream=True,
        )
    )
    name = "".join(
        tc.function.name or ""
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for tc in c.choices[0].delta.tool_calls
        if tc.function
    )
    arguments = "".join(
        tc.function.arguments or ""
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for tc in c.choices[0].delta.tool_calls
        if tc.function
    )
    assert name == "get_weather"
    assert json.loads(arguments) == {"location": "Paris"}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]


@pytest.mark.parametrize("alias", ["claude", "gem"])
def test_openai_sdk_images_reach_the_vendor(gateway, client, alias):
    before = mock_stats(gateway)["images_seen"]
    reply = client.chat.completions.create(
        model=alias,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these pictures?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            }
        ],
    )
    assert reply.choices[0].message.content == MOCK_TEXT
    assert mock_stats(gateway)["images_seen"] == before + 2


def test_anthropic_sdk_image_served_by_openai_vendor(gateway, claude):
    before = mock_stats(gateway)["images_seen"]
    message = claude.messages.create(
        model="chat",
        max_tokens=64,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                    {"type": "text", "text": "Describe it."},
                ],
            }
        ],
    )
    assert message.content[0].text == MOCK_TEXT
    assert mock_stats(gateway)["images_seen"] == before + 1


@pytest.mark.parametrize("alias", ["chat", "gem"])
def test_openai_sdk_embeddings(gateway, client, alias):
    # The SDK asks for base64 and decodes it; the result must be plain floats either way.
    raw = client.embeddings.with_raw_response.create(model=alias, input=["hello", "world"])
    result = raw.parse()
    assert [item.index for item in result.data] == [0, 1]
    assert all(len(item.embedding) == 8 for item in result.data)
    assert all(isinstance(x, float) for x in result.data[0].embedding)
    row = usage_row(gateway, raw.headers["x-request-id"])
    assert row["alias"] == alias and row["status"] == 200
    assert row["usage_source"] in ("vendor", "estimate")


def test_anthropic_sdk_to_anthropic_vendor_natively(gateway, claude):
    raw = claude.messages.with_raw_response.create(
        model="claude", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    )
    message = raw.parse()
    assert message.id.startswith("msg_up_"), "the vendor's own answer, forwarded"
    assert message.content[0].text == MOCK_TEXT
    row = usage_row(gateway, raw.headers["x-request-id"])
    assert row["provider"] == "claude-upstream"
    assert row["output_tokens"] == message.usage.output_tokens == 5
    assert row["input_tokens"] == message.usage.input_tokens

    with claude.messages.stream(
        model="claude",
        max_tokens=64,
        tools=[WEATHER_ANTHROPIC],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:
        final = stream.get_final_message()
    call = next(block for block in final.content if block.type == "tool_use")
    assert call.input == {"location": "Paris"}


# ---------------------------------------------------------------- OpenAI endpoints forwarded


def test_openai_sdk_responses_api(gateway, client):
    raw = client.responses.with_raw_response.create(model="chat", input="hello")
    response = raw.parse()
    assert response.output_text == MOCK_TEXT
    row = usage_row(gateway, raw.headers["x-request-id"])
    assert row["output_tokens"] == response.usage.output_tokens == 5
    assert row["input_tokens"] == response.usage.input_tokens

    with client.responses.stream(model="chat", input="hello") as stream:
        text = "".join(
            event.delta for event in stream if event.type == "response.output_text.delta"
        )
        final = stream.get_final_response()
    assert text == MOCK_TEXT
    assert final.usage.output_tokens == 5


def test_openai_sdk_images_speech_and_transcription(gateway, client):
    image = client.images.generate(model="chat", prompt="a cat")
    assert base64.b64decode(image.data[0].b64_json).startswith(b"\x89PNG")

    speech = client.audio.speech.create(model="chat", voice="alloy", input="hello there")
    assert len(speech.content) == 1024

    transcript = client.audio.transcriptions.create(
        model="chat", file=("hello.wav", b"RIFF" + bytes(2000), "audio/wav")
    )
    assert transcript.text == MOCK_TEXT
