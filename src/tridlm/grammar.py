"""Constrained decoding (structured outputs): which tokens a grammar lets come next, computed by llguidance.

A ``Grammar`` is compiled once per request (``Grammars.compile``) from a JSON schema, "any JSON object", a regular
expression or a Lark grammar (llguidance's dialect) against the model's tokenizer; ``Grammar.start`` gives each row a
``Constraint``, the matcher that follows the row's committed tokens (``DecodeState.emit`` feeds it). Decoders ask a
constraint for the tokens allowed next (``allowed``), for the masks along a path of tokens not yet committed
(``along``: what a verify forward needs), for the longest valid prefix of candidates (``valid``), for drafts drawn
within the grammar (``pick``) and for the tokens the grammar forces (``forced``: each the only one allowed, so a free
candidate). Constrained AR is AR over the masked logits: every exact mode masks the same logits the same way, so its
output stays constrained AR's (docs/design.md).

JSON is written compactly, ``{"a": 1, "b": [2, 3]}`` (one space after ``:`` and ``,``, none elsewhere): no run of
whitespace for a model to wander into, and more punctuation the grammar forces.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import llguidance
import numpy as np
import torch

from tridlm.tokenizer import Tokenizer

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
KINDS = ("json_schema", "json_object", "regex", "lark")


class GrammarError(ValueError):
    """A grammar that cannot be compiled, or uses something llguidance does not implement (the message names it)."""


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar (``Grammars.compile``): ``kind`` (one of ``KINDS``) and its source, for one vocabulary."""

    kind: str
    source: str
    text: str = field(repr=False)  # llguidance's grammar
    tokens: llguidance.LLTokenizer = field(repr=False, compare=False)
    vocab_size: int = field(compare=False)

    def start(self) -> Constraint:
        """A new row's matcher, before any generated token."""
        matcher = llguidance.LLMatcher(self.tokens, self.text, log_level=0)
        return Constraint(matcher, self.vocab_size, self.tokens.eos_tokens)


class Grammars:
    """Compiles grammars for one model's tokenizer and vocabulary (llguidance's view of the tokenizer, its vocabulary's
    bytes, takes about 0.3 s to build: once, at the first grammar)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, list(eos_ids)

    @functools.cached_property
    def tokens(self) -> llguidance.LLTokenizer:
        """From the tokenizer's own description where llguidance reads its decoder (byte-level BPE, SentencePiece's),
        else from each token's text."""
        try:
            return llguidance.LLTokenizer(
                self.tokenizer.backend.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_ids
            )
        except ValueError:
            wrapped = llguidance.TokenizerWrapper(_TokenTexts(self.tokenizer, self.vocab_size, self.eos_ids[0]))
            return llguidance.LLTokenizer(wrapped, n_vocab=self.vocab_size, eos_token=self.eos_ids)

    def compile(self, kind: str, source=None) -> Grammar:
        """``source``: a JSON schema (dict or text) for ``json_schema``, nothing for ``json_object``, a pattern for
        ``regex``, a grammar for ``lark``. Raises ``GrammarError`` naming what is wrong with it."""
        if kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {kind!r}: expected one of {', '.join(KINDS)}")
        if kind == "json_object":
            source = {"type": "object"}
        try:
            if kind in ("json_schema", "json_object"):
                schema = json.loads(source) if isinstance(source, str) else source
                text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
                source = json.dumps(schema, sort_keys=True)
            elif kind == "regex":
                text = llguidance.LLMatcher.grammar_from_regex(source)
            else:
                text = llguidance.LLMatcher.grammar_from_lark(source)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid {kind}: {_one_line(e)}") from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self.tokens)
        if failed:
            raise GrammarError(f"invalid {kind}: {_one_line(messages[0])}")
        return Grammar(kind, source, text, self.tokens, self.vocab_size)


def _one_line(message) -> str:
    """llguidance's message on one line (it draws a caret under the spot over several)."""
    return " ".join(str(message).split())


class _TokenTexts:
    """llguidance's generic view of a tokenizer: each token's bytes, its special tokens, its encoder."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_id: int):
        backend = tokenizer.backend
        self.encode = tokenizer.encode
        self.eos_token_id, self.bos_token_id = eos_id, tokenizer.bos_id
        self.tokens = [
            backend.decode([i], skip_special_tokens=False).encode() if i < tokenizer.vocab_size else b""
            for i in range(vocab_size)
        ]
        self.special_token_ids = [i for i, t in backend.get_added_tokens_decoder().items() if t.special]

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)


class Constraint:
    """One row's grammar state: the matcher after the row's committed tokens."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids):
        self.matcher, self.vocab_size, self.eos_ids = matcher, vocab_size, frozenset(eos_ids)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens allowed next (EOS once the grammar is complete; only EOS once it can go no further)."""
        return torch.from_numpy(self._allowed())

    def _allowed(self) -> np.ndarray:
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return bits[: self.vocab_size].view(np.bool_)

    def commit(self, tokens: list[int]) -> None:
        """Follow committed tokens; one the grammar does not allow is a decoder's bug."""
        for t in tokens:  # one at a time: consume_tokens refuses the EOS that ends a complete grammar
            if not self.matcher.consume_token(t):
                raise RuntimeError(f"a decoder committed token {t} the grammar does not allow: {self.error}")

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    def valid(self, tokens: list[int]) -> int:
        """How many of ``tokens``, from the start, the grammar allows in turn."""
        return self.matcher.validate_tokens(tokens) if tokens else 0

    def forced(self, most: int) -> list[int]:
        """The tokens the grammar forces next (each the only one allowed), at most ``most``."""
        return self.matcher.compute_ff_tokens()[:most]

    def along(self, tokens: list[int], ranked=None) -> list[np.ndarray | int | None]:
        """What the grammar allows next after each prefix of ``tokens`` (none of them committed), one entry per
        position: the mask, (V,) bool; or, given ``ranked`` (``ranked[j]``: a greedy choice's candidates at position
        j, the unmasked logits' best tokens, best first), the first of them the grammar allows where one is, the mask
        not computed (a mask costs 14-177 us, most of it reading the tokenizer's trie back into a cache the forward
        emptied; checking one token costs a few). None past the first token the grammar refuses, or past one that is
        not the greedy choice, or after EOS: a verify stops there."""
        out: list[np.ndarray | int | None] = [None] * (len(tokens) + 1)
        taken = 0
        for j in range(len(tokens) + 1):
            nxt = tokens[j] if j < len(tokens) else None
            choice = self._greedy(ranked[j]) if ranked is not None else None
            if choice is not None:
                out[j], ok = choice, nxt == choice
            else:
                allowed = self._allowed()
                if not allowed.any():  # past the end (after EOS): nothing is committed there
                    break
                out[j], ok = allowed, nxt is not None and bool(allowed[nxt])
            if not ok or nxt in self.eos_ids:  # nothing follows EOS
                break
            self._follow(nxt)
            taken += 1
        self.matcher.rollback(taken)
        return out

    def _greedy(self, candidates) -> int | None:
        """The first of ``candidates`` the mask would allow, without computing it: where the grammar forces text, the
        mask allows only the first token of its canonical tokenization (checking a token alone would also pass others
        that spell the text differently); elsewhere a token passes alone as it passes in the mask."""
        forced = self.matcher.compute_ff_tokens()
        return forced[0] if forced else next((t for t in candidates if self._allows(t)), None)

    def _allows(self, token: int) -> bool:
        """Whether ``token`` may come next (EOS: where the grammar is complete; llguidance validates no EOS)."""
        return self.matcher.is_accepting() if token in self.eos_ids else self.valid([token]) == 1

    def _follow(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}, which it allowed: {self.error}")

    def pick(self, probs: torch.Tensor, choose) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draft tokens one after another from ``probs`` (n, V), each from its distribution restricted to what the
        grammar allows after the ones before (renormalised; all of the allowed where none of them has mass):
        ``choose(probs (V,)) -> token``. Returns (tokens (n,), the restricted distributions (n, V), what the grammar
        allowed at each slot (n, V) bool); commits nothing."""
        tokens, restricted = [], probs.clone()
        allowed_at = torch.ones(probs.shape, dtype=torch.bool)
        for j in range(len(probs)):
            allowed = allowed_at[j] = self.allowed()
            if not allowed.any():  # past the end (after EOS): drafts there are never committed
                break
            p = probs[j].masked_fill(~allowed.to(probs.device), 0.0)
            total = p.sum()
            restricted[j] = p / total if total > 0 else allowed.to(p) / allowed.sum()
            tokens.append(int(choose(restricted[j])))
            if tokens[-1] in self.eos_ids:  # nothing follows EOS (and llguidance cannot roll it back)
                break
            self._follow(tokens[-1])
        self.matcher.rollback(len(tokens) - (tokens[-1] in self.eos_ids))
        tokens += [tokens[-1]] * (len(probs) - len(tokens))
        return torch.tensor(tokens, device=probs.device), restricted, allowed_at.to(probs.device)
