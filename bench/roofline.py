"""How close int4 decoding runs to this machine's limits, per model shape and kernel variant, beside llama.cpp.

In one run: per variant (``TRIDLM_CPU_ISA``), a fresh process measures the machine's read bandwidth (the sum of a
1 GiB tensor, torch, the same threads) and the integer dot-product peak of that variant's kernel (``int4_linear``
over weights that stay in the L2 cache, 64 rows); then per shape, on the same GGUF file:
- the AR step against its weight-read time (the bytes of every tensor a step reads, from the file, at that bandwidth);
- cost(n), one causal forward of n tokens over 64 cached ones, against max(weight read, n x compute at the peak);
- prefill tok/s at 512 and 2,048 tokens, and decode tok/s over 0, 1,024 and 4,096 tokens of context;
then llama.cpp's ``llama-bench`` built for the matching variant (bench/llamacpp.py) on the same file and threads:
pp512, pp2048, and tg32 at depths 0, 1,024, 4,096.

    .venv/bin/python bench/roofline.py [--shapes 135m,360m,1.7b,3b] [--isa avx512,avx2] [--threads 2]

writes OUT/roofline-<date>.json and prints a table. Shapes other than 135m are random-weight GGUF files of those
shapes (``tridlm.measure.random_gguf``, written once into the tridlm cache).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import llamacpp
from scale import LLAMA_BUILD, model_file

from tridlm import kernels

SIZES = (1, 2, 4, 8, 16, 32, 64)
PREFILLS = (512, 2048)
DEPTHS = (0, 1024, 4096)

CHILD = """
import json, sys, time
import torch
from tridlm import kernels, quant
from tridlm.decode.costs import latency_sweep
from tridlm.decode.forward import prefill
from tridlm.loading import open_model

path, threads, sizes, prefills, depths = sys.argv[1], int(sys.argv[2]), *(json.loads(a) for a in sys.argv[3:6])
torch.set_num_threads(threads)

def best_s(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)

big = torch.ones(2**28)  # 1 GiB of float32
bandwidth = big.numel() * 4 / best_s(big.sum, 5)
del big
gen = torch.Generator().manual_seed(0)
k, n, rows = 512, 2048, 64  # 0.6 MB of codes and scales, each thread's tiles in its L2 cache
w = quant.Int4Weight(torch.randint(0, 16, (n, k), generator=gen), torch.rand(n, k // 32), -torch.rand(n, k // 32))
x = torch.randn(rows, k, generator=gen).bfloat16()
with torch.inference_mode():
    peak = rows * n * k / best_s(lambda: [kernels.int4_linear(x, w.codes, w.scales) for _ in range(20)], 5) * 20

model, tok = open_model(path, "int4")
with torch.inference_mode():
    cost = latency_sweep(model, list(range(1000, 1064)), reps=7, sizes=tuple(sizes))
    prefill_tok_s = {}
    for length in prefills:
        prompt = torch.randint(1000, 5000, (length,), generator=gen).tolist()
        prefill_tok_s[length] = length / best_s(lambda: prefill(model, [prompt], max_len=length + 1), 2)
    decode_tok_s = {}
    for depth in depths:
        context = torch.randint(1000, 5000, (depth + 1,), generator=gen).tolist()
        decode_tok_s[depth] = 1000 / latency_sweep(model, context, reps=7, sizes=(1,))[1]
print(json.dumps({"variant": kernels.isa(), "bandwidth_gb_s": bandwidth / 1e9, "peak_gmac_s": peak / 1e9,
                  "cost_ms": cost, "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s}))
"""


def read_and_macs(path: Path) -> tuple[int, int]:
    """Bytes an AR step reads (every tensor of the file but an embedding table that is not also the head: one row of it
    is read) and multiply-adds per token (the elements of the matrices it multiplies by)."""
    tensors = gguf.GGUFReader(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    read = macs = 0
    for t in tensors:
        if t.name == "token_embd.weight" and not tied:
            continue
        read += int(t.n_bytes)
        macs += int(t.n_elements) if len(t.shape) == 2 else 0
    return read, macs


def ours(path: Path, isa: str, threads: int) -> dict:
    args = [json.dumps(SIZES), json.dumps(PREFILLS), json.dumps(DEPTHS)]
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(threads), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TRIDLM_CPU_ISA": isa},
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def llama_bench(binary: Path | None, path: Path, threads: int) -> dict:
    """llama-bench's pp512 / pp2048 and tg32 at each depth, tok/s (empty where it could not be built)."""
    if binary is None:
        return {}
    found = {}
    prefills, depths = ",".join(map(str, PREFILLS)), ",".join(map(str, DEPTHS))
    for args in (["-p", prefills, "-n", "0"], ["-p", "0", "-n", "32", "-d", depths]):
        cmd = [str(binary), "-m", str(path), "-t", str(threads), "-r", "2", "-o", "json", *args]
        for test in json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout):
            key = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg@{test.get('n_depth', 0)}"
            found[key] = test["avg_ts"]
    return found


def row(shape: str, path: Path, isa: str, threads: int, binary: Path | None) -> dict:
    read, macs = read_and_macs(path)
    m = ours(path, isa, threads)
    read_ms = read / (m["bandwidth_gb_s"] * 1e9) * 1000
    cost = {int(n): ms for n, ms in m["cost_ms"].items()}
    bound = {n: max(read_ms, n * macs / (m["peak_gmac_s"] * 1e9) * 1000) for n in cost}
    llama = llama_bench(binary, path, threads)
    return {
        "shape": shape,
        "isa": isa,
        "variant_loaded": m["variant"],
        "bandwidth_gb_s": m["bandwidth_gb_s"],
        "peak_gmac_s": m["peak_gmac_s"],
        "read_mb": read / 1e6,
        "gmac_per_token": macs / 1e9,
        "ar_step_ms": cost[1],
        "ar_fraction_of_read_limit": read_ms / cost[1],
        "cost_ms": cost,
        "cost_over_cost1": {n: ms / cost[1] for n, ms in cost.items()},
        "cost_fraction_of_roofline": {n: bound[n] / ms for n, ms in cost.items()},
        "prefill_tok_s": m["prefill_tok_s"],
        "prefill_fraction_of_compute_limit": {
            n: tps * macs / (m["peak_gmac_s"] * 1e9) for n, tps in m["prefill_tok_s"].items()
        },
        "decode_tok_s": m["decode_tok_s"],
        "llama_cpp": llama,
        "ratios": {
            **{f"pp{n}": m["prefill_tok_s"][str(n)] / llama[f"pp{n}"] for n in PREFILLS if f"pp{n}" in llama},
            **{f"tg@{d}": m["decode_tok_s"][str(d)] / llama[f"tg@{d}"] for d in DEPTHS if f"tg@{d}" in llama},
        },
    }


def line(r: dict) -> str:
    ratios = " ".join(f"{k} x{v:.2f}" for k, v in r["ratios"].items())
    costs = " ".join(f"{n}:{v:.2f}" for n, v in r["cost_over_cost1"].items())
    return (
        f"{r['shape']:>5} {r['isa']:<7} read {r['bandwidth_gb_s']:.1f} GB/s, peak {r['peak_gmac_s']:.0f} GMAC/s | "
        f"AR step {r['ar_step_ms']:.2f} ms = {r['ar_fraction_of_read_limit']:.0%} of its read limit | "
        f"cost(n)/cost(1) {costs} | "
        f"prefill {' '.join(f'{k}:{v:.0f}' for k, v in r['prefill_tok_s'].items())} tok/s | "
        f"decode@depth {' '.join(f'{k}:{v:.1f}' for k, v in r['decode_tok_s'].items())} tok/s | vs llama.cpp {ratios}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="135m,360m,1.7b,3b")
    ap.add_argument("--isa", default=",".join(v for v in LLAMA_BUILD if v in kernels.runnable()))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    isas = args.isa.split(",")
    binaries = {isa: llamacpp.build("llama-bench", LLAMA_BUILD[isa]) for isa in isas}
    cpu = sorted({f for f in ("avx512_vnni", "avx_vnni", "avx2") if f in Path("/proc/cpuinfo").read_text().split()})
    results = []
    for shape in args.shapes.split(","):
        path = model_file(shape)
        for isa in isas:
            results.append(row(shape, path, isa, args.threads, binaries[isa]))
            print(line(results[-1]), flush=True)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_flags": cpu,
        "forced": [isa for isa in isas if isa != kernels.runnable()[0]],
        "llama_bench": {isa: str(b) if b else "missing: could not be built" for isa, b in binaries.items()},
        "results": results,
    }
    out = Path(args.out) / f"roofline-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
