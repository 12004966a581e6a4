"""The top-level API: ``tridlm.load``, ``tridlm.generate`` and ``tridlm.stream`` over the full one."""

import sys
from dataclasses import replace

import tridlm
from tridlm.decode import GenerationConfig
from tridlm.decode import generate as decode_generate


def test_generate_and_stream_give_the_decoders_text(tiny_model, char_tokenizer):
    tok = replace(char_tokenizer, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}:")
    for prompt, ids in (
        ("hello there", tok.encode("hello there")),
        ([{"role": "user", "content": "hi"}], tok.encode_chat([{"role": "user", "content": "hi"}])),
    ):
        for knobs in ({"max_tokens": 20}, {"mode": "spec", "block_size": 4, "max_tokens": 20, "stop": ("e",)}):
            want = decode_generate(tiny_model, [ids], GenerationConfig(**knobs), detokenize=tok.decode).text(0)
            assert tridlm.generate(tiny_model, tok, prompt, **knobs) == want
            assert "".join(tridlm.stream(tiny_model, tok, prompt, **knobs)) == want


def test_the_package_imports_nothing_heavy():
    assert tridlm.__version__ and tridlm.__version__ != "0+unknown"  # installed: the version of its metadata
    import subprocess

    code = "import sys, tridlm, tridlm.cli; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
