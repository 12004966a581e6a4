"""The HTTP server: OpenAI-compatible completions and chat completions over the model worker.

``mode: "auto"`` policy: a request that finds the server idle (no other request waiting or running)
decodes alone with ``auto`` (per cycle the exact plan the measured cost curve and the request's running
acceptance predict fastest: lowest latency for one stream); when requests compete it joins the continuous
batch, where it verifies its lookup and earlier-answer candidates whenever the batch's cost curve says they
pay, and otherwise takes AR steps (``serve.worker``, ``decode.batcher``).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tridlm.decode import CostCurve
from tridlm.grammar import Grammars
from tridlm.model import TriModel
from tridlm.serve.answer import Answer
from tridlm.serve.config import ServerConfig
from tridlm.serve.guard import Gate, compile_grammar, make_config, parse
from tridlm.serve.jobs import Job, QueueFull
from tridlm.serve.metrics import Finisher, Metrics
from tridlm.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    envelope,
    new_id,
    usage_of,
)
from tridlm.serve.streaming import sse
from tridlm.serve.tools import rendered_messages
from tridlm.serve.worker import Worker
from tridlm.tokenizer import TextStream, Tokenizer


class Server:
    """The endpoints' logic over the worker that owns the model."""

    def __init__(self, model: TriModel, tokenizer: Tokenizer, config: ServerConfig, costs: CostCurve | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config.validate()
        self.metrics = Metrics()
        self.grammars = Grammars(tokenizer, model.cfg.vocab_size, model.cfg.eos_ids)
        self.tagged_calls = tokenizer.renders_tool_calls  # tools in the template's own form (``serve.tools``)
        self.auto_block = config.defaults.replace(mode="auto").resolve(model).block_size
        if costs is not None:
            costs.upto(self.auto_block)  # covers the auto block, or says it does not
        rows = self.metrics.batch_rows
        self.worker = Worker(
            model,
            tokenizer,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            history=config.answer_history,
            auto_block=self.auto_block,
            costs=costs,
            slot_tokens=config.slot_tokens,
            on_batch=lambda jobs, s: rows.observe(sum(len(j.prompts) for j in jobs)),
        )
        # A prompt longer than this in characters has more tokens than the limit, whatever they are: refused
        # before it is tokenized.
        self.max_prompt_tokens = min(config.max_prompt_tokens or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.max_prompt_chars = self.max_prompt_tokens * tokenizer.longest_token_chars

    async def health(self):
        """ok (200) once the worker answers at full speed (kernels loaded, cost curve measured); loading or
        error (503) before that or after the worker stopped."""
        worker = self.worker
        if not worker.alive:
            body = {"status": "error", "error": worker.failed or "the model worker has stopped"}
        else:
            body = {"status": "ok" if worker.ready.is_set() else "loading", "queue_depth": worker.load}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    async def completions(self, request: Request):
        body = await parse(request, CompletionRequest, self.config)
        prompts = []
        for prompt in body.prompts:
            if isinstance(prompt, str):
                prompts.append(await self.encode(prompt, "prompt", self.tokenizer.encode))
                continue
            self.check_prompt_length(len(prompt), "tokens")
            if any(not 0 <= t < self.model.cfg.vocab_size for t in prompt):
                raise APIError(400, "prompt token ids out of vocabulary range", "prompt")
            prompts.append(list(prompt))
        return await self.run(request, body, prompts, "text_completion", "/v1/completions")

    async def chat(self, request: Request):
        body = await parse(request, ChatRequest, self.config)
        messages, use = [m.model_dump(exclude_none=True) for m in body.messages], body.tool_use(self.tagged_calls)
        messages, tools = use.messages(messages) if use else (rendered_messages(messages), None)
        ids = await self.encode(messages, "messages", lambda m: self.tokenizer.encode_chat(m, tools))
        return await self.run(request, body, [ids], "chat.completion", "/v1/chat/completions", use)

    async def encode(self, text, field: str, encode) -> list[int]:
        """Token ids of a prompt or of chat messages, off the event loop (tokenizing a long text takes a while),
        after the length check that needs no tokenizing."""
        chars = len(text) if isinstance(text, str) else sum(len(m["content"]) for m in text)
        self.check_prompt_length(chars, "characters")
        try:
            ids = await asyncio.to_thread(encode, text)
        except ValueError as e:  # a chat template that refuses the messages
            raise APIError(400, str(e), field) from None
        self.check_prompt_length(len(ids), "tokens")
        return ids

    def check_prompt_length(self, size: int, unit: str) -> None:
        limit = self.max_prompt_chars if unit == "characters" else self.max_prompt_tokens
        if size > limit:
            raise APIError(
                400,
                f"prompt of {size} {unit} is too long: at most {self.max_prompt_tokens} tokens "
                f"({limit} {unit}) are accepted",
                "prompt",
                code="context_length_exceeded",
            )

    async def run(self, request: Request, body, prompts: list[list[int]], kind: str, endpoint: str, tools=None):
        """Decode a request's prompts (``tools``: a chat's ``ToolUse``, which forms its reply) and answer it."""
        mode = body.mode or self.config.default_mode
        if len(prompts) * body.n > self.config.max_batch:
            raise APIError(
                400, f"{len(prompts)} prompts x n={body.n} exceed this server's {self.config.max_batch} rows", "prompt"
            )
        if mode == "auto" and (body.block_size or 0) > self.auto_block:
            raise APIError(
                400,
                f"block_size={body.block_size}: auto plans with the cost curve this server measured "
                f"when it started, up to block {self.auto_block} (serve with --block-size for more)",
                "block_size",
            )
        grammar = await asyncio.to_thread(compile_grammar, body, self.grammars, tools)  # a large schema takes a while
        cfg = make_config(body, max(prompts, key=len), mode, self.model, self.config, len(prompts) * body.n, grammar)
        if body.tridlm_trace and not body.stream:
            raise APIError(400, "tridlm_trace needs stream: true", "tridlm_trace")
        echo = getattr(body, "echo", False)
        job = Job(
            [p for p in prompts for _ in range(body.n)],
            cfg,
            asyncio.get_running_loop(),
            stream=body.stream,
            trace=body.tridlm_trace,
            tenant=request.state.tenant,
            time_limit_s=self.config.time_limit_s,
            stream_interval_s=self.config.stream_interval_ms / 1000,
            score_prompts=echo and cfg.logprobs is not None,
        )
        answer = Answer(kind, self.tokenizer, job, echo, tools)
        try:
            self.worker.submit(job)
        except QueueFull:
            self.metrics.requests.labels(endpoint, mode, "429").inc()
            raise APIError(
                429, f"server busy: {self.config.max_queue} requests queued; retry later", kind="rate_limit_error"
            ) from None
        rid = new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
        finish = Finisher(self.metrics, endpoint, mode, job)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = sse(self.config.served_model_name, self.tokenizer, job, answer, rid, include_usage, finish)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            rows = await collect(job, request)
        except APIError as e:
            finish(None, str(e.status))
            raise
        finally:
            job.cancelled.set()  # no-op when finished; frees the rows if the client went away
        finish(rows)
        texts = await asyncio.to_thread(
            lambda: [answer.whole(i, cut(self.tokenizer, r.tokens, cfg.stop), r) for i, r in enumerate(rows)]
        )
        choices = [answer.choice(i, text, r, lp) for i, ((text, lp), r) in enumerate(zip(texts, rows))]
        return envelope(kind, rid, self.config.served_model_name, choices, usage_of(rows, mode))


def serve(model: TriModel, tokenizer: Tokenizer, config: ServerConfig, costs: CostCurve | None = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM): HTTP on a thread of its own, the model's worker on this one,
    the thread that loaded the model (``tridlm.serve.worker`` says why that matters)."""
    import uvicorn

    app = create_app(model, tokenizer, config, costs, worker_thread=False)
    http = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info"))

    def run_http():
        try:
            http.run()
        finally:  # the server stopped, or could not start (a port in use): the worker ends too
            app.state.worker.stop()

    thread = threading.Thread(target=run_http, name="tridlm-http", daemon=True)
    # uvicorn installs its signal handlers on the main thread only: SIGTERM ends the worker as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    thread.start()
    try:
        app.state.worker.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        http.should_exit = True
        thread.join(timeout=30)


def create_app(
    model: TriModel,
    tokenizer: Tokenizer,
    config: ServerConfig = ServerConfig(),
    costs: CostCurve | None = None,
    worker_thread: bool = True,
) -> FastAPI:
    """The app over one model. ``costs``: the cost curve ``auto`` plans with, covering the server's auto block
    (default: measured before it serves). ``worker_thread``: the app starts the model's worker on a thread of its
    own; otherwise the caller runs ``app.state.worker.run()`` (``serve``)."""
    server = Server(model, tokenizer, config, costs)

    @asynccontextmanager
    async def lifespan(app):
        if worker_thread:
            server.worker.start()
        yield
        server.worker.stop()

    app = FastAPI(title="tridlm", lifespan=lifespan)
    app.state.worker = server.worker
    app.add_middleware(Gate, config=config)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # never a stack trace or a dead server
        return JSONResponse(
            APIError(500, f"internal error: {type(e).__name__}", kind="server_error").body(), status_code=500
        )

    page = (resources.files("tridlm.serve") / "static" / "playground.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def playground():  # the browser playground: a self-contained page over the streaming API
        return HTMLResponse(page)

    @app.get("/metrics")
    async def prometheus():
        server.metrics.queue.set(server.worker.load)
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": config.served_model_name, "object": "model", "created": 0, "owned_by": "tridlm"}],
        }

    app.get("/health")(server.health)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat)
    return app


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
