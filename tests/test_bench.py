import json

import pytest

from tridlm.decode import GenerationConfig
from tridlm.measure import harness, plots, reporting


def test_grid_expands_only_meaningful_settings():
    names = [s.name for s in harness.grid(["ar", "spec", "diffusion"], [4, 8], [0.9, None], [0.0], [1], 32)]
    assert names == [
        "ar",
        "spec B=4",
        "spec B=8",
        "diffusion B=4 t=0.9",
        "diffusion B=4 t=None",
        "diffusion B=8 t=0.9",
        "diffusion B=8 t=None",
    ]


def test_bench_on_tiny_model(tiny_model, char_tokenizer, tmp_path):
    settings = harness.grid(["ar", "spec", "diffusion"], [4], [0.5], [0.0], [1, 2], 12)
    prompts = [char_tokenizer.encode(t) for t in ("hello there", "abc", "what is this?")]
    runner = harness.Bench(tiny_model, char_tokenizer, settings, prompts, repeats=2, sweep=True, log=lambda *_: None)
    report = harness.finalize(runner.run())
    res = report["results"]
    assert set(res) == {s.name for s in settings}
    assert res["spec B=4"]["exact_match_vs_ar"] == 1.0 and res["ar bs=2"]["exact_match_vs_ar"] == 1.0
    assert res["spec B=4"]["accepted_hist"] and res["ar"]["accepted_hist"] == {}
    ar = res["ar"]
    assert ar["tokens"] == sum(min(12, n) for n in ar_lengths(tiny_model, prompts))
    assert ar["nfe"] == ar["tokens"] - len(prompts)  # one token per forward after each prefill
    assert ar["tok_s_min"] <= ar["tok_s"] <= ar["tok_s_max"] and ar["speedup_vs_ar"] == 1.0
    assert ar["gen_ppl"] > 1.0 and set(report["sweep_ms"]) == set(harness.SWEEP)
    text = reporting.table(report)
    assert "spec B=4" in text and "forward of n new tokens" in text
    paths = plots.bench(report, tmp_path / "b")
    assert all(p.stat().st_size > 1000 for p in paths) and len(paths) == 3
    json.dumps(report)


def ar_lengths(model, prompts):
    from tridlm.decode import generate

    return [len(r.tokens) for r in generate(model, prompts, GenerationConfig(max_tokens=12)).rows]


def test_prompt_set_formats(tmp_path, char_tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "abc"}\n\n{"prompt": "de"}\n')
    assert harness.load_prompts(path, char_tokenizer) == [char_tokenizer.encode("abc"), char_tokenizer.encode("de")]
    path.write_text('{"text": "abc"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1: expected a 'messages' or 'prompt' field"):
        harness.load_prompts(path, char_tokenizer)


def test_llamacpp_baseline_says_why_it_cannot_run(tmp_path, monkeypatch):
    import importlib.util

    from tridlm.measure.baselines import Baselines

    said = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # installed, but ...
    others = Baselines(["llama.cpp"], str(tmp_path), None, "cpu", log=said.append)
    assert others.names == [] and others.missing == {"llama.cpp": f"{tmp_path} is not a GGUF file"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    others = Baselines(["llama.cpp"], None, None, "cpu", log=said.append)
    assert others.names == [] and "llama-cpp-python is not installed" in others.missing["llama.cpp"]
    assert len(said) == 2 and all(line.startswith("llama.cpp baseline skipped") for line in said)
