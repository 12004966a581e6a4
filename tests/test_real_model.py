"""Our forward and decoders against transformers on the real default model (SmolLM2-135M-Instruct)."""

import inspect

import pytest
import torch

from tridlm import masks
from tridlm.decode import DecodeState, GenerationConfig, generate
from tridlm.decode.batcher import Batcher
from tridlm.decode.forward import forward_block, prefill

pytestmark = pytest.mark.slow

CHATS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
]


@pytest.fixture(scope="module")
def long_prompt(default_model):
    _, tok = default_model
    ids = tok.encode(inspect.getsource(inspect))[:320]
    assert len(ids) == 320
    return ids


@torch.no_grad()
def test_full_forward_matches_transformers(default_model, hf_reference, long_prompt):
    model, _ = default_model
    hf, _ = hf_reference
    x = torch.tensor([long_prompt])
    ours = model(x, torch.arange(x.shape[1])[None], masks.causal(torch.zeros(1, dtype=torch.long), x.shape[1], 0))
    ref = hf(x).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-3)


@torch.no_grad()
def test_incremental_decoding_through_cache_matches_transformers(default_model, hf_reference, long_prompt):
    model, _ = default_model
    hf, _ = hf_reference
    ref = hf(torch.tensor([long_prompt])).logits[0]  # (T, V)
    head = 280
    cache, last = prefill(model, [long_prompt[:head]], max_len=400)
    torch.testing.assert_close(last[0], ref[head - 1], rtol=1e-4, atol=1e-3)
    pos = head
    for n in (1, 1, 8, 1, 16, 1, 4):  # single tokens and blocks, as AR and verify passes write them
        logits = forward_block(model, cache, torch.tensor([long_prompt[pos : pos + n]]), masks.causal, write=True)
        torch.testing.assert_close(logits[0], ref[pos : pos + n], rtol=1e-4, atol=1e-3)
        pos += n
    assert int(cache.lengths[0]) == pos


def test_ar_greedy_equals_transformers_generate(default_model, hf_reference):
    model, tok = default_model
    hf, _ = hf_reference
    prompts = [tok.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    ours = generate(model, prompts, GenerationConfig(max_tokens=48))
    for prompt, row in zip(prompts, ours.rows):
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.eos_id,
        )
        assert row.tokens == out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("block_size", [4, 16])
def test_spec_equals_ar_on_real_model(default_model, block_size):
    model, tok = default_model
    prompts = [tok.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    cfg = GenerationConfig(max_tokens=40)
    ar = generate(model, prompts, cfg)
    sp = generate(model, prompts, cfg.replace(mode="spec", block_size=block_size))
    assert [r.tokens for r in sp.rows] == [r.tokens for r in ar.rows]
    for row in sp.rows:  # two forwards per draft+verify cycle, each cycle's tokens within the block
        assert row.nfe == 2 * len(row.accepted_lengths) and all(1 <= a <= block_size for a in row.accepted_lengths)
        assert sum(row.accepted_lengths) >= len(row.tokens) - 1  # all but the prefill's token came from cycles


@torch.inference_mode()  # as decoding runs: with the compiled kernels
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_verify_rows_are_ar_steps_bit_for_bit(precision):
    """With int8/int4 weights a causal block's logits equal, row by row and bit for bit, those of one-token AR
    steps (row-independent matmuls at these shapes, and ``kernels.attend``), so spec's greedy text is AR's by
    construction, not by argmax margins; checked on real prompts in every spec variant and auto too. The same holds
    between a row decoded in a ragged batch (static or continuous) and alone."""
    from helpers import unfused_logits_equal

    from tridlm.loading import open_model

    model, tok = open_model(dtype=precision)
    prompts = [tok.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    assert all(layer.self_attn.qkv is not None for layer in model.encoder.layers)  # one kernel call for q/k/v
    assert unfused_logits_equal(model, prompts[0])
    for n in (4, 8):
        cache, _ = prefill(model, prompts, max_len=200)
        start = cache.lengths.clone()
        block = torch.arange(300, 300 + n).repeat(len(prompts), 1)
        together = forward_block(model, cache, block, masks.causal, write=True)
        cache.crop(start)
        steps = torch.cat(
            [forward_block(model, cache, block[:, i : i + 1], masks.causal, write=True) for i in range(n)], dim=1
        )
        assert torch.equal(together, steps)
        for b, p in enumerate(prompts):  # batch == single: a row's keys keep their order (masks.after_own_cache)
            alone, _ = prefill(model, [p], max_len=200)
            assert torch.equal(
                torch.cat(
                    [
                        forward_block(model, alone, block[b : b + 1, i : i + 1], masks.causal, write=True)
                        for i in range(n)
                    ],
                    dim=1,
                ),
                steps[b : b + 1],
            )
    cfg = GenerationConfig(max_tokens=40)
    ar = [r.tokens for r in generate(model, prompts, cfg).rows]
    for variant, block in (("linear", 8), ("quadratic", 4), ("pipelined", 4), ("pipelined", 8)):
        sp = generate(model, prompts, cfg.replace(mode="spec", spec_variant=variant, block_size=block))
        assert [r.tokens for r in sp.rows] == ar
    assert [generate(model, [p], cfg.replace(mode="auto")).rows[0].tokens for p in prompts] == ar
    batcher, states = Batcher(model, len(prompts), 256), []
    for p in prompts:  # continuous batching: a row joins every 3 steps while the others run
        states.append(DecodeState(1, cfg.resolve(model), model.cfg.eos_ids, None))
        batcher.admit(states[-1], 0, p, None)
        for _ in range(3):
            batcher.step()
    while batcher.slots:
        batcher.step()
    assert [s.rows[0].tokens for s in states] == ar
    drafts_only = generate(
        model, prompts, cfg.replace(mode="spec", spec_variant="pipelined", block_size=4, lookup=False)
    )
    assert [r.tokens for r in drafts_only.rows] == ar
    assert drafts_only.stats()["tpf"] > 1.1  # the MASK rows' drafts are accepted


def test_shipped_draft_adapter_is_attached_and_drafts_better(default_model):
    """The default model carries the shipped adapter (AR untouched: test_real_model's parity tests run
    with it attached); its drafts are accepted more often than the bare model's."""
    from tridlm import checkpoint, loading
    from tridlm import default_model as default

    model, tok = default_model
    assert checkpoint.has_adapter(model) and (default.adapter_dir() / "adapter_model.safetensors").is_file()
    bare, _ = loading.open_default(own_adapter=False)
    assert not checkpoint.has_adapter(bare)
    prompts = [tok.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    cfg = GenerationConfig(mode="spec", block_size=8, max_tokens=32)
    trained, untrained = generate(model, prompts, cfg), generate(bare, prompts, cfg)
    assert [r.tokens for r in trained.rows] == [r.tokens for r in untrained.rows]  # lossless either way
    assert trained.stats()["nfe"] < 0.8 * untrained.stats()["nfe"]
