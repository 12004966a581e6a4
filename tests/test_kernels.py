"""The compiled CPU kernels (tridlm.kernels) against the torch ops they stand in for, and the row independence
that makes spec's verify rows equal AR steps: a query row's attention is the same bit for bit whatever rows,
keys or batch rows come with it, in every dtype (torch's float32 matmuls are not)."""

import os

import gguf
import pytest
import torch

from tridlm import kernels, rope
from tridlm.attention import attention_bias, row_exact_attention
from tridlm.model import RMSNorm

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
        alone = kernels.attend(
            q[:, i : i + 1], k[:, :, : P + i + 1], v[:, :, : P + i + 1], mask[:, i : i + 1, : P + i + 1]
        )
        assert torch.equal(alone, block[:, i : i + 1])
    # and each batch row alone equals its row in the batch
    q, k, v, mask = _inputs(dtype, B=3, n=4)
    both = kernels.attend(q, k, v, mask)
    for b in range(3):
        assert torch.equal(kernels.attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], mask[b : b + 1]), both[b : b + 1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_attention_in_float32_is_its_output_before_rounding_and_rope_rounds_once(dtype):
    """What a low-bit model does (queries, keys and values in the cache's dtype, activations in float32): the
    attention's float32 output is the same row's output before its rounding to the inputs' dtype, and rope into
    another dtype is rope in float32 rounded once."""
    q, k, v, mask = _inputs(dtype)
    wide = kernels.attend(q, k, v, mask, torch.float32)
    assert wide.dtype == torch.float32 and torch.equal(wide.to(dtype), kernels.attend(q, k, v, mask))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 9, 64, generator=gen)
    inv_freq, factor = rope.inv_freq_and_attention_factor(rope.RopeConfig(), 64)
    cos, sin = rope.cos_sin(torch.arange(6).view(2, 3) * 31, inv_freq, factor, torch.float32)
    rounded = kernels.rope(x, cos, sin, dtype)
    assert rounded.dtype == dtype and torch.equal(rounded, kernels.rope(x, cos, sin).to(dtype))


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
    assert (
        kernels.attend(
            x, x[:, :, :3].transpose(1, 2), x[:, :, :3].transpose(1, 2), torch.ones(1, 2, 2, dtype=torch.bool)
        )
        is None
    )
    with torch.no_grad():  # training, even where it needs no gradients, keeps torch's ops
        assert kernels.rms_norm(torch.randn(2, 64), torch.ones(64), 1e-5) is None


def test_a_failed_build_falls_back_with_a_message(monkeypatch, capsys):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert kernels.build(kernels.isa()) is None
    assert "could not be built (RuntimeError: no C++ compiler)" in capsys.readouterr().err


def test_the_kernels_come_installed_and_a_fresh_process_builds_nothing(tmp_path):
    """``make setup`` compiles every variant into the package: a process with an empty extension cache decodes with
    them at once, building nothing. A module built from other sources (or for another torch) is not used."""
    import subprocess
    import sys

    assert [v for v in kernels.runnable() if kernels.installed(v) is None] == []
    code = (
        "from tridlm import kernels; from tridlm.loading import open_model; from tridlm.decode import generate, "
        "GenerationConfig; m, t = open_model(None, 'int4'); "
        "generate(m, [t.encode('Hello')], GenerationConfig(mode='ar', max_tokens=2)); "
        "print(kernels._module() is kernels.installed(kernels.isa()))"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.stdout.strip() == "True", run.stderr[-2000:]
    assert "built the CPU kernels" not in run.stderr and not (tmp_path / "cache").exists()


def test_an_installed_module_from_other_sources_is_not_used(monkeypatch):
    monkeypatch.setattr(kernels, "source_digest", lambda: "edited since")
    assert kernels.installed(kernels.isa()) is None


@torch.inference_mode()
def test_attend_gives_zeros_to_a_row_with_no_key():
    q, k, v, mask = _inputs(torch.float32, B=1, n=2)
    mask[0, 1] = False
    out = kernels.attend(q, k, v, mask)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1])) and out[0, 0].abs().sum() > 0


def _quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the low-bit kernels see it: int8 codes per block of 32, scale max|x| / 127, round to nearest."""
    blocks = x.float().view(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / scale).nan_to_num() * scale).view(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_out", [96, 100])  # a whole number of 16-channel tiles, and one padded
def test_int4_and_int8_kernels_compute_their_weights_on_quantized_activations(dtype, n_out):
    """The matmul the kernels do: the weights' exact values (int4: d * q + m; int8: q * scale per channel; GGUF
    Q8_0: q * scale per block) times the activations rounded to int8 per block of 32, up to float32 rounding;
    every row alone gives the same bits."""
    from tridlm import quant

    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(n_out, 192, generator=gen), (torch.randn(9, 192, generator=gen) * 3).to(dtype)
    i4, i8 = quant.Int4Weight.from_float(w), quant.Int8Weight.from_float(w)
    q8_0 = quant.Q8Table(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0), *w.shape)
    q, d, m = i4.unpack()
    weights = {
        "int4": (i4, q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)),
        "int8": (i8, i8.dequantize()),
        "q8_0": (q8_0, q8_0.dequantize()),
    }
    for name, (packed, exact) in weights.items():
        got = packed(x)
        want = _quantized_rows(x) @ exact.T
        assert got.shape == (9, n_out) and got.dtype == dtype, name
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item(), msg=name)
        rows = torch.cat([packed(x[i : i + 1]) for i in range(9)])
        assert torch.equal(rows, got), name
        for k in range(2, 9):  # every size of a pass over a tile's codes
            assert torch.equal(packed(x[:k]), got[:k]), (name, k)


def test_low_bit_weights_keep_their_codes_and_run_without_the_kernels(monkeypatch):
    """Packing is lossless (unpack gives the codes back), and where the kernels cannot be built torch's own
    int4/int8 kernels compute the same weights (bfloat16 activations: close, not equal)."""
    from tridlm import quant

    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (48, 64), generator=gen)
    d, m = torch.rand(48, 2, generator=gen), torch.randn(48, 2, generator=gen)
    i4 = quant.Int4Weight(codes, d.half().float(), m.half().float())
    q, d2, m2 = i4.unpack()
    assert torch.equal(q, codes.to(torch.uint8))
    assert torch.equal(d2, d.half().float()) and torch.equal(m2, m.half().float())
    w = torch.randn(40, 64, generator=gen)
    i8 = quant.Int8Weight.from_float(w)
    assert torch.equal(i8.unpack(), torch.round(w / i8.scale[:, None]).to(torch.int8))
    q8_0 = quant.Q8Table(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0), *w.shape)
    x = torch.randn(3, 64, generator=gen).bfloat16()
    with torch.inference_mode():
        fast = [i4(x), i8(x), q8_0(x)]
    monkeypatch.setattr(kernels, "_module", lambda: None)
    with torch.inference_mode():
        slow = [i4(x), i8(x), q8_0(x)]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05 * b.abs().max().item())


@torch.inference_mode()
def test_adapters_in_the_int4_kernel_and_lora_add_match_the_torch_formula():
    """A group's adapter (block-diagonal B, tiles spanning two projections) added inside the int4 matmul or by
    lora_add, on chosen rows only, equals y + mask * (x A^T) B^T; rows without it are untouched, bit for bit."""
    from tridlm import quant
    from tridlm.projection import Linear, LoraGroup

    gen = torch.Generator().manual_seed(4)
    projs = tuple(Linear(64, n) for n in (40, 24, 56))  # 40 and 64 end inside tiles of 16
    for i, p in enumerate(projs):
        p.add_lora(4 + i, 8.0, torch.float32, torch.device("cpu"))
        p.lora_b.data = torch.randn(p.lora_b.shape, generator=gen)
    group = LoraGroup(projs)
    group.refresh(torch.float32)
    x = torch.randn(5, 64, generator=gen)
    rows = torch.tensor([True, False, True, True, False])
    delta = torch.cat([(x @ p.lora_a.T) @ p.lora_b.T * p.lora_scale for p in projs], dim=-1) * rows[:, None]
    fused = quant.Int4Weight.from_float(torch.randn(120, 64, generator=gen))
    plain, with_adapter = fused(x), fused(x, group.kernel_form(rows))
    torch.testing.assert_close(with_adapter, plain + delta, rtol=1e-5, atol=1e-5)
    assert torch.equal(with_adapter[~rows], plain[~rows])
    y = torch.randn(5, 120, generator=gen)
    added = kernels.lora_add(y.clone(), x, group.kernel_form(rows))
    torch.testing.assert_close(added, y + delta, rtol=1e-5, atol=1e-5)
    assert torch.equal(added[~rows], y[~rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_silu_mul_matches_its_torch_form(dtype):
    gen = torch.Generator().manual_seed(5)
    both = (torch.randn(2, 3, 2 * 96, generator=gen) * 6).to(dtype)  # one gate/up output, as the MLP splits it
    gate, up = both.split(96, dim=-1)
    got = kernels.silu_mul(gate, up)
    want = torch.nn.functional.silu(gate.float()) * up.float()
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_process():
    """A build killed midway leaves torch's lock file behind; the next process clears it under its own OS lock
    (released whenever a process ends) instead of waiting on it forever."""
    import subprocess
    import sys

    folder = kernels.build_directory(kernels.module_name(kernels.isa()))
    (folder / "lock").touch()
    load = "from tridlm import kernels; print(kernels.build(kernels.isa()) is not None)"
    out = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=600)
    assert out.stdout.strip() == "True" and not (folder / "lock").exists()


def test_one_thread_keeps_the_kernels_on_one_core():
    """``--threads 1`` (``torch.set_num_threads``) bounds the kernels' parallel regions: a process busy in int4
    matmuls uses one core (CPU time / wall time; with 2 threads on an idle 2-core machine the same code used 1.97)."""
    import subprocess
    import sys

    code = """
import os, time, torch
torch.set_num_threads(1)
from tridlm import quant
w, x = quant.Int4Weight.from_float(torch.randn(4096, 2048)), torch.randn(8, 2048)
w(x)
cpu, wall = sum(os.times()[:2]), time.perf_counter()
while time.perf_counter() - wall < 2:
    w(x)
print((sum(os.times()[:2]) - cpu) / (time.perf_counter() - wall))
"""
    cores = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout)
    assert cores < 1.15


def test_every_variant_this_cpu_runs_passes_the_kernel_and_low_bit_tests():
    """Each instruction-set variant this CPU can run, not only the best one the rest of the suite loads, is built
    and passes this file and tests/test_quant.py (int4/int8 spec == AR bit for bit among them)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    others = [v for v in kernels.runnable() if v != kernels.isa()]
    if not others:
        pytest.skip("this CPU runs one variant only")
    for variant in others:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"]
            + ["tests/test_quant.py", "-k", "not variant and not lock and not core"],
            env={**os.environ, "TRIDLM_CPU_ISA": variant},
            cwd=Path(__file__).parents[1],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert run.returncode == 0 and " passed" in run.stdout, (variant, run.stdout[-3000:], run.stderr[-2000:])


def test_the_fma_variants_give_the_same_logits_bit_for_bit(tmp_path):
    """The AVX-512, AVX-VNNI and AVX2 builds compute every value in the same order with the same fused
    multiply-adds, so the default model's prefill and AR steps (native layers: float32 activations, float16 keys and
    values) give the same logits on each; ``portable`` has no FMA and rounds every product (it may differ)."""
    import os
    import subprocess
    import sys

    variants = [v for v in kernels.runnable() if v != "portable"]
    if len(variants) < 2:
        pytest.skip("this CPU runs one FMA variant only")
    code = """
import sys, torch
from tridlm import masks
from tridlm.decode.forward import forward_block
from tridlm.loading import open_model
torch.set_num_threads(2)
model, tok = open_model(None, "int4")
with torch.inference_mode():
    cache = model.new_cache(1, 64)
    prompt = torch.tensor([tok.encode("Write a haiku about autumn leaves, please, in English.")])
    out = [forward_block(model, cache, prompt, masks.causal, write=True)]
    for _ in range(8):
        out.append(forward_block(model, cache, out[-1][:, -1:].argmax(-1), masks.causal, write=True))
torch.save(out, sys.argv[1])
"""
    logits = {}
    for variant in variants:
        path = tmp_path / f"{variant}.pt"
        run = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            env={**os.environ, "TRIDLM_CPU_ISA": variant},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, (variant, run.stderr[-2000:])
        logits[variant] = torch.load(path)
    first, *others = variants
    for variant in others:
        assert all(torch.equal(a, b) for a, b in zip(logits[first], logits[variant], strict=True)), (first, variant)


def test_a_forced_variant_must_be_known_and_runnable(monkeypatch):
    monkeypatch.setenv("TRIDLM_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="expected one of avx512, avxvnni, avx2, portable"):
        kernels.isa()
    monkeypatch.setenv("TRIDLM_CPU_ISA", "portable")
    assert kernels.isa() == "portable"


def _int4_model():
    """A small int4 model the native layer call applies to (64-wide heads), with a draft adapter on every
    projection (random, so that it changes the drafts)."""
    from tridlm import projection
    from tridlm.model import ModelConfig
    from tridlm.presets import random_model

    cfg = ModelConfig(64, 128, 2, 4, 2, 64, 256, max_seq_len=1024, bos_id=1, eos_ids=(2,), mask_id=3)
    model = random_model(cfg, seed=5, std=0.3).to(torch.bfloat16)
    projection.quantize(model, "int4")
    model.add_lora(4, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("lora_b"):
                weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def test_decode_layers_give_the_modules_values_bit_for_bit(monkeypatch):
    """An int4 model's decode forwards (prefill, AR steps, pipelined spec's verify-and-draft forwards with the draft
    adapter on some rows, a ragged continuous batch) through ``kernels.decode_layers`` in one call give the same
    logits as its modules' forwards, to the last bit."""
    from tridlm.decode import DecodeState, GenerationConfig, generate
    from tridlm.decode.batcher import Batcher

    model = _int4_model()
    cfg = model.cfg
    native = []
    real = kernels.decode_layers
    monkeypatch.setattr(
        kernels, "decode_layers", lambda *a: native.append((*a[0].shape, len(a[2]), a[10].numel())) or real(*a)
    )
    prompts = [[1, 5, 9, 11, 7], [1, 4, 4, 6, 8, 10, 12, 14, 9, 30]]
    greedy = GenerationConfig(max_tokens=24)

    def decode() -> tuple[list, list[torch.Tensor]]:
        logits, forward = [], model.forward
        model.forward = lambda *a, **k: logits.append(out := forward(*a, **k)) or out
        try:
            modes = [greedy.replace(mode="ar"), greedy.replace(mode="spec", spec_variant="pipelined", block_size=4)]
            out = [generate(model, [p], c).rows[0].tokens for p in prompts for c in modes]
            for batch_cfg in (greedy, greedy.replace(mode="auto", block_size=4)):  # auto: padded ragged verifies
                batcher, state = Batcher(model, 2, 64), DecodeState(2, batch_cfg.resolve(model), cfg.eos_ids, None)
                for row, p in enumerate(prompts):
                    batcher.admit(state, row, p + p[1:] if batch_cfg.mode == "auto" else p, None)
                    batcher.step()
                while batcher.slots:
                    batcher.step()
                out += [r.tokens for r in state.rows]
            return out, logits
        finally:
            del model.forward

    fast = decode()
    sizes = {n for _, n, _, _, _ in native}  # prefills, AR steps, verify blocks, drafting; a batch of two rows
    assert 1 in sizes and sizes - {1, *map(len, prompts)} and any(b == 2 for b, *_ in native)
    assert any(adapters for *_, adapters, _ in native)
    assert any(b == 2 and 0 < real < b * n for b, n, _, _, real in native)  # a batch step with padding left out
    model.native.enabled, calls = False, len(native)
    slow = decode()
    assert len(native) == calls and fast[0] == slow[0] and len(fast[1]) == len(slow[1])
    assert all(torch.equal(a, b) for a, b in zip(fast[1], slow[1]))


def test_the_native_path_says_why_not_once_and_follows_new_weights(monkeypatch):
    """``tridlm.native``: it applies to a fused int4 model; one it cannot run (per-head q/k norms) says why, once,
    and decodes by its modules; a float model has nothing to say; packed weights replaced later are the ones it
    runs."""
    import dataclasses
    import warnings

    from tridlm import native, projection
    from tridlm.decode import GenerationConfig, generate
    from tridlm.presets import random_model

    model = _int4_model()
    assert native.why_not(model) is None
    assert "not fused int4" in native.why_not(random_model(model.cfg, seed=5))
    seen = []
    real = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers", lambda *a: seen.append(a[1]) or real(*a))
    greedy = GenerationConfig(max_tokens=4)
    generate(model, [[1, 5, 9]], greedy)
    first = seen[-1]
    projection.fuse_packed(model)  # new fused objects: the path gathers them again
    generate(model, [[1, 5, 9]], greedy)
    assert seen[-1] is not first and seen[-1][1] is model.encoder.layers[0].self_attn.qkv.codes

    qk = random_model(dataclasses.replace(model.cfg, qk_norm=True), seed=5).to(torch.bfloat16)
    projection.quantize(qk, "int4")
    calls = len(seen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(qk, [[1, 5, 9]], greedy)
        generate(qk, [[1, 5, 9]], greedy)
    assert len(seen) == calls and [str(w.message) for w in caught] == [
        "int4 weights decode module by module (slower): per-head q/k norms (qk_norm) are not in the kernel"
    ]


def test_the_native_path_runs_where_llama_4_query_scaling_is_exactly_one(monkeypatch):
    """NLD's query scaling is 1 below ``original_max_position_embeddings``: there the native call runs (the kernel
    does not scale queries), past it the modules do, and the tokens are the modules' alone either way."""
    import dataclasses

    from tridlm import projection
    from tridlm.decode import GenerationConfig, generate
    from tridlm.presets import random_model
    from tridlm.rope import RopeConfig

    cfg = _int4_model().cfg
    cfg = dataclasses.replace(cfg, rope=RopeConfig(original_max_position_embeddings=16, llama_4_scaling_beta=0.5))
    model = random_model(cfg, seed=5, std=0.3).to(torch.bfloat16)
    projection.quantize(model, "int4")
    positions = []
    real = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers", lambda *a: positions.append(a[0].shape[1]) or real(*a))
    prompt, greedy = [1, 5, 9, 11, 7], GenerationConfig(max_tokens=30)
    fast = generate(model, [prompt], greedy, eos_ids=()).rows[0].tokens
    assert positions and len(positions) < 30  # the prefill and the steps below position 16, not those past it
    model.native.enabled = False
    assert generate(model, [prompt], greedy, eos_ids=()).rows[0].tokens == fast


def test_a_prompt_prefilled_in_any_chunks_gets_the_same_tokens():
    """A 700-token prompt: ``generate`` prefills it in chunks of 512 (row-exact blocks), the continuous batch in
    chunks of 100 between steps; both decode the same tokens."""
    from tridlm.decode import DecodeState, GenerationConfig, generate
    from tridlm.decode.batcher import Batcher

    model = _int4_model()
    prompt = [(13 * i) % 60 + 4 for i in range(700)]
    cfg = GenerationConfig(max_tokens=16)
    batcher, state = Batcher(model, 1, 1024, prefill_chunk=100), DecodeState(1, cfg.resolve(model), (), None)
    batcher.admit(state, 0, prompt, None)
    while batcher.busy:
        batcher.step()
    assert state.rows[0].tokens == generate(model, [prompt], cfg, eos_ids=()).rows[0].tokens
