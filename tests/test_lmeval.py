"""tridlm as an lm-eval model (``measure.lmeval``) and the suite's tasks (``measure.suite_data``): its answers are the
decoders' and the scorer's, lm-eval's own client through ``tridlm serve`` chooses what it chooses in process, and
``tridlm eval`` over the suite resumes from its cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from tridlm.decode import GenerationConfig, generate  # noqa: E402
from tridlm.decode.score import score  # noqa: E402
from tridlm.measure import suite_data  # noqa: E402
from tridlm.measure.lmeval import TridlmLM, question_key  # noqa: E402


def instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_is_the_scorers_over_lm_evals_token_split(tiny_model, char_tokenizer):
    lm = TridlmLM(tiny_model, char_tokenizer)
    pairs = [("the cat sat", " on"), ("the cat sat", " in"), ("a", "b c d"), ("", "hello")]
    got = lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:  # lm-eval moves the context's trailing space to the continuation; the tokenizer is per character
            ids, cont = char_tokenizer.encode(context), char_tokenizer.encode(continuation)
        else:  # an empty context is the prefix token (BOS)
            ids, cont = [char_tokenizer.bos_id], char_tokenizer.encode(continuation)
        (s,) = score(tiny_model, [(ids, cont)])
        assert logprob == pytest.approx(s.total, abs=1e-4) and greedy == all(s.greedy)
    assert lm.counts()["scored_tokens"] > 0


def test_rolling_loglikelihood_scores_every_token_once_after_the_prefix(tiny_model, char_tokenizer):
    lm = TridlmLM(tiny_model, char_tokenizer)
    text = "the quick brown fox"
    (got,) = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    (s,) = score(tiny_model, [([char_tokenizer.bos_id], char_tokenizer.encode(text))])
    assert got == pytest.approx(s.total, abs=1e-4)


@pytest.mark.parametrize("mode", ["ar", "spec", "diffusion"])
def test_generate_until_is_the_decoders_text_with_the_tasks_stops(tiny_model, char_tokenizer, mode):
    lm = TridlmLM(tiny_model, char_tokenizer, GenerationConfig(mode=mode, block_size=4))
    kwargs = {"until": ["e"], "max_gen_toks": 20, "do_sample": False}
    contexts = ["hello there", "one more", "x"]
    got = lm.generate_until(instances("generate_until", [(c, kwargs) for c in contexts]), disable_tqdm=True)
    cfg = GenerationConfig(mode=mode, block_size=4, max_tokens=20, stop=("e",))
    for context, text in zip(contexts, got):
        want = generate(tiny_model, [char_tokenizer.encode(context)], cfg, detokenize=char_tokenizer.decode).text(0)
        assert text == want
    counts = lm.counts()
    assert counts["completion_tokens"] == sum(len(r.tokens) for r, _ in lm.generated.values()) and counts["tpf"] > 0


def test_counts_are_over_the_questions_asked_and_survive_a_new_process(tiny_model, char_tokenizer, tmp_path):
    rows_file = tmp_path / "run.rows.jsonl"
    lm = TridlmLM(tiny_model, char_tokenizer, GenerationConfig(mode="spec", block_size=4), rows_file=str(rows_file))
    kwargs = {"until": [], "max_gen_toks": 12, "do_sample": False}
    lm.generate_until(instances("generate_until", [(c, kwargs) for c in ("ab", "cd", "ef")]), disable_tqdm=True)
    again = TridlmLM(tiny_model, char_tokenizer, rows_file=str(rows_file))  # a resumed run reads the rows back
    first = question_key("ab")
    assert again.counts()["completion_tokens"] == lm.counts()["completion_tokens"] == 36
    row, _ = lm.generated[first]
    assert again.counts({first})["completion_tokens"] == 12 and again.counts({first})["nfe"] == row.nfe


def test_unknown_model_args_are_refused(tiny_model, char_tokenizer):
    with pytest.raises(ValueError, match="unknown tridlm model_args: colour"):
        TridlmLM(tiny_model, char_tokenizer, colour="blue")


def test_the_suites_data_has_every_question(tmp_path):
    subjects = suite_data.mmlu()
    assert len(subjects) == 57 and sum(map(len, subjects.values())) == 14042
    assert all(d["answer"] in range(4) and len(d["choices"]) == 4 for docs in subjects.values() for d in docs)
    assert len(suite_data.arc_challenge()) == 1172 and len(suite_data.gsm8k()) == 1319
    truthful = suite_data.truthfulqa_mc1()
    assert len(truthful) == 817 and all(sum(d["mc1_targets"]["labels"]) == 1 for d in truthful)
    first = [d["mc1_targets"]["labels"].index(1) for d in truthful]
    assert len(set(first)) > 3, "the correct answer is not always in one place after the shuffle"
    folder = suite_data.write_tasks(tmp_path)
    assert (folder / "tridlm_mmlu.yaml").exists() and len(list(folder.glob("tridlm_mmlu_*.yaml"))) == 57


@pytest.mark.slow
def test_tridlm_eval_runs_lm_eval_and_resumes_from_its_cache(tmp_path):
    run = [sys.executable, "-m", "tridlm", "eval", "arc-challenge", "--limit", "6", "--json", "--runs", str(tmp_path)]
    first = json.loads(subprocess.run(run, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert first["questions"] == 6 and first["scored_tokens"] > 0 and 0 <= first["metrics"]["acc,none"] <= 1
    again = json.loads(subprocess.run(run, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert again["metrics"] == first["metrics"] and again["scored_tokens"] == 0  # every answer from the cache


@pytest.mark.slow
@pytest.mark.server
def test_lm_evals_local_completions_through_the_server_chooses_as_in_process(default_model, tmp_path):
    """Stock lm-eval's local-completions client, pointed at ``tridlm serve``, gets the same log-likelihoods and so
    the same choice as the in-process backend on the first MMLU question of ten subjects (``make eval`` compares
    them on 1,140 questions: bench/lm_eval_agreement.py)."""
    import lm_eval
    from helpers import running
    from lm_eval.tasks import TaskManager

    model, tokenizer = default_model
    tokenizer.save(tmp_path)  # the Hugging Face tokenizer local-completions counts the context with
    tasks = TaskManager(include_path=str(suite_data.write_tasks(tmp_path / "tasks")))
    subjects = ["tridlm_mmlu_" + s.replace(" ", "_") for s in list(suite_data.mmlu())[:10]]

    def chosen(lm, **args) -> dict:
        out = lm_eval.simple_evaluate(model=lm, tasks=subjects, limit=1, task_manager=tasks, **args)
        return {
            (task, s["doc_id"]): [float(r[0]) for r in s["filtered_resps"]]
            for task, samples in out["samples"].items()
            for s in samples
        }

    in_process = chosen(TridlmLM(model, tokenizer))
    with running(model, tokenizer) as url:
        args = f"model=tiny,base_url={url}/v1/completions,tokenizer={tmp_path},tokenizer_backend=huggingface"
        served = chosen("local-completions", model_args=args, batch_size=4)  # a question's choices in one request
    assert served.keys() == in_process.keys() and len(served) == 10
    for key, scores in in_process.items():
        assert torch.tensor(served[key]).argmax() == torch.tensor(scores).argmax(), key
        torch.testing.assert_close(torch.tensor(served[key]), torch.tensor(scores), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_lm_evals_own_command_line_runs_the_tridlm_model_on_the_suites_tasks(tmp_path):
    run = [sys.executable, "-m", "tridlm", "lm-eval", "--model", "tridlm", "--model_args", "mode=spec,block_size=4"]
    run += ["--tasks", "tridlm_gsm8k", "--limit", "2", "--output_path", str(tmp_path)]
    out = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "tridlm_gsm8k" in out and "exact_match" in out and "flexible-extract" in out
