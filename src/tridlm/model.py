"""The tri-mode transformer: a pre-norm Llama-family decoder with one forward.

Every decoding mode and training use the same ``TriModel.forward``; they differ only in the
positions, the attention mask and the cache policy passed in (SPEC 1). Module names follow the
Nemotron-Labs-Diffusion checkpoint layout (``encoder.layers.N.self_attn.q_proj`` ...,
``diffusion_head``), so a state dict is that layout as is.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tridlm import kernels, rope
from tridlm.cache import KVCache
from tridlm.quant import Int4Weight
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

    @staticmethod
    def preset(name: str) -> ModelConfig:
        """A named architecture (weights come separately)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[name]


PRESETS = {
    # Random-weight model for tests: small enough for thousands of forwards per second.
    "tiny": ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                        ffn_dim=128, max_seq_len=512, bos_id=1, eos_ids=(2,), mask_id=3),
    # Nemotron-Labs-Diffusion 3B shapes (yarn + Llama-4 query scaling), for timing without weights.
    "nld-3b": ModelConfig(vocab_size=131072, dim=3072, n_layers=26, n_heads=32, n_kv_heads=8, head_dim=128,
                          ffn_dim=9216, rope=RopeConfig(theta=1e6, type="yarn", factor=16.0,
                                                        original_max_position_embeddings=16384, mscale=1.0,
                                                        mscale_all_dim=1.0, llama_4_scaling_beta=0.1),
                          max_seq_len=262144, bos_id=1, eos_ids=(11,), mask_id=100),
}


_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
ROW_EXACT_MAX_QUERIES = 512  # CPU query blocks up to this size: ``kernels.attend`` (or ``row_exact_attention``)


def row_exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention as two batched matmuls (grouped query heads stacked as rows) and a float32 softmax, so a
    query row's result does not depend on how many rows or keys come with it wherever the matmuls are
    row-independent: with int8/int4 weights (``tridlm.kernels``' integer matmuls) a spec verify
    row then equals the AR step that would produce it bit for bit (tested), where torch's fused CPU kernel
    changes its blocking with the number of rows. Not every shape qualifies (the tiny test model's 16-wide
    heads do not), nor do bfloat16 float projections, nor float32 matmuls, whose sums over keys are
    blocked by their number.

    q (B, n, H, D); k, v (B, KV, P, D); bias (B * KV, G * n, P) float32, 0 or -inf (``attention_bias``)
    -> (B, n, H * D).
    """
    B, n, H, D = q.shape
    KV = k.shape[1]
    G = H // KV
    q = q.reshape(B, n, KV, G, D).permute(0, 2, 3, 1, 4).reshape(B * KV, G * n, D)
    scores = torch.add(bias, torch.bmm(q, k.reshape(B * KV, -1, D).transpose(1, 2)), alpha=D**-0.5)
    o = torch.bmm(scores.softmax(-1).to(v.dtype), v.reshape(B * KV, -1, D))  # (B * KV, G * n, D)
    return o.view(B, KV, G, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, H * D)


def attention_bias(mask: torch.Tensor, n_kv_heads: int, group: int) -> torch.Tensor:
    """``row_exact_attention``'s additive mask: (B, 1, n, P) bool -> (B * KV, G * n, P) float32."""
    B, _, n, P = mask.shape
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias[:, :, None].expand(B, n_kv_heads, group, n, P).reshape(B * n_kv_heads, group * n, P)


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


class Linear(nn.Linear):
    """A linear layer with an optional low-rank adapter, used only when asked, and optionally low-bit
    weights (``tridlm.quant``) in place of the float ones."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__(d_in, d_out, bias=bias)
        self.lora_a: nn.Parameter | None = None
        self.lora_b: nn.Parameter | None = None
        self.lora_scale = 0.0
        self.packed = None  # an Int8Weight / Int4Weight; the float weight is dropped

    def pack(self, weight) -> None:
        """Use low-bit ``weight`` from now on (activations in ``tridlm.quant.ACTIVATIONS``)."""
        self.packed, self.weight = weight, None

    def add_lora(self, rank: int, alpha: float, dtype: torch.dtype, device: torch.device) -> None:
        """Attach a LoRA (B initialised to zero, so the adapter starts as the identity)."""
        self.lora_a = nn.Parameter(torch.randn(rank, self.in_features, dtype=dtype, device=device)
                                   / math.sqrt(self.in_features))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        self.lora_scale = alpha / rank

    def forward(self, x: torch.Tensor, adapter: bool | torch.Tensor = False) -> torch.Tensor:
        """adapter: True/False for every token, or a (B, n) bool tensor choosing tokens."""
        if self.packed is not None:
            y = self.packed(x) if self.bias is None else self.packed(x) + self.bias
        else:
            y = F.linear(x, self.weight, self.bias)
        return self.with_lora(y, x, adapter)

    def with_lora(self, y: torch.Tensor, x: torch.Tensor, adapter: bool | torch.Tensor) -> torch.Tensor:
        """``y`` (this layer's output for ``x``) plus the adapter's contribution where it is switched on."""
        if adapter is False or self.lora_a is None:
            return y
        delta = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b) * self.lora_scale
        return y + (delta if adapter is True else delta * adapter[..., None]).to(y.dtype)


class LoraGroup:
    """The adapters of projections that read the same input (q/k/v, gate/up; or one projection) as one
    low-rank pair at inference: A stacked, B block-diagonal with each scale folded in, applied in one kernel
    call (inside the int4 matmul, or ``kernels.lora_add``) where torch needs two matmuls, a mask and an add per
    projection: on a CPU a drafting forward's time would otherwise go largely into these tiny ops. The model
    rebuilds the form when an adapter changes (``TriModel._refresh_adapters``); training uses each projection's
    own adapter so that gradients reach it."""

    def __init__(self, projs: tuple[Linear, ...]):
        self.projs = projs
        self.form: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # a, bt, spans (kernels.Adapter)

    def refresh(self, activations: torch.dtype) -> None:
        if any(p.lora_a is None for p in self.projs):
            self.form = None
            return
        a = torch.cat([p.lora_a for p in self.projs]).float()
        b = torch.block_diag(*[p.lora_b.float() * p.lora_scale for p in self.projs])  # (N, r)
        n = b.shape[0]
        tiles = -(-n // 16)
        bt = F.pad(b.T, (0, 16 * tiles - n)).view(-1, tiles, 16).transpose(0, 1).contiguous()  # (tiles, r, 16)
        # each tile's rank range: from the first to the last adapter of the projections it overlaps
        ends = torch.tensor([p.out_features for p in self.projs]).cumsum(0)
        ranks = torch.tensor([p.lora_a.shape[0] for p in self.projs]).cumsum(0)
        first = torch.searchsorted(ends, torch.arange(tiles) * 16, right=True)
        last = torch.searchsorted(ends, torch.clamp(torch.arange(1, tiles + 1) * 16, max=n) - 1, right=True)
        spans = torch.stack([F.pad(ranks, (1, 0))[first], ranks[last]], 1).to(torch.int32).contiguous()
        # bfloat16 where the activations are: half the bytes that each drafting forward reads
        dtype = torch.bfloat16 if activations == torch.bfloat16 else torch.float32
        self.form = a.to(dtype).contiguous(), bt.to(dtype), spans

    def usable(self, adapter: bool | torch.Tensor) -> bool:
        return adapter is not False and self.form is not None and not torch.is_grad_enabled()

    def kernel_form(self, adapter: bool | torch.Tensor) -> kernels.Adapter:
        """The group's adapters for the tokens ``adapter`` selects (all, or a (B, n) selection)."""
        return kernels.Adapter(*self.form, None if adapter is True else adapter.reshape(-1))


def project(x: torch.Tensor, projs: tuple[Linear, ...], fused, group: LoraGroup,
            adapter: bool | torch.Tensor) -> list[torch.Tensor]:
    """The outputs of projections that read the same ``x``: with their low-bit weights in one kernel call
    when ``fused`` (``TriModel.fuse_packed``), their adapters as one group where usable."""
    sizes = [p.out_features for p in projs]
    if not group.usable(adapter):
        if fused is None:
            return [p(x, adapter) for p in projs]
        return [p.with_lora(o, x, adapter) for p, o in zip(projs, fused(x).split(sizes, dim=-1))]
    lora = group.kernel_form(adapter)
    if fused is None and len(projs) == 1 and projs[0].bias is None:
        fused = projs[0].packed
    if isinstance(fused, Int4Weight):  # the adapter inside the int4 kernel
        return list(fused(x, lora).split(sizes, dim=-1))
    if fused is not None:
        y = fused(x)
    else:
        y = projs[0](x) if len(projs) == 1 else torch.cat([p(x) for p in projs], dim=-1)
    rows = kernels.lora_add(y.reshape(-1, y.shape[-1]).contiguous(), x.reshape(-1, x.shape[-1]), lora)
    return list(rows.view(y.shape).split(sizes, dim=-1))


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
    row_exact: bool = False  # a CPU query block: ``kernels.attend`` or ``row_exact_attention``, not SDPA
    in_place: bool = False  # current keys/values go to cache slots P + i, and attention reads the cache there
    heads: tuple[int, int] = (1, 1)  # key/value heads, and query heads per key/value head

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        """``row_exact_attention``'s additive mask, built once per forward where the kernel is not used."""
        return attention_bias(self.mask, *self.heads)

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
        q, k = rope.apply(q, p.cos, p.sin), rope.apply(k, p.cos, p.sin)
        if p.q_scale is not None:
            q = q * p.q_scale
        keys, values = self.keys_values(k.transpose(1, 2), v.reshape(B, n, self.n_kv_heads, -1).transpose(1, 2), p)
        if p.row_exact:  # a CPU query block: the compiled kernel, else the same in torch ops
            o = kernels.attend(q, keys, values, p.mask[:, 0])  # (B, n, H * D)
            if o is None:
                o = row_exact_attention(q, keys, values, p.bias)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2).to(keys.dtype), keys, values, attn_mask=p.mask,
                                               enable_gqa=True)
            o = o.transpose(1, 2).reshape(B, n, -1).to(x.dtype)
        return project(o, (self.o_proj,), None, self.o_lora, p.adapter)[0]

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, p: Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values over [cache[:P] | current tokens], (B, KV, P + n, D) each, from the current ones
        (B, KV, n, D); the leading ``p.write`` of these are stored in the cache."""
        P, n = p.prefix, k.shape[2]
        if p.in_place:  # no copy of the prefix: slots P.. past the committed length are scratch
            keys, values = p.cache.prefix(self.index, P + n)
            keys[:, :, P:].copy_(k)
            values[:, :, P:].copy_(v)
            return keys, values
        keys, values = k, v
        if P:
            pk, pv = p.cache.prefix(self.index, P)  # (B, KV, P, D)
            keys, values = torch.cat([pk, k.to(pk.dtype)], dim=2), torch.cat([pv, v.to(pv.dtype)], dim=2)
            if p.slots is not None:  # each row's current keys right after its own committed ones
                index = p.slots[:, None, :, None].expand_as(k)
                keys.scatter_(2, index, k.to(keys.dtype))
                values.scatter_(2, index, v.to(values.dtype))
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
        self._lora_groups = [g for layer in self.encoder.layers for g in (
            layer.self_attn.qkv_lora, layer.self_attn.o_lora, layer.mlp.gate_up_lora, layer.mlp.down_lora)]
        self._lora_key: list | None = None

    @property
    def device(self) -> torch.device:
        return self.encoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (that of the float weights; low-bit layers run in it too)."""
        return self.encoder.embed_tokens.weight.dtype

    def new_cache(self, batch: int, max_len: int, static: bool = False) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim, dtype=self.dtype, device=self.device,
                       static=static)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, write: int = 0, adapter: bool | torch.Tensor = False,
                logits_index: torch.Tensor | None = None, key_slots: torch.Tensor | None = None) -> torch.Tensor:
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
        """
        if mask.shape[-1] > tokens.shape[1] and cache is None:
            raise ValueError("mask covers cached keys but no cache was given")
        if adapter is not False and not torch.is_grad_enabled():
            self._refresh_adapters()
        x = self.encoder.embed_tokens(tokens)  # (B, n, dim)
        if positions.device not in self._rope_tables:
            inv_freq, factor = rope.inv_freq_and_attention_factor(self.cfg.rope, self.cfg.head_dim)
            self._rope_tables[positions.device] = inv_freq.to(positions.device), factor
        cos, sin = rope.cos_sin(positions, *self._rope_tables[positions.device], x.dtype)
        n = tokens.shape[1]
        prefix = mask.shape[-1] - n
        p = Pass(positions, mask[:, None], cos, sin, rope.query_scale(positions, self.cfg.rope, x.dtype), cache,
                 write, adapter, key_slots, x.device.type == "cpu" and n <= ROW_EXACT_MAX_QUERIES,
                 self._in_place(cache, positions, prefix, write, key_slots),
                 (self.cfg.n_kv_heads, self.cfg.n_heads // self.cfg.n_kv_heads))
        # cuDNN attention builds a graph per new key length (every decode step): leave it out.
        with sdpa_kernel(_SDPA_BACKENDS):
            for layer in self.encoder.layers:
                x = layer(x, p)
        if logits_index is not None:
            x = x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))  # (B, k, dim)
            if isinstance(adapter, torch.Tensor):
                adapter = adapter.gather(1, logits_index)
        return self.diffusion_head(self.encoder.norm(x), adapter).float()

    def _refresh_adapters(self) -> None:
        """Rebuild the adapter groups' inference form where an adapter was attached, replaced or changed in place
        since the last forward that used them: one check of every adapter tensor per forward. (Tensors made in
        inference mode keep no version: only a replaced one is seen there.)"""
        tensors = [p._parameters.get(name) for g in self._lora_groups for p in g.projs for name in ("lora_a", "lora_b")]
        key = [(id(t), 0 if t is None or t.is_inference() else t._version) for t in tensors]
        if key != self._lora_key:
            for group in self._lora_groups:
                group.refresh(self.dtype)
            self._lora_refs, self._lora_key = tensors, key  # referenced, so that their ids stay theirs

    @staticmethod
    def _in_place(cache: KVCache | None, positions: torch.Tensor, prefix: int, write: int,
                  key_slots: torch.Tensor | None) -> bool:
        """Whether a forward can attend over the cache itself, its current keys at slots P + i (on a CPU
        this saves a copy of every layer's cached keys per forward): one row, not a static cache, past its
        committed length, with room, and the tokens it writes at exactly those slots; and no autograd (a
        graph through the cache's own buffers would outlive the forward)."""
        if (cache is None or key_slots is not None or cache.static or cache.batch != 1 or cache.k.device.type != "cpu"
                or torch.is_grad_enabled()):
            return False
        n = positions.shape[1]
        if prefix < int(cache.lengths[0]) or prefix + n > cache.max_len:
            return False
        return not write or torch.equal(positions[0, :write], torch.arange(prefix, prefix + write))

    def fuse_packed(self) -> None:
        """Run each layer's q/k/v, and its gate/up, low-bit weights as one kernel call each (same values bit
        for bit; adapters still apply per projection). Layers with float weights or biases stay as they are."""
        from tridlm.quant import concat

        for layer in self.encoder.layers:
            a, m = layer.self_attn, layer.mlp
            groups = ((a, "qkv", (a.q_proj, a.k_proj, a.v_proj)), (m, "gate_up", (m.gate_proj, m.up_proj)))
            for owner, name, projs in groups:
                kinds = {type(pr.packed) for pr in projs}
                if len(kinds) == 1 and None not in (pr.packed for pr in projs) and all(pr.bias is None for pr in projs):
                    setattr(owner, name, concat([pr.packed for pr in projs]))

    def add_lora(self, rank: int, alpha: float, targets: tuple[str, ...] = ("o_proj",)) -> None:
        """Attach LoRA adapters to every projection whose name is in ``targets``. They are float32 whatever
        the model's dtype: trained in full precision, and on a CPU their tiny matmuls run about 3x faster in
        float32 than in bfloat16 (a draft forward with bfloat16 adapters spent two thirds as long in them as
        in the model's own int4 matmuls)."""
        for name, module in self.named_modules():
            if isinstance(module, Linear) and name.rsplit(".", 1)[-1] in targets:
                module.add_lora(rank, alpha, torch.float32, self.device)


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> TriModel:
    """A model with seeded random weights (tests and timing)."""
    gen = torch.Generator().manual_seed(seed)
    model = TriModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()
