"""Rotary position embeddings: plain, yarn and llama3 frequency schedules, plus the position-dependent
query scaling of Llama 4 / Ministral 3 / Nemotron-Labs-Diffusion (applied to q only, after RoPE)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tridlm import kernels

ROPE_TYPES = ("default", "yarn", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    llama_4_scaling_beta: float | None = None  # query scaling; None = off

    def validate(self) -> RopeConfig:
        if self.type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.type!r} (supported: {', '.join(ROPE_TYPES)})")
        needs_original = self.type != "default" or self.llama_4_scaling_beta is not None
        if needs_original and not self.original_max_position_embeddings:
            raise ValueError(f"rope type {self.type!r} / llama_4_scaling_beta need original_max_position_embeddings")
        return self


def inv_freq_and_attention_factor(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the factor cos/sin are multiplied by."""
    inv_freq = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if rope.type == "yarn":
        return _yarn(rope, head_dim, inv_freq)
    if rope.type == "llama3":
        return _llama3(rope, inv_freq), 1.0
    return inv_freq, 1.0


def _yarn(rope: RopeConfig, dim: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by ``factor``, keep high ones, blend linearly in between."""

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in the context
        return (
            dim
            * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(rope.theta))
        )

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (original frequency), 0 = interpolate (divided by factor)
    freq = inv_freq / rope.factor * (1 - keep) + inv_freq * keep
    if rope.mscale and rope.mscale_all_dim:
        return freq, mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return freq, mscale(rope.factor)


def _llama3(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama 3.1: divide long wavelengths by ``factor``, keep short ones, smooth in between."""
    old = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
    out = torch.where(wavelen > old / rope.low_freq_factor, inv_freq / rope.factor, blended)
    return torch.where(wavelen < old / rope.high_freq_factor, inv_freq, out)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float, dtype: torch.dtype):
    """Tables for integer positions (B, n): cos and the rotation's signed sin, two (B, n, 1, head_dim)
    tensors, broadcasting over the heads of (B, n, heads, head_dim) queries and keys."""
    freqs = positions.float()[..., None, None] * inv_freq  # (B, n, 1, D/2)
    cos, sin = freqs.cos() * attention_factor, freqs.sin() * attention_factor
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rotate (B, n, heads, D) by the half-split convention of Hugging Face Llama weights: x * cos +
    [-x2, x1] * sin, where ``sin`` comes signed from ``cos_sin``, so [x2, x1] is one ``roll``; the result in
    ``dtype`` (default: x's)."""
    fused = kernels.rope(x, cos, sin, dtype)
    if fused is not None:
        return fused
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(dtype or x.dtype)


def query_scale(positions: torch.Tensor, rope: RopeConfig, dtype: torch.dtype) -> torch.Tensor | None:
    """``1 + beta * log(1 + floor(pos / original_max))`` per position, (B, n, 1, 1); None when off.
    Exactly 1 below original_max_position_embeddings, so short contexts are unaffected."""
    if rope.llama_4_scaling_beta is None:
        return None
    scale = 1 + rope.llama_4_scaling_beta * torch.log1p(
        torch.floor(positions.float() / rope.original_max_position_embeddings)
    )
    return scale[:, :, None, None].to(dtype)
