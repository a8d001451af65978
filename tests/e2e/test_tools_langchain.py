"""LangChain (`langchain-openai`, pinned in requirements.txt) pointed at the gateway, as its docs
say: `ChatOpenAI(base_url=<gateway>/v1, api_key=..., model=<alias>, streaming=True)`, with a
weather tool bound. Every alias is served by a different vendor format: `chat` (OpenAI,
forwarded), `claude` (Anthropic, translated) and `gem` (Gemini, translated).

The mock answers "tok0 tok1 tok2 tok3 tok4 " (5 output tokens) and, when tools are offered and
the last message is not a tool result, calls the first tool with {"location": "Paris"}.
"""

from __future__ import annotations

import os

import pytest
from conftest import CLIENT_KEY
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from tools_conftest import MOCK_TEXT

ALIASES = ["chat", "claude", "gem"]

# LangSmith tracing is off unless asked for; make sure no shell setting turns it on, since
# nothing but the gateway is reachable.
for _name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
    os.environ.pop(_name, None)


@tool
def get_weather(location: str) -> str:
    """Weather in a city."""
    return f"sunny in {location}"


def chat_model(gateway, alias: str) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=gateway.base_url,
        api_key=CLIENT_KEY,
        model=alias,
        streaming=True,
        # Usage comes in the stream's last chunk (the gateway always gets it from the vendor).
        stream_usage=True,
        # No retries: a retried request would hide the first answer.
        max_retries=0,
        timeout=30,
    )


@pytest.mark.parametrize("alias", ALIASES)
def test_langchain_streamed_answer(gateway, alias):
    chunks = list(chat_model(gateway, alias).stream("Say hello"))
    assert len(chunks) > 1, chunks
    assert "".join(chunk.content for chunk in chunks) == MOCK_TEXT
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert merged.usage_metadata is not None, merged
    assert merged.usage_metadata["output_tokens"] == 5, merged.usage_metadata
    assert merged.usage_metadata["input_tokens"] >= 1, merged.usage_metadata
    assert merged.response_metadata.get("finish_reason") == "stop", merged.response_metadata


@pytest.mark.parametrize("alias", ALIASES)
def test_langchain_tool_call_round_trip(gateway, alias):
    model = chat_model(gateway, alias).bind_tools([get_weather])
    question = HumanMessage("What is the weather in Paris?")

    call = model.invoke([question])
    assert isinstance(call, AIMessage)
    assert call.response_metadata.get("finish_reason") == "tool_calls", call
    assert len(call.tool_calls) == 1, call
    tool_call = call.tool_calls[0]
    assert tool_call["name"] == "get_weather"
    assert tool_call["args"] == {"location": "Paris"}
    assert tool_call["id"], tool_call
    assert not call.invalid_tool_calls, call.invalid_tool_calls

    result = get_weather.invoke(tool_call)
    assert isinstance(result, ToolMessage)
    assert result.tool_call_id == tool_call["id"]
    assert result.content == "sunny in Paris"

    final = model.invoke([question, call, result])
    assert final.content == MOCK_TEXT, final
    assert not final.tool_calls, final
    assert final.response_metadata.get("finish_reason") == "stop", final
    assert final.usage_metadata is not None and final.usage_metadata["output_tokens"] == 5
