"""Float64 NumPy oracles of the real-time DETR terms: slow, obvious, element by element.

Written from the papers' / originals' definitions (RT-DETR's VFL, DEIM's MAL, RF-DETR's IoU-aware
BCE, D-FINE's FGL and DDF), not from detloss's code.
"""
from __future__ import annotations

import math

import numpy as np


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _bce(x: float, t: float) -> float:
    return max(x, 0.0) - x * t + math.log1p(math.exp(-abs(x)))


def class_terms(kind: str, logits, positive, iou, alpha=None, gamma=2.0, mal_alpha=None) -> np.ndarray:
    """Element-wise class term of ``logits (N, C)``, ``positive (N, C)`` 0/1, ``iou (N,)``."""
    logits, positive, iou = (np.asarray(a, np.float64) for a in (logits, positive, iou))
    out = np.zeros_like(logits)
    for i in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            x, pos, q = float(logits[i, c]), float(positive[i, c]), float(iou[i])
            p = _sigmoid(x)
            if kind == "vfl":
                t = q * pos
                out[i, c] = _bce(x, t) * (alpha * p**gamma * (1 - pos) + t)
            elif kind == "mal":
                t = (q * pos) ** gamma
                scale = 1.0 if mal_alpha is None else mal_alpha
                out[i, c] = _bce(x, t) * (scale * p**gamma * (1 - pos) + pos)
            else:  # ia_bce
                log_p, log_1p = -_bce(x, 1.0), -_bce(x, 0.0)
                if pos:
                    quality = max(p**alpha * max(q, 0.0) ** (1 - alpha), 0.01)
                    out[i, c] = -quality * log_p - (1 - quality) * log_1p
                else:
                    out[i, c] = -(p**gamma) * log_1p
    return out


def weighting_function(max_num_bins: int, up: float, reg_scale: float) -> np.ndarray:
    a = abs(up) * abs(reg_scale)
    step = (a + 1) ** (2 / (max_num_bins - 2))
    left = [-(step**i) + 1 for i in range(max_num_bins // 2 - 1, 0, -1)]
    right = [step**i - 1 for i in range(1, max_num_bins // 2)]
    return np.array([-2 * a] + left + [0.0] + right + [2 * a])


def fgl(corners, ref, target, bins, reg_scale) -> np.ndarray:
    """``corners (N, 4, R + 1)``, ``ref (N, 4)`` / ``target (N, 4)`` cxcywh -> ``(N, 4)``."""
    corners, ref, target, bins = (np.asarray(a, np.float64) for a in (corners, ref, target, bins))
    r = abs(reg_scale)
    num_bins = len(bins) - 1
    out = np.zeros(corners.shape[:2])
    for i in range(corners.shape[0]):
        cx, cy, w, h = ref[i]
        tx1, ty1 = target[i, 0] - target[i, 2] / 2, target[i, 1] - target[i, 3] / 2
        tx2, ty2 = target[i, 0] + target[i, 2] / 2, target[i, 1] + target[i, 3] / 2
        distances = [(cx - tx1) / (w / r + 1e-16) - 0.5 * r, (cy - ty1) / (h / r + 1e-16) - 0.5 * r,
                     (tx2 - cx) / (w / r + 1e-16) - 0.5 * r, (ty2 - cy) / (h / r + 1e-16) - 0.5 * r]
        for e, d in enumerate(distances):
            logits = corners[i, e]
            logp = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
            k = int((bins <= d).sum()) - 1  # the bin on the left of d
            if k < 0:
                label, wl, wr = 0, 1.0, 0.0
            elif k >= num_bins:
                label, wl, wr = num_bins - 1, 0.0, 1.0
            else:
                label = k
                dl, dr = abs(d - bins[k]), abs(bins[k + 1] - d)
                wr = dl / (dl + dr)
                wl = 1 - wr
            out[i, e] = -logp[label] * wl - logp[label + 1] * wr
    return out


def ddf(corners, teacher, temperature) -> np.ndarray:
    """``T^2 KL(softmax(teacher / T) || softmax(corners / T))`` per edge, ``(N, 4)``."""
    corners, teacher = np.asarray(corners, np.float64), np.asarray(teacher, np.float64)
    out = np.zeros(corners.shape[:2])
    t = temperature
    for i in range(corners.shape[0]):
        for e in range(corners.shape[1]):
            s, u = corners[i, e] / t, teacher[i, e] / t
            logq = s - s.max() - math.log(np.exp(s - s.max()).sum())
            logp = u - u.max() - math.log(np.exp(u - u.max()).sum())
            p = np.exp(logp)
            out[i, e] = t * t * float((p * (logp - logq)).sum())
    return out


def union_matching(query_to_gt_layers: np.ndarray) -> np.ndarray:
    """DEIM's rule as its original states it: all (query, object) pairs of every layer, counted;
    by count descending (ties: query, then object ascending), each query keeps its first pair."""
    layers, batch, queries = query_to_gt_layers.shape
    out = np.full((batch, queries), -1)
    for b in range(batch):
        counts: dict = {}
        for l in range(layers):
            for q in range(queries):
                g = int(query_to_gt_layers[l, b, q])
                if g >= 0:
                    counts[(q, g)] = counts.get((q, g), 0) + 1
        for (q, g), _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if out[b, q] < 0:
                out[b, q] = g
    return out
