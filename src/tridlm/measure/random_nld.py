"""Random-weight NLD checkpoints at Nemotron-Labs-Diffusion's shapes (SPEC 5: the presets ``nld-3b``, ``nld-8b`` and
``nld-14b``), for loading and timing them without downloading a model.

Each is what ``tridlm convert`` writes for NLD: bfloat16 safetensors in shards of at most 4 GiB with their index, an
NLD ``config.json`` (YaRN factor 16 over 16384, theta 1e6, Llama-4 query scaling, mask id 100, block 32, an untied
head) and the default model's tokenizer (its ids all lie below NLD's vocabulary of 131072). The weights are seeded
normal values of 0.02 standard deviation (norms: ones), written a tensor at a time after each shard's header: a
checkpoint needs no more memory than its largest tensor. Written beside the target and renamed into place.

    .venv/bin/python -m tridlm.measure.random_nld 3b 8b --out /tmp/nld   # writes /tmp/nld/random-nld-<shape>/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from tridlm import default_model
from tridlm.gguf_file import GGUFFile
from tridlm.model import ModelConfig
from tridlm.nld_config import config_to_nld_json
from tridlm.presets import empty_model, preset
from tridlm.tokenizer import Tokenizer

SHAPES = ("3b", "8b", "14b")
SHARD_BYTES = 4 * 2**30
STD = 0.02


def write(directory: Path, cfg: ModelConfig, tokenizer: Tokenizer, shard_bytes: int = SHARD_BYTES) -> Path:
    """An NLD directory of ``cfg`` with seeded random bfloat16 weights and ``tokenizer``."""
    directory = Path(directory)
    tensors = [(name, tuple(p.shape)) for name, p in empty_model(cfg).state_dict().items()]
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for index, (shard, file) in enumerate(zip(shards, names)):
            _write_shard(tmp / file, shard, seed=index)
        index = {
            "metadata": {"total_size": sum(2 * math.prod(shape) for _, shape in tensors)},
            "weight_map": {name: file for shard, file in zip(shards, names) for name, _ in shard},
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config_to_nld_json(cfg, torch.bfloat16), indent=2) + "\n")
        tokenizer.save(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """A safetensors file written as the format lays it out: the header (names, dtypes, shapes, offsets), then each
    tensor's bytes as it is made."""
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in tensors:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(shape, generator=generator) * STD).to(torch.bfloat16)
            f.write(tensor.view(torch.uint8).numpy().data)


def model_config(shape: str) -> ModelConfig:
    """NLD's shape with the block size it was trained with (32)."""
    return dataclasses.replace(preset(f"nld-{shape}"), block_size=32)


def path(shape: str) -> Path:
    """A random NLD checkpoint of ``shape`` in the tridlm cache, written on first use."""
    directory = default_model.cache_root() / "random-nld" / f"random-nld-{shape}"
    if not (directory / "config.json").is_file():
        print(f"writing {directory}", flush=True)
        write(directory, model_config(shape), default_tokenizer())
    return directory


def default_tokenizer() -> Tokenizer:
    """The default model's tokenizer (read from its GGUF file's metadata)."""
    return Tokenizer.from_gguf(GGUFFile(default_model.gguf_path()).fields)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="+", choices=SHAPES)
    ap.add_argument("--out", type=Path, help="folder for random-nld-<shape>/ (default: the tridlm cache)")
    args = ap.parse_args()
    for shape in args.shapes:
        if args.out is None:
            directory = path(shape)
        else:
            directory = write(args.out / f"random-nld-{shape}", model_config(shape), default_tokenizer())
        size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        print(f"{directory}: {size / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
