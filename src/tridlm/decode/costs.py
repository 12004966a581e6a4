"""What a forward of n new tokens costs on this model, device and precision: measured, not assumed.

The cost curve decides which exact decoding pays (``auto``): on a CPU with low-bit weights a forward of
4 tokens costs about one of 1 token, while 5 cost 1.4x; on a GPU hundreds of tokens cost about one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from tridlm import default_model, kernels, masks
from tridlm.decode.forward import forward_block, prefill
from tridlm.graphs import GraphedModel
from tridlm.model import TriModel
from tridlm.projection import Linear

BATCH_ROWS = (1, 2, 4, 8, 16, 32, 64)  # batch sizes a step is measured at (``CostCurve.measure``'s ``rows``)


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
    """Median ms per (tokens, drafting) shape of a forward over one row's cached context."""
    cache, _ = prefill(model, [context], max_len=len(context) + max(n for n, _ in shapes) + 1)
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
    return _time(model.device, reps, calls, {shape: cache for shape in shapes})


@torch.inference_mode()
def _batch_ms(model: TriModel, context: list[int], reps: int, sizes: list[int]) -> dict[int, tuple[float, float]]:
    """Per batch size R: median ms of a continuous batch's step of R rows of 1 token and of 2 tokens each, every row
    over its own copy of the context (as ``decode.batcher`` runs them)."""
    one, _ = prefill(model, [context], max_len=len(context) + 3)
    calls, caches = {}, {}
    for rows in sizes:
        cache = model.new_cache(rows, one.max_len)
        cache.k[:], cache.v[:] = one.k, one.v  # every row the same context
        cache.lengths[:] = one.lengths
        for width in (1, 2):
            block = torch.randint(model.cfg.vocab_size, (rows, width), generator=torch.Generator().manual_seed(rows))
            calls[rows, width] = functools.partial(
                forward_block, model, cache, block.to(model.device), masks.causal, write=True
            )
            caches[rows, width] = cache
    times = _time(model.device, reps, calls, caches)
    return {rows: (times[rows, 1], times[rows, 2]) for rows in sizes}


def _time(device, reps: int, calls: dict, caches: dict) -> dict:
    """Median ms per call. Each repetition times every call once, in turn, so that a slow spell of the machine weighs
    on all of them alike rather than on those timed during it; each call's cache is cropped back after it."""
    starts = {key: cache.lengths.clone() for key, cache in caches.items()}
    times = {key: [] for key in calls}
    for rep in range(reps + 1):
        for key, call in calls.items():
            sync(device)
            t = time.perf_counter()
            call()
            sync(device)
            if rep:  # the first round warms up
                times[key].append((time.perf_counter() - t) * 1e3)
            caches[key].crop(starts[key])
    return {key: statistics.median(ts) for key, ts in times.items()}


@dataclass(frozen=True)
class CostCurve:
    """cost(n) / cost(1) for n = 1..largest on one model, device and precision: of plain causal forwards
    ("verify") and of forwards whose rows after the first draft with the adapter ("draft"); and, where measured, a
    continuous batch's step per batch size R ("rows": the cost of R rows x 1 token and of each further token, both
    relative to cost(1); ``step``). Whoever decodes ``auto`` more than once owns one and passes it to ``stream`` (the
    server takes its own before it serves; the bench and eval one per model); a call given none takes the kept one
    (``kept``: measured once per model shape, precision and machine, then read from the cache). It can be saved and
    loaded so that a run plans with a known curve."""

    verify: dict[int, float]
    draft: dict[int, float]
    rows: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def largest(self) -> int:
        return max(self.verify)

    @classmethod
    def for_config(cls, model: TriModel, cfg) -> CostCurve | None:
        """The curve decoding ``cfg`` (a ``GenerationConfig``) plans with: the kept one (``kept``) up to its block
        where it is ``auto``, else None (no other mode plans)."""
        cfg = cfg.resolve(model)
        return cls.kept(model, cfg.block_size)[0] if cfg.row.plans else None

    @classmethod
    def kept(cls, model: TriModel, largest: int, rows: int = 0, folder: Path | None = None) -> tuple[CostCurve, str]:
        """The curve of this model's shape, precision, adapter, device, thread count, CPU and kernels, from the tridlm
        cache (``folder``, default: its ``cost-curves/``) where one there covers ``largest`` tokens (and batches of
        ``rows``), else measured now and kept there for the next start; and a line saying which. What a forward costs
        depends on those, not on the weights' values, so a curve serves every file of the same shape."""
        key = _key(model)
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(folder or default_model.cache_root() / "cost-curves") / f"{digest}.json"
        if path.is_file():
            try:
                curve = cls.load(path)
            except ValueError:
                curve = None  # a damaged file is measured again and replaced
            if curve is not None and curve.largest >= largest and max(curve.rows, default=0) >= rows:
                return curve, f"the cost curve kept in {path}"
        start = time.perf_counter()
        curve = cls.measure(model, largest, rows=rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        curve.save(tmp)
        tmp.replace(path)
        (path.with_suffix(".key.json")).write_text(json.dumps(key, indent=1) + "\n")
        return curve, f"the cost curve measured now ({time.perf_counter() - start:.1f} s), kept in {path}"

    @classmethod
    def measure(cls, model: TriModel, largest: int, context: int = 256, reps: int = 9, rows: int = 0) -> CostCurve:
        """Measured over a context about as long as a chat request's: 10 forwards per size and kind,
        interleaved (the first round a warm-up). ``rows``: batch steps too, at batch sizes 1, 2, 4, ... up to it."""
        context = max(1, min(context, model.cfg.max_seq_len - largest - 1))
        tokens = torch.randint(model.cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
        sizes = range(1, largest + 1)
        times = _median_ms(model, tokens, reps, [(n, drafting) for drafting in (False, True) for n in sizes])
        one = times[1, False]
        batches = sorted({*(r for r in BATCH_ROWS if r < rows), rows} - {0})
        steps = _batch_ms(model, tokens, reps, batches) if batches else {}
        return cls(
            *({n: times[n, drafting] / one for n in sizes} for drafting in (False, True)),
            {r: (t1 / one, (t2 - t1) / r / one) for r, (t1, t2) in steps.items()},
        )

    def step(self, tokens: int, rows: int) -> float:
        """The relative cost of a continuous batch's step of ``rows`` rows and ``tokens`` tokens in all: the measured
        batch sizes' costs interpolated linearly (held beyond them); a curve without batch sizes takes the single-row
        forward of that many tokens (interpolated, and on along its last two sizes beyond them)."""
        if self.rows:
            base, extra = (_interpolate({r: c[k] for r, c in self.rows.items()}, rows) for k in (0, 1))
            return base + extra * (tokens - rows)
        return _interpolate(self.verify, tokens, extend=True)

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
        data = {"verify": self.verify, "draft": self.draft, "rows": self.rows}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostCurve:
        try:
            data = json.loads(Path(path).read_text())
            verify, draft = ({int(n): float(c) for n, c in data[kind].items()} for kind in ("verify", "draft"))
            rows = {int(r): (float(base), float(extra)) for r, (base, extra) in data.get("rows", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a cost curve ({e})") from None
        if sorted(verify) != list(range(1, len(verify) + 1)) or verify.keys() != draft.keys():
            raise ValueError(f"{path}: a cost curve needs the sizes 1..n for both verify and draft")
        return cls(verify, draft, rows)


def _key(model) -> dict:
    """What a forward's cost depends on: the shapes, each projection's precision, the adapters' ranks, the device,
    threads, CPU and kernel build, and the versions of torch and tridlm."""
    modules = (model.model if isinstance(model, GraphedModel) else model).named_modules()
    linear = [(name, m) for name, m in modules if isinstance(m, Linear)]
    device = torch.device(model.device)
    return {
        "config": dataclasses.asdict(model.cfg),
        "weights": sorted({str(m.weight.dtype) if m.packed is None else type(m.packed).__name__ for _, m in linear}),
        "activations": str(model.dtype),
        "adapters": sorted({(n.rsplit(".", 1)[-1], m.lora_a.shape[0]) for n, m in linear if m.lora_a is not None}),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "kernels": kernels.module_name(kernels.isa()) if device.type == "cpu" else None,
        "torch": torch.__version__,
        "tridlm": _version(),
    }


def _version() -> str:
    try:
        return version("tridlm")
    except PackageNotFoundError:
        return "0+unknown"


def _interpolate(points: dict[int, float], x: int, extend: bool = False) -> float:
    """The piecewise-linear function through ``points`` at x; beyond them held at the nearest, or with ``extend``
    continued along the last two."""
    xs = sorted(points)
    if x in points:
        return points[x]
    if x < xs[0] or len(xs) == 1 or (x > xs[-1] and not extend):
        return points[xs[0] if x < xs[0] else xs[-1]]
    i = next((k for k, n in enumerate(xs) if n > x), len(xs) - 1)
    lo, hi = xs[i - 1], xs[i]
    return points[lo] + (x - lo) * (points[hi] - points[lo]) / (hi - lo)
