"""Allocation of large CPU tensors that are filled right away (head-sized gradients).

glibc serves allocations above 32 MiB (the ceiling of its adaptive mmap threshold) with fresh
mappings and unmaps them on free, so every such tensor is faulted in again, 4 KiB page by page,
and ``torch.zeros`` then also clears it. NumPy's allocator uses ``calloc`` (fresh pages are
already zero, nothing is cleared twice) and asks for transparent huge pages (2 MiB faults).
Measured on the 2-core CI machine, torch 2.13: zeros of the YOLOv3 batch-32 stride-8 head
gradient (88 MB) plus a write of its objectness channel took 23 ms through ``torch.zeros``,
6.6 ms through NumPy; below 32 MiB glibc reuses freed memory and ``torch.zeros`` is as fast or
faster (22 MB: 0.7 ms against 1.2 ms), so only larger tensors take this path.

:func:`one_channel_like` writes such a tensor that is zero but for one channel in a single
pass, instead of clearing it and then writing the strided channel.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .strategy import host_sync_is_free

FRESH_MAPPING_BYTES = 32 << 20
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_SAME_SIZE_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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


def one_channel_like(like: Tensor, values: Tensor, channel: int) -> Tensor:
    """A tensor with the shape, dtype, device and memory layout of ``like (..., D)``
    (:func:`new_like`), zero everywhere except ``[..., channel] = values (...)``.

    Written in one pass, as the bits of ``values`` AND a mask that is all ones in ``channel``
    and zero elsewhere: every value is copied exactly (NaN and -0.0 included) and every other
    entry is +0.0. Clearing the tensor and then writing the strided channel costs a second
    pass over its cache lines (YOLOv3 batch 8 head gradients: 2.8 ms against 2.4 ms). Under
    ``torch.compile`` it is written as exactly that (clear, then write), which the compiler fuses.
    """
    values = values.to(like.dtype)
    if torch.compiler.is_compiling():  # inductor cannot lower dtype views; it fuses this form anyway
        out = torch.zeros_like(like)
        out[..., channel] = values
        return out
    as_bits = _SAME_SIZE_INTEGER[like.element_size()]
    mask = torch.zeros(like.shape[-1], dtype=as_bits, device=like.device)
    mask[channel] = -1  # all bits set
    out = new_like(like, zero=False)
    torch.bitwise_and(values.view(as_bits).unsqueeze(-1), mask, out=out.view(as_bits))
    return out
