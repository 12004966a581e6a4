"""The int4 decode path: all decoder layers of a forward in one ``kernels.decode_layers`` call, the same values as
the modules' forwards bit for bit, for the forwards that decoding runs most (AR steps, spec verification and drafting:
row-exact attention in place over a CPU cache).

It applies to a model whose projections are fused int4 weights without biases (``projection.quantize``, or a GGUF
file's Q4_1 codes) and no per-head q/k norm, at positions where Llama-4 query scaling (NLD's) is exactly 1 (below
``original_max_position_embeddings``: the kernel does not scale queries); ``why_not`` says what keeps it off, and
``NativeLayers`` says it once per model that has int4 weights yet a layout it does not take. Its weights are the
model's own packed tensors, gathered again whenever a projection's packed weights are replaced.
"""

from __future__ import annotations

import warnings

import torch

from tridlm import kernels
from tridlm.quant import Int4Weight

_NO_SLOTS = torch.empty(0, dtype=torch.long)  # kernels.decode_layers: current tokens at slots P + i
_ALL_ROWS = torch.empty(0, dtype=torch.bool)  # kernels.decode_layers: the adapter on every token
_ALL_TOKENS = torch.empty(0, dtype=torch.long)  # kernels.decode_layers: no padding


def _packed(layer) -> list[tuple[dict, str]]:
    """Where a layer's four projections keep their (fused) packed weights: (the owner's ``__dict__``, name)."""
    a, m = layer.self_attn, layer.mlp
    owners = (a.__dict__, a.o_proj.__dict__, m.__dict__, m.down_proj.__dict__)
    return list(zip(owners, ("qkv", "packed", "gate_up", "packed")))


def why_not(model) -> str | None:
    """Why the path never applies to ``model`` as it is, or None where it applies (to the forwards it takes)."""
    cfg = model.cfg
    if cfg.qk_norm:
        return "per-head q/k norms (qk_norm) are not in the kernel"
    if cfg.dim % 16:
        return f"hidden size {cfg.dim} is not a multiple of 16"
    for i, layer in enumerate(model.encoder.layers):
        if not all(isinstance(owner.get(name), Int4Weight) for owner, name in _packed(layer)):
            return f"layer {i} has projections that are not fused int4 weights"
        a, m = layer.self_attn, layer.mlp
        if any(pr.bias is not None for pr in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.down_proj)):
            return f"layer {i} has projection biases"
        if any(n.weight.dtype != model.dtype for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return f"layer {i} has norms in another dtype than the activations"
    return None


class NativeLayers:
    """A model's native decode path: ``__call__`` runs the layers of a forward it applies to, else returns None.
    ``enabled`` switches it off (tests compare both paths)."""

    def __init__(self):
        self.enabled = True
        self._sources: list[tuple[dict, str, object]] | None = None  # what the weights were gathered from
        self._weights: list[torch.Tensor] | None = None  # None: the path does not apply to the model as it is
        self._told = False

    def __call__(self, model, x: torch.Tensor, p) -> torch.Tensor | None:
        """The decoder layers of one forward (``x`` (B, n, dim), ``p`` the forward's ``model.Pass``) in one kernel
        call, or None where the path does not apply: then the modules run them."""
        if not (self.enabled and p.plan.in_place and p.plan.row_exact):
            return None
        if p.q_scale is not None and not bool((p.q_scale == 1).all()):  # Llama-4 query scaling past its first span
            return None
        weights = self._current(model)
        if weights is None:
            return None
        adapters, rows = [], _ALL_ROWS
        if p.adapter is not False:
            forms = [g.form for g in model.adapters.groups]
            if any(form is None for form in forms):  # a projection without an adapter: the modules' path
                return None
            adapters = [t for form in forms for t in form]
            rows = rows if p.adapter is True else p.adapter.reshape(-1).contiguous()
        slots = _NO_SLOTS if p.slots is None else p.slots.contiguous()
        tokens = _ALL_TOKENS if p.padding is None else (~p.padding).reshape(-1).nonzero()[:, 0]  # the real ones only
        c = model.cfg
        args = (p.cos, p.sin, p.mask[:, 0].contiguous(), slots, tokens, p.prefix, c.n_heads, c.norm_eps)
        return kernels.decode_layers(x, weights, adapters, rows, p.cache.k, p.cache.v, *args, c.head_dim**-0.5)

    def _current(self, model) -> list[torch.Tensor] | None:
        """Per layer the ten tensors ``kernels.decode_layers`` takes, gathered again when a packed weight changed."""
        sources = self._sources
        if sources is not None and all(owner.get(name) is w for owner, name, w in sources):
            return self._weights
        layers = model.encoder.layers
        self._sources = [(owner, name, owner.get(name)) for layer in layers for owner, name in _packed(layer)]
        reason = why_not(model)
        self._weights = None if reason is not None else self._gather(layers)
        if reason is not None and not self._told and any(isinstance(w, Int4Weight) for *_, w in self._sources):
            warnings.warn(f"int4 weights decode module by module (slower): {reason}", stacklevel=4)
            self._told = True
        return self._weights

    @staticmethod
    def _gather(layers) -> list[torch.Tensor]:
        weights = []
        for layer in layers:
            qkv, o, gate_up, down = ((owner[name].codes, owner[name].scales) for owner, name in _packed(layer))
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            weights += [norms[0], *qkv, *o, norms[1], *gate_up, *down]
        return weights
