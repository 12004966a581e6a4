import pytest
import torch

from tridlm import masks
from tridlm.model import ModelConfig, random_model


def test_preset_unknown_name_is_clear():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge")


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
