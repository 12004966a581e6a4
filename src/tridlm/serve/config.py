"""What a server is started with (the CLI fills it from ``tridlm serve`` arguments)."""

from __future__ import annotations

from dataclasses import dataclass

from tridlm.decode import MODES, GenerationConfig


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str = "tridlm"  # the model id clients send (default: from --model)
    api_key: str | None = None  # require 'Authorization: Bearer KEY'
    max_queue: int = 64  # requests waiting or running before 429
    max_batch: int = 16  # rows decoded together
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    default_max_tokens: int = 256  # for requests that name none (at most what the context leaves)
    default_mode: str = "ar"  # mode of requests that name none; auto: the fastest exact plan when idle, batched ar under load
    defaults: GenerationConfig = GenerationConfig()  # the knobs of requests that name none
    answer_history: int = 1 << 16  # tokens of earlier answers that auto drafts from (0: none; shared by all clients)

    def validate(self) -> ServerConfig:
        if self.max_queue < 1 or self.max_batch < 1 or self.max_body_bytes < 1 or self.default_max_tokens < 1:
            raise ValueError("max_queue, max_batch, max_body_bytes and default_max_tokens must be positive")
        if self.answer_history < 0:
            raise ValueError(f"invalid answer_history={self.answer_history}: expected a token count >= 0")
        if self.default_mode not in MODES:
            raise ValueError(f"invalid default_mode={self.default_mode!r}: expected one of {', '.join(MODES)}")
        self.defaults.validate()
        return self
