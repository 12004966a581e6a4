"""Unmasking rules for diffusion decoding: which masked positions to commit after a denoising step.

A rule maps (confidence (B, n), still_masked (B, n) bool) -> positions to commit (B, n) bool. Every
rule commits at least the most confident masked position of each row that has one, so a block of
n positions always finishes within n steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _most_confident(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    best = conf.masked_fill(~masked, -1.0).argmax(-1, keepdim=True)  # (B, 1)
    return torch.zeros_like(masked).scatter(-1, best, True) & masked


def confidence_threshold(threshold: float) -> Rule:
    """Commit every masked position whose confidence is >= threshold, and at least the best one."""

    def select(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        return _most_confident(conf, masked) | ((conf >= threshold) & masked)

    return select


def one_per_step() -> Rule:
    """Commit exactly the most confident masked position (n steps for a block of n)."""
    return _most_confident


def rule_for(threshold: float | None) -> Rule:
    return one_per_step() if threshold is None else confidence_threshold(threshold)
