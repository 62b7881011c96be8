"""The entries of a per-prior mask, gathered into rows where that is cheap.

Per-prior losses usually touch few priors: SSD's positives and mined negatives are about 4 %
of the ``(B, P)`` grid, its box loss 0.3 %. On the CPU the mask's True count can be read
without stalling anything (a host synchronisation costs nothing there), so a loss can gather
just those rows: the element-wise work shrinks to the selected rows and the backward becomes
one zero fill plus an ``index_add``. On accelerators and under ``torch.compile`` a selection
stays a mask (static shapes, no synchronisation) and the loss is weighted by it instead. Both
forms give the same value up to the summation order.

:class:`RowSelection` hides which form is in use: losses call ``take`` / ``take_priors`` /
``take_matched`` on their per-prior inputs and pass ``weight`` to the reduction.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..strategy import host_sync_is_free


def gather_matched(values: Tensor, matched_gt: Tensor) -> Tensor:
    """Per-prior rows of per-GT ``values (B, M, K)`` for ``matched_gt (B, P)`` -> ``(B, P, K)``.

    Slot -1 (no GT) reads slot 0 (or zeros when ``M == 0``); such rows are never used.
    """
    b, m, k = values.shape
    if m == 0:
        return values.new_zeros(b, matched_gt.shape[1], k)
    image_offset = torch.arange(0, b * m, m, device=matched_gt.device).unsqueeze(1)
    rows = (matched_gt.clamp(min=0) + image_offset).flatten()
    return values.reshape(b * m, k).index_select(0, rows).view(b, -1, k)


class RowSelection:
    """The True entries of a ``(B, P)`` bool ``mask``, as ``K`` gathered rows or as the mask.

    Args:
        mask: ``(B, P)`` bool.
        gather: gather rows (True) or keep the mask (False); by default gather exactly where
            :func:`host_sync_is_free`.

    In gathered form ``take`` returns ``(K, ...)`` rows in row-major order of the mask and
    ``weight`` is None; in mask form ``take`` returns its input unchanged and ``weight`` is
    the mask, so ``loss(take(a), take(b), weight=weight(...))`` is the same sum either way.
    """

    def __init__(self, mask: Tensor, gather: Optional[bool] = None) -> None:
        self.mask = mask
        self.num_priors = mask.shape[1]
        self.gathered = host_sync_is_free(mask) if gather is None else bool(gather)
        self.index = mask.flatten().nonzero().squeeze(1) if self.gathered else None

    def take(self, values: Tensor) -> Tensor:
        """Per-prior ``values (B, P, ...)`` -> ``(K, ...)`` (gathered) or ``values`` itself."""
        if not self.gathered:
            return values
        return values.flatten(0, 1).index_select(0, self.index)

    def take_priors(self, priors: Tensor) -> Tensor:
        """Values shared by all images ``(P, ...)`` -> ``(K, ...)`` or ``priors`` (they broadcast)."""
        if not self.gathered:
            return priors
        return priors.index_select(0, self.index.remainder(self.num_priors))

    def take_matched(self, values: Tensor, matched_gt: Tensor) -> Tensor:
        """Per-GT ``values (B, M, K)`` at the GT each prior matched, ``matched_gt (B, P)``.

        ``(K, K')`` gathered or ``(B, P, K')`` (:func:`gather_matched`); slot -1 reads slot 0.
        """
        if not self.gathered:
            return gather_matched(values, matched_gt)
        b, m, k = values.shape
        if m == 0:
            return values.new_zeros(self.index.shape[0], k)
        slot = matched_gt.flatten().index_select(0, self.index).clamp(min=0)
        image = self.index.div(self.num_priors, rounding_mode="floor")
        return values.reshape(b * m, k).index_select(0, image * m + slot)

    def weight(self, trailing_dims: int = 0) -> Optional[Tensor]:
        """None (gathered) or the mask with ``trailing_dims`` singleton dimensions appended."""
        if self.gathered:
            return None
        return self.mask[(...,) + (None,) * trailing_dims]

    def scatter(self, rows: Tensor) -> Tensor:
        """The inverse of ``take`` for reporting: ``(B, P, ...)`` with zeros where the mask is False."""
        if not self.gathered:
            return torch.where(self.mask[(...,) + (None,) * (rows.dim() - 2)], rows, rows.new_zeros(()))
        b, p = self.mask.shape
        dense = rows.new_zeros((b * p,) + rows.shape[1:])
        return dense.index_copy_(0, self.index, rows).view((b, p) + rows.shape[1:])
