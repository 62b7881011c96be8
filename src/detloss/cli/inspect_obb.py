"""``detloss inspect --preset yolov8-obb-1024``: the rotated task-aligned assignment on one image.

The ground truth (the synthetic sample's shapes, ``--boxes`` or ``--annotations``) is axis-aligned,
so each box is turned about its centre by an angle drawn from ``--seed`` (uniform in
``[-pi/3, pi/3]``) into an ``xywhr`` box. An untrained head's predictions (seeded) go through
:func:`detloss.match_rotated_task_aligned` with YOLOv8-OBB's loss settings (top 10, alpha 0.5,
beta 6, ProbIoU, centres inside the rotated box, sides floored at stride[1] for that test). The
figure draws the rotated ground truth and the positive anchor cells coloured by their GT; each GT
line gives its best ProbIoU, positives, candidates, its own top-k, and what it lost / won in
conflicts.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
from torch import Tensor

from .. import match_rotated_task_aligned, xywhr_to_corners
from ..priors import anchor_points
from .presets import Preset, to_input

OBB_PRESETS = {
    "yolov8-obb-1024": Preset("yolov8-obb-1024", "yolov8-obb", 1024, "letterbox", pos_iou=0.0, num_classes=15),
}
STRIDES = (8, 16, 32)
OPTIONS = dict(topk=10, alpha=0.5, beta=6.0, min_box_side=16.0)


def rotated_ground_truth(boxes: np.ndarray, seed: int) -> Tensor:
    """``(n, 4)`` xyxy pixels -> ``(n, 5)`` xywhr: the same centre and sides, turned by a seeded angle."""
    gen = torch.Generator().manual_seed(seed + 1)
    b = torch.from_numpy(np.asarray(boxes, np.float32)).reshape(-1, 4)
    angle = (torch.rand(b.shape[0], generator=gen) * 2 - 1) * (math.pi / 3)
    return torch.cat(((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2], angle[:, None]), -1)


def untrained_predictions(preset: Preset, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Anchor points ``(P, 2)``, strides ``(P,)``, class probabilities ``(1, P, C)`` uniform in [0, 1)
    and rotated boxes ``(1, P, 5)``: centred on the point, sides 1-8 strides, any angle (seeded)."""
    s = preset.image_size
    points, strides = anchor_points([(s // st, s // st) for st in STRIDES], STRIDES)
    gen = torch.Generator().manual_seed(seed)
    p = points.shape[0]
    scores = torch.rand(1, p, preset.num_classes, generator=gen)
    sides = (torch.rand(1, p, 2, generator=gen) * 7 + 1) * strides[:, None]
    angle = (torch.rand(1, p, 1, generator=gen) - 0.5) * math.pi
    return points, strides, scores, torch.cat((points.expand(1, p, 2), sides, angle), -1)


def rotated_report(preset: Preset, gt: Tensor, labels: np.ndarray, names: list[str], seed: int):
    """Summary lines, the ``(P,)`` foreground and matched GT (-1 on background)."""
    points, strides, scores, pred = untrained_predictions(preset, seed)
    lab = torch.from_numpy(np.asarray(labels, np.int64)).reshape(1, -1).clamp(0, preset.num_classes - 1)
    valid = torch.ones(lab.shape, dtype=torch.bool)
    joint = match_rotated_task_aligned(scores, pred, points, gt[None], lab, valid, **OPTIONS)
    fg, matched = joint.foreground[0], joint.matched_gt[0]
    lines = [f"preset {preset.name} ({preset.family}, {preset.image_size} px, {preset.resize}): "
             f"{int(fg.sum())} positive anchor points, {gt.shape[0]} rotated GT; best IoU = the largest "
             f"max(ProbIoU, 0) of a candidate's predicted box (untrained head, seed {seed})"]
    for g in range(gt.shape[0]):
        alone = dict(gt_boxes=gt[None, g:g + 1], gt_labels=lab[:, g:g + 1], gt_valid=valid[:, g:g + 1])
        scored = match_rotated_task_aligned(scores, pred, points, **alone, **{**OPTIONS, "topk": points.shape[0]})
        own = match_rotated_task_aligned(scores, pred, points, **alone, **OPTIONS).foreground[0]
        candidates = int(_inside(points, gt[g], OPTIONS["min_box_side"]).sum())
        mine = fg & (matched == g)
        cx, cy, w, h, r = gt[g].tolist()
        lines.append(f"  GT{g} {names[g]:<10} [{cx:6.1f} {cy:6.1f} {w:6.1f} {h:6.1f} {math.degrees(r):6.1f} deg]  "
                     f"best IoU {float(scored.overlap.max()):.3f}  positives {int(mine.sum()):3d}  "
                     f"candidates {candidates:4d}  own top-k {int(own.sum()):2d}  "
                     f"lost {int((own & ~mine).sum())} / won {int((mine & ~own).sum())} in conflicts")
    missing = [f"GT{g}" for g in range(gt.shape[0]) if not (fg & (matched == g)).any()]
    lines.append(f"no positive at all: {', '.join(missing) or 'none'}")
    return lines, fg, torch.where(fg, matched, -1), points, strides


def _inside(points: Tensor, box: Tensor, side: float) -> Tensor:
    """``(P,)`` anchor centres inside the rotated box, its sides floored at ``side`` (closed)."""
    cx, cy, w, h, r = box.tolist()
    w, h = max(w, side), max(h, side)
    d = points - torch.tensor([cx, cy])
    u = d[:, 0] * math.cos(r) + d[:, 1] * math.sin(r)
    v = -d[:, 0] * math.sin(r) + d[:, 1] * math.cos(r)
    return (u.abs() <= w / 2) & (v.abs() <= h / 2)


def run(args: argparse.Namespace) -> int:
    """``detloss inspect`` for an oriented-box preset (see the module doc)."""
    from . import plots
    from .inspect import load_sample, to_input_image

    preset = OBB_PRESETS[args.preset]
    image, boxes, labels, names = load_sample(args, preset)
    gt = rotated_ground_truth(to_input(boxes, image.shape[:2], preset), args.seed)
    lines, fg, matched, points, strides = rotated_report(preset, gt, labels, names, args.seed)
    fig, ax = plots.plt.subplots(figsize=(7, 7))
    ax.imshow(to_input_image(image, preset))
    ax.axis("off")
    half = (strides[:, None] / 2).numpy()
    cells = np.concatenate((points.numpy() - half, points.numpy() + half), -1)
    for g in range(gt.shape[0]):
        for box in cells[(matched == g).numpy()]:
            plots.draw_box(ax, box, plots.class_colour(g), lw=0.8)
    for g, corners in enumerate(xywhr_to_corners(gt).numpy()):
        ax.add_patch(plots.Polygon(corners, closed=True, fill=False, edgecolor=plots.class_colour(g), lw=2.5))
        ax.text(corners[:, 0].min(), corners[:, 1].min() - 2, f"GT{g} {names[g]}", color="black", fontsize=8,
                bbox=dict(facecolor=plots.class_colour(g), alpha=0.9, pad=0.5, lw=0))
    ax.set_title(lines[0].split(";")[0] + "\nrotated GT, positive anchor cells coloured by GT", fontsize=9)
    out = plots._save(fig, args.out)
    print("\n".join(lines))
    print(f"wrote {os.path.abspath(out)}")
    return 0
