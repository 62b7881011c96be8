"""RetinaFace MultiBox loss with landmarks (Deng et al. 2019, arXiv:1905.00641), Pytorch_Retinaface conventions.

Conventions of this family (Pytorch_Retinaface):

* **Labels.** ``cls_logits (B, P, C)`` with ``C = 2``: column 0 background, column 1 face.
  Every positive prior has target 1; there are no per-face class ids. Whether a face has
  landmarks is ``gt_has_landmarks (B, M)`` (the original marks faces without landmarks with
  label -1).
* **Boxes.** ``priors (P, 4)`` normalised ``cxcywh``; ``gt_boxes (B, M, 4)`` normalised ``xyxy``;
  ``gt_landmarks (B, M, 10)`` normalised ``(x0, y0, ..., x4, y4)``.

The loss: matching (:func:`detloss.match_priors` with ``pos_iou=0.35`` and the 0.2 floor:
GTs whose best IoU is below it are ignored, i.e. not forced), smooth L1 over the positives'
boxes, cross-entropy over positives and 7 hard negatives per positive (per image), both
divided by ``N = max(positives, 1)``; smooth L1 over the landmarks of positives whose GT has
landmarks, divided by their count (at least 1). ``loss = 2 * box + cls + landmark`` as in the
repo's ``train.py`` (the module itself returns unweighted terms).

Differences from Pytorch_Retinaface (the drop-in :mod:`detloss.compat.retinaface` reproduces
the original): an ignored GT does not claim its best prior (the original lets it take the
prior's GT index, which can create a positive regressing to the ignored face); zero-area GTs
are dropped; the mining loss is the per-row stable cross-entropy. Everything shared with SSD
lives in :mod:`detloss.detectors.ssd`.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from .._validate import ValueChecks, as_bool_mask, require_floating, require_positive, require_shape
from ..coders import DEFAULT_VARIANCES, encode_landmarks
from ..functional import positive_normalizer
from ..functional.multibox import mined_cross_entropy, multibox_normalizer, smooth_l1_over
from ..functional.selection import gather_matched
from ..matching.bipartite import match_priors_unchecked
from .ssd import MultiBoxAssignment, MultiBoxLossBase, queue_multibox_checks

NUM_LANDMARK_COORDS = 10


class RetinaFaceLoss(MultiBoxLossBase):
    """RetinaFace loss: box and landmark smooth L1 + cross-entropy with hard negative mining.

    Args:
        num_classes: logit columns, background included (2: background, face).
        variances: centre and size variances of the box / landmark coder.
        pos_iou: IoU at or above which a prior is positive (0.35).
        neg_pos_ratio: mined negatives per positive, per image (7).
        min_best_iou: GTs whose best prior IoU is below it are ignored (0.2).
        box_weight, cls_weight, landmark_weight: weights in ``loss`` (2, 1, 1 as in train.py).
        normalize_by: ``"num_pos"`` or ``"none"`` for the box and class terms (the landmark term
            always divides by the landmark-positive count, clamped at 1).
        distributed: all-reduce both positive counts over processes.
        drop_degenerate_gt: treat zero-area GTs as invalid.
        ignored_gt_claims_prior: reproduce the original's "ignored GT still claims a prior"
            quirk (see :func:`detloss.match_priors`); off by default.

    ``forward(box_pred (B, P, 4), cls_logits (B, P, C), landmark_pred (B, P, 10), priors (P, 4)
    cxcywh normalised, gt_boxes (B, M, 4) xyxy normalised, gt_landmarks (B, M, 10),
    gt_has_landmarks (B, M) bool, gt_valid (B, M) bool, *, return_assignment=False)`` returns
    ``{"loss_box", "loss_cls", "loss_landmark", "loss"}`` (0-d float32, float64 for float64
    inputs) and, with ``return_assignment``, ``"assignment"``: a
    :class:`detloss.detectors.ssd.MultiBoxAssignment` with the landmark fields set.

    >>> import torch
    >>> priors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    >>> gt_boxes, gt_landmarks = torch.tensor([[[0.0, 0.0, 0.5, 0.6]]]), torch.full((1, 1, 10), 0.2)
    >>> yes = torch.tensor([[True]])
    >>> out = RetinaFaceLoss()(torch.zeros(1, 3, 4), torch.zeros(1, 3, 2), torch.zeros(1, 3, 10), priors,
    ...                        gt_boxes, gt_landmarks, yes, yes)
    >>> {k: round(float(v), 4) for k, v in out.items()}
    {'loss_box': 0.9155, 'loss_cls': 2.0794, 'loss_landmark': 5.0, 'loss': 8.9105}
    """

    def __init__(
        self,
        num_classes: int = 2,
        *,
        variances: Sequence[float] = DEFAULT_VARIANCES,
        pos_iou: float = 0.35,
        neg_pos_ratio: float = 7,
        min_best_iou: Optional[float] = 0.2,
        box_weight: float = 2.0,
        cls_weight: float = 1.0,
        landmark_weight: float = 1.0,
        normalize_by: str = "num_pos",
        distributed: bool = False,
        drop_degenerate_gt: bool = True,
        ignored_gt_claims_prior: bool = False,
    ) -> None:
        super().__init__(
            num_classes, variances=variances, pos_iou=pos_iou, neg_pos_ratio=neg_pos_ratio,
            box_weight=box_weight, cls_weight=cls_weight, normalize_by=normalize_by,
            distributed=distributed, drop_degenerate_gt=drop_degenerate_gt,
        )
        self.min_best_iou = min_best_iou
        self.landmark_weight = require_positive(landmark_weight, "landmark_weight", allow_zero=True)
        self.ignored_gt_claims_prior = bool(ignored_gt_claims_prior)

    def forward(
        self,
        box_pred: Tensor,
        cls_logits: Tensor,
        landmark_pred: Tensor,
        priors: Tensor,
        gt_boxes: Tensor,
        gt_landmarks: Tensor,
        gt_has_landmarks: Tensor,
        gt_valid: Tensor,
        *,
        return_assignment: bool = False,
    ) -> dict:
        checks = ValueChecks()
        dims, gt_valid = queue_multibox_checks(box_pred, cls_logits, priors, gt_boxes, gt_valid, self.num_classes, checks)
        require_floating(landmark_pred, "landmark_pred")
        require_floating(gt_landmarks, "gt_landmarks")
        require_shape(landmark_pred, "landmark_pred", ("B", "P", NUM_LANDMARK_COORDS), dims)
        require_shape(gt_landmarks, "gt_landmarks", ("B", "M", NUM_LANDMARK_COORDS), dims)
        require_shape(gt_has_landmarks, "gt_has_landmarks", ("B", "M"), dims)
        gt_has_landmarks = as_bool_mask(gt_has_landmarks, "gt_has_landmarks")
        checks.finite(gt_landmarks, "gt_landmarks").run()

        # 1. match: each prior's face (threshold + bipartite forcing, faces below min_best_iou
        #    ignored); N = positives
        match = match_priors_unchecked(
            priors, gt_boxes, gt_valid,
            pos_iou=self.pos_iou, min_best_iou=self.min_best_iou,
            drop_degenerate_gt=self.drop_degenerate_gt,
            ignored_gt_claims_prior=self.ignored_gt_claims_prior,
        )
        positive = match.positive
        n = multibox_normalizer(positive, self.normalize_by, self.distributed)
        # 2. box term: smooth L1 over the positives' encoded boxes, / N
        loss_box, box_targets = smooth_l1_over(
            positive, box_pred, gt_boxes, match.matched_gt, priors, self.encode_boxes, n
        )
        # 3. class term: face / background cross-entropy of the positives and the mined negatives, / N
        labels = positive.long()
        loss_cls, negative = mined_cross_entropy(
            cls_logits, labels, positive, neg_pos_ratio=self.neg_pos_ratio, normalizer=n
        )
        # 4. landmark term: smooth L1 over the positives whose face has landmarks, / their count
        has_landmarks = gather_matched(gt_has_landmarks.unsqueeze(-1), match.matched_gt).squeeze(-1)
        landmark_positive = positive & has_landmarks
        n_landmark = positive_normalizer(landmark_positive.sum(), distributed=self.distributed)
        loss_landmark, landmark_targets = smooth_l1_over(
            landmark_positive, landmark_pred, gt_landmarks, match.matched_gt, priors,
            lambda matched, prior: encode_landmarks(matched, prior, self.variances), n_landmark,
        )
        out = {
            "loss_box": loss_box,
            "loss_cls": loss_cls,
            "loss_landmark": loss_landmark,
            "loss": self.box_weight * loss_box + self.cls_weight * loss_cls + self.landmark_weight * loss_landmark,
        }
        if return_assignment:
            out["assignment"] = MultiBoxAssignment(
                labels=labels, positive=positive, negative=negative,
                matched_gt=match.matched_gt, box_targets=box_targets, match=match,
                landmark_positive=landmark_positive, landmark_targets=landmark_targets,
            )
        return out
