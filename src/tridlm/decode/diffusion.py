"""Block diffusion with confidence-threshold parallel unmasking (SPEC 3.2).

Each block [pending token, MASK x (n-1)] is denoised by bidirectional forwards over the read-only cache,
committing the most confident positions (never the MASK token itself), then one causal pass writes
its KV and predicts the next block's first token. Under a grammar (``GenerationConfig.grammar``) a row commits in order,
only tokens the grammar accepts (``DecodeState.restrict_block``, ``in_order``): a token it forces is certain at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tridlm import masks, unmask
from tridlm.cache import KVCache
from tridlm.decode.forward import forward_block, masked_block, unmasking_distribution
from tridlm.decode.state import DecodeState
from tridlm.model import TriModel


def diffusion(
    model: TriModel, cache: KVCache, pending: torch.Tensor, state: DecodeState, generator: torch.Generator | None
) -> Iterator[list[tuple[int, list[int]]]]:
    """Yield tokens as they become committed in order (never a mask), block by block."""
    cfg, sampler = state.cfg, state.cfg.sampler
    n = cfg.block_size
    max_steps = cfg.max_steps_per_block or n
    select = unmask.rule_for(cfg.threshold)
    while not state.all_done:
        block = masked_block(pending, n, model.cfg.mask_id)  # (B, n)
        masked = torch.zeros_like(block, dtype=torch.bool)
        masked[:, 1:] = True
        emitted = [1] * len(block)  # the pending token was emitted when it was sampled
        by = None  # with logprobs recorded: each slot's logits in the step that committed it
        for step in range(max_steps):
            if not (masked & state.active(block.device)[:, None]).any():
                break
            logits = forward_block(model, cache, block, masks.bidirectional, adapter=True)
            probs = unmasking_distribution(sampler, logits, model.cfg.mask_id)
            state.count_forward()
            pred = sampler.pick(probs, generator)  # (B, n): logit i predicts token i, no shift
            state.restrict_block(masked, logits, probs, pred, sampler, generator)  # under a grammar: what it accepts
            conf = probs.gather(-1, pred[..., None])[..., 0]
            chosen = state.in_order(masked if step == max_steps - 1 else select(conf, masked), masked)  # and in order
            block = torch.where(chosen, pred, block)
            if cfg.logprobs is not None:
                by = torch.where(chosen[..., None], logits, logits if by is None else by)
            masked &= ~chosen
            if state.trace:
                trace_step(state, block, masked, pred, conf, chosen)
            # Stream each row's committed prefix (a later position may be committed before an earlier one).
            ready = torch.where(masked.any(-1), masked.long().argmax(-1), n).tolist()
            for i, r in enumerate(ready):
                state.emit(i, block[i, emitted[i] : r].tolist(), None if by is None else by[i, emitted[i] : r])
                emitted[i] = max(emitted[i], r)
            yield state.flush()
        if state.all_done:
            return
        logits = forward_block(
            model,
            cache,
            block,
            masks.causal,
            write=True,
            logits_index=torch.full((len(block), 1), n - 1, device=block.device),
        )
        state.count_forward()
        logits = state.masked(logits[:, 0])  # under a grammar, only what it allows
        pending = sampler.next_token(logits, generator)
        for i, t in enumerate(pending.tolist()):
            if state.trace:
                state.note(i, {"type": "commit", "token": t})
            state.emit(i, [t], logits[i : i + 1])
        yield state.flush()


def trace_step(
    state: DecodeState,
    block: torch.Tensor,
    masked: torch.Tensor,
    pred: torch.Tensor,
    conf: torch.Tensor,
    chosen: torch.Tensor,
) -> None:
    """Each row's ``denoise`` event: the block after this step, every slot's guess and confidence."""
    for i in range(len(block)):
        state.note(
            i,
            {
                "type": "denoise",
                "block": [None if m else t for t, m in zip(block[i].tolist(), masked[i].tolist())],
                "guess": pred[i].tolist(),
                "conf": [round(c, 4) for c in conf[i].tolist()],
                "new": chosen[i].nonzero()[:, 0].tolist(),
            },
        )
