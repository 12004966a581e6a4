"""The engines a user compares us with, on the same weights and prompts: transformers ``generate`` (greedy,
and its prompt-lookup speculative decoding) and llama.cpp (``llama-cpp-python``) on the GGUF file. Each run
returns one ``Row`` per prompt, counted as ours are (NFE: forwards after the prefill)."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from tridlm import default_model
from tridlm.decode import Row

BASELINES = ("hf", "hf-lookup", "llama.cpp")


class Baselines:
    """The named baselines, loaded once; llama.cpp is optional: ``missing`` says why when it cannot run."""

    def __init__(self, names: Sequence[str], model_path: str | None, dtype: torch.dtype, device: str, log=print):
        self.names, self.missing = [n for n in names if n != "llama.cpp"], {}
        self.hf = self.counter = self.llama = None
        if self.names:
            self.hf = load_hf(model_path, dtype, device)
            self.counter = _HFCounter(self.hf)
        if "llama.cpp" in names:
            if importlib.util.find_spec("llama_cpp") is None:
                self.missing["llama.cpp"] = "llama-cpp-python is not installed (pip install 'tridlm[llamacpp]')"
            elif _gguf(model_path) is None:
                self.missing["llama.cpp"] = f"{model_path} is not a GGUF file"
            else:
                self.llama = load_llamacpp(_gguf(model_path))
                self.names.append("llama.cpp")
        for name, why in self.missing.items():
            log(f"{name} baseline skipped: {why}")

    def run(self, name: str, prompts: list[list[int]], max_tokens: int, eos_ids) -> list[Row]:
        if name == "llama.cpp":
            return run_llamacpp(self.llama, prompts, max_tokens, eos_ids)
        return run_hf(self.hf, self.counter, prompts, max_tokens, eos_ids, lookup=name == "hf-lookup")


def _gguf(model_path: str | None) -> Path | None:
    """The GGUF file behind a model argument (the default model's), or None for a checkpoint directory."""
    if model_path is None:
        return default_model.gguf_path()
    return Path(model_path) if str(model_path).endswith(".gguf") else None


# ------------------------------------------------------------------------------------------ transformers


class _HFCounter:
    """Counts forwards of a transformers model and times the first generated token."""

    def __init__(self, hf):
        self.calls, self.first = 0, None
        hf.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    # transformers streamer protocol: put() gets the prompt first, then each new token.
    def put(self, value):
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass

    def reset(self):
        self.calls, self.first, self.puts = 0, None, 0


@torch.inference_mode()
def run_hf(
    hf, counter: _HFCounter, prompts: list[list[int]], max_tokens: int, eos_ids, lookup: bool = False
) -> list[Row]:
    """transformers ``generate`` greedy (``lookup``: with prompt-lookup speculative decoding), one prompt at a time."""
    outs = []
    for p in prompts:
        x = torch.tensor([p], device=hf.device)
        counter.reset()
        t = time.perf_counter()
        extra = {"prompt_lookup_num_tokens": 10} if lookup else {}
        out = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=list(eos_ids) or None,
            pad_token_id=(list(eos_ids) or [0])[0],
            streamer=counter,
            **extra,
        )
        if hf.device.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        tokens = out[0, len(p) :].tolist()
        if eos_ids and tokens and tokens[-1] in eos_ids:  # drop padding after EOS (batch of one: none)
            tokens = tokens[: tokens.index(tokens[-1]) + 1]
        first = counter.first - t if counter.first else None
        outs.append(Row(max_tokens, tokens=tokens, nfe=counter.calls - 1, first_token_s=first, last_token_s=end - t))
    return outs


def load_hf(model_arg: str | None, dtype: torch.dtype, device: str):
    """The same weights in transformers: from the default GGUF, a GGUF file or an HF directory."""
    import transformers

    if (path := _gguf(model_arg)) is not None:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        config = json.loads((Path(model_arg) / "config.json").read_text())
        if (config.get("architectures") or [None])[
            0
        ] not in transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            raise ValueError(f"{model_arg}: transformers cannot load this checkpoint; use --baselines none")
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_arg, dtype=dtype)
    return hf.to(device).eval()


# ---------------------------------------------------------------------------------------------- llama.cpp


def load_llamacpp(path: Path):
    """llama.cpp on a GGUF file, with torch's thread count."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=4096, n_threads=torch.get_num_threads(), verbose=False)


def run_llamacpp(llm, prompts: list[list[int]], max_tokens: int, eos_ids) -> list[Row]:
    """Greedy decoding of each prompt (token ids, no re-tokenization), prefill included in the time."""
    rows = []
    for p in prompts:
        llm.reset()
        tokens, first, start = [], None, time.perf_counter()
        for t in llm.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            first = first if first is not None else time.perf_counter() - start
            tokens.append(int(t))
            if int(t) in eos_ids or len(tokens) >= max_tokens:
                break
        rows.append(
            Row(
                max_tokens,
                tokens=tokens,
                nfe=max(len(tokens) - 1, 0),
                first_token_s=first,
                last_token_s=time.perf_counter() - start,
            )
        )
    return rows
