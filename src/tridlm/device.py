"""What the hardware supports, checked rather than assumed."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_has_bf16() -> bool:
    """Native bfloat16 arithmetic on this CPU (avx512_bf16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with native bf16, else float32."""
    if torch.device(device).type == "cuda" or cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


# Block sizes used when a request names none, per device kind and (mode, spec variant). CPU: measured
# with the shipped draft adapter on the 2-core CPU in float32 (README, "Results"): spec linear B=8 13.6
# tok/s vs B=4 11.0; quadratic B=4 12.9 vs B=8 7.0 (a B(B+1)-token forward grows quickly there);
# diffusion at threshold 0.9 B=4 12.6 vs B=8 11.0 tok/s (generative perplexity 2.66 vs 3.05). CUDA: on an
# H200 under CUDA graphs forwards of 16 to 272 new tokens cost 1-2x an AR step, so larger blocks are nearly
# free there (not yet measured with a trained adapter). Pipelined spec and auto: the most tokens one forward
# carries (auto's planner chooses below it from the measured cost curve); on a CPU with int4 weights 4 tokens
# cost 1.17x one and 5 cost 1.46x (README, "Self-speculation that pays").
BLOCK_SIZES = {
    "cpu": {"spec-linear": 8, "spec-quadratic": 4, "spec-pipelined": 4, "auto": 8, "diffusion": 4},
    "cuda": {"spec-linear": 16, "spec-quadratic": 16, "spec-pipelined": 16, "auto": 16, "diffusion": 16},
}


def default_block_size(
    device: str | torch.device, mode: str, spec_variant: str = "linear", trained_block: int | None = None
) -> int:
    """The block size for ``mode`` on ``device`` when a request names none (AR has no blocks: 1), never
    above the block size the model was trained with (``block_size`` of its config) when it names one."""
    if mode == "ar":
        return 1
    table = BLOCK_SIZES["cuda" if torch.device(device).type == "cuda" else "cpu"]
    block = table[mode if mode in ("diffusion", "auto") else f"spec-{spec_variant}"]
    return min(block, trained_block) if trained_block else block
