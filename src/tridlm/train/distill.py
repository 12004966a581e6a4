"""Self-distillation data: the base model's own greedy answers to prompts, as chat JSONL.

A draft adapter must predict what the AR model will say, so the best training text is exactly that.
Prompts come from the Python standard library (one question per public function), which every machine
with Python has, so the corpus is rebuilt anywhere with the same command.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from pathlib import Path

from tridlm.decode import GenerationConfig, generate
from tridlm.model import TriModel
from tridlm.tokenizer import Tokenizer

MODULES = ("os", "os.path", "re", "json", "math", "random", "string", "itertools", "functools", "collections",
           "datetime", "pathlib", "shutil", "subprocess", "statistics", "textwrap", "heapq", "bisect", "csv",
           "hashlib", "time", "urllib.parse", "base64", "copy", "glob", "fnmatch", "difflib", "operator")
TEMPLATES = ("Explain what the Python function {name} does and give a short example.",
             "How do I use {name} in Python?",
             "What does {name} return? Answer briefly.",
             "Write a small Python snippet that uses {name}.")


def stdlib_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct questions about public standard-library functions, in a seeded order."""
    names = []
    for mod in MODULES:
        module = importlib.import_module(mod)
        names += [f"{mod}.{k}" for k, v in vars(module).items()
                  if not k.startswith("_") and (inspect.isfunction(v) or inspect.isbuiltin(v))]
    rng = random.Random(seed)
    questions = [t.format(name=name) for name in sorted(set(names)) for t in TEMPLATES]
    rng.shuffle(questions)
    return questions[:n]


def distill(model: TriModel, tokenizer: Tokenizer, prompts: list[str], out: Path, batch: int = 16,
            max_tokens: int = 128, log=print) -> int:
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
