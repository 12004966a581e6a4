"""The server under hostile input (docs/security.md lists every attack and the test that covers it):
tenants never see each other's answers; a hostile request gets a 4xx naming the problem within 100 ms,
with no model forward, while /health keeps answering; keys guard every route but /health; a browser page
cannot drive a loopback server."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("uvicorn")
from helpers import Wrapped, running  # noqa: E402

from tridlm import cli, commands  # noqa: E402
from tridlm.serve import guard  # noqa: E402
from tridlm.serve.config import ServerConfig  # noqa: E402

pytestmark = pytest.mark.server
KEYS = ("key-a", "key-b")
A, B = ({"authorization": f"Bearer {k}"} for k in KEYS)


@pytest.fixture(scope="module")
def counted(tiny_model, chat_tokenizer):
    model = Wrapped(tiny_model)
    with running(model, chat_tokenizer, api_key=KEYS, read_timeout_s=1.0, max_total_tokens=256) as url:
        yield model, url


@contextmanager
def health_watch(url):
    """Polls /health every 10 ms in a thread; yields the list of latencies it saw."""
    seen, stop = [], threading.Event()

    def poll():
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                start = time.perf_counter()
                assert http.get(url + "/health").status_code == 200
                seen.append(time.perf_counter() - start)
                time.sleep(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------------------------------ limits

DEEP = b'{"prompt": "hi", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HOSTILE = {  # name: (path, body or raw bytes, extra headers, status, what the message names)
    "quadratic block 256": (
        "/v1/completions",
        {"prompt": "hi", "mode": "spec", "spec_variant": "quadratic", "block_size": 256},
        {},
        400,
        "block_size",
    ),
    "quadratic block 17": (
        "/v1/completions",
        {"prompt": "hi", "mode": "spec", "spec_variant": "quadratic", "block_size": 17},
        {},
        400,
        "block_size",
    ),
    "auto block past the measured curve": (
        "/v1/completions",
        {"prompt": "hi", "mode": "auto", "block_size": 64},
        {},
        400,
        "block_size",
    ),
    "n x max_tokens": ("/v1/completions", {"prompt": "hi", "n": 8, "max_tokens": 40}, {}, 400, "choices x max_tokens"),
    "prompt ids past the context": ("/v1/completions", {"prompt": [5] * 100_000}, {}, 400, "prompt"),
    "prompt of 900k characters": ("/v1/completions", {"prompt": "a" * 900_000}, {}, 400, "prompt"),
    "chat of 900k characters": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "b" * 900_000}]},
        {},
        400,
        "prompt",
    ),
    "5 stop strings": ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, {}, 400, "stop"),
    "a stop string of 40k characters": ("/v1/completions", {"prompt": "hi", "stop": "x" * 40_000}, {}, 400, "stop"),
    "JSON nested 100k deep": ("/v1/completions", DEEP, {}, 400, "nests"),
    "seed 2**64": ("/v1/completions", {"prompt": "hi", "seed": 2**64}, {}, 400, "seed"),
    "seed -2**63 - 1": ("/v1/completions", {"prompt": "hi", "seed": -(2**63) - 1}, {}, 400, "seed"),
    "body over the limit (declared)": ("/v1/completions", {"prompt": "a" * (2 << 20)}, {}, 413, "exceeds"),
    "text/plain body (a cross-site form)": (
        "/v1/completions",
        b'{"prompt": "hi"}',
        {"content-type": "text/plain"},
        415,
        "Content-Type",
    ),
    "form-encoded body": (
        "/v1/completions",
        b"prompt=hi",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        "Content-Type",
    ),
    "no content type": ("/v1/completions", b'{"prompt": "hi"}', {"content-type": ""}, 415, "Content-Type"),
    "a DNS-rebinding Host": ("/v1/completions", {"prompt": "hi"}, {"host": "evil.example:8000"}, 400, "Host"),
    "no key": ("/v1/completions", {"prompt": "hi"}, {"authorization": ""}, 401, "API key"),
    "a wrong key": ("/v1/completions", {"prompt": "hi"}, {"authorization": "Bearer key-c"}, 401, "API key"),
}


def post(url, path, body, headers, http=httpx, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **A, **headers}
    return http.post(url + path, content=content, headers={k: v for k, v in headers.items() if v}, **kw)


def test_hostile_requests_get_a_4xx_at_once_with_no_forward(counted):
    model, url = counted
    assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, {}).status_code == 200  # warm
    with health_watch(url) as health, httpx.Client(timeout=10) as http:
        for name, (path, body, headers, status, names) in HOSTILE.items():
            before, times = model.forwards, []
            for _ in range(3):  # the fastest of three: a collector's or the scheduler's pause is not the server's work
                start = time.perf_counter()
                r = post(url, path, body, headers, http)
                times.append(time.perf_counter() - start)
                assert r.status_code == status, (name, r.text)
                assert names in r.json()["error"]["message"], (name, r.text)
            assert min(times) < 0.1, (name, times)
            assert model.forwards == before, name
    assert health and max(health) < 0.1, max(health)


def test_the_limits_pass_what_they_allow(counted):
    _, url = counted
    ok = [
        {"prompt": "hi", "mode": "spec", "spec_variant": "quadratic", "block_size": 16, "max_tokens": 4},
        {"prompt": "hi", "seed": 2**64 - 1, "temperature": 1.0, "max_tokens": 4},
        {"prompt": "hi", "stop": ["a" * 256, "b", "c", "d"], "max_tokens": 4},
    ]
    for body in ok:
        assert post(url, "/v1/completions", body, {}).status_code == 200, body


def test_a_body_over_the_limit_is_refused_while_it_is_read(counted):
    """Chunked, with no declared length: counted as it arrives, refused once past the limit."""
    _, url = counted

    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json", **A})
    assert r.status_code == 413 and "exceeds" in r.json()["error"]["message"]


def test_a_stalled_body_times_out_while_health_answers(counted):
    model, url = counted
    host, port = url.removeprefix("http://").split(":")
    before = model.forwards
    with health_watch(url) as health, socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f'Authorization: Bearer {KEYS[0]}\r\nContent-Length: 100\r\n\r\n{{"prompt"'.encode()
        )
        s.settimeout(5)
        start = time.perf_counter()
        reply = s.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and time.perf_counter() - start < 3
    assert model.forwards == before and max(health) < 0.1


def test_a_chat_template_that_raises_is_a_400(tiny_model, char_tokenizer):
    strict = replace(
        char_tokenizer,
        chat_template="{% if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('a system message must come first') }}"
        "{% endif %}{{ messages[0]['content'] }}",
    )
    with running(tiny_model, strict) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = httpx.post(
            url + "/v1/chat/completions", json={"messages": [{"role": "system", "content": "hi"}], "max_tokens": 2}
        )
        assert r.status_code == 200


def test_stop_matching_is_linear(chat_tokenizer):
    """A long stream with the longest allowed stop strings: each push decodes a few tokens and searches only
    the new text; the result equals decoding the whole and cutting at the first stop."""
    from tridlm.tokenizer import TextStream

    decoded = []
    counting = replace(chat_tokenizer)
    counting.decode = lambda ids: decoded.append(len(ids)) or chat_tokenizer.decode(ids)
    text = "abcde fghij " * 400
    stop = ("q" * 256, "abcde fghij " * 20 + "z", "j a", "zz")
    stream = TextStream(counting, stop)
    ids = chat_tokenizer.encode(text)
    out = "".join(stream.push([t]) for t in ids) + stream.push([], final=True)
    assert out == text[: text.index("j a")]
    assert sum(decoded) <= 2 * 5 * len(ids)  # at most CONTEXT + 1 tokens twice per push


# ------------------------------------------------------------------------------------------ auth and browser


def test_every_route_but_health_needs_the_key(counted):
    _, url = counted
    for path in ("/metrics", "/docs", "/openapi.json", "/v1/models"):
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers=B).status_code == 200, path
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/").status_code == 200  # the playground's page: static, it sends the key itself


def test_keys_are_compared_in_constant_time_with_every_key(monkeypatch):
    calls = []
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: calls.append(b) or a == b)
    assert guard.tenant_of("Bearer key-a", KEYS) == 0 and len(calls) == len(KEYS)  # no early exit on a match
    assert guard.tenant_of("Bearer key-b", KEYS) == 1
    assert guard.tenant_of("key-a", KEYS) is None and guard.tenant_of(None, KEYS) is None
    assert guard.tenant_of(None, ()) == 0  # no keys: one tenant


def test_an_empty_key_is_an_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="empty API key"):
        ServerConfig(api_key=("good", " ")).validate()
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--api-key", ""])
    assert e.value.code == 2 and "empty API key" in capsys.readouterr().err
    (tmp_path / "keys").write_text("# tenants\nkey-a\n\nkey-b  # the second\n")
    assert commands.read_key_file(str(tmp_path / "keys")) == KEYS
    (tmp_path / "none").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no API key"):
        commands.read_key_file(str(tmp_path / "none"))


def test_the_host_header_is_checked_on_loopback_only():
    loopback = ServerConfig()
    assert all(guard.host_allowed(h, loopback) for h in ("127.0.0.1:8000", "localhost", "[::1]:8000", "LOCALHOST"))
    hostile = ("evil.example", "evil.example:8000", None, "127.0.0.1.evil.example")
    assert not any(guard.host_allowed(h, loopback) for h in hostile)
    assert guard.host_allowed("box.lan:8000", ServerConfig(allowed_hosts=("box.lan",)))
    assert guard.host_allowed("anything", ServerConfig(allowed_hosts=("*",)))
    assert guard.host_allowed("anything", ServerConfig(host="0.0.0.0"))  # reachable from elsewhere: no rebinding


JSON = st.recursive(
    st.none() | st.integers() | st.text(alphabet='ab[]{}"\\', max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text('[{"\\k', max_size=3), inner, max_size=3),
    max_leaves=12,
)


def nesting(value) -> int:
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max(map(nesting, children), default=0)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(value=JSON, ascii_only=st.booleans())
def test_json_depth_is_the_nesting_with_strings_skipped(value, ascii_only):
    assert guard.json_depth(json.dumps(value, ensure_ascii=ascii_only).encode()) == nesting(value)


# ------------------------------------------------------------------------------------------ tenants


def traced(url, headers, prompt, mode, **knobs):
    """Every byte a client sees of one streamed, traced request, ids and timestamps aside."""
    body = {
        "prompt": prompt,
        "max_tokens": 24,
        "stream": True,
        "tridlm_trace": True,
        "stream_options": {"include_usage": True},
        **mode,
        **knobs,
    }
    r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return [{k: v for k, v in e.items() if k not in ("id", "created")} for e in events]


def sources(events) -> set:
    return {s.get("source") for e in events if "tridlm_trace" in e for s in e["tridlm_trace"]["events"]}


@pytest.mark.parametrize("mode", [{"mode": "auto"}, {"mode": "spec", "spec_variant": "pipelined", "block_size": 4}])
def test_a_tenant_sees_nothing_of_another_tenants_answers(small_vocab_model, char_tokenizer, mode):
    """B's every byte (text, trace, usage) is the same whether or not A was answered first; the same requests
    from one tenant do draft from its earlier answer (the history that tenants must not share)."""
    first = [4, 5, 6, 7, 8, 9, 10]
    with running(small_vocab_model, char_tokenizer, api_key=KEYS) as url:
        a = traced(url, A, first, mode)
        answer = [e["tridlm_trace"] for e in a if "tridlm_trace" in e]
        assert answer
        text = "".join(e["choices"][0]["text"] for e in a if e.get("choices"))
        follow = char_tokenizer.encode(text)[:6]
        b_after_a = traced(url, B, follow, mode)
    with running(small_vocab_model, char_tokenizer, api_key=KEYS) as url:
        b_alone = traced(url, B, follow, mode)
    with running(small_vocab_model, char_tokenizer, api_key=KEYS) as url:
        traced(url, A, first, mode)
        a_again = traced(url, A, follow, mode)
    assert b_after_a == b_alone
    assert "history" in sources(a_again) and "history" not in sources(b_alone)


def test_auto_and_pipelined_batches_hold_one_tenant(tiny_model):
    """Those modes share one plan across a batch (a row's speed would depend on its neighbours'); the others
    decode each row as if alone and batch across tenants."""
    import asyncio

    from tridlm.decode import GenerationConfig
    from tridlm.serve.jobs import Job

    loop = asyncio.new_event_loop()
    try:

        def key(tenant, **cfg):
            return Job([[5]], GenerationConfig(**cfg).resolve(tiny_model), loop, tenant=tenant).batch_key()

        assert key(0, mode="auto") != key(1, mode="auto")
        assert key(0, mode="spec", spec_variant="pipelined") != key(1, mode="spec", spec_variant="pipelined")
        assert key(0, mode="ar") == key(1, mode="ar") and key(0, mode="spec") == key(1, mode="spec")
    finally:
        loop.close()
