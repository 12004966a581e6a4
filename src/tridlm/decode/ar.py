"""Autoregressive decoding (SPEC 3.1): one causal forward, one token."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tridlm import masks
from tridlm.cache import KVCache
from tridlm.decode.common import DecodeState, forward_block
from tridlm.model import TriModel


def ar(model: TriModel, cache: KVCache, pending: torch.Tensor, state: DecodeState,
       generator: torch.Generator | None) -> Iterator[list[tuple[int, list[int]]]]:
    """Yield committed tokens per step; ``pending`` (B,) is the last sampled token, not yet cached."""
    sampler = state.cfg.sampler
    while not state.all_done:
        logits = forward_block(model, cache, pending[:, None], masks.causal, write=True)  # (B, 1, V)
        state.count_forward()
        pending = sampler.pick(sampler.distribution(logits[:, -1]), generator)
        for i, t in enumerate(pending.tolist()):
            if state.trace:
                state.note(i, {"type": "step", "token": t})
            state.emit(i, [t])
        yield state.flush()
