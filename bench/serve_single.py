"""One request at a time through `tridlm serve` against the same decode in-process: the server's overhead.

Starts `tridlm serve` (default model, int4, 2 threads, no answer history so that `auto` drafts from the same
sources in both) and, in this process, the same model. For each mode, each packaged chat prompt (as token ids,
so both decode the very same tokens) is decoded in turn: in-process (`generate`, prefill included), through
the server unstreamed and streamed (request sent to last byte), and in-process on a second thread after the
main thread has run the model (what a server whose worker thread did not load the model would pay; see
`tridlm/serve/worker.py`). Settings alternate per prompt so that machine drift hits all alike.

    .venv/bin/python bench/serve_single.py [--modes ar,auto] [--repeats 2] [--server-args ARGS] [--out bench/results]

writes OUT/serve-single-<date>.json and prints a table: tok/s per path and the server's ratio to in-process
(the goal: >= 0.95); tokens must be the same on every path.
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import torch

from tridlm.decode import CostCurve, GenerationConfig, generate
from tridlm.loading import open_model
from tridlm.measure import harness, reporting

MAX_TOKENS = 64


def start_server(threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tridlm", "serve", "--port", str(port), "--threads", str(threads)]
    proc = subprocess.Popen([*cmd, "--answer-history", "0", *extra], stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not get ready in 600 s")


def through_server(http: httpx.Client, url: str, ids: list[int], mode: str, stream: bool) -> tuple[int, float]:
    body = {"prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0, "mode": mode, "stream": stream}
    start = time.perf_counter()
    if not stream:
        out = http.post(url + "/v1/completions", json=body).json()
        return out["usage"]["completion_tokens"], time.perf_counter() - start
    body["stream_options"] = {"include_usage": True}
    with http.stream("POST", url + "/v1/completions", json=body) as r:  # read as it comes, parsed at the end
        events = b"".join(r.iter_raw()).decode().split("\n\n")
    usage = json.loads(events[-3].removeprefix("data: "))["usage"]  # the usage chunk, then [DONE]
    return usage["completion_tokens"], time.perf_counter() - start


def in_process(model, ids, cfg, costs) -> tuple[int, float]:
    start = time.perf_counter()
    state = generate(model, [ids], cfg, costs=costs)
    return len(state.rows[0].tokens), time.perf_counter() - start


def on_second_thread(model, ids, cfg, costs) -> tuple[int, float]:
    out = []
    thread = threading.Thread(target=lambda: out.append(in_process(model, ids, cfg, costs)))
    thread.start()
    thread.join()
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="ar,auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--server-args", default="", help="more `tridlm serve` arguments, e.g. '--stream-interval-ms 10'")
    args = ap.parse_args()
    proc, url = start_server(args.threads, args.server_args.split())
    try:
        torch.set_num_threads(args.threads)
        model, tok = open_model()
        prompts = harness.load_prompts(None, tok)
        modes = args.modes.split(",")
        costs = CostCurve.measure(model, GenerationConfig(mode="auto").resolve(model).block_size)
        paths = ("in-process", "server", "server streamed", "in-process, second thread")
        tokens = {(m, p): 0 for m in modes for p in paths}
        walls = {(m, p): [0.0] * args.repeats for m in modes for p in paths}
        with httpx.Client(timeout=600) as http, torch.inference_mode():
            for rep in range(args.repeats):
                for ids in prompts:
                    for mode in modes:
                        cfg = GenerationConfig(mode=mode, max_tokens=MAX_TOKENS)
                        runs = {
                            "in-process": lambda: in_process(model, ids, cfg, costs),
                            "server": lambda: through_server(http, url, ids, mode, False),
                            "server streamed": lambda: through_server(http, url, ids, mode, True),
                            "in-process, second thread": lambda: on_second_thread(model, ids, cfg, costs),
                        }
                        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
                        counts = {}
                        for path in order:
                            counts[path], wall = runs[path]()
                            walls[mode, path][rep] += wall
                            tokens[mode, path] += counts[path] if rep == 0 else 0
                        if len(set(counts.values())) != 1:
                            raise SystemExit(f"token counts differ between paths: {counts}")
    finally:
        proc.terminate()
        proc.wait(30)
    results = {}
    print("| mode | path | tok/s (per repeat) | x in-process |\n|---|---|---|---|")
    for mode in modes:
        base = statistics.median(tokens[mode, "in-process"] / w for w in walls[mode, "in-process"])
        for path in paths:
            rates = [tokens[mode, path] / w for w in walls[mode, path]]
            ratio = statistics.median(rates) / base
            results[f"{mode} {path}"] = {"tok_s": rates, "tokens": tokens[mode, path], "x_in_process": ratio}
            print(f"| {mode} | {path} | {' / '.join(f'{r:.1f}' for r in rates)} | {ratio:.3f} |")
    reporting.write_report(args.out, "serve-single", model, results)


if __name__ == "__main__":
    main()
