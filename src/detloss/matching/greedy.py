"""ssd_keras matching: greedy bipartite matching, then optional 'multi' threshold matching.

The matcher of pierluigiferrari/ssd_keras (``SSDInputEncoder`` with
``ssd_encoder_decoder/matching_utils.py``), batched over images:

1. **Greedy bipartite** (:func:`greedy_bipartite_match`): repeat ``n_i`` times (``n_i`` the
   number of valid GTs of image ``i``): take the globally largest similarity of the GT x anchor
   matrix, match that GT to that anchor, then zero the GT's row and the anchor's column. Every GT
   gets one anchor, however low its IoU. Ties go to the lowest anchor index, then the lowest GT
   index (``np.argmax``).
2. **Multi** (``matching_type="multi"``): every anchor not taken in step 1 whose best IoU with a
   GT is ``>= pos_iou`` takes that GT (lowest GT index on ties).
3. **Neutral band**: an unmatched anchor whose best IoU with any GT is ``>= neg_iou`` is
   neutral (ignored by the loss); the others are negatives (background).

Quirks of the original kept on purpose (they only show in degenerate inputs):

* Step 1 takes the argmax over *all* rows, already-matched (zeroed) rows included. When every
  remaining similarity is 0 (a GT that overlaps no free anchor), the zeroed row of the first GT
  wins again and is re-matched to anchor 0, and the GT that never won keeps the initial match,
  anchor 0. When two GTs end on the same anchor, the later GT (higher index) owns it.
* With ``pos_iou <= 0`` step 2 also re-assigns the anchors of step 1 (their column is
  zeroed, so 0 >= threshold) to the first valid GT.

Background label: ssd_keras's class 0 (the encoder writes a one-hot row with column 0 set for
negatives and an all-zero row for neutral anchors); this module returns masks, not labels.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._validate import ValueChecks, as_bool_mask, require_boxes, require_choice, require_floating, require_shape
from ..boxes import box_iou, compute_dtype

MATCHING_TYPES = ("multi", "bipartite")


class GreedyMatch(NamedTuple):
    """Result of :func:`match_greedy` (all ``(B, P)``, P anchors).

    Attributes:
        gt_index: int64 index of the GT each anchor is matched to, ``-1`` where unmatched.
        positive: bool, ``gt_index >= 0``.
        negative: bool, unmatched and best IoU ``< neg_iou`` (background).
        neutral: bool, unmatched and best IoU ``>= neg_iou`` (ignored).
    """

    gt_index: Tensor
    positive: Tensor
    negative: Tensor
    neutral: Tensor


def _check_similarity(similarity: Tensor, gt_valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    require_floating(similarity, "similarity")
    dims = require_shape(similarity, "similarity", ("B", "M", "P"))
    if gt_valid is None:
        gt_valid = torch.ones(similarity.shape[:2], dtype=torch.bool, device=similarity.device)
    gt_valid = as_bool_mask(gt_valid, "gt_valid")
    require_shape(gt_valid, "gt_valid", ("B", "M"), dims)
    ValueChecks().finite(similarity, "similarity").in_range(similarity, "similarity", 0.0, None).run()
    return similarity.to(compute_dtype(similarity)), gt_valid


def _top_candidates(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``values (..., P)``, ordered by value
    (descending) then index (ascending): exactly the first ``k`` of a stable descending sort.

    Cheaper than sorting whole rows: ``topk`` finds the winners; they are put in (value,
    index) order; entries tied with the k-th value are then replaced by the lowest-indexed
    entries of that value (a second ``topk`` on ``-index`` over the tied entries), since
    ``topk`` may pick any of them.
    """
    p = values.shape[-1]
    if k >= p:
        order = torch.sort(values, dim=-1, descending=True, stable=True)
        return order.values, order.indices
    top_val, top_idx = values.topk(k, dim=-1)
    by_index = top_idx.sort(dim=-1).indices
    top_val, top_idx = top_val.gather(-1, by_index), top_idx.gather(-1, by_index)
    by_value = torch.sort(top_val, dim=-1, descending=True, stable=True).indices
    top_val, top_idx = top_val.gather(-1, by_value), top_idx.gather(-1, by_value)
    kth = top_val[..., -1:]
    n_above = (top_val > kth).sum(dim=-1, keepdim=True)
    positions = torch.arange(p, dtype=values.dtype, device=values.device)
    tie_key = torch.where(values == kth, -positions, float("-inf"))
    lowest_tied = tie_key.topk(k, dim=-1).indices  # tied entries, lowest index first
    slot = torch.arange(k, device=values.device)
    from_tied = lowest_tied.gather(-1, (slot - n_above).clamp(min=0))
    keep = slot < n_above
    return torch.where(keep, top_val, kth), torch.where(keep, top_idx, from_tied)


def greedy_bipartite_match(similarity: Tensor, gt_valid: Optional[Tensor] = None) -> Tensor:
    """ssd_keras greedy bipartite matching of GTs to anchors, all images at once.

    Args:
        similarity: ``(B, M, P)`` floating, GT x anchor similarity (IoU), values ``>= 0``.
        gt_valid: ``(B, M)`` bool, which GT rows are real (default: all). Rows need not be
            contiguous; image ``i`` runs ``gt_valid[i].sum()`` rounds, as the original does
            for its ``n_i`` GTs.

    Returns:
        ``(B, M)`` int64: the anchor matched to each GT, ``-1`` for invalid rows.

    Runs at most ``M`` rounds of batched tensor ops (one global argmax per round, as the
    algorithm requires) and no host synchronisation. Each round only looks at the
    ``min(M + 1, P)`` best anchors of each GT (found once, ordered as a stable sort would):
    at most ``M`` columns are ever zeroed, so a row's current maximum is always among them,
    or is 0.
    """
    similarity, gt_valid = _check_similarity(similarity, gt_valid)
    return _greedy_bipartite(similarity, gt_valid)


def _greedy_bipartite(similarity: Tensor, gt_valid: Tensor) -> Tensor:
    """:func:`greedy_bipartite_match` on checked input."""
    b, m, p = similarity.shape
    device = similarity.device
    match = torch.zeros(b, m, dtype=torch.int64, device=device)
    if m == 0 or b == 0:
        return match - 1
    if p == 0:
        raise ValueError(f"similarity: expected at least one anchor (P >= 1), got shape {tuple(similarity.shape)}")
    k = min(m + 1, p)
    cand_val, cand_idx = _top_candidates(similarity, k)
    flat_idx = cand_idx.reshape(b, m * k)
    n_rounds = gt_valid.sum(dim=1)  # (B,)
    row_used = torch.zeros(b, m, dtype=torch.bool, device=device)
    col_used = torch.zeros(b, p, dtype=torch.bool, device=device)
    batch = torch.arange(b, device=device)
    minus_inf = torch.full((), float("-inf"), dtype=similarity.dtype, device=device)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    for r in range(m):
        free = ~col_used.gather(1, flat_idx).view(b, m, k)
        first = free.to(torch.int32).argmax(dim=-1, keepdim=True)  # first free candidate
        value = cand_val.gather(-1, first).squeeze(-1)
        anchor = cand_idx.gather(-1, first).squeeze(-1)
        # a row whose best free value is 0 is all zeros: np.argmax gives anchor 0
        live = free.any(dim=-1) & ~row_used & (value > 0)
        row_val = torch.where(live, value, torch.zeros_like(value))
        row_val = torch.where(gt_valid, row_val, minus_inf)
        row_arg = torch.where(live, anchor, zero)
        gt = row_val.argmax(dim=1)  # (B,) first maximal row, used rows included
        chosen = row_arg[batch, gt]
        active = r < n_rounds
        match[batch, gt] = torch.where(active, chosen, match[batch, gt])
        row_used[batch, gt] = row_used[batch, gt] | active
        col_used[batch, chosen] = col_used[batch, chosen] | active
    return torch.where(gt_valid, match, -torch.ones_like(match))


def _max_over_gts(values: Tensor) -> tuple[Tensor, Tensor]:
    """Max over the GT dimension of ``values (B, M, P)`` and its first index -> two ``(B, P)``.

    Same result as ``argmax(dim=1)`` (lowest GT index on ties), written as contiguous
    reductions, which are several times faster than an arg-reduction over a middle dimension.
    """
    m = values.shape[1]
    best = values.amax(dim=1, keepdim=True)
    rows = torch.arange(m, dtype=torch.int32, device=values.device).view(1, m, 1)
    first = torch.where(values == best, rows, m).amin(dim=1)
    return best.squeeze(1), first.long()


def _anchor_owner(match: Tensor, gt_valid: Tensor, num_anchors: int) -> Tensor:
    """``(B, P)`` GT index owning each anchor after step 1 (the later GT wins), else -1."""
    b, m = match.shape
    owner = torch.full((b, num_anchors), -1, dtype=torch.int64, device=match.device)
    gt_ids = torch.arange(m, device=match.device).expand(b, m)
    src = torch.where(gt_valid, gt_ids, -torch.ones_like(gt_ids))
    index = torch.where(gt_valid, match, torch.zeros_like(match))
    return owner.scatter_reduce(1, index, src, reduce="amax", include_self=True)


def match_greedy(
    similarity: Tensor,
    gt_valid: Optional[Tensor] = None,
    *,
    matching_type: str = "multi",
    pos_iou: float = 0.5,
    neg_iou: float = 0.3,
) -> GreedyMatch:
    """ssd_keras matching (greedy bipartite, then 'multi', then the neutral band), batched.

    Args:
        similarity: ``(B, M, P)`` floating GT x anchor IoU, values ``>= 0``.
        gt_valid: ``(B, M)`` bool mask of real GT rows (default: all).
        matching_type: ``"multi"`` (bipartite, then every anchor with IoU ``>=
            pos_iou`` to its best GT) or ``"bipartite"`` (one anchor per GT only).
        pos_iou: IoU a 'multi' match needs.
        neg_iou: unmatched anchors with best IoU ``>=`` this are neutral.

    Returns:
        :class:`GreedyMatch` of ``(B, P)`` tensors. Images without valid GT are all negative.

    >>> match = match_greedy(torch.tensor([[[0.9, 0.6, 0.1, 0.2]]]), pos_iou=0.5, neg_iou=0.15)
    >>> match.gt_index, match.neutral
    (tensor([[ 0,  0, -1, -1]]), tensor([[False, False, False,  True]]))
    """
    require_choice(matching_type, "matching_type", MATCHING_TYPES)
    similarity, gt_valid = _check_similarity(similarity, gt_valid)
    return _match_greedy(similarity, gt_valid, matching_type, pos_iou, neg_iou)


def _match_greedy(
    similarity: Tensor, gt_valid: Tensor, matching_type: str, pos_iou: float, neg_iou: float
) -> GreedyMatch:
    """:func:`match_greedy` on checked input."""
    b, m, p = similarity.shape
    device = similarity.device
    if m == 0:
        none = torch.zeros(b, p, dtype=torch.bool, device=device)
        return GreedyMatch(torch.full((b, p), -1, dtype=torch.int64, device=device), none, ~none, none)
    bipartite = _greedy_bipartite(similarity, gt_valid)
    owner = _anchor_owner(bipartite, gt_valid, p)
    # step 1 zeroes the columns of its anchors; invalid rows never take part
    valid_rows = gt_valid.unsqueeze(-1)
    fill = torch.zeros(b, m, 1, dtype=similarity.dtype, device=device).masked_fill(~valid_rows, float("-inf"))
    rest = torch.where(valid_rows & (owner < 0).unsqueeze(1), similarity, fill)
    best_val, best_gt = _max_over_gts(rest)
    gt_index = owner
    if matching_type == "multi":
        gt_index = torch.where(best_val >= pos_iou, best_gt, owner)
    positive = gt_index >= 0
    # unmatched anchors keep their column, so their remaining best IoU is best_val
    neutral = ~positive & (best_val >= neg_iou)
    return GreedyMatch(gt_index, positive, ~positive & ~neutral, neutral)


def match_greedy_boxes(
    gt_boxes: Tensor,
    anchors: Tensor,
    gt_valid: Optional[Tensor] = None,
    *,
    matching_type: str = "multi",
    pos_iou: float = 0.5,
    neg_iou: float = 0.3,
    chunk_size: Optional[int] = None,
) -> GreedyMatch:
    """:func:`match_greedy` on boxes: IoU of ``gt_boxes (B, M, 4)`` and ``anchors (P, 4)``.

    Both are ``xyxy`` in the same units (normalised or pixels); ``anchors`` may also be
    ``(B, P, 4)``. The IoU is :func:`detloss.boxes.box_iou` (no +1 pixel convention, as
    ssd_keras with ``border_pixels='half'``); ``chunk_size`` bounds its temporaries by
    computing that many GT rows at a time (about ``2**17 / P`` rows keeps them in cache on
    a CPU, several times faster than one block for thousands of anchors).
    """
    require_boxes(gt_boxes, "gt_boxes", ndim=3)
    require_boxes(anchors, "anchors")
    require_choice(matching_type, "matching_type", MATCHING_TYPES)
    dims = require_shape(gt_boxes, "gt_boxes", ("B", "M", 4))
    if gt_valid is None:
        gt_valid = torch.ones(gt_boxes.shape[:2], dtype=torch.bool, device=gt_boxes.device)
    gt_valid = as_bool_mask(gt_valid, "gt_valid")
    require_shape(gt_valid, "gt_valid", ("B", "M"), dims)
    ValueChecks().finite(gt_boxes, "gt_boxes").finite(anchors, "anchors").run()
    b, m = gt_boxes.shape[:2]
    if anchors.dim() == 2:  # shared anchors: one unbatched (B*M, P) IoU, no copies of the anchors
        p = anchors.shape[0]
        similarity = box_iou(gt_boxes.reshape(b * m, 4), anchors, chunk_size=chunk_size).view(b, m, p)
    else:
        require_shape(anchors, "anchors", ("B", "P", 4), dims)
        similarity = box_iou(anchors, gt_boxes, chunk_size=chunk_size).transpose(1, 2)
    # the IoU of finite boxes is finite and in [0, 1]: no value checks needed on it
    return _match_greedy(similarity, gt_valid, matching_type, pos_iou, neg_iou)
