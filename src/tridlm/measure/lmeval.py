"""tridlm as an lm-evaluation-harness model: ``tridlm``, registered with lm-eval's ``register_model`` on import.

- ``loglikelihood``: exact AR log-probabilities in every precision (``decode.score``): choices that share a context
  prefill it once, contexts go in batches.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of the model's context, each scored the same way.
- ``generate_until``: ``decode.generate`` in the configured mode (ar, auto, spec, diffusion with its knobs), the
  task's stop strings as stop strings; every generated row's counts are kept (``counts``: TPF, tok/s).

Through lm-eval's own entry points, after ``import tridlm.measure.lmeval``:
``lm_eval.simple_evaluate(model="tridlm", model_args="mode=spec,dtype=int4", tasks=[...])``; on the command line,
``tridlm lm-eval --model tridlm --model_args mode=spec --tasks tridlm_mmlu`` (lm-eval's CLI with the model registered
and the suite's tasks, ``measure.suite_data``, on its include path). ``tridlm eval mmlu`` (``run``) does this in
process, resumable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own models: its registry loads them only while it is empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from tridlm.decode import GenerationConfig, Row, generate, summarize
from tridlm.decode.score import score

CHUNK = 256  # requests between cache writes and progress updates


@register_model("tridlm")
class TridlmLM(TemplateLM):
    """lm-eval's model over a tridlm model. ``model_args``: the model source (``pretrained`` or ``model``: a folder or
    GGUF file, default the embedded model; ``dtype``, ``device``, ``adapter``, ``threads``) and any
    ``GenerationConfig`` field for ``generate_until`` (``mode``, ``block_size``, ``threshold``, ...); ``batch_size``:
    rows decoded together; ``batch_tokens``: context tokens prefilled together when scoring."""

    def __init__(
        self, model=None, tokenizer=None, gen: GenerationConfig | None = None, rows_file: str | None = None, **args
    ):
        super().__init__()
        from tridlm import loading

        source = {k: args.pop(k) for k in ("dtype", "device", "adapter", "threads") if k in args}
        path = args.pop("pretrained", None) or (model if isinstance(model, str) else None)
        batch_size = args.pop("batch_size", 1)
        self.batch_size = 1 if batch_size in (None, "auto") else int(batch_size)
        self.batch_tokens = int(args.pop("batch_tokens", 2048))
        args.pop("max_batch_size", None)
        knobs = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(args) - knobs)
        if unknown:
            raise ValueError(f"unknown tridlm model_args: {', '.join(unknown)}")
        self.gen = (gen or GenerationConfig()).replace(**args)
        if model is None or isinstance(model, str):
            model, tokenizer = loading.Source(model=path, **source).open()
        self.model, self.tok = model, tokenizer
        self.name = loading.model_name(path)
        # Every generated row by its question (``question_key``) with its share of the decoding wall time, for the
        # counts; with ``rows_file``, also those of earlier runs that wrote it (a resumed or extended run's cached
        # answers are not decoded again), one JSON line per row.
        self.rows_file = Path(rows_file) if rows_file else None
        self.generated: dict[str, tuple[Row, float]] = {}
        for line in self.rows_file.read_text().splitlines() if self.rows_file and self.rows_file.exists() else ():
            r = json.loads(line)
            row = Row(max_tokens=0, tokens=r["tokens"], nfe=r["nfe"], accepted_lengths=r["accepted"])
            self.generated.setdefault(r["key"], (row, r["wall_s"]))
        self.scored_tokens, self.score_s = 0, 0.0

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TridlmLM:
        """From ``--model_args`` as a string; of lm-eval's own options only ``--batch_size`` applies (its ``--device``
        defaults to cuda: the device is ``device=`` in ``model_args``, default cpu)."""
        return super().create_from_arg_string(arg_string, _batch_size_only(additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> TridlmLM:
        """From ``--model_args`` as a dict (what lm-eval's command line passes), as ``create_from_arg_string``."""
        return super().create_from_arg_obj(arg_dict, _batch_size_only(additional_config))

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.render_chat(chat_history, add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether it is the greedy continuation) per request, in their order."""
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][1]), requests[i][1]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in tqdm(range(0, len(order), CHUNK), disable=disable_tqdm, desc="loglikelihood"):
            chunk = order[start : start + CHUNK]
            results = self._score([(requests[i][1], requests[i][2]) for i in chunk])
            for i, s in zip(chunk, results):
                out[i] = (s.total, all(s.greedy))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def _score(self, pairs):
        begin = time.perf_counter()
        results = score(self.model, pairs, batch_tokens=self.batch_tokens)
        self.score_s += time.perf_counter() - begin
        contexts = {tuple(c) for c, _ in pairs}  # each prefilled once
        self.scored_tokens += sum(map(len, contexts)) + sum(len(t) for _, t in pairs)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood from lm-eval's disjoint windows of the model's context after the prefix token."""
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = request.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            ]
            out.append(sum(s.total for s in self._score(windows)))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation up to its first stop string (``until``), EOS or ``max_gen_toks`` tokens."""
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"generate_until ({self.gen.mode})")
        for start in range(0, len(requests), self.batch_size):
            batch = list(range(start, min(start + self.batch_size, len(requests))))
            by_kwargs: dict[str, list[int]] = {}
            for i in batch:
                by_kwargs.setdefault(repr(sorted(requests[i].args[1].items())), []).append(i)
            for members in by_kwargs.values():
                texts = self._generate([requests[i].args[0] for i in members], requests[members[0]].args[1])
                for i, text in zip(members, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(batch))
        bar.close()
        return out

    def _generate(self, contexts: list[str], kwargs: dict) -> list[str]:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        cfg = self.gen.replace(
            max_tokens=int(kwargs.get("max_gen_toks", 256)),
            stop=tuple(s for s in until if s),
            temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
        ).resolve(self.model)
        room = self.max_length - cfg.max_tokens - cfg.block_size - 1
        prompts = [self.tok_encode(c)[-room:] for c in contexts]  # the context's end, where it is too long
        begin = time.perf_counter()
        state = generate(self.model, prompts, cfg, detokenize=self.tok.decode)
        share = (time.perf_counter() - begin) / len(prompts)  # the batch's wall time split evenly
        for context, r in zip(contexts, state.rows):
            self.generated[question_key(context)] = (r, share)
            if self.rows_file:
                with self.rows_file.open("a") as f:
                    record = {"key": question_key(context), "tokens": r.tokens, "nfe": r.nfe}
                    f.write(json.dumps({**record, "accepted": r.accepted_lengths, "wall_s": share}) + "\n")
        return [state.text(i) for i in range(len(prompts))]

    def counts(self, keys: set[str] | None = None) -> dict:
        """What the run cost: the generated rows' counts (SPEC 2: tokens, NFE, TPF, tok/s over the decoding wall time;
        only the questions ``keys`` where given) and the tokens scored per second."""
        rows = [v for k, v in self.generated.items() if keys is None or k in keys]
        wall = sum(share for _, share in rows)
        generated = summarize([r for r, _ in rows], wall) if rows else {}
        return {
            **{k: generated.get(k) for k in ("completion_tokens", "nfe", "tpf", "tok_s", "accepted_mean")},
            "generate_s": wall,
            "scored_tokens": self.scored_tokens,
            "score_s": self.score_s,
            "scored_tok_s": self.scored_tokens / self.score_s if self.score_s else None,
        }


def question_key(context: str) -> str:
    """Which question a generated row answers (its context's hash): runs compare rows by it."""
    return hashlib.sha256(context.encode()).hexdigest()[:16]


def _batch_size_only(config: dict | None) -> dict:
    return {k: v for k, v in (config or {}).items() if k == "batch_size" and v is not None}


def run(task: str, model, tokenizer, gen: GenerationConfig, settings: dict, opts, progress: bool = True) -> dict:
    """``tridlm eval TASK`` for a task of the suite (``suite_data.TASKS``): lm-eval over the model, its answers cached
    in ``opts.runs`` under the run's settings (a killed run started again resumes), ``opts.limit`` the first N
    questions of each subject or task. Returns the scores (per subject for MMLU), the counts and the wall time."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tridlm.measure import evaluate, suite_data

    limit, runs = opts.limit, Path(opts.runs)
    name = evaluate.run_name(settings)  # not the limit: a run over more questions reuses a shorter one's answers
    runs.mkdir(parents=True, exist_ok=True)
    lm = TridlmLM(model, tokenizer, gen, rows_file=runs / f"{name}.rows.jsonl", batch_size=opts.batch_size)
    begin = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[suite_data.TASKS[task]],
        limit=limit,
        use_cache=str(runs / name),
        task_manager=TaskManager(include_path=str(suite_data.write_tasks())),
        log_samples=True,  # which questions it asked: the counts are over those
        bootstrap_iters=0,
        verbosity="ERROR" if not progress else None,
    )
    wall = time.perf_counter() - begin
    asked = {question_key(a[0]) for s in out["samples"].values() for d in s for a in d["arguments"] if len(a) == 2}
    results = out["results"]
    group = suite_data.TASKS[task]
    metrics = {k: v for k, v in results[group].items() if isinstance(v, float) and "stderr" not in k}
    subjects = {r["alias"].strip(" -"): r["acc,none"] for t, r in results.items() if t != group and "acc,none" in r}
    return {
        **settings,
        "limit": limit,
        "lm_eval_task": group,
        "questions": sum(v["effective"] for v in out["n-samples"].values()),
        "metrics": metrics,
        **({"subjects": subjects} if subjects else {}),
        **lm.counts(asked),
        "wall_s": wall,
        "run_file": str(runs / name),
    }


def describe(result: dict) -> str:
    """One line for a person: the scores beside the speed."""
    r = result
    scores = ", ".join(f"{k} {v:.1%}" for k, v in r["metrics"].items())
    speed = f", TPF {r['tpf']:.2f}, {r['tok_s']:.1f} tok/s" if r["tpf"] else ""
    scored = f", {r['scored_tok_s']:.0f} scored tok/s" if r["scored_tok_s"] else ""
    return (
        f"{r['task']} {r['mode']} {r['precision']}: {scores} over {r['questions']} questions{speed}{scored}, "
        f"{r['wall_s']:.0f} s ({r['run_file']})"
    )
