"""KV cache: preallocated buffers written by position, with an explicit committed length per row.

Invariant (SPEC 1.3): the committed part only ever holds causal keys/values of committed tokens.
Slots past a row's committed length are scratch: a causal pass may write them (speculative verify)
and ``crop`` rolls the length back; bidirectional passes only read.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        static: bool = False,
    ):
        """static: attention reads all max_len slots (masked past each row's length) instead of the
        longest committed prefix, so every decoding step has the same shapes (CUDA graphs)."""
        self.static = static
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # committed length per row
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows start..stop of this one, sharing its buffers; its committed lengths are a copy
        (``lengths[start:stop] = view.lengths`` takes them back)."""
        view = KVCache.__new__(KVCache)
        view.static, view.max_len = self.static, self.max_len
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths = self.lengths[start:stop].clone()
        return view

    def prefix(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first ``length`` slots of one layer, (B, KV, length, D) each."""
        return self.k[layer, :, :, :length], self.v[layer, :, :, :length]

    @property
    def attended(self) -> int:
        """How many leading slots a forward attends to (all of them when static)."""
        return self.max_len if self.static else int(self.lengths.max())

    def check_room(self, positions: torch.Tensor) -> None:
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"KV cache overflow: position {int(positions.max())} >= max_len {self.max_len}")

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, KV, n, D) at absolute positions (B, n) of each row (``check_room`` first), in
        the cache's dtype (under autocast a forward may produce them in another)."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # with positions: (B, n)
        # indexing, not scatter_: scatter_ costs time in proportion to the whole buffer, this the tokens written
        self.k[layer][rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)  # (B, n, KV, D)
        self.v[layer][rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)

    def commit(self, lengths: torch.Tensor) -> None:
        """Declare the first ``lengths[b]`` slots of row b committed (done by a cache-writing forward)."""
        if bool((lengths < self.lengths).any()):
            raise ValueError("commit cannot shrink the cache; use crop")
        self.lengths = lengths.clone()

    def crop(self, lengths: torch.Tensor) -> None:
        """Roll committed lengths back (rejected speculation); the dropped slots become scratch."""
        if bool((lengths > self.lengths).any()):
            raise ValueError("crop cannot grow the cache; use commit")
        self.lengths = lengths.clone()
