"""Padded ground truth: the batch layout every loss in detloss takes.

A batch of ``B`` images with different numbers of boxes becomes ``boxes (B, M, 4)``,
``labels (B, M)`` and ``valid (B, M)`` (bool), ``M`` the largest count (or a fixed
``max_boxes``). Padding rows are zero boxes with label ``pad_label`` and ``valid`` False.
Images without boxes are normal input: ``(0, 4)`` boxes, and also the ``(0,)``-shaped
tensors that are easy to pass by mistake.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._validate import ValueChecks, require_floating, require_integer, require_positive, require_tensor


def _as_rows(x: Tensor, name: str, width: int) -> Tensor:
    if x.numel() == 0:
        return x.reshape(0, width)
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"{name}: expected shape (n, {width}), got {tuple(x.shape)}")
    return x


def pad_ground_truth(
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    extras: Optional[Sequence[Tensor]] = None,
    *,
    max_boxes: Optional[int] = None,
    pad_label: int = -1,
    checks: Optional[ValueChecks] = None,
) -> "tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]":
    """Pad per-image ground truth to a batch.

    Args:
        boxes: ``B`` tensors ``(n_i, 4)`` (any box format; it is kept), floating point.
        labels: ``B`` integer tensors ``(n_i,)``.
        extras: optional ``B`` tensors ``(n_i, K)`` of per-box extras (landmarks, ...).
        max_boxes: pad to this ``M`` instead of ``max(n_i)``; more boxes is an error.
        pad_label: label written into padding rows.
        checks: where to queue the value checks (every box finite) for a caller that runs
            them with its own; by default they run here, all images in one host read.

    Returns:
        ``(boxes (B, M, 4), labels (B, M) int64, valid (B, M) bool)`` and, with ``extras``,
        ``extras (B, M, K)`` last. Dtype and device follow the first image's boxes (float32
        on the CPU for an empty batch).

    >>> boxes, labels, valid = pad_ground_truth(
    ...     [torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.zeros(0, 4)], [torch.tensor([3]), torch.zeros(0, dtype=torch.long)]
    ... )
    >>> boxes.shape, labels, valid
    (torch.Size([2, 1, 4]), tensor([[ 3],
            [-1]]), tensor([[ True],
            [False]]))
    """
    if len(boxes) != len(labels):
        raise ValueError(f"labels: expected one tensor per image ({len(boxes)}), got {len(labels)}")
    if extras is not None and len(extras) != len(boxes):
        raise ValueError(f"extras: expected one tensor per image ({len(boxes)}), got {len(extras)}")
    if max_boxes is not None:
        require_positive(max_boxes, "max_boxes", allow_zero=True)
    if extras is not None:
        for i, e in enumerate(extras):
            require_tensor(e, f"extras[{i}]")
    rows = []
    queue = ValueChecks() if checks is None else checks
    for i, (b, l) in enumerate(zip(boxes, labels)):
        require_floating(require_tensor(b, f"boxes[{i}]"), f"boxes[{i}]")
        require_integer(require_tensor(l, f"labels[{i}]"), f"labels[{i}]")
        b = _as_rows(b, f"boxes[{i}]", 4)
        queue.finite(b, f"boxes[{i}]")
        l = l.reshape(-1)
        if l.shape[0] != b.shape[0]:
            raise ValueError(f"labels[{i}]: expected {b.shape[0]} labels (one per box), got {l.shape[0]}")
        rows.append((b, l))
    if checks is None:
        queue.run()
    counts = [b.shape[0] for b, _ in rows]
    m = max(counts, default=0) if max_boxes is None else max_boxes
    if max(counts, default=0) > m:
        raise ValueError(f"max_boxes: expected at least the largest box count {max(counts)}, got {m}")
    ref = rows[0][0] if rows else torch.zeros(0, 4)
    n_img = len(rows)
    out_boxes = ref.new_zeros(n_img, m, 4)
    out_labels = torch.full((n_img, m), pad_label, dtype=torch.int64, device=ref.device)
    valid = torch.zeros(n_img, m, dtype=torch.bool, device=ref.device)
    for i, (b, l) in enumerate(rows):
        out_boxes[i, : b.shape[0]] = b
        out_labels[i, : b.shape[0]] = l
        valid[i, : b.shape[0]] = True
    if extras is None:
        return out_boxes, out_labels, valid
    width = max((e.shape[-1] for e in extras if e.numel()), default=0)
    out_extras = ref.new_zeros(n_img, m, width)
    for i, e in enumerate(extras):
        e = _as_rows(require_tensor(e, f"extras[{i}]"), f"extras[{i}]", width)
        if e.shape[0] != counts[i]:
            raise ValueError(f"extras[{i}]: expected {counts[i]} rows (one per box), got {e.shape[0]}")
        out_extras[i, : e.shape[0]] = e
    return out_boxes, out_labels, valid, out_extras


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.int64) -> Tensor:
    """``labels (...)`` int -> ``(..., num_classes)`` one-hot rows in ``dtype``; a label outside
    ``[0, num_classes)`` (padding, -1 for background) gives an all-zero row.

    A comparison with ``arange``: unlike ``torch.nn.functional.one_hot`` it reads no value on
    the host (that one checks the label range, a synchronisation on accelerators).
    """
    return (labels.unsqueeze(-1) == torch.arange(num_classes, device=labels.device)).to(dtype)

