"""The output head of a GGUF model whose head is tied to its Q8_0 embedding, two ways, side by side in one process:
``q8_0`` computes on the embedding's own bytes (``tridlm.quant.Q8Table``: a float16 scale per block of 32, the
table held once; what loading does) and ``int8`` on a per-channel int8 copy of the table (what loading did
before: a second table in memory).

    .venv/bin/python bench/q8_head.py [--model FILE.gguf] [--repeats 6] [--out bench/results]

Reports, per head: its bytes; its fidelity to the float32 model (teacher-forced on the float32 model's own
HumanEval and GSM8K answers from ``make eval``'s runs, bench/results/eval-runs/: top-1 agreement and mean KL of
the float32 distribution to the int4 model's, over the answers' positions; default model only); and int4 AR
decode speed (64 tokens after a chat prompt, the two heads alternating, ratio per pair).
"""

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

from tridlm import quant
from tridlm.decode import GenerationConfig, generate
from tridlm.loading import open_model
from tridlm.measure import evaluate, harness

RUNS = Path("bench/results/eval-runs")


def fidelity(model, reference, tok, heads: dict) -> dict:
    """Per head: top-1 agreement with ``reference`` (float32) and mean KL(reference || model) over the positions of
    the float32 model's eval answers (teacher-forced: every position sees the float32 answer so far)."""
    found = {h: {"agree": 0, "kl": 0.0, "positions": 0} for h in heads}
    for task in ("humaneval", "gsm8k"):
        (path,) = RUNS.glob(f"{task}-ar-float32-*.jsonl")
        answers = {r["id"]: r["tokens"] for r in map(json.loads, path.open()) if "id" in r}
        for problem in evaluate.TASKS[task]().problems():
            prompt = tok.encode_chat([{"role": "user", "content": problem.request}])
            want = harness.answer_logprobs(reference, prompt, answers[problem.id])
            for name, head in heads.items():
                model.diffusion_head.packed = head
                got = harness.answer_logprobs(model, prompt, answers[problem.id])
                found[name]["agree"] += (got.argmax(-1) == want.argmax(-1)).sum().item()
                found[name]["kl"] += (want.exp() * (want - got)).sum().item()
                found[name]["positions"] += len(want)
    return {h: {"top1_agree": f["agree"] / f["positions"], "kl": f["kl"] / f["positions"]} for h, f in found.items()}


def speed(model, tok, heads: dict, repeats: int) -> dict:
    prompt = tok.encode_chat([{"role": "user", "content": "Write a Python function that merges two sorted lists."}])

    def timed(n):
        start = time.perf_counter()
        generate(model, [prompt], GenerationConfig(mode="ar", max_tokens=n), eos_ids=())
        return time.perf_counter() - start

    tok_s = {h: [] for h in heads}
    for _ in range(repeats):
        for name, head in heads.items():
            model.diffusion_head.packed = head
            timed(4)  # warm-up
            one, full = timed(1), timed(65)
            tok_s[name].append(64 / (full - one))
    (a, b) = heads
    ratios = [x / y for x, y in zip(tok_s[a], tok_s[b])]
    return {"tok_s": tok_s, f"{a}/{b}": {"median": statistics.median(ratios), "range": [min(ratios), max(ratios)]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF file with a tied Q8_0 embedding (default: the default model)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = open_model(args.model, "int4")
    table = model.diffusion_head.packed
    if not isinstance(table, quant.Q8Table):
        raise SystemExit(f"{args.model or 'the default model'}: the head is not tied to a Q8_0 embedding")
    heads = {"q8_0": table, "int8": quant.Int8Weight.from_float(table.dequantize())}
    sizes = {"q8_0": 0, "int8": sum(t.nbytes for t in (heads["int8"].codes, heads["int8"].scales))}
    result = {
        "command": "python bench/q8_head.py" + (f" --model {args.model}" if args.model else ""),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "extra_table_mib": {h: s / 2**20 for h, s in sizes.items()},
    }
    with torch.inference_mode():
        if args.model is None:
            reference, _ = open_model(None, "float32")
            result["fidelity_to_float32"] = fidelity(model, reference, tok, heads)
            del reference
        result["ar"] = speed(model, tok, heads, args.repeats)
    print(json.dumps(result, indent=1))
    name = "q8-head" + (f"-{Path(args.model).stem}" if args.model else "") + f"-{datetime.date.today()}.json"
    Path(args.out, name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
