"""CUDA graphs for the per-cycle forwards: a drop-in stand-in for the model in every decoder.

Decoding repeats a few forward shapes (an AR step, a draft block, a verify block, a quadratic block),
and on a GPU an eager forward of a small model is bound by kernel launches. ``GraphedModel`` captures
``TriModel.forward`` once per shape and replays it. Shapes stay fixed because it hands out static
caches (attention over all slots, masked) from a pool it reuses across requests; tokens, positions,
mask and adapter selection are copied into the graph's input buffers. The model's forward is pure (the
decoders' ``forward_block`` checks room and commits around it), so the wrapper only captures and replays.
A shape runs eagerly the first time
(warm-up); it is captured the second time it is seen, so one-off shapes such as prompt prefills
never are. Without CUDA the same path runs with eager calls, which is what the CPU tests check.
"""

from __future__ import annotations

import torch

from tridlm.cache import KVCache
from tridlm.model import TriModel


class _Graph:
    def __init__(self, model: TriModel, args: dict, capture: bool, pool):
        self.inputs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        self.model, self.graph = model, None
        if capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                model(**self.inputs)  # warm-up on a side stream, as CUDA graph capture requires
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.output = model(**self.inputs)

    def __call__(self, args: dict) -> torch.Tensor:
        for k, v in args.items():
            if isinstance(v, torch.Tensor):
                self.inputs[k].copy_(v)
        if self.graph is None:
            return self.model(**self.inputs)
        self.graph.replay()
        return self.output.clone()


class GraphedModel:
    """Wraps a model: same call signature, ``cfg``, ``device``, ``dtype`` and ``new_cache``."""

    def __init__(self, model: TriModel, capacity: int | None = None):
        self.model, self.cfg = model, model.cfg
        self.capacity = capacity or model.cfg.max_seq_len
        self.capture = torch.device(model.device).type == "cuda"
        self._caches: dict[int, KVCache] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: set[tuple] = set()
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    def new_cache(self, batch: int, max_len: int, static: bool = True) -> KVCache:
        """The pooled static cache for this batch size, emptied (graphs stay bound to its buffers)."""
        if max_len > self.capacity:
            raise ValueError(f"a cache of {max_len} slots exceeds the graph capacity of {self.capacity}")
        if batch not in self._caches:
            self._caches[batch] = self.model.new_cache(batch, self.capacity, static=True)
        cache = self._caches[batch]
        cache.crop(torch.zeros_like(cache.lengths))
        return cache

    def __call__(
        self,
        tokens,
        positions,
        mask,
        cache=None,
        write=0,
        adapter=False,
        logits_index=None,
        key_slots=None,
        padding=None,
    ):
        """``TriModel.forward``: replayed from a graph for static caches, eager otherwise (and for padded steps, whose
        real tokens change from step to step)."""
        args = {
            "tokens": tokens,
            "positions": positions,
            "mask": mask,
            "cache": cache,
            "write": write,
            "adapter": adapter,
            "logits_index": logits_index,
            "key_slots": key_slots,
            "padding": padding,
        }
        if cache is None or not cache.static or padding is not None:
            return self.model(**args)
        key = (
            tuple(tokens.shape),
            tuple(mask.shape),
            id(cache),
            write,
            "tensor" if isinstance(adapter, torch.Tensor) else adapter,
            None if logits_index is None else tuple(logits_index.shape),
            key_slots is None,
        )
        if key not in self._graphs and key in self._seen:
            self._graphs[key] = _Graph(self.model, args, self.capture, self._pool)
        if key in self._graphs:
            return self._graphs[key](args)
        self._seen.add(key)
        return self.model(**args)
