"""Low-bit weights: GGUF Q4_1 codes taken as they are, int8/int4 quantization error bounds, models that track
the float one and decode in every mode, with spec == AR token for token."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import unfused_logits_equal

from tridlm import checkpoint, projection, quant
from tridlm.decode import GenerationConfig, generate
from tridlm.presets import random_model

gguf = pytest.importorskip("gguf")


def matrix(weight, n_in: int) -> torch.Tensor:
    """The (out, in) matrix a packed weight applies, read back through its kernel."""
    return weight(torch.eye(n_in, dtype=quant.ACTIVATIONS)).T.float()


def test_q4_1_blocks_load_as_their_own_codes():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 128)).astype(np.float32)
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    want = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1).reshape(48, 128)
    got = matrix(quant.Int4Weight.from_q4_1(blocks, 48, 128), 128)
    # Exact but for bfloat16: the kernel's scale/zero and its output are rounded to 8 mantissa bits.
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=2**-7, atol=2**-7 * float(np.abs(want).max()))


def test_q4_1_blocks_repack_natively_into_the_constructors_layout(monkeypatch):
    """``kernels.repack_q4_1`` (loading) gives the bytes ``Int4Weight``'s own constructor gives, padding included."""
    from tridlm import kernels

    rng = np.random.default_rng(3)
    blocks = gguf.quants.quantize(rng.standard_normal((50, 96)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    native = quant.Int4Weight.from_q4_1(blocks, 50, 96)
    monkeypatch.setattr(kernels, "repack_q4_1", lambda *a: None)
    reference = quant.Int4Weight.from_q4_1(blocks, 50, 96)
    assert torch.equal(native.codes, reference.codes) and torch.equal(native.scales, reference.scales)


def test_int8_and_int4_quantization_error_is_within_half_a_step():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    i8 = quant.Int8Weight.from_float(w)
    # half a step, plus the scale's rounding to bfloat16 (relative 2^-9, on values up to |w|)
    assert ((i8.dequantize() - w).abs() <= i8.scale.float()[:, None] / 2 + w.abs() * 2**-8).all()
    i4 = quant.Int4Weight.from_float(w)
    groups = w.view(64, 3, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # (64, 3)
    bound = step.repeat_interleave(32, dim=1) / 2 + 2**-7 * w.abs().max()  # + bfloat16 rounding of the readback
    assert ((matrix(i4, 96) - w).abs() <= bound).all()
    with pytest.raises(ValueError, match="divisible by 32"):
        quant.Int4Weight.from_float(torch.randn(8, 40))


@pytest.fixture(scope="module")
def models(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, vocab_size=64)
    out = {"bfloat16": random_model(cfg, seed=4, std=0.3).to(torch.bfloat16)}
    for precision in quant.WEIGHT_PRECISIONS:
        model = random_model(cfg, seed=4, std=0.3).to(torch.bfloat16)
        projection.quantize(model, precision)
        out[precision] = model
    return out


@torch.no_grad()
@pytest.mark.parametrize("precision", quant.WEIGHT_PRECISIONS)
def test_quantized_model_tracks_the_float_one_and_decodes_in_every_mode(models, prompts, precision):
    model, ref = models[precision], models["bfloat16"]
    assert checkpoint.is_packed(model) and model.diffusion_head.weight is None
    assert isinstance(model.diffusion_head.packed, quant.Q8Table)  # the head is Q8_0 in both precisions
    x = torch.tensor([prompts[2]])
    from tridlm import masks

    mask = masks.causal(torch.zeros(1, dtype=torch.long), x.shape[1], 0)
    got, want = (m(x, torch.arange(x.shape[1])[None], mask) for m in (model, ref))
    # a wrong code layout would give unrelated logits (correlation ~0); 4 bits on this peaked random model lose some
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > {"int8": 0.99, "int4": 0.9}[precision]
    ar = [r.tokens for r in generate(model, prompts, GenerationConfig(max_tokens=24), eos_ids=[]).rows]
    assert all(len(t) == 24 for t in ar)
    for variant, block in (("linear", 4), ("linear", 8), ("quadratic", 3)):  # verify rows computed as AR steps are
        cfg = GenerationConfig(mode="spec", spec_variant=variant, block_size=block, max_tokens=24)
        assert [r.tokens for r in generate(model, prompts, cfg, eos_ids=[]).rows] == ar
    rows = generate(model, prompts, GenerationConfig(mode="diffusion", block_size=4, max_tokens=24), eos_ids=[]).rows
    assert all(len(r.tokens) == 24 for r in rows)


def test_packed_models_are_not_written_or_trained(models, char_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="not written"):
        checkpoint.save(tmp_path / "q", models["int4"], char_tokenizer)
    from tridlm.train.data import DataConfig
    from tridlm.train.loop import TrainConfig, Trainer

    with pytest.raises(ValueError, match="float weights"):
        Trainer(models["int8"], char_tokenizer, DataConfig(()), TrainConfig(), tmp_path)


def test_low_bit_weights_are_cpu_only():
    from tridlm.loading import open_model

    with pytest.raises(ValueError, match="CPU only"):
        open_model(dtype="int4", device="cuda")


def test_default_precision_is_int4_on_a_cpu_for_quantized_sources_only():
    from tridlm.loading import Source, default_precision

    assert default_precision(None, "cpu") == default_precision("model.Q4_1.gguf", "cpu") == "int4"
    assert default_precision("some/hf-directory", "cpu") == default_precision(None, "cuda") == "float32"
    assert Source().validate().dtype == "int4" and Source(dtype="bfloat16").validate().dtype == "bfloat16"


@pytest.mark.slow
def test_default_model_int4_keeps_the_gguf_codes(default_model):
    """The default model's q projection in int4 is its Q4_1 tensor (un-permuted), read back through the
    kernel, equal to the float model's dequantized weight within bfloat16 rounding."""
    from tridlm.loading import open_model

    int4, _ = open_model(dtype="int4")
    float_model, _ = default_model
    q = int4.encoder.layers[0].self_attn.q_proj
    assert isinstance(q.packed, quant.Int4Weight) and checkpoint.has_adapter(int4)
    want = float_model.encoder.layers[0].self_attn.q_proj.weight.float()
    torch.testing.assert_close(matrix(q.packed, want.shape[1]), want, rtol=2**-7, atol=2**-7 * float(want.abs().max()))


@torch.no_grad()
def test_fused_projections_give_the_same_logits(models, prompts):
    model = models["int8"]
    assert all(layer.self_attn.qkv is not None and layer.mlp.gate_up is not None for layer in model.encoder.layers)
    assert unfused_logits_equal(model, prompts[2])
    # int4: fused only where torch's packing allows (not the tiny model's 32-wide k/v); never wrong
    assert unfused_logits_equal(models["int4"], prompts[2])
