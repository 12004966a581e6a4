"""Per-row decoding state: committed tokens with exact stopping (EOS, stop strings, max_tokens), the counts of
SPEC 2 as they accrue, and the trace events of each step."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tridlm.decode.metrics import summarize
from tridlm.sampling import argmax
from tridlm.tokenizer import stop_index


@dataclass
class Row:
    """One prompt of a batch: its limits and its output."""

    max_tokens: int
    stop: tuple[str, ...] = ()
    prompt: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" | "cancelled" | "time_limit"
    nfe: int = 0  # forwards after prefill while this row was unfinished
    accepted_lengths: list[int] = field(default_factory=list)  # spec: tokens emitted per cycle
    # With the config's ``logprobs`` set: per token (log-probability, [(id, log-probability) of the most likely])
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    first_token_s: float | None = None
    last_token_s: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class DecodeState:
    """Per-row committed tokens with exact stopping (EOS, stop strings, max_tokens) and counts."""

    def __init__(
        self,
        n_rows: int,
        cfg,
        eos_ids: Sequence[int],
        detokenize: Callable[[list[int]], str] | None,
        limits: Sequence[tuple[int, tuple[str, ...]]] | None = None,
        trace: bool = False,
    ):
        """``cfg``: the request's ``GenerationConfig``, which the decoders read from here (not imported: the config
        reads the table of modes, which sits above the decoders). ``limits`` gives (max_tokens, stop) per row;
        default: the config's for every row. ``trace``: the decoders record what each
        step did per row (``note``; read with ``take_trace``)."""
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
        # Under a grammar (the config's), each row's matcher, following its committed tokens (``emit``)
        self.constraints = [cfg.grammar.start() for _ in range(n_rows)] if cfg.grammar is not None else None

    @property
    def all_done(self) -> bool:
        return all(r.done for r in self.rows)

    def active(self, device) -> torch.Tensor:
        return torch.tensor([not r.done for r in self.rows], device=device)

    def count_forward(self) -> None:
        self.forwards += 1
        for r in self.rows:
            r.nfe += not r.done

    def emit(self, i: int, tokens: Sequence[int], logits: torch.Tensor | None = None) -> None:
        """Commit tokens to row i, stopping exactly at EOS, a stop string or max_tokens. ``logits``: (len(tokens), V),
        the logits each token was chosen by; with the config's ``logprobs`` set, the committed tokens' log-probabilities
        under them are recorded (``Row.logprobs``)."""
        row = self.rows[i]
        now = time.perf_counter() - self.start
        before = len(row.tokens)
        for t in tokens:
            if row.done:
                break
            row.tokens.append(int(t))
            self._fresh[i].append(int(t))
            row.first_token_s = row.first_token_s if row.first_token_s is not None else now
            row.last_token_s = now
            if int(t) in self.eos_ids or self._stopped(row):
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.max_tokens:
                row.finish_reason = "length"
        if self.constraints is not None:
            self.constraints[i].commit(row.tokens[before:])
        if self.cfg.logprobs is not None and len(row.tokens) > before:
            self._record(row, row.tokens[before:], logits)

    # Under a grammar, what each unfinished row may choose (``tridlm.grammar``); without one, these change nothing.

    def _constrained(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if not r.done] if self.constraints is not None else []

    def masked_row(self, i: int, logits: torch.Tensor, drafts: Sequence[int] = ()) -> torch.Tensor:
        """Row i's logits (n, V) of the token after its committed ones and after each of ``drafts`` (n - 1 of them,
        none committed), -inf where its grammar refuses the token there: what constrained AR would choose from.
        Unchanged without a grammar or once the row is done. A greedy choice without log-probabilities to record
        reads only the argmax, so there a position whose best token the grammar allows is left as it is, and one whose
        next best the grammar allows keeps only that token (``Constraint.along``): the same argmax, fewer masks."""
        if self.constraints is None or self.rows[i].done:
            return logits
        ranked = _Greedy(logits) if self.cfg.sampler.greedy and self.cfg.logprobs is None else None
        out = logits
        for j, entry in enumerate(self.constraints[i].along([int(t) for t in drafts][: len(logits) - 1], ranked)):
            if entry is None or (isinstance(entry, int) and entry == ranked.best[j]):  # the argmax itself: as it is
                continue
            out = logits.clone() if out is logits else out
            if isinstance(entry, int):
                out[j].fill_(-math.inf)
                out[j, entry] = logits[j, entry]
            else:
                out[j].masked_fill_(~torch.from_numpy(entry).to(logits.device), -math.inf)
        return out

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) for each row's next token, masked (``masked_row``)."""
        return self._each_row(logits, lambda i: self.masked_row(i, logits[i : i + 1])[0])

    def masked_along(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """Verify logits (B, n, V) of [pending, drafts (B, n-1)], each row masked (``masked_row``)."""
        return self._each_row(logits, lambda i: self.masked_row(i, logits[i], drafts[i].tolist()))

    def _each_row(self, logits: torch.Tensor, mask_row) -> torch.Tensor:
        """``logits`` with each constrained row i as ``mask_row(i)`` gives it, copied only where a row changed."""
        out = logits
        for i in self._constrained():
            row = mask_row(i)
            if row.data_ptr() != logits[i].data_ptr():  # masked (a new tensor), not the row itself
                out = logits.clone() if out is logits else out
                out[i] = row
        return out

    def restrict_drafts(self, drafts: torch.Tensor, q: torch.Tensor, sampler, generator) -> None:
        """In place: each constrained row's drafts (B, n) drawn again from their distributions ``q`` (B, n, V)
        restricted to what the grammar allows after the drafts before (``q`` becomes what they were drawn from), so
        that no draft falls outside the grammar and the grammar's forced tokens are drafted."""
        for i in self._constrained():
            drafts[i], q[i], _ = self.constraints[i].pick(q[i], lambda p: sampler.pick(p, generator))

    def restrict_block(self, masked, logits, probs, pred, sampler, generator) -> None:
        """Diffusion under a grammar (nothing without one), in place: each constrained row's predictions (``pred``)
        from its first masked slot on (all later ones are masked: it commits in order, ``in_order``) drawn one after
        another from their distributions restricted to what the grammar allows after the ones before (``probs``
        becomes those distributions, so a token the grammar forces has confidence 1; ``logits`` are masked likewise)."""
        for i in self._constrained():
            if masked[i].any():
                p = int(masked[i].long().argmax())
                pred[i, p:], probs[i, p:], allowed = self.constraints[i].pick(
                    probs[i, p:], lambda q: sampler.pick(q, generator)
                )
                logits[i, p:] = logits[i, p:].masked_fill(~allowed, -math.inf)

    def in_order(self, chosen: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Diffusion under a grammar: each constrained row's chosen slots (B, n) cut to a run from its first masked
        slot, which is always taken (a grammar checks tokens in order); unchanged without one."""
        rows = self._constrained()
        if not rows:
            return chosen
        first = masked & (masked.cumsum(-1) == 1)
        run = (chosen | first | ~masked).cumprod(-1).bool() & masked
        out = chosen.clone()
        out[rows] = run[rows]
        return out

    def candidates(self, i: int, tokens: list[int]) -> list[int]:
        """Row i's candidate tokens up to the first its grammar refuses (all of them without a grammar)."""
        return tokens[: self.constraints[i].valid(tokens)] if self.constraints is not None else tokens

    def forced(self, i: int, most: int) -> list[int]:
        """The tokens row i's grammar forces next, at most ``most`` (none without a grammar)."""
        return self.constraints[i].forced(most) if self.constraints is not None and not self.rows[i].done else []

    def _record(self, row: Row, tokens: list[int], logits: torch.Tensor | None) -> None:
        if logits is None:
            raise ValueError(f"{self.cfg.row.label} does not give log-probabilities")
        logp = logits[: len(tokens)].float().log_softmax(-1)
        chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
        top = logp.topk(self.cfg.logprobs, dim=-1) if self.cfg.logprobs else None
        for j, lp in enumerate(chosen):
            alternatives = list(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else []
            row.logprobs.append((lp, alternatives))

    def _stopped(self, row: Row) -> bool:
        if not row.stop:
            return False
        # Enough trailing tokens to contain any stop string (a token decodes to >= 1 char, bar split UTF-8).
        window = max(len(s) for s in row.stop) + 8
        tail = self.detokenize(row.tokens[-window:])
        return any(s in tail for s in row.stop)

    def cancel(self, i: int, reason: str = "cancelled") -> None:
        """Stop row i now (its client went away: "cancelled"; a server's time limit: "time_limit"); the batch goes
        on without it."""
        if not self.rows[i].done:
            self.rows[i].finish_reason = reason

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
        return {
            "mode": self.cfg.mode,
            "rows": len(self.rows),
            "forwards": self.forwards,
            "prefill_s": self.prefill_s,
            **summarize(self.rows, wall),
        }


RANKED = 8  # the most candidates a greedy choice tries before a mask is computed (``DecodeState.masked_row``)


class _Greedy:
    """A greedy choice's candidates at each position of ``logits`` (n, V), best first (``Constraint.along``'s
    ``ranked``): the argmax; then, where the grammar refuses it, the next best tokens as far as each is strictly above
    the next (the first of them the grammar allows is the argmax of the masked logits; at a tie the lower index would
    be, so the candidates stop there)."""

    def __init__(self, logits: torch.Tensor):
        self.logits, self.best = logits, argmax(logits).tolist()

    def __getitem__(self, j: int) -> Iterator[int]:
        yield self.best[j]
        top = self.logits[j].topk(min(RANKED, self.logits.shape[-1]))
        values, indices = top.values.tolist(), top.indices.tolist()
        for r in range(len(values) - 1):
            if values[r] == values[r + 1]:
                return
            if indices[r] != self.best[j]:
                yield indices[r]
