"""Float64 NumPy oracle of the SSD (ssd.pytorch) and RetinaFace (Pytorch_Retinaface) losses.

Slow and obvious on purpose: one image at a time, the originals' steps in order (IoU,
per-GT best prior, per-prior best GT, forcing loop, encode, double-argsort mining), with the
detloss native semantics selected by the same options as :func:`detloss.match_priors`.
"""
from __future__ import annotations

import numpy as np
from conftest import golden_cases


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes ``a (N, 4)`` x ``b (K, 4)`` -> ``(N, K)`` (union clamped at 1e-7)."""
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / np.maximum(union, 1e-7)


def point_form(priors: np.ndarray) -> np.ndarray:
    return np.concatenate([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], axis=1)


def match_image(
    priors, truths, *, pos_iou, min_best_iou=None, drop_degenerate_gt=True, ignored_gt_claims_prior=False
):
    """One image. Returns ``(matched_gt (P,), matched_iou (P,), positive (P,))``; -1/0/False without GT."""
    p = priors.shape[0]
    keep = np.ones(len(truths), dtype=bool)
    if drop_degenerate_gt and len(truths):
        keep = (truths[:, 2] > truths[:, 0]) & (truths[:, 3] > truths[:, 1])
    index = np.nonzero(keep)[0]
    none = (np.full(p, -1), np.zeros(p), np.zeros(p, dtype=bool))
    if len(index) == 0:
        return none
    overlaps = iou_matrix(truths[index], point_form(priors))
    best_prior = overlaps.argmax(axis=1)
    best_prior_iou = overlaps.max(axis=1)
    forcing = np.ones(len(index), dtype=bool) if min_best_iou is None else best_prior_iou >= min_best_iou
    if not forcing.any():
        return none
    best_gt = overlaps.argmax(axis=0)
    best_gt_iou = overlaps.max(axis=0)
    for j in range(len(index)):
        if forcing[j]:
            best_gt_iou[best_prior[j]] = 2.0
    for j in range(len(index)):
        if forcing[j] or ignored_gt_claims_prior:
            best_gt[best_prior[j]] = j
    return index[best_gt], best_gt_iou, best_gt_iou >= pos_iou


def encode(matched, priors, variances=(0.1, 0.2)):
    centre = ((matched[:, :2] + matched[:, 2:]) / 2 - priors[:, :2]) / (variances[0] * priors[:, 2:])
    size = np.log(np.maximum((matched[:, 2:] - matched[:, :2]) / priors[:, 2:], 1e-6)) / variances[1]
    return np.concatenate([centre, size], axis=1)


def encode_landmarks(matched, priors, variances=(0.1, 0.2)):
    pts = matched.reshape(-1, 5, 2)
    return ((pts - priors[:, None, :2]) / (variances[0] * priors[:, None, 2:])).reshape(-1, 10)


def smooth_l1(x):
    ax = np.abs(x)
    return np.where(ax < 1, 0.5 * x * x, ax - 0.5)


def cross_entropy_rows(logits, labels):
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return lse - logits[np.arange(len(labels)), labels]


def mine(mining_loss, positive, ratio):
    """Double-argsort mining of one image (stable), positives excluded; returns the negative mask."""
    p = len(mining_loss)
    num_neg = min(int(np.floor(ratio * positive.sum())), p - 1)
    score = np.where(positive, -np.inf, mining_loss)
    order = np.argsort(-score, kind="stable")
    rank = np.empty(p, dtype=np.int64)
    rank[order] = np.arange(p)
    return (rank < num_neg) & ~positive


def ssd_loss(loc, conf, priors, gt_boxes, gt_labels, gt_valid, *, pos_iou=0.5, neg_pos_ratio=3,
             drop_degenerate_gt=True, variances=(0.1, 0.2)):
    """Float64 SSD loss; arrays as the native API takes them. Returns a dict of floats and masks."""
    loc, conf, priors = (np.asarray(x, dtype=np.float64) for x in (loc, conf, priors))
    b = loc.shape[0]
    total_box = total_cls = 0.0
    n_pos = 0
    positives, negatives, labels_all = [], [], []
    for i in range(b):
        truths = np.asarray(gt_boxes[i], dtype=np.float64)[np.asarray(gt_valid[i], dtype=bool)]
        labels = np.asarray(gt_labels[i])[np.asarray(gt_valid[i], dtype=bool)]
        gt, _, pos = match_image(priors, truths, pos_iou=pos_iou, drop_degenerate_gt=drop_degenerate_gt)
        target = np.where(pos, labels[np.maximum(gt, 0)] + 1 if len(labels) else 0, 0)
        if pos.any():
            t = encode(truths[gt[pos]], priors[pos], variances)
            total_box += smooth_l1(loc[i][pos] - t).sum()
        ce = cross_entropy_rows(conf[i], target)
        neg = mine(ce, pos, neg_pos_ratio)
        total_cls += ce[pos | neg].sum()
        n_pos += int(pos.sum())
        positives.append(pos), negatives.append(neg), labels_all.append(target)
    n = max(n_pos, 1)
    return {"loss_box": total_box / n, "loss_cls": total_cls / n, "positive": np.array(positives),
            "negative": np.array(negatives), "labels": np.array(labels_all)}


def retinaface_loss(loc, conf, landm, priors, gt_boxes, gt_landmarks, gt_has_landmarks, gt_valid, *,
                    pos_iou=0.35, neg_pos_ratio=7, min_best_iou=0.2, drop_degenerate_gt=True,
                    ignored_gt_claims_prior=False, variances=(0.1, 0.2)):
    """Float64 RetinaFace loss (unweighted terms); arrays as the native API takes them."""
    loc, conf, landm, priors = (np.asarray(x, dtype=np.float64) for x in (loc, conf, landm, priors))
    b = loc.shape[0]
    total_box = total_cls = total_lm = 0.0
    n_pos = n_lm = 0
    positives, negatives = [], []
    for i in range(b):
        valid = np.asarray(gt_valid[i], dtype=bool)
        truths = np.asarray(gt_boxes[i], dtype=np.float64)[valid]
        lms = np.asarray(gt_landmarks[i], dtype=np.float64)[valid]
        has = np.asarray(gt_has_landmarks[i], dtype=bool)[valid]
        gt, _, pos = match_image(priors, truths, pos_iou=pos_iou, min_best_iou=min_best_iou,
                                 drop_degenerate_gt=drop_degenerate_gt,
                                 ignored_gt_claims_prior=ignored_gt_claims_prior)
        if pos.any():
            total_box += smooth_l1(loc[i][pos] - encode(truths[gt[pos]], priors[pos], variances)).sum()
            lm_pos = pos.copy()
            lm_pos[pos] = has[gt[pos]]
            if lm_pos.any():
                t = encode_landmarks(lms[gt[lm_pos]], priors[lm_pos], variances)
                total_lm += smooth_l1(landm[i][lm_pos] - t).sum()
            n_lm += int(lm_pos.sum())
        ce = cross_entropy_rows(conf[i], pos.astype(np.int64))
        neg = mine(ce, pos, neg_pos_ratio)
        total_cls += ce[pos | neg].sum()
        n_pos += int(pos.sum())
        positives.append(pos), negatives.append(neg)
    n, n1 = max(n_pos, 1), max(n_lm, 1)
    return {"loss_box": total_box / n, "loss_cls": total_cls / n, "loss_landmark": total_lm / n1,
            "positive": np.array(positives), "negative": np.array(negatives)}


# The golden ssd.pytorch cases (../shared/golden/torch), shared by the native and drop-in tests.
SSD_GOLDEN_CASES = golden_cases("torch/ssd300_*.npz")
