"""Box-regression losses: smooth L1 (beta and sigma forms) and L1, and :func:`smooth_l1_sum`,
the weighted sum of the same values whose backward holds one input-sized tensor."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._validate import require_floating, require_positive, require_same_shape
from ..boxes import accumulate_dtype, compute_dtype
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
    return weighted_reduce(_smooth_l1_elements(diff, diff.abs(), beta), weight, reduction, normalizer)


def _smooth_l1_elements(diff: Tensor, abs_diff: Tensor, beta: float) -> Tensor:
    """Element-wise smooth L1 of ``diff`` (L1 for ``beta = 0``) given ``abs_diff = |diff|``; the
    linear branch at ``|diff| == beta``."""
    if beta == 0:
        return abs_diff
    return torch.where(abs_diff < beta, (0.5 / beta) * diff**2, abs_diff - 0.5 * beta)


def smooth_l1_sum(input: Tensor, target: Tensor, beta: float, weight: Tensor) -> Tensor:
    """``smooth_l1_loss(input, target, beta, weight=weight, reduction="sum")``, the same value,
    with a lean backward: the forward pass also computes the gradient, and that one
    input-sized tensor is all the graph keeps (autograd through the element-wise form keeps
    three or four, and its backward allocates as many again). For dense anchor-sized box
    terms, such as RetinaNet's over every anchor.

    ``input``, ``target (...)`` floating point, same shape; ``weight`` broadcastable to them
    (0 removes an element exactly, as :func:`detloss.functional.weighted_reduce`); ``beta >= 0``.
    The gradient flows to ``input`` and ``target``. Inputs are not checked (internal callers).

    >>> x = torch.tensor([0.2, -1.5, 3.0], requires_grad=True)
    >>> total = smooth_l1_sum(x, torch.zeros(3), 1.0, torch.tensor([1.0, 1.0, 0.0]))
    >>> total.backward(); total, x.grad
    (tensor(1.0200, grad_fn=<_SmoothL1SumBackward>), tensor([ 0.2000, -1.0000,  0.0000]))
    """
    return _SmoothL1Sum.apply(input, target, weight, float(beta))


class _SmoothL1Sum(torch.autograd.Function):
    """:func:`smooth_l1_sum`: the slope ``diff / beta`` inside ``|diff| < beta``, ``sign(diff)``
    elsewhere, times the weight, is computed in the forward pass and kept for the backward."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, weight: Tensor, beta: float):
        diff = (input - target).to(accumulate_dtype(input))
        abs_diff = diff.abs()
        total = weighted_reduce(_smooth_l1_elements(diff, abs_diff, beta), weight, "sum")
        slope = diff.sign() if beta == 0 else torch.where(abs_diff < beta, diff * (1.0 / beta), diff.sign())
        weight = weight.to(slope.dtype)
        ctx.save_for_backward(torch.where(weight != 0, slope.mul_(weight), 0.0))
        ctx.dtypes = (input.dtype, target.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        (slope,) = ctx.saved_tensors
        grad = slope * grad_total.to(slope.dtype)
        input_grad = grad.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        target_grad = grad.neg().to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return input_grad, target_grad, None, None


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


def inside_outside_smooth_l1(
    pred: Tensor, target: Tensor, inside_weight: Tensor, outside_weight: Tensor, *,
    sigma: Optional[float] = None, beta: Optional[float] = None,
) -> Tensor:
    """Element-wise ``outside * smoothL1(inside * (pred - target))`` (Faster R-CNN's form).

    All four tensors have the same shape ``(...)``; give ``sigma`` (``beta = 1 / sigma**2``)
    or ``beta``. Computed in float32 for half inputs. Returns the unreduced ``(...)`` loss.
    """
    require_floating(pred, "pred")
    for name, t in (("target", target), ("inside_weight", inside_weight), ("outside_weight", outside_weight)):
        require_same_shape(t, name, pred, "pred")
    diff = inside_weight * (pred.to(compute_dtype(pred)) - target)
    return smooth_l1_loss(
        diff, torch.zeros_like(diff), beta, sigma=sigma, weight=outside_weight, reduction="none"
    )
