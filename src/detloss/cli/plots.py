"""Figures of the command line, drawn with matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Polygon, Rectangle  # noqa: E402

from .data import Dataset  # noqa: E402
from .postprocess import Detections  # noqa: E402


def _save(fig: "plt.Figure", path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def class_colour(label: int) -> tuple:
    return plt.get_cmap("tab10")(int(label) % 10)


def draw_box(ax, box: Sequence[float], colour, *, dashed: bool = False, lw: float = 1.5, alpha: float = 1.0) -> None:
    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, lw=lw,
                           ls="--" if dashed else "-", alpha=alpha))


def loss_curve(history: Mapping[str, Sequence[float]], path: str, title: str = "") -> str:
    """Each loss component against the optimisation step (``history["step"]`` is the x axis)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = history["step"]
    for name, values in history.items():
        if name == "step":
            continue
        ax.plot(steps, values, label=name, lw=2.0 if name == "loss" else 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def detections_grid(
    dataset: Dataset,
    detections: Sequence[Detections],
    path: str,
    *,
    count: int = 8,
    score_threshold: float = 0.3,
) -> str:
    """Ground truth (white dashed) and detections above ``score_threshold`` (class colours,
    with class name and score) on the first ``count`` images of ``dataset``."""
    count = min(count, len(dataset))
    cols = min(4, count)
    rows = max(1, -(-count // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= count:
            continue
        ax.imshow(dataset.images[k])
        for box in dataset.boxes[k]:
            draw_box(ax, box, "white", dashed=True, lw=1.0)
        det = detections[k]
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            if score < score_threshold:
                continue
            colour = class_colour(label)
            draw_box(ax, box, colour)
            ax.text(box[0], box[1] - 1, f"{dataset.class_names[label]} {score:.2f}", color="black",
                    fontsize=6, bbox=dict(facecolor=colour, alpha=0.8, pad=0.5, lw=0))
        if dataset.landmarks and dataset.has_landmarks[k].any():
            for lm in dataset.landmarks[k][dataset.has_landmarks[k]]:
                ax.plot(lm[0::2], lm[1::2], "w.", ms=2)
        if getattr(det, "landmarks", None) is not None:
            for lm, score in zip(det.landmarks.tolist(), det.scores.tolist()):
                if score >= score_threshold:
                    ax.plot(lm[0::2], lm[1::2], "c+", ms=3)
    fig.suptitle("held-out images: ground truth (dashed) and detections", fontsize=10)
    return _save(fig, path)


def iou_histogram(best_iou: np.ndarray, path: str, title: str, thresholds: Sequence[float] = (0.5, 0.7)) -> str:
    """Histogram of the best IoU of each ground-truth box with any prior/anchor."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(best_iou, bins=np.linspace(0, 1, 41), color="tab:blue", alpha=0.85)
    for t in thresholds:
        ax.axvline(t, color="tab:red", ls="--", lw=1)
    ax.set_xlabel("best IoU with any prior/anchor")
    ax.set_ylabel("ground-truth boxes")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def assignment_figure(
    image: np.ndarray,
    gt_boxes: np.ndarray,
    positives: Sequence[tuple[np.ndarray, int]],
    ignored: np.ndarray,
    negatives: np.ndarray,
    path: str,
    title: str,
    labels: Optional[Sequence[str]] = None,
) -> str:
    """One image with its ground truth (thick, numbered), positive priors coloured by their
    GT (``positives`` = list of ``(boxes (k, 4), gt index)``), ignored priors (grey) and
    mined hard negatives (red, thin), all xyxy pixels of ``image``."""
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(image)
    ax.axis("off")
    for box in negatives:
        draw_box(ax, box, "red", lw=0.5, alpha=0.5)
    for box in ignored:
        draw_box(ax, box, "0.7", dashed=True, lw=0.5, alpha=0.6)
    for boxes, g in positives:
        for box in boxes:
            draw_box(ax, box, class_colour(g), lw=0.8)
    for g, box in enumerate(gt_boxes):
        draw_box(ax, box, class_colour(g), lw=2.5)
        name = f"GT{g}" + (f" {labels[g]}" if labels is not None else "")
        ax.text(box[0], box[1] - 2, name, color="black", fontsize=8,
                bbox=dict(facecolor=class_colour(g), alpha=0.9, pad=0.5, lw=0))
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
