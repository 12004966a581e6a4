"""int4 AR decoding at growing model sizes beside llama.cpp, per instruction-set variant this CPU can run.

Shapes: the default model (135M, its own GGUF file) and random-weight GGUF files of 360M, 1.7B and 3B shapes
(`python -m tridlm.measure.random_gguf`, written once into the tridlm cache). Per shape, variant and repeat, in turn:
tridlm in a fresh process (`TRIDLM_CPU_ISA=<variant>`: load time, time to the first token, peak RSS, AR decode tok/s
with prefill taken out: N tokens and 1 token after the same prompt, timed apart), then llama.cpp's `llama-bench` built
for the matching variant (native for avx512, AVX2 with AVX-VNNI for avxvnni, AVX2 only for avx2: bench/llamacpp.py) on
the same file and threads (`-p 0 -n N`: decode only). Ratios are taken per pair and reported as median and range.

    .venv/bin/python bench/scale.py [--shapes 135m,360m,1.7b,3b] [--isa avx512,avxvnni,avx2] [--tokens 64] [--repeats 3]

writes OUT/scale-<date>.json and prints a table.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import llamacpp

from tridlm import default_model, kernels
from tridlm.measure import random_gguf

LLAMA_BUILD = {"avx512": "native", "avxvnni": "avxvnni", "avx2": "avx2"}

CHILD = """
import json, resource, sys, time
import torch
from tridlm.decode import GenerationConfig, generate
from tridlm.loading import open_model

path, tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base, start = rss(), time.perf_counter()
model, tok = open_model(path, "int4")
load_s, loaded = time.perf_counter() - start, rss()
prompt = tok.encode_chat([{"role": "user", "content": "Write a Python function that merges two sorted lists."}])

def timed(n):
    start = time.perf_counter()
    state = generate(model, [prompt], GenerationConfig(mode="ar", max_tokens=n), eos_ids=())
    assert len(state.rows[0].tokens) == n
    return time.perf_counter() - start

first_s = load_s + timed(1)  # from the start of loading to the first token of a chat request
timed(4)  # warm-up
one, full = timed(1), timed(tokens)
print(json.dumps({"load_s": load_s, "first_token_s": first_s, "rss_base_mb": base, "rss_loaded_mb": loaded,
                  "rss_peak_mb": rss(), "tok_s": (tokens - 1) / (full - one)}))
"""


def tridlm_run(path: Path, isa: str, tokens: int, threads: int) -> dict:
    env = {**os.environ, "TRIDLM_CPU_ISA": isa}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(tokens), str(threads)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def llama_run(binary: Path, path: Path, tokens: int, threads: int) -> float:
    cmd = [str(binary), "-m", str(path), "-t", str(threads), "-p", "0", "-n", str(tokens), "-r", "1", "-o", "json"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(run.stdout)[0]["avg_ts"]


def model_file(shape: str) -> Path:
    if shape == "135m":
        return default_model.gguf_path()
    path = default_model.cache_root() / "random-gguf" / f"random-{shape}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path}", flush=True)
        random_gguf.write(path, shape)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="135m,360m,1.7b,3b")
    ap.add_argument("--isa", default=",".join(v for v in LLAMA_BUILD if v in kernels.runnable()))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    isas = args.isa.split(",")
    binaries = {isa: llamacpp.build("llama-bench", LLAMA_BUILD[isa]) for isa in isas}
    results = {}
    for shape in args.shapes.split(","):
        path = model_file(shape)
        size_mb = path.stat().st_size / 2**20
        for isa in isas:
            runs, llama = [], []
            for _ in range(args.repeats):
                runs.append(tridlm_run(path, isa, args.tokens, args.threads))
                if binaries[isa] is not None:
                    llama.append(llama_run(binaries[isa], path, args.tokens, args.threads))
            ours = [r["tok_s"] for r in runs]
            ratios = [a / b for a, b in zip(ours, llama)]
            results[f"{shape} {isa}"] = row = {
                "shape": shape,
                "isa": isa,
                "file_mb": round(size_mb),
                "tridlm_tok_s": ours,
                "llama_cpp_tok_s": llama,
                "ratio_median": statistics.median(ratios) if ratios else None,
                "ratio_range": [min(ratios), max(ratios)] if ratios else None,
                "load_s": statistics.median(r["load_s"] for r in runs),
                "peak_rss_mb": max(r["rss_peak_mb"] for r in runs),
                "runtime_rss_mb": min(r["rss_base_mb"] for r in runs),
                "load_rss_over_file": max(r["rss_loaded_mb"] - r["rss_base_mb"] for r in runs) / size_mb,
            }
            print(line(row), flush=True)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "llama_bench": {isa: str(b) if b else "missing: could not be built" for isa, b in binaries.items()},
        "results": results,
    }
    out = Path(args.out) / f"scale-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def line(r: dict) -> str:
    ours, llama = statistics.median(r["tridlm_tok_s"]), r["llama_cpp_tok_s"]
    versus = (
        f"llama.cpp {statistics.median(llama):6.1f} tok/s, x{r['ratio_median']:.2f} "
        f"({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})"
        if llama
        else "llama.cpp missing"
    )
    return (
        f"{r['shape']:>5} {r['isa']:<7} tridlm {ours:6.1f} tok/s, {versus}; load {r['load_s']:.1f} s, "
        f"peak RSS {r['peak_rss_mb']:.0f} MiB ({r['runtime_rss_mb']:.0f} runtime), loading grew "
        f"{r['load_rss_over_file']:.2f}x the {r['file_mb']} MiB file"
    )


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s")
