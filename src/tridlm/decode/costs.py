"""What a forward of n new tokens costs on this model, device and precision: measured, not assumed.

The cost curve decides which exact decoding pays (``auto``): on a CPU with low-bit weights a forward of
4 tokens costs about one of 1 token, while 5 cost 1.4x; on a GPU hundreds of tokens cost about one.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tridlm import masks
from tridlm.decode.forward import forward_block, prefill
from tridlm.model import TriModel

BATCH_SIZES = (12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # a step's tokens measured past the single-row sizes


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def latency_sweep(
    model: TriModel, context: list[int], reps: int = 9, sizes=(1, 2, 4, 8), drafting: bool = False
) -> dict[int, float]:
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
        calls[n, drafting] = functools.partial(
            forward_block, model, cache, block, mask_fn, write=1 if drafting else True, adapter=adapter
        )
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


@dataclass(frozen=True)
class CostCurve:
    """cost(n) / cost(1) for n = 1..largest on one model, device and precision: of plain causal forwards
    ("verify") and of forwards whose rows after the first draft with the adapter ("draft"). "verify" may go on past
    ``largest`` at sparser sizes: what a continuous batch's step of that many tokens costs (``step``). Whoever decodes
    ``auto`` may hold one (the server measures its own before it serves) and pass it to ``stream``, else the one kept
    with the model is used (``of``); it can be saved and loaded so that a run plans with a known curve."""

    verify: dict[int, float]
    draft: dict[int, float]

    @property
    def largest(self) -> int:
        return max(self.draft)

    @property
    def batch(self) -> int:
        """The most tokens of a step measured."""
        return max(self.verify)

    @classmethod
    def measure(cls, model: TriModel, largest: int, context: int = 256, reps: int = 9, batch: int = 0) -> CostCurve:
        """Measured over a context about as long as a chat request's: 10 forwards per size and kind,
        interleaved (the first round a warm-up). ``batch``: "verify" goes on up to that many tokens, at sizes
        about 1.5x apart (a batch's rows share the step's matmuls; their attention is over their own caches, about
        what one row's longer block costs)."""
        sizes = list(range(1, largest + 1))
        steps = sizes + [n for n in BATCH_SIZES if largest < n < batch] + ([batch] if batch > largest else [])
        context = max(1, min(context, model.cfg.max_seq_len - max(steps) - 1))
        tokens = torch.randint(model.cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
        times = _median_ms(model, tokens, reps, [(n, False) for n in steps] + [(n, True) for n in sizes])
        return cls(
            *({n: times[n, drafting] / times[1, False] for n in ns} for ns, drafting in ((steps, False), (sizes, True)))
        )

    @classmethod
    def of(cls, model: TriModel, largest: int, batch: int = 0) -> CostCurve:
        """The curve kept with the model (``TriModel.cost_curve``), measured on first use or when it covers fewer
        than ``largest`` tokens (or a step of fewer than ``batch``): what ``auto`` plans with when its caller passes
        none."""
        kept = model.cost_curve
        if kept is None or kept.largest < largest or kept.batch < batch:
            model.cost_curve = cls.measure(model, largest, batch=batch)
        return model.cost_curve

    def step(self, tokens: int) -> float:
        """The relative cost of a forward of this many tokens, interpolated between the measured sizes (and on along
        the last two beyond them)."""
        sizes = sorted(self.verify)
        if tokens in self.verify:
            return self.verify[tokens]
        i = next((k for k, n in enumerate(sizes) if n > tokens), len(sizes) - 1)
        if i == 0:
            return self.verify[sizes[0]]
        lo, hi = sizes[i - 1], sizes[i]
        return self.verify[lo] + (tokens - lo) * (self.verify[hi] - self.verify[lo]) / (hi - lo)

    def upto(self, block: int) -> dict[str, dict[int, float]]:
        """The curve's sizes up to ``block``, as the planner reads them."""
        if block > self.largest:
            raise ValueError(
                f"the cost curve covers forwards of up to {self.largest} tokens; auto asked for a "
                f"block of {block}: measure one that covers it (CostCurve.measure)"
            )
        return {
            kind: {n: c for n, c in curve.items() if n <= block}
            for kind, curve in (("verify", self.verify), ("draft", self.draft))
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"verify": self.verify, "draft": self.draft}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostCurve:
        try:
            data = json.loads(Path(path).read_text())
            verify, draft = ({int(n): float(c) for n, c in data[kind].items()} for kind in ("verify", "draft"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a cost curve ({e})") from None
        if sorted(draft) != list(range(1, len(draft) + 1)) or not draft.keys() <= verify.keys():
            raise ValueError(f"{path}: a cost curve needs the sizes 1..n for both verify and draft")
        return cls(verify, draft)
