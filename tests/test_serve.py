"""The HTTP server through the official openai client and raw HTTP, on a loopback port."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402
from helpers import COSTS, Wrapped, running  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tridlm.decode import GenerationConfig, generate  # noqa: E402
from tridlm.serve.app import ServerConfig  # noqa: E402

pytestmark = pytest.mark.server

PROMPTS = ["hello there", "a quick test", "what is one plus two?", "tell me more", "x", "the end is near"]


@pytest.fixture(scope="module")
def server(tiny_model, chat_tokenizer):
    with running(tiny_model, chat_tokenizer, max_queue=256, max_batch=8) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected(model, tokenizer, text, chat=False, **knobs):
    """The library's own greedy result for one prompt: what the server must return (both take their
    defaults from ``GenerationConfig.resolve``)."""
    ids = tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else tokenizer.encode(text)
    cfg = GenerationConfig(max_tokens=24).replace(**knobs)
    state = generate(model, [ids], cfg, detokenize=tokenizer.decode)
    return state.text(0), state.rows[0]


def extra(usage, name):
    return usage.model_extra[name]


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_completion_and_chat_match_the_library(client, tiny_model, chat_tokenizer, mode):
    want, row = expected(tiny_model, chat_tokenizer, "hello there", mode=mode)
    r = client.completions.create(
        model="tiny", prompt="hello there", max_tokens=24, temperature=0, extra_body={"mode": mode}
    )
    assert r.choices[0].text == want
    assert r.usage.completion_tokens == len(row.tokens) and extra(r.usage, "mode") == mode
    assert extra(r.usage, "nfe") == row.nfe and extra(r.usage, "tpf") == pytest.approx(len(row.tokens) / row.nfe)
    want_chat, _ = expected(tiny_model, chat_tokenizer, "hello there", chat=True, mode=mode)
    c = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=24, extra_body={"mode": mode}
    )
    assert c.choices[0].message.content == want_chat and c.choices[0].message.role == "assistant"


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_streaming_carries_the_same_text_and_usage(client, tiny_model, chat_tokenizer, mode):
    want, row = expected(tiny_model, chat_tokenizer, "a quick test", mode=mode)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="a quick test",
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"mode": mode},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want
    assert chunks[-1].usage.completion_tokens == len(row.tokens) and extra(chunks[-1].usage, "mode") == mode
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length" if row.finish_reason == "length" else "stop"]
    want_chat, _ = expected(tiny_model, chat_tokenizer, "a quick test", chat=True, mode=mode)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "a quick test"}],
        max_tokens=24,
        stream=True,
        extra_body={"mode": mode},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want_chat


def test_stop_strings_never_leak_and_max_tokens_is_exact(client, tiny_model, chat_tokenizer):
    free, _ = expected(tiny_model, chat_tokenizer, "hello there")
    stop = free[5:7]
    r = client.completions.create(model="tiny", prompt="hello there", max_tokens=24, stop=[stop])
    assert r.choices[0].text == free[: free.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt="hello there", max_tokens=24, stop=stop, stream=True)
        if c.choices
    )
    assert streamed == free[: free.index(stop)]
    for mode in ("ar", "diffusion", "spec"):
        r = client.completions.create(
            model="tiny", prompt=[5, 6, 7], max_tokens=7, extra_body={"mode": mode, "block_size": 4}
        )
        assert r.usage.completion_tokens <= 7
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == 7


def test_n_choices_and_seeded_sampling(client):
    kw = dict(model="tiny", prompt="hello", max_tokens=16, temperature=1.0, seed=3, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_concurrent_requests_are_batched_and_exact(server, client, tiny_model, chat_tokenizer):
    jobs = [(PROMPTS[i % len(PROMPTS)], ("ar", "spec", "diffusion")[i % 3]) for i in range(24)]
    want = {(p, m): expected(tiny_model, chat_tokenizer, p, mode=m)[0] for p, m in set(jobs)}

    def call(job):
        p, m = job
        return client.completions.create(model="tiny", prompt=p, max_tokens=24, extra_body={"mode": m})

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, jobs))
    assert [r.choices[0].text for r in results] == [want[j] for j in jobs]
    metrics = httpx.get(server + "/metrics").text
    single = _metric(metrics, 'tridlm_batch_rows_bucket{le="1.0"}')
    total = _metric(metrics, "tridlm_batch_rows_count")
    assert total > single, "no batch held more than one request"


def test_auto_mode_plans_per_cycle_when_idle_and_speculates_in_the_batch_under_load(
    server, client, tiny_model, chat_tokenizer
):
    idle = client.completions.create(model="tiny", prompt="hello", max_tokens=8, extra_body={"mode": "auto"})
    assert extra(idle.usage, "mode") == "auto"
    plain = client.completions.create(model="tiny", prompt="hello", max_tokens=8)
    assert idle.choices[0].text == plain.choices[0].text  # exact: AR's tokens
    prompts = [p + " " + p for p in PROMPTS] * 2  # repeated text: lookup finds candidates
    want = {p: expected(tiny_model, chat_tokenizer, p, max_tokens=64)[0] for p in set(prompts)}
    before = _metric(httpx.get(server + "/metrics").text, "tridlm_batch_rows_count")

    def call(p):
        return client.completions.create(model="tiny", prompt=p, max_tokens=64, extra_body={"mode": "auto"})

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, prompts))
    assert [r.choices[0].text for r in results] == [want[p] for p in prompts]
    assert {extra(r.usage, "mode") for r in results} == {"auto"}
    # most ran in the continuous batch (a step per batch observation), not as one static batch each
    steps = _metric(httpx.get(server + "/metrics").text, "tridlm_batch_rows_count") - before
    assert steps > 64
    # AR takes a forward per token after the first: fewer means candidates were accepted in the batch
    assert sum(extra(r.usage, "nfe") for r in results) < sum(r.usage.completion_tokens - 1 for r in results)


def test_auto_drafts_from_the_servers_earlier_answers(client):
    ask = dict(model="tiny", prompt="once more, the same request", max_tokens=48, extra_body={"mode": "auto"})
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    assert again.choices[0].text == first.choices[0].text
    assert extra(again.usage, "nfe") < extra(first.usage, "nfe")  # the first answer's tokens were verified
    with pytest.raises(ValueError, match="answer_history"):
        ServerConfig(answer_history=-1).validate()


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"temperature": -1}, "BadRequestError", "temperature"),
        ({"top_p": 1.5}, "BadRequestError", "top_p"),
        ({"max_tokens": 0}, "BadRequestError", "max_tokens"),
        ({"max_tokens": 100000}, "BadRequestError", "max_tokens"),
        ({"extra_body": {"mode": "fast"}}, "BadRequestError", "mode"),
        ({"extra_body": {"block_size": 0}}, "BadRequestError", "block_size"),
        ({"extra_body": {"temprature": 0.5}}, "BadRequestError", "temprature"),
        ({"model": "gpt-9"}, "NotFoundError", "gpt-9"),
        ({"prompt": ""}, "BadRequestError", "empty"),
        ({"prompt": "a" * 600}, "BadRequestError", "too long"),
        ({"presence_penalty": 1.0}, "BadRequestError", "presence_penalty"),
    ],
)
def test_bad_requests_get_openai_errors(client, kwargs, error, message):
    args = {"model": "tiny", "prompt": "hi", "max_tokens": 8, **kwargs}
    with pytest.raises(getattr(openai, error)) as e:
        client.completions.create(**args)
    assert message in str(e.value)
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def test_raw_http_errors_are_json_4xx(server):
    for body in (
        b"{not json",
        b"[1, 2]",
        b'{"prompt": 5}',
        b'{"messages": []}',
        b'{"prompt": "x", "n": 99}',
        b'{"prompt": "x", "temperature": NaN}',
        b'{"prompt": "x", "top_p": Infinity}',
    ):
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = httpx.post(server + path, content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500 and "message" in r.json()["error"]
    big = json.dumps({"prompt": "a" * (2 << 20)})
    assert (
        httpx.post(server + "/v1/completions", content=big, headers={"content-type": "application/json"}).status_code
        == 413
    )


def test_api_key_is_checked(tiny_model, chat_tokenizer):
    with running(tiny_model, chat_tokenizer, api_key="sesame") as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=3).choices


def test_queue_limit_answers_429_and_disconnect_frees_the_slot(tiny_model, chat_tokenizer):
    with running(Wrapped(tiny_model, 0.02), chat_tokenizer, max_queue=2, max_batch=1) as url:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 400}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as first:
                next(first.iter_lines())  # generation has started
                statuses = [
                    http.post(url + "/v1/completions", json={**body, "max_tokens": 2}).status_code for _ in range(1)
                ]
                with ThreadPoolExecutor(4) as pool:
                    statuses += list(
                        pool.map(lambda _: http.post(url + "/v1/completions", json=body).status_code, range(4))
                    )
            # The streaming client left: its rows stop at the next cycle, not after 400 tokens (8 s).
            assert 429 in statuses
            deadline = time.time() + 20
            while http.get(url + "/health").json()["queue_depth"] and time.time() < deadline:
                time.sleep(0.05)
            assert http.get(url + "/health").json()["queue_depth"] == 0
            assert http.post(url + "/v1/completions", json={**body, "max_tokens": 3}).status_code == 200
            assert 'status="499"' in http.get(url + "/metrics").text


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "mode",
    "block_size",
    "threshold",
    "max_steps_per_block",
    "stream_options",
    "logprobs",
    "bogus",
]
VALUES = {
    "prompt": st.text(max_size=12) | st.lists(st.integers(-5, 100), max_size=4),
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot"]), "content": st.text(max_size=8)}),
        max_size=2,
    ),
    "max_tokens": st.integers(-2, 40),
    "n": st.integers(-1, 4),
    "mode": st.sampled_from(["ar", "spec", "diffusion", "auto", "x"]),
    "block_size": st.integers(-1, 40),
}
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6).flatmap(
    lambda d: st.fixed_dictionaries({k: VALUES.get(k, JSON) for k in d})
)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=BODIES, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_bodies_never_5xx(server, body, path):
    r = httpx.post(server + path, json=body, timeout=60)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert r.json()["error"]["message"]


KNOBS = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=12)},
    optional={
        "max_tokens": st.integers(-1, 30),
        "temperature": st.floats(-1, 3),
        "top_p": st.floats(-0.5, 1.5),
        "top_k": st.integers(-1, 80),
        "seed": st.integers(0, 2**31),
        "n": st.integers(1, 3),
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
        "stream": st.booleans(),
        "mode": st.sampled_from(["ar", "spec", "diffusion", "auto"]),
        "block_size": st.integers(0, 20),
        "threshold": st.none() | st.floats(-0.5, 1.5),
        "max_steps_per_block": st.integers(0, 10),
    },
)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=KNOBS)
def test_fuzzed_knobs_decode_or_get_a_4xx(server, body):
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200 and not body.get("stream"):
        out = r.json()
        assert len(out["choices"]) == body.get("n", 1)
        assert out["usage"]["completion_tokens"] <= body.get("max_tokens", 256) * body.get("n", 1)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=64))
def test_fuzzed_bytes_never_5xx(server, raw):
    r = httpx.post(server + "/v1/chat/completions", content=raw, timeout=30)
    assert 400 <= r.status_code < 500
    assert httpx.get(server + "/health").json()["status"] == "ok"


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"metric {name} not found")


LOCAL = "http://127.0.0.1"  # a Host header the loopback server accepts


class Gated(Wrapped):
    """A model whose forwards wait for ``gate`` (or raise ``error``), recording the thread each runs on."""

    def __init__(self, inner, error: Exception | None = None):
        super().__init__(inner)
        self.gate, self.error, self.threads = threading.Event(), error, set()

    def forward(self, *args, **kwargs):
        self.threads.add(threading.get_ident())
        if self.error is not None:
            raise self.error
        self.gate.wait(20)
        return super().forward(*args, **kwargs)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the dead worker's thread
def test_health_is_ok_only_once_the_worker_is_warm_and_error_when_it_died(tiny_model, chat_tokenizer):
    from tridlm.serve.app import create_app

    model = Gated(tiny_model)
    app = create_app(model, chat_tokenizer, ServerConfig(served_model_name="tiny"), costs=COSTS)
    with TestClient(
        app, base_url=LOCAL
    ) as http:  # the app's lifespan starts the worker, whose first forward waits for the gate
        r = http.get("/health")
        assert (r.status_code, r.json()["status"]) == (503, "loading")
        model.gate.set()
        assert app.state.worker.ready.wait(20)
        assert http.get("/health").json()["status"] == "ok"
    dead = create_app(Gated(tiny_model, RuntimeError("no memory")), chat_tokenizer, ServerConfig(), costs=COSTS)
    with TestClient(dead, base_url=LOCAL) as http:
        dead.state.worker._thread.join(20)
        r = http.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "error", "error": "RuntimeError: no memory"}


def test_a_request_past_the_time_limit_ends_with_length_and_says_why(tiny_model, chat_tokenizer):
    with running(Wrapped(tiny_model, 0.02), chat_tokenizer, time_limit_s=0.3) as url:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "temperature": 0}
        out = httpx.post(url + "/v1/completions", json=body, timeout=30).json()
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["choices"][0]["tridlm_finish"] == "time_limit"
        assert 0 < out["usage"]["completion_tokens"] < 200
        lines = [
            json.loads(x[6:])
            for x in httpx.post(url + "/v1/completions", json={**body, "stream": True}, timeout=30).text.splitlines()
            if x.startswith("data: {")
        ]
        assert lines[-1]["choices"][0]["tridlm_finish"] == "time_limit"
        short = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 3}, timeout=30).json()
        assert short["choices"][0]["finish_reason"] == "length" and "tridlm_finish" not in short["choices"][0]


def test_serve_decodes_on_the_thread_that_calls_it(tiny_model, chat_tokenizer):
    """``tridlm serve`` runs the model on the thread that loaded it, HTTP on another (libgomp lets a second
    thread's OpenMP team sleep between parallel regions: half speed on 2 cores; see serve/worker.py)."""
    import socket

    from tridlm.serve import app as served

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model, seen = Wrapped(tiny_model), {}
    model.forward = lambda *a, _f=model.forward, **k: (seen.setdefault(threading.get_ident(), 0), _f(*a, **k))[1]
    config = ServerConfig(served_model_name="tiny", port=port, max_queue=8)
    captured = {}

    def client():
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        captured["answer"] = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 5}).json()
        captured["worker"].stop()

    original = served.create_app

    def create_app(*args, **kwargs):  # hands the test the worker, to stop it
        app = original(*args, **kwargs)
        captured["worker"] = app.state.worker
        return app

    served.create_app = create_app
    try:
        helper = threading.Thread(target=client)
        helper.start()
        served.serve(model, chat_tokenizer, config, COSTS)
        helper.join(30)
    finally:
        served.create_app = original
    assert captured["answer"]["usage"]["completion_tokens"] == 5
    assert set(seen) == {threading.get_ident()}


def test_a_short_request_joins_a_running_long_one_and_leaves_first(tiny_model, chat_tokenizer):
    """Continuous batching: the short request is admitted at the next step, not after the long one, and both
    get their single-request tokens."""
    with running(Wrapped(tiny_model, 0.01), chat_tokenizer) as url, httpx.Client(timeout=60) as http:
        long_body = {"prompt": "tell me more", "max_tokens": 150, "temperature": 0, "stream": True}
        with http.stream("POST", url + "/v1/completions", json=long_body) as long_run:
            lines = long_run.iter_lines()
            next(lines)  # the long request is decoding
            short = http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 5, "temperature": 0})
            assert http.get(url + "/health").json()["queue_depth"] == 1  # the long one still runs
            chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert short.json()["choices"][0]["text"] == expected(tiny_model, chat_tokenizer, "x", max_tokens=5)[0]
        long_text = "".join(c["choices"][0]["text"] for c in chunks)
        assert long_text == expected(tiny_model, chat_tokenizer, "tell me more", max_tokens=150)[0][1:]


def test_streamed_tokens_within_the_interval_go_out_together_and_before_the_end():
    """``Job.send_tokens``: the first tokens go out at once; tokens committed within ``stream_interval_s`` of the last
    event are held, merged per row, and sent with the next event (never after the end); with 0 each goes at once."""
    import asyncio

    from tridlm.decode import GenerationConfig, Row
    from tridlm.serve.jobs import Job

    def lp(*tokens):  # the log-probabilities that go with tokens: here, minus each token
        return [(-t, []) for t in tokens]

    loop = asyncio.new_event_loop()
    try:
        for interval, want in (
            (60.0, [("tokens", 0, [1], lp(1)), ("tokens", 0, [2, 3], lp(2, 3)), ("tokens", 1, [4], lp(4))]),
            (0.0, [("tokens", 0, [t], lp(t)) for t in (1, 2, 3)] + [("tokens", 1, [4], lp(4))]),
        ):
            job = Job([[5], [5]], GenerationConfig(logprobs=0), loop, stream_interval_s=interval)
            rows = [Row(max_tokens=8), Row(max_tokens=8)]
            for row, token in ((0, 1), (0, 2), (0, 3), (1, 4)):
                rows[row].logprobs += lp(token)
                job.send_tokens(row, [token], rows[row])
            job.send("done", None)
            loop.run_until_complete(asyncio.sleep(0))
            got = [job.events.get_nowait() for _ in range(job.events.qsize())]
            assert got == want + [("done", None)]
    finally:
        loop.close()


def test_a_static_batch_runs_between_the_continuous_batchs_steps(tiny_model, chat_tokenizer):
    """A request decoded as a static batch (spec) holds up neither an AR request that joins the continuous batch nor
    one behind a second static request (diffusion) that waits for the first: the AR one ends while both static ones
    are still in, and all three get their single-request tokens."""
    with running(Wrapped(tiny_model, 0.01), chat_tokenizer) as url, httpx.Client(timeout=60) as http:
        long_body = {"prompt": "tell me more", "max_tokens": 150, "temperature": 0, "stream": True, "mode": "spec"}
        second_body = {"prompt": "y", "max_tokens": 20, "temperature": 0, "mode": "diffusion"}
        with http.stream("POST", url + "/v1/completions", json=long_body) as long_run, ThreadPoolExecutor(1) as pool:
            lines = long_run.iter_lines()
            next(lines)  # the static batch is decoding
            second = pool.submit(lambda: httpx.post(url + "/v1/completions", json=second_body, timeout=60))
            deadline = time.time() + 10
            while http.get(url + "/health").json()["queue_depth"] < 2:  # the diffusion request waits
                assert time.time() < deadline
                time.sleep(0.01)
            short = http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 5, "temperature": 0})
            assert http.get(url + "/health").json()["queue_depth"] == 2  # both static requests are still in
            chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
            second_text = second.result().json()["choices"][0]["text"]
        assert short.json()["choices"][0]["text"] == expected(tiny_model, chat_tokenizer, "x", max_tokens=5)[0]
        assert second_text == expected(tiny_model, chat_tokenizer, "y", max_tokens=20, mode="diffusion")[0]
        long_text = "".join(c["choices"][0]["text"] for c in chunks)
        assert long_text == expected(tiny_model, chat_tokenizer, "tell me more", max_tokens=150, mode="spec")[0][1:]
