"""RetinaNet loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", arXiv:1708.02002).

``loss = (sum over non-ignored anchors and classes of sigmoid focal loss
          + sum over positive anchors of the box loss) / max(1, number of positive anchors)``

* Assignment: :func:`detloss.matching.max_iou.max_iou_match` with IoU >= 0.5 positive,
  < 0.4 negative, in between ignored, plus every tie of each GT's best IoU as positive
  (low-quality matches). Differs from detectron2 / torchvision in one place: a GT that
  overlaps no anchor at all does not turn every non-overlapping anchor positive
  (``low_quality_zero_iou=True`` restores it).
* Classes: ``gt_labels`` are ``0 .. K-1`` with **no background class**: ``cls_logits`` has
  ``K`` columns, one sigmoid per class; a negative anchor has an all-zero target row, an
  ignored anchor (label -1) contributes nothing.
* Box loss on the R-CNN deltas (``weights``, default ``(1, 1, 1, 1)``, i.e. stds ``1 / w``):
  smooth L1 (``beta`` 0.1 as detectron2; 1/9 as the paper's Detectron), L1, or GIoU on
  the decoded boxes.
* Normaliser: :func:`detloss.functional.positive_normalizer` of the positive count
  (all-reduced with ``distributed=True``). Images without boxes: all anchors negative, box
  loss exactly 0.

Memory and speed: the focal term is :func:`detloss.functional.focal_chunked.chunked_sigmoid_focal_sum`,
one fused pass over cache-sized chunks of the logits computing the loss and its gradient
(no one-hot target), so a forward plus backward needs about the logits' gradient on top of
the logits; the IoU stage is one chunked pass too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from .._validate import (
    ValueChecks, require_boxes, require_choice, require_floating, require_int, require_padded_gt, require_positive,
    require_shape,
)
from ..boxes import compute_dtype
from ..coders import decode_deltas, encode_deltas
from ..functional import iou_loss, positive_normalizer, smooth_l1_sum
from ..functional.focal_chunked import chunked_sigmoid_focal_sum  # noqa: F401  (public here too)
from ..matching.max_iou import gather_boxes, max_iou_match_unchecked

BoxLoss = Literal["smooth_l1", "l1", "giou"]


@dataclass
class RetinaNetAssignment:
    """Matcher decisions: ``labels (B, A)`` 1/0/-1, ``matched_gt (B, A)``, ``max_iou (B, A)``,
    ``target_class (B, A)`` (the GT class of positives, -1 elsewhere) and ``num_pos`` (0-d)."""

    labels: Tensor
    matched_gt: Tensor
    max_iou: Tensor
    target_class: Tensor
    num_pos: Tensor


class RetinaNetLoss(nn.Module):
    """RetinaNet focal + box loss over all anchors of a batch (see the module doc).

    Args:
        num_classes: ``K``, the number of object classes (no background column).
        pos_iou, neg_iou, allow_low_quality, low_quality_zero_iou: the matcher.
        alpha, gamma: focal loss (0.25, 2); ``alpha < 0`` disables the alpha weighting.
        box_loss: ``"smooth_l1"`` (with ``beta``), ``"l1"`` or ``"giou"``.
        box_weight, cls_weight: weights of the two terms in ``loss`` (1 each, as the paper).
        weights / means / stds: the delta coder (``weights`` are torchvision-style, ``stds =
            1 / weights``; give one of ``weights`` and ``stds``).
        pixel_offset: 0 (continuous pixels) or 1 (inclusive), for the IoU and the coder.
        distributed: all-reduce the positive count (DDP).
        chunk_size: anchors per IoU chunk; cls_chunk_size: rows per focal-loss chunk.

    ``forward(box_pred (B, A, 4) deltas, cls_logits (B, A, K), anchors (A, 4) xyxy pixels,
    gt_boxes (B, M, 4) xyxy pixels, gt_labels (B, M) in [0, K-1], gt_valid (B, M) bool, *,
    return_assignment=False)`` returns ``{"loss_cls", "loss_box", "loss"}`` (0-d float32, or
    float64 for float64 input) and ``"assignment"`` (:class:`RetinaNetAssignment`) when asked.

    >>> anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    >>> gt_boxes, gt_labels, gt_valid = torch.tensor([[[0.0, 0.0, 10.0, 12.0]]]), torch.tensor([[1]]), torch.tensor([[True]])
    >>> out = RetinaNetLoss(2)(torch.zeros(1, 3, 4), torch.zeros(1, 3, 2), anchors, gt_boxes, gt_labels, gt_valid)
    >>> {k: round(float(v), 4) for k, v in out.items()}
    {'loss_cls': 0.6931, 'loss_box': 0.1823, 'loss': 0.8755}
    """

    def __init__(
        self, num_classes: int, *,
        # matcher
        pos_iou: float = 0.5, neg_iou: float = 0.4, allow_low_quality: bool = True,
        low_quality_zero_iou: bool = False, chunk_size: Optional[int] = None,
        # classification and box losses
        alpha: float = 0.25, gamma: float = 2.0, cls_chunk_size: Optional[int] = None,
        box_loss: BoxLoss = "smooth_l1", beta: float = 0.1, box_weight: float = 1.0, cls_weight: float = 1.0,
        distributed: bool = False,
        # delta coder
        weights: Optional[Sequence[float]] = None, means: Optional[Sequence[float]] = None,
        stds: Optional[Sequence[float]] = None, pixel_offset: float = 0.0,
    ) -> None:
        super().__init__()
        require_int(num_classes, "num_classes", minimum=1)
        require_choice(box_loss, "box_loss", ("smooth_l1", "l1", "giou"))
        if weights is not None and stds is not None:
            raise ValueError("weights, stds: expected at most one of them, got both")
        if weights is not None:
            stds = tuple(1.0 / float(w) for w in weights)
        self.num_classes = num_classes
        self.match_options = dict(
            pos_iou=pos_iou, neg_iou=neg_iou, allow_low_quality=allow_low_quality,
            low_quality_zero_iou=low_quality_zero_iou, pixel_offset=pixel_offset, chunk_size=chunk_size,
        )
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.box_loss, self.beta = box_loss, float(beta)
        self.box_weight = require_positive(box_weight, "box_weight", allow_zero=True)
        self.cls_weight = require_positive(cls_weight, "cls_weight", allow_zero=True)
        self.coder = dict(means=means, stds=stds, pixel_offset=pixel_offset)
        self.distributed = distributed
        self.cls_chunk_size = cls_chunk_size

    def forward(
        self,
        box_pred: Tensor,
        cls_logits: Tensor,
        anchors: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
        *,
        return_assignment: bool = False,
    ) -> dict:
        require_floating(cls_logits, "cls_logits")
        dims = require_shape(cls_logits, "cls_logits", ("B", "A", self.num_classes))
        require_floating(box_pred, "box_pred")
        require_shape(box_pred, "box_pred", ("B", "A", 4), dims)
        require_boxes(anchors, "anchors", ndim=2)
        require_shape(anchors, "anchors", ("A", 4), dims)
        checks = ValueChecks().finite(anchors, "anchors")
        classes = (0, self.num_classes - 1)
        dims, gt_valid = require_padded_gt(gt_boxes, gt_valid, gt_labels, checks=checks, dims=dims, label_range=classes)
        checks.run()

        match = max_iou_match_unchecked(anchors, gt_boxes, gt_valid, **self.match_options)
        positive = match.labels == 1
        if gt_labels.shape[1]:
            target_class = torch.where(positive, gt_labels.gather(1, match.matched_gt), -1)
        else:
            target_class = torch.full_like(match.labels, -1)
        num_pos = positive.sum()
        normalizer = positive_normalizer(num_pos, distributed=self.distributed)

        # the box term first, so its anchor-sized temporaries are gone before the focal pass
        # holds its logits-sized gradient; the matcher's outputs are not held through it either
        loss_box = self._box_loss(box_pred, anchors, gt_boxes, match.matched_gt, positive, normalizer)
        counted = match.labels >= 0
        assignment = None
        if return_assignment:
            assignment = RetinaNetAssignment(
                labels=match.labels, matched_gt=match.matched_gt, max_iou=match.max_iou,
                target_class=target_class, num_pos=num_pos,
            )
        del match, positive
        cls_sum = chunked_sigmoid_focal_sum(cls_logits, target_class, counted, self.alpha, self.gamma, self.cls_chunk_size)
        loss_cls = cls_sum / normalizer.to(cls_sum.dtype)
        out = {"loss_cls": loss_cls, "loss_box": loss_box, "loss": self.cls_weight * loss_cls + self.box_weight * loss_box}
        if assignment is not None:
            out["assignment"] = assignment
        return out

    def _box_loss(
        self, box_pred: Tensor, anchors: Tensor, gt_boxes: Tensor, matched_gt: Tensor,
        positive: Tensor, normalizer: Tensor,
    ) -> Tensor:
        dtype = compute_dtype(box_pred)
        ref = anchors.to(dtype).unsqueeze(0).expand_as(box_pred)
        matched = gather_boxes(gt_boxes.to(dtype), matched_gt, ref)
        # non-positive anchors regress onto themselves: finite values, zero weight
        matched = torch.where(positive.unsqueeze(-1), matched, ref)
        weight = positive.unsqueeze(-1).to(dtype)
        if self.box_loss == "giou":
            decoded = decode_deltas(box_pred.to(dtype), ref, **self.coder)
            return iou_loss(decoded, matched, "giou", weight=positive.to(dtype), reduction="sum", normalizer=normalizer)
        targets = encode_deltas(matched, ref, **self.coder)
        beta = 0.0 if self.box_loss == "l1" else self.beta
        return smooth_l1_sum(box_pred, targets, beta, weight) / normalizer
