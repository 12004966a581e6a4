"""Prompt lookup: free draft candidates from the text so far (prompt and answer).

When the last few tokens occurred before, the tokens that followed them then are a guess for what
follows now; answers that quote or edit their input (code, extraction, rewriting) repeat long spans.
"""

from __future__ import annotations

from collections.abc import Sequence


class NGramIndex:
    """The most recent continuation of every 1..``longest``-gram of a growing token sequence.

    ``extend`` appends tokens; ``propose(m)`` returns (n, up to m tokens that followed the latest earlier
    occurrence of the last n tokens) for the longest n that occurred before, or (0, []).
    """

    def __init__(self, tokens: Sequence[int] = (), longest: int = 5):
        """``longest``: longer matches predict better (docs/measurements.md: tokens per forward of auto on code
        1.62 / 1.68 / 1.71 / 1.72 with 2 / 3 / 5 / 8), and ``auto`` keeps acceptance per match length."""
        self.longest = longest
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            end = len(self.tokens)  # index of t: register the n-grams t follows
            for n in range(1, self.longest + 1):
                if end >= n:
                    self._next[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(int(t))

    def propose(self, m: int) -> tuple[int, list[int]]:
        for n in range(min(self.longest, len(self.tokens)), 0, -1):
            start = self._next.get(tuple(self.tokens[-n:]))
            if start is not None:
                return n, self.tokens[start : start + m]
        return 0, []
