import pytest
import torch

from tridlm.sampling import Sampler

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])


def test_greedy_distribution_is_softmax_and_pick_is_argmax():
    s = Sampler()
    torch.testing.assert_close(s.distribution(LOGITS), torch.softmax(LOGITS, -1))
    assert s.pick(s.distribution(LOGITS), None).tolist() == [4]


def test_top_k_keeps_the_k_best():
    p = Sampler(temperature=1.0, top_k=2).distribution(LOGITS)
    assert (p > 0).tolist() == [[True, False, False, False, True]]
    assert p.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.softmax(LOGITS, -1)[0]  # sorted: 3.0 (.61), 2.0 (.22), 1.0 (.08), ...
    p = Sampler(temperature=1.0, top_p=0.7).distribution(LOGITS)[0]
    assert (p > 0).tolist() == [True, False, False, False, True]
    torch.testing.assert_close(p[[0, 4]], probs[[0, 4]] / probs[[0, 4]].sum())


@pytest.mark.parametrize("temperature", [1e-300, 1e-8, 0.5, 2.0, 100.0])
def test_any_valid_temperature_gives_a_distribution(temperature):
    p = Sampler(temperature=temperature).distribution(torch.tensor([[1.0, 1.0, -3.0], [50.0, -50.0, 0.0]]))
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(2))


def test_seeded_draws_repeat():
    s = Sampler(temperature=1.0)
    probs = s.distribution(LOGITS.expand(64, -1))
    a = s.pick(probs, torch.Generator().manual_seed(1))
    b = s.pick(probs, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and len(set(a.tolist())) > 1


@pytest.mark.parametrize("top_p", [1e-200, 1e-9, 0.3])
def test_tiny_top_p_keeps_the_best_token(top_p):
    p = Sampler(temperature=1.0, top_p=top_p).distribution(LOGITS)
    assert torch.equal(p, torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]]))
