"""Linear self-speculation (SPEC 3.3): bidirectional draft, causal verify, accept a prefix, crop, bonus.

Lossless: greedy output equals ``ar`` token for token; with sampling, standard speculative rejection
sampling makes every emitted token follow the AR distribution exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tridlm import masks
from tridlm.cache import KVCache
from tridlm.decode.common import DecodeState, forward_block, masked_block
from tridlm.model import TriModel
from tridlm.sampling import Sampler, draw


def accept(block: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None, sampler: Sampler,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted draft count k (B,) and bonus token (B,) for a block [seed, draft_1..draft_{n-1}].

    p: (B, n, V) verifier distributions, p[:, i] for the token after block[:, :i+1].
    q: (B, n, V) draft distributions, q[:, i] the one block[:, i] was drawn from (None when n == 1).
    """
    drafts = block[:, 1:]  # (B, n-1)
    rows = torch.arange(block.shape[0], device=block.device)
    if sampler.greedy:
        ok = p[:, :-1].argmax(-1) == drafts
    else:
        p_x = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
        q_x = q[:, 1:].gather(-1, drafts[..., None])[..., 0]
        u = torch.rand(p_x.shape, generator=generator, device=p.device)
        ok = u * q_x < p_x  # accept with probability min(1, p/q)
    k = ok.long().cumprod(-1).sum(-1)  # length of the accepted prefix
    target = p[rows, k]  # (B, V): distribution of the token after the accepted prefix
    if sampler.greedy:
        return k, target.argmax(-1)
    if q is not None:
        # A rejected draft resamples from norm(max(p - q, 0)); after a full accept, p itself.
        rejected = k < drafts.shape[1]
        residual = (target - q[rows, (k + 1).clamp(max=q.shape[1] - 1)]).clamp(min=0)
        use = rejected & (residual.sum(-1) > 0)
        target = torch.where(use[:, None], residual / residual.sum(-1, keepdim=True).clamp(min=1e-30), target)
    return k, draw(target, generator)


def spec(model: TriModel, cache: KVCache, seed: torch.Tensor, state: DecodeState,
         generator: torch.Generator | None) -> Iterator[list[tuple[int, list[int]]]]:
    """Yield the tokens of each draft+verify cycle (accepted drafts + bonus) per row."""
    cfg, sampler = state.cfg, state.cfg.sampler
    while not state.all_done:
        start = cache.lengths
        block = masked_block(seed, cfg.block_size, model.cfg.mask_id)  # (B, n)
        q = None
        if cfg.block_size > 1:
            q = sampler.distribution(forward_block(model, cache, block, masks.bidirectional, adapter=True))
            state.count_forward()
            block[:, 1:] = sampler.pick(q[:, 1:], generator)
        p = sampler.distribution(forward_block(model, cache, block, masks.causal, write=True))
        state.count_forward()
        k, bonus = accept(block, p, q, sampler, generator)
        # Keep the seed and the accepted drafts (the bonus is the next seed); finished rows stay put.
        cache.crop(torch.where(state.active(k.device), start + k + 1, start))
        for i, (n_ok, b) in enumerate(zip(k.tolist(), bonus.tolist())):
            if not state.rows[i].done:
                state.rows[i].accepted_lengths.append(n_ok + 1)
            state.emit(i, block[i, 1 : n_ok + 1].tolist() + [b])
        seed = bonus
        yield state.flush()
