"""Task-aligned assignment (TOOD, Feng et al. 2021, arXiv:2108.07755), as YOLOv8 / YOLO11 use it.

Each ground-truth box picks the ``topk`` anchors whose centres lie inside it and whose
*alignment metric* ``t = s ** alpha * u ** beta`` is largest, where ``s`` is the predicted
probability of the box's class at the anchor and ``u = max(CIoU(gt, predicted box), 0)``.

Steps (the code carries the same numbers):

1. **Candidates**: anchor centres strictly inside the box (margin ``1e-9`` on all four sides).
   A box side shorter than ``min_box_side`` is widened to it about the box centre for this test
   only (ultralytics 8.4 floors at ``stride[1]``); targets keep the true box.
2. **Metric** ``t = s ** alpha * u ** beta`` on the candidates, 0 elsewhere.
3. **Top-k**: each GT keeps its ``topk`` largest metrics (exact ties: lower anchor index
   first, where ultralytics leaves the choice to ``torch.topk``). Only candidates with
   ``t > 0`` become positive: an anchor whose metric is 0 is never foreground. (ultralytics
   takes the top-k over the whole row, so when a box has fewer than ``topk`` positive metrics,
   zero-metric anchors chosen by ``torch.topk``'s tie order become foreground with a zero
   target score; that changes no loss.)
4. **Conflicts**: an anchor positive for several GTs goes to the GT with the largest ``u``
   over *all* GTs (first index on exact ties), as ultralytics' ``argmax`` over the GT axis.
5. **One-to-one** (``topk2 < topk``, YOLO26's one-to-one branch): after step 4 each GT keeps
   only its ``topk2`` positives with the largest metric (ties: lowest anchor index).
6. **Soft scores**: a foreground anchor assigned to GT ``g`` gets
   ``t * max_u(g) / (max_t(g) + eps)`` in its class column, where ``max_t`` and ``max_u`` are
   the largest metric and the largest ``u`` among ``g``'s positives.

Conventions: ``gt_boxes`` and ``pred_boxes`` are ``xyxy`` pixels, ``anchor_points`` pixel
centres; labels are ``0 .. C-1`` with no background column; ``pred_scores`` are
probabilities (already through the sigmoid).

Memory: the ``(B, M, A)`` pair space is never held whole. The GTs are processed in chunks
whose pair tensors hold at most about ``chunk_elements`` elements; what crosses chunks are
running per-anchor reductions (positive count, a positive GT, the best ``u`` so far and its
GT), so the peak extra memory is the outputs plus one chunk, whatever ``M``. The result is
independent of the chunk size bit for bit: per-box terms (areas, aspect angles) are computed
once for all boxes and every pairwise value is built from them with exactly rounded
operations (``+ - * /``, ``min``/``max``); integer ``beta`` is applied by multiplication.

Execution strategies (:mod:`detloss.strategy`): the dense form computes each chunk's whole
``(B, G, A)`` block with fixed shapes (no host read; ``torch.compile(fullgraph=True)`` traces
it). On CPU tensors in eager mode (``"auto"`` / ``"gathered"``) a chunk computes the inside
test on the block, then the CIoU and metric of the candidate pairs only (one host read of
their count): a box covers a few hundred of 8400 anchors, so this skips most of the work
(measured in ``benchmarks/README.md``). Both forms give the same bits.

Rotated boxes (:func:`match_rotated_task_aligned`, ``(cx, cy, w, h, angle)`` pixels): the same
steps and the same chunked core; only the overlap (ProbIoU) and the candidate test (anchor
centre inside the rotated box) differ, through a small table of per-geometry functions.

The assigner's CIoU follows ultralytics' placement of the epsilons (``1e-7`` added to the
union and the squared diagonal, heights clamped at ``1e-7``), so metrics equal its own to
the last bits and the top-k orders agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .._chunking import TASK_ALIGNED_PAIRS, chunk_elements
from ..strategy import host_sync_is_free
from .._validate import (
    ValueChecks,
    require_boxes,
    require_floating,
    require_padded_gt,
    require_positive,
    require_shape,
)
from ..boxes import pair_dtype
from ..rotated_boxes import gaussian_terms, probiou_from_terms, require_rotated_boxes

INSIDE_EPS = 1e-9
CIOU_EPS = 1e-7


@dataclass
class TaskAlignedAssignment:
    """What :func:`match_task_aligned` decided, per anchor.

    * ``foreground (B, A)`` bool.
    * ``matched_gt (B, A)`` int64: the GT slot of a foreground anchor; 0 on background (or
      the slot's index is meaningless there: read it with ``foreground``).
    * ``labels (B, A)`` int64: the GT class on foreground, ``background_label`` elsewhere
      (slot 0's class with ``background_from_slot0``).
    * ``boxes (B, A, 4)``: the matched GT box (xyxy pixels, ``gt_boxes``' dtype; ``(B, A, 5)``
      xywhr for :func:`match_rotated_task_aligned`); zeros on
      background (slot 0's box with ``background_from_slot0``).
    * ``scores (B, A, C)``: the soft target, normalised metric in the label's column, 0 elsewhere.
    * ``metric (B, A)``: the alignment metric ``t`` of the matched pair (0 on background).
    * ``overlap (B, A)``: ``u = max(CIoU, 0)`` (rotated: ``max(ProbIoU, 0)``) of the matched pair
      (0 on background).
    """

    foreground: Tensor
    matched_gt: Tensor
    labels: Tensor
    boxes: Tensor
    scores: Tensor
    metric: Tensor
    overlap: Tensor


# ---------------------------------------------------------------------------------------------
# CIoU from per-box terms (each pairwise value from the same exactly rounded operations)


def _box_terms(boxes: Tensor) -> tuple[Tensor, ...]:
    """``(x1, y1, x2, y2, x1 + x2, y1 + y2, area, aspect angle)`` of ``(..., 4)`` xyxy boxes."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    w, h = x2 - x1, (y2 - y1).clamp(min=CIOU_EPS)
    return x1, y1, x2, y2, x1 + x2, y1 + y2, w * h, torch.atan(w / h)


def _ciou_from_terms(gt: tuple[Tensor, ...], pred: tuple[Tensor, ...]) -> Tensor:
    """CIoU of broadcastable per-box terms (see :func:`_box_terms`), ultralytics' epsilons."""
    gx1, gy1, gx2, gy2, gsx, gsy, garea, gangle = gt
    px1, py1, px2, py2, psx, psy, parea, pangle = pred
    inter = (torch.minimum(gx2, px2) - torch.maximum(gx1, px1)).clamp(min=0) * (
        torch.minimum(gy2, py2) - torch.maximum(gy1, py1)
    ).clamp(min=0)
    iou = inter / (garea + parea - inter + CIOU_EPS)
    cw = torch.maximum(gx2, px2) - torch.minimum(gx1, px1)
    ch = torch.maximum(gy2, py2) - torch.minimum(gy1, py1)
    diag = cw * cw + ch * ch + CIOU_EPS
    dx, dy = psx - gsx, psy - gsy
    rho = (dx * dx + dy * dy) / 4
    dangle = pangle - gangle
    v = dangle * dangle * (4 / math.pi**2)
    alpha = v / (v - iou + (1 + CIOU_EPS))
    return iou - (rho / diag + v * alpha)


def _power(x: Tensor, p: float) -> Tensor:
    """``x ** p`` for ``x >= 0``; integer ``p`` by multiplication (exactly reproducible)."""
    if p == int(p) and 0 <= p <= 16:
        out, base, n, first = torch.ones_like(x), x, int(p), True
        while n:
            if n & 1:
                out = base if first else out * base
                first = False
            n >>= 1
            if n:
                base = base * base
        return out
    return x.pow(p)


def _candidate_corners(boxes: Tensor, valid: Tensor, side: Optional[float]) -> tuple[Tensor, ...]:
    """Per-box terms of the axis-aligned inside test: the (floored) corners ``x1, y1, x2, y2``."""
    return _floored(boxes, valid, side).unbind(-1)


def _inside_corners(box: tuple[Tensor, ...], ax: Tensor, ay: Tensor) -> Tensor:
    """Anchor centres strictly inside axis-aligned boxes (margin ``INSIDE_EPS``); ``(B, G, 1)`` terms."""
    x1, y1, x2, y2 = box
    inside = ((ax - x1) > INSIDE_EPS) & ((ay - y1) > INSIDE_EPS)
    return inside & ((x2 - ax) > INSIDE_EPS) & ((y2 - ay) > INSIDE_EPS)


def _candidate_rotated(boxes: Tensor, valid: Tensor, side: Optional[float]) -> tuple[Tensor, ...]:
    """Per-box terms of the rotated inside test: a corner ``p0``, the edge vectors ``e1 = p1 - p0``
    (along the width) and ``e2 = p3 - p0`` and their squared lengths."""
    cx, cy, w, h, r = boxes.unbind(-1)
    if side is not None:  # sides shorter than the floor widened to it, for this test only
        w = torch.where((w < side) & valid, torch.full_like(w, side), w)
        h = torch.where((h < side) & valid, torch.full_like(h, side), h)
    cos, sin = torch.cos(r), torch.sin(r)
    ux, uy, vx, vy = w / 2 * cos, w / 2 * sin, -h / 2 * sin, h / 2 * cos
    x0, y0 = cx - ux - vx, cy - uy - vy
    e1x, e1y = (cx + ux - vx) - x0, (cy + uy - vy) - y0
    e2x, e2y = (cx - ux + vx) - x0, (cy - uy + vy) - y0
    return x0, y0, e1x, e1y, e2x, e2y, e1x * e1x + e1y * e1y, e2x * e2x + e2y * e2y


def _inside_rotated(box: tuple[Tensor, ...], ax: Tensor, ay: Tensor) -> Tensor:
    """Anchor centres inside rotated boxes (closed: the projections of ``p - p0`` on both edges lie
    within the edges, as ultralytics tests it); ``(B, G, 1)`` terms."""
    x0, y0, e1x, e1y, e2x, e2y, n1, n2 = box
    dx, dy = ax - x0, ay - y0
    along1 = dx * e1x + dy * e1y
    along2 = dx * e2x + dy * e2y
    return (along1 >= 0) & (along1 <= n1) & (along2 >= 0) & (along2 <= n2)


def _probiou_overlap(gt: tuple[Tensor, ...], pred: tuple[Tensor, ...]) -> Tensor:
    return probiou_from_terms(gt, pred)


class _Geometry(NamedTuple):
    """What differs between axis-aligned and rotated assignment: the per-box terms, the overlap
    built from them, and the candidate test (per-box terms, then the pairwise test)."""

    box_dims: int
    terms: Callable[[Tensor], tuple[Tensor, ...]]
    overlap: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], Tensor]
    candidate_terms: Callable[[Tensor, Tensor, Optional[float]], tuple[Tensor, ...]]
    inside: Callable[[tuple[Tensor, ...], Tensor, Tensor], Tensor]


AXIS_ALIGNED = _Geometry(4, _box_terms, _ciou_from_terms, _candidate_corners, _inside_corners)
ROTATED = _Geometry(5, gaussian_terms, _probiou_overlap, _candidate_rotated, _inside_rotated)


# ---------------------------------------------------------------------------------------------


def match_task_aligned(
    pred_scores: Tensor,
    pred_boxes: Tensor,
    anchor_points: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    *,
    topk: int = 13,
    alpha: float = 1.0,
    beta: float = 6.0,
    topk2: Optional[int] = None,
    min_box_side: Optional[float] = None,
    eps: float = 1e-9,
    background_label: int = -1,
    background_from_slot0: bool = False,
    chunk_size: Optional[int] = None,
) -> TaskAlignedAssignment:
    """Task-aligned assignment of anchors to padded ground truth (see the module doc).

    Args:
        pred_scores: ``(B, A, C)`` class probabilities (float).
        pred_boxes: ``(B, A, 4)`` predicted boxes, xyxy pixels (float).
        anchor_points: ``(A, 2)`` anchor centres ``(x, y)`` in pixels.
        gt_boxes: ``(B, M, 4)`` xyxy pixels; ``gt_labels (B, M)`` integers in ``[0, C-1]``;
            ``gt_valid (B, M)`` bool (padding is False). ``M = 0`` is fine.
        topk: anchors per GT (TOOD: 13; YOLOv8's loss: 10). ``alpha``, ``beta``: metric exponents.
        topk2: one-to-one filter (keep each GT's ``topk2`` best positives); None or ``topk``: off.
        min_box_side: widen shorter box sides to this for the inside test (None: no floor).
        eps: added to the largest metric of a GT in the normalisation (step 6).
        background_label: label of background anchors (-1).
        background_from_slot0: label / box background anchors with GT slot 0's (ultralytics).
        chunk_size: GTs per chunk of the pair space (None: about 1M pair elements per chunk).

    Returns:
        :class:`TaskAlignedAssignment`; no gradient flows through it.

    >>> scores = torch.full((1, 4, 2), 0.5)
    >>> anchors = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]])
    >>> preds = torch.tensor([[[0.0, 0.0, 8.0, 8.0]]]).expand(1, 4, 4)
    >>> gt = torch.tensor([[[0.0, 0.0, 8.0, 8.0]]])
    >>> a = match_task_aligned(scores, preds, anchors, gt, torch.tensor([[1]]),
    ...                        torch.tensor([[True]]), topk=1)
    >>> a.foreground.tolist(), a.labels.tolist(), a.scores[0, 0].tolist()
    ([[True, False, False, False]], [[1, -1, -1, -1]], [0.0, 1.0])
    """
    require_floating(pred_scores, "pred_scores")
    dims = require_shape(pred_scores, "pred_scores", ("B", "A", "C"))
    require_boxes(pred_boxes, "pred_boxes", ndim=3)
    require_shape(pred_boxes, "pred_boxes", ("B", "A", 4), dims)
    require_floating(anchor_points, "anchor_points")
    require_shape(anchor_points, "anchor_points", ("A", 2), dims)
    checks = ValueChecks().finite(anchor_points, "anchor_points")
    dims, gt_valid = require_padded_gt(
        gt_boxes, gt_valid, gt_labels, checks=checks, dims=dims, label_range=(0, dims["C"] - 1)
    )
    check_task_aligned_options(topk, alpha, beta, topk2, min_box_side, eps, chunk_size)
    checks.run()
    return match_task_aligned_unchecked(
        pred_scores, pred_boxes, anchor_points, gt_boxes, gt_labels, gt_valid, topk=topk, alpha=alpha,
        beta=beta, topk2=topk2, min_box_side=min_box_side, eps=eps, background_label=background_label,
        background_from_slot0=background_from_slot0, chunk_size=chunk_size,
    )


def match_rotated_task_aligned(
    pred_scores: Tensor,
    pred_boxes: Tensor,
    anchor_points: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    *,
    topk: int = 13,
    alpha: float = 1.0,
    beta: float = 6.0,
    topk2: Optional[int] = None,
    min_box_side: Optional[float] = None,
    eps: float = 1e-9,
    background_label: int = -1,
    background_from_slot0: bool = False,
    chunk_size: Optional[int] = None,
) -> TaskAlignedAssignment:
    """Task-aligned assignment of anchors to padded *rotated* ground truth (oriented boxes).

    The steps of :func:`match_task_aligned`, with two changes (ultralytics' rotated assigner):

    * the overlap ``u`` is ProbIoU (:func:`detloss.probiou`, clamped at 0) instead of CIoU;
    * a candidate is an anchor centre inside the rotated box (closed boundary), after the
      optional ``min_box_side`` floor of the box's width and height (this test only).

    Same chunked pair space, both execution strategies, the same bits for every chunk size.

    Args:
        pred_scores: ``(B, A, C)`` class probabilities.
        pred_boxes: ``(B, A, 5)`` predicted boxes ``(cx, cy, w, h, angle)``, pixels and radians.
        anchor_points: ``(A, 2)`` anchor centres ``(x, y)`` in pixels.
        gt_boxes: ``(B, M, 5)`` xywhr pixels; ``gt_labels (B, M)`` integers in ``[0, C-1]``;
            ``gt_valid (B, M)`` bool. Valid boxes need finite values and sizes ``>= 0``.
        topk, alpha, beta, topk2, min_box_side, eps, background_label, background_from_slot0,
            chunk_size: as :func:`match_task_aligned`.

    Returns:
        :class:`TaskAlignedAssignment` whose ``boxes`` are ``(B, A, 5)`` xywhr.

    >>> scores = torch.full((1, 4, 2), 0.5)
    >>> anchors = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]])
    >>> gt = torch.tensor([[[8.0, 8.0, 20.0, 4.0, 0.7854]]])  # a thin box along the diagonal
    >>> preds = gt.expand(1, 4, 5)
    >>> a = match_rotated_task_aligned(scores, preds, anchors, gt, torch.tensor([[0]]),
    ...                                torch.tensor([[True]]), topk=4)
    >>> a.foreground.tolist()
    [[True, False, False, True]]
    """
    require_floating(pred_scores, "pred_scores")
    dims = require_shape(pred_scores, "pred_scores", ("B", "A", "C"))
    require_rotated_boxes(pred_boxes, "pred_boxes", ndim=3)
    require_shape(pred_boxes, "pred_boxes", ("B", "A", 5), dims)
    require_floating(anchor_points, "anchor_points")
    require_shape(anchor_points, "anchor_points", ("A", 2), dims)
    require_rotated_boxes(gt_boxes, "gt_boxes", ndim=3)
    checks = ValueChecks().finite(anchor_points, "anchor_points")
    dims, gt_valid = require_padded_gt(
        gt_boxes, gt_valid, gt_labels, checks=checks, dims=dims, label_range=(0, dims["C"] - 1), box_dims=5
    )
    checks.in_range(gt_boxes[..., 2:4], "gt_boxes (w, h)", 0, None, where=gt_valid)
    check_task_aligned_options(topk, alpha, beta, topk2, min_box_side, eps, chunk_size)
    checks.run()
    return match_task_aligned_unchecked(
        pred_scores, pred_boxes, anchor_points, gt_boxes, gt_labels, gt_valid, topk=topk, alpha=alpha,
        beta=beta, topk2=topk2, min_box_side=min_box_side, eps=eps, background_label=background_label,
        background_from_slot0=background_from_slot0, chunk_size=chunk_size, rotated=True,
    )


def check_task_aligned_options(
    topk: int, alpha: float, beta: float, topk2: Optional[int], min_box_side: Optional[float],
    eps: float, chunk_size: Optional[int] = None,
) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming the first bad option of the assigner."""
    for value, name in ((topk, "topk"), (topk2, "topk2"), (chunk_size, "chunk_size")):
        if value is None and name != "topk":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    require_positive(alpha, "alpha", allow_zero=True)
    require_positive(beta, "beta", allow_zero=True)
    require_positive(eps, "eps", allow_zero=True)
    if min_box_side is not None:
        require_positive(min_box_side, "min_box_side", allow_zero=True)


@torch.no_grad()
def match_task_aligned_unchecked(
    pred_scores: Tensor,
    pred_boxes: Tensor,
    anchor_points: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    *,
    topk: int = 13,
    alpha: float = 1.0,
    beta: float = 6.0,
    topk2: Optional[int] = None,
    min_box_side: Optional[float] = None,
    eps: float = 1e-9,
    background_label: int = -1,
    background_from_slot0: bool = False,
    chunk_size: Optional[int] = None,
    rotated: bool = False,
) -> TaskAlignedAssignment:
    """:func:`match_task_aligned` (``rotated=False``) or :func:`match_rotated_task_aligned`
    (``rotated=True``) without the input checks (for callers that checked them)."""
    geometry = ROTATED if rotated else AXIS_ALIGNED
    b, a, c = pred_scores.shape
    m = gt_boxes.shape[1]
    dtype = pair_dtype(pred_boxes, gt_boxes)
    device = pred_scores.device
    gt_cast, pred_cast = gt_boxes.to(dtype), pred_boxes.to(dtype)
    labels = gt_labels.long().clamp(0, c - 1)
    k = min(topk, a)

    # per-box terms, once for all boxes (chunks slice them)
    gt_t = geometry.terms(gt_cast)  # each (B, M)
    pred_t = tuple(t.unsqueeze(1) for t in geometry.terms(pred_cast))  # each (B, 1, A)
    candidate_t = geometry.candidate_terms(gt_cast, gt_valid, min_box_side)  # each (B, M)
    ax, ay = anchor_points.to(dtype).unbind(-1)  # (A,)
    # s ** alpha per anchor and class, class-major so a GT's row is one contiguous gather
    score_pow = pred_scores.to(dtype).transpose(1, 2).clone(memory_format=torch.contiguous_format)  # (B, C, A)
    score_pow.clamp_(min=0)
    score_pow = score_pow.sqrt_() if alpha == 0.5 else score_pow if alpha == 1 else _power(score_pow, alpha)

    count = torch.zeros(b, a, dtype=torch.int32, device=device)
    some_gt = torch.full((b, a), -1, dtype=torch.long, device=device)
    best_u = torch.full((b, a), -1.0, dtype=dtype, device=device)
    best_gt = torch.zeros(b, a, dtype=torch.long, device=device)
    if chunk_size is None:
        chunk_size = max(1, chunk_elements(device, TASK_ALIGNED_PAIRS) // max(1, b * a))
    for start in range(0, m, chunk_size):
        stop = min(m, start + chunk_size)
        sl = slice(start, stop)
        # 1. candidates: anchor centres inside the (floored) box
        inside = geometry.inside(tuple(t[:, sl].unsqueeze(-1) for t in candidate_t), ax, ay)  # (B, G, A)
        inside &= gt_valid[:, sl].unsqueeze(-1)
        gt_chunk = tuple(t[:, sl] for t in gt_t)  # each (B, G)
        if host_sync_is_free(pred_scores):  # CPU eager: only the candidate pairs (benchmarks/README.md)
            pick, some, chunk_best, chunk_arg = _chunk_gathered(
                geometry.overlap, inside, gt_chunk, pred_t, score_pow, labels[:, sl], beta, k, start)
        else:
            pick, some, chunk_best, chunk_arg = _chunk_dense(
                geometry.overlap, inside, gt_chunk, pred_t, score_pow, labels[:, sl], beta, k, start)
        count += pick
        some_gt = torch.maximum(some_gt, some)
        # 4. running argmax of u over all GTs (strictly larger wins: first index on ties)
        better = chunk_best > best_u
        best_u = torch.where(better, chunk_best, best_u)
        best_gt = torch.where(better, chunk_arg, best_gt)

    # 4. conflicts: several positive GTs -> the GT of the largest u
    matched = torch.where(count > 1, best_gt, some_gt.clamp(min=0))  # (B, A)
    foreground = count > 0
    # metric and u of the matched pair, from the same per-box terms as the chunks
    if m:
        pair_gt = tuple(t.gather(1, matched) for t in gt_t)
        u_a = geometry.overlap(pair_gt, tuple(t.squeeze(1) for t in pred_t)).clamp_(min=0)
        s_a = score_pow.gather(1, labels.gather(1, matched).unsqueeze(1)).squeeze(1)
        metric_a = s_a * _power(u_a, beta)
    else:
        u_a = metric_a = torch.zeros(b, a, dtype=dtype, device=device)
    foreground &= metric_a > 0  # the native rule (only a zero score can empty a conflict winner)
    # 5. one-to-one: each GT keeps its topk2 best positives
    if topk2 is not None and topk2 < topk:
        foreground &= _segment_rank(matched, metric_a, foreground) < topk2
    metric_a = torch.where(foreground, metric_a, 0.0)
    u_a = torch.where(foreground, u_a, 0.0)
    # 6. soft scores: t * max u / (max t + eps) over each GT's positives
    max_t = metric_a.new_zeros(b, max(m, 1)).scatter_reduce_(1, matched, metric_a, reduce="amax")
    max_u = u_a.new_zeros(b, max(m, 1)).scatter_reduce_(1, matched, u_a, reduce="amax")
    norm = metric_a * max_u.gather(1, matched) / (max_t.gather(1, matched) + eps)
    return _targets(
        foreground, matched, norm, metric_a, u_a, gt_boxes, labels, c, background_label, background_from_slot0
    )


def _chunk_dense(
    overlap: Callable, inside: Tensor, gt: tuple[Tensor, ...], pred: tuple[Tensor, ...], score_pow: Tensor, labels: Tensor, beta: float,
    k: int, start: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 2-4 for one chunk of ``G`` GTs on the whole ``(B, G, A)`` pair block.

    Returns, per anchor ``(B, A)``: how many of the chunk's GTs select it, the largest such GT
    index (-1: none), the chunk's largest ``u`` and the first GT index reaching it.
    """
    g = inside.shape[1]
    gt_ids = torch.arange(start, start + g, device=inside.device).view(1, -1, 1)
    # 2. metric t = s^alpha * u^beta on the candidates
    u = overlap(tuple(t.unsqueeze(-1) for t in gt), pred).clamp_(min=0)
    u = torch.where(inside, u, 0.0)  # (B, G, A)
    s = score_pow.gather(1, labels.unsqueeze(-1).expand(-1, -1, inside.shape[2]))  # (B, G, A)
    metric = torch.where(inside, s * _power(u, beta), 0.0)
    # 3. top-k per GT (ties: lower anchor index), positive metric only (hence inside)
    selected = _top_k_mask(metric, k) & (metric > 0)
    pick = selected.sum(1, dtype=torch.int32)
    some = torch.where(selected, gt_ids, -1).amax(1)
    # 4. the chunk's best u per anchor; max-with-index over a middle dim is ~100x slower on CPU
    best = u.amax(dim=1)
    arg = torch.where(u == best.unsqueeze(1), gt_ids, start + g).amin(dim=1)
    return pick, some, best, arg


def _top_k_mask(values: Tensor, k: int) -> Tensor:
    """``(..., N) -> (..., N)`` bool: the ``k`` largest of each row, lower index first among equal values."""
    kth = values.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = values > kth
    tied = values == kth
    need = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= need))


def _chunk_gathered(
    overlap: Callable, inside: Tensor, gt: tuple[Tensor, ...], pred: tuple[Tensor, ...], score_pow: Tensor, labels: Tensor, beta: float,
    k: int, start: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_chunk_dense` on the candidate pairs only (one host read of their count).

    The pairs' ``u`` and metric come from the same per-box terms and operations as the dense
    block, so every value, and therefore every decision, is the same bit for bit.
    """
    b, g, a = inside.shape
    bi, gi, ai = inside.nonzero(as_tuple=True)  # ordered by (image, GT, anchor)
    pred_flat = tuple(t.squeeze(1) for t in pred)
    # 2. metric of the candidate pairs
    u = overlap(tuple(t[bi, gi] for t in gt), tuple(t[bi, ai] for t in pred_flat)).clamp_(min=0)
    metric = score_pow[bi, labels[bi, gi], ai] * _power(u, beta)
    # 3. rank within each GT by metric (descending; stable: lower anchor index first)
    segment = bi * g + gi
    order = metric.argsort(descending=True, stable=True)
    order = order[segment[order].argsort(stable=True)]
    sorted_segment = segment[order]
    rank = torch.arange(order.numel(), device=inside.device) - torch.searchsorted(sorted_segment, sorted_segment)
    chosen = order[(rank < k) & (metric[order] > 0)]
    cell = bi * a + ai  # (image, anchor) of each pair
    pick = torch.zeros(b * a, dtype=torch.int32, device=inside.device)
    pick.index_add_(0, cell[chosen], torch.ones_like(chosen, dtype=torch.int32))
    some = torch.full((b * a,), -1, dtype=torch.long, device=inside.device)
    some.scatter_reduce_(0, cell[chosen], gi[chosen] + start, reduce="amax")
    # 4. the chunk's best u per anchor (0 where no pair, as the dense block's) and its first GT
    best = u.new_zeros(b * a).scatter_reduce_(0, cell, u, reduce="amax")
    first = torch.full((b * a,), start + g, dtype=torch.long, device=inside.device)
    at_best = u == best[cell]
    first.scatter_reduce_(0, cell[at_best], gi[at_best] + start, reduce="amin")
    arg = torch.where(best > 0, first, start)
    return pick.view(b, a), some.view(b, a), best.view(b, a), arg.view(b, a)


def _floored(boxes: Tensor, valid: Tensor, side: Optional[float]) -> Tensor:
    """Boxes for the inside test: sides shorter than ``side`` widened to it about the centre
    (through centre / size and back, as ultralytics does it, so the corners round alike)."""
    if side is None:
        return boxes
    low, high = boxes[..., :2], boxes[..., 2:]
    centre, size = (low + high) / 2, high - low
    size = torch.where((size < side) & valid.unsqueeze(-1), torch.full_like(size, side), size)
    return torch.cat((centre - size / 2, centre + size / 2), dim=-1)


def _segment_rank(segment: Tensor, value: Tensor, member: Tensor) -> Tensor:
    """Rank of each member ``(B, A)`` within its segment by descending ``value`` (ties: lower
    anchor index first); non-members get a large rank. Two stable sorts, no pair space."""
    b, a = value.shape
    big = torch.iinfo(torch.long).max
    key_value = torch.where(member, value, -1.0)
    order = key_value.argsort(dim=1, descending=True, stable=True)
    seg = torch.where(member, segment, big).gather(1, order)
    order2 = seg.argsort(dim=1, stable=True)
    order = order.gather(1, order2)
    seg = seg.gather(1, order2)
    pos = torch.arange(a, device=value.device).expand(b, a)
    is_start = torch.ones_like(seg, dtype=torch.bool)
    is_start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start = torch.where(is_start, pos, 0).cummax(dim=1).values
    rank_sorted = pos - start
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    return torch.where(member, rank, big)


def _targets(
    foreground: Tensor, matched: Tensor, norm: Tensor, metric: Tensor, overlap: Tensor, gt_boxes: Tensor,
    labels: Tensor, num_classes: int, background_label: int, background_from_slot0: bool,
) -> TaskAlignedAssignment:
    """Labels, boxes and the ``(B, A, C)`` soft scores of an assignment."""
    b, a = foreground.shape
    m = gt_boxes.shape[1]
    matched = torch.where(foreground, matched, 0)
    if m:
        label = labels.gather(1, matched)
        box = gt_boxes.gather(1, matched.unsqueeze(-1).expand(-1, -1, gt_boxes.shape[-1]))
    else:
        label = torch.full_like(matched, background_label)
        box = gt_boxes.new_zeros(b, a, gt_boxes.shape[-1])
    if not background_from_slot0 or not m:
        label = torch.where(foreground, label, background_label)
        box = torch.where(foreground.unsqueeze(-1), box, 0.0)
    scores = norm.new_zeros(b, a, num_classes)
    scores.scatter_(2, label.clamp(0, num_classes - 1).unsqueeze(-1), torch.where(foreground, norm, 0.0).unsqueeze(-1))
    return TaskAlignedAssignment(foreground, matched, label, box, scores, metric, overlap)
