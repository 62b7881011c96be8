"""YOLOv3 objectness loss ``sum(w * (t - sigmoid(x))**2 * BCE(x, t))`` with a fused backward.

The value is :func:`detloss.functional.sigmoid_focal_loss` with ``alpha=-1, gamma=2`` and
``reduction="sum"`` (tensorflow-yolov3's objectness focal term: the focal factor is not
detached). Autograd through that composition keeps about ten ``logits``-sized temporaries
and runs twenty element-wise passes backward; here the forward keeps ``sigmoid(x)`` and the
BCE, and the backward is one expression:

``d/dx [(p - t)**2 * BCE] = (p - t) * (2 * (p - p**2) * BCE + (p - t)**2)``, ``p = sigmoid(x)``

(``dBCE/dx = p - t``, TensorFlow's where-based form included: at ``x = 0`` it is ``0.5 - t``).
Gradients flow to ``logits`` only; with ``targets`` or ``weight`` requiring grad the plain
composition runs instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validate import require_floating, require_same_shape
from ..boxes import accumulate_dtype
from .classification import sigmoid_focal_loss

__all__ = ["yolo_objectness_focal_loss"]


class _ObjectnessFocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, w: Tensor) -> Tensor:
        p = torch.sigmoid(x)
        # BCE = softplus(x) - x t: one fused pass instead of the where-based form's six (the
        # same value to rounding: softplus returns x itself above the threshold, where
        # log1p(exp(-x)) is below the dtype's resolution; the backward never differentiates it)
        threshold = 40.0 if x.dtype == torch.float64 else 20.0
        bce = torch.nn.functional.softplus(x, threshold=threshold).sub_(x * t)
        diff = p - t
        diff_sq = diff * diff
        ctx.save_for_backward(p, diff, diff_sq, bce, w)
        return torch.dot((diff_sq * bce).flatten(), w.flatten())

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, diff, diff_sq, bce, w = ctx.saved_tensors
        slope = torch.addcmul(p, p, p, value=-1)  # sigmoid'(x) = p - p^2
        return torch.addcmul(diff_sq, slope, bce, value=2).mul_(diff).mul_(w).mul_(grad), None, None


def yolo_objectness_focal_loss(logits: Tensor, targets: Tensor, weight: Tensor) -> Tensor:
    """``sum(weight * (targets - sigmoid(logits))**2 * BCE(logits, targets))``, a 0-d tensor.

    ``logits``, ``targets`` (in [0, 1]) and ``weight`` are float tensors of one shape; the sum
    is in float32 for half inputs (float64 stays float64). Equals
    ``sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2, weight=weight, reduction="sum")``.

    >>> loss = yolo_objectness_focal_loss(torch.tensor([0.0, -1.0]), torch.tensor([1.0, 0.0]), torch.ones(2))
    >>> round(float(loss), 4)
    0.1959
    """
    for name, value in (("logits", logits), ("targets", targets), ("weight", weight)):
        require_floating(require_same_shape(value, name, logits, "logits"), name)
    dtype = accumulate_dtype(logits)
    x, t, w = logits.to(dtype), targets.to(dtype), weight.to(dtype)
    if torch.is_grad_enabled() and (t.requires_grad or w.requires_grad):
        return sigmoid_focal_loss(x, t, alpha=-1.0, gamma=2.0, weight=w, reduction="sum")
    return _ObjectnessFocal.apply(x, t, w)
