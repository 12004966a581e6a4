"""Checkpoint interop: HF AR directories in, NLD directories in and out, adapters, convert, bad input."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from tridlm import checkpoint, masks
from tridlm.checkpoint import CheckpointError
from tridlm.cli import main
from tridlm.loading import convert
from tridlm.presets import random_model

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,
)
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "llama3-rope": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    # Ministral 3 is the NLD backbone: yarn + Llama-4 query scaling; positions beyond 16 exercise both.
    "ministral3": (
        transformers.Ministral3Config,
        transformers.Ministral3ForCausalLM,
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 16.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "llama_4_scaling_beta": 0.1,
            }
        },
    ),
}
SEQ = [1] + [(7 * i + 3) % 60 + 4 for i in range(47)]  # 48 tokens: positions well past 16 and 32


def hf_dir(tmp_path, name, char_tokenizer):
    config_cls, model_cls, extra = ARCHS[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    directory = tmp_path / name
    model.save_pretrained(directory)
    char_tokenizer.save(directory)
    return model, directory


def our_logits(model, seq=SEQ):
    x = torch.tensor([seq])
    return model(x, torch.arange(len(seq))[None], masks.causal(torch.zeros(1, dtype=torch.long), len(seq), 0))


@torch.no_grad()
@pytest.mark.parametrize("name", ARCHS)
def test_hf_checkpoint_matches_transformers(tmp_path, char_tokenizer, name):
    hf, directory = hf_dir(tmp_path, name, char_tokenizer)
    model, tok = checkpoint.load(directory)
    assert model.cfg.mask_id == 3  # "<mask>" in the tokenizer is picked up as the mask token
    ref = hf(torch.tensor([SEQ])).logits
    torch.testing.assert_close(our_logits(model), ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("shard_bytes", [4 * 2**30, 40_000])
def test_nld_round_trip_is_exact(tmp_path, char_tokenizer, shard_bytes):
    _, directory = hf_dir(tmp_path, "ministral3", char_tokenizer)
    model, tok = checkpoint.load(directory)
    model.cfg = replace(model.cfg, block_size=16)
    checkpoint.save(tmp_path / "nld", model, tok, max_shard_bytes=shard_bytes)
    config = json.loads((tmp_path / "nld" / "config.json").read_text())
    assert config["architectures"] == ["NemotronLabsDiffusionModel"] and config["mask_token_id"] == 3
    assert config["rope_parameters"]["llama_4_scaling_beta"] == 0.1 and config["block_size"] == 16
    shards = sorted(p.name for p in (tmp_path / "nld").glob("*.safetensors"))
    assert (len(shards) > 1) == (shard_bytes < 2**20)
    assert (tmp_path / "nld" / "model.safetensors.index.json").is_file() == (len(shards) > 1)
    again, tok2 = checkpoint.load(tmp_path / "nld")
    assert again.cfg == model.cfg
    assert torch.equal(our_logits(again), our_logits(model))
    assert tok2.encode("hello there") == tok.encode("hello there")


@torch.no_grad()
def test_load_places_weights_on_requested_dtype(tmp_path, char_tokenizer):
    _, directory = hf_dir(tmp_path, "llama", char_tokenizer)
    model, _ = checkpoint.load(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


@torch.no_grad()
def test_adapter_round_trip_in_peft_layout(tmp_path, tiny_model, char_tokenizer):
    model = random_model(tiny_model.cfg, seed=5, std=0.3)
    model.add_lora(rank=4, alpha=16, targets=("o_proj", "q_proj"))
    for name, p in model.named_parameters():
        if "lora_b" in name:
            p.normal_(0, 0.1)
    checkpoint.save(tmp_path / "nld", model, char_tokenizer)
    peft = json.loads((tmp_path / "nld" / "linear_spec_lora" / "adapter_config.json").read_text())
    assert peft["r"] == 4 and peft["lora_alpha"] == 16 and peft["target_modules"] == ["o_proj", "q_proj"]
    loaded, _ = checkpoint.load(tmp_path / "nld")
    x, pos = torch.tensor([[5, 6, 7, 3, 3]]), torch.arange(5)[None]
    mask = masks.bidirectional(torch.zeros(1, dtype=torch.long), 5, 0)
    assert torch.equal(loaded(x, pos, mask, adapter=True), model(x, pos, mask, adapter=True))
    assert not torch.equal(loaded(x, pos, mask, adapter=True), loaded(x, pos, mask))
    plain, _ = checkpoint.load(tmp_path / "nld", own_adapter=False)
    assert not checkpoint.has_adapter(plain)


def test_convert_hf_to_nld_then_generate_in_every_mode(tmp_path, char_tokenizer, capsys):
    _, directory = hf_dir(tmp_path, "qwen3", char_tokenizer)
    main(["convert", str(directory), str(tmp_path / "out"), "--dtype", "float32", "--block-size", "8"])
    assert "mask token '<mask>'" in capsys.readouterr().out
    outputs = {}
    for mode in ("ar", "spec", "diffusion"):
        main(
            [
                "generate",
                "abc",
                "--model",
                str(tmp_path / "out"),
                "--mode",
                mode,
                "--block-size",
                "4",
                "--max-tokens",
                "16",
                "--json",
            ]
        )
        outputs[mode] = json.loads(capsys.readouterr().out)
        assert outputs[mode]["completion_tokens"] >= 1
    assert outputs["spec"]["tokens"] == outputs["ar"]["tokens"]


@torch.no_grad()
def test_convert_can_add_a_mask_token(tmp_path, char_tokenizer, capsys):
    _, directory = hf_dir(tmp_path, "llama", char_tokenizer)
    main(["convert", str(directory), str(tmp_path / "out"), "--dtype", "float32", "--add-mask-token"])
    before, _ = checkpoint.load(directory)
    after, tok = checkpoint.load(tmp_path / "out")
    # The tokenizer has 52 tokens for 64 embedding rows: the new token takes the first spare row.
    assert after.cfg.vocab_size == 64 and after.cfg.mask_id == 52 and tok.token_id("<|mask|>") == 52
    keep = [i for i in range(64) if i != 52]
    seq = [t for t in SEQ if t != 52]
    torch.testing.assert_close(our_logits(after, seq)[..., keep], our_logits(before, seq)[..., keep])
    emb = after.encoder.embed_tokens.weight
    torch.testing.assert_close(emb[52], before.encoder.embed_tokens.weight.mean(0))


@pytest.mark.slow
def test_gguf_convert_round_trip(tmp_path, default_model):
    from tridlm import default_model as default

    convert(default.gguf_path(), tmp_path / "smol", dtype="float32", shard_gb=0.2)
    model, _ = default_model
    converted, _ = checkpoint.load(tmp_path / "smol")
    assert len(list((tmp_path / "smol").glob("model-*.safetensors"))) > 1
    seq = list(range(100, 140))
    with torch.no_grad():
        assert torch.equal(our_logits(converted, seq), our_logits(model, seq))


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def sharded(tmp_path, char_tokenizer):
    _, directory = hf_dir(tmp_path, "llama", char_tokenizer)
    model, tok = checkpoint.load(directory)
    checkpoint.save(tmp_path / "nld", model, tok, max_shard_bytes=40_000)
    return tmp_path / "nld"


def edit_config(directory, **changes):
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_shard_is_named(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing weight shard {victim.name}"):
        checkpoint.load(sharded)


def test_corrupt_shard_is_named(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{victim.name}: corrupt or unreadable"):
        checkpoint.load(sharded)


def test_config_disagreeing_with_weights_is_named(sharded):
    edit_config(sharded, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight has shape \(128, 64\).*config\.json"):
        checkpoint.load(sharded)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
        ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0}}, "unsupported rope type 'longrope'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "need original_max_position_embeddings"),
        ({"hidden_size": None}, "missing field 'hidden_size'|hidden_size"),
    ],
)
def test_bad_config_is_a_clear_error(sharded, changes, message):
    edit_config(sharded, **changes)
    if changes.get("hidden_size", 0) is None:
        data = json.loads((sharded / "config.json").read_text())
        del data["hidden_size"]
        (sharded / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(sharded)


def test_missing_tensor_is_named(tmp_path, sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    edit_config(sharded, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="missing .*encoder.layers.2"):
        checkpoint.load(sharded)
    assert index["weight_map"]


def test_cli_reports_bad_checkpoint_in_one_line(sharded):
    edit_config(sharded, architectures=["Unknown"])
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", "from tridlm.cli import main; main()", "generate", "hi", "--model", str(sharded)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "unsupported architecture 'Unknown'" in r.stderr and r.stderr.count("\n") == 1
    shutil.rmtree(sharded)


@torch.no_grad()
def test_add_mask_token_grows_a_full_vocabulary(tiny_model, char_tokenizer):
    small = random_model(replace(tiny_model.cfg, vocab_size=52, tie_embeddings=True), seed=1)
    tok = replace(char_tokenizer, backend=type(char_tokenizer.backend).from_str(char_tokenizer.backend.to_str()))
    grown = checkpoint.add_mask_token(small, tok)
    assert grown.cfg.vocab_size == 53 and grown.cfg.mask_id == 52
    assert grown.diffusion_head.weight is grown.encoder.embed_tokens.weight
    torch.testing.assert_close(our_logits(grown, [5, 6, 7])[..., :52], our_logits(small, [5, 6, 7]))


def test_synthetic_nld_checkpoint_end_to_end(tmp_path, tiny_cfg, char_tokenizer, capsys):
    """An NLD-format model with yarn + Llama-4 query scaling and a draft adapter, generated here,
    decodes in all three modes through the CLI past original_max_position_embeddings."""
    from tridlm.rope import RopeConfig

    cfg = replace(
        tiny_cfg,
        rope=RopeConfig(
            theta=1e6,
            type="yarn",
            factor=16.0,
            original_max_position_embeddings=16,
            mscale=1.0,
            mscale_all_dim=1.0,
            llama_4_scaling_beta=0.1,
        ),
    )
    model = random_model(cfg, seed=9, std=0.3)
    model.add_lora(rank=2, alpha=4)
    model.cfg = replace(model.cfg, block_size=4)
    checkpoint.save(tmp_path / "nld", model, char_tokenizer)
    tokens = {}
    for mode in ("ar", "diffusion", "spec"):
        main(
            [
                "generate",
                "hello",
                "--model",
                str(tmp_path / "nld"),
                "--mode",
                mode,
                "--block-size",
                "4",
                "--max-tokens",
                "40",
                "--json",
            ]
        )
        out = json.loads(capsys.readouterr().out)
        tokens[mode] = out["tokens"]
        assert out["mode"] == mode and out["nfe"] >= 1
    assert tokens["spec"] == tokens["ar"] and len(tokens["ar"]) > 16


# ------------------------------------------------------------------------- interop with NVIDIA's reader


def reference_rope(config: dict) -> dict:
    """RoPE settings as NVIDIA's NLD configuration class sees them under transformers 5.0 (the version its
    configs name): only the ``rope_parameters`` object counts (a top-level ``rope_theta`` does not), its
    theta defaulting to 10000, and a ``rope_scaling`` key would replace the object (an alias in v5)."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    params.setdefault("rope_theta", 10000.0)
    params.setdefault("rope_type", "default")
    return params


@torch.no_grad()
@pytest.mark.parametrize("name", ["ministral3", "llama"])
def test_converted_config_reads_right_in_nvidias_layout(tmp_path, char_tokenizer, name):
    """Every RoPE field of a converted model, as NVIDIA's class reads it, equals ours; transformers 5's own
    RoPE initialisation of that config gives our frequencies and attention factor."""
    from transformers.configuration_utils import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tridlm.rope import RopeConfig, inv_freq_and_attention_factor

    hf, directory = hf_dir(tmp_path, name, char_tokenizer)
    hf.config.save_pretrained(directory)  # theta 1e6 for both: the value the old layout lost
    data = json.loads((directory / "config.json").read_text())
    data.setdefault("rope_parameters", {})["rope_theta"] = 1e6
    (directory / "config.json").write_text(json.dumps(data))
    convert(directory, tmp_path / "nld", dtype="float32")
    model, _ = checkpoint.load(tmp_path / "nld")
    config = json.loads((tmp_path / "nld" / "config.json").read_text())
    assert "rope_scaling" not in config
    seen, ours = reference_rope(config), model.cfg.rope
    assert seen["rope_theta"] == ours.theta == 1e6 and seen["rope_type"] == ours.type == (
        "yarn" if name == "ministral3" else "default"
    )
    fields = {k: v for k, v in seen.items() if k not in ("rope_theta", "rope_type")}
    assert RopeConfig(theta=seen["rope_theta"], type=seen["rope_type"], **fields) == ours  # every field
    if ours.type == "yarn":
        hf_config = PretrainedConfig(**{**config, "architectures": None})
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
        want_freq, want_factor = inv_freq_and_attention_factor(ours, model.cfg.head_dim)
        torch.testing.assert_close(inv_freq.float(), want_freq)
        assert factor == pytest.approx(want_factor)


def test_block_size_round_trips_and_bounds_the_decoding_default(tmp_path, char_tokenizer):
    from tridlm.decode import GenerationConfig

    _, directory = hf_dir(tmp_path, "llama", char_tokenizer)
    convert(directory, tmp_path / "b2", dtype="float32", block_size=2)
    model, _ = checkpoint.load(tmp_path / "b2")
    assert json.loads((tmp_path / "b2" / "config.json").read_text())["block_size"] == 2 == model.cfg.block_size
    assert GenerationConfig(mode="spec").resolve(model).block_size == 2  # the device default would be larger
    convert(tmp_path / "b2", tmp_path / "again", dtype="float32")  # kept when not given again
    assert checkpoint.load(tmp_path / "again")[0].cfg.block_size == 2
    plain, _ = checkpoint.load(directory)  # an AR checkpoint has none: the device default applies
    assert plain.cfg.block_size is None and GenerationConfig(mode="spec").resolve(plain).block_size > 2


def test_convert_refuses_a_non_empty_output_without_force(tmp_path, char_tokenizer):
    _, directory = hf_dir(tmp_path, "llama", char_tokenizer)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="--force"):
        convert(directory, out, dtype="float32")
    assert (out / "notes.txt").read_text() == "keep me"  # nothing touched
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert(directory, tmp_path / "a-file", dtype="float32")
    (tmp_path / "empty").mkdir()
    convert(directory, tmp_path / "empty", dtype="float32")  # an empty folder is fine
    convert(directory, out, dtype="float32", force=True)
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".precious.")]  # no temporary sibling left


# ------------------------------------------------------------------------------------------ streamed low-bit loading


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_streamed_low_bit_loading_packs_what_quantizing_after_loading_does(tmp_path, char_tokenizer, precision):
    """Each projection packed as it is read gives the codes, scales and logits of loading in bfloat16 and packing
    afterwards, bit for bit (sharded files, untied and tied heads)."""
    from tridlm import projection, quant
    from tridlm.presets import preset

    for tied in (False, True):
        cfg = replace(preset("tiny"), tie_embeddings=tied, vocab_size=len(char_tokenizer.backend.get_vocab()))
        directory = tmp_path / f"tied-{tied}"
        checkpoint.save(directory, random_model(cfg, seed=4, std=0.3), char_tokenizer, max_shard_bytes=40_000)
        streamed, _ = checkpoint.load(directory, quant.ACTIVATIONS, precision=precision)
        after, _ = checkpoint.load(directory, quant.ACTIVATIONS)
        projection.quantize(after, precision)
        for (name, a), b in zip(streamed.named_modules(), after.modules()):
            if isinstance(a, projection.Linear):
                assert type(a.packed) is type(b.packed) and a.weight is None, name
                for field in ("codes", "scales", "q", "scale"):
                    if getattr(b.packed, field, None) is not None:
                        assert torch.equal(getattr(a.packed, field), getattr(b.packed, field)), (name, field)
        tokens = torch.tensor([[1, 5, 9, 11, 7]])
        positions, mask = torch.arange(5)[None], masks.causal(torch.zeros(1, dtype=torch.long), 5, 0)
        with torch.inference_mode():
            assert torch.equal(streamed(tokens, positions, mask), after(tokens, positions, mask))


STREAMED = """
import re, sys
import torch
from tridlm.loading import open_model

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

open_model(sys.argv[2], "int4")  # the runtime: kernels, imports, the allocator's first arenas
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from what the process holds now
before = status("VmRSS")
model, _ = open_model(sys.argv[1], "int4")
packed = [w for m in model.modules() for w in vars(m).values() if hasattr(w, "codes")]  # fused ones too
tensors = [t for w in packed for t in vars(w).values() if isinstance(t, torch.Tensor)] + list(model.parameters())
held = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())
print(status("VmHWM") - before, held)
"""


def test_a_float_checkpoint_loads_in_int4_within_1_3x_the_packed_model(tmp_path, char_tokenizer):
    """A 95M-parameter bfloat16 checkpoint (190 MB on disk, 4 shards) loaded as int4 grows the process (its runtime
    loaded first) by less than 1.3x what the packed model holds: the float copies are never all in memory at once,
    nor the file's pages: 1.14x here, where loading in bfloat16 and packing afterwards grew it by 4.9x."""
    from tridlm.model import ModelConfig

    cfg = ModelConfig(len(char_tokenizer.backend.get_vocab()), 512, 24, 8, 2, 64, 2048, bos_id=1, eos_ids=(2,))
    model = random_model(cfg, seed=0).to(torch.bfloat16)  # as NLD ships its weights
    checkpoint.save(tmp_path / "m", model, char_tokenizer, max_shard_bytes=50_000_000)
    checkpoint.save(tmp_path / "small", random_model(replace(cfg, n_layers=1), seed=0), char_tokenizer)
    paths = [str(tmp_path / "m"), str(tmp_path / "small")]
    run = subprocess.run([sys.executable, "-c", STREAMED, *paths], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    grew, held = map(int, run.stdout.split())
    assert "GiB in int4" in run.stderr
    assert grew < 1.3 * held, f"loading grew the process by {grew / held:.2f}x the packed model ({held} bytes)"


def test_random_nld_checkpoints_are_written_a_tensor_at_a_time_and_load(tmp_path, char_tokenizer):
    """``measure.random_nld`` writes NLD's layout (sharded bfloat16 safetensors, index, config.json with YaRN, query
    scaling, mask id and block size) that safetensors and our loader read back, in float and packed as it is read."""
    from tridlm import quant
    from tridlm.measure import random_nld
    from tridlm.presets import preset

    vocab = len(char_tokenizer.backend.get_vocab())
    small = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256, vocab_size=vocab, mask_id=3)
    cfg = replace(random_nld.model_config("3b"), **small)
    directory = random_nld.write(tmp_path / "nld", cfg, char_tokenizer, shard_bytes=200_000)
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    model, _ = checkpoint.load(directory, torch.bfloat16)
    assert model.cfg.rope == preset("nld-3b").rope and (model.cfg.mask_id, model.cfg.block_size) == (3, 32)
    assert not model.cfg.tie_embeddings and torch.equal(model.encoder.norm.weight, torch.ones(128).bfloat16())
    assert 0.015 < model.encoder.layers[1].mlp.up_proj.weight.float().std() < 0.025
    packed, _ = checkpoint.load(directory, quant.ACTIVATIONS, precision="int4")
    assert isinstance(packed.encoder.layers[1].mlp.gate_up, quant.Int4Weight)
