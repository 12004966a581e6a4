"""What token trees could add on top of chains (issue: self-speculation that pays), measured before building them.

1. Draft top-k coverage: on the packaged chat prompts, at every other position of AR's own answer, one draft
   pass over [token, MASK x 7] (the draft adapter on) is compared with AR's next tokens: how often AR's token at
   slot d is the draft's top-1, within its top-2, 3, 4. A tree that verifies the top-k of a slot accepts there
   at most as often as top-k coverage says.
2. Lookup branches: on the AR answers of the eval runs (exact, greedy), prompt lookup with one continuation
   versus two with different first tokens sharing the same token budget: tokens per forward and the ideal
   speed-up over AR under the measured int4 forward-cost curve (``bench/results/precisions-*.json``).

    .venv/bin/python bench/tree_ceiling.py [--precision int4] [--out bench/results/tree-ceiling.json]
"""

import argparse
import json
from pathlib import Path

import torch

from tridlm import masks
from tridlm.decode import GenerationConfig, generate
from tridlm.decode.forward import forward_block, masked_block, prefill
from tridlm.loading import open_model
from tridlm.measure import evaluate, harness

RUNS = {
    "humaneval": "bench/results/eval-runs/humaneval-ar-int4-69084718.jsonl",
    "gsm8k": "bench/results/eval-runs/gsm8k-ar-int4-c3d837d6.jsonl",
}
COSTS = "bench/results/precisions-2026-11-29.json"


@torch.inference_mode()
def draft_coverage(model, prompts, max_tokens=64, ks=(1, 2, 3, 4), slots=(1, 2, 3)) -> dict:
    hits = {d: dict.fromkeys(ks, 0) for d in slots}
    n = 0
    for p in prompts:
        g = generate(model, [p], GenerationConfig(max_tokens=max_tokens)).rows[0].tokens
        for i in range(1, len(g) - max(slots), 2):
            cache, _ = prefill(model, [p + g[: i - 1]], max_len=len(p) + len(g) + 10)
            block = masked_block(torch.tensor([g[i - 1]]), 8, model.cfg.mask_id)
            logits = forward_block(model, cache, block, masks.bidirectional, adapter=True)
            logits[..., model.cfg.mask_id] = float("-inf")
            top = logits[0].topk(max(ks), -1).indices
            n += 1
            for d in slots:
                for k in ks:
                    hits[d][k] += int(g[i + d - 1] in top[d, :k].tolist())
    return {f"slot {d}": {f"top-{k}": hits[d][k] / n for k in ks} for d in slots} | {"positions": n}


def continuations(seq: list[int], budget: int, branches: int, longest: int = 3) -> list[list[int]]:
    """Up to ``branches`` lookup continuations with different first tokens (longest match, latest first),
    sharing ``budget`` tokens (the first branch gets the larger half)."""
    out, firsts = [], set()
    for n in range(longest, 0, -1):
        for s in range(len(seq) - n - 1, -1, -1) if len(seq) > n else ():
            if seq[s : s + n] == seq[-n:] and (cont := seq[s + n : s + n + budget]) and cont[0] not in firsts:
                out.append(cont)
                firsts.add(cont[0])
                if len(out) == branches:
                    break
        if len(out) == branches:
            break
    shares = [budget - budget // 2, budget // 2] if len(out) == 2 else [budget]
    return [c[:k] for c, k in zip(out, shares)]


def lookup_branches(tok, task: str, path: str, cost: dict[int, float], budget: int, branches: int) -> dict:
    problems = {p.id: p for p in evaluate.TASKS[task]().problems()}
    records = [json.loads(line) for line in Path(path).read_text().splitlines()][1:]
    tokens = forwards = spent = 0
    for r in records:
        prompt, g = tok.encode_chat([{"role": "user", "content": problems[r["id"]].request}]), r["tokens"]
        i = 1
        while i < len(g):
            conts = continuations(prompt + g[:i], budget, branches)
            best = 0
            for c in conts:
                k = 0
                while k < len(c) and i + k < len(g) and c[k] == g[i + k]:
                    k += 1
                best = max(best, k)
            forwards += 1
            spent += cost[1 + sum(len(c) for c in conts)]
            tokens += best + 1
            i += best + 1
    return {"tpf": tokens / forwards, "ideal_x_ar": tokens / spent}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--out", default="bench/results/tree-ceiling.json")
    args = ap.parse_args()
    model, tok = open_model(dtype=args.precision)
    report = {"draft_coverage": draft_coverage(model, harness.load_prompts(None, tok))}
    raw = json.loads(Path(COSTS).read_text())["cost_ms"][args.precision]
    cost = {int(n): ms / raw["1"] for n, ms in raw.items()}
    report["lookup"] = {
        f"{task} budget {b} branches {br}": lookup_branches(tok, task, path, cost, b, br)
        for task, path in RUNS.items()
        for b in (3, 7)
        for br in (1, 2)
    }
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
