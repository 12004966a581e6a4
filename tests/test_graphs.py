"""The static-shape path that CUDA graphs replay, exercised on the CPU: a static cache (attention over
every slot, masked), pooled caches reused across requests, input buffers copied per call, and the
room check and commit done around the (here eager) replay."""

import pytest
import torch

from tridlm import masks
from tridlm.decode import GenerationConfig, generate
from tridlm.decode.forward import forward_block, prefill
from tridlm.graphs import GraphedModel

SETTINGS = [
    GenerationConfig(max_tokens=30),
    GenerationConfig(mode="spec", block_size=4, max_tokens=30),
    GenerationConfig(mode="spec", spec_variant="quadratic", block_size=3, max_tokens=30),
    GenerationConfig(mode="diffusion", block_size=4, threshold=0.3, max_tokens=30),
    GenerationConfig(mode="spec", block_size=4, temperature=0.8, seed=5, max_tokens=30),
]


@pytest.mark.parametrize("cfg", SETTINGS, ids=lambda c: f"{c.mode}-{c.spec_variant}-T{c.temperature}")
def test_graphed_model_decodes_exactly_like_the_model(tiny_model, prompts, cfg):
    graphed = GraphedModel(tiny_model, capacity=256)
    want = [r.tokens for r in generate(tiny_model, prompts, cfg).rows]
    for _ in range(2):  # the second request reuses the pooled cache and the captured shapes
        assert [r.tokens for r in generate(graphed, prompts, cfg).rows] == want
    assert graphed.graphs > 0 and len(graphed._caches) == 1


@torch.no_grad()
def test_static_cache_forward_equals_dynamic(tiny_model, prompts):
    dynamic, _ = prefill(tiny_model, prompts, max_len=64)
    static = tiny_model.new_cache(len(prompts), 64, static=True)
    static_cache, _ = prefill_into(tiny_model, static, prompts)
    block = torch.tensor([[7, 8, 9], [10, 11, 12], [13, 14, 15]])
    a = forward_block(tiny_model, dynamic, block, masks.causal, write=True)
    b = forward_block(tiny_model, static_cache, block, masks.causal, write=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(dynamic.lengths, static_cache.lengths) and static_cache.attended == 64


def prefill_into(model, cache, prompts):
    """prefill() with a given cache (what GraphedModel.new_cache hands out)."""
    model.new_cache = lambda batch, max_len: cache
    try:
        return prefill(model, prompts, max_len=cache.max_len)
    finally:
        del model.new_cache


def test_capacity_is_enforced(tiny_model):
    graphed = GraphedModel(tiny_model, capacity=32)
    with pytest.raises(ValueError, match="exceeds"):
        generate(graphed, [[5, 6, 7]], GenerationConfig(max_tokens=40))
