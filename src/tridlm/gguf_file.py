"""GGUF (llama architecture) -> our model.

llama.cpp stores q/k projection rows permuted for its interleaved RoPE; they are un-permuted here to
the half-split layout of Hugging Face weights that ``tridlm.rope`` uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tridlm import checkpoint, quant
from tridlm.model import ModelConfig, TriModel
from tridlm.rope import RopeConfig
from tridlm.tokenizer import Tokenizer

_BLOCK_NAMES = {  # GGUF tensor name (per block) -> ours
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "encoder.embed_tokens.weight",
    "output_norm.weight": "encoder.norm.weight",
    "output.weight": "diffusion_head.weight",
}


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> half-split layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(reader, path: Path, arch: str, tokenizer: Tokenizer) -> ModelConfig:
    """The model config a GGUF file's metadata describes."""

    def meta(key):
        if f"{arch}.{key}" not in reader.fields:
            raise checkpoint.CheckpointError(f"{path}: missing GGUF field {arch}.{key}")
        return reader.fields[f"{arch}.{key}"].contents()

    n_heads, dim = meta("attention.head_count"), meta("embedding_length")
    return ModelConfig(
        vocab_size=tokenizer.vocab_size,
        dim=dim,
        n_layers=meta("block_count"),
        n_heads=n_heads,
        n_kv_heads=meta("attention.head_count_kv"),
        head_dim=dim // n_heads,
        ffn_dim=meta("feed_forward_length"),
        norm_eps=float(np.float32(meta("attention.layer_norm_rms_epsilon"))),
        rope=RopeConfig(theta=float(meta("rope.freq_base"))),
        max_seq_len=meta("context_length"),
        tie_embeddings="output.weight" not in {t.name for t in reader.tensors},
        bos_id=tokenizer.bos_id,
        eos_ids=() if tokenizer.eos_id is None else (tokenizer.eos_id,),
        mask_id=checkpoint.find_mask_token(tokenizer),
    )


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, native_int4: bool = False) -> tuple[TriModel, Tokenizer]:
    """A llama-architecture GGUF file as a model of our layout, with its tokenizer: every tensor
    dequantized to ``dtype``, or with ``native_int4`` the Q4_1 projections kept as their 4-bit codes
    (``tridlm.quant.Int4Weight``; ``dtype`` must then be its activations' dtype)."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise checkpoint.CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise checkpoint.CheckpointError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")
    tokenizer = Tokenizer.from_gguf(reader)
    cfg = _config(reader, path, arch, tokenizer)
    n_heads, n_kv = cfg.n_heads, cfg.n_kv_heads
    with torch.device("meta"):
        model = TriModel(cfg)
    if native_int4 and dtype != quant.ACTIVATIONS:
        raise ValueError(f"native int4 weights run with {quant.ACTIVATIONS} activations, not {dtype}")
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists dims innermost first
        parts = t.name.split(".")
        name = f"encoder.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight" if parts[0] == "blk" else _TOP_NAMES[t.name]
        heads = {"attn_q": n_heads, "attn_k": n_kv}.get(parts[2]) if parts[0] == "blk" else None
        module, _, attr = name.rpartition(".")
        if native_int4 and t.tensor_type == gguf.GGMLQuantizationType.Q4_1 and len(shape) == 2:
            blocks = np.asarray(t.data).reshape(shape[0], -1)  # one row of Q4_1 blocks per output
            blocks = _unpermute(blocks, heads) if heads else blocks
            model.get_submodule(module).pack(quant.Int4Weight.from_q4_1(blocks, *shape))
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        w = _unpermute(w, heads) if heads else w
        tensor = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)
        setattr(model.get_submodule(module), attr, torch.nn.Parameter(tensor, requires_grad=False))
    if cfg.tie_embeddings:
        model.diffusion_head.weight = model.encoder.embed_tokens.weight
    return model.eval(), tokenizer
