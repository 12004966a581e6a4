import pytest

from tridlm.tokenizer import TextStream

TEXTS = [
    "Hello world 12345 こんにちは",
    "  leading spaces\n\n\ttabs and émojis 🤖🤖 done",
    "def f(x):\n    return x**2  # comment\n",
    "I'm you're they'll 3.14159 $100,000",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_gguf_tokenizer_matches_transformers(default_model, hf_reference, text):
    _, tok = default_model
    _, hf_tok = hf_reference
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids


@pytest.mark.slow
def test_chat_template_matches_transformers(default_model, hf_reference):
    _, tok = default_model
    _, hf_tok = hf_reference
    for messages in (
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
    ):
        ref = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.render_chat(messages) == ref
        assert tok.encode_chat(messages) == hf_tok(ref, add_special_tokens=False).input_ids


@pytest.mark.slow
def test_mask_token_is_an_unused_special_token(default_model):
    model, tok = default_model
    mask = tok.backend.id_to_token(model.cfg.mask_id)
    assert mask.startswith("<") and mask not in tok.chat_template
    assert model.cfg.mask_id not in (tok.bos_id, tok.eos_id)


def test_chat_rejects_malformed_messages(char_tokenizer):
    from dataclasses import replace

    tok = replace(char_tokenizer, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(ValueError, match="'role' and 'content'"):
        tok.render_chat([{"role": "user"}])
    with pytest.raises(ValueError, match="no chat template"):
        char_tokenizer.render_chat([{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_text_stream_never_splits_utf8(default_model):
    _, tok = default_model
    text = "naïve 🤖 café ✓ 日本語"
    ids = tok.encode(text)
    stream = TextStream(tok)
    deltas = [stream.push([t]) for t in ids] + [stream.push([], final=True)]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_holds_back_stop_prefixes(char_tokenizer):
    stream = TextStream(char_tokenizer, stop=("end",))
    out = [stream.push(char_tokenizer.encode(c)) for c in "we en"]
    assert "".join(out) == "we "  # "en" might begin "end"
    out += [stream.push(char_tokenizer.encode(c)) for c in "d of it"]
    assert "".join(out) + stream.push([], final=True) == "we "
    other = TextStream(char_tokenizer, stop=("end",))
    assert other.push(char_tokenizer.encode("we en")) + other.push([], final=True) == "we en"
