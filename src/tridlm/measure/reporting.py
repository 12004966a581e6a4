"""What a bench records and prints: the machine it ran on, and the table of ``tridlm bench``'s results."""

from __future__ import annotations

import datetime
import json
import platform
import resource
import sys
from pathlib import Path

import torch

from tridlm.model import TriModel


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def peak_mb(device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the process's peak RSS on a CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def machine(model: TriModel) -> dict:
    dev = torch.device(model.device)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()})",
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def table(report: dict) -> str:
    lines = [
        f"{'setting':<24} {'tok/s':>7} {'(min-max)':>13} {'xAR':>5} {'xl.cpp':>6} {'TPF':>5} {'NFE':>5} "
        f"{'TTFT ms':>8} {'ITL ms':>7} {'acc':>5} {'=AR':>5} {'gen ppl':>8}"
    ]
    f = fmt
    for name, r in report["results"].items():
        spread = f"{r['tok_s_min']:.1f}-{r['tok_s_max']:.1f}"
        lines.append(
            f"{name:<24} {r['tok_s']:>7.1f} {spread:>13} {f(r.get('speedup_vs_ar'), '.2f'):>5} "
            f"{f(r.get('speedup_vs_llama.cpp'), '.2f'):>6} {f(r['tpf'], '.2f'):>5} {r['nfe']:>5} "
            f"{f(r['ttft_ms'], '.0f'):>8} "
            f"{f(r['itl_ms'], '.1f'):>7} {f(r['accepted_mean'], '.2f'):>5} "
            f"{f(r.get('exact_match_vs_ar'), '.0%'):>5} {f(r['gen_ppl'], '.2f'):>8}"
        )
    if "humaneval" in report:
        h = report["humaneval"]
        lines.append(f"\nHumanEval pass@1 on the first {h['problems']} problems:")
        lines += [
            f"  {k:<24} {v['passed']}/{h['problems']} ({v['pass@1']:.0%}), TPF {f(v['tpf'], '.2f')}"
            for k, v in h.items()
            if isinstance(v, dict)
        ]
    if "sweep_ms" in report:
        sw = report["sweep_ms"]
        lines.append(
            "\nforward of n new tokens over a 200-token cached prompt, ms (x n=1): "
            + ", ".join(f"{n}: {ms:.1f} ({ms / sw[1]:.2f}x)" for n, ms in sw.items())
        )
    return "\n".join(lines)


def write_report(folder: str | Path, name: str, model: TriModel, results: dict) -> Path:
    """``folder/<name>-<date>.json``: the command that ran, the machine and the results; prints its path."""
    path = Path(folder) / f"{name}-{datetime.date.today().isoformat()}.json"
    report = {"command": " ".join(["python", *sys.argv]), "machine": machine(model), "results": results}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path
