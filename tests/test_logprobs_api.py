"""Log-probabilities in the API: chat ``logprobs`` / ``top_logprobs`` and completions' legacy ``logprobs`` with
``echo``, streamed and not, are the causal model's (``decode.score``) in every exact mode."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
from helpers import running  # noqa: E402

from tridlm.decode import GenerationConfig, generate  # noqa: E402
from tridlm.decode.score import score  # noqa: E402

pytestmark = pytest.mark.server
EXACT = ["ar", "spec", "auto"]


@pytest.fixture(scope="module")
def server(tiny_model, chat_tokenizer):
    with running(tiny_model, chat_tokenizer, max_batch=8) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def scored(model, context, continuation, top=0):
    (s,) = score(model, [(context, continuation)], top=top)
    return s


def streamed(server, path, body) -> list[dict]:
    chunks = []
    with httpx.stream("POST", server + path, json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


@pytest.mark.parametrize("mode", EXACT)
def test_chat_logprobs_are_ar_log_probabilities(client, server, tiny_model, chat_tokenizer, mode):
    messages = [{"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, logprobs=True, top_logprobs=3, extra_body={"mode": mode}
    )
    content = r.choices[0].logprobs.content
    prompt = chat_tokenizer.encode_chat(messages)
    generated = generate(tiny_model, [prompt], GenerationConfig(mode=mode, max_tokens=12)).rows[0].tokens
    s = scored(tiny_model, prompt, generated, top=3)
    assert [c.token for c in content] == [chat_tokenizer.decode([t]) for t in generated]
    torch.testing.assert_close(torch.tensor([c.logprob for c in content]), torch.tensor(s.logprobs), atol=1e-4, rtol=0)
    for c, top in zip(content, s.top):
        assert [a.token for a in c.top_logprobs] == [chat_tokenizer.decode([t]) for t, _ in top]
        assert bytes(c.bytes).decode() == c.token
    body = {"model": "tiny", "messages": messages, "max_tokens": 12, "logprobs": True, "top_logprobs": 3, "mode": mode}
    chunks = [c["choices"][0]["logprobs"] for c in streamed(server, "/v1/chat/completions", body) if c["choices"]]
    flat = [entry for lp in chunks if lp for entry in lp["content"]]
    assert flat == [c.model_dump() for c in content]


@pytest.mark.parametrize("mode", EXACT)
def test_completion_echo_scores_the_prompt_and_the_answer(server, tiny_model, chat_tokenizer, mode):
    prompt = "a quick test"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "logprobs": 2, "echo": True, "mode": mode}
    choice = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    ids = chat_tokenizer.encode(prompt)
    assert choice["text"].startswith(prompt)
    answer = generate(tiny_model, [ids], GenerationConfig(mode=mode, max_tokens=6)).rows[0].tokens
    lp = choice["logprobs"]
    assert lp["tokens"] == [chat_tokenizer.decode([t]) for t in ids + answer]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    s = scored(tiny_model, ids[:1], ids[1:] + answer, top=2)
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), torch.tensor(s.logprobs), atol=1e-4, rtol=0)
    for got, top in zip(lp["top_logprobs"][1:], s.top):  # by text: of two with one text, the likelier
        want = {text: v for text, v in reversed([(chat_tokenizer.decode([t]), v) for t, v in top])}
        assert got == pytest.approx(want, abs=1e-4)
    pieces = [len(chat_tokenizer.decode([t])) for t in ids + answer]  # one character per token but specials (none)
    assert lp["text_offset"] == [sum(pieces[:i]) for i in range(len(pieces))]
    chunks = [c["choices"][0] for c in streamed(server, "/v1/completions", body) if c["choices"]]
    assert "".join(c["text"] for c in chunks) == choice["text"]
    joined = {k: [v for c in chunks if c["logprobs"] for v in c["logprobs"][k]] for k in lp}
    assert joined == lp


def test_lm_evals_request_shape_gives_each_prompt_its_choice(server, tiny_model, chat_tokenizer):
    """What lm-eval's local-completions sends to score a continuation: token-id prompts, several in one request,
    max_tokens 1, logprobs 1, echo; each choice is its prompt's, in order, and greedy where the score says so."""
    prompts = [[5, 6, 7, 8, 9, 10], [20, 21, 22], [30, 31, 32, 33, 34]]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    choices = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    for prompt, c in zip(prompts, choices):
        s = scored(tiny_model, prompt[:1], prompt[1:], top=1)
        got = c["logprobs"]["token_logprobs"][1 : len(prompt)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(s.logprobs), atol=1e-4, rtol=0)
        tops = c["logprobs"]["top_logprobs"][1 : len(prompt)]
        assert [lp == max(top.values()) for lp, top in zip(got, tops)] == s.greedy


def test_diffusion_records_one_log_probability_per_token(client):
    r = client.completions.create(
        model="tiny", prompt="x", max_tokens=10, logprobs=1, extra_body={"mode": "diffusion", "block_size": 4}
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "less than or equal to 5"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "needs logprobs",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "bool"),
        ("/v1/completions", {"prompt": [[5, 6]] * 5, "n": 2}, "exceed this server's 8 rows"),
    ],
)
def test_bad_logprob_requests_are_400(server, path, body, message):
    r = httpx.post(server + path, json={"model": "tiny", "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400 and message in r.text, r.text
