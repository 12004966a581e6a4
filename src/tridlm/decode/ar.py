"""Autoregressive decoding (SPEC 3.1): one causal forward, one token."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tridlm import masks
from tridlm.cache import KVCache
from tridlm.decode.forward import forward_block
from tridlm.decode.state import DecodeState
from tridlm.model import TriModel


def ar(
    model: TriModel, cache: KVCache, pending: torch.Tensor, state: DecodeState, generator: torch.Generator | None
) -> Iterator[list[tuple[int, list[int]]]]:
    """Yield committed tokens per step; ``pending`` (B,) is the last sampled token, not yet cached."""
    while not state.all_done:
        pending = ar_step(model, cache, pending, state, generator)
        yield state.flush()


def ar_step(
    model: TriModel,
    cache: KVCache,
    pending: torch.Tensor,
    state: DecodeState,
    generator: torch.Generator | None,
    event=lambda t: {"type": "step", "token": t},
) -> torch.Tensor:
    """One causal forward of every row's pending token: caches it and emits the next, which it returns.
    ``event``: what a trace records for the step, given its token."""
    sampler = state.cfg.sampler
    logits = forward_block(model, cache, pending[:, None], masks.causal, write=True)  # (B, 1, V)
    state.count_forward()
    logits = state.masked(logits[:, -1])  # under a grammar, only what it allows
    pending = sampler.next_token(logits, generator)
    for i, t in enumerate(pending.tolist()):
        if state.trace:
            state.note(i, event(t))
        state.emit(i, [t], logits[i : i + 1])
    return pending
