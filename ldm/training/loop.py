"""One training loop for every objective: AdamW, warm-up, autocast, gradient accumulation, EMA, DDP, checkpoints.

Every random draw of step s (which items, which noise, which timesteps, which captions) comes from generators
seeded by (seed, s, micro-batch), never from global state. The step's batch is cut into processes x accumulation
micro-batches, and micro-batch j always gets the same items and the same generator, whichever process runs it. So
a run resumed from a checkpoint continues exactly as the uninterrupted run would have, and two processes with
DDP compute what one process computes with grad_accumulation=2.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ldm.checkpoints.files import write_atomically
from ldm.errors import CheckpointError

PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainSettings:
    steps: int = 1000                  # optimiser steps in total (a resumed run stops at the same step)
    batch_size: int = 32               # images per optimiser step, over all processes and micro-steps
    grad_accumulation: int = 1         # micro-steps per optimiser step
    lr: float = 1e-4
    warmup_steps: int = 100            # linear warm-up, then the lr_schedule
    lr_schedule: str = "constant"      # constant (EMA does the averaging) or cosine: down to min_lr at the last step
    min_lr: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0      # max global gradient norm, None to disable
    precision: str = "bf16"            # autocast dtype: bf16 (CPU and GPU), fp16 (GPU, with loss scaling), fp32
    ema_decay: float | None = None     # e.g. 0.999; exported weights are the EMA when set
    checkpoint_every: int = 500
    eval_every: int | None = None      # steps between scorings of the export (a multiple of checkpoint_every);
    #                                    None: at every checkpoint, when the config has an `evaluation:` section
    log_every: int = 25
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}; choose one of {PRECISIONS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule={self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must lie in [0, train.lr={self.lr}]")
        for name in ("steps", "batch_size", "grad_accumulation", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every is not None and (self.eval_every < 1 or self.eval_every % self.checkpoint_every):
            raise ValueError(f"train.eval_every={self.eval_every} must be a positive multiple of "
                             f"train.checkpoint_every={self.checkpoint_every}: it scores a checkpoint's export")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must lie in (0, 1) or be null, got {self.ema_decay}")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step `step` (0-based): a function of the step alone, so resuming keeps it."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - 1 - self.warmup_steps)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of parameters, with the usual warm-up so early averages are not stuck at init."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, parameter in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(parameter.detach().float(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, parameter in module.named_parameters():
            if name in self.shadow:
                parameter.copy_(self.shadow[name])


def step_generator(seed: int, step: int, part: int = 0) -> torch.Generator:
    """The generator for one part of one step (part 0 draws the items; part k > 0 serves micro-batch k - 1)."""
    state = np.random.SeedSequence([seed, step, part]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


@dataclass
class World:
    """This process's place among the processes torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


BatchFn = Callable[[torch.Tensor, torch.Generator], dict]    # (item indices, generator) -> objective inputs by name
ExportFn = Callable[[Path], None]                            # writes the current (EMA) model to a folder
EvaluateFn = Callable[[Path], dict]                          # an exported model's folder -> named scores


class Trainer:
    """Runs `objective(**batch_fn(indices, generator), generator)` -> (loss, metrics) for settings.steps steps."""

    def __init__(self, objective: nn.Module, dataset_size: int, batch_fn: BatchFn, settings: TrainSettings,
                 output: Path, export: ExportFn):
        settings.check()
        self.world = init_distributed(settings.device)
        per_step = self.world.size * settings.grad_accumulation
        if settings.batch_size % per_step:
            raise ValueError(f"train.batch_size={settings.batch_size} must be divisible by processes x "
                             f"grad_accumulation = {per_step}")
        self.objective = objective.to(settings.device)
        self.settings, self.output, self.export = settings, Path(output), export
        self.dataset_size, self.batch_fn = dataset_size, batch_fn
        trainable = [p for p in objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay,
                                           fused=settings.device.startswith("cuda") or None)
        self.ema = EMA(objective, settings.ema_decay) if settings.ema_decay else None
        self.model = (nn.parallel.DistributedDataParallel(objective) if self.world.size > 1 else objective)
        self.scaler = torch.amp.GradScaler("cuda", enabled=settings.precision == "fp16")
        self.step = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.output / "checkpoint.pt"

    # -------------------------------------------------------------------------------------------- the loop
    def run(self, evaluate: EvaluateFn | None = None) -> None:
        """Train to settings.steps; with `evaluate`, score the export at every eval_every-th checkpoint (log.jsonl)."""
        if evaluate is None and self.settings.eval_every is not None:
            raise ValueError("train.eval_every is set but the config has no `evaluation:` section to score with")
        self.resume()
        settings = self.settings
        progress = tqdm(total=settings.steps, initial=self.step, desc="train", disable=not self.world.is_main,
                        dynamic_ncols=True)
        started, losses = time.perf_counter(), []
        while self.step < settings.steps:
            loss, metrics = self.train_step()
            self.step += 1
            losses.append(loss)
            progress.update(1)
            if self.step % settings.log_every == 0 or self.step == settings.steps:
                mean = sum(losses) / len(losses)
                progress.set_postfix(loss=f"{mean:.4f}")
                self.log({"step": self.step, "loss": mean, "lr": settings.lr_at(self.step - 1),
                          "seconds": time.perf_counter() - started, **metrics})
                losses = []
            if self.step % settings.checkpoint_every == 0 or self.step == settings.steps:
                self.save_checkpoint()
                every = settings.eval_every or settings.checkpoint_every
                if evaluate is not None and (self.step % every == 0 or self.step == settings.steps):
                    self.log_evaluation(evaluate)
        progress.close()

    def train_step(self) -> tuple[float, dict]:
        settings, world = self.settings, self.world
        for group in self.optimizer.param_groups:
            group["lr"] = settings.lr_at(self.step)
        indices = torch.randint(self.dataset_size, (settings.batch_size,),
                                generator=step_generator(settings.seed, self.step))
        micro_batches = indices.chunk(world.size * settings.grad_accumulation)
        total, metrics = 0.0, {}
        for micro in range(settings.grad_accumulation):
            part = micro * world.size + world.rank
            generator = step_generator(settings.seed, self.step, part + 1)
            last = micro == settings.grad_accumulation - 1
            sync = nullcontext() if last or world.size == 1 else self.model.no_sync()
            with sync, self.autocast():
                loss, metrics = self.model(**self.batch_fn(micro_batches[part], generator), generator=generator)
                loss = loss / settings.grad_accumulation
            self.scaler.scale(loss).backward()
            total += loss.item()
        if not math.isfinite(total):
            raise FloatingPointError(f"loss became {total} at step {self.step}; lower train.lr or check the data")
        self.scaler.unscale_(self.optimizer)
        if settings.grad_clip:
            nn.utils.clip_grad_norm_(self.objective.parameters(), settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.objective, self.step)
        return total, metrics

    def autocast(self):
        if self.settings.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.settings.precision == "bf16" else torch.float16
        return torch.autocast(self.settings.device.split(":")[0], dtype=dtype)

    # -------------------------------------------------------------------------------- checkpoints and logs
    def log(self, record: dict) -> None:
        if self.world.is_main:
            with open(self.output / "log.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")

    def save_checkpoint(self) -> None:
        """Write the resumable state, then the exported model, each replacing the old one atomically."""
        if not self.world.is_main:
            return
        state = {"step": self.step, "objective": self.objective.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "ema": self.ema.shadow if self.ema else None, "settings": asdict(self.settings)}
        write_atomically(self.checkpoint_path, lambda temporary: torch.save(state, temporary))
        self.export_model(self.output / "model")

    def log_evaluation(self, evaluate: EvaluateFn) -> None:
        """Score the export just written, log the scores and show them under the progress bar. Evaluation draws
        from its own generators, so a run with it trains exactly as a run without."""
        if not self.world.is_main:
            return
        started = time.perf_counter()
        scores = evaluate(self.output / "model")
        self.log({"step": self.step, "eval": scores, "eval_seconds": round(time.perf_counter() - started, 1)})
        shown = ", ".join(f"{name} {'-' if value is None else f'{value:.3f}'}" for name, value in scores.items())
        tqdm.write(f"step {self.step}: {shown}")

    def export_model(self, folder: Path) -> None:
        """Export with EMA weights swapped in (the live weights are restored afterwards)."""
        if self.ema is None:
            self.export(folder)
            return
        live = {name: p.detach().clone() for name, p in self.objective.named_parameters()}
        self.ema.copy_to(self.objective)
        try:
            self.export(folder)
        finally:
            with torch.no_grad():
                for name, parameter in self.objective.named_parameters():
                    parameter.copy_(live[name])

    def resume(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        try:
            state = torch.load(self.checkpoint_path, map_location=self.settings.device, weights_only=True)
        except Exception as error:  # a truncated or foreign file: say which and how to start over
            raise CheckpointError(self.checkpoint_path, f"cannot resume from it ({error}); delete it to start "
                                  "over") from error
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.shadow = {name: tensor.float() for name, tensor in state["ema"].items()}
        self.step = state["step"]
