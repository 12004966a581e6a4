"""What a request must pass before the server does any work for it: the Host it names, its API key (which
also says its tenant), its content type, its body's size, read time, nesting and schema (``parse``), and
(``make_config``) the decoding work it asks for."""

from __future__ import annotations

import asyncio
import hmac
import json

import numpy as np
import pydantic
from fastapi import Request
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from tridlm.decode import GenerationConfig
from tridlm.grammar import Grammar, GrammarError, Grammars
from tridlm.model import TriModel
from tridlm.serve.config import ServerConfig, is_loopback
from tridlm.serve.protocol import APIError
from tridlm.serve.tools import ToolUse

OPEN_PATHS = ("/health", "/")  # liveness, and the playground's static page (it holds no data; it sends the key itself)


class Gate:
    """ASGI middleware in front of every route: when bound to loopback, the Host header must name this machine
    (a DNS-rebinding page names its own domain); when the server has keys, every route but ``OPEN_PATHS``
    needs one. The request's tenant (the index of its key; 0 for a server without keys) goes to
    ``request.state.tenant``."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        error = None
        if not host_allowed(headers.get("host"), self.config):
            error = APIError(
                400,
                f"Host header {headers.get('host')!r} is not this server's: bound to loopback, it "
                "answers requests addressed to localhost (start it with --allowed-hosts NAME to "
                "add names)",
                kind="invalid_request_error",
                code="invalid_host",
            )
        tenant = tenant_of(headers.get("authorization"), self.config.api_key)
        if error is None and tenant is None and scope["path"] not in OPEN_PATHS:
            error = APIError(
                401,
                "invalid or missing API key (Authorization: Bearer ...)",
                kind="authentication_error",
                code="invalid_api_key",
            )
        if error is not None:
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


def host_allowed(host: str | None, config: ServerConfig) -> bool:
    """Whether a request's Host header may reach this server: any, unless it is bound to loopback."""
    if not config.loopback or "*" in config.allowed_hosts:
        return True
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    return is_loopback(name) or name in config.allowed_hosts


def tenant_of(authorization: str | None, keys: tuple[str, ...]) -> int | None:
    """The index of the key a request presents (compared in constant time with every key), 0 when the server
    has none, None when it presents no valid key."""
    if not keys:
        return 0
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    found = None
    for i, key in enumerate(keys):  # every key compared, whichever matches: the time says nothing of which
        if hmac.compare_digest(given, key.encode()) and found is None:
            found = i
    return found


async def read_json(request: Request, config: ServerConfig) -> dict:
    """The request's JSON object, refused (4xx naming the problem) before it is parsed when its content type
    is not JSON, when it grows past ``max_body_bytes`` (counted while reading), arrives slower than
    ``read_timeout_s`` or nests deeper than ``max_json_depth``."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"Content-Type must be application/json, not {kind or 'missing'!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > config.max_body_bytes:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {config.max_body_bytes}")
    try:
        raw = await asyncio.wait_for(_body(request, config.max_body_bytes), config.read_timeout_s)
    except TimeoutError:
        raise APIError(408, f"request body not received within {config.read_timeout_s:g} s") from None
    brackets = raw.count(b"[") + raw.count(b"{")  # the depth is at most this: most bodies need no scan
    if brackets > config.max_json_depth and (depth := json_depth(raw)) > config.max_json_depth:
        raise APIError(400, f"request body nests {depth} levels deep; at most {config.max_json_depth} are accepted")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    return data


async def _body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings skipped), in linear time
    and without recursion: what ``json.loads`` would need to recurse."""
    text = np.frombuffer(raw, dtype=np.uint8)
    at = np.arange(len(text))
    # A quote is escaped when an odd number of backslashes precedes it.
    last_plain = np.maximum.accumulate(np.where(text != ord("\\"), at, -1))
    backslashes = at - 1 - np.concatenate(([-1], last_plain[:-1]))
    quotes = (text == ord('"')) & (backslashes % 2 == 0)
    outside = np.cumsum(quotes) % 2 == 0  # not inside a string (a closing quote counts as outside)
    opens, closes = np.isin(text, (ord("["), ord("{"))) & outside, np.isin(text, (ord("]"), ord("}"))) & outside
    steps = opens.astype(np.int32) - closes
    return int(np.cumsum(steps).max(initial=0))


def compile_grammar(body, grammars: Grammars, tools: ToolUse | None = None) -> Grammar | None:
    """The request's structured output (``constraint``), or with ``tools`` the reply's form, compiled; or a 400 naming
    what is wrong with it."""
    asked = body.constraint()
    if tools is not None:
        asked = ("tools", *tools.constraint())
    if asked is None:
        return None
    field, kind, source = asked
    try:
        return grammars.compile(kind, source)
    except GrammarError as e:
        raise APIError(400, str(e), field) from None


def make_config(
    body,
    ids: list[int],
    mode: str,
    model: TriModel,
    config: ServerConfig,
    rows: int | None = None,
    grammar: Grammar | None = None,
) -> GenerationConfig:
    """The request's decoding config over the server's defaults, resolved for the model, with max_tokens
    checked against the room the (longest) prompt leaves in the context; ``rows``: the request's choices over all its
    prompts (default ``n``); ``grammar``: its structured output (``compile_grammar``)."""
    if not ids:
        raise APIError(400, "the prompt is empty", "prompt")
    try:
        cfg = body.generation_config(config.defaults, mode, max_tokens=1, grammar=grammar).resolve(model)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    room = cfg.room(model, len(ids))
    if room < 1:
        raise APIError(
            400,
            f"prompt of {len(ids)} tokens is too long for the context of {model.cfg.max_seq_len}",
            "prompt",
            code="context_length_exceeded",
        )
    asked = body.requested_max_tokens
    max_tokens = asked if asked is not None else min(config.default_max_tokens, room)
    if max_tokens > room:
        raise APIError(
            400,
            f"max_tokens={max_tokens} exceeds the {room} tokens left in the context after the {len(ids)}-token prompt",
            "max_tokens",
            code="context_length_exceeded",
        )
    rows = body.n if rows is None else rows
    if rows * max_tokens > config.max_total_tokens:
        raise APIError(
            400,
            f"choices x max_tokens = {rows} x {max_tokens} exceeds this server's limit of "
            f"{config.max_total_tokens} tokens per request",
            "max_tokens",
        )
    if cfg.forward_tokens > config.max_forward_tokens:
        raise APIError(
            400,
            f"block_size={cfg.block_size} puts {cfg.forward_tokens} tokens through one forward "
            f"({cfg.row.label}); this server allows "
            f"{config.max_forward_tokens} (--max-forward-tokens)",
            "block_size",
        )
    try:
        return cfg.replace(max_tokens=max_tokens)
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def parse(request: Request, schema, config: ServerConfig):
    """The request body as ``schema``, after ``read_json``'s checks; 4xx naming the field otherwise."""
    data = await read_json(request, config)
    try:
        body = schema.model_validate(data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"invalid field '{param}': {err['msg']}", param) from None
    if body.model not in (None, config.served_model_name):
        raise APIError(
            404,
            f"model '{body.model}' does not exist; this server serves '{config.served_model_name}'",
            "model",
            code="model_not_found",
        )
    if (field := body.unsupported()) is not None:
        raise APIError(400, f"'{field}' is not supported by this server", field)
    return body
