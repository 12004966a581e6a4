"""How decoders run the model: prefill, one block forward over the cache (room checked, keys committed), and
the blocks and distributions that diffusion and drafting start from."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tridlm import attention, masks
from tridlm.cache import KVCache
from tridlm.model import TriModel
from tridlm.sampling import Sampler


def forward_block(
    model: TriModel,
    cache: KVCache,
    tokens: torch.Tensor,
    mask_fn,
    *,
    write: bool | int = False,
    adapter: bool | torch.Tensor = False,
    logits_index: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoders' one way to run the model: tokens (B, n) placed right after each row's committed
    cache (at ``offsets`` from it, default 0..n-1), keys [committed cache | tokens] under ``mask_fn``.

    write: commit the keys/values of all tokens (True) or of that many leading ones (their queries must
    be causal); the room check before and the commit after the forward happen here only. ``padding``: (B, n) tokens
    that only make the rows equally long (``TriModel.forward``); they must come after their row's real ones.
    """
    n = tokens.shape[1]
    offsets = torch.arange(n, device=tokens.device) if offsets is None else offsets
    positions = cache.lengths[:, None] + offsets  # (B, n)
    prefix = cache.attended
    mask, key_slots = mask_fn(cache.lengths, n, prefix), None
    if prefix and (len(tokens) > 1 or cache.static):
        mask, key_slots = masks.after_own_cache(mask, cache.lengths)
    written = n if write is True else int(write)
    if written:
        cache.check_room(positions[:, :written])
    logits = model(
        tokens,
        positions,
        mask,
        cache,
        write=written,
        adapter=adapter,
        logits_index=logits_index,
        key_slots=key_slots,
        padding=padding,
    )
    if written:
        cache.commit(positions[:, written - 1] + 1)
    return logits


def unmasking_distribution(sampler: Sampler, logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """What a bidirectional prediction samples from (diffusion denoising, spec drafting): the sampler's
    distribution with the MASK token excluded, so a masked position is never filled with MASK."""
    return sampler.distribution(logits.index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf")))


def masked_block(pending: torch.Tensor, n: int, mask_id: int | None) -> torch.Tensor:
    """The block [pending, MASK x (n-1)] per row, (B, n), that diffusion and spec drafting start from;
    ``pending`` (B,) is the last sampled token, not yet in the cache."""
    block = pending[:, None].repeat(1, n)
    if n > 1:
        if mask_id is None:
            raise ValueError("block sizes above 1 need a model with a mask token (config mask_id)")
        block[:, 1:] = mask_id
    return block


def prefill(model: TriModel, prompts: Sequence[Sequence[int]], max_len: int) -> tuple[KVCache, torch.Tensor]:
    """One causal forward of the (right-padded) prompts; returns the cache and last logits (B, V)."""
    cache = model.new_cache(len(prompts), max_len)
    return cache, prefill_into(model, cache, prompts)


def prefill_into(model: TriModel, cache: KVCache, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """``prefill`` into an empty cache of the prompts' rows; returns the last logits (B, V). On a CPU, prompts over
    ``attention.ROW_EXACT_MAX_QUERIES`` tokens go in chunks of that many, so that every query block is row-exact:
    the same values as any other chunking (``decode.batcher``'s) and faster than one block of them all."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: at least one token is needed")
    lengths = torch.tensor([len(p) for p in prompts], device=model.device)
    width = int(lengths.max())
    if width >= cache.max_len:
        raise ValueError(f"prompt of {width} tokens leaves no room in a context of {cache.max_len}")
    # Padding slots hold arbitrary tokens: no real query attends to them, and crop discards their KV.
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=model.device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    chunk = attention.ROW_EXACT_MAX_QUERIES if torch.device(model.device).type == "cpu" else width
    last, logits = lengths - 1, None
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        index = (last - start).clamp(0, end - start - 1)[:, None]
        part = forward_block(model, cache, tokens[:, start:end], masks.causal, write=True, logits_index=index)[:, 0]
        logits = part if logits is None else torch.where(((last >= start) & (last < end))[:, None], part, logits)
    cache.crop(lengths)
    return logits
