"""The model owner: one thread that runs every generation, batching compatible requests.

Requests wait in a bounded queue. When the model is free, the worker takes the oldest job and every
waiting job with the same decoding settings (mode, block size, threshold, sampling, tracing), up to ``max_batch``
rows, and decodes them as one batch: prefill, AR decode steps, diffusion denoising steps and spec
draft/verify cycles all run batched across requests. Jobs with a seed run alone so their samples
do not depend on their neighbours. Committed tokens go back to each request's asyncio queue as they
are produced; a cancelled job's rows stop at the next cycle.

**One thread runs the model.** The worker runs on the thread that loaded the model (``run``: what ``tridlm
serve`` does) or on a thread of its own (``start``: for embedding the app). The CPU kernels and torch's ops split
work over an OpenMP team per calling thread, and libgomp stops spin-waiting (its workers sleep between the
hundreds of small parallel regions of a decode step) once the threads of all teams outnumber the cores: a model
loaded on one thread and decoded on another ran at 0.43x on 2 cores. ``bench/serve_single.py`` measures it.

``ready`` is set once the worker can answer at full speed: the kernels loaded (one forward run) and the cost
curve ``auto`` plans with measured; ``failed`` holds why the worker stopped, if it did.

Every answer joins its tenant's ``AnswerHistory`` (one per API key; none when ``history`` is 0), which that
tenant's later ``auto`` and pipelined-spec requests draft from: one tenant's answers never reach another's
drafts, trace or counts. Those modes share one plan across a batch, so their batches hold one tenant only;
the other modes decode each row as if alone and batch across tenants.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import torch

from tridlm.decode import AnswerHistory, CostCurve, DecodeState, GenerationConfig, generate, stream
from tridlm.model import TriModel
from tridlm.tokenizer import Tokenizer


class QueueFull(Exception):
    pass


@dataclass
class Job:
    prompts: list[list[int]]  # one per choice (n)
    cfg: GenerationConfig
    loop: asyncio.AbstractEventLoop
    stream: bool = True  # send the tokens of each cycle (otherwise only the end: no wake-up per token)
    trace: bool = False  # send each step's events (``DecodeState.note``) beside the tokens
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    tenant: int = 0  # whose answer history it reads and joins
    time_limit_s: float | None = None  # decoding time after which the rows end ("time_limit")

    def batch_key(self):
        c = self.cfg
        alone = id(self) if c.seed is not None else None
        return (
            c.mode,
            c.spec_variant,
            c.lookup,
            c.block_size,
            c.threshold,
            c.max_steps_per_block,
            c.temperature,
            c.top_k,
            c.top_p,
            alone,
            self.trace,
            self.tenant if c.pipelined else None,
        )

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    def __init__(
        self,
        model: TriModel,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        history: int = 0,
        auto_block: int = 1,
        costs: CostCurve | None = None,
        on_batch=None,
    ):
        """``history``: tokens of earlier answers kept per tenant (0: none); ``auto_block``: the largest block
        auto is served with; ``costs``: the cost curve auto plans with, up to that block (default: measured on
        the worker's thread before the first request)."""
        self.model, self.tokenizer = model, tokenizer
        self.history_capacity, self.histories = history, {}
        self.max_batch, self.max_queue, self.auto_block, self.costs = max_batch, max_queue, auto_block, costs
        self.on_batch = on_batch  # callback(jobs, seconds) for metrics
        self._waiting: list[Job] = []
        self._running = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.failed: str | None = None

    @property
    def load(self) -> int:
        """Jobs waiting or running."""
        with self._cond:
            return len(self._waiting) + self._running

    def start(self) -> None:
        """Run the worker on a thread of its own (see the module's docstring for what that costs on a CPU)."""
        self._thread = threading.Thread(target=self.run, name="tridlm-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        """Whether requests will be served: the worker has not stopped or failed."""
        return self.failed is None and not self._stop

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) + self._running >= self.max_queue:
                raise QueueFull
            self._waiting.append(job)
            self._cond.notify()

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._waiting and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            key = self._waiting[0].batch_key()
            batch, rows = [], 0
            for job in list(self._waiting):
                if job.batch_key() == key and (not batch or rows + len(job.prompts) <= self.max_batch):
                    batch.append(job)
                    rows += len(job.prompts)
                    self._waiting.remove(job)
            self._running = len(batch)
            return batch

    def run(self) -> None:
        """Decode requests on this thread until ``stop``."""
        try:
            self._warm()
            self._serve()
        except BaseException as e:  # the worker is gone: /health says so
            self.failed = f"{type(e).__name__}: {e}"
            raise

    @torch.inference_mode()
    def _warm(self) -> None:
        """Load the kernels (one forward) and measure auto's cost curve, before ``ready``."""
        generate(self.model, [[self.model.cfg.bos_id or 0]], GenerationConfig(max_tokens=1))
        self.costs = self.costs or CostCurve.measure(self.model, self.auto_block)
        self.ready.set()

    def _serve(self) -> None:
        while (batch := self._take_batch()) is not None:
            live = [j for j in batch if not j.cancelled.is_set()]
            start = time.perf_counter()
            try:
                ends = self._decode(live) if live else []
            except Exception as e:  # report to the requests, keep serving
                ends = [(job, ("error", f"generation failed: {e}")) for job in live]
            with self._cond:
                self._running = 0
            for job, event in ends:  # once the model is free: a client's next request finds it idle
                job.send(*event)
            if self.on_batch and live:
                self.on_batch(live, time.perf_counter() - start)

    @torch.inference_mode()
    def _decode(self, jobs: list[Job]) -> list[tuple[Job, tuple]]:
        """Decode the jobs as one batch, streaming their tokens; returns each job's final event."""
        owner = [(j, k) for j in jobs for k in range(len(j.prompts))]  # batch row -> (job, choice)
        prompts = [p for j in jobs for p in j.prompts]
        limits = [(j.cfg.max_tokens, j.cfg.stop) for j, _ in owner]
        state = DecodeState(
            len(prompts), jobs[0].cfg, self.model.cfg.eos_ids, self.tokenizer.decode, limits, trace=jobs[0].trace
        )
        tenants = {j.tenant for j in jobs}
        # A batch of one tenant reads and joins its history in ``stream``; a mixed one (never auto or pipelined
        # spec, by ``batch_key``) reads none, and each answer joins its own tenant's below.
        history = self.history(tenants.pop()) if len(tenants) == 1 else None
        started = time.perf_counter()
        for chunk in stream(self.model, prompts, jobs[0].cfg, state=state, history=history, costs=self.costs):
            for row, events in state.take_trace() if state.trace else ():
                job, choice = owner[row]
                job.send("trace", choice, events)
            for row, tokens in chunk:
                job, choice = owner[row]
                if job.stream:
                    job.send("tokens", choice, tokens)
            now = time.perf_counter()
            for row, (job, _) in enumerate(owner):
                if job.cancelled.is_set():
                    state.cancel(row)
                elif job.time_limit_s is not None and now - started > job.time_limit_s:
                    state.cancel(row, "time_limit")
        if history is None and self.history_capacity:
            for row, (job, _) in zip(state.rows, owner):
                self.history(job.tenant).add(row.tokens)
        return [(job, ("done", [state.rows[r] for r, (j, _) in enumerate(owner) if j is job])) for job in jobs]

    def history(self, tenant: int) -> AnswerHistory | None:
        """The tenant's answer history (made on its first answer), None when the server keeps none."""
        if not self.history_capacity:
            return None
        if tenant not in self.histories:
            self.histories[tenant] = AnswerHistory(self.history_capacity)
        return self.histories[tenant]
