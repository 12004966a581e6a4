"""``tridlm bench``: the settings grid, the baselines, HumanEval and the latency sweep in one run (``Options``), its
table and one JSON line printed, JSON and PNG files written (``run_suite``)."""

from __future__ import annotations

import dataclasses
import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from tridlm.decode import MODES, SPEC_VARIANTS, GenerationConfig
from tridlm.measure import plots
from tridlm.measure.baselines import BASELINES, Baselines
from tridlm.measure.harness import Bench, Setting, finalize, grid, load_prompts
from tridlm.measure.reporting import table
from tridlm.model import TriModel
from tridlm.options import option
from tridlm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Options:
    """What ``tridlm bench`` runs: the tridlm settings grid, the baselines, HumanEval and the sweep."""

    prompts: str | None = option(None, "JSONL prompt set (default: the packaged chat prompts)")
    modes: tuple[str, ...] = ("ar", "spec", "diffusion")
    block_sizes: tuple[int, ...] = (4, 16)
    thresholds: tuple[float | None, ...] = (0.9, 0.5)
    spec_variants: tuple[str, ...] = option(("linear",), "linear, quadratic and/or pipelined")
    temperatures: tuple[float, ...] = (0.0,)
    batch_sizes: tuple[int, ...] = (1,)
    max_tokens: int = 64
    repeats: int = 3
    baselines: tuple[str, ...] = option(
        BASELINES,
        "hf (transformers generate), hf-lookup (its prompt lookup), llama.cpp, or none",
    )
    humaneval: int = option(0, "HumanEval problems to score (0 = skip)")
    humaneval_modes: tuple[str, ...] = ("ar", "diffusion")
    humaneval_max_tokens: int = 256
    sweep: bool = option(True, "the forward-latency sweep")
    out: str = option("bench/results", "folder for the JSON results and PNG plots")

    def validate(self) -> Options:
        bad = (
            set(self.baselines) - {*BASELINES, "none"}
            or set(self.modes) - set(MODES)
            or set(self.spec_variants) - set(SPEC_VARIANTS)
        )
        if bad:
            raise ValueError(f"unknown mode, spec variant or baseline {sorted(bad)}")
        if self.repeats < 1:
            raise ValueError("--repeats must be at least 1")
        return self


def run_suite(model: TriModel, tokenizer: Tokenizer, opts: Options, model_path: str | None, command: str) -> dict:
    """Run the whole bench, print its table and one JSON line, write JSON + PNG under ``opts.out``."""
    opts.validate()
    settings = grid(
        opts.modes,
        opts.block_sizes,
        opts.thresholds,
        opts.temperatures,
        opts.batch_sizes,
        opts.max_tokens,
        opts.spec_variants,
    )
    if "ar" not in opts.modes:  # the reference for exact match and speedups
        settings.insert(0, grid(["ar"], [1], [None], [0.0], [1], opts.max_tokens)[0])
    others = Baselines([b for b in opts.baselines if b != "none"], model_path, model.dtype, str(model.device))
    settings += [Setting(b, GenerationConfig(max_tokens=opts.max_tokens)) for b in others.names]
    he_settings = [
        dataclasses.replace(s, gen=s.gen.replace(max_tokens=opts.humaneval_max_tokens))
        for s in settings
        if s.engine == "tridlm" and s.gen.mode in opts.humaneval_modes and s.gen.temperature == 0 and s.batch_size == 1
    ]
    runner = Bench(
        model,
        tokenizer,
        settings,
        load_prompts(opts.prompts, tokenizer),
        repeats=opts.repeats,
        baselines=others,
        humaneval=opts.humaneval,
        humaneval_settings=he_settings,
        sweep=opts.sweep,
    )
    report = finalize(runner.run())
    report["command"], report["baselines_missing"] = command, others.missing
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"bench-{datetime.date.today().isoformat()}"
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    images = plots.bench(report, prefix)
    print(f"\n{table(report)}\n\nwrote {prefix.with_suffix('.json')} and {', '.join(str(p) for p in images)}")
    print(json.dumps(report))
    return report
