"""Tool calls in OpenAI's shape, over any chat template.

The tools a request offers are described to the model in the system message, with the reply's form: one JSON object,
``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` to call tools or ``{"response": "..."}`` to answer. The reply
is constrained to that form (``tridlm.grammar``): to the calls alone where ``tool_choice`` is ``required`` or names a
function, to one call where it names one or ``parallel_tool_calls`` is false, and each call's arguments to its
function's ``parameters`` schema; so every call parses and its arguments are valid. The reply is then parsed into
``tool_calls`` (``finish_reason`` ``tool_calls``) or into the message's content. Earlier calls in the conversation are
rendered in the same form, and ``tool`` messages (the results) as messages of role ``tool``, which ChatML templates
show as they are. With ``tool_choice`` ``none`` the tools are not offered and the reply is free text.
"""

from __future__ import annotations

import json
import uuid

CALLS, RESPONSE = "tool_calls", "response"


class ToolUse:
    """A request's tools and how it lets the model use them."""

    def __init__(self, tools: list[dict], choice, parallel: bool):
        self.tools = {t["function"]["name"]: t["function"] for t in tools}
        self.choice, self.parallel = choice, parallel
        named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if named is not None and named not in self.tools:
            raise ValueError(f"tool_choice names function {named!r}, which is not among the tools")
        self.callable = [named] if named else list(self.tools)
        self.single = named is not None or not parallel  # one call: a named function is called once, as OpenAI does

    @classmethod
    def of(cls, body) -> ToolUse | None:
        """None where no tools are offered or ``tool_choice`` is ``none``."""
        if not body.tools or body.tool_choice == "none":
            return None
        tools = [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools]
        choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
        return cls(tools, choice or "auto", body.parallel_tool_calls)

    def schema(self) -> dict:
        """The JSON schema of the reply."""
        call = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": self.tools[name].get("parameters") or {}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name in self.callable
        ]
        calls = {"type": "array", "items": {"anyOf": call}, "minItems": 1, **({"maxItems": 1} if self.single else {})}
        calling = {"type": "object", "properties": {CALLS: calls}, "required": [CALLS], "additionalProperties": False}
        if self.choice != "auto":
            return calling
        answer = {
            "type": "object",
            "properties": {RESPONSE: {"type": "string"}},
            "required": [RESPONSE],
            "additionalProperties": False,
        }
        return {"anyOf": [calling, answer]}

    def instructions(self) -> str:
        """What the system message tells the model about the tools and the reply's form."""
        catalogue = "\n".join(
            json.dumps({"name": name, "description": f.get("description", ""), "parameters": f.get("parameters", {})})
            for name, f in self.tools.items()
            if name in self.callable
        )
        how = '{"tool_calls": [{"name": "<function>", "arguments": {<arguments>}}]}'
        if self.choice == "auto":
            how += ' to call tools, or {"response": "<your answer>"} to answer directly'
        return f"You can call these tools:\n{catalogue}\nReply with one JSON object: {how}."

    def messages(self, messages: list[dict]) -> list[dict]:
        """The conversation with the tools' instructions in its system message (a new one first where it has none)."""
        rendered = rendered_messages(messages)
        if rendered and rendered[0]["role"] == "system":
            return [{"role": "system", "content": rendered[0]["content"] + "\n\n" + self.instructions()}, *rendered[1:]]
        return [{"role": "system", "content": self.instructions()}, *rendered]

    def reply(self, text: str, finished: bool) -> tuple[dict, str | None]:
        """The assistant message (``content`` and ``tool_calls``) of a reply, and the finish reason it implies
        (``tool_calls``; None: the row's own). A reply cut short (max_tokens, a stop string) is its text as content."""
        try:
            parsed = json.loads(text) if finished else None  # the grammar made a finished reply the schema's form
        except json.JSONDecodeError:
            parsed = None
        if parsed is None:
            return {"content": text, "tool_calls": None}, None
        if RESPONSE in parsed:
            return {"content": parsed[RESPONSE], "tool_calls": None}, None
        calls = [
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
            }
            for c in parsed[CALLS]
        ]
        return {"content": None, "tool_calls": calls}, "tool_calls"


def rendered_messages(messages: list[dict]) -> list[dict]:
    """Messages as a chat template takes them (string ``role`` and ``content``): an assistant's earlier tool calls as
    the JSON it wrote, a tool's result as the content of a ``tool`` message."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c)} for c in m["tool_calls"]]
            out.append({"role": m["role"], "content": json.dumps({CALLS: calls})})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
        out[-1].update({"name": m["name"]} if "name" in m else {})
    return out


def _arguments(call: dict):
    try:
        return json.loads(call["function"]["arguments"])
    except json.JSONDecodeError:
        return call["function"]["arguments"]  # as the client sent it
