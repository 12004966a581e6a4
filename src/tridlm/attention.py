"""How attention runs where it matters for speed and exactness, chosen per forward (``plan``): on a CPU,
query blocks run row-exact (``kernels.attend``, else the same in torch ops) and a single row attends over its
cache in place; elsewhere torch's fused attention (SDPA) runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tridlm import kernels
from tridlm.cache import KVCache

# cuDNN attention builds a graph per new key length (every decode step): leave it out.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
ROW_EXACT_MAX_QUERIES = 512  # CPU query blocks up to this size: ``kernels.attend`` (or ``row_exact_attention``)


def row_exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention as two batched matmuls (grouped query heads stacked as rows) and a float32 softmax, so a
    query row's result does not depend on how many rows or keys come with it wherever the matmuls are
    row-independent: with int8/int4 weights (``tridlm.kernels``' integer matmuls) a spec verify
    row then equals the AR step that would produce it bit for bit (tested), where torch's fused CPU kernel
    changes its blocking with the number of rows. Not every shape qualifies (the tiny test model's 16-wide
    heads do not), nor do bfloat16 float projections, nor float32 matmuls, whose sums over keys are
    blocked by their number.

    q (B, n, H, D); k, v (B, KV, P, D); bias (B * KV, G * n, P) float32, 0 or -inf (``attention_bias``)
    -> (B, n, H * D).
    """
    B, n, H, D = q.shape
    KV = k.shape[1]
    G = H // KV
    q = q.reshape(B, n, KV, G, D).permute(0, 2, 3, 1, 4).reshape(B * KV, G * n, D)
    scores = torch.add(bias, torch.bmm(q, k.reshape(B * KV, -1, D).transpose(1, 2)), alpha=D**-0.5)
    o = torch.bmm(scores.softmax(-1).to(v.dtype), v.reshape(B * KV, -1, D))  # (B * KV, G * n, D)
    return o.view(B, KV, G, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, H * D)


def attention_bias(mask: torch.Tensor, n_kv_heads: int, group: int) -> torch.Tensor:
    """``row_exact_attention``'s additive mask: (B, 1, n, P) bool -> (B * KV, G * n, P) float32."""
    B, _, n, P = mask.shape
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias[:, :, None].expand(B, n_kv_heads, group, n, P).reshape(B * n_kv_heads, group * n, P)


@dataclass(frozen=True)
class Plan:
    """How one forward's layers attend."""

    row_exact: bool = False  # a CPU query block: ``kernels.attend`` or ``row_exact_attention``, not SDPA
    in_place: bool = False  # current keys/values go to cache slots P + i, and attention reads the cache there


def plan(
    cache: KVCache | None, positions: torch.Tensor, prefix: int, write: int, key_slots: torch.Tensor | None
) -> Plan:
    """The plan for a forward of tokens at ``positions`` (B, n) over ``prefix`` cached keys."""
    n = positions.shape[1]
    return Plan(
        positions.device.type == "cpu" and n <= ROW_EXACT_MAX_QUERIES,
        _in_place(cache, positions, prefix, write, key_slots),
    )


def _in_place(
    cache: KVCache | None, positions: torch.Tensor, prefix: int, write: int, key_slots: torch.Tensor | None
) -> bool:
    """Whether a forward can attend over the cache itself (on a CPU this saves a copy of every layer's cached
    keys per forward), in a cache that is not static, with room, and without autograd (a graph through the
    cache's own buffers would outlive the forward): one row past its committed length, its current keys at
    slots P + i and the tokens it writes at exactly those slots; or a ragged batch that commits all its current
    keys (AR steps), right after each row's own committed ones (``masks.after_own_cache``) at their positions."""
    if cache is None or cache.static or cache.k.device.type != "cpu" or torch.is_grad_enabled():
        return False
    n = positions.shape[1]
    if prefix + n > cache.max_len:
        return False
    if key_slots is not None:
        return write == n and torch.equal(key_slots, positions)
    if cache.batch != 1 or prefix < int(cache.lengths[0]):
        return False
    return not write or torch.equal(positions[0, :write], torch.arange(prefix, prefix + write))


def attend(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    row_exact: bool,
    bias=None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """q (B, n, H, D) over keys, values (B, KV, P + n, D) under mask (B, 1, n, P + n) -> (B, n, H * D) in ``dtype``
    (default: q's). ``bias``: a callable giving ``attention_bias`` for the torch row-exact path (built once per
    forward)."""
    B, n = q.shape[:2]
    dtype = dtype or q.dtype
    if row_exact:
        o = kernels.attend(q, keys, values, mask[:, 0], dtype)
        return o if o is not None else row_exact_attention(q, keys, values, bias()).to(dtype)
    with sdpa_kernel(SDPA_BACKENDS):
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2).to(keys.dtype), keys, values, attn_mask=mask, enable_gqa=True
        )
    return o.transpose(1, 2).reshape(B, n, -1).to(dtype)
