"""DETR set-prediction loss benchmark: B = 8 images, Q = 300 queries, 91 classes, 6 decoder
layers (5 auxiliary + final), 10 / 100 / 500 objects per image.

Compares ``detloss.DETRLoss`` (one padded ``(L * B, Q, M)`` cost, one solve for every layer and
image) with the original formulation written out here (facebookresearch/detr's matcher and
criterion): per layer, one ``(B * Q) x (all objects of the batch)`` cost, copied to the host,
sliced and solved per image; the losses gather the matched pairs through index lists;
``num_boxes.item()``. Both use SciPy's ``linear_sum_assignment`` and give the same losses
(checked before timing).

Timings are medians of interleaved runs in one process: the matching alone (cost + solve) and
the whole loss forward + backward (wall clock; ``cpu ms`` is the process CPU time of the same
step, summed over threads, steadier on a shared machine). The speed-up is the wall-clock ratio. Host round trips per step are counted in the code (a
solve call of detloss is one device-to-host copy of the stacked cost and one host-to-device
copy of the result; the baseline copies one cost per layer, sends index tensors back per image
and layer, and reads ``num_boxes``). Peak memory is the peak resident size during one forward +
backward above the resident size with the inputs built, in a fresh subprocess per row, after one
warm-up step (:mod:`resident_memory`).

    python benchmarks/bench_detr.py [--objects 10 100 500] [--runs 9] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from detloss import DETRLoss, detr_matching_cost, match_hungarian
from detloss.matching import hungarian as H
from resident_memory import PeakResident

B, Q, C, L = 8, 300, 91, 6
COST = (1.0, 5.0, 2.0)  # class, bbox, giou: DETR's training configuration
WEIGHTS = (1.0, 5.0, 2.0)
EOS = 0.1


def make_inputs(objects: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.normal(0, 1, (L, B, Q, C + 1)), dtype=torch.float32)
    boxes = torch.tensor(np.concatenate((rng.uniform(0.1, 0.9, (L, B, Q, 2)), rng.uniform(0.02, 0.4, (L, B, Q, 2))), -1),
                         dtype=torch.float32)
    gt = torch.tensor(np.concatenate((rng.uniform(0.1, 0.9, (B, objects, 2)), rng.uniform(0.02, 0.4, (B, objects, 2))), -1),
                      dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, C, (B, objects)))
    valid = torch.ones(B, objects, dtype=torch.bool)
    return logits, boxes, gt, labels, valid


# ------------------------------------------------------------- the original's formulation
class Counter:
    host_copies = 0  # device -> host (cost matrices, num_boxes)
    device_copies = 0  # host -> device (index tensors)
    solves = 0


def _xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), -1)


def _pairwise_giou(a, b):
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[:, :2])
    rb = torch.min(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b - inter
    iou = inter / union
    lt = torch.min(a[:, None, :2], b[:, :2])
    rb = torch.max(a[:, None, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


@torch.no_grad()
def baseline_match(logits, boxes, targets):
    """One layer: the (B * Q) x (all objects) cost, one host copy, one solve per image."""
    bs, nq = logits.shape[:2]
    prob = logits.flatten(0, 1).softmax(-1)
    out_bbox = boxes.flatten(0, 1)
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_bbox = torch.cat([t["boxes"] for t in targets])
    cost = COST[1] * torch.cdist(out_bbox, tgt_bbox, p=1) + COST[0] * -prob[:, tgt_ids] \
        + COST[2] * -_pairwise_giou(_xyxy(out_bbox), _xyxy(tgt_bbox))
    cost = cost.view(bs, nq, -1).cpu()
    Counter.host_copies += 1
    sizes = [len(t["boxes"]) for t in targets]
    indices = []
    for i, c in enumerate(cost.split(sizes, -1)):
        indices.append(linear_sum_assignment(c[i]))
        Counter.solves += 1
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def baseline_loss(logits_all, boxes_all, targets):
    """detr's SetCriterion (labels + boxes) over every layer; returns the weighted total."""
    num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))])
    num_boxes = torch.clamp(num_boxes, min=1).item()
    Counter.host_copies += 1
    empty_weight = torch.ones(C + 1)
    empty_weight[-1] = EOS
    total = 0.0
    for layer in [L - 1] + list(range(L - 1)):
        logits, boxes = logits_all[layer], boxes_all[layer]
        indices = baseline_match(logits, boxes, targets)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        Counter.device_copies += 2 * len(indices)  # index tensors go back to the device per image
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], C, dtype=torch.int64)
        target_classes[batch_idx, src_idx] = target_classes_o
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, empty_weight)
        src_boxes = boxes[batch_idx, src_idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum() / num_boxes
        loss_giou = (1 - torch.diag(_pairwise_giou(_xyxy(src_boxes), _xyxy(target_boxes)))).sum() / num_boxes
        total = total + WEIGHTS[0] * loss_ce + WEIGHTS[1] * loss_bbox + WEIGHTS[2] * loss_giou
    return total


def targets_of(gt, labels, valid):
    return [{"labels": labels[b][valid[b]], "boxes": gt[b][valid[b]]} for b in range(gt.shape[0])]


# ------------------------------------------------------------------------------- detloss
def detloss_match(logits, boxes, gt, labels, valid):
    rep = lambda t: t.unsqueeze(0).expand(L, *t.shape).flatten(0, 1)  # noqa: E731
    cost = detr_matching_cost(logits.flatten(0, 1), boxes.flatten(0, 1), rep(gt), rep(labels), rep(valid))
    return match_hungarian(cost, rep(valid))


def step(impl, loss_fn, logits, boxes, gt, labels, valid, targets):
    lg, bx = logits.detach().requires_grad_(), boxes.detach().requires_grad_()
    if impl == "baseline":
        total = baseline_loss(lg, bx, targets)
    else:
        total = loss_fn(bx, lg, gt, labels, valid)["loss"]
    total.backward()
    return total.detach()


def memory_row(impl: str, objects: int) -> float:
    inputs = make_inputs(objects)
    targets = targets_of(*inputs[2:])
    loss_fn = DETRLoss(C)
    step(impl, loss_fn, *inputs, targets)  # one-time costs (lazy imports, first-call set-up) left out
    with PeakResident() as probe:
        step(impl, loss_fn, *inputs, targets)
    return probe.growth_mib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--runs", type=int, default=9, help="timed runs per row (3 at 500 objects)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", nargs=2, metavar=("IMPL", "OBJECTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        print(json.dumps(memory_row(args.memory[0], int(args.memory[1]))))
        return
    print(f"DETR loss, B={B}, Q={Q}, {C} classes, {L} decoder layers, {torch.get_num_threads()} threads, CPU")
    print(f"{'objects':>7} {'impl':>9} {'match ms':>9} {'fwd+bwd ms':>11} {'cpu ms':>7} {'speed-up':>8} "
          f"{'scipy calls':>11} {'D2H':>4} {'H2D':>4} {'peak MiB':>8}")
    loss_fn = DETRLoss(C)
    for objects in args.objects:
        inputs = make_inputs(objects)
        logits, boxes, gt, labels, valid = inputs
        targets = targets_of(gt, labels, valid)
        # same numbers before timing
        ref = step("baseline", None, *inputs, targets)
        got = step("detloss", loss_fn, *inputs, targets)
        assert torch.allclose(ref, got, rtol=1e-4), (ref, got)
        runs = args.runs if objects < 500 else max(3, args.runs // 3)
        times = {(impl, what): [] for impl in ("baseline", "detloss") for what in ("match", "step", "cpu")}
        counts = {}
        for _ in range(runs):
            for impl in ("baseline", "detloss"):
                t0 = time.perf_counter()
                if impl == "baseline":
                    for layer in range(L):
                        baseline_match(logits[layer], boxes[layer], targets)
                else:
                    detloss_match(logits, boxes, gt, labels, valid)
                times[impl, "match"].append(time.perf_counter() - t0)
                Counter.host_copies = Counter.device_copies = Counter.solves = 0
                round_trips, scipy_calls = [], []
                real_solve_all, real_solver = H._solve_all, H.scipy_solver
                H._solve_all = lambda cost, *a: round_trips.append(1) or real_solve_all(cost, *a)
                H.scipy_solver = lambda: (lambda c: scipy_calls.append(1) or linear_sum_assignment(c))
                try:
                    t0, c0 = time.perf_counter(), time.process_time()
                    step(impl, loss_fn, *inputs, targets)
                    times[impl, "step"].append(time.perf_counter() - t0)
                    times[impl, "cpu"].append(time.process_time() - c0)
                finally:
                    H._solve_all, H.scipy_solver = real_solve_all, real_solver
                if impl == "baseline":
                    counts[impl] = (Counter.solves, Counter.host_copies, Counter.device_copies)
                else:  # one solve round trip: one D2H copy of the stacked cost, one H2D of the result
                    counts[impl] = (len(scipy_calls), len(round_trips), len(round_trips))
        base_step = statistics.median(times["baseline", "step"])
        for impl in ("baseline", "detloss"):
            mem = subprocess.run(
                [sys.executable, __file__, "--memory", impl, str(objects), "--threads", str(args.threads)],
                capture_output=True, text=True, check=True, env=dict(os.environ),
            ).stdout.strip().splitlines()[-1]
            match_ms = 1e3 * statistics.median(times[impl, "match"])
            step_ms = 1e3 * statistics.median(times[impl, "step"])
            cpu_ms = 1e3 * statistics.median(times[impl, "cpu"])
            solves, d2h, h2d = counts[impl]
            print(f"{objects:>7} {impl:>9} {match_ms:>9.1f} {step_ms:>11.1f} {cpu_ms:>7.1f} {base_step * 1e3 / step_ms:>7.2f}x "
                  f"{solves:>11} {d2h:>4} {h2d:>4} {float(mem):>8.1f}")


if __name__ == "__main__":
    main()
