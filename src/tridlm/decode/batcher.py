"""Continuous batching of AR rows: iteration-level scheduling over one pool of KV cache slots.

A row joins the running batch whenever its caller admits it (its prompt prefilled alone into a free slot, its
first token sampled) and leaves as soon as it finishes or is cancelled; every ``step`` is one causal forward of
all running rows' pending tokens. The running rows stay packed in slots 0..n-1, so a step runs over a view of
the pool and no row pays for an empty slot; a leaving row's slot takes the last row's cache (its committed
length only). Rows of different lengths share a forward the way a ragged batch does (``masks.after_own_cache``):
with int8/int4 weights a row's tokens are bit for bit those it gets decoded alone.

Each row belongs to a ``DecodeState`` (one per request, a row per choice), which keeps its tokens, stopping and
counts as in ``stream``; a row samples with its own request's sampler and generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tridlm import masks
from tridlm.cache import KVCache
from tridlm.decode.forward import forward_block, prefill_into
from tridlm.decode.state import DecodeState
from tridlm.model import TriModel


@dataclass
class Slot:
    state: DecodeState
    row: int  # the state's row decoded in this slot
    pending: int  # the last sampled token, not yet cached
    generator: torch.Generator | None


class Batcher:
    def __init__(self, model: TriModel, max_rows: int, slot_tokens: int):
        """``max_rows``: rows running at once; ``slot_tokens``: cache per row (prompt + answer at most). The pool
        grows with the rows that run, up to ``max_rows`` x ``slot_tokens``, or all at once with ``reserve``."""
        self.model, self.max_rows, self.slot_tokens = model, max_rows, slot_tokens
        self.cache: KVCache | None = None
        self.slots: list[Slot] = []

    def reserve(self) -> None:
        """Allocate the whole pool now (a server: its memory known from the start, no growth while serving)."""
        self._grow(self.max_rows)

    @property
    def free(self) -> int:
        return self.max_rows - len(self.slots)

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a row of this prompt and answer length fits a slot (the last pending token is never cached)."""
        return prompt_tokens + max_tokens <= self.slot_tokens

    @torch.inference_mode()
    def admit(self, state: DecodeState, row: int, prompt: list[int], generator: torch.Generator | None) -> None:
        """Prefill ``prompt`` into a free slot and commit its first token to the state's row; the row runs from
        the next ``step`` unless that token already finished it."""
        if not self.free:
            raise ValueError(f"no free slot: {self.max_rows} rows are running")
        if not self.fits(len(prompt), state.rows[row].max_tokens):
            raise ValueError(f"prompt + max_tokens exceed a slot of {self.slot_tokens} tokens")
        i = len(self.slots)
        self._grow(i + 1)
        view = self.cache.rows(i, i + 1)
        view.lengths.zero_()
        logits = prefill_into(self.model, view, [prompt])
        self.cache.lengths[i] = view.lengths[0]
        token = int(state.cfg.sampler.next_token(logits, generator)[0])
        state.rows[row].prompt = list(prompt)
        state.emit(row, [token])
        if not state.rows[row].done:
            self.slots.append(Slot(state, row, token, generator))

    @torch.inference_mode()
    def step(self) -> None:
        """One causal forward of every running row's pending token: commits the next token of each; the rows
        that finished (or were cancelled, ``DecodeState.cancel``) leave their slots."""
        self._leave()
        n = len(self.slots)
        if not n:
            return
        view = self.cache.rows(0, n)
        pending = torch.tensor([s.pending for s in self.slots], device=self.model.device)
        logits = forward_block(self.model, view, pending[:, None], masks.causal, write=True)[:, -1]  # (n, V)
        self.cache.lengths[:n] = view.lengths
        for state in {id(s.state): s.state for s in self.slots}.values():
            state.count_forward()
        greedy = logits.argmax(-1).tolist()
        for i, s in enumerate(self.slots):
            sampler = s.state.cfg.sampler
            s.pending = greedy[i] if sampler.greedy else int(sampler.next_token(logits[i : i + 1], s.generator)[0])
            s.state.emit(s.row, [s.pending])
        self._leave()

    def _leave(self) -> None:
        """Free the slots of finished rows, moving the last running row into each."""
        i = 0
        while i < len(self.slots):
            if not self.slots[i].state.rows[self.slots[i].row].done:
                i += 1
                continue
            last = len(self.slots) - 1
            if i != last:
                length = int(self.cache.lengths[last])
                for buffer in (self.cache.k, self.cache.v):
                    buffer[:, i, :, :length] = buffer[:, last, :, :length]
                self.cache.lengths[i] = length
                self.slots[i] = self.slots[last]
            self.slots.pop()

    def _grow(self, rows: int) -> None:
        """A pool of at least ``rows`` slots (doubling, up to ``max_rows``), the running rows' caches kept."""
        if self.cache is not None and self.cache.batch >= rows:
            return
        size = min(self.max_rows, max(rows, 2 * (self.cache.batch if self.cache else 1)))
        pool = self.model.new_cache(size, self.slot_tokens)
        if self.cache is not None:
            old = self.cache.batch
            pool.k[:, :old], pool.v[:, :old] = self.cache.k, self.cache.v
            pool.lengths[:old] = self.cache.lengths
        self.cache = pool
