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
    model.adapters_changed()
    assert torch.equal(model(x, pos, mask, adapter=False), base)
    assert not torch.allclose(model(x, pos, mask, adapter=True), base)


def test_grouped_adapters_compute_what_each_projection_does(tiny_cfg):
    """At inference q/k/v and gate/up adapters run as one low-rank pair each (``LoraGroup``); with gradients
    on, each projection's own. Same values up to float rounding, off rows untouched, rebuilt once a change is
    announced (``adapters_changed``)."""
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
        if step:  # not announced: inference still runs the adapters it was last told of
            stale, fresh = both()
            assert not torch.allclose(stale, fresh)
        model.adapters_changed()
        grouped, single = both()
        torch.testing.assert_close(grouped, single, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert not torch.allclose(grouped, model(x, pos, mask))  # the adapter acts on its rows


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
