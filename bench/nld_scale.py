"""Nemotron-Labs-Diffusion's real shapes on this machine: loading, AR beside llama.cpp, what a forward of n tokens
costs, and what each mode would gain at a stated acceptance.

    .venv/bin/python bench/nld_scale.py [--shapes 3b,8b] [--means 2,4,6] [--tokens 32] [--repeats 2] [--out DIR]

Per shape (random-weight NLD checkpoints at NLD's exact configs, ``tridlm.measure.random_nld``, bf16 safetensors
written once into the tridlm cache, and their int4 GGUF export, ``tridlm convert DIR OUT.gguf --dtype int4``):

- loading, in a fresh process each (bench/scale.py's child): from the safetensors directory and from the GGUF file,
  load time, time to the first token of a chat request, peak RSS; the time the conversion took;
- AR int4 decode tok/s (prefill taken out) from the GGUF beside llama.cpp's ``llama-bench`` on the same file (read as
  its ``mistral3`` architecture), runs alternating, ratio per pair;
- cost(n) / cost(1) for n = 1..32: a causal forward of n tokens over a cached context, and a drafting one (one causal
  row, n - 1 MASK rows with the draft adapter);
- end-to-end spec (linear, pipelined) and auto tok/s under an **acceptance replay**. Random weights accept nothing, so
  the drafts the model makes are replaced, after its drafting forward has run and been paid for, by the next tokens
  of the AR answer, cut after a number of accepted drafts drawn independently per cycle (each draft accepted with
  probability (m - 1) / m given the ones before it, so that the mean accepted length, drafts plus the bonus token,
  is m before the block's cap; NVIDIA reports 6.82 at block 31), each run paired with an AR run just before it (ratio
  per pair, median and range over --replay-repeats seeds). Verification is real: every replayed run is checked
  to give AR's tokens. The drafting forwards carry a rank-8 adapter on every projection (the default model's
  shipped adapter's size; the random checkpoints have none). Costs are measured, acceptance is stated. The replay
  is this script's: it wraps the drafting functions inside this process, and no decoding path of tridlm reaches it.

14B (28 GB of bf16) is estimated from 8B by its packed bytes (AR decode is memory-bound) and labelled so, unless named
in --shapes. Writes OUT/nld-scale-<date>.json and prints tables.
"""

import argparse
import dataclasses
import datetime
import json
import random
import statistics
import sys
import time
from pathlib import Path

import llamacpp
import scale
import torch

from tridlm import default_model, kernels, loading, projection
from tridlm.decode import GenerationConfig, generate, pipelined, spec
from tridlm.decode.costs import CostCurve, latency_sweep
from tridlm.measure import random_nld
from tridlm.presets import empty_model, preset

PROMPT = [{"role": "user", "content": "Write a Python function that merges two sorted lists."}]
ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = {  # label -> generation settings (block sizes: the CPU defaults of the table of modes)
    "ar": {"mode": "ar"},
    "spec linear": {"mode": "spec", "spec_variant": "linear"},
    "spec pipelined": {"mode": "spec", "spec_variant": "pipelined", "lookup": False},
    "auto": {"mode": "auto", "lookup": False},
}


def files(shape: str) -> tuple[Path, Path, float | None]:
    """The shape's safetensors directory and int4 GGUF file (written once), and the seconds converting took now."""
    directory = random_nld.path(shape)
    if not (directory / "config.json").is_file():
        print(f"writing {directory}", flush=True)
        random_nld.write(directory, random_nld.model_config(shape), random_nld.default_tokenizer())
    gguf = directory.with_name(directory.name + ".int4.gguf")
    convert_s = None
    if not gguf.is_file():
        start = time.perf_counter()
        loading.convert(directory, gguf, "int4")
        convert_s = time.perf_counter() - start
    return directory, gguf, convert_s


class Replay:
    """Draft proposals for this bench: the AR answer's next tokens, cut after a drawn number of accepted drafts."""

    def __init__(self, answer: list[int], mean: float, vocab: int, seed: int = 0):
        self.answer, self.rate, self.vocab = answer, (mean - 1) / mean, vocab
        self.rng = random.Random(seed)
        self.state = None  # the decode state of the current cycle (pipelined: seen through ``settle``)

    def proposals(self, emitted: list[int], n: int) -> list[int]:
        good = 0
        while good < n and self.rng.random() < self.rate:
            good += 1
        pos = len(emitted)
        truth = self.answer[pos : pos + n] + [0] * n
        return truth[:good] + [(t + 1) % self.vocab for t in truth[good:n]]

    def install(self) -> list:
        """Wrap the drafting functions of linear and pipelined spec; returns what ``uninstall`` puts back."""
        real_draft, real_settle, real_unmask = spec.draft, pipelined.settle, pipelined.unmasking_distribution

        def draft(model, cache, pending, state, generator):
            block, q = real_draft(model, cache, pending, state, generator)  # the drafting forward, paid for
            for i, row in enumerate(state.rows):
                block[i, 1:] = torch.tensor(self.proposals(row.tokens, block.shape[1] - 1))
            return block, q

        def settle(cache, state, *args, **kwargs):
            self.state = state
            return real_settle(cache, state, *args, **kwargs)

        def unmasking_distribution(sampler, logits, mask_id):
            dq = real_unmask(sampler, logits, mask_id)  # the MASK rows' predictions, paid for, then replaced
            for i, row in enumerate(self.state.rows):  # row 0 guesses the bonus token settle just emitted
                wanted = [row.tokens[-1], *self.proposals(row.tokens, dq.shape[1] - 1)]
                dq[i] = torch.nn.functional.one_hot(torch.tensor(wanted), dq.shape[-1]).to(dq.dtype)
            return dq

        spec.draft, pipelined.settle, pipelined.unmasking_distribution = draft, settle, unmasking_distribution
        return [real_draft, real_settle, real_unmask]

    @staticmethod
    def uninstall(saved: list) -> None:
        spec.draft, pipelined.settle, pipelined.unmasking_distribution = saved


def decode_tok_s(model, prompt: list[int], cfg: GenerationConfig, costs) -> tuple[float, list[int], list[int]]:
    """Decode tok/s with the prefill taken out (N tokens and 1 token timed apart), the tokens, the accepted lengths."""

    def run(n):
        start = time.perf_counter()
        state = generate(model, [prompt], dataclasses.replace(cfg, max_tokens=n), eos_ids=(), costs=costs)
        return time.perf_counter() - start, state.rows[0]

    one, _ = run(1)
    full, row = run(cfg.max_tokens)
    return (cfg.max_tokens - 1) / (full - one), row.tokens, row.accepted_lengths


def in_process(gguf: Path, args) -> dict:
    """Cost curves and the acceptance replay on the GGUF model loaded in this process."""
    model, tok = loading.open_model(gguf, "int4")
    model.add_lora(8, 16.0, ADAPTER_TARGETS)  # the drafting forwards pay for an adapter, of the shipped one's size
    prompt = tok.encode_chat(PROMPT)
    sizes = range(1, 33)
    costs = {}
    for kind, drafting in (("causal", False), ("drafting", True)):
        ms = latency_sweep(model, prompt, reps=args.cost_reps, sizes=sizes, drafting=drafting)
        costs[kind] = {n: ms[n] / ms[1] for n in sizes}
        print(kind, " ".join(f"{n}:{c:.2f}" for n, c in costs[kind].items() if n & (n - 1) == 0), flush=True)
    curve = CostCurve.kept(model, 32)[0]
    ar_cfg = GenerationConfig(mode="ar", max_tokens=args.tokens)
    _, answer, _ = decode_tok_s(model, prompt, ar_cfg, None)
    replays = []
    for mean in args.means:
        for label, settings in MODES.items():
            if label == "ar":
                continue
            cfg = GenerationConfig(max_tokens=args.tokens, **settings)
            runs = []
            for seed in range(args.replay_repeats):  # AR, then the mode: a ratio per pair
                ar_tok_s = decode_tok_s(model, prompt, ar_cfg, None)[0]
                replay = Replay(answer + [0] * 64, mean, model.cfg.vocab_size, seed)
                saved = replay.install()
                try:
                    tok_s, tokens, accepted = decode_tok_s(model, prompt, cfg, curve if cfg.mode == "auto" else None)
                finally:
                    Replay.uninstall(saved)
                assert tokens == answer, f"{label} under replay gave other tokens than AR"
                runs.append((tok_s, ar_tok_s, accepted))
            ratios = [t / a for t, a, _ in runs]
            replays.append(
                {
                    "mode": label,
                    "block": cfg.resolve(model).block_size,
                    "stated_mean_accepted": mean,
                    "realized_mean_accepted": statistics.mean(n for *_, acc in runs for n in acc),
                    "tok_s": [t for t, _, _ in runs],
                    "ar_tok_s": [a for _, a, _ in runs],
                    "x_ar_median": statistics.median(ratios),
                    "x_ar_range": [min(ratios), max(ratios)],
                }
            )
            r = replays[-1]
            print(f"  mean {mean}: {label:<15} accepted {r['realized_mean_accepted']:.2f}, x{r['x_ar_median']:.2f} AR "
                  f"({min(ratios):.2f}-{max(ratios):.2f})", flush=True)  # fmt: skip
    return {"cost_over_1": costs, "replay": replays}


def loading_and_ar(directory: Path, gguf: Path, binary: Path | None, args) -> dict:
    isa = kernels.runnable()[0]
    runs = {"safetensors": [], "gguf": []}
    llama = []
    for _ in range(args.repeats):
        runs["safetensors"].append(scale.tridlm_run(directory, isa, args.tokens, args.threads))
        runs["gguf"].append(scale.tridlm_run(gguf, isa, args.tokens, args.threads))
        if binary is not None:
            llama.append(scale.llama_run(binary, gguf, args.tokens, args.threads))
    out = {
        source: {
            "load_s": statistics.median(r["load_s"] for r in rs),
            "first_token_s": statistics.median(r["first_token_s"] for r in rs),
            "peak_rss_gb": max(r["rss_peak_mb"] for r in rs) / 1024,
            "ar_tok_s": [r["tok_s"] for r in rs],
        }
        for source, rs in runs.items()
    }
    ratios = [r["tok_s"] / b for r, b in zip(runs["gguf"], llama)]
    out["llama_cpp_tok_s"] = llama
    out["ar_ratio_median"] = statistics.median(ratios) if ratios else None
    out["ar_ratio_range"] = [min(ratios), max(ratios)] if ratios else None
    for source in ("safetensors", "gguf"):
        o = out[source]
        print(f"  {source:<11} load {o['load_s']:.1f} s, first token {o['first_token_s']:.1f} s, peak RSS "
              f"{o['peak_rss_gb']:.2f} GB, AR {statistics.median(o['ar_tok_s']):.2f} tok/s", flush=True)  # fmt: skip
    if ratios:
        print(f"  llama.cpp {statistics.median(llama):.2f} tok/s: tridlm x{out['ar_ratio_median']:.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})", flush=True)  # fmt: skip
    return out


def packed_gb(shape: str) -> float:
    """The int4 model's bytes (``projection.packed_bytes`` of every weight of the shape)."""
    model = empty_model(preset(f"nld-{shape}"))
    weights = {n.removesuffix(".weight"): tuple(t.shape) for n, t in model.state_dict().items() if t.dim() == 2}
    return sum(projection.packed_bytes(name, dims, "int4") for name, dims in weights.items()) / 1e9


def estimate_14b(measured: dict) -> dict:
    """14B from 8B, scaled by packed bytes (AR decode reads every weight once per token; loading reads them once)."""
    k = packed_gb("14b") / packed_gb("8b")
    m = measured["8b"]
    return {
        "estimated": f"from 8b, scaled by packed bytes ({k:.2f}x)",
        "gguf_first_token_s": m["gguf"]["first_token_s"] * k,
        "gguf_peak_rss_gb": m["gguf"]["peak_rss_gb"] * k,
        "ar_tok_s": statistics.median(m["gguf"]["ar_tok_s"]) / k,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="3b,8b")
    ap.add_argument("--means", default="2,4,6", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cost-reps", type=int, default=1, help="timed repeats of each forward size (median)")
    ap.add_argument("--replay-repeats", type=int, default=3, help="AR / mode pairs per setting (ratio per pair)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    binary = llamacpp.build("llama-bench", "native")
    results = {}
    for shape in args.shapes.split(","):
        directory, gguf, convert_s = files(shape)
        print(f"{shape}: {gguf.stat().st_size / 2**30:.2f} GiB GGUF", flush=True)
        results[shape] = {"convert_s": convert_s, **loading_and_ar(directory, gguf, binary, args)}
        results[shape].update(in_process(gguf, args))
    if "14b" not in results and "8b" in results:
        results["14b"] = estimate_14b(results)
        print("14b (estimated):", json.dumps(results["14b"]))
    report = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_isa": kernels.runnable()[0],
        "threads": args.threads,
        "acceptance": "stated (replayed), not measured: random weights accept nothing",
        "cache": str(default_model.cache_root()),
        "results": results,
    }
    out = Path(args.out) / f"nld-scale-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
