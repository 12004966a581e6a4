"""The model owner: one thread that runs every generation, batching requests.

Requests wait in a bounded queue and are taken in order. **AR requests, and auto requests that find the server busy,
are batched continuously** (``decode.batcher``): each joins the running rows at the next step, its prompt prefilled
alone between two steps (a long one a chunk per step), and each row leaves as soon as it finishes, is cancelled or
runs out of time, so a short request never waits for a long one and rows of any length share one forward; an auto
row verifies its lookup and earlier-answer candidates in that forward where the batch's cost curve says they pay. An
auto request that finds the server idle decodes alone with every lever of ``auto`` (MASK-row drafts too: the lowest
latency for one stream). Seeded AR requests of several choices, traced ones and the other modes (diffusion, spec,
idle auto) run as a **static batch** (``serve.static``): the oldest job with every waiting job of the same decoding
settings, up to ``max_batch`` rows, decoded together to the end, a cycle at a time between the continuous batch's
steps, so that neither waits for the other to end. One static batch runs at a time; while it does, the requests that
can join the continuous batch do so past those waiting for the next static one. Jobs with a seed run alone so their
samples do not depend on their neighbours. Committed tokens go back to each request's asyncio queue as they are
produced; a cancelled job's rows stop at the next step.

**One thread runs the model.** The worker runs on the thread that loaded the model (``run``: what ``tridlm
serve`` does) or on a thread of its own (``start``: for embedding the app). The CPU kernels and torch's ops split
work over an OpenMP team per calling thread, and libgomp stops spin-waiting (its workers sleep between the
hundreds of small parallel regions of a decode step) once the threads of all teams outnumber the cores: a model
loaded on one thread and decoded on another ran at 0.43x on 2 cores. ``bench/serve_single.py`` measures it.

``ready`` is set once the worker can answer at full speed: the kernels loaded (one forward run) and the cost
curve ``auto`` plans with measured; ``failed`` holds why the worker stopped, if it did.

Every answer joins its tenant's ``AnswerHistory`` (``serve.tenants``: one per API key; none when ``history`` is 0),
which that tenant's later ``auto`` and pipelined-spec requests draft from, and the acceptance of its auto rows'
candidates in the continuous batch is kept per tenant too: one tenant's answers never reach another's drafts, trace
or counts. Static batches of those modes share one plan, so they hold one tenant only; the continuous batch plans
per row, and the other modes decode each row as if alone: both batch across tenants.
"""

from __future__ import annotations

import sys
import threading
import time

import torch

from tridlm.decode import CostCurve, DecodeState, GenerationConfig, generate
from tridlm.decode.batcher import Batcher
from tridlm.decode.score import score
from tridlm.model import TriModel
from tridlm.serve.jobs import Job, QueueFull
from tridlm.serve.static import StaticBatches
from tridlm.serve.tenants import Tenants
from tridlm.tokenizer import Tokenizer


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
        slot_tokens: int = 2048,
        on_batch=None,
    ):
        """``history``: tokens of earlier answers kept per tenant (0: none); ``auto_block``: the largest block
        auto is served with; ``costs``: the cost curve auto plans with, up to that block (default: measured on
        the worker's thread before the first request); ``slot_tokens``: KV cache per continuously batched row
        (prompt + answer; longer AR requests run as static batches)."""
        self.model, self.tokenizer, self.tenants = model, tokenizer, Tenants(history)
        self.max_batch, self.max_queue, self.auto_block, self.costs = max_batch, max_queue, auto_block, costs
        self.on_batch = on_batch  # callback(jobs, seconds) for metrics
        self._waiting: list[Job] = []
        self._running = 0  # jobs taken and not yet ended
        self.batcher = Batcher(model, max_batch, slot_tokens)
        self._live: dict[int, tuple[Job, DecodeState]] = {}  # the jobs whose rows run in the batcher
        self.static = StaticBatches(model, tokenizer, self.tenants)  # the static batch being decoded, a cycle per loop
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

    def continuous(self, job: Job, idle: bool = False) -> bool:
        """Whether a job's rows join the running batch: AR, or auto unless the server is ``idle``; untraced, each row
        fitting a slot, and unseeded or of one choice (a seeded request's choices draw from one generator, as a
        static batch does)."""
        c = job.cfg
        return (
            (c.mode == "ar" or (c.mode == "auto" and not idle))
            and not job.trace
            and (c.seed is None or len(job.prompts) == 1)
            and len(job.prompts) <= self.batcher.max_rows
            and all(self.batcher.fits(len(p), c.max_tokens) for p in job.prompts)
        )

    def _take(self) -> tuple[str, list[Job]] | None:
        """The next work, in arrival order: ("admit", [job]) to join the running rows, ("batch", jobs) for a
        static batch, ("step", []) when only the running rows go on; None once stopped."""
        with self._cond:
            while not self._waiting and not self._stop and not self.batcher.busy and self.static.run is None:
                self._cond.wait()
            if self._stop:
                return None
            if not self._waiting:
                return "step", []
            head = self._waiting[0]
            idle = not self.batcher.busy and not self._running and len(self._waiting) == 1
            if self.static.run is not None and not self.continuous(head, idle):  # the next static batch waits
                head = next((j for j in self._waiting if self.continuous(j, idle)), None)
                if head is None:
                    return "step", []
            if self.continuous(head, idle):
                if not self.batcher.can_admit(head.prompts):
                    return "step", []
                self._running += 1
                self._waiting.remove(head)
                return "admit", [head]
            key, batch, rows = head.batch_key(), [], 0
            for job in list(self._waiting):
                if (
                    job.batch_key() == key
                    and not self.continuous(job, idle)
                    and (not batch or rows + len(job.prompts) <= self.max_batch)
                ):
                    batch.append(job)
                    rows += len(job.prompts)
                    self._waiting.remove(job)
            self._running += len(batch)
            return "batch", batch

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
        """Load the kernels (one forward), allocate the continuous batch's cache and measure auto's cost curve,
        before ``ready``."""
        generate(self.model, [[self.model.cfg.bos_id or 0]], GenerationConfig(max_tokens=1))
        self.batcher.reserve()
        cache = self.batcher.cache
        size = 2 * cache.k.numel() * cache.k.element_size() / 2**20
        print(
            f"tridlm: continuous batching cache: {cache.batch} rows x {cache.max_len} tokens, {size:.0f} MiB "
            "(--max-batch, --slot-tokens)",
            file=sys.stderr,
        )
        if self.costs is None:
            self.costs, origin = CostCurve.kept(self.model, self.auto_block, rows=self.batcher.max_rows)
            print(f"tridlm: auto plans with {origin}", file=sys.stderr)
        self.batcher.costs = self.static.costs = self.costs
        self.ready.set()

    def _serve(self) -> None:
        while (work := self._take()) is not None:
            kind, jobs = work
            if kind == "batch":
                self._begin(jobs)
            elif kind == "admit":
                self._admit(jobs[0])
            if self.batcher.busy:
                self._step()
            if self.static.run is not None:
                self._cycle()

    def _end(self, ends: list[tuple[Job, tuple]], taken: int | None = None) -> None:
        """Send each ended job its last event, once the ``taken`` jobs (default: those) no longer count as
        running: a client's next request finds the server idle."""
        with self._cond:
            self._running -= len(ends) if taken is None else taken
        for job, event in ends:
            job.send(*event)

    def _scored(self, jobs: list[Job]) -> list[Job]:
        """Score the prompts of the jobs that echo them with log-probabilities (``Job.score_prompts``); returns the
        jobs that go on to decode (one whose scoring failed gets the error)."""
        out = []
        for job in jobs:
            try:
                if job.score_prompts:
                    unique = list(dict.fromkeys(tuple(p) for p in job.prompts))
                    scores = score(self.model, [(p[:1], p[1:]) for p in unique], top=job.cfg.logprobs or 0)
                    job.prompt_scores = [scores[unique.index(tuple(p))] for p in job.prompts]
                out.append(job)
            except Exception as e:
                self._end([(job, ("error", f"scoring the prompt failed: {e}"))])
        return out

    def _begin(self, batch: list[Job]) -> None:
        """Start decoding a static batch (its first cycle runs in ``_cycle``)."""
        batch = self._scored(batch)  # a job whose scoring failed has ended
        if batch and not self.static.begin(batch):
            self._end([], taken=len(batch))

    def _cycle(self) -> None:
        """One cycle of the static batch; at its end each job gets its last event."""
        done = self.static.cycle()
        if done is not None:
            run, ends = done
            self._end(ends, taken=len(run.batch))
            if self.on_batch:
                self.on_batch(run.live, time.perf_counter() - run.start)

    def _admit(self, job: Job) -> None:
        """Prefill the job's rows into the running batch; their first tokens go out at once."""
        if not self._scored([job]):
            return
        state = DecodeState(len(job.prompts), job.cfg, self.model.cfg.eos_ids, self.tokenizer.decode)
        generator = None if job.cfg.seed is None else torch.Generator(self.model.device).manual_seed(job.cfg.seed)
        try:
            for k, prompt in enumerate(job.prompts):
                self.batcher.admit(
                    state, k, prompt, generator, self.tenants.history(job.tenant), self.tenants.learned(job.tenant)
                )
        except Exception as e:  # the rows admitted so far leave at the next step
            for k in range(len(job.prompts)):
                state.cancel(k)
            self._end([(job, ("error", f"generation failed: {e}"))])
            return
        self._live[id(job)] = (job, state)
        self._settle()

    def _step(self) -> None:
        """One step of the running rows, after ending those cancelled or past their time limit."""
        now = time.perf_counter()
        for job, state in self._live.values():
            for k in range(len(state.rows)):
                if job.cancelled.is_set():
                    state.cancel(k)
                elif job.time_limit_s is not None and now - state.start > job.time_limit_s:
                    state.cancel(k, "time_limit")
        jobs = [job for job, _ in self._live.values()]
        try:
            self.batcher.step()
        except Exception as e:  # every running request gets the error; the worker keeps serving
            self.batcher.slots.clear()
            self.batcher.filling.clear()
            self._live.clear()
            self._end([(job, ("error", f"generation failed: {e}")) for job in jobs])
            return
        if self.on_batch:
            self.on_batch(jobs, time.perf_counter() - now)
        self._settle()

    def _settle(self) -> None:
        """Send the running jobs' new tokens; end the jobs whose rows have all finished."""
        ended = []
        for key, (job, state) in list(self._live.items()):
            for row, tokens in state.flush():
                if job.stream:
                    job.send_tokens(row, tokens, state.rows[row])
            if state.all_done:
                del self._live[key]
                for row in state.rows:
                    self.tenants.add(job.tenant, row.tokens)
                ended.append((job, ("done", state.rows)))
        if ended:
            self._end(ended)
