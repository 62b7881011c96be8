"""DETR set-prediction loss (Carion et al. 2020, arXiv:2005.12872), every decoder layer at once.

For each decoder layer ``l`` (the last one is the final prediction, the others the auxiliary
losses) and image, the ``Q`` predictions are matched one-to-one to the image's objects by
the Hungarian algorithm on the matching cost, then

``loss_l = cls_weight * L_cls + l1_weight * sum_matched |b - b_gt|_1 / N
           + giou_weight * sum_matched (1 - GIoU(b, b_gt)) / N``

with ``N`` the batch's number of objects (at least 1), shared by every layer.

1. Matching cost of every layer x image in one ``(L * B, Q, M)`` tensor
   (:func:`detloss.matching.hungarian.detr_matching_cost`), one solve for all of them
   (:func:`detloss.matching.hungarian.match_hungarian`: the one host round trip of the loss).
2. Class term over all queries, matched queries targeting their GT's class:
   ``"ce"``: softmax cross-entropy over ``C + 1`` columns (the last one "no object", target of
   unmatched queries), class weights 1 and ``eos_coef`` for "no object", and the weighted
   mean (divided by the sum of the target weights, as DETR does), not by ``N``;
   ``"focal"``: sigmoid focal loss over ``C`` columns (unmatched queries: all-zero target),
   summed and divided by ``N`` (Deformable DETR, DINO).
3. L1 on normalised cxcywh and ``1 - GIoU`` on the xyxy boxes of matched pairs, divided by ``N``.

Boxes are normalised cxcywh (predictions and ground truth). Labels are ``0 .. C - 1``.
Images and batches without objects are normal input: every query targets "no object", the
box terms are exactly 0, ``N`` is clamped at 1. With more objects than queries in an image,
the surplus objects stay unmatched (no box loss) but count in ``N``, as in the original.

Where it differs from facebookresearch/detr: ``N`` stays a tensor (no ``.item()`` host
sync); with ``distributed=True`` it is all-reduced (``N / world_size``, clamped at ``1 /
world_size``: see :func:`detloss.functional.positive_normalizer`) and so is the
cross-entropy's weight sum, so DDP gradients equal the single-process gradients on the whole
batch (the original's cross-entropy is a per-process mean). Degenerate predicted boxes give
finite values instead of an assertion.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from .._validate import (
    ValueChecks, require_choice, require_floating, require_padded_gt, require_positive, require_shape,
)
from ..boxes import aligned_box_iou_unchecked, compute_dtype, cxcywh_to_xyxy, pair_dtype
from ..functional import cross_entropy, positive_normalizer, sigmoid_focal_loss
from ..matching.hungarian import Solver, match_hungarian_unchecked, matching_cost_unchecked
from ..targets import one_hot

ClassLoss = Literal["ce", "focal"]


@dataclass
class DETRAssignment:
    """The matching of every decoder layer: ``query_to_gt (L, B, Q)`` (-1: no object),
    ``gt_to_query (L, B, M)`` (-1: padding, or an object left unmatched), ``target_class
    (L, B, Q)`` (the matched GT's class; ``C`` for "no object" with ``"ce"``, -1 with
    ``"focal"``) and ``num_boxes`` (0-d float, the normaliser ``N``)."""

    query_to_gt: Tensor
    gt_to_query: Tensor
    target_class: Tensor
    num_boxes: Tensor


def detr_set_loss(
    box_pred: Tensor,
    cls_logits: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    query_to_gt: Tensor,
    num_boxes: Tensor,
    *,
    class_loss: ClassLoss = "ce",
    eos_coef: float = 0.1,
    alpha: float = 0.25,
    gamma: float = 2.0,
    cls_normalizer: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-layer terms given a matching (no checks; sync-free, ``torch.compile``-able).

    Args:
        box_pred: ``(L, B, Q, 4)`` normalised cxcywh.
        cls_logits: ``(L, B, Q, K)``, ``K = C + 1`` for ``"ce"``, ``C`` for ``"focal"``.
        gt_boxes, gt_labels: ``(B, M, 4)`` cxcywh and ``(B, M)`` classes.
        query_to_gt: ``(L, B, Q)`` int64 matched GT of each query, -1 for none.
        num_boxes: 0-d divisor of the box terms (and of the focal term).
        cls_normalizer: divisor of the ``"ce"`` term, broadcastable to ``(L,)``; default the
            sum of the target weights of each layer (DETR's weighted mean).

    Returns:
        ``(loss_cls, loss_l1, loss_giou)`` each ``(L,)`` float32 (float64 stays float64), and
        ``target_class (L, B, Q)`` int64.
    """
    num_layers, batch, queries, k = cls_logits.shape
    dtype = compute_dtype(box_pred)
    matched = query_to_gt >= 0  # (L, B, Q)
    index = query_to_gt.clamp(min=0)
    layer_gt_labels = gt_labels.unsqueeze(0).expand(num_layers, -1, -1)  # (L, B, M)
    layer_gt_boxes = gt_boxes.to(dtype).unsqueeze(0).expand(num_layers, -1, -1, -1)
    # 1. targets of every query: the matched GT's class and box ("no object" and the
    #    prediction itself where unmatched, so unmatched terms are finite before masking)
    none = k - 1 if class_loss == "ce" else -1
    pred = box_pred.to(dtype)
    if gt_labels.shape[1]:
        target_class = torch.where(matched, layer_gt_labels.gather(2, index), none)
        target_box = layer_gt_boxes.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, 4))
        target_box = torch.where(matched.unsqueeze(-1), target_box, pred.detach())
    else:
        target_class = torch.full_like(query_to_gt, none)
        target_box = pred.detach()
    # 2. class term
    if class_loss == "ce":
        ce = cross_entropy(cls_logits, target_class, reduction="none")  # (L, B, Q)
        weight = torch.where(matched, ce.new_ones(()), ce.new_full((), eos_coef))
        if cls_normalizer is None:
            cls_normalizer = weight.sum((1, 2)).clamp(min=1e-12)
        loss_cls = (ce * weight).sum((1, 2)) / cls_normalizer
    else:
        onehot = one_hot(target_class, k, dtype) * matched.unsqueeze(-1).to(dtype)  # (L, B, Q, C)
        focal = sigmoid_focal_loss(cls_logits, onehot, alpha, gamma, reduction="none")
        loss_cls = focal.sum((1, 2, 3)) / num_boxes
    # 3. box terms over matched pairs
    l1 = (pred - target_box).abs().sum(-1)  # (L, B, Q)
    giou = aligned_box_iou_unchecked(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target_box), "giou")
    loss_l1 = torch.where(matched, l1, 0.0).sum((1, 2)) / num_boxes
    loss_giou = torch.where(matched, 1 - giou, 0.0).sum((1, 2)) / num_boxes
    return loss_cls, loss_l1, loss_giou, target_class


def check_detr_gt(
    gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, num_classes: int, dims: Optional[dict] = None,
    checks: Optional[ValueChecks] = None,
) -> tuple[dict, Tensor]:
    """The ground-truth checks of every DETR-family entry point (native and drop-ins): padded
    ``gt_boxes (B, M, 4)`` normalised cxcywh (pixel boxes are refused), ``gt_labels (B, M)`` in
    ``[0, num_classes - 1]``, ``gt_valid (B, M)``; values read in one host read (the queued
    ``checks`` too, when given). Returns the named dimensions and ``gt_valid`` as bool."""
    checks = ValueChecks() if checks is None else checks
    dims, gt_valid = require_padded_gt(
        gt_boxes, gt_valid, gt_labels, checks=checks, dims=dims, label_range=(0, num_classes - 1)
    )
    checks.normalised(gt_boxes, "gt_boxes", box_format="cxcywh", where=gt_valid).run()
    return dims, gt_valid


def layer_keys(name: str, num_layers: int) -> list[str]:
    """Output keys of term ``name`` per layer: ``name_0 .. name_{L-2}`` for the auxiliary
    layers, ``name`` for the final one."""
    return [f"{name}_{i}" for i in range(num_layers - 1)] + [name]


class DETRLoss(nn.Module):
    """DETR / Deformable DETR set-prediction loss over all decoder layers (see the module doc).

    Args:
        num_classes: ``C``, object classes (without "no object").
        class_loss: ``"ce"`` (DETR: ``C + 1`` logit columns, softmax matching cost) or
            ``"focal"`` (Deformable DETR / DINO: ``C`` columns, focal matching cost).
        eos_coef: ``"ce"``'s weight of "no object" (0.1; the rule: the module doc, step 2).
        alpha, gamma: focal loss and focal matching cost (0.25, 2).
        cls_weight, l1_weight, giou_weight: loss weights (DETR: 1, 5, 2; Deformable DETR 2, 5, 2).
        match_cls_weight, match_l1_weight, match_giou_weight: matching-cost weights (same
            defaults).
        solver: the linear assignment solver (default SciPy's; see
            :func:`detloss.match_hungarian`).
        distributed: all-reduce the normalisers (DDP).
        chunk_elements: entries per matching-cost block (see :func:`detloss.detr_matching_cost`).

    ``forward(box_pred (L, B, Q, 4) normalised cxcywh, cls_logits (L, B, Q, K), gt_boxes
    (B, M, 4) normalised cxcywh, gt_labels (B, M) in [0, C-1], gt_valid (B, M) bool, *,
    return_assignment=False)`` returns ``loss_cls``, ``loss_l1``, ``loss_giou`` of the final
    layer, the same with suffix ``_{i}`` for auxiliary layer ``i``, ``loss`` (the weighted sum
    over all layers), all 0-d float32 (float64 for float64 input), and with
    ``return_assignment`` an ``"assignment"`` (:class:`DETRAssignment`). Predictions may be
    float16/bfloat16: costs, matching and losses run in float32.

    >>> loss_fn = DETRLoss(num_classes=2)
    >>> boxes, logits = torch.full((2, 1, 3, 4), 0.5), torch.zeros(2, 1, 3, 3)  # L=2, B=1, Q=3
    >>> gt = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    >>> out = loss_fn(boxes, logits, gt, torch.tensor([[1]]), torch.tensor([[True]]))
    >>> sorted(out), round(out["loss"].item(), 4)
    (['loss', 'loss_cls', 'loss_cls_0', 'loss_giou', 'loss_giou_0', 'loss_l1', 'loss_l1_0'], 11.5572)
    """

    def __init__(
        self, num_classes: int, *, class_loss: ClassLoss = "ce", eos_coef: float = 0.1,
        alpha: float = 0.25, gamma: float = 2.0,
        cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0,
        match_cls_weight: float = 1.0, match_l1_weight: float = 5.0, match_giou_weight: float = 2.0,
        solver: Optional[Solver] = None, distributed: bool = False, chunk_elements: Optional[int] = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
        require_choice(class_loss, "class_loss", ("ce", "focal"))
        for value, name in (
            (eos_coef, "eos_coef"), (gamma, "gamma"), (cls_weight, "cls_weight"), (l1_weight, "l1_weight"),
            (giou_weight, "giou_weight"), (match_cls_weight, "match_cls_weight"),
            (match_l1_weight, "match_l1_weight"), (match_giou_weight, "match_giou_weight"),
        ):
            require_positive(value, name, allow_zero=True)
        if solver is not None and not callable(solver):
            raise TypeError(f"solver: expected a callable like scipy's linear_sum_assignment, got {type(solver).__name__}")
        if chunk_elements is not None:
            require_positive(chunk_elements, "chunk_elements")
        self.num_classes = num_classes
        self.class_loss = class_loss
        self.eos_coef, self.alpha, self.gamma = float(eos_coef), float(alpha), float(gamma)
        self.weights = (float(cls_weight), float(l1_weight), float(giou_weight))
        self.cost_options = dict(
            class_cost="softmax" if class_loss == "ce" else "focal", cls_weight=float(match_cls_weight),
            l1_weight=float(match_l1_weight), giou_weight=float(match_giou_weight),
            alpha=self.alpha, gamma=self.gamma, chunk_elements=chunk_elements,
        )
        self.solver = solver
        self.distributed = distributed

    def forward(
        self,
        box_pred: Tensor,
        cls_logits: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
        *,
        return_assignment: bool = False,
    ) -> dict:
        # 0. checks, once
        k = self.num_classes + (1 if self.class_loss == "ce" else 0)
        require_floating(box_pred, "box_pred")
        dims = require_shape(box_pred, "box_pred", ("L", "B", "Q", 4))
        require_floating(cls_logits, "cls_logits")
        require_shape(cls_logits, "cls_logits", ("L", "B", "Q", k), dims)
        dims, gt_valid = check_detr_gt(gt_boxes, gt_labels, gt_valid, self.num_classes, dims)
        num_layers, batch, queries, _ = cls_logits.shape
        # 1. one matching cost for every layer x image, one solve
        stacked = dict(
            gt_boxes=gt_boxes.unsqueeze(0).expand(num_layers, -1, -1, -1).flatten(0, 1),
            gt_labels=gt_labels.unsqueeze(0).expand(num_layers, -1, -1).flatten(0, 1),
            gt_valid=gt_valid.unsqueeze(0).expand(num_layers, -1, -1).flatten(0, 1),
        )
        cost = matching_cost_unchecked(
            cls_logits.flatten(0, 1), box_pred.flatten(0, 1), **stacked, **self.cost_options
        )
        match = match_hungarian_unchecked(cost, stacked["gt_valid"], solver=self.solver)
        query_to_gt = match.query_to_gt.view(num_layers, batch, queries)
        # 2. normalisers: the objects of the batch; with "ce" and DDP the weight sum too
        dtype = pair_dtype(cls_logits, box_pred)
        num_boxes = positive_normalizer(gt_valid.sum(), distributed=self.distributed)
        cls_normalizer = None
        if self.class_loss == "ce" and self.distributed:
            matched = gt_valid.sum(1).clamp(max=queries).sum()  # the same in every layer
            weight_sum = matched.double() * (1 - self.eos_coef) + self.eos_coef * batch * queries
            cls_normalizer = positive_normalizer(weight_sum, distributed=True, min_value=1e-12).to(dtype)
        # 3. the terms of every layer, then the weighted total
        loss_cls, loss_l1, loss_giou, target_class = detr_set_loss(
            box_pred, cls_logits, gt_boxes, gt_labels, query_to_gt, num_boxes.to(dtype),
            class_loss=self.class_loss, eos_coef=self.eos_coef, alpha=self.alpha, gamma=self.gamma,
            cls_normalizer=cls_normalizer,
        )
        cls_w, l1_w, giou_w = self.weights
        out: dict = {}
        for name, values in (("loss_cls", loss_cls), ("loss_l1", loss_l1), ("loss_giou", loss_giou)):
            out.update(zip(layer_keys(name, num_layers), values.unbind(0)))
        out["loss"] = (cls_w * loss_cls + l1_w * loss_l1 + giou_w * loss_giou).sum()
        if return_assignment:
            out["assignment"] = DETRAssignment(
                query_to_gt=query_to_gt, gt_to_query=match.gt_to_query.view(num_layers, batch, -1),
                target_class=target_class, num_boxes=num_boxes,
            )
        return out
