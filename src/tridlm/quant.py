"""Low-bit weights for CPU decoding: int8 (per output channel) and int4 (groups of 32, a scale and a minimum
each), run by our kernels (``tridlm.kernels``): the activations quantized to int8 per group of 32 as llama.cpp
does, integer dot products (AVX-512 VNNI where the CPU has it), so that a forward of several tokens costs little
more than one.

The int4 layout is GGUF's Q4_1 (32 weights, a scale ``d`` and a minimum ``m``: w = d * q + m, q in 0..15),
so Q4_1 tensors load with their own 4-bit codes and no second quantization (``d`` and ``m`` kept as the file's
float16 values). Any other weight is quantized here from its float values (round to nearest).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tridlm import kernels

WEIGHT_PRECISIONS = ("int8", "int4")
GROUP = 32  # int4 group size: GGUF's Q4_1 block
LANES = 16  # output channels per tile of the int4 kernel's layout
# What a model with low-bit weights computes in, as llama.cpp does: activations, norms and the residual stream in
# float32, keys and values (the cache, the queries that read it) in float16; the weights' rounding is then the only
# one that matters (docs/measurements.md, "Activations of low-bit models": bfloat16 activations were a third less
# faithful to the float32 model than llama.cpp on the same file).
ACTIVATIONS = torch.float32
KEYS_VALUES = torch.float16
TORCH_KERNELS = torch.bfloat16  # where our kernels cannot be built: torch's int4/int8 kernels are fast in it only


class Int8Weight:
    """w ~= q * scale per output channel, q int8 in [-127, 127].

    Applied by ``tridlm.kernels.int8_linear`` (activations quantized to int8 per group of 32, integer dot
    products) where the input size is a multiple of 32, else, or where the kernels cannot be built, by
    torch's int8 kernel (bfloat16 activations)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        """q (N, K) int8, scale (N,) float."""
        n, k = q.shape
        self.shape = (n, k)
        self.scale = scale.float()
        self.codes = None
        if k % GROUP == 0:  # tiles of 16 channels x blocks of 32 inputs; part c, lane l: inputs 4c .. 4c + 3
            pad = -n % LANES
            tiles = (n + pad) // LANES
            self.codes = torch.empty(tiles, k // GROUP, 512, dtype=torch.uint8)
            step = max(1, 2**20 // (LANES * k))  # tiles at a time: no whole-matrix temporaries
            for t in range(0, tiles, step):
                biased = q[t * LANES : (t + step) * LANES].view(torch.uint8) ^ 0x80  # q + 128
                biased = F.pad(biased, (0, 0, 0, -biased.shape[0] % LANES), value=128)
                parts = biased.view(-1, LANES, k // GROUP, 8, 4).permute(0, 2, 3, 1, 4)
                self.codes[t : t + step] = parts.reshape(-1, k // GROUP, 512)
            self.scales = F.pad(self.scale, (0, pad)).view(tiles, LANES).contiguous()
        else:
            self.q = q.contiguous()

    @classmethod
    def from_float(cls, w) -> Int8Weight:
        """From a float (N, K) tensor, quantized a slice of rows at a time."""
        q, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0])
        step = max(1, 2**20 // w.shape[1])  # rows at a time: no float32 copy of a whole embedding table
        for i in range(0, w.shape[0], step):
            rows = w[i : i + step].float()
            scale[i : i + step] = (rows.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            q[i : i + step] = torch.round(rows / scale[i : i + step, None]).clamp(-127, 127)
        return cls(q, scale)

    def unpack(self) -> torch.Tensor:
        """q (N, K) int8, as given to the constructor."""
        if self.codes is None:
            return self.q
        n, k = self.shape
        tiles = self.codes.shape[0]
        q = self.codes.view(tiles, k // GROUP, 8, LANES, 4).permute(0, 3, 1, 2, 4).reshape(tiles * LANES, k)
        return (q.to(torch.int16) - 128).to(torch.int8)[:n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = None if self.codes is None else kernels.int8_linear(rows, self.codes, self.scales)
        if y is None:
            if not hasattr(self, "q"):
                self.q = self.unpack().contiguous()
            y = torch.ops.aten._weight_int8pack_mm(rows.to(TORCH_KERNELS), self.q, self.scale.to(TORCH_KERNELS))
            y = y.to(rows.dtype)
        return y[:, : self.shape[0]].reshape(*x.shape[:-1], -1)

    def dequantize(self) -> torch.Tensor:
        return self.unpack().float() * self.scale[:, None]


class Int4Weight:
    """w ~= q * d + m per group of 32 along the input, q in 0..15 (GGUF Q4_1).

    Applied by ``tridlm.kernels.int4_linear``: the activations are quantized to int8 per group of 32 (as
    llama.cpp does) and multiplied with the codes by integer dot products, so that several rows cost little
    more than one and a row's result depends on that row alone. Where the kernels cannot be built, torch's
    packed int4 kernel runs instead (bfloat16 activations, slower; other roundings)."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
        """q (N, K) integer codes 0..15, d and m (N, K / 32) float scales and minimums."""
        n, k = q.shape
        if k % GROUP:
            raise ValueError(f"int4 weights need an input size divisible by {GROUP}, not {k}")
        self.shape = (n, k)
        pad = -n % LANES  # whole tiles of 16 output channels; padded channels have zero codes and scales
        q, d, m = (F.pad(t, (0, 0, 0, pad)) for t in (q.to(torch.uint8), d.float(), m.float()))
        tiles, blocks = (n + pad) // LANES, k // GROUP
        # tile t, block b, chunk c, lane l, byte j: inputs 8c + j (low nibble) and 8c + 4 + j (high nibble)
        nibbles = q.view(tiles, LANES, blocks, 4, 2, 4).permute(0, 2, 3, 1, 4, 5)
        self.codes = (nibbles[..., 0, :] | nibbles[..., 1, :] << 4).reshape(tiles, blocks, 256).contiguous()
        self.scales = torch.stack([t.view(tiles, LANES, blocks).transpose(1, 2) for t in (d, m)], 2).half().contiguous()

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Int4Weight:
        """From a float (N, K) tensor, quantized whole tiles of rows at a time (about 2**18 weights: the float32
        temporaries of a whole 8B-shape matrix would be about 1 GB); each row's codes depend on that row alone."""
        n, k = w.shape
        if k % GROUP:
            raise ValueError(f"int4 weights need an input size divisible by {GROUP}, not {k}")
        rows = max(LANES, 2**18 // k // LANES * LANES)
        parts = [cls._from_rows(w[i : i + rows]) for i in range(0, n, rows)]
        return parts[0] if len(parts) == 1 else concat(parts)

    @classmethod
    def _from_rows(cls, w: torch.Tensor) -> Int4Weight:
        n, k = w.shape
        groups = w.float().view(n, k // GROUP, GROUP)
        lo, hi = groups.amin(-1), groups.amax(-1)
        d = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round((groups - lo[..., None]) / d[..., None]).clamp(0, 15)
        return cls(q.view(n, k), d, lo)

    @classmethod
    def from_q4_1(cls, blocks: np.ndarray, n: int, k: int) -> Int4Weight:
        """From GGUF Q4_1 bytes, (n, k / 32, 20) per row: float16 d, float16 m, 16 bytes holding element j
        in the low nibble and element j + 16 in the high nibble of byte j."""
        if k % GROUP:
            raise ValueError(f"int4 weights need an input size divisible by {GROUP}, not {k}")
        packed = kernels.repack_q4_1(torch.from_numpy(np.ascontiguousarray(blocks)), n, k)
        if packed is not None:
            weight = object.__new__(cls)
            weight.shape, (weight.codes, weight.scales) = (n, k), packed
            return weight
        blocks = np.ascontiguousarray(blocks).reshape(n, k // GROUP, 20)
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        nibbles = blocks[..., 4:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, k)
        return cls(torch.from_numpy(q), d, m)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (N, K) uint8, d and m (N, K / 32) float32, as given to the constructor."""
        n, k = self.shape
        tiles, blocks = self.codes.shape[:2]
        c = self.codes.view(tiles, blocks, 4, LANES, 1, 4)
        q = torch.cat([c & 0x0F, c >> 4], dim=4).permute(0, 3, 1, 2, 4, 5).reshape(tiles * LANES, k)
        d, m = (self.scales[:, :, i].transpose(1, 2).reshape(tiles * LANES, blocks).float() for i in (0, 1))
        return q[:n], d[:n], m[:n]

    def q4_1(self) -> torch.Tensor:
        """The weight as GGUF Q4_1 bytes, (N, K / 32 * 20): the codes, scales and minimums it runs, exactly."""
        q, d, m = self.unpack()
        n, k = self.shape
        q = q.view(n, k // GROUP, 2, 16)
        codes = q[:, :, 0] | q[:, :, 1] << 4  # byte j: element j (low nibble), element j + 16 (high nibble)
        dm = torch.stack([d, m], -1).half().view(torch.uint8).view(n, k // GROUP, 4)
        return torch.cat([dm, codes], -1).reshape(n, -1)

    def __call__(self, x: torch.Tensor, adapter: kernels.Adapter | None = None) -> torch.Tensor:
        """x (..., K) -> (..., N), plus a low-rank ``adapter``'s contribution on its rows where given."""
        rows = x.reshape(-1, x.shape[-1])
        y = kernels.int4_linear(rows, self.codes, self.scales, adapter)
        if y is None:
            y = self._torch_int4(rows)
            if adapter is not None:
                y = adapter.torch_add(y, rows)
        return y[:, : self.shape[0]].reshape(*x.shape[:-1], -1)

    def _torch_int4(self, rows: torch.Tensor) -> torch.Tensor:
        """torch's packed int4 kernel on the same codes, packed on first use; torch computes
        (q - 8) * scale + zero, so zero = m + 8 d, laid out (K / 32, N, 2) in ``TORCH_KERNELS``."""
        if not hasattr(self, "_torch_packed"):
            q, d, m = self.unpack()
            self._torch_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            self._torch_scales = torch.stack([d.T, (m + 8 * d).T], dim=-1).to(TORCH_KERNELS).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows.to(TORCH_KERNELS), self._torch_packed, GROUP, self._torch_scales
        ).to(rows.dtype)


class Q8Table:
    """GGUF Q8_0 weights (per block of 32 inputs: 32 int8 values and a float16 scale) held once, in the int8
    kernel's tiles with a scale per channel and block: the rows of an embedding table (``rows``) and, where a model
    ties its output head to the embedding, that head's matmul (``__call__``) on the same bytes, the file's values
    as llama.cpp computes them."""

    def __init__(self, blocks: np.ndarray, n: int, k: int):
        """blocks: (n, k / 32 * 34) bytes, one row of Q8_0 blocks per output (token)."""
        self._allocate(n, k)
        blocks = torch.from_numpy(np.ascontiguousarray(blocks)).view(n, k // GROUP, 34)
        for t in range(0, self.codes.shape[0], self._step):
            self._fill(t, blocks[t * LANES : (t + self._step) * LANES])

    @classmethod
    def from_float(cls, w: torch.Tensor) -> Q8Table:
        """From a float (N, K) tensor, quantized to Q8_0 as llama.cpp does (per block of 32: d = max |w| / 127,
        q = w / d rounded half away from zero, d stored in float16), a slice of rows at a time."""
        table = object.__new__(cls)
        table._allocate(*w.shape)
        for t in range(0, table.codes.shape[0], table._step):
            table._fill(t, q8_0_blocks(w[t * LANES : (t + table._step) * LANES]))
        return table

    def _allocate(self, n: int, k: int) -> None:
        if k % GROUP:
            raise ValueError(f"Q8_0 rows need a size divisible by {GROUP}, not {k}")
        self.shape = (n, k)
        tiles, nb = -(-n // LANES), k // GROUP
        # tile t, block b, part c, lane l, byte j: input 4c + j of channel 16t + l, as the int8 value + 128
        self.codes = torch.empty(tiles, nb, 512, dtype=torch.uint8)
        self.scales = torch.empty(tiles, nb, LANES, dtype=torch.float16)
        self._step = max(1, 2**20 // (LANES * k))  # tiles at a time: no whole-table temporaries

    def _fill(self, t: int, part: torch.Tensor) -> None:
        """Tiles from ``t`` on from Q8_0 blocks (rows, k / 32, 34) uint8."""
        nb = self.shape[1] // GROUP
        part = F.pad(part, (0, 0, 0, 0, 0, -len(part) % LANES))  # padded channels: zero values and scales
        biased = part[..., 2:] ^ 0x80
        self.codes[t : t + len(part) // LANES] = (
            biased.view(-1, LANES, nb, 8, 4).permute(0, 2, 3, 1, 4).reshape(-1, nb, 512)
        )
        scales = part[..., :2].contiguous().view(torch.float16).view(-1, LANES, nb)
        self.scales[t : t + len(part) // LANES] = scales.transpose(1, 2)

    def q8_0(self) -> torch.Tensor:
        """The table as GGUF Q8_0 bytes, (N, K / 32 * 34): what it was made from, byte for byte."""
        n, k = self.shape
        nb = k // GROUP
        values = (self.codes.view(-1, nb, 8, LANES, 4).permute(0, 3, 1, 2, 4) ^ 0x80).reshape(-1, nb, GROUP)
        scales = self.scales.transpose(1, 2).reshape(-1, nb, 1).contiguous().view(torch.uint8)
        return torch.cat([scales, values], -1)[:n].reshape(n, -1)

    def rows(self, index) -> torch.Tensor:
        """Rows ``index`` (a tensor of ids, or a slice) in float32: each int8 value times its block's scale, as
        dequantizing the file's table gives them."""
        if isinstance(index, slice):
            index = torch.arange(self.shape[0])[index]
        n, k = self.shape
        tile, lane = index // LANES, index % LANES
        codes = self.codes.view(-1, k // GROUP, 8, LANES, 4)[tile, :, :, lane]  # (*index, blocks, 8, 4)
        values = (codes ^ 0x80).view(torch.int8).float().view(*index.shape, k // GROUP, GROUP)
        return (values * self.scales[tile, :, lane].float()[..., None]).view(*index.shape, k)

    def dequantize(self) -> torch.Tensor:
        return self.rows(slice(None))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) times the table's transpose -> (..., N) (the kernels; where they cannot be built, torch's
        matmul on the table dequantized to bfloat16 once)."""
        rows = x.reshape(-1, x.shape[-1])
        y = kernels.int8_linear(rows, self.codes, self.scales)
        if y is None:
            if not hasattr(self, "_dense"):
                self._dense = self.dequantize().to(TORCH_KERNELS)
            y = F.linear(rows.to(TORCH_KERNELS), self._dense).to(rows.dtype)
        return y[:, : self.shape[0]].reshape(*x.shape[:-1], -1)


class Q8Embedding(nn.Module):
    """An embedding on a ``Q8Table``: half the memory of a bfloat16 table, its rows the file's values in
    ``dtype``."""

    def __init__(self, table: Q8Table, dtype: torch.dtype):
        super().__init__()
        self.table, self.dtype = table, dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens).to(self.dtype)


def q8_0_blocks(w: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 blocks (rows, K / 32, 34) of a float (rows, K) tensor, as llama.cpp's reference quantizer makes
    them (float32 arithmetic; halves rounded away from zero)."""
    groups = w.float().view(w.shape[0], -1, GROUP)
    d = groups.abs().amax(-1, keepdim=True) / 127
    scaled = groups * torch.where(d == 0, 0.0, 1 / d)
    q = (scaled.sign() * (scaled.abs() + 0.5).floor()).to(torch.int8)
    return torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], -1)


def concat(weights: list) -> Int8Weight | Int4Weight | None:
    """One packed weight computing the given ones' outputs side by side, bit for bit the same values (one
    kernel call for q/k/v or gate/up instead of several); None where the packing does not allow it. Where each
    weight but the last fills whole tiles, the given weights are then views of the fused one's storage, their
    own storage released as it is copied (no second copy of the weights, not even for a moment)."""
    first = weights[0]
    if any(w.shape[0] % LANES for w in weights[:-1]):  # padded tiles inside would shift the outputs after them
        if isinstance(first, Int8Weight):
            return Int8Weight(torch.cat([w.unpack() for w in weights]), torch.cat([w.scale for w in weights]))
        return None
    fused = object.__new__(type(first))
    fused.shape = (sum(w.shape[0] for w in weights), first.shape[1])
    if isinstance(first, Int8Weight):
        names = ("scale", "q") if first.codes is None else ("scale", "codes", "scales")
        fused.codes = None
    else:
        names = ("codes", "scales")
    for name in names:
        parts = [getattr(w, name) for w in weights]
        whole = torch.empty((sum(t.shape[0] for t in parts), *parts[0].shape[1:]), dtype=parts[0].dtype)
        del parts
        start = 0
        for w in weights:
            n = getattr(w, name).shape[0]
            whole[start : start + n] = getattr(w, name)
            setattr(w, name, whole[start : start + n])
            start += n
        setattr(fused, name, whole)
    return fused


def release_free_memory() -> None:
    """Hand memory that packing's temporaries held back to the system: glibc keeps freed blocks for reuse, and
    the next long-lived tensor lands above them (loading a 1.7B GGUF grew the process by 1.8 GB for 1.2 GB of
    weights). Nothing where the C library is not glibc."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_LIBC = next((lib for lib in [ctypes.CDLL(None)] if hasattr(lib, "malloc_trim")), None)
