"""The counts of SPEC 2 (NFE, TPF, TTFT, ITL, tok/s, accepted lengths) over finished rows: computed here only."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Protocol


class Counted(Protocol):
    """What the counts read of a row (``state.Row``)."""

    tokens: list[int]
    nfe: int
    accepted_lengths: list[int]
    first_token_s: float | None
    last_token_s: float | None


def summarize(rows: Sequence[Counted], wall_s: float | None = None) -> dict:
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
    itl = [
        (r.last_token_s - r.first_token_s) / (len(r.tokens) - 1)
        for r in rows
        if len(r.tokens) > 1 and r.first_token_s is not None
    ]
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
