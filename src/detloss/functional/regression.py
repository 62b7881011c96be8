"""Box-regression losses: smooth L1 (beta and sigma forms) and L1."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import require_floating, require_positive, require_same_shape
from ..boxes import accumulate_dtype
from .reduce import Reduction, weighted_reduce


def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    beta: Optional[float] = None,
    *,
    sigma: Optional[float] = None,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """Smooth L1 (Huber-like) loss of ``input - target``, element-wise, then reduced.

    ``0.5 * x**2 / beta`` where ``|x| < beta``, else ``|x| - 0.5 * beta``. Give either
    ``beta`` (torchvision / Fast R-CNN form, default 1.0) or ``sigma`` (the Faster R-CNN
    form: ``beta = 1 / sigma**2``, so sigma 3 for the RPN is beta 1/9). ``beta = 0`` is L1.
    At ``|x| == beta`` the linear branch is used, as in the originals.

    Args:
        input, target: same shape ``(...)``, floating point.
        beta / sigma: the transition point (at most one of them).
        weight, reduction, normalizer: see :func:`detloss.functional.weighted_reduce`.

    >>> x = torch.tensor([0.2, -1.5, 3.0])
    >>> smooth_l1_loss(x, torch.zeros(3))
    tensor(1.1733)
    >>> smooth_l1_loss(x, torch.zeros(3), sigma=3.0, reduction="sum")  # the RPN's beta = 1/9
    tensor(4.5333)
    """
    require_floating(input, "input")
    require_same_shape(target, "target", input, "input")
    if beta is not None and sigma is not None:
        raise ValueError("beta, sigma: expected at most one of them, got both")
    if sigma is not None:
        require_positive(sigma, "sigma")
        beta = 1.0 / sigma**2
    beta = 1.0 if beta is None else require_positive(beta, "beta", allow_zero=True)
    acc = accumulate_dtype(input)
    if beta > 0 and math.frexp(beta)[0] == 0.5 and input.dtype == target.dtype == acc:
        # torch's fused kernel: for a power-of-two beta its 0.5 * x * x / beta rounds exactly
        # like (0.5 / beta) * x**2 below, so the values are bit-identical.
        loss = F.smooth_l1_loss(input, target, reduction="none", beta=float(beta))
        return weighted_reduce(loss, weight, reduction, normalizer)
    diff = (input - target).to(acc)
    abs_diff = diff.abs()
    if beta == 0:
        loss = abs_diff
    else:
        loss = torch.where(abs_diff < beta, (0.5 / beta) * diff**2, abs_diff - 0.5 * beta)
    return weighted_reduce(loss, weight, reduction, normalizer)


def l1_loss(
    input: Tensor,
    target: Tensor,
    *,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """``|input - target|`` element-wise, then reduced; shapes ``(...)`` equal.

    >>> l1_loss(torch.tensor([0.2, -1.5, 3.0]), torch.zeros(3), weight=torch.tensor([1.0, 0.0, 1.0]), reduction="sum")
    tensor(3.2000)
    """
    return smooth_l1_loss(
        input, target, 0.0, weight=weight, reduction=reduction, normalizer=normalizer
    )
