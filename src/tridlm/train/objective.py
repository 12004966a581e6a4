"""The joint AR + diffusion objective over the dual-stream layout ``[x_t | x_0]`` (SPEC 4).

One forward of 2L tokens trains both modes: the noisy copy x_t (some tokens replaced by MASK) is read
block-bidirectionally on top of the clean tokens of strictly earlier blocks, exactly what a diffusion
or spec drafting pass sees at inference over a cache of committed tokens; the clean copy x_0 is an
ordinary causal LM. Positions 0..L-1 are used for both halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tridlm import masks
from tridlm.model import TriModel


@dataclass
class Noised:
    xt: torch.Tensor  # (B, L) tokens with MASK where masked
    masked: torch.Tensor  # (B, L) bool
    p: torch.Tensor  # (B,) masking probability per sequence


def add_noise(
    x0: torch.Tensor,
    loss_mask: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None,
    eps: float = 1e-3,
    block: int = 1,
    suffix_fraction: float = 0.0,
) -> Noised:
    """t ~ U(0,1) per sequence, p = (1 - eps) t + eps; each loss-bearing token becomes MASK with prob p.

    suffix_fraction: share of sequences noised the way spec drafts instead (an option beyond SPEC 4):
    in every block the loss-bearing tokens from a uniform cut in [0, block) on are masked, so the
    model also learns the exact inference pattern [seed, MASK, ...]; these carry weight p = 1.
    """
    B, L = x0.shape
    # Draw where the generator lives (the same noise for a seed on any device), then move to x0's device.
    where = generator.device if generator is not None else x0.device
    rand = lambda *shape: torch.rand(shape, generator=generator, device=where).to(x0.device)  # noqa: E731
    t = rand(B)
    p = (1 - eps) * t + eps
    masked = (rand(B, L) < p[:, None]) & loss_mask
    if suffix_fraction > 0:
        rows = rand(B) < suffix_fraction
        cuts = torch.randint(0, block, (B, -(-L // block)), generator=generator, device=where).to(x0.device)
        within = torch.arange(L, device=x0.device) % block
        suffix = (within[None, :] >= cuts.repeat_interleave(block, dim=1)[:, :L]) & loss_mask
        masked = torch.where(rows[:, None], suffix, masked)
        p = torch.where(rows, torch.ones_like(p), p)
    return Noised(torch.where(masked, torch.full_like(x0, mask_id), x0), masked, p)


@dataclass
class Loss:
    loss: torch.Tensor  # what to backpropagate
    diffusion_sum: torch.Tensor  # sum over masked positions of CE / p
    ar_sum: torch.Tensor  # sum over positions of next-token CE
    n_masked: int
    n_ar: int


def joint_loss(
    model: TriModel,
    x0: torch.Tensor,
    noised: Noised,
    block: int,
    alpha: float = 0.3,
    loss_mask: torch.Tensor | None = None,
    adapter: bool = False,
) -> Loss:
    """``(alpha * diffusion_sum + ar_sum) / (n_masked + n_ar)`` from one dual-stream forward.

    loss_mask (B, L): tokens that bear loss (default all); the AR term predicts x0[i+1] where it bears loss.
    adapter: use the LoRA for the x_t half only (the bidirectional queries), never for x_0.
    """
    B, L = x0.shape
    loss_mask = torch.ones_like(x0, dtype=torch.bool) if loss_mask is None else loss_mask
    tokens = torch.cat([noised.xt, x0], dim=1)  # (B, 2L)
    positions = torch.arange(L, device=x0.device).repeat(2).expand(B, -1)
    mask = masks.dual_stream(L, block, x0.device).expand(B, -1, -1)
    on_noisy = (torch.arange(2 * L, device=x0.device) < L).expand(B, -1) if adapter else False
    logits = model(tokens, positions, mask, adapter=on_noisy)  # (B, 2L, V)
    noisy, clean = logits[:, :L], logits[:, L:]
    ce_noisy = F.cross_entropy(noisy.transpose(1, 2), x0, reduction="none")  # (B, L), no shift
    diffusion_sum = (ce_noisy * noised.masked / noised.p[:, None]).sum()
    ce_clean = F.cross_entropy(clean[:, :-1].transpose(1, 2), x0[:, 1:], reduction="none")  # shifted
    ar_bearing = loss_mask[:, 1:]
    ar_sum = (ce_clean * ar_bearing).sum()
    n_masked, n_ar = int(noised.masked.sum()), int(ar_bearing.sum())
    loss = (alpha * diffusion_sum + ar_sum) / max(n_masked + n_ar, 1)
    return Loss(loss, diffusion_sum, ar_sum, n_masked, n_ar)


def diffusion_loss(
    model: TriModel | torch.nn.Module, x0: torch.Tensor, noised: Noised, block: int, layout: str = "linear"
) -> Loss:
    """The adapter regime's objective, ``diffusion_sum / n_masked``: the diffusion term of ``joint_loss``
    with the LoRA on, computed without a dual-stream forward.

    With the base frozen the clean stream is context only, so its keys/values come from one causal pass
    without gradient into a KV cache; the noisy stream then attends to them through the top half of the
    dual-stream mask, and logits are computed only at masked positions. model may be wrapped in DDP.

    layout: what a block's unmasked tokens before its first MASK are to the noisy rows. ``linear``: rows of
    the draft (adapter on, bidirectional in the block), as linear spec and diffusion draft. ``pipelined``:
    causal rows without the adapter, as pipelined spec and ``auto`` verify them while their MASK rows draft;
    those are exactly the clean stream's rows, so the noisy rows read them from the cache instead.
    """
    net = getattr(model, "module", model)
    B, L = x0.shape
    device = x0.device
    positions = torch.arange(L, device=device).expand(B, -1)
    cache = net.new_cache(B, L)
    with torch.no_grad():
        net(
            x0,
            positions,
            masks.causal(cache.lengths, L, 0),
            cache,
            write=L,
            logits_index=torch.zeros(B, 0, dtype=torch.long, device=device),
        )
    both = masks.dual_stream(L, block, device)
    mask = torch.cat([both[:L, L:], both[:L, :L]], dim=1).expand(B, -1, -1)  # keys [cached x_0 | x_t]
    if layout == "pipelined":
        mask = _clean_prefix_from_cache(mask, noised.masked, block)
    elif layout != "linear":
        raise ValueError(f"invalid layout={layout!r}: expected linear or pipelined")
    # Each row's masked positions first (stable), cut at the largest count; padding carries weight 0.
    index = torch.argsort((~noised.masked).to(torch.uint8), dim=1, stable=True)[:, : int(noised.masked.sum(1).max())]
    logits = model(noised.xt, positions, mask, cache, adapter=True, logits_index=index)  # (B, k, V)
    ce = F.cross_entropy(logits.transpose(1, 2), x0.gather(1, index), reduction="none")
    diffusion_sum = (ce * noised.masked.gather(1, index) / noised.p[:, None]).sum()
    n_masked = int(noised.masked.sum())
    return Loss(diffusion_sum / max(n_masked, 1), diffusion_sum, torch.zeros((), device=device), n_masked, 0)


def _clean_prefix_from_cache(mask: torch.Tensor, masked: torch.Tensor, block: int) -> torch.Tensor:
    """mask (B, L, 2L) over [cached x_0 | x_t] with each block's tokens before its first masked one read from
    the cache (x_0's causal rows) rather than from x_t. Only a prefix: a cached row after a masked position
    would carry the token hidden there."""
    B, L = masked.shape
    pos = torch.arange(L, device=masked.device)
    blk = pos // block
    where = F.pad(torch.where(masked, pos, L), (0, -L % block), value=L)  # whole blocks
    cut = where.view(B, -1, block).amin(-1).gather(1, blk.expand(B, -1))  # (B, L): first masked position of the block
    in_prefix = (pos < cut)[:, None, :] & (blk[:, None] == blk[None, :])[None]  # (B, query, key in its block's prefix)
    return torch.cat([mask[..., :L] | in_prefix, mask[..., L:] & ~in_prefix], dim=-1)
