"""Our engine vs Hugging Face transformers on the same weights, in one process, runs alternating.

1. AR greedy decode of a fixed number of new tokens after a chat prompt: our `ar` mode vs
   transformers `generate` (both ignore EOS so they produce the same count), tok/s medians.
2. Forward latency of n new tokens over a cached prompt (the cost of one block forward), both engines.

Prints a table, writes bench/results/engine-<date>.json, and prints one JSON line last.
Usage: python bench/engine_vs_transformers.py [--dtypes float32,bfloat16] [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

from tridlm import masks
from tridlm.gguf_file import default_gguf_path, load_default
from tridlm.decode import GenerationConfig, generate
from tridlm.decode.common import forward_block, prefill

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPT = "Write a detailed essay about the history of the printing press and its effects on Europe."
SWEEP = [1, 2, 4, 8, 16, 32, 64]


def load_hf(dtype):
    path = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # decode a fixed number of tokens, like ours below
    return model


def decode_race(ours, hf, prompt, tokens, repeats):
    """Alternate our AR and transformers generate; returns tok/s lists and whether outputs agree."""
    cfg = GenerationConfig(max_tokens=tokens)
    x = torch.tensor([prompt])
    ours_tps, hf_tps, same = [], [], True
    generate(ours, [prompt], cfg.replace(max_tokens=8), eos_ids=[])  # warm-up both
    hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False)
    for _ in range(repeats):
        t = time.perf_counter()
        row = generate(ours, [prompt], cfg, eos_ids=[]).rows[0]
        ours_tps.append(len(row.tokens) / (time.perf_counter() - t))
        t = time.perf_counter()
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, do_sample=False)
        hf_tps.append((out.shape[1] - x.shape[1]) / (time.perf_counter() - t))
        same &= out[0, x.shape[1]:].tolist() == row.tokens
    return ours_tps, hf_tps, same


@torch.inference_mode()
def latency_sweep(ours, hf, context, reps=9):
    """Median ms of one forward of n new tokens after len(context) cached tokens, alternating engines."""
    cache, _ = prefill(ours, [context], max_len=len(context) + max(SWEEP) + 1)
    start = cache.lengths.clone()
    hf_cache = DynamicCache(config=hf.config)
    hf(torch.tensor([context]), past_key_values=hf_cache, use_cache=True)
    result = {}
    for n in SWEEP:
        block = torch.randint(100, 1000, (1, n), generator=torch.Generator().manual_seed(n))
        pos = torch.arange(len(context), len(context) + n)[None]
        ours_ms, hf_ms = [], []
        for _ in range(reps + 1):  # the first of each is a warm-up
            t = time.perf_counter()
            forward_block(ours, cache, block, masks.causal, write=True)
            ours_ms.append((time.perf_counter() - t) * 1e3)
            cache.crop(start)
            t = time.perf_counter()
            hf(block, past_key_values=hf_cache, position_ids=pos, use_cache=True)
            hf_ms.append((time.perf_counter() - t) * 1e3)
            hf_cache.crop(-n)
        result[n] = {"ours_ms": statistics.median(ours_ms[1:]), "hf_ms": statistics.median(hf_ms[1:])}
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    results = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": transformers.__version__, "tokens": args.tokens, "runs": {}}
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        ours, tok = load_default(dtype)
        hf = load_hf(dtype)
        prompt = tok.encode_chat([{"role": "user", "content": PROMPT}])
        ours_tps, hf_tps, same = decode_race(ours, hf, prompt, args.tokens, args.repeats)
        context = tok.encode(Path(transformers.__file__).read_text())[:200]
        sweep = latency_sweep(ours, hf, context)
        results["runs"][name] = {"ours_tok_s": statistics.median(ours_tps), "hf_tok_s": statistics.median(hf_tps),
                                 "ours_all": ours_tps, "hf_all": hf_tps, "same_tokens": same, "sweep": sweep}
        del ours, hf

    print(f"AR greedy, {args.tokens} new tokens after a chat prompt, median of {args.repeats} alternating runs")
    print(f"{'dtype':<9} {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6} {'same tokens':>12}")
    for name, r in results["runs"].items():
        print(f"{name:<9} {r['ours_tok_s']:>10.1f} {r['hf_tok_s']:>9.1f} {r['ours_tok_s'] / r['hf_tok_s']:>6.2f} "
              f"{str(r['same_tokens']):>12}")
    print("\nForward of n new tokens over a 200-token cached prompt, median ms (ratio to n=1)")
    print(f"{'dtype':<9} {'engine':<7} " + " ".join(f"{n:>12}" for n in SWEEP))
    for name, r in results["runs"].items():
        for eng in ("ours", "hf"):
            base = r["sweep"][1][f"{eng}_ms"]
            cells = " ".join(f"{r['sweep'][n][f'{eng}_ms']:6.1f} ({r['sweep'][n][f'{eng}_ms'] / base:3.1f})"
                             for n in SWEEP)
            print(f"{name:<9} {eng:<7} {cells}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine-{results['date']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
