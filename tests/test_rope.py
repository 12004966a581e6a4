"""RoPE schedules and query scaling against transformers' own implementations and the formula."""

import math

import pytest
import torch

from tridlm import rope
from tridlm.rope import RopeConfig

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIM = 64


def hf_config(params: dict):
    return transformers.LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=262144,
        rope_parameters=params,
    )


@pytest.mark.parametrize(
    "params",
    [
        dict(
            factor=16.0,
            original_max_position_embeddings=16384,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),  # the NLD setting: attention factor exactly 1
        dict(factor=4.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0),
        dict(
            factor=8.0,
            original_max_position_embeddings=2048,
            beta_fast=16.0,
            beta_slow=2.0,
            mscale=0.7,
            mscale_all_dim=0.3,
        ),
    ],
)
def test_yarn_matches_transformers(params):
    ours = RopeConfig(theta=1e6, type="yarn", **params).validate()
    inv_freq, factor = rope.inv_freq_and_attention_factor(ours, HEAD_DIM)
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](
        hf_config({"rope_type": "yarn", "rope_theta": 1e6, **params}), "cpu"
    )
    torch.testing.assert_close(inv_freq, ref_freq)
    assert factor == pytest.approx(ref_factor)
    if params.get("mscale") == params.get("mscale_all_dim") == 1.0:
        assert factor == 1.0


def test_llama3_matches_transformers():
    params = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    inv_freq, factor = rope.inv_freq_and_attention_factor(RopeConfig(theta=5e5, type="llama3", **params), HEAD_DIM)
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["llama3"](
        hf_config({"rope_type": "llama3", "rope_theta": 5e5, **params}), "cpu"
    )
    torch.testing.assert_close(inv_freq, ref_freq)
    assert factor == ref_factor == 1.0


def test_query_scale_formula_below_and_above_original_max():
    cfg = RopeConfig(
        theta=1e6, type="yarn", factor=16.0, original_max_position_embeddings=100, llama_4_scaling_beta=0.1
    )
    positions = torch.tensor([[0, 1, 99, 100, 199, 200, 350, 10_000]])
    got = rope.query_scale(positions, cfg, torch.float32)[0, :, 0, 0]
    want = [1 + 0.1 * math.log(1 + math.floor(p / 100)) for p in positions[0].tolist()]
    torch.testing.assert_close(got, torch.tensor(want))
    assert torch.all(got[:3] == 1.0)  # exactly 1 below original_max_position_embeddings
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    torch.testing.assert_close(got, get_llama_4_attn_scale(positions, 0.1, 100)[0, 0, :, 0])


def test_query_scale_off_by_default():
    assert rope.query_scale(torch.tensor([[5]]), RopeConfig(), torch.float32) is None


@pytest.mark.parametrize(
    "bad,message",
    [
        (RopeConfig(type="longrope"), "unsupported rope type 'longrope'"),
        (RopeConfig(type="yarn", factor=4.0), "need original_max_position_embeddings"),
    ],
)
def test_invalid_rope_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        bad.validate()
