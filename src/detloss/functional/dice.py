"""Dice loss on probabilities or logits (for mask-like targets)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validate import require_floating, require_same_shape
from ..boxes import accumulate_dtype
from .reduce import Reduction, weighted_reduce


def dice_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    smooth: float = 1.0,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """``1 - (2 |P.T| + s) / (|P| + |T| + s)`` per item, ``P = sigmoid(logits)``.

    ``logits`` and ``targets`` are ``(N, ...)``; the sums run over all but the first
    dimension, giving one loss per item ``(N,)`` before ``weight``/``reduction``.

    >>> dice_loss(torch.tensor([[4.0, -4.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]), reduction="none")
    tensor([0.0120, 0.2500])
    """
    require_floating(logits, "logits")
    if logits.dim() == 0:
        raise ValueError(f"logits: expected shape (N, ...), got {tuple(logits.shape)}")
    require_same_shape(targets, "targets", logits, "logits")
    dtype = accumulate_dtype(logits)
    if logits.dim() == 1:  # one value per item
        logits, targets = logits[:, None], targets[:, None]
    p = torch.sigmoid(logits.to(dtype)).flatten(1)
    t = targets.to(dtype).flatten(1)
    loss = 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return weighted_reduce(loss, weight, reduction)
