"""Float64 NumPy oracle of the DETR set-prediction loss, written plainly.

Loops over layers, images and pairs on purpose: slow and obvious. Boxes are normalised
(cx, cy, w, h); the matcher is SciPy's ``linear_sum_assignment``, one call per image and layer.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment
from conftest import golden_cases

DETR_GOLDEN_CASES = golden_cases("detr/detr_*.npz")


def cfg_float(value) -> float:
    """A float32 config value back to its decimal (the golden README's recipe)."""
    return float(str(np.float32(value)))


def corners(b):
    return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2


def giou(a, b) -> float:
    """GIoU of two (cx, cy, w, h) boxes with positive size (textbook formula)."""
    ax1, ay1, ax2, ay2 = corners(a)
    bx1, by1, bx2, by2 = corners(b)
    inter = max(min(ax2, bx2) - max(ax1, bx1), 0.0) * max(min(ay2, by2) - max(ay1, by1), 0.0)
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    enclose = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (enclose - union) / enclose


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def class_cost(logits_row, label: int, kind: str, alpha: float, gamma: float) -> float:
    if kind == "softmax":
        return -softmax(logits_row)[label]
    p = sigmoid(logits_row[label])
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    return pos - neg


def cost_matrix(logits, boxes, gt_boxes, gt_labels, *, kind="softmax", w_cls=1.0, w_l1=5.0, w_giou=2.0,
                alpha=0.25, gamma=2.0):
    """``(Q, n)`` cost of one image: logits ``(Q, K)``, boxes ``(Q, 4)``, the ``n`` valid GTs."""
    q, n = len(boxes), len(gt_boxes)
    cost = np.zeros((q, n))
    for i in range(q):
        for j in range(n):
            l1 = sum(abs(boxes[i][k] - gt_boxes[j][k]) for k in range(4))
            cls = class_cost(logits[i], int(gt_labels[j]), kind, alpha, gamma)
            cost[i, j] = w_l1 * l1 + w_cls * cls - w_giou * giou(boxes[i], gt_boxes[j])
    return cost


def focal(x: float, t: float, alpha: float, gamma: float) -> float:
    p = sigmoid(x)
    ce = max(x, 0) - x * t + math.log1p(math.exp(-abs(x)))
    p_t = p * t + (1 - p) * (1 - t)
    return (alpha * t + (1 - alpha) * (1 - t)) * (1 - p_t) ** gamma * ce


def detr_loss(logits, boxes, gt_boxes, gt_labels, counts, *, class_loss="ce", eos_coef=0.1, alpha=0.25,
              gamma=2.0, weights=(1.0, 5.0, 2.0), cost_weights=(1.0, 5.0, 2.0)):
    """Per-layer ``(loss_cls, loss_l1, loss_giou)`` lists, the weighted total and the matching.

    ``logits (L, B, Q, K)``, ``boxes (L, B, Q, 4)``, padded ``gt_boxes (B, M, 4)``,
    ``gt_labels (B, M)``, ``counts (B,)``: image b's GTs are its first ``counts[b]`` rows.
    Returns ``(cls, l1, giou, total, pairs)`` with ``pairs[l][b] = (query_idx, gt_idx)``.
    """
    logits, boxes = np.asarray(logits, np.float64), np.asarray(boxes, np.float64)
    gt_boxes = np.asarray(gt_boxes, np.float64)
    num_layers, batch, queries, k = logits.shape
    num_boxes = max(float(sum(counts)), 1.0)
    kind = "softmax" if class_loss == "ce" else "focal"
    cls_l, l1_l, giou_l, pairs = [], [], [], []
    for l in range(num_layers):
        ce_sum = weight_sum = focal_sum = l1_sum = giou_sum = 0.0
        layer_pairs = []
        for b in range(batch):
            n = int(counts[b])
            gtb, gtl = gt_boxes[b, :n], gt_labels[b, :n]
            cost = cost_matrix(logits[l, b], boxes[l, b], gtb, gtl, kind=kind, w_cls=cost_weights[0],
                               w_l1=cost_weights[1], w_giou=cost_weights[2], alpha=alpha, gamma=gamma)
            rows, cols = linear_sum_assignment(cost) if n and queries else (np.zeros(0, int), np.zeros(0, int))
            layer_pairs.append((rows, cols))
            target = {int(r): int(c) for r, c in zip(rows, cols)}
            for i in range(queries):
                if class_loss == "ce":
                    cls = int(gtl[target[i]]) if i in target else k - 1
                    w = 1.0 if i in target else eos_coef
                    row = logits[l, b, i]
                    lse = row.max() + math.log(np.exp(row - row.max()).sum())
                    ce_sum += w * (lse - row[cls])
                    weight_sum += w
                else:
                    cls = int(gtl[target[i]]) if i in target else -1
                    focal_sum += sum(focal(logits[l, b, i, c], float(c == cls), alpha, gamma) for c in range(k))
                if i in target:
                    g = gtb[target[i]]
                    l1_sum += sum(abs(boxes[l, b, i, c] - g[c]) for c in range(4))
                    giou_sum += 1 - giou(boxes[l, b, i], g)
        cls_l.append(ce_sum / weight_sum if class_loss == "ce" else focal_sum / num_boxes)
        l1_l.append(l1_sum / num_boxes)
        giou_l.append(giou_sum / num_boxes)
        pairs.append(layer_pairs)
    total = sum(weights[0] * c + weights[1] * a + weights[2] * g for c, a, g in zip(cls_l, l1_l, giou_l))
    return cls_l, l1_l, giou_l, total, pairs
