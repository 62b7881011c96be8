"""Drop-in for Pytorch_Retinaface's ``layers.modules.MultiBoxLoss`` (biubug6/Pytorch_Retinaface).

Same constructor and call, same numbers (see ``golden/torch/README.md``), batched. Built on
:class:`detloss.RetinaFaceLoss` with the original's behaviour selected through its options:

* ignored GTs (best IoU < 0.2) still claim their best prior in the forcing loop
  (``ignored_gt_claims_prior=True``), which can turn that prior into a positive that
  regresses to the ignored face (``golden retina_mnet_a_typical``, image 2);
* zero-area GTs are matched as in the original (``drop_degenerate_gt=False``) but get finite
  targets;
* the three returned losses are unweighted (the factor 2 on ``loss_l`` lives in ``train.py``).

Target labels must be 1 (face with landmarks) or -1 (face without landmarks); any other value
is an error here (the original would silently treat a 0 as background).
``prior_for_matching``, ``bkg_label``, ``neg_mining``, ``neg_overlap`` and ``encode_target`` are
stored and, as in the original, unused; nothing is moved with ``.cuda()``.
"""
from __future__ import annotations

from .._validate import joined_value_checks, require_tensor
from ..detectors.retinaface import RetinaFaceLoss
from ..targets import pad_ground_truth
from .ssd_pytorch import VARIANCES, MultiBoxDropIn, split_targets

__all__ = ["MultiBoxLoss"]

IGNORE_GT_IOU = 0.2


class MultiBoxLoss(MultiBoxDropIn):
    """Pytorch_Retinaface ``MultiBoxLoss(num_classes, overlap_thresh, prior_for_matching,
    bkg_label, neg_mining, neg_pos, neg_overlap, encode_target)``.

    ``forward((loc (B, P, 4), conf (B, P, C), landm (B, P, 10)), priors (P, 4) cxcywh, targets)``
    with ``targets`` a list of ``B`` float tensors ``(n_i, 15)``: normalised box corners (4),
    landmarks (10), label (1 or -1) returns ``(loss_l, loss_c, loss_landm)``.
    """

    def native_loss(self) -> RetinaFaceLoss:
        return RetinaFaceLoss(
            self.num_classes, variances=VARIANCES, pos_iou=self.threshold, neg_pos_ratio=self.negpos_ratio,
            min_best_iou=IGNORE_GT_IOU, box_weight=1.0, cls_weight=1.0, landmark_weight=1.0,
            drop_degenerate_gt=False, ignored_gt_claims_prior=True,
        )

    def forward(self, predictions, priors, targets):
        loc_data, conf_data, landm_data = predictions
        require_tensor(loc_data, "loc_data")
        rows = split_targets(targets, 15, loc_data)
        labels = [t[:, 14] for t in rows]
        with joined_value_checks() as checks:  # read with the loss's own checks: one host read
            for i, label in enumerate(labels):
                checks.condition(
                    ~((label == 1) | (label == -1)).all(), f"targets[{i}][:, 14]", "labels",
                    lambda i=i, label=label: f"targets[{i}][:, 14]: expected labels 1 (face with landmarks) or -1 "
                    f"(face without landmarks), got {sorted(set(label.tolist()))}",
                )
            gt_boxes, has_landmarks, gt_valid, gt_landmarks = pad_ground_truth(
                [t[:, :4] for t in rows], [(label > 0).long() for label in labels], [t[:, 4:14] for t in rows],
                checks=checks,
            )
            if gt_landmarks.shape[-1] != 10:  # every image empty: no landmark columns to infer
                gt_landmarks = gt_boxes.new_zeros(gt_boxes.shape[0], gt_boxes.shape[1], 10)
            out = self.loss(
                loc_data, conf_data, landm_data, priors, gt_boxes, gt_landmarks, has_landmarks > 0, gt_valid
            )
        return out["loss_box"], out["loss_cls"], out["loss_landmark"]
