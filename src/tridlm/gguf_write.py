"""Our model -> a tri-mode GGUF file that llama.cpp reads as a plain AR model (``architecture``: NLD as
``mistral3``, others as ``llama``).

The weights go as the engine holds them: int4 projections as Q4_1 with the very codes, scales and minimums it runs,
the embedding and output head as Q8_0 (``tridlm.quant.Q8Table``), int8 projections as Q8_0, float weights as BF16
and norms as F32, so that loading the file back (``tridlm.gguf_file``) quantizes nothing and computes what the
source computed. q/k rows are permuted for llama.cpp's interleaved RoPE, as its own converter does.

The metadata uses llama.cpp's keys where it has them (architecture, YaRN, the mask token, ``diffusion.shift_logits``
false: NLD predicts the masked position itself) and ``tridlm.*`` keys where it does not (the diffusion block size,
YaRN's mscales, all end-of-sequence ids). The draft adapter goes into an adapter GGUF beside the model
(``gguf_file.adapter_path``; llama.cpp's LoRA layout: a base file with extra tensors is refused by llama.cpp).

Each file is written to a temporary name beside its target, one tensor at a time (no second copy of the model in
memory), and renamed into place only once complete.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from tridlm import quant
from tridlm.gguf_file import BLOCK_NAMES, adapter_path
from tridlm.model import TriModel
from tridlm.projection import Linear
from tridlm.rope import inv_freq_and_attention_factor
from tridlm.tokenizer import Tokenizer

T = gguf.GGMLQuantizationType
FILE_TYPES = {"int4": gguf.LlamaFileType.MOSTLY_Q4_1, "int8": gguf.LlamaFileType.MOSTLY_Q8_0}
FLOAT_TYPES = {torch.float32: T.F32, torch.bfloat16: T.BF16, torch.float16: T.F16}


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved RoPE pairs) from the half-split one; rows may be any bytes."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# One tensor to write: GGUF name, type, shape (outermost first) and a function giving its bytes, (rows, bytes)
Tensor = tuple[str, T, tuple[int, ...], Callable[[], np.ndarray]]


def _bytes(t: torch.Tensor, kind: T) -> np.ndarray:
    """A float tensor in GGUF's ``kind`` (F32, F16 or BF16), as bytes shaped (rows, bytes) or (bytes,)."""
    dtype = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[kind]
    t = t.detach().to(dtype).contiguous()
    return t.view(torch.uint8).numpy().reshape(*t.shape[:-1], -1)


def _weight(module: torch.nn.Module) -> tuple[T, tuple[int, int], Callable[[], np.ndarray]]:
    """A projection's, the embedding's or the head's weight as the engine holds it."""
    packed = module.table if isinstance(module, quant.Q8Embedding) else getattr(module, "packed", None)
    if isinstance(packed, quant.Int4Weight):
        return T.Q4_1, packed.shape, lambda: packed.q4_1().numpy()
    if isinstance(packed, quant.Q8Table):
        return T.Q8_0, packed.shape, lambda: packed.q8_0().numpy()
    if packed is not None:
        raise ValueError(f"int8 weights of input size {packed.shape[1]} (not a multiple of 32) have no GGUF type")
    return T.BF16, tuple(module.weight.shape), lambda: _bytes(module.weight, T.BF16)


def _permuted(make: Callable[[], np.ndarray], heads: int | None, rows: int) -> Callable[[], np.ndarray]:
    """``make`` with its ``rows`` (outputs: a weight's rows, a bias's elements) in llama.cpp's q/k order."""
    if heads is None:
        return make

    def permuted() -> np.ndarray:
        data = make()
        return permute(data.reshape(rows, -1), heads).reshape(data.shape)

    return permuted


def _tensors(model: TriModel) -> Iterator[Tensor]:
    """Every tensor of the model file, in llama.cpp's order."""
    cfg = model.cfg
    yield ("token_embd.weight", *_weight(model.encoder.embed_tokens))
    for i, layer in enumerate(model.encoder.layers):
        for name, ours in BLOCK_NAMES.items():
            module = layer.get_submodule(ours)
            heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(name)
            if not isinstance(module, Linear):  # a norm
                yield f"blk.{i}.{name}.weight", T.F32, tuple(module.weight.shape), _norm(module.weight)
                continue
            kind, shape, make = _weight(module)
            yield f"blk.{i}.{name}.weight", kind, shape, _permuted(make, heads, shape[0])
            if module.bias is not None:
                yield f"blk.{i}.{name}.bias", T.F32, (shape[0],), _permuted(_norm(module.bias), heads, shape[0])
    yield "output_norm.weight", T.F32, (cfg.dim,), _norm(model.encoder.norm.weight)
    if not cfg.tie_embeddings:
        yield ("output.weight", *_weight(model.diffusion_head))
    if cfg.rope.type == "llama3":  # llama.cpp divides each frequency by these factors
        plain = inv_freq_and_attention_factor(dataclasses.replace(cfg.rope, type="default"), cfg.head_dim)[0]
        factors = plain / inv_freq_and_attention_factor(cfg.rope, cfg.head_dim)[0]
        yield "rope_freqs.weight", T.F32, tuple(factors.shape), _norm(factors)


def _norm(t: torch.Tensor) -> Callable[[], np.ndarray]:
    return lambda: _bytes(t, T.F32)


def architecture(model: TriModel) -> str:
    """llama.cpp's architecture for the model: ``mistral3`` (Ministral 3, NLD's backbone: its graph applies the
    Llama-4 query scaling) where the model scales queries, else ``llama``; both read q/k rows permuted."""
    return "mistral3" if model.cfg.rope.llama_4_scaling_beta is not None else "llama"


def _yarn_mscale(factor: float) -> float:
    """What llama.cpp's YaRN multiplies cos and sin by of itself."""
    return 1.0 + 0.1 * math.log(factor) if factor > 1 else 1.0


def _fields(model: TriModel, tokenizer: Tokenizer, name: str, precision: str) -> dict:
    """The model file's metadata: key -> value."""
    cfg, rope, a = model.cfg, model.cfg.rope, f"{architecture(model)}."
    fields = {
        "general.name": name,
        "general.type": "model",
        "general.file_type": int(FILE_TYPES.get(precision, gguf.LlamaFileType.MOSTLY_BF16)),
        a + "vocab_size": cfg.vocab_size,
        a + "context_length": cfg.max_seq_len,
        a + "embedding_length": cfg.dim,
        a + "block_count": cfg.n_layers,
        a + "feed_forward_length": cfg.ffn_dim,
        a + "attention.head_count": cfg.n_heads,
        a + "attention.head_count_kv": cfg.n_kv_heads,
        a + "attention.key_length": cfg.head_dim,
        a + "attention.value_length": cfg.head_dim,
        a + "attention.layer_norm_rms_epsilon": cfg.norm_eps,
        a + "rope.dimension_count": cfg.head_dim,
        a + "rope.freq_base": rope.theta,
        **tokenizer.gguf_fields(cfg.vocab_size),
        "diffusion.shift_logits": False,  # NLD's logits at a masked position predict that position
        "tridlm.eos_token_ids": list(cfg.eos_ids),
    }
    if cfg.eos_ids:
        fields["tokenizer.ggml.eos_token_id"] = cfg.eos_ids[0]
    if cfg.bos_id is not None:
        fields["tokenizer.ggml.bos_token_id"] = cfg.bos_id
    if cfg.mask_id is not None:
        fields["tokenizer.ggml.mask_token_id"] = cfg.mask_id
    if cfg.block_size is not None:
        fields["tridlm.block_size"] = cfg.block_size
    if rope.type != "default" or rope.llama_4_scaling_beta is not None:
        fields[a + "rope.scaling.original_context_length"] = rope.original_max_position_embeddings
    if rope.type == "yarn":
        attention = inv_freq_and_attention_factor(rope, cfg.head_dim)[1]
        fields |= {
            a + "rope.scaling.type": "yarn",
            a + "rope.scaling.factor": rope.factor,
            a + "rope.scaling.yarn_beta_fast": rope.beta_fast,
            a + "rope.scaling.yarn_beta_slow": rope.beta_slow,
            # llama.cpp's YaRN scales attention by 1 + 0.1 ln(factor) and then by this: the product is the config's
            a + "rope.scaling.attn_factor": attention / _yarn_mscale(rope.factor),
        }
        mscales = {"tridlm.rope.yarn_mscale": rope.mscale, "tridlm.rope.yarn_mscale_all_dim": rope.mscale_all_dim}
        fields |= {k: v for k, v in mscales.items() if v is not None}
    elif rope.type == "llama3":  # llama.cpp reads the schedule from the rope_freqs tensor
        fields |= {
            "tridlm.rope.type": "llama3",
            a + "rope.scaling.factor": rope.factor,
            "tridlm.rope.low_freq_factor": rope.low_freq_factor,
            "tridlm.rope.high_freq_factor": rope.high_freq_factor,
        }
    if rope.llama_4_scaling_beta is not None:  # mistral3's span is the original context length
        fields[a + "attention.temperature_scale"] = rope.llama_4_scaling_beta
    return fields


def _add(writer: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def _write(path: Path, arch: str, fields: dict, tensors: list[Tensor]) -> None:
    """One GGUF file, atomically: written beside ``path`` and renamed into place once complete."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, value in fields.items():
            _add(writer, key, value)
        for name, kind, shape, _ in tensors:
            block, size = gguf.GGML_QUANT_SIZES[kind]
            rows = math.prod(shape[:-1])
            nbytes = rows * shape[-1] // block * size
            byte_shape = (*shape[:-1], nbytes // max(rows, 1))
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, _, _, make in tensors:
            writer.write_tensor_data(make())
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as any new file (the temporary was private)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _adapter_tensors(model: TriModel) -> tuple[float, list[Tensor]]:
    """The draft adapter's alpha and tensors in llama.cpp's LoRA layout (``blk.N.attn_q.weight.lora_a`` (rank, in),
    ``lora_b`` (out, rank), B's q/k rows permuted as the base weight's are)."""
    cfg, tensors, alphas = model.cfg, [], set()
    for i, layer in enumerate(model.encoder.layers):
        for name, ours in BLOCK_NAMES.items():
            module = layer.get_submodule(ours)
            if not isinstance(module, Linear) or module.lora_a is None:
                continue
            heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(name)
            kind = FLOAT_TYPES.get(module.lora_a.dtype, T.F32)
            a, b = module.lora_a, module.lora_b
            tensors.append((f"blk.{i}.{name}.weight.lora_a", kind, tuple(a.shape), lambda a=a, k=kind: _bytes(a, k)))
            make_b = _permuted(lambda b=b, k=kind: _bytes(b, k), heads, b.shape[0])
            tensors.append((f"blk.{i}.{name}.weight.lora_b", kind, tuple(b.shape), make_b))
            alphas.add(module.lora_scale * a.shape[0])
    if len(alphas) > 1:
        raise ValueError(f"the draft adapter's projections have different alpha/rank scales {sorted(alphas)}")
    return alphas.pop(), tensors


def write(path: str | Path, model: TriModel, tokenizer: Tokenizer, name: str, precision: str) -> list[Path]:
    """Write ``model`` as the GGUF file ``path`` and its draft adapter, if it has one, beside it (``adapter_path``);
    returns the files written. ``precision`` (int4, int8 or bfloat16) names the weights the model holds."""
    path = Path(path)
    if model.cfg.qk_norm:
        raise ValueError("GGUF export writes llama-layout models; per-head q/k norms (Qwen3) have no place in it")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, architecture(model), _fields(model, tokenizer, name, precision), list(_tensors(model)))
    written = [path]
    if any(isinstance(m, Linear) and m.lora_a is not None for m in model.modules()):
        alpha, tensors = _adapter_tensors(model)
        fields = {"general.name": f"{name} draft adapter", "general.type": "adapter", "adapter.type": "lora"}
        _write(adapter_path(path), architecture(model), fields | {"adapter.lora.alpha": float(alpha)}, tensors)
        written.append(adapter_path(path))
    return written
