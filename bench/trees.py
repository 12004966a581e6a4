"""Two source trees side by side: whether a change moved the engine's speed or its tokens, as an A/B on one machine.

Each tree (a checkout's `src` folder, e.g. a `git worktree` of main before the change) runs in fresh processes of
this venv with that folder on PYTHONPATH, the two alternating within each repeat: int4 AR decode per shape and
instruction-set variant (bench/scale.py's child: N tokens after a chat prompt, prefill taken out), then the packaged
chat prompts x 64 tokens in ar, spec B=8, auto and diffusion B=4 on the default model in int4, whose tokens must
agree between the trees. Ratios B / A are taken per pair and reported as median and range.

    git worktree add /tmp/before main
    .venv/bin/python bench/trees.py /tmp/before/src src [--shapes 135m,360m,1.7b] [--isa avx512,avx2] [--repeats 5]

writes OUT/trees-<date>.json and prints a table, then one JSON line.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import scale

from tridlm import kernels

MODES = """
import json, time, torch
from importlib import resources
from tridlm.decode import CostCurve, GenerationConfig, generate
from tridlm.loading import open_model

torch.set_num_threads(2)
model, tok = open_model(None, "int4")
lines = (resources.files("tridlm") / "prompts" / "chat.jsonl").read_text().splitlines()
prompts = [tok.encode_chat(json.loads(line)["messages"]) for line in lines if line.strip()]
costs = CostCurve.measure(model, 8)
configs = {
    "ar": GenerationConfig(max_tokens=64),
    "spec B=8": GenerationConfig(mode="spec", block_size=8, max_tokens=64),
    "auto": GenerationConfig(mode="auto", max_tokens=64),
    "diffusion B=4": GenerationConfig(mode="diffusion", block_size=4, max_tokens=64),
}
for cfg in configs.values():
    generate(model, prompts[:1], cfg.replace(max_tokens=8), costs=costs)
out = {}
for name, cfg in configs.items():
    start, rows = time.perf_counter(), [generate(model, [p], cfg, costs=costs).rows[0].tokens for p in prompts]
    out[name] = {"tok_s": sum(map(len, rows)) / (time.perf_counter() - start), "tokens": rows}
print(json.dumps(out))
"""


def child(tree: str, code: str, args: list[str], isa: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    if isa:
        env["TRIDLM_CPU_ISA"] = isa
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def pairs(trees: dict[str, str], repeats: int, run) -> list[dict]:
    """``run(tree)`` for both trees per repeat, the first alternating."""
    out = []
    for rep in range(repeats):
        names = list(trees) if rep % 2 == 0 else list(trees)[::-1]
        out.append({name: run(trees[name]) for name in names})
    return out


def spread(ratios: list[float]) -> dict:
    return {"ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="the first tree's src folder (the reference)")
    ap.add_argument("b", help="the second tree's src folder")
    ap.add_argument("--shapes", default="135m,360m,1.7b")
    ap.add_argument("--isa", default=",".join(v for v in ("avx512", "avx2") if v in kernels.runnable()))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    trees, results = {"a": args.a, "b": args.b}, {}
    for isa in args.isa.split(","):
        for shape in args.shapes.split(","):
            path = str(scale.model_file(shape))
            runs = pairs(trees, args.repeats, lambda t: child(t, scale.CHILD, [path, str(args.tokens), "2"], isa))
            results[f"AR int4 {shape} {isa}"] = {
                **spread([r["b"]["tok_s"] / r["a"]["tok_s"] for r in runs]),
                **{f"{k} tok/s": statistics.median(r[k]["tok_s"] for r in runs) for k in trees},
                **{f"{k} peak MiB": statistics.median(r[k]["rss_peak_mb"] for r in runs) for k in trees},
            }
    runs = pairs(trees, args.repeats, lambda t: child(t, MODES, []))
    for mode in runs[0]["a"]:
        results[f"chat x 64 {mode}"] = {
            **spread([r["b"][mode]["tok_s"] / r["a"][mode]["tok_s"] for r in runs]),
            **{f"{k} tok/s": statistics.median(r[k][mode]["tok_s"] for r in runs) for k in trees},
            "same tokens": all(r["a"][mode]["tokens"] == r["b"][mode]["tokens"] for r in runs),
        }
    print(f"{'what':<24} {'a tok/s':>8} {'b tok/s':>8} {'b / a (range)':>20}")
    for name, r in results.items():
        print(f"{name:<24} {r['a tok/s']:8.1f} {r['b tok/s']:8.1f} {r['ratio']:8.3f} ({r['min']:.2f}-{r['max']:.2f})")
    report = {"command": " ".join(["python", *sys.argv]), "a": args.a, "b": args.b, "results": results}
    out = Path(args.out) / f"trees-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
