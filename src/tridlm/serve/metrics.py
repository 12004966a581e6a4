"""The server's Prometheus metrics: requests, tokens, forwards, tokens per forward, queue depth, latency, TTFT
and batch rows; ``Finisher`` records a request's once, whichever way it ends."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tridlm.decode import Row, summarize
from tridlm.serve.jobs import Job


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tridlm_requests", "Requests by endpoint, mode and status", ["endpoint", "mode", "status"], registry=r
        )
        self.tokens = Counter("tridlm_completion_tokens", "Generated tokens", ["mode"], registry=r)
        self.nfe = Counter("tridlm_nfe", "Model forwards after prefill", ["mode"], registry=r)
        self.tpf = Gauge("tridlm_tpf", "Tokens per forward, cumulative", ["mode"], registry=r)
        self.queue = Gauge("tridlm_queue_depth", "Requests waiting or running", registry=r)
        self.latency = Histogram(
            "tridlm_request_seconds",
            "Request latency",
            ["mode"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.ttft = Histogram(
            "tridlm_ttft_seconds",
            "Time to first token",
            ["mode"],
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch_rows = Histogram(
            "tridlm_batch_rows", "Rows per decoded batch", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64)
        )
        self._counts: dict[str, list[int]] = {}

    def finished(self, mode: str, rows: list[Row]) -> None:
        counts = summarize(rows)
        self.tokens.labels(mode).inc(counts["completion_tokens"])
        self.nfe.labels(mode).inc(counts["nfe"])
        total = self._counts.setdefault(mode, [0, 0])
        total[0] += counts["completion_tokens"]
        total[1] += counts["nfe"]
        if total[1]:
            self.tpf.labels(mode).set(total[0] / total[1])


class Finisher:
    """Records a request's metrics once, whichever way it ends."""

    def __init__(self, metrics: Metrics, endpoint: str, mode: str, job: Job):
        self.metrics, self.endpoint, self.mode, self.job = metrics, endpoint, mode, job
        self.done = False

    def __call__(self, rows: list[Row] | None, status: str = "200") -> None:
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.requests.labels(self.endpoint, self.mode, status).inc()
        m.latency.labels(self.mode).observe(time.perf_counter() - self.job.submitted)
        if rows:
            m.finished(self.mode, rows)
