"""Serving under load: `tridlm serve` beside llama.cpp's `llama-server` on the same GGUF file and threads.

Closed-loop clients, each sending streamed chat requests one after another (the packaged chat prompts in turn,
`max_tokens` cycling 32/64/128, greedy) for `--seconds` per client count; per server and count: aggregate
tok/s (completion tokens / wall time until the last request ends), TTFT and latency p50/p99, errors, and the
server's RSS (sampled every 0.5 s). Both servers run in the same script, the client counts alternating which
goes first. `llama-server` is built once from the llama.cpp source inside the llama-cpp-python sdist (bench/llamacpp.py;
`--llama-server PATH` takes a built one); it is reported as missing when it cannot be built.

    .venv/bin/python bench/serve_load.py [--clients 1,4,8,16] [--seconds 60] [--mode ar] [--out bench/results]
    .venv/bin/python bench/serve_load.py --clients 8 --seconds 600 --servers tridlm --out DIR   # a soak
    .venv/bin/python bench/serve_load.py --prompts code --mode auto --clients 8 --servers tridlm  # auto on code
    .venv/bin/python bench/serve_load.py --prompts documents --clients 8  # long prompts: prefill is the work

`--prompts documents`: a page of the project's documentation (docs/*.md, cut at paragraph ends into pieces of 500 to
2,000 tokens) and a question about it, each asked once; both servers get room for the longest (`--slot-tokens`, `-c`).

writes OUT/serve-load-<date>.json and -load.png (tok/s and TTFT p99 against clients) and prints a table.
"""

import argparse
import datetime
import itertools
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import httpx
import llamacpp

from tridlm import default_model
from tridlm.gguf_file import GGUFFile
from tridlm.measure import evaluate
from tridlm.tokenizer import Tokenizer

MAX_TOKENS = (32, 64, 128)
QUESTIONS = (
    "Summarize the text above in three sentences.",
    "Which commands does the text above mention, and what does each do?",
    "What numbers does the text above report, and what does each measure?",
    "Write two questions a new user might ask after reading the text above, and answer them.",
)
DOCUMENT_TOKENS = (500, 2000)  # the shortest and longest page of a documents request


def documents(tokenizer: Tokenizer, folder: Path = Path("docs")) -> list[list[dict]]:
    """Chat requests of a page of documentation and a question about it: the Markdown files of ``folder`` cut at
    paragraph ends into pages of ``DOCUMENT_TOKENS`` tokens (a longer paragraph is left out), the questions in turn."""
    pages, shortest, longest = [], *DOCUMENT_TOKENS
    for path in sorted(folder.glob("*.md")):
        page, size = [], 0
        for paragraph in re.split(r"\n\s*\n", path.read_text()):
            tokens = len(tokenizer.encode(paragraph)) + 2
            if size + tokens > longest:
                if size >= shortest:
                    pages.append("\n\n".join(page))
                page, size = [], 0
            if tokens <= longest:
                page, size = page + [paragraph], size + tokens
        if size >= shortest:
            pages.append("\n\n".join(page))
    return [[{"role": "user", "content": f"{page}\n\n{QUESTIONS[i % len(QUESTIONS)]}"}] for i, page in enumerate(pages)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{cmd[0]} did not get ready")


def request(http: httpx.Client, url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat request: TTFT (first content), latency, completion tokens."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, ttft, tokens, chunks = time.perf_counter(), None, None, 0
    # a connection per request: llama-server closes a kept-alive one after a stream
    with http.stream("POST", url + "/v1/chat/completions", json=body, headers={"Connection": "close"}) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                ttft = ttft if ttft is not None else time.perf_counter() - start
                chunks += 1
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"ttft": ttft, "latency": time.perf_counter() - start, "tokens": tokens if tokens is not None else chunks}


def load(url: str, clients: int, seconds: float, chats: list[list[dict]], pid: int, distinct: bool = False) -> dict:
    """``clients`` closed-loop clients for ``seconds``; the server's RSS sampled meanwhile. Client k sends prompts
    k, k + 1, ... in turn; ``distinct``: each request takes the next prompt of one shared sequence instead (no prompt
    asked twice until all were)."""
    deadline, results, rss, done = time.perf_counter() + seconds, [], [], threading.Event()
    shared = itertools.count()

    def client(k: int) -> None:
        with httpx.Client(timeout=600) as http:
            for n in itertools.count(k):
                if time.perf_counter() > deadline:
                    return
                n = next(shared) if distinct else n
                try:
                    results.append(request(http, url, chats[n % len(chats)], MAX_TOKENS[n % len(MAX_TOKENS)]))
                except httpx.HTTPError as e:
                    results.append({"error": type(e).__name__})

    def sample() -> None:
        while not done.wait(0.5):
            rss.append(int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    done.set()
    ok = [r for r in results if "error" not in r and r["ttft"] is not None]
    errors = [str(r.get("error", "no content")) for r in results if r not in ok]

    def pct(values, q):
        if len(values) < 2:
            return values[0] if values else float("nan")
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]

    return {
        "requests": len(ok),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "tok_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50": pct([r["ttft"] for r in ok], 50),
        "ttft_p99": pct([r["ttft"] for r in ok], 99),
        "latency_p50": pct([r["latency"] for r in ok], 50),
        "latency_p99": pct([r["latency"] for r in ok], 99),
        "rss_mb": [round(x) for x in rss],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--mode", default="ar", help="tridlm's --default-mode")
    ap.add_argument(
        "--prompts",
        choices=("chat", "code", "documents"),
        default="chat",
        help="the packaged chat prompts; HumanEval's problems as chat requests, or pages of documentation and a "
        "question (500-2,000 tokens), each asked once (no repeats)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-server", help="a built llama-server (default: build one)")
    ap.add_argument("--servers", default="tridlm,llama-server", help="which to run (a soak: tridlm alone)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    gguf, servers, context = default_model.gguf_path(), {}, 2048
    if args.prompts == "code":
        chats = [[{"role": "user", "content": p.request}] for p in evaluate.HumanEval().problems()]
    elif args.prompts == "documents":
        chats = documents(Tokenizer.from_gguf(GGUFFile(gguf).fields))
        context = DOCUMENT_TOKENS[1] + 64 + max(MAX_TOKENS)  # the page, the chat template and question, the answer
    else:
        text = (resources.files("tridlm") / "prompts" / "chat.jsonl").read_text()
        chats = [json.loads(line)["messages"] for line in text.splitlines() if line.strip()]
    port = free_port()
    cmd = [sys.executable, "-m", "tridlm", "serve", "--port", str(port), "--threads", str(args.threads)]
    cmd += ["--slot-tokens", str(context)]
    servers["tridlm"] = (start([*cmd, "--default-mode", args.mode], port), f"http://127.0.0.1:{port}")
    binary = None
    if "llama-server" in args.servers.split(","):
        binary = Path(args.llama_server) if args.llama_server else llamacpp.build("llama-server")
    if binary is not None:
        port = free_port()
        np_ = str(max(counts))
        cmd = [str(binary), "-m", str(gguf), "--port", str(port), "-t", str(args.threads), "-np", np_]
        cmd += ["-c", str(context * int(np_))]  # a slot per client, each of the context tridlm's rows get
        servers["llama-server"] = (start(cmd, port), f"http://127.0.0.1:{port}")
    report = {"command": " ".join(["python", *sys.argv]), "gguf": str(gguf), "results": {}}
    if "llama-server" in args.servers.split(","):
        report["llama_server"] = str(binary) if binary else "missing: could not be built"
    try:
        for i, clients in enumerate(counts):
            for name in list(servers)[:: 1 if i % 2 == 0 else -1]:
                proc, url = servers[name]
                r = load(url, clients, args.seconds, chats, proc.pid, distinct=args.prompts != "chat")
                report["results"][f"{name} {clients}"] = {"server": name, "clients": clients, **r}
                print(
                    f"{name:<13} {clients:>3} clients: {r['tok_s']:6.1f} tok/s, TTFT p50/p99 "
                    f"{r['ttft_p50']:.2f}/{r['ttft_p99']:.2f} s, latency p50/p99 {r['latency_p50']:.2f}/"
                    f"{r['latency_p99']:.2f} s, {r['requests']} requests, {r['errors']} errors, RSS "
                    f"{min(r['rss_mb'], default=0)}-{max(r['rss_mb'], default=0)} MB",
                    flush=True,
                )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    variant = "" if (args.prompts, args.mode) == ("chat", "ar") else f"-{args.prompts}-{args.mode}"
    out = Path(args.out) / f"serve-load{variant}-{datetime.date.today().isoformat()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, counts, out.with_name(out.name + "-load.png"))
    print(f"wrote {out.with_suffix('.json')}")


def plot(report: dict, counts: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["server"] for r in report["results"].values()):
        rows = [report["results"][f"{name} {c}"] for c in counts]
        speed.plot(counts, [r["tok_s"] for r in rows], marker="o", label=name)
        ttft.plot(counts, [r["ttft_p99"] for r in rows], marker="o", label=name)
    speed.set(xlabel="clients", ylabel="aggregate tok/s", title="throughput")
    ttft.set(xlabel="clients", ylabel="TTFT p99 (s)", title="time to first token, p99", yscale="log")
    for ax in (speed, ttft):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
