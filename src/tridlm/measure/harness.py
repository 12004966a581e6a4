"""Benchmark harness: speed and quality of every mode, beside the baselines a user would pick.

All configurations run in one process on one model, alternating within each repeat so machine drift
hits all of them alike; medians and spread over repeats. Counts follow SPEC 2: generated tokens only,
NFE after the prefill, TPF = tokens / NFE, tok/s over the wall time of the whole prompt set.
Baselines (``tridlm.measure.baselines``): transformers ``generate`` on the same weights (greedy, and prompt-lookup
speculative decoding) and llama.cpp on the same GGUF file. Quality: exact match of each greedy output
against our AR, generative perplexity under the AR model, and HumanEval pass@1 on a subset.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from tridlm import masks
from tridlm.decode import CostCurve, GenerationConfig, Row, generate
from tridlm.decode import summarize as decode_summary
from tridlm.decode.costs import latency_sweep, sync
from tridlm.measure.baselines import Baselines
from tridlm.measure.evaluate import HumanEval
from tridlm.measure.reporting import fmt, machine, peak_mb
from tridlm.model import TriModel
from tridlm.tokenizer import Tokenizer

SWEEP = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Setting:
    """One row of the benchmark: an engine and its decoding settings."""

    engine: str  # "tridlm" or a name of ``baselines.BASELINES``
    gen: GenerationConfig
    batch_size: int = 1

    @property
    def name(self) -> str:
        g = self.gen
        if self.engine != "tridlm":
            return self.engine
        parts = [g.row.label]
        if g.mode != "ar":
            parts.append(f"B={g.block_size}")
        if g.lookup is False:
            parts.append("no-lookup")
        if g.mode == "diffusion":
            parts.append(f"t={g.threshold}")
        if g.temperature:
            parts.append(f"T={g.temperature}")
        if self.batch_size > 1:
            parts.append(f"bs={self.batch_size}")
        return " ".join(parts)


def grid(
    modes, block_sizes, thresholds, temperatures, batch_sizes, max_tokens: int, spec_variants=("linear",)
) -> list[Setting]:
    """Every meaningful combination (AR ignores block size and threshold; spec ignores threshold)."""
    out = []
    for mode in modes:
        blocks = [1] if mode == "ar" else block_sizes
        thr = thresholds if mode == "diffusion" else [None]
        variants = spec_variants if mode == "spec" else ["linear"]
        for temp, bs, v, b, t in itertools.product(temperatures, batch_sizes, variants, blocks, thr):
            gen = GenerationConfig(
                mode=mode,
                block_size=b,
                threshold=t,
                temperature=temp,
                spec_variant=v,
                seed=0 if temp else None,
                max_tokens=max_tokens,
            )
            out.append(Setting("tridlm", gen, bs))
    return out


def load_prompts(path: Path | None, tokenizer: Tokenizer) -> list[list[int]]:
    """A JSONL prompt set: each line {"messages": [...]} (chat template applied) or {"prompt": "..."}.
    Default: the packaged set of 12 short chat requests."""
    text = Path(path).read_text() if path else (resources.files("tridlm") / "prompts" / "chat.jsonl").read_text()
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if "messages" in item:
            prompts.append(tokenizer.encode_chat(item["messages"]))
        elif "prompt" in item:
            prompts.append(tokenizer.encode(item["prompt"]))
        else:
            raise ValueError(f"{path}:{n}: expected a 'messages' or 'prompt' field")
    return prompts


def run_tridlm(model: TriModel, prompts: list[list[int]], s: Setting, costs: CostCurve | None = None) -> list[Row]:
    """Every prompt decoded by ``generate``, ``s.batch_size`` at a time; one finished row per prompt (``costs``: the
    cost curve auto plans with, the kept one when none is given)."""
    rows = []
    for i in range(0, len(prompts), s.batch_size):
        rows += generate(model, prompts[i : i + s.batch_size], s.gen, costs=costs).rows
        sync(model.device)
    return rows


@torch.inference_mode()
def answer_logprobs(model: TriModel, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """Float32 log-probabilities (len(answer), vocab) that one causal pass over prompt + answer (adapter off) gives
    at the positions predicting the answer's tokens."""
    n = len(prompt) + len(answer)
    logits = model(
        torch.tensor([prompt + answer], device=model.device),
        torch.arange(n, device=model.device)[None],
        masks.causal(torch.zeros(1, dtype=torch.long, device=model.device), n, 0),
    )
    return torch.log_softmax(logits[0, len(prompt) - 1 : -1].float(), -1)


@torch.inference_mode()
def generative_perplexity(model: TriModel, prompts: list[list[int]], outputs: list[Row]) -> float | None:
    """exp(mean NLL) of generated tokens under the AR model (causal passes, adapter off)."""
    nll, count = 0.0, 0
    for p, o in zip(prompts, outputs):
        if not o.tokens:
            continue
        logp = answer_logprobs(model, p, o.tokens)
        nll -= logp.gather(-1, torch.tensor(o.tokens, device=logp.device)[:, None]).sum().item()
        count += len(o.tokens)
    return float(torch.tensor(nll / count).exp()) if count else None


# ------------------------------------------------------------------------------------------- driver


@dataclass
class Bench:
    model: TriModel
    tokenizer: Tokenizer
    settings: list[Setting]
    prompts: list[list[int]]
    repeats: int = 3
    baselines: Baselines | None = None  # the other engines' settings run through it
    humaneval: int = 0  # problems; 0 = skip
    humaneval_settings: list[Setting] = field(default_factory=list)
    sweep: bool = True
    log: object = print

    @functools.cached_property
    def costs(self) -> CostCurve | None:
        """The cost curve every auto setting plans with, measured once up to the largest auto block."""
        auto = [s.gen.resolve(self.model) for s in self.settings + self.humaneval_settings if s.gen.row.plans]
        return CostCurve.measure(self.model, max(g.block_size for g in auto)) if auto else None

    def run(self) -> dict:
        results = {s.name: {"setting": _describe(s), "walls": [], "peak_mem_mb": None} for s in self.settings}
        outputs: dict[str, list[Row]] = {}
        self.log(f"warm-up ({len(self.settings)} settings)")
        for s in self.settings:
            self._run(s, self.prompts[:1], max_tokens=8)
        for rep in range(self.repeats):
            order = self.settings if rep % 2 == 0 else self.settings[::-1]  # alternate to spread drift
            for s in order:
                if torch.device(self.model.device).type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                outs = self._run(s, self.prompts)
                wall = time.perf_counter() - t
                results[s.name]["walls"].append(wall)
                results[s.name]["peak_mem_mb"] = peak_mb(self.model.device)
                outputs[s.name] = outs
                tokens = sum(len(o.tokens) for o in outs)
                self.log(f"  repeat {rep + 1}/{self.repeats}  {s.name:<24} {tokens / wall:7.1f} tok/s")
        reference = outputs.get("ar")
        for s in self.settings:
            results[s.name].update(self._summarize(s, outputs[s.name], reference))
        report = {
            "machine": machine(self.model),
            "prompts": len(self.prompts),
            "repeats": self.repeats,
            "max_tokens": self.settings[0].gen.max_tokens,
            "results": results,
        }
        if self.humaneval:
            report["humaneval"] = self._humaneval()
        if self.sweep:
            self.log("forward latency sweep")
            context = self.tokenizer.encode(Path(__file__).read_text())[:200]
            report["sweep_ms"] = latency_sweep(self.model, context, sizes=SWEEP)
        return report

    def _run(self, s: Setting, prompts, max_tokens: int | None = None) -> list[Row]:
        if max_tokens is not None:
            s = dataclasses.replace(s, gen=s.gen.replace(max_tokens=max_tokens))
        if s.engine == "tridlm":
            return run_tridlm(self.model, prompts, s, self.costs)
        return self.baselines.run(s.engine, prompts, s.gen.max_tokens, self.model.cfg.eos_ids)

    def _summarize(self, s: Setting, outs: list[Row], reference: list[Row] | None) -> dict:
        return summarize(self.model, self.prompts, outs, reference if s.gen.temperature == 0 else None)

    def _humaneval(self) -> dict:
        task = HumanEval()
        problems = task.problems()[: self.humaneval]
        prompts = [self.tokenizer.encode_chat([{"role": "user", "content": p.request}]) for p in problems]
        out = {"problems": len(problems)}
        for s in self.humaneval_settings:
            outs = self._run(s, prompts)
            passed = sum(task.score(p, self.tokenizer.decode(o.tokens)) for p, o in zip(problems, outs))
            out[s.name] = {"pass@1": passed / len(problems), "passed": passed, "tpf": decode_summary(outs)["tpf"]}
            self.log(f"  humaneval {s.name:<24} {passed}/{len(problems)} passed, TPF {fmt(out[s.name]['tpf'], '.2f')}")
        return out


def finalize(report: dict) -> dict:
    """Medians and spread of the timed repeats."""
    for name, r in report["results"].items():
        walls = r.pop("walls")
        tok_s = [r["tokens"] / w for w in walls]
        r["tok_s"] = statistics.median(tok_s)
        r["tok_s_min"], r["tok_s_max"] = min(tok_s), max(tok_s)
        r["wall_s"] = statistics.median(walls)
    base = report["results"]
    for ref in ("hf", "llama.cpp", "ar"):
        if ref in base:
            for r in base.values():
                r[f"speedup_vs_{ref}"] = r["tok_s"] / base[ref]["tok_s"]
    return report


def summarize(model: TriModel, prompts: list[list[int]], outs: list[Row], reference: list[Row] | None = None) -> dict:
    """One setting's counts (``tridlm.decode.summarize``: tokens, NFE, TPF, TTFT, ITL, accepted lengths) and
    generative perplexity under the AR model; with a (greedy) reference, the share of prompts whose tokens
    equal it."""
    counts = decode_summary(outs)
    summary = {
        "tokens": counts["completion_tokens"],
        "nfe": counts["nfe"],
        "tpf": counts["tpf"],
        "ttft_ms": _ms(counts["ttft_s"]),
        "itl_ms": _ms(counts["itl_s"]),
        "accepted_mean": counts["accepted_mean"],
        "accepted_hist": counts["accepted_hist"],
        "gen_ppl": generative_perplexity(model, prompts, outs),
    }
    if reference is not None:
        same = [o.tokens == r.tokens for o, r in zip(outs, reference)]
        summary["exact_match_vs_ar"] = sum(same) / len(same)
    return summary


def _describe(s: Setting) -> dict:
    g = s.gen
    return {
        "engine": s.engine,
        "mode": g.mode,
        "spec_variant": g.spec_variant,
        "block_size": g.block_size,
        "threshold": g.threshold,
        "temperature": g.temperature,
        "batch_size": s.batch_size,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3
