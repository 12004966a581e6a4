"""Attention masks over keys ``[cache[:P] | current tokens (n)]`` for queries = current tokens.

Each returns a bool tensor (B, n, P + n), True = may attend. Cache slot j of row b is visible only
when j < cache_lengths[b] (rows of a batch have different committed lengths).
"""

from __future__ import annotations

import torch


def _cache_part(cache_lengths: torch.Tensor, n: int, prefix: int) -> torch.Tensor:
    slots = torch.arange(prefix, device=cache_lengths.device)
    return (slots[None, :] < cache_lengths[:, None])[:, None, :].expand(-1, n, -1)  # (B, n, P)


def causal(cache_lengths: torch.Tensor, n: int, prefix: int) -> torch.Tensor:
    """Query i sees the committed cache and current tokens 0..i (AR, verify, commit, prefill)."""
    current = torch.ones(n, n, dtype=torch.bool, device=cache_lengths.device).tril()
    return torch.cat([_cache_part(cache_lengths, n, prefix), current.expand(len(cache_lengths), -1, -1)], dim=-1)


def bidirectional(cache_lengths: torch.Tensor, n: int, prefix: int) -> torch.Tensor:
    """Every query sees the committed cache and all n current tokens (diffusion denoising, spec draft)."""
    current = torch.ones(len(cache_lengths), n, n, dtype=torch.bool, device=cache_lengths.device)
    return torch.cat([_cache_part(cache_lengths, n, prefix), current], dim=-1)
