"""Reading safetensors files: a checkpoint directory's shards, its tensors' names, dtypes and shapes without
reading their data (``tensors``), and each tensor on a memory mapping of its own bytes (``read``), so that reading a
model tensor by tensor never keeps the pages of the tensors already read in the process."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as what it claims to be; the message names the file and field."""


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: its index's shards, or ``model.safetensors``."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    for shard in shards:
        if not (directory / shard).is_file():
            raise CheckpointError(f"{directory}: missing weight shard {shard} (listed in the index)")
    return [directory / s for s in shards]


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """Where one tensor of a safetensors file lies: ``nbytes`` bytes from ``offset``."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def tensors(files: list[Path]) -> dict[str, Entry]:
    """Tensor name -> ``Entry`` from each file's header, without reading any tensor data; a header that does not
    parse, or names a dtype we do not read or bytes past the file's end, is an error naming the file."""
    where = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            length = f.stat().st_size
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                begin, end = e["data_offsets"]
                if e["dtype"] not in DTYPES or not 0 <= begin <= end <= length - 8 - size:
                    raise ValueError(f"tensor {name}: dtype {e['dtype']}, bytes {begin}-{end} of {length - 8 - size}")
                where[name] = Entry(f, 8 + size + begin, end - begin, DTYPES[e["dtype"]], tuple(e["shape"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{f}: corrupt or unreadable safetensors file ({e})") from None
    return where


def read(entry: Entry) -> torch.Tensor:
    """The tensor, on a memory mapping of its own bytes, unmapped when the tensor is freed: the pages of the tensors
    read before it do not stay in the process as they would under one mapping of the whole file (copy-on-write, so
    that torch may take the buffer; nothing writes to it)."""
    if not entry.nbytes:
        return torch.empty(entry.shape, dtype=entry.dtype)
    data = np.memmap(entry.file, dtype=np.uint8, mode="c", offset=entry.offset, shape=(entry.nbytes,))
    return torch.frombuffer(data, dtype=entry.dtype).reshape(entry.shape)
