"""A request as the model worker sees it (``Job``): its prompts and settings, and the queue its events go back on."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from tridlm.decode import GenerationConfig, Row


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
    stream_interval_s: float = 0.0  # streamed tokens committed sooner after the last event go out with the next
    # echo with logprobs: each prompt's tokens scored by the worker before decoding (``decode.score``), one ``Scored``
    # per prompt
    score_prompts: bool = False
    prompt_scores: list = field(default_factory=list)
    _held: dict[int, tuple[list[int], list]] = field(default_factory=dict)  # row -> tokens, log-probabilities unsent
    _sent: float = 0.0  # when the last event went out

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
            c.logprobs,
            c.grammar,
            alone,
            self.trace,
            self.tenant if c.pipelined else None,
        )

    def send(self, *event) -> None:
        """An event for the request's response (after any tokens held back)."""
        self._emit([event])

    def send_tokens(self, row: int, tokens: list[int], committed: Row) -> None:
        """A row's new tokens (the last of ``committed``'s, whose log-probabilities go with them where the request
        asked for them): sent at once, or, within ``stream_interval_s`` of the last event, held and sent with the next
        one (one wake-up of the event loop and one chunk for several tokens, where each costs the decode a slice of a
        core)."""
        held_tokens, held_logprobs = self._held.setdefault(row, ([], []))
        held_tokens.extend(tokens)
        if self.cfg.logprobs is not None:
            held_logprobs.extend(committed.logprobs[len(committed.logprobs) - len(tokens) :])
        if time.perf_counter() - self._sent >= self.stream_interval_s:
            self._emit([])

    def _emit(self, events: list[tuple]) -> None:
        events = [("tokens", row, *held) for row, held in self._held.items()] + events
        self._held, self._sent = {}, time.perf_counter()
        self.loop.call_soon_threadsafe(self._put, events)

    def _put(self, events: list[tuple]) -> None:
        for event in events:
            self.events.put_nowait(event)
