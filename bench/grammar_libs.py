"""Which constrained-decoding library: llguidance, xgrammar and outlines-core side by side on this CPU with the default
model's tokenizer (what docs/design.md's choice rests on).

For each JSON schema of bench/structured.py (a small object, a nested order, and the reply form of two tools that
``serve.tools`` builds) and each library that imports: the compile time, then the per-token cost of the mask along a
valid output (its compact JSON, tokenized), each step computing the next mask into a bitmask (outlines-core: the
allowed list) and advancing by the next token, which must be allowed. Libraries missing here are reported as such
(xgrammar needs torch, transformers and triton; outlines-core and xgrammar are not dependencies of tridlm).

    .venv/bin/python bench/grammar_libs.py [--repeats 5] [--out bench/results]

writes OUT/grammar-libs-DATE.json and prints one table row per library and schema.
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import structured
import torch

from tridlm import loading
from tridlm.measure import reporting

CASES = {  # bench/structured.py's schemas, each with a valid value
    "person": (structured.PERSON, {"name": "Ada Lovelace", "born": 1815, "city": "London"}),
    "order": (
        structured.ORDER,
        {"customer": "Tom Baker", "items": [{"product": "green tea", "quantity": 2}], "express": True},
    ),
    "tool call": (
        structured.REQUESTS["weather call"][1],
        {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]},
    ),
}


def byte_vocab(tok) -> list[bytes]:
    """Each token's bytes (byte-level BPE: GPT-2's byte-to-character table reversed)."""
    chars = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in chars:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    vocab = tok.backend.get_vocab()
    out = [b""] * tok.vocab_size
    for text, i in vocab.items():
        out[i] = bytes(table[c] for c in text) if all(c in table for c in text) else text.encode()
    return out


def llguidance_walk(tok, model, schema, ids, unpacked=False):
    """The library's bitmask; ``unpacked``: the boolean mask tridlm applies (``Constraint.allowed``)."""
    import llguidance.torch

    from tridlm.grammar import Grammars

    grammars = Grammars(tok, model.cfg.vocab_size, model.cfg.eos_ids)
    grammars.tokens  # noqa: B018  (built once, outside the compile time)
    start = time.perf_counter()
    constraint = grammars.compile("json_schema", schema).start()
    compiled = time.perf_counter() - start
    bitmask = llguidance.torch.allocate_token_bitmask(1, model.cfg.vocab_size)
    steps = []
    for t in ids:
        begin = time.perf_counter()
        if unpacked:
            ok = bool(constraint.allowed()[t])
        else:
            llguidance.torch.fill_next_token_bitmask(constraint.matcher, bitmask)
        steps.append(time.perf_counter() - begin)
        ok = ok if unpacked else (int(bitmask[0, t // 32]) >> (t % 32)) & 1
        assert ok, "llguidance refused a valid token"
        constraint.commit([t])
    return compiled, steps


def xgrammar_walk(tok, model, schema, ids):
    import xgrammar

    info = xgrammar.TokenizerInfo(
        byte_vocab(tok), vocab_size=model.cfg.vocab_size, stop_token_ids=list(model.cfg.eos_ids)
    )
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    start = time.perf_counter()
    compiled_grammar = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
    matcher = xgrammar.GrammarMatcher(compiled_grammar)
    compiled = time.perf_counter() - start
    bitmask = xgrammar.allocate_token_bitmask(1, model.cfg.vocab_size)
    steps = []
    for t in ids:
        begin = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        steps.append(time.perf_counter() - begin)
        assert (int(bitmask[0, t // 32]) >> (t % 32)) & 1, "xgrammar refused a valid token"
        assert matcher.accept_token(t)
    return compiled, steps


def outlines_walk(tok, model, schema, ids):
    import outlines_core
    from outlines_core import json_schema

    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(byte_vocab(tok)):
        if i not in model.cfg.eos_ids and b:
            by_bytes.setdefault(b, []).append(i)
    vocabulary = outlines_core.Vocabulary(model.cfg.eos_ids[0], by_bytes)
    start = time.perf_counter()
    regex = json_schema.build_regex_from_schema(json.dumps(schema), r"[ ]?")  # at most a space between items
    guide = outlines_core.Guide(outlines_core.Index(regex, vocabulary))
    compiled = time.perf_counter() - start
    steps = []
    for t in ids:
        begin = time.perf_counter()
        allowed = guide.get_tokens()
        steps.append(time.perf_counter() - begin)
        assert t in allowed, "outlines-core refused a valid token"
        guide.advance(t)
    return compiled, steps


LIBRARIES = {
    "llguidance": llguidance_walk,
    "llguidance, as tridlm applies it": lambda *a: llguidance_walk(*a, unpacked=True),
    "xgrammar": xgrammar_walk,
    "outlines-core": outlines_walk,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = loading.open_model(dtype="int4")
    rows = []
    print("| library | schema | tokens | compile ms | mask us/token median | max |")
    for library, walk in LIBRARIES.items():
        for case, (schema, value) in CASES.items():
            ids = tok.encode(json.dumps(value, separators=(", ", ": ")))
            try:
                runs = [walk(tok, model, schema, ids) for _ in range(args.repeats)]
            except ImportError as e:
                rows.append({"library": library, "schema": case, "missing": str(e)})
                print(f"| {library} | {case} | missing: {e} |")
                continue
            compile_s = statistics.median(c for c, _ in runs)
            per_token = [statistics.median(s[j] for _, s in runs) for j in range(len(ids))]
            row = {"library": library, "schema": case, "tokens": len(ids), "compile_s": compile_s}
            row |= {"mask_s_median": statistics.median(per_token), "mask_s_max": max(per_token)}
            rows.append(row)
            print(
                f"| {library} | {case} | {len(ids)} | {compile_s * 1e3:.2f} | {row['mask_s_median'] * 1e6:.1f} "
                f"| {row['mask_s_max'] * 1e6:.1f} |"
            )
    out = Path(args.out) / f"grammar-libs-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": "python " + " ".join(sys.argv), "machine": reporting.machine(model), "rows": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
