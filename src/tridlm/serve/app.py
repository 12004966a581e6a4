"""The HTTP server: OpenAI-compatible completions and chat completions over the model worker.

``mode: "auto"`` policy: a request that finds the server idle (no other request waiting or running)
decodes with self-speculation (lowest latency for one stream); when requests compete it decodes with
AR, which the worker batches across them (best throughput).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from tridlm.decode import GenerationConfig
from tridlm.device import default_block_size
from tridlm.model import TriModel
from tridlm.serve.protocol import APIError, ChatRequest, CompletionRequest, envelope, new_id, usage
from tridlm.serve.worker import Job, QueueFull, Worker
from tridlm.tokenizer import TextStream, Tokenizer


@dataclass
class ServerConfig:
    model_name: str = "tridlm"
    api_key: str | None = None
    max_queue: int = 64
    max_batch: int = 16
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    default_mode: str = "ar"  # a mode or "auto"
    block_size: int | None = None  # for requests that name none; None: per device and mode
    defaults: GenerationConfig = GenerationConfig()  # the other knobs' defaults


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tridlm_requests", "Requests by endpoint, mode and status", ["endpoint", "mode", "status"], registry=r)
        self.tokens = Counter("tridlm_completion_tokens", "Generated tokens", ["mode"], registry=r)
        self.nfe = Counter("tridlm_nfe", "Model forwards after prefill", ["mode"], registry=r)
        self.tpf = Gauge("tridlm_tpf", "Tokens per forward, cumulative", ["mode"], registry=r)
        self.queue = Gauge("tridlm_queue_depth", "Requests waiting or running", registry=r)
        self.latency = Histogram("tridlm_request_seconds", "Request latency", ["mode"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("tridlm_ttft_seconds", "Time to first token", ["mode"], registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_rows = Histogram("tridlm_batch_rows", "Rows per decoded batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self._counts: dict[str, list[int]] = {}

    def finished(self, mode: str, tokens: int, nfe: int) -> None:
        self.tokens.labels(mode).inc(tokens)
        self.nfe.labels(mode).inc(nfe)
        total = self._counts.setdefault(mode, [0, 0])
        total[0] += tokens
        total[1] += nfe
        self.tpf.labels(mode).set(total[0] / total[1] if total[1] else 0.0)


def create_app(model: TriModel, tokenizer: Tokenizer, config: ServerConfig = ServerConfig()) -> FastAPI:
    metrics = Metrics()
    worker = Worker(model, tokenizer, max_batch=config.max_batch, max_queue=config.max_queue,
                    on_batch=lambda jobs, s: metrics.batch_rows.observe(sum(len(j.prompts) for j in jobs)))

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="tridlm", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # never a stack trace or a dead server
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", kind="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue_depth": worker.load}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue.set(worker.load)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, config)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "tridlm"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest, config)
        if isinstance(body.prompt, str):
            ids = tokenizer.encode(body.prompt)
        else:
            if any(not 0 <= t < model.cfg.vocab_size for t in body.prompt):
                raise APIError(400, "prompt token ids out of vocabulary range", "prompt")
            ids = list(body.prompt)
        return await run(request, body, ids, "text_completion", "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request, ChatRequest, config)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        try:
            ids = tokenizer.encode_chat([m.model_dump(exclude_none=True) for m in body.messages])
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        return await run(request, body, ids, "chat.completion", "/v1/chat/completions")

    async def run(request: Request, body, ids: list[int], kind: str, endpoint: str):
        mode = body.mode or config.default_mode
        if mode == "auto":
            mode = "spec" if worker.load == 0 else "ar"
        cfg = make_config(body, ids, mode, model, config)
        job = Job([ids] * body.n, cfg, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull:
            metrics.requests.labels(endpoint, mode, "429").inc()
            raise APIError(429, f"server busy: {config.max_queue} requests queued; retry later",
                           kind="rate_limit_error") from None
        rid = new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
        finish = Finisher(metrics, endpoint, mode, job)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(job, body, ids, kind, rid, config.model_name, include_usage, finish),
                                     media_type="text/event-stream")
        try:
            results = await collect(job, request)
        except APIError as e:
            finish(None, str(e.status))
            raise
        finally:
            job.cancelled.set()  # no-op when finished; frees the rows if the client went away
        finish(results)
        choices = [choice(kind, i, cut(tokenizer, r.tokens, cfg.stop), reason(r)) for i, r in enumerate(results)]
        return envelope(kind, rid, config.model_name, choices, usage_of(len(ids), results, mode))

    async def sse(job: Job, body, ids, kind, rid, name, include_usage, finish) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
        texts = [TextStream(tokenizer, job.cfg.stop) for _ in job.prompts]
        try:
            if kind == "chat.completion":
                for i in range(len(job.prompts)):
                    yield event(envelope(chunk_kind, rid, name, [{"index": i, "delta": {"role": "assistant"},
                                                                   "finish_reason": None}]))
            while True:
                item = await job.events.get()
                if item[0] == "tokens":
                    delta = texts[item[1]].push(item[2])
                    if delta:
                        yield event(envelope(chunk_kind, rid, name, [delta_choice(kind, item[1], delta, None)]))
                elif item[0] == "done":
                    results = item[1]
                    for i, r in enumerate(results):
                        tail = texts[i].push([], final=True)
                        yield event(envelope(chunk_kind, rid, name, [delta_choice(kind, i, tail, reason(r))]))
                    if include_usage:
                        yield event(envelope(chunk_kind, rid, name, [], usage_of(len(ids), results, job.cfg.mode)))
                    finish(results)
                    break
                else:
                    yield event(APIError(500, item[1], kind="server_error").body())
                    finish(None, "500")
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()
            finish(None, "499")  # the client went away mid-stream (no-op after a normal end)

    return app


class Finisher:
    """Records a request's metrics once, whichever way it ends."""

    def __init__(self, metrics: Metrics, endpoint: str, mode: str, job: Job):
        self.metrics, self.endpoint, self.mode, self.job = metrics, endpoint, mode, job
        self.done = False

    def __call__(self, results, status: str = "200") -> None:
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.requests.labels(self.endpoint, self.mode, status).inc()
        m.latency.labels(self.mode).observe(time.perf_counter() - self.job.submitted)
        if results:
            m.finished(self.mode, sum(len(r.tokens) for r in results), max(r.nfe for r in results))


def check_key(request: Request, config: ServerConfig) -> None:
    if config.api_key and request.headers.get("authorization") != f"Bearer {config.api_key}":
        raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", kind="authentication_error",
                       code="invalid_api_key")


async def parse(request: Request, schema, config: ServerConfig):
    check_key(request, config)
    raw = await request.body()
    if len(raw) > config.max_body_bytes:
        raise APIError(413, f"request body of {len(raw)} bytes exceeds the limit of {config.max_body_bytes}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        body = schema.model_validate(data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"invalid field '{param}': {err['msg']}", param) from None
    if body.model not in (None, config.model_name):
        raise APIError(404, f"model '{body.model}' does not exist; this server serves '{config.model_name}'",
                       "model", code="model_not_found")
    if (field := body.unsupported()) is not None:
        raise APIError(400, f"'{field}' is not supported by this server", field)
    return body


def make_config(body, ids: list[int], mode: str, model: TriModel, config: ServerConfig) -> GenerationConfig:
    if not ids:
        raise APIError(400, "the prompt is empty", "prompt")
    context = model.cfg.max_seq_len
    block = body.block_size if body.block_size is not None else config.block_size
    if block is None:
        block = default_block_size(model.device, mode, body.spec_variant or config.defaults.spec_variant)
    room = context - len(ids) - block - 1
    if room < 1:
        raise APIError(400, f"prompt of {len(ids)} tokens is too long for the context of {context}", "prompt",
                       code="context_length_exceeded")
    max_tokens = body.max_tokens if body.max_tokens is not None else min(config.default_max_tokens, room)
    if max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} exceeds the {room} tokens left in the context after the "
                            f"{len(ids)}-token prompt", "max_tokens", code="context_length_exceeded")
    try:
        return body.generation_config(config.defaults.replace(block_size=block), mode, max_tokens)
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def collect(job: Job, request: Request):
    """Wait for a job's results, giving up (and freeing its rows) if the client disconnects."""
    while True:
        try:
            item = await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise APIError(499, "client disconnected") from None
            continue
        if item[0] == "done":
            return item[1]
        if item[0] == "error":
            raise APIError(500, item[1], kind="server_error")


def cut(tokenizer: Tokenizer, tokens: list[int], stop: tuple[str, ...]) -> str:
    stream = TextStream(tokenizer, stop)
    return stream.push(tokens, final=True)


def reason(r) -> str:
    return "length" if r.finish_reason == "length" else "stop"


def choice(kind: str, i: int, text: str, finish: str) -> dict:
    if kind == "chat.completion":
        return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"index": i, "text": text, "finish_reason": finish, "logprobs": None}


def delta_choice(kind: str, i: int, text: str, finish: str | None) -> dict:
    if kind == "chat.completion":
        return {"index": i, "delta": {"content": text} if text else {}, "finish_reason": finish}
    return {"index": i, "text": text, "finish_reason": finish, "logprobs": None}


def usage_of(prompt_tokens: int, results, mode: str) -> dict:
    """Usage of all choices; nfe is the forwards the request took (choices decode side by side)."""
    tokens, row_nfe = sum(len(r.tokens) for r in results), sum(r.nfe for r in results)
    return usage(prompt_tokens * len(results), tokens, max(r.nfe for r in results),
                 tokens / row_nfe if row_nfe else float(tokens), mode)


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
