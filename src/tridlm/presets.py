"""Named architectures (presets are data), seeded random weights (the models tests and timings run on without
any checkpoint) and empty models that a loader fills from a file."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tridlm.model import ModelConfig, TriModel
from tridlm.rope import RopeConfig

PRESETS = {
    # Random-weight model for tests: small enough for thousands of forwards per second.
    "tiny": ModelConfig(
        vocab_size=64,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        max_seq_len=512,
        bos_id=1,
        eos_ids=(2,),
        mask_id=3,
    ),
    # Nemotron-Labs-Diffusion 3B shapes (yarn + Llama-4 query scaling), for timing without weights.
    "nld-3b": ModelConfig(
        vocab_size=131072,
        dim=3072,
        n_layers=26,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=9216,
        rope=RopeConfig(
            theta=1e6,
            type="yarn",
            factor=16.0,
            original_max_position_embeddings=16384,
            mscale=1.0,
            mscale_all_dim=1.0,
            llama_4_scaling_beta=0.1,
        ),
        max_seq_len=262144,
        bos_id=1,
        eos_ids=(11,),
        mask_id=100,
    ),
}


# NLD-8B and NLD-14B: NLD-3B's heads, rope and vocabulary at their widths and depths (SPEC 5)
PRESETS["nld-8b"] = dataclasses.replace(PRESETS["nld-3b"], dim=4096, n_layers=34, ffn_dim=14336)
PRESETS["nld-14b"] = dataclasses.replace(PRESETS["nld-3b"], dim=5120, n_layers=40, ffn_dim=16384)


def preset(name: str) -> ModelConfig:
    """A named architecture (weights come separately)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> TriModel:
    """A model with seeded random weights (tests and timing)."""
    gen = torch.Generator().manual_seed(seed)
    model = TriModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def empty_model(cfg: ModelConfig) -> TriModel:
    """A model whose weights are placeholders on the meta device, to be replaced from a file: built without
    torch's random initialisers, which on meta tensors import about 800 modules (70 MB, a second)."""
    initialised = (nn.Linear, nn.Embedding)
    saved = [cls.reset_parameters for cls in initialised]
    try:
        for cls in initialised:
            cls.reset_parameters = lambda self: None
        with torch.device("meta"):
            return TriModel(cfg)
    finally:
        for cls, reset in zip(initialised, saved):
            cls.reset_parameters = reset
