"""Structured output: what a grammar costs, what ``auto`` gains under one, and tridlm beside llama-server.

Requests written for this bench: extractions (a person, a review, an order: schemas of 3 to 10 fields, nested arrays
and enums) and tool calls (two tools, the reply form ``serve.tools`` builds, its system message included), each a
chat prompt and a JSON schema.

1. In one process (the default model, int4, ``--threads``), per request and interleaved: AR without the schema, then
   with it, and ``auto``, spec B=8 and diffusion B=4 (threshold 0.9) with it: tok/s with the prefill and decode tok/s
   after the first token (the replies differ in length, the prompts are long beside some of them), TPF, whether the
   reply is valid against the schema (``jsonschema``) and whether its tokens are constrained AR's. The grammar's
   overhead is constrained over free AR decode tok/s, the free reply held to the constrained one's length (it is
   other text: a rate per generated token, over as many tokens of context). Ratios to constrained AR are taken per
   repeat (the settings of one request run back to back) and their median reported.
2. Through servers on the same GGUF and threads: `tridlm serve` (``mode`` ar and auto per request) and llama.cpp's
   `llama-server` (bench/llamacpp.py), each given the same rendered messages and the same schema as
   ``response_format`` json_schema, each warmed by one request first, at 1 client (the requests in turn) and 8 (all
   at once, twice over): aggregate tok/s and the share of valid replies. Each run and copy of the requests is its own
   tridlm tenant (API key), so that no request is verified from an earlier answer to it.

    .venv/bin/python bench/structured.py [--repeats 5] [--threads 2] [--parts in-process,servers]

writes OUT/structured-DATE.json (structured-tN-DATE.json at another thread count) and prints its tables.
"""

import argparse
import datetime
import itertools
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import llamacpp
import torch
from serve_load import free_port, start

from tridlm import default_model, loading
from tridlm.decode import GenerationConfig, generate
from tridlm.grammar import Grammars
from tridlm.measure import reporting
from tridlm.serve.tools import ToolUse

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "born": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "born", "city"],
    "additionalProperties": False,
}
REVIEW = {
    "type": "object",
    "properties": {
        "product": {"type": "string", "maxLength": 40},
        "sentiment": {"enum": ["positive", "negative", "mixed"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "pros": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 2},
        "cons": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 2},
    },
    "required": ["product", "sentiment", "stars", "pros", "cons"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"product": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
                "required": ["product", "quantity"],
                "additionalProperties": False,
            },
            "maxItems": 5,
        },
        "express": {"type": "boolean"},
    },
    "required": ["customer", "items", "express"],
    "additionalProperties": False,
}
FUNCTIONS = [
    {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
    {
        "name": "book_table",
        "description": "Book a restaurant table.",
        "parameters": {
            "type": "object",
            "properties": {
                "restaurant": {"type": "string"},
                "people": {"type": "integer", "minimum": 1},
                "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
            },
            "required": ["restaurant", "people", "time"],
            "additionalProperties": False,
        },
    },
]


def extraction(text: str, schema: dict) -> tuple[list[dict], dict]:
    ask = f"Extract the information from this text as JSON.\n\n{text}"
    return [{"role": "user", "content": ask}], schema


def tool_call(question: str) -> tuple[list[dict], dict]:
    use = ToolUse([{"type": "function", "function": f} for f in FUNCTIONS], "required", True)  # our form (SmolLM2's
    messages, _ = use.messages([{"role": "user", "content": question}])  # template renders no tools)
    return messages, use.constraint()[1]


REQUESTS = {
    "person": extraction("Marie Curie was born in 1867 in Warsaw and later worked in Paris.", PERSON),
    "review": extraction(
        "I bought the Aero 3 headphones last month. The sound is great and the battery lasts two days, but they "
        "hurt after an hour and the case feels cheap. Three stars.",
        REVIEW,
    ),
    "order": extraction(
        "Hi, this is Tom Baker. Please send me two boxes of green tea and one teapot, as fast as possible.", ORDER
    ),
    "weather call": tool_call("Is it cold in Oslo right now? Tell me in celsius."),
    "booking call": tool_call("Book a table for four at Chez Marcel at 19:30."),
}
MAX_TOKENS = 200
MODES = {
    "ar": GenerationConfig(max_tokens=MAX_TOKENS),
    "auto": GenerationConfig(mode="auto", max_tokens=MAX_TOKENS),
    "spec B=8": GenerationConfig(mode="spec", block_size=8, max_tokens=MAX_TOKENS),
    "diffusion B=4": GenerationConfig(mode="diffusion", block_size=4, max_tokens=MAX_TOKENS),  # valid, not AR's
}


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def in_process(model, tok, repeats: int) -> list[dict]:
    grammars = Grammars(tok, model.cfg.vocab_size, model.cfg.eos_ids)
    runs: dict[tuple[str, str], list] = {}
    for cfg in MODES.values():  # warm: kernels, llguidance's tokenizer, auto's kept cost curve
        generate(model, [tok.encode("Hello")], cfg.replace(max_tokens=8, grammar=grammars.compile("json_object")))
    for _ in range(repeats):
        for name, (messages, schema) in REQUESTS.items():  # interleaved: drift hits every setting alike
            ids, grammar = tok.encode_chat(messages), grammars.compile("json_schema", schema)
            settings = [(m, c.replace(grammar=grammar)) for m, c in MODES.items()] + [("ar, free", MODES["ar"])]
            for setting, cfg in settings:
                if setting == "ar, free":  # as many tokens as constrained AR wrote (fewer where it stops first)
                    cfg = cfg.replace(max_tokens=len(runs[name, "ar"][-1][1].rows[0].tokens))
                begin = time.perf_counter()
                state = generate(model, [ids], cfg, detokenize=tok.decode)
                runs.setdefault((name, setting), []).append((time.perf_counter() - begin, state))
    rows = []
    for (name, setting), results in runs.items():
        seconds = statistics.median(s for s, _ in results)
        state = results[0][1]
        row = state.rows[0]
        rates = [_decode_rate(s) for _, s in results]
        paired = [a / b for a, b in zip(rates, map(_decode_rate, (s for _, s in runs[name, "ar"])))]
        reference = runs[name, "ar"][0][1].rows[0].tokens
        rows.append(
            {
                "request": name,
                "setting": setting,
                "tokens": len(row.tokens),
                "tok_s": len(row.tokens) / seconds,
                "decode_tok_s": statistics.median(rates),
                "x_constrained_ar": statistics.median(paired),  # per repeat, over constrained AR's decode rate
                "tpf": len(row.tokens) / row.nfe if row.nfe else None,
                "valid": valid(state.text(0), REQUESTS[name][1]),
                "finish": row.finish_reason,
                "same_as_constrained_ar": row.tokens == reference if setting != "ar, free" else None,
            }
        )
    return rows


def _decode_rate(state) -> float:
    row = state.rows[0]
    return (len(row.tokens) - 1) / (row.last_token_s - row.first_token_s)


def ask(http: httpx.Client, url: str, name: str, mode: str | None, key: str) -> dict:
    messages, schema = REQUESTS[name]
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    if mode is not None:
        body["mode"] = mode
    begin = time.perf_counter()
    headers = {"Connection": "close", "Authorization": f"Bearer {key}"}
    out = http.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=600).json()
    text = out["choices"][0]["message"]["content"]
    return {
        "tokens": out["usage"]["completion_tokens"],
        "seconds": time.perf_counter() - begin,
        "valid": valid(text, schema),
    }


COPIES = {1: 1, 8: 2}  # 1 client: the requests in turn; 8: ten at once


def keys(mode: str | None, clients: int) -> list[str]:
    """A tenant (API key) per run and copy of the requests: no answer is verified from an earlier one's (tridlm keeps
    earlier answers per tenant as candidates), so each request is new to the server."""
    return [f"{mode}-{clients}-{copy}" for copy in range(COPIES[clients])]


def through(url: str, mode: str | None, clients: int) -> dict:
    asked = [(name, key) for key in keys(mode, clients) for name in REQUESTS]
    begin = time.perf_counter()
    with httpx.Client() as http, ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda a: ask(http, url, a[0], mode, a[1]), asked))
    wall = time.perf_counter() - begin
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "tok_s": tokens / wall,
        "valid": sum(r["valid"] for r in results) / len(results),
    }


def servers(threads: int) -> list[dict]:
    gguf = default_model.gguf_path()
    port = free_port()
    cmd = [sys.executable, "-m", "tridlm", "serve", "--port", str(port), "--threads", str(threads)]
    for mode, clients in itertools.product(("ar", "auto"), COPIES):
        cmd += [arg for key in keys(mode, clients) for arg in ("--api-key", key)]
    cmd += ["--api-key", "warm"]
    running = {"tridlm": (start(cmd, port), f"http://127.0.0.1:{port}")}
    binary = llamacpp.build("llama-server")
    if binary is not None:
        port = free_port()
        cmd = [str(binary), "-m", str(gguf), "--port", str(port), "-t", str(threads), "-np", "8", "-c", str(8 * 2048)]
        running["llama-server"] = (start(cmd, port), f"http://127.0.0.1:{port}")
    rows = []
    try:
        with httpx.Client() as http:  # first requests: llguidance's view of the tokenizer, kernels, caches
            for server, (_, url) in running.items():
                ask(http, url, "person", "ar" if server == "tridlm" else None, "warm")
        for clients in (1, 8):
            for server, mode in (("tridlm", "ar"), ("tridlm", "auto"), ("llama-server", None)):
                if server in running:
                    rows.append({"server": server, "mode": mode, **through(running[server][1], mode, clients)})
    finally:
        for proc, _ in running.values():
            proc.terminate()
            proc.wait(30)
    return rows if binary is not None else rows + [{"server": "llama-server", "missing": "could not be built"}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="in-process,servers")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = loading.open_model(dtype="int4")
    report = {"command": "python " + " ".join(sys.argv), "machine": reporting.machine(model)}
    if "in-process" in args.parts:
        report["in_process"] = rows = in_process(model, tok, args.repeats)
        print(
            "| request | setting | tokens | tok/s | decode tok/s | x constrained AR | TPF | valid | = constrained AR |"
        )
        for r in rows:
            tpf = f"{r['tpf']:.2f}" if r["tpf"] else "-"
            print(
                f"| {r['request']} | {r['setting']} | {r['tokens']} | {r['tok_s']:.1f} | {r['decode_tok_s']:.1f} "
                f"| {r['x_constrained_ar']:.3f} | {tpf} | {r['valid']} | {r['same_as_constrained_ar']} |"
            )
    if "servers" in args.parts:
        report["servers"] = rows = servers(args.threads)
        print("| server | mode | clients | requests | tok/s | valid |")
        for r in rows:
            if "missing" in r:
                print(f"| {r['server']} | missing: {r['missing']} |")
                continue
            print(
                f"| {r['server']} | {r['mode'] or '-'} | {r['clients']} | {r['requests']} | {r['tok_s']:.1f} "
                f"| {r['valid']:.0%} |"
            )
    threads = "" if args.threads == 2 else f"-t{args.threads}"  # the default: 2 threads, the CI machine's cores
    out = Path(args.out) / f"structured{threads}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
