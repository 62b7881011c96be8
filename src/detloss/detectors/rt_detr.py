"""Real-time DETR losses: RT-DETR v1/v2, D-FINE, DEIM(v2), RF-DETR / LW-DETR, Deformable DETR, DETR.

One module covers the family: every matching set of a training step is matched in **one**
solve (one device -> host and one host -> device copy), then each set's terms are computed
batched, without host synchronisation.

Matching sets (each a stack of predictions against the same padded ground truth):

* the decoder layers ``box_pred (L, B, Q, 4)``, ``cls_logits (L, B, Q, K)`` (the last layer is
  the final prediction, the others the auxiliary losses);
* the encoder's top-k output ``enc_box_pred (B, Qe, 4)``, ``enc_cls_logits (B, Qe, K)``;
* query groups (RF-DETR's group one-to-many training, ``num_groups = G``): the ``Q`` queries
  are ``G`` consecutive groups, each matched one-to-one on its own (every object is matched
  once per group), and the normaliser is multiplied by ``G``;
* denoising queries (DINO / RT-DETR contrastive denoising) ``dn_box_pred (Ld, B, D, 4)``,
  ``dn_cls_logits (Ld, B, D, K)``: not matched; ``dn_query_to_gt (B, D)`` gives the object each
  positive denoising query reconstructs (-1: a negative query), and their losses are
  normalised by the number of objects times ``dn_groups``;
* DEIM's dense one-to-one (``dense_one_to_one=True``): the class term of each layer uses the
  layer's own matching, the box and FGL/DDF terms of every layer (and of the encoder output)
  use the *union* of every layer's matching: each query takes the object it was matched to
  most often over the decoder layers and the encoder output (ties: the lower object index),
  normalised by the number of such pairs.

Steps of :meth:`RTDETRLoss.forward`:

1. the matching cost of every set x group x image (``detloss.matching.hungarian``), one solve
   for all; rows of sets with fewer queries are padding that the solver never sees;
2. the targets: matched object per query (or the union), its class and box, the IoU of each
   matched pair (no gradient);
3. the class term over all queries (``class_loss``): ``"vfl"`` (RT-DETR, D-FINE), ``"mal"``
   (DEIM), ``"ia_bce"`` (RF-DETR), ``"focal"`` (Deformable DETR), summed and divided by ``N``;
   ``"ce"`` (DETR: softmax over ``C + 1`` columns, "no object" weighted by ``eos_coef``, the
   weighted mean of each layer);
4. L1 on cxcywh and ``1 - GIoU`` of the matched pairs, divided by ``N``;
5. with ``pred_corners`` (D-FINE / DEIM): FGL of the matched pairs weighted by their IoU,
   divided by ``N``, and DDF: per edge ``T^2 KL(teacher || layer)`` weighted by the pair's IoU
   (matched queries) or the teacher's top class probability (the others); the matched and the
   unmatched edges are averaged separately and mixed with weights ``sqrt(count / B)``. The
   teacher is the last layer with corners unless ``teacher_corners`` is given; the teacher
   layer's own DDF is 0.

``N``: the number of objects in the batch times ``G`` (at least 1; all-reduced over processes
with ``distributed=True``, as are DDF's matched / unmatched edge counts and batch size, so DDP
gradients equal the single-process gradients of the whole batch).

Non-finite predictions never raise: NaN or inf matching costs get a defined matching (see
:mod:`detloss.matching.hungarian`), and the loss is non-finite, so a ``GradScaler`` skips the
step. Ground truth is checked (values in one host read): boxes normalised cxcywh, labels in
``[0, C - 1]``, denoising indices in ``[-1, M - 1]``.

Where it differs from transformers' loss functions (the drop-ins in
:mod:`detloss.compat.transformers` reproduce them): the final decoder layer has FGL/DDF terms
when ``pred_corners`` covers it (transformers gives it none); ``N`` stays a tensor (no
``.item()``); ``log p`` in the IA-BCE term is a log-sigmoid (finite for large logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from .._validate import ValueChecks, require_choice, require_positive
from ..boxes import aligned_box_iou_unchecked, compute_dtype, cxcywh_to_xyxy
from ..functional import positive_normalizer
from ..functional.detr_terms import detr_class_term, distribution_terms
from ..matching.detr_sets import (
    check_detr_set_shapes, fit_queries, gather_matched_targets, match_detr_sets, union_matching,
)
from ..matching.hungarian import Solver
from .detr import check_detr_gt, layer_keys

ClassLoss = Literal["vfl", "mal", "ia_bce", "focal", "ce"]
CLASS_LOSSES = ("vfl", "mal", "ia_bce", "focal", "ce")
#: the class term's ``alpha`` when none is given
DEFAULT_ALPHA = {"vfl": 0.75, "ia_bce": 0.25, "focal": 0.25, "mal": None, "ce": None}
TERMS = ("cls", "l1", "giou", "fgl", "ddf")


@dataclass
class RTDETRAssignment:
    """The matchings of one step: ``query_to_gt (L, B, Q)`` of the decoder layers,
    ``enc_query_to_gt (B, Qe)`` (or None), ``union_query_to_gt (B, Q)`` (dense one-to-one, or
    None), ``dn_query_to_gt (B, D)`` (as given, or None); -1: no object. ``num_boxes``: ``N``."""

    query_to_gt: Tensor
    enc_query_to_gt: Optional[Tensor]
    union_query_to_gt: Optional[Tensor]
    dn_query_to_gt: Optional[Tensor]
    num_boxes: Tensor


class RTDETRLoss(nn.Module):
    """Set-prediction loss of the real-time DETR family (see the module doc).

    Args:
        num_classes: ``C`` (without "no object").
        class_loss: ``"vfl"``, ``"mal"``, ``"ia_bce"``, ``"focal"`` (``K = C`` sigmoid columns) or
            ``"ce"`` (``K = C + 1``, the last "no object").
        alpha: the class term's alpha (default 0.75 for ``"vfl"``, 0.25 for ``"ia_bce"`` and
            ``"focal"``); gamma: its gamma (2). mal_alpha: MAL's negative weight (None: 1).
        eos_coef: ``"ce"``'s weight of "no object".
        cls_weight, l1_weight, giou_weight, fgl_weight, ddf_weight: weights in ``"loss"``.
        match_class_cost: ``"focal"`` or ``"softmax"`` (``"ce"`` needs ``"softmax"``);
        match_cls_weight, match_l1_weight, match_giou_weight, match_alpha, match_gamma: the
            matching cost.
        num_groups: ``G`` query groups (RF-DETR); ``Q`` and ``Qe`` must be multiples of it.
        dense_one_to_one: DEIM's union matching for the box and FGL/DDF terms.
        max_num_bins, up, reg_scale, ddf_temperature: D-FINE's distribution settings.
        solver, distributed, chunk_elements: as :class:`detloss.DETRLoss`.

    ``forward(box_pred (L, B, Q, 4), cls_logits (L, B, Q, K), gt_boxes (B, M, 4), gt_labels
    (B, M), gt_valid (B, M), *, enc_box_pred (B, Qe, 4), enc_cls_logits (B, Qe, K),
    dn_box_pred (Ld, B, D, 4), dn_cls_logits (Ld, B, D, K), dn_query_to_gt (B, D) int,
    dn_groups: int, pred_corners (Lc, B, Q, 4 (R + 1)) for the first ``Lc <= L`` decoder layers,
    ref_points (Lc, B, Q, 4) cxcywh, teacher_corners (B, Q, 4 (R + 1)), teacher_logits (B, Q,
    K), dn_pred_corners (Ldc, B, D, 4 (R + 1)), dn_ref_points, dn_teacher_corners,
    dn_teacher_logits, return_assignment=False)``: everything after ``gt_valid`` optional.
    Boxes are normalised cxcywh. Returns 0-d float32 terms ``loss_{cls,l1,giou}`` (final
    layer), with suffix ``_{i}`` (auxiliary layer ``i``), ``_enc`` and ``_dn_{i}``;
    ``loss_fgl*`` / ``loss_ddf*`` for the layers with corners; ``loss`` (the weighted sum of
    all); with ``return_assignment`` an ``"assignment"`` (:class:`RTDETRAssignment`).

    >>> loss_fn = RTDETRLoss(num_classes=2)
    >>> boxes, logits = torch.full((2, 1, 3, 4), 0.5), torch.zeros(2, 1, 3, 2)  # L=2, B=1, Q=3
    >>> out = loss_fn(boxes, logits, torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]), torch.tensor([[1]]),
    ...               torch.tensor([[True]]))
    >>> sorted(out)
    ['loss', 'loss_cls', 'loss_cls_0', 'loss_giou', 'loss_giou_0', 'loss_l1', 'loss_l1_0']
    """

    def __init__(
        self, num_classes: int, *, class_loss: ClassLoss = "vfl", alpha: Optional[float] = None, gamma: float = 2.0,
        mal_alpha: Optional[float] = None, eos_coef: float = 0.1,
        cls_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0, fgl_weight: float = 0.15,
        ddf_weight: float = 1.5, match_class_cost: Literal["focal", "softmax"] = "focal",
        match_cls_weight: float = 2.0, match_l1_weight: float = 5.0, match_giou_weight: float = 2.0,
        match_alpha: float = 0.25, match_gamma: float = 2.0, num_groups: int = 1, dense_one_to_one: bool = False,
        max_num_bins: int = 32, up: float = 0.5, reg_scale: float = 4.0, ddf_temperature: float = 5.0,
        solver: Optional[Solver] = None, distributed: bool = False, chunk_elements: Optional[int] = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
        require_choice(class_loss, "class_loss", CLASS_LOSSES)
        require_choice(match_class_cost, "match_class_cost", ("focal", "softmax"))
        if (class_loss == "ce") != (match_class_cost == "softmax"):
            raise ValueError(
                f'match_class_cost: expected "softmax" with class_loss="ce" (C + 1 columns) and "focal" '
                f"otherwise, got {match_class_cost!r} with class_loss={class_loss!r}"
            )
        for value, name in (
            (gamma, "gamma"), (eos_coef, "eos_coef"), (cls_weight, "cls_weight"), (l1_weight, "l1_weight"),
            (giou_weight, "giou_weight"), (fgl_weight, "fgl_weight"), (ddf_weight, "ddf_weight"),
            (match_cls_weight, "match_cls_weight"), (match_l1_weight, "match_l1_weight"),
            (match_giou_weight, "match_giou_weight"), (match_gamma, "match_gamma"),
        ):
            require_positive(value, name, allow_zero=True)
        require_positive(ddf_temperature, "ddf_temperature")
        require_positive(reg_scale, "reg_scale")
        for value, name in ((num_groups, "num_groups"), (max_num_bins, "max_num_bins")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if max_num_bins < 4 or max_num_bins % 2:
            raise ValueError(f"max_num_bins: expected an even integer >= 4, got {max_num_bins!r}")
        if solver is not None and not callable(solver):
            raise TypeError(f"solver: expected a callable like scipy's linear_sum_assignment, got {type(solver).__name__}")
        if chunk_elements is not None:
            require_positive(chunk_elements, "chunk_elements")
        self.num_classes, self.class_loss = num_classes, class_loss
        self.alpha = DEFAULT_ALPHA[class_loss] if alpha is None else float(alpha)
        self.gamma, self.mal_alpha, self.eos_coef = float(gamma), mal_alpha, float(eos_coef)
        self.weights = dict(cls=float(cls_weight), l1=float(l1_weight), giou=float(giou_weight),
                            fgl=float(fgl_weight), ddf=float(ddf_weight))
        self.cost_options = dict(
            class_cost=match_class_cost, cls_weight=float(match_cls_weight), l1_weight=float(match_l1_weight),
            giou_weight=float(match_giou_weight), alpha=float(match_alpha), gamma=float(match_gamma),
            chunk_elements=chunk_elements,
        )
        self.num_groups, self.dense_one_to_one = num_groups, bool(dense_one_to_one)
        self.bins = dict(max_num_bins=max_num_bins, up=float(up), reg_scale=float(reg_scale))
        self.ddf_temperature = float(ddf_temperature)
        self.solver, self.distributed = solver, distributed

    @property
    def num_logits(self) -> int:
        """``K``: logit columns (``C + 1`` for ``"ce"``)."""
        return self.num_classes + (1 if self.class_loss == "ce" else 0)

    # ------------------------------------------------------------------------------ forward
    def forward(
        self, box_pred: Tensor, cls_logits: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, *,
        enc_box_pred: Optional[Tensor] = None, enc_cls_logits: Optional[Tensor] = None,
        dn_box_pred: Optional[Tensor] = None, dn_cls_logits: Optional[Tensor] = None,
        dn_query_to_gt: Optional[Tensor] = None, dn_groups: int = 1,
        pred_corners: Optional[Tensor] = None, ref_points: Optional[Tensor] = None,
        teacher_corners: Optional[Tensor] = None, teacher_logits: Optional[Tensor] = None,
        dn_pred_corners: Optional[Tensor] = None, dn_ref_points: Optional[Tensor] = None,
        dn_teacher_corners: Optional[Tensor] = None, dn_teacher_logits: Optional[Tensor] = None,
        return_assignment: bool = False,
    ) -> dict:
        # 0. checks (metadata here; ground-truth values in one host read)
        dims = check_detr_set_shapes(locals(), self.num_logits, self.num_groups, self.bins["max_num_bins"])
        checks = ValueChecks()
        if dn_query_to_gt is not None:
            checks.in_range(dn_query_to_gt, "dn_query_to_gt", -1, gt_boxes.shape[1] - 1)
        dims, gt_valid = check_detr_gt(gt_boxes, gt_labels, gt_valid, self.num_classes, dims, checks)
        num_layers, batch, queries, _ = box_pred.shape
        groups = self.num_groups
        # 1. one matching of every layer x group x image (and of the encoder output)
        query_to_gt, enc_query_to_gt = match_detr_sets(
            box_pred, cls_logits, enc_box_pred, enc_cls_logits, gt_boxes, gt_labels, gt_valid,
            num_groups=groups, cost_options=self.cost_options, solver=self.solver,
        )
        # 2. normalisers and the union matching (DEIM)
        num_boxes = positive_normalizer(gt_valid.sum() * groups, distributed=self.distributed)
        union = None
        box_num = num_boxes
        if self.dense_one_to_one:
            union = union_matching(query_to_gt, enc_query_to_gt, gt_boxes.shape[1])
            box_num = positive_normalizer((union >= 0).sum(), distributed=self.distributed)
        out: dict = {}
        # 3.-5. the terms of every set
        box_q2g = None if union is None else union.unsqueeze(0).expand(num_layers, -1, -1)
        keys = layer_keys("", num_layers)
        self._set_terms(out, keys, box_pred, cls_logits, query_to_gt, box_q2g, num_boxes, box_num,
                        gt_boxes, gt_labels, pred_corners, ref_points, teacher_corners,
                        cls_logits[-1] if teacher_logits is None else teacher_logits)
        if enc_box_pred is not None:
            enc_box_q2g = None
            if union is not None:
                enc_box_q2g = fit_queries(union, enc_box_pred.shape[1]).unsqueeze(0)
            self._set_terms(out, ["_enc"], enc_box_pred[None], enc_cls_logits[None], enc_query_to_gt[None],
                            enc_box_q2g, num_boxes, box_num, gt_boxes, gt_labels)
        if dn_box_pred is not None:
            dn_num = num_boxes * dn_groups
            num_dn_layers = dn_box_pred.shape[0]
            dn_q2g = dn_query_to_gt.long().unsqueeze(0).expand(num_dn_layers, -1, -1)
            self._set_terms(out, [f"_dn_{i}" for i in range(num_dn_layers)], dn_box_pred, dn_cls_logits, dn_q2g,
                            None, dn_num, dn_num, gt_boxes, gt_labels, dn_pred_corners, dn_ref_points,
                            dn_teacher_corners, dn_cls_logits[-1] if dn_teacher_logits is None else dn_teacher_logits)
        total = sum(self.weights[key.split("_")[1]] * value for key, value in out.items())
        out["loss"] = total
        if return_assignment:
            out["assignment"] = RTDETRAssignment(query_to_gt, enc_query_to_gt, union, dn_query_to_gt, num_boxes)
        return out

    # ------------------------------------------------------------------------------- terms
    def _set_terms(self, out, suffixes, box_pred, cls_logits, cls_q2g, box_q2g, cls_num, box_num, gt_boxes,
                   gt_labels, corners=None, refs=None, teacher_corners=None, teacher_logits=None) -> None:
        """Write the terms of one set (``S`` stacked layers) into ``out`` under ``loss_{term}{suffix}``."""
        dtype = compute_dtype(box_pred)
        pred = box_pred.to(dtype)
        box_q2g = cls_q2g if box_q2g is None else box_q2g
        cls_box, cls_class = gather_matched_targets(cls_q2g, gt_boxes.to(dtype), gt_labels, pred)
        cls_term = detr_class_term(self.class_loss, pred, cls_logits, cls_q2g >= 0, cls_box, cls_class, cls_num,
                                   alpha=self.alpha, gamma=self.gamma, mal_alpha=self.mal_alpha, eos_coef=self.eos_coef)
        matched = box_q2g >= 0  # (S, B, Q)
        target, _ = gather_matched_targets(box_q2g, gt_boxes.to(dtype), gt_labels, pred)
        l1 = torch.where(matched, (pred - target).abs().sum(-1), 0.0).sum((1, 2)) / box_num
        giou = aligned_box_iou_unchecked(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target), "giou")
        giou = torch.where(matched, 1 - giou, 0.0).sum((1, 2)) / box_num
        for i, suffix in enumerate(suffixes):
            out["loss_cls" + suffix], out["loss_l1" + suffix], out["loss_giou" + suffix] = cls_term[i], l1[i], giou[i]
        if corners is None:
            return
        fgl, ddf = distribution_terms(
            pred, corners, refs, box_q2g, target, box_num, teacher_corners, teacher_logits,
            bins=self.bins, temperature=self.ddf_temperature, distributed=self.distributed,
        )
        for i in range(corners.shape[0]):
            out["loss_fgl" + suffixes[i]], out["loss_ddf" + suffixes[i]] = fgl[i], ddf[i]



__all__ = ["CLASS_LOSSES", "RTDETRAssignment", "RTDETRLoss"]
