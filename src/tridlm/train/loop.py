"""The training loop: AdamW, warmup + cosine schedule, gradient accumulation, bf16 autocast where the
CPU (or GPU) supports it, periodic held-out evaluation, atomic checkpoints with exact resume, and data
parallelism over ``torchrun`` processes (DDP; gloo on CPUs).

Regimes: ``full`` trains every weight on the joint objective (the NLD recipe, for GPUs); ``adapter``
freezes the base and trains a LoRA on the diffusion term, used only by bidirectional queries, so AR
output cannot change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tridlm import checkpoint
from tridlm.device import fast_dtype
from tridlm.model import TriModel
from tridlm.options import option
from tridlm.tokenizer import Tokenizer
from tridlm.train.data import DataConfig, PackedData
from tridlm.train.objective import add_noise, diffusion_loss, joint_loss

REGIMES = ("adapter", "full")
DRAFT_LAYOUTS = ("linear", "pipelined")


@dataclass(frozen=True)
class TrainConfig:
    regime: str = option(
        "adapter",
        "adapter: a LoRA on the diffusion term, base frozen; full: every weight, joint objective",
    )
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = option(("q_proj", "k_proj", "v_proj", "o_proj"), "projections that get a LoRA")
    block_size: int | None = option(None, "default: the model's training block size (config block_size), else 32")
    alpha: float = option(0.3, "weight of the diffusion term (SPEC 4)")
    suffix_fraction: float = option(0.0, "share of sequences masked like a spec draft (block suffixes), see add_noise")
    draft_layout: str = option(
        "linear",
        "a block's tokens before its MASKs: draft rows (linear), or AR rows (pipelined, as auto)",
    )
    batch_size: int = option(4, "rows per step and process")
    grad_accum: int = option(1, "batches per optimizer step")
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = 0.0
    warmup_steps: int = 20
    steps: int = option(200, "length of the learning-rate schedule")
    min_lr_ratio: float = option(0.1, "the schedule's final learning rate over the peak")
    eval_every: int = option(50, "steps between held-out evaluations")
    eval_batches: int = option(4, "held-out batches per evaluation")
    checkpoint_every: int = option(50, "steps between checkpoints (a killed run resumes from the last)")
    seed: int = 0
    autocast: str = option("auto", "auto (bf16 where supported) | bf16 | off")

    def validate(self) -> TrainConfig:
        if self.regime not in REGIMES:
            raise ValueError(f"invalid regime={self.regime!r}: expected one of {', '.join(REGIMES)}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"invalid block_size={self.block_size}: expected a positive integer")
        for name in (
            "lora_rank",
            "batch_size",
            "grad_accum",
            "steps",
            "eval_every",
            "checkpoint_every",
            "eval_batches",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name}={getattr(self, name)}: expected a positive integer")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"invalid autocast={self.autocast!r}: expected auto, bf16 or off")
        if self.draft_layout not in DRAFT_LAYOUTS:
            raise ValueError(f"invalid draft_layout={self.draft_layout!r}: expected one of {', '.join(DRAFT_LAYOUTS)}")
        if self.draft_layout != "linear" and self.regime != "adapter":
            raise ValueError("draft_layout=pipelined is for the adapter regime (the full regime trains both streams)")
        if not 0 <= self.suffix_fraction <= 1:
            raise ValueError(f"invalid suffix_fraction={self.suffix_fraction}: expected a value in [0, 1]")
        if not 0 < self.lr < 1:
            raise ValueError(f"invalid lr={self.lr}: expected a value in (0, 1)")
        return self


def schedule(cfg: TrainConfig):
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    def __init__(self, model: TriModel, tokenizer: Tokenizer, data: DataConfig, cfg: TrainConfig, out: Path, log=print):
        if cfg.block_size is None:
            cfg = dataclasses.replace(cfg, block_size=model.cfg.block_size or 32)
        self.cfg, self.out = cfg.validate(), Path(out)
        self.model, self.tokenizer = model, tokenizer
        if model.cfg.mask_id is None:
            raise ValueError("the model has no mask token; convert it with --mask-token or --add-mask-token")
        if checkpoint.is_packed(model):
            raise ValueError("training needs float weights (--dtype float32 or bfloat16), not int8/int4")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.log = log if self.rank == 0 else (lambda *_: None)
        if cfg.regime == "adapter":
            if not checkpoint.has_adapter(model):
                model.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule(cfg))
        self.train_data = PackedData(data, tokenizer, "train")
        self.eval_data = PackedData(data, tokenizer, "heldout")
        self.noise = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.step, self.rows = 0, 0
        self.forward_model = model
        if self.world > 1:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(model)
        self.autocast = self._autocast_dtype()
        if (self.out / "checkpoint.pt").is_file():
            self._load()

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.cfg.autocast == "off" or self.model.dtype != torch.float32:
            return None
        if self.cfg.autocast == "bf16" or fast_dtype(self.model.device) == torch.bfloat16:
            return torch.bfloat16
        return None

    def _context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.model.device).type, dtype=self.autocast)

    def _loss(self, model, x0, loss_mask, generator):
        noised = add_noise(
            x0,
            loss_mask,
            self.model.cfg.mask_id,
            generator,
            block=self.cfg.block_size,
            suffix_fraction=self.cfg.suffix_fraction,
        )
        with self._context():
            if self.cfg.regime == "adapter":
                return diffusion_loss(model, x0, noised, self.cfg.block_size, self.cfg.draft_layout)
            return joint_loss(model, x0, noised, self.cfg.block_size, self.cfg.alpha, loss_mask)

    def train(self, until: int | None = None) -> dict:
        """Train to ``cfg.steps`` (or stop early at step ``until``, checkpointing there, as a kill after
        a checkpoint would); a later Trainer on the same folder resumes exactly."""
        from tqdm import tqdm

        cfg = self.cfg
        if until is not None and until < 1:
            raise ValueError(f"invalid until={until}: expected a positive step")
        until = cfg.steps if until is None else min(until, cfg.steps)
        batches = self.train_data.batches(cfg.batch_size, self.rows, self.rank, self.world)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0, desc=f"train ({cfg.regime})")
        last = {}
        self.model.train()
        while self.step < until:
            start, tokens, total = time.perf_counter(), 0, 0.0
            for _ in range(cfg.grad_accum):
                x0, loss_mask = next(batches)
                out = self._loss(
                    self.forward_model, x0.to(self.model.device), loss_mask.to(self.model.device), self.noise
                )
                (out.loss / cfg.grad_accum).backward()
                tokens += x0.numel() * self.world
                total += float(out.loss.detach()) / cfg.grad_accum
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            self.rows += cfg.batch_size * cfg.grad_accum * self.world
            last = {"loss": total, "lr": self.sched.get_last_lr()[0], "tok_s": tokens / (time.perf_counter() - start)}
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{last['tok_s']:.0f}")
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                last["eval_loss"] = self.evaluate()
                self.log(f"step {self.step}: train loss {total:.4f}, held-out loss {last['eval_loss']:.4f}")
            if self.step % cfg.checkpoint_every == 0 or self.step == until:
                self.save()
        bar.close()
        self.model.eval()
        return last

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean objective on the first ``eval_batches`` held-out batches, with fixed noise."""
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator().manual_seed(12345)
        losses = []
        for i, (x0, loss_mask) in enumerate(self.eval_data.batches(self.cfg.batch_size)):
            if i == self.cfg.eval_batches:
                break
            out = self._loss(self.model, x0.to(self.model.device), loss_mask.to(self.model.device), generator)
            losses.append(float(out.loss))
        self.model.train(was_training)
        return sum(losses) / len(losses)

    def _state(self) -> dict:
        trainable = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {
            "model": trainable,
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "step": self.step,
            "rows": self.rows,
            "torch_rng": torch.get_rng_state(),
            "noise_rng": self.noise.get_state(),
            "config": dataclasses.asdict(self.cfg),
        }

    def save(self) -> None:
        """Atomic checkpoint (written aside, then renamed) plus, for adapters, the PEFT-layout adapter and
        a bfloat16 copy of it per checkpoint step under ``adapters/step-N`` (for acceptance-vs-training curves)."""
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / ".checkpoint.pt.tmp"
        torch.save(self._state(), tmp)
        os.replace(tmp, self.out / "checkpoint.pt")
        if self.cfg.regime == "adapter":
            checkpoint.save_adapter(self.model, self.out / checkpoint.ADAPTER_DIR)
            snapshot = self.out / "adapters" / f"step-{self.step:06d}"  # in the shipped precision, half the size
            checkpoint.save_adapter(self.model, snapshot, torch.bfloat16)
            progress = {"step": self.step, "rows": self.rows, "tokens": self.rows * self.train_data.cfg.seq_len}
            (snapshot / "progress.json").write_text(json.dumps(progress) + "\n")
        else:
            self.model.cfg = dataclasses.replace(self.model.cfg, block_size=self.cfg.block_size)
            checkpoint.save(self.out / "model", self.model, self.tokenizer)

    def _load(self) -> None:
        # Tensors and plain data only: a checkpoint that carries pickled code is refused.
        state = torch.load(self.out / "checkpoint.pt", map_location="cpu", weights_only=True)
        saved = TrainConfig(**{**state["config"], "lora_targets": tuple(state["config"]["lora_targets"])})
        if dataclasses.replace(saved, steps=self.cfg.steps) != dataclasses.replace(self.cfg, steps=self.cfg.steps):
            raise ValueError(f"{self.out}/checkpoint.pt was written with other settings: {saved}")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                params[name].copy_(value)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.step, self.rows = state["step"], state["rows"]
        torch.set_rng_state(state["torch_rng"])
        self.noise.set_state(state["noise_rng"])
        self.log(f"resumed from {self.out}/checkpoint.pt at step {self.step}")


@contextlib.contextmanager
def distributed(device: str | torch.device):
    """A process group for the duration of a training run when launched by ``torchrun`` (nccl on CUDA,
    gloo on CPUs); nothing otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
