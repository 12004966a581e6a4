"""Where a constrained greedy AR step's time goes (what docs/design.md's "What a mask costs" rests on).

On bench/structured.py's five requests (the default model, int4, ``--threads``), greedy AR three ways, interleaved over
``--repeats``: free (held to the constrained reply's length), constrained as tridlm decodes (the model's best tokens
checked before a mask is computed), and constrained with every mask computed (``Constraint.along`` given no
candidates). Per step: the forward's time, the rest of the step, and the masks computed. Then what one mask costs
right after a forward (timed inside the constrained decode) against the same mask computed again at once (its data
in cache), and torch's argmax against ``tridlm.sampling.argmax`` over the vocabulary's logits, for 1 and 9 rows.

    .venv/bin/python bench/grammar_step.py [--repeats 5] [--threads 2] [--out bench/results]

writes OUT/grammar-step-DATE.json and prints its tables.
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import structured
import torch

import tridlm.decode.ar as ar_module
from tridlm import loading
from tridlm.decode import GenerationConfig, generate
from tridlm.grammar import Constraint, Grammars
from tridlm.measure import reporting
from tridlm.sampling import argmax

SETTINGS = ("free", "constrained", "every mask")


class Clock:
    """The forward's time per AR step, and each mask computed with its time."""

    def __init__(self):
        self.forward, self.steps, self.masks = 0.0, 0, []

    def install(self):
        forward, allowed = ar_module.forward_block, Constraint._allowed

        def timed_forward(*args, **kwargs):
            begin = time.perf_counter()
            out = forward(*args, **kwargs)
            self.forward, self.steps = self.forward + time.perf_counter() - begin, self.steps + 1
            return out

        def timed_mask(constraint):
            begin = time.perf_counter()
            out = allowed(constraint)
            self.masks.append(time.perf_counter() - begin)
            return out

        ar_module.forward_block, Constraint._allowed = timed_forward, timed_mask


def steps(model, tok, grammars, clock: Clock, repeats: int) -> list[dict]:
    along = Constraint.along
    every_mask = lambda constraint, tokens, ranked=None: along(constraint, tokens)  # noqa: E731
    found = {}
    for _ in range(repeats):
        for name, (messages, schema) in structured.REQUESTS.items():
            ids, grammar = tok.encode_chat(messages), grammars.compile("json_schema", schema)
            length = None
            for setting in ("constrained", "every mask", "free"):
                Constraint.along = every_mask if setting == "every mask" else along
                cfg = GenerationConfig(max_tokens=length or 200, grammar=None if setting == "free" else grammar)
                clock.__init__()
                state = generate(model, [ids], cfg)
                row = state.rows[0]
                length = length or len(row.tokens)
                step = (row.last_token_s - row.first_token_s) / clock.steps
                found.setdefault((name, setting), []).append(
                    (step, clock.forward / clock.steps, len(clock.masks) / clock.steps, row.tokens)
                )
    Constraint.along = along
    rows = []
    for (name, setting), runs in found.items():
        rows.append(
            {
                "request": name,
                "setting": setting,
                "step_ms": 1e3 * statistics.median(r[0] for r in runs),
                "forward_ms": 1e3 * statistics.median(r[1] for r in runs),
                "rest_ms": 1e3 * statistics.median(r[0] - r[1] for r in runs),
                "masks_per_step": runs[0][2],
                "tokens_equal_constrained": runs[0][3] == found[name, "constrained"][0][3],
            }
        )
    return rows


def mask_costs(model, tok, grammars, clock: Clock) -> dict:
    """Each mask's time inside a decode (after a forward), then each computed twice at once on the same tokens."""
    after, warm = [], []
    for messages, schema in structured.REQUESTS.values():
        grammar = grammars.compile("json_schema", schema)
        cfg = GenerationConfig(max_tokens=200, grammar=grammar, logprobs=0)  # every position's mask
        clock.__init__()
        state = generate(model, [tok.encode_chat(messages)], cfg)
        after += clock.masks
        constraint = grammar.start()
        for token in state.rows[0].tokens[:-1]:
            clock.masks = []
            constraint.allowed(), constraint.allowed()
            warm.append(clock.masks[1])
            constraint.commit([token])
    return {"after_forward_us": 1e6 * statistics.median(after), "warm_us": 1e6 * statistics.median(warm)}


def argmaxes(vocab: int) -> dict:
    out = {}
    for rows in (1, 9):
        logits = torch.randn(rows, vocab)
        for label, fn in (("torch", lambda x: x.argmax(-1)), ("tridlm", argmax)):
            times = []
            for _ in range(5):
                begin = time.perf_counter()
                for _ in range(500):
                    fn(logits)
                times.append((time.perf_counter() - begin) / 500)
            out[f"{label}, {rows} row{'s' if rows > 1 else ''}"] = 1e6 * statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = loading.open_model(dtype="int4")
    grammars = Grammars(tok, model.cfg.vocab_size, model.cfg.eos_ids)
    generate(model, [tok.encode("Hello")], GenerationConfig(max_tokens=8, grammar=grammars.compile("json_object")))
    clock = Clock()
    clock.install()
    report = {"command": "python " + " ".join(sys.argv), "machine": reporting.machine(model)}
    report["steps"] = steps(model, tok, grammars, clock, args.repeats)
    report["masks"] = mask_costs(model, tok, grammars, clock)
    report["argmax_us"] = argmaxes(model.cfg.vocab_size)
    print("| request | setting | step ms | forward ms | rest ms | masks per step | tokens = constrained |")
    for r in report["steps"]:
        print(
            f"| {r['request']} | {r['setting']} | {r['step_ms']:.3f} | {r['forward_ms']:.3f} | {r['rest_ms']:.3f} "
            f"| {r['masks_per_step']:.2f} | {r['tokens_equal_constrained']} |"
        )
    print(
        f"one mask: {report['masks']['after_forward_us']:.1f} us after a forward, {report['masks']['warm_us']:.1f} warm"
    )
    print("argmax over the vocabulary, us:", {k: round(v, 1) for k, v in report["argmax_us"].items()})
    out = Path(args.out) / f"grammar-step-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
