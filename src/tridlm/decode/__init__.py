"""Decoding entry points: ``stream`` yields committed tokens, ``generate`` collects them.

The decoders (ar, diffusion, spec linear/quadratic, and ``pipelined`` for pipelined spec and auto; the table of
modes in ``modes`` says which runs what) share prefill and the block forward (``forward``), sampling and stopping
(``state``); each one's loop is a generator over a ``DecodeState``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import torch

from tridlm.decode.config import GenerationConfig
from tridlm.decode.costs import CostCurve
from tridlm.decode.forward import prefill
from tridlm.decode.lookup import AnswerHistory
from tridlm.decode.metrics import summarize
from tridlm.decode.modes import LABELS, MODES, SPEC_VARIANTS
from tridlm.decode.state import DecodeState, Row
from tridlm.model import TriModel

__all__ = [
    "MODES",
    "SPEC_VARIANTS",
    "AnswerHistory",
    "LABELS",
    "CostCurve",
    "DecodeState",
    "GenerationConfig",
    "Row",
    "generate",
    "stream",
    "summarize",
]


@torch.inference_mode()
def stream(
    model: TriModel,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    eos_ids: Sequence[int] | None = None,
    detokenize: Callable[[list[int]], str] | None = None,
    state: DecodeState | None = None,
    history: AnswerHistory | None = None,
    costs: CostCurve | None = None,
) -> Iterator[list[tuple[int, list[int]]]]:
    """Decode a batch of token prompts, yielding (row, newly committed tokens) pairs per cycle.

    eos_ids defaults to the model's EOS. Pass your own ``state`` to read per-row results and counts
    (``state.rows``, ``state.stats()``). ``history``: earlier answers that ``auto`` and pipelined spec draft
    from (with lookup on); every finished decode adds its answers to it, in any mode.
    """
    cfg = cfg.resolve(model)
    state = state or DecodeState(len(prompts), cfg, _eos(model, eos_ids), detokenize)
    state.cfg = cfg
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(model.device).manual_seed(cfg.seed)
    for p, row in zip(prompts, state.rows):
        row.prompt = list(p)
        if row.max_tokens > cfg.room(model, len(p)):
            raise ValueError(
                f"prompt ({len(p)} tokens) + max_tokens ({row.max_tokens}) + block_size exceeds "
                f"the model's context of {model.cfg.max_seq_len}"
            )
    # A row's last cycle may commit up to a block past its max_tokens; a batch's finished rows stay put but still
    # ride along in its later forwards, each writing up to a block more: room for both.
    max_len = max(len(p) + row.max_tokens for p, row in zip(prompts, state.rows)) + 2 * cfg.block_size + 1
    cache, logits = prefill(model, prompts, max_len)
    state.prefill_s = time.perf_counter() - state.start
    sampler = cfg.sampler
    logits = state.masked(logits)  # under a grammar, only what it allows
    pending = sampler.next_token(logits, generator)  # (B,) first new token, not yet cached
    for i, t in enumerate(pending.tolist()):
        state.emit(i, [t], logits[i : i + 1])
    yield state.flush()
    levers = {"history": history, "costs": costs} if cfg.pipelined else {}
    yield from cfg.row.decoder(model, cache, pending, state, generator, **levers)
    for row in state.rows if history is not None else ():
        history.add(row.tokens)


def generate(
    model: TriModel,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    eos_ids: Sequence[int] | None = None,
    detokenize: Callable[[list[int]], str] | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    history: AnswerHistory | None = None,
    costs: CostCurve | None = None,
) -> DecodeState:
    """Decode to the end; the returned state holds each row's tokens and the call's stats.
    ``on_tokens(row, tokens)`` sees each row's tokens as they are committed; ``history`` and ``costs`` as in
    ``stream``."""
    state = DecodeState(len(prompts), cfg, _eos(model, eos_ids), detokenize)
    for chunk in stream(model, prompts, cfg, state=state, history=history, costs=costs):
        for row, tokens in chunk if on_tokens else ():
            on_tokens(row, tokens)
    return state


def _eos(model: TriModel, eos_ids: Sequence[int] | None) -> Sequence[int]:
    return model.cfg.eos_ids if eos_ids is None else eos_ids
