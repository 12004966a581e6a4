"""What extra rows cost on this machine, piece by piece (docs/measurements.md, "Integer kernels").

    .venv/bin/python bench/kernel_costs.py

Four timings, 2 threads, inference mode, medians or means as printed:
1. the default model's 30 layers of projections (q/k/v, o, gate/up, down shapes, each layer its own random
   int4 weights) at 1-8 and 16 rows: torch's packed int4 kernel against ``kernels.int4_linear``;
2. one ``kernels.attend`` call (9 query heads over 3 key/value heads, head size 64) over 350 cached keys;
3. a causal forward of n = 1, 3, 5, 8 tokens over 128, 300 and 450 cached random tokens (``latency_sweep``);
4. the draft adapter's cost: a verify-then-draft forward over 200 cached tokens with 0, 1, 7 or 8 adapter rows.
"""

import functools
import statistics
import time

import torch

from tridlm import kernels, masks, quant
from tridlm.decode.costs import latency_sweep
from tridlm.decode.forward import forward_block, prefill
from tridlm.loading import open_model

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # (out, in)


def per_call_ms(fn, reps: int) -> float:
    for _ in range(max(reps // 4, 2)):  # warm up (caches, clocks)
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000


def projections() -> None:
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(30):
        layer = {}
        for name, (n, k) in SHAPES.items():
            q = torch.randint(0, 16, (n, k), generator=gen)
            d, m = torch.rand(n, k // 32, generator=gen) * 0.1, -torch.rand(n, k // 32, generator=gen)
            layer[name] = quant.Int4Weight(q, d, m)
        layers.append(layer)
    print("30 layers of int4 projections, ms (torch's packed kernel / kernels.int4_linear):")
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 16):
        x = {name: torch.randn(rows, k, generator=gen).bfloat16() for name, (_, k) in SHAPES.items()}

        def ours():
            for layer in layers:
                for name, w in layer.items():
                    w(x[name])

        def torch_int4():
            for layer in layers:
                for name, w in layer.items():
                    w._torch_int4(x[name])

        print(f"  {rows:>2} rows: {per_call_ms(torch_int4, 20):.2f} / {per_call_ms(ours, 20):.2f}")


def attention() -> None:
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 3, 350, 64, generator=gen).bfloat16() for _ in range(2))
    out = []
    for rows in (1, 4, 8):
        q = torch.randn(1, rows, 9, 64, generator=gen).bfloat16()
        mask = torch.ones(1, rows, 350, dtype=torch.bool)
        out.append(f"{rows} rows {per_call_ms(lambda: kernels.attend(q, k, v, mask), 300) * 1000:.1f} us")
    print("one attend call over 350 keys:", ", ".join(out))


def forwards(model) -> None:
    print("causal forward of n tokens, ms (x n=1):")
    for context in (128, 300, 450):
        tokens = torch.randint(model.cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
        ms = latency_sweep(model, tokens, sizes=(1, 3, 5, 8))
        print(f"  over {context}: " + ", ".join(f"{n}: {t:.2f} ({t / ms[1]:.2f})" for n, t in ms.items()))


def adapter(model, reps: int = 30) -> None:
    context = torch.randint(model.cfg.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    cache, _ = prefill(model, [context], max_len=len(context) + 9)
    start = cache.lengths.clone()
    mask_fn = functools.partial(masks.verify_then_draft, verify=1)
    out = []
    for n, on in ((2, 0), (2, 1), (8, 0), (8, 1), (8, 7), (8, 8)):
        block = torch.randint(model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        rows = (torch.arange(n) >= n - on)[None] if on else False
        times = []
        for _ in range(reps + 1):
            t = time.perf_counter()
            forward_block(model, cache, block, mask_fn, write=1, adapter=rows)
            times.append((time.perf_counter() - t) * 1000)
            cache.crop(start)
        out.append(f"{n} rows, {on} drafting: {statistics.median(times[1:]):.2f}")
    print("verify-then-draft forward over 200 tokens, ms:", "; ".join(out))


@torch.inference_mode()
def main() -> None:
    torch.set_num_threads(2)
    model, _ = open_model(dtype="int4")
    projections()
    attention()
    forwards(model)
    adapter(model)


if __name__ == "__main__":
    main()
