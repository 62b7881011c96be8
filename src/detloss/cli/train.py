"""Training loop of the demo, single-process or data-parallel (``torchrun``).

Data-parallel runs split a **fixed global batch**: every step all processes draw the same
``batch_size`` image indices (a seeded permutation per epoch) and process ``r`` takes the
``r``-th contiguous ``batch_size / world_size`` of them. The losses use their
``distributed=True`` normaliser (the positive count all-reduced and divided by the world size),
so DDP's gradient average equals the gradient of one process on the whole global batch.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .data import Batch, Dataset, collate
from .errors import CLIError
from .heads import HEADS, available_families
from .models import Detector


@dataclass
class DistInfo:
    """Process group facts: ``rank``, ``world_size``, ``device``; ``world_size == 1`` alone."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the process group started by ``torchrun`` (env ``WORLD_SIZE`` > 1), else run alone.

    gloo on the CPU, nccl when CUDA is available (one GPU per local rank).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def build_model(family: str, num_classes: int, image_size: int, *, distributed: bool = False, width: int = 64) -> Detector:
    """A :class:`Detector` with the head of ``family`` (``ssd``, ``retinanet``, ...)."""
    if family not in available_families():
        raise CLIError(f"--loss: the {family!r} loss is not available yet (available: {', '.join(available_families())})")
    if image_size % 32:
        raise CLIError(f"--image-size: expected a multiple of 32, got {image_size}")
    head = HEADS[family](num_classes, image_size, width=width, distributed=distributed)
    return Detector(head, width=width)


def global_batches(num_images: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global batches: a permutation seeded by ``(seed, epoch)``, cut into full
    batches of ``batch_size`` (the incomplete tail is dropped so every step sees the same
    global batch size)."""
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(num_images, generator=gen).tolist()
    return [perm[i : i + batch_size] for i in range(0, num_images - batch_size + 1, batch_size)]


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """The contiguous ``rank``-th of ``world_size`` equal parts of a global batch."""
    if len(indices) % world_size:
        raise CLIError(f"--batch-size: expected a multiple of the {world_size} processes, got {len(indices)}")
    per = len(indices) // world_size
    return indices[rank * per : (rank + 1) * per]


def compute_loss(model: nn.Module, head: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Forward ``batch`` through ``model`` (possibly DDP-wrapped) and the head's loss."""
    raw = model(batch.images)
    return head.loss(raw, batch)


def lr_at(step: int, total: int, base_lr: float, warmup: int = 50) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 5% of ``base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights: the step reached and the loss history."""

    step: int = 0
    history: dict[str, list[float]] = field(default_factory=lambda: {"step": []})


def train(
    model: Detector,
    train_set: Dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    info: DistInfo,
    state: Optional[TrainState] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    log_every: int = 5,
    progress: bool = True,
    on_step: Optional[Callable[[int], None]] = None,
) -> TrainState:
    """Run ``steps`` optimiser steps (continuing from ``state.step``) with AdamW.

    Shows a tqdm bar on the main process (epoch, loss components, images/s) and records the
    loss components (averaged over processes) every ``log_every`` steps in ``state.history``.
    """
    from tqdm import tqdm

    state = state or TrainState()
    optimizer = optimizer or make_optimizer(model, lr)
    ddp = model
    if info.enabled:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    per_epoch = len(train_set) // batch_size
    if per_epoch == 0:
        raise CLIError(f"--batch-size: expected at most the {len(train_set)} training images, got {batch_size}")
    model.train()
    bar = tqdm(total=steps, initial=state.step, disable=not (progress and info.is_main), unit="step",
               dynamic_ncols=True, mininterval=0.5)
    t0, seen = time.perf_counter(), 0
    while state.step < steps:
        epoch, pos = divmod(state.step, per_epoch)
        indices = global_batches(len(train_set), batch_size, seed, epoch)[pos]
        batch = collate(train_set, shard(indices, info.rank, info.world_size)).to(info.device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step, steps, lr)
        if hasattr(model.head, "progress"):  # heads whose loss follows a schedule (YOLO26's branch weights)
            model.head.progress = state.step / max(steps - 1, 1)
        losses = compute_loss(ddp, model.head, batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        state.step += 1
        seen += batch_size
        if state.step % log_every == 0 or state.step == steps:
            values = {k: v.detach().float() for k, v in losses.items() if isinstance(v, torch.Tensor) and v.dim() == 0}
            if info.enabled:
                stacked = torch.stack(list(values.values()))
                dist.all_reduce(stacked)
                values = dict(zip(values, (stacked / info.world_size).tolist()))
            else:
                values = {k: float(v) for k, v in values.items()}
            state.history["step"].append(state.step)
            for k, v in values.items():
                state.history.setdefault(k, []).append(v)
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_description(f"epoch {epoch + 1}")
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in values.items()}, "img/s": f"{rate:.0f}"}, refresh=False)
        bar.update(1)
        if on_step is not None:
            on_step(state.step)
    bar.close()
    return state


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW, no weight decay on norms and biases."""
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def save_checkpoint(path: str, model: Detector, optimizer: torch.optim.Optimizer, state: TrainState, config: dict) -> str:
    """Weights, optimiser state, step, loss history and the model config in one file."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": state.step,
                "history": state.history, "config": config}, path)
    return path


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (a :class:`CLIError` if unreadable)."""
    if not os.path.isfile(path):
        raise CLIError(f"--resume: file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CLIError(f"--resume: cannot read checkpoint {path}: {exc}") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "step", "config"} <= set(ckpt):
        raise CLIError(f"--resume: {path} is not a detloss demo checkpoint")
    return ckpt
