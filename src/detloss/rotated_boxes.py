"""Rotated (oriented) box maths: ``xywhr`` boxes, their corners, their Gaussians, ProbIoU, KLD, GWD.

Format (the last dimension of a rotated box tensor, always 5): ``(cx, cy, w, h, r)``, the
centre, the width along the box's own x axis, the height along its y axis and the rotation
``r`` in radians, counter-clockwise in a y-up frame (clockwise on an image whose y axis
points down), as OpenCV's ``minAreaRect`` and ultralytics' OBB models read it. A box and the
same box rotated by ``pi`` are the same box; a square rotated by ``pi / 2`` is the same box:
every function here gives the same value for both.

Gaussian view (ProbIoU, Llerena et al. 2021, arXiv:2106.06072; KLD, Yang et al. 2021,
arXiv:2106.01883; GWD, Yang et al. 2021, arXiv:2101.11952): a box is the 2-D normal
distribution with mean ``(cx, cy)`` and covariance ``R diag(w^2, h^2) R^T / 12`` (that of the
uniform distribution over the box). Distances between distributions have no angle
ambiguity, which is why oriented-box detectors train on them.

Every function here:

* computes in float32 when given float16/bfloat16 (float64 stays float64);
* gives finite values and finite gradients for squares and zero-size boxes (``sqrt`` is
  only taken of positive numbers, determinants carry an ``eps``);
* works on any leading (batch) dimensions, and checks only metadata (no host read).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._validate import require_floating, require_positive, require_tensor
from .boxes import pair_dtype

__all__ = [
    "xywhr_to_corners",
    "corners_to_xywhr",
    "rotated_box_covariance",
    "probiou",
    "aligned_probiou",
    "rotated_kld",
    "rotated_gwd",
]

PROBIOU_EPS = 1e-7


def require_rotated_boxes(x: object, name: str, *, ndim: Optional[int] = None) -> Tensor:
    """Metadata check: ``x`` is a floating-point ``(..., 5)`` xywhr tensor (of rank ``ndim`` when
    given). Raises ``TypeError`` / ``ValueError`` naming ``name``; returns ``x``."""
    require_tensor(x, name)
    if x.dim() == 0 or x.shape[-1] != 5 or (ndim is not None and x.dim() != ndim):
        expected = "(..., 5)" if ndim is None else "(" + ", ".join(["*"] * (ndim - 1) + ["5"]) + ")"
        raise ValueError(
            f"{name}: expected rotated boxes (cx, cy, w, h, angle) of shape {expected}, got {tuple(x.shape)}"
        )
    require_floating(x, name)
    return x


def xywhr_to_corners(boxes: Tensor) -> Tensor:
    """``(..., 5)`` xywhr boxes -> ``(..., 4, 2)`` corner polygons.

    Corner order: ``centre - u - v``, ``centre + u - v``, ``centre + u + v``, ``centre - u + v``
    with ``u = (w/2) (cos r, sin r)`` and ``v = (h/2) (-sin r, cos r)``: the first edge runs
    along the width, the polygon turns counter-clockwise in a y-up frame.

    >>> xywhr_to_corners(torch.tensor([2.0, 1.0, 4.0, 2.0, 0.0])).tolist()
    [[0.0, 0.0], [4.0, 0.0], [4.0, 2.0], [0.0, 2.0]]
    """
    require_rotated_boxes(boxes, "boxes")
    cx, cy, w, h, r = boxes.unbind(-1)
    cos, sin = torch.cos(r), torch.sin(r)
    ux, uy = w / 2 * cos, w / 2 * sin
    vx, vy = -h / 2 * sin, h / 2 * cos
    xs = torch.stack((cx - ux - vx, cx + ux - vx, cx + ux + vx, cx - ux + vx), dim=-1)
    ys = torch.stack((cy - uy - vy, cy + uy - vy, cy + uy + vy, cy - uy + vy), dim=-1)
    return torch.stack((xs, ys), dim=-1)


def corners_to_xywhr(corners: Tensor) -> Tensor:
    """``(..., 4, 2)`` rectangle corners in :func:`xywhr_to_corners`' order -> ``(..., 5)`` xywhr.

    The centre is the mean of the corners, the width the mean length of the edges 0-1 and
    3-2, the height that of the edges 0-3 and 1-2, and the angle that of the mean width edge,
    in ``(-pi, pi]``. A quadrilateral that is not quite a rectangle gets this least-effort fit
    (no minimum-area rectangle). Inverse of :func:`xywhr_to_corners` up to rounding (the angle
    up to a multiple of ``2 pi``).

    >>> corners_to_xywhr(torch.tensor([[0.0, 0.0], [4.0, 0.0], [4.0, 2.0], [0.0, 2.0]])).tolist()
    [2.0, 1.0, 4.0, 2.0, 0.0]
    """
    require_tensor(corners, "corners")
    if corners.dim() < 2 or corners.shape[-2:] != (4, 2):
        raise ValueError(f"corners: expected shape (..., 4, 2), got {tuple(corners.shape)}")
    require_floating(corners, "corners")
    p0, p1, p2, p3 = corners.unbind(-2)
    centre = (p0 + p1 + p2 + p3) / 4
    along_w = ((p1 - p0) + (p2 - p3)) / 2
    along_h = ((p3 - p0) + (p2 - p1)) / 2
    w = torch.linalg.vector_norm(along_w, dim=-1)
    h = torch.linalg.vector_norm(along_h, dim=-1)
    r = torch.atan2(along_w[..., 1], along_w[..., 0])
    return torch.cat((centre, torch.stack((w, h, r), dim=-1)), dim=-1)


def gaussian_terms(boxes: Tensor, variance: float = 0.0) -> tuple[Tensor, ...]:
    """Per-box Gaussian terms ``(cx, cy, a, b, c, det)`` of ``(..., 5)`` boxes: the covariance
    ``[[a, c], [c, b]]`` (``variance`` added to both principal variances ``w^2 / 12`` and
    ``h^2 / 12``) and its determinant clamped at 0. Pairwise functions build every value
    from these with elementwise operations, so a chunked pass gives the same bits."""
    cx, cy, w, h, r = boxes.unbind(-1)
    vw, vh = w * w / 12, h * h / 12
    if variance:
        vw, vh = vw + variance, vh + variance
    cos, sin = torch.cos(r), torch.sin(r)
    cos2, sin2 = cos * cos, sin * sin
    a = vw * cos2 + vh * sin2
    b = vw * sin2 + vh * cos2
    c = (vw - vh) * cos * sin
    det = (a * b - c * c).clamp(min=0)
    return cx, cy, a, b, c, det


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(max(x, 0))`` with a zero (not infinite) gradient at 0."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def probiou_from_terms(t1: tuple[Tensor, ...], t2: tuple[Tensor, ...], eps: float = PROBIOU_EPS) -> Tensor:
    """ProbIoU of broadcastable :func:`gaussian_terms` (the Hellinger form ``1 - sqrt(1 - BC)``
    of the Bhattacharyya coefficient, with ultralytics' placement of ``eps``)."""
    x1, y1, a1, b1, c1, d1 = t1
    x2, y2, a2, b2, c2, d2 = t2
    sa, sb, sc = a1 + a2, b1 + b2, c1 + c2
    dx, dy = x1 - x2, y1 - y2
    det = sa * sb - sc * sc
    den = det + eps
    # Bhattacharyya distance: (1/8) d^T S^-1 d + (1/2) ln(det S / sqrt(det S1 det S2)), S the mean covariance
    mahal = (sa * (dy * dy) + sb * (dx * dx)) / den * 0.25 + (sc * (-dx) * dy) / den * 0.5
    log_term = torch.log(det / (4 * _safe_sqrt(d1 * d2) + eps) + eps) * 0.5
    bd = (mahal + log_term).clamp(eps, 100.0)
    return 1 - torch.sqrt(1 - torch.exp(-bd) + eps)


def _pair(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    require_rotated_boxes(boxes1, "boxes1")
    require_rotated_boxes(boxes2, "boxes2")
    dtype = pair_dtype(boxes1, boxes2)
    return boxes1.to(dtype), boxes2.to(dtype)


def probiou(boxes1: Tensor, boxes2: Tensor, eps: float = PROBIOU_EPS, variance: float = 0.0) -> Tensor:
    """Pairwise ProbIoU of ``boxes1 (..., N, 5)`` and ``boxes2 (..., M, 5)`` -> ``(..., N, M)``.

    ProbIoU (arXiv:2106.06072) is ``1 - H`` where ``H`` is the Hellinger distance between the
    boxes' Gaussians: 1 for identical boxes, towards 0 for distant ones, never negative. It is
    smooth in every coordinate, the angle included, and equal for a box and the box rotated by
    ``pi`` (a square: by ``pi / 2``). ``eps`` as ultralytics places it (1e-7); ``variance`` is
    added to both principal variances of every box (ultralytics' OBB box loss: 0.01).

    >>> box = torch.tensor([[10.0, 10.0, 8.0, 4.0, 0.3]])
    >>> flipped = box + torch.tensor([0.0, 0.0, 0.0, 0.0, torch.pi])
    >>> probiou(box, torch.cat((box, flipped))).round(decimals=3).tolist()
    [[1.0, 1.0]]
    """
    boxes1, boxes2 = _pair(boxes1, boxes2)
    require_positive(eps, "eps", allow_zero=True)
    require_positive(variance, "variance", allow_zero=True)
    t1 = tuple(t.unsqueeze(-1) for t in gaussian_terms(boxes1, variance))
    t2 = tuple(t.unsqueeze(-2) for t in gaussian_terms(boxes2, variance))
    return probiou_from_terms(t1, t2, eps)


def aligned_probiou(boxes1: Tensor, boxes2: Tensor, eps: float = PROBIOU_EPS, variance: float = 0.0) -> Tensor:
    """ProbIoU of corresponding boxes: ``(..., 5)`` and ``(..., 5)`` (broadcast) -> ``(...)``
    (``eps`` and ``variance`` as :func:`probiou`).

    >>> a = torch.tensor([[0.0, 0.0, 4.0, 4.0, 0.0], [0.0, 0.0, 4.0, 4.0, 0.0]])
    >>> b = torch.tensor([[0.0, 0.0, 4.0, 4.0, 1.5707964], [40.0, 0.0, 4.0, 4.0, 0.0]])
    >>> aligned_probiou(a, b).round(decimals=3).tolist()
    [1.0, 0.0]
    """
    boxes1, boxes2 = _pair(boxes1, boxes2)
    require_positive(eps, "eps", allow_zero=True)
    require_positive(variance, "variance", allow_zero=True)
    return probiou_from_terms(gaussian_terms(boxes1, variance), gaussian_terms(boxes2, variance), eps)


def rotated_box_covariance(boxes: Tensor) -> Tensor:
    """``(..., 5)`` xywhr -> ``(..., 2, 2)`` covariance ``R diag(w^2, h^2) R^T / 12`` of the box's
    Gaussian (its mean is ``(cx, cy)``).

    >>> rotated_box_covariance(torch.tensor([0.0, 0.0, 6.0, 0.0, 0.0])).tolist()
    [[3.0, 0.0], [0.0, 0.0]]
    """
    require_rotated_boxes(boxes, "boxes")
    _, _, a, b, c, _ = gaussian_terms(boxes.to(pair_dtype(boxes, boxes)))
    return torch.stack((torch.stack((a, c), -1), torch.stack((c, b), -1)), -2)


def rotated_kld(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Kullback-Leibler divergence ``KL(N1 || N2)`` between the Gaussians of corresponding boxes
    ``(..., 5)`` and ``(..., 5)`` (broadcast) -> ``(...)`` (arXiv:2106.01883). Not symmetric;
    0 for identical boxes.

    ``KL = (tr(S2^-1 S1) + d^T S2^-1 d - 2 + ln(det S2 / det S1)) / 2`` with ``d`` the centre
    offset. Both covariances get ``eps`` added to their diagonal, so zero-size boxes give large
    but finite values and gradients.

    >>> box = torch.tensor([5.0, 5.0, 4.0, 2.0, 0.4])
    >>> float(rotated_kld(box, box)) == 0.0, float(rotated_kld(box, box + torch.tensor([1.0, 0, 0, 0, 0]))) > 0
    (True, True)
    """
    boxes1, boxes2 = _pair(boxes1, boxes2)
    require_positive(eps, "eps", allow_zero=True)
    x1, y1, a1, b1, c1, _ = gaussian_terms(boxes1)
    x2, y2, a2, b2, c2, _ = gaussian_terms(boxes2)
    a1, b1, a2, b2 = a1 + eps, b1 + eps, a2 + eps, b2 + eps
    det1 = (a1 * b1 - c1 * c1).clamp(min=eps * eps)
    det2 = (a2 * b2 - c2 * c2).clamp(min=eps * eps)
    dx, dy = x2 - x1, y2 - y1
    # S2^-1 = [[b2, -c2], [-c2, a2]] / det2
    trace = (b2 * a1 - 2 * c2 * c1 + a2 * b1) / det2
    mahal = (b2 * dx * dx - 2 * c2 * dx * dy + a2 * dy * dy) / det2
    return ((trace + mahal - 2 + torch.log(det2 / det1)) / 2).clamp(min=0)


def rotated_gwd(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance between the Gaussians of corresponding boxes ``(..., 5)``
    and ``(..., 5)`` (broadcast) -> ``(...)`` (arXiv:2101.11952). Symmetric; 0 for identical boxes.

    ``W^2 = |d|^2 + tr S1 + tr S2 - 2 sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))`` (the 2x2 form of
    ``tr (S1^1/2 S2 S1^1/2)^1/2``); finite with finite gradients for zero-size boxes.

    >>> a = torch.tensor([0.0, 0.0, 6.0, 6.0, 0.0])
    >>> float(rotated_gwd(a, a + torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0])))
    25.0
    """
    boxes1, boxes2 = _pair(boxes1, boxes2)
    x1, y1, a1, b1, c1, d1 = gaussian_terms(boxes1)
    x2, y2, a2, b2, c2, d2 = gaussian_terms(boxes2)
    dx, dy = x1 - x2, y1 - y2
    cross = a1 * a2 + 2 * c1 * c2 + b1 * b2  # tr(S1 S2)
    root = _safe_sqrt(cross + 2 * _safe_sqrt(d1 * d2))
    shape = (a1 + b1 + a2 + b2 - 2 * root).clamp(min=0)
    return dx * dx + dy * dy + shape
