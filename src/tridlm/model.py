"""The tri-mode transformer: a pre-norm Llama-family decoder with one forward.

Every decoding mode and training use the same ``TriModel.forward``; they differ only in the
positions, the attention mask and the cache policy passed in (SPEC 1). Module names follow the
Nemotron-Labs-Diffusion checkpoint layout (``encoder.layers.N.self_attn.q_proj`` ...,
``diffusion_head``), so a state dict is that layout as is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tridlm import attention, kernels, rope
from tridlm.cache import KVCache
from tridlm.native import NativeLayers
from tridlm.projection import Adapters, Linear, LoraGroup, project
from tridlm.quant import KEYS_VALUES
from tridlm.rope import RopeConfig


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    mask_id: int | None = None
    block_size: int | None = None  # the block size the diffusion objective was trained with, when known


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = kernels.rms_norm(x, self.weight, self.eps)
        if fused is not None:
            return fused
        # Normalise in float32 like the reference implementations, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass
class Pass:
    """What every layer of one forward shares: built once per forward from its arguments."""

    positions: torch.Tensor  # (B, n) absolute positions of the current tokens
    mask: torch.Tensor  # (B, 1, n, P + n) over keys [cache[:P] | current tokens]
    cos: torch.Tensor  # (B, n, 1, head_dim)
    sin: torch.Tensor  # (B, n, 1, head_dim), signed for ``rope.apply``
    q_scale: torch.Tensor | None  # (B, n, 1, 1) Llama-4 query scaling, None when off
    cache: KVCache | None
    write: int  # leading current tokens whose keys/values are stored in the cache
    adapter: bool | torch.Tensor  # which tokens use the LoRA: all, none, or a (B, n) selection
    slots: torch.Tensor | None = None  # (B, n) key index of each current token when it is not P + i
    plan: attention.Plan = attention.Plan()  # how the layers attend (``attention.plan``)
    heads: tuple[int, int] = (1, 1)  # key/value heads, and query heads per key/value head
    padding: torch.Tensor | None = None  # (B, n) current tokens that only make the rows equally long
    kv_dtype: torch.dtype | None = None  # queries, keys and values attend in it (the cache's); None: the activations'

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        """``attention.row_exact_attention``'s additive mask, built once per forward where it is needed."""
        return attention.attention_bias(self.mask, *self.heads)

    @property
    def prefix(self) -> int:
        """How many cached slots the keys start with."""
        return self.mask.shape[-1] - self.positions.shape[1]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, cfg.attention_bias)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.attention_bias)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.attention_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.qkv = None  # q/k/v low-bit weights fused into one kernel call (``fuse_packed``)
        self.qkv_lora = LoraGroup((self.q_proj, self.k_proj, self.v_proj))
        self.o_lora = LoraGroup((self.o_proj,))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        B, n, _ = x.shape  # B: batch rows, n: current tokens
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), self.qkv, self.qkv_lora, p.adapter)
        q = q.reshape(B, n, self.n_heads, self.head_dim)  # (B, n, H, D)
        k = k.reshape(B, n, self.n_kv_heads, self.head_dim)  # (B, n, KV, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # queries, keys and values in the dtype the cache keeps, cached or not (cached == uncached)
        kv = p.kv_dtype or x.dtype
        if p.q_scale is None:
            q = rope.apply(q, p.cos, p.sin, kv)
        else:
            q = (rope.apply(q, p.cos, p.sin) * p.q_scale).to(kv)
        k, v = rope.apply(k, p.cos, p.sin, kv), v.to(kv)
        keys, values = self.keys_values(k.transpose(1, 2), v.reshape(B, n, self.n_kv_heads, -1).transpose(1, 2), p)
        o = attention.attend(q, keys, values, p.mask, p.plan.row_exact, lambda: p.bias, x.dtype)  # (B, n, H * D)
        return project(o, (self.o_proj,), None, self.o_lora, p.adapter)[0]

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, p: Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values over [cache[:P] | current tokens], (B, KV, P + n, D) each, from the current ones
        (B, KV, n, D); the leading ``p.write`` of these are stored in the cache."""
        P, n = p.prefix, k.shape[2]
        if p.plan.in_place:  # no copy of the prefix: slots past the committed lengths are scratch
            if p.slots is not None:  # a ragged batch: each row's current keys at its own positions
                p.cache.write(self.index, p.slots, k, v)
                return p.cache.prefix(self.index, P + n)
            keys, values = p.cache.prefix(self.index, P + n)
            keys[:, :, P:].copy_(k)
            values[:, :, P:].copy_(v)
            return keys, values
        keys, values = k, v
        if P:
            pk, pv = p.cache.prefix(self.index, P)  # (B, KV, P, D)
            keys, values = torch.cat([pk, k.to(pk.dtype)], dim=2), torch.cat([pv, v.to(pv.dtype)], dim=2)
            if p.slots is not None:  # each row's current keys right after its own committed ones
                rows = torch.arange(len(k), device=k.device)[:, None]
                keys[rows, :, p.slots] = k.transpose(1, 2).to(keys.dtype)  # (B, n, KV, D) at (row, slot)
                values[rows, :, p.slots] = v.transpose(1, 2).to(values.dtype)
        if p.write:
            p.cache.write(self.index, p.positions[:, : p.write], k[:, :, : p.write], v[:, :, : p.write])
        return keys, values


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.ffn_dim)
        self.up_proj = Linear(cfg.dim, cfg.ffn_dim)
        self.down_proj = Linear(cfg.ffn_dim, cfg.dim)
        self.gate_up = None  # gate/up low-bit weights fused into one kernel call (``fuse_packed``)
        self.gate_up_lora = LoraGroup((self.gate_proj, self.up_proj))
        self.down_lora = LoraGroup((self.down_proj,))

    def forward(self, x: torch.Tensor, adapter: bool | torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj), self.gate_up, self.gate_up_lora, adapter)
        hidden = kernels.silu_mul(gate, up)
        if hidden is None:
            hidden = F.silu(gate) * up
        return project(hidden, (self.down_proj,), None, self.down_lora, adapter)[0]


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, index)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), p)
        return x + self.mlp(self.post_attention_layernorm(x), p.adapter)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class TriModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.diffusion_head = Linear(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.diffusion_head.weight = self.encoder.embed_tokens.weight
        self._rope_tables: dict[torch.device, tuple[torch.Tensor, float]] = {}
        layers = [(layer.self_attn, layer.mlp) for layer in self.encoder.layers]
        self.adapters = Adapters([g for a, m in layers for g in (a.qkv_lora, a.o_lora, m.gate_up_lora, m.down_lora)])
        self.native = NativeLayers()  # the int4 decode path (``tridlm.native``), where it applies

    @property
    def device(self) -> torch.device:
        return self.encoder.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (that of the float weights; low-bit layers and tables run in it too)."""
        return self.encoder.norm.weight.dtype

    @property
    def kv_dtype(self) -> torch.dtype:
        """What keys and values are kept and attended in: ``quant.KEYS_VALUES`` where the weights are low-bit,
        else the activations' dtype."""
        return KEYS_VALUES if self.diffusion_head.packed is not None else self.dtype

    def new_cache(self, batch: int, max_len: int, static: bool = False) -> KVCache:
        c = self.cfg
        return KVCache(
            c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim, dtype=self.kv_dtype, device=self.device, static=static
        )

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        write: int = 0,
        adapter: bool | torch.Tensor = False,
        logits_index: torch.Tensor | None = None,
        key_slots: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (float32) for tokens (B, n) at positions (B, n). Pure computation: no host
        synchronisation and no cache bookkeeping (the decoders' ``forward_block`` checks room and
        commits), so a CUDA graph can capture it as is.

        mask: (B, n, P + n) bool over keys [cache[:P] | current tokens] (see ``tridlm.masks``).
        write: store the keys/values of this many leading tokens in ``cache`` at their positions
            (their queries must be causal); the cache's committed lengths are left alone.
        adapter: switch on the LoRA adapter, for all tokens or a (B, n) bool selection of them
            (bidirectional queries only, by convention of the decoders).
        logits_index: (B, k) positions within the n tokens whose logits are wanted (default: all).
        key_slots: (B, n) where each current token's key goes among the P + n (default: P + i, after all
            cached slots; ``masks.after_own_cache`` gives the layout that keeps batch == single).
        padding: (B, n) bool, current tokens that only make the rows equally long (a ragged verify): the mask must
            keep every other token from attending to them; their logits are unspecified (zeros here), and the native
            path leaves them out of every projection, the head included. Not with ``logits_index``.
        """
        if padding is not None and logits_index is not None:
            raise ValueError("padding and logits_index together are not supported")
        if mask.shape[-1] > tokens.shape[1] and cache is None:
            raise ValueError("mask covers cached keys but no cache was given")
        if adapter is not False and not torch.is_grad_enabled():
            self.adapters.current(self.dtype)
        x = self.encoder.embed_tokens(tokens)  # (B, n, dim)
        p = Pass(
            positions,
            mask[:, None],
            *self._cos_sin(positions, x.dtype),
            rope.query_scale(positions, self.cfg.rope, x.dtype),
            cache,
            write,
            adapter,
            key_slots,
            attention.plan(cache, positions, mask.shape[-1] - tokens.shape[1], write, key_slots),
            (self.cfg.n_kv_heads, self.cfg.n_heads // self.cfg.n_kv_heads),
            padding,
            self.kv_dtype,
        )
        return self._head(self._layers(x, p), adapter, logits_index, padding)

    def _head(self, x, adapter, logits_index, padding) -> torch.Tensor:
        """Float32 logits of the final norm of x (B, n, dim): at ``logits_index``, or of the tokens that are not
        ``padding`` (zeros at the padding), or of all."""
        if padding is not None:
            real = ~padding
            logits = x.new_zeros(*padding.shape, self.cfg.vocab_size, dtype=torch.float32)
            head_adapter = adapter[real] if isinstance(adapter, torch.Tensor) else adapter
            logits[real] = self.diffusion_head(self.encoder.norm(x[real]), head_adapter).float()
            return logits
        if logits_index is not None:
            x = x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))  # (B, k, dim)
            if isinstance(adapter, torch.Tensor):
                adapter = adapter.gather(1, logits_index)
        return self.diffusion_head(self.encoder.norm(x), adapter).float()

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and signed sin at ``positions``, from inverse frequencies kept per device."""
        if positions.device not in self._rope_tables:
            inv_freq, factor = rope.inv_freq_and_attention_factor(self.cfg.rope, self.cfg.head_dim)
            self._rope_tables[positions.device] = inv_freq.to(positions.device), factor
        return rope.cos_sin(positions, *self._rope_tables[positions.device], dtype)

    def _layers(self, x: torch.Tensor, p: Pass) -> torch.Tensor:
        """The decoder layers: in one native call where that applies (``tridlm.native``), else module by module."""
        native = self.native(self, x, p)
        if native is not None:
            return native
        for layer in self.encoder.layers:
            x = layer(x, p)
        return x

    def add_lora(self, rank: int, alpha: float, targets: tuple[str, ...] = ("o_proj",)) -> None:
        """Attach LoRA adapters to every projection whose name is in ``targets``. They are float32 whatever
        the model's dtype: trained in full precision, and on a CPU their tiny matmuls run about 3x faster in
        float32 than in bfloat16 (a draft forward with bfloat16 adapters spent two thirds as long in them as
        in the model's own int4 matmuls)."""
        for name, module in self.named_modules():
            if isinstance(module, Linear) and name.rsplit(".", 1)[-1] in targets:
                module.add_lora(rank, alpha, torch.float32, self.device)
