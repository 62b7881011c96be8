"""Task-aligned assignment and the YOLOv8 loss: detloss's chunked form against a straightforward dense one.

Batch 8, 640 x 640 (8400 anchors at strides 8 / 16 / 32), 80 classes, reg_max 16, and 10 / 100 /
1000 ground-truth boxes per image (log-uniform sides 8-256 px). Two measurements per size:

* ``assign``: the assignment alone (``detloss.match_task_aligned`` against :func:`dense_assign`,
  the ``(B, M, A)`` formulation ultralytics uses: every pair's inside test, CIoU and metric held
  at once, top-k by a scatter into a ``(B, M, A)`` mask, conflicts by an argmax over ``M``);
* ``loss``: the whole loss forward + backward (``detloss.YOLOv8Loss`` against :func:`dense_loss`:
  decode, dense assignment, BCE, CIoU, DFL).

Times are medians of interleaved runs in one process (detloss, dense, detloss, ...: a shared
machine's load moves both alike). Peak memory is the peak resident size above the inputs, each
(form, measurement, size) in a fresh subprocess (:mod:`resident_memory`). With ``--count`` it also
prints the operators dispatched by one detloss loss step (forward + backward, dense strategy) and
its host synchronisations (``aten::_local_scalar_dense``, ``aten::nonzero``, ``aten::item``), which
must be 0. With ``--ab`` it times instead detloss's own two execution strategies on the loss step
(``"dense"`` against ``"auto"``, whose CPU form computes only the candidate pairs), interleaved:
the paired A/B that keeps the gathered path.

    python benchmarks/bench_tal.py [--gts 10 100 1000] [--runs 7] [--threads 2] [--count] [--ab]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import detloss
from detloss import YOLOv8Loss, match_task_aligned
from detloss.priors import anchor_points
from paired import paired_medians, peak_growth

BATCH, SIZE, NUM_CLASSES, REG_MAX, STRIDES = 8, 640, 80, 16, (8, 16, 32)
TOPK, ALPHA, BETA, SIDE, EPS = 10, 0.5, 6.0, 16.0, 1e-9


def make_inputs(num_gt: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    points, strides = anchor_points([(SIZE // s, SIZE // s) for s in STRIDES], STRIDES)
    a = points.shape[0]
    centre = torch.rand(BATCH, num_gt, 2, generator=gen) * SIZE
    side = torch.exp(torch.rand(BATCH, num_gt, 2, generator=gen) * math.log(32)) * 8
    gt = torch.cat((centre - side / 2, centre + side / 2), -1).clamp(0, SIZE)
    labels = torch.randint(0, NUM_CLASSES, (BATCH, num_gt), generator=gen)
    valid = torch.ones(BATCH, num_gt, dtype=torch.bool)
    box_pred = (torch.randn(BATCH, a, 4 * REG_MAX, generator=gen)).requires_grad_()
    cls_logits = (torch.randn(BATCH, a, NUM_CLASSES, generator=gen) - 3).requires_grad_()
    return box_pred, cls_logits, points, strides, gt, labels, valid


def decode(box_pred, points, strides):
    grid = points / strides[:, None]
    dist = box_pred.unflatten(-1, (4, REG_MAX)).softmax(-1).matmul(torch.arange(REG_MAX, dtype=box_pred.dtype))
    return torch.cat((grid - dist[..., :2], grid + dist[..., 2:]), -1)  # grid units


# ---------------------------------------------------------------- the straightforward dense form
def ciou(b1, b2, eps=1e-7):
    """CIoU of broadcastable xyxy boxes (..., 4), as ultralytics writes it."""
    x1, y1, x2, y2 = b1.unbind(-1)
    u1, v1, u2, v2 = b2.unbind(-1)
    w1, h1 = x2 - x1, (y2 - y1).clamp(min=eps)
    w2, h2 = u2 - u1, (v2 - v1).clamp(min=eps)
    inter = (torch.minimum(x2, u2) - torch.maximum(x1, u1)).clamp(min=0) * (torch.minimum(y2, v2) - torch.maximum(y1, v1)).clamp(min=0)
    iou = inter / (w1 * h1 + w2 * h2 - inter + eps)
    cw = torch.maximum(x2, u2) - torch.minimum(x1, u1)
    ch = torch.maximum(y2, v2) - torch.minimum(y1, v1)
    c2 = cw**2 + ch**2 + eps
    rho2 = ((u1 + u2 - x1 - x2) ** 2 + (v1 + v2 - y1 - y2) ** 2) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


@torch.no_grad()
def dense_assign(scores, pred, points, gt, labels, valid):
    """Task-aligned assignment on ``(B, M, A)`` tensors (the formulation of ultralytics)."""
    centre, size = (gt[..., :2] + gt[..., 2:]) / 2, gt[..., 2:] - gt[..., :2]
    size = torch.where(size < SIDE, torch.full_like(size, SIDE), size)
    floored = torch.cat((centre - size / 2, centre + size / 2), -1)
    deltas = torch.cat((points[None, None] - floored[:, :, None, :2], floored[:, :, None, 2:] - points[None, None]), -1)
    mask = (deltas.amin(-1) > 1e-9) & valid[..., None]  # (B, M, A)
    u = torch.where(mask, ciou(gt[:, :, None], pred[:, None]).clamp(min=0), 0.0)  # (B, M, A)
    return dense_targets(mask, u, scores, labels, gt)


def dense_targets(mask: torch.Tensor, u: torch.Tensor, scores, labels, gt) -> tuple:
    """Steps 2-6 of the dense formulation, for any box geometry: candidates ``mask (B, M, A)``,
    overlaps ``u (B, M, A)``; returns ``(fg (B, A), target_boxes (B, A, D), target_scores (B, A, C))``."""
    (_, m, a), c = mask.shape, scores.shape[-1]
    s = scores.transpose(1, 2).gather(1, labels[..., None].expand(-1, -1, a))  # (B, M, A)
    metric = torch.where(mask, s.pow(ALPHA) * u.pow(BETA), 0.0)
    top = metric.topk(min(TOPK, a), dim=-1).indices
    mask_pos = torch.zeros_like(mask).scatter_(-1, top, True) & mask & (metric > 0)
    count = mask_pos.sum(1)  # (B, A)
    best = F.one_hot(u.argmax(1), m).transpose(1, 2).bool()  # (B, M, A)
    mask_pos = torch.where((count > 1)[:, None], best, mask_pos)
    fg = mask_pos.any(1)
    gt_idx = mask_pos.float().argmax(1)
    metric, u = metric * mask_pos, u * mask_pos
    norm = (metric * u.amax(-1, keepdim=True) / (metric.amax(-1, keepdim=True) + EPS)).amax(1)  # (B, A)
    target_labels = labels.gather(1, gt_idx)
    target_boxes = gt.gather(1, gt_idx[..., None].expand(-1, -1, gt.shape[-1]))
    target_scores = F.one_hot(target_labels, c) * (norm * fg)[..., None]
    return fg, target_boxes, target_scores


def dense_loss(box_pred, cls_logits, points, strides, gt, labels, valid):
    """YOLOv8 loss with :func:`dense_assign` (decode, BCE, CIoU, DFL; gains 7.5 / 0.5 / 1.5)."""
    pred = decode(box_pred, points, strides)
    fg, target_boxes, target_scores = dense_assign(cls_logits.detach().sigmoid(), pred.detach() * strides[:, None],
                                                   points, gt, labels, valid)
    tss = target_scores.sum().clamp(min=1)
    loss_cls = F.binary_cross_entropy_with_logits(cls_logits, target_scores, reduction="sum") / tss
    target = target_boxes / strides[:, None]
    w = target_scores.sum(-1) * fg
    loss_box = ((1 - ciou(pred, target)) * w).sum() / tss
    grid = points / strides[:, None]
    dist = torch.cat((grid - target[..., :2], target[..., 2:] - grid), -1).clamp(0, REG_MAX - 1.01)
    left = dist.long()
    wl = left + 1 - dist
    logp = box_pred.unflatten(-1, (4, REG_MAX)).log_softmax(-1)
    dfl = -(logp.gather(-1, left[..., None])[..., 0] * wl + logp.gather(-1, left[..., None] + 1)[..., 0] * (1 - wl))
    loss_dfl = (dfl.mean(-1) * w).sum() / tss
    return 7.5 * loss_box + 0.5 * loss_cls + 1.5 * loss_dfl


# ---------------------------------------------------------------- measured steps
NATIVE_LOSS = YOLOv8Loss(NUM_CLASSES, reg_max=REG_MAX, topk=TOPK, alpha=ALPHA, beta=BETA, min_box_side=SIDE)


def step(form: str, what: str, inputs) -> None:
    box_pred, cls_logits, points, strides, gt, labels, valid = inputs
    if what == "assign":
        with torch.no_grad():
            scores = cls_logits.sigmoid()
            pred = decode(box_pred, points, strides) * strides[:, None]
        if form == "detloss":
            match_task_aligned(scores, pred, points, gt, labels, valid, topk=TOPK, alpha=ALPHA, beta=BETA,
                               min_box_side=SIDE)
        else:
            dense_assign(scores, pred, points, gt, labels, valid)
        return
    box_pred.grad = cls_logits.grad = None
    if form == "detloss":
        loss = NATIVE_LOSS(box_pred, cls_logits, points, strides, gt, labels, valid)["loss"]
    else:
        loss = dense_loss(box_pred, cls_logits, points, strides, gt, labels, valid)
    loss.backward()


def ab(num_gt: int, runs: int) -> dict:
    """Median ms of the detloss loss step under the dense strategy and under auto, interleaved."""
    inputs = make_inputs(num_gt)
    out = {"dense": [], "auto": []}
    for _ in range(runs + 1):
        for name in out:
            with detloss.execution_strategy(name):
                t0 = time.perf_counter()
                step("detloss", "loss", inputs)
                out[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v[1:]) for name, v in out.items()}


def peak_one(form: str, what: str, num_gt: int, runs: int) -> dict:
    inputs = make_inputs(num_gt)
    return peak_growth(lambda: step(form, what, inputs), runs)


def times(what: str, num_gt: int, runs: int) -> dict:
    inputs = make_inputs(num_gt)
    return paired_medians({form: lambda form=form: step(form, what, inputs) for form in ("detloss", "dense")}, runs)


class OpCounter(TorchDispatchMode):
    SYNCS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(num_gt: int) -> tuple[int, int]:
    inputs = make_inputs(num_gt)
    detloss.set_value_checks(False)  # the value checks are the sanctioned host reads
    try:
        with detloss.execution_strategy("dense"), OpCounter() as counter:
            step("detloss", "loss", inputs)
    finally:
        detloss.set_value_checks(True)
    syncs = sum(counter.ops[name] for name in OpCounter.SYNCS)
    return sum(counter.ops.values()), syncs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--count", action="store_true")
    parser.add_argument("--ab", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("FORM", "WHAT", "GT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(peak_one(args.one[0], args.one[1], int(args.one[2]), 2)))
        return
    print(f"load average: {os.getloadavg()}, threads {args.threads}; batch {BATCH}, {SIZE} px, {NUM_CLASSES} classes")
    if args.ab:
        for num_gt in args.gts:
            r = ab(num_gt, args.runs)
            print(f"loss step, {num_gt} GT/img: dense strategy {r['dense']:.1f} ms, auto (gathered) {r['auto']:.1f} ms, "
                  f"the gathered path saves {100 * (1 - r['auto'] / r['dense']):.0f} %", flush=True)
        return
    print(f"{'GT/img':>6} {'what':>6} {'detloss ms':>10} {'dense ms':>9} {'speed-up':>8} {'detloss MiB':>11} "
          f"{'dense MiB':>9} {'memory':>7}")
    for num_gt in args.gts:
        for what in ("assign", "loss"):
            runs = max(3, args.runs // 2) if num_gt >= 1000 else args.runs
            t = times(what, num_gt, runs)
            mem = {}
            for form in ("detloss", "dense"):
                cmd = [sys.executable, __file__, "--one", form, what, str(num_gt), "--threads", str(args.threads)]
                mem[form] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["peak_mib"]
            print(f"{num_gt:>6} {what:>6} {t['detloss']:>10.1f} {t['dense']:>9.1f} {t['dense'] / t['detloss']:>7.2f}x "
                  f"{mem['detloss']:>11.0f} {mem['dense']:>9.0f} {mem['dense'] / max(mem['detloss'], 1e-9):>6.1f}x",
                  flush=True)
    if args.count:
        for num_gt in args.gts:
            ops, syncs = count_ops(num_gt)
            print(f"detloss loss step (dense strategy), {num_gt} GT/img: {ops} dispatched ops, {syncs} host syncs")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
