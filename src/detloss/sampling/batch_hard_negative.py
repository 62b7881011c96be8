"""Batch-wide hard negative mining (ssd_keras ``SSDLoss``).

The negative losses of all images are pooled and the ``k`` largest kept, with
``k = min(max(neg_pos_ratio * num_pos_total, min_negatives), number of negatives with a
non-zero loss)``. One image can get many negatives and another none, unlike the per-image
mining of ssd.pytorch. Capping ``k`` at the non-zero count means an all-zero loss never
selects anything.

Formulated without host synchronisation: ``k`` stays a tensor, the flattened losses are
sorted once (stably, descending) and an element is kept when its rank is below ``k``.
Ties at the k-th value go to the lower flat index (image-major, then anchor); the original's
``tf.nn.top_k(sorted=False)`` leaves that order unspecified.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from .._validate import as_bool_mask, require_floating, require_positive, require_shape


def mine_hard_negatives_batchwide(
    neg_loss: Tensor,
    negative: Tensor,
    num_pos_total: Union[Tensor, int, float],
    *,
    neg_pos_ratio: float = 3,
    min_negatives: int = 0,
) -> Tensor:
    """Kept-negative mask ``(B, P)`` bool: the top ``k`` negative losses of the whole batch.

    Args:
        neg_loss: ``(B, P)`` floating, the classification loss of each anchor (only entries
            where ``negative`` is set are ranked; others count as 0). Its gradient is not used.
        negative: ``(B, P)`` bool (or 0/1 integer), the candidate negatives.
        num_pos_total: number of positives in the whole batch (a 0-d tensor or a number);
            truncated to an integer as the original does (``tf.to_int32``).
        neg_pos_ratio: negatives kept per positive (3 in SSD).
        min_negatives: keep at least this many (``n_neg_min``) when that many negatives have
            a non-zero loss.

    Returns:
        ``(B, P)`` bool mask, a subset of ``negative`` with non-zero loss, of size
        ``min(max(floor(neg_pos_ratio * floor(num_pos_total)), min_negatives), n_nonzero)``.
    """
    require_floating(neg_loss, "neg_loss")
    dims = require_shape(neg_loss, "neg_loss", ("B", "P"))
    negative = as_bool_mask(negative, "negative")
    require_shape(negative, "negative", ("B", "P"), dims)
    require_positive(neg_pos_ratio, "neg_pos_ratio", allow_zero=True)
    if isinstance(min_negatives, bool) or not isinstance(min_negatives, int) or min_negatives < 0:
        raise ValueError(f"min_negatives: expected an integer >= 0, got {min_negatives!r}")
    values = torch.where(negative, neg_loss.detach(), torch.zeros((), dtype=neg_loss.dtype, device=neg_loss.device))
    flat = values.reshape(-1)
    num_pos = torch.as_tensor(num_pos_total, device=flat.device).detach().to(torch.float64).floor()
    wanted = torch.clamp((neg_pos_ratio * num_pos).floor(), min=float(min_negatives))
    k = torch.minimum(wanted, (flat != 0).sum().to(torch.float64))
    order = torch.sort(flat, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=flat.device))
    return (rank < k).view_as(negative) & negative
