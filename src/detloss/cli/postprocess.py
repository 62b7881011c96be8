"""Turning dense predictions into detections: score threshold, top-k, class-aware NMS.

Written in plain torch (no torchvision). The NMS is the greedy algorithm: boxes in order of
decreasing score, each one removes the later boxes of its class that overlap it by more than
the threshold. It runs on one ``(K, K)`` IoU matrix per image, so keep ``K`` (``pre_nms``)
small: a few hundred.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..boxes import box_iou


@dataclass
class Detections:
    """Detections of one image: ``boxes (D, 4)`` xyxy pixels, ``scores (D,)``, ``labels (D,)``
    int64, and ``landmarks (D, K)`` pixels when the head predicts them."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    landmarks: Optional[Tensor] = None


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of ``boxes (K, 4)`` xyxy with ``scores (K,)``; returns kept indices, best first."""
    order = scores.argsort(descending=True)
    boxes = boxes[order]
    iou = box_iou(boxes, boxes)
    k = boxes.shape[0]
    # suppressed[j] becomes True once a kept box before j overlaps it
    keep = torch.ones(k, dtype=torch.bool)
    later = torch.ones(k, k, dtype=torch.bool).triu(1)
    overlap = (iou > iou_threshold) & later
    for i in range(k):
        if keep[i]:
            keep &= ~overlap[i]
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Class-aware NMS: boxes of different ``labels`` never suppress each other.

    Each class is moved to its own region of the plane (offset by ``label * (max + 1)``),
    then one :func:`nms` runs over all of them.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    offset = labels.to(boxes.dtype)[:, None] * (boxes.max() + 1)
    return nms(boxes + offset, scores, iou_threshold)


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    *,
    score_threshold: float = 0.05,
    pre_nms: int = 300,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
    image_size: Optional[float] = None,
    extras: Optional[Tensor] = None,
) -> list[Detections]:
    """Per image: threshold, keep the ``pre_nms`` best (box, class) pairs, NMS, cap.

    Args:
        boxes: ``(B, P, 4)`` xyxy pixels, one box per prediction (class-agnostic), or
            ``(B, P, C, 4)`` one box per class.
        scores: ``(B, P, C)`` class probabilities (no background column).
        image_size: clip boxes to ``[0, image_size]`` when given.
        extras: optional ``(B, P, K)`` per-prediction values (landmarks) kept alongside.
    """
    out = []
    num_classes = scores.shape[-1]
    for b in range(scores.shape[0]):
        flat = scores[b].reshape(-1)
        k = min(pre_nms, flat.numel())
        top, idx = flat.topk(k)
        keep = top > score_threshold
        top, idx = top[keep], idx[keep]
        pred, cls = idx // num_classes, idx % num_classes
        bx = boxes[b][pred] if boxes.dim() == 3 else boxes[b][pred, cls]
        if image_size is not None:
            bx = bx.clamp(0, image_size)
        kept = batched_nms(bx, top, cls, iou_threshold)[:max_detections]
        extra = None if extras is None else extras[b][pred][kept]
        out.append(Detections(bx[kept], top[kept], cls[kept], extra))
    return out
