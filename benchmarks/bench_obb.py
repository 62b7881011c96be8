"""Oriented boxes: rotated task-aligned assignment and the OBB loss step, detloss's chunked form against
the straightforward dense ``(B, M, A)`` one.

Batch 4, 1024 x 1024 (21,504 anchors at strides 8 / 16 / 32), 15 classes (DOTA-like), reg_max 16,
and 10 / 100 / 1000 rotated ground-truth boxes per image (log-uniform sides 8-64 px, any angle).
Two measurements per size:

* ``assign``: the assignment alone (``detloss.match_rotated_task_aligned`` against
  :func:`dense_assign`, every pair's inside test, ProbIoU and metric held at once as ``(B, M, A)``
  tensors, top-k by a scatter into a ``(B, M, A)`` mask, conflicts by an argmax over ``M``: the
  formulation of ultralytics' rotated assigner);
* ``loss``: the whole step, forward + backward: the drop-in ``detloss.compat.ultralytics.v8OBBLoss``
  called as in training (packing of the batch included) against :func:`dense_loss` (decode, dense
  assignment, BCE, ProbIoU, rotated DFL, angle term).

Times are medians of interleaved runs in one process (detloss, dense, detloss, ...). Peak memory is
the peak resident size above the inputs, each (form, measurement, size) in a fresh subprocess
(:mod:`resident_memory`).

    python benchmarks/bench_obb.py [--gts 10 100 1000] [--runs 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import types

import torch
import torch.nn.functional as F

from detloss import match_rotated_task_aligned
from detloss.compat.ultralytics import v8OBBLoss
from detloss.priors import anchor_points
from bench_tal import dense_targets
from paired import paired_medians, peak_growth

BATCH, SIZE, NUM_CLASSES, REG_MAX, STRIDES = 4, 1024, 15, 16, (8, 16, 32)
TOPK, ALPHA, BETA, SIDE, EPS = 10, 0.5, 6.0, 16.0, 1e-9


def make_inputs(num_gt: int, seed: int = 0):
    """The head's channel-first outputs, the feature maps and the batch rows, as ultralytics passes them."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [(SIZE // s, SIZE // s) for s in STRIDES]
    a = sum(h * w for h, w in sizes)
    n = BATCH * num_gt
    centre = torch.rand(n, 2, generator=gen) * 0.9 + 0.05
    side = torch.exp(torch.rand(n, 2, generator=gen) * math.log(8)) * 8 / SIZE  # 8-64 px
    angle = torch.rand(n, 1, generator=gen) * math.pi
    batch = {"batch_idx": torch.arange(BATCH).repeat_interleave(num_gt).float(),
             "cls": torch.randint(0, NUM_CLASSES, (n, 1), generator=gen).float(),
             "bboxes": torch.cat((centre, side, angle), -1)}
    preds = {"boxes": torch.randn(BATCH, 4 * REG_MAX, a, generator=gen).requires_grad_(),
             "scores": (torch.randn(BATCH, NUM_CLASSES, a, generator=gen) - 3).requires_grad_(),
             "angle": ((torch.rand(BATCH, 1, a, generator=gen) - 0.25) * math.pi).requires_grad_(),
             "feats": [torch.zeros(BATCH, 1, h, w) for h, w in sizes]}
    return preds, batch


def model():
    head = types.SimpleNamespace(stride=torch.tensor(STRIDES, dtype=torch.float32), nc=NUM_CLASSES, reg_max=REG_MAX)
    args = types.SimpleNamespace(box=7.5, cls=0.5, dfl=1.5, angle=1.0)
    weight = torch.nn.Parameter(torch.zeros(1))
    return types.SimpleNamespace(args=args, model=[head], parameters=lambda: iter([weight]))


DROP_IN = v8OBBLoss(model())


def padded(batch):
    """``(B, M, 5)`` xywhr pixels, labels and validity (every image has the same count here)."""
    m = batch["bboxes"].shape[0] // BATCH
    rows = batch["bboxes"].view(BATCH, m, 5)
    gt = torch.cat((rows[..., :4] * SIZE, rows[..., 4:]), -1)
    valid = (gt[..., 2] >= 2) & (gt[..., 3] >= 2)
    return gt, batch["cls"].view(BATCH, m).long(), valid


def grid_and_strides():
    points, strides = anchor_points([(SIZE // s, SIZE // s) for s in STRIDES], STRIDES)
    return points, strides


def decode(preds, points, strides):
    grid = points / strides[:, None]
    box = preds["boxes"].permute(0, 2, 1)
    dist = box.unflatten(-1, (4, REG_MAX)).softmax(-1).matmul(torch.arange(REG_MAX, dtype=box.dtype))
    angle = preds["angle"][:, 0]
    half = (dist[..., 2:] - dist[..., :2]) / 2
    cos, sin = angle.cos(), angle.sin()
    xy = torch.stack((half[..., 0] * cos - half[..., 1] * sin, half[..., 0] * sin + half[..., 1] * cos), -1) + grid
    return torch.cat((xy, dist[..., :2] + dist[..., 2:], angle[..., None]), -1), box  # grid units


# ---------------------------------------------------------------- the straightforward dense form
def covariance(b, variance=0.0):
    a_, b_ = b[..., 2] ** 2 / 12 + variance, b[..., 3] ** 2 / 12 + variance
    cos, sin = b[..., 4].cos(), b[..., 4].sin()
    return a_ * cos**2 + b_ * sin**2, a_ * sin**2 + b_ * cos**2, (a_ - b_) * cos * sin


def probiou(b1, b2, variance=0.0, eps=1e-7):
    """ProbIoU of broadcastable xywhr boxes (..., 5)."""
    a1, b1_, c1 = covariance(b1, variance)
    a2, b2_, c2 = covariance(b2, variance)
    dx, dy = b1[..., 0] - b2[..., 0], b1[..., 1] - b2[..., 1]
    den = (a1 + a2) * (b1_ + b2_) - (c1 + c2) ** 2
    t1 = ((a1 + a2) * dy**2 + (b1_ + b2_) * dx**2) / (den + eps) * 0.25
    t2 = ((c1 + c2) * (-dx) * dy) / (den + eps) * 0.5
    t3 = torch.log(den / (4 * ((a1 * b1_ - c1**2).clamp(0) * (a2 * b2_ - c2**2).clamp(0)).sqrt() + eps) + eps) * 0.5
    bd = (t1 + t2 + t3).clamp(eps, 100.0)
    return 1 - (1 - torch.exp(-bd) + eps).sqrt()


def dense_assign(scores, pred, points, gt, labels, valid):
    """Rotated task-aligned assignment on ``(B, M, A)`` tensors."""
    wh = torch.where((gt[..., 2:4] < SIDE) & valid[..., None], torch.full_like(gt[..., 2:4], SIDE), gt[..., 2:4])
    cos, sin = gt[..., 4].cos(), gt[..., 4].sin()
    d = points[None, None] - gt[:, :, None, :2]  # (B, M, A, 2)
    u_ = d[..., 0] * cos[..., None] + d[..., 1] * sin[..., None]
    v_ = -d[..., 0] * sin[..., None] + d[..., 1] * cos[..., None]
    mask = (u_.abs() <= wh[..., 0:1] / 2) & (v_.abs() <= wh[..., 1:2] / 2) & valid[..., None]  # (B, M, A)
    u = torch.where(mask, probiou(gt[:, :, None], pred[:, None]).clamp(min=0), 0.0)  # (B, M, A)
    return dense_targets(mask, u, scores, labels, gt)


def dense_loss(preds, batch):
    """The OBB loss with :func:`dense_assign` (gains 7.5 / 0.5 / 1.5 / 1.0)."""
    points, strides = grid_and_strides()
    gt, labels, valid = padded(batch)
    pred, box = decode(preds, points, strides)
    scale = torch.cat((strides[:, None].expand(-1, 4), torch.ones_like(strides[:, None])), -1)
    cls_logits = preds["scores"].permute(0, 2, 1)
    fg, target_boxes, target_scores = dense_assign(cls_logits.detach().sigmoid(), pred.detach() * scale,
                                                   points, gt, labels, valid)
    tss = target_scores.sum().clamp(min=1)
    loss_cls = F.binary_cross_entropy_with_logits(cls_logits, target_scores, reduction="sum") / tss
    target = target_boxes / scale
    w = target_scores.sum(-1) * fg
    loss_box = ((1 - probiou(pred, target, 0.01)) * w).sum() / tss
    grid = points / strides[:, None]
    off = target[..., :2] - grid
    cos, sin = target[..., 4].cos(), target[..., 4].sin()
    xf, yf = off[..., 0] * cos + off[..., 1] * sin, -off[..., 0] * sin + off[..., 1] * cos
    hw, hh = target[..., 2] / 2, target[..., 3] / 2
    dist = torch.stack((hw - xf, hh - yf, hw + xf, hh + yf), -1).clamp(0, REG_MAX - 1.01)
    left = dist.long()
    wl = left + 1 - dist
    logp = box.unflatten(-1, (4, REG_MAX)).log_softmax(-1)
    dfl = -(logp.gather(-1, left[..., None])[..., 0] * wl + logp.gather(-1, left[..., None] + 1)[..., 0] * (1 - wl))
    loss_dfl = (dfl.mean(-1) * w).sum() / tss
    delta = pred[..., 4] - target[..., 4]
    aspect = torch.exp(-torch.log(target[..., 2].clamp(min=1e-9) / target[..., 3].clamp(min=1e-9)) ** 2 / 9)
    loss_angle = (torch.sin(2 * delta) ** 2 * aspect * w).sum() / tss
    return (7.5 * loss_box + 0.5 * loss_cls + 1.5 * loss_dfl + loss_angle) * BATCH


# ---------------------------------------------------------------- measured steps
def step(form: str, what: str, inputs) -> None:
    preds, batch = inputs
    if what == "assign":
        points, strides = grid_and_strides()
        gt, labels, valid = padded(batch)
        with torch.no_grad():
            pred, _ = decode(preds, points, strides)
            pred = pred * torch.cat((strides[:, None].expand(-1, 4), torch.ones_like(strides[:, None])), -1)
            scores = preds["scores"].permute(0, 2, 1).sigmoid()
        if form == "detloss":
            match_rotated_task_aligned(scores, pred, points, gt, labels, valid, topk=TOPK, alpha=ALPHA, beta=BETA,
                                       min_box_side=SIDE)
        else:
            dense_assign(scores, pred, points, gt, labels, valid)
        return
    for key in ("boxes", "scores", "angle"):
        preds[key].grad = None
    if form == "detloss":
        loss = DROP_IN(preds, batch)[0].sum()
    else:
        loss = dense_loss(preds, batch).sum()
    loss.backward()


def peak_one(form: str, what: str, num_gt: int, runs: int) -> dict:
    inputs = make_inputs(num_gt)
    return peak_growth(lambda: step(form, what, inputs), runs)


def times(what: str, num_gt: int, runs: int) -> dict:
    inputs = make_inputs(num_gt)
    return paired_medians({form: lambda form=form: step(form, what, inputs) for form in ("detloss", "dense")}, runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("FORM", "WHAT", "GT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(peak_one(args.one[0], args.one[1], int(args.one[2]), 1 if int(args.one[2]) >= 1000 else 2)))
        return
    print(f"load average: {os.getloadavg()}, threads {args.threads}; batch {BATCH}, {SIZE} px, {NUM_CLASSES} classes, "
          f"rotated boxes 8-64 px")
    print(f"{'GT/img':>6} {'what':>6} {'detloss ms':>10} {'dense ms':>9} {'speed-up':>8} {'detloss MiB':>11} "
          f"{'dense MiB':>9} {'memory':>7}")
    first_assign_mib = None
    for num_gt in args.gts:
        for what in ("assign", "loss"):
            runs = 2 if num_gt >= 1000 else args.runs
            t = times(what, num_gt, runs)
            mem = {}
            for form in ("detloss", "dense"):
                cmd = [sys.executable, __file__, "--one", form, what, str(num_gt), "--threads", str(args.threads)]
                mem[form] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["peak_mib"]
            if what == "assign" and first_assign_mib is None:
                first_assign_mib = mem["detloss"]
            print(f"{num_gt:>6} {what:>6} {t['detloss']:>10.1f} {t['dense']:>9.1f} {t['dense'] / t['detloss']:>7.2f}x "
                  f"{mem['detloss']:>11.0f} {mem['dense']:>9.0f} {mem['dense'] / max(mem['detloss'], 1e-9):>6.1f}x",
                  flush=True)
            if what == "assign" and first_assign_mib:
                print(f"{'':>6} detloss assignment memory {mem['detloss'] / first_assign_mib:.2f}x its value at "
                      f"{args.gts[0]} GT/img", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
