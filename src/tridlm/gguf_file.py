"""GGUF (llama.cpp's llama and mistral3 architectures) -> our model.

The file is read lean: its metadata parsed once (``GGUFFile``: the tokenizer's 100k strings in a fraction of a
second), then one tensor at a time read, converted and dropped, so that loading holds the model as it will run
plus one tensor, never a float copy of the whole model nor the whole file mapped.

llama.cpp stores q/k projection rows permuted for its interleaved RoPE; they are un-permuted here to
the half-split layout of Hugging Face weights that ``tridlm.rope`` uses.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from tridlm import projection, quant
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


ARCHITECTURES = ("llama", "mistral3")  # llama.cpp's names of the layouts read here (mistral3: NLD's backbone)
BLOCK_NAMES = {  # GGUF tensor name (per block) -> ours
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
TOP_NAMES = {
    "token_embd.weight": "encoder.embed_tokens.weight",
    "output_norm.weight": "encoder.norm.weight",
    "output.weight": "diffusion_head.weight",
}


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> half-split layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def adapter_path(path: Path) -> Path:
    """Where the draft adapter of the model file ``path`` lies: ``NAME.gguf`` -> ``NAME.draft-lora.gguf``."""
    return Path(path).with_name(Path(path).name.removesuffix(".gguf") + ".draft-lora.gguf")


def _config(file: GGUFFile, arch: str, tokenizer: Tokenizer) -> ModelConfig:
    """The model config a GGUF file's metadata describes (llama.cpp's keys, and ours where a file has them)."""
    fields = file.fields

    def meta(key, default: object = KeyError):
        if f"{arch}.{key}" not in fields and default is KeyError:
            raise CheckpointError(f"{file.path}: missing GGUF field {arch}.{key}")
        return fields.get(f"{arch}.{key}", default)

    n_heads, dim = meta("attention.head_count"), meta("embedding_length")
    eos = fields.get("tridlm.eos_token_ids", [] if tokenizer.eos_id is None else [tokenizer.eos_id])
    mask = fields.get("tokenizer.ggml.mask_token_id")
    return ModelConfig(
        vocab_size=next(t.shape[0] for t in file.tensors if t.name == "token_embd.weight"),
        dim=dim,
        n_layers=meta("block_count"),
        n_heads=n_heads,
        n_kv_heads=meta("attention.head_count_kv"),
        head_dim=meta("attention.key_length", dim // n_heads),
        ffn_dim=meta("feed_forward_length"),
        norm_eps=_decimal(meta("attention.layer_norm_rms_epsilon")),
        rope=_rope(file, meta),
        max_seq_len=meta("context_length"),
        tie_embeddings="output.weight" not in {t.name for t in file.tensors},
        attention_bias="blk.0.attn_q.bias" in {t.name for t in file.tensors},
        bos_id=tokenizer.bos_id,
        eos_ids=tuple(eos),
        mask_id=find_mask_token(tokenizer) if mask is None else mask,
        block_size=fields.get("tridlm.block_size"),
    )


def _decimal(value: float) -> float:
    """A float32 field as the shortest decimal that rounds to it: the 0.1 or 1e-5 a config wrote, not 0.100000001."""
    return float(str(np.float32(value)))


def _rope(file: GGUFFile, meta) -> RopeConfig:
    """RoPE settings: llama.cpp's keys (YaRN, Llama-4 query scaling), and ours for what it keeps elsewhere."""
    fields = file.fields
    scaling = meta("rope.scaling.type", "none")
    kind = fields.get("tridlm.rope.type") or {"none": "default", "yarn": "yarn"}.get(scaling)
    if kind is None or ("rope_freqs.weight" in {t.name for t in file.tensors} and kind != "llama3"):
        raise CheckpointError(f"{file.path}: unsupported RoPE scaling {scaling!r} (supported: none, yarn, ours)")
    given = {
        "factor": meta("rope.scaling.factor", None),
        "original_max_position_embeddings": meta("rope.scaling.original_context_length", None),
        "beta_fast": meta("rope.scaling.yarn_beta_fast", None),
        "beta_slow": meta("rope.scaling.yarn_beta_slow", None),
        "mscale": fields.get("tridlm.rope.yarn_mscale"),
        "mscale_all_dim": fields.get("tridlm.rope.yarn_mscale_all_dim"),
        "low_freq_factor": fields.get("tridlm.rope.low_freq_factor"),
        "high_freq_factor": fields.get("tridlm.rope.high_freq_factor"),
        "llama_4_scaling_beta": meta("attention.temperature_scale", None),
    }
    given = {k: _decimal(v) if isinstance(v, float) else v for k, v in given.items() if v is not None}
    try:
        return RopeConfig(theta=_decimal(meta("rope.freq_base")), type=kind, **given).validate()
    except ValueError as e:
        raise CheckpointError(f"{file.path}: {e}") from None


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


def _our_name(tensor: TensorInfo, cfg: ModelConfig) -> tuple[str, int | None]:
    """Our parameter name of a GGUF tensor, and the heads its rows are permuted by (q and k) or None."""
    parts = tensor.name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_NAMES and parts[3] in ("weight", "bias"):
        heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(parts[2])
        return f"encoder.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}", heads
    if tensor.name in TOP_NAMES:
        return TOP_NAMES[tensor.name], None
    raise CheckpointError(f"unexpected tensor {tensor.name} in a llama-layout GGUF file")


def _kept(raw: np.ndarray, tensor: TensorInfo, name: str, precision: str | None):
    """The file's own low-bit form of a weight where ``precision`` runs it as it is (Q4_1 in int4; Q8_0 embedding
    and head in both precisions, Q8_0 projections in int8), else None."""
    if precision is None or len(tensor.shape) != 2:
        return None
    if tensor.kind == gguf.GGMLQuantizationType.Q4_1 and precision == "int4":
        return quant.Int4Weight.from_q4_1(raw, *tensor.shape)
    top = name in ("encoder.embed_tokens.weight", "diffusion_head.weight")
    if tensor.kind == gguf.GGMLQuantizationType.Q8_0 and (top or precision == "int8"):
        return quant.Q8Table(raw, *tensor.shape)
    return None


def load_gguf(
    path: Path, dtype: torch.dtype = torch.float32, precision: str | None = None
) -> tuple[TriModel, Tokenizer]:
    """A llama-layout GGUF file (llama.cpp's, or a tri-mode one ``tridlm.gguf_write`` wrote) as a model of our
    layout, with its tokenizer: every tensor dequantized to ``dtype``, or with a ``precision`` ("int4", "int8") the
    weights the engine runs as they are kept as the file's bytes (``_kept``; ``dtype`` must then be the activations'
    dtype), the rest dequantized (the caller packs those)."""
    file = GGUFFile(Path(path))
    arch = file.fields.get("general.architecture")
    if file.fields.get("general.type") == "adapter":
        raise CheckpointError(f"{path}: a LoRA adapter file, not a model (pass it as the adapter)")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    tokenizer = Tokenizer.from_gguf(file.fields)
    cfg = _config(file, arch, tokenizer)
    file.fields.clear()  # the tokenizer's 100k strings, freed before the weights come in rather than held under them
    quant.release_free_memory()
    if precision is not None and dtype != quant.ACTIVATIONS:
        raise ValueError(f"{precision} weights run with {quant.ACTIVATIONS} activations, not {dtype}")
    model = empty_model(cfg)
    for t in file.tensors:
        if t.name == "rope_freqs.weight":  # our llama3 schedule, kept in the config (``_rope``)
            continue
        name, heads = _our_name(t, cfg)
        module, _, attr = name.rpartition(".")
        raw = file.read(t).reshape(t.shape[0], -1)  # one row of bytes per output
        raw = _unpermute(raw, heads) if heads else raw
        kept = _kept(raw, t, name, precision)
        if isinstance(kept, quant.Q8Table) and name == "encoder.embed_tokens.weight":
            model.encoder.embed_tokens = quant.Q8Embedding(kept, dtype)
        elif kept is not None:
            model.get_submodule(module).pack(kept)
        else:
            tensor = _dequantize(raw, t, dtype)
            setattr(model.get_submodule(module), attr, torch.nn.Parameter(tensor, requires_grad=False))
        del raw, kept
        quant.release_free_memory()
    projection.share_table(model)
    if cfg.tie_embeddings and model.diffusion_head.packed is None:
        model.diffusion_head.weight = model.encoder.embed_tokens.weight
    return model.eval(), tokenizer


def load_adapter(model: TriModel, path: Path) -> None:
    """Attach the LoRA of a GGUF adapter file (llama.cpp's layout, as ``tridlm.gguf_write`` writes draft adapters)."""
    file = GGUFFile(Path(path))
    if file.fields.get("general.type") != "adapter" or file.fields.get("adapter.type") != "lora":
        raise CheckpointError(f"{path}: not a GGUF LoRA adapter file")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in file.tensors:
        name, heads = _our_name(dataclasses.replace(t, name=t.name.rpartition(".")[0]), model.cfg)
        raw = file.read(t).reshape(t.shape[0], -1)
        kind = t.name.rpartition("_")[2]  # a or b
        pairs.setdefault(name.removesuffix(".weight"), {})[kind] = _dequantize(
            _unpermute(raw, heads) if heads and kind == "b" else raw, t, torch.float32
        )
    if not pairs or any(set(p) != {"a", "b"} for p in pairs.values()):
        raise CheckpointError(f"{path}: adapter tensors come in lora_a/lora_b pairs")
    ranks = {p["a"].shape[0] for p in pairs.values()}
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: adapter ranks differ ({sorted(ranks)})")
    rank = ranks.pop()
    targets = tuple(sorted({name.rpartition(".")[2] for name in pairs}))
    model.add_lora(rank, file.fields.get("adapter.lora.alpha") or rank, targets)
    with torch.no_grad():
        for name, p in pairs.items():
            module = model.get_submodule(name)
            if module.lora_a is None or p["a"].shape != module.lora_a.shape or p["b"].shape != module.lora_b.shape:
                raise CheckpointError(f"{path}: adapter tensors of {name} do not fit the model")
            module.lora_a.copy_(p["a"])
            module.lora_b.copy_(p["b"])
