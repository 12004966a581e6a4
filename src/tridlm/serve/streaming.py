"""Streamed responses (``stream: true``): server-sent events of OpenAI's chunk shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from tridlm.serve.answer import Answer
from tridlm.serve.jobs import Job
from tridlm.serve.protocol import APIError, delta_choice, envelope, event, usage_of
from tridlm.tokenizer import TextStream, Tokenizer

INLINE_TOKENS = 16  # a stream chunk this short is detokenized on the event loop (a thread hop costs more)


async def detokenize(text: TextStream, tokens: list[int], final: bool = False) -> str:
    """The text a stream's new tokens add (``TextStream.push``: linear in them): inline for a few tokens, off
    the event loop for more."""
    if len(tokens) <= INLINE_TOKENS:
        return text.push(tokens, final)
    return await asyncio.to_thread(text.push, tokens, final)


async def sse(
    name: str, tokenizer: Tokenizer, job: Job, answer: Answer, rid: str, include_usage: bool, finish
) -> AsyncIterator[str]:
    """A streamed response's server-sent events: the role, the echoed prompt, each cycle's text (with its
    log-probabilities and, asked for, its trace), the last text with the finish reason, the usage, ``[DONE]``;
    ``finish`` records how it ended (499 when the client went away mid-stream)."""
    kind = answer.kind
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
    texts = [TextStream(tokenizer, job.cfg.stop) for _ in job.prompts]
    held = [""] * len(job.prompts)  # with tools, the reply's text so far (its answer or calls stream as they come)
    try:
        if kind == "chat.completion":
            for i in range(len(job.prompts)):
                yield event(
                    envelope(
                        chunk_kind,
                        rid,
                        name,
                        [{"index": i, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}],
                    )
                )
        echoed = not answer.echo
        while True:
            item = await job.events.get()
            for i in range(len(job.prompts)) if not echoed and item[0] != "error" else ():  # scored by now
                text, logprobs = answer.head(i)
                yield event(envelope(chunk_kind, rid, name, [delta_choice(kind, i, text, logprobs=logprobs)]))
            echoed = True
            if item[0] == "trace":
                yield event({**envelope(chunk_kind, rid, name, []), "tridlm_trace": answer.trace(*item[1:])})
                continue
            if item[0] == "tokens":
                _, i, tokens, entries = item
                delta, logprobs = await detokenize(texts[i], tokens), answer.delta(i, tokens, entries)
                if answer.tools is not None:
                    held[i], delta = held[i] + delta, ""
                    said = answer.reply_delta(i, held[i])
                    if said["delta"]:
                        yield event(envelope(chunk_kind, rid, name, [said]))
                if delta or logprobs:
                    yield event(envelope(chunk_kind, rid, name, [delta_choice(kind, i, delta, logprobs=logprobs)]))
                continue
            if item[0] == "done":
                rows = item[1]
                for i, r in enumerate(rows):
                    tail = await detokenize(texts[i], [], final=True)
                    yield event(envelope(chunk_kind, rid, name, [answer.last(i, held[i] + tail, r)]))
                if include_usage:
                    yield event(envelope(chunk_kind, rid, name, [], usage_of(rows, job.cfg.mode)))
                finish(rows)
            else:
                yield event(APIError(500, item[1], kind="server_error").body())
                finish(None, "500")
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()
        finish(None, "499")  # the client went away mid-stream (no-op after a normal end)
