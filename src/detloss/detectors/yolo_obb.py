"""Oriented-box YOLO loss (YOLOv8-OBB / YOLO11-OBB / YOLO26-OBB): rotated task-aligned assignment,
BCE against soft scores, ProbIoU, DFL and an angle term (ProbIoU arXiv:2106.06072, TOOD
arXiv:2108.07755, GFL arXiv:2006.04388).

With ``tss = max(sum of the target scores, 1)`` (all-reduced with ``distributed=True``):

1. **Decode**: ``(l, t, r, b)`` distances (grid units; the expectation of each side's
   distribution, or the raw values with ``reg_max = 1``) measured in the box's own frame, which
   is rotated by the predicted angle ``angle_pred`` (radians): the box is
   ``centre = anchor + R(angle) ((r - l) / 2, (b - t) / 2)``, ``w = l + r``, ``h = t + b``.
2. **Drop tiny objects**: a valid GT narrower or lower than ``min_object_size`` pixels (2, as
   ultralytics) is treated as padding.
3. **Assign** with :func:`detloss.matching.task_aligned.match_rotated_task_aligned` (ProbIoU,
   anchor centre inside the rotated box) on the detached probabilities and pixel boxes.
4. **Classes**: ``sum BCE(cls_logits, soft scores) / tss``.
5. **Box**: ``sum over foreground of (1 - ProbIoU(pred, target)) * w / tss`` in grid units,
   ``w`` = the anchor's soft score; both Gaussians get ``box_variance`` (0.01 grid units squared)
   added to their variances.
6. **DFL**: the target distances in the *target* box's frame, ``l = w/2 - x'``, ``t = h/2 - y'``,
   ``r = w/2 + x'``, ``b = h/2 + y'`` with ``(x', y') = R(-angle)(centre - anchor)``, clamped to
   ``[0, dfl_max_target]``; the DFL averaged over the sides times ``w``, ``/ tss``. With
   ``reg_max = 1``: L1 between predicted and target distances, in pixels divided by the image
   width (l, r) or height (t, b), averaged over the sides, times ``w``, ``/ tss``.
7. **Angle**: ``sum over foreground of sin^2(2 (angle_pred - angle_gt)) * exp(-ln(w/h)^2 / 9) * w
   / tss``: zero when the angles agree modulo ``pi / 2``, and weighted down for near-square
   boxes only through ``exp(-ln(w/h)^2 / 9)`` being near 1 there (the ProbIoU term carries no
   angle information for a square, the angle term keeps the head's angle well defined).
8. ``loss = box_weight * box + cls_weight * cls + dfl_weight * dfl + angle_weight * angle``
   (7.5, 0.5, 1.5, 1.0).

Execution strategies (:mod:`detloss.strategy`): the dense form computes steps 5-7 on every
anchor (background rows weighted 0); on CPU tensors in eager mode (``"auto"`` / ``"gathered"``)
they run on the foreground rows only (one host read of their count), so the distributions of
the background anchors get no backward pass (-66 % / -80 % of the step at 10 / 100 objects per
image, batch 4, 1024 px: ``benchmarks/README.md``). Both forms give the same values up to
summation order.

Conventions: ``anchor_points (A, 2)`` pixel centres and ``anchor_strides (A,)``, ``gt_boxes (B, M,
5)`` ``(cx, cy, w, h, angle)`` pixels and radians, ``gt_labels (B, M)`` in ``[0, C-1]``,
``gt_valid (B, M)`` bool. Ground truth is checked (finite, sizes >= 0, labels in range) in one
host read; predictions never are (a NaN angle gives a NaN loss).

Differences from ultralytics by default (restored by :mod:`detloss.compat.ultralytics`): the
DFL target clamp is ``reg_max - 1`` (ultralytics ``reg_max - 1.01``), zero-metric anchors are
never foreground (no loss changes), ``distributed=True`` all-reduces the normaliser.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._constants import device_constant
from .._validate import ValueChecks, require_floating, require_padded_gt, require_positive, require_shape
from ..boxes import compute_dtype
from ..functional import binary_cross_entropy_with_logits, positive_normalizer, weighted_reduce
from ..functional.distribution import distribution_focal_unchecked
from ..matching.task_aligned import match_task_aligned_unchecked
from ..rotated_boxes import gaussian_terms, probiou_from_terms, require_rotated_boxes
from ..strategy import host_sync_is_free
from .yolov8 import YOLOv8Loss, _check_image_size, decode_distances

__all__ = ["YOLOOBBLoss", "decode_rotated", "rotated_distances"]

ANGLE_ASPECT_SCALE = 3.0


def decode_rotated(dist: Tensor, angle: Tensor, grid: Tensor) -> Tensor:
    """``dist (..., 4)`` distances ``(l, t, r, b)`` in the box frame, ``angle (...)`` radians and
    anchors ``grid`` (broadcastable to ``(..., 2)``) -> ``(..., 5)`` xywhr boxes (same units as
    ``dist`` and ``grid``)."""
    lt, rb = dist[..., :2], dist[..., 2:]
    half = (rb - lt) / 2  # (B, A, 2) centre offset in the box frame
    cos, sin = torch.cos(angle), torch.sin(angle)
    x = half[..., 0] * cos - half[..., 1] * sin
    y = half[..., 0] * sin + half[..., 1] * cos
    centre = torch.stack((x, y), -1) + grid
    return torch.cat((centre, lt + rb, angle.unsqueeze(-1)), -1)


def rotated_distances(boxes: Tensor, grid: Tensor) -> Tensor:
    """``boxes (..., 5)`` xywhr and anchors ``grid`` (broadcastable) -> ``(..., 4)`` distances ``(l, t, r,
    b)`` from the anchor to the box's sides, measured in the box's frame (the inverse of
    :func:`decode_rotated` for the box's own angle)."""
    offset = boxes[..., :2] - grid
    cos, sin = torch.cos(boxes[..., 4]), torch.sin(boxes[..., 4])
    xf = offset[..., 0] * cos + offset[..., 1] * sin
    yf = -offset[..., 0] * sin + offset[..., 1] * cos
    hw, hh = boxes[..., 2] / 2, boxes[..., 3] / 2
    return torch.stack((hw - xf, hh - yf, hw + xf, hh + yf), -1)


class YOLOOBBLoss(YOLOv8Loss):
    """The oriented-box YOLO loss over all anchors of a batch (see the module doc).

    Args: those of :class:`detloss.YOLOv8Loss`, plus

        angle_weight: gain of the angle term (1.0).
        min_object_size: GT boxes narrower or lower than this (pixels) are dropped (2.0; 0 keeps all).
        box_variance: added to both variances ``w^2 / 12`` and ``h^2 / 12`` of the predicted and
            target Gaussians of the ProbIoU term (grid units squared; 0.01 as ultralytics 8.4): keeps
            the term smooth for tiny and degenerate boxes. The assigner's ProbIoU has none.

    ``forward(box_pred (B, A, 4 * reg_max), cls_logits (B, A, C), angle_pred (B, A) or (B, A, 1)
    radians, anchor_points (A, 2), anchor_strides (A,), gt_boxes (B, M, 5) xywhr pixels,
    gt_labels (B, M), gt_valid (B, M), *, image_size=None, return_assignment=False)`` returns
    ``{"loss_box", "loss_cls", "loss_dfl", "loss_angle", "loss"}`` (0-d, each times its gain) and
    the :class:`~detloss.matching.task_aligned.TaskAlignedAssignment` (boxes ``(B, A, 5)``) when
    asked. ``image_size (height, width)`` is needed with ``reg_max = 1``.

    >>> loss_fn = YOLOOBBLoss(2, reg_max=4)
    >>> points = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]])
    >>> gt = torch.tensor([[[8.0, 8.0, 16.0, 6.0, 0.5]]])
    >>> out = loss_fn(torch.zeros(1, 4, 16), torch.zeros(1, 4, 2), torch.zeros(1, 4), points,
    ...               torch.full((4,), 8.0), gt, torch.tensor([[1]]), torch.tensor([[True]]))
    >>> sorted(out), bool(out["loss_angle"] > 0)
    (['loss', 'loss_angle', 'loss_box', 'loss_cls', 'loss_dfl'], True)
    """

    def __init__(self, num_classes: int, *, angle_weight: float = 1.0, min_object_size: float = 2.0,
                 box_variance: float = 0.01, **options) -> None:
        super().__init__(num_classes, **options)
        self.box_variance = float(require_positive(box_variance, "box_variance", allow_zero=True))
        self.angle_weight = float(require_positive(angle_weight, "angle_weight", allow_zero=True))
        self.min_object_size = float(require_positive(min_object_size, "min_object_size", allow_zero=True))

    def forward(  # type: ignore[override]
        self,
        box_pred: Tensor,
        cls_logits: Tensor,
        angle_pred: Tensor,
        anchor_points: Tensor,
        anchor_strides: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
        *,
        image_size: Optional[Sequence[int]] = None,
        return_assignment: bool = False,
    ) -> dict:
        checks = ValueChecks()
        gt_valid, image_size = self.check_inputs(
            checks, box_pred, cls_logits, angle_pred, anchor_points, anchor_strides, gt_boxes, gt_labels, gt_valid,
            image_size,
        )
        checks.run()
        return self.forward_unchecked(
            box_pred, cls_logits, angle_pred, anchor_points, anchor_strides, gt_boxes, gt_labels, gt_valid,
            image_size=image_size, return_assignment=return_assignment,
        )

    def check_inputs(
        self, checks: ValueChecks, box_pred: Tensor, cls_logits: Tensor, angle_pred: Tensor, anchor_points: Tensor,
        anchor_strides: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor,
        image_size: Optional[Sequence[int]],
    ) -> tuple[Tensor, Optional[tuple[float, float]]]:
        """Metadata checks of every argument, value checks of the ground truth queued on ``checks``
        (the caller runs them); returns ``gt_valid`` as bool and the checked image size."""
        require_floating(box_pred, "box_pred")
        dims = require_shape(box_pred, "box_pred", ("B", "A", 4 * self.reg_max))
        require_floating(cls_logits, "cls_logits")
        require_shape(cls_logits, "cls_logits", ("B", "A", self.num_classes), dims)
        require_floating(angle_pred, "angle_pred")
        require_shape(angle_pred, "angle_pred", ("B", "A", 1) if angle_pred.dim() == 3 else ("B", "A"), dims)
        require_floating(anchor_points, "anchor_points")
        require_shape(anchor_points, "anchor_points", ("A", 2), dims)
        require_floating(anchor_strides, "anchor_strides")
        require_shape(anchor_strides, "anchor_strides", ("A",), dims)
        require_rotated_boxes(gt_boxes, "gt_boxes", ndim=3)
        checks.finite(anchor_points, "anchor_points")
        checks.in_range(anchor_strides, "anchor_strides", 1e-12, None)
        dims, gt_valid = require_padded_gt(
            gt_boxes, gt_valid, gt_labels, checks=checks, dims=dims, label_range=(0, self.num_classes - 1),
            box_dims=5,
        )
        checks.in_range(gt_boxes[..., 2:4], "gt_boxes (w, h)", 0, None, where=gt_valid)
        if self.reg_max == 1 and image_size is None:
            raise ValueError("image_size: expected (height, width) in pixels with reg_max=1, got None")
        if image_size is not None:
            image_size = _check_image_size(image_size)
        return gt_valid, image_size

    def forward_unchecked(  # type: ignore[override]
        self, box_pred: Tensor, cls_logits: Tensor, angle_pred: Tensor, anchor_points: Tensor,
        anchor_strides: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, *,
        image_size: Optional[Sequence[float]] = None, return_assignment: bool = False,
    ) -> dict:
        """:meth:`forward` without the input checks (the drop-in checked its own input)."""
        dtype = compute_dtype(cls_logits)
        box_pred, cls_logits = box_pred.to(dtype), cls_logits.to(dtype)
        angle = (angle_pred.squeeze(-1) if angle_pred.dim() == 3 else angle_pred).to(dtype)  # (B, A)
        stride = anchor_strides.to(dtype).unsqueeze(-1)  # (A, 1)
        grid = anchor_points.to(dtype) / stride  # (A, 2) anchors in grid units

        # 1. decode: distances in the box frame, rotated boxes in grid units (gradients only where
        #    the box terms need them: every anchor on the dense path, the foreground on the CPU's)
        gathered = host_sync_is_free(cls_logits)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not gathered):
            dist = decode_distances(box_pred, self.reg_max)  # (B, A, 4)
            pred_boxes = decode_rotated(dist, angle, grid)  # (B, A, 5)

        # 2. tiny objects are padding
        if self.min_object_size > 0:
            gt_valid = gt_valid & (gt_boxes[..., 2] >= self.min_object_size) & (gt_boxes[..., 3] >= self.min_object_size)

        # 3. assign on detached probabilities and pixel boxes
        scale = torch.cat((stride.expand(-1, 4), torch.ones_like(stride)), -1)  # (A, 5): xywh times the stride
        assignment = match_task_aligned_unchecked(
            cls_logits.detach().sigmoid(), (pred_boxes.detach() * scale).to(gt_boxes.dtype), anchor_points.to(dtype),
            gt_boxes, gt_labels, gt_valid, rotated=True, **self.assign_options,
        )
        scores = assignment.scores.to(dtype)  # (B, A, C)
        tss = positive_normalizer(scores.sum(), distributed=self.distributed).to(dtype)

        # 4. classes
        cls_weight = None if self.class_weights is None else self.class_weights.to(dtype)
        loss_cls = binary_cross_entropy_with_logits(cls_logits, scores, weight=cls_weight, reduction="sum",
                                                    normalizer=tss)

        # 5.-7. box, DFL, angle on the foreground rows (weights w = the anchors' soft scores)
        fg = assignment.foreground
        w = scores.sum(-1)  # (B, A)
        if gathered:  # CPU eager: only the foreground rows (one host read; benchmarks/README.md, bench_obb)
            bi, ai = fg.nonzero(as_tuple=True)
            rows = (box_pred[bi, ai], angle[bi, ai], grid[ai], stride[ai], assignment.boxes[bi, ai].to(dtype) / scale[ai],
                    w[bi, ai])
            dist_rows = decode_distances(rows[0], self.reg_max)
            pred_rows = decode_rotated(dist_rows, rows[1], rows[2])
        else:  # every anchor, background rows weighted 0 with a finite stand-in target
            unit = torch.cat((grid, torch.ones_like(grid), torch.zeros_like(grid[:, :1])), -1)
            target = torch.where(fg.unsqueeze(-1), assignment.boxes.to(dtype) / scale, unit)  # (B, A, 5)
            rows = (box_pred, angle, grid, stride, target, torch.where(fg, w, 0.0))
            dist_rows, pred_rows = dist, pred_boxes
        loss_box, loss_dfl, loss_angle = self._box_terms(*rows, dist_rows, pred_rows, tss, image_size)
        # + 0 * sums of the box and angle predictions: a non-finite one makes the loss non-finite even
        # when nothing is foreground (a diverging model gives NaN, so GradScaler skips the step)
        loss_box = loss_box + (box_pred.sum() + angle.sum()) * 0

        # 8. gains
        out = {"loss_box": loss_box * self.box_weight, "loss_cls": loss_cls * self.cls_weight,
               "loss_dfl": loss_dfl * self.dfl_weight, "loss_angle": loss_angle * self.angle_weight}
        out["loss"] = out["loss_box"] + out["loss_cls"] + out["loss_dfl"] + out["loss_angle"]
        if return_assignment:
            out["assignment"] = assignment
        return out


    def _box_terms(
        self, box_pred: Tensor, angle: Tensor, grid: Tensor, stride: Tensor, target: Tensor, w: Tensor,
        dist: Tensor, pred_boxes: Tensor, tss: Tensor, image_size: Optional[Sequence[float]],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Box (ProbIoU), DFL (or L1) and angle sums ``/ tss`` over rows ``(..., )`` of anchors: the
        head's ``box_pred (..., 4 * reg_max)`` and ``angle (...)``, the anchors' ``grid (..., 2)`` and
        ``stride (..., 1)``, ``target (..., 5)`` grid units, weights ``w (...)``, the decoded
        ``dist (..., 4)`` and ``pred_boxes (..., 5)``."""
        # 5. box: (1 - ProbIoU) * w, grid units
        iou = probiou_from_terms(gaussian_terms(pred_boxes, self.box_variance), gaussian_terms(target, self.box_variance))
        loss_box = weighted_reduce(1 - iou, w, "sum", tss)
        # 6. DFL (or L1 with reg_max = 1) on the target's distances in its own frame
        target_dist = rotated_distances(target, grid)  # (..., 4)
        if self.reg_max == 1:
            h, w_img = image_size
            size = device_constant([w_img, h, w_img, h], dtype=target_dist.dtype, device=target_dist.device)
            side = (dist * stride / size - target_dist * stride / size).abs()
        else:
            side = distribution_focal_unchecked(box_pred.unflatten(-1, (4, self.reg_max)), target_dist,
                                                self._dfl_max_target())
        loss_dfl = weighted_reduce(side.mean(-1), w, "sum", tss)
        # 7. angle: sin^2(2 delta), weighted by how far from square the target is
        loss_angle = weighted_reduce(angle_term(angle, target), w, "sum", tss)
        return loss_box, loss_dfl, loss_angle

def angle_term(angle: Tensor, target: Tensor) -> Tensor:
    """``(B, A)`` predicted angles and ``(B, A, 5)`` target boxes -> ``(B, A)``
    ``sin^2(2 delta) * exp(-ln(w / h)^2 / 9)`` with ``delta`` the angle difference wrapped to
    ``[-pi/2, pi/2]``."""
    tiny = torch.finfo(target.dtype).tiny
    log_ratio = torch.log(target[..., 2].clamp(min=tiny) / target[..., 3].clamp(min=tiny))
    weight = torch.exp(-(log_ratio * log_ratio) / (ANGLE_ASPECT_SCALE * ANGLE_ASPECT_SCALE))
    delta = angle - target[..., 4]
    delta = delta - torch.round(delta / torch.pi) * torch.pi
    return torch.sin(2 * delta) ** 2 * weight

