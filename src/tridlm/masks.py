"""Attention masks over keys ``[cache[:P] | current tokens (n)]`` for queries = current tokens.

Each returns a bool tensor (B, n, P + n), True = may attend. Cache slot j of row b is visible only
when j < cache_lengths[b] (rows of a batch have different committed lengths). ``dual_stream`` is the
training layout's mask (SPEC 4), over the 2L tokens of one forward without a cache.
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


def verify_then_draft(cache_lengths: torch.Tensor, n: int, prefix: int, verify: int) -> torch.Tensor:
    """A pipelined spec forward: ``verify`` leading rows (the pending token and its candidates) are causal,
    the MASK rows after them see the cache, every verify row and each other (they draft the block that
    follows a full accept)."""
    mask = causal(cache_lengths, n, prefix)
    mask[:, verify:, prefix:] = True
    return mask


def quadratic_offsets(block: int, device=None) -> torch.Tensor:
    """Positions, relative to the committed length, of the block*(block+1) tokens of a quadratic-spec
    forward: ``block`` draft rows at 0..block-1, then for each sub-block i its ``block`` MASK rows at
    i+1..i+block."""
    drafts = torch.arange(block, device=device)
    masks_ = (drafts[:, None] + 1 + drafts[None, :]).flatten()
    return torch.cat([drafts, masks_])


def quadratic(cache_lengths: torch.Tensor, n: int, prefix: int, block: int) -> torch.Tensor:
    """Quadratic self-speculation (SPEC 3.4). Tokens: ``block`` draft rows, then ``block`` sub-blocks of
    ``block`` MASK rows each.
    Draft row i sees the cache and draft rows 0..i (it verifies); MASK rows of sub-block i see the
    cache, draft rows 0..i and their own sub-block (they draft the block after an accept of i drafts)."""
    if n != block * (block + 1):
        raise ValueError(f"a quadratic forward of block {block} has {block * (block + 1)} tokens, not {n}")
    dev = cache_lengths.device
    sub = torch.cat([torch.arange(block, device=dev), torch.arange(block, device=dev).repeat_interleave(block)])
    is_draft = torch.arange(n, device=dev) < block
    # Query q may see draft row j when j <= sub[q]; MASK key k only from its own sub-block's MASK rows.
    sees_draft = is_draft[None, :] & (sub[None, :] <= sub[:, None])
    sees_mask = ~is_draft[None, :] & ~is_draft[:, None] & (sub[None, :] == sub[:, None])
    current = (sees_draft | sees_mask).expand(len(cache_lengths), -1, -1)
    return torch.cat([_cache_part(cache_lengths, n, prefix), current], dim=-1)


def dual_stream(length: int, block: int, device=None) -> torch.Tensor:
    """(2L, 2L) bool mask over [x_t | x_0]: x_t query i sees its own block of x_t and the x_0 tokens of
    strictly earlier blocks; x_0 query i sees x_0 tokens 0..i."""
    pos = torch.arange(length, device=device)
    blk = pos // block
    noisy_noisy = blk[:, None] == blk[None, :]
    noisy_clean = blk[None, :] < blk[:, None]
    clean_clean = pos[None, :] <= pos[:, None]
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([torch.zeros_like(clean_clean), clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)


def after_own_cache(mask: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key layout [row's committed cache | current tokens | masked rest] for every row of a batch,
    instead of [cache[:P] | current tokens] with a masked gap in rows shorter than P: a row's keys then come
    in the order they have when it runs alone, so its attention sums run in the same order and batch ==
    single wherever the matmuls are row-independent. Returns the mask over the new layout and the current
    tokens' key slots (``TriModel.forward``'s ``key_slots``).

    mask (B, n, P + n) over [cache[:P] | current]; lengths (B,) committed lengths, all <= P.
    """
    B, n, width = mask.shape
    prefix = width - n
    slots = lengths[:, None] + torch.arange(n, device=mask.device)  # (B, n)
    moved = mask.clone()
    moved[..., prefix:] = False
    return moved.scatter_(2, slots[:, None, :].expand(B, n, n), mask[..., prefix:]), slots
