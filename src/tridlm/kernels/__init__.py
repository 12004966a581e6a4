"""Small compiled CPU kernels (``cpu.cpp``), built into the package when it is installed (``setup.py``: a module per
instruction-set variant the compiler can build, ``tridlm.kernels._cpu_<variant>``), so that no forward waits for a
compiler. Where the installed module is missing or stale (the sources or torch changed since, as in an editable
checkout being worked on) the kernels are built on first use with torch's extension builder (g++ and ninja) and cached
(under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), in a folder per kind of CPU, Python
environment and content of the sources, so that two environments never rebuild each other's.

Instruction-set variants (``VARIANTS``): ``avx512`` (AVX-512 with VNNI integer dot products), ``avxvnni`` (the
256-bit VNNI dot products of CPUs without AVX-512), ``avx2`` and ``portable`` (the compiler's baseline); the best
this CPU runs is loaded, or the one ``TRIDLM_CPU_ISA`` names (for tests and benches). The integer dot products of
each family are a header of their own (``dots_<family>.h``), the one a build includes chosen by the compiler's flags.

A build on first use holds an OS file lock (``fcntl.flock``, released with its process however that ends) and clears
torch's own lock file before it starts: a build killed midway once left that file behind and every later process
waited on it forever.

On a CPU a decode step of a small model spends as long in the dispatch of many tiny tensor ops as in its
matmuls; each kernel here does in one call what takes torch several: attention for query blocks (row by row in
a fixed order, so spec's verify rows equal AR steps bit for bit), RMSNorm, RoPE, SiLU, and int4 matmuls with
integer dot products (several rows for little more than one). Each function returns None
where it does not apply (not a CPU tensor, not in inference mode, a shape it is not compiled for, or no compiler), and
the caller then runs the same computation in torch ops.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

HEAD_SIZES = (64, 128, 256)  # what ``attend`` is compiled for


# name: (the CPU flags it needs, as /proc/cpuinfo names them; its compiler flags), best first. x86-64 only; other
# machines get the portable build. On a CPU that runs it, avx512 takes everything that CPU has (``compiler_flags``:
# -march=native measured faster than x86-64-v4 + VNNI, 5.5-6.0 against 6.1-8.9 ms per AR step in alternating runs).
VARIANTS = {
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, ["-march=x86-64-v4", "-mavx512vnni"]),
    "avxvnni": ({"avx2", "fma", "f16c", "bmi2", "avx_vnni"}, ["-march=x86-64-v3", "-mavxvnni"]),
    "avx2": ({"avx2", "fma", "f16c", "bmi2"}, ["-march=x86-64-v3"]),
    "portable": (set(), []),
}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpu_tag() -> str:
    """A short digest of this CPU's model and flags: a cache shared between machines keeps one build per kind of
    CPU."""
    info = "\n".join(sorted({ln for ln in _cpuinfo() if ln.startswith(("model name", "flags"))}))
    return hashlib.sha1(info.encode()).hexdigest()[:8]


def runnable() -> list[str]:
    """The variants this CPU can run, best first."""
    flags = {f for ln in _cpuinfo() if ln.startswith("flags") for f in ln.split(":", 1)[1].split()}
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["portable"]
    return [name for name, (needs, _) in VARIANTS.items() if needs <= flags]


def isa() -> str:
    """The variant to load: ``TRIDLM_CPU_ISA`` where set (it must be one this CPU runs), else the best."""
    can = runnable()
    forced = os.environ.get("TRIDLM_CPU_ISA")
    if forced is None:
        return can[0]
    if forced not in VARIANTS:
        raise ValueError(f"TRIDLM_CPU_ISA={forced!r}: expected one of {', '.join(VARIANTS)}")
    if forced not in can:
        raise ValueError(f"TRIDLM_CPU_ISA={forced!r}: this CPU runs {', '.join(can)}")
    return forced


SOURCE = Path(__file__).with_name("cpu.cpp")


def compiler_flags(variant: str) -> list[str]:
    """The flags a build of ``variant`` compiles with: tuned for this CPU (``-mtune=native``; ``-march=native`` for
    avx512 where this CPU runs it)."""
    if variant == "avx512" and variant in runnable():
        return ["-O3", "-march=native", "-fopenmp"]
    return ["-O3", *VARIANTS[variant][1], *(["-mtune=native"] if VARIANTS[variant][1] else []), "-fopenmp"]


def source_digest() -> str:
    """What a built module must have been built from: the kernels' sources and this torch's version."""
    sources = [SOURCE, *sorted(SOURCE.parent.glob("*.h"))]
    return hashlib.sha1(torch.__version__.encode() + b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]


def installed(variant: str):
    """The module of ``variant`` built into the package at install time (``setup.py``), or None where there is none
    or it was built from other sources or for another torch."""
    try:
        module = importlib.import_module(f"{__name__}._cpu_{variant}")
    except ImportError:
        return None
    return module if getattr(module, "digest", None) == source_digest() else None


def module_name(variant: str) -> str:
    return f"tridlm_cpu_{variant}_{_cpu_tag()}"


def build_directory(name: str, source: Path = SOURCE) -> Path:
    """Where this environment builds ``name`` from ``source`` and the headers beside it: a folder per environment and
    content of the sources (torch's builder tracks the listed source only, so an edited header is a new folder)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    sources = [source, *sorted(source.parent.glob("*.h"))]
    digest = hashlib.sha1(f"{sys.prefix}\n{source.resolve()}\n".encode() + b"".join(p.read_bytes() for p in sources))
    return root / f"{name}-{digest.hexdigest()[:8]}"


def _load(name: str, source: Path, **flags):
    """``cpp_extension.load`` under an OS lock, with torch's lock file from a killed build cleared."""
    from torch.utils import cpp_extension

    folder = build_directory(name, source)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tridlm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # no other process of ours builds here until this one ends
        (folder / "lock").unlink(missing_ok=True)  # torch's baton: only a dead build can have left it
        return cpp_extension.load(name, [str(source)], build_directory=str(folder), **flags)


def build(variant: str):
    """``variant`` built now into the extension cache (or loaded from it), or None with one line saying why not."""
    start = time.perf_counter()
    try:
        module = _load(module_name(variant), SOURCE, extra_cflags=compiler_flags(variant), extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:  # no compiler, no ninja ...
        print(
            f"tridlm: the CPU kernels could not be built ({type(e).__name__}: {e}); using torch ops instead (slower)",
            file=sys.stderr,
        )
        return None
    took = time.perf_counter() - start
    if took > 2:  # a build rather than a load from the cache
        print(f"tridlm: built the CPU kernels ({variant}) in {took:.0f} s (cached for later runs)", file=sys.stderr)
    return module


@functools.cache
def _module():
    """The kernels of the variant to run: the installed module, else one built (or cached) now."""
    variant = isa()
    return installed(variant) or build(variant)


def _usable(*tensors: torch.Tensor):
    """The compiled module where these tensors can go to it, else None. Decoding runs in inference mode, and
    only there do the kernels stand in: training, including the parts of it run without gradients, keeps
    torch's ops, so that values computed with and without autograd agree to the last bit."""
    if not torch.is_inference_mode_enabled() or not all(t.is_cpu for t in tensors):
        return None
    return _module()


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(D) over allowed keys) v (zeros for a row that may attend to no key), or None
    where the kernel does not apply (see the module's docstring; also a head size it is not compiled for).

    q (B, n, H, D); k, v (B, KV, P, D) with contiguous rows, all of one dtype; mask (B, n, P) bool -> (B, n, H * D)
    in ``dtype``: q's (None) or float32.
    """
    B, n, H, D = q.shape
    module = _usable(q, k, v)
    if module is None or D not in HEAD_SIZES or dtype not in (None, q.dtype, torch.float32):
        return None
    return module.attend(q, k, v, mask.contiguous(), D**-0.5, dtype == torch.float32).view(B, n, H * D)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dimension, the normalized x rounded to x's dtype
    before the weight multiplies it (``tridlm.model.RMSNorm``)."""
    module = _usable(x)
    if module is None or x.shape[-1] % 16 or weight.dtype != x.dtype:
        return None
    return module.rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up (the MLP's activation) in one call, computed in float32 and rounded once."""
    module = _usable(gate, up)
    if module is None or gate.shape[-1] % 16 or gate.stride(-1) != 1 or up.stride(-1) != 1 or gate.dim() < 2:
        return None
    return module.silu_mul(gate, up)


def rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """``tridlm.rope.apply``: x (B, n, heads, D), cos and signed sin (B, n, 1, D); the result in ``dtype`` (default:
    x's), rounded once."""
    module = _usable(x)
    if module is None or x.shape[-1] % 32 or x.stride(-1) != 1 or cos.dtype != x.dtype:
        return None
    return module.rope(x, cos, sin, dtype)


class Adapter(NamedTuple):
    """A low-rank adapter in the kernels' form: y[i] += b (a x[i]) on the chosen rows (in float32). a (r, K); bt
    (N / 16, r, 16), b by tiles of 16 outputs (both float32 or both bfloat16); spans (N / 16, 2) int32, for
    each tile the rank range outside which its part of b is zero (a block-diagonal group of adapters); rows
    (M,) bool, or None for all."""

    a: torch.Tensor
    bt: torch.Tensor
    spans: torch.Tensor
    rows: torch.Tensor | None

    def args(self) -> tuple:
        return self.a, self.bt, self.spans, _ALL_ROWS if self.rows is None else self.rows.contiguous()

    def torch_add(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The same with torch ops (rounded twice: the delta, then the sum)."""
        b = self.bt.transpose(0, 1).reshape(self.a.shape[0], -1).float()  # (r, N padded)
        delta = (x.float() @ self.a.float().T) @ b[:, : y.shape[-1]]
        if self.rows is not None:
            delta = delta * self.rows[:, None]
        return y + delta.to(y.dtype)


_ALL_ROWS = torch.empty(0, dtype=torch.bool)  # the kernels' "rows": none given, all chosen
NO_ADAPTER = (torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.int32), _ALL_ROWS)


def int4_linear(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, adapter: Adapter | None = None
) -> torch.Tensor | None:
    """x (M, K) times int4 weights in ``tridlm.quant.Int4Weight``'s layout (N outputs padded to 16), plus
    ``adapter``'s contribution where given, each row rounded once -> (M, N), or None where the kernels were
    not built. Unlike the other kernels it runs in and out of inference mode, so that an int4 model computes
    the same values either way; it has no gradient (int4 weights are for decoding)."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("int4 weights are for decoding only: no gradient flows through them")
    module = _module() if x.is_cpu else None
    if module is None:
        return None
    return module.int4_linear(x.contiguous(), codes, scales, *(NO_ADAPTER if adapter is None else adapter.args()))


def lora_add(y: torch.Tensor, x: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """y (M, N) plus ``adapter``'s contribution for x (M, K): in place by the kernel where it applies (computed
    in float32, rounded once), else with torch ops."""
    module = _usable(y, x)
    if module is None or x.shape[-1] % 16 or y.shape[-1] % 16 or not y.is_contiguous():
        return adapter.torch_add(y, x)
    return module.lora_add(y, x.contiguous(), *adapter.args())


def decode_layers(
    x: torch.Tensor, weights: list, adapters: list, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args
) -> torch.Tensor | None:
    """A forward's decoder layers in one call (int4 weights, attention in place over the cache): see
    ``decode_layers`` in cpu.cpp and ``tridlm.model.TriModel``, which gives the arguments; None where the kernels do
    not apply (not in inference mode, not built, a head size they are not compiled for)."""
    module = _usable(x, k)
    if module is None or k.shape[-1] not in HEAD_SIZES:
        return None
    return module.decode_layers(x, weights, adapters, rows, k, v, *args)


def repack_q4_1(blocks: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """GGUF Q4_1 blocks (n, k / 32 * 20) bytes -> ``tridlm.quant.Int4Weight``'s codes and scales, in one native pass
    (the same bytes as its constructor gives); None where the kernels were not built."""
    module = _module()
    return None if module is None else tuple(module.repack_q4_1(blocks.contiguous(), n, k))


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x (M, K) times int8 weights in ``tridlm.quant.Int8Weight``'s layout -> (M, N padded to 16), or None
    where the kernels were not built; in and out of inference mode, no gradient (as ``int4_linear``)."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("int8 weights are for decoding only: no gradient flows through them")
    module = _module() if x.is_cpu else None
    return None if module is None else module.int8_linear(x.contiguous(), codes, scales)
