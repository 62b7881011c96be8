"""Drop-in for tf-faster-rcnn's (endernewton/tf-faster-rcnn) anchors, target layers and losses.

Same names, arguments and return values as the original:

* ``generate_anchors``, ``generate_anchors_pre`` (``lib/layer_utils/{generate_anchors,snippets}.py``),
* ``anchor_target_layer``, ``proposal_target_layer`` (``lib/layer_utils/*.py``; they read the
  module-level :data:`cfg` like the originals read ``model.config.cfg``),
* ``smooth_l1_loss``, ``reshape_layer`` and ``add_losses`` (``Network._smooth_l1_loss``,
  ``Network._reshape_layer``, ``Network._add_losses``).

Layouts are the original's (batch of one image, NHWC score maps, ``gt_boxes (G, 5)`` with the
class 1..C-1 last, ROIs ``(N, 5)`` with the batch index first). The layers accept NumPy
arrays or torch tensors, and return NumPy float32 arrays when given only NumPy (as
``tf.py_func`` feeds them) and torch tensors otherwise. Everything is computed by
:mod:`detloss.detectors.faster_rcnn` with the original's options: inclusive-pixel IoU and
deltas (``pixel_offset=1``), IoU in float64 (as the Cython ``bbox_overlaps``), and the
quirk that a GT overlapping no anchor makes every non-overlapping inside anchor positive
(``low_quality_zero_iou=True``).

Sampling: the original draws with NumPy's global RNG; here the draws come from the optional
``generator`` (a ``torch.Generator``), with the same rules and counts.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .._validate import ValueChecks
from ..functional import cross_entropy, inside_outside_smooth_l1, objectness_loss
from ..matching.rcnn_targets import proposal_targets, rpn_targets
from ..priors import rcnn_anchors, rcnn_base_anchors

__all__ = [
    "add_losses",
    "anchor_target_layer",
    "cfg",
    "generate_anchors",
    "generate_anchors_pre",
    "proposal_target_layer",
    "reshape_layer",
    "smooth_l1_loss",
]


def _default_train_cfg() -> SimpleNamespace:
    """The ``__C.TRAIN`` defaults of tf-faster-rcnn's ``lib/model/config.py`` that the layers read."""
    return SimpleNamespace(
        RPN_POSITIVE_OVERLAP=0.7,
        RPN_NEGATIVE_OVERLAP=0.3,
        RPN_CLOBBER_POSITIVES=False,
        RPN_FG_FRACTION=0.5,
        RPN_BATCHSIZE=256,
        RPN_POSITIVE_WEIGHT=-1.0,
        RPN_BBOX_INSIDE_WEIGHTS=(1.0, 1.0, 1.0, 1.0),
        BATCH_SIZE=128,
        FG_FRACTION=0.25,
        FG_THRESH=0.5,
        BG_THRESH_HI=0.5,
        BG_THRESH_LO=0.1,
        USE_GT=False,
        BBOX_NORMALIZE_TARGETS_PRECOMPUTED=True,
        BBOX_NORMALIZE_MEANS=(0.0, 0.0, 0.0, 0.0),
        BBOX_NORMALIZE_STDS=(0.1, 0.1, 0.2, 0.2),
        BBOX_INSIDE_WEIGHTS=(1.0, 1.0, 1.0, 1.0),
    )


#: ``cfg.TRAIN.*`` as in the original (``from model.config import cfg``); edit it to configure.
cfg = SimpleNamespace(TRAIN=_default_train_cfg())


def _tensor(x: Any, name: str, dtype: torch.dtype = torch.float64) -> Tensor:
    if x is None:
        raise ValueError(f"{name}: expected an array or tensor, got None")
    if isinstance(x, Tensor):
        return x.to(dtype)
    try:
        return torch.as_tensor(np.asarray(x), dtype=dtype)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected an array or tensor, got {type(x).__name__}") from err


def _output(values: Sequence[Tensor], numpy_out: bool) -> tuple:
    if numpy_out:
        return tuple(v.detach().cpu().numpy().astype(np.float32) for v in values)
    return tuple(v.to(torch.float32) for v in values)


def _gt_rows(gt_boxes: Any) -> Tensor:
    gt = _tensor(gt_boxes, "gt_boxes")
    if gt.dim() != 2 or gt.shape[1] < 4:
        raise ValueError(f"gt_boxes: expected shape (G, 5) [x1, y1, x2, y2, class], got {tuple(gt.shape)}")
    return gt


def generate_anchors(
    base_size: int = 16,
    ratios: Sequence[float] = np.array([0.5, 1, 2]),
    scales: Sequence[float] = 2 ** np.arange(3, 6),
) -> np.ndarray:
    """Base anchors ``(len(ratios) * len(scales), 4)`` float64, as the original."""
    return rcnn_base_anchors(base_size, list(np.ravel(ratios)), list(np.ravel(scales))).numpy()


def generate_anchors_pre(
    height: int,
    width: int,
    feat_stride: int,
    anchor_scales: Sequence[float] = (8, 16, 32),
    anchor_ratios: Sequence[float] = (0.5, 1, 2),
) -> tuple[np.ndarray, np.int32]:
    """``(anchors (height * width * A, 4) float32, length int32)``, position-major."""
    anchors = rcnn_anchors(
        int(height), int(width), int(feat_stride),
        ratios=tuple(float(r) for r in anchor_ratios), scales=tuple(float(s) for s in anchor_scales),
    ).numpy()
    return anchors, np.int32(anchors.shape[0])


def _im_info(im_info: Any) -> Tensor:
    info = _tensor(im_info, "im_info").reshape(-1) if im_info is not None else None
    if info is None or info.numel() not in (2, 3):
        got = "None" if im_info is None else tuple(np.shape(im_info))
        raise ValueError(f"im_info: expected shape (3,) [height, width, scale], got {got}")
    return info


def anchor_target_layer(
    rpn_cls_score: Any,
    gt_boxes: Any,
    im_info: Any,
    _feat_stride: int,
    all_anchors: Any,
    num_anchors: int,
    *,
    generator: Optional[torch.Generator] = None,
) -> tuple:
    """``(rpn_labels (1, 1, A*H, W), rpn_bbox_targets (1, H, W, 4A), inside, outside weights)``.

    ``rpn_cls_score`` ``(1, H, W, 2A)`` NHWC (only its shape is read), ``gt_boxes (G, 5)``,
    ``im_info`` ``(3,)`` = (height, width, scale), ``all_anchors (H*W*A, 4)``.
    """
    numpy_out = not any(isinstance(x, Tensor) for x in (rpn_cls_score, gt_boxes, im_info, all_anchors))
    info = _im_info(im_info)
    score_shape = tuple(np.shape(rpn_cls_score))
    if len(score_shape) != 4 or score_shape[3] != 2 * num_anchors:
        raise ValueError(
            f"rpn_cls_score: expected NHWC shape (1, H, W, 2*num_anchors={2 * num_anchors}), got {score_shape}"
        )
    height, width = score_shape[1], score_shape[2]
    anchors = _tensor(all_anchors, "all_anchors")
    if anchors.dim() != 2 or anchors.shape != (height * width * num_anchors, 4):
        raise ValueError(
            f"all_anchors: expected shape (H*W*A={height * width * num_anchors}, 4) for the "
            f"{height}x{width} score map and {num_anchors} anchors, got {tuple(anchors.shape)}"
        )
    gt = _gt_rows(gt_boxes)
    train = cfg.TRAIN
    targets = rpn_targets(
        anchors, gt[None, :, :4], torch.ones((1, gt.shape[0]), dtype=torch.bool), info[:2],
        pos_iou=train.RPN_POSITIVE_OVERLAP, neg_iou=train.RPN_NEGATIVE_OVERLAP,
        clobber_positives=bool(train.RPN_CLOBBER_POSITIVES), low_quality_zero_iou=True,
        allowed_border=0.0, batch_size_per_image=int(train.RPN_BATCHSIZE),
        positive_fraction=train.RPN_FG_FRACTION,
        positive_weight=None if train.RPN_POSITIVE_WEIGHT < 0 else train.RPN_POSITIVE_WEIGHT,
        inside_weight=tuple(train.RPN_BBOX_INSIDE_WEIGHTS), pixel_offset=1.0, generator=generator,
    )
    a = num_anchors
    labels = targets.labels.reshape(1, height, width, a).permute(0, 3, 1, 2).reshape(1, 1, a * height, width)

    def nhwc(x: Tensor) -> Tensor:
        return x.reshape(1, height, width, a * 4)

    return _output(
        (labels, nhwc(targets.box_targets), nhwc(targets.inside_weights), nhwc(targets.outside_weights)),
        numpy_out,
    )


def proposal_target_layer(
    rpn_rois: Any,
    rpn_scores: Any,
    gt_boxes: Any,
    _num_classes: int,
    *,
    generator: Optional[torch.Generator] = None,
) -> tuple:
    """``(rois (S, 5), roi_scores (S,), labels (S, 1), bbox_targets (S, 4C), inside, outside)``.

    ``rpn_rois (N, 5)`` ``[batch index, x1, y1, x2, y2]``, ``rpn_scores (N, 1)``, ``gt_boxes
    (G, 5)`` with class 1..C-1 last, ``S = cfg.TRAIN.BATCH_SIZE``.
    """
    numpy_out = not any(isinstance(x, Tensor) for x in (rpn_rois, rpn_scores, gt_boxes))
    rois_in = _tensor(rpn_rois, "rpn_rois")
    if rois_in.dim() != 2 or rois_in.shape[1] != 5:
        raise ValueError(f"rpn_rois: expected shape (N, 5) [batch index, x1, y1, x2, y2], got {tuple(rois_in.shape)}")
    scores = _tensor(rpn_scores, "rpn_scores").reshape(-1)
    if scores.shape[0] != rois_in.shape[0]:
        raise ValueError(f"rpn_scores: expected {rois_in.shape[0]} scores (one per ROI), got {scores.shape[0]}")
    gt = _gt_rows(gt_boxes)
    if gt.shape[1] != 5:
        raise ValueError(f"gt_boxes: expected shape (G, 5) [x1, y1, x2, y2, class], got {tuple(gt.shape)}")
    train = cfg.TRAIN
    normalize = bool(train.BBOX_NORMALIZE_TARGETS_PRECOMPUTED)
    labels_in = gt[:, 4].round().to(torch.int64)
    sampled = proposal_targets(
        rois_in[None, :, 1:], gt[None, :, :4], labels_in[None], torch.ones((1, gt.shape[0]), dtype=torch.bool),
        num_samples=int(train.BATCH_SIZE), fg_fraction=train.FG_FRACTION, pos_iou=train.FG_THRESH,
        neg_iou=train.BG_THRESH_HI, neg_iou_min=train.BG_THRESH_LO, append_gt=bool(train.USE_GT),
        means=tuple(train.BBOX_NORMALIZE_MEANS) if normalize else None,
        stds=tuple(train.BBOX_NORMALIZE_STDS) if normalize else None,
        pixel_offset=1.0, num_classes=int(_num_classes), generator=generator,
    )
    if bool((sampled.labels < 0).any()):
        raise ValueError(
            "rpn_rois: no ROI is foreground or background under cfg.TRAIN.FG_THRESH/BG_THRESH_*"
        )
    index = sampled.roi_index[0]
    batch_col = rois_in[:, :1]
    if train.USE_GT:
        batch_col = torch.cat((batch_col, batch_col.new_zeros(gt.shape[0], 1)))
        scores = torch.cat((scores, scores.new_zeros(gt.shape[0])))
    rois = torch.cat((batch_col[index], sampled.rois[0]), dim=1)
    targets, inside, outside = sampled.class_specific(int(_num_classes), tuple(train.BBOX_INSIDE_WEIGHTS))
    labels = sampled.labels[0].unsqueeze(1).to(torch.float64)
    return _output((rois, scores[index], labels, targets[0], inside[0], outside[0]), numpy_out)


def reshape_layer(bottom: Tensor, num_dim: int) -> Tensor:
    """``Network._reshape_layer``: NHWC ``(1, H, W, C)`` -> ``(1, C/num_dim * H, W, num_dim)``.

    Caffe order: output ``[0, a*H + y, x, c]`` is input ``[0, y, x, c*(C/num_dim) + a]``, so for
    the RPN scores channels 0..A-1 are the background logits of all anchors.
    """
    bottom = torch.as_tensor(bottom)
    if bottom.dim() != 4:
        raise ValueError(f"bottom: expected NHWC shape (1, H, W, C), got {tuple(bottom.shape)}")
    to_caffe = bottom.permute(0, 3, 1, 2)
    reshaped = to_caffe.reshape(1, num_dim, -1, bottom.shape[2])
    return reshaped.permute(0, 2, 3, 1)


def smooth_l1_loss(
    bbox_pred: Tensor,
    bbox_targets: Any,
    bbox_inside_weights: Any,
    bbox_outside_weights: Any,
    sigma: float = 1.0,
    dim: Sequence[int] = (1,),
) -> Tensor:
    """``Network._smooth_l1_loss``: mean over the batch of the sum over ``dim`` of
    ``outside * smoothL1_sigma(inside * (pred - target))``."""
    dtype = bbox_pred.dtype
    loss = inside_outside_smooth_l1(
        bbox_pred, _tensor(bbox_targets, "bbox_targets", dtype), _tensor(bbox_inside_weights, "bbox_inside_weights", dtype),
        _tensor(bbox_outside_weights, "bbox_outside_weights", dtype), sigma=sigma,
    )
    return loss.sum(dim=tuple(dim)).mean()


def add_losses(
    rpn_cls_score_reshape: Tensor,
    rpn_labels: Any,
    rpn_bbox_pred: Tensor,
    rpn_bbox_targets: Any,
    rpn_bbox_inside_weights: Any,
    rpn_bbox_outside_weights: Any,
    cls_score: Tensor,
    labels: Any,
    bbox_pred: Tensor,
    bbox_targets: Any,
    bbox_inside_weights: Any,
    bbox_outside_weights: Any,
    sigma_rpn: float = 3.0,
) -> dict[str, Tensor]:
    """``Network._add_losses``: ``cross_entropy``, ``loss_box``, ``rpn_cross_entropy``,
    ``rpn_loss_box`` and ``total_loss`` (their sum; no weight decay here)."""
    if rpn_cls_score_reshape.shape[-1] != 2:
        raise ValueError(
            f"rpn_cls_score_reshape: expected shape (1, A*H, W, 2) (see reshape_layer), "
            f"got {tuple(rpn_cls_score_reshape.shape)}"
        )
    rpn_logits = rpn_cls_score_reshape.reshape(1, -1, 2)
    rpn_label = _tensor(rpn_labels, "rpn_labels", torch.int64).reshape(1, -1)
    if rpn_label.shape[1] != rpn_logits.shape[1]:
        raise ValueError(
            f"rpn_labels: expected {rpn_logits.shape[1]} labels (one per anchor of rpn_cls_score_reshape), "
            f"got {rpn_label.shape[1]}"
        )
    label = _tensor(labels, "labels", torch.int64).reshape(-1)
    if label.shape[0] != cls_score.shape[0]:
        raise ValueError(f"labels: expected {cls_score.shape[0]} labels (one per ROI), got {label.shape[0]}")
    checks = ValueChecks().in_range(label, "labels", 0, cls_score.shape[-1] - 1)
    checks.in_range(rpn_label, "rpn_labels", -1, 1).run()
    losses = {
        "cross_entropy": cross_entropy(cls_score, label),
        "loss_box": smooth_l1_loss(bbox_pred, bbox_targets, bbox_inside_weights, bbox_outside_weights),
        "rpn_cross_entropy": objectness_loss(rpn_logits, rpn_label),
        "rpn_loss_box": smooth_l1_loss(
            rpn_bbox_pred, rpn_bbox_targets, rpn_bbox_inside_weights, rpn_bbox_outside_weights,
            sigma=sigma_rpn, dim=(1, 2, 3),
        ),
    }
    losses["total_loss"] = (
        losses["cross_entropy"] + losses["loss_box"] + losses["rpn_cross_entropy"] + losses["rpn_loss_box"]
    )
    return losses
