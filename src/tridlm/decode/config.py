"""A request's decoding knobs (SPEC 3.5): ``GenerationConfig``, validated and resolved for a model in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tridlm.decode import modes
from tridlm.decode.modes import MODES, SPEC_VARIANTS
from tridlm.grammar import Grammar
from tridlm.options import option
from tridlm.sampling import Sampler

MAX_TOP_LOGPROBS = 20  # OpenAI's limit of top_logprobs


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding knobs of one request (SPEC 3.5), immutable and valid from construction: anything out of range
    raises ValueError naming the field. ``resolve`` fills in a model's defaults."""

    mode: str = option(
        "ar",
        "ar | diffusion | spec | auto (the exact plan predicted fastest, per cycle: decode.pipelined)",
    )
    block_size: int | None = option(
        None,
        "default: per device and mode (tridlm.device), at most the model's training block",
    )
    threshold: float | None = option(0.9, "diffusion: commit confidence; none = one token per step")
    spec_variant: str = option(
        "linear",
        "spec: linear (draft + verify forwards), quadratic (one forward of n(n+1) tokens) or pipelined (one "
        "forward per cycle: AR step + candidates' verify + MASK rows drafting the next ones)",
    )
    lookup: bool | None = option(None, "pipelined spec and auto: prompt-lookup candidates (default on); others: none")
    max_steps_per_block: int | None = option(None, "diffusion: denoising steps per block at most (default: block size)")
    temperature: float = option(0.0, "0 = greedy")
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = option(None, "seeds the sampling generator")
    max_tokens: int = option(256, "generated tokens at most (exactly, even when a block commits more)")
    stop: tuple[str, ...] = option((), "stop string (repeatable)")
    # Not a CLI flag: the API's logprobs / top_logprobs. Each generated token's log-probability under the logits
    # that committed it (``decode.state``), with this many most likely alternatives; None: not recorded.
    logprobs: int | None = None
    # Compiled from the API's response_format / regex / grammar / tools, or ``generate``'s --json-schema /
    # --json-object / --regex / --lark. Every token is chosen among those the grammar allows (``tridlm.grammar``);
    # None: unconstrained.
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> GenerationConfig:
        def bad(name, why):
            raise ValueError(f"invalid {name}={getattr(self, name)!r}: {why}")

        if self.mode not in MODES:
            bad("mode", f"expected one of {', '.join(MODES)}")
        if self.spec_variant not in SPEC_VARIANTS:
            bad("spec_variant", f"expected one of {', '.join(SPEC_VARIANTS)}")
        if self.lookup and not self.pipelined:
            bad("lookup", "prompt lookup drafts for mode auto and spec variant pipelined only")
        if self.block_size is not None and not 1 <= self.block_size <= 256:
            bad("block_size", "expected an integer in [1, 256]")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            bad("threshold", "expected a probability in [0, 1]")
        if self.max_steps_per_block is not None and self.max_steps_per_block < 1:
            bad("max_steps_per_block", "expected a positive integer")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "expected a value in [0, 100]")
        if self.top_k is not None and self.top_k < 1:
            bad("top_k", "expected a positive integer")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            bad("top_p", "expected a value in (0, 1]")
        if self.max_tokens < 1:
            bad("max_tokens", "expected a positive integer")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            bad("logprobs", f"expected an integer in [0, {MAX_TOP_LOGPROBS}]")
        if any(not s for s in self.stop):
            bad("stop", "stop strings must be non-empty")
        return self

    def resolve(self, model) -> GenerationConfig:
        """This config with every default filled in for ``model`` (its device and training block size):
        the one place API, CLI, server and bench get defaults from."""
        resolved = self
        if self.lookup is None and self.pipelined:
            resolved = resolved.replace(lookup=True)
        if self.block_size is None:
            resolved = resolved.replace(block_size=self.row.default_block(model.device, model.cfg.block_size))
        return resolved

    def room(self, model, prompt_tokens: int) -> int:
        """The most tokens this (resolved) config may generate after a prompt of ``prompt_tokens`` in the model's
        context: a block's worth stays free for the last cycle's forward."""
        return model.cfg.max_seq_len - prompt_tokens - self.block_size - 1

    @property
    def row(self) -> modes.Mode:
        """This config's mode in the table of modes (``decode.modes``)."""
        return modes.of(self.mode, self.spec_variant)

    @property
    def pipelined(self) -> bool:
        """Decoded by ``decode.pipelined`` (``auto``, or spec's pipelined variant): lookup and history apply."""
        return self.row.levers

    @property
    def forward_tokens(self) -> int:
        """The most tokens one row puts through one forward after the prefill (a resolved config): B(B+1) for
        quadratic spec, the block for the other block modes, 1 for AR."""
        return self.row.tokens_per_forward(self.block_size)

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_k, self.top_p)

    def replace(self, **changes) -> GenerationConfig:
        return dataclasses.replace(self, **changes)
