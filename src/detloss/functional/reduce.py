"""Weights, reduction and normalisation, written once for every element-wise loss.

Every loss in :mod:`detloss.functional` computes an element-wise loss tensor and hands it to
:func:`weighted_reduce`, so ``weight``, ``reduction`` and ``normalizer`` behave the same
everywhere. Reductions run in :func:`detloss.boxes.accumulate_dtype` (float32, float64 stays
float64).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .._validate import broadcast_shape, require_choice, require_tensor
from ..boxes import accumulate_dtype

Reduction = Literal["none", "sum", "mean"]
REDUCTIONS = ("none", "sum", "mean")


def require_weight_shape(weight: Optional[Tensor], shape: torch.Size) -> None:
    """Raise unless ``weight`` is None or a tensor that broadcasts to the loss ``shape``."""
    if weight is None:
        return
    require_tensor(weight, "weight")
    if broadcast_shape(weight.shape, shape) != tuple(shape):
        raise ValueError(
            f"weight: expected a shape that broadcasts to the element-wise loss "
            f"{tuple(shape)}, got {tuple(weight.shape)}"
        )


def weighted_reduce(
    loss: Tensor,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """Apply ``weight`` to an element-wise ``loss`` and reduce it.

    Args:
        loss: element-wise loss, any shape.
        weight: optional, broadcastable to ``loss`` (a bool mask counts as 0/1 weights);
            a zero weight removes an element from the value exactly (selected away, not
            multiplied, so an inf there does not turn into NaN).
        reduction: ``"none"`` (weighted element-wise loss, same shape), ``"sum"``, or
            ``"mean"``. For ``"mean"`` with a weight the divisor is the sum of the
            weights (clamped to at least 1e-12); without, the number of elements (an empty
            input gives 0, not NaN).
        normalizer: if given, the weighted sum is divided by it instead (a positive-count
            normaliser, for example); ``reduction`` must then be ``"sum"`` or ``"mean"``.

    Returns:
        A 0-d tensor (float32 or float64), or the weighted loss for ``"none"``.

    >>> loss = torch.tensor([1.0, 2.0, 3.0])
    >>> weighted_reduce(loss, torch.tensor([1.0, 0.0, 1.0]), "mean")  # divided by the weight sum
    tensor(2.)
    >>> weighted_reduce(loss, torch.tensor([True, False, True]), "sum", normalizer=torch.tensor(4.0))
    tensor(1.)
    """
    require_choice(reduction, "reduction", REDUCTIONS)
    require_weight_shape(weight, loss.shape)
    if reduction == "none" and normalizer is not None:
        raise ValueError("normalizer: expected None with reduction='none'")
    acc = accumulate_dtype(loss)
    loss = loss.to(acc)
    if weight is not None and weight.dtype == torch.bool and reduction != "none":
        total = _masked_sum(loss, weight)
        if normalizer is not None:
            return total / normalizer
        if reduction == "sum":
            return total
        return total / torch.broadcast_to(weight, loss.shape).sum().to(acc).clamp(min=1e-12)
    if weight is not None and weight.dtype == torch.bool:
        # a materialised mask selects faster than a broadcast over a short last dim
        loss = torch.where(weight.expand(loss.shape).contiguous(), loss, 0.0)
    elif weight is not None:
        weight = weight.to(acc)
        loss = torch.where(weight != 0, loss * weight, 0.0)
    if reduction == "none":
        return loss
    total = loss.sum()
    if normalizer is not None:
        return total / normalizer
    if reduction == "sum":
        return total
    if weight is None:
        return total / max(loss.numel(), 1)
    return total / torch.broadcast_to(weight, loss.shape).sum().clamp(min=1e-12)


def _masked_sum(loss: Tensor, mask: Tensor) -> Tensor:
    """``sum(loss where mask)`` for a bool ``mask`` that broadcasts to ``loss``.

    All elements under one mask entry (e.g. the 4 box offsets of a prior for a ``(B, P, 1)``
    mask) are kept or dropped together, so they are summed first and selected once: the
    select and its backward then run on the mask's size instead of the loss's. A dropped
    entry contributes exactly 0 even if its elements are inf/NaN. Only the summation order
    differs from selecting element by element (rounding-level differences in the total).
    """
    mask = mask.reshape((1,) * (loss.dim() - mask.dim()) + tuple(mask.shape))
    spread = [d for d in range(loss.dim()) if mask.shape[d] == 1 and loss.shape[d] != 1]
    if spread:
        loss = loss.sum(dim=spread, keepdim=True)
    return torch.where(mask, loss, 0.0).sum()


def positive_normalizer(
    num_pos: Tensor,
    *,
    distributed: bool = False,
    min_value: float = 1.0,
) -> Tensor:
    """The loss divisor built from a count of positives, safe for zero and for DDP.

    Args:
        num_pos: count of positives on this process, any shape (summed), any dtype; its
            gradient is never taken.
        distributed: when True and ``torch.distributed`` is initialised, the count is
            all-reduced (summed) over processes, clamped to ``min_value``, and divided by the
            world size. DDP averages gradients over processes, so each process then
            contributes exactly ``1 / world_size`` of the single-process gradient on the
            whole batch, whatever the split of positives, including steps where one process
            has none.
        min_value: lower bound of the (global) count, 1 by default, so a batch without
            positives divides by 1 instead of 0.

    Returns:
        A 0-d float32 tensor (float64 if ``num_pos`` is float64) on ``num_pos``'s device.

    >>> positive_normalizer(torch.tensor(0)), positive_normalizer(torch.tensor([3, 4]))
    (tensor(1.), tensor(7.))
    """
    require_tensor(num_pos, "num_pos")
    count = num_pos.detach().to(accumulate_dtype(num_pos)).sum()
    if distributed and dist.is_available() and dist.is_initialized():
        count = count.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        return count.clamp(min=min_value) / dist.get_world_size()
    return count.clamp(min=min_value)
