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
