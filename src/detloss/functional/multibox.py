"""The MultiBox terms SSD and RetinaFace share: smooth L1 over the matched priors, softmax
cross-entropy over the positives and the mined hard negatives, and their normaliser ``N``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..sampling.hard_negative import mine_hard_negatives
from ..strategy import host_sync_is_free
from .classification import class_cross_entropy_no_grad, cross_entropy
from .reduce import positive_normalizer, weighted_reduce
from .regression import smooth_l1_loss
from .selection import RowSelection


def multibox_normalizer(positive: Tensor, kind: str, distributed: bool) -> Tensor:
    """``N``: the batch's positive count clamped at 1 (all-reduced if ``distributed``), or 1."""
    if kind == "none":
        return torch.ones((), device=positive.device)
    return positive_normalizer(positive.sum(), distributed=distributed)


def smooth_l1_over(
    mask: Tensor,
    pred: Tensor,
    gt_values: Tensor,
    matched_gt: Tensor,
    priors: Tensor,
    encode: Callable[[Tensor, Tensor], Tensor],
    normalizer: Tensor,
) -> tuple[Tensor, Tensor]:
    """``sum over the priors in mask of smooth_l1(pred, encode(their GT's values, prior)) / normalizer``.

    ``mask (B, P)`` bool, ``pred (B, P, K)``, ``gt_values (B, M, K')`` per-GT boxes or landmarks,
    ``matched_gt (B, P)`` each prior's GT slot, ``priors (P, 4)``; smooth L1 with beta 1 (both
    originals). Returns the 0-d loss and the encoded targets ``(B, P, K)`` (detached, 0 outside
    ``mask``). Only the masked rows are encoded and compared where that is cheap
    (:class:`detloss.functional.selection.RowSelection`).
    """
    rows = RowSelection(mask)
    targets = encode(rows.take_matched(gt_values, matched_gt), rows.take_priors(priors))
    loss = smooth_l1_loss(rows.take(pred), targets, 1.0, weight=rows.weight(1), reduction="sum", normalizer=normalizer)
    return loss, rows.scatter(targets.detach())


def mined_cross_entropy(
    cls_logits: Tensor,
    labels: Tensor,
    positive: Tensor,
    *,
    neg_pos_ratio: float,
    normalizer: Tensor,
    candidates: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Softmax cross-entropy over positives and per-image hard negatives, summed / ``normalizer``.

    ``cls_logits (B, P, C)``, ``labels (B, P)`` int64 (0 = background), ``positive (B, P)``
    bool. Negatives are ranked by their cross-entropy against the background
    (:func:`detloss.mine_hard_negatives`). Returns ``(loss (0-d float32/64), negative (B, P)
    bool)``. Non-finite logits give a non-finite loss (never read on the host).

    Two strategies with the same result (up to summation order), chosen like
    :class:`detloss.functional.selection.RowSelection`:

    * gathered (CPU): the ranking scores ``logsumexp(x) - x_0`` of every prior come from
      :func:`detloss.functional.classification.class_cross_entropy_no_grad`; the
      differentiable cross-entropy is computed on the ~4 % of rows that are selected;
    * dense (accelerators, ``torch.compile``): the cross-entropy of every prior is computed
      once, with autograd, and its detached value ranks the negatives.
    """
    if host_sync_is_free(cls_logits):
        mining_loss = class_cross_entropy_no_grad(cls_logits, 0)
        negative = mine_hard_negatives(mining_loss, positive, neg_pos_ratio=neg_pos_ratio, candidates=candidates)
        chosen = RowSelection(positive | negative, gather=True)
        loss = cross_entropy(chosen.take(cls_logits), chosen.take(labels), reduction="sum", normalizer=normalizer)
        return loss, negative
    ce = cross_entropy(cls_logits, labels, reduction="none")
    negative = mine_hard_negatives(ce.detach(), positive, neg_pos_ratio=neg_pos_ratio, candidates=candidates)
    loss = weighted_reduce(ce, positive | negative, "sum", normalizer)
    return loss, negative
