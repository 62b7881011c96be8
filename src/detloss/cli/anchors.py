"""``detloss anchors``: how well a prior/anchor layout covers a COCO-format data set.

For every ground-truth box (mapped into the preset's input as the family resizes images):
its best IoU with any prior (best possible recall at IoU 0.5 / 0.7), the positives the
family's matcher gives it, and the share of boxes without any positive per COCO size bucket
(small < 32^2, medium, large > 96^2 px of area in the original image). ``--fit K`` runs
YOLO-style k-means with distance ``1 - IoU`` on the box sizes and reports the fitted anchors
and the gain in anchor-shape recall (for ``yolov3`` presets with ``K`` a multiple of the
number of scales, also the matcher statistics with the fitted anchors).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional

import numpy as np
import torch

from .. import pad_ground_truth
from . import plots
from .data import load_coco, read_json
from .errors import CLIError
from .presets import PRESETS, Preset, get_preset, preset_from_config, to_input

SIZE_BUCKETS = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, float("inf")))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "anchors",
        help="best-possible recall and matched counts of an anchor layout on a COCO file; k-means fit",
        description="Report best possible recall (IoU 0.5 / 0.7), positives per GT and unmatched GTs by "
        "size of a prior/anchor layout on a COCO-format annotation file; optionally fit anchors by k-means.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: ssd300-voc)")
    src.add_argument("--config", default=None, metavar="FILE.json", help="a prior/anchor config (JSON, see docs)")
    p.add_argument("--annotations", required=True, metavar="COCO.json", help="COCO-format annotation file")
    p.add_argument("--fit", type=int, default=None, metavar="K", help="fit K anchors by IoU k-means")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default: 0)")
    p.add_argument("--out", default="detloss-anchors.png", help="histogram PNG (default: detloss-anchors.png)")
    p.set_defaults(handler=run)
    return p


def bucket_mask(area: np.ndarray, low: float, high: float) -> np.ndarray:
    """COCO size bucket: ``low <= area < high``, except that ``96^2`` itself is medium."""
    if high == float("inf"):
        return area > low
    return (area >= low) & ((area < high) if low == 0 else (area <= high))


@dataclasses.dataclass
class CoverageReport:
    """Per-GT statistics of a layout on a data set (arrays over all GT boxes)."""

    best_iou: np.ndarray
    positives: np.ndarray
    area: np.ndarray
    wh_input: np.ndarray

    def recall(self, threshold: float) -> float:
        return float((self.best_iou >= threshold).mean()) if self.best_iou.size else 0.0

    def lines(self) -> list[str]:
        n = self.best_iou.size
        out = [
            f"  best possible recall: IoU>=0.5 {self.recall(0.5):.3f}   IoU>=0.7 {self.recall(0.7):.3f}",
            f"  positives per GT: mean {self.positives.mean() if n else 0:.2f}, "
            f"median {np.median(self.positives) if n else 0:.0f}",
            f"  GTs with no positive: {float((self.positives == 0).mean()) if n else 0:.3f} of {n}",
        ]
        for name, lo, hi in SIZE_BUCKETS:
            sel = bucket_mask(self.area, lo, hi)
            k = int(sel.sum())
            share = float((self.positives[sel] == 0).mean()) if k else 0.0
            out.append(f"    {name:<6} {k:6d} GTs, no positive {share:.3f}")
        return out


def gather_boxes(path: str, preset: Preset) -> tuple[list[np.ndarray], np.ndarray]:
    """Per image, the GT boxes in the preset's input pixels; and every box's original area."""
    coco = load_coco(path)
    per_image, areas = [], []
    for info in coco.images:
        try:
            h, w = float(info["height"]), float(info["width"])
        except (KeyError, TypeError, ValueError):
            raise CLIError(f"annotations: image {info['id']}: expected numeric 'width' and 'height'") from None
        if h <= 0 or w <= 0:
            raise CLIError(f"annotations: image {info['id']}: expected positive width and height, got {w:g} x {h:g}")
        boxes = coco.boxes[info["id"]]
        per_image.append(to_input(boxes, (h, w), preset))
        areas.append((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return per_image, np.concatenate(areas) if areas else np.zeros(0, np.float32)


def coverage(preset: Preset, per_image: list[np.ndarray], areas: np.ndarray, batch: int = 8) -> CoverageReport:
    """Run the preset's matcher over all images, ``batch`` at a time."""
    best, pos = [], []
    for start in range(0, len(per_image), batch):
        chunk = [torch.from_numpy(b) for b in per_image[start : start + batch]]
        boxes, labels, valid = pad_ground_truth(chunk, [torch.zeros(len(b), dtype=torch.int64) for b in chunk])
        if boxes.shape[1] == 0:
            continue
        res = preset.assign(boxes, labels, valid)
        m = boxes.shape[1]
        best.append(res.iou.max(-1).values[valid].numpy())
        pos.append(res.positives_per_gt(m)[valid].numpy())
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    wh = np.concatenate([b[:, 2:] - b[:, :2] for b in per_image]) if per_image else np.zeros((0, 2))
    return CoverageReport(cat(best, np.float32), cat(pos, np.int64), areas, wh)


def wh_iou(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of centred boxes: ``wh (N, 2)`` x ``anchors (K, 2)`` -> ``(N, K)``."""
    inter = np.minimum(wh[:, None, 0], anchors[None, :, 0]) * np.minimum(wh[:, None, 1], anchors[None, :, 1])
    union = wh[:, None].prod(-1) + anchors[None].prod(-1) - inter
    return inter / np.maximum(union, 1e-12)


def kmeans_anchors(wh: np.ndarray, k: int, seed: int = 0, iterations: int = 300) -> np.ndarray:
    """YOLO-style k-means of box sizes ``wh (N, 2)`` with distance ``1 - IoU`` (centred boxes).

    k-means++ seeding with ``numpy.random.default_rng(seed)``, median update, stops when the
    assignment no longer changes. Returns ``(k, 2)`` anchors sorted by area.
    """
    wh = wh[(wh > 0).all(1)].astype(np.float64)
    if len(wh) < k:
        raise CLIError(f"--fit: expected at least K={k} boxes of positive size, the file has {len(wh)}")
    rng = np.random.default_rng(seed)
    centres = [wh[rng.integers(len(wh))]]
    for _ in range(1, k):
        d = 1.0 - wh_iou(wh, np.array(centres)).max(1)
        prob = d / d.sum() if d.sum() > 0 else np.full(len(wh), 1.0 / len(wh))
        centres.append(wh[rng.choice(len(wh), p=prob)])
    centres = np.array(centres)
    assign = None
    for _ in range(iterations):
        new = wh_iou(wh, centres).argmax(1)
        if assign is not None and (new == assign).all():
            break
        assign = new
        for j in range(k):
            if (assign == j).any():
                centres[j] = np.median(wh[assign == j], axis=0)
    return centres[np.argsort(centres.prod(1))]


def shape_recall(wh: np.ndarray, anchors: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """(share of boxes whose best centred IoU with an anchor shape >= threshold, mean best IoU)."""
    if len(wh) == 0:
        return 0.0, 0.0
    best = wh_iou(wh, anchors).max(1)
    return float((best >= threshold).mean()), float(best.mean())


def load_layout(args: argparse.Namespace) -> Preset:
    if args.config is not None:
        return preset_from_config(read_json(args.config, "--config"), f"--config {args.config}")
    return get_preset(args.preset or "ssd300-voc")


def run(args: argparse.Namespace) -> int:
    if args.fit is not None and args.fit <= 0:
        raise CLIError(f"--fit: expected a positive number of anchors, got {args.fit}")
    preset = load_layout(args)
    per_image, areas = gather_boxes(args.annotations, preset)
    report = coverage(preset, per_image, areas)
    n_priors = preset.priors_xyxy().shape[0]
    print(f"{preset.name} ({preset.family}, {n_priors} priors at {preset.image_size} px, {preset.resize}) "
          f"on {args.annotations}: {len(per_image)} images, {report.best_iou.size} GT boxes")
    print("\n".join(report.lines()))
    out = plots.iou_histogram(report.best_iou, args.out,
                              f"{preset.name}: best IoU per GT (BPR@0.5 {report.recall(0.5):.3f}, @0.7 {report.recall(0.7):.3f})")
    if args.fit is not None:
        fit_report(args.fit, args.seed, preset, report, per_image, areas)
    print(f"wrote {os.path.abspath(out)}")
    return 0


def fit_report(k: int, seed: int, preset: Preset, report: CoverageReport, per_image: list[np.ndarray],
               areas: np.ndarray) -> Optional[Preset]:
    """Print the fitted anchors and the recall gain; return the fitted YOLO preset if any."""
    fitted = kmeans_anchors(report.wh_input, k, seed)
    before = shape_recall(report.wh_input, preset.anchor_shapes())
    after = shape_recall(report.wh_input, fitted)
    print(f"k-means (1 - IoU) anchors, K={k}, seed {seed}, w x h in {preset.image_size} px input:")
    print("  " + ", ".join(f"{w:.0f}x{h:.0f}" for w, h in fitted))
    print(f"  anchor-shape recall (centred IoU>=0.5): {before[0]:.3f} -> {after[0]:.3f} "
          f"({after[0] - before[0]:+.3f}); mean best IoU {before[1]:.3f} -> {after[1]:.3f}")
    strides = tuple(preset.params.get("strides", (8, 16, 32)))
    if preset.family != "yolov3" or k % len(strides):
        return None
    tuned = dataclasses.replace(preset, name=f"{preset.name}+fit",
                                params={**preset.params, "anchors": fitted.reshape(len(strides), -1, 2).tolist()})
    new = coverage(tuned, per_image, areas)
    print(f"  with the fitted anchors ({k // len(strides)} per scale, small to large):")
    print("\n".join(new.lines()))
    return tuned
