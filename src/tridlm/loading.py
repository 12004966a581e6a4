"""Open any model the project reads, by path: an NLD or Hugging Face directory, a GGUF file, or the
embedded default; and convert one to an NLD directory. What every command, the server and the bench use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from tridlm import checkpoint, default_model, gguf_file, gguf_write, projection, quant
from tridlm.device import fast_dtype
from tridlm.graphs import GraphedModel
from tridlm.model import TriModel
from tridlm.options import option
from tridlm.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = (*DTYPES, *quant.WEIGHT_PRECISIONS, "auto")


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The float dtype of a precision name: activations and unquantized weights (``quant.ACTIVATIONS`` for the
    int8 and int4 weight precisions); "auto" is bfloat16 on CUDA and on CPUs with native bf16, else float32."""
    if name == "auto":
        return fast_dtype(device)
    if name in quant.WEIGHT_PRECISIONS:
        return quant.ACTIVATIONS
    if name not in DTYPES:
        raise ValueError(f"invalid dtype={name!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def default_precision(path: str | Path | None, device: str | torch.device) -> str:
    """What ``dtype=None`` means: on a CPU, int4 for the default model and GGUF files (their own 4-bit codes:
    the fastest precision there, HumanEval pass@1 equal to float32's, spec == AR bit for bit); float32 for
    float checkpoints (rounding them to 4 bits is the user's call) and on other devices."""
    quantized = path is None or str(path).endswith(".gguf")
    return "int4" if quantized and torch.device(device).type == "cpu" else "float32"


def open_model(
    path: str | Path | None = None, dtype: str | None = None, device: str = "cpu", adapter: str | Path | None = None
) -> tuple[TriModel, Tokenizer]:
    """A model and its tokenizer.

    path: an NLD or HF checkpoint directory, a ``.gguf`` file, or None for the embedded default model.
    dtype: a name of ``DTYPE_CHOICES``: a float dtype, "auto", or low-bit weights "int8" / "int4" (CPU
        only; a GGUF file's Q4_1 tensors, the default model's among them, keep their own codes in int4);
        None: ``default_precision``.
    adapter: the draft adapter to use: None for the model's own (an NLD directory's ``linear_spec_lora/``,
        the shipped one of the default model), "none" for the bare model, or a PEFT folder.
    """
    dtype = dtype or default_precision(path, device)
    torch_dtype = resolve_dtype(dtype, device)
    if dtype in quant.WEIGHT_PRECISIONS and torch.device(device).type != "cpu":
        raise ValueError(f"{dtype} weights run on the CPU only (CPU kernels); use bfloat16 on {device}")
    own = adapter is None
    pack = dtype if dtype in quant.WEIGHT_PRECISIONS else None  # what is left to pack after loading
    if path is None:
        model, tok = open_default(torch_dtype, device, own_adapter=own, precision=pack)
    elif Path(path).is_file() and str(path).endswith(".gguf"):
        model, tok = gguf_file.load_gguf(Path(path), torch_dtype, precision=pack)
        model = model.to(device)
        if own and gguf_file.adapter_path(path).is_file():
            gguf_file.load_adapter(model, gguf_file.adapter_path(path))
    else:  # each projection packed as it is read
        model, tok = checkpoint.load(Path(path), torch_dtype, device, own_adapter=own, precision=pack)
        pack = None
    if adapter not in (None, "none"):
        (gguf_file.load_adapter if str(adapter).endswith(".gguf") else checkpoint.load_adapter)(model, Path(adapter))
    if pack is not None:
        projection.quantize(model, pack)
    return model, tok


def default_nld_dir() -> Path:
    """The default model as an NLD directory, converted from its GGUF file on first use."""
    directory = default_model.cache_root() / f"{default_model.NAME}.nld"
    if not (directory / "config.json").is_file():
        model, tokenizer = gguf_file.load_gguf(default_model.gguf_path())
        checkpoint.save(directory, model, tokenizer)
    return directory


def open_default(
    dtype: torch.dtype = torch.float32, device="cpu", own_adapter: bool = True, precision: str | None = None
) -> tuple[TriModel, Tokenizer]:
    """The default model, with the shipped draft adapter unless ``own_adapter`` is false; with a ``precision``
    (int4, int8) read from its GGUF file, its own codes kept where that precision runs them (``load_gguf``)."""
    if precision is not None:
        model, tokenizer = gguf_file.load_gguf(default_model.gguf_path(), dtype, precision=precision)
        model = model.to(device)
    else:
        model, tokenizer = checkpoint.load(default_nld_dir(), dtype, device, own_adapter=False)
    if own_adapter and default_model.adapter_dir().is_dir():
        checkpoint.load_adapter(model, default_model.adapter_dir())
    return model, tokenizer


@dataclass(frozen=True)
class Source:
    """Which model to open and how: what every command takes (``--model``, ``--dtype`` ...)."""

    model: str | None = option(None, "NLD or Hugging Face directory, or a GGUF file (default: SmolLM2-135M-Instruct)")
    dtype: str | None = option(
        None,
        "int4/int8 weights (CPU, int8-quantized activations), bfloat16, float32, or auto (bf16 where native);"
        " spec == ar bit for bit in int4 and int8 on CPU, token for token on the bench prompts in float32, "
        "not always in bfloat16 (default: int4 on CPU for the default model and GGUF files, else float32)",
    )
    device: str = option("cpu", "torch device, e.g. cpu or cuda")
    adapter: str | None = option(None, "draft adapter folder (PEFT layout), or none (default: the model's own, if any)")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")
    cuda_graphs: int = option(0, "replay per-cycle forwards as CUDA graphs over a static cache of this many tokens")

    def validate(self) -> Source:
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"invalid dtype={self.dtype!r}: expected one of {', '.join(DTYPE_CHOICES)}")
        if self.cuda_graphs and torch.device(self.device).type != "cuda":
            raise ValueError("--cuda-graphs needs --device cuda")
        if self.dtype is None:
            return dataclasses.replace(self, dtype=default_precision(self.model, self.device))
        return self

    def open(self) -> tuple[TriModel | GraphedModel, Tokenizer]:
        """``open_model`` with these settings (and torch's thread count set first)."""
        s = self.validate()
        if s.threads:
            torch.set_num_threads(s.threads)
        model, tok = open_model(s.model, s.dtype, s.device, s.adapter)
        return (GraphedModel(model, capacity=s.cuda_graphs) if s.cuda_graphs else model), tok


def model_name(path: str | Path | None) -> str:
    """The name a model is served under: its file or folder name, or the default model's."""
    return Path(path).name if path else default_model.NAME


GGUF_DTYPES = ("int4", "int8", "bfloat16")


def convert(
    source: str | Path,
    output: str | Path,
    dtype: str = "bfloat16",
    mask_token: str | None = None,
    add_mask_token: bool = False,
    block_size: int | None = None,
    shard_gb: float = 4.0,
    force: bool = False,
) -> str:
    """Write ``source`` (a path, or None for the default model) as an NLD directory at ``output``, or as a
    tri-mode GGUF file where ``output`` ends in ``.gguf`` (``tridlm.gguf_write``: ``dtype`` int4, int8 or
    bfloat16, the draft adapter in a file beside it); returns a one-line summary.

    An existing ``output`` that is a file or a non-empty folder is refused unless ``force`` (then replaced
    whole, only once the new one is complete: it is written beside it and renamed into place).

    The MASK token is, in order: a new ``<|mask|>`` row (``add_mask_token``), the named ``mask_token``,
    or the model's own / an unused special token; none of them is an error. ``block_size`` records the
    diffusion block size (default: the model's own, when it has one).
    """
    if block_size is not None and block_size < 1:
        raise ValueError(f"invalid block_size={block_size}: expected a positive integer")
    output = Path(output)
    to_gguf = output.suffix == ".gguf"
    allowed = GGUF_DTYPES if to_gguf else tuple(DTYPES)
    if dtype not in allowed:
        raise ValueError(
            f"invalid dtype={dtype!r} for {'a GGUF file' if to_gguf else 'an NLD directory'}: "
            f"expected one of {', '.join(allowed)}"
        )
    targets = [output, gguf_file.adapter_path(output)] if to_gguf else [output]
    if not force and any(t.is_file() or (t.is_dir() and any(t.iterdir())) for t in targets):
        raise ValueError(f"{output} exists and is not empty: pick another output or pass --force to replace it")
    packing = dtype in quant.WEIGHT_PRECISIONS
    # a new mask row is added to float weights, packed afterwards
    model, tok = open_model(source, "bfloat16" if add_mask_token and packing else dtype)
    if add_mask_token:
        model = checkpoint.add_mask_token(model, tok)
    elif mask_token:
        model.cfg = dataclasses.replace(model.cfg, mask_id=tok.token_id(mask_token))
    elif model.cfg.mask_id is None:
        raise ValueError(
            f"{source}: no mask token and no unused special token to reuse; pass --mask-token TOKEN or --add-mask-token"
        )
    if block_size is not None:
        model.cfg = dataclasses.replace(model.cfg, block_size=block_size)
    if to_gguf:
        if packing and not checkpoint.is_packed(model):
            projection.quantize(model, dtype)
        written = gguf_write.write(output, model, tok, model_name(source).removesuffix(".gguf"), dtype)
    else:
        checkpoint.save(Path(output), model, tok, max_shard_bytes=int(shard_gb * 2**30))
        written = [output]
    mask = tok.backend.id_to_token(model.cfg.mask_id)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    return f"wrote {' and '.join(map(str, written))}: {dtype}, mask token {mask!r} (id {model.cfg.mask_id})" + (
        "" if to_gguf else f", {parameters:.1f}M parameters"
    )
