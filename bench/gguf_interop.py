"""Our tri-mode GGUF export read by an independent engine, llama.cpp (llama-cpp-python), beside tridlm.

    .venv/bin/python bench/gguf_interop.py [--tokens 64] [--code 36] [--out bench/results]

Agreement (faithfulness): the float32 model's greedy answers (``--tokens`` each) to held-out requests (the 12
packaged chat prompts and the first ``--code`` HumanEval problems) are fed back teacher-forced, and at each answer
position the top-1 next token of each engine is compared (tridlm int4 vs float32, llama.cpp vs float32, tridlm vs
llama.cpp), and each engine's KL divergence from the float32 model's distribution, on

- ``original``: the default model's GGUF file as llama.cpp's tools wrote it;
- ``export``: ``tridlm convert default OUT.gguf --dtype int4`` (its Q4_1 codes and Q8_0 table kept);
- ``hf-llama``: the default model's float weights written as a Hugging Face Llama directory, then converted by
  ``tridlm convert HF OUT.gguf --dtype int4`` (quantized by tridlm).

NLD: a small random-weight checkpoint with NLD's rope (YaRN factor 16 and Llama-4 query scaling, original context 64)
exported in bfloat16: logits of tridlm and llama.cpp (which reads it as its ``mistral3`` architecture, Ministral 3:
NLD's backbone) compared below and past the original context, where the query scaling begins; tridlm also without
the query scaling, to show that llama.cpp applies it.

Writes bench/results/gguf-interop-<date>.json.
"""

import argparse
import dataclasses
import datetime
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tridlm import checkpoint, loading
from tridlm.decode import GenerationConfig, generate
from tridlm.loading import default_nld_dir, open_model
from tridlm.measure import evaluate, harness, random_nld
from tridlm.presets import preset, random_model
from tridlm.rope import RopeConfig


def requests(tok, code: int) -> list[list[int]]:
    """The 12 packaged chat prompts and the first ``code`` HumanEval problems."""
    chat = harness.load_prompts(None, tok)
    problems = evaluate.TASKS["humaneval"]().problems()[:code]
    return chat[:12] + [tok.encode_chat([{"role": "user", "content": p.request}]) for p in problems]


def tridlm_logprobs(model, prompts, answers) -> torch.Tensor:
    """(positions, vocab) float32 log-probabilities at every answer position, teacher-forced."""
    return torch.cat([harness.answer_logprobs(model, p, a) for p, a in zip(prompts, answers, strict=True)])


def kl_per_position(reference: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(reference || logprobs) at each position (rows of log-probabilities)."""
    return (reference.exp() * (reference - logprobs)).sum(-1)


def mean_and_se(x: torch.Tensor) -> dict:
    return {"mean": float(x.mean()), "standard_error": float(x.std() / len(x) ** 0.5)}


def llamacpp_logits(path: Path, sequences: list[list[int]], first: list[int]) -> list[np.ndarray]:
    """llama.cpp's logits at positions first[i] - 1 .. end - 1 of each sequence (one causal pass each)."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=2048, logits_all=True, n_threads=torch.get_num_threads(), verbose=False)
    out = []
    for seq, start in zip(sequences, first, strict=True):
        llm.reset()
        llm.eval(seq)
        out.append(np.array(llm.scores[start - 1 : len(seq) - 1]))
    return out


def hf_llama(directory: Path) -> Path:
    """The default model's float weights as a Hugging Face Llama directory."""
    source = default_nld_dir()
    directory.mkdir()
    config = json.loads((source / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    for key in ("mask_token_id", "dlm_paradigm", "block_size"):
        config.pop(key, None)
    (directory / "config.json").write_text(json.dumps(config))
    tensors = load_file(source / "model.safetensors")
    save_file({"model." + k.removeprefix("encoder."): v for k, v in tensors.items()}, directory / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((source / name).read_bytes())
    return directory


def agreement(args, work: Path) -> dict:
    """Per file: each engine's top-1 agreement with the float32 model and its KL(float32 || engine), the
    per-position difference of the two KLs (tridlm minus llama.cpp) with its standard error."""
    reference, tok = open_model(None, "float32", adapter="none")
    prompts = requests(tok, args.code)
    cfg = GenerationConfig(max_tokens=args.tokens)
    answers = [r.tokens for r in generate(reference, prompts, cfg, eos_ids=[]).rows]
    want = tridlm_logprobs(reference, prompts, answers)
    files = {"original": loading.default_model.gguf_path(), "export": work / "export.gguf"}
    loading.convert(None, files["export"], "int4")
    files["hf-llama"] = work / "hf-llama.gguf"
    loading.convert(hf_llama(work / "hf"), files["hf-llama"], "int4")
    rows = {}
    for name, path in files.items():
        ours = tridlm_logprobs(open_model(path, "int4", adapter="none")[0], prompts, answers)
        logits = llamacpp_logits(path, [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts])
        theirs = torch.log_softmax(torch.from_numpy(np.concatenate(logits)).float(), -1)
        kl_ours, kl_theirs = kl_per_position(want, ours), kl_per_position(want, theirs)
        top = (want.argmax(-1), ours.argmax(-1), theirs.argmax(-1))
        rows[name] = {
            "positions": len(want),
            "tridlm_vs_float32": float((top[1] == top[0]).float().mean()),
            "llamacpp_vs_float32": float((top[2] == top[0]).float().mean()),
            "tridlm_vs_llamacpp": float((top[1] == top[2]).float().mean()),
            "kl_tridlm": mean_and_se(kl_ours),
            "kl_llamacpp": mean_and_se(kl_theirs),
            "kl_tridlm_minus_llamacpp": mean_and_se(kl_ours - kl_theirs),
        }
        print(name, json.dumps(rows[name]))
    return rows


def nld(work: Path) -> dict:
    """A small NLD-rope checkpoint in bfloat16 (random weights of std 0.05): llama.cpp (architecture mistral3) against
    tridlm with and without the query scaling, below and past the original context (64)."""
    tok = random_nld.default_tokenizer()
    rope = RopeConfig(1e6, "yarn", 16.0, 64, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
    cfg = dataclasses.replace(
        preset("nld-3b"), vocab_size=tok.vocab_size, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
        ffn_dim=512, rope=rope, max_seq_len=4096,
    )  # fmt: skip
    checkpoint.save(work / "nld", random_model(cfg, seed=1, std=0.05).to(torch.bfloat16), tok)
    loading.convert(work / "nld", work / "nld.gguf", "bfloat16")
    model, _ = open_model(work / "nld.gguf", "float32", adapter="none")
    seq = [int(t) for t in torch.randint(0, tok.vocab_size, (160,), generator=torch.Generator().manual_seed(0))]
    (theirs,) = llamacpp_logits(work / "nld.gguf", [seq], [1])
    theirs = torch.log_softmax(torch.from_numpy(theirs).float(), -1).numpy()
    out = {}
    for scaling in (True, False):
        model.cfg = dataclasses.replace(
            cfg, rope=dataclasses.replace(rope, llama_4_scaling_beta=0.1 if scaling else None)
        )
        ours = harness.answer_logprobs(model, seq[:1], seq[1:]).numpy()
        for label, span in (("positions 1-63", slice(0, 63)), ("positions 64-159", slice(63, None))):
            a, b = ours[span], theirs[span]
            key = f"tridlm {'with' if scaling else 'without'} query scaling, {label}"
            out[key] = {
                "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
                "max_abs_logprob_diff": float(np.abs(a - b).max()),
            }
            print(key, out[key])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="tokens of each float32 answer")
    parser.add_argument("--code", type=int, default=36, help="HumanEval problems beside the 12 chat prompts")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "date": datetime.date.today().isoformat(),
            "agreement": agreement(args, Path(tmp)),
            "nld": nld(Path(tmp)),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gguf-interop-{report['date']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
