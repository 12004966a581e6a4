"""What a forward of n new tokens costs on this model, device and precision: measured, not assumed.

The cost curve decides which exact decoding pays (``auto``): on a CPU with low-bit weights a forward of
4 tokens costs about one of 1 token, while 5 cost 1.4x; on a GPU hundreds of tokens cost about one.
"""

from __future__ import annotations

import functools
import statistics
import time
import weakref

import torch

from tridlm import masks
from tridlm.decode.common import forward_block, prefill
from tridlm.model import TriModel

_measured: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> relative_costs' curves


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def latency_sweep(model: TriModel, context: list[int], reps: int = 9, sizes=(1, 2, 4, 8),
                  drafting: bool = False) -> dict[int, float]:
    """Median ms of one causal forward of n new tokens over a cached context (the cost of a block).
    ``drafting``: one causal row then n-1 MASK rows with the draft adapter on (a pipelined-spec forward
    that only drafts; the adapter's work is not free)."""
    times = _median_ms(model, context, reps, [(n, drafting) for n in sizes])
    return {n: times[n, drafting] for n in sizes}


@torch.inference_mode()
def _median_ms(model: TriModel, context: list[int], reps: int, shapes: list[tuple[int, bool]]) -> dict:
    """Median ms per (tokens, drafting) shape. Each repetition times every shape once, in turn, so that a slow
    spell of the machine weighs on all of them alike rather than on the shapes timed during it."""
    cache, _ = prefill(model, [context], max_len=len(context) + max(n for n, _ in shapes) + 1)
    start = cache.lengths.clone()
    calls = {}
    for n, drafting in shapes:
        block = torch.randint(model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        block = block.to(model.device)
        mask_fn, adapter = masks.causal, False
        if drafting and n > 1:
            mask_fn = functools.partial(masks.verify_then_draft, verify=1)
            adapter = (torch.arange(n, device=block.device) > 0)[None]
        calls[n, drafting] = functools.partial(forward_block, model, cache, block, mask_fn,
                                               write=1 if drafting else True, adapter=adapter)
    times = {shape: [] for shape in shapes}
    for rep in range(reps + 1):
        for shape, call in calls.items():
            sync(model.device)
            t = time.perf_counter()
            call()
            sync(model.device)
            if rep:  # the first round warms up
                times[shape].append((time.perf_counter() - t) * 1e3)
            cache.crop(start)
    return {shape: statistics.median(ts) for shape, ts in times.items()}


def relative_costs(model: TriModel, largest: int, context: int = 256, reps: int = 9) -> dict[str, dict[int, float]]:
    """cost(n) / cost(1) for n = 1..largest, for plain causal forwards ("verify") and for forwards whose rows
    after the first draft with the adapter ("draft"), over a context about as long as a chat request's, measured
    once per model (10 forwards per size and kind, interleaved) and remembered; measured again when a larger
    size is asked for."""
    known = _measured.get(model)
    if known is None or max(known["verify"]) < largest:
        context = max(1, min(context, model.cfg.max_seq_len - largest - 1))
        tokens = torch.randint(model.cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
        sizes = range(1, largest + 1)
        times = _median_ms(model, tokens, reps, [(n, drafting) for drafting in (False, True) for n in sizes])
        known = {kind: {n: times[n, drafting] / times[1, False] for n in sizes}
                 for kind, drafting in (("verify", False), ("draft", True))}
        _measured[model] = known
    return {kind: {n: c for n, c in curve.items() if n <= largest} for kind, curve in known.items()}
