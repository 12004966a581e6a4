import copy

import pytest
import torch

from tridlm import masks, projection
from tridlm.decode.forward import forward_block, prefill


def full_forward(model, seq: list[int]) -> torch.Tensor:
    """Uncached causal forward of one sequence -> (n, V)."""
    x = torch.tensor([seq])
    return model(x, torch.arange(len(seq))[None], masks.causal(torch.zeros(1, dtype=torch.long), len(seq), 0))[0]


@pytest.fixture(scope="module")
def int4_model(tiny_model):
    """The tiny model with int4 weights: float32 activations, keys and values kept in float16."""
    model = copy.deepcopy(tiny_model)
    projection.quantize(model, "int4")
    assert model.dtype == torch.float32 and model.new_cache(1, 8).k.dtype == torch.float16
    return model


@torch.no_grad()
@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("weights", ["float32", "int4"])
def test_cached_equals_uncached_ragged_batch(tiny_model, int4_model, prompts, step, weights):
    """Also where the cache keeps keys and values in another dtype than the activations (int4): the uncached
    forward rounds them as the cache does."""
    tiny_model = int4_model if weights == "int4" else tiny_model
    g = torch.Generator().manual_seed(1)
    conts = [torch.randint(4, 64, (9,), generator=g).tolist() for _ in prompts]
    cache, last = prefill(tiny_model, prompts, max_len=64)
    assert cache.lengths.tolist() == [len(p) for p in prompts]
    for b, p in enumerate(prompts):
        torch.testing.assert_close(last[b], full_forward(tiny_model, p)[-1], rtol=1e-4, atol=1e-4)
    for s in range(0, 9, step):
        block = torch.tensor([c[s : s + step] for c in conts])
        logits = forward_block(tiny_model, cache, block, masks.causal, write=True)
        for b, p in enumerate(prompts):
            ref = full_forward(tiny_model, p + conts[b][: s + step])[-step:]
            torch.testing.assert_close(logits[b], ref, rtol=1e-4, atol=1e-4)
    assert cache.lengths.tolist() == [len(p) + 9 for p in prompts]


@torch.no_grad()
def test_crop_restores_cache(tiny_model, prompts):
    cache, _ = prefill(tiny_model, prompts, max_len=64)
    start = cache.lengths.clone()
    committed_k = [cache.k[:, b, :, : int(n)].clone() for b, n in enumerate(start)]
    rejected = torch.randint(4, 64, (len(prompts), 5), generator=torch.Generator().manual_seed(2))
    forward_block(tiny_model, cache, rejected, masks.causal, write=True)
    assert cache.lengths.tolist() == (start + 5).tolist()
    cache.crop(start)
    for b, n in enumerate(start):
        assert torch.equal(cache.k[:, b, :, : int(n)], committed_k[b])
    nxt = torch.tensor([[7], [8], [9]])
    after_crop = forward_block(tiny_model, cache, nxt, masks.causal, write=True)
    fresh, _ = prefill(tiny_model, prompts, max_len=64)
    torch.testing.assert_close(after_crop, forward_block(tiny_model, fresh, nxt, masks.causal, write=True))
    with pytest.raises(ValueError, match="crop cannot grow"):
        cache.crop(cache.lengths + 1)


@torch.no_grad()
def test_bidirectional_pass_reads_without_writing(tiny_model, prompts):
    cache, _ = prefill(tiny_model, prompts, max_len=64)
    k, v, lengths = cache.k.clone(), cache.v.clone(), cache.lengths.clone()
    forward_block(tiny_model, cache, torch.full((3, 4), 3), masks.bidirectional, adapter=True)
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v) and torch.equal(cache.lengths, lengths)


@torch.no_grad()
def test_cache_overflow_is_a_clear_error(tiny_model):
    cache, _ = prefill(tiny_model, [[5, 6, 7]], max_len=5)
    with pytest.raises(ValueError, match="KV cache overflow"):
        forward_block(tiny_model, cache, torch.tensor([[1, 2, 3]]), masks.causal, write=True)
