"""What the server keeps per tenant (one per API key): the answer history its ``auto`` and pipelined-spec requests
draft from, and how often its candidates were accepted in the continuous batch. One tenant's answers never reach
another's drafts, trace or counts."""

from __future__ import annotations

from tridlm.decode import AnswerHistory
from tridlm.decode.batch_plan import ROOM, ChainedAcceptance


class Tenants:
    def __init__(self, history: int = 0):
        """``history``: tokens of earlier answers kept per tenant (0: none)."""
        self.capacity = history
        self._histories: dict[int, AnswerHistory] = {}
        self._acceptances: dict[int, ChainedAcceptance] = {}

    def history(self, tenant: int) -> AnswerHistory | None:
        """The tenant's answer history (made on its first answer), None when the server keeps none."""
        if not self.capacity:
            return None
        if tenant not in self._histories:
            self._histories[tenant] = AnswerHistory(self.capacity)
        return self._histories[tenant]

    def add(self, tenant: int, answer: list[int]) -> None:
        """An answer joins its tenant's history (where the server keeps one)."""
        if self.capacity:
            self.history(tenant).add(answer)

    def learned(self, tenant: int) -> ChainedAcceptance:
        """How often the tenant's candidates were accepted in the batch, what its auto rows start from."""
        return self._acceptances.setdefault(tenant, ChainedAcceptance(ROOM))
