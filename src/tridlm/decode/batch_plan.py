"""What the ``auto`` rows of a continuous batch verify (``decode.batcher``): each row's candidates (``Lookahead``),
their running acceptance (``ChainedAcceptance``) and the plan that takes the likeliest of them while a step's expected
tokens per unit of cost grow (``plan_rows``)."""

from __future__ import annotations

from dataclasses import dataclass

from tridlm.decode.lookup import AnswerHistory, NGramIndex
from tridlm.decode.pipelined import Acceptance

ROOM = 15  # the most candidates a row verifies in one step


@dataclass
class Lookahead:
    """An ``auto`` row's speculation: its text's n-gram index, its tenant's earlier answers, its acceptance."""

    lookup: NGramIndex
    history: AnswerHistory | None
    acceptance: Acceptance  # the row's own
    learned: Acceptance  # what it started from and adds to: its tenant's, or the batch's
    room: int  # candidates per step at most

    def offer(self, prompt: list[int], tokens: list[int], left: int) -> tuple[str, list[int]]:
        """(source and match length, candidates) for what follows ``tokens`` (the last one is the pending token),
        at most ``left`` of them; ("", []) when nothing matches."""
        self.lookup.extend(tokens[len(self.lookup.tokens) - len(prompt) :])
        room = min(self.room, left)
        if room < 1:
            return "", []
        (n, found), source = self.lookup.propose(room), "lookup"
        if self.history is not None:
            earlier = self.history.follow(self.lookup.tokens, room)
            if earlier[0] > n:
                (n, found), source = earlier, "history"
        return (f"{source}{n}", found) if found else ("", [])


class ChainedAcceptance(Acceptance):
    """Running acceptance whose depths borrow from the depth before: the chance that candidate j + 1 is accepted once
    1..j were is (hits + 2 r) / (tries + 2) with r that of depth j (1/2 before the first). A batch pays for every
    candidate it verifies, so a depth it has never tried must not look worse than the one before it, or it is never
    tried (one request alone tries deeper ones for free: ``Acceptance``'s flat prior of 1 in 2)."""

    def __init__(self, depth: int, prior: Acceptance | None = None):
        super().__init__(depth, (0.0, 0.0) if prior is None else prior)

    def expected(self, source: str, m: int) -> list[tuple[float, float]]:
        out, gain, alive, rate = [(0.0, 1.0)], 0.0, 1.0, 0.5
        for h, t in zip(*(c[:m] for c in self._counts(source))):
            rate = (h + 2 * rate) / (t + 2)
            alive *= rate
            gain += alive
            out.append((gain, alive))
        return out


def plan_rows(offers: list[list[float]], cost) -> list[int]:
    """How many of its candidates each row verifies: ``offers[i]`` lists, per candidate of row i, the chance that it
    and those before it are all accepted (non-increasing); ``cost(t)`` is a step's relative cost for t tokens. The
    candidates are taken likeliest first, as many as give the most expected tokens per unit of cost."""
    rows = len(offers)
    order = sorted(((chance, i) for i, chances in enumerate(offers) for chance in chances), key=lambda c: -c[0])
    gain, best, best_rate = float(rows), 0, rows / cost(rows)
    for taken, (chance, _) in enumerate(order, 1):
        gain += chance
        if gain / cost(rows + taken) > best_rate + 1e-9:
            best, best_rate = taken, gain / cost(rows + taken)
    counts = [0] * rows
    for _, i in order[:best]:
        counts[i] += 1
    return counts
