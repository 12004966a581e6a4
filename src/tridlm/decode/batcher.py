"""Continuous batching: iteration-level scheduling over one pool of KV cache slots, AR rows and ``auto`` rows.

A row joins the running batch whenever its caller admits it (its prompt prefilled alone into a free slot, its
first token sampled) and leaves as soon as it finishes or is cancelled; every ``step`` is one causal forward of
all running rows' pending tokens. A prompt longer than ``prefill_chunk`` tokens is prefilled a chunk per step,
before that step's forward, so that the running rows wait for one chunk at a time rather than the whole prompt;
its rows join once it is in. The running rows stay packed in slots 0..n-1, so a step runs over a view of the pool
and no row pays for an empty slot; a leaving row's slot takes the last row's cache (its committed length only).
Rows of different lengths share a forward the way a ragged batch does (``masks.after_own_cache``): with int8/int4
weights a row's tokens are bit for bit those it gets decoded alone, chunked prefill or not.

Each row belongs to a ``DecodeState`` (one per request, a row per choice), which keeps its tokens, stopping and
counts as in ``stream``; a row samples with its own request's sampler and generator.

**Speculation inside the batch.** An ``auto`` row (``Lookahead``) offers candidates for its next tokens from its own
text (prompt lookup) or its tenant's earlier answers (``AnswerHistory``), as ``decode.pipelined`` does for one
request; each step verifies the candidates the plan takes in the same causal forward as every row's pending token,
rows of different widths padded to the widest and the padding left out of every kernel (``TriModel.forward``'s
``padding``), so a row with no candidates costs one token. The plan (``plan_rows``) takes the candidates, likeliest
first, while the batch's expected tokens per unit of step cost grow: the step's cost by its total tokens comes from
the cost curve's measured batch steps (``CostCurve.step``), each candidate's chance from its row's running
acceptance, which starts from its tenant's or the batch's (counts per source and match length, no tokens). Tokens
stay exactly AR's (greedy), and a sampled row accepts each candidate with probability p(x) (a one-hot proposal), so
its samples follow AR's distribution. No MASK rows: drafting with the adapter costs a forward's width per row, which
a batch spends better on rows' own tokens (docs/serving.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tridlm import masks
from tridlm.cache import KVCache
from tridlm.decode.batch_plan import ROOM, ChainedAcceptance, Lookahead, plan_rows
from tridlm.decode.costs import CostCurve
from tridlm.decode.forward import forward_block
from tridlm.decode.lookup import AnswerHistory, NGramIndex
from tridlm.decode.pipelined import FORCED
from tridlm.decode.spec import accept
from tridlm.decode.state import DecodeState
from tridlm.model import TriModel
from tridlm.sampling import argmax


@dataclass
class Slot:
    state: DecodeState
    row: int  # the state's row decoded in this slot
    pending: int  # the last sampled token, not yet cached
    generator: torch.Generator | None
    ahead: Lookahead | None = None  # an auto row's speculation


@dataclass
class Filling:
    """A row whose prompt is going into the cache, a chunk at a time."""

    state: DecodeState
    row: int
    generator: torch.Generator | None
    prompt: list[int]
    index: int  # its slot in the pool, past the running rows' (slots 0..n-1)
    ahead: Lookahead | None = None
    done: int = 0  # prompt tokens in the cache so far


def _grammatical(s: Slot, source: str, candidates: list[int]) -> tuple[str, list[int]]:
    """Under the row's grammar, its candidates up to the first the grammar refuses, or the tokens the grammar forces
    where they are more (certain: ``Acceptance.certain``)."""
    if s.state.constraints is None:
        return source, candidates
    candidates = s.state.candidates(s.row, candidates)
    forced = s.state.forced(s.row, s.ahead.room)
    return (FORCED, forced) if len(forced) > len(candidates) else (source if candidates else "", candidates)


class Batcher:
    def __init__(
        self,
        model: TriModel,
        max_rows: int,
        slot_tokens: int,
        prefill_chunk: int = 256,
        costs: CostCurve | None = None,
    ):
        """``max_rows``: rows running at once; ``slot_tokens``: cache per row (prompt + answer at most);
        ``prefill_chunk``: prompt tokens prefilled per step for a prompt that is longer; ``costs``: what auto rows
        plan with (``CostCurve.step``; without one they verify every candidate they have). The pool grows with the
        rows that run, up to ``max_rows`` x ``slot_tokens`` (and room for a step's candidates), or all at once with
        ``reserve``."""
        self.model, self.max_rows, self.slot_tokens = model, max_rows, slot_tokens
        self.prefill_chunk, self.costs = prefill_chunk, costs
        self.acceptance = ChainedAcceptance(ROOM)  # what auto rows start from unless given another (``admit``)
        self.cache: KVCache | None = None
        self.slots: list[Slot] = []
        self.filling: list[Filling] = []  # one request's long prompts, a chunk per step (``admit``)

    def reserve(self) -> None:
        """Allocate the whole pool now (a server: its memory known from the start, no growth while serving)."""
        self._grow(self.max_rows)

    @property
    def free(self) -> int:
        return self.max_rows - len(self.slots) - len(self.filling)

    def can_admit(self, prompts: list[list[int]]) -> bool:
        """Whether ``admit`` takes these prompts (one request's) now: slots for all, and no other request's long
        prompt being prefilled where one of these is long."""
        long = any(len(p) > self.prefill_chunk for p in prompts)
        return self.free >= len(prompts) and not (long and self.filling)

    @property
    def busy(self) -> bool:
        """Whether a ``step`` has work: running rows, or a prompt being prefilled."""
        return bool(self.slots or self.filling)

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a row of this prompt and answer length fits a slot (the last pending token is never cached)."""
        return prompt_tokens + max_tokens <= self.slot_tokens

    @torch.inference_mode()
    def admit(
        self,
        state: DecodeState,
        row: int,
        prompt: list[int],
        generator: torch.Generator | None,
        history: AnswerHistory | None = None,
        learned: ChainedAcceptance | None = None,
    ) -> None:
        """Take the state's row: a prompt of up to ``prefill_chunk`` tokens is prefilled now into a free slot and
        its first token committed, so that the row runs from the next ``step`` (unless that token finished it); a
        longer one is prefilled a chunk per ``step`` and joins when it is in. While a request's long prompts are
        being prefilled no other request's can start (``filling``). A row of an ``auto`` state with lookup on
        speculates (``Lookahead``), from ``history`` too where given; its acceptance starts from ``learned`` (what
        earlier rows of its kind were accepted: a server keeps one per tenant) and adds to it, else to the batch's."""
        if not prompt:
            raise ValueError("empty prompt: at least one token is needed")
        if not self.free:
            raise ValueError(f"no free slot: {self.max_rows} rows are running")
        if not self.fits(len(prompt), state.rows[row].max_tokens):
            raise ValueError(f"prompt + max_tokens exceed a slot of {self.slot_tokens} tokens")
        if self.filling and self.filling[0].state is not state and len(prompt) > self.prefill_chunk:
            raise ValueError("another request's prompt is being prefilled")
        taken = {f.index for f in self.filling}
        i = next(i for i in range(len(self.slots), self.max_rows) if i not in taken)  # past the running rows
        self._grow(i + 1)
        self.cache.lengths[i] = 0
        state.rows[row].prompt = list(prompt)
        cfg, ahead = state.cfg, None
        if cfg.mode == "auto" and cfg.lookup:
            room = min(ROOM, cfg.block_size - 1)
            learned = self.acceptance if learned is None else learned
            ahead = Lookahead(NGramIndex(prompt), history, ChainedAcceptance(ROOM, learned), learned, room)
            ahead.acceptance.certain(FORCED)
        fill = Filling(state, row, generator, list(prompt), i, ahead)
        if len(prompt) > self.prefill_chunk:
            self.filling.append(fill)
        else:
            self._advance(fill)

    def _fill(self) -> None:
        """The next chunk of the first prompt being filled; a prompt that is in, or whose request was cancelled,
        leaves the list."""
        fill = self.filling[0]
        if fill.state.rows[fill.row].done or self._advance(fill):
            self.filling.pop(0)

    def _advance(self, fill: Filling) -> bool:
        """Prefill the next chunk of ``fill``'s prompt; once all of it is in, commit its first token and let the row
        run (moved right after the running rows) unless that token finished it. Returns whether it is in."""
        end = min(fill.done + self.prefill_chunk, len(fill.prompt))
        view = self.cache.rows(fill.index, fill.index + 1)
        tokens = torch.tensor([fill.prompt[fill.done : end]], device=self.model.device)
        index = torch.tensor([[end - fill.done - 1]], device=self.model.device)
        logits = forward_block(self.model, view, tokens, masks.causal, write=True, logits_index=index)[:, 0]
        self.cache.lengths[fill.index] = view.lengths[0]
        fill.done = end
        if end < len(fill.prompt):
            return False
        self._move(fill.index, len(self.slots))
        state = fill.state
        state.prefill_s = time.perf_counter() - state.start  # its last row's, for a request of several
        logits = state.masked_row(fill.row, logits)  # under a grammar, only what it allows
        token = int(state.cfg.sampler.next_token(logits, fill.generator)[0])
        state.emit(fill.row, [token], logits)
        if not state.rows[fill.row].done:
            self.slots.append(Slot(state, fill.row, token, fill.generator, fill.ahead))
        return True

    def _move(self, source: int, target: int) -> None:
        """Swap two slots of the pool past the running rows (their caches up to the longer committed length), so
        that the row about to run sits at ``target``; a prompt being filled at ``target`` goes on at ``source``."""
        if source == target:
            return
        length = int(self.cache.lengths[[source, target]].max())
        for buffer in (self.cache.k, self.cache.v):
            buffer[:, [source, target], :, :length] = buffer[:, [target, source], :, :length]
        self.cache.lengths[[source, target]] = self.cache.lengths[[target, source]]
        for f in self.filling:
            if f.index == target:
                f.index = source

    @torch.inference_mode()
    def step(self) -> None:
        """One causal forward of every running row's pending token and the candidates the plan verifies: commits
        each row's next token (and its accepted candidates); the rows that finished (or were cancelled,
        ``DecodeState.cancel``) leave their slots. A prompt being prefilled gets its next chunk first."""
        self._leave()
        if self.filling:
            self._fill()
        n = len(self.slots)
        if not n:
            return
        sources, chosen = self._candidates()
        width = 1 + max(map(len, chosen))
        rows = [[s.pending, *c] + [s.pending] * (width - 1 - len(c)) for s, c in zip(self.slots, chosen)]
        tokens = torch.tensor(rows, device=self.model.device)
        padding = None
        if width > 1:
            padding = torch.tensor([[j > len(c) for j in range(width)] for c in chosen], device=tokens.device)
        view = self.cache.rows(0, n)
        start = view.lengths.clone()
        logits = forward_block(self.model, view, tokens, masks.causal, write=True, padding=padding)  # (n, width, V)
        for state in {id(s.state): s.state for s in self.slots}.values():
            state.count_forward()
        greedy = argmax(logits[:, 0]).tolist()
        for i, s in enumerate(self.slots):
            sampler, constrained = s.state.cfg.sampler, s.state.constraints is not None
            # Under a grammar, the row's logits masked along its candidates; an unconstrained row pays nothing.
            mine = s.state.masked_row(s.row, logits[i, : 1 + len(chosen[i])], chosen[i]) if constrained else logits[i]
            if chosen[i]:
                accepted = self._verify(s, tokens[i : i + 1, : 1 + len(chosen[i])], mine[None], sources[i])
            elif sampler.greedy:
                s.pending, accepted = int(argmax(mine[0])) if constrained else greedy[i], []
            else:
                s.pending, accepted = int(sampler.next_token(mine[:1], s.generator)[0]), []
            self.cache.lengths[i] = start[i] + 1 + len(accepted)
            if s.ahead is not None:
                s.state.rows[s.row].accepted_lengths.append(1 + len(accepted))
            s.state.emit(s.row, [*accepted, s.pending], mine[: 1 + len(accepted)])
        self._leave()

    def _candidates(self) -> tuple[list[str], list[list[int]]]:
        """Each running row's source and the candidates the plan verifies this step (none for AR rows)."""
        offers = [("", [])] * len(self.slots)
        for i, s in enumerate(self.slots):
            if s.ahead is not None:
                row = s.state.rows[s.row]
                offers[i] = s.ahead.offer(row.prompt, row.tokens, row.max_tokens - len(row.tokens) - 1)
                offers[i] = _grammatical(s, *offers[i])
        if not any(c for _, c in offers):
            return [""] * len(offers), [[] for _ in offers]
        chances = [
            [alive for _, alive in s.ahead.acceptance.expected(source, len(c))[1:]] if c else []
            for s, (source, c) in zip(self.slots, offers)
        ]
        rows = len(self.slots)
        counts = plan_rows(chances, lambda t: self.costs.step(t, rows)) if self.costs else [len(c) for _, c in offers]
        return [source for source, _ in offers], [c[:m] for (_, c), m in zip(offers, counts)]

    def _verify(self, s: Slot, block: torch.Tensor, logits: torch.Tensor, source: str) -> list[int]:
        """Accept a prefix of a row's candidates (``block``: [pending, candidates], (1, 1 + m)) by its verify logits
        (1, >= 1 + m, V); sets its next pending token and returns the accepted candidates."""
        m, sampler = block.shape[1] - 1, s.state.cfg.sampler
        p = sampler.verifier(logits[:, : 1 + m])
        q = None if sampler.greedy else torch.nn.functional.one_hot(block, p.shape[-1]).float()
        k, bonus = accept(block, p, q, sampler, s.generator)
        k = int(k[0])
        s.ahead.acceptance.update(source, m, k)
        s.ahead.learned.update(source, m, k)
        s.pending = int(bonus[0])
        return block[0, 1 : 1 + k].tolist()

    def _leave(self) -> None:
        """Free the slots of finished rows, moving the last running row into each."""
        i = 0
        while i < len(self.slots):
            if not self.slots[i].state.rows[self.slots[i].row].done:
                i += 1
                continue
            last = len(self.slots) - 1
            if i != last:
                length = int(self.cache.lengths[last])
                for buffer in (self.cache.k, self.cache.v):
                    buffer[:, i, :, :length] = buffer[:, last, :, :length]
                self.cache.lengths[i] = length
                self.slots[i] = self.slots[last]
            self.slots.pop()

    def _grow(self, rows: int) -> None:
        """A pool of at least ``rows`` slots (doubling, up to ``max_rows``), the running rows' caches kept."""
        if self.cache is not None and self.cache.batch >= rows:
            return
        size = min(self.max_rows, max(rows, 2 * (self.cache.batch if self.cache else 1)))
        pool = self.model.new_cache(size, self.slot_tokens + ROOM)  # room for a step's candidates past a row's end
        if self.cache is not None:
            old = self.cache.batch
            pool.k[:, :old], pool.v[:, :old] = self.cache.k, self.cache.v
            pool.lengths[:old] = self.cache.lengths
        self.cache = pool
