"""Self-distillation data: the base model's own greedy answers to prompts, as chat JSONL.

A draft adapter must predict what the AR model will say, so the best training text is exactly that.
Prompts are generated, so the corpus is rebuilt anywhere with the same command. Two sources:

- ``mixed``: questions about the Python standard library (one per public function and template, from the
  running interpreter) mixed with general chat requests (task templates crossed with a topic list and
  small programming tasks); a few thousand at most.
- ``magpie``: requests the model writes itself, sampled from the chat template cut where a user message
  begins (the Magpie recipe); as many as wanted, in the model's own distribution.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from importlib import resources
from pathlib import Path

from tridlm.decode import GenerationConfig, generate
from tridlm.model import TriModel
from tridlm.tokenizer import Tokenizer


def _templates() -> dict:
    """The lists the ``mixed`` source crosses: stdlib modules, topics and tasks with their templates."""
    return json.loads((resources.files("tridlm") / "prompts" / "distill.json").read_text())


def stdlib_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct questions about public standard-library functions, in a seeded order."""
    data, names = _templates(), []
    for mod in data["stdlib_modules"]:
        module = importlib.import_module(mod)
        names += [
            f"{mod}.{k}"
            for k, v in vars(module).items()
            if not k.startswith("_") and (inspect.isfunction(v) or inspect.isbuiltin(v))
        ]
    rng = random.Random(seed)
    questions = [t.format(name=name) for name in sorted(set(names)) for t in data["stdlib_templates"]]
    rng.shuffle(questions)
    return questions[:n]


def general_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct general chat requests (topic and programming-task templates), in a seeded order."""
    data = _templates()
    questions = [t.format(x=x) for x in data["topics"] for t in data["topic_templates"]]
    questions += [t.format(x=x) for x in data["tasks"] for t in data["task_templates"]]
    random.Random(seed).shuffle(questions)
    return questions[:n]


def mixed_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts alternating general requests and stdlib questions while both last."""
    general, stdlib = general_prompts(n, seed), stdlib_prompts(n, seed)
    mixed = [p for pair in zip(general, stdlib) for p in pair]
    longer = general if len(general) > len(stdlib) else stdlib
    return (mixed + longer[len(mixed) // 2 :])[:n]


def heldout_requests() -> tuple[str, ...]:
    """The user messages of the packaged chat prompts (bench and eval-draft), kept out of training."""
    text = (resources.files("tridlm") / "prompts" / "chat.jsonl").read_text()
    return tuple(
        m["content"]
        for line in text.splitlines()
        if line.strip()
        for m in json.loads(line)["messages"]
        if m["role"] == "user"
    )


def user_turn_prefix(tokenizer: Tokenizer) -> list[int]:
    """Token ids of the chat template up to where a user message's text begins."""
    marker = "\x00user message\x00"
    text = tokenizer.render_chat([{"role": "user", "content": marker}], add_generation_prompt=False)
    if marker not in text:
        raise ValueError("the chat template does not show the user's message verbatim")
    return tokenizer.encode(text.split(marker)[0])


def magpie_prompts(
    model: TriModel,
    tokenizer: Tokenizer,
    n: int,
    batch: int = 64,
    seed: int = 0,
    max_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.95,
    exclude: tuple[str, ...] = (),
    log=print,
) -> list[str]:
    """n distinct user requests written by the model: samples after the user-turn prefix, kept when the
    model ended the message itself (not cut at max_tokens) and it is new and not in ``exclude``.
    Deterministic for a seed and batch size on one device."""
    prefix = user_turn_prefix(tokenizer)
    seen, prompts = set(exclude), []
    for round_ in range(max(8, 4 * -(-n // batch))):  # give up when most samples are rejected
        cfg = GenerationConfig(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed * 1_000_003 + round_
        )
        state = generate(model, [prefix] * batch, cfg, detokenize=tokenizer.decode)
        for j, row in enumerate(state.rows):
            text = state.text(j).strip()
            if row.finish_reason == "stop" and text and text not in seen:
                seen.add(text)
                prompts.append(text)
        log(f"magpie: {min(len(prompts), n)}/{n} prompts written")
        if len(prompts) >= n:
            return prompts[:n]
    raise ValueError(
        f"only {len(prompts)} of {n} sampled requests were complete and distinct; raise max_tokens or lower n"
    )


SOURCES = ("mixed", "magpie")


def prompts_from(source: str, model: TriModel, tokenizer: Tokenizer, n: int, batch: int, seed: int) -> list[str]:
    """n prompts to distill on: "mixed" (stdlib questions and templated requests) or "magpie" (requests the
    model writes itself, the held-out bench prompts excluded)."""
    if source == "magpie":
        return magpie_prompts(model, tokenizer, n, batch, seed, exclude=heldout_requests())
    if source == "mixed":
        return mixed_prompts(n, seed)
    raise ValueError(f"invalid source={source!r}: expected one of {', '.join(SOURCES)}")


def distill(
    model: TriModel,
    tokenizer: Tokenizer,
    prompts: list[str],
    out: Path,
    batch: int = 16,
    max_tokens: int = 128,
    log=print,
) -> int:
    """Answer each prompt greedily with the AR model (in batches) and write chat records; returns count.
    Answers cut at max_tokens are kept: they are still exactly what the AR model says."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = GenerationConfig(max_tokens=max_tokens)
    written = 0
    with out.open("w") as f:
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            ids = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in chunk]
            state = generate(model, ids, cfg, detokenize=tokenizer.decode)
            for j, p in enumerate(chunk):  # truncated answers too: they are still what AR says
                messages = [{"role": "user", "content": p}, {"role": "assistant", "content": state.text(j)}]
                f.write(json.dumps({"messages": messages}) + "\n")
                written += 1
            log(f"distill: {i + len(chunk)}/{len(prompts)} prompts answered")
    return written
