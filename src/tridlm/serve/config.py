"""What a server is started with (the CLI fills it from ``tridlm serve`` arguments)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tridlm.decode import MODES, GenerationConfig
from tridlm.options import option


def is_loopback(host: str) -> bool:
    """Whether a host name or address means this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str = option("tridlm", "the model id clients send (default: from --model)")
    host: str = option("127.0.0.1", "address to bind (loopback: this machine only)")
    port: int = 8000
    api_key: tuple[str, ...] = option((), "require 'Authorization: Bearer KEY' (repeatable: each key is a tenant)")
    allowed_hosts: tuple[str, ...] = option(
        (),
        "Host names accepted besides loopback ones when bound to loopback ('*': any)",
    )
    max_queue: int = option(64, "requests waiting or running before 429")
    max_batch: int = option(16, "rows decoded together")
    slot_tokens: int = option(
        2048,
        "KV cache tokens per continuously batched AR row (prompt + answer; longer requests run as static batches)",
    )
    max_body_bytes: int = option(1 << 20, "larger request bodies get 413 (counted while reading)")
    read_timeout_s: float = option(30.0, "a request body not received whole within this gets 408")
    max_json_depth: int = option(16, "request bodies nested deeper get 400")
    max_forward_tokens: int = option(
        272,
        "tokens one choice may put through one forward (quadratic spec: B(B+1): B <= 16)",
    )
    max_total_tokens: int = option(4096, "n x max_tokens at most")
    max_prompt_tokens: int | None = option(None, "prompt tokens at most (default: what the context leaves)")
    default_max_tokens: int = option(256, "for requests that name none (at most what the context leaves)")
    time_limit_s: float = option(
        600.0,
        "seconds of decoding a request may take; then its choices end (finish_reason length, tridlm_finish time_limit)",
    )
    stream_interval_ms: float = option(
        10.0,
        "streamed tokens committed within this many ms of the last chunk go out together in the next (0: each step's)",
    )
    default_mode: str = option(
        "ar",
        "mode of requests that name none; auto: the fastest exact plan when idle, speculating in the batch under load",
    )
    defaults: GenerationConfig = option(GenerationConfig(), "the knobs of requests that name none")
    answer_history: int = option(1 << 16, "tokens of earlier answers that auto drafts from, per tenant (0: none)")

    def __post_init__(self):
        if isinstance(self.api_key, str):  # one key
            object.__setattr__(self, "api_key", (self.api_key,))

    def validate(self) -> ServerConfig:
        positive = (
            "max_queue",
            "max_batch",
            "max_body_bytes",
            "read_timeout_s",
            "max_json_depth",
            "max_forward_tokens",
            "max_total_tokens",
            "default_max_tokens",
            "time_limit_s",
            "slot_tokens",
        )
        if any(getattr(self, name) <= 0 for name in positive) or (self.max_prompt_tokens or 1) < 1:
            raise ValueError(f"{', '.join(positive)} and max_prompt_tokens must be positive")
        if self.stream_interval_ms < 0:
            raise ValueError("stream_interval_ms must be 0 or more")
        if any(not key.strip() for key in self.api_key):
            raise ValueError(
                "an empty API key would let anyone in: give a non-empty --api-key, or none to serve without keys"
            )
        if self.answer_history < 0:
            raise ValueError(f"invalid answer_history={self.answer_history}: expected a token count >= 0")
        if self.default_mode not in MODES:
            raise ValueError(f"invalid default_mode={self.default_mode!r}: expected one of {', '.join(MODES)}")
        return self

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)
