"""The joint objective against references built from the inference-time passes."""

import torch
import torch.nn.functional as F

from tridlm import masks
from tridlm.decode.forward import forward_block, prefill
from tridlm.presets import random_model
from tridlm.train.objective import add_noise, diffusion_loss, joint_loss

SPEC_FIGURE = """\
####....|........
####....|........
####....|........
####....|........
....####|####....
....####|####....
....####|####....
....####|####....
........|#.......
........|##......
........|###.....
........|####....
........|#####...
........|######..
........|#######.
........|########"""


def test_dual_stream_mask_is_the_spec_figure():
    want = torch.tensor([[c == "#" for c in row.replace("|", "")] for row in SPEC_FIGURE.splitlines()])
    assert torch.equal(masks.dual_stream(8, 4), want)


def test_noise_masks_only_loss_bearing_tokens():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(4, 64, (64, 16), generator=g)
    bearing = torch.zeros_like(x0, dtype=torch.bool)
    bearing[:, 6:] = True
    n = add_noise(x0, bearing, mask_id=3, generator=g)
    assert not n.masked[:, :6].any() and torch.equal(n.xt[n.masked], torch.full((int(n.masked.sum()),), 3))
    assert torch.equal(n.xt[~n.masked], x0[~n.masked]) and ((n.p > 0) & (n.p <= 1)).all()
    rate = n.masked[:, 6:].float().mean(1)
    assert torch.corrcoef(torch.stack([rate, n.p]))[0, 1] > 0.8  # the masked fraction follows p


def test_suffix_noise_masks_block_suffixes_like_a_spec_draft():
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(4, 64, (200, 16), generator=g)
    bearing = torch.ones_like(x0, dtype=torch.bool)
    bearing[:, :3] = False
    n = add_noise(x0, bearing, mask_id=3, generator=g, block=4, suffix_fraction=0.5)
    spec_rows = n.p == 1
    assert 60 < int(spec_rows.sum()) < 140
    blocks = n.masked[spec_rows].view(-1, 4, 4).long()  # (rows, block, position in block)
    assert (blocks.diff(dim=-1) >= 0).all()  # once masked, the rest of the block is masked too
    assert not n.masked[:, :3].any()  # never a token that bears no loss
    counts = blocks[:, 1:].sum(-1).flatten().bincount(minlength=5)  # full blocks: cut 0..3 -> 4..1 masked
    assert (counts[1:] > 0).all() and counts[0] == 0
    assert torch.equal(n.xt[n.masked], torch.full((int(n.masked.sum()),), 3))


@torch.no_grad()
def test_loss_equals_a_reference_built_from_inference_passes(tiny_cfg):
    """Block b of x_t is scored like a drafting pass: prefill x_0 of earlier blocks into a cache, then a
    bidirectional forward of the noisy block; the clean stream is a plain causal forward."""
    model = random_model(tiny_cfg, seed=3, std=0.3)
    model.add_lora(rank=4, alpha=8, targets=("q_proj", "o_proj"))
    for name, p in model.named_parameters():
        if "lora_b" in name:
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    L, block, alpha = 12, 4, 0.3
    x0 = torch.randint(4, 64, (3, L), generator=g)
    noised = add_noise(x0, torch.ones_like(x0, dtype=torch.bool), tiny_cfg.mask_id, g)
    got = joint_loss(model, x0, noised, block, alpha, adapter=True)

    diffusion_sum, ar_sum = 0.0, 0.0
    for b in range(3):
        seq = x0[b].tolist()
        full = model(x0[b : b + 1], torch.arange(L)[None], masks.causal(torch.zeros(1, dtype=torch.long), L, 0))[0]
        ar_sum += F.cross_entropy(full[:-1], x0[b, 1:], reduction="sum")
        for start in range(0, L, block):
            noisy = noised.xt[b : b + 1, start : start + block]
            if start:
                cache, _ = prefill(model, [seq[:start]], max_len=L + 1)
                logits = forward_block(model, cache, noisy, masks.bidirectional, adapter=True)[0]
            else:
                logits = model(
                    noisy,
                    torch.arange(block)[None],
                    masks.bidirectional(torch.zeros(1, dtype=torch.long), block, 0),
                    adapter=True,
                )[0]
            for i in range(block):
                if noised.masked[b, start + i]:
                    diffusion_sum += F.cross_entropy(logits[i], x0[b, start + i]) / noised.p[b]
    n_masked, n_ar = int(noised.masked.sum()), 3 * (L - 1)
    torch.testing.assert_close(got.diffusion_sum, torch.as_tensor(diffusion_sum), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.ar_sum, torch.as_tensor(ar_sum), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, (alpha * got.diffusion_sum + got.ar_sum) / (n_masked + n_ar))
    assert got.n_masked == n_masked > 0


@torch.no_grad()
def test_clean_stream_term_is_the_causal_lm_loss(tiny_model):
    x0 = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    noised = add_noise(x0, torch.ones_like(x0, dtype=torch.bool), 3, torch.Generator().manual_seed(3))
    got = joint_loss(tiny_model, x0, noised, block=5)
    logits = tiny_model(x0, torch.arange(10).expand(2, -1), masks.causal(torch.zeros(2, dtype=torch.long), 10, 0))
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, 64), x0[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(got.ar_sum, lm, rtol=1e-5, atol=1e-4)


def test_adapter_regime_gradients_reach_only_the_adapter(tiny_cfg):
    model = random_model(tiny_cfg, seed=4, std=0.3)
    model.add_lora(rank=4, alpha=8, targets=("o_proj",))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    x0 = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    noised = add_noise(x0, torch.ones_like(x0, dtype=torch.bool), 3, torch.Generator().manual_seed(6))
    diffusion_loss(model, x0, noised, block=4).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_a") or n.endswith("lora_b"))


def test_adapter_regime_loss_equals_the_dual_stream_diffusion_term(tiny_cfg):
    """The cached-context computation matches the dual-stream forward in value and in adapter gradients,
    including rows with only a few loss-bearing tokens (padding of the masked-logits gather)."""
    model = random_model(tiny_cfg, seed=7, std=0.3)
    model.add_lora(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_b" in name:
            p.data.normal_(0, 0.2)
    g = torch.Generator().manual_seed(8)
    x0 = torch.randint(4, 64, (3, 16), generator=g)
    bearing = torch.ones_like(x0, dtype=torch.bool)
    bearing[1, :13] = False
    noised = add_noise(x0, bearing, tiny_cfg.mask_id, g)
    lora = [p for p in model.parameters() if p.requires_grad]

    ref = joint_loss(model, x0, noised, block=4, loss_mask=bearing, adapter=True)
    ref_grads = torch.autograd.grad(ref.diffusion_sum / ref.n_masked, lora)
    got = diffusion_loss(model, x0, noised, block=4)
    got_grads = torch.autograd.grad(got.loss, lora)
    assert got.n_masked == ref.n_masked > 0
    torch.testing.assert_close(got.diffusion_sum, ref.diffusion_sum, rtol=1e-5, atol=1e-4)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_pipelined_layout_scores_masks_as_pipelined_spec_drafts_them(tiny_cfg):
    """draft_layout pipelined: a block's MASK rows are scored as pipelined spec and auto draft them, over the
    block's earlier tokens as causal rows without the adapter (a prefill of everything before the first MASK),
    then one bidirectional pass of the MASK rows with the adapter; the default layout differs."""
    model = random_model(tiny_cfg, seed=9, std=0.3)
    model.add_lora(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    for name, p in model.named_parameters():
        if "lora_b" in name:
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(10)
    L, block = 12, 4
    x0 = torch.randint(4, 64, (3, L), generator=g)
    noised = add_noise(x0, torch.ones_like(x0, dtype=torch.bool), tiny_cfg.mask_id, g, block=block, suffix_fraction=1)
    got = diffusion_loss(model, x0, noised, block, layout="pipelined")
    want = 0.0
    for b in range(3):
        for start in range(0, L, block):
            masked = noised.masked[b, start : start + block]
            if not masked.any():
                continue
            cut = start + int(masked.int().argmax())  # suffix noise: masked from here to the block's end
            drafts = noised.xt[b : b + 1, cut : start + block]
            if cut:
                cache, _ = prefill(model, [x0[b, :cut].tolist()], max_len=L + 1)
                logits = forward_block(model, cache, drafts, masks.bidirectional, adapter=True)[0]
            else:
                n = drafts.shape[1]
                logits = model(
                    drafts,
                    torch.arange(n)[None],
                    masks.bidirectional(torch.zeros(1, dtype=torch.long), n, 0),
                    adapter=True,
                )[0]
            want += F.cross_entropy(logits, x0[b, cut : start + block], reduction="sum") / noised.p[b]
    torch.testing.assert_close(got.diffusion_sum, torch.as_tensor(want), rtol=1e-4, atol=1e-4)
    linear = diffusion_loss(model, x0, noised, block)
    assert not torch.allclose(linear.diffusion_sum, got.diffusion_sum)
