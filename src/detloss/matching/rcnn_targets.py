"""Faster R-CNN's targets (Ren et al. 2015, arXiv:1506.01497): which anchors and proposals are
positive, and what each regresses to, batched on padded ground truth.

* :func:`rpn_targets` (tf-faster-rcnn's ``anchor_target_layer``): max-IoU labels of the anchors
  inside the image, balanced sampling to ``batch_size_per_image``, delta targets and the
  inside / outside smooth-L1 weights.
* :func:`proposal_targets` (``proposal_target_layer``): a fixed-size fg / bg sample of the
  proposals, their classes (0 background) and normalised delta targets.

Conventions are those of :mod:`detloss.detectors.faster_rcnn` (xyxy pixels, ``pixel_offset``,
class 0 background).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .._constants import device_constant
from .._validate import ValueChecks, as_bool_mask, require_boxes, require_padded_gt, require_shape
from ..boxes import pair_dtype
from ..coders import encode_deltas
from ..sampling.balanced import sample_balanced_unchecked, sample_rois
from ..targets import one_hot
from .max_iou import gather_boxes, max_iou_match_unchecked

RCNN_STDS = (0.1, 0.1, 0.2, 0.2)  # the R-CNN head's delta target scale (BBOX_NORMALIZE_STDS)
ImageSize = Union[Tensor, Sequence[float]]


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


def image_hw(image_size: ImageSize, batch: int, ref: Tensor) -> Tensor:
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
    checks = ValueChecks()
    gt_valid = queue_rpn_checks(anchors, gt_boxes, gt_valid, checks)
    checks.run()
    return rpn_targets_unchecked(
        anchors, gt_boxes, gt_valid, image_size, pos_iou=pos_iou, neg_iou=neg_iou,
        clobber_positives=clobber_positives, low_quality_zero_iou=low_quality_zero_iou,
        allowed_border=allowed_border, chunk_size=chunk_size, batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction, positive_weight=positive_weight, inside_weight=inside_weight,
        generator=generator, means=means, stds=stds, pixel_offset=pixel_offset,
    )


def queue_rpn_checks(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, checks: ValueChecks) -> Tensor:
    """Metadata checks of the RPN inputs now, their value checks queued on ``checks`` (anchors
    finite; the padded GT, see :func:`detloss._validate.require_padded_gt`); returns ``gt_valid``
    as a bool mask."""
    require_boxes(anchors, "anchors", ndim=2)
    checks.finite(anchors, "anchors")
    return require_padded_gt(gt_boxes, gt_valid, checks=checks)[1]


def rpn_targets_unchecked(
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
    """:func:`rpn_targets` on inputs whose checks already ran (:func:`queue_rpn_checks`)."""
    batch = gt_boxes.shape[0]
    dtype = pair_dtype(anchors, gt_boxes)
    anchors, gt_boxes = anchors.to(dtype), gt_boxes.to(dtype)
    hw = image_hw(image_size, batch, anchors)
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
    labels = sample_balanced_unchecked(match.labels, batch_size_per_image, positive_fraction, generator)

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
    roi_index, num_fg, filled = sample_rois(fg, bg, num_samples, fg_fraction, generator)

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
