"""Float64 NumPy oracles of the ssd_keras family: greedy matching, the encoder, the batch-wide loss.

Slow and literal: per image, per GT, per box loops, written from the descriptions in
``shared/golden/tf/README.md`` section 2 and the original's documented algorithm.
"""
from __future__ import annotations

import numpy as np


def greedy_bipartite(sim: np.ndarray) -> np.ndarray:
    """One image: ``sim (n, P)`` -> ``(n,)`` anchor per GT, the original's greedy rounds."""
    w = np.array(sim, dtype=np.float64, copy=True)
    n = w.shape[0]
    matches = np.zeros(n, dtype=np.int64)
    for _ in range(n):
        best_anchor = [int(np.argmax(w[g])) for g in range(n)]
        best_value = [w[g, best_anchor[g]] for g in range(n)]
        g = int(np.argmax(best_value))
        a = best_anchor[g]
        matches[g] = a
        w[g, :] = 0.0
        w[:, a] = 0.0
    return matches


def match_image(sim: np.ndarray, matching_type: str, pos_thr: float, neg_limit: float):
    """One image: ``sim (n, P)`` -> ``(gt_index (P,), positive, negative, neutral)``."""
    n, p = sim.shape
    gt_index = -np.ones(p, dtype=np.int64)
    if n == 0:
        z = np.zeros(p, dtype=bool)
        return gt_index, z, ~z, z
    w = np.array(sim, dtype=np.float64, copy=True)
    matches = greedy_bipartite(w)
    for g in range(n):  # later GTs overwrite earlier ones
        gt_index[matches[g]] = g
    for a in set(matches.tolist()):
        w[:, a] = 0.0
    if matching_type == "multi":
        taken = []
        for a in range(p):
            g = int(np.argmax(w[:, a]))
            if w[g, a] >= pos_thr:
                gt_index[a] = g
                taken.append(a)
        for a in taken:
            w[:, a] = 0.0
    positive = gt_index >= 0
    neutral = np.zeros(p, dtype=bool)
    for a in range(p):
        if not positive[a] and w[:, a].max() >= neg_limit:
            neutral[a] = True
    return gt_index, positive, ~positive & ~neutral, neutral


def match_batch(sim: np.ndarray, valid: np.ndarray, matching_type: str, pos_thr: float, neg_limit: float):
    """``sim (B, M, P)``, ``valid (B, M)`` -> stacked per-image results (GT indices into M)."""
    outs = []
    for i in range(sim.shape[0]):
        rows = np.flatnonzero(valid[i])
        gi, pos, neg, neu = match_image(sim[i, rows], matching_type, pos_thr, neg_limit)
        gi = np.where(gi >= 0, rows[np.maximum(gi, 0)] if rows.size else -1, -1)
        outs.append((gi, pos, neg, neu))
    return tuple(np.stack(x) for x in zip(*outs))


def iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(n, 4) x (p, 4)`` -> ``(n, p)`` plain IoU (no +1), loops."""
    out = np.zeros((a.shape[0], b.shape[0]))
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            iw = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            ih = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            inter = iw * ih
            area_a = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1])
            area_b = (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1])
            out[i, j] = inter / (area_a + area_b - inter)
    return out


def encode(
    labels: list,
    anchors_cxcywh: np.ndarray,
    n_classes: int,
    img_hw: tuple,
    variances=(0.1, 0.1, 0.2, 0.2),
    matching_type: str = "multi",
    pos_thr: float = 0.5,
    neg_limit: float = 0.3,
    background_id: int = 0,
) -> np.ndarray:
    """SSD-keras y_true ``(B, P, n_classes + 1 + 12)`` (centroids, normalised coords)."""
    h, w = img_hw
    p = anchors_cxcywh.shape[0]
    c = n_classes + 1
    a = anchors_cxcywh
    a_xyxy = np.stack([a[:, 0] - a[:, 2] / 2, a[:, 1] - a[:, 3] / 2, a[:, 0] + a[:, 2] / 2, a[:, 1] + a[:, 3] / 2], 1)
    out = np.zeros((len(labels), p, c + 12))
    for i, lab in enumerate(labels):
        lab = np.asarray(lab, dtype=np.float64).reshape(-1, 5)
        out[i, :, c + 4 : c + 8] = a
        out[i, :, c + 8 :] = variances
        if lab.shape[0] == 0:
            out[i, :, background_id] = 1.0
            continue
        g = lab[:, 1:].copy()
        g[:, [0, 2]] /= w
        g[:, [1, 3]] /= h
        g_c = np.stack([(g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2, g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]], 1)
        g_rt = np.stack(
            [g_c[:, 0] - g_c[:, 2] / 2, g_c[:, 1] - g_c[:, 3] / 2, g_c[:, 0] + g_c[:, 2] / 2, g_c[:, 1] + g_c[:, 3] / 2], 1
        )
        sim = iou_xyxy(g_rt, a_xyxy)
        gi, pos, neg, neu = match_image(sim, matching_type, pos_thr, neg_limit)
        for j in range(p):
            if pos[j]:
                k = gi[j]
                out[i, j, int(lab[k, 0])] = 1.0
                out[i, j, c + 0] = (g_c[k, 0] - a[j, 0]) / (a[j, 2] * variances[0])
                out[i, j, c + 1] = (g_c[k, 1] - a[j, 1]) / (a[j, 3] * variances[1])
                out[i, j, c + 2] = np.log(g_c[k, 2] / a[j, 2]) / variances[2]
                out[i, j, c + 3] = np.log(g_c[k, 3] / a[j, 3]) / variances[3]
            elif neg[j]:
                out[i, j, background_id] = 1.0
    return out


def batchwide_keep(neg_loss: np.ndarray, negative: np.ndarray, n_pos: float, ratio: float, n_min: int) -> np.ndarray:
    """Kept negatives ``(B, P)``: the top k of the flattened negative losses (ties: lower flat index)."""
    values = np.where(negative, neg_loss, 0.0).reshape(-1)
    n_nonzero = int(np.count_nonzero(values))
    k = min(max(int(ratio * int(n_pos)), int(n_min)), n_nonzero)
    order = sorted(range(values.size), key=lambda t: (-values[t], t))
    keep = np.zeros(values.size, dtype=bool)
    keep[order[:k]] = True
    return keep.reshape(neg_loss.shape) & negative


def ssd_keras_loss(y_true: np.ndarray, y_pred: np.ndarray, neg_pos_ratio=3, n_neg_min=0, alpha=1.0) -> dict:
    """The ssd_keras loss, per box loops, float64. Returns per-image parts and the total vector."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    b, p, width = y_true.shape
    nc = width - 12
    cls = np.zeros((b, p))
    loc = np.zeros((b, p))
    for i in range(b):
        for j in range(p):
            cls[i, j] = -sum(y_true[i, j, c] * np.log(max(y_pred[i, j, c], 1e-15)) for c in range(nc))
            for c in range(nc, nc + 4):
                d = abs(y_true[i, j, c] - y_pred[i, j, c])
                loc[i, j] += 0.5 * d * d if d < 1.0 else d - 0.5
    negatives = y_true[:, :, 0]
    positives = y_true[:, :, 1:nc].max(axis=-1)
    n_pos = positives.sum()
    keep = batchwide_keep(cls * negatives, negatives != 0, n_pos, neg_pos_ratio, n_neg_min)
    pos_cls = (cls * positives).sum(-1)
    neg_cls = (cls * keep).sum(-1)
    loc_loss = (loc * positives).sum(-1)
    total = (pos_cls + neg_cls + alpha * loc_loss) / max(1.0, n_pos) * b
    return {
        "classification_loss": cls,
        "localization_loss": loc,
        "negatives_keep": keep,
        "pos_class_loss": pos_cls,
        "neg_class_loss": neg_cls,
        "loc_loss": loc_loss,
        "n_positive": n_pos,
        "total": total,
    }
