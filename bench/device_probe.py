"""Size a draft-adapter run before spending device time on it: on random weights of the default model's
shapes, time batched greedy generation (what `tridlm distill` does) and the adapter regime's training step
(noise + cached-context diffusion loss + backward + AdamW, bf16 autocast where the device has it).

Prints one JSON object (also written to --out). The H100 numbers in docs/draft-adapter.md came from the same
measurements in an earlier, hard-coded form of this script.
Usage: python bench/device_probe.py [--device cuda] [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tridlm.decode import GenerationConfig, generate
from tridlm.device import fast_dtype
from tridlm.model import ModelConfig
from tridlm.presets import random_model
from tridlm.train.objective import add_noise, diffusion_loss

# SmolLM2-135M-Instruct as converted (config.json of the default model's NLD directory).
SMOLLM2 = ModelConfig(
    vocab_size=49152,
    dim=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    ffn_dim=1536,
    max_seq_len=8192,
    tie_embeddings=True,
    bos_id=1,
    eos_ids=(2,),
    mask_id=16,
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gen-batches", default="512,1024", help="rows generated together (64 new tokens each)")
    ap.add_argument("--train-batches", default="32,64", help="training batch sizes (rows of 256 tokens)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    model = random_model(SMOLLM2, seed=0, std=0.02).to(device)
    for rows in map(int, args.gen_batches.split(",")):
        prompts = [[1] + [10 + i % 50] * 40 for i in range(rows)]  # 41-token prompts, like a short chat
        generate(model, prompts[:8], GenerationConfig(max_tokens=8))  # warm-up
        sync()
        start = time.perf_counter()
        generate(model, prompts, GenerationConfig(max_tokens=64))  # random weights: no early EOS
        sync()
        result[f"generate_64_tokens_{rows}_rows_s"] = time.perf_counter() - start

    model.add_lora(8, 16.0, TARGETS)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    noise = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_dtype(device) == torch.bfloat16)
    for rows in map(int, args.train_batches.split(",")):
        times = []
        for _ in range(7):  # the first two are warm-up
            x0 = torch.randint(20, SMOLLM2.vocab_size, (rows, 256), device=device)
            sync()
            start = time.perf_counter()
            noised = add_noise(
                x0, torch.ones_like(x0, dtype=torch.bool), SMOLLM2.mask_id, noise, block=8, suffix_fraction=0.5
            )
            with autocast:
                loss = diffusion_loss(model, x0, noised, 8).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss.detach())
            sync()
            times.append(time.perf_counter() - start)
        result[f"train_step_{rows}x256_s"] = statistics.median(times[2:])
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
