import pytest
import torch

from tridlm import masks
from tridlm.presets import preset, random_model


def test_preset_unknown_name_is_clear():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")


@torch.no_grad()
def test_adapter_only_acts_when_switched_on(tiny_cfg):
    model = random_model(tiny_cfg, seed=3)
    x = torch.tensor([[5, 6, 7, 8]])
    pos = torch.arange(4)[None]
    mask = masks.bidirectional(torch.zeros(1, dtype=torch.long), 4, 0)
    base = model(x, pos, mask)
    model.add_lora(rank=4, alpha=8, targets=("q_proj", "o_proj"))
    assert torch.equal(model(x, pos, mask, adapter=True), base)  # B starts at zero: identity
    for name, p in model.named_parameters():
        if name.endswith("lora_b"):
            p.normal_(0, 0.5)
    assert torch.equal(model(x, pos, mask, adapter=False), base)
    assert not torch.allclose(model(x, pos, mask, adapter=True), base)


def test_grouped_adapters_compute_what_each_projection_does(tiny_cfg):
    """At inference q/k/v and gate/up adapters run as one low-rank pair each (``LoraGroup``); with gradients
    on, each projection's own. Same values up to float rounding, off rows untouched, rebuilt after every change
    in place without being told (an optimizer step or a load changes the tensors in place)."""
    model = random_model(tiny_cfg, seed=3)
    model.add_lora(
        rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    x, pos = torch.tensor([[5, 6, 7, 8]]), torch.arange(4)[None]
    mask = masks.bidirectional(torch.zeros(1, dtype=torch.long), 4, 0)
    rows = torch.tensor([[False, True, False, True]])

    def both():
        with torch.no_grad():
            grouped = model(x, pos, mask, adapter=rows)
        return grouped, model(x, pos, mask, adapter=rows).detach()  # gradients on: per projection

    for step in range(2):
        for name, p in model.named_parameters():
            if "lora" in name:
                with torch.no_grad():
                    p.normal_(0, 0.5)  # in place
        grouped, single = both()
        torch.testing.assert_close(grouped, single, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert not torch.allclose(grouped, model(x, pos, mask))  # the adapter acts on its rows


def test_grouped_adapters_follow_an_optimizer_step_and_a_new_adapter(tiny_cfg):
    """Inference reads the adapters as they are now: after an optimizer step (in place, in training) and after a
    new adapter replaces the old one, with no call to say so."""
    model = random_model(tiny_cfg, seed=3)
    model.add_lora(rank=4, alpha=8, targets=("q_proj", "o_proj"))
    x, pos = torch.tensor([[5, 6, 7, 8]]), torch.arange(4)[None]
    mask = masks.bidirectional(torch.zeros(1, dtype=torch.long), 4, 0)
    with torch.inference_mode():
        base = model(x, pos, mask)
        assert torch.equal(model(x, pos, mask, adapter=True), base)  # the grouped form of the new (identity) adapter
    opt = torch.optim.SGD([p for name, p in model.named_parameters() if "lora" in name], lr=1.0)
    model(x, pos, mask, adapter=True).square().mean().backward()
    opt.step()
    with torch.inference_mode():
        stepped = model(x, pos, mask, adapter=True)
    torch.testing.assert_close(stepped, model(x, pos, mask, adapter=True).detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stepped, base)
    model.add_lora(rank=2, alpha=4, targets=("q_proj", "o_proj"))  # B starts at zero again
    with torch.inference_mode():
        assert torch.equal(model(x, pos, mask, adapter=True), base)


@torch.no_grad()
def test_logits_index_selects_positions(tiny_model):
    x = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    pos = torch.arange(4).expand(2, -1)
    mask = masks.causal(torch.zeros(2, dtype=torch.long), 4, 0)
    index = torch.tensor([[3], [1]])
    got = tiny_model(x, pos, mask, logits_index=index)
    full = tiny_model(x, pos, mask)
    torch.testing.assert_close(got[:, 0], torch.stack([full[0, 3], full[1, 1]]))


def test_mask_over_cache_without_cache_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="no cache"):
        tiny_model(torch.tensor([[5]]), torch.tensor([[3]]), masks.causal(torch.tensor([3]), 1, 3))
