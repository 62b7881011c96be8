"""Small tensors of Python numbers (strides, grid sizes, variances, image sizes) on the data's device.

``torch.tensor(numbers, device=cuda)`` copies the numbers from pageable host memory with a
blocking copy, which PyTorch ends with a synchronisation of the stream: a wait for every
kernel queued so far, on the accelerator path, that a count of operators on the CPU cannot see.
:func:`device_constant` makes the same tensor with a non-blocking copy instead (from pageable
memory, CUDA stages the bytes before the copy call returns, so the host tensor may go at once).
``benchmarks/dispatch_count.py`` counts tensors built from Python numbers anywhere else in a
step as blocking copies.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

Numbers = Union[float, Sequence[float], Sequence[Sequence[float]], Tensor]


def device_constant(values: Numbers, *, dtype: torch.dtype, device: Union[torch.device, str]) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without blocking the host (a tensor
    ``values`` is converted with ``.to``, as ``torch.as_tensor`` would).

    >>> device_constant([8, 16, 32], dtype=torch.float64, device="cpu")
    tensor([ 8., 16., 32.], dtype=torch.float64)
    """
    if isinstance(values, Tensor):
        return values.to(device=device, dtype=dtype)
    host = torch.tensor(values, dtype=dtype)
    return host if torch.device(device).type == "cpu" else host.to(device, non_blocking=True)
