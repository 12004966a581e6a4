"""Tri-mode GGUF files (``tridlm convert SRC OUT.gguf``): loaded back, they are the model the source loads as in the
same precision, bit for bit (config, logits causal and drafting with the adapter, tokens in every mode), with the
file's bytes used as they are; bad targets refused; and llama.cpp, where installed, computes on our export what it
computes on the GGUF its own tools wrote."""

import dataclasses

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tridlm import checkpoint, default_model, gguf_file, loading, masks, quant
from tridlm.cli import main
from tridlm.decode import GenerationConfig, generate
from tridlm.decode.modes import TABLE
from tridlm.presets import preset, random_model
from tridlm.rope import RopeConfig
from tridlm.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Tokenizer:
    """Byte-level BPE (GPT-2's split, digits one by one, as SmolLM2's): the 256 byte symbols, a few merges, specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    vocab = {t: i for i, t in enumerate(SPECIALS + alphabet + ["".join(m) for m in merges])}
    backend = HFTokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return Tokenizer(backend, chat_template="{{ messages[0]['content'] }}", bos_id=1, eos_id=0)


def nld_like(tokenizer: Tokenizer, bias: bool) -> checkpoint.TriModel:
    """A tiny model with NLD's features: yarn + Llama-4 query scaling (original context 16, so that the prompts reach
    past it), an untied head, a vocabulary padded past the tokenizer's, a block size, a mask id and a draft adapter."""
    cfg = dataclasses.replace(
        preset("tiny"),
        vocab_size=tokenizer.vocab_size + 9,
        rope=RopeConfig(1e6, "yarn", 16.0, 16, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1),
        attention_bias=bias,
        bos_id=1,
        eos_ids=(0, 2),
        mask_id=3,
        block_size=8,
    )
    model = random_model(cfg, seed=5, std=0.2)
    model.add_lora(4, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 2 and p.shape[1] == 4:  # lora_b: nonzero, so the adapter counts
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def logits(model, tokens: torch.Tensor, adapter: bool) -> torch.Tensor:
    n = tokens.shape[1]
    mask = masks.causal(torch.zeros(1, dtype=torch.long), n, 0) if not adapter else torch.ones(1, n, n, dtype=bool)
    with torch.inference_mode():
        return model(tokens, torch.arange(n)[None], mask, adapter=adapter)


@pytest.mark.parametrize("precision", ["int4", "int8", "bfloat16"])
def test_a_tri_mode_gguf_loads_back_as_its_source_runs(tmp_path, bpe_tokenizer, precision):
    for bias in (False, True) if precision == "int4" else (False,):
        source = tmp_path / f"nld-{bias}"
        checkpoint.save(source, nld_like(bpe_tokenizer, bias), bpe_tokenizer)
        out = tmp_path / f"nld-{bias}.gguf"
        assert "draft-lora.gguf" in loading.convert(source, out, precision)
        want, _ = loading.open_model(source, precision)
        got, tok = loading.open_model(out, precision)
        assert got.cfg == want.cfg and got.cfg.rope.llama_4_scaling_beta == 0.1 and got.cfg.block_size == 8
        assert tok.encode("the 1234 <|mask|>") == bpe_tokenizer.encode("the 1234 <|mask|>")
        assert tok.vocab_size == bpe_tokenizer.vocab_size  # the padding rows are no tokens
        if precision != "bfloat16":  # the file's bytes, used as they are
            kinds = {type(m.packed) for m in got.modules() if isinstance(m, checkpoint.Linear)}
            assert kinds == ({quant.Int4Weight, quant.Q8Table} if precision == "int4" else {quant.Q8Table})
            assert isinstance(got.encoder.embed_tokens, quant.Q8Embedding)
        tokens = torch.tensor([[1, *range(5, 45)]])  # 41 positions: past the original context of 16
        for adapter in (False, True):
            assert torch.equal(logits(got, tokens, adapter), logits(want, tokens, adapter)), adapter
    prompts = [[1, 5, 9, 11, 7], [1, 40, 41, 42]]
    for row in TABLE:
        cfg = GenerationConfig(mode=row.mode, spec_variant=row.spec_variant, block_size=4, max_tokens=12)
        runs = [[r.tokens for r in generate(m, prompts, cfg, eos_ids=[]).rows] for m in (got, want)]
        assert runs[0] == runs[1], row.label


def test_metadata_is_llama_cpps_where_it_has_keys(tmp_path, bpe_tokenizer):
    source = tmp_path / "nld"
    checkpoint.save(source, nld_like(bpe_tokenizer, False), bpe_tokenizer)
    loading.convert(source, tmp_path / "m.gguf", "int4")
    fields = gguf_file.GGUFFile(tmp_path / "m.gguf").fields
    assert fields["general.architecture"] == "mistral3" and fields["diffusion.shift_logits"] is False  # NLD's backbone
    assert fields["tokenizer.ggml.mask_token_id"] == 3 and fields["tridlm.block_size"] == 8
    a = "mistral3."
    assert fields[a + "rope.scaling.type"] == "yarn" and fields[a + "rope.scaling.original_context_length"] == 16
    assert fields[a + "attention.temperature_scale"] == pytest.approx(0.1)  # the query scaling
    # mscale == mscale_all_dim: attention factor 1, where llama.cpp's YaRN would apply 1 + 0.1 ln 16 of itself
    assert fields[a + "rope.scaling.attn_factor"] == pytest.approx(1 / (1 + 0.1 * np.log(16)))
    assert len(fields["tokenizer.ggml.tokens"]) == bpe_tokenizer.vocab_size + 9
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{bpe_tokenizer.vocab_size + 8}]"
    adapter = gguf_file.GGUFFile(tmp_path / "m.draft-lora.gguf")
    assert adapter.fields["general.type"] == "adapter" and adapter.fields["adapter.lora.alpha"] == 8.0
    assert {t.name for t in adapter.tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.1.ffn_down.weight.lora_b"}


def test_bad_targets_and_inputs_are_refused_and_nothing_is_left_behind(tmp_path, bpe_tokenizer, char_tokenizer):
    source = tmp_path / "nld"
    checkpoint.save(source, nld_like(bpe_tokenizer, False), bpe_tokenizer)
    out = tmp_path / "m.gguf"
    out.write_text("precious")
    with pytest.raises(ValueError, match="exists and is not empty"):
        loading.convert(source, out, "int4")
    with pytest.raises(ValueError, match="invalid dtype='float32' for a GGUF file"):
        loading.convert(source, tmp_path / "new.gguf", "float32", force=True)
    assert out.read_text() == "precious"
    loading.convert(source, out, "int4", force=True)
    with pytest.raises(checkpoint.CheckpointError, match="a LoRA adapter file, not a model"):
        loading.open_model(tmp_path / "m.draft-lora.gguf", "int4")
    words = tmp_path / "words"  # a word-level tokenizer has no GGUF form
    checkpoint.save(words, random_model(preset("tiny")), char_tokenizer)
    with pytest.raises(ValueError, match="byte-level BPE"):
        loading.convert(words, tmp_path / "words.gguf", "int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.draft-lora.gguf", "m.gguf", "nld", "words"]


def test_the_default_models_export_is_its_gguf_file(tmp_path, capsys):
    """`tridlm convert default OUT.gguf --dtype int4`: the original file's tensors byte for byte (its Q4_1 codes and
    Q8_0 table kept through loading), its tokenizer metadata, and the shipped draft adapter beside it."""
    out = tmp_path / "smol.gguf"
    main(["convert", "default", str(out), "--dtype", "int4"])
    assert f"wrote {out} and {gguf_file.adapter_path(out)}: int4" in capsys.readouterr().out
    ours, original = gguf_file.GGUFFile(out), gguf_file.GGUFFile(default_model.gguf_path())
    by_name = {t.name: t for t in original.tensors}
    assert {t.name: (t.shape, t.kind) for t in ours.tensors} == {n: (t.shape, t.kind) for n, t in by_name.items()}
    for t in ours.tensors:
        assert np.array_equal(ours.read(t), original.read(by_name[t.name])), t.name
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.chat_template",
    ):
        assert ours.fields[key] == original.fields[key], key
    assert gguf_file.adapter_path(out).is_file()


def test_llama_cpp_computes_on_our_export_what_it_computes_on_its_own_file(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make bench installs it)")
    out = tmp_path / "smol.gguf"
    loading.convert(None, out, "int4")
    tokens = Tokenizer.from_gguf(gguf_file.GGUFFile(out).fields).encode("The capital of France is")
    scores = []
    for path in (default_model.gguf_path(), out):
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False)
        llm.eval(tokens)
        scores.append(np.array(llm.scores[: len(tokens)]))
    assert np.array_equal(scores[0], scores[1])


def test_llama_cpp_runs_an_nld_export_with_its_rope_and_query_scaling(tmp_path, bpe_tokenizer):
    """llama.cpp reads an NLD export as its mistral3 architecture (Ministral 3): YaRN with NLD's attention factor and
    the Llama-4 query scaling past the original context (16 here) give our log-probabilities up to rounding."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make bench installs it)")
    source, out = tmp_path / "nld", tmp_path / "nld.gguf"
    model = nld_like(bpe_tokenizer, False)
    model.cfg = dataclasses.replace(model.cfg, vocab_size=bpe_tokenizer.vocab_size + 9)
    checkpoint.save(source, model.to(torch.bfloat16), bpe_tokenizer)
    loading.convert(source, out, "bfloat16")
    ours, _ = loading.open_model(out, "float32", adapter="none")
    tokens = [1, *range(5, 45)]
    want = torch.log_softmax(logits(ours, torch.tensor([tokens]), False)[0], -1).numpy()
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(tokens)
    got = torch.log_softmax(torch.from_numpy(np.array(llm.scores[: len(tokens)])).float(), -1).numpy()
    error = np.abs(got - want).max(-1)  # per position; llama.cpp keeps keys and values in float16
    assert error.max() < 0.15
    unscaled = dataclasses.replace(ours.cfg.rope, llama_4_scaling_beta=None)
    ours.cfg = dataclasses.replace(ours.cfg, rope=unscaled)  # past position 16 the query scaling shows
    without = torch.log_softmax(logits(ours, torch.tensor([tokens]), False)[0], -1).numpy()
    assert np.abs(got - without).max(-1)[16:].min() > error[16:].max()
