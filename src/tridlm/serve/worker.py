"""The model owner: one thread that runs every generation, batching compatible requests.

Requests wait in a bounded queue. When the model is free, the worker takes the oldest job and every
waiting job with the same decoding settings (mode, block size, threshold, sampling, tracing), up to ``max_batch``
rows, and decodes them as one batch: prefill, AR decode steps, diffusion denoising steps and spec
draft/verify cycles all run batched across requests. Jobs with a seed run alone so their samples
do not depend on their neighbours. Committed tokens go back to each request's asyncio queue as they
are produced; a cancelled job's rows stop at the next cycle.

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

from tridlm.decode import AnswerHistory, CostCurve, DecodeState, GenerationConfig, stream
from tridlm.model import TriModel
from tridlm.tokenizer import Tokenizer


class QueueFull(Exception):
    pass


@dataclass
class Job:
    prompts: list[list[int]]  # one per choice (n)
    cfg: GenerationConfig
    loop: asyncio.AbstractEventLoop
    trace: bool = False  # send each step's events (``DecodeState.note``) beside the tokens
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    tenant: int = 0  # whose answer history it reads and joins

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
        self._thread = threading.Thread(target=self._run, name="tridlm-model", daemon=True)

    @property
    def load(self) -> int:
        """Jobs waiting or running."""
        with self._cond:
            return len(self._waiting) + self._running

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

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

    def _run(self) -> None:
        with torch.inference_mode():  # auto's cost curve, measured before the first request needs it
            self.costs = self.costs or CostCurve.measure(self.model, self.auto_block)
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
        for chunk in stream(self.model, prompts, jobs[0].cfg, state=state, history=history, costs=self.costs):
            for row, events in state.take_trace() if state.trace else ():
                job, choice = owner[row]
                job.send("trace", choice, events)
            for row, tokens in chunk:
                job, choice = owner[row]
                job.send("tokens", choice, tokens)
            for row, (job, _) in enumerate(owner):
                if job.cancelled.is_set():
                    state.cancel(row)
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
