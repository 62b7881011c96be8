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

from .. import _chunking
from .._memory import new_like
from .._validate import ValueChecks, require_choice, require_floating, require_positive, require_tensor
from ..boxes import ChunkedPairwiseIoU, aligned_box_iou_unchecked, compute_dtype, cxcywh_to_xyxy
from ..coders import decode_yolo_cells
from ..functional import binary_cross_entropy_with_logits, positive_normalizer, weighted_reduce
from ..functional.yolo_objectness import yolo_objectness_focal_loss
from ..matching.yolo import (
    YoloAssignment,
    assign_yolo_anchors_unchecked,
    check_yolo_ground_truth,
    smoothed_one_hot,
)
from ..priors import YOLOV3_STRIDES, yolo_grid, yolov3_anchors

__all__ = [
    "YOLOv3Loss", "YOLOv3LossAssignment", "YoloSlotTargets", "YoloTerms", "yolo_cell_constants", "yolo_max_iou",
    "yolov3_terms",
]

BOX_LOSSES = ("giou", "diou", "ciou")


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


def yolo_cell_constants(
    grid_hws: Sequence[tuple[int, int]], anchors: Tensor, strides: Sequence[int], dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode constants of every cell of every scale, in head order ``(row, col, anchor)``:
    ``cell_xy (N, 2)`` (column, row), ``anchor_wh (N, 2)`` grid units (both coordinate-major),
    ``stride (N, 1)``."""
    xy, wh, stride = [], [], []
    for (h, w), scale_anchors, s in zip(grid_hws, anchors.to(device=device, dtype=dtype), strides):
        n_anchors = scale_anchors.shape[0]
        xy.append(yolo_grid(h, w, device=device, dtype=dtype)[:, :, None, :].expand(-1, -1, n_anchors, -1).reshape(-1, 2))
        wh.append(scale_anchors.repeat(h * w, 1))
        stride.append(torch.full((h * w * n_anchors, 1), float(s), device=device, dtype=dtype))
    coordinate_major = lambda t: t.t().contiguous().t()  # noqa: E731  (like the decoded planes)
    return coordinate_major(torch.cat(xy)), coordinate_major(torch.cat(wh)), torch.cat(stride)


class _GatherHeads(torch.autograd.Function):
    """:func:`gather_heads`: copies forward; one gradient per head, written once, backward."""

    @staticmethod
    def forward(ctx, candidates: tuple[tuple[Tensor, ...], ...], *heads: Tensor):
        ctx.save_for_backward(*heads)
        ctx.candidates = candidates  # per head (image, row, col, anchor), each (B, K_s)
        # the first five channels of every cell, channel-major (B, 5, N): one strided read per
        # head, and the decode then runs on contiguous coordinate planes
        sizes = [h.shape[1] * h.shape[2] * h.shape[3] for h in heads]
        planes = heads[0].new_empty(heads[0].shape[0], 5, sum(sizes))
        for head, first, size in zip(heads, itertools.accumulate(sizes[:-1], initial=0), sizes):
            planes[:, :, first : first + size].view(head.shape[0], 5, *head.shape[1:4]).copy_(
                head[..., :5].permute(0, 4, 1, 2, 3)
            )
        picked = torch.cat([h[index] for h, index in zip(heads, candidates)], dim=1)  # (B, K, 5 + C)
        all_boxes = planes[:, :4].transpose(1, 2)
        ctx.mark_non_differentiable(all_boxes)
        return picked[..., :4].contiguous(), planes[:, 4], picked[..., 5:].contiguous(), all_boxes

    @staticmethod
    def backward(ctx, grad_box: Tensor, grad_obj: Tensor, grad_cls: Tensor, _):
        grads, first_cell, first_candidate = [], 0, 0
        for head, index in zip(ctx.saved_tensors, ctx.candidates):
            cells, count = head.shape[1] * head.shape[2] * head.shape[3], index[0].shape[1]
            grad = new_like(head, zero=True)  # the head's memory layout: NCHW maps need no copy back
            grad[..., 4] = grad_obj[:, first_cell : first_cell + cells].view(head.shape[:4])
            part = slice(first_candidate, first_candidate + count)
            picked = torch.cat((grad_box[:, part], grad_box.new_zeros(*index[0].shape, 1), grad_cls[:, part]), dim=-1)
            grad.index_put_(index, picked.to(grad.dtype), accumulate=True)
            grads.append(grad)
            first_cell, first_candidate = first_cell + cells, first_candidate + count
        return (None, *grads)


def gather_heads(heads: Sequence[Tensor], cells: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Box and class channels at ``cells``, objectness and (without gradient) box channels of
    every cell, of several heads.

    ``heads[s] (B, H_s, W_s, A, 5 + C)`` in any memory layout; ``cells[s] (B, K_s)`` int64 flat
    cell indices ``(row * W_s + col) * A + a`` (repeats allowed). Returns, the heads one after
    another, ``box (B, K, 4)``, ``obj (B, N)``, ``cls (B, K, C)`` and ``all_boxes (B, N, 4)``
    (coordinate-major memory, no gradient). Autograd through a slice and an index would write
    each head-sized gradient twice and add them up; this backward writes it once.
    """
    candidates = []
    for head, index in zip(heads, cells):
        n_anchors, width = head.shape[3], head.shape[2]
        cell, anchor = index.div(n_anchors, rounding_mode="floor"), index.remainder(n_anchors)
        image = torch.arange(head.shape[0], device=head.device)[:, None].expand_as(index)
        candidates.append((image, cell.div(width, rounding_mode="floor"), cell.remainder(width), anchor))
    return _GatherHeads.apply(tuple(candidates), *heads)


def yolo_max_iou(
    pred_boxes: Tensor,
    true_cxcywh: Tensor,
    true_valid: Optional[Tensor] = None,
    *,
    eps: Optional[float] = None,
    chunk_elements: Optional[int] = None,
    pred_format: Literal["cxcywh", "xyxy"] = "cxcywh",
    scale_sizes: Optional[Sequence[int]] = None,
) -> Tensor:
    """Best IoU of each prediction with any valid true box (of its own scale), without gradient.

    The IoU of the ignore rule: ``inter / max(union, eps)`` (``eps`` default 1e-7; the original
    has none, so a zero-area prediction gave NaN there).

    ``pred_boxes (B, N, 4)`` (``pred_format``: centre/size or corners) and ``true_cxcywh
    (B, T, 4)`` centre/size boxes (same units), ``true_valid (B, T)`` bool (None: all rows
    count; all-zero rows give IoU 0 anyway). Returns ``(B, N)``, 0 where there is no valid true
    box. Works ``chunk_elements // (B * T)`` predictions at a time
    (:class:`detloss.boxes.ChunkedPairwiseIoU`), so memory stays bounded whatever ``T`` is
    (None: :data:`detloss._chunking.YOLO_IGNORE_IOU` on the CPU in eager mode, larger blocks on accelerators and
    under ``torch.compile``).

    ``scale_sizes``: the predictions are the cells of ``S`` scales one after another, this many
    of each (summing to ``N``), and ``true_valid`` is ``(B, S, T)``: which true boxes belong to
    each scale. Each prediction is compared with its own scale's boxes only.
    """
    require_choice(pred_format, "pred_format", ("cxcywh", "xyxy"))
    batch, n, t = pred_boxes.shape[0], pred_boxes.shape[1], true_cxcywh.shape[1]
    sizes = [n] if scale_sizes is None else [int(v) for v in scale_sizes]
    per_scale = true_valid  # (B, S, T) validity, or None: every row counts
    if true_valid is not None and scale_sizes is None:
        per_scale = true_valid[:, None]
    if sum(sizes) != n or (per_scale is not None and tuple(per_scale.shape) != (batch, len(sizes), t)):
        raise ValueError(
            f"scale_sizes, true_valid: expected sizes summing to N={n} and true_valid of shape "
            f"(B={batch}, S={len(sizes)}, T={t}), got {scale_sizes} and "
            f"{None if true_valid is None else tuple(true_valid.shape)}"
        )
    with torch.no_grad():
        dtype = compute_dtype(pred_boxes)
        if t == 0 or n == 0:
            return pred_boxes.new_zeros(batch, n, dtype=dtype)
        true_xyxy = cxcywh_to_xyxy(true_cxcywh.detach().to(dtype))
        pred_xyxy = pred_boxes.detach().to(dtype)
        if pred_format == "cxcywh":
            pred_xyxy = cxcywh_to_xyxy(pred_xyxy)
        # a true box outside a scale's list becomes the empty box (0, 0, 0, 0) there: its IoU with
        # every prediction is exactly 0, so no validity shift and no clamp of the maxima are needed
        rows_of_scale = lambda s: true_xyxy if per_scale is None else torch.where(  # noqa: E731
            per_scale[:, s, :, None], true_xyxy, 0.0
        )
        iou_of = ChunkedPairwiseIoU(rows_of_scale(0), pred_xyxy, eps=eps)
        if chunk_elements is None:
            chunk_elements = _chunking.chunk_elements(pred_xyxy.device, _chunking.YOLO_IGNORE_IOU)
        step = max(1, chunk_elements // (batch * t))
        ends, maxima = list(itertools.accumulate(sizes)), []
        for s, (first, last) in enumerate(zip([0] + ends[:-1], ends)):
            if s > 0:
                iou_of = iou_of.with_rows(rows_of_scale(s))
            for start in range(first, last, step):
                maxima.append(iou_of.clamped_ratio(start, min(start + step, last)).amax(1))  # (B, T, chunk) -> (B, chunk)
        return torch.cat(maxima, dim=1)


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
        self.register_buffer("anchors", anchors.detach().clone().float(), persistent=False)
        self.num_classes, self.strides = int(num_classes), strides
        self.ignore_iou, self.box_loss, self.label_smoothing = float(ignore_iou), box_loss, float(label_smoothing)
        self.layout, self.normalize_by, self.distributed = layout, normalize_by, distributed
        self.weights = (float(box_weight), float(obj_weight), float(cls_weight))
        self.pos_iou, self.max_boxes_per_scale = float(pos_iou), int(max_boxes_per_scale)
        self.faithful_fallback_clip, self.box_eps, self.max_log_scale = faithful_fallback_clip, box_eps, max_log_scale
        self._kept_cells: tuple = (None, None)

    def forward(
        self,
        outputs: Sequence[Tensor],
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
        *,
        return_assignment: bool = False,
    ) -> dict:
        heads, input_hw = self._heads(outputs, require_tensor(gt_boxes, "gt_boxes").shape[0])
        checks = ValueChecks()
        gt_valid = check_yolo_ground_truth(gt_boxes, gt_labels, gt_valid, self.num_classes, input_hw, checks)
        checks.run()
        anchors = self.anchors.to(device=heads[0].device)
        # targets: which anchor slot of which scale answers for each object (tensorflow-yolov3's
        # preprocess_true_boxes); decode, ignore mask, box, objectness and class terms
        match = assign_yolo_anchors_unchecked(
            gt_boxes, gt_valid, anchors=anchors, strides=self.strides, input_hw=input_hw, pos_iou=self.pos_iou,
            max_boxes_per_scale=self.max_boxes_per_scale, faithful_fallback_clip=self.faithful_fallback_clip,
        )
        targets = self._slot_targets(match, gt_labels)
        terms = yolov3_terms(
            heads, anchors, self.strides, targets, ignore_iou=self.ignore_iou, box_loss=self.box_loss,
            box_eps=self.box_eps, max_log_scale=self.max_log_scale, cell_constants=self._cell_constants(heads),
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

    def _cell_constants(self, heads: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`yolo_cell_constants` of these heads, kept while the grid sizes, dtype, device and
        anchors stay the same (under ``torch.compile`` they are constants of the graph)."""
        grid_hws = tuple((h.shape[1], h.shape[2]) for h in heads)
        dtype, device = compute_dtype(heads[0]), heads[0].device
        if torch.compiler.is_compiling():
            return yolo_cell_constants(grid_hws, self.anchors, self.strides, dtype, device)
        key = (grid_hws, dtype, device, self.anchors.data_ptr(), self.anchors._version)
        if self._kept_cells[0] != key:
            self._kept_cells = (key, yolo_cell_constants(grid_hws, self.anchors, self.strides, dtype, device))
        return self._kept_cells[1]

    def _slot_targets(self, match: YoloAssignment, gt_labels: Tensor) -> YoloSlotTargets:
        """Each (object, anchor) pair's slot on every scale is a candidate (``K_s = M * A``), with
        the object's box and smoothed class as targets, weighted 1 where the pair won its slot."""
        n_scales, n_anchors = len(match.slot), match.slot[0].shape[-1]
        per_pair = lambda t: t[:, :, None].expand(-1, -1, n_anchors, *t.shape[2:]).flatten(1, 2)  # noqa: E731
        per_candidate = lambda t: per_pair(t).repeat(1, n_scales, *([1] * (t.dim() - 2)))  # noqa: E731
        return YoloSlotTargets(
            candidates=tuple(slot.flatten(1) for slot in match.slot),
            box=per_candidate(match.gt_cxcywh),
            cls=per_candidate(smoothed_one_hot(gt_labels, self.num_classes, self.label_smoothing)),
            weight=torch.cat([p.flatten(1) for p in match.positive], dim=1),
            responsible=torch.cat(match.winner, dim=1) >= 0,
            true_boxes=match.gt_cxcywh,
            true_valid=torch.stack(match.in_list, dim=1),
        )

    def _heads(self, outputs: Sequence[Tensor], batch: int) -> tuple[list[Tensor], tuple[int, int]]:
        """Validate the head maps; return them as ``(B, H, W, A, 5 + C)`` views and the input (H, W)."""
        n_scales, n_anchors = len(self.strides), self.anchors.shape[1]
        if not isinstance(outputs, (list, tuple)) or len(outputs) != n_scales:
            raise ValueError(f"outputs: expected a sequence of {n_scales} head maps, got {type(outputs).__name__}"
                             f" of length {len(outputs) if isinstance(outputs, (list, tuple)) else '?'}")
        channels = n_anchors * (5 + self.num_classes)
        heads, input_hw = [], None
        for s, (x, stride) in enumerate(zip(outputs, self.strides)):
            name = f"outputs[{s}]"
            require_floating(require_tensor(x, name), name)
            expected = "(B, H, W, A*(5+C))" if self.layout == "nhwc" else "(B, A*(5+C), H, W)"
            c_axis = 3 if self.layout == "nhwc" else 1
            if x.dim() != 4 or x.shape[0] != batch or x.shape[c_axis] != channels:
                raise ValueError(
                    f"{name}: expected shape {expected} with B={batch} (the batch of gt_boxes) and "
                    f"A*(5+C)={n_anchors}*(5+{self.num_classes})={channels}, got {tuple(x.shape)}"
                )
            if self.layout == "nhwc":
                h, w = x.shape[1], x.shape[2]
                x = x.view(batch, h, w, n_anchors, 5 + self.num_classes)
            else:
                h, w = x.shape[2], x.shape[3]
                x = x.view(batch, n_anchors, 5 + self.num_classes, h, w).permute(0, 3, 4, 1, 2)
            hw = (h * stride, w * stride)
            if input_hw is None:
                input_hw = hw
            elif hw != input_hw:
                raise ValueError(
                    f"{name}: expected spatial size {(input_hw[0] // stride, input_hw[1] // stride)} "
                    f"(input {input_hw} / stride {stride}, from outputs[0]), got {(h, w)}"
                )
            heads.append(x)
        return heads, input_hw
