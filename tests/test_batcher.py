"""Continuous batching (``decode.batcher``): rows that join and leave a running batch at any step get exactly the
tokens they get decoded alone."""

from __future__ import annotations

import pytest
import torch
from helpers import GREEDY

from tridlm.decode import DecodeState, GenerationConfig, generate
from tridlm.decode.batcher import Batcher

PROMPTS = [[5, 9, 11], [7] * 12, [4, 8, 15, 16, 23, 42 % 30], [3, 30, 31, 6, 5, 5, 5, 5, 9], [12, 13]]


def alone(model, prompt, cfg):
    return generate(model, [prompt], cfg).rows[0].tokens


def state_for(model, cfg, rows=1):
    return DecodeState(rows, cfg.resolve(model), model.cfg.eos_ids, None)


def run_staggered(model, cfgs, max_rows=3, every=3):
    """Admit a row every ``every`` steps while a slot is free; step until all finish. Returns each row's tokens."""
    batcher, states, waiting, steps = Batcher(model, max_rows, 128), [], list(range(len(PROMPTS))), 0
    while waiting or batcher.slots:
        if waiting and batcher.free and steps % every == 0:
            k = waiting.pop(0)
            states.append((k, state_for(model, cfgs[k])))
            seed = cfgs[k].seed
            batcher.admit(states[-1][1], 0, PROMPTS[k], None if seed is None else torch.Generator().manual_seed(seed))
        batcher.step()
        steps += 1
    return {k: s.rows[0].tokens for k, s in states}


def test_rows_joining_and_leaving_get_their_single_greedy_tokens(tiny_model):
    cfgs = [GREEDY.replace(max_tokens=m) for m in (20, 7, 30, 12, 25)]
    got = run_staggered(tiny_model, cfgs)
    assert got == {k: alone(tiny_model, PROMPTS[k], cfgs[k]) for k in range(len(PROMPTS))}


def test_seeded_sampled_rows_draw_what_they_draw_alone(tiny_model):
    cfgs = [GenerationConfig(temperature=0.9, top_k=20, seed=k, max_tokens=15) for k in range(len(PROMPTS))]
    got = run_staggered(tiny_model, cfgs, max_rows=4, every=2)
    assert got == {k: alone(tiny_model, PROMPTS[k], cfgs[k]) for k in range(len(PROMPTS))}


def test_slots_are_bounded_reused_and_cancelled_rows_leave(tiny_model):
    batcher = Batcher(tiny_model, 2, 64)
    states = [state_for(tiny_model, GREEDY.replace(max_tokens=40)) for _ in range(3)]
    batcher.admit(states[0], 0, PROMPTS[0], None)
    batcher.admit(states[1], 0, PROMPTS[1], None)
    with pytest.raises(ValueError, match="no free slot"):
        batcher.admit(states[2], 0, PROMPTS[2], None)
    batcher.step()
    states[0].cancel(0)
    batcher.step()
    assert [s.state for s in batcher.slots] == [states[1]] and batcher.free == 1
    batcher.admit(states[2], 0, PROMPTS[2], None)
    while batcher.slots:
        batcher.step()
    assert states[0].rows[0].finish_reason == "cancelled"
    assert states[2].rows[0].tokens == alone(tiny_model, PROMPTS[2], GREEDY.replace(max_tokens=40))
    assert batcher.cache.batch == 2
    with pytest.raises(ValueError, match="exceed a slot"):
        batcher.admit(state_for(tiny_model, GREEDY.replace(max_tokens=62)), 0, PROMPTS[0], None)


def test_a_request_of_several_choices_counts_one_forward_per_step(tiny_model):
    batcher, state = Batcher(tiny_model, 4, 64), state_for(tiny_model, GREEDY.replace(max_tokens=10), rows=2)
    batcher.admit(state, 0, PROMPTS[0], None)
    batcher.admit(state, 1, PROMPTS[1], None)
    while batcher.slots:
        batcher.step()
    assert state.forwards == 9 and [r.nfe for r in state.rows] == [9, 9]
    assert [r.tokens for r in state.rows] == [alone(tiny_model, p, GREEDY.replace(max_tokens=10)) for p in PROMPTS[:2]]


def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_the_running_rows_go_on(tiny_model):
    """A prompt longer than ``prefill_chunk`` takes one chunk per step; the running rows commit a token at each of
    those steps, another request's long prompt waits (``can_admit``), a short one joins at once, and every row gets
    the tokens it gets decoded alone."""
    cfg = GREEDY.replace(max_tokens=30)
    long_prompt = [(7 * i) % 50 + 4 for i in range(23)]
    batcher = Batcher(tiny_model, 4, 128, prefill_chunk=5)
    running, filling, short = (state_for(tiny_model, cfg) for _ in range(3))
    batcher.admit(running, 0, PROMPTS[0], None)
    batcher.step()
    batcher.admit(filling, 0, long_prompt, None)
    assert batcher.filling and not batcher.can_admit([long_prompt]) and batcher.can_admit([PROMPTS[4]])
    before = len(running.rows[0].tokens)
    for _ in range(4):  # 23 tokens in chunks of 5: in after the 5th step
        batcher.step()
    assert len(running.rows[0].tokens) == before + 4 and filling.rows[0].tokens == [] and batcher.filling
    batcher.admit(short, 0, PROMPTS[4], None)  # joins ahead of the prompt still being filled
    batcher.step()
    assert not batcher.filling and len(filling.rows[0].tokens) == 2  # its first token, then the step's
    while batcher.slots:
        batcher.step()
    for state, prompt in ((running, PROMPTS[0]), (filling, long_prompt), (short, PROMPTS[4])):
        assert state.rows[0].tokens == alone(tiny_model, prompt, cfg)


def test_a_request_cancelled_while_its_prompt_is_prefilled_frees_its_slot(tiny_model):
    batcher = Batcher(tiny_model, 2, 128, prefill_chunk=4)
    state = state_for(tiny_model, GREEDY)
    batcher.admit(state, 0, list(range(4, 30)), None)
    batcher.step()
    state.cancel(0)
    batcher.step()
    assert not batcher.busy and batcher.free == 2


SMALL_PROMPTS = [[9, 6, 6, 14, 11, 9, 12, 10, 12], [4, 13, 5, 14, 12, 13, 5, 15, 10, 7], [12, 13, 10, 11, 10, 13]]


def test_auto_rows_speculate_in_the_batch_and_keep_ar_tokens(small_vocab_model):
    """auto rows verify their lookup candidates in the batch's forward, beside AR rows and rows with none: every
    row gets exactly its AR tokens, in fewer forwards than tokens."""
    model = small_vocab_model
    auto = GREEDY.replace(mode="auto", block_size=6, max_tokens=30)
    cfgs = [auto, GREEDY.replace(max_tokens=25), auto.replace(max_tokens=21)]
    batcher, states = Batcher(model, 3, 128), []
    for k, (prompt, cfg) in enumerate(zip(SMALL_PROMPTS, cfgs)):
        states.append(DecodeState(1, cfg.resolve(model), [], None))
        batcher.admit(states[-1], 0, prompt, None)
        batcher.step()
    while batcher.slots:
        batcher.step()
    for prompt, cfg, state in zip(SMALL_PROMPTS, cfgs, states):
        ar = cfg.replace(mode="ar", block_size=None)
        assert state.rows[0].tokens == generate(model, [prompt], ar, eos_ids=[]).rows[0].tokens
    for state in (states[0], states[2]):
        assert max(state.rows[0].accepted_lengths) > 1 and state.rows[0].nfe < len(state.rows[0].tokens) - 1
    assert states[1].rows[0].accepted_lengths == []


def test_the_batch_plan_takes_candidates_while_they_pay():
    from tridlm.decode.batch_plan import plan_rows

    flat = {t: 1.0 for t in range(1, 40)}.get  # a step costs the same whatever its width: take everything
    assert plan_rows([[0.9, 0.5], [], [0.2]], flat) == [2, 0, 1]
    linear = lambda t: 1.0 + 0.1 * (t - 1)  # noqa: E731  each token 10% of a one-token step
    # three rows: a candidate pays where its chance beats the rate it dilutes (tokens per cost)
    assert plan_rows([[0.9, 0.8, 0.3], [0.05], []], linear) == [2, 0, 0]
    assert plan_rows([[], [], []], linear) == [0, 0, 0]


def test_sampled_auto_rows_in_the_batch_are_distributionally_lossless():
    """Rows sampled at temperature 1 that verify lookup candidates in the batch draw AR's distribution exactly."""
    import dataclasses

    from helpers import chi_square, exact_ar_distribution

    from tridlm.presets import preset, random_model

    scipy_stats = pytest.importorskip("scipy.stats")
    model = random_model(dataclasses.replace(preset("tiny"), vocab_size=6, mask_id=5), seed=4, std=0.5)
    prompt, n, rows = [3, 3, 3, 3], 4, 4000  # lookup offers 3s, which this model often samples
    cfg = GenerationConfig(mode="auto", block_size=4, temperature=1.0, max_tokens=n)
    expected = exact_ar_distribution(model, prompt, n, cfg.sampler)
    batcher, states = Batcher(model, 64, 16), []
    torch.manual_seed(3)
    while len(states) < rows or batcher.slots:
        while len(states) < rows and batcher.free:
            states.append(DecodeState(1, cfg.resolve(model), [], None))
            batcher.admit(states[-1], 0, prompt, None)
        batcher.step()
    samples = torch.tensor([s.rows[0].tokens for s in states])
    stat, dof = chi_square(samples, expected, model.cfg.vocab_size)
    assert scipy_stats.chi2.sf(stat, dof) > 1e-3
    assert sum(length - 1 for s in states for length in s.rows[0].accepted_lengths) > rows // 2  # candidates taken
