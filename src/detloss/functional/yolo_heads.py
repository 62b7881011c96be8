"""YOLO head plumbing: the head maps as per-anchor views, the decode constants of every cell and the gather of the channels that
carry loss from several head maps, with a backward that writes each head's gradient once."""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import Tensor

from .._memory import new_like
from .._validate import require_floating, require_tensor
from ..priors import yolo_grid

__all__ = ["gather_heads", "yolo_cell_constants", "yolo_head_views"]


def yolo_cell_constants(
    grid_hws: Sequence[tuple[int, int]], anchors: Tensor, strides: Sequence[int], dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode constants of every cell of every scale, in head order ``(row, col, anchor)``:
    ``cell_xy (N, 2)`` (column, row), ``anchor_wh (N, 2)`` grid units (both coordinate-major),
    ``stride (N, 1)``."""
    xy, wh, stride = [], [], []
    for (h, w), scale_anchors, s in zip(grid_hws, anchors.to(device=device, dtype=dtype), strides):
        n_anchors = scale_anchors.shape[0]
        xy.append(yolo_grid(h, w, device=device, dtype=dtype)[:, :, None, :].expand(-1, -1, n_anchors, -1).reshape(-1, 2))
        wh.append(scale_anchors.repeat(h * w, 1))
        stride.append(torch.full((h * w * n_anchors, 1), float(s), device=device, dtype=dtype))
    coordinate_major = lambda t: t.t().contiguous().t()  # noqa: E731  (like the decoded planes)
    return coordinate_major(torch.cat(xy)), coordinate_major(torch.cat(wh)), torch.cat(stride)


class _GatherHeads(torch.autograd.Function):
    """:func:`gather_heads`: copies forward; one gradient per head, written once, backward."""

    @staticmethod
    def forward(ctx, candidates: tuple[tuple[Tensor, ...], ...], *heads: Tensor):
        ctx.save_for_backward(*heads)
        ctx.candidates = candidates  # per head (image, row, col, anchor), each (B, K_s)
        # the first five channels of every cell, channel-major (B, 5, N): one strided read per
        # head, and the decode then runs on contiguous coordinate planes
        sizes = [h.shape[1] * h.shape[2] * h.shape[3] for h in heads]
        planes = heads[0].new_empty(heads[0].shape[0], 5, sum(sizes))
        for head, first, size in zip(heads, itertools.accumulate(sizes[:-1], initial=0), sizes):
            planes[:, :, first : first + size].view(head.shape[0], 5, *head.shape[1:4]).copy_(
                head[..., :5].permute(0, 4, 1, 2, 3)
            )
        picked = torch.cat([h[index] for h, index in zip(heads, candidates)], dim=1)  # (B, K, 5 + C)
        all_boxes = planes[:, :4].transpose(1, 2)
        ctx.mark_non_differentiable(all_boxes)
        return picked[..., :4].contiguous(), planes[:, 4], picked[..., 5:].contiguous(), all_boxes

    @staticmethod
    def backward(ctx, grad_box: Tensor, grad_obj: Tensor, grad_cls: Tensor, _):
        grads, first_cell, first_candidate = [], 0, 0
        for head, index in zip(ctx.saved_tensors, ctx.candidates):
            cells, count = head.shape[1] * head.shape[2] * head.shape[3], index[0].shape[1]
            grad = new_like(head, zero=True)  # the head's memory layout: NCHW maps need no copy back
            grad[..., 4] = grad_obj[:, first_cell : first_cell + cells].view(head.shape[:4])
            part = slice(first_candidate, first_candidate + count)
            picked = torch.cat((grad_box[:, part], grad_box.new_zeros(*index[0].shape, 1), grad_cls[:, part]), dim=-1)
            grad.index_put_(index, picked.to(grad.dtype), accumulate=True)
            grads.append(grad)
            first_cell, first_candidate = first_cell + cells, first_candidate + count
        return (None, *grads)


def gather_heads(heads: Sequence[Tensor], cells: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Box and class channels at ``cells``, objectness and (without gradient) box channels of
    every cell, of several heads.

    ``heads[s] (B, H_s, W_s, A, 5 + C)`` in any memory layout; ``cells[s] (B, K_s)`` int64 flat
    cell indices ``(row * W_s + col) * A + a`` (repeats allowed). Returns, the heads one after
    another, ``box (B, K, 4)``, ``obj (B, N)``, ``cls (B, K, C)`` and ``all_boxes (B, N, 4)``
    (coordinate-major memory, no gradient). Autograd through a slice and an index would write
    each head-sized gradient twice and add them up; this backward writes it once.
    """
    candidates = []
    for head, index in zip(heads, cells):
        n_anchors, width = head.shape[3], head.shape[2]
        cell, anchor = index.div(n_anchors, rounding_mode="floor"), index.remainder(n_anchors)
        image = torch.arange(head.shape[0], device=head.device)[:, None].expand_as(index)
        candidates.append((image, cell.div(width, rounding_mode="floor"), cell.remainder(width), anchor))
    return _GatherHeads.apply(tuple(candidates), *heads)


def yolo_head_views(
    outputs: Sequence[Tensor], batch: int, strides: Sequence[int], num_anchors: int, num_classes: int,
    layout: str,
) -> tuple[list[Tensor], tuple[int, int]]:
    """Check YOLO head maps (one per stride, ``layout`` ``"nhwc"`` ``(B, H, W, A*(5+C))`` or
    ``"nchw"`` ``(B, A*(5+C), H, W)``, one input size for all); return them as ``(B, H, W, A, 5 + C)``
    views and the input ``(H, W)`` in pixels."""
    n_scales, n_anchors = len(strides), num_anchors
    if not isinstance(outputs, (list, tuple)) or len(outputs) != n_scales:
        raise ValueError(f"outputs: expected a sequence of {n_scales} head maps, got {type(outputs).__name__}"
                         f" of length {len(outputs) if isinstance(outputs, (list, tuple)) else '?'}")
    channels = n_anchors * (5 + num_classes)
    heads, image_hw = [], None
    for s, (x, stride) in enumerate(zip(outputs, strides)):
        name = f"outputs[{s}]"
        require_floating(require_tensor(x, name), name)
        expected = "(B, H, W, A*(5+C))" if layout == "nhwc" else "(B, A*(5+C), H, W)"
        c_axis = 3 if layout == "nhwc" else 1
        if x.dim() != 4 or x.shape[0] != batch or x.shape[c_axis] != channels:
            raise ValueError(
                f"{name}: expected shape {expected} with B={batch} (the batch of gt_boxes) and "
                f"A*(5+C)={n_anchors}*(5+{num_classes})={channels}, got {tuple(x.shape)}"
            )
        if layout == "nhwc":
            h, w = x.shape[1], x.shape[2]
            x = x.view(batch, h, w, n_anchors, 5 + num_classes)
        else:
            h, w = x.shape[2], x.shape[3]
            x = x.view(batch, n_anchors, 5 + num_classes, h, w).permute(0, 3, 4, 1, 2)
        hw = (h * stride, w * stride)
        if image_hw is None:
            image_hw = hw
        elif hw != image_hw:
            raise ValueError(
                f"{name}: expected spatial size {(image_hw[0] // stride, image_hw[1] // stride)} "
                f"(input {image_hw} / stride {stride}, from outputs[0]), got {(h, w)}"
            )
        heads.append(x)
    return heads, image_hw
