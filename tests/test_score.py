"""Scoring given tokens (``decode.score``): the causal model's log-probabilities, as one uncached forward of the
whole sequence gives them, whatever the batching, the shared contexts and the chunking."""

from __future__ import annotations

import pytest
import torch

from tridlm import attention, masks
from tridlm.decode import DecodeState, GenerationConfig, generate, modes
from tridlm.decode.batcher import Batcher
from tridlm.decode.score import score

PAIRS = [
    ([5, 6, 7, 8, 9], [10]),
    ([5, 6, 7, 8, 9], [11, 12, 13]),  # shares its context with the pair before
    ([20, 21], [22, 23, 24, 25, 26, 27, 28, 29, 30]),
    ([40], [41, 42]),
    ([5, 6, 7, 8, 9], [14, 15]),
    ([30, 31, 32, 33, 34, 35, 36], []),
]


def reference(model, context, continuation):
    """log p of each continuation token from one uncached causal forward of context + continuation."""
    x = torch.tensor([context + continuation])
    n = x.shape[1]
    with torch.no_grad():
        logits = model(x, torch.arange(n)[None], masks.causal(torch.zeros(1, dtype=torch.long), n, 0))[0]
    logp = logits[len(context) - 1 : -1].log_softmax(-1)
    return logp, logp.gather(-1, torch.tensor(continuation, dtype=torch.long)[:, None])[:, 0]


@pytest.mark.parametrize("batch_tokens", [1, 12, 4096])
def test_scores_are_the_causal_log_probabilities(tiny_model, batch_tokens, monkeypatch):
    monkeypatch.setattr(attention, "ROW_EXACT_MAX_QUERIES", 3)  # continuations go in several chunks
    got = score(tiny_model, PAIRS, top=3, batch_tokens=batch_tokens)
    for (context, continuation), s in zip(PAIRS, got):
        logp, expected = reference(tiny_model, context, continuation)
        assert len(s.logprobs) == len(s.greedy) == len(s.top) == len(continuation)
        torch.testing.assert_close(torch.tensor(s.logprobs), expected, rtol=0, atol=1e-4)
        assert s.greedy == (logp.argmax(-1) == torch.tensor(continuation, dtype=torch.long)).tolist()
        for row, top in zip(logp, s.top):
            assert [t for t, _ in top] == row.topk(3).indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in top]), row.topk(3).values, rtol=0, atol=1e-4)


def test_a_batch_scores_each_pair_as_alone(tiny_model):
    together = score(tiny_model, PAIRS)
    for pair, s in zip(PAIRS, together):
        (alone,) = score(tiny_model, [pair])
        assert s.greedy == alone.greedy
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-5)


def test_greedy_decoding_scores_greedy_at_every_token(tiny_model, prompts):
    """What AR greedy decoding generated is, token by token, the most likely continuation."""
    state = generate(tiny_model, prompts, GenerationConfig(mode="ar", max_tokens=12))
    for prompt, row in zip(prompts, state.rows):
        (s,) = score(tiny_model, [(prompt, row.tokens)])
        assert all(s.greedy)


def test_bad_pairs_are_refused(tiny_model):
    with pytest.raises(ValueError, match="context of at least one token"):
        score(tiny_model, [([], [5])])
    with pytest.raises(ValueError, match="exceed the model's context"):
        score(tiny_model, [([5] * tiny_model.cfg.max_seq_len, [6])])


@pytest.mark.parametrize("row", modes.TABLE, ids=lambda row: row.label)
def test_every_mode_records_the_log_probabilities_that_committed_its_tokens(small_vocab_model, prompts, row):
    """An exact mode's recorded log-probabilities are AR's (scoring its tokens after the prompt); diffusion records
    one per token too (those of the denoising step that committed it, not AR's)."""
    prompts = [[t % 16 for t in p] for p in prompts]
    cfg = GenerationConfig(mode=row.mode, spec_variant=row.spec_variant, max_tokens=20, logprobs=2)
    state = generate(small_vocab_model, prompts, cfg, eos_ids=[])
    for prompt, r in zip(prompts, state.rows):
        assert len(r.logprobs) == len(r.tokens) == 20
        assert all(len(top) == 2 and top[0][1] >= top[1][1] for _, top in r.logprobs)
        if row.exact:
            (s,) = score(small_vocab_model, [(prompt, r.tokens)], top=2)
            got = torch.tensor([lp for lp, _ in r.logprobs])
            torch.testing.assert_close(got, torch.tensor(s.logprobs), rtol=0, atol=1e-4)
            assert [[t for t, _ in top] for _, top in r.logprobs] == [[t for t, _ in top] for top in s.top]


def test_a_continuous_batch_records_each_rows_ar_log_probabilities(tiny_model):
    """Rows joining a running batch (``decode.batcher``), with lookup candidates verified, record AR's
    log-probabilities of what they commit."""
    prompts = [[5, 9, 11], [7] * 12, [12, 13]]
    cfg = GenerationConfig(mode="auto", max_tokens=15, logprobs=0).resolve(tiny_model)
    batcher, states = Batcher(tiny_model, 3, 128), []
    for k, prompt in enumerate(prompts):
        states.append(DecodeState(1, cfg, tiny_model.cfg.eos_ids, None))
        batcher.admit(states[-1], 0, prompt, None)
        batcher.step()
    while batcher.slots:
        batcher.step()
    for prompt, state in zip(prompts, states):
        r = state.rows[0]
        (s,) = score(tiny_model, [(prompt, r.tokens)])
        assert all(top == [] for _, top in r.logprobs)
        got = torch.tensor([lp for lp, _ in r.logprobs])
        torch.testing.assert_close(got, torch.tensor(s.logprobs), atol=1e-4, rtol=0)


def test_logprobs_are_bounded_like_top_logprobs():
    with pytest.raises(ValueError, match="logprobs"):
        GenerationConfig(logprobs=21)
