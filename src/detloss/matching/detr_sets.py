"""The matching sets of the real-time DETR family, matched in one solve: decoder layers, RF-DETR's
query groups and the encoder output (:func:`match_detr_sets`), DEIM's dense one-to-one union
(:func:`union_matching`), and the matched targets of every query (:func:`gather_matched_targets`).
See :class:`detloss.RTDETRLoss`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validate import require_floating, require_integer, require_shape
from .hungarian import Solver, match_hungarian_unchecked, matching_cost_unchecked

__all__ = ["check_detr_set_shapes", "fit_queries", "gather_matched_targets", "match_detr_sets", "union_matching"]


def match_detr_sets(
    box_pred: Tensor, cls_logits: Tensor, enc_box_pred: Optional[Tensor], enc_cls_logits: Optional[Tensor],
    gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, *, num_groups: int, cost_options: dict,
    solver: Optional[Solver] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Match the decoder layers ``(L, B, Q, .)``, each of their ``num_groups`` query groups, and
    the encoder output ``(B, Qe, .)`` (optional) to the padded ground truth in **one** solve.

    ``cost_options``: the keywords of :func:`detloss.matching.hungarian.matching_cost_unchecked`.
    Returns ``(query_to_gt (L, B, Q), enc_query_to_gt (B, Qe) or None)``, -1 for unmatched
    queries. Inputs are not checked (the loss checked them).
    """
    num_layers, batch, queries, _ = box_pred.shape
    g, m = num_groups, gt_boxes.shape[1]
    sets = [(box_pred.flatten(0, 1), cls_logits.flatten(0, 1), num_layers)]
    if enc_box_pred is not None:
        sets.append((enc_box_pred, enc_cls_logits, 1))
    costs, valids, rows = [], [], []
    for boxes, logits, reps in sets:  # 1. each set's cost, (reps * B * G, Q / G, M)
        rep = lambda t: t.unsqueeze(0).expand(reps, *t.shape).flatten(0, 1)  # noqa: E731
        cost = matching_cost_unchecked(logits, boxes, rep(gt_boxes), rep(gt_labels), rep(gt_valid),
                                       **cost_options)
        costs.append(cost.view(cost.shape[0] * g, cost.shape[1] // g, m))
        valids.append(rep(gt_valid).repeat_interleave(g, dim=0))
        rows.append(cost.shape[1] // g)
    width = max(rows)
    query_valid = None
    if len(set(rows)) > 1:  # sets with fewer queries: padding rows the solver never sees
        query_valid = torch.cat([
            (torch.arange(width, device=c.device) < r).expand(c.shape[0], width) for c, r in zip(costs, rows)
        ])
        costs = [torch.nn.functional.pad(c, (0, 0, 0, width - r)) for c, r in zip(costs, rows)]
    cost = costs[0] if len(costs) == 1 else torch.cat(costs)
    valid = valids[0] if len(valids) == 1 else torch.cat(valids)
    # 2. the one solve (one device -> host and one host -> device copy)
    match = match_hungarian_unchecked(cost, valid, solver=solver, query_valid=query_valid)
    q2g = match.query_to_gt
    n_dec = num_layers * batch * g
    query_to_gt = q2g[:n_dec, : rows[0]].reshape(num_layers, batch, queries)
    enc_query_to_gt = None
    if enc_box_pred is not None:
        enc_query_to_gt = q2g[n_dec:, : rows[1]].reshape(batch, enc_box_pred.shape[1])
    return query_to_gt, enc_query_to_gt


def gather_matched_targets(q2g: Tensor, gt_boxes: Tensor, gt_labels: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
    """Matched box ``(S, B, Q, 4)`` (the prediction itself, detached, where unmatched: finite
    terms before masking) and class ``(S, B, Q)`` (-1 where unmatched) of every query."""
    s = q2g.shape[0]
    matched = q2g >= 0
    if gt_boxes.shape[1] == 0:
        return pred.detach(), torch.full_like(q2g, -1)
    index = q2g.clamp(min=0)
    boxes = gt_boxes.unsqueeze(0).expand(s, -1, -1, -1).gather(2, index.unsqueeze(-1).expand(-1, -1, -1, 4))
    labels = gt_labels.unsqueeze(0).expand(s, -1, -1).gather(2, index)
    return torch.where(matched.unsqueeze(-1), boxes, pred.detach()), torch.where(matched, labels, -1)


def fit_queries(q2g: Tensor, queries: int) -> Tensor:
    """``(B, Q)`` -> ``(B, queries)``: cut, or padded with -1."""
    q = q2g.shape[-1]
    if queries <= q:
        return q2g[..., :queries]
    return torch.nn.functional.pad(q2g, (0, queries - q), value=-1)


def union_matching(query_to_gt: Tensor, enc_query_to_gt: Optional[Tensor], m: int) -> Tensor:
    """DEIM's dense one-to-one: ``(B, Q)`` the object each query was matched to most often over
    the layers (and the encoder output, query by query), ties to the lower object index; -1: never."""
    stack = query_to_gt
    if enc_query_to_gt is not None:
        stack = torch.cat((stack, fit_queries(enc_query_to_gt, query_to_gt.shape[-1]).unsqueeze(0)))
    if m == 0:
        return torch.full(query_to_gt.shape[1:], -1, dtype=torch.int64, device=query_to_gt.device)
    index = torch.where(stack >= 0, stack, m).permute(1, 2, 0)  # (B, Q, sets), m: unmatched
    counts = torch.zeros((*index.shape[:2], m + 1), dtype=torch.int32, device=index.device)
    counts = counts.scatter_add_(2, index, torch.ones_like(index, dtype=torch.int32))[..., :m]  # (B, Q, M)
    first = counts.argmax(-1)  # the first maximal index: ties to the lower object
    return torch.where(counts.amax(-1) > 0, first, -1)


def check_detr_set_shapes(a: dict, num_logits: int, num_groups: int, max_num_bins: int) -> dict:
    """Metadata checks of :class:`detloss.RTDETRLoss`'s arguments ``a`` (by name): the layers'
    predictions, the optional encoder, denoising and D-FINE corner sets, against each other;
    ``K = num_logits`` columns, query counts divisible by ``num_groups``. Returns the sizes."""
    k = num_logits
    for name in ("box_pred", "cls_logits"):
        require_floating(a[name], name)
    dims = require_shape(a["box_pred"], "box_pred", ("L", "B", "Q", 4))
    require_shape(a["cls_logits"], "cls_logits", ("L", "B", "Q", k), dims)
    if dims["Q"] % num_groups:
        raise ValueError(f"box_pred: expected a query count Q divisible by num_groups={num_groups}, got Q={dims['Q']}")
    pairs = (("enc_box_pred", "enc_cls_logits"), ("dn_box_pred", "dn_cls_logits"))
    for boxes, logits in pairs:
        if (a[boxes] is None) != (a[logits] is None):
            raise ValueError(f"{boxes}, {logits}: expected both or neither, got only one")
    if a["enc_box_pred"] is not None:
        require_floating(a["enc_box_pred"], "enc_box_pred")
        require_shape(a["enc_box_pred"], "enc_box_pred", ("B", "Qe", 4), dims)
        require_shape(a["enc_cls_logits"], "enc_cls_logits", ("B", "Qe", k), dims)
        if dims["Qe"] % num_groups:
            raise ValueError(f"enc_box_pred: expected a query count divisible by num_groups={num_groups}, got {dims['Qe']}")
    if a["dn_box_pred"] is not None:
        require_floating(a["dn_box_pred"], "dn_box_pred")
        require_shape(a["dn_box_pred"], "dn_box_pred", ("Ld", "B", "D", 4), dims)
        require_shape(a["dn_cls_logits"], "dn_cls_logits", ("Ld", "B", "D", k), dims)
        if a["dn_query_to_gt"] is None:
            raise ValueError("dn_query_to_gt: expected a (B, D) tensor with dn_box_pred, got None")
        require_integer(a["dn_query_to_gt"], "dn_query_to_gt")
        require_shape(a["dn_query_to_gt"], "dn_query_to_gt", ("B", "D"), dims)
        g = a["dn_groups"]
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"dn_groups: expected a positive integer, got {g!r}")
    c = 4 * (max_num_bins + 1)
    for prefix, layers, q in (("", "L", "Q"), ("dn_", "Ld", "D")):
        corners = a[prefix + "pred_corners"]
        if corners is None:
            continue
        if prefix and a["dn_box_pred"] is None:
            raise ValueError("dn_pred_corners: expected dn_box_pred and dn_cls_logits with it")
        require_floating(corners, prefix + "pred_corners")
        cdims = require_shape(corners, prefix + "pred_corners", ("Lc", "B", q, c), dict(dims))
        if cdims["Lc"] > dims[layers]:
            raise ValueError(f"{prefix}pred_corners: expected at most {layers}={dims[layers]} layers, got {cdims['Lc']}")
        if a[prefix + "ref_points"] is None:
            raise ValueError(f"{prefix}ref_points: expected ({cdims['Lc']}, B, {q}, 4) with {prefix}pred_corners, got None")
        require_shape(a[prefix + "ref_points"], prefix + "ref_points", ("Lc", "B", q, 4), cdims)
        if a[prefix + "teacher_corners"] is not None:
            require_shape(a[prefix + "teacher_corners"], prefix + "teacher_corners", ("B", q, c), cdims)
        if a[prefix + "teacher_logits"] is not None:
            require_shape(a[prefix + "teacher_logits"], prefix + "teacher_logits", ("B", q, k), cdims)
    return dims
