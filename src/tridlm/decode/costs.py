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


@torch.inference_mode()
def latency_sweep(model: TriModel, context: list[int], reps: int = 9, sizes=(1, 2, 4, 8),
                  drafting: bool = False) -> dict[int, float]:
    """Median ms of one causal forward of n new tokens over a cached context (the cost of a block).
    ``drafting``: one causal row then n-1 MASK rows with the draft adapter on (a pipelined-spec forward
    that only drafts; the adapter's work is not free)."""
    cache, _ = prefill(model, [context], max_len=len(context) + max(sizes) + 1)
    start = cache.lengths.clone()
    out = {}
    for n in sizes:
        block = torch.randint(model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        block = block.to(model.device)
        mask_fn, adapter = masks.causal, False
        if drafting and n > 1:
            mask_fn = functools.partial(masks.verify_then_draft, verify=1)
            adapter = (torch.arange(n, device=block.device) > 0)[None]
        times = []
        for _ in range(reps + 1):
            sync(model.device)
            t = time.perf_counter()
            forward_block(model, cache, block, mask_fn, write=1 if drafting else True, adapter=adapter)
            sync(model.device)
            times.append((time.perf_counter() - t) * 1e3)
            cache.crop(start)
        out[n] = statistics.median(times[1:])  # the first run warms up
    return out


def relative_costs(model: TriModel, largest: int, context: int = 128, reps: int = 5) -> dict[str, dict[int, float]]:
    """cost(n) / cost(1) for n = 1..largest, for plain causal forwards ("verify") and for forwards whose rows
    after the first draft with the adapter ("draft"), measured once per model (about 12 forwards per size
    and kind) and remembered; measured again when a larger size is asked for."""
    known = _measured.get(model)
    if known is None or max(known["verify"]) < largest:
        tokens = torch.randint(model.cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
        sizes = range(1, largest + 1)
        verify = latency_sweep(model, tokens, reps=reps, sizes=sizes)
        draft = latency_sweep(model, tokens, reps=reps, sizes=sizes, drafting=True)
        known = {"verify": {n: t / verify[1] for n, t in verify.items()},
                 "draft": {n: t / verify[1] for n, t in draft.items()}}
        _measured[model] = known
    return {kind: {n: c for n, c in curve.items() if n <= largest} for kind, curve in known.items()}
