"""Reading safetensors files: a checkpoint directory's shards, its tensors' names, dtypes and shapes without reading
their data, and each tensor on a memory mapping of its own bytes (``mapped``), so that reading a model tensor by
tensor never keeps the pages of the tensors already read in the process."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open


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


def open_tensors(files: list[Path], stack: ExitStack) -> dict[str, tuple[Path, object]]:
    """Tensor name -> (file, open handle), without reading any tensor data."""
    where = {}
    for f in files:
        try:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: corrupt or unreadable safetensors file ({e})") from None
        for name in handle.keys():
            where[name] = (f, handle)
    return where


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def header(file: Path) -> tuple[int, dict]:
    """Where a safetensors file's data starts, and its header (name -> dtype, shape, data offsets)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def mapped(file: Path, start: int, header: dict, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, on a memory mapping of its own bytes, unmapped when the tensor is freed:
    the pages of the tensors read before it do not stay in the process as they would under one mapping of the
    whole file (copy-on-write, so that torch may take the buffer; nothing writes to it)."""
    entry = header[name]
    if entry["dtype"] not in DTYPES:
        raise CheckpointError(f"{file.name}: tensor {name} has dtype {entry['dtype']} (expected F32, F16 or BF16)")
    begin, end = entry["data_offsets"]
    if end == begin:
        return torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
    data = np.memmap(file, dtype=np.uint8, mode="c", offset=start + begin, shape=(end - begin,))
    return torch.frombuffer(data, dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])
