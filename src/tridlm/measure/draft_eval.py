"""Held-out evaluation of a draft adapter (``tridlm eval-draft``): spec's accepted length and diffusion's quality
on a prompt set, for one adapter or along a training run's snapshots (the acceptance curve)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tridlm import checkpoint
from tridlm.decode import MODES, SPEC_VARIANTS, CostCurve
from tridlm.measure import plots
from tridlm.measure.harness import Setting, grid, load_prompts, run_tridlm, summarize
from tridlm.model import TriModel
from tridlm.options import option
from tridlm.tokenizer import Tokenizer


def eval_draft(model: TriModel, prompts: list[list[int]], settings: list[Setting]) -> dict:
    """``summarize`` per setting (one untimed run each, auto's with a cost curve measured for it): what
    ``tridlm eval-draft`` reports."""
    return {
        s.name: summarize(model, prompts, run_tridlm(model, prompts, s, CostCurve.for_config(model, s.gen)))
        for s in settings
    }


@dataclass(frozen=True)
class DraftOptions:
    """What ``tridlm eval-draft`` measures: held-out acceptance and diffusion quality of a draft adapter."""

    prompts: str | None = option(None, "JSONL prompt set (default: the packaged chat prompts)")
    modes: tuple[str, ...] = ("ar", "spec", "diffusion")
    block_sizes: tuple[int, ...] = (8,)
    spec_variants: tuple[str, ...] = option(("linear",), "linear, quadratic and/or pipelined")
    threshold: float | None = option(0.9, "diffusion confidence, or none")
    max_tokens: int = 64
    snapshots: str | None = option(None, "a training run's adapters/ folder: the bare model, then every step-N adapter")
    plot: str | None = option(None, "with --snapshots: write accepted length vs training tokens to this PNG")

    def validate(self) -> DraftOptions:
        if bad := set(self.modes) - set(MODES) or set(self.spec_variants) - set(SPEC_VARIANTS):
            raise ValueError(f"unknown mode or spec variant {sorted(bad)}")
        return self


def run_draft_eval(model: TriModel, tokenizer: Tokenizer, opts: DraftOptions) -> dict | list[dict]:
    """``eval_draft`` on the prompt set, printed as one JSON line; with ``opts.snapshots`` the acceptance
    curve over a training run's adapter snapshots instead (the model should come without an adapter)."""
    prompts = load_prompts(opts.prompts, tokenizer)
    settings = grid(opts.modes, opts.block_sizes, [opts.threshold], [0.0], [1], opts.max_tokens, opts.spec_variants)
    if opts.snapshots:
        return acceptance_curve(model, prompts, settings, Path(opts.snapshots), opts.plot)
    result = {"adapter": checkpoint.has_adapter(model), "prompts": len(prompts), **eval_draft(model, prompts, settings)}
    print(json.dumps(result))
    return result


def acceptance_curve(
    model: TriModel, prompts: list[list[int]], settings: list[Setting], snapshots: Path, plot: Path | None = None
) -> list[dict]:
    """``eval_draft`` of the bare model, then of every ``step-N`` adapter of a training run's
    ``adapters/`` folder, one JSON line each as it is measured; optionally plotted against training tokens."""
    folders = sorted(Path(snapshots).glob("step-*"))
    if not folders:
        raise FileNotFoundError(f"no step-N adapter folders under {snapshots}")
    curve = []
    for snap in [None, *folders]:
        if snap is not None:
            checkpoint.load_adapter(model, snap)
        progress = json.loads((snap / "progress.json").read_text()) if snap else {"step": 0, "tokens": 0}
        point = {**progress, "adapter": str(snap) if snap else None, **eval_draft(model, prompts, settings)}
        curve.append(point)
        print(json.dumps(point), flush=True)
    if plot:
        plots.acceptance_curve(curve, Path(plot))
    return curve
