"""What pays in self-speculation on this machine: each lever on and off, on chat and on code prompts.

Levers: the pipelined cycle (one forward: the pending token's exact AR row, the candidates' verify rows,
MASK rows drafting past a full accept), its MASK-row drafts, prompt-lookup candidates, and ``auto``'s
per-cycle plan; beside today's linear and quadratic spec and AR, in the same process, every setting decoding
each prompt in turn. Per setting: accepted tokens per cycle, tokens per forward, tok/s and its ratio to AR
in the same precision and repeat, exact match with AR, where the verified candidates came from, and the
accepted-length histogram.

    .venv/bin/python bench/spec_ablation.py [--precisions int4,float32] [--chat 12] [--code 20]
        [--max-tokens 64,128] [--repeats 2] [--warm 60] [--adapter DIR] [--out bench/results]

Settings "+history" draft from earlier answers too (``AnswerHistory``, as a server does): a run starts from
an empty history and adds each answer once it is done, so the first prompt has none; on code, ``--warm N``
starts it instead from AR's answers to the N HumanEval problems after the measured ones (a server that has
answered other requests of the kind before).

writes OUT/spec-ablation-<date>.json and -accepted.png, prints a Markdown table per precision.
"""

import argparse
import datetime
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from tridlm.decode import AnswerHistory, CostCurve, DecodeState, GenerationConfig, generate, stream
from tridlm.loading import open_model
from tridlm.measure import evaluate, harness, plots, reporting

SETTINGS = {  # names without commas (--settings takes a comma-separated list)
    "ar": {"mode": "ar"},
    "spec linear B=8": {"mode": "spec", "block_size": 8},
    "spec quadratic B=4": {"mode": "spec", "spec_variant": "quadratic", "block_size": 4},
    # Alternates [pending, MASK x 7] and [exact token, 6 drafts]: linear spec with an exact first draft.
    "pipelined B=8 drafts": {"mode": "spec", "spec_variant": "pipelined", "block_size": 8, "lookup": False},
    "pipelined B=4 drafts": {"mode": "spec", "spec_variant": "pipelined", "block_size": 4, "lookup": False},
    "pipelined B=4 drafts+lookup": {"mode": "spec", "spec_variant": "pipelined", "block_size": 4},
    "pipelined B=8 drafts+lookup": {"mode": "spec", "spec_variant": "pipelined", "block_size": 8},
    "auto drafts": {"mode": "auto", "lookup": False},
    "auto drafts+lookup": {"mode": "auto"},
    "auto drafts+lookup+history": {"mode": "auto"},
}


def decode(
    model, prompt: list[int], cfg: GenerationConfig, history: AnswerHistory | None, sources: Counter, costs: CostCurve
) -> tuple[object, float]:
    """Decode one prompt alone; its row and wall seconds; counts the verified cycles by draft source."""
    state = DecodeState(1, cfg, model.cfg.eos_ids, None, trace=True)
    start = time.perf_counter()
    for _ in stream(model, [prompt], cfg, state=state, history=history, costs=costs):
        for _, events in state.take_trace():
            sources.update(e.get("source", "none") for e in events if e["type"] in ("verify", "step"))
    return state.rows[0], time.perf_counter() - start


def repeat(
    model,
    prompts: list[list[int]],
    names: list[str],
    max_tokens: int,
    warm: list[list[int]],
    flip: bool,
    costs: CostCurve,
) -> dict[str, tuple[list, float, Counter]]:
    """One repeat of every setting over the prompts: per prompt, each setting in turn (the order alternating
    between prompts), so that a slow spell of the machine weighs on all settings alike. Per setting: rows, wall
    seconds, verified cycles by source. A "+history" setting has its own history, started from ``warm``."""
    runs = {name: ([], 0.0, Counter()) for name in names}
    histories = {}
    for name in names:
        if name.endswith("+history"):
            histories[name] = AnswerHistory()
            for answer in warm:
                histories[name].add(answer)
    for i, prompt in enumerate(prompts):
        for name in names if (i % 2 == 0) != flip else names[::-1]:
            rows, wall, sources = runs[name]
            cfg = GenerationConfig(max_tokens=max_tokens, **SETTINGS[name])
            row, seconds = decode(model, prompt, cfg, histories.get(name), sources, costs)
            runs[name] = (rows + [row], wall + seconds, sources)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precisions", default="int4,float32")
    ap.add_argument("--chat", type=int, default=12, help="packaged chat prompts")
    ap.add_argument("--code", type=int, default=20, help="HumanEval problems, as chat requests")
    ap.add_argument("--max-tokens", default="64,128", help="new tokens for chat, code")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warm", type=int, default=0, help="+history on code: start from AR's answers to N other problems")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="names of SETTINGS, comma-separated")
    ap.add_argument("--adapter", default=None, help="draft adapter folder (default: the model's own)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    chat_tokens, code_tokens = (int(x) for x in args.max_tokens.split(","))
    names = [n for n in args.settings.split(",") if n]
    if unknown := set(names) - set(SETTINGS):
        raise SystemExit(f"unknown settings {sorted(unknown)}")
    report = {
        "machine": None,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(__import__("sys").argv),
        "threads": torch.get_num_threads(),
        "results": {},
    }
    for precision in args.precisions.split(","):
        model, tok = open_model(dtype=precision, adapter=args.adapter)
        report["machine"] = reporting.machine(model)
        # auto's cost curve is measured once per model, here rather than inside every timed auto run
        costs = CostCurve.measure(model, GenerationConfig(mode="auto").resolve(model).block_size)
        report.setdefault("relative_costs", {})[precision] = costs.upto(costs.largest)
        code = [tok.encode_chat([{"role": "user", "content": p.request}]) for p in evaluate.HumanEval().problems()]
        classes = {
            "chat": (harness.load_prompts(None, tok)[: args.chat], chat_tokens),
            "code": (code[: args.code], code_tokens),
        }
        warm = {"chat": [], "code": []}
        if args.warm and any(n.endswith("+history") for n in names):
            cfg = GenerationConfig(max_tokens=code_tokens)
            warm["code"] = [r.tokens for r in generate(model, code[args.code : args.code + args.warm], cfg).rows]
        for cls, (prompts, max_tokens) in classes.items():
            runs = {n: [] for n in names}
            for rep in range(args.repeats):  # a fresh history per repeat: a run never sees its own answers twice
                for name, result in repeat(model, prompts, names, max_tokens, warm[cls], rep % 2 == 1, costs).items():
                    runs[name].append(result)
                    print(f"{precision} {cls} repeat {rep} {name}: {result[1]:.1f} s", flush=True)
            ar_tokens = [r.tokens for r in runs["ar"][0][0]]
            out = []
            for name in names:
                rows, _, sources = runs[name][0]
                tokens, nfe = sum(len(r.tokens) for r in rows), sum(r.nfe for r in rows)
                rates = [sum(len(r.tokens) for r in rs) / wall for rs, wall, _ in runs[name]]
                x_ar = [
                    rate / (sum(len(r.tokens) for r in ar_rs) / ar_wall)
                    for rate, (ar_rs, ar_wall, _) in zip(rates, runs["ar"])
                ]
                accepted = [a for r in rows for a in r.accepted_lengths]
                out.append(
                    {
                        "setting": name,
                        "config": SETTINGS[name],
                        "tokens": tokens,
                        "nfe": nfe,
                        "tpf": tokens / nfe,
                        "tok_s": statistics.median(rates),
                        "x_ar": statistics.median(x_ar),
                        "x_ar_runs": x_ar,
                        "accepted_mean": statistics.mean(accepted) if accepted else None,
                        "accepted_hist": dict(sorted(Counter(accepted).items())),
                        "cycles_by_source": dict(sources),
                        "exact": sum(r.tokens == a for r, a in zip(rows, ar_tokens)) / len(rows),
                    }
                )
            report["results"].setdefault(precision, {})[cls] = {
                "prompts": len(prompts),
                "max_tokens": max_tokens,
                "warm_answers": len(warm[cls]),
                "settings": out,
            }
            print(table(precision, cls, out), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"spec-ablation-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plots.accepted_histograms(report["results"], stem.with_name(stem.name + "-accepted.png"))
    print(f"wrote {stem}.json")


def table(precision: str, cls: str, results: list[dict]) -> str:
    lines = [
        f"{precision}, {cls} prompts",
        "",
        "| setting | accepted / cycle | TPF | tok/s | x AR | = AR | cycles: lookup / history / draft / none |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        src = r["cycles_by_source"]
        acc = "-" if r["accepted_mean"] is None else f"{r['accepted_mean']:.2f}"
        lines.append(
            f"| {r['setting']} | {acc} | {r['tpf']:.2f} | {r['tok_s']:.1f} | {r['x_ar']:.2f} | "
            f"{r['exact']:.0%} | {src.get('lookup', 0)} / {src.get('history', 0)} / {src.get('draft', 0)} / "
            f"{src.get('none', 0)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
