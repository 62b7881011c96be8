"""Gradients at ties and boundaries, written out so that they do not depend on the torch release.

``torch.clamp(x, min=0)`` passed its gradient to ``x`` at ``x == 0`` up to torch 2.13 and
passes none from 2.14 on. Parity with the originals (TensorFlow's ``maximum(x, 0.0)`` gives
the gradient to ``x`` on a tie) must not hinge on that, so every differentiable floor of the
library states its rule through :func:`at_least`. ``torch.where`` sends the gradient to the
branch it selects, a rule no release changes.
"""
from __future__ import annotations

import torch
from torch import Tensor


def at_least(x: Tensor, low: float) -> Tensor:
    """``max(x, low)`` element-wise; the gradient goes to ``x`` wherever ``x >= low``, ties included.

    That is TensorFlow's ``maximum(x, low)`` and torch <= 2.13's ``clamp(x, min=low)``. NaN
    stays NaN (never silently ``low``). Same shape and dtype as ``x``.
    """
    return torch.where(x < low, low, x)


def tf_minimum(x: Tensor, y: Tensor) -> Tensor:
    """``minimum(x, y)`` whose gradient goes to ``x`` on ties (TensorFlow's rule; torch's
    ``minimum`` splits it between the two)."""
    return torch.where(x <= y, x, y)


def tf_maximum(x: Tensor, y: Tensor) -> Tensor:
    """``maximum(x, y)`` whose gradient goes to ``x`` on ties (TensorFlow's rule)."""
    return torch.where(x >= y, x, y)
