"""YOLOv8 / YOLO11 detection loss (and YOLO26's one-to-one branch): task-aligned assignment,
BCE against soft scores, CIoU and DFL (TOOD arXiv:2108.07755, GFL arXiv:2006.04388, CIoU
arXiv:1911.08287).

With ``tss = max(sum of the target scores, 1)`` (all-reduced with ``distributed=True``):

1. **Decode**: each box side is a distribution over ``reg_max`` bins; its expectation is the
   distance (grid units) from the anchor to the side, ``box = (anchor - (l, t), anchor + (r, b))``.
   ``reg_max = 1``: the head outputs the four distances directly (YOLO26).
2. **Assign** with :func:`detloss.matching.task_aligned.match_task_aligned` on the detached
   probabilities and pixel boxes: foreground anchors, their GT and soft scores ``(B, A, C)``.
3. **Classes**: ``sum BCE(cls_logits, soft scores) / tss`` (optionally times a per-class weight).
4. **Box**: ``sum over foreground of (1 - CIoU(pred, target)) * w / tss``, ``w`` = the anchor's
   soft score (grid units; the CIoU is not clamped).
5. **DFL**: the target distances clamped to ``[0, dfl_max_target]`` (``reg_max - 1``), the
   distribution focal loss averaged over the 4 sides, times ``w``, summed, ``/ tss``.
   ``reg_max = 1``: the L1 distance between predicted and target distances in pixels divided by
   the image width (left, right) or height (top, bottom), averaged over the sides, times ``w``.
6. ``loss = box_weight * box + cls_weight * cls + dfl_weight * dfl`` (7.5, 0.5, 1.5).

Conventions: ``anchor_points (A, 2)`` pixel centres and ``anchor_strides (A,)`` their strides,
``gt_boxes (B, M, 4)`` xyxy pixels, ``gt_labels (B, M)`` in ``[0, C-1]`` (no background
column), ``gt_valid (B, M)`` bool. Images or batches without objects give a finite loss with
``loss_box`` and ``loss_dfl`` exactly 0.

Differences from ultralytics by default (the drop-in :mod:`detloss.compat.ultralytics` sets
the options that restore them): zero-metric anchors are never foreground (see the assigner);
the DFL target is clamped at ``reg_max - 1`` instead of ``reg_max - 1.01``; ``distributed=True``
makes DDP gradients equal the single-process ones (ultralytics divides by each process's own
``tss``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .._constants import device_constant
from .._validate import ValueChecks, require_floating, require_padded_gt, require_shape
from ..boxes import aligned_box_iou_unchecked, compute_dtype
from ..functional import binary_cross_entropy_with_logits, positive_normalizer, weighted_reduce
from ..functional.distribution import distribution_focal_unchecked
from ..matching.task_aligned import check_task_aligned_options, match_task_aligned_unchecked

__all__ = ["YOLOv8Loss", "decode_distances"]


def decode_distances(box_pred: Tensor, reg_max: int) -> Tensor:
    """``(B, A, 4 * reg_max)`` side distributions -> ``(B, A, 4)`` expected distances
    ``(l, t, r, b)`` in bins (grid units); ``reg_max = 1``: the input itself."""
    if reg_max == 1:
        return box_pred
    bins = torch.arange(reg_max, dtype=box_pred.dtype, device=box_pred.device)
    return box_pred.unflatten(-1, (4, reg_max)).softmax(-1).matmul(bins)


class YOLOv8Loss(nn.Module):
    """The YOLOv8 / YOLO11 loss over all anchors of a batch (see the module doc).

    Args:
        num_classes: ``C``.
        reg_max: bins per box side (16); 1 means plain distances with the L1 term (YOLO26).
        topk, alpha, beta, topk2, min_box_side: the assigner (10, 0.5, 6.0, None, 16.0: the
            ultralytics 8.4 floor ``stride[1]`` for strides 8/16/32).
        box_weight, cls_weight, dfl_weight: the gains (7.5, 0.5, 1.5).
        class_weights: optional ``(C,)`` weight of each class column of the BCE.
        dfl_max_target: clamp of the DFL target (None: ``reg_max - 1``; ultralytics
            ``reg_max - 1.01``).
        distributed: all-reduce the target-score sum (DDP).
        chunk_size: GTs per chunk of the assigner's pair space (None: automatic).

    ``forward(box_pred (B, A, 4 * reg_max), cls_logits (B, A, C), anchor_points (A, 2),
    anchor_strides (A,), gt_boxes (B, M, 4), gt_labels (B, M), gt_valid (B, M), *,
    image_size=None, return_assignment=False)`` returns ``{"loss_box", "loss_cls", "loss_dfl",
    "loss"}`` (0-d float32; float64 for float64 input), each term already times its gain,
    and ``"assignment"`` (:class:`~detloss.matching.task_aligned.TaskAlignedAssignment`) when
    asked. ``image_size (height, width)`` in pixels is needed with ``reg_max = 1``; when given,
    valid GT boxes must lie inside the image.

    >>> loss_fn = YOLOv8Loss(2, reg_max=4)
    >>> points = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]])
    >>> out = loss_fn(torch.zeros(1, 4, 16), torch.zeros(1, 4, 2), points, torch.full((4,), 8.0),
    ...               torch.tensor([[[0.0, 0.0, 16.0, 16.0]]]), torch.tensor([[1]]), torch.tensor([[True]]))
    >>> sorted(out), bool(out["loss"] > 0)
    (['loss', 'loss_box', 'loss_cls', 'loss_dfl'], True)
    """

    def __init__(
        self, num_classes: int, *, reg_max: int = 16,
        # assigner
        topk: int = 10, alpha: float = 0.5, beta: float = 6.0, topk2: Optional[int] = None,
        min_box_side: Optional[float] = 16.0, chunk_size: Optional[int] = None,
        # terms
        box_weight: float = 7.5, cls_weight: float = 0.5, dfl_weight: float = 1.5,
        class_weights: Optional[Sequence[float]] = None, dfl_max_target: Optional[float] = None,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        for value, name in ((num_classes, "num_classes"), (reg_max, "reg_max")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        check_task_aligned_options(topk, alpha, beta, topk2, min_box_side, 1e-9, chunk_size)
        if dfl_max_target is not None and not 0 <= dfl_max_target <= reg_max - 1:
            raise ValueError(
                f"dfl_max_target: expected a number in [0, reg_max - 1 = {reg_max - 1}], got {dfl_max_target!r}"
            )
        self.num_classes, self.reg_max = num_classes, reg_max
        self.assign_options = dict(topk=topk, alpha=alpha, beta=beta, topk2=topk2, min_box_side=min_box_side,
                                   chunk_size=chunk_size)
        self.box_weight, self.cls_weight, self.dfl_weight = float(box_weight), float(cls_weight), float(dfl_weight)
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if class_weights.shape != (num_classes,) or not bool(torch.isfinite(class_weights).all()):
                raise ValueError(f"class_weights: expected {num_classes} finite numbers, got {class_weights.tolist()}")
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.dfl_max_target = dfl_max_target
        self.distributed = distributed

    def forward(
        self,
        box_pred: Tensor,
        cls_logits: Tensor,
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
            checks, box_pred, cls_logits, anchor_points, anchor_strides, gt_boxes, gt_labels, gt_valid, image_size
        )
        checks.run()
        return self.forward_unchecked(
            box_pred, cls_logits, anchor_points, anchor_strides, gt_boxes, gt_labels, gt_valid,
            image_size=image_size, return_assignment=return_assignment,
        )

    def check_inputs(
        self, checks: ValueChecks, box_pred: Tensor, cls_logits: Tensor, anchor_points: Tensor,
        anchor_strides: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor,
        image_size: Optional[Sequence[int]],
    ) -> tuple[Tensor, Optional[tuple[float, float]]]:
        """Metadata checks of every argument, value checks of the ground truth queued on ``checks``
        (the caller runs them, once); returns ``gt_valid`` as bool and the checked image size."""
        require_floating(box_pred, "box_pred")
        dims = require_shape(box_pred, "box_pred", ("B", "A", 4 * self.reg_max))
        require_floating(cls_logits, "cls_logits")
        require_shape(cls_logits, "cls_logits", ("B", "A", self.num_classes), dims)
        require_floating(anchor_points, "anchor_points")
        require_shape(anchor_points, "anchor_points", ("A", 2), dims)
        require_floating(anchor_strides, "anchor_strides")
        require_shape(anchor_strides, "anchor_strides", ("A",), dims)
        checks.finite(anchor_points, "anchor_points")
        checks.in_range(anchor_strides, "anchor_strides", 1e-12, None)
        dims, gt_valid = require_padded_gt(
            gt_boxes, gt_valid, gt_labels, checks=checks, dims=dims, label_range=(0, self.num_classes - 1)
        )
        if self.reg_max == 1 and image_size is None:
            raise ValueError("image_size: expected (height, width) in pixels with reg_max=1, got None")
        if image_size is not None:
            h, w = image_size = _check_image_size(image_size)
            rows = gt_valid.unsqueeze(-1)
            checks.in_range(gt_boxes[..., 0::2], "gt_boxes (x)", 0, w, where=rows)
            checks.in_range(gt_boxes[..., 1::2], "gt_boxes (y)", 0, h, where=rows)
        return gt_valid, image_size

    def forward_unchecked(
        self, box_pred: Tensor, cls_logits: Tensor, anchor_points: Tensor, anchor_strides: Tensor, gt_boxes: Tensor,
        gt_labels: Tensor, gt_valid: Tensor, *, image_size: Optional[Sequence[int]] = None,
        return_assignment: bool = False,
    ) -> dict:
        """:meth:`forward` without the input checks (the drop-in checked its own input)."""
        dtype = compute_dtype(cls_logits)
        box_pred, cls_logits = box_pred.to(dtype), cls_logits.to(dtype)
        stride = anchor_strides.to(dtype).unsqueeze(-1)  # (A, 1)
        grid = anchor_points.to(dtype) / stride  # (A, 2) anchors in grid units

        # 1. decode: expected distances, boxes in grid units
        dist = decode_distances(box_pred, self.reg_max)  # (B, A, 4)
        pred_boxes = torch.cat((grid - dist[..., :2], grid + dist[..., 2:]), dim=-1)  # (B, A, 4)

        # 2. assign on detached probabilities and pixel boxes
        assignment = match_task_aligned_unchecked(
            cls_logits.detach().sigmoid(), (pred_boxes.detach() * stride).to(gt_boxes.dtype),
            anchor_points.to(dtype), gt_boxes, gt_labels, gt_valid, **self.assign_options,
        )
        scores = assignment.scores.to(dtype)  # (B, A, C)
        tss = positive_normalizer(scores.sum(), distributed=self.distributed).to(dtype)

        # 3. classes: BCE against the soft scores
        cls_weight = None if self.class_weights is None else self.class_weights.to(dtype)
        loss_cls = binary_cross_entropy_with_logits(cls_logits, scores, weight=cls_weight, reduction="sum",
                                                    normalizer=tss)

        # 4. box: (1 - CIoU) * w over the foreground, grid units
        fg = assignment.foreground
        w = torch.where(fg, scores.sum(-1), 0.0)  # (B, A)
        unit = torch.cat((grid - 0.5, grid + 0.5), dim=-1)  # a finite stand-in target for background
        target = torch.where(fg.unsqueeze(-1), assignment.boxes.to(dtype) / stride, unit)  # (B, A, 4)
        ciou = aligned_box_iou_unchecked(pred_boxes, target, "ciou")
        # + 0 * sum(box_pred): a non-finite box prediction makes the loss non-finite even where no
        # anchor is foreground (a diverging model gives NaN, so GradScaler skips the step)
        loss_box = weighted_reduce(1 - ciou, w, "sum", tss) + box_pred.sum() * 0

        # 5. DFL (or L1 for reg_max = 1) on the target distances, mean over the sides
        target_dist = torch.cat((grid - target[..., :2], target[..., 2:] - grid), dim=-1)  # (B, A, 4)
        if self.reg_max == 1:
            h, w_img = image_size
            size = device_constant([w_img, h, w_img, h], dtype=target_dist.dtype, device=target_dist.device)
            side = (dist * stride / size - target_dist * stride / size).abs()
        else:
            side = distribution_focal_unchecked(box_pred.unflatten(-1, (4, self.reg_max)), target_dist,
                                                self._dfl_max_target())
        loss_dfl = weighted_reduce(side.mean(-1), w, "sum", tss)

        # 6. gains
        out = {"loss_box": loss_box * self.box_weight, "loss_cls": loss_cls * self.cls_weight,
               "loss_dfl": loss_dfl * self.dfl_weight}
        out["loss"] = out["loss_box"] + out["loss_cls"] + out["loss_dfl"]
        if return_assignment:
            out["assignment"] = assignment
        return out

    def _dfl_max_target(self) -> float:
        return self.reg_max - 1 if self.dfl_max_target is None else self.dfl_max_target


def _check_image_size(image_size: Sequence[int]) -> tuple[float, float]:
    try:
        h, w = (float(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size: expected (height, width), got {image_size!r}") from None
    if not (h > 0 and w > 0):
        raise ValueError(f"image_size: expected positive (height, width), got {image_size!r}")
    return h, w
