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
    return sample_balanced_unchecked(labels, batch_size_per_image, positive_fraction, generator)


def sample_balanced_unchecked(
    labels: Tensor, batch_size_per_image: int, positive_fraction: float, generator: Optional[torch.Generator]
) -> Tensor:
    """:func:`sample_balanced` on labels the library built (values not read on the host)."""
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


def sample_rois(
    fg: Tensor, bg: Tensor, num_samples: int, fg_fraction: float, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor, Tensor]:
    """R-CNN's ROI draw: ``num_samples`` slots per image from the candidates marked ``fg (B, N)``
    and ``bg (B, N)`` (bool), foreground first.

    With both kinds present, ``min(round(num_samples * fg_fraction), #fg)`` foreground slots are
    drawn without replacement and background fills the rest (with replacement if there are too
    few); with one kind only, every slot is drawn from it (with replacement if too few).
    Returns ``(index (B, S) into N, num_fg (B,), filled (B, S) bool)``; a slot is unfilled when
    its image has no candidate of its kind.

    Candidates are put in random order (fg first, then bg, via sorted random keys); a slot
    without replacement takes the next candidate of its kind, a slot with replacement a
    uniformly random one of its kind.
    """
    batch, n = fg.shape
    keys = torch.rand((batch, n), generator=generator, device=fg.device)
    keys = torch.where(fg, keys, torch.where(bg, keys + 1.0, keys.new_full((), 3.0)))
    order = torch.argsort(keys, dim=1)
    n_fg, n_bg = fg.sum(dim=1), bg.sum(dim=1)
    quota = int(round(num_samples * fg_fraction))
    num_fg = torch.where(n_bg > 0, n_fg.clamp(max=quota), torch.where(n_fg > 0, num_samples, 0))
    slot = torch.arange(num_samples, device=fg.device).unsqueeze(0)
    draw = torch.rand((batch, num_samples), generator=generator, device=fg.device)
    is_fg = slot < num_fg.unsqueeze(1)

    def random_pick(count: Tensor) -> Tensor:
        c = count.unsqueeze(1)
        return torch.minimum((draw * c).long(), (c - 1).clamp(min=0))

    replace_fg = ((n_bg == 0) & (n_fg < num_samples)).unsqueeze(1)
    pos_fg = torch.where(replace_fg, random_pick(n_fg), slot)
    bg_slot = slot - num_fg.unsqueeze(1)
    replace_bg = (n_bg < num_samples - num_fg).unsqueeze(1)
    pos_bg = n_fg.unsqueeze(1) + torch.where(replace_bg, random_pick(n_bg), bg_slot)
    position = torch.where(is_fg, pos_fg, pos_bg).clamp(0, n - 1)
    filled = torch.where(is_fg, (n_fg > 0).unsqueeze(1), (n_bg > 0).unsqueeze(1))
    return order.gather(1, position), num_fg, filled
