"""YOLOv3 loss benchmark: forward + backward INCLUDING target building, at 416 x 416, 80 classes.

Compares ``detloss.YOLOv3Loss`` with a straightforward implementation of the original algorithm
(per-image NumPy target builder with a loop over boxes, dense label tensors, dense BCE, an
unchunked ``(B, H*W*A, 150)`` ignore IoU), and with a memory-traffic floor: bytes of the three
head maps read, their gradients written and the dense label tensors, at a measured copy bandwidth.

    python benchmarks/bench_yolov3.py [--batches 8 32] [--runs 30] [--threads 2]

Peak memory on the CPU is the peak resident size during the warm-up and timed runs above the
resident size before them (inputs built), in a fresh subprocess per (implementation, batch)
(:mod:`resident_memory`); on CUDA it is ``torch.cuda.max_memory_allocated`` above the inputs.
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

import numpy as np
import torch

from detloss import YOLOv3Loss
import detloss
from detloss._memory import new_like
from dispatch_count import describe_dense
from detloss.priors import yolov3_anchors
from resident_memory import PeakResident

SIZE, NUM_CLASSES, STRIDES, BOXES_PER_IMAGE, A = 416, 80, (8, 16, 32), 8, 3
# glibc malloc settings for the starred run: never return freed memory to the system, so large
# tensors (the head gradients) reuse already-mapped pages instead of page-faulting fresh ones
KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967295"


def make_inputs(batch: int, device: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    heads = [torch.tensor(rng.normal(0, 0.5, (batch, SIZE // s, SIZE // s, A * (5 + NUM_CLASSES))),
                          dtype=torch.float32, device=device, requires_grad=True) for s in STRIDES]
    centre = rng.uniform(20, SIZE - 20, (batch, BOXES_PER_IMAGE, 2))
    half = rng.uniform(4, 120, (batch, BOXES_PER_IMAGE, 2))
    boxes = np.clip(np.concatenate([centre - half, centre + half], -1), 0, SIZE).round()
    labels = rng.integers(0, NUM_CLASSES, (batch, BOXES_PER_IMAGE))
    valid = np.ones((batch, BOXES_PER_IMAGE), dtype=bool)
    return heads, boxes, labels, valid


# ---------------------------------------------------------------- straightforward baseline
def _iou_xywh_np(a, b):
    """Plain IoU of (..., 4) centre/size arrays (NumPy, broadcasting)."""
    lo = np.maximum(a[..., :2] - a[..., 2:] / 2, b[..., :2] - b[..., 2:] / 2)
    hi = np.minimum(a[..., :2] + a[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2)
    inter = np.prod(np.maximum(hi - lo, 0), -1)
    return inter / (np.prod(a[..., 2:], -1) + np.prod(b[..., 2:], -1) - inter)


def baseline_targets(boxes, labels, anchors):
    """Per image, per box, per scale: the original's loop (fallback clipped with its own grid)."""
    batch = boxes.shape[0]
    grids = [SIZE // s for s in STRIDES]
    label = [np.zeros((batch, g, g, A, 5 + NUM_CLASSES), np.float32) for g in grids]
    lists = [np.zeros((batch, 150, 4), np.float32) for _ in grids]
    for b in range(batch):
        counts = [0, 0, 0]
        for box, cls in zip(boxes[b], labels[b]):
            xywh = np.concatenate([(box[:2] + box[2:]) / 2, box[2:] - box[:2]])
            onehot = np.full(NUM_CLASSES, 0.01 / NUM_CLASSES)
            onehot[cls] += 0.99
            ious, hit_any = [], False
            for s, stride in enumerate(STRIDES):
                scaled = xywh / stride
                cell = np.floor(scaled[:2])
                anchor_boxes = np.concatenate([np.tile(cell + 0.5, (A, 1)), anchors[s]], -1)
                iou = _iou_xywh_np(scaled[None], anchor_boxes)
                ious.append(iou)
                hit = iou > 0.3
                if hit.any():
                    x, y = np.clip(cell.astype(int), 0, grids[s] - 1)
                    label[s][b, y, x, hit] = np.concatenate([xywh, [1.0], onehot])
                    lists[s][b, counts[s] % 150] = xywh
                    counts[s] += 1
                    hit_any = True
            if not hit_any:
                s, a = divmod(int(np.argmax(np.concatenate(ious))), A)
                x, y = np.clip(np.floor(xywh[:2] / STRIDES[s]).astype(int), 0, grids[s] - 1)
                label[s][b, y, x, a] = np.concatenate([xywh, [1.0], onehot])
                lists[s][b, counts[s] % 150] = xywh
                counts[s] += 1
    return label, lists


def baseline_loss(heads, boxes, labels, anchors_grid):
    """The original's ``compute_loss`` written plainly in torch on dense labels."""
    label_np, lists_np = baseline_targets(boxes, labels, anchors_grid.numpy())
    device = heads[0].device
    total = heads[0].new_zeros(())
    for s, (conv, stride) in enumerate(zip(heads, STRIDES)):
        batch, g = conv.shape[0], conv.shape[1]
        raw = conv.view(batch, g, g, A, 5 + NUM_CLASSES)
        label = torch.from_numpy(label_np[s]).to(device)
        true = torch.from_numpy(lists_np[s]).to(device)
        ys, xs = torch.meshgrid(torch.arange(g, device=device), torch.arange(g, device=device), indexing="ij")
        grid = torch.stack([xs, ys], -1)[None, :, :, None].float()
        xy = (torch.sigmoid(raw[..., :2]) + grid) * stride
        wh = torch.exp(raw[..., 2:4]) * anchors_grid[s].to(device) * stride
        pred = torch.cat([xy, wh], -1)

        def corners(t):
            return torch.cat([t[..., :2] - t[..., 2:] / 2, t[..., :2] + t[..., 2:] / 2], -1)

        p, l = corners(pred), corners(label[..., :4])
        inter = (torch.minimum(p[..., 2:], l[..., 2:]) - torch.maximum(p[..., :2], l[..., :2])).clamp(min=0).prod(-1)
        union = (p[..., 2:] - p[..., :2]).prod(-1) + (l[..., 2:] - l[..., :2]).prod(-1) - inter
        iou = inter / (union + 1e-6)
        enclose = (torch.maximum(p[..., 2:], l[..., 2:]) - torch.minimum(p[..., :2], l[..., :2])).prod(-1)
        giou = iou - (enclose - union) / (enclose + 1e-6)
        respond = label[..., 4]
        giou_loss = respond * (2 - label[..., 2] * label[..., 3] / SIZE**2) * (1 - giou)
        t = corners(true)[:, None, None, None]
        pe = p.detach()[..., None, :]
        inter = (torch.minimum(pe[..., 2:], t[..., 2:]) - torch.maximum(pe[..., :2], t[..., :2])).clamp(min=0).prod(-1)
        area_p = pred.detach()[..., 2:].prod(-1)[..., None]
        max_iou = (inter / (area_p + true[:, None, None, None, :, 2:].prod(-1) - inter)).amax(-1)
        bgd = (1 - respond) * (max_iou < 0.5).float()
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        conf = raw[..., 4]
        focal = (respond - torch.sigmoid(conf)).abs() ** 2
        conf_loss = focal * (respond + bgd) * bce(conf, respond, reduction="none")
        prob_loss = respond[..., None] * bce(raw[..., 5:], label[..., 5:], reduction="none")
        total = total + (giou_loss.sum() + conf_loss.sum() + prob_loss.sum()) / batch
    return total


# ---------------------------------------------------------------- measurement
def clear_grads(heads) -> None:
    """``zero_grad(set_to_none=True)``, as a training step does: the loss's gradient becomes
    ``.grad`` itself instead of being added into a stale one (which would time an extra pass)."""
    for h in heads:
        h.grad = None


def run_native(heads, boxes, labels, valid, loss):
    clear_grads(heads)
    dev = heads[0].device
    out = loss(heads, torch.as_tensor(boxes, dtype=torch.float32, device=dev),
               torch.as_tensor(labels, device=dev), torch.as_tensor(valid, device=dev))
    out["loss"].backward()


def run_baseline(heads, boxes, labels, valid, anchors):
    clear_grads(heads)
    baseline_loss(heads, boxes, labels, anchors).backward()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_one(impl: str, batch: int, runs: int, device: str) -> dict:
    heads, boxes, labels, valid = make_inputs(batch, device)
    anchors = yolov3_anchors(grid_units=True)
    loss = YOLOv3Loss(NUM_CLASSES).to(device)
    fn = (lambda: run_native(heads, boxes, labels, valid, loss)) if impl == "native" else \
         (lambda: run_baseline(heads, boxes, labels, valid, anchors))
    gbs_before = bandwidth_gbs(device)  # the floor's bandwidth, measured in this process around the runs
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    with PeakResident() as resident:
        fn()  # warm-up (counted in the peak: it allocates what the timed runs reuse)
        for _ in range(runs):
            for h in heads:
                h.grad = None
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resident.growth_mib
    del heads, loss
    return {"impl": impl, "batch": batch, "median_ms": statistics.median(times), "min_ms": min(times),
            "peak_mib": peak, "gbs": max(gbs_before, bandwidth_gbs(device))}


def bandwidth_gbs(device: str) -> float:
    """Copy bandwidth (bytes read + written per second) on a 256 MiB buffer."""
    src = torch.ones(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def floor_ms(batch: int, gbs: float) -> tuple[float, float]:
    cells = sum((SIZE // s) ** 2 * A for s in STRIDES)
    head_bytes = batch * cells * (5 + NUM_CLASSES) * 4
    total = 3 * head_bytes  # heads read + gradients written + dense labels read
    return total / 2**20, total / (gbs * 1e9) * 1e3


def fresh_gradient_ms(batch: int, device: str, write) -> float:
    """Time to produce the three head-sized gradients with their objectness channels written
    (best of 5) with ``write`` (a ``(B, H, W, A, 5 + C)`` head, its objectness gradient -> the
    gradient): what a ``zero_grad(set_to_none=True)`` training step pays for fresh gradients
    (page faults on the CPU included)."""
    heads = [torch.empty((batch, SIZE // s, SIZE // s, A, 5 + NUM_CLASSES), device=device) for s in STRIDES]
    objectness = [torch.ones(h.shape[:-1], device=device) for h in heads]
    best = math.inf
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        grads = [write(h, o) for h, o in zip(heads, objectness)]
        sync(device)
        best = min(best, time.perf_counter() - t0)
        del grads
    return best * 1e3


def zeros_then_objectness(head: torch.Tensor, objectness: torch.Tensor) -> torch.Tensor:
    grad = torch.zeros_like(head)
    grad[..., 4] = objectness
    return grad


def detloss_zeros_then_objectness(head: torch.Tensor, objectness: torch.Tensor) -> torch.Tensor:
    """As detloss writes a head gradient: ``new_like`` (NumPy-owned memory above 32 MiB on the CPU)."""
    with detloss.execution_strategy("gathered"):
        grad = new_like(head, zero=True)
    grad[..., 4] = objectness
    return grad


def dense_dispatch(batch: int, device: str) -> str:
    """Operators and host synchronisations of one dense forward + backward (value checks off)."""
    heads, boxes, labels, valid = make_inputs(batch, device)
    loss = YOLOv3Loss(NUM_CLASSES).to(device)
    detloss.set_value_checks(False)
    try:
        with detloss.execution_strategy("dense"):
            return describe_dense(lambda: run_native(heads, boxes, labels, valid, loss))
    finally:
        detloss.set_value_checks(True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(time_one(args.one[0], int(args.one[1]), args.runs, args.device)))
        return
    print(f"load average: {os.getloadavg()}, threads {args.threads}, device {args.device}")
    print("floor: the traffic at the copy bandwidth measured in the same process just before and after its runs")
    print(f"{'batch':>5} {'impl':>9} {'median ms':>10} {'min ms':>8} {'peak MiB':>9} {'GB/s':>6} {'floor ms':>9} "
          f"{'x floor':>8}")
    for batch in args.batches:
        rows = {}
        runs = [("native", "native", None), ("baseline", "baseline", None)]
        if args.device == "cpu":
            runs.append(("native", "native*", KEEP_FREED_MEMORY))
        for impl, label, tunables in runs:
            cmd = [sys.executable, __file__, "--one", impl, str(batch), "--runs", str(args.runs),
                   "--threads", str(args.threads), "--device", args.device]
            env = dict(os.environ, GLIBC_TUNABLES=tunables) if tunables else None
            rows[label] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
            r = rows[label]
            mib, fl = floor_ms(batch, r["gbs"])
            print(f"{batch:>5} {label:>9} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f} {r['peak_mib']:>9.0f} "
                  f"{r['gbs']:>6.1f} {fl:>9.1f} {r['median_ms'] / fl:>8.2f}")
        plain = fresh_gradient_ms(batch, args.device, zeros_then_objectness)
        ours = fresh_gradient_ms(batch, args.device, detloss_zeros_then_objectness)
        print(f"      fresh head gradients with their objectness written, alone: {plain:.1f} ms through torch.zeros_like, "
              f"{ours:.1f} ms as detloss allocates them (NumPy-owned memory above 32 MiB)")
        print(f"      dense strategy: {dense_dispatch(batch, args.device)}")
        print(f"      floor traffic {mib:.0f} MiB; baseline / native = "
              f"{rows['baseline']['median_ms'] / rows['native']['median_ms']:.2f}x")
    if args.device == "cpu":
        print(f"native*: the same, with glibc malloc keeping freed memory (GLIBC_TUNABLES={KEEP_FREED_MEMORY}),\n"
              "         so a new head-sized gradient reuses pages instead of faulting them in")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
