"""OpenAI-compatible request bodies (plus our decoding knobs) and response shapes."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tridlm.decode import MODES, SPEC_VARIANTS, GenerationConfig, Row, summarize
from tridlm.decode.config import MAX_TOP_LOGPROBS
from tridlm.grammar import Grammar
from tridlm.serve.tools import ToolUse

MAX_STOPS, MAX_STOP_CHARS = 4, 256  # OpenAI's own limits
MAX_COMPLETION_LOGPROBS = 5  # and those of log-probabilities: completions' logprobs (chat's top_logprobs: 20)


class APIError(Exception):
    """An error the client caused or must hear about, shaped like OpenAI's."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None  # always enforced here: the output is constrained to the schema either way


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @field_validator("json_schema")
    @classmethod
    def _with_json_schema(cls, schema, info):
        if schema is not None and info.data.get("type") != "json_schema":
            raise ValueError("json_schema goes with type json_schema")
        return schema


class _Request(BaseModel):
    # strict: "0.5" is not a temperature; extra="forbid": a misspelt knob is an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what a torch.Generator takes
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted at their neutral values only (see ``unsupported``).
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # tridlm decoding knobs (SPEC 3.5)
    mode: Literal[MODES] | None = None
    block_size: int | None = None
    threshold: float | None = None
    max_steps_per_block: int | None = None
    spec_variant: Literal[SPEC_VARIANTS] | None = None
    lookup: bool | None = None  # prompt-lookup candidates (auto and pipelined spec; default on there)
    tridlm_trace: bool = False  # streaming only: per-step decoding events in each chunk's "tridlm_trace"
    # Structured output (``tridlm.grammar``): OpenAI's response_format, or (as vLLM and SGLang take them) a regular
    # expression or a Lark grammar the output must match; at most one.
    response_format: ResponseFormat | None = None
    regex: str | None = None
    grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return stop

    def unsupported(self) -> str | None:
        """The name of a standard field set to something this server does not do."""
        if self.frequency_penalty not in (None, 0, 0.0):
            return "frequency_penalty"
        if self.presence_penalty not in (None, 0, 0.0):
            return "presence_penalty"
        return None

    def alternatives(self) -> int | None:
        """How many most likely alternatives each token's log-probability comes with; None: no log-probabilities."""
        raise NotImplementedError

    def constraint(self) -> tuple[str, str, object] | None:
        """(the field, the grammar kind, its source) of the structured output asked for; None: free text."""
        asked = [f for f in ("response_format", "regex", "grammar") if getattr(self, f) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            asked.remove("response_format")
        if len(asked) > 1:
            raise APIError(400, f"at most one of response_format, regex and grammar, got {' and '.join(asked)}")
        if not asked:
            return None
        if asked[0] == "regex":
            return "regex", "regex", self.regex
        if asked[0] == "grammar":
            return "grammar", "lark", self.grammar
        form = self.response_format
        if form.type == "json_object":
            return "response_format", "json_object", None
        if form.json_schema is None or form.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", "response_format")
        return "response_format", "json_schema", form.json_schema.schema_

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def generation_config(
        self, defaults: GenerationConfig, mode: str, max_tokens: int, grammar: Grammar | None = None
    ) -> GenerationConfig:
        """Our config: the request's values over the server's defaults, validated once. ``mode`` is the one the
        request runs in, ``grammar`` the compiled ``constraint``."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        changes = {"mode": mode, "max_tokens": max_tokens, "stop": stop, "seed": self.seed, "grammar": grammar}
        changes["logprobs"] = self.alternatives()
        knobs = ("temperature", "top_p", "top_k", "block_size", "max_steps_per_block", "spec_variant", "lookup")
        for name in knobs:
            if getattr(self, name) is not None:
                changes[name] = getattr(self, name)
        if "threshold" in self.model_fields_set:
            changes["threshold"] = self.threshold
        return defaults.replace(**changes)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt, or several (a choice each, n per prompt)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)  # OpenAI's legacy shape: top alternatives
    echo: bool = False  # the prompt before the completion, in the text and (with logprobs) in the log-probabilities

    def alternatives(self) -> int | None:
        return self.logprobs

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) or not p else list(p)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | None = None  # None only in an assistant's message of tool calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result: the call it answers

    @model_validator(mode="after")
    def _has_content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("a message needs content (only an assistant's tool calls may go without)")
        return self


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; none: no arguments constrained
    strict: bool | None = None  # always enforced here: the arguments are constrained to the schema either way

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, parameters):
        if parameters is not None and parameters.get("type", "object") != "object":
            raise ValueError("a function's parameters must be a JSON schema of type object")
        return parameters


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name of max_tokens (it wins where both are given)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools):
        names = [t.function.name for t in tools or ()]
        if len(set(names)) < len(names):
            raise ValueError("tool function names must be distinct")
        return tools

    def tool_use(self, tagged: bool = False) -> ToolUse | None:
        """How the reply may call the tools (``serve.tools``; ``tagged``: in the chat template's tags); None: it is
        free text."""
        try:
            return ToolUse.of(self, tagged)
        except ValueError as e:
            raise APIError(400, str(e), "tool_choice") from None

    def constraint(self) -> tuple[str, str, object] | None:
        """``response_format``'s form, as completions'; none may be asked with tools to call (``ToolUse.constraint``
        forms the reply then)."""
        asked = super().constraint()
        if asked is not None and self.tool_use() is not None:
            raise APIError(400, "tools and a structured output (response_format, regex, grammar) together", "tools")
        return asked

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top, info):
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    def alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, nfe: int, tpf: float | None, mode: str) -> dict:
    """OpenAI usage plus our counts (SPEC 2): forwards after prefill, tokens per forward (null when no
    forward ran), mode used."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "nfe": nfe,
        "tpf": tpf,
        "mode": mode,
    }


def envelope(kind: str, rid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def ending(r) -> dict:
    """A finished row's ``finish_reason`` as OpenAI names it; a row the server's time limit ended is cut short
    like one that ran out of tokens ("length") and also says so: ``"tridlm_finish": "time_limit"``."""
    if r.finish_reason == "time_limit":
        return {"finish_reason": "length", "tridlm_finish": "time_limit"}
    return {"finish_reason": "length" if r.finish_reason == "length" else "stop"}


def choice(kind: str, i: int, text: str, end: dict, logprobs: dict | None = None, tool_calls=None) -> dict:
    """A response's choice; ``logprobs`` (``serve.answer``) where the request asked for them; ``tool_calls`` (chat)
    where the reply called tools (its ``text`` is then None)."""
    if kind == "chat.completion":
        message = {"role": "assistant", "content": text, **({"tool_calls": tool_calls} if tool_calls else {})}
        return {"index": i, "message": message, "logprobs": logprobs, **end}
    return {"index": i, "text": text, **end, "logprobs": logprobs}


def delta_choice(kind: str, i: int, text: str, end: dict | None = None, logprobs: dict | None = None) -> dict:
    """A stream chunk's choice; ``end`` (``ending``) on the last one."""
    end = end or {"finish_reason": None}
    if kind == "chat.completion":
        return {"index": i, "delta": {"content": text} if text else {}, "logprobs": logprobs, **end}
    return {"index": i, "text": text, **end, "logprobs": logprobs}


def usage_of(rows: list[Row], mode: str) -> dict:
    """Usage of all choices (``summarize``: NFE sums the choices' forwards, TPF = tokens / NFE); every choice counts
    its prompt."""
    counts = summarize(rows)
    prompt_tokens = sum(len(r.prompt) for r in rows)
    return usage(prompt_tokens, counts["completion_tokens"], counts["nfe"], counts["tpf"], mode)


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
