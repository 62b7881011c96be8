"""Paired A/B of every native loss family between the library at a base commit and the working
tree, in one process: each round runs the base step, then the current one, on the same inputs
(the order alternates between rounds), so machine noise hits both alike.

The base version is exported with ``git archive`` and imported under another package name;
its argument order is read from its signatures (``box_pred`` first, or the older
``cls_logits`` / ``pred_logits`` first). Prints, per family, the median forward + backward
milliseconds of each and their ratio (current / base; below 1 is faster).

Usage: ``python benchmarks/ab_commits.py BASE_COMMIT [--rounds 9] [--threads 2] [--families ssd,yolov8]``
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import detloss

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("ssd", "retinaface", "yolov3", "retinanet", "faster_rcnn", "yolov8", "detr")


def load_base(commit: str, folder: Path):
    """The package ``src/detloss`` of ``commit``, importable as ``detloss_base``."""
    archive = subprocess.run(["git", "archive", commit, "src/detloss"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "detloss_base"
    (folder / "src" / "detloss").rename(package)
    for source in package.rglob("*.py"):  # its custom operators get their own namespace
        text = source.read_text()
        source.write_text(text.replace('"detloss::', '"detloss_base::').replace("torch.ops.detloss.", "torch.ops.detloss_base."))
    sys.path.insert(0, str(folder))
    return importlib.import_module("detloss_base")


def _box_first(module_cls) -> bool:
    return next(iter(list(inspect.signature(module_cls.forward).parameters)[1:])) in ("box_pred", "rpn_box_pred")


def _boxes(gen: torch.Generator, batch: int, m: int, size: float) -> torch.Tensor:
    xy = torch.rand(batch, m, 2, generator=gen) * size * 0.7
    wh = torch.rand(batch, m, 2, generator=gen) * size * 0.25 + size * 0.03
    return torch.cat([xy, xy + wh], -1)


def leaves(*shapes, gen) -> list[torch.Tensor]:
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


def build(family: str, lib) -> Callable[[], None]:
    """One forward + backward of ``family``'s native loss from library ``lib`` (fixed inputs)."""
    gen = torch.Generator().manual_seed(0)
    if family in ("ssd", "retinaface"):
        batch, m = 32, 6
        priors = detloss.ssd_priors("voc300") if family == "ssd" else detloss.retinaface_priors((640, 640))
        p = priors.shape[0]
        gt = _boxes(gen, batch, m, 1.0)
        valid = torch.ones(batch, m, dtype=torch.bool)
        if family == "ssd":
            box, cls = leaves((batch, p, 4), (batch, p, 21), gen=gen)
            labels = torch.randint(0, 20, (batch, m), generator=gen)
            loss = lib.SSDLoss(21)
            args = (box, cls, priors, gt, labels, valid)
        else:
            box, cls, lm = leaves((batch, p, 4), (batch, p, 2), (batch, p, 10), gen=gen)
            landmarks = torch.rand(batch, m, 10, generator=gen)
            loss = lib.RetinaFaceLoss()
            args = (box, cls, lm, priors, gt, landmarks, valid, valid)
        grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    elif family == "yolov3":
        batch, m, c = 8, 20, 80
        heads = leaves(*[(batch, 416 // s, 416 // s, 3 * (5 + c)) for s in (8, 16, 32)], gen=gen)
        loss = lib.YOLOv3Loss(c)
        args = (heads, _boxes(gen, batch, m, 416.0), torch.randint(0, c, (batch, m), generator=gen),
                torch.ones(batch, m, dtype=torch.bool))
        grads = heads
    elif family == "retinanet":
        batch, m, c = 2, 20, 80
        anchors = detloss.retinanet_anchors(512)
        a = anchors.shape[0]
        cls, box = leaves((batch, a, c), (batch, a, 4), gen=gen)
        loss = lib.RetinaNetLoss(c)
        preds = (box, cls) if _box_first(lib.RetinaNetLoss) else (cls, box)
        args = (*preds, anchors, _boxes(gen, batch, m, 512.0), torch.randint(0, c, (batch, m), generator=gen),
                torch.ones(batch, m, dtype=torch.bool))
        grads = [cls, box]
    elif family == "faster_rcnn":
        batch, m, c = 2, 8, 21
        anchors = detloss.rcnn_anchors(38, 50, 16)
        a = anchors.shape[0]
        gt = _boxes(gen, batch, m, 600.0)
        labels = torch.randint(1, c, (batch, m), generator=gen)
        valid = torch.ones(batch, m, dtype=torch.bool)
        targets = lib.proposal_targets(_boxes(gen, batch, 2000, 600.0), gt, labels, valid,
                                       generator=torch.Generator().manual_seed(1))
        rpn_cls, rpn_box, cls, box = leaves((batch, a, 2), (batch, a, 4), (batch, 128, c), (batch, 128, 4 * c), gen=gen)
        loss = lib.FasterRCNNLoss()
        if _box_first(lib.FasterRCNNLoss):
            preds_rpn, preds_head = (rpn_box, rpn_cls), (box, cls)
        else:
            preds_rpn, preds_head = (rpn_cls, rpn_box), (cls, box)
        args = (*preds_rpn, anchors, gt, valid, (600, 800), *preds_head, targets)
        grads = [rpn_cls, rpn_box, cls, box]
        kwargs = {"generator": torch.Generator().manual_seed(2)}
        return lambda: _step(loss, args, grads, kwargs)
    elif family == "yolov8":
        batch, m, c = 8, 30, 80
        points, strides = detloss.anchor_points([(80, 80), (40, 40), (20, 20)], (8, 16, 32))
        a = points.shape[0]
        box, cls = leaves((batch, a, 64), (batch, a, c), gen=gen)
        loss = lib.YOLOv8Loss(c)
        args = (box, cls, points, strides, _boxes(gen, batch, m, 640.0),
                torch.randint(0, c, (batch, m), generator=gen), torch.ones(batch, m, dtype=torch.bool))
        grads = [box, cls]
    else:  # detr
        layers, batch, q, m, c = 6, 8, 100, 20, 91
        logits, raw = leaves((layers, batch, q, c + 1), (layers, batch, q, 4), gen=gen)
        gt = detloss.xyxy_to_cxcywh(_boxes(gen, batch, m, 1.0).clamp(0, 1))
        labels = torch.randint(0, c, (batch, m), generator=gen)
        valid = torch.ones(batch, m, dtype=torch.bool)
        loss = lib.DETRLoss(c)

        def step() -> None:
            boxes = raw.sigmoid()
            preds = (boxes, logits) if _box_first(lib.DETRLoss) else (logits, boxes)
            loss(*preds, gt, labels, valid)["loss"].backward()
            logits.grad = raw.grad = None

        return step
    return lambda: _step(loss, args, grads, {})


def _step(loss, args, grads, kwargs) -> None:
    loss(*args, **kwargs)["loss"].backward()
    for g in grads:
        g.grad = None


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        base = load_base(args.base, Path(folder))
        print(f"base {args.base}, torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()[0]:.2f}")
        print(f"{'family':12s} {'base ms':>9s} {'current ms':>11s} {'current/base':>13s}")
        for family in args.families.split(","):
            steps = {"base": build(family, base), "current": build(family, detloss)}
            for step in steps.values():
                step()  # warm-up
            times: dict[str, list[float]] = {"base": [], "current": []}
            for r in range(args.rounds):
                order = ("base", "current") if r % 2 == 0 else ("current", "base")
                for name in order:
                    times[name].append(timed(steps[name]))
            b, c = statistics.median(times["base"]), statistics.median(times["current"])
            print(f"{family:12s} {b:9.1f} {c:11.1f} {c / b:13.3f}", flush=True)


if __name__ == "__main__":
    main()
