"""Linear self-speculation (SPEC 3.3): bidirectional draft, causal verify, accept a prefix, crop, bonus.

Lossless: greedy output equals ``ar`` token for token; with sampling, standard speculative rejection
sampling makes every emitted token follow the AR distribution exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from tridlm import masks
from tridlm.cache import KVCache
from tridlm.decode.forward import forward_block, masked_block, unmasking_distribution
from tridlm.decode.state import DecodeState
from tridlm.model import TriModel
from tridlm.sampling import Sampler, argmax, draw


def accept(
    block: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None, sampler: Sampler, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted draft count k (B,) and bonus token (B,) for a block [pending, draft_1..draft_{n-1}].

    p: (B, n, V) verifier distributions (``Sampler.verifier``: logits when greedy), p[:, i] for the token after
    block[:, :i+1].
    q: (B, n, V) draft distributions, q[:, i] the one block[:, i] was drawn from (None when n == 1).
    """
    drafts = block[:, 1:]  # (B, n-1)
    rows = torch.arange(block.shape[0], device=block.device)
    if sampler.greedy:
        best = argmax(p)  # (B, n): AR's token after each prefix
        k = (best[:, :-1] == drafts).long().cumprod(-1).sum(-1)  # length of the accepted prefix
        return k, best[rows, k]
    p_x = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
    q_x = q[:, 1:].gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(p_x.shape, generator=generator, device=p.device)
    k = (u * q_x < p_x).long().cumprod(-1).sum(-1)  # accept each with probability min(1, p/q): the prefix's length
    target = p[rows, k]  # (B, V): distribution of the token after the accepted prefix
    if q is not None:
        # A rejected draft resamples from norm(max(p - q, 0)); after a full accept, p itself.
        rejected = k < drafts.shape[1]
        residual = (target - q[rows, (k + 1).clamp(max=q.shape[1] - 1)]).clamp(min=0)
        use = rejected & (residual.sum(-1) > 0)
        target = torch.where(use[:, None], residual / residual.sum(-1, keepdim=True).clamp(min=1e-30), target)
    return k, draw(target, generator)


def spec(
    model: TriModel, cache: KVCache, pending: torch.Tensor, state: DecodeState, generator: torch.Generator | None
) -> Iterator[list[tuple[int, list[int]]]]:
    """Yield the tokens of each draft+verify cycle (accepted drafts + bonus) per row; ``pending`` (B,)
    is the last sampled token, not yet cached."""
    while not state.all_done:
        start = cache.lengths
        block, q = draft(model, cache, pending, state, generator)
        logits = forward_block(model, cache, block, masks.causal, write=True)
        state.count_forward()
        pending, _ = settle(cache, state, start, block, logits, q, generator)
        yield state.flush()


def draft(model, cache, pending, state, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[pending, drafts...] (B, n) from one bidirectional pass over [pending, MASK...], and the
    distributions the drafts were drawn from (MASK excluded)."""
    sampler = state.cfg.sampler
    block = masked_block(pending, state.cfg.block_size, model.cfg.mask_id)  # (B, n)
    if block.shape[1] == 1:
        return block, None
    logits = forward_block(model, cache, block, masks.bidirectional, adapter=True)
    q = unmasking_distribution(sampler, logits, model.cfg.mask_id)
    state.count_forward()
    block[:, 1:] = sampler.pick(q[:, 1:], generator)
    state.restrict_drafts(block[:, 1:], q[:, 1:], sampler, generator)  # under a grammar, only what it allows
    return block, q


def settle(
    cache, state, start, block, logits, q, generator, source: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a prefix of the drafts by their verify ``logits`` (B, n, V), keep its KV, emit it with the bonus token;
    ``source`` (traced) names where the drafts came from. Returns (bonus token, accepted draft count) per row. Under a
    grammar each position's logits are masked by what it allows there: the accepted tokens are constrained AR's."""
    logits = state.masked_along(logits, block[:, 1:])
    k, bonus = accept(block, state.cfg.sampler.verifier(logits), q, state.cfg.sampler, generator)
    # Keep the pending token and the accepted drafts (the bonus is the next pending token); finished
    # rows stay put.
    cache.crop(torch.where(state.active(k.device), start + k + 1, start))
    for i, (n_ok, b) in enumerate(zip(k.tolist(), bonus.tolist())):
        if not state.rows[i].done:
            state.rows[i].accepted_lengths.append(n_ok + 1)
        if state.trace:
            event = {"type": "verify", "drafts": block[i, 1:].tolist(), "accepted": n_ok, "bonus": b}
            state.note(i, event if source is None else {**event, "source": source})
        state.emit(i, block[i, 1 : n_ok + 1].tolist() + [b], logits[i, : n_ok + 1])
    return bonus, k


def spec_quadratic(
    model: TriModel, cache: KVCache, pending: torch.Tensor, state: DecodeState, generator: torch.Generator | None
) -> Iterator[list[tuple[int, list[int]]]]:
    """Quadratic self-speculation (SPEC 3.4): one forward per cycle verifies the current drafts and,
    for every possible number of accepted drafts, drafts the block after it (linear spec's cycles at B=1)."""
    n, sampler = state.cfg.block_size, state.cfg.sampler
    if n == 1:
        yield from spec(model, cache, pending, state, generator)
        return
    rows = len(pending)
    offsets = masks.quadratic_offsets(n, pending.device)
    mask_fn = functools.partial(masks.quadratic, block=n)
    mask_rows = (torch.arange(n * (n + 1), device=pending.device) >= n).expand(rows, -1)  # adapter on MASK rows
    block, q = draft(model, cache, pending, state, generator)  # the first cycle's drafts: one linear pass
    while not state.all_done:
        start = cache.lengths
        tokens = torch.cat([block, torch.full((rows, n * n), model.cfg.mask_id, device=block.device)], dim=1)
        logits = forward_block(model, cache, tokens, mask_fn, write=n, adapter=mask_rows, offsets=offsets)
        state.count_forward()
        bonus, k = settle(cache, state, start, block, logits[:, :n], q, generator)  # the verifying draft rows
        # Sub-block k (k drafts accepted) drafted positions bonus, bonus+1, ...: its row 0 stands where
        # the bonus now is, rows 1.. are the next drafts.
        chosen = logits[:, n:].view(rows, n, n, -1)[torch.arange(rows, device=block.device), k]  # (B, n, V)
        q = unmasking_distribution(sampler, chosen, model.cfg.mask_id)
        block = torch.cat([bonus[:, None], sampler.pick(q[:, 1:], generator)], dim=1)
        state.restrict_drafts(block[:, 1:], q[:, 1:], sampler, generator)
        yield state.flush()
