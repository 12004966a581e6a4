"""GGUF (llama architecture) -> our model.

The file is read lean: its metadata parsed once (``GGUFFile``: the tokenizer's 100k strings in a fraction of a
second), then one tensor at a time read, converted and dropped, so that loading holds the model as it will run
plus one tensor, never a float copy of the whole model nor the whole file mapped.

llama.cpp stores q/k projection rows permuted for its interleaved RoPE; they are un-permuted here to
the half-split layout of Hugging Face weights that ``tridlm.rope`` uses.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from tridlm import quant
from tridlm.model import ModelConfig, TriModel
from tridlm.presets import empty_model
from tridlm.rope import RopeConfig
from tridlm.safetensors_io import CheckpointError
from tridlm.tokenizer import Tokenizer, find_mask_token

_SCALARS = {  # GGUF value type -> struct format (little-endian)
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # outermost first (GGUF lists dimensions innermost first)
    kind: gguf.GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int


class GGUFFile:
    """A GGUF file's metadata (``fields``: key -> Python value) and tensor directory (``tensors``), with each
    tensor's bytes read on demand (``read``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                self._parse(data)
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({e})") from None

    def _parse(self, data: mmap.mmap) -> None:
        if data[:4] != b"GGUF":
            raise ValueError("no GGUF magic number")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", data, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (supported: 2, 3, little-endian)")
        self._data, self._pos = data, 24
        self.fields = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = self._string(), self._unpack("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", data, self._pos)
            self._pos += 8 * n_dims
            kind, offset = gguf.GGMLQuantizationType(self._unpack("<I")), self._unpack("<Q")
            block, size = gguf.GGML_QUANT_SIZES[kind]
            infos.append((name, tuple(reversed(dims)), kind, offset, int(np.prod(dims)) // block * size))
        align = self.fields.get("general.alignment", 32)
        start = -(-self._pos // align) * align
        self.tensors = [TensorInfo(n, s, k, start + o, b) for n, s, k, o, b in infos]
        end = max((t.offset + t.nbytes for t in self.tensors), default=start)
        if end > len(data):
            raise ValueError(f"truncated: tensor data ends at byte {end}, the file has {len(data)}")
        del self._data

    def _unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._data, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        self._pos += n
        return str(self._data[self._pos - n : self._pos], "utf-8")

    def _value(self, kind: int):
        kind = gguf.GGUFValueType(kind)
        if kind == gguf.GGUFValueType.STRING:
            return self._string()
        if kind != gguf.GGUFValueType.ARRAY:
            return self._unpack(_SCALARS[kind])
        item, n = gguf.GGUFValueType(self._unpack("<I")), self._unpack("<Q")
        if item == gguf.GGUFValueType.STRING:
            return [self._string() for _ in range(n)]
        if item in _SCALARS:  # numbers in one read
            dtype = np.dtype(_SCALARS[item])
            values = np.frombuffer(self._data, dtype, n, self._pos)
            self._pos += n * dtype.itemsize
            return values.tolist()
        return [self._value(item) for _ in range(n)]

    def read(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's bytes, (rows, bytes per row) for 2-d tensors, read into memory of their own."""
        with open(self.path, "rb") as f:
            buffer = np.empty(tensor.nbytes, np.uint8)
            f.seek(tensor.offset)
            if f.readinto(memoryview(buffer)) != tensor.nbytes:
                raise CheckpointError(f"{self.path}: truncated in tensor {tensor.name}")
        return buffer.reshape(tensor.shape[0], -1) if len(tensor.shape) == 2 else buffer


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


def _config(file: GGUFFile, arch: str, tokenizer: Tokenizer) -> ModelConfig:
    """The model config a GGUF file's metadata describes."""

    def meta(key):
        if f"{arch}.{key}" not in file.fields:
            raise CheckpointError(f"{file.path}: missing GGUF field {arch}.{key}")
        return file.fields[f"{arch}.{key}"]

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
        tie_embeddings="output.weight" not in {t.name for t in file.tensors},
        bos_id=tokenizer.bos_id,
        eos_ids=() if tokenizer.eos_id is None else (tokenizer.eos_id,),
        mask_id=find_mask_token(tokenizer),
    )


def _dequantize(raw: np.ndarray, tensor: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """A tensor's float values in ``dtype``, dequantized a slice of rows at a time (no float32 copy of a
    whole embedding table)."""
    out = torch.empty(tensor.shape, dtype=dtype)
    rows = out.view(-1, tensor.shape[-1])
    raw = raw.reshape(rows.shape[0], -1)
    step = max(1, 2**22 // tensor.shape[-1])
    for i in range(0, rows.shape[0], step):
        part = gguf.quants.dequantize(raw[i : i + step], tensor.kind).astype(np.float32, copy=False)
        rows[i : i + step] = torch.from_numpy(part.reshape(-1, tensor.shape[-1]))
    return out


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, native_int4: bool = False) -> tuple[TriModel, Tokenizer]:
    """A llama-architecture GGUF file as a model of our layout, with its tokenizer: every tensor
    dequantized to ``dtype``, or with ``native_int4`` the Q4_1 projections kept as their 4-bit codes
    (``tridlm.quant.Int4Weight``; ``dtype`` must then be its activations' dtype)."""
    file = GGUFFile(Path(path))
    arch = file.fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama)")
    tokenizer = Tokenizer.from_gguf(file.fields)
    cfg = _config(file, arch, tokenizer)
    file.fields.clear()  # the tokenizer's 100k strings, freed before the weights come in rather than held under them
    quant.release_free_memory()
    if native_int4 and dtype != quant.ACTIVATIONS:
        raise ValueError(f"native int4 weights run with {quant.ACTIVATIONS} activations, not {dtype}")
    model = empty_model(cfg)
    for t in file.tensors:
        parts = t.name.split(".")
        name = f"encoder.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight" if parts[0] == "blk" else _TOP_NAMES[t.name]
        heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(parts[2]) if parts[0] == "blk" else None
        module, _, attr = name.rpartition(".")
        raw = file.read(t)
        if native_int4 and t.kind == gguf.GGMLQuantizationType.Q4_1 and len(t.shape) == 2:
            blocks = _unpermute(raw, heads) if heads else raw  # one row of Q4_1 blocks per output
            model.get_submodule(module).pack(quant.Int4Weight.from_q4_1(blocks, *t.shape))
        elif native_int4 and t.kind == gguf.GGMLQuantizationType.Q8_0 and t.name == "token_embd.weight":
            table = quant.Q8Table(raw, *t.shape)
            model.encoder.embed_tokens = quant.Q8Embedding(table, dtype)
            if cfg.tie_embeddings:  # the head computes on the same bytes: the table is held once
                model.diffusion_head.pack(table)
        else:
            tensor = _dequantize(_unpermute(raw, heads) if heads else raw, t, dtype)
            setattr(model.get_submodule(module), attr, torch.nn.Parameter(tensor, requires_grad=False))
        del raw
        quant.release_free_memory()
    if cfg.tie_embeddings and model.diffusion_head.packed is None:
        model.diffusion_head.weight = model.encoder.embed_tokens.weight
    return model.eval(), tokenizer
