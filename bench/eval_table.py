"""Every mode on the tasks of ``tridlm eval``, per precision: the table and frontier plot of the README.

Runs (or resumes, from their JSONL files) each setting below on all problems of each task, one problem at a
time (batch 1: the per-request speed a user sees, and the batch size at which spec's tokens equal AR's),
then writes OUT/eval-<task>.json (every run's summary, plus the share of problems whose tokens equal the
same precision's AR), OUT/eval-frontier.png (pass@1 against tokens per forward) and prints a Markdown table.

    .venv/bin/python bench/eval_table.py --allow-code-execution [--tasks humaneval,gsm8k] [--limit N]
        [--out bench/results] [--report | --rescore]
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from tridlm import loading
from tridlm.decode import GenerationConfig
from tridlm.measure import evaluate, plots, reporting, sandbox

MAX_TOKENS = 256
# (precision, setting name, decoding config): every mode in the fastest precision that is exact, AR in the others.
# The order is the order of importance: a run stopped part-way has the main rows first.
MATRIX = [
    ("int4", "ar", GenerationConfig(max_tokens=MAX_TOKENS)),
    ("int4", "spec B=8", GenerationConfig(mode="spec", block_size=8, max_tokens=MAX_TOKENS)),
    ("float32", "ar", GenerationConfig(max_tokens=MAX_TOKENS)),
    *[
        (
            "int4",
            f"diffusion B=4 t={t}",
            GenerationConfig(mode="diffusion", block_size=4, threshold=t, max_tokens=MAX_TOKENS),
        )
        for t in (0.9, 0.5)
    ],
    (
        "int4",
        "spec-quadratic B=4",
        GenerationConfig(mode="spec", spec_variant="quadratic", block_size=4, max_tokens=MAX_TOKENS),
    ),
    ("int8", "ar", GenerationConfig(max_tokens=MAX_TOKENS)),
    (
        "int4",
        "diffusion B=4 t=0.7",
        GenerationConfig(mode="diffusion", block_size=4, threshold=0.7, max_tokens=MAX_TOKENS),
    ),
    ("int4", "auto", GenerationConfig(mode="auto", max_tokens=MAX_TOKENS)),
    ("bfloat16", "ar", GenerationConfig(max_tokens=MAX_TOKENS)),
]


def finished(task: str, settings: dict, opts: evaluate.EvalOptions) -> dict | None:
    """The summary of a run whose file holds every problem, else None (nothing is decoded)."""
    path = Path(opts.runs) / f"{evaluate.run_name(settings)}.jsonl"
    problems = evaluate.TASKS[task]().problems()[: opts.limit]
    found, done = evaluate.RunFile.read(path) if path.exists() else (None, {})
    if found != settings or any(p.id not in done for p in problems):
        print(
            f"{task} {settings['mode']} {settings['precision']}: {len(done)}/{len(problems)} problems so far, left out",
            flush=True,
        )
        return None
    return evaluate.summary(settings, [done[p.id] for p in problems], path)


def run_all(tasks: list[str], opts: evaluate.EvalOptions, decode: bool = True) -> tuple[dict, dict]:
    """Every setting on every task, setting by setting (a run stopped part-way has the main rows of both
    tasks); each run's summary, with the share of problems whose tokens equal the same precision's AR.
    Without ``decode``, only the runs already complete are summarized."""
    models, report = {}, {task: [] for task in tasks}
    for precision, name, gen in MATRIX:
        model, tok = models.setdefault(precision, loading.open_model(dtype=precision))
        for task in tasks:
            settings = evaluate.run_settings(task, model, loading.model_name(None), precision, None, gen, 1)
            if decode:
                result = evaluate.evaluate(model, tok, task, gen, opts, settings)
            elif (result := finished(task, settings, opts)) is None:
                continue
            result = {"setting": name, **result}
            print(evaluate.describe(result), flush=True)
            report[task].append(result)
    for results in report.values():
        for r in results:
            ar = next(a for a in results if a["precision"] == r["precision"] and a["mode"] == "ar")
            r["same_tokens_as_ar"] = evaluate.same_tokens(Path(r["run_file"]), Path(ar["run_file"]))
    return report, models


def markdown(task: str, results: list[dict]) -> str:
    lines = [
        f"| {task} | precision | passed | pass@1 | tokens = AR | TPF | tok/s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['setting']} | {r['precision']} | {r['passed']}/{r['total']} | {r['pass@1']:.1%} | "
            f"{r['same_tokens_as_ar']:.0%} | {r['tpf']:.2f} | {r['tok_s_median']:.1f} |"
        )
    return "\n".join(lines)


def rescore(runs: Path, out: Path, allowed: bool) -> None:
    """Every HumanEval run file in ``runs`` scored again from its stored answers."""
    if not allowed:
        raise SystemExit("rescoring HumanEval runs the model's code: pass --allow-code-execution")
    tokenizer = loading.open_model(dtype="int4")[1]
    files = []
    for path in sorted(runs.glob("humaneval-*.jsonl")):
        settings, moved = evaluate.rescore(path, tokenizer)
        passed = sum(r["passed"] for r in evaluate.RunFile.read(path)[1].values())
        files.append({"run_file": str(path), "passed": passed, "moved": moved})
        print(f"{path.name}: {passed} passed as recorded, {len(moved)} moved {moved}", flush=True)
    (out / "eval-rescore.json").write_text(
        json.dumps(
            {
                "command": "python " + " ".join(sys.argv),
                "date": datetime.date.today().isoformat(),
                "sandbox": sandbox.isolation(),
                "files": files,
            },
            indent=2,
        )
        + "\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="humaneval,gsm8k")
    ap.add_argument("--limit", type=int, help="the first N problems of each task (default: all)")
    ap.add_argument("--runs", default="bench/results/eval-runs", help="folder of the per-run JSONL files")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument(
        "--allow-code-execution", action="store_true", help="run HumanEval answers (in tridlm.measure.sandbox)"
    )
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="decode nothing: score every HumanEval run file's stored "
        "answers again and write OUT/eval-rescore.json with each problem whose pass moved",
    )
    ap.add_argument("--report", action="store_true", help="decode nothing: table and plot of the complete runs")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.rescore:
        return rescore(Path(args.runs), Path(args.out), args.allow_code_execution)
    report, models = run_all(
        args.tasks.split(","),
        evaluate.EvalOptions(limit=args.limit, runs=args.runs, allow_code_execution=args.allow_code_execution),
        decode=not args.report,
    )
    out = Path(args.out)
    for task, results in report.items():
        (out / f"eval-{task}.json").write_text(
            json.dumps(
                {
                    "command": "python " + " ".join(sys.argv),
                    "date": datetime.date.today().isoformat(),
                    "machine": reporting.machine(next(iter(models.values()))[0]),
                    "max_tokens": MAX_TOKENS,
                    "runs": results,
                },
                indent=2,
            )
            + "\n"
        )
        print("\n" + markdown(task, results) + "\n", flush=True)
    print("wrote", plots.eval_frontier(report, out / "eval-frontier.png"))


if __name__ == "__main__":
    main()
