"""Faster R-CNN losses (Ren et al. 2015, arXiv:1506.01497): RPN and R-CNN heads, batched.

The targets (which anchors and proposals are positive, what they regress to) are built by
:func:`detloss.rpn_targets` and :func:`detloss.proposal_targets`
(:mod:`detloss.matching.rcnn_targets`); this module holds the loss.

Conventions (those of py-faster-rcnn / tf-faster-rcnn unless an option says otherwise):

* Boxes are xyxy pixels. ``pixel_offset=1.0`` selects the originals' inclusive-pixel
  convention (``w = x2 - x1 + 1``) in the IoU and in the box deltas; 0 (the default) is the
  continuous convention of torchvision / detectron2.
* Ground truth is padded: ``gt_boxes (B, M, 4)``, ``gt_valid (B, M)`` bool and, for the
  R-CNN head, ``gt_labels (B, M)`` int64 in ``[1, C - 1]``: **class 0 is background**, as in
  the originals (``num_classes`` C counts it).
* RPN labels: 1 object, 0 background, -1 ignored. RPN objectness logits are ``(B, A, 2)``
  ``[background, object]`` (2-way softmax, as the originals) or ``(B, A)`` (one sigmoid logit).
* R-CNN labels: the class (0 background) of each of the ``S`` sampled ROIs; -1 marks a slot
  that could not be filled (no foreground and no background candidate).

Terms (the paper's equation, with the originals' normalisers):

* ``loss_rpn_cls``: cross-entropy averaged over the sampled anchors of the batch;
* ``loss_rpn_box``: ``sum(outside * smoothL1_sigma(inside * (pred - target))) / B`` with
  sigma 3, inside weight 1 on sampled positives and outside weight ``1 / (number of sampled
  anchors of the image)`` on every sampled anchor (positive or negative);
* ``loss_cls``: cross-entropy averaged over the sampled ROIs;
* ``loss_box``: sigma-1 smooth L1 on the slot of the ROI's class, summed and divided by the
  number of sampled ROIs (not by the foreground count), targets normalised by stds
  (0.1, 0.1, 0.2, 0.2).

Differences from tf-faster-rcnn (each reachable by an option, used by
:mod:`detloss.compat.tf_faster_rcnn`): a GT that overlaps no anchor does not make every
non-overlapping anchor positive (``low_quality_zero_iou``); an image without GT gives all
negative anchors, zero box losses and an all-background ROI sample instead of an error; a ROI
sample with no candidate at all has its slots marked -1 instead of stopping in ``pdb``;
sampling uses a ``torch.Generator``, not NumPy's global RNG (same rules and counts, other
draws).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._validate import ValueChecks, require_floating, require_positive, require_shape
from ..boxes import compute_dtype
from ..functional import cross_entropy, inside_outside_smooth_l1, objectness_loss, positive_normalizer
from ..matching.rcnn_targets import (
    ImageSize, ProposalTargets, RPNTargets, queue_rpn_checks, rpn_targets_unchecked,
)


def rpn_loss(
    box_pred: Tensor, cls_logits: Tensor, targets: RPNTargets, *,
    sigma: Optional[float] = 3.0, beta: Optional[float] = None, distributed: bool = False,
) -> dict[str, Tensor]:
    """``loss_rpn_box`` and ``loss_rpn_cls`` of ``box_pred (B, A, 4)`` deltas and ``cls_logits
    (B, A, 2)`` or ``(B, A)`` against :class:`RPNTargets` (see module doc).

    ``distributed``: divide by the sampled-anchor count and the batch size all-reduced over
    processes (:func:`detloss.functional.positive_normalizer`), so DDP-averaged gradients
    equal the single-process ones on the global batch however the samples split."""
    require_floating(cls_logits, "cls_logits")
    dims = require_shape(targets.labels, "targets.labels", ("B", "A"))
    if cls_logits.shape != targets.labels.shape:
        require_shape(cls_logits, "cls_logits", ("B", "A", 2), dims)
    require_shape(box_pred, "box_pred", ("B", "A", 4), dims)
    box = inside_outside_smooth_l1(
        box_pred, targets.box_targets, targets.inside_weights, targets.outside_weights,
        sigma=None if beta is not None else sigma, beta=beta,
    )
    if not distributed:
        return {
            "loss_rpn_cls": objectness_loss(cls_logits, targets.labels),
            "loss_rpn_box": box.sum() / max(box_pred.shape[0], 1),
        }
    sampled = positive_normalizer((targets.labels >= 0).sum(), distributed=True)
    images = positive_normalizer(torch.full((), box_pred.shape[0], device=box_pred.device), distributed=True)
    return {
        "loss_rpn_cls": objectness_loss(cls_logits, targets.labels, sampled),
        "loss_rpn_box": box.sum() / images.to(box.dtype),
    }


def rcnn_loss(
    box_pred: Tensor, cls_logits: Tensor, targets: ProposalTargets, *,
    sigma: Optional[float] = 1.0, beta: Optional[float] = None, distributed: bool = False,
) -> dict[str, Tensor]:
    """``loss_cls`` and ``loss_box`` of ``box_pred (B, S, 4 * C)`` (class-specific) or ``(B, S, 4)``
    (class-agnostic) and ``cls_logits (B, S, C)`` against :class:`ProposalTargets` whose labels
    lie in ``[-1, C - 1]`` (:class:`RCNNLoss` checks them).

    ``distributed``: the sampled-ROI count is all-reduced over processes."""
    require_floating(cls_logits, "cls_logits")
    dims = require_shape(targets.labels, "targets.labels", ("B", "S"))
    num_classes = require_shape(cls_logits, "cls_logits", ("B", "S", "C"), dims)["C"]
    if box_pred.shape[-1] == 4 * num_classes and num_classes != 1:
        require_shape(box_pred, "box_pred", ("B", "S", 4 * num_classes), dims)
        index = (targets.labels.clamp(min=0) * 4).unsqueeze(-1) + torch.arange(4, device=box_pred.device)
        box_pred = box_pred.gather(-1, index)
    else:
        require_shape(box_pred, "box_pred", ("B", "S", 4), dims)
    fg = (targets.labels > 0).unsqueeze(-1).to(compute_dtype(box_pred)).expand_as(box_pred)
    box = inside_outside_smooth_l1(
        box_pred, targets.box_targets, fg, fg, sigma=None if beta is not None else sigma, beta=beta
    )
    if distributed:
        num_rois = positive_normalizer((targets.labels >= 0).sum(), distributed=True).to(box.dtype)
        loss_cls = cross_entropy(cls_logits, targets.labels, ignore_index=-1, reduction="sum", normalizer=num_rois)
    else:
        num_rois = (targets.labels >= 0).sum().clamp(min=1).to(box.dtype)
        loss_cls = cross_entropy(cls_logits, targets.labels, ignore_index=-1)
    return {"loss_cls": loss_cls, "loss_box": box.sum() / num_rois}


def queue_rcnn_label_check(cls_logits: Tensor, targets: ProposalTargets, checks: ValueChecks) -> None:
    """Queue the check that the sampled ROIs' classes index a column of ``cls_logits (B, S, C)``."""
    checks.in_range(targets.labels, "proposal_targets.labels", -1, cls_logits.shape[-1] - 1)


class RPNLoss(nn.Module):
    """RPN loss: anchor targets (:func:`detloss.rpn_targets`), then :func:`rpn_loss`.

    ``forward(box_pred (B, A, 4), cls_logits (B, A, 2) or (B, A), anchors (A, 4), gt_boxes
    (B, M, 4), gt_valid (B, M), image_size, *, generator=None, return_assignment=False)``
    returns ``loss_rpn_cls``, ``loss_rpn_box`` and ``loss`` (``box_weight * loss_rpn_box +
    cls_weight * loss_rpn_cls``), plus ``"assignment"`` (the :class:`RPNTargets`) when asked.
    Keyword options are those of :func:`detloss.rpn_targets`; ``sigma`` (3) or ``beta`` sets
    the smooth L1; ``distributed`` all-reduces the normalisers (see :func:`rpn_loss`).

    >>> anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    >>> gt_boxes, gt_valid = torch.tensor([[[0.0, 0.0, 10.0, 12.0]]]), torch.tensor([[True]])
    >>> out = RPNLoss(batch_size_per_image=4)(torch.zeros(1, 3, 4), torch.zeros(1, 3, 2), anchors, gt_boxes, gt_valid, (32, 32))
    >>> {k: round(float(v), 4) for k, v in out.items()}
    {'loss_rpn_cls': 0.6931, 'loss_rpn_box': 0.0573, 'loss': 0.7504}
    """

    def __init__(
        self, *, sigma: Optional[float] = 3.0, beta: Optional[float] = None, box_weight: float = 1.0,
        cls_weight: float = 1.0, distributed: bool = False, **target_options,
    ) -> None:
        super().__init__()
        self.sigma, self.beta, self.target_options = sigma, beta, target_options
        self.box_weight = require_positive(box_weight, "box_weight", allow_zero=True)
        self.cls_weight = require_positive(cls_weight, "cls_weight", allow_zero=True)
        self.distributed = bool(distributed)

    def forward(
        self, box_pred: Tensor, cls_logits: Tensor, anchors: Tensor, gt_boxes: Tensor,
        gt_valid: Tensor, image_size: ImageSize, *, generator: Optional[torch.Generator] = None,
        return_assignment: bool = False,
    ) -> dict:
        checks = ValueChecks()
        gt_valid = queue_rpn_checks(anchors, gt_boxes, gt_valid, checks)
        checks.run()
        return self.checked_forward(box_pred, cls_logits, anchors, gt_boxes, gt_valid, image_size,
                                    generator=generator, return_assignment=return_assignment)

    def checked_forward(
        self, box_pred: Tensor, cls_logits: Tensor, anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor,
        image_size: ImageSize, *, generator: Optional[torch.Generator], return_assignment: bool,
    ) -> dict:
        """:meth:`forward` after its value checks ran (``gt_valid`` a bool mask)."""
        targets = rpn_targets_unchecked(anchors, gt_boxes, gt_valid, image_size, generator=generator,
                                        **self.target_options)
        out = rpn_loss(box_pred, cls_logits, targets, sigma=self.sigma, beta=self.beta, distributed=self.distributed)
        out["loss"] = self.box_weight * out["loss_rpn_box"] + self.cls_weight * out["loss_rpn_cls"]
        if return_assignment:
            out["assignment"] = targets
        return out


class RCNNLoss(nn.Module):
    """R-CNN head loss on ROIs sampled by :func:`detloss.proposal_targets` (computed before the head).

    ``forward(box_pred (B, S, 4C) or (B, S, 4), cls_logits (B, S, C), targets)`` returns
    ``loss_cls``, ``loss_box`` and ``loss`` (``box_weight * loss_box + cls_weight * loss_cls``);
    ``distributed`` all-reduces the ROI count.

    >>> from detloss import proposal_targets
    >>> proposals = torch.tensor([[[0.0, 0.0, 10.0, 11.0], [12.0, 12.0, 20.0, 20.0]]])
    >>> gt_boxes, gt_labels, gt_valid = torch.tensor([[[0.0, 0.0, 10.0, 12.0]]]), torch.tensor([[1]]), torch.tensor([[True]])
    >>> t = proposal_targets(proposals, gt_boxes, gt_labels, gt_valid, num_samples=2, fg_fraction=0.5)
    >>> out = RCNNLoss()(torch.zeros(1, 2, 8), torch.zeros(1, 2, 2), t)  # 2 classes, class-specific boxes
    >>> {k: round(float(v), 4) for k, v in out.items()}
    {'loss_cls': 0.6931, 'loss_box': 0.099, 'loss': 0.7921}
    """

    def __init__(
        self, *, sigma: Optional[float] = 1.0, beta: Optional[float] = None, box_weight: float = 1.0,
        cls_weight: float = 1.0, distributed: bool = False,
    ) -> None:
        super().__init__()
        self.sigma, self.beta, self.distributed = sigma, beta, bool(distributed)
        self.box_weight = require_positive(box_weight, "box_weight", allow_zero=True)
        self.cls_weight = require_positive(cls_weight, "cls_weight", allow_zero=True)

    def forward(self, box_pred: Tensor, cls_logits: Tensor, targets: ProposalTargets) -> dict:
        checks = ValueChecks()
        queue_rcnn_label_check(cls_logits, targets, checks)
        checks.run()
        return self.checked_forward(box_pred, cls_logits, targets)

    def checked_forward(self, box_pred: Tensor, cls_logits: Tensor, targets: ProposalTargets) -> dict:
        """:meth:`forward` after its label check ran."""
        out = rcnn_loss(box_pred, cls_logits, targets, sigma=self.sigma, beta=self.beta, distributed=self.distributed)
        out["loss"] = self.box_weight * out["loss_box"] + self.cls_weight * out["loss_cls"]
        return out


class FasterRCNNLoss(nn.Module):
    """RPN + R-CNN: ``loss_rpn_cls``, ``loss_rpn_box``, ``loss_cls``, ``loss_box`` and ``loss``.

    ``forward(rpn_box_pred, rpn_cls_logits, anchors, gt_boxes, gt_valid, image_size,
    box_pred, cls_logits, proposal_targets, *, generator=None, return_assignment=False)``:
    the RPN part as :class:`RPNLoss`, the head part as :class:`RCNNLoss` on the
    :class:`ProposalTargets` the ROI sampler produced; their value checks run together (one
    host read). ``rpn_box_weight``, ``rpn_cls_weight``, ``box_weight`` and ``cls_weight``
    weight the four terms in ``loss`` (1 each, as the original).

    >>> from detloss import proposal_targets
    >>> anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    >>> proposals = torch.tensor([[[0.0, 0.0, 10.0, 11.0], [12.0, 12.0, 20.0, 20.0]]])
    >>> gt_boxes, gt_labels, gt_valid = torch.tensor([[[0.0, 0.0, 10.0, 12.0]]]), torch.tensor([[1]]), torch.tensor([[True]])
    >>> t = proposal_targets(proposals, gt_boxes, gt_labels, gt_valid, num_samples=2, fg_fraction=0.5)
    >>> loss = FasterRCNNLoss(batch_size_per_image=4, rpn_box_weight=2.0)
    >>> out = loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, 2), anchors, gt_boxes, gt_valid, (32, 32),
    ...            torch.zeros(1, 2, 8), torch.zeros(1, 2, 2), t)
    >>> {k: round(float(v), 4) for k, v in out.items()}
    {'loss_rpn_cls': 0.6931, 'loss_rpn_box': 0.0573, 'loss_cls': 0.6931, 'loss_box': 0.099, 'loss': 1.5998}
    """

    def __init__(
        self, *, rpn_sigma: Optional[float] = 3.0, rcnn_sigma: Optional[float] = 1.0,
        rpn_box_weight: float = 1.0, rpn_cls_weight: float = 1.0, box_weight: float = 1.0,
        cls_weight: float = 1.0, distributed: bool = False, **rpn_target_options,
    ) -> None:
        super().__init__()
        self.rpn = RPNLoss(
            sigma=rpn_sigma, box_weight=rpn_box_weight, cls_weight=rpn_cls_weight, distributed=distributed,
            **rpn_target_options,
        )
        self.rcnn = RCNNLoss(sigma=rcnn_sigma, box_weight=box_weight, cls_weight=cls_weight, distributed=distributed)

    def forward(
        self, rpn_box_pred: Tensor, rpn_cls_logits: Tensor, anchors: Tensor, gt_boxes: Tensor,
        gt_valid: Tensor, image_size: ImageSize, box_pred: Tensor, cls_logits: Tensor,
        proposal_targets: ProposalTargets, *, generator: Optional[torch.Generator] = None,
        return_assignment: bool = False,
    ) -> dict:
        checks = ValueChecks()
        gt_valid = queue_rpn_checks(anchors, gt_boxes, gt_valid, checks)
        queue_rcnn_label_check(cls_logits, proposal_targets, checks)
        checks.run()
        rpn = self.rpn.checked_forward(rpn_box_pred, rpn_cls_logits, anchors, gt_boxes, gt_valid, image_size,
                                       generator=generator, return_assignment=return_assignment)
        head = self.rcnn.checked_forward(box_pred, cls_logits, proposal_targets)
        out = {"loss_rpn_cls": rpn["loss_rpn_cls"], "loss_rpn_box": rpn["loss_rpn_box"],
               "loss_cls": head["loss_cls"], "loss_box": head["loss_box"]}
        out["loss"] = (
            self.rpn.cls_weight * out["loss_rpn_cls"] + self.rpn.box_weight * out["loss_rpn_box"]
            + self.rcnn.cls_weight * out["loss_cls"] + self.rcnn.box_weight * out["loss_box"]
        )
        if return_assignment:
            out["assignment"] = rpn["assignment"]
        return out
