"""Box coders: regression targets from matched boxes, and back.

* Variance coder (SSD, RetinaFace): :func:`encode_boxes`, :func:`decode_boxes`,
  :func:`encode_landmarks`, :func:`decode_landmarks`. Priors are normalised
  ``(cx, cy, w, h)``; boxes are ``xyxy`` in the same units.
* R-CNN delta coder (Faster R-CNN, RetinaNet): :func:`encode_deltas`, :func:`decode_deltas`,
  with means/stds (or weights) and the ``+1`` pixel convention of the Caffe/TF originals
  as an option.
* YOLO grid decode: :func:`decode_yolo`.

Arithmetic follows the originals' operation order, so float32 results agree with them to
the last bit or two. Degenerate (zero or negative size) boxes give finite targets: the size
ratio entering the logarithm is clamped at ``min_ratio`` instead of producing ``-inf``;
the exponent of a decoded size is clamped at ``max_log_scale`` instead of overflowing.
"""
from __future__ import annotations

import math
import numbers
from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from ._constants import device_constant
from ._validate import broadcast_shape, require_boxes, require_choice, require_floating, require_tensor
from .boxes import compute_dtype, join_halves, pair_dtype
from .priors import yolo_grid

DEFAULT_VARIANCES = (0.1, 0.2)
MIN_RATIO = 1e-6
MAX_LOG_SCALE = math.log(1000.0 / 16)


def _numbers(values: Sequence[float], name: str, count: int, what: str) -> list[float]:
    """``values`` as ``count`` finite floats, else ``TypeError``/``ValueError`` naming ``name``."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected {count} numbers ({what}), got {values!r}") from None
    if len(out) != count or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name}: expected {count} finite numbers ({what}), got {values!r}")
    return out


def _check_variances(variances: Sequence[float]) -> tuple[float, float]:
    v0, v1 = _numbers(variances, "variances", 2, "centre, size")
    if min(v0, v1) <= 0:
        raise ValueError(f"variances: expected two positive numbers (centre, size), got {variances!r}")
    return v0, v1


def _require_last_dim(x: Tensor, name: str, size: int) -> None:
    require_floating(x, name)
    if x.dim() == 0 or x.shape[-1] != size:
        raise ValueError(f"{name}: expected shape (..., {size}), got {tuple(x.shape)}")


def _broadcast_pair(a: Tensor, a_name: str, b: Tensor, b_name: str) -> tuple[Tensor, Tensor]:
    """Check that the leading dimensions broadcast; return both in the compute dtype.

    Box maths runs in float32 for float16/bfloat16 inputs (float64 stays float64).
    """
    if broadcast_shape(a.shape[:-1], b.shape[:-1]) is None:
        raise ValueError(
            f"{a_name}, {b_name}: expected leading dimensions that broadcast, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    dtype = pair_dtype(a, b)
    return a.to(dtype), b.to(dtype)


def encode_boxes(
    matched: Tensor,
    priors: Tensor,
    variances: Sequence[float] = DEFAULT_VARIANCES,
    *,
    min_ratio: float = MIN_RATIO,
) -> Tensor:
    """SSD variance encoding of ``matched (..., 4)`` xyxy boxes against ``priors (..., 4)`` cxcywh.

    ``((g_c - p_c) / (v0 * p_wh), log(g_wh / p_wh) / v1)``; shapes broadcast; the result is
    ``(..., 4)``. ``g_wh / p_wh`` is clamped at ``min_ratio`` so a zero-size box gives a
    large but finite target.
    """
    require_boxes(matched, "matched")
    require_boxes(priors, "priors")
    v0, v1 = _check_variances(variances)
    matched, priors = _broadcast_pair(matched, "matched", priors, "priors")
    g_cxcy = (matched[..., :2] + matched[..., 2:]) / 2 - priors[..., :2]
    g_cxcy = g_cxcy / (v0 * priors[..., 2:])
    g_wh = (matched[..., 2:] - matched[..., :2]) / priors[..., 2:]
    g_wh = torch.log(g_wh.clamp(min=min_ratio)) / v1
    return torch.cat([g_cxcy, g_wh], dim=-1)


def decode_boxes(
    loc: Tensor,
    priors: Tensor,
    variances: Sequence[float] = DEFAULT_VARIANCES,
    *,
    max_log_scale: float = MAX_LOG_SCALE,
) -> Tensor:
    """Invert :func:`encode_boxes`: ``loc (..., 4)`` offsets, ``priors (..., 4)`` cxcywh -> xyxy.

    The size exponent ``loc_wh * v1`` is clamped at ``max_log_scale`` (log(1000/16)).
    """
    _require_last_dim(loc, "loc", 4)
    require_boxes(priors, "priors")
    v0, v1 = _check_variances(variances)
    loc, priors = _broadcast_pair(loc, "loc", priors, "priors")
    centre = priors[..., :2] + loc[..., :2] * v0 * priors[..., 2:]
    size = priors[..., 2:] * torch.exp((loc[..., 2:] * v1).clamp(max=max_log_scale))
    low = centre - size / 2
    return torch.cat([low, low + size], dim=-1)


def encode_landmarks(
    matched: Tensor, priors: Tensor, variances: Sequence[float] = DEFAULT_VARIANCES
) -> Tensor:
    """Encode ``matched (..., 2K)`` points ``(x0, y0, x1, y1, ...)`` against ``priors (..., 4)`` cxcywh.

    Each point becomes ``(pt - p_c) / (v0 * p_wh)``; the result is ``(..., 2K)`` in the same
    interleaved order (RetinaFace uses K = 5).
    """
    require_floating(matched, "matched")
    require_boxes(priors, "priors")
    if matched.dim() == 0 or matched.shape[-1] % 2:
        raise ValueError(f"matched: expected an even last dimension (x, y pairs), got {tuple(matched.shape)}")
    v0, _ = _check_variances(variances)
    matched, priors = _broadcast_pair(matched, "matched", priors, "priors")
    # the prior terms laid out as (..., 2K) rows (cx, cy, cx, cy, ...): the same arithmetic as
    # a (..., K, 2) broadcast, bit for bit, without the CPU's slow broadcast over a size-2 axis
    points = matched.shape[-1] // 2
    centre = priors[..., :2].tile((points,))
    scale = (v0 * priors[..., 2:]).tile((points,))
    return (matched - centre) / scale


def decode_landmarks(
    pre: Tensor, priors: Tensor, variances: Sequence[float] = DEFAULT_VARIANCES
) -> Tensor:
    """Invert :func:`encode_landmarks`: ``pre (..., 2K)``, ``priors (..., 4)`` -> points ``(..., 2K)``."""
    require_floating(pre, "pre")
    require_boxes(priors, "priors")
    if pre.dim() == 0 or pre.shape[-1] % 2:
        raise ValueError(f"pre: expected an even last dimension (x, y pairs), got {tuple(pre.shape)}")
    v0, _ = _check_variances(variances)
    pre, priors = _broadcast_pair(pre, "pre", priors, "priors")
    offsets = pre.unflatten(-1, (-1, 2))
    return (priors[..., None, :2] + offsets * v0 * priors[..., None, 2:]).flatten(-2)


def _delta_stats(values: Optional[Sequence[float]], default: float, name: str, ref: Tensor) -> Optional[Tensor]:
    if values is None:
        return None
    values = _numbers(values, name, 4, "dx, dy, dw, dh")
    if name == "stds" and min(values) <= 0:
        raise ValueError(f"stds: expected 4 positive numbers (dx, dy, dw, dh), got {values!r}")
    if all(v == default for v in values):
        return None
    return device_constant(values, dtype=ref.dtype, device=ref.device)


def _centre_size(boxes: Tensor, pixel_offset: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(cx, cy, w, h)`` of xyxy ``boxes (..., 4)``, each ``(...)``, with ``w = x2 - x1 + offset``."""
    w = boxes[..., 2] - boxes[..., 0] + pixel_offset
    h = boxes[..., 3] - boxes[..., 1] + pixel_offset
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_deltas(
    boxes: Tensor,
    reference: Tensor,
    *,
    means: Optional[Sequence[float]] = None,
    stds: Optional[Sequence[float]] = None,
    pixel_offset: float = 0.0,
    min_ratio: float = MIN_RATIO,
) -> Tensor:
    """R-CNN deltas of ``boxes (..., 4)`` relative to ``reference (..., 4)``, both xyxy.

    ``dx = (g_cx - r_cx) / r_w``, ``dw = log(g_w / r_w)`` (same for y, h), then
    ``(delta - means) / stds``. ``pixel_offset=1.0`` is the inclusive-pixel convention of
    py-faster-rcnn / tf-faster-rcnn (``w = x2 - x1 + 1``); 0 (torchvision, detectron2) by
    default. Weights in the torchvision style ``(wx, wy, ww, wh)`` are ``stds = 1 / w``.
    """
    require_boxes(boxes, "boxes")
    require_boxes(reference, "reference")
    boxes, reference = _broadcast_pair(boxes, "boxes", reference, "reference")
    r_cx, r_cy, r_w, r_h = _centre_size(reference, pixel_offset)
    g_cx, g_cy, g_w, g_h = _centre_size(boxes, pixel_offset)
    deltas = torch.stack(
        (
            (g_cx - r_cx) / r_w,
            (g_cy - r_cy) / r_h,
            torch.log((g_w / r_w).clamp(min=min_ratio)),
            torch.log((g_h / r_h).clamp(min=min_ratio)),
        ),
        dim=-1,
    )
    mean_t = _delta_stats(means, 0.0, "means", deltas)
    std_t = _delta_stats(stds, 1.0, "stds", deltas)
    if mean_t is not None:
        deltas = deltas - mean_t
    if std_t is not None:
        deltas = deltas / std_t
    return deltas


def decode_deltas(
    deltas: Tensor,
    reference: Tensor,
    *,
    means: Optional[Sequence[float]] = None,
    stds: Optional[Sequence[float]] = None,
    pixel_offset: float = 0.0,
    max_log_scale: float = MAX_LOG_SCALE,
) -> Tensor:
    """Invert :func:`encode_deltas`: ``deltas (..., 4)`` on ``reference (..., 4)`` xyxy -> xyxy.

    ``dw``/``dh`` are clamped at ``max_log_scale`` (log(1000/16)) before ``exp``.
    """
    _require_last_dim(deltas, "deltas", 4)
    require_boxes(reference, "reference")
    deltas, reference = _broadcast_pair(deltas, "deltas", reference, "reference")
    std_t = _delta_stats(stds, 1.0, "stds", deltas)
    mean_t = _delta_stats(means, 0.0, "means", deltas)
    if std_t is not None:
        deltas = deltas * std_t
    if mean_t is not None:
        deltas = deltas + mean_t
    r_cx, r_cy, r_w, r_h = _centre_size(reference, pixel_offset)
    cx = deltas[..., 0] * r_w + r_cx
    cy = deltas[..., 1] * r_h + r_cy
    w = torch.exp(deltas[..., 2].clamp(max=max_log_scale)) * r_w
    h = torch.exp(deltas[..., 3].clamp(max=max_log_scale)) * r_h
    return torch.stack(
        (cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - pixel_offset, cy + 0.5 * h - pixel_offset), dim=-1
    )


def decode_yolo(
    raw: Tensor,
    anchors: Tensor,
    stride: float,
    *,
    max_log_scale: float = 10.0,
    box_format: Literal["cxcywh", "xyxy"] = "cxcywh",
) -> Tensor:
    """YOLOv3 box decode of ``raw (B, H, W, A, 4)`` ``(tx, ty, tw, th)`` -> ``(B, H, W, A, 4)``.

    Centre ``(sigmoid(t_xy) + cell) * stride`` with x the column and y the row; size
    ``exp(t_wh) * anchor * stride``; the output is ``(cx, cy, w, h)`` in input pixels, or with
    ``box_format="xyxy"`` the corners (the same numbers as :func:`detloss.cxcywh_to_xyxy` of
    the centre form, without the intermediate). ``anchors (A, 2)`` are ``(w, h)`` in grid units
    of this scale (tensorflow-yolov3's layout). ``t_wh`` is clamped at ``max_log_scale`` so
    ``exp`` cannot overflow. The output keeps the memory layout of ``raw`` (channel-major input
    stays channel-major).
    """
    require_floating(raw, "raw")
    require_floating(require_tensor(anchors, "anchors"), "anchors")
    if isinstance(stride, numbers.Real) and not stride > 0:
        raise ValueError(f"stride: expected a positive number, got {stride!r}")
    if raw.dim() != 5 or raw.shape[-1] != 4:
        raise ValueError(f"raw: expected shape (B, H, W, A, 4), got {tuple(raw.shape)}")
    if anchors.shape != (raw.shape[3], 2):
        raise ValueError(
            f"anchors: expected shape (A={raw.shape[3]}, 2), got {tuple(anchors.shape)}"
        )
    require_choice(box_format, "box_format", ("cxcywh", "xyxy"))
    raw = raw.to(compute_dtype(raw))
    grid = yolo_grid(raw.shape[1], raw.shape[2], device=raw.device, dtype=raw.dtype)
    # cell offsets and anchor sizes for every (row, col, anchor), laid out like one image of
    # raw: the elementwise passes then broadcast over the batch only (a broadcast over the
    # short anchor axis as well is slower)
    one_image = raw[:1, ..., :2]
    cell_xy = torch.empty_like(one_image).copy_(grid[None, :, :, None, :].expand_as(one_image))
    anchor_wh = torch.empty_like(one_image).copy_(anchors.to(raw.dtype).expand_as(one_image))
    return decode_yolo_cells(raw, cell_xy, anchor_wh, stride, max_log_scale=max_log_scale, box_format=box_format)


def decode_yolo_cells(
    raw: Tensor,
    cell_xy: Tensor,
    anchor_wh: Tensor,
    stride: Union[float, Tensor],
    *,
    max_log_scale: float = 10.0,
    box_format: Literal["cxcywh", "xyxy"] = "cxcywh",
) -> Tensor:
    """:func:`decode_yolo` of raw outputs at given cells: ``raw (..., 4)``, ``cell_xy (..., 2)``
    (column, row) and ``anchor_wh (..., 2)`` in grid units, ``stride`` a number or a tensor
    ``(..., 1)`` (cells of several scales at once), broadcasting -> ``(..., 4)`` pixels in
    ``box_format``. For decoding only the gathered positive cells of heads. No input checks."""
    xy = (torch.sigmoid(raw[..., :2]) + cell_xy) * stride
    wh = (torch.exp(raw[..., 2:].clamp(max=max_log_scale)) * anchor_wh) * stride
    if box_format == "xyxy":
        half = wh / 2
        xy, wh = xy - half, xy + half
    if xy.shape[:-1] != raw.shape[:-1]:  # cells or anchors broadcast beyond raw
        return torch.cat((xy, wh), dim=-1)
    return join_halves(xy, wh, like=raw)  # raw's memory layout (channel-major heads stay so)


def encode_corner_offsets(
    matched: Tensor,
    anchors: Tensor,
    variances: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> Tensor:
    """Corner offsets of ``matched (..., 4)`` xyxy boxes against ``anchors (..., 4)`` xyxy.

    ``((x1 - a_x1) / a_w / v0, (y1 - a_y1) / a_h / v1, (x2 - a_x2) / a_w / v2,
    (y2 - a_y2) / a_h / v3)``: ssd_keras's ``coords='corners'`` target (its ``'minmax'``
    target is the same numbers in ``(x1, x2, y1, y2)`` order). Shapes broadcast.
    """
    require_boxes(matched, "matched")
    require_boxes(anchors, "anchors")
    if min(_numbers(variances, "variances", 4, "x1, y1, x2, y2")) <= 0:
        raise ValueError(f"variances: expected four positive numbers, got {variances!r}")
    a_w = anchors[..., 2] - anchors[..., 0]
    a_h = anchors[..., 3] - anchors[..., 1]
    size = torch.stack((a_w, a_h, a_w, a_h), dim=-1)
    var = device_constant([float(v) for v in variances], dtype=matched.dtype, device=matched.device)
    return (matched - anchors) / size / var
