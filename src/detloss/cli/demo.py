"""``detloss demo``: train a tiny detector with a detloss loss, report COCO mAP, draw results.

Synthetic shapes (or faces for ``--loss retinaface``) are generated once in memory, or a
COCO-format data set is read with ``--data ANNOTATIONS.json --images DIR``. Outputs go to
``--out``: ``metrics.json``, ``loss_curve.png``, ``detections.png``, ``checkpoint.pt``.
Under ``torchrun --nproc_per_node=N -m detloss demo`` the global batch is split over the
processes (see :mod:`detloss.cli.train`); only rank 0 evaluates and writes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from .data import Dataset, load_coco_dataset, make_synthetic, split
from .errors import CLIError
from .evaluate import coco_map, predict_dataset
from .heads import available_families
from . import plots
from .train import (
    TrainState, build_model, load_checkpoint, make_optimizer, save_checkpoint, setup_distributed, train,
)

FAMILIES = ("ssd", "retinanet", "yolov3", "yolov8", "yolo26", "fasterrcnn", "retinaface")
# per-family learning rate (AdamW) of the default run
LEARNING_RATES = {"ssd": 2e-3, "retinanet": 2e-3, "yolov3": 2e-3, "yolov8": 2e-3, "yolo26": 2e-3, "fasterrcnn": 2e-3, "retinaface": 2e-3}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="train a tiny detector on synthetic shapes and report COCO mAP",
        description="Train a small detector with a detloss loss on synthetic shapes (or a COCO-format "
        "data set), evaluate COCO mAP on held-out images, write metrics, plots and a checkpoint.",
    )
    p.add_argument("--loss", choices=FAMILIES, default="ssd", help="loss family and head (default: ssd)")
    p.add_argument("--epochs", type=int, default=12, help="passes over the training images (default: 12)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps; overrides --epochs")
    p.add_argument("--batch-size", type=int, default=16, help="global batch size (default: 16)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: per family, 2e-3)")
    p.add_argument("--image-size", type=int, default=128, help="square input side, multiple of 32 (default: 128)")
    p.add_argument("--train-images", type=int, default=1200, help="synthetic training images (default: 1200)")
    p.add_argument("--val-images", type=int, default=200, help="held-out images (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, weights and batch order (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="./detloss-demo", help="output directory (default: ./detloss-demo)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue training from a checkpoint.pt")
    p.add_argument("--data", default=None, metavar="ANNOTATIONS.json", help="COCO-format annotations instead of synthetic data")
    p.add_argument("--images", default=None, metavar="DIR", help="image directory of --data")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=run)
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "image_size", "train_images", "val_images"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.image_size % 32:
        raise CLIError(f"--image-size: expected a multiple of 32, got {args.image_size}")
    if args.steps is not None and args.steps <= 0:
        raise CLIError(f"--steps: expected a positive integer, got {args.steps}")
    if args.threads is not None and args.threads <= 0:
        raise CLIError(f"--threads: expected a positive integer, got {args.threads}")
    if (args.data is None) != (args.images is None):
        raise CLIError("--data and --images: expected both (a COCO annotation file and its image directory) or neither")
    if args.data is not None and args.loss == "retinaface":
        raise CLIError("--loss retinaface: COCO files carry no 5-point landmarks; use the synthetic faces")
    if args.loss not in available_families():
        raise CLIError(f"--loss: the {args.loss!r} loss is not available yet (available: {', '.join(available_families())})")


def load_data(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """``(train, val)``: the COCO data set split (last ``--val-images`` held out), or two
    synthetic sets from different seeds."""
    if args.data is not None:
        return split(load_coco_dataset(args.data, args.images, args.image_size), args.val_images)
    faces = args.loss == "retinaface"
    train_set = make_synthetic(args.train_images, args.image_size, args.seed, faces=faces)
    val_set = make_synthetic(args.val_images, args.image_size, args.seed + 7919, faces=faces)
    return train_set, val_set


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = setup_distributed()
    start = time.perf_counter()
    train_set, val_set = load_data(args)
    num_classes = train_set.num_classes
    lr = args.lr if args.lr is not None else LEARNING_RATES[args.loss]
    per_epoch = len(train_set) // args.batch_size
    total_steps = args.steps if args.steps is not None else args.epochs * max(per_epoch, 1)
    config = {"loss": args.loss, "num_classes": num_classes, "class_names": list(train_set.class_names),
              "image_size": args.image_size, "width": 64}

    torch.manual_seed(args.seed)
    model = build_model(args.loss, num_classes, args.image_size, distributed=info.enabled).to(info.device)
    optimizer = make_optimizer(model, lr)
    state = TrainState()
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if ckpt["config"] != config:
            raise CLIError(f"--resume: checkpoint was trained with {ckpt['config']}, this run is {config}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = TrainState(ckpt["step"], ckpt.get("history") or {"step": []})

    out = os.path.abspath(args.out)
    if info.is_main:
        os.makedirs(out, exist_ok=True)
        print(f"detloss demo: {args.loss} on {len(train_set)} training / {len(val_set)} held-out images "
              f"({num_classes} classes, {args.image_size} px), {total_steps} steps of {args.batch_size} images"
              + (f" over {info.world_size} processes" if info.enabled else ""), flush=True)
    t_train = time.perf_counter()
    steps_before = state.step
    state = train(model, train_set, steps=total_steps, batch_size=args.batch_size, lr=lr, seed=args.seed,
                  info=info, state=state, optimizer=optimizer, progress=not args.no_progress)
    train_seconds = time.perf_counter() - t_train

    if info.enabled:
        dist.barrier()
    if not info.is_main:
        dist.destroy_process_group()
        return 0
    model.cpu()
    detections = predict_dataset(model, val_set)
    metrics = coco_map(val_set, detections)
    trained = state.step - steps_before
    metrics.update({
        "loss": args.loss, "steps": state.step, "batch_size": args.batch_size, "image_size": args.image_size,
        "train_images": len(train_set), "val_images": len(val_set), "seed": args.seed,
        "world_size": info.world_size, "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 2),
        "images_per_second": round(trained * args.batch_size / max(train_seconds, 1e-9), 1),
        "total_seconds": round(time.perf_counter() - start, 2),
        "final_losses": {k: v[-1] for k, v in state.history.items() if k != "step" and v},
    })
    paths = {
        "metrics": os.path.join(out, "metrics.json"),
        "loss curve": plots.loss_curve(state.history, os.path.join(out, "loss_curve.png"), f"detloss demo: {args.loss}"),
        "detections": plots.detections_grid(val_set, detections, os.path.join(out, "detections.png")),
        "checkpoint": save_checkpoint(os.path.join(out, "checkpoint.pt"), model, optimizer, state, config),
    }
    with open(paths["metrics"], "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=2)
    print(f"COCO mAP@[.5:.95] {metrics['mAP']:.3f}   mAP@.5 {metrics['mAP50']:.3f}   "
          f"({metrics['images_per_second']:.0f} images/s, {metrics['total_seconds']:.0f} s in all)")
    for name, path in paths.items():
        print(f"  {name:<11} {path}")
    if info.enabled:
        dist.destroy_process_group()
    return 0
