"""``config.json`` as NLD and Hugging Face write it, and our ``ModelConfig``: read (NLD, Llama, Mistral,
Ministral, Qwen2/3, their rope scalings) and written (NLD), with errors that name the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tridlm.model import ModelConfig
from tridlm.rope import RopeConfig
from tridlm.safetensors_io import CheckpointError

NLD_ARCH = "NemotronLabsDiffusionModel"
NLD_MODEL_TYPE = "nemotron_labs_diffusion"
# HF architecture -> (attention biases on q/k/v, per-head q/k RMSNorm)
HF_ARCHS = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Ministral3ForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rope_from_json(data: dict, where: Path) -> RopeConfig:
    """RoPE settings from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    params = dict(data.get("rope_scaling") or {})
    params.update(data.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    fields = {
        k: params[k]
        for k in (
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "low_freq_factor",
            "high_freq_factor",
            "llama_4_scaling_beta",
        )
        if params.get(k) is not None
    }
    try:
        return RopeConfig(theta=float(theta), type=kind, **fields).validate()
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_from_json(path: Path) -> tuple[ModelConfig, str]:
    """Our config from an NLD or HF ``config.json``; also returns the format ("nld" or "hf")."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    archs = data.get("architectures") or []
    arch = archs[0] if archs else None
    if arch == NLD_ARCH:
        fmt, bias, qk_norm = "nld", bool(data.get("attention_bias", False)), bool(data.get("qk_norm", False))
    elif arch in HF_ARCHS:
        fmt, (bias, qk_norm) = "hf", HF_ARCHS[arch]
        bias = bias or bool(data.get("attention_bias", False))
    else:
        raise CheckpointError(
            f"{path}: unsupported architecture {arch!r} (supported: {', '.join([NLD_ARCH, *HF_ARCHS])})"
        )
    if data.get("mlp_bias"):
        raise CheckpointError(f"{path}: mlp_bias=true is not supported")
    if (
        data.get("sliding_window")
        and data.get("use_sliding_window", True)
        and data["sliding_window"] < data.get("max_position_embeddings", 0)
    ):
        raise CheckpointError(f"{path}: sliding_window={data['sliding_window']} attention is not supported")
    try:
        heads = data["num_attention_heads"]
        eos = data.get("eos_token_id")
        cfg = ModelConfig(
            vocab_size=data["vocab_size"],
            dim=data["hidden_size"],
            n_layers=data["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=data.get("num_key_value_heads") or heads,
            head_dim=data.get("head_dim") or data["hidden_size"] // heads,
            ffn_dim=data["intermediate_size"],
            norm_eps=data.get("rms_norm_eps", 1e-5),
            rope=_rope_from_json(data, path),
            max_seq_len=data.get("max_position_embeddings", 4096),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
            attention_bias=bias,
            qk_norm=qk_norm,
            bos_id=data.get("bos_token_id"),
            eos_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            mask_id=data.get("mask_token_id"),
            block_size=data.get("block_size") if fmt == "nld" else None,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None
    return cfg, fmt


def rope_parameters(rope: RopeConfig) -> dict:
    """RoPE settings as the ``rope_parameters`` object of the shipped NLD configs (transformers 5 layout,
    read by NVIDIA's configuration class, transformers 5.x and vLLM/SGLang): theta and type always, the
    scaling fields of the type, and the query scaling when on."""
    params = {"rope_type": rope.type, "rope_theta": rope.theta}
    if rope.type != "default" or rope.llama_4_scaling_beta is not None:
        params.update(factor=rope.factor, original_max_position_embeddings=rope.original_max_position_embeddings)
    if rope.type == "yarn":
        params.update(
            beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, mscale=rope.mscale, mscale_all_dim=rope.mscale_all_dim
        )
    if rope.type == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.llama_4_scaling_beta is not None:
        params["llama_4_scaling_beta"] = rope.llama_4_scaling_beta
    return params


def config_to_nld_json(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """An NLD ``config.json`` in the layout NVIDIA ships (RoPE in ``rope_parameters``, no ``rope_scaling``:
    transformers 5 treats that name as an alias and would let it replace the theta-bearing object)."""
    config = {
        "architectures": [NLD_ARCH],
        "model_type": NLD_MODEL_TYPE,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope_parameters(cfg.rope),
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.attention_bias,
        "qk_norm": cfg.qk_norm,
        "mlp_bias": False,
        "sliding_window": None,
        "hidden_act": "silu",
        "mask_token_id": cfg.mask_id,
        "dlm_paradigm": "bidirectional",
        "bos_token_id": cfg.bos_id,
        "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) != 1 else cfg.eos_ids[0],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.block_size is not None:
        config["block_size"] = cfg.block_size
    return config
