"""``auto`` against AR on every kernel variant this CPU runs: the promise that it never loses, checked.

Per variant (``TRIDLM_CPU_ISA``), a fresh process runs bench/spec_ablation.py with two settings, AR and ``auto``
(drafts + lookup, as a request gets it), in int4 on chat prompts (the packaged ones) and code prompts (HumanEval
problems as chat requests), every prompt decoded by both in turn, the order alternating, over several repeats. Per
variant and prompt class: auto's tok/s over AR's in each repeat and their median, tokens per forward, and whether
auto's tokens equal AR's. Exits with status 1 where a median ratio is below ``--floor`` (a relapse) or a token
differs.

    .venv/bin/python bench/auto_floor.py [--isa avx2,avx512] [--chat 12] [--code 12] [--repeats 3] [--floor 1.0]

writes OUT/auto-floor-<date>.json and prints a Markdown table.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tridlm import kernels

SETTINGS = "ar,auto drafts+lookup"


def variant(isa: str, args) -> dict:
    """spec_ablation's int4 results for AR and auto, run under ``isa``."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            *(sys.executable, str(Path(__file__).with_name("spec_ablation.py"))),
            *("--precisions", "int4", "--settings", SETTINGS, "--out", out),
            *("--chat", str(args.chat), "--code", str(args.code), "--repeats", str(args.repeats)),
        ]
        subprocess.run(cmd, check=True, env={**os.environ, "TRIDLM_CPU_ISA": isa}, stdout=subprocess.DEVNULL)
        report = json.loads(next(Path(out).glob("spec-ablation-*.json")).read_text())
    rows = {}
    for cls, result in report["results"]["int4"].items():
        auto = next(s for s in result["settings"] if s["config"].get("mode") == "auto")
        ar = next(s for s in result["settings"] if s["config"].get("mode") == "ar")
        rows[cls] = {
            "prompts": result["prompts"],
            "max_tokens": result["max_tokens"],
            "ar_tok_s": ar["tok_s"],
            "auto_tok_s": auto["tok_s"],
            "auto_over_ar": auto["x_ar"],
            "auto_over_ar_runs": auto["x_ar_runs"],
            "auto_tpf": auto["tpf"],
            "auto_equals_ar": auto["exact"],
        }
    return {"machine": report["machine"], "classes": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", default=",".join(v for v in kernels.runnable() if v != "portable"))
    ap.add_argument("--chat", type=int, default=12)
    ap.add_argument("--code", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--floor", type=float, default=1.0, help="the least median auto/AR ratio that passes")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    results = {isa: variant(isa, args) for isa in args.isa.split(",")}
    lines = ["| variant | prompts | AR tok/s | auto tok/s | auto / AR (runs) | auto TPF | = AR |", "|" + "---|" * 7]
    failed = []
    for isa, result in results.items():
        for cls, r in result["classes"].items():
            runs = ", ".join(f"{x:.2f}" for x in r["auto_over_ar_runs"])
            lines.append(
                f"| {isa} | {cls} | {r['ar_tok_s']:.1f} | {r['auto_tok_s']:.1f} | {r['auto_over_ar']:.2f} ({runs}) | "
                f"{r['auto_tpf']:.2f} | {r['auto_equals_ar']:.0%} |"
            )
            if r["auto_over_ar"] < args.floor or r["auto_equals_ar"] < 1:
                failed.append(f"{isa} {cls}")
    print("\n".join(lines))
    cpu = sorted({f for f in ("avx512_vnni", "avx_vnni", "avx2") if f in Path("/proc/cpuinfo").read_text().split()})
    report = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_flags": cpu,
        "forced": [isa for isa in results if isa != kernels.runnable()[0]],
        "floor": args.floor,
        "results": results,
        "below_floor": failed,
    }
    out = Path(args.out) / f"auto-floor-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if failed:
        sys.exit(f"auto below {args.floor}x AR (or not AR's tokens) on: {', '.join(failed)}")


if __name__ == "__main__":
    main()
