"""The standard suite through lm-eval (``tridlm eval`` over ``measure.suite_data``): the README's skeptic's table.

Parts (``--parts``, run in this order, MMLU's 14,042 last; each run resumes from its cache in ``--runs``):

- ``agreement``: the first ``--subset`` MMLU questions of every subject (1,140 at 20) scored four ways, each through
  lm-eval: tridlm float32, transformers float32 on the same GGUF file (lm-eval's ``hf`` model: an independent
  implementation, same prompts), tridlm int4, and lm-eval's ``local-completions`` client against ``tridlm serve``
  (int4). Per question the chosen answer of each; the share on which pairs agree. -> OUT/lm-eval-agreement-DATE.json
- ``mmlu``: all 14,042 questions in int4, per-subject scores. -> OUT/eval-mmlu.json
- ``arc``, ``truthfulqa``: ARC-Challenge (1,172) and TruthfulQA MC1 (817) in int4 and float32.
  -> OUT/eval-arc-challenge.json, OUT/eval-truthfulqa-mc1.json
- ``gsm8k``: GSM8K's 1,319 (``--gsm8k-limit``: the first N) in int4 with ar, auto, spec B=8 and diffusion B=4 at two
  thresholds, one question at a time: accuracy, TPF, tok/s, the share of questions whose tokens equal AR's.
  -> OUT/eval-gsm8k-full.json

    .venv/bin/python bench/suite_table.py [--parts agreement,mmlu,arc,truthfulqa,gsm8k] [--subset 20]
        [--gsm8k-limit N] [--out bench/results] [--runs bench/results/eval-runs]
"""

import argparse
import datetime
import json
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import lm_eval
import torch
from lm_eval.tasks import TaskManager
from serve_single import start_server

from tridlm import default_model, loading
from tridlm.decode import GenerationConfig
from tridlm.measure import evaluate, lmeval, reporting, suite_data

GSM8K = [
    ("ar", GenerationConfig()),
    ("auto", GenerationConfig(mode="auto")),
    ("spec B=8", GenerationConfig(mode="spec", block_size=8)),
    ("diffusion B=4 t=0.9", GenerationConfig(mode="diffusion", block_size=4, threshold=0.9)),
    ("diffusion B=4 t=0.5", GenerationConfig(mode="diffusion", block_size=4, threshold=0.5)),
]


def header(models: dict) -> dict:
    model = next(iter(models.values()))[0]
    return {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat()} | {
        "machine": reporting.machine(model)
    }


def opened(models: dict, precision: str):
    return models.setdefault(precision, loading.open_model(dtype=precision))


def write(path: Path, body: dict) -> None:
    path.write_text(json.dumps(body, indent=2) + "\n")
    print("wrote", path, flush=True)


# ------------------------------------------------------------------------------------------ agreement


def choices(out: dict) -> dict:
    """(task, doc) -> the index of the answer an lm-eval run chose (its highest log-likelihood)."""
    return {
        f"{task}/{s['doc_id']}": max(range(len(s["filtered_resps"])), key=lambda i: float(s["filtered_resps"][i][0]))
        for task, samples in out["samples"].items()
        for s in samples
    }


def agreement(models: dict, subset: int, out: Path) -> None:
    tasks = TaskManager(include_path=str(suite_data.write_tasks()))
    common = {"tasks": ["tridlm_mmlu"], "limit": subset, "task_manager": tasks, "bootstrap_iters": 0}
    runs, picked = {}, {}

    def record(name, model, **args):
        begin = time.perf_counter()
        result = lm_eval.simple_evaluate(model=model, **common, **args)
        runs[name] = {"acc": result["results"]["tridlm_mmlu"]["acc,none"], "wall_s": time.perf_counter() - begin}
        picked[name] = choices(result)
        print(name, runs[name], flush=True)

    for precision in ("float32", "int4"):
        record(f"tridlm {precision}", lmeval.TridlmLM(*opened(models, precision)))
    gguf = default_model.gguf_path()
    hf_args = {"pretrained": str(gguf.parent), "gguf_file": gguf.name, "dtype": "float32", "device": "cpu"}
    record("transformers float32", "hf", model_args=hf_args, batch_size=4)
    process, url = start_server(2, ["--dtype", "int4"])
    try:
        with tempfile.TemporaryDirectory() as folder:
            opened(models, "int4")[1].save(Path(folder))  # the tokenizer local-completions counts contexts with
            args = f"model={default_model.NAME},base_url={url}/v1/completions,tokenizer={folder}"
            args += ",tokenizer_backend=huggingface"
            record("local-completions -> tridlm serve int4", "local-completions", model_args=args, batch_size=4)
    finally:
        process.terminate()
        process.wait(timeout=60)
    pairs = {}
    for a, b in combinations(picked, 2):
        same = [q for q in picked[a] if picked[a][q] == picked[b].get(q)]
        pairs[f"{a} | {b}"] = {"same": len(same), "of": len(picked[a]), "share": len(same) / len(picked[a])}
        print(a, "|", b, pairs[f"{a} | {b}"], flush=True)
    write(
        out / f"lm-eval-agreement-{datetime.date.today().isoformat()}.json",
        {**header(models), "task": "tridlm_mmlu", "limit_per_subject": subset, "runs": runs, "agreement": pairs},
    )


# ------------------------------------------------------------------------------------------ scored tasks


def scored(models: dict, task: str, precisions: tuple[str, ...], runs: str, out: Path) -> None:
    results = []
    for precision in precisions:
        model, tok = opened(models, precision)
        gen = GenerationConfig()
        settings = evaluate.run_settings(task, model, default_model.NAME, precision, None, gen, 1)
        result = lmeval.run(task, model, tok, gen, settings, evaluate.EvalOptions(runs=runs))
        print(lmeval.describe(result), flush=True)
        results.append(result)
    write(out / f"eval-{task}.json", {**header(models), "runs": results})


def gsm8k(models: dict, limit: int | None, runs: str, out: Path) -> None:
    model, tok = opened(models, "int4")
    results = []
    for name, gen in GSM8K:
        settings = evaluate.run_settings("gsm8k-full", model, default_model.NAME, "int4", None, gen, 1)
        result = {
            "setting": name,
            **lmeval.run("gsm8k-full", model, tok, gen, settings, evaluate.EvalOptions(limit=limit, runs=runs)),
        }
        print(lmeval.describe(result), flush=True)
        results.append(result)
    ar = rows(results[0])
    for r in results:
        mine = rows(r)
        common = ar.keys() & mine.keys()
        r["same_tokens_as_ar"] = sum(ar[k] == mine[k] for k in common) / len(common) if common else None
    write(out / "eval-gsm8k-full.json", {**header(models), "runs": results})


def rows(result: dict) -> dict:
    """A generation run's tokens per question (its rows file)."""
    path = Path(result["run_file"] + ".rows.jsonl")
    return {r["key"]: r["tokens"] for r in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="agreement,mmlu,arc,truthfulqa,gsm8k")
    ap.add_argument("--subset", type=int, default=20, help="MMLU questions per subject for the agreement")
    ap.add_argument("--gsm8k-limit", type=int, help="the first N GSM8K questions (default: all 1,319)")
    ap.add_argument("--runs", default="bench/results/eval-runs")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out, models, parts = Path(args.out), {}, args.parts.split(",")
    out.mkdir(parents=True, exist_ok=True)
    if "agreement" in parts:
        agreement(models, args.subset, out)
    for part, task in (("arc", "arc-challenge"), ("truthfulqa", "truthfulqa-mc1")):
        if part in parts:
            scored(models, task, ("int4", "float32"), args.runs, out)
    if "gsm8k" in parts:
        gsm8k(models, args.gsm8k_limit, args.runs, out)
    if "mmlu" in parts:  # the longest, last
        scored(models, "mmlu", ("int4",), args.runs, out)


if __name__ == "__main__":
    main()
