"""Terms of the real-time DETR family: IoU-aware class losses and D-FINE's distribution terms.

Class terms, element-wise over ``(..., C)`` sigmoid logits. ``positive (..., C)`` marks the
matched query's ground-truth class (one-hot rows, all-zero for unmatched queries), ``iou
(..., 1)`` or ``(..., C)`` is the IoU of the query's box with its matched ground truth (no
gradient is taken through it):

* :func:`detr_varifocal_loss` (RT-DETR, D-FINE; VarifocalNet, arXiv:2008.13367):
  ``BCE(x, t) * (alpha p^gamma (1 - positive) + t)`` with ``t = IoU * positive`` and
  ``p = sigmoid(x)`` detached.
* :func:`matchability_aware_loss` (DEIM's MAL, arXiv:2412.04234): ``BCE(x, t^gamma) *
  (mal_alpha p^gamma (1 - positive) + positive)``, ``mal_alpha`` 1 when not given.
* :func:`iou_aware_bce_loss` (RF-DETR / LW-DETR): positives ``-q log p - (1 - q) log(1 - p)``
  with ``q = max(p^alpha IoU^(1 - alpha), 0.01)`` (detached), negatives ``-p^gamma log(1 - p)``
  (the gradient flows through ``p^gamma``, as in the original).

Distribution terms (D-FINE, arXiv:2410.13842), over the ``R + 1`` logits of each of the four
box edges of a query, ``corners (..., 4, R + 1)``:

* :func:`weighting_function`: D-FINE's ``R + 1`` non-uniform bin values ``W(n)``.
* :func:`fine_grained_localization_loss` (FGL): the edge distances of the target box from the
  reference box, in ``W(n)`` units, split between the two neighbouring bins; cross-entropy to
  both, weighted by the distance to the other (a unimodal distribution focal loss).
* :func:`decoupled_distillation_loss` (DDF): ``T^2 KL(softmax(teacher / T) || softmax(x / T))``
  summed over bins, per edge; the caller weights and normalises it.

Every function computes in float32 (float64 stays float64), returns the element-wise value
(``reduction="none"``) or its ``"sum"``/``"mean"`` (see :func:`detloss.functional.weighted_reduce`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F

from .._validate import require_positive
from ..boxes import aligned_box_iou_unchecked, compute_dtype, cxcywh_to_xyxy
from ..targets import one_hot
from .classification import cross_entropy, sigmoid_focal_loss
from .reduce import Reduction, weighted_reduce

#: floor of RF-DETR's positive quality ``p^alpha IoU^(1 - alpha)``
IA_BCE_MIN_QUALITY = 0.01


def _prepare(logits: Tensor, positive: Tensor, iou: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if logits.shape[-1:] != positive.shape[-1:] or torch.broadcast_shapes(logits.shape, positive.shape) != logits.shape:
        raise ValueError(f"positive: expected shape {tuple(logits.shape)} (as logits), got {tuple(positive.shape)}")
    dtype = compute_dtype(logits)
    x = logits.to(dtype)
    pos = positive.to(dtype)
    q = iou.detach().to(dtype)
    if q.dim() == x.dim() - 1:
        q = q.unsqueeze(-1)
    return x, pos, q


def detr_varifocal_loss(
    logits: Tensor, positive: Tensor, iou: Tensor, alpha: float = 0.75, gamma: float = 2.0, *,
    weight: Optional[Tensor] = None, reduction: Reduction = "none", normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """RT-DETR's varifocal loss with the IoU-aware target (see the module doc).

    Args:
        logits: ``(..., C)`` class logits. positive: ``(..., C)`` 0/1 one-hot of the matched
        class (zero rows: unmatched). iou: ``(...)`` or ``(..., C)`` IoU of the matched pair.

    Returns: ``(..., C)`` for ``"none"``, else a 0-d tensor.

    >>> detr_varifocal_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([0.5]))
    tensor([[0.3466, 0.1300]])
    """
    require_positive(gamma, "gamma", allow_zero=True)
    x, pos, q = _prepare(logits, positive, iou)
    target = q * pos
    p = torch.sigmoid(x.detach())
    w = alpha * p.pow(gamma) * (1 - pos) + target
    loss = F.binary_cross_entropy_with_logits(x, target, reduction="none") * w
    return weighted_reduce(loss, weight, reduction, normalizer)


def matchability_aware_loss(
    logits: Tensor, positive: Tensor, iou: Tensor, gamma: float = 2.0, mal_alpha: Optional[float] = None, *,
    weight: Optional[Tensor] = None, reduction: Reduction = "none", normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """DEIM's matchability-aware loss: target ``(IoU * positive) ** gamma`` (see the module doc).

    Shapes as :func:`detr_varifocal_loss`.

    >>> matchability_aware_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([0.5]))
    tensor([[0.6931, 0.1733]])
    """
    require_positive(gamma, "gamma", allow_zero=True)
    x, pos, q = _prepare(logits, positive, iou)
    target = (q * pos).pow(gamma)
    p = torch.sigmoid(x.detach())
    scale = 1.0 if mal_alpha is None else float(mal_alpha)
    w = scale * p.pow(gamma) * (1 - pos) + pos
    loss = F.binary_cross_entropy_with_logits(x, target, reduction="none") * w
    return weighted_reduce(loss, weight, reduction, normalizer)


def iou_aware_bce_loss(
    logits: Tensor, positive: Tensor, iou: Tensor, alpha: float = 0.25, gamma: float = 2.0, *,
    min_quality: float = IA_BCE_MIN_QUALITY, weight: Optional[Tensor] = None, reduction: Reduction = "none",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """RF-DETR's IoU-aware BCE: positive quality ``max(p^alpha IoU^(1-alpha), min_quality)``.

    Shapes as :func:`detr_varifocal_loss`. ``log p`` and ``log(1 - p)`` are taken as
    log-sigmoids (finite for large logits).

    >>> iou_aware_bce_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([1.0]))
    tensor([[0.6931, 0.1733]])
    """
    require_positive(gamma, "gamma", allow_zero=True)
    x, pos, q = _prepare(logits, positive, iou)
    p = torch.sigmoid(x)
    quality = (p.detach().pow(alpha) * q.clamp(min=0).pow(1 - alpha)).clamp(min=min_quality)
    pos_w = quality * pos
    neg_w = torch.where(pos > 0, 1 - quality, p.pow(gamma))
    loss = -pos_w * F.logsigmoid(x) - neg_w * F.logsigmoid(-x)
    return weighted_reduce(loss, weight, reduction, normalizer)


def weighting_function(max_num_bins: int, up: float, reg_scale: float, *, dtype: torch.dtype = torch.float32,
                       device: Optional[torch.device] = None) -> Tensor:
    """D-FINE's non-uniform bin values ``W(n)``, ``(max_num_bins + 1,)``.

    ``W(0) = -2 a``, ``W(R) = 2 a`` with ``a = |up| |reg_scale|``, and in between
    ``-(s^k - 1)`` .. ``0`` .. ``s^k - 1`` with ``s = (a + 1)^(2 / (R - 2))``. Computed in the
    same float32 operations as D-FINE, so the bins are bit-equal to it.

    >>> weighting_function(4, 0.5, 4.0)
    tensor([-4., -2.,  0.,  2.,  4.])
    """
    if isinstance(max_num_bins, bool) or not isinstance(max_num_bins, int) or max_num_bins < 4 or max_num_bins % 2:
        raise ValueError(f"max_num_bins: expected an even integer >= 4, got {max_num_bins!r}")
    up_t = torch.tensor([up], dtype=torch.float32)
    a = up_t[0].abs() * abs(reg_scale)
    step = (a + 1) ** (2 / (max_num_bins - 2))
    left = [-(step**i) + 1 for i in range(max_num_bins // 2 - 1, 0, -1)]
    right = [step**i - 1 for i in range(1, max_num_bins // 2)]
    values = torch.stack([-(a * 2)] + left + [torch.zeros_like(a)] + right + [a * 2])
    return values.to(dtype=dtype, device=device)


def edge_targets(ref_points: Tensor, target_boxes: Tensor, bins: Tensor, reg_scale: float,
                 eps: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """FGL targets of each box edge: ``(left bin (..., 4) int64, weight of the right bin, of the
    left bin)``. ``ref_points (..., 4)`` cxcywh reference boxes, ``target_boxes (..., 4)`` cxcywh.
    Edges beyond the first or last bin go wholly to that bin (as D-FINE). No gradient."""
    with torch.no_grad():
        r = float(abs(reg_scale))
        ref, tgt = ref_points.detach(), target_boxes.detach()
        x1, y1 = tgt[..., 0] - 0.5 * tgt[..., 2], tgt[..., 1] - 0.5 * tgt[..., 3]
        x2, y2 = tgt[..., 0] + 0.5 * tgt[..., 2], tgt[..., 1] + 0.5 * tgt[..., 3]
        sw, sh = ref[..., 2] / r + 1e-16, ref[..., 3] / r + 1e-16
        dist = torch.stack((
            (ref[..., 0] - x1) / sw - 0.5 * r, (ref[..., 1] - y1) / sh - 0.5 * r,
            (x2 - ref[..., 0]) / sw - 0.5 * r, (y2 - ref[..., 1]) / sh - 0.5 * r,
        ), -1)  # (..., 4)
        num_bins = bins.shape[0] - 1
        bins = bins.to(dist.dtype)
        index = (bins <= dist.unsqueeze(-1)).sum(-1) - 1  # (..., 4), -1 .. R
        inside = (index >= 0) & (index < num_bins)
        i = index.clamp(0, num_bins - 1)
        left, right = bins[i], bins[i + 1]
        dl, dr = (dist - left).abs(), (right - dist).abs()
        w_right = torch.where(inside, dl / (dl + dr), (index >= num_bins).to(dist.dtype))
        w_left = torch.where(inside, 1 - w_right, (index < 0).to(dist.dtype))
        label = torch.where(index < 0, 0, torch.where(index >= num_bins, num_bins - 1, index))
        label = label.clamp(0, num_bins - 1)
        del eps  # D-FINE clamps the float label at R - eps; its integer part is the label above
        return label, w_right, w_left


def fine_grained_localization_loss(
    corners: Tensor, ref_points: Tensor, target_boxes: Tensor, *, max_num_bins: int = 32, up: float = 0.5,
    reg_scale: float = 4.0, weight: Optional[Tensor] = None, reduction: Reduction = "none",
    normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """D-FINE's FGL per box edge.

    Args:
        corners: ``(..., 4, R + 1)`` (or ``(..., 4 (R + 1))``) edge-distribution logits.
        ref_points: ``(..., 4)`` cxcywh reference boxes the distances are measured from.
        target_boxes: ``(..., 4)`` cxcywh matched ground truth.
        weight: optional, broadcastable to ``(..., 4)`` (D-FINE: the IoU of the pair).

    Returns: ``(..., 4)`` for ``"none"``, else a 0-d tensor.

    >>> c = torch.zeros(1, 4, 33); ref = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    >>> fine_grained_localization_loss(c, ref, ref).shape
    torch.Size([1, 4])
    """
    num = max_num_bins + 1
    if corners.shape[-1] != num:
        if corners.shape[-1] != 4 * num:
            raise ValueError(f"corners: expected a last dimension of {num} or {4 * num}, got {tuple(corners.shape)}")
        corners = corners.unflatten(-1, (4, num))
    bins = weighting_function(max_num_bins, up, reg_scale, device=corners.device)
    label, w_right, w_left = edge_targets(ref_points, target_boxes, bins, reg_scale)
    logp = torch.log_softmax(corners.to(compute_dtype(corners)), -1)
    left = -logp.gather(-1, label.unsqueeze(-1)).squeeze(-1)
    right = -logp.gather(-1, (label + 1).unsqueeze(-1)).squeeze(-1)
    loss = left * w_left.to(left.dtype) + right * w_right.to(left.dtype)
    return weighted_reduce(loss, weight, reduction, normalizer)


def decoupled_distillation_loss(
    corners: Tensor, teacher_corners: Tensor, temperature: float = 5.0, *, weight: Optional[Tensor] = None,
    reduction: Reduction = "none", normalizer: Optional[Union[Tensor, float]] = None,
) -> Tensor:
    """D-FINE's DDF per box edge: ``T^2 KL(softmax(teacher / T) || softmax(corners / T))``.

    ``corners``, ``teacher_corners``: ``(..., 4, R + 1)`` (the teacher is detached). Returns
    ``(..., 4)`` for ``"none"``.

    >>> decoupled_distillation_loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3))
    tensor([[0., 0., 0., 0.]])
    """
    require_positive(temperature, "temperature")
    if corners.shape != teacher_corners.shape:
        raise ValueError(f"teacher_corners: expected shape {tuple(corners.shape)}, got {tuple(teacher_corners.shape)}")
    dtype = compute_dtype(corners)
    t = float(temperature)
    logp = torch.log_softmax(corners.to(dtype) / t, -1)
    target = torch.softmax(teacher_corners.detach().to(dtype) / t, -1)
    kl = F.kl_div(logp, target, reduction="none").sum(-1) * (t * t)
    return weighted_reduce(kl, weight, reduction, normalizer)


__all__ = [
    "decoupled_distillation_loss",
    "detr_varifocal_loss",
    "fine_grained_localization_loss",
    "iou_aware_bce_loss",
    "matchability_aware_loss",
    "weighting_function",
]


def distribution_terms(
    pred: Tensor, corners: Tensor, refs: Tensor, q2g: Tensor, target: Tensor, num: Tensor,
    teacher_corners: Optional[Tensor], teacher_logits: Tensor, *, bins: dict, temperature: float,
    distributed: bool,
) -> tuple[Tensor, Tensor]:
    """D-FINE's FGL and DDF ``(Sc,)`` of the first ``Sc`` layers of a matching set, those with
    ``corners (Sc, B, Q, 4 (R + 1))``: boxes ``pred (S, B, Q, 4)`` cxcywh, reference points
    ``refs (Sc, B, Q, 4)``, matching ``q2g (S, B, Q)`` (-1: unmatched), matched targets
    ``target (S, B, Q, 4)``, normaliser ``num``. The teacher is ``teacher_corners (B, Q, 4 (R + 1))``
    or, when None, the last layer with corners (whose own DDF is then 0); ``teacher_logits (B, Q, K)``
    weight the unmatched queries. ``bins``: :func:`weighting_function`'s settings; with
    ``distributed`` DDF's edge counts and batch size are summed over processes."""
    sc = corners.shape[0]
    r1 = bins["max_num_bins"] + 1
    matched = q2g[:sc] >= 0  # (Sc, B, Q)
    pred, target = pred[:sc], target[:sc]
    iou = aligned_box_iou_unchecked(cxcywh_to_xyxy(pred.detach()), cxcywh_to_xyxy(target), "iou")
    iou = torch.where(matched, iou, 0.0)
    edges = corners.unflatten(-1, (4, r1))  # (Sc, B, Q, 4, R + 1)
    safe_target = torch.where(matched.unsqueeze(-1), target, refs.detach().to(target.dtype))
    fgl = fine_grained_localization_loss(edges, refs, safe_target, **bins)  # (Sc, B, Q, 4)
    fgl = torch.where(matched.unsqueeze(-1), fgl * iou.unsqueeze(-1), 0.0).sum((1, 2, 3)) / num
    # DDF against the teacher (the last layer with corners unless given)
    teacher_is_last = teacher_corners is None
    teacher = (corners[-1] if teacher_is_last else teacher_corners).unflatten(-1, (4, r1))
    kl = decoupled_distillation_loss(edges, teacher.unsqueeze(0).expand_as(edges), temperature)
    with torch.no_grad():
        score = teacher_logits.detach().to(iou.dtype).sigmoid().amax(-1)  # (B, Q)
        weight = torch.where(matched, iou, score.unsqueeze(0))
    kl = kl * weight.unsqueeze(-1)  # (Sc, B, Q, 4)
    batch, queries = matched.shape[1:]
    pos = matched.sum((1, 2)).to(kl.dtype) * 4  # matched edges per layer
    counts = torch.cat((pos, batch * queries * 4 - pos, pos.new_full((1,), batch)))
    counts, world = _summed_over_processes(counts, distributed)  # DDP: the batch's counts, this process's share of the sums
    pos, neg, batch_all = counts[:sc], counts[sc:-1], counts[-1]
    mean_pos = torch.where(matched.unsqueeze(-1), kl, 0.0).sum((1, 2, 3)) / pos.clamp(min=1)
    mean_neg = torch.where(matched.unsqueeze(-1), 0.0, kl).sum((1, 2, 3)) / neg.clamp(min=1)
    w_pos, w_neg = (pos / batch_all).sqrt(), (neg / batch_all).sqrt()
    ddf = (mean_pos * w_pos + mean_neg * w_neg) / (w_pos + w_neg) * world
    if teacher_is_last:  # the teacher's own DDF is 0 (kept in the graph)
        ddf = torch.cat((ddf[:-1], (corners[-1].sum() * 0).to(ddf.dtype).reshape(1)))
    return fgl, ddf


def _summed_over_processes(counts: Tensor, distributed: bool) -> tuple[Tensor, int]:
    """``counts`` summed over processes (``distributed`` and an initialised process group) and
    the world size; else ``(counts, 1)``."""
    if distributed and dist.is_available() and dist.is_initialized():
        counts = counts.detach().clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return counts, dist.get_world_size()
    return counts, 1


def detr_class_term(
    class_loss: str, pred: Tensor, cls_logits: Tensor, matched: Tensor, target_box: Tensor, target_class: Tensor,
    num: Tensor, *, alpha: float, gamma: float, mal_alpha: Optional[float], eos_coef: float,
) -> Tensor:
    """``(S,)`` class term of each of ``S`` stacked layers: boxes ``pred (S, B, Q, 4)`` cxcywh,
    ``cls_logits (S, B, Q, K)``, ``matched (S, B, Q)`` bool and each query's matched box
    ``target_box (S, B, Q, 4)`` and class ``target_class (S, B, Q)``; ``class_loss`` ``"vfl"``,
    ``"mal"``, ``"ia_bce"``, ``"focal"`` (summed, / ``num``) or ``"ce"`` (the "no object" column
    last, weighted ``eos_coef``; the weighted mean of each layer)."""
    k = cls_logits.shape[-1]
    if class_loss == "ce":
        target_class = torch.where(matched, target_class, k - 1)
        ce = cross_entropy(cls_logits, target_class, reduction="none")  # (S, B, Q)
        weight = torch.where(matched, ce.new_ones(()), ce.new_full((), eos_coef))
        return (ce * weight).sum((1, 2)) / weight.sum((1, 2)).clamp(min=1e-12)
    positive = one_hot(torch.where(matched, target_class, -1), k, pred.dtype)  # (S, B, Q, C)
    if class_loss == "focal":
        loss = sigmoid_focal_loss(cls_logits, positive, alpha, gamma, reduction="none")
    else:
        iou = aligned_box_iou_unchecked(cxcywh_to_xyxy(pred.detach()), cxcywh_to_xyxy(target_box), "iou")
        iou = torch.where(matched, iou, 0.0)
        if class_loss == "vfl":
            loss = detr_varifocal_loss(cls_logits, positive, iou, alpha, gamma)
        elif class_loss == "mal":
            loss = matchability_aware_loss(cls_logits, positive, iou, gamma, mal_alpha)
        else:
            loss = iou_aware_bce_loss(cls_logits, positive, iou, alpha, gamma)
    return loss.sum((1, 2, 3)) / num
