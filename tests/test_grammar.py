"""Constrained decoding (``tridlm.grammar``): every exact mode gives constrained AR's tokens (greedy) and distribution
(sampling), outputs always match their grammar, and the grammar's forced tokens are verified together for free."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import pytest
import torch
from helpers import COSTS, chi_square, tokens
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tridlm import masks
from tridlm.decode import DecodeState, GenerationConfig, generate, stream
from tridlm.grammar import Constraint, GrammarError, Grammars
from tridlm.presets import preset, random_model
from tridlm.tokenizer import Tokenizer

PATTERN = r"the (cat|dog) is [a-z]{2,9}\.( it is [0-9]{1,3} years old\.)?"
EXACT = [
    GenerationConfig(mode="spec", block_size=4),
    GenerationConfig(mode="spec", spec_variant="quadratic", block_size=3),
    GenerationConfig(mode="spec", spec_variant="pipelined", block_size=4),
    GenerationConfig(mode="auto", block_size=6),
]


def grammar(tokenizer, model, kind, source=None):
    return Grammars(tokenizer, model.cfg.vocab_size, [tokenizer.eos_id]).compile(kind, source)


@pytest.mark.parametrize("cfg", EXACT, ids=lambda c: c.row.label)
def test_constrained_exact_modes_give_constrained_ars_tokens(tiny_model, char_tokenizer, prompts, cfg):
    g = grammar(char_tokenizer, tiny_model, "regex", PATTERN)
    ar_cfg = GenerationConfig(max_tokens=60, grammar=g)
    ar = generate(tiny_model, prompts, ar_cfg, detokenize=char_tokenizer.decode)
    got = generate(tiny_model, prompts, cfg.replace(max_tokens=60, grammar=g), costs=COSTS)
    assert tokens(got) == tokens(ar)
    for i, row in enumerate(ar.rows):  # what a random model writes, held to the pattern
        assert row.finish_reason == "stop" and re.fullmatch(PATTERN, ar.text(i)), ar.text(i)
    alone = [generate(tiny_model, [p], cfg.replace(max_tokens=60, grammar=g), costs=COSTS) for p in prompts]
    assert [s.rows[0].tokens for s in alone] == tokens(ar)  # batch == single


def test_greedy_masks_only_where_the_models_choice_is_refused(tiny_model, char_tokenizer, prompts, monkeypatch):
    """A greedy decode computes a mask only where the grammar refuses the model's own choice, and chooses what the
    full masks choose (with log-probabilities recorded every mask is computed: they are over the masked logits)."""
    masks, compute = [], Constraint._allowed
    monkeypatch.setattr(Constraint, "_allowed", lambda c: masks.append(1) or compute(c))
    g = grammar(char_tokenizer, tiny_model, "regex", PATTERN)
    for cfg in (GenerationConfig(max_tokens=60), EXACT[-1].replace(max_tokens=60)):
        masks.clear()
        lazy = generate(tiny_model, prompts, cfg.replace(grammar=g), costs=COSTS)
        lazy_masks = len(masks)
        full = generate(tiny_model, prompts, cfg.replace(grammar=g, logprobs=0), costs=COSTS)
        assert tokens(lazy) == tokens(full)
        assert 0 < lazy_masks < len(masks) - lazy_masks, (lazy_masks, len(masks) - lazy_masks)


def test_unconstrained_output_differs_so_the_grammar_is_what_holds_it(tiny_model, char_tokenizer, prompts):
    free = generate(tiny_model, prompts, GenerationConfig(max_tokens=60), detokenize=char_tokenizer.decode)
    assert not any(re.fullmatch(PATTERN, free.text(i)) for i in range(len(prompts)))


def test_forced_tokens_are_verified_in_one_forward(tiny_model, char_tokenizer):
    g = grammar(char_tokenizer, tiny_model, "regex", r"abcdefghij[0-9]")
    for cfg in (GenerationConfig(mode="spec", spec_variant="pipelined", block_size=8), GenerationConfig(mode="auto")):
        state = generate(tiny_model, [[5, 6, 7]], cfg.replace(max_tokens=20, grammar=g), costs=COSTS)
        assert char_tokenizer.decode(state.rows[0].tokens[:10]) == "abcdefghij"
        # "a" from the prefill; then the forced "bcdefgh" verified in one forward with the bonus "i"; "j" and the digit
        assert state.rows[0].accepted_lengths[0] == 8 and state.rows[0].nfe <= 3, state.rows[0].accepted_lengths


def five_letter_tokenizer() -> Tokenizer:
    """a..e are ids 0-4, the mask token 5 (the vocabulary of the 6-token model below)."""
    backend = HFTokenizer(models.WordLevel({**{c: i for i, c in enumerate("abcde")}, "<mask>": 5}, unk_token="<mask>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken("<mask>", special=True)])
    return Tokenizer(backend, chat_template=None, bos_id=None, eos_id=5)


@pytest.mark.parametrize(
    "cfg",
    [
        GenerationConfig(mode="spec", block_size=4),
        GenerationConfig(mode="spec", spec_variant="pipelined", block_size=4),
    ],
    ids=lambda c: c.row.label,
)
def test_sampled_constrained_output_is_distributed_as_constrained_ar(cfg):
    """The first token among a-c, the next among a-d (never e), at temperature 1 with top-k: the samples follow
    AR's distribution over the masked logits, enumerated exactly."""
    scipy_stats = pytest.importorskip("scipy.stats")
    model = random_model(dataclasses.replace(preset("tiny"), vocab_size=6, mask_id=5), seed=4, std=0.5)
    g = grammar(five_letter_tokenizer(), model, "regex", "[a-c][a-d]{5,}")
    prompt, n = [1, 2, 3, 1, 2], 4
    cfg = cfg.replace(temperature=1.0, top_k=3, seed=7, max_tokens=n, grammar=g)
    allowed = torch.tensor([[True] * 3 + [False] * 3] + [[True] * 4 + [False] * 2] * (n - 1))  # (n, V) per position
    seqs = torch.tensor(list(itertools.product(range(6), repeat=n)))
    x = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        logits = model(x, torch.arange(x.shape[1]).expand(len(x), -1), masks.causal(torch.zeros(len(x)).long(), 9, 0))
    probs = cfg.sampler.distribution(logits[:, len(prompt) - 1 : -1].masked_fill(~allowed, float("-inf")))
    expected = probs.gather(-1, seqs[..., None])[..., 0].prod(-1)
    state = generate(model, [prompt] * 4000, cfg, eos_ids=[])
    samples = torch.tensor(tokens(state))
    assert bool((samples[:, 0] < 3).all() and (samples < 4).all())
    stat, dof = chi_square(samples, expected, 6)
    assert scipy_stats.chi2.sf(stat, dof) > 1e-3
    assert max(state.stats()["accepted_hist"]) >= 2  # drafts were accepted, not only resampled


def test_json_schema_output_is_valid_in_every_mode(default_model):
    model, tok = default_model
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    }
    g = grammar(tok, model, "json_schema", schema)
    prompt = tok.encode_chat([{"role": "user", "content": "Give me a JSON person with a name, an age and a city."}])
    ar = generate(model, [prompt], GenerationConfig(max_tokens=60, grammar=g), detokenize=tok.decode)
    person = json.loads(ar.text(0))
    assert set(person) == {"name", "age", "city"} and isinstance(person["age"], int)
    # every mask computed (log-probabilities are over the masked logits): the greedy shortcut's tokens, where the
    # grammar forces keys and punctuation (the mask then allows only their canonical tokens)
    full = generate(model, [prompt], GenerationConfig(max_tokens=60, grammar=g, logprobs=0))
    assert full.rows[0].tokens == ar.rows[0].tokens
    for cfg in EXACT:
        assert (
            generate(model, [prompt], cfg.replace(max_tokens=60, grammar=g), costs=COSTS).rows[0].tokens
            == ar.rows[0].tokens
        )
    diffusion = generate(
        model, [prompt], GenerationConfig(mode="diffusion", max_tokens=60, grammar=g), detokenize=tok.decode
    )
    assert set(json.loads(diffusion.text(0))) == {"name", "age", "city"}  # its own answer, in the schema's form


@pytest.mark.parametrize(
    ("kind", "source", "message"),
    [
        ("json_schema", {"type": "object", "properties": {"a": {"$ref": "#/defs/x"}}}, "'/defs/x' does not exist"),
        ("json_schema", "{not json", "invalid json_schema"),
        ("regex", "[a-", "unclosed character class"),
        ("lark", "start: x", 'unknown name: "x"'),
        ("xml", "", "unknown grammar kind 'xml'"),
    ],
)
def test_a_bad_grammar_is_refused_with_what_is_wrong(tiny_model, char_tokenizer, kind, source, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        grammar(char_tokenizer, tiny_model, kind, source)


@pytest.mark.parametrize(
    "cfg",
    [
        GenerationConfig(mode="diffusion", block_size=4),
        GenerationConfig(mode="diffusion", block_size=8, threshold=None),
        GenerationConfig(mode="diffusion", block_size=6, temperature=0.9, seed=3),
    ],
    ids=["B4", "B8-one-per-step", "B6-sampled"],
)
def test_diffusion_commits_only_what_the_grammar_accepts_in_order(tiny_model, char_tokenizer, prompts, cfg):
    g = grammar(char_tokenizer, tiny_model, "regex", PATTERN)
    got = generate(tiny_model, prompts, cfg.replace(max_tokens=60, grammar=g), detokenize=char_tokenizer.decode)
    for i, row in enumerate(got.rows):
        assert row.finish_reason == "stop" and re.fullmatch(PATTERN, got.text(i)), got.text(i)
    if cfg.sampler.greedy:  # a sampled batch shares one generator among its rows
        alone = [generate(tiny_model, [p], cfg.replace(max_tokens=60, grammar=g)) for p in prompts]
        assert [s.rows[0].tokens for s in alone] == tokens(got)  # batch == single


def test_diffusion_commits_the_grammars_forced_tokens_at_once(tiny_model, char_tokenizer):
    g = grammar(char_tokenizer, tiny_model, "regex", r"abcdefghij[0-9]")
    cfg = GenerationConfig(mode="diffusion", block_size=8, max_tokens=20, grammar=g)
    state = DecodeState(1, cfg, tiny_model.cfg.eos_ids, char_tokenizer.decode, trace=True)
    events = [
        e for _ in stream(tiny_model, [[5, 6, 7]], cfg, state=state) for _, row in state.take_trace() for e in row
    ]
    assert re.fullmatch(r"abcdefghij[0-9]", state.text(0))
    # "a" from the prefill; its block's forced "bcdefgh" all certain in the first denoising step
    assert events[0]["type"] == "denoise" and events[0]["new"] == list(range(1, 8)), events[0]


def test_constrained_rows_in_the_continuous_batch_get_their_tokens_beside_free_ones(tiny_model, char_tokenizer):
    """Rows joining a running batch at different steps, constrained and free, AR (greedy and seeded sampling) and auto:
    each gets the tokens it gets decoded alone; constrained auto rows take the grammar's forced tokens in a step."""
    from tridlm.decode.batcher import Batcher

    g = grammar(char_tokenizer, tiny_model, "regex", PATTERN)
    cfgs = [
        GenerationConfig(max_tokens=50, grammar=g),
        GenerationConfig(max_tokens=30),
        GenerationConfig(mode="auto", block_size=8, max_tokens=50, grammar=g),
        GenerationConfig(mode="auto", block_size=8, max_tokens=30),
        GenerationConfig(max_tokens=50, grammar=g, temperature=0.8, seed=5),
    ]
    prompts = [[5, 9, 11], [7] * 12, [4, 8, 15, 16], [3, 30, 31, 6], [12, 13]]
    batcher, states, steps = Batcher(tiny_model, 3, 128, costs=COSTS), [], 0
    while len(states) < len(cfgs) or batcher.slots:
        if len(states) < len(cfgs) and batcher.free and steps % 2 == 0:
            k, cfg = len(states), cfgs[len(states)]
            states.append(DecodeState(1, cfg.resolve(tiny_model), tiny_model.cfg.eos_ids, None))
            seed = None if cfg.seed is None else torch.Generator().manual_seed(cfg.seed)
            batcher.admit(states[-1], 0, prompts[k], seed)
        batcher.step()
        steps += 1
    for k, (cfg, state) in enumerate(zip(cfgs, states)):
        assert state.rows[0].tokens == generate(tiny_model, [prompts[k]], cfg, costs=COSTS).rows[0].tokens, k
    assert max(states[2].rows[0].accepted_lengths) >= 3  # forced tokens verified in one step
