"""Checkpoints: read Nemotron-Labs-Diffusion (NLD) and Hugging Face AR directories, write NLD.

Both directory layouts hold a Hugging Face style ``config.json``, safetensors weights (one file or
shards with ``model.safetensors.index.json``) and tokenizer files. NLD names weights ``encoder.*`` and
``diffusion_head.weight`` (our module names), HF ``model.*`` and ``lm_head.weight``. Loading is lazy:
tensors are read one at a time from memory-mapped files straight to the target device and dtype.
An NLD directory may hold a LoRA draft adapter in ``linear_spec_lora/`` (PEFT layout).
GGUF files are read by ``tridlm.gguf_file``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from tridlm import projection, quant, safetensors_io
from tridlm.model import ModelConfig, TriModel
from tridlm.nld_config import config_from_json, config_to_nld_json
from tridlm.presets import empty_model
from tridlm.projection import Linear
from tridlm.safetensors_io import CheckpointError
from tridlm.tokenizer import Tokenizer, find_mask_token

ADAPTER_DIR = "linear_spec_lora"


# -------------------------------------------------------------------------------------------- weights


def _our_name(name: str, fmt: str) -> str:
    if fmt == "hf":
        if name == "lm_head.weight":
            return "diffusion_head.weight"
        return "encoder." + name.removeprefix("model.")
    return name


def load_model(
    directory: Path,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    cfg: ModelConfig | None = None,
    precision: str | None = None,
) -> TriModel:
    """Build the model of an NLD or HF directory, reading each tensor once onto ``device``/``dtype``.

    precision: "int4" or "int8" packs each projection as it is read (``projection.packed``; ``dtype`` must then be
    ``quant.ACTIVATIONS``), its float copy freed before the next tensor is read: the process never holds more than
    the packed model, the float tensors that stay float (embedding, norms) and one tensor in float."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: not a checkpoint directory (missing config.json)")
    if precision is not None and dtype != quant.ACTIVATIONS:
        raise ValueError(f"{precision} weights load with {quant.ACTIVATIONS} activations, not {dtype}")
    parsed, fmt = config_from_json(directory / "config.json")
    cfg = cfg or parsed
    model = empty_model(cfg)
    wanted = dict(model.state_dict())
    if cfg.tie_embeddings:
        wanted.pop("diffusion_head.weight")
    found = _match(directory, fmt, cfg, wanted)
    _report(directory, found, wanted, model, precision)
    total = sum(entry.nbytes for _, entry in found.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading", file=sys.stderr, leave=False, disable=None)
    # largest first: a tensor's file pages and packing temporaries come on top of what is held by then
    for ours, (_, entry) in sorted(found.items(), key=lambda item: -item[1][1].nbytes):
        tensor = safetensors_io.read(entry)
        module_name, _, attr = ours.rpartition(".")
        module = model.get_submodule(module_name)
        if precision is not None and ours == "encoder.embed_tokens.weight" and tensor.shape[1] % quant.GROUP == 0:
            model.encoder.embed_tokens = projection.packed_embedding(tensor)  # from the file's values
            del tensor
            quant.release_free_memory()
        elif precision is not None and isinstance(module, Linear) and attr == "weight":
            module.pack(projection.packed(module_name, tensor, precision))
            del tensor
            quant.release_free_memory()  # the float copy and the packing's temporaries, before the next tensor
        else:
            tensor = tensor.to(device=device, dtype=dtype, copy=True)  # its own memory, not the file's pages
            setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
        bar.update(entry.nbytes)
    bar.close()
    projection.share_table(model)
    if cfg.tie_embeddings and model.diffusion_head.packed is None:
        model.diffusion_head.weight = model.encoder.embed_tokens.weight
        if precision is not None:
            model.diffusion_head.pack(projection.packed("diffusion_head", model.diffusion_head.weight, precision))
    if precision is not None:
        projection.fuse_packed(model)
    return model.eval()


def _match(directory: Path, fmt: str, cfg: ModelConfig, wanted: dict) -> dict[str, tuple[str, safetensors_io.Entry]]:
    """Our parameter name -> (the file's tensor name, where it lies) for every tensor of the directory, checked
    against the parameters and shapes ``wanted``."""
    found = {
        _our_name(n, fmt): (n, entry)
        for n, entry in safetensors_io.tensors(safetensors_io.weight_files(directory)).items()
        if not n.endswith("rotary_emb.inv_freq")
    }
    if cfg.tie_embeddings:
        found.pop("diffusion_head.weight", None)  # some tied checkpoints store the copy too
    missing, extra = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
    if missing or extra:
        raise CheckpointError(
            f"{directory}: weights do not match config.json: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for ours, (name, entry) in found.items():
        if entry.shape != tuple(wanted[ours].shape):
            raise CheckpointError(
                f"{entry.file.name}: tensor {name} has shape {entry.shape}, but config.json "
                f"(hidden_size, intermediate_size, heads, vocab_size) implies {tuple(wanted[ours].shape)}"
            )
    return found


def _report(directory: Path, found: dict, wanted: dict, model: TriModel, precision: str | None) -> None:
    """With a ``precision``, one line saying how large the files are and the packed model will be, before any tensor
    is read."""
    if precision is not None:
        linear = {n for n, m in model.named_modules() if isinstance(m, Linear)}
        total = sum(
            projection.packed_bytes(ours.rpartition(".")[0], tuple(wanted[ours].shape), precision)
            if ours == "encoder.embed_tokens.weight" or (ours.endswith(".weight") and ours.rpartition(".")[0] in linear)
            else 2 * wanted[ours].numel()
            for ours in found
        )
        print(
            f"tridlm: {directory.name}: {sum(e.nbytes for _, e in found.values()) / 2**30:.2f} GiB on disk, about "
            f"{total / 2**30:.2f} GiB in {precision}",
            file=sys.stderr,
        )


def load(
    directory: Path,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    own_adapter: bool = True,
    precision: str | None = None,
) -> tuple[TriModel, Tokenizer]:
    """Model and tokenizer of an NLD or HF directory. A model without a mask token reuses an unused
    special token of its tokenizer when it has one. The draft adapter in ``linear_spec_lora/`` is
    attached when present and ``own_adapter`` is true. ``precision``: as in ``load_model``."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: not a checkpoint directory (missing config.json)")
    tokenizer = Tokenizer.load(directory)
    cfg, _ = config_from_json(directory / "config.json")
    if cfg.mask_id is None:
        cfg = dataclasses.replace(cfg, mask_id=find_mask_token(tokenizer))
    model = load_model(directory, dtype, device, cfg, precision)
    if own_adapter and (directory / ADAPTER_DIR).is_dir():
        load_adapter(model, directory / ADAPTER_DIR)
    return model, tokenizer


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard, size = {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = t
        size += nbytes
    if shard:
        yield shard


def save(directory: Path, model: TriModel, tokenizer: Tokenizer, max_shard_bytes: int = 4 * 2**30) -> None:
    """Write an NLD directory atomically (a crash leaves no half-written directory): config.json,
    safetensors shards (+ index when more than one), tokenizer files and the adapter if attached."""
    if is_packed(model):
        raise ValueError("a model with int8/int4 weights is not written: save or convert it from float weights")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {
            k: v.detach().contiguous()
            for k, v in model.state_dict().items()
            if "lora_" not in k and not (model.cfg.tie_embeddings and k == "diffusion_head.weight")
        }
        shards = list(_shards(state, max_shard_bytes))
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = config_to_nld_json(model.cfg, model.dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(tmp)
        if has_adapter(model):
            save_adapter(model, tmp / ADAPTER_DIR)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------- mask tokens


def add_mask_token(model: TriModel, tokenizer: Tokenizer, token: str = "<|mask|>") -> TriModel:
    """Add a MASK token to the tokenizer (in place) and return the model with a row for it: a spare row
    of a padded vocabulary when there is one, else one more row; it starts as the mean embedding."""
    from tokenizers import AddedToken

    if tokenizer.backend.token_to_id(token) is not None:
        raise ValueError(f"token {token!r} already exists; reuse it with --mask-token")
    tokenizer.backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    new_id = tokenizer.backend.token_to_id(token)
    old_vocab = model.cfg.vocab_size
    cfg = dataclasses.replace(model.cfg, vocab_size=max(old_vocab, new_id + 1), mask_id=new_id)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("encoder.embed_tokens.weight",) + (() if cfg.tie_embeddings else ("diffusion_head.weight",)):
        w = state[name]
        w = torch.cat([w, w.new_zeros(cfg.vocab_size - old_vocab, w.shape[1])])
        w[new_id] = w[:old_vocab].mean(0)
        state[name] = w
    state.pop("diffusion_head.weight", None) if cfg.tie_embeddings else None
    grown = TriModel(cfg).to(dtype=model.dtype, device=model.device)
    grown.load_state_dict(state, strict=not cfg.tie_embeddings)
    return grown.eval()


# ----------------------------------------------------------------------------------------- adapters


def is_packed(model: TriModel) -> bool:
    """Whether any layer runs low-bit weights (``tridlm.quant``)."""
    return any(isinstance(m, Linear) and m.packed is not None for m in model.modules())


def has_adapter(model: TriModel) -> bool:
    return any(isinstance(m, Linear) and m.lora_a is not None for m in model.modules())


def save_adapter(model: TriModel, directory: Path, dtype: torch.dtype | None = None) -> None:
    """PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors`` (lora_A/lora_B per module),
    in ``dtype`` (default: the adapter's own)."""
    if not has_adapter(model):
        raise ValueError("the model has no draft adapter to save (pass --adapter FOLDER)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, targets, rank, alpha = {}, set(), None, None
    for name, m in model.named_modules():
        if isinstance(m, Linear) and m.lora_a is not None:
            tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_a.detach().to(dtype).contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_b.detach().to(dtype).contiguous()
            targets.add(name.rsplit(".", 1)[-1])
            rank, alpha = m.lora_a.shape[0], m.lora_scale * m.lora_a.shape[0]
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(model: TriModel, directory: Path) -> None:
    """Attach a PEFT-layout LoRA to the model (used by its bidirectional passes only)."""
    directory = Path(directory)
    cfg_path, weights = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise CheckpointError(f"{directory}: adapter is missing {p.name}")
    config = json.loads(cfg_path.read_text())
    if config.get("use_rslora") or config.get("use_dora"):
        raise CheckpointError(f"{cfg_path}: rsLoRA/DoRA adapters are not supported")
    model.add_lora(config["r"], config["lora_alpha"], tuple(config["target_modules"]))
    for name, entry in safetensors_io.tensors([weights]).items():
        module_name, _, kind = name.removeprefix("base_model.model.").rpartition(".lora_")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise CheckpointError(f"{weights}: tensor {name} names no module of the model") from None
        param = module.lora_a if kind == "A.weight" else module.lora_b
        value = safetensors_io.read(entry)
        if param is None or value.shape != param.shape:
            raise CheckpointError(
                f"{weights}: tensor {name} does not fit (shape {tuple(value.shape)}, "
                f"r={config['r']}, target_modules={config['target_modules']})"
            )
        with torch.no_grad():
            param.copy_(value)
