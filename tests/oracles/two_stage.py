"""Float64 NumPy oracles (plain loops) for the max-IoU labeller and the RetinaNet loss.

Written from the papers / the originals' rules, independently of detloss's batched code:
labels start at -1, anchors whose best IoU is below ``neg`` become 0, then every anchor
tying some GT's best IoU becomes 1, then best IoU >= ``pos`` becomes 1 (tf-faster-rcnn's
order with RPN_CLOBBER_POSITIVES False). The RetinaNet loss is summed anchor by anchor and
class by class.
"""
from __future__ import annotations

import math

import numpy as np

MIN_RATIO = 1e-6  # the delta coder's clamp of w/h ratios before log


def iou(a, b, offset=0.0):
    """IoU of two xyxy boxes (inclusive pixels with ``offset=1``)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + offset)
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + offset)
    inter = iw * ih
    area_a = max(0.0, a[2] - a[0] + offset) * max(0.0, a[3] - a[1] + offset)
    area_b = max(0.0, b[2] - b[0] + offset) * max(0.0, b[3] - b[1] + offset)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def max_iou_labels(anchors, gt, gt_valid, pos, neg, *, allow_low_quality=True, zero_iou=False,
                   clobber=False, anchor_valid=None, offset=0.0):
    """One image: ``(labels (A,), matched (A,), max_iou (A,))`` by loops."""
    n_a = len(anchors)
    anchor_valid = np.ones(n_a, bool) if anchor_valid is None else np.asarray(anchor_valid, bool)
    gts = [g for g, v in zip(range(len(gt)), gt_valid) if v]
    labels = -np.ones(n_a, np.int64)
    matched = np.zeros(n_a, np.int64)
    best = np.zeros(n_a)
    ious = {(a, g): iou(anchors[a], gt[g], offset) for a in range(n_a) for g in gts}
    for a in range(n_a):
        if not anchor_valid[a]:
            continue
        q, m = -1.0, None
        for g in gts:
            if ious[a, g] > q:
                q, m = ious[a, g], g
        best[a] = max(q, 0.0)
        matched[a] = m if m is not None else 0
    ties = set()
    if allow_low_quality:
        for g in gts:
            inside = [a for a in range(n_a) if anchor_valid[a]]
            if not inside:
                continue
            top = max(ious[a, g] for a in inside)
            if top > 0 or zero_iou:
                ties.update(a for a in inside if ious[a, g] == top)
    for a in range(n_a):
        if not anchor_valid[a]:
            continue
        if not clobber and best[a] < neg:
            labels[a] = 0
        if a in ties:
            labels[a] = 1
        if best[a] >= pos:
            labels[a] = 1
        if clobber and best[a] < neg:
            labels[a] = 0
    return labels, matched, best


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def encode(g, a, stds=(1.0, 1.0, 1.0, 1.0), offset=0.0):
    """R-CNN deltas of box ``g`` relative to anchor ``a`` (xyxy)."""
    aw, ah = a[2] - a[0] + offset, a[3] - a[1] + offset
    gw, gh = g[2] - g[0] + offset, g[3] - g[1] + offset
    acx, acy = a[0] + 0.5 * aw, a[1] + 0.5 * ah
    gcx, gcy = g[0] + 0.5 * gw, g[1] + 0.5 * gh
    d = [(gcx - acx) / aw, (gcy - acy) / ah, math.log(max(gw / aw, MIN_RATIO)), math.log(max(gh / ah, MIN_RATIO))]
    return [v / s for v, s in zip(d, stds)]


def retinanet_loss(cls_logits, box_pred, anchors, gt, gt_labels, gt_valid, *, pos=0.5, neg=0.4,
                   alpha=0.25, gamma=2.0, beta=0.1, box_loss="smooth_l1"):
    """``(loss_cls, loss_box)`` of a batch by loops (box_loss "smooth_l1" or "l1")."""
    b_n, a_n, k_n = cls_logits.shape
    cls_total, box_total, num_pos = 0.0, 0.0, 0
    for b in range(b_n):
        labels, matched, _ = max_iou_labels(anchors, gt[b], gt_valid[b], pos, neg)
        for a in range(a_n):
            if labels[a] < 0:
                continue
            cls = gt_labels[b][matched[a]] if labels[a] == 1 else -1
            for k in range(k_n):
                x = float(cls_logits[b, a, k])
                t = 1.0 if k == cls else 0.0
                p = _sigmoid(x)
                p_t = p if t else 1 - p
                ce = _softplus(-x) if t else _softplus(x)
                a_t = 1.0 if alpha < 0 else (alpha if t else 1 - alpha)
                cls_total += a_t * (1 - p_t) ** gamma * ce
            if labels[a] == 1:
                num_pos += 1
                target = encode(gt[b][matched[a]], anchors[a])
                for j in range(4):
                    d = abs(float(box_pred[b, a, j]) - target[j])
                    if box_loss == "l1" or beta == 0:
                        box_total += d
                    else:
                        box_total += 0.5 * d * d / beta if d < beta else d - 0.5 * beta
    norm = max(1, num_pos)
    return cls_total / norm, box_total / norm
