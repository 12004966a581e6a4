"""Token distributions and sampling: temperature, top-k, top-p, explicit generators.

``distribution(logits)`` gives the exact distribution a decoder samples from, so speculative
rejection sampling can compare the draft's and the verifier's probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampler:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities (..., V) after temperature, top-k and top-p filtering.

        Greedy returns the plain softmax: its argmax is the greedy token and its values are the
        confidences used by unmasking rules.
        """
        if self.greedy:
            return torch.softmax(logits.float(), dim=-1)
        # Shift by the max first so a tiny temperature gives -inf (probability 0), never inf - inf; below
        # 1e-6 (where float32 would round the temperature to 0) sampling is already argmax with random ties.
        logits = logits.float()
        logits = (logits - logits.amax(-1, keepdim=True)) / max(self.temperature, 1e-6)
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the mass before it already reaches top_p; the most likely one always stays
            # (explicitly: a top_p that rounds to 0 in float32 would otherwise drop everything).
            drop = (sorted_p.cumsum(-1) - sorted_p) >= self.top_p
            drop[..., 0] = False
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def verifier(self, logits: torch.Tensor) -> torch.Tensor:
        """What causal logits (..., V) become for choosing and verifying tokens: the distribution, or when greedy
        the logits themselves, whose argmax is the greedy token (no softmax needed)."""
        return logits if self.greedy else self.distribution(logits)

    def next_token(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The token each row of causal logits (..., V) predicts -> (...): argmax when greedy, else a draw."""
        return self.pick(self.verifier(logits), generator)

    def pick(self, probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One token per distribution (..., V) -> (...): argmax when greedy, else a draw."""
        if self.greedy:
            return argmax(probs)
        return draw(probs, generator)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` (the first of equal maxima, as torch's): through numpy for float32 on a CPU, where it takes 7 us
    over the default model's vocabulary against torch's 43 (one row; 43 against 330 for a verify's nine:
    bench/grammar_step.py)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() == 0:
        return x.argmax(-1)
    return torch.as_tensor(x.detach().numpy().argmax(-1))


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token from each distribution (..., V) -> (...)."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
