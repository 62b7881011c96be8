"""Losses of one-stage detectors trained against soft (quality) targets and box distributions.

* :func:`distribution_focal_loss`: GFL's DFL (Li et al. 2020, arXiv:2006.04388) on a box side
  predicted as a distribution over ``n`` integer bins.
* :func:`quality_focal_loss`: GFL's QFL, BCE against a soft target in [0, 1] scaled by
  ``|target - sigmoid(x)| ** beta``.
* :func:`varifocal_loss`: VarifocalNet's VFL (Zhang et al. 2021, arXiv:2008.13367): BCE against
  the soft target, weighted by the target where it is positive and by
  ``alpha * sigmoid(x) ** gamma`` where it is 0.

All compute in float32 (float64 stays float64) and reduce through
:func:`detloss.functional.weighted_reduce` (``weight``, ``reduction``, ``normalizer``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .._validate import require_floating, require_positive
from .classification import _acc, _check_pair, _modulating_factor, binary_cross_entropy_with_logits, sigmoid_focal_loss
from .reduce import Reduction, weighted_reduce


def distribution_focal_loss(
    logits: Tensor,
    target: Tensor,
    *,
    max_target: Optional[float] = None,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """Distribution focal loss of bin ``logits (..., n)`` against real-valued ``target (...)``.

    The target ``y`` (a distance in bin units) is clamped to ``[0, max_target]``
    (``max_target`` defaults to ``n - 1``, the last bin); with its neighbouring bins
    ``l = floor(y)`` (at most ``n - 2``) and ``r = l + 1`` the element-wise loss is the
    cross-entropy at both, weighted by linear interpolation:
    ``-((r - y) * log softmax(x)[l] + (y - l) * log softmax(x)[r])``. Output shape ``(...)``
    before reduction. ultralytics clamps at ``n - 1.01`` (``max_target=n - 1.01``).

    >>> logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    >>> distribution_focal_loss(logits, torch.tensor([1.5]))  # log(4): uniform bins
    tensor(1.3863)
    """
    require_floating(logits, "logits")
    require_floating(target, "target")
    if logits.dim() == 0 or logits.shape[-1] < 2 or target.shape != logits.shape[:-1]:
        raise ValueError(
            f"logits, target: expected shapes (..., n >= 2) and (...), got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    n = logits.shape[-1]
    if max_target is not None:
        require_positive(max_target, "max_target", allow_zero=True)
        if max_target > n - 1:
            raise ValueError(f"max_target: expected a number <= n - 1 = {n - 1}, got {max_target!r}")
    return weighted_reduce(distribution_focal_unchecked(logits, target, max_target), weight, reduction, normalizer)


def distribution_focal_unchecked(logits: Tensor, target: Tensor, max_target: Optional[float] = None) -> Tensor:
    """The element-wise DFL ``(...)`` of :func:`distribution_focal_loss`, without checks."""
    n = logits.shape[-1]
    y = _acc(target).clamp(0, n - 1 if max_target is None else max_target)
    left = y.floor().clamp(max=n - 2)
    w_left = left + 1 - y  # weight of the left bin; the right bin gets 1 - w_left
    log_prob = torch.log_softmax(_acc(logits), dim=-1)
    index = left.long().unsqueeze(-1)
    lp_left = log_prob.gather(-1, index).squeeze(-1)
    lp_right = log_prob.gather(-1, index + 1).squeeze(-1)
    return -(lp_left * w_left + lp_right * (1 - w_left))


def quality_focal_loss(
    logits: Tensor,
    targets: Tensor,
    beta: float = 2.0,
    *,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """Quality focal loss: ``|t - sigmoid(x)| ** beta * BCE(x, t)`` of ``logits (...)``
    against soft ``targets (...)`` in [0, 1] (an IoU-aware class score; 0 for background).

    The sigmoid focal loss with soft targets and no alpha weighting, which is what it is
    computed as. Element-wise shape ``(...)``.

    >>> quality_focal_loss(torch.tensor([0.0]), torch.tensor([0.5]))  # |0.5 - 0.5| ** 2 = 0
    tensor(0.)
    """
    return sigmoid_focal_loss(logits, targets, alpha=-1.0, gamma=beta, weight=weight, reduction=reduction,
                              normalizer=normalizer)


def varifocal_loss(
    logits: Tensor,
    targets: Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
    *,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """Varifocal loss of ``logits (...)`` against soft ``targets (...)`` in [0, 1].

    ``BCE(x, q) * (q if q > 0 else alpha * sigmoid(x) ** gamma)``: positives are weighted by
    their target quality ``q``, negatives down-weighted focally. Gradients flow through the
    focal weight (as VarifocalNet, mmdetection and ultralytics). Element-wise shape ``(...)``.

    >>> varifocal_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), reduction="none")
    tensor([0.6931, 0.1300])
    """
    _check_pair(logits, targets)
    require_positive(alpha, "alpha", allow_zero=True)
    require_positive(gamma, "gamma", allow_zero=True)
    x, t = _acc(logits), _acc(targets)
    bce = binary_cross_entropy_with_logits(x, t, reduction="none")
    focal = alpha * _modulating_factor(torch.sigmoid(x), gamma)
    loss = bce * torch.where(t > 0, t, focal)
    return weighted_reduce(loss, weight, reduction, normalizer)


__all__ = ["distribution_focal_loss", "quality_focal_loss", "varifocal_loss"]
