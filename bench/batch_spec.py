"""Speculation inside the continuous batch: the default model (int4, 2 threads) decoding code (HumanEval) or chat
prompts through a ``decode.batcher.Batcher`` of ``--rows`` rows, closed loop (a row that ends is replaced by the next
prompt at once), in AR and in ``auto`` (lookup and, with ``--history``, the answers decoded before), the modes
alternating per repeat. Per mode: aggregate tok/s, tokens per row-forward, and whether auto's tokens equal AR's.

    .venv/bin/python bench/batch_spec.py [--rows 8] [--prompts code|chat] [--count 24] [--max-tokens 128] [--history]
        [--verify-all]

writes OUT/batch-spec-<prompts>-<rows>rows-<date>.json and prints a table.
"""

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from tridlm.decode import AnswerHistory, CostCurve, DecodeState, GenerationConfig
from tridlm.decode.batcher import Batcher
from tridlm.loading import open_model
from tridlm.measure import evaluate, harness, reporting


@torch.inference_mode()
def run(model, prompts, cfg, rows, costs, history) -> tuple[float, list[list[int]], int]:
    """Decode every prompt through a batcher of ``rows`` rows, closed loop; (seconds, tokens, row-forwards)."""
    batcher, states, waiting = Batcher(model, rows, 2048, costs=costs), [], list(range(len(prompts)))
    start, forwards, added = time.perf_counter(), 0, set()
    while waiting or batcher.busy:
        while waiting and batcher.free:
            k = waiting.pop(0)
            states.append((k, DecodeState(1, cfg, model.cfg.eos_ids, None)))
            batcher.admit(states[-1][1], 0, prompts[k], None, history)
        forwards += len(batcher.slots)
        batcher.step()
        for k, state in states:
            if history is not None and state.all_done and k not in added:  # each answer joins once it is done
                history.add(state.rows[0].tokens)
                added.add(k)
    seconds = time.perf_counter() - start
    return seconds, [s.rows[0].tokens for _, s in sorted(states, key=lambda x: x[0])], forwards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompts", choices=("code", "chat"), default="code")
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--history", action="store_true", help="auto also drafts from the answers decoded before")
    ap.add_argument("--verify-all", action="store_true", help="an ablation: auto rows verify every candidate, no plan")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = open_model()
    if args.prompts == "code":
        prompts = [tok.encode_chat([{"role": "user", "content": p.request}]) for p in evaluate.HumanEval().problems()]
    else:
        prompts = harness.load_prompts(None, tok)
    prompts = prompts[: args.count]
    auto = GenerationConfig(mode="auto", max_tokens=args.max_tokens).resolve(model)
    costs = CostCurve.measure(model, auto.block_size, rows=args.rows)
    cfgs = {"ar": GenerationConfig(max_tokens=args.max_tokens).resolve(model), "auto": auto}
    results = {name: [] for name in cfgs}
    for rep in range(args.repeats):
        for name in list(cfgs)[:: 1 if rep % 2 == 0 else -1]:
            history = AnswerHistory() if args.history and name == "auto" else None
            plan = None if args.verify_all else costs
            seconds, tokens, forwards = run(model, prompts, cfgs[name], args.rows, plan, history)
            results[name].append((seconds, tokens, forwards))
            n = sum(map(len, tokens))
            print(
                f"repeat {rep} {name}: {n / seconds:.1f} tok/s, {n / forwards:.2f} tokens per row-forward", flush=True
            )
    ar_tokens = results["ar"][0][1]
    table = {}
    for name, runs in results.items():
        n = sum(map(len, runs[0][1]))
        rates = [n / s for s, _, _ in runs]
        table[name] = {
            "tok_s": statistics.median(rates),
            "tok_s_runs": rates,
            "tokens_per_row_forward": n / runs[0][2],
            "same_tokens_as_ar": all(t == ar_tokens for _, t, _ in runs),
        }
    ratios = [a / b for a, b in zip(table["auto"]["tok_s_runs"], table["ar"]["tok_s_runs"])]
    print(f"| mode | tok/s ({args.rows} rows, {args.prompts}) | tokens per row-forward | tokens == AR |")
    print("|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['tok_s']:.1f} | {r['tokens_per_row_forward']:.2f} | {r['same_tokens_as_ar']} |")
    print(f"auto / ar: {statistics.median(ratios):.3f} (runs {', '.join(f'{r:.3f}' for r in ratios)})")
    report = {
        "machine": reporting.machine(model),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(__import__("sys").argv),
        "rows": args.rows,
        "prompts": args.prompts,
        "history": args.history,
        "verify_all": args.verify_all,
        "step_costs": {"verify": costs.verify, "rows": costs.rows},
        "results": table,
        "auto_over_ar": ratios,
    }
    variant = ("-history" if args.history else "") + ("-verify-all" if args.verify_all else "")
    name = f"batch-spec-{args.prompts}-{args.rows}rows{variant}-{report['date']}.json"
    out = Path(args.out) / name
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
