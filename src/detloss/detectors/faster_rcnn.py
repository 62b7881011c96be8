"""Faster R-CNN losses (Ren et al. 2015, arXiv:1506.01497): RPN and R-CNN heads, batched.

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

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._constants import device_constant
from .._validate import (
    ValueChecks, as_bool_mask, require_boxes, require_floating, require_padded_gt, require_positive, require_range,
    require_same_shape, require_shape,
)
from ..boxes import compute_dtype, pair_dtype
from ..coders import encode_deltas
from ..functional import binary_cross_entropy_with_logits, cross_entropy, positive_normalizer, smooth_l1_loss
from ..matching.max_iou import gather_boxes, max_iou_match_unchecked
from ..sampling.balanced import sample_balanced
from ..targets import one_hot

RCNN_STDS = (0.1, 0.1, 0.2, 0.2)
ImageSize = Union[Tensor, Sequence[float]]


# --------------------------------------------------------------------------- RPN targets
@dataclass
class RPNTargets:
    """Anchor targets of the RPN (all ``(B, A, ...)``, ``A`` anchors in the anchors' order).

    Attributes:
        labels: ``(B, A)`` int64 after sampling: 1, 0, -1 (ignored / not sampled).
        presample_labels: ``(B, A)`` int64 before sampling.
        box_targets: ``(B, A, 4)`` deltas of every inside anchor to its best GT (0 outside
            the image and in images without GT).
        inside_weights, outside_weights: ``(B, A, 4)`` smooth-L1 weights (see module doc).
        matched_gt: ``(B, A)`` int64 best GT index; ``max_iou``: ``(B, A)`` its IoU.
        inside: ``(B, A)`` bool, anchors inside the image (with the border allowance).
    """

    labels: Tensor
    presample_labels: Tensor
    box_targets: Tensor
    inside_weights: Tensor
    outside_weights: Tensor
    matched_gt: Tensor
    max_iou: Tensor
    inside: Tensor


def _image_hw(image_size: ImageSize, batch: int, ref: Tensor) -> Tensor:
    """``(B, 2)`` (height, width) from ``(h, w)``, ``im_info`` ``(h, w, scale)`` or ``(B, 2 or 3)``."""
    size = device_constant(image_size, dtype=ref.dtype, device=ref.device)
    if size.dim() == 1:
        size = size.unsqueeze(0).expand(batch, -1)
    if size.dim() != 2 or size.shape[-1] not in (2, 3) or size.shape[0] != batch:
        raise ValueError(
            f"image_size: expected (height, width) or shape (B={batch}, 2), got {tuple(size.shape)}"
        )
    return size[:, :2]


def rpn_targets(
    anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, image_size: ImageSize, *,
    # matcher
    pos_iou: float = 0.7, neg_iou: float = 0.3, clobber_positives: bool = False,
    low_quality_zero_iou: bool = False, allowed_border: float = 0.0, chunk_size: Optional[int] = None,
    # sampler and weights
    batch_size_per_image: int = 256, positive_fraction: float = 0.5, positive_weight: Optional[float] = None,
    inside_weight: Sequence[float] = (1.0, 1.0, 1.0, 1.0), generator: Optional[torch.Generator] = None,
    # delta coder
    means: Optional[Sequence[float]] = None, stds: Optional[Sequence[float]] = None, pixel_offset: float = 0.0,
) -> RPNTargets:
    """Label, sample and encode RPN anchors for a batch (tf-faster-rcnn's anchor_target_layer).

    Args:
        anchors: ``(A, 4)`` xyxy pixels (e.g. :func:`detloss.rcnn_anchors`).
        gt_boxes: ``(B, M, 4)`` xyxy pixels; ``gt_valid``: ``(B, M)`` bool.
        image_size: ``(height, width)`` or a ``(B, 2)`` tensor of them (``im_info[:2]``).
        pos_iou, neg_iou, clobber_positives, low_quality_zero_iou: see
            :func:`detloss.matching.max_iou.max_iou_match` (ties of each GT's best IoU are
            positive).
        allowed_border: anchors with ``x1 >= -b``, ``y1 >= -b``, ``x2 < w + b``, ``y2 < h + b``
            are labelled; the others are -1 with zero targets and weights.
        batch_size_per_image, positive_fraction, generator: the balanced sampler.
        positive_weight: None (outside weight ``1 / sampled`` for all) or ``p`` in (0, 1):
            ``p / positives`` and ``(1 - p) / negatives`` (``RPN_POSITIVE_WEIGHT``).
        inside_weight: the 4 inside weights of positives.
        means, stds, pixel_offset: the delta coder (:func:`detloss.encode_deltas`).

    Returns:
        :class:`RPNTargets`; box tensors in the compute dtype of ``anchors``.
    """
    require_boxes(anchors, "anchors", ndim=2)
    checks = ValueChecks().finite(anchors, "anchors")
    dims, gt_valid = require_padded_gt(gt_boxes, gt_valid, checks=checks)
    checks.run()
    batch = dims["B"]
    dtype = pair_dtype(anchors, gt_boxes)
    anchors, gt_boxes = anchors.to(dtype), gt_boxes.to(dtype)
    hw = _image_hw(image_size, batch, anchors)
    border = float(allowed_border)
    inside = (
        (anchors[None, :, 0] >= -border)
        & (anchors[None, :, 1] >= -border)
        & (anchors[None, :, 2] < hw[:, 1:2] + border)
        & (anchors[None, :, 3] < hw[:, 0:1] + border)
    )
    match = max_iou_match_unchecked(
        anchors, gt_boxes, gt_valid,
        pos_iou=pos_iou, neg_iou=neg_iou, allow_low_quality=True,
        low_quality_zero_iou=low_quality_zero_iou, clobber_positives=clobber_positives,
        anchor_valid=inside, pixel_offset=pixel_offset, chunk_size=chunk_size,
    )
    labels = sample_balanced(match.labels, batch_size_per_image, positive_fraction, generator)

    has_gt = gt_valid.any(dim=1, keepdim=True)
    matched_boxes = gather_boxes(gt_boxes, match.matched_gt, anchors)  # M = 0: zeroed below (no GT)
    deltas = encode_deltas(
        matched_boxes, anchors.unsqueeze(0).expand_as(matched_boxes),
        means=means, stds=stds, pixel_offset=pixel_offset,
    )
    box_targets = torch.where((inside & has_gt).unsqueeze(-1), deltas, deltas.new_zeros(()))

    pos, neg = labels == 1, labels == 0
    inside_w = device_constant(inside_weight, dtype=dtype, device=anchors.device)
    inside_weights = torch.where(pos.unsqueeze(-1), inside_w, inside_w.new_zeros(()))
    num_pos = pos.sum(dim=1, keepdim=True).to(dtype)
    num_neg = neg.sum(dim=1, keepdim=True).to(dtype)
    if positive_weight is None:
        per_example = 1.0 / (num_pos + num_neg).clamp(min=1)
        pos_w, neg_w = per_example, per_example
    else:
        if not 0.0 < positive_weight < 1.0:
            raise ValueError(f"positive_weight: expected a value in (0, 1) or None, got {positive_weight}")
        pos_w = positive_weight / num_pos.clamp(min=1)
        neg_w = (1.0 - positive_weight) / num_neg.clamp(min=1)
    outside = torch.where(pos, pos_w, torch.where(neg, neg_w, torch.zeros((), dtype=dtype, device=anchors.device)))
    outside_weights = outside.unsqueeze(-1).expand(-1, -1, 4)
    return RPNTargets(
        labels=labels, presample_labels=match.labels, box_targets=box_targets,
        inside_weights=inside_weights, outside_weights=outside_weights,
        matched_gt=match.matched_gt, max_iou=match.max_iou, inside=inside,
    )


# ------------------------------------------------------------------- proposal targets
@dataclass
class ProposalTargets:
    """Sampled ROIs and their R-CNN targets, ``S`` slots per image (foreground first).

    Attributes:
        rois: ``(B, S, 4)`` xyxy pixels of the sampled proposals.
        roi_index: ``(B, S)`` int64 index into the proposals (GT rows appended after them
            when ``append_gt``).
        labels: ``(B, S)`` int64 class (0 background, -1 unfilled slot).
        box_targets: ``(B, S, 4)`` normalised deltas to the matched GT (0 unless foreground).
        matched_gt: ``(B, S)`` int64; ``max_iou``: ``(B, S)``.
        num_fg: ``(B,)`` int64 foreground slots per image.
    """

    rois: Tensor
    roi_index: Tensor
    labels: Tensor
    box_targets: Tensor
    matched_gt: Tensor
    max_iou: Tensor
    num_fg: Tensor

    def class_specific(
        self, num_classes: int, inside_weight: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The originals' ``(B, S, 4 * C)`` layout: targets, inside and outside weights.

        Each foreground ROI's 4 targets sit in columns ``4 * label .. 4 * label + 3``; the
        inside weight is ``inside_weight`` there, the outside weight ``inside > 0``.
        """
        slot = one_hot(self.labels.clamp(min=0), num_classes)
        slot = (slot * (self.labels > 0).unsqueeze(-1)).to(self.box_targets.dtype)  # (B, S, C)
        targets = (slot.unsqueeze(-1) * self.box_targets.unsqueeze(-2)).flatten(-2)
        w = device_constant(inside_weight, dtype=self.box_targets.dtype, device=slot.device)
        inside = (slot.unsqueeze(-1) * w).flatten(-2)
        return targets, inside, (inside > 0).to(inside.dtype)


def proposal_targets(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor,
    proposals_valid: Optional[Tensor] = None, *,
    # sampler
    num_samples: int = 128, fg_fraction: float = 0.25, pos_iou: float = 0.5, neg_iou: float = 0.5,
    neg_iou_min: float = 0.0, append_gt: bool = False, generator: Optional[torch.Generator] = None,
    # delta coder and label check
    means: Optional[Sequence[float]] = None, stds: Optional[Sequence[float]] = RCNN_STDS,
    pixel_offset: float = 0.0, num_classes: Optional[int] = None,
) -> ProposalTargets:
    """Sample ``num_samples`` ROIs per image and build their targets (proposal_target_layer).

    Foreground: best IoU ``>= pos_iou``; background: ``neg_iou_min <= IoU < neg_iou`` (the
    originals' ``FG_THRESH``, ``BG_THRESH_LO``, ``BG_THRESH_HI``). With
    both kinds present, ``min(round(num_samples * fg_fraction), #fg)`` foreground ROIs are
    drawn without replacement and background fills the rest (with replacement if there are
    too few); with only one kind, all ``num_samples`` slots are drawn from it (with
    replacement if there are too few). Output order: foreground, then background.

    Args:
        proposals: ``(B, N, 4)`` xyxy pixels; ``proposals_valid``: optional ``(B, N)`` bool.
        gt_boxes: ``(B, M, 4)``; ``gt_labels``: ``(B, M)`` int in ``[1, C - 1]``;
            ``gt_valid``: ``(B, M)`` bool.
        append_gt: add the valid GT boxes to the candidates (``USE_GT``).
        means, stds, pixel_offset: the delta coder; targets are ``(delta - means) / stds``.
        num_classes: if given, ``gt_labels`` of valid rows are checked to lie in [1, C - 1].
        generator: ``torch.Generator`` for the draws.

    Returns:
        :class:`ProposalTargets` with ``S = num_samples``.

    >>> proposals = torch.tensor([[[0.0, 0.0, 10.0, 11.0], [12.0, 12.0, 20.0, 20.0]]])
    >>> gt_boxes, gt_labels, gt_valid = torch.tensor([[[0.0, 0.0, 10.0, 12.0]]]), torch.tensor([[1]]), torch.tensor([[True]])
    >>> t = proposal_targets(proposals, gt_boxes, gt_labels, gt_valid, num_samples=2, fg_fraction=0.5)
    >>> t.labels, t.max_iou
    (tensor([[1, 0]]), tensor([[0.9167, 0.0000]]))
    """
    require_boxes(proposals, "proposals", ndim=3)
    dims = require_shape(proposals, "proposals", ("B", "N", 4))
    label_range = None if num_classes is None else (1, num_classes - 1)
    checks = ValueChecks().finite(proposals, "proposals")
    dims, gt_valid = require_padded_gt(gt_boxes, gt_valid, gt_labels, checks=checks, dims=dims, label_range=label_range)
    checks.run()
    batch = dims["B"]
    if proposals_valid is None:
        proposals_valid = torch.ones(proposals.shape[:2], dtype=torch.bool, device=proposals.device)
    else:
        proposals_valid = as_bool_mask(proposals_valid, "proposals_valid")
        require_shape(proposals_valid, "proposals_valid", ("B", "N"), dims)
    dtype = pair_dtype(proposals, gt_boxes)
    candidates, gt_boxes = proposals.to(dtype), gt_boxes.to(dtype)
    if append_gt:
        candidates = torch.cat((candidates, gt_boxes), dim=1)
        proposals_valid = torch.cat((proposals_valid, gt_valid), dim=1)
    if candidates.shape[1] == 0:  # a static shape: one invalid dummy keeps gathers in range
        candidates = candidates.new_zeros(batch, 1, 4)
        proposals_valid = proposals_valid.new_zeros(batch, 1)

    match = max_iou_match_unchecked(
        candidates, gt_boxes, gt_valid, pos_iou=pos_iou, neg_iou=neg_iou,
        allow_low_quality=False, anchor_valid=proposals_valid, pixel_offset=pixel_offset,
    )
    fg = proposals_valid & (match.max_iou >= pos_iou)
    bg = proposals_valid & (match.max_iou < neg_iou) & (match.max_iou >= neg_iou_min) & ~fg
    roi_index, num_fg, filled = _sample_rois(fg, bg, num_samples, fg_fraction, generator)

    is_fg = torch.arange(num_samples, device=fg.device) < num_fg.unsqueeze(1)
    matched_gt = match.matched_gt.gather(1, roi_index)
    rois = gather_boxes(candidates, roi_index, candidates)
    labels = gt_labels.gather(1, matched_gt) if gt_labels.shape[1] else matched_gt
    labels = torch.where(is_fg, labels, 0)
    labels = torch.where(filled, labels, -1).to(torch.int64)
    deltas = encode_deltas(
        gather_boxes(gt_boxes, matched_gt, rois), rois,
        means=means, stds=stds, pixel_offset=pixel_offset,
    )
    box_targets = torch.where((is_fg & filled).unsqueeze(-1), deltas, deltas.new_zeros(()))
    return ProposalTargets(
        rois=rois, roi_index=roi_index, labels=labels, box_targets=box_targets,
        matched_gt=matched_gt, max_iou=match.max_iou.gather(1, roi_index), num_fg=num_fg,
    )


def _sample_rois(
    fg: Tensor, bg: Tensor, num_samples: int, fg_fraction: float, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor, Tensor]:
    """Fixed-size fg/bg draw per image; returns ``(index (B, S), num_fg (B,), filled (B, S))``.

    Candidates are put in random order (fg first, then bg, via sorted random keys); a slot
    without replacement takes the next candidate of its kind, a slot with replacement a
    uniformly random one of its kind.
    """
    batch, n = fg.shape
    keys = torch.rand((batch, n), generator=generator, device=fg.device)
    keys = torch.where(fg, keys, torch.where(bg, keys + 1.0, keys.new_full((), 3.0)))
    order = torch.argsort(keys, dim=1)
    n_fg, n_bg = fg.sum(dim=1), bg.sum(dim=1)
    quota = int(round(num_samples * fg_fraction))
    num_fg = torch.where(n_bg > 0, n_fg.clamp(max=quota), torch.where(n_fg > 0, num_samples, 0))
    slot = torch.arange(num_samples, device=fg.device).unsqueeze(0)
    draw = torch.rand((batch, num_samples), generator=generator, device=fg.device)
    is_fg = slot < num_fg.unsqueeze(1)

    def random_pick(count: Tensor) -> Tensor:
        c = count.unsqueeze(1)
        return torch.minimum((draw * c).long(), (c - 1).clamp(min=0))

    replace_fg = ((n_bg == 0) & (n_fg < num_samples)).unsqueeze(1)
    pos_fg = torch.where(replace_fg, random_pick(n_fg), slot)
    bg_slot = slot - num_fg.unsqueeze(1)
    replace_bg = (n_bg < num_samples - num_fg).unsqueeze(1)
    pos_bg = n_fg.unsqueeze(1) + torch.where(replace_bg, random_pick(n_bg), bg_slot)
    position = torch.where(is_fg, pos_fg, pos_bg).clamp(0, n - 1)
    filled = torch.where(is_fg, (n_fg > 0).unsqueeze(1), (n_bg > 0).unsqueeze(1))
    return order.gather(1, position), num_fg, filled


# ---------------------------------------------------------------------------- losses
def inside_outside_smooth_l1(
    pred: Tensor, target: Tensor, inside_weight: Tensor, outside_weight: Tensor, *,
    sigma: Optional[float] = None, beta: Optional[float] = None,
) -> Tensor:
    """Element-wise ``outside * smoothL1(inside * (pred - target))`` (Faster R-CNN's form).

    All four tensors have the same shape ``(...)``; give ``sigma`` (``beta = 1 / sigma**2``)
    or ``beta``. Computed in float32 for half inputs. Returns the unreduced ``(...)`` loss.
    """
    require_floating(pred, "pred")
    for name, t in (("target", target), ("inside_weight", inside_weight), ("outside_weight", outside_weight)):
        require_same_shape(t, name, pred, "pred")
    diff = inside_weight * (pred.to(compute_dtype(pred)) - target)
    return smooth_l1_loss(
        diff, torch.zeros_like(diff), beta, sigma=sigma, weight=outside_weight, reduction="none"
    )


def objectness_loss(cls_logits: Tensor, labels: Tensor, normalizer: Optional[Tensor] = None) -> Tensor:
    """Mean objectness cross-entropy over the anchors with ``labels (B, A)`` >= 0.

    ``cls_logits`` is ``(B, A, 2)`` ``[background, object]`` (softmax) or ``(B, A)`` (sigmoid).
    With ``normalizer`` the sum is divided by it instead (the all-reduced sample count).
    """
    require_range(labels, "labels", -1, 1)
    reduction = "mean" if normalizer is None else "sum"
    if cls_logits.shape == labels.shape:
        keep = (labels >= 0).to(compute_dtype(cls_logits))
        return binary_cross_entropy_with_logits(
            cls_logits, labels.clamp(min=0).to(keep.dtype), weight=keep, reduction=reduction, normalizer=normalizer
        )
    return cross_entropy(cls_logits, labels, ignore_index=-1, reduction=reduction, normalizer=normalizer)


def rpn_loss(
    cls_logits: Tensor, box_pred: Tensor, targets: RPNTargets, *,
    sigma: Optional[float] = 3.0, beta: Optional[float] = None, distributed: bool = False,
) -> dict[str, Tensor]:
    """``loss_rpn_cls`` and ``loss_rpn_box`` of ``cls_logits (B, A, 2)`` or ``(B, A)`` and
    ``box_pred (B, A, 4)`` deltas against :class:`RPNTargets` (see module doc).

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
    cls_logits: Tensor, box_pred: Tensor, targets: ProposalTargets, *,
    sigma: Optional[float] = 1.0, beta: Optional[float] = None, distributed: bool = False,
) -> dict[str, Tensor]:
    """``loss_cls`` and ``loss_box`` of ``cls_logits (B, S, C)`` and ``box_pred (B, S, 4 * C)``
    (class-specific) or ``(B, S, 4)`` (class-agnostic) against :class:`ProposalTargets`.

    ``distributed``: the sampled-ROI count is all-reduced over processes."""
    require_floating(cls_logits, "cls_logits")
    dims = require_shape(targets.labels, "targets.labels", ("B", "S"))
    dims = require_shape(cls_logits, "cls_logits", ("B", "S", "C"), dims)
    num_classes = dims["C"]
    if box_pred.shape[-1] == 4 * num_classes and num_classes != 1:
        require_shape(box_pred, "box_pred", ("B", "S", 4 * num_classes), dims)
        index = (targets.labels.clamp(min=0) * 4).unsqueeze(-1) + torch.arange(4, device=box_pred.device)
        box_pred = box_pred.gather(-1, index)
    else:
        require_shape(box_pred, "box_pred", ("B", "S", 4), dims)
    require_range(targets.labels, "targets.labels", -1, num_classes - 1)
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


class RPNLoss(nn.Module):
    """RPN loss: anchor targets (:func:`rpn_targets`), then :func:`rpn_loss`.

    ``forward(cls_logits (B, A, 2) or (B, A), box_pred (B, A, 4), anchors (A, 4), gt_boxes
    (B, M, 4), gt_valid (B, M), image_size, *, generator=None, return_assignment=False)``
    returns ``loss_rpn_cls``, ``loss_rpn_box`` and ``loss`` (``box_weight * loss_rpn_box +
    cls_weight * loss_rpn_cls``), plus ``"assignment"`` (the :class:`RPNTargets`) when asked.
    Keyword options are those of :func:`rpn_targets`; ``sigma`` (3) or ``beta`` sets the smooth
    L1; ``distributed`` all-reduces the normalisers (see :func:`rpn_loss`).

    >>> anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    >>> gt_boxes, gt_valid = torch.tensor([[[0.0, 0.0, 10.0, 12.0]]]), torch.tensor([[True]])
    >>> out = RPNLoss(batch_size_per_image=4)(torch.zeros(1, 3, 2), torch.zeros(1, 3, 4), anchors, gt_boxes, gt_valid, (32, 32))
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
        self, cls_logits: Tensor, box_pred: Tensor, anchors: Tensor, gt_boxes: Tensor,
        gt_valid: Tensor, image_size: ImageSize, *, generator: Optional[torch.Generator] = None,
        return_assignment: bool = False,
    ) -> dict:
        targets = rpn_targets(anchors, gt_boxes, gt_valid, image_size, generator=generator, **self.target_options)
        out = rpn_loss(cls_logits, box_pred, targets, sigma=self.sigma, beta=self.beta, distributed=self.distributed)
        out["loss"] = self.box_weight * out["loss_rpn_box"] + self.cls_weight * out["loss_rpn_cls"]
        if return_assignment:
            out["assignment"] = targets
        return out


class RCNNLoss(nn.Module):
    """R-CNN head loss on ROIs sampled by :func:`proposal_targets` (computed before the head).

    ``forward(cls_logits (B, S, C), box_pred (B, S, 4C) or (B, S, 4), targets)`` returns
    ``loss_cls``, ``loss_box`` and ``loss`` (``box_weight * loss_box + cls_weight * loss_cls``);
    ``distributed`` all-reduces the ROI count.

    >>> proposals = torch.tensor([[[0.0, 0.0, 10.0, 11.0], [12.0, 12.0, 20.0, 20.0]]])
    >>> gt_boxes, gt_labels, gt_valid = torch.tensor([[[0.0, 0.0, 10.0, 12.0]]]), torch.tensor([[1]]), torch.tensor([[True]])
    >>> t = proposal_targets(proposals, gt_boxes, gt_labels, gt_valid, num_samples=2, fg_fraction=0.5)
    >>> out = RCNNLoss()(torch.zeros(1, 2, 2), torch.zeros(1, 2, 8), t)  # 2 classes, class-specific boxes
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

    def forward(self, cls_logits: Tensor, box_pred: Tensor, targets: ProposalTargets) -> dict:
        out = rcnn_loss(cls_logits, box_pred, targets, sigma=self.sigma, beta=self.beta, distributed=self.distributed)
        out["loss"] = self.box_weight * out["loss_box"] + self.cls_weight * out["loss_cls"]
        return out


class FasterRCNNLoss(nn.Module):
    """RPN + R-CNN: ``loss_rpn_cls``, ``loss_rpn_box``, ``loss_cls``, ``loss_box`` and ``loss``.

    ``forward(rpn_cls_logits, rpn_box_pred, anchors, gt_boxes, gt_valid, image_size,
    cls_logits, box_pred, proposal_targets, *, generator=None, return_assignment=False)``:
    the RPN part as :class:`RPNLoss`, the head part as :class:`RCNNLoss` on the
    :class:`ProposalTargets` the ROI sampler produced. ``rpn_box_weight``, ``rpn_cls_weight``,
    ``box_weight`` and ``cls_weight`` weight the four terms in ``loss`` (1 each, as the original).

    >>> anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    >>> proposals = torch.tensor([[[0.0, 0.0, 10.0, 11.0], [12.0, 12.0, 20.0, 20.0]]])
    >>> gt_boxes, gt_labels, gt_valid = torch.tensor([[[0.0, 0.0, 10.0, 12.0]]]), torch.tensor([[1]]), torch.tensor([[True]])
    >>> t = proposal_targets(proposals, gt_boxes, gt_labels, gt_valid, num_samples=2, fg_fraction=0.5)
    >>> loss = FasterRCNNLoss(batch_size_per_image=4, rpn_box_weight=2.0)
    >>> out = loss(torch.zeros(1, 3, 2), torch.zeros(1, 3, 4), anchors, gt_boxes, gt_valid, (32, 32),
    ...            torch.zeros(1, 2, 2), torch.zeros(1, 2, 8), t)
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
        self, rpn_cls_logits: Tensor, rpn_box_pred: Tensor, anchors: Tensor, gt_boxes: Tensor,
        gt_valid: Tensor, image_size: ImageSize, cls_logits: Tensor, box_pred: Tensor,
        proposal_targets: ProposalTargets, *, generator: Optional[torch.Generator] = None,
        return_assignment: bool = False,
    ) -> dict:
        rpn = self.rpn(rpn_cls_logits, rpn_box_pred, anchors, gt_boxes, gt_valid, image_size,
                       generator=generator, return_assignment=return_assignment)
        head = self.rcnn(cls_logits, box_pred, proposal_targets)
        out = {"loss_rpn_cls": rpn["loss_rpn_cls"], "loss_rpn_box": rpn["loss_rpn_box"],
               "loss_cls": head["loss_cls"], "loss_box": head["loss_box"]}
        out["loss"] = (
            self.rpn.cls_weight * out["loss_rpn_cls"] + self.rpn.box_weight * out["loss_rpn_box"]
            + self.rcnn.cls_weight * out["loss_cls"] + self.rcnn.box_weight * out["loss_box"]
        )
        if return_assignment:
            out["assignment"] = rpn["assignment"]
        return out
