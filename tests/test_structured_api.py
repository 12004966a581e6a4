"""Structured output through the API: ``response_format`` (json_object, json_schema), ``regex`` and ``grammar`` in chat
and completions, streamed and not, in every exact mode: valid against the schema, the same text as constrained AR,
and a 400 naming the problem for what cannot be done."""

from __future__ import annotations

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


def test_json_schema_chat_is_valid_and_constrained_ars_in_every_exact_mode(client):
    ar = chat(client, "ar", response_format=FORMAT).choices[0]
    assert ar.finish_reason == "stop"
    jsonschema.validate(json.loads(ar.message.content), PERSON)
    for mode in ("spec", "auto"):
        assert chat(client, mode, response_format=FORMAT).choices[0].message.content == ar.message.content
    streamed = chat(client, "auto", response_format=FORMAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ar.message.content


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
        ({"response_format": {"type": "json_object"}, "mode": "diffusion"}, "diffusion does not decode under a gram"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ],
)
def test_what_cannot_be_constrained_is_a_400_naming_it(server, body, message):
    r = httpx.post(server + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 8, **body}, timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert httpx.get(server + "/health", timeout=10).status_code == 200  # and the server goes on
