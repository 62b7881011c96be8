"""Allocation of large CPU tensors that are filled right away (head-sized gradients).

The one allocator workaround of the library, kept because it clears the 10 % bar of
``detloss.strategy`` (YOLOv3 416 batch 32: +74 % step time without it, see
``benchmarks/README.md``). glibc serves allocations above 32 MiB (the ceiling of its adaptive
mmap threshold) with fresh mappings and unmaps them on free, so every such tensor is faulted
in again, 4 KiB page by page, and ``torch.zeros`` then also clears it. NumPy's allocator uses
``calloc`` (fresh pages are already zero, nothing is cleared twice) and asks for transparent
huge pages (2 MiB faults). Below 32 MiB glibc reuses freed memory and torch's own allocation is
as fast or faster, so only larger tensors take this path, and only on the CPU in eager mode
outside the dense strategy.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .strategy import host_sync_is_free

FRESH_MAPPING_BYTES = 32 << 20
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def new_like(x: Tensor, *, zero: bool) -> Tensor:
    """``torch.zeros_like(x)`` (``zero=True``) or ``torch.empty_like(x)``: same shape, dtype,
    device and memory layout (a permuted NCHW view stays permuted).

    CPU tensors of at least :data:`FRESH_MAPPING_BYTES` in a NumPy dtype, outside
    ``torch.compile``, are allocated by NumPy (see the module doc); the result is an ordinary
    tensor that owns its memory (its storage cannot be resized).
    """
    if (
        x.dtype not in _NUMPY_DTYPES
        or x.numel() * x.element_size() < FRESH_MAPPING_BYTES
        or not host_sync_is_free(x)
    ):
        return torch.zeros_like(x) if zero else torch.empty_like(x)
    allocate = np.zeros if zero else np.empty
    strides = torch.empty_like(x, device="meta").stride()  # empty_like's layout, without memory
    return torch.from_numpy(allocate(x.numel(), dtype=_NUMPY_DTYPES[x.dtype])).as_strided(x.shape, strides)
