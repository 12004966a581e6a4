"""The decoding modes, in one table: what each is called, the decoder that runs it, its block size where a request
names none, and whether its output is AR's. The API, CLI, server, bench, eval and demo all read it; a new mode is a
decoder and a row here.

A mode is named by ``GenerationConfig.mode`` and, for spec, ``spec_variant``; its label joins the two
(``spec-quadratic``) and is what tables, result files and the demo print.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tridlm.decode.ar import ar
from tridlm.decode.diffusion import diffusion
from tridlm.decode.pipelined import pipelined
from tridlm.decode.spec import spec, spec_quadratic


@dataclass(frozen=True)
class Mode:
    label: str  # how tables, result files and the demo name it
    mode: str  # GenerationConfig.mode
    spec_variant: str  # GenerationConfig.spec_variant ("linear" where it does not apply)
    decoder: Callable  # (model, cache, pending, state, generator, **levers) -> committed tokens per cycle
    blocks: dict[str, int]  # per device kind, the block size of a request that names none (AR: 1)
    exact: bool  # greedy output equals AR's token for token, sampled output is distributed as AR's
    levers: bool = False  # drafts from lookup and earlier answers (``history``; ``decode.pipelined``)
    plans: bool = False  # chooses each forward by a measured cost curve (``costs``)
    tokens_per_forward: Callable[[int], int] = lambda block: block  # the most one row puts through a forward, by block
    summary: str = ""

    def default_block(self, device: str | torch.device, trained_block: int | None = None) -> int:
        """The block size on ``device`` when a request names none, never above the block size the model was trained
        with (``block_size`` of its config) when it names one."""
        block = self.blocks["cuda" if torch.device(device).type == "cuda" else "cpu"]
        return min(block, trained_block) if trained_block else block


# Default blocks. CPU: measured with the shipped draft adapter on a 2-core CPU in float32:
# spec linear B=8 13.6 tok/s vs B=4 11.0; quadratic B=4 12.9 vs B=8 7.0 (a B(B+1)-token forward grows quickly there);
# diffusion at threshold 0.9 B=4 12.6 vs B=8 11.0 tok/s (generative perplexity 2.66 vs 3.05). Pipelined spec and auto:
# the most tokens one forward carries (auto's planner chooses below it from the measured cost curve). CUDA: on an
# H200 under CUDA graphs forwards of 16 to 272 new tokens cost 1-2x an AR step, so larger blocks are nearly free there.
TABLE = (
    Mode("ar", "ar", "linear", ar, {"cpu": 1, "cuda": 1}, True, summary="one token per forward"),
    Mode(
        "diffusion",
        "diffusion",
        "linear",
        diffusion,
        {"cpu": 4, "cuda": 16},
        False,
        summary="block diffusion: commits every token above the confidence threshold per forward",
    ),
    Mode("spec", "spec", "linear", spec, {"cpu": 8, "cuda": 16}, True, summary="draft a block, verify it causally"),
    Mode(
        "spec-quadratic",
        "spec",
        "quadratic",
        spec_quadratic,
        {"cpu": 4, "cuda": 16},
        True,
        tokens_per_forward=lambda block: block * (block + 1),
        summary="verify and draft the next block for every accepted length in one forward of B(B+1) tokens",
    ),
    Mode(
        "spec-pipelined",
        "spec",
        "pipelined",
        pipelined,
        {"cpu": 4, "cuda": 16},
        True,
        levers=True,
        summary="one forward per cycle: AR step, candidates' verify and MASK rows drafting the next ones",
    ),
    Mode(
        "auto",
        "auto",
        "linear",
        pipelined,
        {"cpu": 8, "cuda": 16},
        True,
        levers=True,
        plans=True,
        summary="the exact plan the measured cost curve predicts fastest, per cycle",
    ),
)
MODES = tuple(dict.fromkeys(m.mode for m in TABLE))  # GenerationConfig.mode's values
SPEC_VARIANTS = tuple(m.spec_variant for m in TABLE if m.mode == "spec")
LABELS = tuple(m.label for m in TABLE)


def of(mode: str, spec_variant: str | None = "linear") -> Mode:
    """The row of a (mode, spec variant) pair; the variant counts for spec only."""
    variant = (spec_variant or "linear") if mode == "spec" else "linear"
    for row in TABLE:
        if (row.mode, row.spec_variant) == (mode, variant):
            return row
    raise ValueError(f"unknown mode {mode!r} (spec variant {spec_variant!r}): expected one of {', '.join(LABELS)}")


def labelled(label: str) -> Mode:
    """The row of a label (``spec-quadratic``)."""
    for row in TABLE:
        if row.label == label:
            return row
    raise ValueError(f"unknown mode {label!r}: expected one of {', '.join(LABELS)}")
