"""YOLOv3 target builder: which anchor of which scale is responsible for each ground-truth box.

The rule of tensorflow-yolov3 (``core/dataset.py``, ``preprocess_true_boxes``), batched:

* Per GT and per scale ``s`` the GT centre falls in cell ``floor(centre / stride_s)``. The
  ``A`` anchors of that scale, centred in that cell (centre ``cell + 0.5``, size the anchor,
  all in grid units of ``s``) are compared with the GT by IoU; every anchor with
  IoU > ``pos_iou`` is responsible, so a GT can be responsible on several anchors of
  several scales.
* A GT that no anchor on any scale passes takes the single best of all ``S * A`` anchors
  (first on ties, scale-major order).
* Later GTs overwrite earlier ones in the same (cell, anchor) slot. This is made
  deterministic by a ``scatter_reduce(amax)`` of the GT index per slot (never a duplicate-index
  scatter of values), then a gather.
* The per-scale true-box list holds every GT assigned to that scale, in GT order, at slot
  ``count mod max_boxes_per_scale`` (so it wraps like the original's).

Label layout per scale: ``(B, H, W, A, 5 + C)`` = ``[cx, cy, w, h]`` in input pixels, the
responsibility flag (1 responsible, 0 not: background and ignore are decided by the loss),
then the smoothed one-hot ``onehot * (1 - eps) + eps / C``.

Differences from the original (each an option): the original clips the fallback cell index
with the grid size of the last scale (13 at 416) whatever scale the fallback picked; here the
scale's own grid size is used unless ``faithful_fallback_clip=True``.

The anchor IoUs run in float64 (``B x M x S x A`` numbers, tiny) so the ``> 0.3`` decisions
equal the original's NumPy float64 ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .._constants import device_constant
from .._validate import (
    ValueChecks,
    as_bool_mask,
    require_floating,
    require_integer,
    require_positive,
    require_shape,
    require_tensor,
)
from ..boxes import aligned_box_iou_unchecked, cxcywh_to_xyxy, xyxy_to_cxcywh
from ..priors import YOLOV3_STRIDES, yolov3_anchors
from ..targets import one_hot

__all__ = [
    "YoloAssignment", "YoloSlotTargets", "YoloTargets", "assign_yolo_anchors", "build_yolo_targets", "yolo_image_hw",
    "yolo_slot_targets",
]


def yolo_image_hw(image_size: Union[int, Sequence[int]], strides: Sequence[int]) -> tuple[int, int]:
    """``image_size`` (int or ``(H, W)``) as ``(H, W)``; each must be divisible by every stride."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    if len(hw) != 2 or min(hw) <= 0:
        raise ValueError(f"image_size: expected a positive int or (H, W), got {image_size!r}")
    step = max(strides)
    if any(v % s for v in hw for s in strides):
        raise ValueError(
            f"image_size: expected H and W divisible by every stride {tuple(strides)} "
            f"(a multiple of {step}), got {hw}"
        )
    return hw


@dataclass
class YoloAssignment:
    """Sparse result of the assignment, per scale ``s`` (tuples of length ``S``).

    * ``slot[s]`` ``(B, M, A)`` int64: flat index ``(row * W_s + col) * A + a`` of the slot each
      (GT, anchor) pair would write to.
    * ``positive[s]`` ``(B, M, A)`` bool: the pair is responsible *and* won its slot (later GT wins).
    * ``winner[s]`` ``(B, H_s * W_s * A)`` int64: index of the GT owning each slot, -1 if none.
    * ``in_list[s]`` ``(B, M)`` bool: the GT is in the scale's true-box list (assigned to the
      scale and not overwritten by the wrap at ``max_boxes_per_scale``).
    * ``list_slot[s]`` ``(B, M)`` int64: its row in that list.
    * ``gt_cxcywh`` ``(B, M, 4)`` float64: the GT boxes as centre/size, input pixels.
    * ``grid_hw[s]``: the grid ``(H_s, W_s)`` of each scale; ``list_size``: ``max_boxes_per_scale``.
    """

    slot: tuple[Tensor, ...]
    positive: tuple[Tensor, ...]
    winner: tuple[Tensor, ...]
    in_list: tuple[Tensor, ...]
    list_slot: tuple[Tensor, ...]
    gt_cxcywh: Tensor
    grid_hw: tuple[tuple[int, int], ...] = ()
    list_size: int = 0


class YoloTargets(NamedTuple):
    """Dense targets: ``labels[s]`` ``(B, H_s, W_s, A, 5 + C)``, ``true_boxes[s]`` ``(B, K, 4)`` cxcywh."""

    labels: tuple[Tensor, ...]
    true_boxes: tuple[Tensor, ...]


def check_yolo_ground_truth(
    gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, num_classes: int, hw: tuple[int, int], checks: ValueChecks
) -> Tensor:
    """The checks of a YOLO loss's padded ground truth: shapes and dtypes now, and on
    ``checks`` every box finite and every valid row with a class id in ``[0, C)``, its centre
    inside the input (``0 <= cx <= W``, ``0 <= cy <= H``; a box may stick out of the image after
    augmentation, the original takes it) and ``x1 <= x2``, ``y1 <= y2``. Returns ``gt_valid``
    as bool ``(B, M)``."""
    require_floating(require_tensor(gt_boxes, "gt_boxes"), "gt_boxes")
    dims = require_shape(gt_boxes, "gt_boxes", ("B", "M", 4))
    require_integer(gt_labels, "gt_labels")
    require_shape(gt_labels, "gt_labels", ("B", "M"), dims)
    valid = as_bool_mask(gt_valid, "gt_valid")
    require_shape(valid, "gt_valid", ("B", "M"), dims)
    h, w = hw
    centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
    checks.finite(gt_boxes, "gt_boxes")
    checks.in_range(gt_labels, "gt_labels (class ids of valid boxes)", 0, num_classes - 1, where=valid)
    checks.in_range(centre[..., 0], f"gt_boxes centre x (valid boxes, input width {w})", 0, w, where=valid)
    checks.in_range(centre[..., 1], f"gt_boxes centre y (valid boxes, input height {h})", 0, h, where=valid)
    size = gt_boxes[..., 2:] - gt_boxes[..., :2]
    checks.in_range(size, "gt_boxes width/height (x2 - x1, y2 - y1 of valid boxes)", 0, None, where=valid)
    return valid


def assign_yolo_anchors(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    *,
    num_classes: int,
    anchors: Optional[Tensor] = None,
    strides: Sequence[int] = YOLOV3_STRIDES,
    image_size: Union[int, Sequence[int]] = 416,
    pos_iou: float = 0.3,
    max_boxes_per_scale: int = 150,
    faithful_fallback_clip: bool = False,
) -> YoloAssignment:
    """Batched YOLOv3 anchor assignment (see the module doc for the rule).

    Args:
        gt_boxes: ``(B, M, 4)`` xyxy input pixels, floating point, inside the image.
        gt_labels: ``(B, M)`` integer class ids in ``[0, num_classes)`` (checked on valid rows).
        gt_valid: ``(B, M)`` bool (or 0/1) mask of real boxes; padding rows are ignored.
        num_classes: ``C``.
        anchors: ``(S, A, 2)`` anchor (w, h) in **grid units of each scale** (pixels / stride,
            tensorflow-yolov3's anchor file); default the YOLOv3 COCO anchors.
        strides: ``S`` strides, one per scale, small to large.
        image_size: int or ``(H, W)`` pixels, divisible by every stride.
        pos_iou: an anchor is responsible when its IoU with the GT exceeds this.
        max_boxes_per_scale: ``K``, rows of each scale's true-box list (wraps around).
        faithful_fallback_clip: clip the fallback cell with the last scale's grid size (the
            original's bug) instead of the chosen scale's.

    Returns:
        A :class:`YoloAssignment`, on ``gt_boxes``'s device. No host synchronisation beyond
        the optional value checks.

    >>> boxes = torch.tensor([[[100.0, 120.0, 180.0, 220.0]]])  # one 80 x 100 px GT at 416 px
    >>> match = assign_yolo_anchors(boxes, torch.tensor([[2]]), torch.tensor([[True]]), num_classes=3)
    >>> [int(p.sum()) for p in match.positive]  # responsible anchors per scale (stride 8, 16, 32)
    [0, 2, 1]
    """
    hw = yolo_image_hw(image_size, strides)
    require_positive(num_classes, "num_classes")
    require_positive(max_boxes_per_scale, "max_boxes_per_scale")
    checks = ValueChecks()
    valid = check_yolo_ground_truth(gt_boxes, gt_labels, gt_valid, num_classes, hw, checks)
    checks.run()
    if anchors is None:
        anchors = yolov3_anchors(grid_units=True, strides=strides)
    anchors = require_floating(require_tensor(anchors, "anchors"), "anchors")
    if anchors.dim() != 3 or anchors.shape[0] != len(strides) or anchors.shape[2] != 2:
        raise ValueError(f"anchors: expected shape (S={len(strides)}, A, 2), got {tuple(anchors.shape)}")
    return assign_yolo_anchors_unchecked(
        gt_boxes, valid, anchors=anchors, strides=strides, image_hw=hw, pos_iou=pos_iou,
        max_boxes_per_scale=max_boxes_per_scale, faithful_fallback_clip=faithful_fallback_clip,
    )


def assign_yolo_anchors_unchecked(
    gt_boxes: Tensor,
    gt_valid: Tensor,
    *,
    anchors: Tensor,
    strides: Sequence[int],
    image_hw: tuple[int, int],
    pos_iou: float,
    max_boxes_per_scale: int,
    faithful_fallback_clip: bool,
) -> YoloAssignment:
    """:func:`assign_yolo_anchors` of inputs already checked (``gt_valid`` bool, ``anchors
    (S, A, 2)``, ``image_hw`` divisible by the strides): for losses that validate their own
    entry point, so the ground truth is read on the host once."""
    valid, hw = gt_valid, image_hw
    device = gt_boxes.device
    f64 = torch.float64
    anchors = anchors.to(device=device, dtype=f64)
    n_scales, n_anchors = len(strides), anchors.shape[1]
    batch, m = gt_valid.shape

    # GT centre/size in input pixels and in grid units of every scale: (B, M, S, 4).
    gt_cxcywh = xyxy_to_cxcywh(gt_boxes.to(f64))
    stride_t = device_constant(strides, dtype=f64, device=device)
    scaled = gt_cxcywh[:, :, None, :] / stride_t[:, None]
    cell = torch.floor(scaled[..., :2])

    # IoU of the GT with the A anchors centred in its cell, per scale: (B, M, S, A).
    anchor_boxes = torch.cat(
        (cell[:, :, :, None, :].expand(-1, -1, -1, n_anchors, -1) + 0.5,
         anchors[None, None].expand(batch, m, -1, -1, -1)),
        dim=-1,
    )
    iou = aligned_box_iou_unchecked(cxcywh_to_xyxy(scaled[:, :, :, None, :]), cxcywh_to_xyxy(anchor_boxes))
    passing = (iou > pos_iou) & valid[:, :, None, None]
    has_positive = passing.flatten(2).any(-1)  # (B, M)
    best = iou.flatten(2).argmax(-1)  # first maximum, scale-major like np.argmax
    fallback = (best[:, :, None] == torch.arange(n_scales * n_anchors, device=device)).view_as(passing)
    fallback = fallback & (valid & ~has_positive)[:, :, None, None]
    responsible = passing | fallback

    # Cell of each (GT, scale), clipped with the scale's grid (or the last one's, faithfully).
    grid_hw = device_constant([[hw[0] // s, hw[1] // s] for s in strides], dtype=torch.int64, device=device)  # (S, 2) rows, cols
    col_row = cell.long()
    own_max = grid_hw.flip(-1) - 1  # (S, 2) as (x max, y max)
    clip_max = own_max
    if faithful_fallback_clip:
        clip_max = torch.where(has_positive[:, :, None, None], own_max, own_max[-1])
    col_row = torch.minimum(col_row.clamp(min=0), clip_max)

    # All scales at once: slots of scale s live at offset[s] + (row * W_s + col) * A + a of one
    # (B, sum of slots) table, so a single scatter decides every slot's winner (later GT wins).
    n_slots = [(hw[0] // s) * (hw[1] // s) * n_anchors for s in strides]
    offset = device_constant([0] + n_slots[:-1], dtype=torch.int64, device=device).cumsum(0)
    cell_flat = col_row[..., 1] * grid_hw[:, 1] + col_row[..., 0]  # (B, M, S)
    slot = cell_flat[..., None] * n_anchors + torch.arange(n_anchors, device=device)  # (B, M, S, A)
    table_slot = (slot + offset[:, None]).flatten(1)
    gt_index = torch.arange(m, device=device).view(1, m, 1, 1)
    claim = torch.where(responsible, gt_index, -1).flatten(1)
    winner = torch.full((batch, sum(n_slots)), -1, dtype=torch.int64, device=device)
    winner.scatter_reduce_(1, table_slot, claim, "amax", include_self=True)
    won = responsible & (winner.gather(1, table_slot).view_as(slot) == gt_index)
    # True-box lists: GT order, row = count mod K; the last K assigned GTs survive the wrap.
    assigned = responsible.any(-1)  # (B, M, S)
    order = torch.cumsum(assigned.long(), dim=1) - 1
    total = assigned.long().sum(1, keepdim=True)
    in_list = assigned & (order >= total - max_boxes_per_scale)
    list_slot = order.clamp(min=0) % max_boxes_per_scale
    slots, positives, in_lists, list_slots = (t.unbind(2) for t in (slot, won, in_list, list_slot))
    winners = winner.split(n_slots, dim=1)
    return YoloAssignment(
        tuple(slots), tuple(positives), tuple(winners), tuple(in_lists), tuple(list_slots), gt_cxcywh,
        tuple((hw[0] // s, hw[1] // s) for s in strides), int(max_boxes_per_scale),
    )


def smoothed_one_hot(labels: Tensor, num_classes: int, label_smoothing: float) -> Tensor:
    """``onehot * (1 - eps) + eps * (1 / C)`` of ``labels (...)`` -> ``(..., C)`` float64.

    The operation order of tensorflow-yolov3, so float32 casts are bit-identical to it.
    """
    onehot = one_hot(labels.clamp(0, num_classes - 1), num_classes, torch.float64)
    return onehot * (1 - label_smoothing) + label_smoothing * (1.0 / num_classes)


def build_yolo_targets(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    *,
    num_classes: int,
    label_smoothing: float = 0.01,
    dtype: Optional[torch.dtype] = None,
    **assign_options: Any,
) -> YoloTargets:
    """Dense YOLOv3 targets of a padded batch (tensorflow-yolov3's label tensors, batched).

    Args: ``gt_boxes``, ``gt_labels``, ``gt_valid``, ``num_classes`` and the keyword
    ``assign_options`` (``anchors``, ``strides``, ``image_size``, ``pos_iou``,
    ``max_boxes_per_scale``, ``faithful_fallback_clip``) as :func:`assign_yolo_anchors`, plus
    ``label_smoothing`` (``eps`` in ``onehot * (1 - eps) + eps / C``, 0 allowed) and ``dtype`` of
    the outputs (default the dtype of ``gt_boxes``).

    Returns:
        :class:`YoloTargets`: per scale ``labels[s]`` ``(B, H_s, W_s, A, 5 + C)`` =
        ``[cx, cy, w, h]`` input pixels, responsibility (0/1), smoothed one-hot; and
        ``true_boxes[s]`` ``(B, max_boxes_per_scale, 4)`` cxcywh input pixels (the original's
        ``xywh``), zero rows where empty.

    >>> boxes = torch.tensor([[[100.0, 120.0, 180.0, 220.0]]])
    >>> targets = build_yolo_targets(boxes, torch.tensor([[2]]), torch.tensor([[True]]), num_classes=3)
    >>> [tuple(t.shape) for t in targets.labels]
    [(1, 52, 52, 3, 8), (1, 26, 26, 3, 8), (1, 13, 13, 3, 8)]
    >>> [int(t[..., 4].sum()) for t in targets.labels]
    [0, 2, 1]
    """
    require_positive(label_smoothing, "label_smoothing", allow_zero=True)
    a = assign_yolo_anchors(gt_boxes, gt_labels, gt_valid, num_classes=num_classes, **assign_options)
    dtype = gt_boxes.dtype if dtype is None else dtype
    batch, m = gt_labels.shape
    n_anchors = a.slot[0].shape[-1]
    # Per-GT label row, plus an all-zero row M for empty slots: (B, M + 1, 5 + C).
    gt_rows = torch.cat(
        (a.gt_cxcywh, a.gt_cxcywh.new_ones(batch, m, 1),
         smoothed_one_hot(gt_labels, num_classes, label_smoothing)),
        dim=-1,
    )
    gt_rows = torch.cat((gt_rows, gt_rows.new_zeros(batch, 1, gt_rows.shape[-1])), dim=1)
    labels, true_boxes = [], []
    for s, (grid_h, grid_w) in enumerate(a.grid_hw):
        winner = a.winner[s]
        owner = torch.where(winner >= 0, winner, m)
        rows = gt_rows.gather(1, owner[..., None].expand(-1, -1, gt_rows.shape[-1]))
        labels.append(rows.to(dtype).view(batch, grid_h, grid_w, n_anchors, -1))
        # Rows of dropped GTs go to a spare row K, cut off afterwards (no duplicate indices kept).
        row = torch.where(a.in_list[s], a.list_slot[s], a.list_size)
        table = a.gt_cxcywh.new_zeros(batch, a.list_size + 1, 4)
        table = table.scatter(1, row[..., None].expand(-1, -1, 4), a.gt_cxcywh)
        true_boxes.append(table[:, : a.list_size].to(dtype))
    return YoloTargets(tuple(labels), tuple(true_boxes))


@dataclass
class YoloSlotTargets:
    """What the slots of ``S`` scales should predict (``N`` cells in all, ``K`` candidates).

    Attributes:
        candidates: per scale ``(B, K_s)`` int64 flat cell indices ``(row * W_s + col) * A + a``
            of the slots that may carry box and class loss (repeats allowed), ``K = sum K_s``.
        box: ``(B, K, 4)`` target boxes of the candidates, cxcywh input pixels.
        cls: ``(B, K, C)`` class targets of the candidates.
        weight: ``(B, K)`` 0/1: which candidates do carry box and class loss.
        responsible: ``(B, N)`` bool objectness targets, the cells of all scales in order.
        true_boxes, true_valid: ``(B, T, 4)`` cxcywh input pixels and ``(B, S, T)`` bool:
            the true boxes of each scale, for the ignore rule.
    """

    candidates: tuple[Tensor, ...]
    box: Tensor
    cls: Tensor
    weight: Tensor
    responsible: Tensor
    true_boxes: Tensor
    true_valid: Tensor


def yolo_slot_targets(
    match: YoloAssignment, gt_labels: Tensor, num_classes: int, label_smoothing: float
) -> YoloSlotTargets:
    """The slot targets of an assignment: each (object, anchor) pair's slot on every scale is a candidate (``K_s = M * A``), with
    the object's box and smoothed class as targets, weighted 1 where the pair won its slot."""
    n_scales, n_anchors = len(match.slot), match.slot[0].shape[-1]
    per_pair = lambda t: t[:, :, None].expand(-1, -1, n_anchors, *t.shape[2:]).flatten(1, 2)  # noqa: E731
    per_candidate = lambda t: per_pair(t).repeat(1, n_scales, *([1] * (t.dim() - 2)))  # noqa: E731
    return YoloSlotTargets(
        candidates=tuple(slot.flatten(1) for slot in match.slot),
        box=per_candidate(match.gt_cxcywh),
        cls=per_candidate(smoothed_one_hot(gt_labels, num_classes, label_smoothing)),
        weight=torch.cat([p.flatten(1) for p in match.positive], dim=1),
        responsible=torch.cat(match.winner, dim=1) >= 0,
        true_boxes=match.gt_cxcywh,
        true_valid=torch.stack(match.in_list, dim=1),
    )
