"""Float64 NumPy oracle of the YOLOv3 family (tensorflow-yolov3's rules), written plainly.

Loops over images and boxes on purpose: slow and obvious. Boxes are xyxy pixels for the
target builder; every box inside the loss is (cx, cy, w, h) pixels.
"""
from __future__ import annotations

import math

import numpy as np
from conftest import golden_cases


def iou_cxcywh(a, b):
    """Plain IoU of two (cx, cy, w, h) boxes (floats)."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw = max(min(ax2, bx2) - max(ax1, bx1), 0.0)
    ih = max(min(ay2, by2) - max(ay1, by1), 0.0)
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def iou_family_cxcywh(a, b, kind):
    """IoU / GIoU / DIoU / CIoU of two (cx, cy, w, h) boxes, textbook formulas."""
    iou = iou_cxcywh(a, b)
    ex1 = min(a[0] - a[2] / 2, b[0] - b[2] / 2)
    ex2 = max(a[0] + a[2] / 2, b[0] + b[2] / 2)
    ey1 = min(a[1] - a[3] / 2, b[1] - b[3] / 2)
    ey2 = max(a[1] + a[3] / 2, b[1] + b[3] / 2)
    if kind == "iou":
        return iou
    if kind == "giou":
        enclose = (ex2 - ex1) * (ey2 - ey1)
        union = a[2] * a[3] + b[2] * b[3] - iou_inter(a, b)
        return iou - (enclose - union) / enclose
    rho2 = (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2
    c2 = (ex2 - ex1) ** 2 + (ey2 - ey1) ** 2
    diou = iou - rho2 / c2
    if kind == "diou":
        return diou
    v = 4 / math.pi**2 * (math.atan2(b[2], b[3]) - math.atan2(a[2], a[3])) ** 2
    alpha = v / (1 - iou + v) if (1 - iou + v) > 0 else 0.0
    return diou - alpha * v


def iou_inter(a, b):
    iw = max(min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2), 0.0)
    ih = max(min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2), 0.0)
    return iw * ih


def build_targets(boxes, labels, *, num_classes, anchors, strides, image_hw, pos_iou=0.3,
                  label_smoothing=0.01, max_boxes=150, faithful_fallback_clip=False):
    """One image. ``boxes (n, 4)`` xyxy pixels, ``labels (n,)``, ``anchors (S, A, 2)`` grid units.

    Returns (labels per scale ``(H, W, A, 5 + C)``, true-box lists per scale ``(max_boxes, 4)``).
    """
    n_scales, n_anchors = len(strides), anchors.shape[1]
    grids = [(image_hw[0] // s, image_hw[1] // s) for s in strides]
    out = [np.zeros((gh, gw, n_anchors, 5 + num_classes)) for gh, gw in grids]
    lists = [np.zeros((max_boxes, 4)) for _ in strides]
    counts = [0] * n_scales

    def write(s, col, row, a, xywh, label):
        smooth = np.full(num_classes, label_smoothing / num_classes)
        smooth[label] += 1 - label_smoothing
        out[s][row, col, a, :] = 0
        out[s][row, col, a, 0:4] = xywh
        out[s][row, col, a, 4] = 1
        out[s][row, col, a, 5:] = smooth

    def add_to_list(s, xywh):
        lists[s][counts[s] % max_boxes] = xywh
        counts[s] += 1

    for box, label in zip(boxes, labels):
        x1, y1, x2, y2 = (float(v) for v in box)
        xywh = np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        all_ious = []
        any_positive = False
        for s, stride in enumerate(strides):
            scaled = xywh / stride
            col, row = math.floor(scaled[0]), math.floor(scaled[1])
            ious = [iou_cxcywh(scaled, (col + 0.5, row + 0.5, anchors[s, a, 0], anchors[s, a, 1]))
                    for a in range(n_anchors)]
            all_ious.extend(ious)
            gh, gw = grids[s]
            col, row = min(max(col, 0), gw - 1), min(max(row, 0), gh - 1)
            hit = [a for a in range(n_anchors) if ious[a] > pos_iou]
            for a in hit:
                write(s, col, row, a, xywh, label)
            if hit:
                add_to_list(s, xywh)
                any_positive = True
        if not any_positive:
            best = int(np.argmax(all_ious))
            s, a = divmod(best, n_anchors)
            scaled = xywh / strides[s]
            col, row = math.floor(scaled[0]), math.floor(scaled[1])
            gh, gw = grids[-1] if faithful_fallback_clip else grids[s]
            col, row = min(max(col, 0), gw - 1), min(max(row, 0), gh - 1)
            write(s, col, row, a, xywh, label)
            add_to_list(s, xywh)
    return out, lists


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _bce(x, t):
    return max(x, 0) - x * t + math.log1p(math.exp(-abs(x)))


def scale_loss(conv, label, true_list, anchors, stride, *, image_hw, ignore_iou=0.5, box_loss="giou"):
    """One image, one scale: (box, obj, cls) sums. ``conv (H, W, A*(5+C))`` NHWC raw head."""
    h, w, _ = conv.shape
    n_anchors = anchors.shape[0]
    raw = conv.reshape(h, w, n_anchors, -1)
    box = obj = cls = 0.0
    area = float(image_hw[0] * image_hw[1])
    for row in range(h):
        for col in range(w):
            for a in range(n_anchors):
                t = raw[row, col, a]
                pred = ((_sigmoid(t[0]) + col) * stride, (_sigmoid(t[1]) + row) * stride,
                        math.exp(t[2]) * anchors[a, 0] * stride, math.exp(t[3]) * anchors[a, 1] * stride)
                lab = label[row, col, a]
                respond = lab[4]
                p = _sigmoid(t[4])
                if respond > 0:
                    value = iou_family_cxcywh(pred, lab[:4], box_loss)
                    box += (2 - lab[2] * lab[3] / area) * (1 - value)
                    obj += (1 - p) ** 2 * _bce(t[4], 1.0)
                    cls += sum(_bce(t[5 + c], lab[5 + c]) for c in range(len(t) - 5))
                else:
                    best = max([iou_cxcywh(pred, tb) for tb in true_list] + [0.0])
                    if best < ignore_iou:
                        obj += p**2 * _bce(t[4], 0.0)
    return box, obj, cls


def yolov3_loss(convs, boxes, labels, counts, *, num_classes, anchors, strides, ignore_iou=0.5,
                box_loss="giou", label_smoothing=0.01, normalize_by="batch", faithful_fallback_clip=False):
    """Batch loss: ``convs`` per scale ``(B, H, W, A*(5+C))``, ``boxes (B, M, 4)`` xyxy,
    ``labels (B, M)``, ``counts (B,)``. Returns dict of box/obj/cls/loss floats."""
    batch = convs[0].shape[0]
    image_hw = (convs[0].shape[1] * strides[0], convs[0].shape[2] * strides[0])
    totals = np.zeros(3)
    n_pos = 0
    for b in range(batch):
        n = counts[b]
        lab, lists = build_targets(boxes[b, :n], labels[b, :n], num_classes=num_classes, anchors=anchors,
                                   strides=strides, image_hw=image_hw, label_smoothing=label_smoothing,
                                   faithful_fallback_clip=faithful_fallback_clip)
        for s, stride in enumerate(strides):
            n_pos += int(lab[s][..., 4].sum())
            trues = [tb for tb in lists[s] if tb[2] > 0 or tb[3] > 0]
            totals += scale_loss(convs[s][b], lab[s], trues, anchors[s], stride, image_hw=image_hw,
                                 ignore_iou=ignore_iou, box_loss=box_loss)
    norm = batch if normalize_by == "batch" else max(n_pos, 1)
    box, obj, cls = totals / norm
    return {"loss_box": box, "loss_obj": obj, "loss_cls": cls, "loss": box + obj + cls}


# ---------------------------------------------------------------- helpers shared by the YOLOv3 tests
GOLDEN_CASES = golden_cases("tf/yolo_*_c*.npz")


def assert_grad_close(got, want, mask=None):
    """``got`` (a torch tensor) equals the golden gradient ``want`` (NumPy), optionally on ``mask``."""
    got = got.detach().numpy()
    if mask is not None:
        got, want = got[mask], want[mask]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
