"""What the playground's trace stream costs the decoders: every mode decoded with tracing off and on,
alternating, on the packaged chat prompts (default model, greedy). With tracing off a decoder only checks
one flag per step and row.

    .venv/bin/python bench/trace_cost.py [--dtype int4] [--repeats 3] [--out bench/results]

writes <out>/trace-cost-<date>.json (the tok/s of every repeat, the machine and the command).
"""

import argparse
import statistics
import time

import torch

from tridlm.decode import DecodeState, GenerationConfig, stream
from tridlm.loading import open_model
from tridlm.measure import harness, reporting

SETTINGS = {
    "ar": GenerationConfig(max_tokens=64),
    "spec B=8": GenerationConfig(mode="spec", block_size=8, max_tokens=64),
    "diffusion B=4": GenerationConfig(mode="diffusion", block_size=4, max_tokens=64),
}


def run(model, prompts, cfg: GenerationConfig, trace: bool) -> float:
    tokens, start = 0, time.perf_counter()
    for p in prompts:
        state = DecodeState(1, cfg, model.cfg.eos_ids, None, trace=trace)
        for _ in stream(model, [p], cfg, state=state):
            state.take_trace()
        tokens += len(state.rows[0].tokens)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="int4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = open_model(dtype=args.dtype)
    prompts = harness.load_prompts(None, tok)
    speed = {}
    for rep in range(args.repeats):
        for trace in (False, True) if rep % 2 == 0 else (True, False):
            for name, cfg in SETTINGS.items():
                speed.setdefault((name, trace), []).append(run(model, prompts, cfg, trace))
    print(f"| mode ({args.dtype}) | trace off tok/s | trace on tok/s | on / off |\n|---|---|---|---|")
    rows = {}
    for name in SETTINGS:
        off, on = statistics.median(speed[name, False]), statistics.median(speed[name, True])
        rows[name] = {"off_tok_s": speed[name, False], "on_tok_s": speed[name, True], "on_over_off": on / off}
        print(f"| {name} | {off:.1f} | {on:.1f} | {on / off:.3f} |")
    reporting.write_report(args.out, "trace-cost", model, rows)


if __name__ == "__main__":
    main()
