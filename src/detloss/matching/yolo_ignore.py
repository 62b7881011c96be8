"""YOLOv3's ignore rule: the best IoU of each predicted box with the true boxes of its own scale
(background cells above ``ignore_iou`` carry no objectness loss), chunked so that memory stays
bounded whatever the number of true boxes."""
from __future__ import annotations

import itertools
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

from .. import _chunking
from .._validate import require_choice
from ..boxes import ChunkedPairwiseIoU, compute_dtype, cxcywh_to_xyxy

__all__ = ["yolo_max_iou"]


def yolo_max_iou(
    pred_boxes: Tensor,
    true_cxcywh: Tensor,
    true_valid: Optional[Tensor] = None,
    *,
    eps: Optional[float] = None,
    chunk_elements: Optional[int] = None,
    pred_format: Literal["cxcywh", "xyxy"] = "cxcywh",
    scale_sizes: Optional[Sequence[int]] = None,
) -> Tensor:
    """Best IoU of each prediction with any valid true box (of its own scale), without gradient.

    The IoU of the ignore rule: ``inter / max(union, eps)`` (``eps`` default 1e-7; the original
    has none, so a zero-area prediction gave NaN there).

    ``pred_boxes (B, N, 4)`` (``pred_format``: centre/size or corners) and ``true_cxcywh
    (B, T, 4)`` centre/size boxes (same units), ``true_valid (B, T)`` bool (None: all rows
    count; all-zero rows give IoU 0 anyway). Returns ``(B, N)``, 0 where there is no valid true
    box. Works ``chunk_elements // (B * T)`` predictions at a time
    (:class:`detloss.boxes.ChunkedPairwiseIoU`), so memory stays bounded whatever ``T`` is
    (None: :data:`detloss._chunking.YOLO_IGNORE_IOU` on the CPU in eager mode, larger blocks on accelerators and
    under ``torch.compile``).

    ``scale_sizes``: the predictions are the cells of ``S`` scales one after another, this many
    of each (summing to ``N``), and ``true_valid`` is ``(B, S, T)``: which true boxes belong to
    each scale. Each prediction is compared with its own scale's boxes only.
    """
    require_choice(pred_format, "pred_format", ("cxcywh", "xyxy"))
    batch, n, t = pred_boxes.shape[0], pred_boxes.shape[1], true_cxcywh.shape[1]
    sizes = [n] if scale_sizes is None else [int(v) for v in scale_sizes]
    per_scale = true_valid  # (B, S, T) validity, or None: every row counts
    if true_valid is not None and scale_sizes is None:
        per_scale = true_valid[:, None]
    if sum(sizes) != n or (per_scale is not None and tuple(per_scale.shape) != (batch, len(sizes), t)):
        raise ValueError(
            f"scale_sizes, true_valid: expected sizes summing to N={n} and true_valid of shape "
            f"(B={batch}, S={len(sizes)}, T={t}), got {scale_sizes} and "
            f"{None if true_valid is None else tuple(true_valid.shape)}"
        )
    with torch.no_grad():
        dtype = compute_dtype(pred_boxes)
        if t == 0 or n == 0:
            return pred_boxes.new_zeros(batch, n, dtype=dtype)
        true_xyxy = cxcywh_to_xyxy(true_cxcywh.detach().to(dtype))
        pred_xyxy = pred_boxes.detach().to(dtype)
        if pred_format == "cxcywh":
            pred_xyxy = cxcywh_to_xyxy(pred_xyxy)
        # a true box outside a scale's list becomes the empty box (0, 0, 0, 0) there: its IoU with
        # every prediction is exactly 0, so no validity shift and no clamp of the maxima are needed
        rows_of_scale = lambda s: true_xyxy if per_scale is None else torch.where(  # noqa: E731
            per_scale[:, s, :, None], true_xyxy, 0.0
        )
        iou_of = ChunkedPairwiseIoU(rows_of_scale(0), pred_xyxy, eps=eps)
        if chunk_elements is None:
            chunk_elements = _chunking.chunk_elements(pred_xyxy.device, _chunking.YOLO_IGNORE_IOU)
        step = max(1, chunk_elements // (batch * t))
        ends, maxima = list(itertools.accumulate(sizes)), []
        for s, (first, last) in enumerate(zip([0] + ends[:-1], ends)):
            if s > 0:
                iou_of = iou_of.with_rows(rows_of_scale(s))
            for start in range(first, last, step):
                maxima.append(iou_of.clamped_ratio(start, min(start + step, last)).amax(1))  # (B, T, chunk) -> (B, chunk)
        return torch.cat(maxima, dim=1)
