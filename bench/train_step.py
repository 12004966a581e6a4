"""One adapter-regime training step (forward + backward), dual-stream forward vs cached clean stream,
with the shipped adapter's training settings (batch 8 x 256, block 8, LoRA rank 8 on all projections,
bf16 autocast), alternating in one process."""

import time

import torch

from tridlm import loading
from tridlm.train.objective import add_noise, diffusion_loss, joint_loss

model, tok = loading.open_default(own_adapter=False)
model.add_lora(8, 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
for n, p in model.named_parameters():
    p.requires_grad_("lora_" in n)
g = torch.Generator().manual_seed(0)
x0 = torch.randint(100, 40000, (8, 256), generator=g)
bearing = torch.ones_like(x0, dtype=torch.bool)
times = {"dual-stream": [], "cached": []}
for rep in range(4):
    for name in times:
        noised = add_noise(x0, bearing, model.cfg.mask_id, g)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if name == "dual-stream":
                out = joint_loss(model, x0, noised, 8, adapter=True)
                loss = out.diffusion_sum / out.n_masked
            else:
                loss = diffusion_loss(model, x0, noised, 8).loss
        loss.backward()
        model.zero_grad()
        if rep:
            times[name].append(time.perf_counter() - t)
for name, ts in times.items():
    print(name, "s/step", [round(x, 2) for x in ts], "median", round(sorted(ts)[1], 2))
print("ratio", round(sorted(times["dual-stream"])[1] / sorted(times["cached"])[1], 2))
