"""Low-bit weights for CPU decoding: weight-only int8 (per output channel) and int4 (groups of 32, a scale
and a zero point each), run by torch's own packed kernels with bfloat16 activations.

The int4 layout is GGUF's Q4_1 (32 weights, a scale ``d`` and a minimum ``m``: w = d * q + m, q in 0..15),
so Q4_1 tensors load with their own 4-bit codes and no second quantization; torch's kernel keeps the scale
and zero point in the activations' dtype (bfloat16), which rounds ``d`` and ``m`` from float16 to
bfloat16. Any other weight is quantized here from its float values (round to nearest).
"""

from __future__ import annotations

import numpy as np
import torch

WEIGHT_PRECISIONS = ("int8", "int4")
GROUP = 32  # int4 group size: GGUF's Q4_1 block
ACTIVATIONS = torch.bfloat16  # torch's CPU int4/int8 kernels are fast in bfloat16 only (10x slower in float32)


class Int8Weight:
    """w ~= q * scale per output channel, q int8 in [-127, 127]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale  # (N, K) int8, (N,) in the activations' dtype

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int8Weight:
        w = w.float()
        scale = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.to(ACTIVATIONS))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.q, self.scale)
        return y.view(*x.shape[:-1], -1)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]


class Int4Weight:
    """w ~= q * d + m per group of 32 along the input, q in 0..15 (GGUF Q4_1)."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
        """q (N, K) integer codes 0..15, d and m (N, K / 32) float scales and minimums."""
        self.shape = tuple(q.shape)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # torch's kernel computes (q - 8) * scale + zero: zero = m + 8 d, laid out (K / 32, N, 2)
        self.scales_zeros = torch.stack([d.T, (m + 8 * d).T], dim=-1).to(ACTIVATIONS).contiguous()

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int4Weight:
        n, k = w.shape
        if k % GROUP:
            raise ValueError(f"int4 weights need an input size divisible by {GROUP}, not {k}")
        groups = w.float().view(n, k // GROUP, GROUP)
        lo, hi = groups.amin(-1), groups.amax(-1)
        d = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round((groups - lo[..., None]) / d[..., None]).clamp(0, 15)
        return cls(q.view(n, k), d, lo)

    @classmethod
    def from_q4_1(cls, blocks: np.ndarray, n: int, k: int) -> Int4Weight:
        """From GGUF Q4_1 bytes, (n, k / 32, 20) per row: float16 d, float16 m, 16 bytes holding element j
        in the low nibble and element j + 16 in the high nibble of byte j."""
        blocks = np.ascontiguousarray(blocks).reshape(n, k // GROUP, 20)
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        nibbles = blocks[..., 4:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, k)
        return cls(torch.from_numpy(q.astype(np.int32)), d, m)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), self.packed, GROUP,
                                                       self.scales_zeros)
        return y.view(*x.shape[:-1], -1)


def concat(weights: list) -> Int8Weight | Int4Weight | None:
    """One packed weight computing the given ones' outputs side by side, bit for bit the same values (one
    kernel call for q/k/v or gate/up instead of several); None where the packing does not allow it."""
    first = weights[0]
    if isinstance(first, Int8Weight):
        return Int8Weight(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]))
    fused = object.__new__(Int4Weight)
    fused.shape = (sum(w.shape[0] for w in weights), first.shape[1])
    fused.packed = torch.cat([w.packed for w in weights])  # rows of outputs, in blocks the kernel may interleave
    fused.scales_zeros = torch.cat([w.scales_zeros for w in weights], dim=1)  # (K / 32, N, 2)
    # torch's int4 layout interleaves outputs in blocks (of 64 here), so check rather than assume.
    probe = torch.randn(2, first.shape[1], generator=torch.Generator().manual_seed(0)).to(ACTIVATIONS)
    return fused if torch.equal(fused(probe), torch.cat([w(probe) for w in weights], dim=-1)) else None


def quantize(model, precision: str) -> None:
    """Give every projection and the output head of a bfloat16 ``model`` ``precision`` weights (in place),
    except those already packed. The output head gets int8 in both precisions (where the model ties it to
    the embedding, the float table stays for the lookup)."""
    from tridlm.model import Linear

    if precision not in WEIGHT_PRECISIONS:
        raise ValueError(f"invalid weight precision {precision!r}: expected one of {', '.join(WEIGHT_PRECISIONS)}")
    if model.dtype != ACTIVATIONS:
        raise ValueError(f"{precision} weights run with {ACTIVATIONS} activations; cast the model first")
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or module.packed is not None:
            continue
        head = name == "diffusion_head"
        module.pack(Int8Weight.from_float(module.weight) if precision == "int8" or head
                    else Int4Weight.from_float(module.weight))
    model.fuse_packed()
