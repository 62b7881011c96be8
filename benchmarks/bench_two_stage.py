"""Benchmark: Faster R-CNN (RPN + R-CNN) and RetinaNet losses at real sizes, on the CPU.

Each configuration runs in a fresh subprocess (one thread) that builds its inputs, runs
forward+backward (targets included) once to warm up, then once under each memory probe of
:mod:`resident_memory`, then times ``--runs`` more. Both memory figures are one call's growth
above the memory held with the inputs built, so they hold the call's temporaries and the
gradients; ``ratio`` divides each by the classification logits' bytes. ``allocated`` (live
allocations, read after every operator) is the same on every run; ``resident`` (RSS) also
moves with what the allocator keeps of freed memory.

Configs:
* ``frcnn``: 600x800 image, stride 16, 9 anchors (17100), batch 2, 2000 proposals per image,
  128 ROIs x 21 classes: rpn_targets + proposal_targets + FasterRCNNLoss.
* ``retinanet``: 800x800, 120087 anchors x 80 classes, batch 4, 50 GT per image.
* ``retinanet_unchunked``: the same loss written directly with the element-wise
  ``functional.sigmoid_focal_loss`` on a dense one-hot target (for comparison only).

    python benchmarks/bench_two_stage.py [--runs 5] [--configs frcnn retinanet ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from resident_memory import PeakAllocated, PeakResident

CONFIGS = ("frcnn", "retinanet", "retinanet_unchunked")


def _random_gt(torch, batch, m, size, gen):
    xy = torch.rand(batch, m, 2, generator=gen) * (size * 0.8)
    wh = 16 + torch.rand(batch, m, 2, generator=gen) * (size * 0.3)
    boxes = torch.cat((xy, (xy + wh).clamp(max=size - 1)), dim=-1)
    return boxes


def build(name: str):
    """Return ``(step, logits_bytes)``: ``step()`` runs one forward+backward."""
    import torch

    import detloss
    from detloss.functional import positive_normalizer, sigmoid_focal_loss, smooth_l1_loss

    gen = torch.Generator().manual_seed(0)
    if name == "frcnn":
        batch, classes = 2, 21
        anchors = detloss.rcnn_anchors(38, 50, 16)
        gt = _random_gt(torch, batch, 8, 600, gen)
        gt_labels = torch.randint(1, classes, (batch, 8), generator=gen)
        gt_valid = torch.ones(batch, 8, dtype=torch.bool)
        proposals = _random_gt(torch, batch, 2000, 600, gen)
        a = anchors.shape[0]
        rpn_cls = torch.randn(batch, a, 2, generator=gen, requires_grad=True)
        rpn_box = torch.randn(batch, a, 4, generator=gen, requires_grad=True)
        cls = torch.randn(batch, 128, classes, generator=gen, requires_grad=True)
        box = torch.randn(batch, 128, 4 * classes, generator=gen, requires_grad=True)
        loss = detloss.FasterRCNNLoss()

        def step():
            pt = detloss.proposal_targets(proposals, gt, gt_labels, gt_valid, num_classes=classes, generator=gen)
            out = loss(rpn_box, rpn_cls, anchors, gt, gt_valid, (600, 800), box, cls, pt, generator=gen)
            out["loss"].backward()
            for t in (rpn_cls, rpn_box, cls, box):
                t.grad = None

        logits_bytes = (rpn_cls.numel() + cls.numel()) * 4
        return step, logits_bytes

    batch, classes, m = 4, 80, 50
    anchors = detloss.retinanet_anchors(800)
    a = anchors.shape[0]
    gt = _random_gt(torch, batch, m, 800, gen)
    gt_labels = torch.randint(0, classes, (batch, m), generator=gen)
    gt_valid = torch.ones(batch, m, dtype=torch.bool)
    logits = torch.randn(batch, a, classes, generator=gen, requires_grad=True)
    deltas = (0.1 * torch.randn(batch, a, 4, generator=gen)).requires_grad_()
    loss = detloss.RetinaNetLoss(classes)

    if name == "retinanet":
        def step():
            loss(deltas, logits, anchors, gt, gt_labels, gt_valid)["loss"].backward()
            logits.grad = deltas.grad = None
    else:
        def step():
            assign = loss(deltas.detach(), logits.detach()[:, :, :1].expand(-1, -1, classes), anchors, gt,
                          gt_labels, gt_valid, return_assignment=True)["assignment"]
            onehot = torch.nn.functional.one_hot(assign.target_class.clamp(min=0), classes).float()
            onehot = onehot * (assign.target_class >= 0).unsqueeze(-1)
            norm = positive_normalizer(assign.num_pos)
            cls_loss = sigmoid_focal_loss(logits, onehot, weight=(assign.labels >= 0).unsqueeze(-1).float(),
                                          reduction="sum", normalizer=norm)
            box_loss = smooth_l1_loss(deltas, torch.zeros_like(deltas), 0.1,
                                      weight=(assign.labels == 1).unsqueeze(-1).float(), reduction="sum",
                                      normalizer=norm)
            (cls_loss + box_loss).backward()
            logits.grad = deltas.grad = None

    return step, logits.numel() * 4


def run_one(name: str, runs: int) -> dict:
    import torch

    torch.set_num_threads(1)
    step, logits_bytes = build(name)
    with PeakAllocated():
        step()  # warm-up: one-time allocations (lazy libraries, allocator pools, the probe's own)
    with PeakResident() as resident:
        step()
    with PeakAllocated() as allocated:
        step()
    per_mib = 2**20 / logits_bytes  # a MiB as a fraction of the logits
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    result = {"config": name, "median_ms": statistics.median(times), "min_ms": min(times), "runs": runs,
              "logits_mib": logits_bytes / 2**20, "allocated_mib": allocated.growth_mib,
              "resident_mib": resident.growth_mib, "allocated_ratio": allocated.growth_mib * per_mib,
              "resident_ratio": resident.growth_mib * per_mib}
    if name != "retinanet_unchunked":
        import detloss
        from dispatch_count import describe_dense

        detloss.set_value_checks(False)
        with detloss.execution_strategy("dense"):
            result["dense"] = describe_dense(step)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.runs)))
        return
    print(f"load average before: {os.getloadavg()}")
    print(f"{'config':<22}{'median ms':>11}{'min ms':>10}{'logits MiB':>12}{'allocated MiB':>15}{'ratio':>7}"
          f"{'resident MiB':>14}{'ratio':>7}")
    for name in args.configs:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--runs", str(args.runs)],
                              capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:<22}{r['median_ms']:>11.1f}{r['min_ms']:>10.1f}{r['logits_mib']:>12.1f}"
              f"{r['allocated_mib']:>15.1f}{r['allocated_ratio']:>7.2f}{r['resident_mib']:>14.1f}{r['resident_ratio']:>7.2f}")
        if "dense" in r:
            print(f"{'':<22}dense strategy: {r['dense']}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
