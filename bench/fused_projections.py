"""Fused QKV / gate-up vs separate projections at 1, 8 and 72 tokens on this CPU (the SmolLM2-135M shapes)."""

import time

import torch
import torch.nn.functional as F

torch.manual_seed(0)


def bench(fn, reps=200):
    for _ in range(20):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


for dtype in (torch.float32, torch.bfloat16):
    for n in (1, 8, 72):
        x = torch.randn(1, n, 576, dtype=dtype)
        wq, wk, wv = (torch.randn(o, 576, dtype=dtype) for o in (576, 192, 192))
        wqkv = torch.cat([wq, wk, wv])
        wg, wu = torch.randn(1536, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        wgu = torch.cat([wg, wu])
        sep = bench(
            lambda: (F.linear(x, wq), F.linear(x, wk), F.linear(x, wv), F.silu(F.linear(x, wg)) * F.linear(x, wu))
        )
        fused = bench(
            lambda: (
                F.linear(x, wqkv).split([576, 192, 192], -1),
                (lambda gu: F.silu(gu[..., :1536]) * gu[..., 1536:])(F.linear(x, wgu)),
            )
        )
        print(
            f"{str(dtype):15s} n={n:3d} separate {sep:7.1f} us  fused {fused:7.1f} us  "
            f"saved/layer {sep - fused:6.1f} us  x30 layers {30 * (sep - fused) / 1000:.2f} ms"
        )
