"""What a forward of n new tokens costs on this model, device and precision: measured, not assumed.

The cost curve decides which exact decoding pays (``auto``): on a CPU with low-bit weights a forward of
4 tokens costs about one of 1 token, while 5 cost 1.4x; on a GPU hundreds of tokens cost about one.
"""

from __future__ import annotations

import statistics
import time
import weakref

import torch

from tridlm import masks
from tridlm.decode.common import forward_block, prefill
from tridlm.model import TriModel

_measured: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {n: cost relative to n=1}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def latency_sweep(model: TriModel, context: list[int], reps: int = 9, sizes=(1, 2, 4, 8)) -> dict[int, float]:
    """Median ms of one causal forward of n new tokens over a cached context (the cost of a block)."""
    cache, _ = prefill(model, [context], max_len=len(context) + max(sizes) + 1)
    start = cache.lengths.clone()
    out = {}
    for n in sizes:
        block = torch.randint(model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        block = block.to(model.device)
        times = []
        for _ in range(reps + 1):
            sync(model.device)
            t = time.perf_counter()
            forward_block(model, cache, block, masks.causal, write=True)
            sync(model.device)
            times.append((time.perf_counter() - t) * 1e3)
            cache.crop(start)
        out[n] = statistics.median(times[1:])  # the first run warms up
    return out


def relative_costs(model: TriModel, largest: int, context: int = 128, reps: int = 5) -> dict[int, float]:
    """cost(n) / cost(1) for n = 1..largest, measured once per model (about 16 forwards per size) and
    remembered; measured again when a larger size is asked for."""
    known = _measured.get(model)
    if known is None or max(known) < largest:
        tokens = torch.randint(model.cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
        ms = latency_sweep(model, tokens.tolist(), reps=reps, sizes=range(1, largest + 1))
        known = {n: t / ms[1] for n, t in ms.items()}
        _measured[model] = known
    return {n: c for n, c in known.items() if n <= largest}
