"""The compiled CPU kernels (tridlm.kernels) against the torch ops they stand in for, and the row independence
that makes spec's verify rows equal AR steps: a query row's attention is the same bit for bit whatever rows,
keys or batch rows come with it, in every dtype (torch's float32 matmuls are not)."""

import pytest
import torch

from tridlm import kernels, rope
from tridlm.model import RMSNorm, attention_bias, row_exact_attention

pytestmark = pytest.mark.skipif(kernels._module() is None, reason="the CPU kernels could not be built here")


def _inputs(dtype, B=2, n=5, H=9, KV=3, P=40, D=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, H, D, generator=gen).to(dtype)
    cache = torch.randn(2, B, KV, P + 7, D, generator=gen).to(dtype)  # keys read from a longer cache, as in decoding
    mask = torch.rand(B, n, P, generator=gen) < 0.7
    mask[..., 0] = True  # every row sees at least one key
    return q, cache[0, :, :, :P], cache[1, :, :, :P], mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("H", "KV", "D"), [(9, 3, 64), (4, 4, 128), (8, 2, 64)])
@torch.inference_mode()
def test_attend_matches_torch_attention(dtype, H, KV, D):
    q, k, v, mask = _inputs(dtype, H=H, KV=KV, D=D)
    got = kernels.attend(q, k, v, mask)
    want = row_exact_attention(q, k, v, attention_bias(mask[:, None], KV, H // KV))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_attend_row_is_independent_of_other_rows_and_trailing_keys(dtype):
    """Each row of a causal block over [prefix | block], computed alone over only the keys it may see, gives
    the same bits: what an AR step computes for that token."""
    P, n = 37, 6
    q, k, v, _ = _inputs(dtype, B=1, n=n, P=P + n)
    mask = torch.ones(1, n, P + n, dtype=torch.bool).tril(P)
    block = kernels.attend(q, k, v, mask)
    for i in range(n):
        alone = kernels.attend(q[:, i : i + 1], k[:, :, : P + i + 1], v[:, :, : P + i + 1], mask[:, i : i + 1, : P + i + 1])
        assert torch.equal(alone, block[:, i : i + 1])
    # and each batch row alone equals its row in the batch
    q, k, v, mask = _inputs(dtype, B=3, n=4)
    both = kernels.attend(q, k, v, mask)
    for b in range(3):
        assert torch.equal(kernels.attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], mask[b : b + 1]), both[b : b + 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_rms_norm_and_rope_match_their_torch_forms(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data = torch.randn(576, generator=gen).to(dtype)
    x = (torch.randn(2, 3, 576, generator=gen) * 4).to(dtype)
    positions = torch.arange(6).view(2, 3) * 97
    inv_freq, factor = rope.inv_freq_and_attention_factor(rope.RopeConfig(), 64)
    cos, sin = rope.cos_sin(positions, inv_freq, factor, dtype)
    heads = torch.randn(2, 3, 12, 64, generator=gen).to(dtype)[:, :, :9]  # a view with strided heads, as q is
    fused = norm(x), rope.apply(heads, cos, sin)
    assert kernels.rms_norm(x, norm.weight, norm.eps) is not None and kernels.rope(heads, cos, sin) is not None
    monkeypatch.setattr(kernels, "_usable", lambda *tensors: None)  # the torch forms
    plain = norm(x), rope.apply(heads, cos, sin)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(fused, plain):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_kernels_step_aside_where_they_do_not_apply():
    x = torch.randn(1, 2, 9, 48)  # a head size the attention is not compiled for
    assert kernels.attend(x, x[:, :, :3].transpose(1, 2), x[:, :, :3].transpose(1, 2), torch.ones(1, 2, 2, dtype=torch.bool)) is None
    with torch.no_grad():  # training, even where it needs no gradients, keeps torch's ops
        assert kernels.rms_norm(torch.randn(2, 64), torch.ones(64), 1e-5) is None


def test_a_failed_build_falls_back_with_a_message(monkeypatch, capsys):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert kernels._module.__wrapped__() is None
    assert "could not be built (RuntimeError: no C++ compiler)" in capsys.readouterr().err


@torch.inference_mode()
def test_attend_gives_zeros_to_a_row_with_no_key():
    q, k, v, mask = _inputs(torch.float32, B=1, n=2)
    mask[0, 1] = False
    out = kernels.attend(q, k, v, mask)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1])) and out[0, 0].abs().sum() > 0
