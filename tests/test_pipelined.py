"""Pipelined self-speculation and ``auto``: one forward per cycle, AR's output token for token."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from helpers import GREEDY, chi_square, exact_ar_distribution, tokens

from tridlm import masks
from tridlm.decode import AnswerHistory, DecodeState, GenerationConfig, generate, pipelined, stream
from tridlm.decode import ar as ar_decoder
from tridlm.decode.costs import CostCurve
from tridlm.decode.lookup import NGramIndex
from tridlm.decode.pipelined import Acceptance, Plan, Planner, Unverified
from tridlm.presets import preset, random_model


def test_ngram_index_proposes_the_latest_continuation_of_the_longest_suffix():
    index = NGramIndex([1, 2, 3, 9, 1, 2, 4, 5, 2])
    assert index.propose(3) == (1, [4, 5, 2])  # "2" last continued with 4 5 2
    index.extend([3])
    assert index.propose(2) == (2, [9, 1])  # "2 3" occurred once, followed by 9 1
    index.extend([7])
    assert index.propose(4) == (0, [])  # 7 never occurred before
    assert NGramIndex([]).propose(3) == (0, []) and NGramIndex([5]).propose(3) == (0, [])


def test_answer_history_continues_earlier_answers_and_never_across_two():
    history = AnswerHistory(shortest=2)
    history.add([1, 2, 3, 4])
    history.add([1, 2, 5])
    assert history.follow([9, 1, 2], 3) == (2, [5])  # the latest answer, cut where it ends
    assert history.follow([8, 2, 3], 5) == (2, [4])
    assert history.follow([8, 3], 5) == (0, [])  # one token in common is not a match (shortest=2)
    assert history.follow([1, 2, 5], 3) == (0, [])  # nothing followed it


def test_answer_history_keeps_the_newest_tokens_within_capacity():
    history = AnswerHistory(capacity=10)
    history.add([1, 2, 3, 4, 5, 6])
    history.add([7, 8, 9, 10, 11, 12])
    assert len(history.index.tokens) <= 10
    assert history.follow([1, 2], 3) == (0, [])  # the older answer is gone
    assert history.follow([9, 10], 2) == (2, [11, 12])
    with pytest.raises(ValueError, match="capacity"):
        AnswerHistory(capacity=0)


def test_a_repeated_request_verifies_the_earlier_answer(tiny_model, prompts):
    history = AnswerHistory()
    cfg = GREEDY.replace(mode="spec", spec_variant="pipelined", block_size=8)
    ar = generate(tiny_model, prompts[:1], GREEDY, history=history)  # any mode's answers join the history
    assert history.index.tokens == [AnswerHistory.SEPARATOR, *ar.rows[0].tokens]
    state = DecodeState(1, cfg, tiny_model.cfg.eos_ids, None, trace=True)
    sources = set()
    for _ in stream(tiny_model, prompts[:1], cfg, state=state, history=history):
        sources.update(e.get("source") for _, events in state.take_trace() for e in events)
    assert state.rows[0].tokens == ar.rows[0].tokens
    assert "history" in sources
    assert state.rows[0].nfe < ar.rows[0].nfe / 3  # seven candidates per forward, each AR's own token


def test_verify_then_draft_mask():
    lengths = torch.tensor([2, 3])
    mask = masks.verify_then_draft(lengths, 5, 3, verify=2)
    current = mask[0, :, 3:].int().tolist()
    assert current == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert mask[0, :, :3].tolist() == [[True, True, False]] * 5 and mask[1, :, :3].all()


@pytest.mark.parametrize("lookup", [True, False])
@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 8])
def test_pipelined_greedy_equals_ar_one_forward_per_cycle(small_vocab_model, prompts, block_size, lookup):
    prompts = [[t % 16 for t in p] for p in prompts]
    cfg = GREEDY.replace(mode="spec", spec_variant="pipelined", block_size=block_size, lookup=lookup)
    for batch in (prompts, prompts[:1]):
        ar = generate(small_vocab_model, batch, GREEDY, eos_ids=[])
        sp = generate(small_vocab_model, batch, cfg, eos_ids=[])
        assert tokens(sp) == tokens(ar)
    for row in sp.rows:
        assert row.nfe == len(row.accepted_lengths)  # one forward per cycle, each with >= 1 token
        assert sum(row.accepted_lengths) == len(row.tokens) - 1
    if block_size > 1 and lookup:  # (random weights rarely draft well: test_real_model checks the drafts)
        assert max(a for r in sp.rows for a in r.accepted_lengths) >= 2, "the accept path was not exercised"


def test_pipelined_batch_row_equals_single(tiny_model, prompts):
    cfg = GREEDY.replace(mode="spec", spec_variant="pipelined", block_size=4)
    assert tokens(generate(tiny_model, prompts, cfg)) == [
        generate(tiny_model, [p], cfg).rows[0].tokens for p in prompts
    ]


def test_auto_greedy_equals_ar(tiny_model, prompts):
    ar = tokens(generate(tiny_model, prompts, GREEDY))
    assert [generate(tiny_model, [p], GREEDY.replace(mode="auto")).rows[0].tokens for p in prompts] == ar
    assert tokens(generate(tiny_model, prompts, GREEDY.replace(mode="auto"))) == ar  # a batch: AR steps


def both(curve: dict[int, float]) -> dict[str, dict[int, float]]:
    """The same relative cost for verifying and drafting forwards."""
    return {"verify": curve, "draft": curve}


def test_planner_picks_ar_when_forwards_cost_their_tokens_and_fills_cheap_ones():
    acc = Acceptance(7)
    steep = Planner(8, both({n: float(n) for n in range(1, 9)}))
    assert steep.plan({"lookup3": 7, "draft": 7}, acc, rows=1) == Plan()  # no candidate is surely accepted
    flat = Planner(8, both({n: 1.0 for n in range(1, 9)}))
    assert flat.plan({"lookup3": 7, "draft": 0}, acc, rows=1) == Plan(7, 0, "lookup3")
    assert flat.plan({"draft": 0}, acc, rows=1).drafts == 7  # nothing to verify: draft
    assert flat.plan({"lookup3": 7, "draft": 7}, acc, rows=2) == Plan()  # batches decode as AR
    for _ in range(50):
        acc.update("lookup1", 3, 0)  # one-token matches keep failing: stop offering them where they cost
    step = Planner(8, both({1: 1.0, 2: 1.3, 3: 1.6, 4: 1.9, 5: 2.2, 6: 2.5, 7: 2.8, 8: 3.1}))
    assert step.plan({"lookup1": 7, "draft": 0}, acc, rows=1) == Plan()
    for _ in range(50):
        acc.update("lookup3", 7, 7)  # three-token matches keep being right: offer them all
    assert step.plan({"lookup3": 7, "draft": 0}, acc, rows=1) == Plan(7, 0, "lookup3")
    dear_drafts = Planner(8, {"verify": {n: 1.0 for n in range(1, 9)}, "draft": {n: 2.0 for n in range(1, 9)}})
    assert dear_drafts.plan({"draft": 0}, Acceptance(7), rows=1) == Plan()  # drafting costs more than it buys
    fixed = Planner(4)
    assert fixed.plan({"lookup2": 2, "draft": 0}, acc, rows=1) == Plan(2, 0, "lookup2")
    assert fixed.plan({"draft": 0}, acc, rows=1) == Plan(0, 3, "draft")


def test_auto_is_ar_steps_and_nothing_else_where_no_plan_pays(tiny_model, prompts, monkeypatch):
    steep = CostCurve({n: float(n) for n in range(1, 9)}, {n: float(n) for n in range(1, 9)})
    assert not Planner(8, steep.upto(8)).pays()
    assert Planner(8, both({n: 0.9 * n + 0.1 for n in range(1, 9)})).pays()  # sure candidates would pay
    widths = []

    def forward_block(model, cache, block, *args, **kwargs):
        widths.append(block.shape[1])
        return real(model, cache, block, *args, **kwargs)

    real = ar_decoder.forward_block
    monkeypatch.setattr(ar_decoder, "forward_block", forward_block)
    monkeypatch.setattr(pipelined, "forward_block", lambda *a, **k: pytest.fail("a verify or draft forward"))
    monkeypatch.setattr(pipelined, "NGramIndex", lambda *a, **k: pytest.fail("candidates looked up"))
    auto = generate(tiny_model, prompts[:1], GREEDY.replace(mode="auto"), costs=steep)
    assert widths == [1] * (len(auto.rows[0].tokens) - 1)  # one AR step per token after the prefill's
    assert auto.rows[0].tokens == generate(tiny_model, prompts[:1], GREEDY).rows[0].tokens


def test_unverified_candidates_are_judged_by_the_tokens_the_row_commits():
    acc, row = Acceptance(4), SimpleNamespace(tokens=[5], done=False)
    state, seen = SimpleNamespace(rows=[row]), Unverified(acc)
    seen.offer({"lookup2": [[6, 7, 8]], "draft": [[6, 7]]}, Plan(), state, [0])
    seen.offer({"lookup3": [[1]]}, Plan(1, 0, "lookup3"), state, [0])  # verified: judged by the verify
    row.tokens.append(6)
    seen.check(state)
    assert acc.hits["lookup2"] == [2.0, 1.0, 1.0, 1.0] and acc.tries["lookup2"] == [3.0, 2.0, 2.0, 2.0]  # 6 right
    row.tokens.append(9)
    seen.check(state)  # 6 right, 7 wrong, 8 never judged
    assert acc.hits["lookup2"] == [2.0, 1.0, 1.0, 1.0] and acc.tries["lookup2"] == [3.0, 3.0, 2.0, 2.0]
    assert not seen.open and set(acc.tries) == {"lookup2"}  # MASK-row drafts are learned only where verified
    seen.offer({"history2": [[4, 4]]}, Plan(), state, [0])
    row.tokens.append(4)
    row.done = True  # the row ends before the second candidate is decided
    seen.check(state)
    assert acc.hits["history2"][:2] == [2.0, 1.0] and acc.tries["history2"][:2] == [3.0, 2.0]


def test_acceptance_counts_the_accepted_prefix_and_the_first_miss():
    acc = Acceptance(4)
    acc.update("draft", 3, 1)  # first accepted, second rejected, third never judged
    assert acc.hits["draft"] == [2.0, 1.0, 1.0, 1.0] and acc.tries["draft"] == [3.0, 3.0, 2.0, 2.0]


def test_lookup_is_for_pipelined_decoding_only():
    with pytest.raises(ValueError, match="lookup"):
        GenerationConfig(mode="spec", lookup=True)
    GenerationConfig(mode="auto", lookup=False)


def test_pipelined_sampling_is_distributionally_lossless():
    scipy_stats = pytest.importorskip("scipy.stats")
    model = random_model(dataclasses.replace(preset("tiny"), vocab_size=6, mask_id=5), seed=4, std=0.5)
    prompt, n = [1, 2, 3, 1, 2], 4
    cfg = GenerationConfig(mode="spec", spec_variant="pipelined", block_size=4, temperature=1.0, seed=13, max_tokens=n)
    expected = exact_ar_distribution(model, prompt, n, cfg.sampler)
    state = generate(model, [prompt] * 6000, cfg, eos_ids=[])
    stat, dof = chi_square(torch.tensor(tokens(state)), expected, model.cfg.vocab_size)
    assert scipy_stats.chi2.sf(stat, dof) > 1e-3
    assert max(state.stats()["accepted_hist"]) >= 3


def test_a_batch_leaves_room_for_rows_that_finished_past_max_tokens(small_vocab_model):
    """A row's last cycle can commit several tokens past its max_tokens, and a finished row still rides along
    in the batch's later forwards: the cache must hold both (this batch overflowed it once)."""
    prompts = [[9, 6, 6, 14, 11, 9, 12, 10, 12], [4, 13, 5, 14, 12, 13, 5, 15, 10, 7], [12, 13, 10, 11, 10, 13]]
    cfg = GREEDY.replace(max_tokens=21, mode="spec", spec_variant="pipelined", block_size=8)
    sp = generate(small_vocab_model, prompts, cfg, eos_ids=[])
    assert tokens(sp) == tokens(generate(small_vocab_model, prompts, GREEDY.replace(max_tokens=21), eos_ids=[]))


def test_a_cost_curve_saves_loads_and_must_cover_the_block(tiny_model, tmp_path):
    from helpers import COSTS

    from tridlm.decode import CostCurve

    COSTS.save(tmp_path / "costs.json")
    assert CostCurve.load(tmp_path / "costs.json") == COSTS
    with pytest.raises(ValueError, match="covers forwards of up to 8"):
        COSTS.upto(9)
    (tmp_path / "bad.json").write_text('{"verify": {"2": 1.0}, "draft": {"2": 1.0}}')
    with pytest.raises(ValueError, match="sizes 1..n"):
        CostCurve.load(tmp_path / "bad.json")
    measured = CostCurve.measure(tiny_model, 3, context=16, reps=1, rows=6)
    assert measured.largest == 3 and measured.verify[1] == 1.0 and sorted(measured.rows) == [1, 2, 4, 6]
    measured.save(tmp_path / "measured.json")
    assert CostCurve.load(tmp_path / "measured.json") == measured


def test_a_batch_step_costs_what_its_measured_batch_sizes_say():
    from tridlm.decode import CostCurve

    curve = CostCurve({1: 1.0, 2: 1.2}, {1: 1.0, 2: 1.3}, {2: (1.5, 0.2), 4: (2.5, 0.4)})
    assert curve.step(4, 2) == 1.5 + 0.2 * 2  # two rows, two tokens past one each
    assert curve.step(3, 3) == 2.0  # between the measured sizes: interpolated
    assert curve.step(10, 8) == 2.5 + 0.4 * 2  # beyond them: the largest's
    alone = CostCurve({1: 1.0, 2: 1.2}, {1: 1.0, 2: 1.3})  # no batch sizes: a single row of that many tokens
    assert alone.step(2, 2) == 1.2 and alone.step(4, 2) == pytest.approx(1.6)  # on along the last two sizes


def test_the_kept_cost_curve_is_measured_once_per_shape_and_machine(tiny_model, tmp_path, monkeypatch):
    """``CostCurve.kept``: measured on first use and saved; the next start reads it; a larger block, another thread
    count or another model shape is measured again, and so is a damaged file."""
    import dataclasses

    import torch

    from tridlm.decode import CostCurve
    from tridlm.presets import random_model

    measured = []
    real = CostCurve.measure.__func__
    monkeypatch.setattr(
        CostCurve, "measure", classmethod(lambda cls, *a, **k: measured.append(a[1]) or real(cls, *a, reps=1, **k))
    )
    first, origin = CostCurve.kept(tiny_model, 4, folder=tmp_path)
    assert measured == [4] and "measured now" in origin
    again, origin = CostCurve.kept(tiny_model, 3, folder=tmp_path)
    kept = next(tmp_path.glob("*[0-9a-f].json"))
    assert again == first and measured == [4] and origin == f"the cost curve kept in {kept}"
    CostCurve.kept(tiny_model, 6, folder=tmp_path)  # covers fewer tokens than asked
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        CostCurve.kept(tiny_model, 4, folder=tmp_path)
    finally:
        torch.set_num_threads(threads)
    wider = random_model(dataclasses.replace(tiny_model.cfg, ffn_dim=256))
    CostCurve.kept(wider, 4, folder=tmp_path)
    assert measured == [4, 6, 4, 4]
    for curve in tmp_path.glob("*[0-9a-f].json"):
        curve.write_text("{not json")
    CostCurve.kept(tiny_model, 4, folder=tmp_path)
    assert measured == [4, 6, 4, 4, 4]
