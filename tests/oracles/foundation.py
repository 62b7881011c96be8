"""Float64 NumPy oracle of the foundation: box maths, priors, coders, element-wise losses.

Plain Python loops over boxes and cells, one scalar formula per line, written from the
papers / the originals' documented arithmetic (see the golden READMEs), not from detloss.
Everything is float64. Conventions shared with detloss and stated here once:

* boxes are xyxy unless a name says otherwise; an inverted side (x2 < x1) has width 0;
* the enclosing box of GIoU / DIoU / CIoU spans all eight corner coordinates;
* an IoU-family ratio whose denominator (union, enclosing area, enclosing diagonal) is at
  most ``eps`` is 0 (both boxes degenerate); ``1 - iou + v`` is clamped at ``eps``, and CIoU
  uses ``atan(w / (h + eps))``, so degenerate boxes give finite values;
* CIoU: ``diou - alpha * v`` with ``v = 4 / pi**2 * (atan(wb/hb) - atan(wa/ha))**2`` and
  ``alpha = v / (1 - iou + v)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

EPS = 1e-7


# --------------------------------------------------------------------------- formats


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    out = np.empty_like(b)
    for idx in np.ndindex(b.shape[:-1]):
        cx, cy, w, h = b[idx]
        out[idx] = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    return out


def xyxy_to_cxcywh(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    out = np.empty_like(b)
    for idx in np.ndindex(b.shape[:-1]):
        x1, y1, x2, y2 = b[idx]
        out[idx] = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
    return out


def xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    out = np.empty_like(b)
    for idx in np.ndindex(b.shape[:-1]):
        x, y, w, h = b[idx]
        out[idx] = (x, y, x + w, y + h)
    return out


def xyxy_to_xywh(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    out = np.empty_like(b)
    for idx in np.ndindex(b.shape[:-1]):
        x1, y1, x2, y2 = b[idx]
        out[idx] = (x1, y1, x2 - x1, y2 - y1)
    return out


def area(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    out = np.empty(b.shape[:-1])
    for idx in np.ndindex(b.shape[:-1]):
        x1, y1, x2, y2 = b[idx]
        out[idx] = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    return out


# --------------------------------------------------------------------------- IoU family


def intersection(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection area of two xyxy boxes (0 when disjoint or inverted)."""
    w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    return w * h


def _ratio(num: float, den: float, eps: float) -> float:
    return num / den if den > eps else 0.0


def iou_pair(a: Sequence[float], b: Sequence[float], kind: str = "iou", eps: float = EPS) -> float:
    """IoU / GIoU / DIoU / CIoU of one pair of xyxy boxes."""
    a = [float(v) for v in a]
    b = [float(v) for v in b]
    wa, ha = max(a[2] - a[0], 0.0), max(a[3] - a[1], 0.0)
    wb, hb = max(b[2] - b[0], 0.0), max(b[3] - b[1], 0.0)
    inter = intersection(a, b)
    union = wa * ha + wb * hb - inter
    iou = _ratio(inter, union, eps)
    if kind == "iou":
        return iou
    # smallest box enclosing all corners (an inverted box counts with its span)
    cw = max(a[0], a[2], b[0], b[2]) - min(a[0], a[2], b[0], b[2])
    ch = max(a[1], a[3], b[1], b[3]) - min(a[1], a[3], b[1], b[3])
    if kind == "giou":
        enclose = cw * ch
        return iou - _ratio(enclose - union, enclose, eps)
    diag_sq = cw * cw + ch * ch
    dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
    dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
    diou = iou - _ratio(dx * dx + dy * dy, diag_sq, eps)
    if kind == "diou":
        return diou
    if kind != "ciou":
        raise ValueError(kind)
    v = 4 / math.pi**2 * (math.atan(wb / (hb + eps)) - math.atan(wa / (ha + eps))) ** 2
    alpha = v / max(1 - iou + v, eps)
    return diou - alpha * v


def pairwise_iou(a: np.ndarray, b: np.ndarray, kind: str = "iou", eps: float = EPS) -> np.ndarray:
    """``(..., N, 4) x (..., M, 4) -> (..., N, M)`` with equal leading dimensions."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    lead = a.shape[:-2]
    out = np.empty(lead + (a.shape[-2], b.shape[-2]))
    for idx in np.ndindex(lead):
        for i in range(a.shape[-2]):
            for j in range(b.shape[-2]):
                out[idx + (i, j)] = iou_pair(a[idx + (i,)], b[idx + (j,)], kind, eps)
    return out


def pairwise_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = intersection(a[i], b[j])
    return out


def aligned_iou(a: np.ndarray, b: np.ndarray, kind: str = "iou", eps: float = EPS) -> np.ndarray:
    """``(..., 4)`` and ``(..., 4)`` of the same shape -> ``(...)``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.empty(a.shape[:-1])
    for idx in np.ndindex(a.shape[:-1]):
        out[idx] = iou_pair(a[idx], b[idx], kind, eps)
    return out


# --------------------------------------------------------------------------- priors


def ssd_priors(
    feature_maps, image_size, steps, min_sizes, max_sizes, aspect_ratios, clip=True
) -> np.ndarray:
    """ssd.pytorch ``PriorBox.forward``: maps, rows, columns, then the per-cell list."""
    mean = []
    for k, f in enumerate(feature_maps):
        for i in range(f):  # row (y)
            for j in range(f):  # column (x)
                f_k = image_size / steps[k]
                cx = (j + 0.5) / f_k
                cy = (i + 0.5) / f_k
                s_k = min_sizes[k] / image_size
                mean += [cx, cy, s_k, s_k]
                s_k_prime = math.sqrt(s_k * (max_sizes[k] / image_size))
                mean += [cx, cy, s_k_prime, s_k_prime]
                for ar in aspect_ratios[k]:
                    mean += [cx, cy, s_k * math.sqrt(ar), s_k / math.sqrt(ar)]
                    mean += [cx, cy, s_k / math.sqrt(ar), s_k * math.sqrt(ar)]
    out = np.array(mean, dtype=np.float64).reshape(-1, 4)
    if clip:
        out = np.clip(out, 0.0, 1.0)
    return out


def retinaface_priors(image_hw, min_sizes=((16, 32), (64, 128), (256, 512)), steps=(8, 16, 32), clip=False):
    """Pytorch_Retinaface ``PriorBox.forward`` (cx, cy, w, h normalised)."""
    height, width = image_hw
    anchors = []
    for k, step in enumerate(steps):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        for i in range(fh):
            for j in range(fw):
                for size in min_sizes[k]:
                    s_kx = size / width
                    s_ky = size / height
                    cx = (j + 0.5) * step / width
                    cy = (i + 0.5) * step / height
                    anchors += [cx, cy, s_kx, s_ky]
    out = np.array(anchors, dtype=np.float64).reshape(-1, 4)
    if clip:
        out = np.clip(out, 0.0, 1.0)
    return out


def rcnn_base_anchors(base_size=16, ratios=(0.5, 1.0, 2.0), scales=(8, 16, 32)) -> np.ndarray:
    """py-faster-rcnn ``generate_anchors``: ratio enumeration of the base box, then scales."""
    x1, y1, x2, y2 = 0.0, 0.0, base_size - 1.0, base_size - 1.0
    w, h = x2 - x1 + 1, y2 - y1 + 1
    cx, cy = x1 + 0.5 * (w - 1), y1 + 0.5 * (h - 1)
    out = []
    for r in ratios:
        ws = float(np.round(math.sqrt(w * h / r)))
        hs = float(np.round(ws * r))
        # the ratio anchor, then its own centre/size for scaling
        rx1, ry1 = cx - 0.5 * (ws - 1), cy - 0.5 * (hs - 1)
        rx2, ry2 = cx + 0.5 * (ws - 1), cy + 0.5 * (hs - 1)
        rw, rh = rx2 - rx1 + 1, ry2 - ry1 + 1
        rcx, rcy = rx1 + 0.5 * (rw - 1), ry1 + 0.5 * (rh - 1)
        for s in scales:
            sw, sh = rw * s, rh * s
            out.append((rcx - 0.5 * (sw - 1), rcy - 0.5 * (sh - 1), rcx + 0.5 * (sw - 1), rcy + 0.5 * (sh - 1)))
    return np.array(out, dtype=np.float64)


def rcnn_anchors(feat_h, feat_w, stride=16, ratios=(0.5, 1.0, 2.0), scales=(8, 16, 32)) -> np.ndarray:
    """tf-faster-rcnn ``generate_anchors_pre``: row y, column x, then the base anchors."""
    base = rcnn_base_anchors(16, ratios, scales)
    out = []
    for y in range(feat_h):
        for x in range(feat_w):
            for a in base:
                out.append((a[0] + x * stride, a[1] + y * stride, a[2] + x * stride, a[3] + y * stride))
    return np.array(out, dtype=np.float64)


def retinanet_anchors(
    image_hw,
    strides=(8, 16, 32, 64, 128),
    sizes=(32, 64, 128, 256, 512),
    scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
    ratios=(0.5, 1.0, 2.0),
    offset=0.0,
) -> np.ndarray:
    """detectron2 ``DefaultAnchorGenerator`` with sizes ``size * scale`` per level."""
    out = []
    for stride, size in zip(strides, sizes):
        fh, fw = math.ceil(image_hw[0] / stride), math.ceil(image_hw[1] / stride)
        cell = []
        for scale in scales:
            s = size * scale
            for r in ratios:
                w = math.sqrt(s * s / r)
                h = r * w
                cell.append((-w / 2, -h / 2, w / 2, h / 2))
        for y in range(fh):
            for x in range(fw):
                sx, sy = (x + offset) * stride, (y + offset) * stride
                for c in cell:
                    out.append((c[0] + sx, c[1] + sy, c[2] + sx, c[3] + sy))
    return np.array(out, dtype=np.float64)


# --------------------------------------------------------------------------- coders


def encode_boxes(matched, priors, variances=(0.1, 0.2), min_ratio=1e-6) -> np.ndarray:
    """SSD variance encoding, ``matched`` xyxy, ``priors`` cxcywh, per row."""
    matched = np.asarray(matched, np.float64)
    priors = np.asarray(priors, np.float64)
    out = np.empty(np.broadcast_shapes(matched.shape, priors.shape))
    matched, priors = np.broadcast_to(matched, out.shape), np.broadcast_to(priors, out.shape)
    for idx in np.ndindex(out.shape[:-1]):
        x1, y1, x2, y2 = matched[idx]
        pcx, pcy, pw, ph = priors[idx]
        out[idx] = (
            ((x1 + x2) / 2 - pcx) / (variances[0] * pw),
            ((y1 + y2) / 2 - pcy) / (variances[0] * ph),
            math.log(max((x2 - x1) / pw, min_ratio)) / variances[1],
            math.log(max((y2 - y1) / ph, min_ratio)) / variances[1],
        )
    return out


def decode_boxes(loc, priors, variances=(0.1, 0.2), max_log_scale=math.log(1000.0 / 16)) -> np.ndarray:
    loc = np.asarray(loc, np.float64)
    priors = np.asarray(priors, np.float64)
    out = np.empty(np.broadcast_shapes(loc.shape, priors.shape))
    loc, priors = np.broadcast_to(loc, out.shape), np.broadcast_to(priors, out.shape)
    for idx in np.ndindex(out.shape[:-1]):
        dx, dy, dw, dh = loc[idx]
        pcx, pcy, pw, ph = priors[idx]
        cx, cy = pcx + dx * variances[0] * pw, pcy + dy * variances[0] * ph
        w = pw * math.exp(min(dw * variances[1], max_log_scale))
        h = ph * math.exp(min(dh * variances[1], max_log_scale))
        out[idx] = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    return out


def encode_landmarks(points, priors, variances=(0.1, 0.2)) -> np.ndarray:
    """``points (N, 2K)`` interleaved x, y against ``priors (N, 4)`` cxcywh."""
    points = np.asarray(points, np.float64)
    priors = np.asarray(priors, np.float64)
    out = np.empty_like(points)
    for n in range(points.shape[0]):
        pcx, pcy, pw, ph = priors[n]
        for k in range(points.shape[1] // 2):
            out[n, 2 * k] = (points[n, 2 * k] - pcx) / (variances[0] * pw)
            out[n, 2 * k + 1] = (points[n, 2 * k + 1] - pcy) / (variances[0] * ph)
    return out


def decode_landmarks(pre, priors, variances=(0.1, 0.2)) -> np.ndarray:
    pre = np.asarray(pre, np.float64)
    priors = np.asarray(priors, np.float64)
    out = np.empty_like(pre)
    for n in range(pre.shape[0]):
        pcx, pcy, pw, ph = priors[n]
        for k in range(pre.shape[1] // 2):
            out[n, 2 * k] = pcx + pre[n, 2 * k] * variances[0] * pw
            out[n, 2 * k + 1] = pcy + pre[n, 2 * k + 1] * variances[0] * ph
    return out


def encode_deltas(boxes, reference, means=(0, 0, 0, 0), stds=(1, 1, 1, 1), pixel_offset=0.0, min_ratio=1e-6):
    """R-CNN ``bbox_transform`` (+ ``pixel_offset`` to widths), then ``(d - means) / stds``."""
    boxes = np.asarray(boxes, np.float64)
    reference = np.asarray(reference, np.float64)
    out = np.empty(boxes.shape)
    for idx in np.ndindex(boxes.shape[:-1]):
        g, r = boxes[idx], reference[idx]
        rw, rh = r[2] - r[0] + pixel_offset, r[3] - r[1] + pixel_offset
        gw, gh = g[2] - g[0] + pixel_offset, g[3] - g[1] + pixel_offset
        rcx, rcy = r[0] + 0.5 * rw, r[1] + 0.5 * rh
        gcx, gcy = g[0] + 0.5 * gw, g[1] + 0.5 * gh
        d = (
            (gcx - rcx) / rw,
            (gcy - rcy) / rh,
            math.log(max(gw / rw, min_ratio)),
            math.log(max(gh / rh, min_ratio)),
        )
        out[idx] = [(d[k] - means[k]) / stds[k] for k in range(4)]
    return out


def decode_deltas(deltas, reference, means=(0, 0, 0, 0), stds=(1, 1, 1, 1), pixel_offset=0.0,
                  max_log_scale=math.log(1000.0 / 16)):
    """R-CNN ``bbox_transform_inv``: the box whose :func:`encode_deltas` is ``deltas``."""
    deltas = np.asarray(deltas, np.float64)
    reference = np.asarray(reference, np.float64)
    out = np.empty(deltas.shape)
    for idx in np.ndindex(deltas.shape[:-1]):
        d = [deltas[idx][k] * stds[k] + means[k] for k in range(4)]
        r = reference[idx]
        rw, rh = r[2] - r[0] + pixel_offset, r[3] - r[1] + pixel_offset
        rcx, rcy = r[0] + 0.5 * rw, r[1] + 0.5 * rh
        cx, cy = d[0] * rw + rcx, d[1] * rh + rcy
        w = math.exp(min(d[2], max_log_scale)) * rw
        h = math.exp(min(d[3], max_log_scale)) * rh
        out[idx] = (cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - pixel_offset, cy + 0.5 * h - pixel_offset)
    return out


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def decode_yolo(raw, anchors, stride, max_log_scale=10.0) -> np.ndarray:
    """tensorflow-yolov3 ``decode``: ``raw (B, H, W, A, 4)`` -> cx, cy, w, h pixels."""
    raw = np.asarray(raw, np.float64)
    anchors = np.asarray(anchors, np.float64)
    out = np.empty_like(raw)
    bsz, height, width, n_anchor, _ = raw.shape
    for b in range(bsz):
        for y in range(height):
            for x in range(width):
                for a in range(n_anchor):
                    tx, ty, tw, th = raw[b, y, x, a]
                    out[b, y, x, a] = (
                        (sigmoid(tx) + x) * stride,
                        (sigmoid(ty) + y) * stride,
                        math.exp(min(tw, max_log_scale)) * anchors[a, 0] * stride,
                        math.exp(min(th, max_log_scale)) * anchors[a, 1] * stride,
                    )
    return out


# --------------------------------------------------------------------------- losses


def smooth_l1(x: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """Element-wise smooth L1 of the difference ``x``; the linear branch at ``|x| == beta``."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        a = abs(x[idx])
        out[idx] = 0.5 * a * a / beta if a < beta else a - 0.5 * beta
    return out


def softplus(x: float) -> float:
    """``log(1 + exp(x))`` without overflow."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def bce_with_logits(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``-t log p - (1 - t) log(1 - p)``, ``p = sigmoid(x)``, via ``-log p = softplus(-x)``."""
    x = np.asarray(x, np.float64)
    t = np.asarray(t, np.float64)
    out = np.empty(x.shape)
    for idx in np.ndindex(x.shape):
        out[idx] = t[idx] * softplus(-x[idx]) + (1 - t[idx]) * softplus(x[idx])
    return out


def sigmoid_focal(x: np.ndarray, t: np.ndarray, alpha: float = 0.25, gamma: float = 2.0) -> np.ndarray:
    """Lin et al.: ``alpha_t * (1 - p_t)**gamma * CE`` generalised to soft targets as ``|t - p|``."""
    x = np.asarray(x, np.float64)
    t = np.asarray(t, np.float64)
    ce = bce_with_logits(x, t)
    out = np.empty(x.shape)
    for idx in np.ndindex(x.shape):
        p = sigmoid(x[idx])
        w = abs(t[idx] - p) ** gamma
        if alpha >= 0:
            w *= alpha * t[idx] + (1 - alpha) * (1 - t[idx])
        out[idx] = w * ce[idx]
    return out


def softmax_ce(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``-log softmax(logits)[target]`` per row; ``logits (N, C)``, ``target (N,)``."""
    logits = np.asarray(logits, np.float64)
    out = np.empty(logits.shape[0])
    for n in range(logits.shape[0]):
        m = max(logits[n])
        lse = m + math.log(sum(math.exp(v - m) for v in logits[n]))
        out[n] = lse - logits[n, int(target[n])]
    return out


def softmax_focal(logits: np.ndarray, target: np.ndarray, gamma: float = 2.0,
                  alpha: Optional[Sequence[float]] = None) -> np.ndarray:
    ce = softmax_ce(logits, target)
    out = np.empty_like(ce)
    for n in range(len(ce)):
        p = math.exp(-ce[n])
        out[n] = (1 - p) ** gamma * ce[n] * (1.0 if alpha is None else alpha[int(target[n])])
    return out
