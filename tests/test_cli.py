import json
import re
import subprocess
import sys

import pytest

from tridlm import checkpoint
from tridlm.cli import main


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_model, char_tokenizer):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(directory, tiny_model, char_tokenizer)
    return directory


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-c", "from tridlm.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_generate_json(tiny_checkpoint, mode, capsys):
    main(
        [
            "generate",
            "hello",
            "--model",
            str(tiny_checkpoint),
            "--mode",
            mode,
            "--block-size",
            "4",
            "--max-tokens",
            "12",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == mode and len(out["tokens"]) == out["completion_tokens"] <= 12
    assert out["tpf"] == pytest.approx(out["completion_tokens"] / out["nfe"]) and out["tok_s"] > 0
    assert out["block_size"] == 4 and isinstance(out["text"], str)
    if mode == "ar":  # one forward per token after the prefill's
        assert out["nfe"] == out["completion_tokens"] - 1
    assert (len(out["accepted_lengths"]) > 0) == (mode == "spec")


def test_spec_cli_equals_ar_cli(tiny_checkpoint, capsys):
    texts = []
    for mode in ("ar", "spec"):
        main(["generate", "abc", "--model", str(tiny_checkpoint), "--mode", mode, "--max-tokens", "30", "--json"])
        texts.append(json.loads(capsys.readouterr().out)["tokens"])
    assert texts[0] == texts[1]


def test_stream_prints_the_same_text(tiny_checkpoint, capsys):
    common = [
        "generate",
        "hi",
        "--model",
        str(tiny_checkpoint),
        "--max-tokens",
        "20",
        "--mode",
        "diffusion",
        "--block-size",
        "4",
    ]
    main(common)
    plain = capsys.readouterr().out
    main(common + ["--stream"])
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize(
    "args,message",
    [
        (["--block-size", "0"], "invalid block_size=0"),
        (["--mode", "fast"], "invalid choice: 'fast'"),
        (["--temperature", "hot"], "invalid float value: 'hot'"),
        (["--top-p", "1.5"], "invalid top_p=1.5"),
        (["--model", "/nonexistent"], "not a checkpoint directory"),
        (["--json", "--stream"], "not allowed with argument"),
        (["--regex", "[a-"], "unclosed character class"),
        (["--regex", "a+", "--json-object"], "not allowed with argument"),
        (["--json-schema", "/nonexistent/schema.json"], "No such file or directory"),
        (["--json-schema", '{"$ref": "#/nowhere"}'], "invalid json_schema"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tiny_checkpoint, args, message):
    argv = ["generate", "hi", "--model", str(tiny_checkpoint), *args]
    if "--model" in args:
        argv = ["generate", "hi", *args]
    result = run_cli(*argv)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.parametrize("mode", ["ar", "auto", "diffusion"])
def test_generate_holds_the_output_to_a_grammar(tiny_checkpoint, mode, tmp_path, capsys):
    (tmp_path / "answer.lark").write_text('start: "the " ANIMAL " is " /[a-z]{2,8}/ "."\nANIMAL: "cat" | "dog"\n')
    common = ["generate", "abc", "--model", str(tiny_checkpoint), "--mode", mode, "--max-tokens", "40"]
    for shape in (["--regex", r"the (cat|dog) is [a-z]{2,8}\."], ["--lark", str(tmp_path / "answer.lark")]):
        main([*common, *shape])
        assert re.fullmatch(r"the (cat|dog) is [a-z]{2,8}\.", capsys.readouterr().out.strip())


def test_block_size_defaults_per_device_and_mode(tiny_checkpoint, capsys):
    from tridlm.decode import SPEC_VARIANTS, GenerationConfig, modes

    for device in ("cpu", "cuda"):
        for row in modes.TABLE:
            GenerationConfig(mode=row.mode, spec_variant=row.spec_variant, block_size=row.default_block(device))
            assert row.default_block(device, trained_block=2) == min(2, row.default_block(device))
    assert modes.of("ar").default_block("cpu") == 1
    for variant in SPEC_VARIANTS:
        main(
            [
                "generate",
                "abc",
                "--model",
                str(tiny_checkpoint),
                "--mode",
                "spec",
                "--spec-variant",
                variant,
                "--max-tokens",
                "20",
                "--json",
            ]
        )
        out = json.loads(capsys.readouterr().out)
        assert out["block_size"] == modes.of("spec", variant).default_block("cpu")
        assert max(out["accepted_lengths"]) <= out["block_size"]
