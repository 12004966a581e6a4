"""The model's projections and what makes them fast: ``Linear`` (float or low-bit weights, an optional
low-rank adapter), adapters grouped into the kernels' form (``LoraGroup``), projections that read the same
input run as one kernel call (``project``, ``fuse_packed``), and ``quantize`` giving a model low-bit weights.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from tridlm import kernels
from tridlm.quant import (
    ACTIVATIONS,
    GROUP,
    WEIGHT_PRECISIONS,
    Int4Weight,
    Int8Weight,
    Q8Embedding,
    Q8Table,
    concat,
    release_free_memory,
)


class Linear(nn.Linear):
    """A linear layer with an optional low-rank adapter, used only when asked, and optionally low-bit
    weights (``tridlm.quant``) in place of the float ones."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__(d_in, d_out, bias=bias)
        self.lora_a: nn.Parameter | None = None
        self.lora_b: nn.Parameter | None = None
        self.lora_scale = 0.0
        self.packed = None  # an Int4Weight / Q8Table / Int8Weight; the float weight is dropped

    def pack(self, weight) -> None:
        """Use low-bit ``weight`` from now on (activations in ``tridlm.quant.ACTIVATIONS``)."""
        self.packed, self.weight = weight, None

    def add_lora(self, rank: int, alpha: float, dtype: torch.dtype, device: torch.device) -> None:
        """Attach a LoRA (B initialised to zero, so the adapter starts as the identity)."""
        self.lora_a = nn.Parameter(
            torch.randn(rank, self.in_features, dtype=dtype, device=device) / math.sqrt(self.in_features)
        )
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
    projection: on a CPU a drafting forward's time would otherwise go largely into these tiny ops. A model's groups
    are kept current by its ``Adapters``; training uses each projection's own adapter so that gradients reach it."""

    def __init__(self, projs: tuple[Linear, ...]):
        self.projs = projs
        self.form: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # a, bt, spans (kernels.Adapter)

    def refresh(self, activations: torch.dtype) -> None:
        """Build the form from the projections' adapters as they are now (None where one has no adapter)."""
        if any(p.lora_a is None for p in self.projs):
            self.form = None
            return
        a = torch.cat([p.lora_a.detach() for p in self.projs]).float()
        b = torch.block_diag(*[p.lora_b.detach().float() * p.lora_scale for p in self.projs])  # (N, r)
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


class Adapters:
    """A model's adapter groups with their kernel forms kept current: built again whenever an adapter tensor was
    attached, replaced or changed in place since (torch counts each tensor's in-place changes, so an optimizer step
    or a load needs no call). ``current`` checks that once per inference forward that uses the adapters: the
    identity and change count of every adapter tensor."""

    def __init__(self, groups: list[LoraGroup]):
        self.groups = groups
        # where each adapter tensor is registered: a projection's parameters, which ``Linear.add_lora`` fills
        self._slots = [(p._parameters, name) for g in groups for p in g.projs for name in ("lora_a", "lora_b")]
        self._seen: list[torch.Tensor | None] | None = None  # the tensors the forms were built from
        self._counted: list[torch.Tensor] = []  # those that count their changes (not made in inference mode)
        self._versions: list[int] = []

    def current(self, activations: torch.dtype) -> list[LoraGroup]:
        """The groups, their forms rebuilt first where an adapter tensor changed."""
        tensors = [params.get(name) for params, name in self._slots]
        seen = self._seen
        if seen is None or not all(map(operator.is_, tensors, seen)) or self._count() != self._versions:
            for group in self.groups:
                group.refresh(activations)
            # tensors made in inference mode keep no count: they change in place only inside it, where nothing trains
            self._seen, self._counted = tensors, [t for t in tensors if t is not None and not t.is_inference()]
            self._versions = self._count()
        return self.groups

    def _count(self) -> list[int]:
        return list(map(_VERSION, self._counted))


_VERSION = operator.attrgetter("_version")


def project(
    x: torch.Tensor, projs: tuple[Linear, ...], fused, group: LoraGroup, adapter: bool | torch.Tensor
) -> list[torch.Tensor]:
    """The outputs of projections that read the same ``x``: with their low-bit weights in one kernel call
    when ``fused`` (``fuse_packed``), their adapters as one group where usable."""
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


def fuse_packed(model) -> None:
    """Run each layer's q/k/v, and its gate/up, low-bit weights as one kernel call each (same values bit for
    bit; adapters still apply per projection). Layers with float weights or biases stay as they are."""
    for layer in model.encoder.layers:
        a, m = layer.self_attn, layer.mlp
        groups = ((a, "qkv", (a.q_proj, a.k_proj, a.v_proj)), (m, "gate_up", (m.gate_proj, m.up_proj)))
        for owner, name, projs in groups:
            kinds = {type(pr.packed) for pr in projs}
            if len(kinds) == 1 and None not in (pr.packed for pr in projs) and all(pr.bias is None for pr in projs):
                setattr(owner, name, concat([pr.packed for pr in projs]))
                release_free_memory()  # the parts' storage, copied: peak memory stays at one group over the model


def quantize(model, precision: str) -> None:
    """Give every projection and the output head of a float ``model`` ``precision`` weights (in place), packed
    from their own values, except those already packed, and its embedding a Q8_0 table (shared with the head where
    the model ties them); what stays float (norms, biases, adapters) then computes in ``ACTIVATIONS``."""
    if precision not in WEIGHT_PRECISIONS:
        raise ValueError(f"invalid weight precision {precision!r}: expected one of {', '.join(WEIGHT_PRECISIONS)}")
    embedding = model.encoder.embed_tokens
    if isinstance(embedding, nn.Embedding) and embedding.weight.shape[1] % GROUP == 0:
        model.encoder.embed_tokens = packed_embedding(embedding.weight)
    share_table(model)
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.packed is None:
            module.pack(packed(name, module.weight, precision))
    fuse_packed(model)
    model.to(ACTIVATIONS)


def packed(name: str, weight: torch.Tensor, precision: str) -> Int4Weight | Q8Table | Int8Weight:
    """The weight of the projection ``name`` (a module name) in ``precision``: GGUF's Q4_1 for int4, Q8_0 for
    int8 and for the output head in both (int8 per output channel where the input size is not a multiple of 32)."""
    if precision == "int4" and name != "diffusion_head":
        return Int4Weight.from_float(weight)
    return Q8Table.from_float(weight) if weight.shape[1] % GROUP == 0 else Int8Weight.from_float(weight)


def packed_embedding(weight: torch.Tensor) -> Q8Embedding:
    """A float embedding table as Q8_0 rows (half a bfloat16 table's bytes), looked up in ``ACTIVATIONS``."""
    return Q8Embedding(Q8Table.from_float(weight), ACTIVATIONS)


def share_table(model) -> None:
    """Where the model ties its head to a Q8_0 embedding table, the head computes on that table's bytes."""
    if model.cfg.tie_embeddings and isinstance(model.encoder.embed_tokens, Q8Embedding):
        model.diffusion_head.pack(model.encoder.embed_tokens.table)


def packed_bytes(name: str, shape: tuple[int, int], precision: str) -> int:
    """About how many bytes ``packed`` makes of a (N, K) weight: int4 codes and float16 scale and minimum per 32
    weights (0.625 bytes a weight), Q8_0 a byte a weight and a float16 scale per 32."""
    n, k = shape
    if precision == "int4" and name not in ("diffusion_head", "encoder.embed_tokens"):
        return n * k * 5 // 8
    return n * k * 17 // 16 if k % GROUP == 0 else n * k + 4 * n
