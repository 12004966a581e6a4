"""What one AR step of the default model costs on this machine, and where its time goes.

    .venv/bin/python bench/ar_step.py [--dtype int4] [--steps 64] [--compile] [--profile]

Prefills a short prompt (no chat template), then times AR steps (the decoders' ``forward_block``, 2 threads,
inference mode),
twice, and checks both runs emit the same tokens. ``--compile`` times the whole forward under
``torch.compile`` instead (compile time reported). ``--profile`` decodes the 12 packaged chat prompts in
``auto`` under cProfile and prints forwards, ms per forward and the main costs per forward.
"""

import argparse
import cProfile
import pstats
import time

import torch

from tridlm import masks
from tridlm.decode import GenerationConfig, generate
from tridlm.decode.forward import forward_block
from tridlm.loading import open_model
from tridlm.measure import harness

PROMPT = "Write a short poem about the sea and the wind, in four lines."
# cProfile entries reported per forward: (label, substring of pstats' function key)
COSTS = (
    ("int4 projections", ".int4_linear"),
    ("int8 output head", ".int8_linear"),
    ("kernels.attend", ".attend"),
    ("kernels.rms_norm", ".rms_norm"),
    ("kernels.rope", ".rope"),
    ("nn.Module.__getattr__", "__getattr__"),
)


@torch.inference_mode()
def steps(model, forward, tok, n: int) -> tuple[list[int], float]:
    cache = model.new_cache(1, 512)
    logits = forward_block(model, cache, torch.tensor([tok.encode(PROMPT)]), masks.causal, write=True)
    pending, out = logits[:, -1].argmax(-1), []
    start = time.perf_counter()
    for _ in range(n):
        pending = forward_block(forward, cache, pending[:, None], masks.causal, write=True)[:, -1].argmax(-1)
        out.append(int(pending))
    return out, (time.perf_counter() - start) / n * 1000


def profile(model, tok) -> None:
    prompts = harness.load_prompts(None, tok)[:12]
    cfg = GenerationConfig(mode="auto", max_tokens=64)
    generate(model, prompts[:1], cfg)  # auto's cost curve, measured once per model
    prof = cProfile.Profile()
    prof.enable()
    start, forwards = time.perf_counter(), 0
    for p in prompts:
        forwards += generate(model, [p], cfg).forwards
    wall = time.perf_counter() - start
    prof.disable()
    stats = pstats.Stats(prof).stats
    print(
        f"auto, {len(prompts)} chat prompts: {forwards} forwards, {wall / forwards * 1000:.2f} ms per forward "
        "(under cProfile)"
    )
    for label, key in COSTS:
        seconds = sum(tt for func, (_, _, tt, _, _) in stats.items() if key in str(func))
        print(f"  {label:<24} {seconds / forwards * 1000:.2f} ms per forward")
    in_forwards = sum(ct for (_, _, name), (_, _, _, ct, _) in stats.items() if name == "forward_block")
    print(
        f"  outside the forwards     {(wall - in_forwards) / forwards * 1000:.2f} ms per forward (the decoder's "
        "own work: planning, lookup, verification, sampling)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="int4")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="time torch.compile(model) instead of the eager model")
    ap.add_argument("--profile", action="store_true", help="where auto's forwards spend their time (cProfile)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = open_model(dtype=args.dtype)
    if args.profile:
        return profile(model, tok)
    forward = model
    if args.compile:
        forward = torch.compile(
            model, dynamic=True, options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        )
        start = time.perf_counter()
        steps(model, forward, tok, 4)
        print(f"torch.compile: {time.perf_counter() - start:.1f} s to compile and run 4 steps")
    (first, ms1), (second, ms2) = steps(model, forward, tok, args.steps), steps(model, forward, tok, args.steps)
    print(
        f"{args.dtype}{' compiled' if args.compile else ''}: {ms1:.2f} and {ms2:.2f} ms per AR step, "
        f"same tokens: {first == second}"
    )


if __name__ == "__main__":
    main()
