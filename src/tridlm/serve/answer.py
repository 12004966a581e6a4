"""What a completion's choices say beyond their text: the echoed prompt, the streamed trace of each decoding step,
and the tokens' log-probabilities in the response's shape: chat's ``{"content": [{token, logprob, bytes,
top_logprobs}]}`` or completions' legacy ``{tokens, token_logprobs, top_logprobs, text_offset}`` (what lm-eval's
local-completions reads).

In every exact mode (ar, spec, auto) the log-probabilities are AR's: the verify rows' logits that committed each token
(``DecodeState.emit``); in diffusion they are those of the denoising step that committed it. An echoed prompt's come
from ``decode.score`` (the first token's is null: nothing predicts it). ``text_offset`` counts characters from the
start of the prompt's text, echoed or not; tokens after a stop string (which ends the text) keep their entries.
"""

from __future__ import annotations

import itertools

from tridlm.serve.jobs import Job
from tridlm.serve.protocol import choice, delta_choice, ending
from tridlm.serve.tools import ToolUse, new_id, wire
from tridlm.tokenizer import Tokenizer


class Answer:
    """The shape of one request's choices (``kind``: "chat.completion" or "text_completion")."""

    def __init__(self, kind: str, tokenizer: Tokenizer, job: Job, echo: bool, tools: ToolUse | None = None):
        """``tools``: the request's tools where the reply may call them (its text is then held to the end, parsed)."""
        self.kind, self.tokenizer, self.job = kind, tokenizer, job
        self.echo, self.tools = echo, tools
        self.sent = [[] for _ in job.prompts]  # with tools, each choice's streamed calls: [id, arguments' characters]
        self.said = [0] * len(job.prompts)  # and the characters of its answer streamed
        self.logprobs = job.cfg.logprobs is not None
        texts = kind == "text_completion" and (echo or self.logprobs)  # what the echo and the offsets need
        self.prompt_texts = [tokenizer.decode(p) for p in job.prompts] if texts else None
        self.offsets = [len(t) for t in self.prompt_texts] if texts else [0] * len(job.prompts)

    def head(self, i: int) -> tuple[str, dict | None]:
        """Choice i's echoed prompt: its text and, with logprobs, its tokens' entries (empty when not echoing)."""
        if not self.echo:
            return "", None
        prompt = self.job.prompts[i]
        if not self.logprobs:
            return self.prompt_texts[i], None
        scored = self.job.prompt_scores[i]
        entries = [None, *zip(scored.logprobs, scored.top)]
        return self.prompt_texts[i], self.shape(prompt, entries, 0)

    def whole(self, i: int, text: str, row) -> tuple[str, dict | None]:
        """Choice i's text and log-probabilities, the echoed prompt first."""
        head, head_logprobs = self.head(i)
        if not self.logprobs:
            return head + text, None
        body = self.shape(row.tokens, row.logprobs, self.offsets[i])
        return head + text, self.join(head_logprobs, body) if head_logprobs else body

    def choice(self, i: int, text: str, row, logprobs: dict | None) -> dict:
        """Choice i of a whole response: its text, or the tool calls it makes."""
        end = ending(row)
        if self.tools is None:
            return choice(self.kind, i, text, end, logprobs)
        message, reason = self.tools.reply(text, row.finish_reason == "stop")
        end = {**end, "finish_reason": reason} if reason else end
        return choice(self.kind, i, message["content"], end, logprobs, message["tool_calls"])

    def last(self, i: int, text: str, row) -> dict:
        """Choice i's last stream chunk: the finish reason after the rest of the text (with tools, ``text`` is the
        whole reply: the rest of its answer, or of its calls)."""
        end = ending(row)
        if self.tools is None:
            return delta_choice(self.kind, i, text, end)
        message, reason = self.tools.reply(text, row.finish_reason == "stop")
        if reason is None and not self.sent[i]:
            return delta_choice(self.kind, i, message["content"][self.said[i] :], end)
        return {**self.reply_delta(i, text), **end, "finish_reason": reason or end["finish_reason"]}

    def reply_delta(self, i: int, text: str) -> dict:
        """A stream chunk's choice with what choice i's reply so far adds: to its answer's text, or to its streamed
        calls (a new call's id and name, OpenAI's first delta of a call, then its arguments' text as it grows)."""
        answer = self.tools.answer(text)
        if answer is not None:
            new, self.said[i] = answer[self.said[i] :], len(answer)
            return delta_choice(self.kind, i, new)
        deltas, sent = [], self.sent[i]
        for k, call in enumerate(self.tools.calls(text) or ()):
            if k == len(sent):
                sent.append([new_id(), 0])
                deltas.append({"index": k, **wire(call, sent[k][0])})
            elif len(call.arguments) > sent[k][1]:
                deltas.append({"index": k, "function": {"arguments": call.arguments[sent[k][1] :]}})
            sent[k][1] = len(call.arguments)
        return {"index": i, "delta": {"tool_calls": deltas} if deltas else {}, "logprobs": None, "finish_reason": None}

    def delta(self, i: int, tokens: list[int], entries: list) -> dict | None:
        """A streamed chunk's log-probabilities for choice i's new ``tokens``."""
        if not self.logprobs or not tokens:
            return None
        out = self.shape(tokens, entries, self.offsets[i])
        self.offsets[i] += sum(len(p) for p in out.get("tokens", ()))
        return out

    def shape(self, ids: list[int], entries: list, offset: int) -> dict:
        if self.kind == "chat.completion":
            return {"content": [self._chat(t, e) for t, e in zip(ids, entries)]}
        pieces = [self.piece(t) for t in ids]
        return {
            "tokens": pieces,
            "token_logprobs": [None if e is None else e[0] for e in entries],
            "top_logprobs": [None if e is None else self._top(e[1]) for e in entries],
            "text_offset": list(itertools.accumulate(map(len, pieces), initial=offset))[: len(pieces)],
        }

    def trace(self, index: int, events: list[dict]) -> dict:
        """A choice's step events for the stream (``tridlm_trace``), with the text of every token id they name."""
        ids = set()
        for e in events:
            ids.update(t for key in ("block", "guess", "drafts") for t in e.get(key) or () if t is not None)
            ids.update(e[key] for key in ("token", "bonus") if key in e)
        return {"index": index, "events": events, "pieces": {str(t): self.piece(t) for t in sorted(ids)}}

    @staticmethod
    def join(a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}

    def _top(self, alternatives: list[tuple[int, float]]) -> dict[str, float]:
        """The legacy shape's alternatives by text: of two with one text (special tokens are both ""), the likelier."""
        out: dict[str, float] = {}
        for token, logprob in alternatives:
            out.setdefault(self.piece(token), logprob)
        return out

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _chat(self, token: int, entry) -> dict:
        text = self.piece(token)
        top = [{"token": self.piece(a), "logprob": lp, "bytes": list(self.piece(a).encode())} for a, lp in entry[1]]
        return {"token": text, "logprob": entry[0], "bytes": list(text.encode()), "top_logprobs": top}
