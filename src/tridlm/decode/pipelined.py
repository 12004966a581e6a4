"""Pipelined self-speculation: one forward per cycle, never fewer tokens than forwards, and ``auto``.

Each forward carries, per row:

    [pending, c_1 .. c_m | MASK x r]
     causal rows, no adapter: the pending token's row is an AR step (its next token is exact), the
     candidates' rows verify them as in linear spec;  MASK rows (adapter on) see every verify row and
     each other: they draft the block after a full accept (a quadratic-spec sub-block, pruned to the
     likeliest acceptance count).

Candidates come from prompt lookup (``lookup``: the tokens that followed the latest earlier occurrence of
the last 1-5 tokens), from earlier answers (``history``, an ``AnswerHistory``, where the text's tail matches
one of them for longer than it matches itself) or from the previous forward's MASK rows (kept only when
those rows also guessed the bonus token they could not see). ``m = r = 0`` is an AR step. The output is
AR's token for token (greedy), and exactly AR's distribution when sampling (a candidate x drawn from q is
accepted with probability min(1, p(x)/q(x)); lookup and history candidates have a one-hot q).

How many candidates to verify and MASK rows to add is the ``Planner``'s choice per cycle: fixed by the
block size (``spec_variant="pipelined"``), or (``mode="auto"``) the plan with the most expected tokens
per unit of cost, from the cost curve measured on this model (``costs.CostCurve``) and the running acceptance of
this request's candidates, which lookup and history candidates left unverified teach for free (``Unverified``): a
plan is a function of the curve and the request's tokens, never of the clock, so traces and forward counts repeat.
Where no plan could beat an AR step even if every candidate were accepted, ``auto`` runs AR steps and nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tridlm import masks
from tridlm.cache import KVCache
from tridlm.decode.ar import ar_step
from tridlm.decode.costs import CostCurve
from tridlm.decode.forward import forward_block, unmasking_distribution
from tridlm.decode.lookup import AnswerHistory, NGramIndex
from tridlm.decode.spec import settle
from tridlm.decode.state import DecodeState
from tridlm.model import TriModel

FORCED = "grammar"  # the source of the tokens a grammar forces


@dataclass(frozen=True)
class Plan:
    """One cycle: verify ``verify`` candidates of ``source``, append ``drafts`` MASK rows. Sources:
    ``draft`` (the last forward's MASK rows), ``lookup<n>`` and ``history<n>`` (the continuation of an n-token
    match in the request's own text, in earlier answers)."""

    verify: int = 0
    drafts: int = 0
    source: str = "draft"


class Acceptance:
    """Running acceptance of one request's candidates per source and depth: hits[j] / tries[j] estimates
    P(candidate j+1 accepted | candidates 1..j accepted), from counts with a prior of 1 in 2."""

    def __init__(self, depth: int, prior: Acceptance | tuple[float, float] = (1.0, 2.0)):
        """``prior``: (hits, tries) every count starts from, or another ``Acceptance`` whose counts this one starts
        from (scaled down to at most ``PRIOR_TRIES`` tries each: they weigh like a few of this one's own)."""
        self.depth, self.prior = depth, prior
        self.hits: dict[str, list[float]] = {}
        self.tries: dict[str, list[float]] = {}
        self.carried = [1.0, 2.0]  # full accepts with MASK rows whose drafts were kept, of all such

    PRIOR_TRIES = 8.0

    def _counts(self, source: str) -> tuple[list[float], list[float]]:
        if source not in self.hits:
            if isinstance(self.prior, Acceptance):
                hits, tries = self.prior._counts(source)
                weight = [min(1.0, self.PRIOR_TRIES / t) if t else 1.0 for t in tries]
                self.hits[source] = [h * w for h, w in zip(hits, weight)]
                self.tries[source] = [t * w for t, w in zip(tries, weight)]
            else:
                self.hits[source], self.tries[source] = [self.prior[0]] * self.depth, [self.prior[1]] * self.depth
        return self.hits[source], self.tries[source]

    def certain(self, source: str) -> None:
        """A source whose candidates are always accepted (the grammar's forced tokens): counts no evidence outweighs."""
        self.hits[source], self.tries[source] = [1e9] * self.depth, [1e9] * self.depth

    def update(self, source: str, offered: int, accepted: int) -> None:
        for j in range(min(accepted + 1, offered)):
            self.judge(source, j, j < accepted)

    def judge(self, source: str, depth: int, hit: bool) -> None:
        """Count one candidate at ``depth`` (those before it all accepted): accepted or not."""
        hits, tries = self._counts(source)
        tries[depth] += 1
        hits[depth] += hit

    def expected(self, source: str, m: int) -> list[tuple[float, float]]:
        """For 0..m candidates: (expected accepted count, probability all are accepted)."""
        out, gain, alive = [(0.0, 1.0)], 0.0, 1.0
        for h, t in zip(*(c[:m] for c in self._counts(source))):
            alive *= h / t
            gain += alive
            out.append((gain, alive))
        return out


class Planner:
    """Chooses each cycle's plan. ``block``: the most tokens one forward carries. ``costs``: relative
    forward costs (``costs.CostCurve``: n -> cost(n)/cost(1) of a causal forward, "verify", and of one
    with adapter-on MASK rows, "draft"); None = a fixed plan (fill the block: candidates first, then MASK
    rows when at least two fit)."""

    def __init__(self, block: int, costs: dict[str, dict[int, float]] | None = None):
        self.block, self.costs = block, costs

    def pays(self) -> bool:
        """Whether any plan beats an AR step where every candidate and draft would be accepted: where none does
        (a cost curve on which n tokens cost n steps), an ``auto`` cycle is an AR step and nothing else."""
        if self.costs is None:
            return True
        certain = Acceptance(self.block, (1.0, 1.0))
        certain.carried = [1.0, 1.0]
        return self.plan({"draft": self.block - 1}, certain, 1) != Plan()

    def plan(self, available: dict[str, int], acc: Acceptance, rows: int) -> Plan:
        """``available``: candidates on hand per source (the most any row has)."""
        room = self.block - 1
        if self.costs is None:
            source = max(available, key=available.get)
            m = min(available[source], room)
            return Plan(m, room - m if room - m >= 2 else 0, source)
        if rows > 1:
            return Plan()  # batches decode as AR: on a CPU a batch's forward already spends the cheap tokens
        verify, draft = self.costs["verify"], self.costs["draft"]
        best, best_rate = Plan(), 1.0 / verify[1]
        carry = self._draft_values(acc)  # carry[r]: what r MASK rows are worth after a full accept
        for source, count in available.items():
            for m, (gain, all_in) in enumerate(acc.expected(source, min(count, room))):
                for r in (0, *range(2, room - m + 1)):
                    # A forward with MASK rows costs at least the drafting forward of its size.
                    cost = max(verify[1 + m + r], draft[1 + m + r]) if r else verify[1 + m]
                    rate = (1 + gain + all_in * carry[r]) / cost
                    if rate > best_rate + 1e-9:
                        best, best_rate = Plan(m, r, source), rate
        return best

    def _draft_values(self, acc: Acceptance) -> list[float]:
        """Per r = 0..block-1: what r MASK rows are worth after a full accept: the best expected gain of
        verifying their r-1 drafts next cycle less what the extra verify rows cost (in AR steps), times
        the chance the drafts are kept."""
        kept = acc.carried[0] / acc.carried[1]
        verify = self.costs["verify"]
        net = [gain - (verify[1 + m] - verify[1]) for m, (gain, _) in enumerate(acc.expected("draft", self.block - 2))]
        return [0.0, 0.0] + [kept * max(net[:r]) for r in range(2, self.block)] if self.block > 2 else [0.0] * 2


class Unverified:
    """Lookup and history candidates that a cycle did not verify, checked against the tokens the row then commits:
    a candidate is accepted exactly when it is the token AR commits (when sampling, with probability p(x), the chance
    that AR samples it), so their acceptance is learned for free and ``auto`` pays no verify row to find out how well
    a source guesses. MASK-row drafts cost a forward's rows to make and are learned only where verified."""

    def __init__(self, acc: Acceptance):
        self.acc = acc
        self.open: list[tuple[str, int, int, list[int], int]] = []  # (source, row, its first token's index, candidates,
        # how many of them are counted)

    def offer(self, proposals: dict[str, list[list[int]]], plan: Plan, state: DecodeState, live: list[int]) -> None:
        for source, found in proposals.items():
            if source != "draft" and not (plan.verify and source == plan.source):
                self.open += [(source, i, len(state.rows[i].tokens), found[i], 0) for i in live if found[i]]

    def check(self, state: DecodeState) -> None:
        """Count each candidate as the committed tokens decide it, up to the first miss (where a verify stops); a list
        is done once all of it is decided, at a miss, or when its row ends."""
        still = []
        for source, i, start, guess, counted in self.open:
            row = state.rows[i]
            seen = row.tokens[start : start + len(guess)]
            for j in range(counted, len(seen)):
                self.acc.judge(source, j, seen[j] == guess[j])
                if seen[j] != guess[j]:
                    break
            else:
                if len(seen) < len(guess) and not row.done:
                    still.append((source, i, start, guess, max(counted, len(seen))))
        self.open = still


def planner_for(model: TriModel, state: DecodeState, costs: CostCurve | None) -> Planner:
    """auto plans with ``costs`` (the kept one when none is given: ``CostCurve.kept``); pipelined spec fills its
    block."""
    cfg = state.cfg
    if cfg.row.plans:
        return Planner(cfg.block_size, (costs or CostCurve.kept(model, cfg.block_size)[0]).upto(cfg.block_size))
    return Planner(cfg.block_size)


def _candidates(
    lookups: list[NGramIndex] | None, history: AnswerHistory | None, state: DecodeState, live: list[int], room: int
) -> dict[str, list[list[int]]]:
    """Each row's continuation found in its own text (or in earlier answers, where those match the tail for
    longer), keyed by source and match length (the first live row's: a batch shares one plan); empty when
    lookup is off or nothing matches."""
    if not lookups:
        return {}
    for lk, row in zip(lookups, state.rows):  # the tokens the last cycle committed
        lk.extend(row.tokens[len(lk.tokens) - len(row.prompt) :])
    found, source = [lk.propose(room) for lk in lookups], "lookup"
    if history is not None:
        earlier = [history.follow(lk.tokens, room) for lk in lookups]
        if _match_length(earlier, live) > _match_length(found, live):
            found, source = earlier, "history"
    n = _match_length(found, live)
    return {f"{source}{n}": [c for _, c in found]} if n else {}


def _grammatical(
    proposals: dict[str, list[list[int]]], state: DecodeState, live: list[int], room: int
) -> dict[str, list[list[int]]]:
    """Under a grammar: every source's candidates cut at the first token it refuses, and the tokens it forces as a
    source of their own (``FORCED``, always accepted). Unchanged without one."""
    if state.constraints is None:
        return proposals
    kept = {s: [state.candidates(i, c) if i in live else [] for i, c in enumerate(f)] for s, f in proposals.items()}
    forced = [state.forced(i, room) for i in range(len(state.rows))]
    return {**kept, FORCED: forced} if any(forced[i] for i in live) else kept


def pipelined(
    model: TriModel,
    cache: KVCache,
    pending: torch.Tensor,
    state: DecodeState,
    generator: torch.Generator | None,
    history: AnswerHistory | None = None,
    costs: CostCurve | None = None,
) -> Iterator[list[tuple[int, list[int]]]]:
    """Yield each cycle's tokens (accepted candidates + bonus) per row; ``pending`` (B,) is the last
    sampled token, not yet cached. ``history``: earlier answers to draft from (with ``cfg.lookup``);
    ``costs``: the cost curve auto plans with."""
    cfg, sampler, mask_id = state.cfg, state.cfg.sampler, model.cfg.mask_id
    planner = planner_for(model, state, costs)
    rows, room = len(pending), cfg.block_size - 1
    acc = Acceptance(max(room, 1))
    acc.certain(FORCED)
    worth = planner.pays()  # False: every cycle an AR step, no candidates looked up
    lookups = [NGramIndex(r.prompt + r.tokens) for r in state.rows] if cfg.lookup and worth else None
    unverified = Unverified(acc)
    carried: list[list[int]] = [[] for _ in range(rows)]  # drafts from the last forward's MASK rows
    carried_q: list[torch.Tensor | None] = [None] * rows  # their distributions (sampling only)
    while not state.all_done:
        live = [i for i, r in enumerate(state.rows) if not r.done]
        proposals = {**_candidates(lookups, history, state, live, room), "draft": carried}
        proposals = _grammatical(proposals, state, live, room)
        available = {s: max(len(c[i]) for i in live) for s, c in proposals.items()}
        plan = planner.plan(available, acc, len(live)) if worth else Plan()
        unverified.offer(proposals, plan, state, live)
        if not plan.verify and not plan.drafts:  # a plain AR step, without verification's bookkeeping
            pending = ar_step(model, cache, pending, state, generator, _no_drafts)
            carried, carried_q = [[] for _ in range(rows)], [None] * rows
            for i in live:
                state.rows[i].accepted_lengths.append(1)
            unverified.check(state)
            yield state.flush()
            continue
        if mask_id is None and plan.drafts:
            raise ValueError("pipelined spec drafts need a model with a mask token (config mask_id)")
        m, r = plan.verify, plan.drafts
        chosen = [proposals[plan.source][i][:m] for i in range(rows)]
        block = torch.cat([pending[:, None], _pad(chosen, pending, m)], dim=1)  # (B, 1 + m)
        q = None if sampler.greedy else _draft_distributions(block, plan, carried_q, model.cfg.vocab_size)
        tokens = torch.cat([block, torch.full((rows, r), mask_id or 0, device=block.device)], dim=1)
        adapter = (torch.arange(1 + m + r, device=block.device) > m).expand(rows, -1) if r else False
        start = cache.lengths
        logits = forward_block(
            model, cache, tokens, functools.partial(masks.verify_then_draft, verify=1 + m), write=1 + m, adapter=adapter
        )
        state.count_forward()
        source = plan.source.rstrip("0123456789") if m else None
        pending, k = settle(cache, state, start, block, logits[:, : 1 + m], q, generator, source)
        carried, carried_q = [[] for _ in range(rows)], [None] * rows
        if r:
            _keep_drafts(state, logits[:, 1 + m :], mask_id, generator, k == m, pending, live, acc, carried, carried_q)
        for i in live:
            acc.update(plan.source, len(chosen[i]), int(k[i]))
        unverified.check(state)
        yield state.flush()


def _keep_drafts(state, logits, mask_id, generator, full, pending, live, acc, carried, carried_q) -> None:
    """Into ``carried`` and ``carried_q``, per row: the drafts of a forward's MASK rows (``logits`` (B, r, V)) and their
    distributions, where the row accepted every candidate (``full``) and the first MASK row guessed the bonus token it
    could not see (the drafts assumed it); ``acc.carried`` counts how often they are kept."""
    sampler = state.cfg.sampler
    dq = unmasking_distribution(sampler, logits, mask_id)  # (B, r, V)
    guess = sampler.pick(dq, generator)
    state.restrict_drafts(guess[:, 1:], dq[:, 1:], sampler, generator)  # after the bonus, which the state has
    for i in live:
        if full[i]:
            keep = bool(guess[i, 0] == pending[i])
            acc.carried[0] += keep
            acc.carried[1] += 1
            if keep:
                carried[i], carried_q[i] = guess[i, 1:].tolist(), dq[i, 1:]


def _match_length(found: list[tuple[int, list[int]]], live: list[int]) -> int:
    """The match length of the first live row with candidates (0: none has any)."""
    return next((n for i, (n, c) in enumerate(found) if i in live and c), 0)


def _no_drafts(token: int) -> dict:
    """The trace of a cycle that verified nothing: as ``settle`` records it, a bonus token alone."""
    return {"type": "verify", "drafts": [], "accepted": 0, "bonus": token}


def _pad(chosen: list[list[int]], pending: torch.Tensor, m: int) -> torch.Tensor:
    """(B, m) candidates; a row with fewer repeats its pending token (accepted only if it is AR's token)."""
    return torch.tensor(
        [c + [int(t)] * (m - len(c)) for c, t in zip(chosen, pending.tolist())], dtype=torch.long, device=pending.device
    ).view(len(chosen), m)


def _draft_distributions(block: torch.Tensor, plan: Plan, carried_q, vocab: int) -> torch.Tensor:
    """(B, 1 + m, V): the distribution each candidate was drawn from (row 0 unused): the MASK rows' for
    carried drafts, one-hot for lookup candidates and padding (a deterministic proposal)."""
    q = torch.nn.functional.one_hot(block, vocab).float()
    for i, dq in enumerate(carried_q):
        if plan.source == "draft" and dq is not None:
            n = min(len(dq), block.shape[1] - 1)
            q[i, 1 : 1 + n] = dq[:n]
    return q
