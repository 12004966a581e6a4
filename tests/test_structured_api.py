"""Structured output through the API: ``response_format`` (json_object, json_schema), ``regex`` and ``grammar`` in chat
and completions, streamed and not: valid against the schema in every mode, the same text as constrained AR in the exact
ones, and a 400 naming the problem for what cannot be done."""

from __future__ import annotations

import dataclasses
import json
import re

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("uvicorn")
from helpers import running  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.slow]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"enum": ["English", "French", "German"]}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON: name, age and the languages they speak."}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def server(default_model):
    model, tokenizer = default_model
    with running(model, tokenizer, max_batch=8) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, mode, messages=ASK, **args):
    body = {"model": "tiny", "messages": messages, "max_tokens": 80, "extra_body": {"mode": mode}}
    return client.chat.completions.create(**body, **args)


def test_json_schema_chat_is_valid_in_every_mode_and_constrained_ars_in_the_exact_ones(client):
    ar = chat(client, "ar", response_format=FORMAT).choices[0]
    assert ar.finish_reason == "stop"
    jsonschema.validate(json.loads(ar.message.content), PERSON)
    for mode in ("spec", "auto"):
        assert chat(client, mode, response_format=FORMAT).choices[0].message.content == ar.message.content
    streamed = chat(client, "auto", response_format=FORMAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ar.message.content
    diffusion = chat(client, "diffusion", response_format=FORMAT).choices[0]  # not AR's text, but valid
    assert diffusion.finish_reason == "stop"
    jsonschema.validate(json.loads(diffusion.message.content), PERSON)


def test_json_object_chat_is_one_json_object(client):
    ask = [{"role": "user", "content": "Give me a JSON person with a name, an age and a city."}]
    greedy = chat(client, "spec", ask, response_format={"type": "json_object"}).choices[0]
    assert greedy.finish_reason == "stop" and isinstance(json.loads(greedy.message.content), dict)
    sampled = chat(client, "auto", ask, response_format={"type": "json_object"}, n=4, temperature=0.7, seed=3).choices
    for c in sampled:  # those that end before max_tokens; one cut short is an unfinished object
        assert c.finish_reason == "length" or isinstance(json.loads(c.message.content), dict)
    assert any(c.finish_reason == "stop" for c in sampled)


def test_regex_and_lark_grammar_in_completions(client):
    prompt = "Q: Is Paris the capital of France?\nA:"
    for body, pattern in (
        ({"regex": r" (yes|no)\. [A-Z][a-z ]{3,40}\."}, r" (yes|no)\. [A-Z][a-z ]{3,40}\."),
        ({"grammar": 'start: " " ANSWER "."\nANSWER: "yes" | "no"'}, r" (yes|no)\."),
    ):
        for mode in ("ar", "auto"):
            text = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=40, extra_body={"mode": mode, **body}
            ).choices[0]
            assert text.finish_reason == "stop" and re.fullmatch(pattern, text.text), text.text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs json_schema.schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}},
            "invalid json_schema",
        ),
        ({"regex": "[a-"}, "unclosed character class"),
        ({"regex": "a", "grammar": "start: x"}, "at most one of response_format, regex and grammar"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ],
)
def test_what_cannot_be_constrained_is_a_400_naming_it(server, body, message):
    r = httpx.post(server + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 8, **body}, timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert httpx.get(server + "/health", timeout=10).status_code == 200  # and the server goes on


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


def test_required_tool_calls_parse_and_their_arguments_are_valid_in_every_exact_mode(client):
    replies = {
        mode: chat(client, mode, WEATHER_ASK, tools=[WEATHER, TIME], tool_choice="required").choices[0]
        for mode in ("ar", "spec", "auto")
    }
    ar = replies["ar"]
    assert ar.finish_reason == "tool_calls" and ar.message.content is None and calls(ar.message)
    for name, arguments in calls(ar.message):
        schema = {"get_weather": WEATHER, "get_time": TIME}[name]["function"]["parameters"]
        jsonschema.validate(arguments, schema)
    assert all(c.id.startswith("call_") and c.type == "function" for c in ar.message.tool_calls)
    assert calls(replies["spec"].message) == calls(replies["auto"].message) == calls(ar.message)
    stream = chat(client, "auto", WEATHER_ASK, tools=[WEATHER, TIME], tool_choice="required", stream=True)
    assert streamed_calls(stream) == [(c.function.name, c.function.arguments) for c in ar.message.tool_calls]


def streamed_calls(stream) -> list[tuple[str, str]]:
    """A stream's tool calls as an OpenAI client joins them: by index, the first delta with the id and name, then the
    arguments' pieces; checked to come as they are written (more deltas than calls) and to end the stream."""
    deltas = [c.choices[0] for c in stream if c.choices]
    pieces = [c for d in deltas for c in d.delta.tool_calls or ()]
    calls = {}
    for piece in pieces:
        if piece.id:
            assert piece.index not in calls and piece.function.name and piece.type == "function"
            calls[piece.index] = [piece.function.name, piece.function.arguments or ""]
        else:
            assert piece.function.name is None
            calls[piece.index][1] += piece.function.arguments
    assert deltas[-1].finish_reason == "tool_calls" and len(pieces) > len(calls)
    return [tuple(calls[k]) for k in sorted(calls)]


def test_a_named_function_or_one_call_is_what_the_request_gets(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = chat(client, "auto", WEATHER_ASK, tools=[WEATHER, TIME], tool_choice=named).choices[0]
    assert reply.finish_reason == "tool_calls" and [name for name, _ in calls(reply.message)] == ["get_time"]
    one = chat(client, "ar", WEATHER_ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1


def test_auto_answers_or_calls_and_a_tool_result_is_read_back(client):
    reply = chat(client, "auto", WEATHER_ASK, tools=[WEATHER]).choices[0]
    assert (reply.finish_reason == "tool_calls") == bool(reply.message.tool_calls)
    assert reply.message.tool_calls or isinstance(reply.message.content, str)
    streamed = [c.choices[0].delta for c in chat(client, "auto", WEATHER_ASK, tools=[WEATHER], stream=True)]
    if reply.message.content is not None:  # our form's answer: the response string's text, streamed as it is written
        assert "".join(d.content or "" for d in streamed) == reply.message.content
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        *WEATHER_ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees celsius and sunny"},
    ]
    answer = chat(client, "spec", history, tools=[WEATHER], tool_choice="none").choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content and not answer.message.tool_calls


def test_what_tools_cannot_do_is_a_400(server):
    named = {"type": "function", "function": {"name": "nope"}}
    for body, message in (
        ({"tools": [WEATHER], "tool_choice": named}, "names function 'nope'"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools and a structured output"),
        ({"tools": [WEATHER, WEATHER]}, "tool function names must be distinct"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "parameters must be a JSON schema of type object",
        ),
        ({"messages": [{"role": "assistant", "content": None}]}, "a message needs content"),
    ):
        r = httpx.post(server + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 8, **body}, timeout=60)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_a_template_that_renders_tools_is_answered_in_its_own_tags(default_model):
    """A template in the Hermes form (``helpers.HERMES_TEMPLATE``) gets the tools and writes calls in its tags: the
    calls parse and are valid, the same in every exact mode and streamed; under ``auto`` the model may answer."""
    from helpers import HERMES_TEMPLATE

    model, tokenizer = default_model
    with running(model, dataclasses.replace(tokenizer, chat_template=HERMES_TEMPLATE), max_batch=8) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        replies = [chat(client, mode, WEATHER_ASK, tools=[WEATHER], tool_choice="required") for mode in ("ar", "auto")]
        ar = replies[0].choices[0]
        assert ar.finish_reason == "tool_calls" and calls(ar.message) == calls(replies[1].choices[0].message)
        for name, arguments in calls(ar.message):
            jsonschema.validate(arguments, WEATHER["function"]["parameters"])
        stream = chat(client, "auto", WEATHER_ASK, tools=[WEATHER], tool_choice="required", stream=True)
        assert streamed_calls(stream) == [(c.function.name, c.function.arguments) for c in ar.message.tool_calls]
        answer = chat(client, "auto", WEATHER_ASK, tools=[WEATHER]).choices[0]  # this model answers in words here
        assert answer.finish_reason == "stop" and answer.message.content and not answer.message.tool_calls
        streamed = [c.choices[0].delta for c in chat(client, "auto", WEATHER_ASK, tools=[WEATHER], stream=True)]
        pieces = [d.content for d in streamed if d.content]
        assert "".join(pieces) == answer.message.content and len(pieces) > 1  # as it is written
        assert not any(d.tool_calls for d in streamed)
