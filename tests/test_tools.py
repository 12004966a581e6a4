"""Tool calls (``serve.tools``): the reply's schema for each ``tool_choice``, the reply parsed into OpenAI's shape, and
a conversation with earlier calls and their results rendered for the chat template."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("fastapi")
from tridlm.serve.protocol import APIError, ChatRequest  # noqa: E402
from tridlm.serve.tools import ToolUse, rendered_messages  # noqa: E402

ADD = {"name": "add", "description": "Add two numbers.", "parameters": {"type": "object", "properties": {"a": {}}}}
SHOUT = {"name": "shout", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}


def use(choice="auto", parallel=True, tagged=False) -> ToolUse:
    return ToolUse([{"type": "function", "function": f} for f in (ADD, SHOUT)], choice, parallel, tagged)


def test_the_reply_schema_follows_tool_choice():
    kind, auto = use().constraint()
    assert kind == "json_schema" and [set(b["properties"]) for b in auto["anyOf"]] == [{"tool_calls"}, {"response"}]
    required = use("required", parallel=False).constraint()[1]
    calls = required["properties"]["tool_calls"]
    assert calls["maxItems"] == 1 and [c["properties"]["name"] for c in calls["items"]["anyOf"]] == [
        {"const": "add"},
        {"const": "shout"},
    ]
    named = use({"type": "function", "function": {"name": "shout"}}).constraint()[1]["properties"]["tool_calls"]
    assert named["maxItems"] == 1 and named["items"]["properties"]["name"]["const"] == "shout"
    assert named["items"]["properties"]["arguments"] == SHOUT["parameters"]
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
    rendered, tools = use().messages(messages)
    assert tools is None  # in the system message
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


def test_a_template_that_renders_tools_gets_them_and_earlier_calls_in_its_tags(chat_tokenizer):
    from helpers import HERMES_TEMPLATE

    hermes = dataclasses.replace(chat_tokenizer, chat_template=HERMES_TEMPLATE)
    assert hermes.renders_tool_calls and not chat_tokenizer.renders_tool_calls
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    messages = [
        {"role": "user", "content": "2 + 2 < 5?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    tagged = use(tagged=True)
    rendered, tools = tagged.messages(messages)
    text = hermes.render_chat(rendered, tools=tools)
    assert json.dumps({"type": "function", "function": ADD}) in text  # the tools as the template writes them
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>' in text  # unescaped, in its tags
    assert "<tool_response>\n4\n</tool_response>" in text and "You can call" not in text
    assert tagged.constraint()[0] == "lark"


def test_calls_are_read_from_a_reply_as_it_grows():
    text = '{"tool_calls": [{"name": "add", "arguments": {"a": {"name": "x", "arguments": 1}}}, {"name": "shout", "ar'
    first, *rest = use().calls(text)
    assert (first.name, first.arguments, first.complete) == ("add", '{"a": {"name": "x", "arguments": 1}}', True)
    assert rest == []  # the second call's name is not written yet; a call inside arguments is not a call
    grown = use().calls(text + 'guments": {"text": "a}\\"b')[1]
    assert (grown.name, grown.arguments, grown.complete) == ("shout", '{"text": "a}\\"b', False)
    assert use().calls('{"response": "{\\"name\\": ...') is None
    tagged = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "add", "argu'
    assert [(c.name, c.arguments) for c in use(tagged=True).calls(tagged)] == [("add", '{"a": 1}')]
    message, reason = use(tagged=True).reply(tagged.split("\n<tool_call>\n{")[0], finished=True)
    assert reason == "tool_calls" and message["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 1}'}
    assert use(tagged=True).reply("It is 4.", finished=True) == ({"content": "It is 4.", "tool_calls": None}, None)


def test_an_answer_is_read_as_it_grows():
    ours, tagged = use(), use(tagged=True)
    grown = [
        '{"resp',
        '{"response": "It is \\',
        '{"response": "It is \\"4\\u00',
        '{"response": "It is \\"4\\u00b0\\"."}',
    ]
    assert [ours.answer(t) for t in grown] == [None, "It is ", 'It is "4', 'It is "4\u00b0".']
    assert ours.answer('{"tool_calls": [') is None and ours.reply(grown[2], finished=False)[0]["content"] == 'It is "4'
    assert [tagged.answer(t) for t in ("", "<tool", "<tool_call>\n{", "It")] == [None, None, None, "It"]
