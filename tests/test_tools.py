"""Tool calls (``serve.tools``): the reply's schema for each ``tool_choice``, the reply parsed into OpenAI's shape, and
a conversation with earlier calls and their results rendered for the chat template."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
from tridlm.serve.protocol import APIError, ChatRequest  # noqa: E402
from tridlm.serve.tools import ToolUse, rendered_messages  # noqa: E402

ADD = {"name": "add", "description": "Add two numbers.", "parameters": {"type": "object", "properties": {"a": {}}}}
SHOUT = {"name": "shout", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}


def use(choice="auto", parallel=True) -> ToolUse:
    return ToolUse([{"type": "function", "function": f} for f in (ADD, SHOUT)], choice, parallel)


def test_the_reply_schema_follows_tool_choice():
    auto = use().schema()
    assert [set(branch["properties"]) for branch in auto["anyOf"]] == [{"tool_calls"}, {"response"}]
    required = use("required", parallel=False).schema()
    calls = required["properties"]["tool_calls"]
    assert calls["maxItems"] == 1 and [c["properties"]["name"] for c in calls["items"]["anyOf"]] == [
        {"const": "add"},
        {"const": "shout"},
    ]
    named = use({"type": "function", "function": {"name": "shout"}}).schema()["properties"]["tool_calls"]
    assert named["maxItems"] == 1 and [c["properties"]["name"]["const"] for c in named["items"]["anyOf"]] == ["shout"]
    assert named["items"]["anyOf"][0]["properties"]["arguments"] == SHOUT["parameters"]
    with pytest.raises(ValueError, match="names function 'nope'"):
        use({"type": "function", "function": {"name": "nope"}})


def test_replies_parse_into_calls_or_content():
    message, reason = use().reply('{"tool_calls": [{"name": "add", "arguments": {"a": 1}}]}', finished=True)
    (call,) = message["tool_calls"]
    assert reason == "tool_calls" and message["content"] is None and call["id"].startswith("call_")
    assert call["function"] == {"name": "add", "arguments": '{"a": 1}'}
    assert use().reply('{"response": "Hi."}', finished=True) == ({"content": "Hi.", "tool_calls": None}, None)
    cut = '{"tool_calls": [{"name": "ad'
    assert use().reply(cut, finished=False) == ({"content": cut, "tool_calls": None}, None)


def test_a_conversation_with_calls_and_results_renders_for_the_template():
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    rendered = use().messages(messages)
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\n\nYou can call")
    assert (
        json.dumps({"name": "add", "description": ADD["description"], "parameters": ADD["parameters"]})
        in (rendered[0]["content"])
    )
    assert json.loads(rendered[2]["content"]) == {"tool_calls": [{"name": "add", "arguments": {"a": 2}}]}
    assert rendered[3] == {"role": "tool", "content": "4"}
    assert rendered_messages(messages[1:2]) == [{"role": "user", "content": "2 + 2?"}]


def test_tools_and_a_structured_output_together_are_refused():
    body = ChatRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": ADD}],
            "regex": "a+",
        }
    )
    with pytest.raises(APIError, match="tools and a structured output"):
        body.constraint()
    none = body.model_copy(update={"tool_choice": "none", "regex": None})
    assert none.tool_use() is None and none.constraint() is None
