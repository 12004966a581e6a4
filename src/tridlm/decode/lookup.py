"""Prompt lookup: free draft candidates from the text so far (prompt and answer), and from earlier answers.

When the last few tokens occurred before, the tokens that followed them then are a guess for what
follows now; answers that quote or edit their input (code, extraction, rewriting) repeat long spans,
and answers to similar requests repeat each other's idioms (``AnswerHistory``).
"""

from __future__ import annotations

from collections.abc import Sequence


class NGramIndex:
    """The most recent continuation of every 1..``longest``-gram of a growing token sequence.

    ``extend`` appends tokens; ``propose(m)`` returns (n, up to m tokens that followed the latest earlier
    occurrence of the last n tokens) for the longest n that occurred before, or (0, []); ``follow`` does
    the same for the tail of another sequence.
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

    def follow(self, tail: Sequence[int], m: int, shortest: int = 1) -> tuple[int, list[int]]:
        """(n, up to m tokens that followed the latest occurrence here of ``tail``'s last n tokens) for the
        longest n >= ``shortest`` that occurs, or (0, [])."""
        for n in range(min(self.longest, len(tail)), shortest - 1, -1):
            start = self._next.get(tuple(tail[-n:]))
            if start is not None:
                return n, self.tokens[start : start + m]
        return 0, []

    def propose(self, m: int) -> tuple[int, list[int]]:
        # The last n-gram is registered only once a token follows it, so a match is an earlier occurrence.
        return self.follow(self.tokens, m)


class AnswerHistory:
    """The answers a process decoded before, as one n-gram index: candidates for a request's next tokens
    where its text so far matches an earlier answer's for at least ``shortest`` tokens (the same idioms,
    signatures and boilerplate recur across requests; docs/measurements.md has what it buys).

    Holds the newest ``capacity`` tokens at most (the default's index peaks near 55 MB): beyond that it keeps
    the newer half. Not thread-safe: one decoding thread owns it (the server's worker). Its answers show in
    the drafts of traces and move speed and forward counts, so whoever reads one must be allowed to see the
    answers in it: the server keeps one per tenant.
    """

    SEPARATOR = -1  # between answers: no token id, so no match or continuation runs across two answers

    def __init__(self, capacity: int = 1 << 16, shortest: int = 2, longest: int = 5):
        if capacity < 1:
            raise ValueError(f"AnswerHistory capacity must be positive, got {capacity}")
        self.capacity, self.shortest, self.longest = capacity, shortest, longest
        self.index = NGramIndex(longest=longest)

    def add(self, answer: Sequence[int]) -> None:
        self.index.extend([self.SEPARATOR, *answer])
        if len(self.index.tokens) > self.capacity:
            self.index = NGramIndex(self.index.tokens[-(self.capacity // 2) :], self.longest)

    def follow(self, tail: Sequence[int], m: int) -> tuple[int, list[int]]:
        n, tokens = self.index.follow(tail, m, self.shortest)
        if self.SEPARATOR in tokens:
            tokens = tokens[: tokens.index(self.SEPARATOR)]
        return (n, tokens) if tokens else (0, [])
