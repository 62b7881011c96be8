"""Hungarian (bipartite, one-to-one) matching of queries to ground truth: DETR and its family.

DETR (Carion et al. 2020, arXiv:2005.12872) matches each ground-truth object to exactly one
of ``Q`` predictions (queries) by solving a linear assignment problem on a matching cost;
the unmatched queries are "no object". Every decoder layer is matched on its own. Here one
*problem* is one (decoder layer, image) pair, and ``N`` problems are solved together:

1. :func:`detr_matching_cost` builds the ``(N, Q, M)`` cost of every problem at once, on the
   device, without host synchronisation, ``Q`` rows at a time (bounded memory):
   ``l1_weight * L1(cxcywh) + cls_weight * class cost + giou_weight * (-GIoU)``. The class
   cost is ``-softmax(logits)[gt class]`` (DETR, ``C + 1`` columns, the last one "no
   object") or the focal cost of Deformable DETR (Zhu et al. 2020, arXiv:2010.04159; ``C``
   sigmoid columns): ``alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma
   (-log(1 - p + 1e-8))`` with ``p = sigmoid(logit of the gt class)``. Each GT column depends
   only on that GT, so padding never changes a real GT's cost.
2. :func:`match_hungarian` solves all ``N`` problems with one round trip to the host: the
   stacked cost goes to the host in one copy (with the validity mask; on the CPU it is only a
   view), each problem's padding columns are dropped there (NumPy), the solver runs once per
   problem (SciPy has no batched API), and the result comes back in one copy. Problems may
   also drop padding *rows* (``query_valid``): sets of different query counts (decoder layers,
   the encoder's top-k output, query groups) share the one solve.

Non-finite costs (NaN / inf from predictions that overflowed, e.g. fp16 under autocast) never
raise: on the host each NaN or ``+inf`` entry becomes ``NON_FINITE_COST`` (1e30) and ``-inf``
becomes ``-1e30``, so the matching is defined (the finite pairs are preferred) and
deterministic; the loss, computed from the same non-finite predictions, is non-finite, so a
``GradScaler`` skips the step.

This host round trip is the one synchronisation of the DETR loss. Under ``torch.compile``
the default solver is a custom operator (``torch.ops.detloss.hungarian``), opaque to the
compiler, so a whole loss compiles with ``fullgraph=True``; it cannot be captured in a CUDA
graph. A user-supplied ``solver`` is called from Python (a graph break when compiled).

Solver contract: ``solver(cost (Q, n) ndarray) -> (row_ind, col_ind)``, a minimum-cost
matching of ``min(Q, n)`` pairs, as ``scipy.optimize.linear_sum_assignment`` (the default,
imported lazily; install it with ``pip install "detloss[detr]"``). SciPy accepts both
``Q >= n`` and ``Q < n``: with more valid GTs than queries every query is matched and the
surplus GTs stay unmatched (``-1``).

Ties: each problem's solver input is exactly the ``(Q, n)`` block a per-image call would
pass (queries in order, valid GTs in order), so the result equals per-problem SciPy calls on
this cost, ties included (SciPy's tie-break is deterministic). Against the original
implementation, whose cost can differ from this one in the last bit, exactly tied matchings
may be resolved differently; the total cost is the same up to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch
from torch import Tensor

from .. import _chunking
from .._validate import (
    ValueChecks,
    as_bool_mask,
    require_choice,
    require_floating,
    require_padded_gt,
    require_positive,
    require_shape,
)
from ..boxes import accumulate_dtype, aligned_box_iou_unchecked, cxcywh_to_xyxy, pair_dtype

ClassCost = Literal["softmax", "focal"]
CLASS_COSTS = ("softmax", "focal")
Solver = Callable[[np.ndarray], tuple]

FOCAL_EPS = 1e-8
#: what a NaN (or +-inf) cost entry becomes for the solver (predictions that overflowed): the
#: matching stays defined, and the loss, computed from the same non-finite predictions, is
#: non-finite, so a ``GradScaler`` skips the step
NON_FINITE_COST = 1e30


@dataclass
class HungarianMatch:
    """Result of :func:`match_hungarian` (``N`` problems, ``Q`` queries, ``M`` GT slots).

    Attributes:
        gt_to_query: ``(N, M)`` int64, the query matched to each GT; -1 for padding and for
            valid GTs left unmatched (only when a problem has more valid GTs than queries).
        query_to_gt: ``(N, Q)`` int64, the GT matched to each query; -1 for "no object".
    """

    gt_to_query: Tensor
    query_to_gt: Tensor


# ----------------------------------------------------------------------------------- cost
def detr_matching_cost(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    *,
    class_cost: ClassCost = "softmax",
    cls_weight: float = 1.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    chunk_elements: Optional[int] = None,
) -> Tensor:
    """The DETR matching cost of ``N`` problems (e.g. decoder layers x images) at once.

    Args:
        pred_logits: ``(N, Q, K)`` float; ``K = C + 1`` (last column "no object") for
            ``class_cost="softmax"``, ``K = C`` for ``"focal"``.
        pred_boxes: ``(N, Q, 4)`` float, normalised cxcywh.
        gt_boxes: ``(N, M, 4)`` float, normalised cxcywh (padding rows: any finite value).
        gt_labels: ``(N, M)`` integer class indices in ``[0, C - 1]`` on valid rows.
        gt_valid: ``(N, M)`` bool (or 0/1) mask of real GT rows.
        class_cost: ``"softmax"`` (DETR: ``-softmax prob``) or ``"focal"`` (Deformable DETR).
        cls_weight, l1_weight, giou_weight: weights of the three costs (DETR trains with 1, 5
            and 2; Deformable DETR with 2, 5, 2).
        alpha, gamma: the focal cost's parameters.
        chunk_elements: cost entries per block (default 2**18; at least one query row), so
            the temporaries stay bounded whatever ``N x Q x M``.

    Returns:
        ``(N, Q, M)`` cost, float32 (float64 for float64 input); no gradient. Columns of
        padding GTs hold the cost against the padding box: finite, ignored by
        :func:`match_hungarian`.

    >>> logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])   # N=1, Q=2, C=2 (+1)
    >>> boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]]])
    >>> gt = torch.tensor([[[0.7, 0.7, 0.2, 0.2]]]); labels = torch.tensor([[1]])
    >>> detr_matching_cost(logits, boxes, gt, labels, torch.tensor([[True]]))
    tensor([[[ 5.4490],
             [-2.7870]]])
    """
    require_floating(pred_logits, "pred_logits")
    require_choice(class_cost, "class_cost", CLASS_COSTS)
    dims = require_shape(pred_logits, "pred_logits", ("N", "Q", "K"))
    require_floating(pred_boxes, "pred_boxes")
    require_shape(pred_boxes, "pred_boxes", ("N", "Q", 4), dims)
    require_shape(gt_boxes, "gt_boxes", ("N", "M", 4), dims)  # one row of GTs per problem
    checks = ValueChecks()
    num_classes = dims["K"] - (1 if class_cost == "softmax" else 0)
    _, gt_valid = require_padded_gt(gt_boxes, gt_valid, gt_labels, checks=checks, label_range=(0, num_classes - 1))
    checks.run()
    for value, name in ((cls_weight, "cls_weight"), (l1_weight, "l1_weight"), (giou_weight, "giou_weight")):
        require_positive(value, name, allow_zero=True)
    require_positive(gamma, "gamma", allow_zero=True)
    if chunk_elements is not None:
        require_positive(chunk_elements, "chunk_elements")
    return matching_cost_unchecked(
        pred_logits, pred_boxes, gt_boxes, gt_labels, gt_valid, class_cost=class_cost,
        cls_weight=cls_weight, l1_weight=l1_weight, giou_weight=giou_weight, alpha=alpha,
        gamma=gamma, chunk_elements=chunk_elements,
    )


def matching_cost_unchecked(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    *,
    class_cost: ClassCost = "softmax",
    cls_weight: float = 1.0,
    l1_weight: float = 5.0,
    giou_weight: float = 2.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    chunk_elements: Optional[int] = None,
) -> Tensor:
    """:func:`detr_matching_cost` without its checks (for callers that validated the inputs).
    Synchronisation-free and ``torch.compile``-able."""
    with torch.no_grad(), torch.autocast(pred_logits.device.type, enabled=False):
        n, q, k = pred_logits.shape
        m = gt_boxes.shape[1]
        dtype = pair_dtype(pred_logits, pred_boxes)
        # 1. class cost of every (query, class), then of every (query, GT) by the GT's class
        per_class = _class_cost(pred_logits.detach().to(dtype), class_cost, alpha, gamma)  # (N, Q, K)
        labels = torch.where(gt_valid, gt_labels, 0).clamp(0, k - 1)
        # 2. boxes coordinate-major (four contiguous planes: the pairwise passes below then
        #    broadcast contiguous rows against contiguous columns), cxcywh for L1, xyxy for GIoU
        pred, gt = _planar(pred_boxes.detach().to(dtype)), _planar(gt_boxes.detach().to(dtype))
        pred_xyxy, gt_xyxy = cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt)
        gt_planes = [c.unsqueeze(1) for c in gt.unbind(-1)]  # 4 x (N, 1, M)
        # 3. the weighted sum block by block (bounded temporaries), each block written in place
        out = torch.empty((n, q, m), dtype=dtype, device=pred.device)
        for (a, b), (s, e) in _blocks(n, q, m, chunk_elements, pred.device):
            rows = [c.unsqueeze(2) for c in pred[a:b, s:e].unbind(-1)]  # 4 x (n', q', 1)
            columns = [c[a:b] for c in gt_planes]  # 4 x (n', 1, M)
            block = torch.sub(rows[0], columns[0], out=out[a:b, s:e]).abs_()  # L1, (n', q', M)
            for i in range(1, 4):
                block.add_((rows[i] - columns[i]).abs_())
            cls = per_class[a:b, s:e].gather(2, labels[a:b].unsqueeze(1).expand(b - a, e - s, m))
            giou = aligned_box_iou_unchecked(pred_xyxy[a:b, s:e].unsqueeze(2), gt_xyxy[a:b].unsqueeze(1), "giou")
            block.mul_(l1_weight).add_(cls, alpha=cls_weight).sub_(giou, alpha=giou_weight)
        return out


def _blocks(n: int, q: int, m: int, chunk_elements: Optional[int], device: torch.device) -> list:
    """``[((a, b), (s, e))]``: problems ``a:b`` x queries ``s:e`` per block, each block a contiguous
    part of the ``(N, Q, M)`` output of at most ``chunk_elements`` entries (or one query row):
    whole problems while they fit, else query ranges of one problem."""
    if chunk_elements is None:
        chunk_elements = _chunking.chunk_elements(device, _chunking.DETR_COST)
    if n * q * m == 0:
        return []
    if q * m <= chunk_elements:
        step = chunk_elements // (q * m)
        return [((a, min(a + step, n)), (0, q)) for a in range(0, n, step)]
    step = max(1, chunk_elements // m)
    return [((a, a + 1), (s, min(s + step, q))) for a in range(n) for s in range(0, q, step)]


def _planar(boxes: Tensor) -> Tensor:
    """``(..., 4)`` boxes laid out coordinate-major: ``unbind(-1)`` gives contiguous planes."""
    return boxes.movedim(-1, 0).contiguous().movedim(0, -1)


def _class_cost(logits: Tensor, class_cost: str, alpha: float, gamma: float) -> Tensor:
    """``(..., K)`` logits -> ``(..., K)`` cost of assigning each class."""
    if class_cost == "softmax":
        return -logits.softmax(-1)
    prob = logits.sigmoid()
    positive = alpha * (1 - prob) ** gamma * -(prob + FOCAL_EPS).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + FOCAL_EPS).log()
    return positive - negative


# ---------------------------------------------------------------------------------- solve
def scipy_solver() -> Solver:
    """SciPy's ``linear_sum_assignment`` (imported on first use)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as error:  # pragma: no cover - exercised by monkeypatching the import
        raise ImportError(
            "detloss.match_hungarian needs SciPy for its default solver: "
            'pip install "detloss[detr]" (or pass solver=your_linear_sum_assignment)'
        ) from error
    return linear_sum_assignment


def match_hungarian(cost: Tensor, gt_valid: Tensor, *, solver: Optional[Solver] = None) -> HungarianMatch:
    """Minimum-cost one-to-one matching of queries to valid GTs for ``N`` problems at once.

    Args:
        cost: ``(N, Q, M)`` float (any floating dtype; solved in float32, float64 kept),
            finite on valid columns.
        gt_valid: ``(N, M)`` bool (or 0/1) mask; invalid (padding) columns take no part.
        solver: ``solver(cost (Q, n) ndarray) -> (row_ind, col_ind)``; default SciPy's
            ``linear_sum_assignment`` (see the module doc for the contract and ties).

    Returns:
        :class:`HungarianMatch` with ``gt_to_query (N, M)`` and ``query_to_gt (N, Q)``,
        int64 on ``cost``'s device. One host round trip for all problems.

    >>> cost = torch.tensor([[[4.0, 1.0], [2.0, 0.0], [3.0, 5.0]]])   # N=1, Q=3, M=2
    >>> m = match_hungarian(cost, torch.tensor([[True, True]]))
    >>> m.gt_to_query, m.query_to_gt
    (tensor([[1, 0]]), tensor([[ 1,  0, -1]]))
    """
    require_floating(cost, "cost")
    dims = require_shape(cost, "cost", ("N", "Q", "M"))
    gt_valid = as_bool_mask(gt_valid, "gt_valid")
    require_shape(gt_valid, "gt_valid", ("N", "M"), dims)
    if solver is not None and not callable(solver):
        raise TypeError(f"solver: expected a callable like scipy's linear_sum_assignment, got {type(solver).__name__}")
    return match_hungarian_unchecked(cost, gt_valid, solver=solver)


def match_hungarian_unchecked(
    cost: Tensor, gt_valid: Tensor, *, solver: Optional[Solver] = None, query_valid: Optional[Tensor] = None,
) -> HungarianMatch:
    """:func:`match_hungarian` without its metadata checks (``gt_valid`` must be bool).

    ``query_valid (N, Q)`` bool (optional) drops rows too: problems with fewer queries than
    others (an encoder output beside the decoder layers) share one padded ``(N, Q, M)`` cost,
    and each is solved on exactly its own ``(q_i, n_i)`` block; its padding rows stay -1."""
    n, q, m = cost.shape
    cost = cost.detach()
    if solver is None:
        packed = torch.ops.detloss.hungarian(cost, gt_valid, query_valid)
    else:
        packed = _solve_all(cost, gt_valid, solver, None, query_valid)
    return HungarianMatch(gt_to_query=packed[:, :m], query_to_gt=packed[:, m:])


def _solve_all(
    cost: Tensor, gt_valid: Tensor, solver: Solver, pack: Optional[bool] = None, query_valid: Optional[Tensor] = None,
) -> Tensor:
    """``(N, M + Q)`` int64 on ``cost``'s device: ``gt_to_query`` then ``query_to_gt``.

    ``pack`` (default: off the CPU) sends the cost and the masks to the host as one tensor."""
    n, q, m = cost.shape
    host_dtype = accumulate_dtype(cost)
    # 1. one device -> host copy: the cost and the validity masks packed together (on the CPU
    #    they are only viewed as NumPy arrays)
    if not (cost.device.type != "cpu" if pack is None else pack):
        host_cost, host_valid = cost.to(host_dtype).numpy(), gt_valid.numpy()
        host_rows = None if query_valid is None else query_valid.numpy()
    else:
        parts = [cost.reshape(n, q * m).to(host_dtype), gt_valid.to(host_dtype)]
        if query_valid is not None:
            parts.append(query_valid.to(host_dtype))
        host = torch.cat(parts, dim=1).cpu().numpy()
        host_cost, host_valid = host[:, : q * m].reshape(n, q, m), host[:, q * m : q * m + m] > 0.5
        host_rows = None if query_valid is None else host[:, q * m + m :] > 0.5
    # 2. one solve per problem on the host, its padding columns (and rows) dropped
    out = np.full((n, m + q), -1, dtype=np.int64)
    all_rows = np.arange(q)
    for i in range(n):
        columns = np.flatnonzero(host_valid[i])
        rows_kept = all_rows if host_rows is None else np.flatnonzero(host_rows[i])
        if columns.size == 0 or rows_kept.size == 0:
            continue
        block = host_cost[i] if columns.size == m else host_cost[i][:, columns]
        if rows_kept.size != q:
            block = block[rows_kept]
        if not np.isfinite(block.sum()):  # a diverging model: a defined matching, never a crash
            block = np.nan_to_num(block, nan=NON_FINITE_COST, posinf=NON_FINITE_COST, neginf=-NON_FINITE_COST)
        rows, cols = solver(block)
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        if rows.shape != cols.shape or rows.size != min(rows_kept.size, columns.size):
            raise ValueError(
                f"solver: expected min(Q, n) = {min(rows_kept.size, columns.size)} (row, column) pairs for "
                f"problem {i}, got {rows.size} rows and {cols.size} columns"
            )
        gts, queries = columns[cols], rows_kept[rows]
        out[i, gts] = queries
        out[i, m + queries] = gts
    # 3. one host -> device copy
    return torch.from_numpy(out).to(cost.device)


@torch.library.custom_op("detloss::hungarian", mutates_args=())
def _hungarian_op(cost: Tensor, gt_valid: Tensor, query_valid: Optional[Tensor] = None) -> Tensor:
    """The default (SciPy) solve as an operator opaque to ``torch.compile``."""
    return _solve_all(cost, gt_valid, scipy_solver(), None, query_valid)


@_hungarian_op.register_fake
def _(cost: Tensor, gt_valid: Tensor, query_valid: Optional[Tensor] = None) -> Tensor:
    n, q, m = cost.shape
    return cost.new_empty((n, m + q), dtype=torch.int64)
