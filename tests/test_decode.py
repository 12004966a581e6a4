import dataclasses

import pytest
import torch
from helpers import GREEDY, chi_square, exact_ar_distribution, tokens

from tridlm import masks
from tridlm.decode import GenerationConfig, generate, modes, stream
from tridlm.decode.spec import accept
from tridlm.presets import preset, random_model
from tridlm.sampling import Sampler


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 8])
def test_spec_greedy_equals_ar(small_vocab_model, prompts, block_size):
    prompts = [[t % 16 for t in p] for p in prompts]
    for batch in (prompts, prompts[:1]):
        ar = generate(small_vocab_model, batch, GREEDY, eos_ids=[])
        sp = generate(small_vocab_model, batch, GREEDY.replace(mode="spec", block_size=block_size), eos_ids=[])
        assert tokens(sp) == tokens(ar)
    hist = sp.stats()["accepted_hist"]
    if block_size > 1:
        assert max(hist) >= 2, "the accept path was not exercised"


@pytest.mark.parametrize("row", modes.TABLE, ids=lambda row: row.label)
def test_every_mode_of_the_table_runs_its_decoder_and_the_exact_ones_give_ar(small_vocab_model, prompts, row):
    """Each row of the table of modes decodes through its own decoder with its default block; a row marked exact
    gives AR's tokens, and diffusion at its default block (not exact) is not held to them."""
    prompts = [[t % 16 for t in p] for p in prompts]
    ar = generate(small_vocab_model, prompts, GREEDY, eos_ids=[])
    cfg = GREEDY.replace(mode=row.mode, spec_variant=row.spec_variant)
    assert cfg.row is row and cfg.resolve(small_vocab_model).block_size == row.default_block("cpu")
    calls = []
    counted = dataclasses.replace(row, decoder=lambda *a, **k: calls.append(1) or row.decoder(*a, **k))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modes, "of", lambda mode, variant="linear": counted)
        out = generate(small_vocab_model, prompts, cfg, eos_ids=[])
    assert calls == [1]
    if row.exact:
        assert tokens(out) == tokens(ar)


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 8])
def test_quadratic_spec_greedy_equals_ar(small_vocab_model, prompts, block_size):
    prompts = [[t % 16 for t in p] for p in prompts]
    cfg = GREEDY.replace(mode="spec", spec_variant="quadratic", block_size=block_size)
    for batch in (prompts, prompts[:1]):
        ar = generate(small_vocab_model, batch, GREEDY, eos_ids=[])
        sp = generate(small_vocab_model, batch, cfg, eos_ids=[])
        assert tokens(sp) == tokens(ar)
    row = sp.rows[0]
    if block_size > 1:
        assert max(row.accepted_lengths) >= 2, "the accept path was not exercised"
        assert row.nfe == len(row.accepted_lengths) + 1  # one forward per cycle after one linear draft
        assert sp.stats()["tpf"] > 1.0


@pytest.mark.parametrize("variant", ["linear", "quadratic", "pipelined"])
def test_adapter_never_changes_spec_output(tiny_cfg, prompts, variant):
    model = random_model(tiny_cfg, seed=6, std=0.3)
    ar = tokens(generate(model, prompts, GREEDY))
    model.add_lora(rank=4, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    for name, p in model.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(p, 0, 0.3)
    cfg = GREEDY.replace(mode="spec", spec_variant=variant, block_size=4)
    assert tokens(generate(model, prompts, cfg)) == ar
    assert tokens(generate(model, prompts, GREEDY)) == ar  # AR itself never uses the adapter


def test_quadratic_spec_sampling_is_distributionally_lossless():
    scipy_stats = pytest.importorskip("scipy.stats")
    model = random_model(dataclasses.replace(preset("tiny"), vocab_size=6, mask_id=5), seed=4, std=0.5)
    prompt, n = [1, 2, 3], 4
    cfg = GenerationConfig(mode="spec", spec_variant="quadratic", block_size=3, temperature=1.0, seed=12, max_tokens=n)
    expected = exact_ar_distribution(model, prompt, n, cfg.sampler)
    state = generate(model, [prompt] * 6000, cfg, eos_ids=[])
    stat, dof = chi_square(torch.tensor(tokens(state)), expected, model.cfg.vocab_size)
    assert scipy_stats.chi2.sf(stat, dof) > 1e-3
    assert max(state.stats()["accepted_hist"]) >= 2


def test_spec_greedy_equals_ar_tiny_model(tiny_model, prompts):
    ar = generate(tiny_model, prompts, GREEDY)
    assert tokens(generate(tiny_model, prompts, GREEDY.replace(mode="spec", block_size=5))) == tokens(ar)


def test_diffusion_block_size_one_is_ar(tiny_model, prompts):
    ar = generate(tiny_model, prompts, GREEDY)
    assert tokens(generate(tiny_model, prompts, GREEDY.replace(mode="diffusion", block_size=1))) == tokens(ar)


@pytest.mark.parametrize(
    "cfg",
    [
        GREEDY,
        GREEDY.replace(mode="spec", block_size=4),
        GREEDY.replace(mode="spec", block_size=4, spec_variant="quadratic"),
        GREEDY.replace(mode="diffusion", block_size=4, threshold=0.3),
        GREEDY.replace(mode="diffusion", block_size=6, threshold=None),
    ],
)
def test_batch_row_equals_single(tiny_model, prompts, cfg):
    batched = tokens(generate(tiny_model, prompts, cfg))
    assert batched == [generate(tiny_model, [p], cfg).rows[0].tokens for p in prompts]


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
@pytest.mark.parametrize("max_tokens", [1, 5, 13])
def test_max_tokens_is_exact(tiny_model, prompts, mode, max_tokens):
    state = generate(tiny_model, prompts, GenerationConfig(mode=mode, block_size=8, max_tokens=max_tokens), eos_ids=[])
    assert [len(r.tokens) for r in state.rows] == [max_tokens] * len(prompts)
    assert all(r.finish_reason == "length" for r in state.rows)


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
def test_eos_stops_and_is_the_last_token(tiny_model, prompts, mode):
    cfg = GREEDY.replace(mode=mode, block_size=4, threshold=0.0)
    free = generate(tiny_model, prompts[:1], cfg, eos_ids=[]).rows[0].tokens
    eos = free[6]  # a token emitted mid-way becomes the EOS
    row = generate(tiny_model, prompts[:1], cfg, eos_ids=[eos]).rows[0]
    assert row.finish_reason == "stop"
    assert row.tokens == free[: free.index(eos) + 1]


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
def test_stop_string_ends_generation_and_is_cut(tiny_model, char_tokenizer, mode):
    prompt = char_tokenizer.encode("hello there")
    cfg = GREEDY.replace(mode=mode, block_size=4)
    free = generate(tiny_model, [prompt], cfg, eos_ids=[], detokenize=char_tokenizer.decode)
    text = free.text(0)
    stop = text[10:12]
    state = generate(tiny_model, [prompt], cfg.replace(stop=(stop,)), eos_ids=[], detokenize=char_tokenizer.decode)
    assert state.rows[0].finish_reason == "stop"
    assert state.text(0) == text[: text.index(stop)]
    assert char_tokenizer.decode(state.rows[0].tokens).endswith(stop)


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
def test_sampling_with_seed_is_reproducible(tiny_model, prompts, mode):
    cfg = GenerationConfig(mode=mode, block_size=4, temperature=0.9, top_k=20, top_p=0.95, seed=7, max_tokens=20)
    first = tokens(generate(tiny_model, prompts, cfg))
    assert tokens(generate(tiny_model, prompts, cfg)) == first
    assert tokens(generate(tiny_model, prompts, cfg.replace(seed=8))) != first


def test_counts_are_honest(small_vocab_model):
    prompt = [[5, 6, 7]]
    ar = generate(small_vocab_model, prompt, GREEDY, eos_ids=[]).stats()
    assert ar["completion_tokens"] == 40 and ar["nfe"] == 39  # the first token comes from the prefill
    sp = generate(
        small_vocab_model, prompt, GREEDY.replace(mode="spec", block_size=4, max_tokens=300), eos_ids=[]
    ).rows[0]
    cycles = len(sp.accepted_lengths)
    assert sp.nfe == 2 * cycles and sum(sp.accepted_lengths) == len(sp.tokens) - 1
    diff = generate(
        small_vocab_model, prompt, GREEDY.replace(mode="diffusion", block_size=4, threshold=None), eos_ids=[]
    ).stats()
    # One token per denoising step, 3 steps + 1 commit pass per block of 4: 9 blocks give the prefill's
    # token + 36, then 3 steps of the 10th block finish the 40 (no commit pass after the last token).
    assert diff["completion_tokens"] == 40 and diff["nfe"] == 9 * 4 + 3
    assert diff["tpf"] == pytest.approx(40 / 39)


def test_streaming_yields_every_token_once_in_order(tiny_model, prompts):
    cfg = GREEDY.replace(mode="diffusion", block_size=6, threshold=0.2)
    seen = [[] for _ in prompts]
    for chunk in stream(tiny_model, prompts, cfg):
        for row, toks in chunk:
            seen[row] += toks
    assert seen == tokens(generate(tiny_model, prompts, cfg))


@pytest.mark.parametrize(
    "field,value",
    [
        ("mode", "fast"),
        ("block_size", 0),
        ("threshold", 1.5),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_k", 0),
        ("max_tokens", 0),
        ("max_steps_per_block", 0),
        ("stop", ("",)),
        ("spec_variant", "cubic"),
    ],
)
def test_config_rejects_out_of_range(field, value):
    """A config is valid from construction: neither building one nor deriving one makes an invalid config."""
    with pytest.raises(ValueError, match=f"invalid {field}="):
        GenerationConfig(**{field: value})
    with pytest.raises(ValueError, match=f"invalid {field}="):
        GenerationConfig().replace(**{field: value})


def test_prompt_too_long_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(tiny_model, [[5] * 500], GREEDY)


def test_accept_greedy_prefix_and_bonus():
    V = 5
    block = torch.tensor([[0, 1, 2, 3], [0, 4, 4, 4]])
    p = torch.zeros(2, 4, V)
    for b, nxt in enumerate([[1, 2, 0, 3], [4, 1, 2, 0]]):  # verifier's argmax after each prefix
        p[b, torch.arange(4), torch.tensor(nxt)] = 1.0
    k, bonus = accept(block, p, None, Sampler(), None)
    assert k.tolist() == [2, 1] and bonus.tolist() == [0, 1]


def test_spec_sampling_is_distributionally_lossless():
    scipy_stats = pytest.importorskip("scipy.stats")
    model = random_model(dataclasses.replace(preset("tiny"), vocab_size=6, mask_id=5), seed=4, std=0.5)
    prompt, n, samples = [1, 2, 3], 3, 6000
    cfg = GenerationConfig(mode="spec", block_size=4, temperature=1.0, top_k=5, seed=11, max_tokens=n)
    sampler = cfg.sampler
    expected = exact_ar_distribution(model, prompt, n, sampler)

    def p_value(mode):
        state = generate(model, [prompt] * samples, cfg.replace(mode=mode), eos_ids=[])
        stat, dof = chi_square(torch.tensor(tokens(state)), expected, model.cfg.vocab_size)
        return scipy_stats.chi2.sf(stat, dof), state

    p_spec, state = p_value("spec")
    assert max(state.stats()["accepted_hist"]) >= 2  # drafts were accepted, not only resampled
    assert p_spec > 1e-3
    # Power check: diffusion mode is not lossless, and the same test sees it.
    p_diffusion, _ = p_value("diffusion")
    assert p_diffusion < 1e-6


@pytest.mark.parametrize("mode", ["spec", "diffusion"])
def test_blocks_need_a_mask_token(mode):
    model = random_model(dataclasses.replace(preset("tiny"), mask_id=None))
    with pytest.raises(ValueError, match="need a model with a mask token"):
        generate(model, [[5, 6]], GREEDY.replace(mode=mode, block_size=4))
    assert len(generate(model, [[5, 6]], GREEDY.replace(mode=mode, block_size=1)).rows[0].tokens) == 40


@pytest.fixture
def mask_loving_model(tiny_cfg):
    """A model whose bidirectional (adapter) passes put almost all mass on the MASK token and whose causal
    passes never predict it (so any MASK in an output came from a bidirectional prediction)."""
    model = random_model(tiny_cfg, seed=6, std=0.3)
    boost = torch.zeros(tiny_cfg.vocab_size)
    boost[tiny_cfg.mask_id] = 50.0

    def hook(module, args, out):
        adapter = torch.as_tensor(args[1] if len(args) > 1 else False).float()
        sign = 2 * (adapter[..., None] if adapter.dim() else adapter) - 1  # +1 on adapter rows, -1 on causal ones
        return out + boost * sign

    model.diffusion_head.register_forward_hook(hook)
    return model


def test_mask_token_is_never_emitted_from_a_bidirectional_prediction(mask_loving_model, tiny_cfg, prompts):
    mask_id = tiny_cfg.mask_id
    x = torch.tensor([[5, mask_id, mask_id, mask_id]])
    logits = mask_loving_model(
        x, torch.arange(4)[None], masks.bidirectional(torch.zeros(1, dtype=torch.long), 4, 0), adapter=True
    )
    assert (logits.argmax(-1) == mask_id).all()  # without the exclusion every masked slot would stay MASK
    ar = tokens(generate(mask_loving_model, prompts, GREEDY, eos_ids=[]))
    assert all(mask_id not in row for row in ar)
    for cfg in (
        GREEDY.replace(mode="diffusion", block_size=4),
        GREEDY.replace(mode="diffusion", block_size=4, temperature=1.0, seed=3),
    ):
        out = tokens(generate(mask_loving_model, prompts, cfg, eos_ids=[]))
        assert all(mask_id not in row for row in out) and all(len(row) == 40 for row in out)
    for variant in ("linear", "quadratic"):
        cfg = GREEDY.replace(mode="spec", spec_variant=variant, block_size=4)
        assert tokens(generate(mask_loving_model, prompts, cfg, eos_ids=[])) == ar
