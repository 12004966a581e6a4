"""tridlm: fast text generation with tri-mode diffusion language models (ar, diffusion, self-speculation).

    import tridlm
    model, tokenizer = tridlm.load()                       # the embedded default model, or a path
    print(tridlm.generate(model, tokenizer, "Name three planets.", mode="spec"))

``load``, ``generate`` and ``stream`` are the short way in; ``tridlm.decode`` (batches of token prompts,
``GenerationConfig``, counts) and ``tridlm.loading`` are the full API. Importing this package imports nothing
heavy: each function imports what it needs when called.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tridlm")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "generate", "load", "stream"]


def load(path=None, dtype: str | None = None, device: str = "cpu", adapter=None):
    """(model, tokenizer): an NLD or Hugging Face directory, a GGUF file, or None for the embedded default model
    (``tridlm.loading.open_model`` says what ``dtype`` and ``adapter`` take)."""
    from tridlm.loading import open_model

    return open_model(path, dtype, device, adapter)


def stream(model, tokenizer, prompt: str | list[dict], costs=None, **knobs) -> Iterator[str]:
    """The answer's text as it is committed. ``prompt``: a text to continue, or chat messages
    (``[{"role": "user", "content": ...}]``, rendered with the model's chat template). ``knobs``: fields of
    ``tridlm.decode.GenerationConfig`` (mode, block_size, threshold, temperature, max_tokens, stop ...).
    ``costs``: the ``tridlm.decode.CostCurve`` that ``auto`` plans with; a call given none takes the one kept in the
    cache for this model's shape and machine (``CostCurve.kept``: measured on first use, then read)."""
    from tridlm.decode import GenerationConfig
    from tridlm.decode import stream as decode_stream
    from tridlm.tokenizer import TextStream

    cfg = GenerationConfig(**knobs)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else tokenizer.encode_chat(prompt)
    text = TextStream(tokenizer, cfg.stop)
    for chunk in decode_stream(model, [ids], cfg, detokenize=tokenizer.decode, costs=costs):
        for _, tokens in chunk:
            if piece := text.push(tokens):
                yield piece
    if tail := text.push([], final=True):
        yield tail


def generate(model, tokenizer, prompt: str | list[dict], costs=None, **knobs) -> str:
    """The whole answer's text; arguments as in ``stream``."""
    return "".join(stream(model, tokenizer, prompt, costs, **knobs))
