"""Drop-in for facebookresearch/detr's ``HungarianMatcher`` (``models/matcher.py``) and
``SetCriterion`` (``models/detr.py``).

Same constructors, calls and returned values (see ``golden/detr/README.md``), built on
:mod:`detloss.matching.hungarian` and :func:`detloss.detectors.detr.detr_set_loss`:

* :class:`HungarianMatcher` builds one padded ``(B, Q, M)`` cost instead of the original's
  ``(B * Q) x (all objects)`` matrix sliced per image, and solves every image with one host
  round trip. It returns the original's list of ``(query_idx, gt_idx)`` int64 pairs per image
  (queries ascending).
* :class:`SetCriterion` matches **every decoder layer in one solve** when its matcher is this
  module's :class:`HungarianMatcher`; any other matcher object is called once per layer (final
  layer first, then the auxiliary ones), as the original does.
* ``num_boxes`` follows the original: all-reduced when ``torch.distributed`` is initialised,
  divided by the world size, clamped at 1; it stays a tensor (no ``.item()``).
* ``"masks"`` (the segmentation losses) is not provided: ``NotImplementedError``.
* Degenerate predicted boxes give finite values where the original asserts.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._validate import ValueChecks, joined_value_checks, require_floating, require_shape, require_tensor
from ..detectors.detr import check_detr_gt, detr_set_loss
from ..functional import positive_normalizer
from ..matching.hungarian import HungarianMatch, match_hungarian_unchecked, matching_cost_unchecked
from ..targets import pad_ground_truth

__all__ = ["HungarianMatcher", "SetCriterion", "pad_targets"]

LOSSES = ("labels", "boxes", "cardinality")


def pad_targets(
    targets: Sequence[Mapping], like: Tensor, checks: Optional[ValueChecks] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``targets`` (one ``{"labels" (n,), "boxes" (n, 4)}`` per image) -> padded
    ``(boxes (B, M, 4), labels (B, M), valid (B, M))`` on ``like``'s device; ``checks`` as in
    :func:`detloss.pad_ground_truth`."""
    boxes, labels = [], []
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping) or "labels" not in t or "boxes" not in t:
            raise ValueError(f'targets[{i}]: expected a dict with "labels" and "boxes"')
        boxes.append(require_tensor(t["boxes"], f'targets[{i}]["boxes"]').to(like.device))
        labels.append(require_tensor(t["labels"], f'targets[{i}]["labels"]').to(like.device))
    if len(boxes) != like.shape[0]:
        raise ValueError(f"targets: expected one dict per image ({like.shape[0]}), got {len(boxes)}")
    if not boxes:
        empty = like.new_zeros(0, 0, 4)
        return empty, torch.zeros(0, 0, dtype=torch.int64, device=like.device), torch.zeros(0, 0, dtype=torch.bool)
    return pad_ground_truth(boxes, labels, checks=checks)


def _pairs(query_to_gt: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(B, Q)`` matched GT per query -> the original's ``[(query_idx, gt_idx)]`` per image."""
    host = query_to_gt.cpu().numpy()
    out = []
    for row in host:
        queries = np.flatnonzero(row >= 0)
        out.append((torch.as_tensor(queries, dtype=torch.int64), torch.as_tensor(row[queries], dtype=torch.int64)))
    return out


class HungarianMatcher(nn.Module):
    """detr's ``HungarianMatcher(cost_class=1, cost_bbox=1, cost_giou=1)``.

    ``forward(outputs, targets)`` with ``outputs = {"pred_logits" (B, Q, C + 1), "pred_boxes"
    (B, Q, 4) cxcywh}`` and ``targets`` a list of ``{"labels" (n,), "boxes" (n, 4) cxcywh}``
    returns ``[(query_idx, gt_idx)]`` per image, int64 CPU tensors, queries ascending.

    >>> matcher = HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2)
    >>> boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]]])
    >>> outputs = {"pred_logits": torch.zeros(1, 3, 3), "pred_boxes": boxes}
    >>> matcher(outputs, [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2]])}])
    [(tensor([1]), tensor([0]))]
    """

    def __init__(self, cost_class: float = 1, cost_bbox: float = 1, cost_giou: float = 1) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("cost_class, cost_bbox, cost_giou: expected at least one non-zero cost, got all 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    def match_layers(self, pred_logits: Tensor, pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                     gt_valid: Tensor, *, checked: bool = False) -> HungarianMatch:
        """Match ``N`` problems at once: ``pred_logits (N, Q, C + 1)``, ``pred_boxes (N, Q, 4)``
        against padded ``gt_boxes (N, M, 4)``, ``gt_labels (N, M)``, ``gt_valid (N, M)``
        (``checked``: the ground truth's values were already checked by the caller)."""
        require_floating(pred_logits, "pred_logits")
        dims = require_shape(pred_logits, "pred_logits", ("B", "Q", "K"))
        require_floating(pred_boxes, "pred_boxes")
        require_shape(pred_boxes, "pred_boxes", ("B", "Q", 4), dims)
        if checked:
            gt_valid = gt_valid.bool()
        else:  # the ground-truth checks (and messages) of DETRLoss, pixel boxes included
            _, gt_valid = check_detr_gt(gt_boxes, gt_labels, gt_valid, max(dims["K"] - 1, 1), dims)
        cost = matching_cost_unchecked(
            pred_logits, pred_boxes, gt_boxes, gt_labels, gt_valid,
            cls_weight=self.cost_class, l1_weight=self.cost_bbox, giou_weight=self.cost_giou,
        )
        return match_hungarian_unchecked(cost, gt_valid)

    @torch.no_grad()
    def forward(self, outputs: Mapping, targets: Sequence[Mapping]) -> list[tuple[Tensor, Tensor]]:
        logits = require_tensor(outputs["pred_logits"], 'outputs["pred_logits"]')
        with joined_value_checks() as checks:  # read with the ground-truth checks: one host read
            gt_boxes, gt_labels, gt_valid = pad_targets(targets, logits, checks)
            match = self.match_layers(logits, outputs["pred_boxes"], gt_boxes, gt_labels, gt_valid)
        return _pairs(match.query_to_gt)


class SetCriterion(nn.Module):
    """detr's ``SetCriterion(num_classes, matcher, weight_dict, eos_coef, losses)``.

    ``forward(outputs, targets)``: ``outputs`` holds ``"pred_logits" (B, Q, C + 1)``,
    ``"pred_boxes" (B, Q, 4)`` cxcywh and optionally ``"aux_outputs"`` (a list of such dicts);
    ``targets`` one ``{"labels", "boxes"}`` dict per image. Returns the original's dict:
    ``loss_ce`` and ``class_error`` (final layer only) for ``"labels"``, ``loss_bbox`` and
    ``loss_giou`` for ``"boxes"``, ``cardinality_error`` for ``"cardinality"``, and the same
    with suffix ``_{i}`` for auxiliary layer ``i`` (no ``class_error``). ``class_error`` and
    ``cardinality_error`` carry no gradient.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, weight_dict: dict, eos_coef: float,
                 losses: Sequence[str]) -> None:
        super().__init__()
        if "masks" in losses:
            raise NotImplementedError('losses: "masks" (the segmentation losses) is not provided by detloss')
        unknown = [x for x in losses if x not in LOSSES]
        if unknown:
            raise ValueError(f"losses: expected a subset of {LOSSES}, got {list(losses)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)

    def forward(self, outputs: Mapping, targets: Sequence[Mapping]) -> dict:
        layers = list(outputs.get("aux_outputs", [])) + [outputs]
        logits = torch.stack([require_tensor(o["pred_logits"], 'outputs["pred_logits"]') for o in layers])
        boxes = torch.stack([require_tensor(o["pred_boxes"], 'outputs["pred_boxes"]') for o in layers])
        num_layers, batch, queries, _ = logits.shape
        with joined_value_checks() as checks:  # read with the ground-truth checks: one host read
            gt_boxes, gt_labels, gt_valid = pad_targets(targets, logits[0], checks)
            _, gt_valid = check_detr_gt(gt_boxes, gt_labels, gt_valid, self.num_classes)
        # 1. the matching of every layer: one solve with detloss's matcher, else the user's
        #    matcher once per layer (final first), as the original calls it
        query_to_gt = self._match(layers, logits, boxes, gt_boxes, gt_labels, gt_valid, targets)
        # 2. num_boxes as the original: all-reduced, / world size, clamped at 1 (a tensor)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        num_boxes = positive_normalizer(gt_valid.sum(), distributed=True, min_value=float(world))
        # 3. the terms of every layer (the cross-entropy is each layer's weighted mean)
        loss_ce, loss_bbox, loss_giou, target_class = detr_set_loss(
            boxes, logits, gt_boxes, gt_labels, query_to_gt, num_boxes, eos_coef=self.eos_coef,
        )
        terms = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        with torch.no_grad():
            cardinality = self._cardinality_error(logits, gt_valid)
            class_error = self._class_error(logits[-1], target_class[-1], query_to_gt[-1] >= 0)
        out: dict = {}
        for layer in [num_layers - 1] + list(range(num_layers - 1)):
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            for loss in self.losses:
                if loss == "labels":
                    out["loss_ce" + suffix] = terms["loss_ce"][layer]
                    if not suffix:
                        out["class_error"] = class_error
                elif loss == "boxes":
                    out["loss_bbox" + suffix] = terms["loss_bbox"][layer]
                    out["loss_giou" + suffix] = terms["loss_giou"][layer]
                else:
                    out["cardinality_error" + suffix] = cardinality[layer]
        return out

    def _match(self, layers, logits, boxes, gt_boxes, gt_labels, gt_valid, targets) -> Tensor:
        num_layers, batch, queries, _ = logits.shape
        if isinstance(self.matcher, HungarianMatcher):
            stack = lambda t: t.unsqueeze(0).expand(num_layers, *t.shape).flatten(0, 1)  # noqa: E731
            match = self.matcher.match_layers(
                logits.detach().flatten(0, 1), boxes.detach().flatten(0, 1),
                stack(gt_boxes), stack(gt_labels), stack(gt_valid), checked=True,
            )
            return match.query_to_gt.view(num_layers, batch, queries)
        query_to_gt = torch.full((num_layers, batch, queries), -1, dtype=torch.int64)
        for layer in [num_layers - 1] + list(range(num_layers - 1)):
            layer_outputs = {k: v for k, v in layers[layer].items() if k != "aux_outputs"}
            for image, (query, gt) in enumerate(self.matcher(layer_outputs, targets)):
                query_to_gt[layer, image, torch.as_tensor(query, dtype=torch.int64)] = torch.as_tensor(gt, dtype=torch.int64)
        return query_to_gt.to(logits.device)

    def _class_error(self, logits: Tensor, target_class: Tensor, matched: Tensor) -> Tensor:
        """100 - top-1 accuracy (%) of the matched queries of the final layer (100 if none)."""
        correct = (logits.argmax(-1) == target_class) & matched
        count = matched.sum()
        accuracy = torch.where(count > 0, correct.sum() * 100.0 / count.clamp(min=1), 0.0)
        return 100 - accuracy

    def _cardinality_error(self, logits: Tensor, gt_valid: Tensor) -> Tensor:
        """``(L,)``: mean over images of |queries not predicting "no object" - objects|."""
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(-1)  # (L, B)
        return (predicted - gt_valid.sum(-1)).abs().float().mean(-1)
