"""SSD MultiBox loss (Liu et al. 2016, arXiv:1512.02325), ssd.pytorch conventions.

Conventions of this family (ssd.pytorch):

* **Labels.** ``cls_logits (B, P, C)``: column 0 is **background**, column ``l + 1`` is
  foreground class ``l``. ``gt_labels (B, M)`` hold foreground ids in ``[0, C - 2]`` (the
  0-based VOC ids ssd.pytorch's ``match()`` receives and shifts by +1).
* **Boxes.** ``priors (P, 4)`` are normalised ``cxcywh``; ``gt_boxes (B, M, 4)`` are normalised
  ``xyxy`` (divide pixel boxes by the image width/height).
* **Targets.** Variance coder ``((g_c - p_c) / (v0 p_wh), log(g_wh / p_wh) / v1)``.

The loss, as the paper's equation: assignment (:func:`detloss.match_priors`: IoU >= 0.5 plus
bipartite forcing), then smooth L1 (beta 1) over the positives' 4 offsets, then softmax
cross-entropy over the positives and the hard negatives
(:func:`detloss.mine_hard_negatives`, 3 per positive, per image), both divided by
``N = max(total positives in the batch, 1)``.

Differences from ssd.pytorch (the drop-in :mod:`detloss.compat.ssd_pytorch` reproduces the
original where it matters):

* zero-area GTs are dropped (``drop_degenerate_gt``); the original matches them and produces
  infinite targets. Targets are finite in any case (the coder clamps the size ratio);
* the mining loss is the per-row stable cross-entropy, not ``logsumexp`` with one global max
  (same value up to rounding; the original's form underflows for rows far below the max);
* positives never compete for negative slots; images without GT and batches without
  positives give finite losses (the original crashes or divides by zero).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .._validate import (
    ValueChecks,
    require_choice,
    require_floating,
    require_int,
    require_integer,
    require_padded_gt,
    require_positive,
    require_shape,
)
from ..coders import DEFAULT_VARIANCES, encode_boxes
from ..functional.multibox import mined_cross_entropy, multibox_normalizer, smooth_l1_over
from ..functional.selection import gather_matched
from ..matching.bipartite import PriorMatch, match_priors_unchecked

NORMALIZE_BY = ("num_pos", "none")


@dataclass
class MultiBoxAssignment:
    """The decisions behind an SSD / RetinaFace loss (``B`` images, ``P`` priors).

    Attributes:
        labels: ``(B, P)`` int64 classification target: 0 background, else the logit column.
        positive: ``(B, P)`` bool positives (box and class loss).
        negative: ``(B, P)`` bool mined hard negatives (class loss, target 0).
        matched_gt: ``(B, P)`` int64 GT slot of each prior (-1 in images without usable GT).
        box_targets: ``(B, P, 4)`` encoded regression targets of the positives (0 elsewhere).
        match: the full :class:`detloss.matching.bipartite.PriorMatch`.
        landmark_positive: RetinaFace only, ``(B, P)`` bool positives whose GT has landmarks.
        landmark_targets: RetinaFace only, ``(B, P, 10)`` encoded landmark targets of the
            ``landmark_positive`` priors (0 elsewhere).
    """

    labels: Tensor
    positive: Tensor
    negative: Tensor
    matched_gt: Tensor
    box_targets: Tensor
    match: PriorMatch
    landmark_positive: Optional[Tensor] = None
    landmark_targets: Optional[Tensor] = None


def queue_multibox_checks(
    box_pred: Tensor,
    cls_logits: Tensor,
    priors: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    num_classes: int,
    checks: ValueChecks,
) -> tuple[dict[str, int], Tensor]:
    """The SSD and RetinaFace input checks: shapes and dtypes now, the values of the priors
    (finite, normalised cxcywh, positive sizes) and of the padded GT (finite, normalised) queued
    on ``checks``; the predictions are never read. Returns ``(dims, gt_valid as bool)``."""
    require_floating(box_pred, "box_pred")
    require_floating(cls_logits, "cls_logits")
    require_floating(priors, "priors")
    dims = require_shape(box_pred, "box_pred", ("B", "P", 4), {"C": num_classes})
    require_shape(cls_logits, "cls_logits", ("B", "P", "C"), dims)
    require_shape(priors, "priors", ("P", 4), dims)
    dims, gt_valid = require_padded_gt(gt_boxes, gt_valid, checks=checks, dims=dims)
    checks.finite(priors, "priors")
    checks.normalised(priors, "priors", box_format="cxcywh", positive_size=True)
    checks.normalised(gt_boxes, "gt_boxes", where=gt_valid)
    return dims, gt_valid


class MultiBoxLossBase(nn.Module):
    """What :class:`SSDLoss` and :class:`detloss.RetinaFaceLoss` share: their common options
    (validated here, see :class:`SSDLoss` for their meaning) and the box coder."""

    def __init__(
        self,
        num_classes: int,
        *,
        variances: Sequence[float],
        pos_iou: float,
        neg_pos_ratio: float,
        box_weight: float,
        cls_weight: float,
        normalize_by: str,
        distributed: bool,
        drop_degenerate_gt: bool,
    ) -> None:
        super().__init__()
        self.num_classes = require_int(num_classes, "num_classes", minimum=2, note="(background included)")
        self.variances = tuple(float(v) for v in variances)
        self.pos_iou = require_positive(pos_iou, "pos_iou")
        self.neg_pos_ratio = require_positive(neg_pos_ratio, "neg_pos_ratio", allow_zero=True)
        self.box_weight = require_positive(box_weight, "box_weight", allow_zero=True)
        self.cls_weight = require_positive(cls_weight, "cls_weight", allow_zero=True)
        self.normalize_by = require_choice(normalize_by, "normalize_by", NORMALIZE_BY)
        self.distributed = bool(distributed)
        self.drop_degenerate_gt = bool(drop_degenerate_gt)

    def encode_boxes(self, matched: Tensor, priors: Tensor) -> Tensor:
        """The variance coder's regression targets of ``matched`` xyxy boxes against cxcywh ``priors``."""
        return encode_boxes(matched, priors, self.variances)


class SSDLoss(MultiBoxLossBase):
    """SSD MultiBox loss: smooth L1 on positives + cross-entropy with hard negative mining.

    Args:
        num_classes: ``C``, logit columns including background (21 for VOC).
        variances: centre and size variances of the box coder.
        pos_iou: IoU at or above which a prior is positive (forced best priors always are).
        neg_iou: optional lower edge of an ignore band ``[neg_iou, pos_iou)`` whose priors
            are never mined as negatives (ssd.pytorch has no such band).
        neg_pos_ratio: mined negatives per positive, per image.
        box_weight, cls_weight: weights of the two terms in ``loss``.
        normalize_by: ``"num_pos"`` (divide both terms by ``max(positives, 1)``) or ``"none"``.
        distributed: all-reduce the positive count over processes (see
            :func:`detloss.functional.positive_normalizer`).
        drop_degenerate_gt: treat zero-area GTs as invalid (see :func:`detloss.match_priors`).

    ``forward(box_pred (B, P, 4), cls_logits (B, P, C), priors (P, 4) cxcywh normalised,
    gt_boxes (B, M, 4) xyxy normalised, gt_labels (B, M) int64 in [0, C-2], gt_valid (B, M)
    bool, *, return_assignment=False)`` returns ``{"loss_box", "loss_cls", "loss"}`` (0-d
    float32, float64 for float64 inputs) and, with ``return_assignment``, ``"assignment"``:
    a :class:`MultiBoxAssignment`.

    >>> priors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    >>> gt_boxes, gt_labels, gt_valid = torch.tensor([[[0.0, 0.0, 0.5, 0.6]]]), torch.tensor([[1]]), torch.tensor([[True]])
    >>> out = SSDLoss(3)(torch.zeros(1, 3, 4), torch.zeros(1, 3, 3), priors, gt_boxes, gt_labels, gt_valid)
    >>> {k: round(float(v), 4) for k, v in out.items()}
    {'loss_box': 0.9155, 'loss_cls': 3.2958, 'loss': 4.2114}
    """

    def __init__(
        self,
        num_classes: int,
        *,
        variances: Sequence[float] = DEFAULT_VARIANCES,
        pos_iou: float = 0.5,
        neg_iou: Optional[float] = None,
        neg_pos_ratio: float = 3,
        box_weight: float = 1.0,
        cls_weight: float = 1.0,
        normalize_by: str = "num_pos",
        distributed: bool = False,
        drop_degenerate_gt: bool = True,
    ) -> None:
        super().__init__(
            num_classes, variances=variances, pos_iou=pos_iou, neg_pos_ratio=neg_pos_ratio,
            box_weight=box_weight, cls_weight=cls_weight, normalize_by=normalize_by,
            distributed=distributed, drop_degenerate_gt=drop_degenerate_gt,
        )
        self.neg_iou = neg_iou

    def forward(
        self,
        box_pred: Tensor,
        cls_logits: Tensor,
        priors: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
        *,
        return_assignment: bool = False,
    ) -> dict:
        checks = ValueChecks()
        dims, gt_valid = queue_multibox_checks(box_pred, cls_logits, priors, gt_boxes, gt_valid, self.num_classes, checks)
        require_integer(gt_labels, "gt_labels")
        require_shape(gt_labels, "gt_labels", ("B", "M"), dims)
        checks.in_range(gt_labels, "gt_labels", 0, self.num_classes - 2, where=gt_valid).run()

        # 1. match: each prior's GT (threshold + bipartite forcing); N = positives
        match = match_priors_unchecked(
            priors, gt_boxes, gt_valid,
            pos_iou=self.pos_iou, neg_iou=self.neg_iou, drop_degenerate_gt=self.drop_degenerate_gt,
        )
        positive = match.positive
        n = multibox_normalizer(positive, self.normalize_by, self.distributed)
        # 2. box term: smooth L1 over the positives' encoded boxes, / N
        loss_box, box_targets = smooth_l1_over(
            positive, box_pred, gt_boxes, match.matched_gt, priors, self.encode_boxes, n
        )
        # 3. class term: cross-entropy of the positives (column k + 1) and the mined negatives
        #    (background, ranked by their background cross-entropy), / N
        labels = torch.where(positive, gather_matched(gt_labels.unsqueeze(-1), match.matched_gt).squeeze(-1) + 1, 0)
        loss_cls, negative = mined_cross_entropy(
            cls_logits, labels, positive, neg_pos_ratio=self.neg_pos_ratio, normalizer=n, candidates=~match.ignore
        )
        out = {
            "loss_box": loss_box,
            "loss_cls": loss_cls,
            "loss": self.box_weight * loss_box + self.cls_weight * loss_cls,
        }
        if return_assignment:
            out["assignment"] = MultiBoxAssignment(
                labels=labels, positive=positive, negative=negative,
                matched_gt=match.matched_gt, box_targets=box_targets, match=match,
            )
        return out
