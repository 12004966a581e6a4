"""Log-probabilities of given tokens under the causal (AR) model: lm-eval's ``loglikelihood``, a prompt's ``echo``.

``score`` takes (context, continuation) pairs and returns, for every continuation token, log p(token | everything
before it): the numbers AR decoding samples from. Pairs that share a context (the choices of a multiple-choice
question) prefill it once; contexts go through in batches of about ``batch_tokens`` tokens, longest first. The first
continuation token is scored by the context's last logits; the rest by a causal forward of the continuation over a
copy of its context's cache, in the prefill's row-exact chunks, so that no more than a chunk's logits are ever held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tridlm import attention, masks
from tridlm.cache import KVCache
from tridlm.decode.forward import forward_block, prefill
from tridlm.model import TriModel


@dataclass
class Scored:
    """One continuation's tokens under the model: per token its log-probability, whether it was the most likely
    token there (ties to the lowest id, as ``argmax``), and the ``top`` most likely (id, log-probability) pairs."""

    logprobs: list[float]
    greedy: list[bool]
    top: list[list[tuple[int, float]]]

    @property
    def total(self) -> float:
        return sum(self.logprobs)

    def extend(self, logits: torch.Tensor, tokens: Sequence[int], top: int) -> None:
        """Score ``tokens`` by ``logits`` (len(tokens), V), one row each."""
        logp = logits.float().log_softmax(-1)
        ids = torch.tensor(list(tokens), device=logp.device)
        self.logprobs += logp.gather(-1, ids[:, None])[:, 0].tolist()
        self.greedy += (logp.argmax(-1) == ids).tolist()
        if top:
            values, indices = logp.topk(top, dim=-1)
            self.top += [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        else:
            self.top += [[] for _ in tokens]


@torch.inference_mode()
def score(
    model: TriModel,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    top: int = 0,
    batch_tokens: int = 2048,
) -> list[Scored]:
    """Each pair's continuation scored after its context (both token ids; the context non-empty), in the pairs'
    order. ``top``: also the ``top`` most likely tokens at each continuation position."""
    for context, continuation in pairs:
        if not context:
            raise ValueError("a scored continuation needs a context of at least one token (e.g. BOS)")
        if len(context) + len(continuation) > model.cfg.max_seq_len:
            raise ValueError(
                f"context ({len(context)}) + continuation ({len(continuation)}) tokens exceed the model's context "
                f"of {model.cfg.max_seq_len}"
            )
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        groups.setdefault(tuple(context), []).append(i)
    contexts = sorted(groups, key=len, reverse=True)
    out: list[Scored | None] = [None] * len(pairs)
    start = 0
    while start < len(contexts):
        stop = start + max(1, batch_tokens // len(contexts[start]))
        batch = contexts[start:stop]
        members = [[(i, list(pairs[i][1])) for i in groups[c]] for c in batch]
        for i, scored in _score_batch(model, batch, members, top):
            out[i] = scored
        start = stop
    return out


def _score_batch(model, contexts, members, top) -> list[tuple[int, Scored]]:
    """Score the continuations (``members``: (pair index, tokens) per context) of a batch of contexts."""
    longest = max(len(t) for group in members for _, t in group)
    cache, last = prefill(model, contexts, max(map(len, contexts)) + longest + 1)
    done, rest = [], []  # rest: (pair index, context row, continuation) of continuations longer than one token
    for row, group in enumerate(members):
        for i, tokens in group:
            scored = Scored([], [], [])
            if tokens:
                scored.extend(last[row : row + 1], tokens[:1], top)
            done.append((i, scored))
            if len(tokens) > 1:
                rest.append((len(done) - 1, row, tokens))
    rest.sort(key=lambda r: len(r[2]), reverse=True)  # the rows still running are always a leading slice
    if rest:
        rows = _copy_rows(cache, [row for _, row, _ in rest])
        _continue(model, rows, [(done[d][1], tokens) for d, _, tokens in rest], top)
    return done


def _copy_rows(cache: KVCache, rows: list[int]) -> KVCache:
    """A cache whose row j is a copy of ``cache``'s row ``rows[j]`` (its committed part)."""
    index = torch.tensor(rows, device=cache.k.device)
    width = int(cache.lengths.max())
    out = KVCache.__new__(KVCache)
    out.static, out.max_len = False, cache.max_len
    out.k = cache.k.new_zeros((cache.k.shape[0], len(rows), *cache.k.shape[2:]))
    out.v = torch.zeros_like(out.k)
    out.k[..., :width, :] = cache.k[:, index, :, :width]
    out.v[..., :width, :] = cache.v[:, index, :, :width]
    out.lengths = cache.lengths[index].clone()
    return out


def _continue(model, cache: KVCache, rows: list[tuple[Scored, list[int]]], top: int) -> None:
    """Feed each row's continuation but its last token, chunk by chunk, scoring the token after each one. Rows are
    longest first, so the rows that still have tokens in a chunk are its leading ones."""
    chunk = attention.ROW_EXACT_MAX_QUERIES
    inputs = [tokens[:-1] for _, tokens in rows]
    for begin in range(0, len(inputs[0]), chunk):
        live = sum(len(t) > begin for t in inputs)
        width = min(chunk, len(inputs[0]) - begin)
        tokens = torch.zeros(live, width, dtype=torch.long, device=model.device)
        padding = torch.ones(live, width, dtype=torch.bool, device=model.device)
        for j, t in enumerate(inputs[:live]):
            part = t[begin : begin + width]
            tokens[j, : len(part)] = torch.tensor(part)
            padding[j, : len(part)] = False
        view = cache.rows(0, live)
        logits = forward_block(
            model, view, tokens, masks.causal, write=True, padding=padding if bool(padding.any()) else None
        )
        cache.lengths[:live] = view.lengths
        for j, (scored, continuation) in enumerate(rows[:live]):
            n = min(width, len(inputs[j]) - begin)
            scored.extend(logits[j, :n], continuation[begin + 1 : begin + 1 + n], top)
