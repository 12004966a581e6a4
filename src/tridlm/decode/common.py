"""What every decoder shares: the request config, prefill, per-row stopping and counting, forwards."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tridlm import masks
from tridlm.cache import KVCache
from tridlm.device import default_block_size
from tridlm.model import TriModel
from tridlm.sampling import Sampler
from tridlm.tokenizer import stop_index

MODES = ("ar", "diffusion", "spec", "auto")
SPEC_VARIANTS = ("linear", "quadratic", "pipelined")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding knobs of one request (SPEC 3.5). ``validate`` rejects anything out of range."""

    mode: str = "ar"  # ar | diffusion | spec | auto (the exact plan predicted fastest, per cycle: decode.pipelined)
    block_size: int | None = None  # default: per device and mode (tridlm.device), at most the model's training block
    threshold: float | None = 0.9  # diffusion: commit confidence; none = one token per step
    spec_variant: str = "linear"  # spec: linear (draft + verify forwards), quadratic (one forward of n(n+1) tokens)
    # or pipelined (one forward per cycle: AR step + candidates' verify + MASK rows drafting the next ones)
    lookup: bool | None = None  # pipelined spec and auto: prompt-lookup candidates (default on); others: none
    max_steps_per_block: int | None = None  # diffusion: denoising steps per block at most (default: block size)
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # seeds the sampling generator
    max_tokens: int = 256  # generated tokens at most (exactly, even when a block commits more)
    stop: tuple[str, ...] = ()  # stop string (repeatable)

    def validate(self) -> GenerationConfig:
        def bad(name, why):
            raise ValueError(f"invalid {name}={getattr(self, name)!r}: {why}")
        if self.mode not in MODES:
            bad("mode", f"expected one of {', '.join(MODES)}")
        if self.spec_variant not in SPEC_VARIANTS:
            bad("spec_variant", f"expected one of {', '.join(SPEC_VARIANTS)}")
        if self.lookup and not self.pipelined:
            bad("lookup", "prompt lookup drafts for mode auto and spec variant pipelined only")
        if self.block_size is not None and not 1 <= self.block_size <= 256:
            bad("block_size", "expected an integer in [1, 256]")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            bad("threshold", "expected a probability in [0, 1]")
        if self.max_steps_per_block is not None and self.max_steps_per_block < 1:
            bad("max_steps_per_block", "expected a positive integer")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "expected a value in [0, 100]")
        if self.top_k is not None and self.top_k < 1:
            bad("top_k", "expected a positive integer")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            bad("top_p", "expected a value in (0, 1]")
        if self.max_tokens < 1:
            bad("max_tokens", "expected a positive integer")
        if any(not s for s in self.stop):
            bad("stop", "stop strings must be non-empty")
        return self

    def resolve(self, model) -> GenerationConfig:
        """This config with every default filled in for ``model`` (its device and training block size):
        the one place API, CLI, server and bench get defaults from."""
        resolved = self
        if self.lookup is None and self.pipelined:
            resolved = resolved.replace(lookup=True)
        if self.block_size is None:
            block = default_block_size(model.device, self.mode, self.spec_variant, model.cfg.block_size)
            resolved = resolved.replace(block_size=block)
        return resolved

    @property
    def pipelined(self) -> bool:
        """Decoded by ``decode.pipelined``: ``auto``, or spec's pipelined variant."""
        return self.mode == "auto" or (self.mode == "spec" and self.spec_variant == "pipelined")

    @property
    def forward_tokens(self) -> int:
        """The most tokens one row puts through one forward after the prefill (a resolved config): B(B+1) for
        quadratic spec, the block for the other block modes, 1 for AR."""
        if self.mode == "spec" and self.spec_variant == "quadratic":
            return self.block_size * (self.block_size + 1)
        return self.block_size

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_k, self.top_p)

    def replace(self, **changes) -> GenerationConfig:
        return dataclasses.replace(self, **changes).validate()


@dataclass
class Row:
    """One prompt of a batch: its limits and its output."""

    max_tokens: int
    stop: tuple[str, ...] = ()
    prompt: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" | "cancelled"
    nfe: int = 0  # forwards after prefill while this row was unfinished
    accepted_lengths: list[int] = field(default_factory=list)  # spec: tokens emitted per cycle
    first_token_s: float | None = None
    last_token_s: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class DecodeState:
    """Per-row committed tokens with exact stopping (EOS, stop strings, max_tokens) and counts."""

    def __init__(self, n_rows: int, cfg: GenerationConfig, eos_ids: Sequence[int],
                 detokenize: Callable[[list[int]], str] | None,
                 limits: Sequence[tuple[int, tuple[str, ...]]] | None = None, trace: bool = False):
        """``limits`` gives (max_tokens, stop) per row; default: the config's for every row. ``trace``:
        the decoders record what each step did per row (``note``; read with ``take_trace``)."""
        limits = limits or [(cfg.max_tokens, cfg.stop)] * n_rows
        if len(limits) != n_rows:
            raise ValueError(f"{len(limits)} row limits for {n_rows} rows")
        if any(stop for _, stop in limits) and detokenize is None:
            raise ValueError("stop strings need a tokenizer")
        self.cfg = cfg
        self.rows = [Row(max_tokens, tuple(stop)) for max_tokens, stop in limits]
        self.eos_ids = frozenset(eos_ids)
        self.detokenize = detokenize
        self.forwards = 0
        self.start = time.perf_counter()
        self.prefill_s = 0.0
        self._fresh: list[list[int]] = [[] for _ in range(n_rows)]
        self.trace = trace
        self._events: list[list[dict]] = [[] for _ in range(n_rows)]

    @property
    def all_done(self) -> bool:
        return all(r.done for r in self.rows)

    def active(self, device) -> torch.Tensor:
        return torch.tensor([not r.done for r in self.rows], device=device)

    def count_forward(self) -> None:
        self.forwards += 1
        for r in self.rows:
            r.nfe += not r.done

    def emit(self, i: int, tokens: Sequence[int]) -> None:
        """Commit tokens to row i, stopping exactly at EOS, a stop string or max_tokens."""
        row = self.rows[i]
        now = time.perf_counter() - self.start
        for t in tokens:
            if row.done:
                return
            row.tokens.append(int(t))
            self._fresh[i].append(int(t))
            row.first_token_s = row.first_token_s if row.first_token_s is not None else now
            row.last_token_s = now
            if int(t) in self.eos_ids or self._stopped(row):
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.max_tokens:
                row.finish_reason = "length"

    def _stopped(self, row: Row) -> bool:
        if not row.stop:
            return False
        # Enough trailing tokens to contain any stop string (a token decodes to >= 1 char, bar split UTF-8).
        window = max(len(s) for s in row.stop) + 8
        tail = self.detokenize(row.tokens[-window:])
        return any(s in tail for s in row.stop)

    def cancel(self, i: int) -> None:
        """Stop row i now (its client went away); the batch goes on without it."""
        if not self.rows[i].done:
            self.rows[i].finish_reason = "cancelled"

    def note(self, i: int, event: dict) -> None:
        """Record a step's event for row i while it is unfinished (callers check ``trace`` first, so an
        untraced decode builds no events). Event types, all with ``forward`` (the forward count after the
        step): ``step`` (ar: ``token``), ``denoise`` (diffusion: ``block`` ids with None at masked slots,
        ``guess`` the prediction and ``conf`` its probability at every slot, ``new`` the slots committed
        by this step), ``commit`` (diffusion: the causal pass that caches a finished block; ``token`` is the
        next block's first), ``verify`` (spec: ``drafts``, ``accepted`` of them, ``bonus`` token; pipelined
        spec and auto: ``source`` of the drafts, lookup or draft, when there were any)."""
        if not self.rows[i].done:
            self._events[i].append({**event, "forward": self.forwards})

    def take_trace(self) -> list[tuple[int, list[dict]]]:
        """Events recorded since the last call, as (row, events) pairs."""
        out = [(i, e) for i, e in enumerate(self._events) if e]
        self._events = [[] for _ in self.rows]
        return out

    def flush(self) -> list[tuple[int, list[int]]]:
        """Tokens committed since the last flush, as (row, tokens) pairs."""
        out = [(i, f) for i, f in enumerate(self._fresh) if f]
        self._fresh = [[] for _ in self.rows]
        return out

    def text(self, i: int) -> str:
        """Row i's text without special tokens, cut before the first stop string."""
        text = self.detokenize(self.rows[i].tokens)
        return text[: stop_index(text, self.rows[i].stop)]

    def stats(self) -> dict:
        """Counts of the whole call (``summarize``), plus the mode and the batch's forward calls."""
        wall = max((r.last_token_s for r in self.rows if r.last_token_s is not None), default=0.0)
        return {"mode": self.cfg.mode, "rows": len(self.rows), "forwards": self.forwards,
                "prefill_s": self.prefill_s, **summarize(self.rows, wall)}


def summarize(rows: Sequence[Row], wall_s: float | None = None) -> dict:
    """The counts of SPEC 2 over finished rows, computed here only (API, CLI, bench, HTTP usage, metrics).

    NFE counts, per row, the forwards after the prefill while that row was unfinished, summed over rows
    (for one row: the forward calls; the prefill is not counted, nor is a final commit pass, which
    tridlm does not run). TPF = completion tokens / NFE, None when no forward ran (a reply that ended
    with the token sampled from the prefill). TTFT and ITL are medians over rows; tok/s needs the wall
    time of the rows' call (generated tokens only).
    """
    tokens = sum(len(r.tokens) for r in rows)
    nfe = sum(r.nfe for r in rows)
    firsts = [r.first_token_s for r in rows if r.first_token_s is not None]
    itl = [(r.last_token_s - r.first_token_s) / (len(r.tokens) - 1) for r in rows
           if len(r.tokens) > 1 and r.first_token_s is not None]
    accepted = [a for r in rows for a in r.accepted_lengths]
    return {
        "completion_tokens": tokens,
        "nfe": nfe,
        "tpf": tokens / nfe if nfe else None,
        "ttft_s": statistics.median(firsts) if firsts else None,
        "itl_s": statistics.median(itl) if itl else None,
        "wall_s": wall_s,
        "tok_s": tokens / wall_s if wall_s else None,
        "accepted_mean": statistics.mean(accepted) if accepted else None,
        "accepted_hist": dict(sorted(Counter(accepted).items())),
    }


def forward_block(model: TriModel, cache: KVCache, tokens: torch.Tensor, mask_fn, *, write: bool | int = False,
                  adapter: bool | torch.Tensor = False, logits_index: torch.Tensor | None = None,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The decoders' one way to run the model: tokens (B, n) placed right after each row's committed
    cache (at ``offsets`` from it, default 0..n-1), keys [committed cache | tokens] under ``mask_fn``.

    write: commit the keys/values of all tokens (True) or of that many leading ones (their queries must
    be causal); the room check before and the commit after the forward happen here only.
    """
    n = tokens.shape[1]
    offsets = torch.arange(n, device=tokens.device) if offsets is None else offsets
    positions = cache.lengths[:, None] + offsets  # (B, n)
    prefix = cache.attended
    mask, key_slots = mask_fn(cache.lengths, n, prefix), None
    if prefix and (len(tokens) > 1 or cache.static):
        mask, key_slots = masks.after_own_cache(mask, cache.lengths)
    written = n if write is True else int(write)
    if written:
        cache.check_room(positions[:, :written])
    logits = model(tokens, positions, mask, cache, write=written, adapter=adapter, logits_index=logits_index,
                   key_slots=key_slots)
    if written:
        cache.commit(positions[:, written - 1] + 1)
    return logits


def unmasking_distribution(sampler: Sampler, logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """What a bidirectional prediction samples from (diffusion denoising, spec drafting): the sampler's
    distribution with the MASK token excluded, so a masked position is never filled with MASK."""
    return sampler.distribution(logits.index_fill(-1, torch.tensor([mask_id], device=logits.device),
                                                  float("-inf")))


def masked_block(pending: torch.Tensor, n: int, mask_id: int | None) -> torch.Tensor:
    """The block [pending, MASK x (n-1)] per row, (B, n), that diffusion and spec drafting start from;
    ``pending`` (B,) is the last sampled token, not yet in the cache."""
    block = pending[:, None].repeat(1, n)
    if n > 1:
        if mask_id is None:
            raise ValueError("block sizes above 1 need a model with a mask token (config mask_id)")
        block[:, 1:] = mask_id
    return block


def prefill(model: TriModel, prompts: Sequence[Sequence[int]], max_len: int) -> tuple[KVCache, torch.Tensor]:
    """One causal forward of the (right-padded) prompts; returns the cache and last logits (B, V)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: at least one token is needed")
    lengths = torch.tensor([len(p) for p in prompts], device=model.device)
    width = int(lengths.max())
    if width >= max_len:
        raise ValueError(f"prompt of {width} tokens leaves no room in a context of {max_len}")
    # Padding slots hold arbitrary tokens: no real query attends to them, and crop discards their KV.
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=model.device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    cache = model.new_cache(len(prompts), max_len)
    logits = forward_block(model, cache, tokens, masks.causal, write=True, logits_index=(lengths - 1)[:, None])
    cache.crop(lengths)
    return cache, logits[:, 0]
