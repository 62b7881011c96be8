"""YOLOv3 loss (Redmon & Farhadi 2018, arXiv:1804.02767) in tensorflow-yolov3's formulation.

Per scale, with the assignment of :mod:`detloss.matching.yolo`:

* box:  ``sum_resp (2 - w * h / (H_in * W_in)) * (1 - IoU-family(pred, target))`` with the
  target w, h in input pixels (GIoU by default; DIoU/CIoU selectable);
* objectness: ``|t - sigmoid(x)|^2 * BCE(x, t)`` (the focal factor is *not* detached), over
  responsible cells (``t = 1``) and background cells (``t = 0``) whose predicted box has a
  plain IoU below ``ignore_iou`` with every true box **of the same scale**; the other
  background cells are ignored (the mask carries no gradient);
* class: ``sum_resp sum_c BCE(class logit, smoothed one-hot)``.

Each term is summed over cells, anchors and channels, then divided by the batch size
(``normalize_by="batch"``, the original) or by the number of responsible slots
(``normalize_by="num_pos"``, through :func:`detloss.functional.positive_normalizer`).
Images without boxes contribute background objectness only.

Head layout: per scale ``(B, H, W, A * (5 + C))`` (``layout="nhwc"``, TensorFlow) or
``(B, A * (5 + C), H, W)`` (``"nchw"``); channels anchor-major, per anchor
``[tx, ty, tw, th, objectness logit, class logits...]``. The input size is ``stride * H``.

Differences from the original, by default (options restore it where the drop-in needs it):
the fallback cell is clipped with its own grid (``faithful_fallback_clip``); the box-IoU
denominators are clamped at ``box_eps`` (1e-7) instead of adding 1e-6; the ignore IoU
clamps its union at 1e-7 (the original has no epsilon: a zero-area prediction gave NaN);
decoded sizes use ``exp(min(t_wh, max_log_scale))``.

The ignore IoU of ``B x H*W*A`` predictions against the ``M`` true boxes is computed
``max_iou_chunk`` elements at a time, so memory stays bounded whatever ``M`` is.

:class:`YOLOv3Loss` works on all scales at once: the candidate box and class terms
(:func:`yolo_candidate_terms`), the decode of every cell, the ignore rule
(:func:`yolo_background` with ``scale_sizes``: each cell against its own scale's true boxes)
and the objectness focal sum. :func:`yolo_scale_terms` is the same computation for one scale (the
tensorflow-yolov3 drop-in's ``loss_layer``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from .._memory import new_like, one_channel_like
from .._validate import require_choice, require_floating, require_positive, require_tensor
from ..strategy import host_sync_is_free
from ..boxes import ChunkedPairwiseIoU, aligned_box_iou_unchecked, compute_dtype, cxcywh_to_xyxy
from ..coders import decode_yolo_cells
from ..functional import binary_cross_entropy_with_logits, positive_normalizer, weighted_reduce
from ..functional.selection import RowSelection
from ..functional.yolo_objectness import yolo_objectness_focal_loss
from ..matching.yolo import YoloAssignment, assign_yolo_anchors, smoothed_one_hot
from ..priors import YOLOV3_STRIDES, yolo_grid, yolov3_anchors

__all__ = [
    "YOLOv3Loss", "YOLOv3LossAssignment", "YoloScaleTerms", "gather_head", "yolo_background", "yolo_candidate_terms",
    "yolo_max_iou", "yolo_scale_terms",
]

# Elements of one ignore-IoU block (B x T x predictions): its ~20 temporaries stay cache-sized.
MAX_IOU_CHUNK = 1 << 17


def yolo_max_iou(
    pred_boxes: Tensor,
    true_cxcywh: Tensor,
    true_valid: Optional[Tensor] = None,
    *,
    eps: Optional[float] = None,
    chunk_elements: int = MAX_IOU_CHUNK,
    pred_format: Literal["cxcywh", "xyxy"] = "cxcywh",
    scale_sizes: Optional[Sequence[int]] = None,
) -> Tensor:
    """Best plain IoU of each prediction with any valid true box (of its own scale), without gradient.

    ``pred_boxes (B, N, 4)`` (``pred_format``: centre/size or corners; coordinate-major
    memory avoids a copy) and ``true_cxcywh (B, T, 4)`` centre/size boxes (same units),
    ``true_valid (B, T)`` bool (None: all rows count; all-zero rows give IoU 0 anyway).
    Returns ``(B, N)``, 0 where there is no valid true box. Works ``chunk_elements // (B * T)``
    predictions at a time (:class:`detloss.boxes.ChunkedPairwiseIoU`).

    ``scale_sizes``: the predictions are the cells of ``S`` scales one after another, this many
    of each (summing to ``N``), and ``true_valid`` is ``(B, S, T)``: which true boxes belong to
    each scale. Each prediction is compared with its own scale's boxes only; the predictions'
    coordinate planes and areas are prepared once for all scales.
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
        out = pred_boxes.new_zeros(batch, n, dtype=dtype)
        if t == 0 or n == 0:
            return out
        true_xyxy = cxcywh_to_xyxy(true_cxcywh.detach().to(dtype))
        rows = true_xyxy[:, None].expand(-1, len(sizes), -1, -1)  # (B, S, T, 4)
        counts = [t] * len(sizes)
        if per_scale is not None and host_sync_is_free(per_scale):
            # the true-box lists are padded (to 150 per scale in the original) and mostly empty:
            # per scale keep only as many rows as the fullest image has valid ones (the max
            # ignores order)
            counts = per_scale.sum(dim=2).amax(dim=0).tolist()
            order = torch.sort((~per_scale).to(torch.uint8), dim=2, stable=True).indices  # (B, S, T)
            rows = true_xyxy.gather(1, order.flatten(1).unsqueeze(-1).expand(-1, -1, 4)).view(rows.shape)
            per_scale = per_scale.gather(2, order)
        pred_xyxy = pred_boxes.detach().to(dtype)
        if pred_format == "cxcywh":
            pred_xyxy = cxcywh_to_xyxy(pred_xyxy)
        iou_of: Optional[ChunkedPairwiseIoU] = None
        ends = list(itertools.accumulate(sizes))
        for s, (first, last, count) in enumerate(zip([0] + ends[:-1], ends, counts)):
            if count == 0 or first == last:
                continue
            scale_rows = rows[:, s, :count]
            scale_valid = None if per_scale is None else per_scale[:, s, :count]
            if iou_of is None:
                iou_of = ChunkedPairwiseIoU(scale_rows, pred_xyxy, rows_valid=scale_valid, eps=eps)
            else:
                iou_of = iou_of.with_rows(scale_rows, rows_valid=scale_valid)
            step = max(1, chunk_elements // (batch * count))
            for start in range(first, last, step):
                stop = min(start + step, last)
                out[:, start:stop] = iou_of(start, stop).amax(1).clamp(min=0)  # (B, T, chunk) -> (B, chunk)
        return out


class _HeadsGather(torch.autograd.Function):
    """``gather_heads``'s forward (copies) and backward (one gradient per head, written once)."""

    @staticmethod
    def forward(ctx, candidates: tuple[tuple[Tensor, ...], ...], *heads: Tensor):
        ctx.save_for_backward(*heads)
        ctx.candidates = candidates  # per head (image, row, col, anchor), each (B, K)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for ``planes``, which never gets one
        sizes = [h.shape[1] * h.shape[2] * h.shape[3] for h in heads]
        planes = heads[0].new_empty(heads[0].shape[0], 5, sum(sizes))  # (B, 5, N), channel-major
        picked, first = [], 0
        for head, index, size in zip(heads, candidates, sizes):
            # one strided read of the first five channels of every cell, written channel-major
            block = planes[:, :, first : first + size].view(head.shape[0], 5, *head.shape[1:4])
            block.copy_(head[..., :5].permute(0, 4, 1, 2, 3))
            picked.append(head[index])  # (B, K, 5 + C)
            first += size
        picked = torch.cat(picked, dim=1)
        ctx.mark_non_differentiable(planes)
        return picked[..., :4].contiguous(), planes[:, 4], picked[..., 5:].contiguous(), planes

    @staticmethod
    def backward(ctx, grad_box: Optional[Tensor], grad_obj: Optional[Tensor], grad_cls: Optional[Tensor], _):
        grads, first_cell, first_candidate = [], 0, 0
        for head, index in zip(ctx.saved_tensors, ctx.candidates):
            size, count = head.shape[1] * head.shape[2] * head.shape[3], index[0].shape[1]
            # the head's memory layout: NCHW maps need no copy back
            if grad_obj is None:
                grad = new_like(head, zero=True)
            else:
                grad = one_channel_like(head, grad_obj[:, first_cell : first_cell + size].reshape(head.shape[:4]), 4)
            if grad_box is not None or grad_cls is not None:
                shape = index[0].shape
                part = slice(first_candidate, first_candidate + count)
                box = head.new_zeros(*shape, 4) if grad_box is None else grad_box[:, part].to(head.dtype)
                cls = head.new_zeros(*shape, head.shape[-1] - 5) if grad_cls is None else grad_cls[:, part].to(head.dtype)
                grad.index_put_(index, torch.cat((box, box.new_zeros(*shape, 1), cls), dim=-1), accumulate=True)
            grads.append(grad)
            first_cell, first_candidate = first_cell + size, first_candidate + count
        return (None, *grads)


def gather_heads(heads: Sequence[Tensor], cells: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Objectness of every cell, box and class channels at ``cells``, of several heads at once.

    ``heads[s] (B, H_s, W_s, A, 5 + C)`` in any memory layout (NHWC maps or permuted NCHW
    ones); ``cells[s] (B, K_s)`` int64 flat cell indices ``(row * W_s + col) * A + a``
    (repeats allowed). Returns, with the heads' cells and candidates one after another,
    ``box (B, K, 4)``, ``obj (B, N)``, ``cls (B, K, C)`` and ``planes (B, 5, N)``: every cell's
    five first channels without gradient, channel-major (``obj`` is a view of its row 4). The
    backward writes each head-sized gradient once (objectness copied, box and class channels
    accumulated at ``cells``) instead of once per slice or gather.
    """
    candidates = []
    for head, index in zip(heads, cells):
        image = torch.arange(head.shape[0], device=head.device)[:, None].expand_as(index)
        candidates.append((image, *_row_col_anchor(index, head.shape[2], head.shape[3])))
    return _HeadsGather.apply(tuple(candidates), *heads)


def _row_col_anchor(cells: Tensor, width: int, n_anchors: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(row, col, anchor)`` of flat cell indices ``(row * width + col) * n_anchors + anchor``."""
    cell, anchor = cells.div(n_anchors, rounding_mode="floor"), cells.remainder(n_anchors)
    return cell.div(width, rounding_mode="floor"), cell.remainder(width), anchor


def gather_head(head: Tensor, cells: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`gather_heads` of one head ``(B, H, W, A, 5 + C)`` with ``cells (B, K)``.

    Returns ``box (B, K, 4)``, ``obj (B, H * W * A)``, ``cls (B, K, C)``, ``cell (B, K, 3)``
    int64 ``(row, col, anchor)`` of each candidate, and ``raw_box (B, H, W, A, 4)``: every
    cell's box channels without gradient, stored channel-major (a view of a ``(B, 4, H, W, A)``
    copy).
    """
    batch, h, w, n_anchors, _ = head.shape
    box, obj, cls, planes = gather_heads([head], [cells])
    raw_box = planes[:, :4].view(batch, 4, h, w, n_anchors).permute(0, 2, 3, 4, 1)
    return box, obj, cls, torch.stack(_row_col_anchor(cells, w, n_anchors), dim=-1), raw_box


@dataclass
class YoloScaleTerms:
    """Summed loss terms of one scale (0-d) and what produced them.

    ``box``, ``obj``, ``cls``: weighted sums over the batch (not yet normalised).
    ``box_iou (B, K)``: IoU-family value at each positive candidate (0 where its weight is 0).
    ``max_iou (B, N)``: best IoU of each prediction with the scale's true boxes.
    ``background (B, N)`` bool: cells counted as objectness negatives.
    """

    box: Tensor
    obj: Tensor
    cls: Tensor
    box_iou: Tensor
    max_iou: Tensor
    background: Tensor


def yolo_candidate_terms(
    pred_pos: Tensor,
    cls_logits: Tensor,
    box_target: Tensor,
    cls_target: Tensor,
    pos_weight: Tensor,
    *,
    image_area: float,
    box_loss: str = "giou",
    box_eps: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The box and class terms of ``K`` candidate cells (of one scale or of several), summed.

    Args:
        pred_pos, cls_logits: ``(B, K, 4)`` decoded cxcywh boxes (input pixels) and
            ``(B, K, C)`` class logits of the candidates; gradients flow through them.
        box_target, cls_target, pos_weight: ``(B, K, 4)`` cxcywh pixels, ``(B, K, C)`` class
            targets and ``(B, K)`` 0/1 weights of the candidates.
        image_area: ``H_in * W_in`` pixels, for the box weight ``2 - w * h / image_area``.
        box_loss: ``"giou"``, ``"diou"`` or ``"ciou"``; ``box_eps`` its denominator clamp.

    Returns ``(box, cls, box_iou)``: the two weighted sums (0-d) and the IoU-family value at
    each candidate ``(B, K)`` (0 where its weight is 0). Only candidates of non-zero weight
    are computed (gathered on the CPU, :class:`detloss.functional.selection.RowSelection`).
    """
    require_choice(box_loss, "box_loss", ("giou", "diou", "ciou"))
    if box_eps is not None:
        require_positive(box_eps, "box_eps")
    dtype = compute_dtype(pred_pos)
    candidates = RowSelection(pos_weight != 0)
    box_target = candidates.take(box_target).to(dtype)
    weight = candidates.take(pos_weight).to(dtype)
    iou = aligned_box_iou_unchecked(
        cxcywh_to_xyxy(candidates.take(pred_pos).to(dtype)), cxcywh_to_xyxy(box_target), box_loss, box_eps
    )
    box_scale = 2.0 - box_target[..., 2] * box_target[..., 3] / image_area
    box = weighted_reduce(1.0 - iou, weight * box_scale, "sum")
    cls = binary_cross_entropy_with_logits(
        candidates.take(cls_logits), candidates.take(cls_target).to(dtype), weight=weight[..., None], reduction="sum"
    )
    return box, cls, candidates.scatter(iou.detach())


def yolo_background(
    pred_boxes: Tensor,
    respond: Tensor,
    true_cxcywh: Tensor,
    *,
    true_valid: Optional[Tensor] = None,
    ignore_iou: float = 0.5,
    ignore_eps: Optional[float] = None,
    pred_format: Literal["cxcywh", "xyxy"] = "cxcywh",
    scale_sizes: Optional[Sequence[int]] = None,
) -> tuple[Tensor, Tensor]:
    """The ignore rule of one scale (or of several at once): which cells count as objectness negatives.

    Args:
        pred_boxes: ``(B, N, 4)`` decoded boxes (``pred_format``, input pixels) of the
            ``N = H * W * A`` cells (row, col, anchor); no gradient.
        respond: ``(B, N)`` responsibility of each cell (bool or 0/1, the objectness target).
        true_cxcywh, true_valid: ``(B, T, 4)`` true boxes of this scale and ``(B, T)`` bool
            validity (None: all).
        ignore_iou: background cells whose best IoU reaches this get no objectness loss.
        ignore_eps: union clamp of the ignore IoU (None: 1e-7; the original divides by the bare union).
        pred_format: ``"cxcywh"`` or ``"xyxy"``, the format of ``pred_boxes``.
        scale_sizes: the cells of several scales one after another, this many of each;
            ``true_valid`` is then ``(B, S, T)``, each scale's own true boxes
            (:func:`yolo_max_iou`).

    Returns ``(max_iou (B, N), background (B, N) bool)``: each prediction's best IoU with the
    true boxes, and the non-responsible cells below ``ignore_iou``.
    """
    max_iou = yolo_max_iou(
        pred_boxes, true_cxcywh, true_valid, eps=ignore_eps, pred_format=pred_format, scale_sizes=scale_sizes
    )
    return max_iou, (respond == 0) & (max_iou < ignore_iou)


def yolo_scale_terms(
    obj_logits: Tensor,
    pred_boxes: Tensor,
    respond: Tensor,
    pred_pos: Tensor,
    cls_logits: Tensor,
    box_target: Tensor,
    cls_target: Tensor,
    pos_weight: Tensor,
    true_cxcywh: Tensor,
    *,
    true_valid: Optional[Tensor] = None,
    image_area: float,
    ignore_iou: float = 0.5,
    box_loss: str = "giou",
    box_eps: Optional[float] = None,
    ignore_eps: Optional[float] = None,
    pred_format: Literal["cxcywh", "xyxy"] = "cxcywh",
) -> YoloScaleTerms:
    """The three YOLOv3 terms of one scale, summed over the batch: :func:`yolo_candidate_terms`
    of ``K`` candidates (gathered at their cells by the caller, or every cell with ``K = N``
    for dense labels as in the original) and the objectness focal sum of the ``N`` cells
    ``obj_logits (B, N)`` with :func:`yolo_background`'s ignore rule; the other arguments are
    theirs.
    """
    box, cls, box_iou = yolo_candidate_terms(
        pred_pos, cls_logits, box_target, cls_target, pos_weight,
        image_area=image_area, box_loss=box_loss, box_eps=box_eps,
    )
    max_iou, background = yolo_background(
        pred_boxes, respond, true_cxcywh,
        true_valid=true_valid, ignore_iou=ignore_iou, ignore_eps=ignore_eps, pred_format=pred_format,
    )
    respond = respond.to(compute_dtype(obj_logits))
    obj = yolo_objectness_focal_loss(obj_logits, respond, respond + background.to(respond.dtype))
    return YoloScaleTerms(box, obj, cls, box_iou, max_iou, background)


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
        require_choice(box_loss, "box_loss", ("giou", "diou", "ciou"))
        require_choice(layout, "layout", ("nhwc", "nchw"))
        require_choice(normalize_by, "normalize_by", ("batch", "num_pos"))
        require_positive(label_smoothing, "label_smoothing", allow_zero=True)
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
        self._cell_table_key: Optional[tuple] = None
        self._cell_table: tuple[Tensor, ...] = ()

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

    def _cell_tables(self, input_hw: tuple[int, int], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
        """Per-cell decode constants of all scales in head order ``(row, col, anchor)``:
        ``(cell_xy, anchor_wh, stride)``, shapes ``(1, N, 2)``, ``(1, N, 2)``, ``(1, N, 1)``,
        the first two coordinate-major like the decoded planes. Kept in eager mode while the
        input size, dtype, device and anchors stay the same (under ``torch.compile`` they are
        constants of the graph)."""
        if torch.compiler.is_compiling():
            return self._build_cell_tables(input_hw, dtype, device)
        key = (input_hw, dtype, device, self.anchors.data_ptr(), self.anchors._version)
        if self._cell_table_key != key:
            self._cell_table = self._build_cell_tables(input_hw, dtype, device)
            self._cell_table_key = key
        return self._cell_table

    def _build_cell_tables(self, input_hw: tuple[int, int], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
        xy_parts, anchor_parts, stride_parts = [], [], []
        for stride, scale_anchors in zip(self.strides, self.anchors.to(device=device, dtype=dtype)):
            grid = yolo_grid(input_hw[0] // stride, input_hw[1] // stride, device=device, dtype=dtype)
            n_anchors = scale_anchors.shape[0]
            xy_parts.append(grid[:, :, None, :].expand(-1, -1, n_anchors, -1).reshape(-1, 2))
            anchor_parts.append(scale_anchors.repeat(grid.shape[0] * grid.shape[1], 1))
            stride_parts.append(torch.full((xy_parts[-1].shape[0], 1), float(stride), device=device, dtype=dtype))
        coordinate_major = lambda t: t.t().contiguous().t().unsqueeze(0)  # noqa: E731
        return (
            coordinate_major(torch.cat(xy_parts)), coordinate_major(torch.cat(anchor_parts)),
            torch.cat(stride_parts).unsqueeze(0),
        )

    def forward(
        self,
        outputs: Sequence[Tensor],
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
        *,
        return_assignment: bool = False,
    ) -> dict:
        batch = require_tensor(gt_boxes, "gt_boxes").shape[0]
        heads, input_hw = self._heads(outputs, batch)
        anchors = self.anchors.to(device=heads[0].device)
        match = assign_yolo_anchors(
            gt_boxes, gt_labels, gt_valid, num_classes=self.num_classes, anchors=anchors,
            strides=self.strides, input_size=input_hw, pos_iou=self.pos_iou,
            max_boxes_per_scale=self.max_boxes_per_scale, faithful_fallback_clip=self.faithful_fallback_clip,
        )
        dtype = compute_dtype(heads[0])
        gt = match.gt_cxcywh.to(dtype)
        n_anchors = anchors.shape[1]
        per_gt_cls = smoothed_one_hot(gt_labels, self.num_classes, self.label_smoothing).to(dtype)
        repeat = lambda t: t[:, :, None].expand(-1, -1, n_anchors, *t.shape[2:]).flatten(1, 2)  # noqa: E731
        # One gather for all scales (objectness everywhere, box and classes at the candidates):
        # the backward then writes each head-sized gradient once.
        slots = [slot.flatten(1) for slot in match.slot]
        box_raw, obj_logits, cls_logits, planes = gather_heads(heads, slots)
        sizes = [h.shape[1] * h.shape[2] * h.shape[3] for h in heads]
        # every cell of every scale decoded at once without autograd, channel-major, for the
        # ignore rule; then that rule for all scales at once (each cell against its own scale's
        # true boxes)
        cell_xy, cell_anchor, cell_stride = self._cell_tables(input_hw, dtype, heads[0].device)
        raw = planes[:, :4].to(dtype).transpose(1, 2)  # (B, N, 4), coordinate-major
        pred = decode_yolo_cells(
            raw, cell_xy, cell_anchor, cell_stride, max_log_scale=self.max_log_scale, box_format="xyxy"
        )
        responsible = torch.cat(match.winner, dim=1) >= 0  # (B, N)
        max_iou, is_background = yolo_background(
            pred, responsible, gt, true_valid=torch.stack(match.in_list, dim=1), ignore_iou=self.ignore_iou,
            pred_format="xyxy", scale_sizes=sizes,
        )
        # targets 1 on responsible cells; weight 1 there and on background cells (disjoint sets)
        respond, counted = responsible.to(dtype), (responsible | is_background).to(dtype)
        loss_obj = yolo_objectness_focal_loss(obj_logits, respond, counted)

        # the candidates of all scales in one pass (the same K = M * A slots per scale);
        # gradients flow through the candidates' boxes only
        rows = torch.cat([slot + first for slot, first in zip(slots, [0, *itertools.accumulate(sizes)])], dim=1)

        def at_candidates(table: Tensor) -> Tensor:  # (1, N, D) -> (B, S * K, D)
            return table[0].index_select(0, rows.flatten()).view(*rows.shape, table.shape[-1])

        pred_pos = decode_yolo_cells(
            box_raw.to(dtype), at_candidates(cell_xy), at_candidates(cell_anchor),
            at_candidates(cell_stride), max_log_scale=self.max_log_scale,
        )
        n_scales = len(heads)
        loss_box, loss_cls, _ = yolo_candidate_terms(
            pred_pos, cls_logits, repeat(gt).repeat(1, n_scales, 1), repeat(per_gt_cls).repeat(1, n_scales, 1),
            torch.cat([p.flatten(1) for p in match.positive], dim=1),
            image_area=float(input_hw[0] * input_hw[1]), box_loss=self.box_loss, box_eps=self.box_eps,
        )
        if self.normalize_by == "batch":
            norm = float(max(batch, 1))
        else:
            norm = positive_normalizer(responsible.sum(), distributed=self.distributed)
        loss_box, loss_obj, loss_cls = (term / norm for term in (loss_box, loss_obj, loss_cls))
        wb, wo, wc = self.weights
        result = {
            "loss_box": loss_box,
            "loss_obj": loss_obj,
            "loss_cls": loss_cls,
            "loss": wb * loss_box + wo * loss_obj + wc * loss_cls,
        }
        if return_assignment:
            per_scale = lambda t: tuple(part.view(h.shape[:4]) for part, h in zip(t.split(sizes, dim=1), heads))  # noqa: E731
            result["assignment"] = YOLOv3LossAssignment(
                match, per_scale(responsible), per_scale(is_background), per_scale(max_iou)
            )
        return result
