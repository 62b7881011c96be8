"""Hard negative mining per image (SSD, RetinaFace).

Each image keeps, as negatives, the ``num_neg = min(ratio * num_pos, P - 1)`` non-positive
priors of highest mining loss (usually the background cross-entropy). The originals rank
with a double ``argsort`` (a descending sort, then the rank of each prior); this module picks
the same set without sorting:

* :func:`top_k_mask` finds, per row, the ``k``-th largest value, then takes everything
  above it and the first ties below the count. Ties are broken by the lower index, which is
  what a stable descending sort followed by ``rank < k`` does.
* The ``k``-th value comes from a radix select on the float bits (three histogram passes for
  float32, six for float64): ``k`` is a per-row tensor, no host synchronisation, no
  data-dependent shapes. Where the gathered strategy runs (``detloss.strategy``: CPU tensors,
  eager mode), a ``torch.topk`` of ``max(k) + 1`` per group of rows of similar counts replaces
  it (the extra rank tells whether a tie continues past the cut); the selected set is the same.

Positives are never negatives, so they can neither take a negative's place nor be counted
twice (the originals give positives mining loss 0 and let them compete; they never win in
practice, since a negative's cross-entropy is exactly 0 only when its logits differ by ~100).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._grouping import group_by_count
from .._validate import as_bool_mask, require_floating, require_positive, require_shape
from ..strategy import host_sync_is_free

# (digit width, shift) of each radix pass, most significant digit first.
_PASSES = {
    32: ((11, 21), (11, 10), (10, 0)),
    64: ((11, 53), (11, 42), (11, 31), (11, 20), (10, 10), (10, 0)),
}
# Bits below the sign: XOR with them maps a negative float's bits to an order-preserving key.
_MAGNITUDE = {32: 0x7FFFFFFF, 64: 0x7FFFFFFFFFFFFFFF}


def _ordered_keys(values: Tensor) -> tuple[Tensor, int]:
    """Integer keys whose signed order is the float order of ``values`` (``-0.0`` as ``+0.0``)."""
    if values.dtype == torch.float64:
        bits, int_type = 64, torch.int64
    else:
        values = values.float()
        bits, int_type = 32, torch.int32
    raw = (values + 0.0).view(int_type)
    return torch.where(raw >= 0, raw, raw ^ _MAGNITUDE[bits]), bits


def top_k_mask(values: Tensor, k: Tensor, eligible: Optional[Tensor] = None) -> Tensor:
    """Per-row mask of the ``k`` largest eligible values, ties to the lower index.

    Args:
        values: ``(R, N)`` float (half types are compared in float32); must not hold NaN.
        k: ``(R,)`` integer count per row; values above the number of eligible entries
            select all of them, values <= 0 select none.
        eligible: optional ``(R, N)`` bool; ineligible entries are never selected.

    Returns:
        ``(R, N)`` bool: exactly ``min(k, eligible count)`` True per row, the same set as
        ``rank < k`` after a stable descending sort of the eligible values.

    >>> top_k_mask(torch.tensor([[0.5, 2.0, 2.0, 1.0]]), torch.tensor([2]))
    tensor([[False,  True,  True, False]])
    """
    eligible = torch.ones_like(values, dtype=torch.bool) if eligible is None else eligible
    count = torch.minimum(k.to(torch.int64), torch.count_nonzero(eligible, dim=1)).clamp(min=0)
    if host_sync_is_free(values):
        threshold, remaining, all_ties = _kth_by_topk(values, count, eligible)
    else:
        threshold, remaining = _kth_by_radix(values, count, eligible)
        all_ties = False
    if all_ties:  # every row takes all of its ties: one comparison selects the set
        return eligible & (values >= threshold) & (count > 0).unsqueeze(1)
    tie = eligible & (threshold == values)
    take_tie = tie & (tie.cumsum(dim=1) <= remaining.unsqueeze(1))  # the first ties that fit
    return ((eligible & (values > threshold)) | take_tie) & (count > 0).unsqueeze(1)


# Fixed cost of one more group of rows in :func:`_kth_by_topk`, in units of (row x rank)
# (benchmarks/README.md, "Execution strategies").
_TOPK_GROUP_COST = 700


def _kth_by_topk(values: Tensor, count: Tensor, eligible: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(threshold (R, 1), remaining (R,), all_ties)``: each row's ``count``-th largest
    eligible value (in the comparison dtype), how many of its ties to take, and whether that is
    every tie of every row. A ``topk`` of ``max(count) + 1`` per group of rows with similar
    counts (:func:`detloss._grouping.group_by_count`; ``topk`` costs grow with the rank): the
    extra rank shows whether a tie continues past the cut; the other counts come from the small
    ranked tensor. Rows of count 0 keep threshold 0 (they select nothing)."""
    values = values if values.dtype == torch.float64 else values.float()
    threshold = values.new_zeros(values.shape[0], 1)
    remaining = count.clone()
    all_ties = True
    for rows, largest in group_by_count(count.tolist(), _TOPK_GROUP_COST):
        index = torch.tensor(rows, device=values.device)
        group_count = count.index_select(0, index)
        ranks = min(largest + 1, values.shape[1])
        ranked = values.index_select(0, index).masked_fill_(~eligible.index_select(0, index), float("-inf"))
        ranked = ranked.topk(ranks, dim=1).values
        cut = ranked.gather(1, (group_count - 1).unsqueeze(1))
        threshold.index_copy_(0, index, cut)
        # everything above the cut lies in the first ranks
        remaining.index_copy_(0, index, group_count - (ranked > cut).sum(dim=1))
        next_value = ranked.gather(1, group_count.clamp(max=ranks - 1).unsqueeze(1))
        # a tie continues past the cut (or cannot be seen): take the first ties by index instead
        continues = (next_value == cut).squeeze(1) | (group_count >= ranks)
        all_ties = all_ties and not bool(continues.any())
    return threshold, remaining, all_ties


def _kth_by_radix(values: Tensor, count: Tensor, eligible: Tensor) -> tuple[Tensor, Tensor]:
    """As :func:`_kth_by_topk`, by a radix select on the float bits: no host synchronisation."""
    rows, n = values.shape
    device = values.device
    keys, bits = _ordered_keys(values)
    remaining = count
    ones = torch.ones((), dtype=torch.int32, device=device).expand(rows * n)
    prefix = None
    for width, shift in _PASSES[bits]:
        buckets = 1 << width
        digits = keys >> shift
        if prefix is None:
            digits = digits + (buckets >> 1)
            in_class = eligible
        else:
            digits = digits & (buckets - 1)
            in_class = eligible & ((keys >> (shift + width)) == prefix.to(keys.dtype).unsqueeze(1))
        # one histogram per row; bucket ``buckets`` collects everything outside the class
        row_base = torch.arange(0, rows * (buckets + 1), buckets + 1, device=device, dtype=keys.dtype)
        slot = torch.where(in_class, digits, buckets).add_(row_base.unsqueeze(1))
        counts = torch.zeros(rows * (buckets + 1), dtype=torch.int32, device=device)
        counts.scatter_add_(0, slot.flatten().long(), ones)
        at_least = counts.view(rows, buckets + 1)[:, :buckets].flip(1).cumsum(1).flip(1)
        chosen = (at_least >= remaining.unsqueeze(1)).sum(dim=1) - 1
        above = torch.where(
            chosen + 1 < buckets,
            at_least.gather(1, (chosen + 1).clamp(max=buckets - 1).unsqueeze(1)).squeeze(1),
            0,
        )
        remaining = remaining - above
        prefix = chosen - (buckets >> 1) if prefix is None else prefix * buckets + chosen
    threshold_key = prefix.to(keys.dtype).unsqueeze(1)
    compare_dtype = torch.float64 if bits == 64 else torch.float32
    threshold = torch.where(threshold_key >= 0, threshold_key, threshold_key ^ _MAGNITUDE[bits]).view(compare_dtype)
    return threshold, remaining


def mine_hard_negatives(
    mining_loss: Tensor,
    positive: Tensor,
    *,
    neg_pos_ratio: float = 3,
    max_negatives: Optional[int] = None,
    candidates: Optional[Tensor] = None,
) -> Tensor:
    """Per-image hard negative mining: the highest-loss non-positive priors.

    Args:
        mining_loss: ``(B, P)`` float, the ranking score (e.g. background cross-entropy);
            detached here. Half types are ranked in float32.
        positive: ``(B, P)`` bool (or 0/1 integer) positives; never selected.
        neg_pos_ratio: negatives per positive of the same image; ``num_neg =
            min(floor(ratio * num_pos), P - 1)`` as in ssd.pytorch / Pytorch_Retinaface.
        max_negatives: optional further cap on ``num_neg`` per image.
        candidates: optional ``(B, P)`` bool; only these priors may be negatives (e.g. to
            exclude an ignore band). Positives are excluded in any case.

    Returns:
        ``(B, P)`` bool negative mask, disjoint from ``positive``; an image without positives
        gets no negatives. Ties in ``mining_loss`` go to the lower prior index, as with the
        originals' double argsort.

    >>> loss = torch.tensor([[0.1, 2.0, 0.5, 3.0, 0.2]])
    >>> mine_hard_negatives(loss, torch.tensor([[True, False, False, False, False]]), neg_pos_ratio=2)
    tensor([[False,  True, False,  True, False]])
    """
    dims = require_shape(mining_loss, "mining_loss", ("B", "P"))
    require_shape(positive, "positive", ("B", "P"), dims)
    require_floating(mining_loss, "mining_loss")
    positive = as_bool_mask(positive, "positive")
    require_positive(neg_pos_ratio, "neg_pos_ratio", allow_zero=True)
    eligible = ~positive
    if candidates is not None:
        require_shape(candidates, "candidates", ("B", "P"), dims)
        eligible = eligible & as_bool_mask(candidates, "candidates")
    num_pos = positive.sum(dim=1)
    if float(neg_pos_ratio).is_integer():
        num_neg = num_pos * int(neg_pos_ratio)
    else:
        num_neg = torch.floor(num_pos * float(neg_pos_ratio)).to(torch.int64)
    cap = mining_loss.shape[1] - 1 if max_negatives is None else min(mining_loss.shape[1] - 1, max_negatives)
    num_neg = num_neg.clamp(max=max(cap, 0))
    return top_k_mask(mining_loss.detach(), num_neg, eligible)
