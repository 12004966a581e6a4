"""Correctness and timing of the engine on an accelerator (or the CPU, to try the script out).

1. Correctness in float32 on a small peaked random model: spec greedy == AR greedy (ragged batch,
   several block sizes), diffusion with block size 1 == AR, batch row == single, cached == uncached,
   and device logits == CPU logits for the same weights.
2. Timing in bfloat16 on a random 1B-class model with the NLD head layout (no weights needed):
   batch-1 AR tok/s against the weight-read bound (weight bytes / measured copy bandwidth), linear and
   quadratic spec cycles, and a forward-latency-vs-new-tokens sweep over a cached prompt, up to
   B*(B+1) tokens (the quadratic forward); decoding and the sweep timed eagerly and with CUDA graphs.

Writes <out>/gpu_check.json and prints a table, then one JSON line.
Usage: python bench/gpu_check.py OUT_DIR [--device cuda] [--big-preset 1b]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from tridlm import masks
from tridlm.decode import GenerationConfig, generate
from tridlm.decode.forward import forward_block, prefill
from tridlm.graphs import GraphedModel
from tridlm.model import ModelConfig, TriModel
from tridlm.presets import preset

BIG = {
    "1b": dataclasses.replace(preset("nld-3b"), dim=2048, n_layers=16, n_heads=16, ffn_dim=8192),
    "tiny": preset("tiny"),
}
CHECK = ModelConfig(
    vocab_size=512,
    dim=256,
    n_layers=4,
    n_heads=8,
    n_kv_heads=2,
    head_dim=32,
    ffn_dim=512,
    max_seq_len=1024,
    bos_id=1,
    eos_ids=(2,),
    mask_id=3,
)


def random_on(cfg: ModelConfig, device, dtype, std: float, seed: int = 0) -> TriModel:
    torch.manual_seed(seed)
    with torch.device(device):
        model = TriModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, std)
    return model.to(dtype).eval()


class Timer:
    """Wall time with device synchronisation (CUDA events where available)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn, reps: int, warmup: int = 1) -> float:
        for _ in range(warmup):  # graphs: the first call runs eagerly, the second captures
            fn()
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(reps):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


@torch.inference_mode()
def correctness(device) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = random_on(CHECK, device, torch.float32, std=0.3, seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, CHECK.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 2, 40)]
    cfg = GenerationConfig(max_tokens=48)
    ar = [r.tokens for r in generate(model, prompts, cfg, eos_ids=[]).rows]
    out = {}
    for variant, b in (("linear", 2), ("linear", 4), ("linear", 16), ("quadratic", 4), ("quadratic", 8)):
        sp = generate(model, prompts, cfg.replace(mode="spec", block_size=b, spec_variant=variant), eos_ids=[])
        out[f"spec_{variant}_b{b}_equals_ar"] = [r.tokens for r in sp.rows] == ar
    graphed = GraphedModel(model, capacity=256)
    for variant, b in (("linear", 1), ("linear", 4), ("quadratic", 4)):
        run = cfg.replace(mode="spec", block_size=b, spec_variant=variant)
        generate(graphed, prompts, run, eos_ids=[])  # first sight of each shape runs eagerly
        out[f"cuda_graphs_spec_{variant}_b{b}_equals_ar"] = [
            r.tokens for r in generate(graphed, prompts, run, eos_ids=[]).rows
        ] == ar
    out["cuda_graphs_captured"] = graphed.graphs
    diff1 = generate(model, prompts, cfg.replace(mode="diffusion", block_size=1), eos_ids=[])
    out["diffusion_b1_equals_ar"] = [r.tokens for r in diff1.rows] == ar
    out["batch_equals_single"] = all(
        generate(model, [p], cfg, eos_ids=[]).rows[0].tokens == t for p, t in zip(prompts, ar)
    )
    seq = prompts[1] + ar[1][:16]
    x = torch.tensor([seq], device=device)
    full = model(
        x,
        torch.arange(len(seq), device=device)[None],
        masks.causal(torch.zeros(1, dtype=torch.long, device=device), len(seq), 0),
    )[0]
    cache, _ = prefill(model, [prompts[1]], max_len=128)
    steps = [
        forward_block(model, cache, torch.tensor([[t]], device=device), masks.causal, write=True)[0, 0]
        for t in ar[1][:16]
    ]
    out["cached_vs_uncached_max_abs"] = float((torch.stack(steps) - full[len(prompts[1]) :]).abs().max())
    cpu = model.to("cpu")
    ref = cpu(x.cpu(), torch.arange(len(seq))[None], masks.causal(torch.zeros(1, dtype=torch.long), len(seq), 0))[0]
    out["device_vs_cpu_max_abs"] = float((full.cpu() - ref).abs().max())
    out["logit_scale"] = float(ref.abs().max())
    return out


@torch.inference_mode()
def timing(device, cfg: ModelConfig, context: int, tokens: int) -> dict:
    timer = Timer(device)
    model = random_on(cfg, device, torch.bfloat16, std=0.02)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    big = torch.empty(weight_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(big)
    copy_ms = timer(functools.partial(dst.copy_, big), 5)
    bandwidth = 2 * big.numel() * big.element_size() / (copy_ms / 1e3)  # read + write bytes/s
    del big, dst  # the weights' worth of memory, back before the model runs
    prompt = torch.randint(4, cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    gen = GenerationConfig(max_tokens=tokens)
    decode = {}
    graphed = GraphedModel(model, capacity=context + tokens + 64)
    for engine, runner in (("eager", model), ("graphs", graphed)):
        for mode, block, variant in (
            ("ar", 1, "linear"),
            ("spec", 16, "linear"),
            ("spec", 32, "linear"),
            ("spec", 8, "quadratic"),
            ("spec", 16, "quadratic"),
        ):
            run = gen.replace(mode=mode, block_size=block, spec_variant=variant)
            for _ in range(2):  # warm-up (and, for graphs, capture) every shape this setting uses
                generate(runner, [prompt], run, eos_ids=[])
            if timer.cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            state = generate(runner, [prompt], run, eos_ids=[])
            if timer.cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
            s = state.stats()
            name = f"{engine}:{mode}_{variant}_b{block}" if mode == "spec" else f"{engine}:{mode}"
            decode[name] = {
                "tok_s": s["completion_tokens"] / wall,
                "nfe": s["nfe"],
                "ms_per_forward": wall * 1e3 / max(s["nfe"], 1),
                "tpf": s["tpf"],
            }
    sweep = {}
    room = context + 1200
    for engine, runner in (("eager", model), ("graphs", GraphedModel(model, capacity=room))):
        cache, _ = prefill(runner, [prompt], max_len=room)
        start = cache.lengths.clone()
        sweep[engine] = {}
        for n in (1, 2, 4, 8, 16, 32, 64, 8 * 9, 128, 16 * 17, 32 * 33):
            block = torch.randint(4, cfg.vocab_size, (1, n), device=device)

            def step():
                forward_block(runner, cache, block, masks.causal, write=True)
                cache.crop(start)

            sweep[engine][n] = timer(step, 10, warmup=2)
    return {
        "weight_bytes": weight_bytes,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "weight_read_bound_tok_s": bandwidth / 2 / weight_bytes,  # copy bandwidth counts read + write
        "decode": decode,
        "forward_ms": sweep,
        "context": context,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--big-preset", choices=BIG, default="1b")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    info = {
        "device": args.device,
        "torch": torch.__version__,
        "name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    }
    checks = correctness(args.device)
    print(f"device: {info['name']} (torch {info['torch']})\n\ncorrectness (float32):")
    for k, v in checks.items():
        print(f"  {k:<30} {v}")
    cfg = BIG[args.big_preset]
    res = timing(args.device, cfg, args.context, args.tokens)
    print(
        f"\ntiming (bfloat16, random {args.big_preset}: {res['weight_bytes'] / 1e9:.2f} GB of weights, "
        f"{args.context}-token prompt)"
    )
    print(
        f"  copy bandwidth {res['copy_bandwidth_gb_s']:.0f} GB/s -> weight-read bound "
        f"{res['weight_read_bound_tok_s']:.0f} tok/s at batch 1"
    )
    for k, d in res["decode"].items():
        print(
            f"  {k:<28} {d['tok_s']:8.1f} tok/s  {d['ms_per_forward']:7.2f} ms/forward  NFE {d['nfe']}  "
            f"TPF {d['tpf']:.2f}"
        )
    for engine, sweep in res["forward_ms"].items():
        print(
            f"  forward of n new tokens ({engine}): "
            + ", ".join(f"{n}: {ms:.2f} ms ({ms / sweep[1]:.2f}x)" for n, ms in sweep.items())
        )
    result = {**info, "correctness": checks, "timing": res, "preset": dataclasses.asdict(cfg)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
