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

MODULES = (
    "os",
    "os.path",
    "re",
    "json",
    "math",
    "random",
    "string",
    "itertools",
    "functools",
    "collections",
    "datetime",
    "pathlib",
    "shutil",
    "subprocess",
    "statistics",
    "textwrap",
    "heapq",
    "bisect",
    "csv",
    "hashlib",
    "time",
    "urllib.parse",
    "base64",
    "copy",
    "glob",
    "fnmatch",
    "difflib",
    "operator",
)
TEMPLATES = (
    "Explain what the Python function {name} does and give a short example.",
    "How do I use {name} in Python?",
    "What does {name} return? Answer briefly.",
    "Write a small Python snippet that uses {name}.",
)


TOPICS = (
    "photosynthesis",
    "black holes",
    "plate tectonics",
    "the water cycle",
    "vaccines",
    "climate change",
    "the French Revolution",
    "the Roman Empire",
    "the Industrial Revolution",
    "the printing press",
    "the Cold War",
    "ancient Egypt",
    "the Renaissance",
    "democracy",
    "supply and demand",
    "compound interest",
    "the stock market",
    "budgeting",
    "renewable energy",
    "electric cars",
    "recycling",
    "coral reefs",
    "honeybees",
    "volcanoes",
    "earthquakes",
    "hurricanes",
    "the moon",
    "Mars",
    "gravity",
    "electricity",
    "magnetism",
    "atoms",
    "DNA",
    "evolution",
    "the immune system",
    "sleep",
    "meditation",
    "running",
    "healthy breakfasts",
    "drinking enough water",
    "learning a new language",
    "public speaking",
    "time management",
    "remote work",
    "job interviews",
    "writing a resume",
    "saving money",
    "gardening",
    "houseplants",
    "baking bread",
    "making pasta",
    "brewing coffee",
    "green tea",
    "chocolate",
    "cheese",
    "vegetarian cooking",
    "camping",
    "hiking",
    "traveling on a budget",
    "photography",
    "painting",
    "playing the guitar",
    "learning piano",
    "chess",
    "soccer",
    "basketball",
    "the Olympic Games",
    "Shakespeare",
    "poetry",
    "science fiction",
    "fairy tales",
    "libraries",
    "museums",
    "friendship",
    "kindness",
    "rainy days",
    "the ocean",
    "mountains",
    "deserts",
    "rivers",
    "forests",
    "winter",
    "spring",
    "cats",
    "dogs",
    "owls",
    "dolphins",
    "elephants",
    "penguins",
    "the internet",
    "email etiquette",
    "passwords",
    "encryption",
    "open source software",
    "version control with git",
    "unit testing",
    "recursion",
    "binary search",
    "sorting algorithms",
    "hash tables",
    "linked lists",
    "binary trees",
    "graphs",
    "dynamic programming",
    "big O notation",
    "databases",
    "SQL joins",
    "REST APIs",
    "JSON",
    "HTML and CSS",
    "JavaScript promises",
    "Python decorators",
    "Python generators",
    "list comprehensions",
    "object-oriented programming",
    "functional programming",
    "operating systems",
    "compilers",
    "computer memory",
    "cloud computing",
    "machine learning",
    "neural networks",
    "statistics",
    "probability",
    "prime numbers",
    "fractions",
    "the Pythagorean theorem",
    "calculus",
    "maps",
    "the metric system",
    "time zones",
    "calendars",
    "bicycles",
    "trains",
    "airplanes",
    "bridges",
)
TOPIC_TEMPLATES = (
    "Explain {x} in simple terms.",
    "Give me three interesting facts about {x}.",
    "Write a short paragraph about {x}.",
    "What are the advantages and disadvantages of {x}?",
    "Write a four-line poem about {x}.",
    "How would you explain {x} to a ten-year-old?",
    "What are common misconceptions about {x}?",
    "Give me a short list of tips related to {x}.",
)
TASKS = (
    "reverses a string",
    "counts the vowels in a string",
    "returns the largest number in a list",
    "removes duplicates from a list while keeping order",
    "checks whether a number is prime",
    "computes the factorial of a number",
    "returns the n-th Fibonacci number",
    "merges two sorted lists",
    "flattens a nested list",
    "counts word frequencies in a text",
    "converts Celsius to Fahrenheit",
    "checks whether two strings are anagrams",
    "finds the second smallest element of a list",
    "reads a CSV file and prints each row",
    "computes the average of a list of numbers",
    "capitalizes the first letter of each word",
    "rotates a list by k positions",
    "finds the greatest common divisor of two numbers",
    "checks whether a year is a leap year",
    "transposes a matrix",
    "groups a list of words by their first letter",
    "validates an email address",
    "sums the digits of an integer",
    "returns the intersection of two lists",
    "sorts a dictionary by value",
)
TASK_TEMPLATES = (
    "Write a Python function that {x}.",
    "Write a JavaScript function that {x}.",
    "Describe step by step how to write a program that {x}.",
)


def stdlib_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct questions about public standard-library functions, in a seeded order."""
    names = []
    for mod in MODULES:
        module = importlib.import_module(mod)
        names += [
            f"{mod}.{k}"
            for k, v in vars(module).items()
            if not k.startswith("_") and (inspect.isfunction(v) or inspect.isbuiltin(v))
        ]
    rng = random.Random(seed)
    questions = [t.format(name=name) for name in sorted(set(names)) for t in TEMPLATES]
    rng.shuffle(questions)
    return questions[:n]


def general_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct general chat requests (topic and programming-task templates), in a seeded order."""
    questions = [t.format(x=x) for x in TOPICS for t in TOPIC_TEMPLATES]
    questions += [t.format(x=x) for x in TASKS for t in TASK_TEMPLATES]
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
