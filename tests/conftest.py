"""Shared fixtures: a tiny seeded random model, a character tokenizer with a mask token, and the
real default model with an independent Hugging Face reference (loaded once per session)."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tridlm.model import ModelConfig
from tridlm.presets import preset, random_model
from tridlm.tokenizer import Tokenizer

SPECIALS = ["<pad>", "<bos>", "<eos>", "<mask>"]


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Converted models (the default model's NLD copy) go to a temporary folder, never the user's cache;
    subprocesses started by tests inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRIDLM_CACHE", str(tmp_path_factory.mktemp("tridlm-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    # A larger init scale than training would use gives peaked, non-degenerate distributions,
    # so greedy ties (which make float-level differences visible) are rare.
    return random_model(tiny_cfg, seed=0, std=0.3)


@pytest.fixture(scope="session")
def small_vocab_model():
    """A 16-token model: drafts and lookups match the verifier often enough to exercise multi-token accepts."""
    import dataclasses

    return random_model(dataclasses.replace(preset("tiny"), vocab_size=16), seed=2, std=0.3)


@pytest.fixture(scope="session")
def char_tokenizer(tiny_cfg) -> Tokenizer:
    """One token per character over the tiny model's vocabulary; ids 0-3 are specials."""
    chars = (string.ascii_lowercase + string.digits + " .,!?\n-:;'()")[: tiny_cfg.vocab_size - len(SPECIALS)]
    vocab = {t: i for i, t in enumerate(SPECIALS + list(chars))}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return Tokenizer(backend, chat_template=None, bos_id=1, eos_id=2)


@pytest.fixture(scope="session")
def chat_tokenizer(char_tokenizer) -> Tokenizer:
    """The character tokenizer with a chat template (``helpers.TEMPLATE``)."""
    from dataclasses import replace

    from helpers import TEMPLATE

    return replace(char_tokenizer, chat_template=TEMPLATE)


@pytest.fixture
def prompts() -> list[list[int]]:
    """Ragged prompts for the tiny model (no special tokens)."""
    return [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]


@pytest.fixture(scope="session")
def default_model():
    from tridlm import loading

    torch.manual_seed(0)
    return loading.open_default()


@pytest.fixture(scope="session")
def hf_reference():
    """transformers' own GGUF loader and tokenizer on the same file: independent dequantization,
    q/k un-permutation, tokenizer conversion and Llama forward."""
    transformers = pytest.importorskip("transformers")
    from tridlm import default_model

    path = default_model.gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer
