"""Fused, chunked sum of the sigmoid focal loss against one-hot class targets (private).

``sum_r w_r * sum_k focal(x_rk, t_rk)`` with ``t_rk = 1`` iff ``k == target_r`` (``target_r = -1``:
an all-zero row), the classification term of RetinaNet. The values are those of
:func:`detloss.functional.sigmoid_focal_loss` with 0/1 targets:

* background entry (``t = 0``), ``p = sigmoid(x)``: loss ``c0 p**g softplus(x)``, gradient
  ``c0 p**g (g (1 - p) softplus(x) + p)``;
* target entry (``t = 1``), ``q = sigmoid(-x)``: loss ``c1 q**g softplus(-x)``, gradient
  ``-c1 q**g (g (1 - q) softplus(-x) + q)``;

with ``c1 = alpha``, ``c0 = 1 - alpha`` (both 1 for ``alpha < 0``). One pass over the logits,
``chunk`` rows at a time, computes every entry as background: the loss sum and, when the
logits need a gradient, the gradient into a buffer that the first backward scales in place and
returns. The one target entry per row is computed on its own (``(R,)``-sized) and swapped in
with a gather and a scatter per chunk, so no one-hot tensor is built. A forward plus backward
holds one logits-sized gradient on top of the logits and a few cache-sized chunk temporaries.
A second backward through a retained graph (or one under ``torch.compile``) recomputes the
gradient, since the buffer was handed over, so ``retain_graph`` is safe. Not twice
differentiable.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._chunking import FOCAL_LOGITS, chunk_elements
from .._memory import new_like
from ..boxes import accumulate_dtype

# softplus(x) = x above this (exp(-40) is below float64 resolution at 40; no overflow below).
_SOFTPLUS_THRESHOLD = 40.0


def _pow(p: Tensor, gamma: float) -> Tensor:
    return p * p if gamma == 2.0 else p.pow(gamma)


def _background_terms(
    x: Tensor, coef: Tensor, gamma: float, with_grad: bool, grad_out: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(factor, softplus(x), gradient)`` of ``coef * focal(x, t=0)``: the loss is
    ``factor * softplus(x)``; the gradient is None unless asked, written into ``grad_out``
    when given (same shape and dtype as ``x``). For ``t = 1`` pass ``-x`` and negate the
    gradient."""
    p = torch.sigmoid(x)
    sp = F.softplus(x, threshold=_SOFTPLUS_THRESHOLD)
    factor = _pow(p, gamma).mul_(coef)
    grad = None
    if with_grad:
        grad = torch.addcmul(p, 1 - p, sp, value=gamma)
        grad = grad.mul_(factor) if grad_out is None else torch.mul(grad, factor, out=grad_out)
    return factor, sp, grad


def _focal_pass(
    logits: Tensor, target: Tensor, weight: Tensor, alpha: float, gamma: float, chunk: int,
    with_grad: bool, grad_scale: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """One pass over ``logits (R, K)``, ``chunk`` rows at a time: the loss sum (0-d) and, with
    ``with_grad``, the gradient ``(R, K)``, times ``grad_scale`` (0-d) when given (folded into
    the per-row coefficients, so no second pass scales it)."""
    acc = accumulate_dtype(logits.dtype)
    c1, c0 = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
    # 1. the target entries, (R,): their loss and gradient, computed once
    is_target = (target >= 0).unsqueeze(1)  # (R, 1)
    col = target.clamp(min=0).unsqueeze(1)
    w = weight.to(acc).unsqueeze(1)
    if grad_scale is not None:
        w = w * grad_scale.to(acc)
    factor1, sp1, grad1 = _background_terms(-logits.gather(1, col).to(acc), w * is_target * c1, gamma, with_grad)
    total = (factor1 * sp1).sum(dtype=torch.float64)  # chunk sums accumulate in float64
    coef = w * c0
    del factor1, sp1, w  # row-sized: not held through the pass
    # 2. every other entry is background: one fused pass, chunk by chunk; the target entry of
    #    each row is left out of the sum and given its own gradient
    grad = new_like(logits, zero=False) if with_grad else None
    for start in range(0, logits.shape[0], chunk):
        rows = slice(start, start + chunk)
        c, t = col[rows], is_target[rows]
        direct = None if grad is None or grad.dtype != acc else grad[rows]  # else copied below
        factor, sp, g = _background_terms(logits[rows].to(acc), coef[rows], gamma, with_grad, direct)
        factor.scatter_(1, c, factor.gather(1, c) * ~t)
        total = total + torch.dot(factor.view(-1), sp.view(-1))
        if grad is not None:
            g.scatter_(1, c, torch.where(t, -grad1[rows], g.gather(1, c)))
            if direct is None:
                grad[rows] = g
    return total.to(acc), grad


class _FocalSum(torch.autograd.Function):
    """Loss and gradient in one forward pass; the first backward scales that gradient in place
    and hands it over (a forward plus backward holds one logits-sized tensor). A later backward
    through the same graph (``retain_graph``), or one under ``torch.compile``, recomputes it."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Tensor, alpha: float, gamma: float, chunk: int):
        ctx.save_for_backward(logits, target, weight)
        ctx.options = (alpha, gamma, chunk)
        total, ctx.unscaled_grad = _focal_pass(logits, target, weight, alpha, gamma, chunk, ctx.needs_input_grad[0])
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        grad, ctx.unscaled_grad = ctx.unscaled_grad, None  # handed over once, never read again
        if grad is not None and not torch.compiler.is_compiling():
            grad = grad.mul_(grad_total.to(grad.dtype))
        else:
            logits, target, weight = ctx.saved_tensors
            grad = _focal_pass(logits, target, weight, *ctx.options, with_grad=True, grad_scale=grad_total)[1]
        return grad, None, None, None, None, None


def chunked_sigmoid_focal_sum(
    logits: Tensor,
    target_class: Tensor,
    weight: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Memory-bounded ``sum(weight * sigmoid_focal_loss(logits, one_hot(target_class)))``.

    Args:
        logits: ``(..., K)`` floating point (any precision; maths in float32 or float64).
        target_class: ``(...)`` int64 class in ``[0, K-1]`` or -1 for an all-zero target row.
        weight: ``(...)`` per-row weight (0 drops the row).
        alpha, gamma: as :func:`detloss.functional.sigmoid_focal_loss` (``alpha < 0``: none).
        chunk_size: rows per chunk (default about 64k logits per chunk).

    Returns:
        0-d float32 (float64 for float64 logits) tensor, differentiable w.r.t. ``logits``;
        value and gradient each come from one fused pass (see the module doc).
    """
    num_classes = logits.shape[-1]
    flat = logits.reshape(-1, num_classes)
    if chunk_size is None:
        elements = chunk_elements(logits.device, FOCAL_LOGITS)
        chunk_size = max(1, elements // max(1, num_classes))
    if flat.shape[0] == 0 or num_classes == 0:
        return (flat.sum() * 0).to(accumulate_dtype(logits.dtype))
    return _FocalSum.apply(
        flat, target_class.reshape(-1), weight.reshape(-1), float(alpha), float(gamma), int(chunk_size)
    )
