"""Fixed-size balanced random sampling (R-CNN style), batched, without host synchronisation.

Per image, at most ``floor(batch_size_per_image * positive_fraction)`` positives are kept,
drawn uniformly without replacement, and then at most ``batch_size_per_image - kept
positives`` negatives; the others become -1 (ignored). This is the rule of py-faster-rcnn /
tf-faster-rcnn's ``anchor_target_layer`` and torchvision's ``BalancedPositiveNegativeSampler``.

How: every entry gets a random key in [0, 1) from the given ``torch.Generator``; positives
get keys in [0, 1), negatives in [1, 2), ignored entries 3. One sort per row gives each
entry its rank, so a positive is kept if its rank is below the positive quota and a negative
if its rank minus the number of positives is below the negative quota. Counts stay tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._validate import require_int, require_integer, require_range, require_shape


def random_ranks(keys: Tensor) -> Tensor:
    """Rank ``(B, N)`` of each entry of ``keys (B, N)`` in ascending order along dim 1 (int64)."""
    order = torch.argsort(keys, dim=1)
    positions = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def sample_balanced(
    labels: Tensor,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Subsample ``labels (B, N)`` int in {-1, 0, 1} to a fixed budget per image.

    Args:
        labels: ``(B, N)`` integer tensor; 1 positive, 0 negative, -1 ignored.
        batch_size_per_image: at most this many non-ignored labels per image.
        positive_fraction: at most ``floor(batch_size_per_image * positive_fraction)`` of them
            positive; negatives fill the rest.
        generator: optional ``torch.Generator`` (on ``labels``' device) for reproducible
            draws.

    Returns:
        ``(B, N)`` tensor of ``labels``' dtype: the kept labels, dropped ones set to -1.

    >>> labels = torch.tensor([[1, 1, 1, 0, 0, 0, 0, -1]])
    >>> kept = sample_balanced(labels, 4, 0.5, torch.Generator().manual_seed(0))
    >>> int((kept == 1).sum()), int((kept == 0).sum())
    (2, 2)
    """
    require_integer(labels, "labels")
    require_shape(labels, "labels", ("B", "N"))
    require_range(labels, "labels", -1, 1)
    require_int(batch_size_per_image, "batch_size_per_image", minimum=0)
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction: expected a value in [0, 1], got {positive_fraction}")
    positive, negative = labels == 1, labels == 0
    keys = torch.rand(labels.shape, generator=generator, device=labels.device)
    keys = torch.where(positive, keys, torch.where(negative, keys + 1.0, keys.new_full((), 3.0)))
    rank = random_ranks(keys)
    num_pos = positive.sum(dim=1, keepdim=True)
    pos_quota = num_pos.clamp(max=int(math.floor(batch_size_per_image * positive_fraction)))
    neg_quota = batch_size_per_image - pos_quota
    keep = (positive & (rank < pos_quota)) | (negative & (rank - num_pos < neg_quota))
    return torch.where(keep, labels, torch.full_like(labels, -1))
