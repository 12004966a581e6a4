"""What one continuous-batching step costs per running row: the default model (int4, 2 threads), 1-8 chat prompts
admitted into a ``decode.batcher.Batcher``, then the median time of 40 steps of all of them.

    .venv/bin/python bench/batch_step.py [--rows 1,2,4,8]
"""

import argparse
import statistics
import time

import torch

from tridlm import harness
from tridlm.decode import DecodeState, GenerationConfig
from tridlm.decode.batcher import Batcher
from tridlm.loading import open_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = open_model()
    prompts = harness.load_prompts(None, tok)
    cfg = GenerationConfig(max_tokens=200).resolve(model)
    print("| rows | ms per step | ms per row |\n|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        batcher = Batcher(model, rows, 1024)
        for i in range(rows):
            batcher.admit(DecodeState(1, cfg, (), None), 0, prompts[i % len(prompts)], None)
        times = []
        for _ in range(40):
            start = time.perf_counter()
            batcher.step()
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        print(f"| {rows} | {ms:.2f} | {ms / rows:.2f} |")


if __name__ == "__main__":
    main()
