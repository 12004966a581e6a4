"""Static batches: requests that do not join the continuous batch (the other modes, traced or seeded requests of
several choices, auto on an idle server) decode together to the end, one batch at a time, a cycle per call between the
continuous batch's steps, so that neither waits for the other to end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tridlm.decode import CostCurve, DecodeState, stream
from tridlm.model import TriModel
from tridlm.serve.jobs import Job
from tridlm.serve.tenants import Tenants
from tridlm.tokenizer import Tokenizer


@dataclass
class StaticRun:
    """A static batch being decoded: the jobs taken, those not cancelled before it began, its cycles."""

    batch: list[Job]
    live: list[Job]
    cycles: Iterator[None]
    start: float


class StaticBatches:
    """The static batch being decoded (``run``), a cycle per ``cycle``."""

    def __init__(self, model: TriModel, tokenizer: Tokenizer, tenants: Tenants):
        self.model, self.tokenizer, self.tenants = model, tokenizer, tenants
        self.costs: CostCurve | None = None  # what auto plans with (the worker measures it before serving)
        self.run: StaticRun | None = None

    def begin(self, batch: list[Job]) -> bool:
        """Start decoding ``batch`` (its first cycle runs in ``cycle``); False where every job was cancelled before it
        began (those get no event)."""
        live = [j for j in batch if not j.cancelled.is_set()]
        if live:
            self.run = StaticRun(batch, live, self._decode(live), time.perf_counter())
        return bool(live)

    def cycle(self) -> tuple[StaticRun, list[tuple[Job, tuple]]] | None:
        """One cycle of the running batch; at its end the run and each job's last event (an error ends every job of
        the batch, and the server keeps serving)."""
        run = self.run
        try:
            next(run.cycles)
            return None
        except StopIteration as done:
            ends = done.value
        except Exception as e:
            ends = [(job, ("error", f"generation failed: {e}")) for job in run.live]
        self.run = None
        return run, ends

    @torch.inference_mode()  # each resumption of the generator runs in inference mode
    def _decode(self, jobs: list[Job]) -> Iterator[None]:
        """Decode the jobs as one batch, streaming their tokens, a cycle per ``next``; returns (as ``StopIteration``'s
        value) each job's final event."""
        owner = [(j, k) for j in jobs for k in range(len(j.prompts))]  # batch row -> (job, choice)
        prompts = [p for j in jobs for p in j.prompts]
        limits = [(j.cfg.max_tokens, j.cfg.stop) for j, _ in owner]
        state = DecodeState(
            len(prompts), jobs[0].cfg, self.model.cfg.eos_ids, self.tokenizer.decode, limits, trace=jobs[0].trace
        )
        tenants = {j.tenant for j in jobs}
        # A batch of one tenant reads and joins its history in ``stream``; a mixed one (never auto or pipelined
        # spec, by ``Job.batch_key``) reads none, and each answer joins its own tenant's below.
        history = self.tenants.history(tenants.pop()) if len(tenants) == 1 else None
        started = time.perf_counter()
        for chunk in stream(self.model, prompts, jobs[0].cfg, state=state, history=history, costs=self.costs):
            for row, events in state.take_trace() if state.trace else ():
                job, choice = owner[row]
                job.send("trace", choice, events)
            for row, tokens in chunk:
                job, choice = owner[row]
                if job.stream:
                    job.send_tokens(choice, tokens, state.rows[row])
            now = time.perf_counter()
            for row, (job, _) in enumerate(owner):
                if job.cancelled.is_set():
                    state.cancel(row)
                elif job.time_limit_s is not None and now - started > job.time_limit_s:
                    state.cancel(row, "time_limit")
            yield
        if history is None:
            for row, (job, _) in zip(state.rows, owner):
                self.tenants.add(job.tenant, row.tokens)
        return [(job, ("done", [state.rows[r] for r, (j, _) in enumerate(owner) if j is job])) for job in jobs]
