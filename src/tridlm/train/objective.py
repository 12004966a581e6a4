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

from tridlm.model import TriModel


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


@dataclass
class Noised:
    xt: torch.Tensor  # (B, L) tokens with MASK where masked
    masked: torch.Tensor  # (B, L) bool
    p: torch.Tensor  # (B,) masking probability per sequence


def add_noise(x0: torch.Tensor, loss_mask: torch.Tensor, mask_id: int, generator: torch.Generator | None,
              eps: float = 1e-3) -> Noised:
    """t ~ U(0,1) per sequence, p = (1 - eps) t + eps; each loss-bearing token becomes MASK with prob p."""
    t = torch.rand(x0.shape[0], generator=generator, device=x0.device)
    p = (1 - eps) * t + eps
    masked = (torch.rand(x0.shape, generator=generator, device=x0.device) < p[:, None]) & loss_mask
    return Noised(torch.where(masked, torch.full_like(x0, mask_id), x0), masked, p)


@dataclass
class Loss:
    loss: torch.Tensor  # what to backpropagate
    diffusion_sum: torch.Tensor  # sum over masked positions of CE / p
    ar_sum: torch.Tensor  # sum over positions of next-token CE
    n_masked: int
    n_ar: int


def joint_loss(model: TriModel, x0: torch.Tensor, noised: Noised, block: int, alpha: float = 0.3,
               loss_mask: torch.Tensor | None = None, adapter: bool = False, diffusion_only: bool = False) -> Loss:
    """``(alpha * diffusion_sum + ar_sum) / (n_masked + n_ar)`` from one dual-stream forward.

    loss_mask (B, L): tokens that bear loss (default all); the AR term predicts x0[i+1] where it bears loss.
    adapter: use the LoRA for the x_t half only (the bidirectional queries), never for x_0.
    diffusion_only: backpropagate ``diffusion_sum / n_masked`` (the adapter regime's objective).
    """
    B, L = x0.shape
    loss_mask = torch.ones_like(x0, dtype=torch.bool) if loss_mask is None else loss_mask
    tokens = torch.cat([noised.xt, x0], dim=1)  # (B, 2L)
    positions = torch.arange(L, device=x0.device).repeat(2).expand(B, -1)
    mask = dual_stream(L, block, x0.device).expand(B, -1, -1)
    on_noisy = (torch.arange(2 * L, device=x0.device) < L).expand(B, -1) if adapter else False
    logits = model(tokens, positions, mask, adapter=on_noisy)  # (B, 2L, V)
    noisy, clean = logits[:, :L], logits[:, L:]
    ce_noisy = F.cross_entropy(noisy.transpose(1, 2), x0, reduction="none")  # (B, L), no shift
    diffusion_sum = (ce_noisy * noised.masked / noised.p[:, None]).sum()
    ce_clean = F.cross_entropy(clean[:, :-1].transpose(1, 2), x0[:, 1:], reduction="none")  # shifted
    ar_bearing = loss_mask[:, 1:]
    ar_sum = (ce_clean * ar_bearing).sum()
    n_masked, n_ar = int(noised.masked.sum()), int(ar_bearing.sum())
    if diffusion_only:
        loss = diffusion_sum / max(n_masked, 1)
    else:
        loss = (alpha * diffusion_sum + ar_sum) / max(n_masked + n_ar, 1)
    return Loss(loss, diffusion_sum, ar_sum, n_masked, n_ar)
