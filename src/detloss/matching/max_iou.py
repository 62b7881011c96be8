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

Memory stays bounded and the work is one pass: the ``(B, A, M)`` IoU matrix is built
``chunk_size`` anchors at a time (cache-sized by default) and reduced at once: per-anchor best
GT, per-GT running best IoU and, for the low-quality ties, a bit per (anchor, GT) telling
whether the anchor equals that GT's running best (8 GTs per byte). A tie is kept at the end
iff the running best it equalled is the GT's final best. No ``(B, A, M, 4)`` or float
``(B, A, M)`` temporary is ever made. No host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._chunking import ANCHOR_IOU, chunk_elements
from .._constants import device_constant
from .._validate import ValueChecks, as_bool_mask, require_boxes, require_padded_gt, require_shape
from ..boxes import ChunkedPairwiseIoU, pair_dtype



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


def gather_boxes(boxes: Tensor, index: Tensor, fallback: Tensor) -> Tensor:
    """``boxes (B, M, 4)`` at ``index (B, K)`` -> ``(B, K, 4)``; ``fallback`` (broadcast to
    ``(B, K, 4)``) when ``M = 0``, where there is nothing to gather."""
    if boxes.shape[1] == 0:
        return fallback.expand(index.shape + (4,))
    return boxes.gather(1, index.unsqueeze(-1).expand(-1, -1, 4))


def _inclusive(boxes: Tensor, pixel_offset: float) -> Tensor:
    """Shift ``x2, y2`` by ``pixel_offset`` so plain IoU equals the inclusive-pixel IoU."""
    if pixel_offset == 0:
        return boxes
    offset = device_constant([0.0, 0.0, pixel_offset, pixel_offset], dtype=boxes.dtype, device=boxes.device)
    return boxes + offset


def _chunks(
    num: int, batch: int, num_gt: int, chunk_size: Optional[int], device: torch.device
) -> list[tuple[int, int]]:
    if chunk_size is None:
        chunk_size = max(1, chunk_elements(device, ANCHOR_IOU) // max(1, batch * num_gt))
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size}")
    return [(s, min(s + chunk_size, num)) for s in range(0, num, chunk_size)]


def _pack_bits(mask: Tensor) -> Tensor:
    """``(B, M, N)`` bool -> ``(B, ceil(M / 8), N)`` uint8: 8 GT flags per byte."""
    pad = -mask.shape[1] % 8
    if pad:
        mask = torch.nn.functional.pad(mask, (0, 0, 0, pad))
    shift = torch.arange(8, dtype=torch.uint8, device=mask.device).unsqueeze(-1)  # (8, 1)
    bits = mask.unflatten(1, (-1, 8)).view(torch.uint8) << shift
    return bits.sum(dim=2, dtype=torch.uint8)


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
        chunk_size: anchors per IoU chunk (default: about 128k IoU values per chunk, cache-sized).

    Returns:
        :class:`MaxIoUAssignment` with ``(B, A)`` tensors.

    >>> anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    >>> gt = torch.tensor([[[0.0, 0.0, 10.0, 12.0]]])
    >>> match = max_iou_match(anchors, gt, torch.tensor([[True]]), pos_iou=0.7, neg_iou=0.3)
    >>> match.labels, match.max_iou
    (tensor([[1, 0, 0]]), tensor([[0.8333, 0.1892, 0.0000]]))
    """
    require_boxes(anchors, "anchors")
    checks = ValueChecks().finite(anchors, "anchors")
    dims, gt_valid = require_padded_gt(gt_boxes, gt_valid, checks=checks)
    require_shape(anchors if anchors.dim() == 3 else anchors[None].expand(dims["B"], -1, -1), "anchors",
                  ("B", "A", 4), dims)
    if neg_iou > pos_iou:
        raise ValueError(f"neg_iou: expected at most pos_iou={pos_iou}, got {neg_iou}")
    if anchor_valid is not None:
        anchor_valid = as_bool_mask(anchor_valid, "anchor_valid")
        require_shape(anchor_valid if anchor_valid.dim() == 2 else anchor_valid[None].expand(dims["B"], -1),
                      "anchor_valid", ("B", "A"), dims)
    checks.run()
    return max_iou_match_unchecked(
        anchors, gt_boxes, gt_valid, pos_iou=pos_iou, neg_iou=neg_iou, allow_low_quality=allow_low_quality,
        low_quality_zero_iou=low_quality_zero_iou, clobber_positives=clobber_positives, anchor_valid=anchor_valid,
        pixel_offset=pixel_offset, chunk_size=chunk_size,
    )


def max_iou_match_unchecked(
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
    """:func:`max_iou_match` without its checks, for callers that validated the inputs
    (``gt_valid`` and ``anchor_valid`` bool)."""
    batch, num_gt = gt_valid.shape
    if anchors.dim() == 2:
        anchors = anchors.unsqueeze(0).expand(batch, -1, -1)
    num_anchors = anchors.shape[1]
    if anchor_valid is not None and anchor_valid.dim() == 1:
        anchor_valid = anchor_valid.unsqueeze(0).expand(batch, -1)

    dtype = pair_dtype(anchors, gt_boxes)
    device = anchors.device
    max_iou = torch.zeros((batch, num_anchors), dtype=dtype, device=device)
    matched = torch.zeros((batch, num_anchors), dtype=torch.int64, device=device)
    low_quality = torch.zeros((batch, num_anchors), dtype=torch.bool, device=device)
    if num_gt > 0 and num_anchors > 0:
        shared = anchors.dim() == 2 or anchors.stride(0) == 0
        a_boxes = _inclusive((anchors[:1] if shared else anchors).to(dtype), pixel_offset)
        iou_of = ChunkedPairwiseIoU(
            _inclusive(gt_boxes.to(dtype), pixel_offset), a_boxes, rows_valid=gt_valid, columns_valid=anchor_valid
        )
        chunks = _chunks(num_anchors, batch, num_gt, chunk_size, device)
        gt_best = torch.full((batch, num_gt), -1.0, dtype=dtype, device=device)
        if allow_low_quality:  # preallocated: no long-lived small blocks between chunk temporaries
            tie_bits = torch.empty((batch, -(-num_gt // 8), num_anchors), dtype=torch.uint8, device=device)
            running = torch.empty((len(chunks), batch, num_gt), dtype=dtype, device=device)
        for i, (start, stop) in enumerate(chunks):
            iou = iou_of(start, stop)
            best, arg = iou.max(dim=1)
            max_iou[:, start:stop] = best.clamp(min=0)
            matched[:, start:stop] = torch.where(best < 0, 0, arg)  # no valid pair: GT 0
            if allow_low_quality:
                gt_best = torch.maximum(gt_best, iou.amax(dim=2))
                tie_bits[..., start:stop] = _pack_bits(iou == gt_best.unsqueeze(2))
                running[i] = gt_best
        if allow_low_quality:
            # a tie with a GT's running best counts iff that running best is its final best
            final = (running == gt_best) & (gt_best > (-0.5 if low_quality_zero_iou else 0.0))
            for i, (start, stop) in enumerate(chunks):
                final_bits = _pack_bits(final[i].unsqueeze(2))  # (B, G, 1)
                low_quality[:, start:stop] = (tie_bits[..., start:stop] & final_bits).ne(0).any(dim=1)
            if anchor_valid is not None:
                low_quality &= anchor_valid

    positive = max_iou >= pos_iou
    negative = max_iou < neg_iou
    if clobber_positives:
        positive = (positive | low_quality) & ~negative
    else:
        positive = positive | low_quality
        negative = negative & ~positive
    labels = torch.where(positive, 1, torch.where(negative, 0, -1))
    if anchor_valid is not None:
        labels = torch.where(anchor_valid, labels, -1)
    labels = labels.to(torch.int64)
    return MaxIoUAssignment(labels=labels, matched_gt=matched, max_iou=max_iou, low_quality=low_quality)
