"""Max-IoU labelling of anchors against padded ground truth (RPN, RetinaNet, R-CNN proposals).

Every anchor takes its best ground-truth box (``matched_gt``, the first one on ties) and is
labelled from its best IoU ``q``:

* ``1`` (positive) if ``q >= pos_iou``, or, with ``allow_low_quality``, if for some valid GT
  the anchor's IoU equals that GT's best IoU over all valid anchors (every tie counts: the
  "low-quality matches" of Faster R-CNN and RetinaNet);
* ``0`` (negative) if ``q < neg_iou``;
* ``-1`` (ignored) otherwise, and always for anchors marked invalid by ``anchor_valid``
  (outside the image, for the RPN).

With ``clobber_positives=False`` (the default, and tf-faster-rcnn's ``RPN_CLOBBER_POSITIVES``
False) positives win over negatives; with True a best IoU below ``neg_iou`` is negative even
for a low-quality match. A low-quality match is taken only where the GT's best IoU is above
0: the originals (tf-faster-rcnn, detectron2, torchvision) also make every anchor that does
not overlap a GT at all positive when that GT overlaps no anchor; ``low_quality_zero_iou=True``
reproduces that. The matched GT of a low-quality positive is still its best GT, as in the
originals.

Memory stays bounded: the ``(B, A, M)`` IoU matrix is built ``chunk_size`` anchors at a time
and reduced at once (per-anchor best GT, per-GT best IoU); the low-quality ties need a second
pass over the chunks. No ``(B, A, M, 4)`` temporary is ever made. No host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._validate import as_bool_mask, require_boxes, require_shape
from ..boxes import box_iou, compute_dtype

# Elements of one IoU chunk (B x chunk x M) when ``chunk_size`` is not given.
DEFAULT_CHUNK_ELEMENTS = 1 << 20


@dataclass
class MaxIoUAssignment:
    """Result of :func:`max_iou_match`.

    Attributes:
        labels: ``(B, A)`` int64, 1 positive, 0 negative, -1 ignored.
        matched_gt: ``(B, A)`` int64 index of the best valid GT (0 where there is none).
        max_iou: ``(B, A)`` best IoU with a valid GT (0 where there is none), in the
            compute dtype of the boxes.
        low_quality: ``(B, A)`` bool, the anchors that tie some GT's best IoU.
    """

    labels: Tensor
    matched_gt: Tensor
    max_iou: Tensor
    low_quality: Tensor


def _inclusive(boxes: Tensor, pixel_offset: float) -> Tensor:
    """Shift ``x2, y2`` by ``pixel_offset`` so plain IoU equals the inclusive-pixel IoU."""
    if pixel_offset == 0:
        return boxes
    offset = boxes.new_tensor([0.0, 0.0, pixel_offset, pixel_offset])
    return boxes + offset


def _chunks(num: int, batch: int, num_gt: int, chunk_size: Optional[int]) -> list[tuple[int, int]]:
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // max(1, batch * num_gt))
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size}")
    return [(s, min(s + chunk_size, num)) for s in range(0, num, chunk_size)]


def max_iou_match(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    *,
    pos_iou: float,
    neg_iou: float,
    allow_low_quality: bool = True,
    low_quality_zero_iou: bool = False,
    clobber_positives: bool = False,
    anchor_valid: Optional[Tensor] = None,
    pixel_offset: float = 0.0,
    chunk_size: Optional[int] = None,
) -> MaxIoUAssignment:
    """Label anchors by their best IoU with padded ground truth (see the module doc).

    Args:
        anchors: ``(A, 4)`` shared or ``(B, A, 4)`` per image, xyxy (pixels or normalised,
            as ``gt_boxes``), floating point.
        gt_boxes: ``(B, M, 4)`` xyxy; ``M`` may be 0.
        gt_valid: ``(B, M)`` bool (or 0/1) mask of real GT rows.
        pos_iou, neg_iou: thresholds, ``neg_iou <= pos_iou``; ``[neg_iou, pos_iou)`` is ignored.
        allow_low_quality: add every tie of each GT's best IoU as positive.
        low_quality_zero_iou: let a GT whose best IoU is 0 make its ties positive (the
            originals' behaviour; see the module doc).
        clobber_positives: negatives override low-quality positives.
        anchor_valid: optional ``(A,)`` or ``(B, A)`` bool; invalid anchors are labelled -1
            and take no part in any GT's best IoU.
        pixel_offset: 1.0 for the inclusive-pixel IoU of py-faster-rcnn / tf-faster-rcnn
            (``w = x2 - x1 + 1``), 0 otherwise.
        chunk_size: anchors per IoU chunk (default: about 1M IoU values per chunk).

    Returns:
        :class:`MaxIoUAssignment` with ``(B, A)`` tensors.
    """
    require_boxes(anchors, "anchors")
    require_boxes(gt_boxes, "gt_boxes", ndim=3)
    dims = require_shape(gt_boxes, "gt_boxes", ("B", "M", 4))
    if anchors.dim() == 2:
        anchors = anchors.unsqueeze(0).expand(dims["B"], -1, -1)
    require_shape(anchors, "anchors", ("B", "A", 4), dims)
    gt_valid = as_bool_mask(gt_valid, "gt_valid")
    require_shape(gt_valid, "gt_valid", ("B", "M"), dims)
    if neg_iou > pos_iou:
        raise ValueError(f"neg_iou: expected at most pos_iou={pos_iou}, got {neg_iou}")
    batch, num_anchors, num_gt = dims["B"], dims["A"], dims["M"]
    if anchor_valid is None:
        anchor_valid = torch.ones((batch, num_anchors), dtype=torch.bool, device=anchors.device)
    else:
        anchor_valid = as_bool_mask(anchor_valid, "anchor_valid")
        if anchor_valid.dim() == 1:
            anchor_valid = anchor_valid.unsqueeze(0).expand(batch, -1)
        require_shape(anchor_valid, "anchor_valid", ("B", "A"), dims)

    dtype = torch.promote_types(compute_dtype(anchors), compute_dtype(gt_boxes))
    device = anchors.device
    max_iou = torch.zeros((batch, num_anchors), dtype=dtype, device=device)
    matched = torch.zeros((batch, num_anchors), dtype=torch.int64, device=device)
    low_quality = torch.zeros((batch, num_anchors), dtype=torch.bool, device=device)
    if num_gt > 0 and num_anchors > 0:
        a_boxes = _inclusive(anchors.to(dtype), pixel_offset)
        g_boxes = _inclusive(gt_boxes.to(dtype), pixel_offset)
        gt_mask = gt_valid.unsqueeze(1)  # (B, 1, M)

        def masked_iou(start: int, stop: int) -> Tensor:
            iou = box_iou(a_boxes[:, start:stop], g_boxes)
            keep = gt_mask & anchor_valid[:, start:stop, None]
            return torch.where(keep, iou, iou.new_full((), -1.0))

        chunks = _chunks(num_anchors, batch, num_gt, chunk_size)
        gt_best = torch.full((batch, num_gt), -1.0, dtype=dtype, device=device)
        last = None
        for start, stop in chunks:
            last = masked_iou(start, stop)
            best, arg = last.max(dim=2)
            max_iou[:, start:stop] = best.clamp(min=0)
            matched[:, start:stop] = arg
            gt_best = torch.maximum(gt_best, last.max(dim=1).values)
        if allow_low_quality:
            floor = -0.5 if low_quality_zero_iou else 0.0
            gt_ok = (gt_best > floor).unsqueeze(1)  # (B, 1, M); invalid GTs have -1
            for start, stop in chunks:
                iou = last if len(chunks) == 1 else masked_iou(start, stop)
                tie = (iou == gt_best.unsqueeze(1)) & gt_ok
                low_quality[:, start:stop] = tie.any(dim=2)
            low_quality &= anchor_valid

    positive = max_iou >= pos_iou
    negative = max_iou < neg_iou
    if clobber_positives:
        positive = (positive | low_quality) & ~negative
    else:
        positive = positive | low_quality
        negative = negative & ~positive
    labels = torch.where(positive, 1, torch.where(negative, 0, -1))
    labels = torch.where(anchor_valid, labels, -1).to(torch.int64)
    return MaxIoUAssignment(labels=labels, matched_gt=matched, max_iou=max_iou, low_quality=low_quality)
