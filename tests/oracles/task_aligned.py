"""Float64 NumPy oracle of the dense task-aligned assignment (TOOD / YOLOv8), written plainly.

One image and one GT at a time, the whole (M, A) metric table held, every rule spelled out
(see :mod:`detloss.matching.task_aligned` for the numbered steps). The CIoU and ``u ** beta``
use the same operation order as the library, so float64 inputs give the same numbers.
"""
from __future__ import annotations

import math

import numpy as np

CIOU_EPS = 1e-7


def ciou(g, p):
    """CIoU of xyxy boxes ``g (4,)`` and ``p (..., 4)`` with ultralytics' epsilons."""
    gx1, gy1, gx2, gy2 = g
    px1, py1, px2, py2 = (p[..., i] for i in range(4))
    gw, gh = gx2 - gx1, max(gy2 - gy1, CIOU_EPS)
    pw, ph = px2 - px1, np.maximum(py2 - py1, CIOU_EPS)
    inter = np.maximum(np.minimum(gx2, px2) - np.maximum(gx1, px1), 0) * np.maximum(
        np.minimum(gy2, py2) - np.maximum(gy1, py1), 0
    )
    iou = inter / (gw * gh + pw * ph - inter + CIOU_EPS)
    cw = np.maximum(gx2, px2) - np.minimum(gx1, px1)
    ch = np.maximum(gy2, py2) - np.minimum(gy1, py1)
    diag = cw * cw + ch * ch + CIOU_EPS
    dx, dy = (px1 + px2) - (gx1 + gx2), (py1 + py2) - (gy1 + gy2)
    rho = (dx * dx + dy * dy) / 4
    dangle = np.arctan(pw / ph) - math.atan(gw / gh)
    v = dangle * dangle * (4 / math.pi**2)
    alpha = v / (v - iou + (1 + CIOU_EPS))
    return iou - (rho / diag + v * alpha)


def power(x, p):
    """``x ** p`` with the library's multiplication order for integer ``p``."""
    if p == int(p) and 0 <= p <= 16:
        out, base, n, first = np.ones_like(x), x, int(p), True
        while n:
            if n & 1:
                out = base if first else out * base
                first = False
            n >>= 1
            if n:
                base = base * base
        return out
    return x**p


def match(scores, pred_boxes, anchors, gt_boxes, gt_labels, gt_valid, *, topk=13, alpha=1.0, beta=6.0,
          topk2=None, min_box_side=None, eps=1e-9):
    """Returns ``(foreground (B, A), matched (B, A), labels (B, A) (-1 background),
    scores (B, A, C), metric (B, A))``; ``matched`` is 0 on background."""
    scores, pred_boxes, anchors, gt_boxes = (np.asarray(x, np.float64) for x in (scores, pred_boxes, anchors, gt_boxes))
    b, a, c = scores.shape
    m = gt_boxes.shape[1]
    fg_out = np.zeros((b, a), bool)
    matched_out = np.zeros((b, a), np.int64)
    labels_out = np.full((b, a), -1, np.int64)
    scores_out = np.zeros((b, a, c))
    metric_out = np.zeros((b, a))
    k = min(topk, a)
    for i in range(b):
        inside = np.zeros((m, a), bool)
        u = np.zeros((m, a))
        metric = np.zeros((m, a))
        positive = np.zeros((m, a), bool)
        for g in range(m):
            if not gt_valid[i, g]:
                continue
            x1, y1, x2, y2 = gt_boxes[i, g]
            # 1. candidates inside the floored box
            if min_box_side is not None:
                cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
                w, h = (min_box_side if w < min_box_side else w), (min_box_side if h < min_box_side else h)
                x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            ax, ay = anchors[:, 0], anchors[:, 1]
            inside[g] = (ax - x1 > 1e-9) & (ay - y1 > 1e-9) & (x2 - ax > 1e-9) & (y2 - ay > 1e-9)
            # 2. metric
            u[g] = np.where(inside[g], np.maximum(ciou(gt_boxes[i, g], pred_boxes[i]), 0), 0)
            s = power(np.maximum(scores[i, :, gt_labels[i, g]], 0), alpha)
            metric[g] = np.where(inside[g], s * power(u[g], beta), 0)
            # 3. top-k (stable: lower index first among equal metrics), positive metric only
            order = sorted(range(a), key=lambda j: (-metric[g, j], j))[:k]
            for j in order:
                positive[g, j] = inside[g, j] and metric[g, j] > 0
        count = positive.sum(0)
        for j in range(a):
            if count[j] == 0:
                continue
            # 4. conflicts: argmax of u over all GTs, first index
            g = int(np.argmax(u[:, j])) if count[j] > 1 else int(np.flatnonzero(positive[:, j])[0])
            if metric[g, j] > 0:
                fg_out[i, j] = True
                matched_out[i, j] = g
                metric_out[i, j] = metric[g, j]
        # 5. one-to-one
        if topk2 is not None and topk2 < topk:
            for g in range(m):
                mine = [j for j in range(a) if fg_out[i, j] and matched_out[i, j] == g]
                mine.sort(key=lambda j: (-metric_out[i, j], j))
                for j in mine[topk2:]:
                    fg_out[i, j] = False
                    matched_out[i, j] = 0
                    metric_out[i, j] = 0
        # 6. soft scores
        for g in range(m):
            mine = [j for j in range(a) if fg_out[i, j] and matched_out[i, j] == g]
            if not mine:
                continue
            max_t = max(metric[g, j] for j in mine)
            max_u = max(u[g, j] for j in mine)
            for j in mine:
                labels_out[i, j] = gt_labels[i, g]
                scores_out[i, j, gt_labels[i, g]] = metric[g, j] * max_u / (max_t + eps)
    return fg_out, matched_out, labels_out, scores_out, metric_out



def yolov8_loss(box_logits, cls_logits, points, strides, gt_boxes, gt_labels, gt_valid, *, reg_max, topk=10,
                alpha=0.5, beta=6.0, min_box_side=16.0, gains=(7.5, 0.5, 1.5)):
    """The YOLOv8 loss terms ``(box, cls, dfl)`` (each times its gain), float64, image by image."""
    box_logits, cls_logits, points, strides = (np.asarray(x, np.float64) for x in (box_logits, cls_logits, points, strides))
    b, a, _ = box_logits.shape
    grid = points / strides[:, None]
    logits = box_logits.reshape(b, a, 4, reg_max)
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    dist = (prob * np.arange(reg_max)).sum(-1)  # (B, A, 4) grid units
    pred = np.concatenate((grid - dist[..., :2], grid + dist[..., 2:]), -1)
    scores = 1 / (1 + np.exp(-cls_logits))
    fg, matched, labels, target_scores, _ = match(scores, pred * strides[:, None, None].reshape(1, a, 1), points,
                                                  gt_boxes, gt_labels, gt_valid, topk=topk, alpha=alpha, beta=beta,
                                                  min_box_side=min_box_side)
    tss = max(target_scores.sum(), 1.0)
    x, t = cls_logits, target_scores
    cls = (np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))).sum() / tss
    box = dfl = 0.0
    for i in range(b):
        for j in range(a):
            if not fg[i, j]:
                continue
            w = target_scores[i, j].sum()
            target = np.asarray(gt_boxes[i, matched[i, j]], np.float64) / strides[j]
            box += (1 - textbook_ciou(pred[i, j], target)) * w
            ltrb = np.concatenate((grid[j] - target[:2], target[2:] - grid[j])).clip(0, reg_max - 1)
            lp = np.log(prob[i, j])
            sides = []
            for s in range(4):
                left = min(int(np.floor(ltrb[s])), reg_max - 2)
                wl = left + 1 - ltrb[s]
                sides.append(-(lp[s, left] * wl + lp[s, left + 1] * (1 - wl)))
            dfl += np.mean(sides) * w
    return gains[0] * box / tss, gains[1] * cls, gains[2] * dfl / tss


def textbook_ciou(p, g):
    """CIoU (Zheng et al. 2020) of two xyxy boxes, no epsilons (ordinary boxes only)."""
    pw, ph, gw, gh = p[2] - p[0], p[3] - p[1], g[2] - g[0], g[3] - g[1]
    inter = max(min(p[2], g[2]) - max(p[0], g[0]), 0) * max(min(p[3], g[3]) - max(p[1], g[1]), 0)
    iou = inter / (pw * ph + gw * gh - inter)
    c2 = (max(p[2], g[2]) - min(p[0], g[0])) ** 2 + (max(p[3], g[3]) - min(p[1], g[1])) ** 2
    rho2 = ((p[0] + p[2] - g[0] - g[2]) ** 2 + (p[1] + p[3] - g[1] - g[3]) ** 2) / 4
    v = 4 / math.pi**2 * (math.atan(gw / gh) - math.atan(pw / ph)) ** 2
    return iou - rho2 / c2 - v * v / (1 - iou + v) if v > 0 else iou - rho2 / c2
