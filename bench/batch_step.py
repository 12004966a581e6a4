"""What one continuous-batching step costs: the default model (int4, 2 threads), 1-8 chat prompts admitted into
a ``decode.batcher.Batcher``, then the median time of a causal forward over all rows with 1 + M tokens each (M = 0:
an AR step; M > 0: what verifying M candidates per row in the same forward would cost).

    .venv/bin/python bench/batch_step.py [--rows 1,4,8] [--extra 0,1,2,4]
"""

import argparse
import statistics
import time

import torch

from tridlm import masks
from tridlm.decode import DecodeState, GenerationConfig
from tridlm.decode.batcher import Batcher
from tridlm.decode.forward import forward_block
from tridlm.loading import open_model
from tridlm.measure import harness


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,8")
    ap.add_argument("--extra", default="0,1,2,4")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = open_model()
    prompts = harness.load_prompts(None, tok)
    cfg = GenerationConfig(max_tokens=400).resolve(model)
    extras = [int(m) for m in args.extra.split(",")]
    print(f"| rows | {' | '.join(f'ms, 1 + {m} tokens per row' for m in extras)} |\n|---|{'---|' * len(extras)}")
    for rows in (int(r) for r in args.rows.split(",")):
        batcher = Batcher(model, rows, 1024)
        for i in range(rows):
            batcher.admit(DecodeState(1, cfg, (), None), 0, prompts[i % len(prompts)], None)
        for _ in range(5):
            batcher.step()
        cells = []
        for m in extras:
            times = []
            for _ in range(args.repeats):
                view = batcher.cache.rows(0, rows)  # the forward's commit stays in the view: the pool is unchanged
                tokens = torch.randint(100, 1000, (rows, 1 + m))
                start = time.perf_counter()
                forward_block(model, view, tokens, masks.causal, write=True)
                times.append(time.perf_counter() - start)
            cells.append(f"{statistics.median(times) * 1e3:.2f}")
        print(f"| {rows} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
