"""Every precision side by side in one process, beside transformers (float32 greedy) and llama.cpp on the same
GGUF file: AR, auto, spec and diffusion on the packaged chat prompts (alternating engines and repeats, so machine
drift hits all alike), exact match against the same precision's AR and against float32 AR, and the cost of a
forward of n = 1..32 new tokens. llama.cpp needs llama-cpp-python (`make bench` installs it).

    .venv/bin/python bench/precisions.py [OUT_DIR] [--prompts N] [--repeats R] [--precisions P,..] [--settings S,..]

writes OUT_DIR/precisions-<date>.json and -cost.png (default OUT_DIR: bench/results; a subset of precisions or
settings adds them to the name), prints a table.
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tridlm.decode import GenerationConfig
from tridlm.decode.costs import latency_sweep
from tridlm.loading import open_model
from tridlm.measure import harness, reporting
from tridlm.measure.baselines import Baselines

PRECISIONS = ("float32", "bfloat16", "int8", "int4")
SETTINGS = {
    "ar": GenerationConfig(max_tokens=64),
    "auto": GenerationConfig(mode="auto", max_tokens=64),
    "spec B=8": GenerationConfig(mode="spec", block_size=8, max_tokens=64),
    "diffusion B=4": GenerationConfig(mode="diffusion", block_size=4, max_tokens=64),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="bench/results")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="a subset of " + ",".join(PRECISIONS))
    ap.add_argument("--settings", default=",".join(SETTINGS), help="a subset of " + ",".join(SETTINGS))
    args = ap.parse_args()
    precisions, settings = args.precisions.split(","), args.settings.split(",")
    if not {"ar", *settings} <= set(SETTINGS) or not set(precisions) <= set(PRECISIONS):
        raise SystemExit(f"--precisions from {PRECISIONS}, --settings from {tuple(SETTINGS)} (ar always runs)")
    settings = ["ar", *(s for s in settings if s != "ar")]
    models = {p: open_model(dtype=p)[0] for p in {"float32", *precisions}}
    tok = open_model(dtype="float32")[1]
    prompts = harness.load_prompts(None, tok)[: args.prompts]
    others = Baselines(["hf", "llama.cpp"], None, torch.float32, "cpu")
    eos = models["float32"].cfg.eos_ids

    def run(engine: str, name: str, max_tokens: int = 64, some=prompts):
        if engine in others.names:
            return others.run(engine, some, max_tokens, eos)
        return harness.run_tridlm(
            models[engine], some, harness.Setting("tridlm", SETTINGS[name].replace(max_tokens=max_tokens))
        )

    runs = [(p, name) for p in precisions for name in settings] + [(b, "ar") for b in others.names]
    runs += [] if "float32" in precisions else [("float32", "ar")]  # every row is compared with float32 AR
    for engine, name in runs:  # warm-up
        run(engine, name, 4, prompts[:1])
    speed, outputs = {}, {}
    for rep in range(args.repeats):
        for engine, name in runs if rep % 2 == 0 else runs[::-1]:
            t = time.perf_counter()
            rows = run(engine, name)
            speed.setdefault((engine, name), []).append(sum(len(r.tokens) for r in rows) / (time.perf_counter() - t))
            outputs[engine, name] = rows
            print(f"  repeat {rep + 1}  {engine:<9} {name:<14} {speed[engine, name][-1]:6.1f} tok/s", flush=True)
    context = tok.encode(Path(harness.__file__).read_text())[:200]
    sweeps = {p: latency_sweep(models[p], context, reps=5, sizes=range(1, 33)) for p in precisions}
    report = {
        "machine": reporting.machine(models["float32"]),
        "prompts": len(prompts),
        "repeats": args.repeats,
        "command": " ".join(["python", *sys.argv]),
        "baselines_missing": others.missing,
        "results": {},
        "cost_ms": sweeps,
    }
    llama = statistics.median(speed["llama.cpp", "ar"]) if "llama.cpp" in others.names else None
    for (engine, name), rows in outputs.items():
        same = lambda ref: sum(r.tokens == o.tokens for r, o in zip(rows, outputs[ref])) / len(rows)  # noqa: E731
        tok_s = statistics.median(speed[engine, name])
        report["results"][f"{engine} {name}"] = {
            "tok_s": tok_s,
            "tok_s_runs": speed[engine, name],
            "x_float32_ar": tok_s / statistics.median(speed["float32", "ar"]),
            "x_llama_cpp": tok_s / llama if llama else None,
            "exact_vs_own_ar": same((engine, "ar")),
            "exact_vs_float32_ar": same(("float32", "ar")),
            **harness.summarize(models["float32"], prompts, rows),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subset = (
        "" if (precisions, settings) == (list(PRECISIONS), list(SETTINGS)) else f"-{'-'.join(precisions + settings)}"
    )
    prefix = out / f"precisions-{datetime.date.today().isoformat()}{subset.replace(' ', '').replace('=', '')}"
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(sweeps, prefix.with_name(prefix.name + "-cost.png"))
    print(
        f"{'setting':<24} {'tok/s':>6} {'x fp32 AR':>9} {'x l.cpp':>7} {'TPF':>5} {'=own AR':>7} {'=fp32 AR':>8} "
        f"{'gen ppl':>7}"
    )
    for name, r in report["results"].items():
        x_llama = "-" if r["x_llama_cpp"] is None else f"{r['x_llama_cpp']:.2f}"
        print(
            f"{name:<24} {r['tok_s']:6.1f} {r['x_float32_ar']:9.2f} {x_llama:>7} {r['tpf']:5.2f} "
            f"{r['exact_vs_own_ar']:7.0%} {r['exact_vs_float32_ar']:8.0%} {r['gen_ppl']:7.2f}"
        )
    for p, sw in sweeps.items():
        print(
            p,
            "cost(n)/cost(1):",
            ", ".join(f"{n}: {ms / sw[1]:.2f}" for n, ms in sw.items() if n in (1, 2, 4, 8, 16, 32)),
            f"(cost(1) = {sw[1]:.1f} ms)",
        )


def plot(sweeps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p, sw in sweeps.items():
        ns = list(sw)
        a.plot(ns, [sw[n] for n in ns], marker=".", label=p)
        b.plot(ns, [sw[n] / sw[1] for n in ns], marker=".", label=p)
    a.set(xlabel="new tokens per forward (n)", ylabel="ms per forward", title="forward cost over a 200-token cache")
    b.set(xlabel="new tokens per forward (n)", ylabel="cost(n) / cost(1)", title="relative cost")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
