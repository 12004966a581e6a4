"""The browser playground: the trace stream it reads, and the page itself in headless Chromium."""

from __future__ import annotations

import itertools
import json
import re
import shutil

import httpx
import pytest

pytest.importorskip("uvicorn")
from helpers import running

pytestmark = pytest.mark.server

PROMPT = "hello there"
MODES = {
    "ar": {},
    "diffusion": {"block_size": 8, "threshold": 0.3},
    "spec:linear": {"block_size": 4},
    "spec:quadratic": {"block_size": 4},
    "spec:pipelined": {"block_size": 4},
}


@pytest.fixture(scope="module")
def server(tiny_model, chat_tokenizer):
    with running(tiny_model, chat_tokenizer, max_queue=64, max_batch=8) as url:
        yield url


def request(mode: str, **extra) -> dict:
    name, _, variant = mode.partition(":")
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "mode": name,
        "max_tokens": 64,
        "temperature": 0,
        **MODES.get(mode, {"block_size": 4}),
        **extra,
    }
    if variant:
        body["spec_variant"] = variant
    return body


def answer(server: str, mode: str) -> str:
    reply = httpx.post(f"{server}/v1/chat/completions", json=request(mode), timeout=60).json()
    return reply["choices"][0]["message"]["content"]


def streamed(server: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


# ------------------------------------------------------------------------------------------ the trace stream


@pytest.mark.parametrize("mode", list(MODES))
def test_trace_stream_describes_every_step_and_changes_nothing_else(server, mode):
    plain = streamed(server, request(mode))
    traced = streamed(server, request(mode, tridlm_trace=True, stream_options={"include_usage": True}))
    assert not any("tridlm_trace" in c for c in plain)  # off by default: plain OpenAI chunks

    def text(chunks):
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

    assert text(traced) == text(plain) == answer(server, mode)
    traces = [c["tridlm_trace"] for c in traced if "tridlm_trace" in c]
    events = [e for t in traces for e in t["events"]]
    pieces = {k: v for t in traces for k, v in t["pieces"].items()}
    usage = traced[-1]["usage"]
    assert all(t["index"] == 0 for t in traces) and events
    assert [e["forward"] for e in events] == sorted(e["forward"] for e in events)
    assert events[-1]["forward"] == usage["nfe"]
    name = mode.split(":")[0]
    if name == "ar":
        assert [e["type"] for e in events] == ["step"] * usage["nfe"]
        assert 1 + len(events) == usage["completion_tokens"]
    if name == "spec":
        assert {e["type"] for e in events} == {"verify"}
        if mode == "spec:pipelined":  # one forward per cycle: up to 3 drafts, from lookup or MASK rows
            assert usage["nfe"] == len(events) and all(len(e["drafts"]) <= 3 for e in events)
            assert all(("source" in e) == bool(e["drafts"]) for e in events)
            assert all(0 <= e["accepted"] <= len(e["drafts"]) for e in events)
        else:
            assert all(len(e["drafts"]) == 3 and 0 <= e["accepted"] <= 3 for e in events)
        # Every cycle emits its accepted drafts and the bonus; the first token came from the prefill.
        assert usage["completion_tokens"] <= 1 + sum(e["accepted"] + 1 for e in events)
    if name == "diffusion":
        assert {e["type"] for e in events} == {"denoise", "commit"}
        for e in (e for e in events if e["type"] == "denoise"):
            assert len(e["block"]) == len(e["guess"]) == len(e["conf"]) == 8
            assert all(e["block"][j] == e["guess"][j] for j in e["new"])  # a commit is the step's guess
    ids = {str(t) for e in events for key in ("token", "bonus") if key in e for t in [e[key]]}
    assert ids <= set(pieces)


def test_trace_needs_streaming_and_the_page_is_self_contained(server):
    r = httpx.post(f"{server}/v1/chat/completions", json=request("ar", tridlm_trace=True), timeout=30)
    assert r.status_code == 400 and "tridlm_trace needs stream: true" in r.json()["error"]["message"]
    page = httpx.get(f"{server}/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "tridlm playground" in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # nothing from elsewhere (no CDN)


# ------------------------------------------------------------------------------------------ the page


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playground test drives Chromium with playwright (pip install 'tridlm[test]')"
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(
            "headless Chromium is missing: install Debian's chromium package (apt-get install chromium); "
            "make test does so when run as root"
        )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(f"{server}/")
    yield page
    page.close()


def replay(page, step: int) -> None:
    page.eval_on_selector("#replay", "(el, k) => { el.value = k; el.dispatchEvent(new Event('input')); }", step)


def submit(page, mode: str, block_size: int | None = None, threshold: float | None = None, max_tokens: int = 64):
    page.select_option("#mode", mode)
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "0")
    settings = MODES.get(mode, {})
    page.fill("#block-size", str(block_size or settings.get("block_size", 4)))
    page.fill("#threshold", str(threshold or settings.get("threshold", 0.9)))
    page.click("#send")
    page.wait_for_function("window.playground.state !== 'running'", timeout=60_000)
    return page.evaluate("window.playground")


@pytest.mark.parametrize("mode", [*MODES, "auto"])
def test_page_shows_the_api_answer_and_how_it_was_made(page, server, mode):
    state = submit(page, mode)
    assert state["state"] == "done", page.inner_text("#status")
    assert state["text"] == page.inner_text("#answer") == answer(server, mode)
    assert page.inner_text("#c-tokens") == str(state["usage"]["completion_tokens"])
    assert page.inner_text("#c-forwards") == str(state["usage"]["nfe"])
    events = state["events"]
    if mode == "diffusion":
        # Masked slots filled over several steps: a block seen with masks, then with fewer.
        masked = [sum(t is None for t in e["block"]) if e["type"] == "denoise" else 0 for e in events]
        assert any(a > 0 and b < a for a, b in itertools.pairwise(masked))
        first = next(i for i, m in enumerate(masked) if m)
        replay(page, first)
        assert page.locator("#block .slot.masked").count() == masked[first]
    if mode == "auto":  # on an idle server: one verify event per forward, drafts where the planner chose some
        assert events and all(e["type"] == "verify" for e in events)
    if mode.startswith("spec") or mode == "auto":
        found = {
            "rejected": next((i for i, e in enumerate(events) if e["accepted"] < len(e["drafts"])), None),
            "accepted": next((i for i, e in enumerate(events) if e["accepted"] > 0), None),
        }
        if mode in ("spec:linear", "spec:quadratic"):  # the tiny model's drafts: some accepted, some not
            assert None not in found.values()
        for kind, k in found.items():
            if k is not None:
                replay(page, k)
                assert page.locator(f"#block .slot.{kind}").count() >= 1
                assert page.locator("#block .slot.bonus").count() == 1
        assert page.inner_text("#hist").strip()  # the accepted-length histogram


def test_page_says_what_went_wrong_and_stays_usable(page, server):
    page.fill("#prompt", "   ")
    page.click("#send")
    assert "Type a prompt first" in page.inner_text("#status")
    state = submit(page, "diffusion", block_size=100_000)
    assert state["state"] == "error" and "Error 400" in page.inner_text("#status")
    assert "block_size" in page.inner_text("#status")
    page.fill("#schema", "{not json")
    state = submit(page, "ar")
    assert state["state"] == "error" and "The JSON schema is not JSON" in page.inner_text("#status")
    page.fill("#schema", '{"$ref": "#/nowhere"}')
    state = submit(page, "diffusion")  # a structured request the server refuses: its message on the page
    assert state["state"] == "error" and "invalid json_schema" in page.inner_text("#status")
    page.fill("#schema", "")
    busy = {"error": {"message": "server busy: 64 requests queued; retry later", "type": "rate_limit_error"}}
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=429, json=busy))
    submit(page, "ar")
    assert "busy (429)" in page.inner_text("#status")
    cut = 'data: {"choices": [{"index": 0, "delta": {"content": "half an"}, "finish_reason": null}]}\n\n'
    page.unroute("**/v1/chat/completions")
    page.route(
        "**/v1/chat/completions", lambda route: route.fulfill(status=200, body=cut, content_type="text/event-stream")
    )
    state = submit(page, "ar")
    assert "dropped mid-reply" in page.inner_text("#status") and state["text"] == "half an"
    page.unroute("**/v1/chat/completions")
    state = submit(page, "ar")
    assert state["state"] == "done" and state["text"] == answer(server, "ar")
