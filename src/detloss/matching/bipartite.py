"""Threshold matching of priors to ground truth with bipartite forcing (SSD, RetinaFace).

The matcher of ssd.pytorch and Pytorch_Retinaface, batched over images:

1. IoU of every (valid) GT with every prior.
2. Each prior takes the GT of highest IoU (the **first** maximal GT on ties).
3. Bipartite forcing: every valid GT keeps its best prior (the **first** maximal prior on
   ties), whatever the IoU; that prior's IoU is reported as 2.0, as the originals write it.
   When several GTs share a best prior the **later** GT wins it; the earlier GT keeps only its
   ordinary (threshold) matches, possibly none.
4. A prior is positive at IoU >= ``pos_iou``; with ``neg_iou`` the band
   ``neg_iou <= IoU < pos_iou`` is ignored (neither positive nor negative).

Everything is fixed-shape tensor work: no loop over images or boxes, no host
synchronisation. "Later GT wins" is a ``scatter_reduce(amax)`` of the GT index, which is
deterministic on every device (a plain scatter with duplicate indices is not on CUDA). The
pairwise IoU is reduced chunk by chunk over priors, so its memory stays bounded for hundreds
of thousands of priors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from .._chunking import PRIOR_IOU, chunk_elements
from .._validate import ValueChecks, require_boxes, require_choice, require_padded_gt, require_shape
from ..boxes import ChunkedPairwiseIoU, cxcywh_to_xyxy, pair_dtype

FORCED_IOU = 2.0


@dataclass
class PriorMatch:
    """What :func:`match_priors` decided, for a batch of ``B`` images, ``P`` priors, ``M`` GT slots.

    Attributes:
        matched_gt: ``(B, P)`` int64, the GT slot each prior is assigned to; -1 in images
            without any usable GT. Only meaningful where ``positive`` (elsewhere it is the GT of
            highest IoU, which a loss may use to build an unused target).
        matched_iou: ``(B, P)`` float (float32 for half inputs), the prior's IoU with its GT;
            2.0 (:data:`FORCED_IOU`) for forced priors; 0 in images without usable GT.
        positive: ``(B, P)`` bool, ``matched_iou >= pos_iou``.
        ignore: ``(B, P)`` bool, ``neg_iou <= matched_iou < pos_iou`` (all False without
            ``neg_iou``).
        forced: ``(B, P)`` bool, the prior is the best prior of a forcing GT.
        best_prior: ``(B, M)`` int64, each GT's best prior (first maximal index); 0 for unusable
            slots.
        best_prior_iou: ``(B, M)`` float, that IoU; -1 for unusable slots (padding, and
            zero-area GTs with ``drop_degenerate_gt``).
    """

    matched_gt: Tensor
    matched_iou: Tensor
    positive: Tensor
    ignore: Tensor
    forced: Tensor
    best_prior: Tensor
    best_prior_iou: Tensor


def _first_best_slot_(iou: Tensor, best: Tensor, slot: Tensor, offset: int) -> Tensor:
    """The smallest ``slot`` value among the rows of ``iou (..., M, N)`` equal to ``best (..., N)``,
    as float; ``slot`` is ``(..., M, 1)`` increasing along M, every value below ``offset``;
    ``iou`` is overwritten.

    Key = slot where the IoU equals the best and slot + offset elsewhere, built in place and
    minimised (value-and-index ``max`` over this short middle axis is 2-3x slower); ``iou - best
    <= 0`` is exactly ``-(best - iou)``, so the sign is -1 or 0.
    """
    return iou.sub_(best.unsqueeze(-2)).sign_().mul_(-offset).add_(slot).amin(dim=-2)


def _iou_maxima(
    iou_of: ChunkedPairwiseIoU,
    usable: Tensor,
    chunk_size: Optional[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-prior and per-GT IoU maxima of ``iou_of`` (GT rows against the shared priors),
    reduced chunk-wise over priors.

    Returns ``(prior_iou (B, P), prior_gt (B, P), gt_iou (B, M), gt_prior (B, M))``; unusable
    GTs take part below every usable one, so they never win unless nothing is usable (their
    ``gt_iou`` is -1 and ``gt_prior`` 0). Ties keep the first index (torch's ``max`` rule
    within a chunk; a later chunk must be strictly larger).
    """
    b, m = usable.shape
    p = iou_of.columns[0].shape[-1]
    like = iou_of.row_area  # the GTs' compute dtype and device
    if chunk_size is None:
        budget = chunk_elements(like.device, PRIOR_IOU)
        chunk_size = max(256, budget // max(b * m, 1))
    slot_key = torch.arange(m, device=like.device, dtype=like.dtype).expand(b, m).unsqueeze(2)
    prior_iou = like.new_empty(b, p)
    prior_gt = like.new_empty(b, p)  # small integers, exact in float; converted once at the end
    gt_iou = gt_prior = None
    for start in range(0, p, chunk_size):
        stop = min(start + chunk_size, p)
        iou = iou_of(start, stop)
        c_iou, c_prior = iou.max(dim=2)
        best = iou.amax(dim=1)
        prior_iou[:, start:stop] = best
        prior_gt[:, start:stop] = _first_best_slot_(iou, best, slot_key, m)
        if gt_iou is None:
            gt_iou, gt_prior = c_iou, c_prior
        else:
            better = c_iou > gt_iou
            gt_iou = torch.where(better, c_iou, gt_iou)
            gt_prior = torch.where(better, c_prior + start, gt_prior)
    prior_gt = prior_gt.to(torch.int64)
    return prior_iou, prior_gt, torch.where(usable, gt_iou, -1.0), torch.where(usable, gt_prior, 0)


def match_priors(
    priors: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    *,
    pos_iou: float,
    neg_iou: Optional[float] = None,
    min_best_iou: Optional[float] = None,
    priors_format: Literal["cxcywh", "xyxy"] = "cxcywh",
    drop_degenerate_gt: bool = True,
    ignored_gt_claims_prior: bool = False,
    chunk_size: Optional[int] = None,
) -> PriorMatch:
    """Match ``P`` priors to padded ground truth, batched, with bipartite forcing.

    Args:
        priors: ``(P, 4)`` float prior boxes, ``cxcywh`` (default) or ``xyxy`` per
            ``priors_format``, in the units of ``gt_boxes``. The IoU is computed on
            ``cxcywh_to_xyxy(priors)`` in float32 (float64 stays float64) with the originals'
            operation order, so float32 rounding ties resolve as in ssd.pytorch.
        gt_boxes: ``(B, M, 4)`` float xyxy GT boxes (padded).
        gt_valid: ``(B, M)`` bool (or 0/1 integer); False marks padding, which never matches.
        pos_iou: IoU at or above which a prior is positive.
        neg_iou: optional lower edge of an ignore band ``[neg_iou, pos_iou)``.
        min_best_iou: optional floor (RetinaFace: 0.2): a GT whose best IoU is below it is
            *ignored*: it is not forced onto its best prior. It still takes part in the
            per-prior choice of step 2, where it can only win priors whose IoUs are all below
            the floor (positives only if ``pos_iou`` is below the floor too).
        priors_format: ``"cxcywh"`` or ``"xyxy"``.
        drop_degenerate_gt: treat zero-area GTs (width or height <= 0) as invalid (the
            default). The originals match them: such a GT has IoU 0 with every prior, is
            forced onto prior 0 and yields an infinite regression target.
        ignored_gt_claims_prior: Pytorch_Retinaface quirk, off by default. When True, GTs below
            ``min_best_iou`` still run through the forcing loop: they take their best prior's
            GT index (later GT wins) but do not set its IoU to 2.0, so if that prior's IoU with
            any GT is >= ``pos_iou`` it becomes a positive that regresses to the ignored face.
            Images whose GTs are all ignored still get no positives (the original returns
            early there).
        chunk_size: priors per IoU chunk; by default about 128k IoU values per chunk on the
            CPU (cache-sized) and 16M elsewhere, so memory stays bounded for any ``P``.

    Returns:
        A :class:`PriorMatch`. Images without usable GT (none valid, or all below the floor)
        have ``matched_gt = -1``, ``matched_iou = 0`` and no positives.

    >>> priors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    >>> match = match_priors(priors, torch.tensor([[[0.0, 0.0, 0.5, 0.5]]]), torch.tensor([[True]]), pos_iou=0.5)
    >>> match.positive
    tensor([[ True, False, False]])
    """
    require_boxes(priors, "priors")
    checks = ValueChecks().finite(priors, "priors")
    dims, gt_valid = require_padded_gt(gt_boxes, gt_valid, checks=checks)
    require_shape(priors, "priors", ("P", 4), dims)
    checks.run()
    return match_priors_unchecked(
        priors, gt_boxes, gt_valid, pos_iou=pos_iou, neg_iou=neg_iou, min_best_iou=min_best_iou,
        priors_format=priors_format, drop_degenerate_gt=drop_degenerate_gt,
        ignored_gt_claims_prior=ignored_gt_claims_prior, chunk_size=chunk_size,
    )


def match_priors_unchecked(
    priors: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    *,
    pos_iou: float,
    neg_iou: Optional[float] = None,
    min_best_iou: Optional[float] = None,
    priors_format: Literal["cxcywh", "xyxy"] = "cxcywh",
    drop_degenerate_gt: bool = True,
    ignored_gt_claims_prior: bool = False,
    chunk_size: Optional[int] = None,
) -> PriorMatch:
    """:func:`match_priors` on inputs already checked (shapes, ``gt_valid`` a bool mask, values
    finite): the body the detectors call after their own fused checks."""
    require_choice(priors_format, "priors_format", ("cxcywh", "xyxy"))
    if neg_iou is not None and neg_iou > pos_iou:
        raise ValueError(f"neg_iou: expected a value <= pos_iou={pos_iou}, got {neg_iou}")

    dtype = pair_dtype(gt_boxes, priors)
    gt_boxes = gt_boxes.to(dtype)
    priors_xyxy = priors.to(dtype)
    if priors_format == "cxcywh":
        priors_xyxy = cxcywh_to_xyxy(priors_xyxy)
    b, m = gt_valid.shape
    num_slots = m
    if m == 0:  # no GT slots at all: pad one invalid slot so the reductions are defined
        gt_boxes = gt_boxes.new_zeros(b, 1, 4)
        gt_valid = gt_valid.new_zeros(b, 1)
        m = 1

    usable = gt_valid
    if drop_degenerate_gt:
        size = gt_boxes[..., 2:] - gt_boxes[..., :2]
        usable = usable & (size > 0).all(dim=-1)
    iou_of = ChunkedPairwiseIoU(gt_boxes, priors_xyxy.unsqueeze(0), rows_valid=usable)  # priors shared by all images
    prior_iou, prior_gt, best_prior_iou, best_prior = _iou_maxima(iou_of, usable, chunk_size)

    forcing = usable if min_best_iou is None else usable & (best_prior_iou >= min_best_iou)
    claiming = usable if ignored_gt_claims_prior else forcing
    # Forcing touches only the B x M best priors, in place: a claimant's slot enters as
    # slot + M, above every ordinary slot (< M), so the largest (the later GT) wins and
    # ``remainder`` restores it; a forced prior's IoU becomes 2.0, above every real IoU (<= 1).
    gt_index = torch.arange(m, device=gt_boxes.device).expand(b, m)
    matched_gt = prior_gt.scatter_reduce_(1, best_prior, torch.where(claiming, gt_index + m, -1), reduce="amax")
    matched_gt.scatter_(1, best_prior, matched_gt.gather(1, best_prior).remainder_(m))  # only these exceed m
    forced_iou = torch.where(forcing, FORCED_IOU, float("-inf")).to(prior_iou.dtype)
    matched_iou = prior_iou.scatter_reduce_(1, best_prior, forced_iou, reduce="amax")
    forced = matched_iou == FORCED_IOU

    has_gt = forcing.any(dim=1, keepdim=True)
    matched_gt = torch.where(has_gt, matched_gt, -1)
    matched_iou = torch.where(has_gt, matched_iou, 0.0)
    positive = (matched_iou >= pos_iou) & has_gt
    if neg_iou is None:
        ignore = torch.zeros_like(positive)
    else:
        ignore = (matched_iou >= neg_iou) & ~positive
    return PriorMatch(
        matched_gt=matched_gt,
        matched_iou=matched_iou,
        positive=positive,
        ignore=ignore,
        forced=forced,
        best_prior=best_prior[:, :num_slots],
        best_prior_iou=best_prior_iou[:, :num_slots],
    )
