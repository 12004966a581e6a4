"""Tool calls in OpenAI's shape, in the chat template's own form where it has one, else in a form of ours.

Each call is ``{"name": ..., "arguments": {...}}`` (compact JSON), in one of two forms, by the chat template:

- **tagged**, where the template renders ``tools`` itself and writes calls in ``<tool_call>`` tags (the Hermes form:
  Qwen 2.5 and 3, Nemotron and others): the template gets the tools and the conversation as Hugging Face templates
  take them (earlier calls with their arguments as objects, results as ``tool`` messages); the reply is one or more
  ``<tool_call>\\n{call}\\n</tool_call>``, or under ``tool_choice`` ``auto`` text that does not start with a tag.
- **ours**, for any other template: the tools and the reply's form go in the system message; the reply is one JSON
  object, ``{"tool_calls": [call, ...]}`` to call tools or ``{"response": "..."}`` (under ``auto``) to answer.
  Earlier calls are rendered in the same form and results as messages of role ``tool``.

The reply is constrained to its form (``tridlm.grammar``): to calls alone where ``tool_choice`` is ``required`` or
names a function, to one call where it names one or ``parallel_tool_calls`` is false, and each call's arguments to its
function's ``parameters`` schema; so every call parses and its arguments are valid. ``calls`` and ``answer`` read the
calls or the answer from the reply's text as it grows (a stream sends each call's name, then its arguments, or the
answer's text, as they come); each call's ``arguments`` are the JSON text the model wrote. With ``tool_choice``
``none`` the tools are not offered.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from tridlm.grammar import JSON_OPTIONS

CALLS, RESPONSE = "tool_calls", "response"
TAG, END_TAG = "<tool_call>", "</tool_call>"
_CALL = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')


@dataclass
class Call:
    """A call read from a reply so far: its name, its arguments' text so far, whether they are complete."""

    name: str
    arguments: str
    complete: bool


class ToolUse:
    """A request's tools and how it lets the model use them."""

    def __init__(self, tools: list[dict], choice, parallel: bool, tagged: bool = False):
        """``tagged``: the chat template renders the tools and writes calls in tags (``renders_tool_calls``)."""
        self.tools = {t["function"]["name"]: t["function"] for t in tools}
        self.choice, self.parallel, self.tagged = choice, parallel, tagged
        named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if named is not None and named not in self.tools:
            raise ValueError(f"tool_choice names function {named!r}, which is not among the tools")
        self.callable = [named] if named else list(self.tools)
        self.single = named is not None or not parallel  # one call: a named function is called once, as OpenAI does

    @classmethod
    def of(cls, body, tagged: bool = False) -> ToolUse | None:
        """None where no tools are offered or ``tool_choice`` is ``none``."""
        if not body.tools or body.tool_choice == "none":
            return None
        tools = [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools]
        choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
        return cls(tools, choice or "auto", body.parallel_tool_calls, tagged)

    def call_schema(self) -> dict:
        """The JSON schema of one call."""
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    "arguments": {"type": "object", **(self.tools[name].get("parameters") or {})},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name in self.callable
        ]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    def constraint(self) -> tuple[str, object]:
        """The reply's grammar: (kind, source) for ``Grammars.compile``."""
        if self.tagged:
            call = json.dumps({**self.call_schema(), "x-guidance": JSON_OPTIONS})
            rules = [
                f'call: "{TAG}\\n" %json {call} "\\n{END_TAG}"',
                "calls: call" + ("" if self.single else ' ("\\n" call)*'),
            ]
            start = "start: calls | text\ntext: /(?s:[^<].*)/" if self.choice == "auto" else "start: calls"
            return "lark", "\n".join([start, *rules]) + "\n"
        calls = {
            "type": "array",
            "items": self.call_schema(),
            "minItems": 1,
            **({"maxItems": 1} if self.single else {}),
        }
        calling = _only({CALLS: calls})
        return "json_schema", {
            "anyOf": [calling, _only({RESPONSE: {"type": "string"}})]
        } if self.choice == "auto" else calling

    def instructions(self) -> str:
        """What the system message tells the model about the tools and the reply's form (ours)."""
        catalogue = "\n".join(
            json.dumps({"name": name, "description": f.get("description", ""), "parameters": f.get("parameters", {})})
            for name, f in self.tools.items()
            if name in self.callable
        )
        how = '{"tool_calls": [{"name": "<function>", "arguments": {<arguments>}}]}'
        if self.choice == "auto":
            how += ' to call tools, or {"response": "<your answer>"} to answer directly'
        return f"You can call these tools:\n{catalogue}\nReply with one JSON object: {how}."

    def messages(self, messages: list[dict]) -> tuple[list[dict], list[dict] | None]:
        """The conversation as the chat template takes it, and the tools for the template to render (None where the
        tools' instructions went into the system message: a new one first where it has none)."""
        if self.tagged:
            offered = [{"type": "function", "function": self.tools[name]} for name in self.callable]
            return template_messages(messages), offered
        rendered = rendered_messages(messages)
        if rendered and rendered[0]["role"] == "system":
            system = {"role": "system", "content": rendered[0]["content"] + "\n\n" + self.instructions()}
            return [system, *rendered[1:]], None
        return [{"role": "system", "content": self.instructions()}, *rendered], None

    def calls(self, text: str) -> list[Call] | None:
        """The calls in a reply so far, the last one maybe unfinished; None where it does not call tools (or cannot
        be known yet to)."""
        if not text.startswith(TAG if self.tagged else '{"' + CALLS):
            return None
        out, at = [], 0
        while (found := _CALL.search(text, at)) is not None:  # from the end of the last call: not inside arguments
            start, end = found.end(), _json_end(text, found.end())
            out.append(Call(json.loads(f'"{found.group(1)}"'), text[start : end or len(text)], end is not None))
            if end is None:
                break
            at = end
        return out

    def answer(self, text: str) -> str | None:
        """The answer in a reply so far (under ``tool_choice`` auto), as far as it is written; None where the reply
        calls tools or cannot be known yet not to."""
        if self.tagged:
            return None if text.startswith(TAG) or TAG.startswith(text) else text
        opening = '{"' + RESPONSE + '": "'
        return _string_so_far(text[len(opening) :]) if text.startswith(opening) else None

    def reply(self, text: str, finished: bool) -> tuple[dict, str | None]:
        """The assistant message (``content`` and ``tool_calls``) of a reply, and the finish reason it implies
        (``tool_calls``; None: the row's own). A reply cut short (max_tokens, a stop string) is its answer so far as
        content, or its text where it was a call."""
        calls = self.calls(text) if finished else None
        if calls and all(c.complete for c in calls):
            return {"content": None, "tool_calls": [wire(c, new_id()) for c in calls]}, "tool_calls"
        answer = self.answer(text)
        return {"content": text if answer is None else answer, "tool_calls": None}, None


def _only(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _string_so_far(body: str) -> str:
    """The text of a JSON string whose body (after its opening quote) is written up to here: up to its closing quote,
    or to its last whole character (an escape cut short, or half of a surrogate pair, waits for the rest)."""
    k = 0
    while k < len(body) and body[k] != '"':
        size = (6 if body[k + 1 : k + 2] == "u" else 2) if body[k] == "\\" else 1
        if k + size > len(body):
            break
        k += size
    text = json.loads(f'"{body[:k]}"')
    return text[:-1] if text and "\ud800" <= text[-1] <= "\udbff" else text


def _json_end(text: str, start: int) -> int | None:
    """Where the JSON object or array starting at ``start`` ends (None: not yet)."""
    depth, quoted, escaped = 0, False, False
    for k in range(start, len(text)):
        c = text[k]
        if quoted:
            escaped, quoted = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            quoted = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return k + 1
    return None


def new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def wire(call: Call, call_id: str) -> dict:
    """A call in OpenAI's shape."""
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def rendered_messages(messages: list[dict]) -> list[dict]:
    """Messages as a chat template without tools takes them (string ``role`` and ``content``): an assistant's earlier
    tool calls as the JSON it wrote, a tool's result as the content of a ``tool`` message."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c)} for c in m["tool_calls"]]
            out.append({"role": m["role"], "content": json.dumps({CALLS: calls})})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
        out[-1].update({"name": m["name"]} if "name" in m else {})
    return out


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as a template that renders tools takes them (Hugging Face's convention): content always a string,
    an earlier call's arguments as an object."""
    out = []
    for m in messages:
        m = {**m, "content": m.get("content") or ""}
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {"name": c["function"]["name"], "arguments": _arguments(c)}} for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def _arguments(call: dict):
    try:
        return json.loads(call["function"]["arguments"])
    except json.JSONDecodeError:
        return call["function"]["arguments"]  # as the client sent it
