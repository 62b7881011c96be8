"""Box maths: format conversion, area, and the IoU family (IoU, GIoU, DIoU, CIoU).

Formats (the last dimension of a box tensor, always 4):

* ``"xyxy"``   corners ``(x1, y1, x2, y2)``
* ``"cxcywh"`` centre and size ``(cx, cy, w, h)``
* ``"xywh"``   top-left corner and size ``(x, y, w, h)``

Coordinates may be normalised or pixels; nothing here cares, as long as both arguments
use the same. Every IoU-family function takes ``xyxy`` boxes and:

* computes in float32 when given float16/bfloat16 (float64 stays float64), so half
  precision neither overflows nor loses the small epsilons;
* treats inverted boxes (``x2 < x1``) as empty and returns finite values with finite
  gradients for zero-area boxes (the denominators are clamped at ``eps``);
* works on any leading (batch) dimensions.

Papers: GIoU, Rezatofighi et al. 2019 (arXiv:1902.09630); DIoU and CIoU, Zheng et al. 2020
(arXiv:1911.08287).
"""
from __future__ import annotations

import copy

import math
import numbers
from typing import Literal, Optional, Union

import torch
from torch import Tensor

from ._ties import at_least, tf_maximum, tf_minimum
from ._validate import broadcast_shape, require_boxes, require_choice, require_positive, require_tensor

BoxFormat = Literal["xyxy", "cxcywh", "xywh"]
IoUKind = Literal["iou", "giou", "diou", "ciou"]

BOX_FORMATS = ("xyxy", "cxcywh", "xywh")
IOU_KINDS = ("iou", "giou", "diou", "ciou")
DEFAULT_EPS = 1e-7


def accumulate_dtype(x: Union[Tensor, torch.dtype]) -> torch.dtype:
    """The dtype losses and sums accumulate in: float64 for float64, else float32.

    The one place of the library's mixed-precision rule: half inputs (and integer counts)
    compute in float32, float64 stays float64 (oracle tests, gradcheck).

    >>> accumulate_dtype(torch.zeros(2, dtype=torch.bfloat16)), accumulate_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype box maths runs in for ``x``: :func:`accumulate_dtype` for floating point,
    else ``x.dtype`` (integer boxes stay integer until an operation promotes them)."""
    return accumulate_dtype(x) if x.is_floating_point() else x.dtype


def pair_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """The dtype in which two tensors of boxes meet: the promotion of both :func:`compute_dtype`
    (half and float32 -> float32, float64 wins).

    >>> pair_dtype(torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float64))
    torch.float64
    """
    return torch.promote_types(compute_dtype(a), compute_dtype(b))


def _require_box_shape(boxes: Tensor, name: str = "boxes") -> None:
    """Metadata-only check (no value check, no host sync) that ``boxes`` is ``(..., 4)``."""
    require_tensor(boxes, name)
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes of shape (..., 4), got {tuple(boxes.shape)}")


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` centre-size boxes -> ``(..., 4)`` corner boxes, in the memory layout of
    ``boxes`` (coordinate-major input stays coordinate-major: no interleaving copy)."""
    _require_box_shape(boxes)
    centre, half = boxes[..., :2], boxes[..., 2:] / 2
    return join_halves(centre - half, centre + half, like=boxes)


def join_halves(first: Tensor, second: Tensor, *, like: Tensor) -> Tensor:
    """``cat((first, second), -1)`` of two ``(..., 2)`` halves, laid out like ``like (..., 4)``:
    interleaved if ``like`` is (its last dimension has stride 1), else coordinate-major (four
    contiguous planes, a ``(4, ...)`` buffer seen as ``(..., 4)``), so coordinate-major boxes
    stay so without an interleaving copy. Differentiable."""
    dtype = torch.promote_types(first.dtype, second.dtype)
    if like.stride(-1) == 1:
        out = torch.empty(like.shape, dtype=dtype, device=like.device)
    else:
        out = torch.empty((like.shape[-1],) + like.shape[:-1], dtype=dtype, device=like.device).movedim(0, -1)
    out[..., :2] = first
    out[..., 2:] = second
    return out


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` corner boxes -> ``(..., 4)`` centre-size boxes."""
    _require_box_shape(boxes)
    low, high = boxes[..., :2], boxes[..., 2:]
    return torch.cat(((high + low) / 2, high - low), dim=-1)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` top-left-size boxes -> ``(..., 4)`` corner boxes."""
    _require_box_shape(boxes)
    return torch.cat((boxes[..., :2], boxes[..., :2] + boxes[..., 2:]), dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` corner boxes -> ``(..., 4)`` top-left-size boxes."""
    _require_box_shape(boxes)
    return torch.cat((boxes[..., :2], boxes[..., 2:] - boxes[..., :2]), dim=-1)


_TO_XYXY = {"xyxy": lambda b: b, "cxcywh": cxcywh_to_xyxy, "xywh": xywh_to_xyxy}
_FROM_XYXY = {"xyxy": lambda b: b, "cxcywh": xyxy_to_cxcywh, "xywh": xyxy_to_xywh}


def box_convert(boxes: Tensor, in_fmt: BoxFormat, out_fmt: BoxFormat) -> Tensor:
    """Convert ``(..., 4)`` boxes between ``"xyxy"``, ``"cxcywh"`` and ``"xywh"``.

    >>> box_convert(torch.tensor([[0.5, 0.5, 1.0, 2.0]]), "cxcywh", "xyxy")
    tensor([[ 0.0000, -0.5000,  1.0000,  1.5000]])
    """
    require_choice(in_fmt, "in_fmt", BOX_FORMATS)
    require_choice(out_fmt, "out_fmt", BOX_FORMATS)
    require_boxes(boxes, "boxes")
    if in_fmt == out_fmt:
        return boxes
    return _FROM_XYXY[out_fmt](_TO_XYXY[in_fmt](boxes))


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(..., 4)`` xyxy boxes -> ``(...)``; inverted boxes have area 0."""
    require_boxes(boxes, "boxes")
    boxes = boxes.to(compute_dtype(boxes))
    x1, y1, x2, y2 = boxes.unbind(-1)
    return at_least(x2 - x1, 0.0) * at_least(y2 - y1, 0.0)


def _ordered(low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """``(min, max)`` of two corner coordinates; exactly ``(low, high)`` when ``low <= high``."""
    swap = high < low
    return torch.where(swap, high, low), torch.where(swap, low, high)


def _aspect_angle(w: Tensor, h: Tensor, eps: float) -> Tensor:
    """``atan(w / (h + eps))``, the CIoU aspect angle, with a bounded gradient.

    Its gradient grows like ``1 / h``: about ``1 / eps`` for a box of (near) zero height,
    which overflows float16 gradients. Boxes lower than ``sqrt(eps)`` therefore keep the
    value but pass no gradient through the angle (an undefined aspect ratio has no useful
    direction); every other box gets the exact gradient.
    """
    angle = torch.atan(w / (h + eps))
    return torch.where(h >= math.sqrt(eps), angle, angle.detach())


def _ratio(num: Tensor, den: Tensor, eps: float) -> Tensor:
    """``num / den`` where ``den > eps``; 0 with zero gradient where the denominator vanishes.

    Clamping the denominator at ``eps`` instead would keep a gradient of order ``1 / eps``
    for degenerate (zero-area) boxes, which overflows float16 and derails training.
    """
    usable = ~(den <= eps)  # NaN stays NaN (value checks off): never a silent 0
    return torch.where(usable, num / torch.where(usable, den, 1.0), 0.0)


def _iou_family(a: Tensor, b: Tensor, kind: str, eps: float, ties: str = "split") -> Tensor:
    """IoU-family value of broadcastable xyxy boxes ``a (..., 4)`` and ``b (..., 4)``.

    Works coordinate by coordinate so a pairwise call (``a[..., :, None, :]`` against
    ``b[..., None, :, :]``) allocates ``(..., N, M)`` temporaries, never ``(..., N, M, 2)``.
    The plain IoU follows the operation order of the original SSD code (widths times
    heights, ``inter / (area_a + area_b - inter)``), so float32 results are bit-identical
    to it wherever the union exceeds ``eps``. Each ratio whose denominator is at most
    ``eps`` (both boxes degenerate) is 0 with zero gradient: see :func:`_ratio`.
    """
    minimum, maximum = (torch.minimum, torch.maximum) if ties == "split" else (tf_minimum, tf_maximum)
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    inter_w = at_least(minimum(ax2, bx2) - maximum(ax1, bx1), 0.0)
    inter_h = at_least(minimum(ay2, by2) - maximum(ay1, by1), 0.0)
    inter = inter_w * inter_h
    aw, ah = at_least(ax2 - ax1, 0.0), at_least(ay2 - ay1, 0.0)
    bw, bh = at_least(bx2 - bx1, 0.0), at_least(by2 - by1, 0.0)
    union = aw * ah + bw * bh - inter
    iou = _ratio(inter, union, eps)
    if kind == "iou":
        return iou
    # The enclosing box spans both boxes' corners; an inverted box (x2 < x1) counts with its
    # span [x2, x1], so the centre penalty stays <= 1 and GIoU/DIoU stay in [-1, 1].
    # For ordinary boxes _ordered() returns (x1, x2) themselves, gradients included.
    (alx, ahx), (aly, ahy) = _ordered(ax1, ax2), _ordered(ay1, ay2)
    (blx, bhx), (bly, bhy) = _ordered(bx1, bx2), _ordered(by1, by2)
    enclose_w = maximum(ahx, bhx) - minimum(alx, blx)
    enclose_h = maximum(ahy, bhy) - minimum(aly, bly)
    if kind == "giou":
        enclose = enclose_w * enclose_h
        return iou - _ratio(enclose - union, enclose, eps)
    diag_sq = enclose_w**2 + enclose_h**2
    centre_sq = ((ax1 + ax2 - bx1 - bx2) ** 2 + (ay1 + ay2 - by1 - by2) ** 2) / 4
    diou = iou - _ratio(centre_sq, diag_sq, eps)
    if kind == "diou":
        return diou
    v = (4 / math.pi**2) * (_aspect_angle(bw, bh, eps) - _aspect_angle(aw, ah, eps)) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v).clamp(min=eps)
    return diou - alpha * v


def _prepare_pair(boxes1: Tensor, boxes2: Tensor, eps: Optional[float], kind: str):
    require_boxes(boxes1, "boxes1")
    require_boxes(boxes2, "boxes2")
    require_choice(kind, "kind", IOU_KINDS)
    if eps is not None:
        require_positive(eps, "eps")
    dtype = pair_dtype(boxes1, boxes2)
    return boxes1.to(dtype), boxes2.to(dtype), DEFAULT_EPS if eps is None else eps


def aligned_box_iou(
    boxes1: Tensor,
    boxes2: Tensor,
    kind: IoUKind = "iou",
    eps: Optional[float] = None,
    *,
    ties: Literal["split", "first"] = "split",
) -> Tensor:
    """Element-wise IoU-family value of xyxy boxes ``(..., 4)`` and ``(..., 4)`` -> ``(...)``.

    The leading dimensions broadcast. ``kind`` is ``"iou"``, ``"giou"``, ``"diou"`` or
    ``"ciou"``. Values lie in [0, 1] for IoU, [-1, 1] for GIoU and DIoU and (-1.5, 1] for
    CIoU. An inverted box (``x2 < x1`` or ``y2 < y1``) has area 0 and enters the enclosing
    box (GIoU, DIoU, CIoU) with its span, so the penalty terms stay bounded.
    ``ties`` only changes gradients where a coordinate of ``boxes1`` equals one of ``boxes2``
    (identical or touching boxes): ``"split"`` (default, ``torch.minimum``/``maximum``) shares
    the gradient between both, ``"first"`` gives it all to ``boxes1``, as TensorFlow's
    ``minimum``/``maximum`` do (for parity with TensorFlow originals).

    >>> a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    >>> b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0]])
    >>> aligned_box_iou(a, b), aligned_box_iou(a, b, "giou")
    (tensor([0.1429, 0.0000]), tensor([-0.0794, -0.7778]))
    """
    boxes1, boxes2, eps = _prepare_pair(boxes1, boxes2, eps, kind)
    require_choice(ties, "ties", ("split", "first"))
    if broadcast_shape(boxes1.shape, boxes2.shape) is None:
        raise ValueError(
            f"boxes1, boxes2: expected shapes that broadcast, "
            f"got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    return _iou_family(boxes1, boxes2, kind, eps, ties)


def aligned_box_iou_unchecked(boxes1: Tensor, boxes2: Tensor, kind: IoUKind = "iou", eps: Optional[float] = None) -> Tensor:
    """:func:`aligned_box_iou` (``ties="split"``) without its checks: for boxes the library
    derived from inputs it already checked (decoded predictions, anchors, true boxes), where
    the finiteness checks would only add host reads. ``kind`` must be one of :data:`IOU_KINDS`."""
    dtype = pair_dtype(boxes1, boxes2)
    return _iou_family(boxes1.to(dtype), boxes2.to(dtype), kind, DEFAULT_EPS if eps is None else eps)


def box_iou(
    boxes1: Tensor,
    boxes2: Tensor,
    kind: IoUKind = "iou",
    eps: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Pairwise IoU-family matrix of xyxy boxes ``(..., N, 4)`` x ``(..., M, 4)`` -> ``(..., N, M)``.

    Unbatched ``(N, 4) x (M, 4)`` and batched ``(B, N, 4) x (B, M, 4)`` inputs both work; the
    leading dimensions must be equal. ``chunk_size`` bounds the temporaries to
    ``chunk_size x M`` per leading index by filling the output ``chunk_size`` rows of
    ``boxes1`` at a time (use it for hundreds of thousands of anchors); the result is the same.

    >>> a = torch.tensor([[0., 0., 2., 2.]]); b = torch.tensor([[1., 1., 3., 3.], [5., 5., 6., 6.]])
    >>> box_iou(a, b)
    tensor([[0.1429, 0.0000]])
    """
    boxes1, boxes2, eps = _prepare_pair(boxes1, boxes2, eps, kind)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size: expected None or a positive integer, got {chunk_size!r}")
    if boxes1.dim() < 2 or boxes2.dim() < 2:
        raise ValueError(
            f"boxes1, boxes2: expected shapes (..., N, 4) and (..., M, 4), "
            f"got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    if boxes1.shape[:-2] != boxes2.shape[:-2]:
        raise ValueError(
            f"boxes1, boxes2: expected equal leading (batch) dimensions, "
            f"got {tuple(boxes1.shape[:-2])} and {tuple(boxes2.shape[:-2])}"
        )
    n = boxes1.shape[-2]
    if chunk_size is None or n <= chunk_size:
        return _iou_family(boxes1.unsqueeze(-2), boxes2.unsqueeze(-3), kind, eps)
    out = boxes1.new_empty(boxes1.shape[:-1] + boxes2.shape[-2:-1])
    b = boxes2.unsqueeze(-3)
    for start in range(0, n, chunk_size):
        a = boxes1[..., start : start + chunk_size, :].unsqueeze(-2)
        out[..., start : start + chunk_size, :] = _iou_family(a, b, kind, eps)
    return out


def _rows_contiguous(x: Tensor) -> Tensor:
    """``x`` itself when its last axis is contiguous (all a vector loop needs), else a copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


class ChunkedPairwiseIoU:
    """Plain IoU of all ``rows (B, M, 4)`` against chunks of ``columns (B or 1, N, 4)``, no autograd.

    For matchers that reduce a ``(B, M, N)`` IoU matrix chunk by chunk over the long axis
    (priors, anchors, predictions): ``self(start, stop)`` returns the ``(B, M, stop - start)``
    block, a fresh tensor. The values are :func:`box_iou`'s bit for bit (the same operations
    in the same order, the same rule for a union <= ``eps``), but the coordinates are split
    once into contiguous planes, the areas computed once, and each block is built in place
    with the long axis innermost, so every pass is one vector loop against a per-row scalar
    (faster than :func:`box_iou` on a chunk: benchmarks/README.md). Boxes are xyxy, in the compute
    dtype of both inputs. Entries of invalid rows (``rows_valid (B, M)``) or columns
    (``columns_valid (B or 1, N)``) are shifted by :attr:`INVALID_SHIFT` (each side, so into
    ``[-4, -1]``), below every real IoU.
    """

    INVALID_SHIFT = -2.0

    def __init__(
        self,
        rows: Tensor,
        columns: Tensor,
        *,
        rows_valid: Optional[Tensor] = None,
        columns_valid: Optional[Tensor] = None,
        eps: Optional[float] = None,
    ) -> None:
        self.dtype = pair_dtype(rows, columns)
        self.eps = DEFAULT_EPS if eps is None else eps
        with torch.no_grad():
            self._set_rows(rows, rows_valid)
            self.columns = [_rows_contiguous(c.unsqueeze(-2)) for c in columns.detach().to(self.dtype).unbind(-1)]
            cx1, cy1, cx2, cy2 = self.columns
            self.column_area = (cx2 - cx1).clamp(min=0) * (cy2 - cy1).clamp(min=0)
            self.column_shift = self._shift(columns_valid, -2, self.dtype)

    def with_rows(self, rows: Tensor, *, rows_valid: Optional[Tensor] = None) -> "ChunkedPairwiseIoU":
        """The same columns against other ``rows (B, M', 4)`` (``B`` matching the columns' batch
        unless that is 1), reusing the columns' planes, areas and checks."""
        other = copy.copy(self)
        with torch.no_grad():
            other._set_rows(rows, rows_valid)
        return other

    def _set_rows(self, rows: Tensor, rows_valid: Optional[Tensor]) -> None:
        self.rows = [c.unsqueeze(-1) for c in rows.detach().to(self.dtype).unbind(-1)]  # 4 x (B, M, 1)
        rx1, ry1, rx2, ry2 = self.rows
        self.row_area = (rx2 - rx1).clamp(min=0) * (ry2 - ry1).clamp(min=0)
        self.row_shift = self._shift(rows_valid, -1, self.dtype)

    @classmethod
    def _shift(cls, valid: Optional[Tensor], dim: int, dtype: torch.dtype) -> Optional[Tensor]:
        if valid is None:
            return None
        return torch.where(valid, 0.0, cls.INVALID_SHIFT).to(dtype).unsqueeze(dim)

    def __call__(self, start: int, stop: int) -> Tensor:
        """The ``(B, M, stop - start)`` IoU block, :func:`box_iou`'s values bit for bit."""
        with torch.no_grad():
            inter, union = self._overlap(start, stop)
            # box_iou's degenerate rule (0 where union <= eps) with float passes only: a > b
            # implies a - b > 0 in IEEE arithmetic, so ``kept`` is exactly 1 or 0
            kept = torch.sub(union, self.eps).clamp_(min=0).sign_()
            return self._shifted(inter.div_(union.clamp_(min=self.eps)).mul_(kept), start, stop)

    def clamped_ratio(self, start: int, stop: int) -> Tensor:
        """The block's ``inter / max(union, eps)``: :meth:`__call__` without the degenerate rule
        (they differ only where both boxes have an area below ``eps``), four passes fewer."""
        with torch.no_grad():
            inter, union = self._overlap(start, stop)
            return self._shifted(inter.div_(union.clamp_(min=self.eps)), start, stop)

    def _overlap(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        cx1, cy1, cx2, cy2 = (c[..., start:stop] for c in self.columns)
        rx1, ry1, rx2, ry2 = self.rows
        inter = torch.minimum(rx2, cx2).sub_(torch.maximum(rx1, cx1)).clamp_(min=0)
        inter.mul_(torch.minimum(ry2, cy2).sub_(torch.maximum(ry1, cy1)).clamp_(min=0))
        union = torch.add(self.row_area, self.column_area[..., start:stop]).sub_(inter)
        return inter, union

    def _shifted(self, iou: Tensor, start: int, stop: int) -> Tensor:
        if self.row_shift is not None:
            iou.add_(self.row_shift)
        if self.column_shift is not None:
            iou.add_(self.column_shift[..., start:stop])
        return iou


# Rotated (xywhr) boxes live in their own module; re-exported here (imported last: it uses pair_dtype).
from .rotated_boxes import (  # noqa: E402
    aligned_probiou,
    corners_to_xywhr,
    probiou,
    rotated_box_covariance,
    rotated_gwd,
    rotated_kld,
    xywhr_to_corners,
)
