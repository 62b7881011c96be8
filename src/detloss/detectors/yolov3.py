"""YOLOv3 loss (Redmon & Farhadi 2018, arXiv:1804.02767) in tensorflow-yolov3's formulation.

``loss = (box + objectness + class) / normaliser``, every term summed over cells, anchors and
scales:

* box: ``sum_resp (2 - w * h / (H_in * W_in)) * (1 - GIoU(pred, target))`` with the target
  ``w, h`` in input pixels (DIoU / CIoU selectable);
* objectness: ``|t - sigmoid(x)|^2 * BCE(x, t)`` (the focal factor is *not* detached) over
  responsible cells (``t = 1``) and background cells (``t = 0``) whose predicted box has a
  plain IoU below ``ignore_iou`` with every true box **of the same scale**; the other
  background cells are ignored (the mask carries no gradient);
* class: ``sum_resp sum_c BCE(class logit, smoothed one-hot)``.

The normaliser is the batch size (``normalize_by="batch"``, the original) or the number of
responsible slots (``normalize_by="num_pos"``, through
:func:`detloss.functional.positive_normalizer`). Images without boxes contribute background
objectness only.

Head layout: per scale ``(B, H, W, A * (5 + C))`` (``layout="nhwc"``, TensorFlow) or
``(B, A * (5 + C), H, W)`` (``"nchw"``); channels anchor-major, per anchor
``[tx, ty, tw, th, objectness logit, class logits...]``. The input size is ``stride * H``.

Differences from the original, by default (options restore it where the drop-in needs it):
the fallback cell is clipped with its own grid (``faithful_fallback_clip``); the box-IoU
denominators are clamped at ``box_eps`` (1e-7) instead of adding 1e-6; the ignore IoU
clamps its union at 1e-7 (the original has no epsilon: a zero-area prediction gave NaN);
decoded sizes use ``exp(min(t_wh, max_log_scale))``.

:func:`yolov3_terms` is the loss of given slot targets (:class:`YoloSlotTargets`), all scales
at once; :class:`YOLOv3Loss` builds the targets from padded ground truth and the
tensorflow-yolov3 drop-in from the original's dense label tensors, and both call it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from .._constants import device_constant
from .._validate import ValueChecks, require_choice, require_floating, require_positive, require_tensor
from ..boxes import aligned_box_iou_unchecked, compute_dtype, cxcywh_to_xyxy
from ..coders import decode_yolo_cells
from ..functional import binary_cross_entropy_with_logits, positive_normalizer, weighted_reduce
from ..functional.yolo_heads import gather_heads, yolo_cell_constants, yolo_head_views
from ..functional.yolo_objectness import yolo_objectness_focal_loss
from ..matching.yolo import (
    YoloAssignment, YoloSlotTargets, assign_yolo_anchors_unchecked, check_yolo_ground_truth, yolo_slot_targets,
)
from ..matching.yolo_ignore import yolo_max_iou
from ..priors import YOLOV3_STRIDES, yolov3_anchors

__all__ = ["YOLOv3Loss", "YOLOv3LossAssignment", "YoloTerms", "yolov3_terms"]

BOX_LOSSES = ("giou", "diou", "ciou")


@dataclass
class YoloTerms:
    """The three sums of :func:`yolov3_terms` (0-d, not normalised) and the ignore rule's
    ``max_iou (B, N)`` (each prediction's best IoU with its scale's true boxes) and
    ``background (B, N)`` bool (the objectness negatives)."""

    box: Tensor
    obj: Tensor
    cls: Tensor
    max_iou: Tensor
    background: Tensor


def yolov3_terms(
    heads: Sequence[Tensor],
    anchors: Tensor,
    strides: Sequence[int],
    targets: YoloSlotTargets,
    *,
    ignore_iou: float = 0.5,
    box_loss: str = "giou",
    box_eps: Optional[float] = None,
    ignore_eps: Optional[float] = None,
    max_log_scale: float = 10.0,
    cell_constants: Optional[tuple[Tensor, Tensor, Tensor]] = None,
) -> YoloTerms:
    """The YOLOv3 loss terms of ``S`` head maps against slot targets (see the module doc).

    ``heads[s] (B, H_s, W_s, A, 5 + C)`` raw outputs in any memory layout (NHWC maps or
    permuted NCHW ones), ``anchors (S, A, 2)`` (w, h) in grid units of each scale, ``strides``
    one per scale; ``cell_constants``: :func:`yolo_cell_constants` of them, if the caller keeps
    them. Inputs are not checked (callers validate their entry points).
    """
    # 1. decode: the box channels of every cell (no gradient; for the ignore rule) and of the
    #    candidate slots, the objectness logit of every cell, the class logits of the candidates
    box_raw, obj_logits, cls_logits, all_box_raw = gather_heads(heads, targets.candidates)
    dtype = compute_dtype(box_raw)
    grid_hws = [(h.shape[1], h.shape[2]) for h in heads]
    sizes = [h * w * anchors.shape[1] for h, w in grid_hws]
    if cell_constants is None:
        cell_constants = yolo_cell_constants(grid_hws, anchors, strides, dtype, box_raw.device)
    cell_xy, anchor_wh, stride = cell_constants
    offsets = itertools.accumulate(sizes[:-1], initial=0)
    rows = torch.cat([cells + first for cells, first in zip(targets.candidates, offsets)], dim=1)  # (B, K)
    pred_pos = decode_yolo_cells(
        box_raw.to(dtype), cell_xy[rows], anchor_wh[rows], stride[rows], max_log_scale=max_log_scale,
        box_format="xyxy",
    )
    # 2. ignore mask: background cells whose prediction overlaps no true box of its scale
    pred = decode_yolo_cells(
        all_box_raw.to(dtype), cell_xy, anchor_wh, stride, max_log_scale=max_log_scale, box_format="xyxy"
    )
    max_iou = yolo_max_iou(
        pred, targets.true_boxes, targets.true_valid, eps=ignore_eps, pred_format="xyxy", scale_sizes=sizes
    )
    background = ~targets.responsible & (max_iou < ignore_iou)
    # 3. box term: (2 - w h / image area) (1 - GIoU) at the responsible candidates
    weight, box_target = targets.weight.to(dtype), targets.box.to(dtype)
    iou = aligned_box_iou_unchecked(pred_pos, cxcywh_to_xyxy(box_target), box_loss, box_eps)
    image_area = float(grid_hws[0][0] * strides[0] * grid_hws[0][1] * strides[0])
    box_scale = 2.0 - box_target[..., 2] * box_target[..., 3] / image_area
    box = weighted_reduce(1.0 - iou, weight * box_scale, "sum")
    # 4. focal objectness over responsible and background cells
    respond = targets.responsible.to(dtype)
    obj = yolo_objectness_focal_loss(obj_logits, respond, (targets.responsible | background).to(dtype))
    # 5. class BCE at the responsible candidates
    cls = binary_cross_entropy_with_logits(cls_logits, targets.cls.to(dtype), weight=weight[..., None], reduction="sum")
    return YoloTerms(box, obj, cls, max_iou, background)


@dataclass
class YOLOv3LossAssignment:
    """What :class:`YOLOv3Loss` decided, per scale (tuples of length S).

    ``matching``: the :class:`detloss.matching.yolo.YoloAssignment`; ``respond[s]``
    ``(B, H, W, A)`` bool responsible slots; ``background[s]`` ``(B, H, W, A)`` bool objectness
    negatives (the rest of the non-responsible slots are ignored); ``max_iou[s]``
    ``(B, H, W, A)`` best IoU of each prediction with that scale's true boxes.
    """

    matching: YoloAssignment
    respond: tuple[Tensor, ...]
    background: tuple[Tensor, ...]
    max_iou: tuple[Tensor, ...]


class YOLOv3Loss(nn.Module):
    """YOLOv3 composite loss over three head maps (see the module doc for the terms).

    Args:
        num_classes: ``C``.
        anchors: ``(S, A, 2)`` anchor (w, h) in **grid units of each scale** (pixels / stride);
            default the YOLOv3 COCO anchors.
        strides: one per head, small to large.
        ignore_iou: objectness ignore threshold (0.5).
        box_loss: ``"giou"`` (original), ``"diou"`` or ``"ciou"``.
        label_smoothing: ``eps`` of the class targets ``onehot * (1 - eps) + eps / C``.
        layout: ``"nhwc"`` ``(B, H, W, A*(5+C))`` or ``"nchw"`` ``(B, A*(5+C), H, W)``.
        normalize_by: ``"batch"`` (sum over cells, mean over images: the original) or
            ``"num_pos"`` (divide by the number of responsible slots, at least 1).
        distributed: all-reduce the ``"num_pos"`` count over processes.
        box_weight, obj_weight, cls_weight: weights of the three terms in ``loss``.
        pos_iou: anchor-responsibility threshold of the target builder (0.3).
        max_boxes_per_scale: rows of each scale's true-box list (150; it wraps).
        faithful_fallback_clip: reproduce the original's fallback-cell clipping bug.
        box_eps: denominator clamp of the box IoU (None: 1e-7).
        max_log_scale: clamp of ``t_wh`` before ``exp`` in the decode.

    ``forward(outputs, gt_boxes (B, M, 4) xyxy input pixels, gt_labels (B, M) int,
    gt_valid (B, M) bool, *, return_assignment=False)`` returns a dict of 0-d float32 tensors
    (float64 for float64 heads) ``loss_box``, ``loss_obj``, ``loss_cls``, ``loss`` and, when
    asked, ``"assignment"``: a :class:`YOLOv3LossAssignment`.

    >>> loss_fn = YOLOv3Loss(num_classes=2)
    >>> heads = [torch.zeros(1, 64 // s, 64 // s, 3 * 7) for s in (8, 16, 32)]
    >>> out = loss_fn(heads, torch.tensor([[[8.0, 8, 40, 30]]]), torch.tensor([[1]]), torch.tensor([[True]]))
    >>> sorted(out), out["loss"].shape
    (['loss', 'loss_box', 'loss_cls', 'loss_obj'], torch.Size([]))
    """

    def __init__(
        self,
        num_classes: int,
        anchors: Optional[Tensor] = None,
        strides: Sequence[int] = YOLOV3_STRIDES,
        ignore_iou: float = 0.5,
        box_loss: Literal["giou", "diou", "ciou"] = "giou",
        label_smoothing: float = 0.01,
        layout: Literal["nhwc", "nchw"] = "nhwc",
        normalize_by: Literal["batch", "num_pos"] = "batch",
        distributed: bool = False,
        box_weight: float = 1.0,
        obj_weight: float = 1.0,
        cls_weight: float = 1.0,
        *,
        pos_iou: float = 0.3,
        max_boxes_per_scale: int = 150,
        faithful_fallback_clip: bool = False,
        box_eps: Optional[float] = None,
        max_log_scale: float = 10.0,
    ) -> None:
        super().__init__()
        require_positive(num_classes, "num_classes")
        require_choice(box_loss, "box_loss", BOX_LOSSES)
        require_choice(layout, "layout", ("nhwc", "nchw"))
        require_choice(normalize_by, "normalize_by", ("batch", "num_pos"))
        require_positive(label_smoothing, "label_smoothing", allow_zero=True)
        require_positive(max_boxes_per_scale, "max_boxes_per_scale")
        if box_eps is not None:
            require_positive(box_eps, "box_eps")
        for name, value in (("box_weight", box_weight), ("obj_weight", obj_weight), ("cls_weight", cls_weight)):
            require_positive(value, name, allow_zero=True)
        strides = tuple(int(s) for s in strides)
        if anchors is None:
            anchors = yolov3_anchors(grid_units=True, strides=strides)
        anchors = require_floating(require_tensor(anchors, "anchors"), "anchors")
        if anchors.dim() != 3 or anchors.shape[0] != len(strides) or anchors.shape[2] != 2:
            raise ValueError(f"anchors: expected shape (S={len(strides)}, A, 2), got {tuple(anchors.shape)}")
        #: anchor (w, h) per scale in grid units, fixed at construction (immutable)
        self.anchor_sizes: tuple[tuple[tuple[float, float], ...], ...] = tuple(
            tuple((float(w), float(h)) for w, h in scale) for scale in anchors.detach().double().tolist()
        )
        self.num_classes, self.strides = int(num_classes), strides
        self.ignore_iou, self.box_loss, self.label_smoothing = float(ignore_iou), box_loss, float(label_smoothing)
        self.layout, self.normalize_by, self.distributed = layout, normalize_by, distributed
        self.weights = (float(box_weight), float(obj_weight), float(cls_weight))
        self.pos_iou, self.max_boxes_per_scale = float(pos_iou), int(max_boxes_per_scale)
        self.faithful_fallback_clip, self.box_eps, self.max_log_scale = faithful_fallback_clip, box_eps, max_log_scale
        self._constants: dict = {}  # (grid sizes, dtype, device) -> (anchors, cell constants)

    @property
    def anchors(self) -> Tensor:
        """``(S, A, 2)`` float32 anchor (w, h) in grid units (a copy: the module's are fixed)."""
        return torch.tensor(self.anchor_sizes, dtype=torch.float32)

    def forward(
        self,
        outputs: Sequence[Tensor],
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
        *,
        return_assignment: bool = False,
    ) -> dict:
        heads, image_hw = yolo_head_views(
            outputs, require_tensor(gt_boxes, "gt_boxes").shape[0], self.strides, len(self.anchor_sizes[0]),
            self.num_classes, self.layout,
        )
        checks = ValueChecks()
        gt_valid = check_yolo_ground_truth(gt_boxes, gt_labels, gt_valid, self.num_classes, image_hw, checks)
        checks.run()
        anchors, cell_constants = self._constants_for(heads)
        # targets: which anchor slot of which scale answers for each object (tensorflow-yolov3's
        # preprocess_true_boxes); decode, ignore mask, box, objectness and class terms
        match = assign_yolo_anchors_unchecked(
            gt_boxes, gt_valid, anchors=anchors, strides=self.strides, image_hw=image_hw, pos_iou=self.pos_iou,
            max_boxes_per_scale=self.max_boxes_per_scale, faithful_fallback_clip=self.faithful_fallback_clip,
        )
        targets = yolo_slot_targets(match, gt_labels, self.num_classes, self.label_smoothing)
        terms = yolov3_terms(
            heads, anchors, self.strides, targets, ignore_iou=self.ignore_iou, box_loss=self.box_loss,
            box_eps=self.box_eps, max_log_scale=self.max_log_scale, cell_constants=cell_constants,
        )
        # normalise: per image (the original) or per responsible slot
        if self.normalize_by == "batch":
            norm = float(max(len(gt_boxes), 1))
        else:
            norm = positive_normalizer(targets.responsible.sum(), distributed=self.distributed)
        loss_box, loss_obj, loss_cls = (term / norm for term in (terms.box, terms.obj, terms.cls))
        wb, wo, wc = self.weights
        result = {
            "loss_box": loss_box,
            "loss_obj": loss_obj,
            "loss_cls": loss_cls,
            "loss": wb * loss_box + wo * loss_obj + wc * loss_cls,
        }
        if return_assignment:
            sizes = [h.shape[1] * h.shape[2] * h.shape[3] for h in heads]
            per_scale = lambda t: tuple(part.view(h.shape[:4]) for part, h in zip(t.split(sizes, dim=1), heads))  # noqa: E731
            result["assignment"] = YOLOv3LossAssignment(
                match, per_scale(targets.responsible), per_scale(terms.background), per_scale(terms.max_iou)
            )
        return result

    def _constants_for(self, heads: Sequence[Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The anchors on the heads' device and :func:`yolo_cell_constants` of these heads, kept per
        grid sizes, dtype and device (the anchors never change; under ``torch.compile`` they are
        constants of the graph, built in it)."""
        grid_hws = tuple((h.shape[1], h.shape[2]) for h in heads)
        dtype, device = compute_dtype(heads[0]), heads[0].device
        key = (grid_hws, dtype, device)
        if torch.compiler.is_compiling() or key not in self._constants:
            anchors = device_constant(self.anchor_sizes, dtype=torch.float32, device=device)
            constants = (anchors, yolo_cell_constants(grid_hws, anchors, self.strides, dtype, device))
            if torch.compiler.is_compiling():
                return constants
            self._constants[key] = constants
        return self._constants[key]

