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
