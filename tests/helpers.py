"""Helpers tests share: greedy settings and exact reference distributions for the decoders; a server on a
loopback port, models that count or slow their forwards, and a fixed cost curve, so that what ``auto`` plans
never depends on a timing taken during the tests."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from contextlib import contextmanager

import torch

from tridlm import masks
from tridlm.decode import CostCurve, GenerationConfig

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
# A ChatML template that renders tools and writes calls in <tool_call> tags (the Hermes form, as Qwen 2.5's does).
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions. Their signatures, within <tools></tools> tags:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each call, return a JSON object with the function's name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{% for message in messages %}
{% if message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role != 'system' %}<|im_start|>{{ message.role }}
{{ message.content }}
{%- for call in message.tool_calls or [] %}
{{ '\n<tool_call>\n' }}{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
# A CPU-like curve: a few tokens cost little more than one, so auto drafts where candidates are at hand.
COSTS = CostCurve(
    verify={n: 1 + 0.05 * (n - 1) for n in range(1, 9)}, draft={n: 1 + 0.08 * (n - 1) for n in range(1, 9)}
)


@contextmanager
def running(model, tokenizer, costs: CostCurve = COSTS, **config):
    """A server over ``model`` in a thread, its base URL yielded until the block ends."""
    import uvicorn

    from tridlm.serve.app import ServerConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(model, tokenizer, ServerConfig(served_model_name="tiny", **config), costs=costs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    assert app.state.worker.ready.wait(20), "the model worker did not get ready"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


class Wrapped(torch.nn.Module):
    """A model that counts its forwards (prefills included) and can delay each, so that a request outlives its
    client."""

    def __init__(self, inner, delay: float = 0.0):
        super().__init__()
        self.inner, self.delay, self.cfg, self.forwards = inner, delay, inner.cfg, 0
        self.device, self.dtype, self.new_cache = inner.device, inner.dtype, inner.new_cache

    def forward(self, *args, **kwargs):
        self.forwards += 1
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)


GREEDY = GenerationConfig(max_tokens=40)


def tokens(state):
    return [r.tokens for r in state.rows]


def exact_ar_distribution(model, prompt, n, sampler):
    """p(t1..tn) for every sequence over a tiny vocabulary, by enumeration with uncached forwards."""
    V = model.cfg.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))  # (V^n, n)
    x = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    T = x.shape[1]
    with torch.no_grad():
        logits = model(x, torch.arange(T).expand(len(x), -1), masks.causal(torch.zeros(len(x), dtype=torch.long), T, 0))
    probs = sampler.distribution(logits[:, len(prompt) - 1 : -1])  # (V^n, n, V)
    return probs.gather(-1, seqs[..., None])[..., 0].prod(-1)  # (V^n,)


def chi_square(samples: torch.Tensor, expected_p: torch.Tensor, V: int) -> tuple[float, int]:
    """Chi-square statistic and dof over sequence bins, pooling bins expected below 5 counts."""
    n = len(samples)
    index = (samples * (V ** torch.arange(samples.shape[1] - 1, -1, -1))).sum(-1)
    observed = torch.bincount(index, minlength=len(expected_p)).double()
    expected = expected_p.double() * n
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def unfused_logits_equal(model, tokens) -> bool:
    """Whether the model's logits are the same bit for bit with its fused q/k/v and gate/up weights as with
    the separate ones (which ``fuse_packed`` keeps)."""
    x = torch.tensor([tokens])
    args = (x, torch.arange(x.shape[1])[None], masks.causal(torch.zeros(1, dtype=torch.long), x.shape[1], 0))
    fused = model(*args)
    saved = [(layer.self_attn.qkv, layer.mlp.gate_up) for layer in model.encoder.layers]
    for layer in model.encoder.layers:
        layer.self_attn.qkv = layer.mlp.gate_up = None
    try:
        return torch.equal(fused, model(*args))
    finally:
        for layer, (qkv, gate_up) in zip(model.encoder.layers, saved):
            layer.self_attn.qkv, layer.mlp.gate_up = qkv, gate_up
