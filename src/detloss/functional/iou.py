"""IoU-family box losses: ``1 - IoU``, ``1 - GIoU``, ``1 - DIoU``, ``1 - CIoU``."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from ..boxes import BoxFormat, IoUKind, aligned_box_iou, box_convert
from .reduce import Reduction, weighted_reduce


def iou_loss(
    pred: Tensor,
    target: Tensor,
    kind: IoUKind = "giou",
    *,
    fmt: BoxFormat = "xyxy",
    eps: Optional[float] = None,
    weight: Optional[Tensor] = None,
    reduction: Reduction = "mean",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """``1 - IoU-family(pred, target)`` of aligned boxes ``(..., 4)`` in format ``fmt``.

    Finite with finite gradients for identical, disjoint, zero-size and inverted boxes;
    computed in float32 for half inputs. An empty input gives 0 for ``"sum"``/``"mean"``.

    >>> import torch
    >>> pred, target = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    >>> iou_loss(pred, target, "iou"), iou_loss(pred, target, "giou")
    (tensor(0.8571), tensor(1.0794))
    """
    pred_xyxy = box_convert(pred, fmt, "xyxy")
    target_xyxy = box_convert(target, fmt, "xyxy")
    loss = 1 - aligned_box_iou(pred_xyxy, target_xyxy, kind, eps)
    return weighted_reduce(loss, weight, reduction, normalizer)
