"""Drop-in for pierluigiferrari/ssd_keras: ``SSDInputEncoder`` and ``SSDLoss``.

Same constructor arguments, defaults and call signatures as the originals
(``ssd_encoder_decoder/ssd_input_encoder.py``, ``keras_loss_function/keras_ssd_loss.py``);
torch tensors in and out of the loss, NumPy in and out of the encoder (it runs in the data
loader, as the original does).

``y_true`` / ``y_pred`` layout ``(B, P, n_classes + 1 + 12)``: class columns (column 0 the
background; an all-zero row is neutral and ignored), 4 box offsets, 4 anchor coordinates,
4 variances. The class columns of ``y_pred`` are softmax **probabilities** (the original model
ends with a softmax).

Built from native pieces: :func:`detloss.priors.ssd_keras_anchors`,
:func:`detloss.matching.greedy.match_greedy_boxes`, :func:`detloss.coders.encode_boxes` /
:func:`~detloss.coders.encode_corner_offsets`,
:func:`detloss.functional.probability_cross_entropy`, :func:`detloss.functional.smooth_l1_loss`,
:func:`detloss.sampling.batch_hard_negative.mine_hard_negatives_batchwide` and
:func:`detloss.functional.positive_normalizer`.

Behaviour of the original kept here: positives are counted over the whole batch; negatives are
mined batch-wide (one image may get all of them); each image's loss is divided by the batch's
positive count and multiplied by the batch size (Keras then averages, so the mean of
:meth:`SSDLoss.compute_loss` is ``sum / max(1, n_pos)``). Not supported: ``border_pixels``
``'include'`` / ``'exclude'`` (the original adds the pixel to the union areas but not to the
intersection, and to normalised widths: use ``'half'``, the default).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .._validate import require_choice, require_floating, require_shape, require_tensor
from ..boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from ..coders import encode_boxes, encode_corner_offsets
from ..functional import positive_normalizer, probability_cross_entropy, smooth_l1_loss
from ..matching.greedy import MATCHING_TYPES, match_greedy_boxes
from ..priors import ssd_keras_anchors
from ..sampling.batch_hard_negative import mine_hard_negatives_batchwide

__all__ = ["DegenerateBoxError", "SSDInputEncoder", "SSDKerasLossParts", "SSDLoss"]

COORDS = ("centroids", "minmax", "corners")


class DegenerateBoxError(ValueError):
    """A ground-truth box with ``xmax <= xmin`` or ``ymax <= ymin`` (the original's error)."""


class SSDInputEncoder:
    """ssd_keras ground-truth encoder: anchors, greedy bipartite + 'multi' matching, offsets.

    Arguments and defaults are the original's. ``predictor_sizes`` lists ``(height, width)``
    of each predictor layer; ``scales`` (``len(predictor_sizes) + 1`` values) overrides
    ``min_scale`` / ``max_scale``; ``aspect_ratios_per_layer`` overrides
    ``aspect_ratios_global``. ``coords`` is the anchor / target format (``'centroids'``
    ``(cx, cy, w, h)``, ``'corners'`` ``(xmin, ymin, xmax, ymax)``, ``'minmax'``
    ``(xmin, xmax, ymin, ymax)``). ``border_pixels`` must be ``'half'``. ``device`` (not in
    the original) is where the matching runs.

    Attributes:
        anchors: ``(P, 4)`` float64 anchors in ``coords`` format (normalised if
            ``normalize_coords``), the ``y_true`` columns ``-8:-4``.
        n_classes: number of classes including the background (as the original).
        n_boxes: boxes per cell, per layer.
    """

    def __init__(
        self,
        img_height: int,
        img_width: int,
        n_classes: int,
        predictor_sizes: Sequence[Sequence[int]],
        min_scale: Optional[float] = 0.1,
        max_scale: Optional[float] = 0.9,
        scales: Optional[Sequence[float]] = None,
        aspect_ratios_global: Optional[Sequence[float]] = [0.5, 1.0, 2.0],
        aspect_ratios_per_layer: Optional[Sequence[Sequence[float]]] = None,
        two_boxes_for_ar1: bool = True,
        steps: Optional[Sequence] = None,
        offsets: Optional[Sequence] = None,
        clip_boxes: bool = False,
        variances: Sequence[float] = [0.1, 0.1, 0.2, 0.2],
        matching_type: str = "multi",
        pos_iou_threshold: float = 0.5,
        neg_iou_limit: float = 0.3,
        border_pixels: str = "half",
        coords: str = "centroids",
        normalize_coords: bool = True,
        background_id: int = 0,
        *,
        device: Optional[torch.device] = None,
    ) -> None:
        sizes = np.array(predictor_sizes)
        if sizes.ndim == 1:
            sizes = sizes[None]
        if sizes.ndim != 2 or sizes.shape[1] != 2:
            raise ValueError(f"predictor_sizes: expected (height, width) pairs, got {predictor_sizes!r}")
        n_layers = sizes.shape[0]
        if scales is None:
            if min_scale is None or max_scale is None or not 0 < min_scale <= max_scale:
                raise ValueError(
                    f"min_scale, max_scale: expected 0 < min_scale <= max_scale (or scales), got {min_scale!r}, {max_scale!r}"
                )
            scales = np.linspace(min_scale, max_scale, n_layers + 1)
        if aspect_ratios_per_layer is None:
            if aspect_ratios_global is None:
                raise ValueError("aspect_ratios_global: expected a list when aspect_ratios_per_layer is None, got None")
            aspect_ratios_per_layer = [list(aspect_ratios_global)] * n_layers
        if len(variances) != 4 or any(v <= 0 for v in variances):
            raise ValueError(f"variances: expected 4 values > 0, got {list(variances)!r}")
        if neg_iou_limit > pos_iou_threshold:
            raise ValueError(
                f"neg_iou_limit: expected at most pos_iou_threshold={pos_iou_threshold}, got {neg_iou_limit}"
            )
        require_choice(matching_type, "matching_type", MATCHING_TYPES)
        require_choice(coords, "coords", COORDS)
        require_choice(border_pixels, "border_pixels", ("half",))
        if not 0 <= background_id <= n_classes:
            raise ValueError(f"background_id: expected a class column in [0, {n_classes}], got {background_id}")
        self.img_height, self.img_width = int(img_height), int(img_width)
        self.n_classes = int(n_classes) + 1
        self.predictor_sizes = sizes
        self.scales = np.asarray(scales, dtype=np.float64)
        self.aspect_ratios = [list(a) for a in aspect_ratios_per_layer]
        self.two_boxes_for_ar1 = two_boxes_for_ar1
        self.variances = np.asarray(variances, dtype=np.float64)
        self.matching_type = matching_type
        self.pos_iou_threshold = pos_iou_threshold
        self.neg_iou_limit = neg_iou_limit
        self.border_pixels = border_pixels
        self.coords = coords
        self.normalize_coords = normalize_coords
        self.background_id = int(background_id)
        self.device = device
        self.n_boxes = [len(a) + (1 in a and bool(two_boxes_for_ar1)) for a in self.aspect_ratios]
        self.anchors = ssd_keras_anchors(
            self.img_height,
            self.img_width,
            sizes.tolist(),
            self.scales.tolist(),
            self.aspect_ratios,
            two_boxes_for_ar1,
            steps,
            offsets,
            clip_boxes,
            normalize_coords,
            coords,
            dtype=torch.float64,
            device=device,
        )
        self._anchors_xyxy = self._to_xyxy(self.anchors)

    def _to_xyxy(self, boxes: Tensor) -> Tensor:
        """``coords``-format boxes -> xyxy, with the original's conversion arithmetic."""
        if self.coords == "centroids":
            return cxcywh_to_xyxy(boxes)
        if self.coords == "minmax":
            return boxes[..., [0, 2, 1, 3]]
        return boxes

    def _from_xyxy(self, boxes: Tensor) -> Tensor:
        if self.coords == "centroids":
            return xyxy_to_cxcywh(boxes)
        if self.coords == "minmax":
            return boxes[..., [0, 2, 1, 3]]
        return boxes

    def _padded_labels(self, ground_truth_labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Validate the per-image ``(n_i, 5)`` arrays -> ``labels (B, M, 5)`` float64, ``valid (B, M)``."""
        if isinstance(ground_truth_labels, (np.ndarray, Tensor)) or not isinstance(ground_truth_labels, Sequence):
            raise TypeError(
                "ground_truth_labels: expected a list with one (n_i, 5) array per image, "
                f"got {type(ground_truth_labels).__name__}"
            )
        rows = []
        for i, lab in enumerate(ground_truth_labels):
            name = f"ground_truth_labels[{i}]"
            arr = np.asarray(lab.detach().cpu() if isinstance(lab, Tensor) else lab, dtype=np.float64)
            if arr.size == 0:
                rows.append(np.zeros((0, 5)))
                continue
            if arr.ndim != 2 or arr.shape[1] != 5:
                raise ValueError(f"{name}: expected shape (n, 5) [class_id, xmin, ymin, xmax, ymax], got {arr.shape}")
            if not np.isfinite(arr).all():
                raise ValueError(f"{name}: expected finite values, got NaN/inf")
            cls = arr[:, 0]
            bad_cls = (cls != np.round(cls)) | (cls < 0) | (cls >= self.n_classes) | (cls == self.background_id)
            if bad_cls.any():
                raise ValueError(
                    f"{name}: expected integer class ids in [0, {self.n_classes - 1}] other than the "
                    f"background id {self.background_id}, got {cls[bad_cls].tolist()}"
                )
            degenerate = (arr[:, 3] <= arr[:, 1]) | (arr[:, 4] <= arr[:, 2])
            if degenerate.any():
                raise DegenerateBoxError(
                    f"{name}: expected boxes with xmax > xmin and ymax > ymin, got {arr[degenerate, 1:].tolist()}"
                )
            rows.append(arr)
        m = max((r.shape[0] for r in rows), default=0)
        m = max(m, 1)  # one invalid row keeps the gathers well-defined when no image has boxes
        labels = np.zeros((len(rows), m, 5))
        valid = np.zeros((len(rows), m), dtype=bool)
        for i, r in enumerate(rows):
            labels[i, : r.shape[0]] = r
            valid[i, : r.shape[0]] = True
        return labels, valid

    def _encode_offsets(self, gt_xyxy: Tensor) -> Tensor:
        """Targets of matched xyxy boxes ``(B, P, 4)`` against the anchors, in ``coords`` order."""
        v = self.variances
        if self.coords == "centroids":
            if v[0] == v[1] and v[2] == v[3]:
                return encode_boxes(gt_xyxy, self.anchors, (v[0], v[2]))
            return encode_boxes(gt_xyxy, self.anchors, (1.0, 1.0)) / torch.as_tensor(v, device=gt_xyxy.device)
        if self.coords == "corners":
            return encode_corner_offsets(gt_xyxy, self._anchors_xyxy, tuple(v))
        # minmax: the i-th variance divides the i-th (xmin, xmax, ymin, ymax) column
        return self._from_xyxy(encode_corner_offsets(gt_xyxy, self._anchors_xyxy, (v[0], v[2], v[1], v[3])))

    def __call__(self, ground_truth_labels: Sequence, diagnostics: bool = False):
        """Encode a batch of ground truth into ``y_true``.

        Args:
            ground_truth_labels: ``B`` arrays ``(n_i, 5)`` ``[class_id, xmin, ymin, xmax, ymax]``
                in pixels (``(0, 5)`` or empty for an image without boxes); class ids in
                ``[0, n_classes]`` other than ``background_id``.
            diagnostics: also return a copy with zero offsets (the matched anchors themselves).

        Returns:
            ``y_encoded`` float64 ``(B, P, n_classes + 1 + 12)`` (and ``y_matched_anchors``
            with ``diagnostics``). Raises :class:`DegenerateBoxError` (a ``ValueError``) for a
            box with ``xmax <= xmin`` or ``ymax <= ymin``.
        """
        labels_np, valid_np = self._padded_labels(ground_truth_labels)
        labels = torch.from_numpy(labels_np).to(self.device)
        valid = torch.from_numpy(valid_np).to(self.device)
        boxes = labels[..., 1:]
        if self.normalize_coords:
            scale = torch.tensor([self.img_width, self.img_height] * 2, dtype=boxes.dtype, device=boxes.device)
            boxes = boxes / scale
        # the original converts the GT to `coords` and back to corners inside its IoU
        iou_boxes = self._to_xyxy(self._from_xyxy(boxes))
        match = match_greedy_boxes(
            iou_boxes,
            self._anchors_xyxy,
            valid,
            matching_type=self.matching_type,
            pos_iou=self.pos_iou_threshold,
            neg_iou=self.neg_iou_limit,
            chunk_size=max(1, 2**17 // self.anchors.shape[0]),  # cache-sized IoU blocks
        )
        gt_index = match.gt_index.clamp(min=0)
        matched_boxes = boxes.gather(1, gt_index.unsqueeze(-1).expand(-1, -1, 4))
        matched_class = labels[..., 0].long().gather(1, gt_index)
        b, p = gt_index.shape
        c = self.n_classes
        y = torch.zeros(b, p, c + 12, dtype=torch.float64, device=boxes.device)  # written in place
        y[..., :c].scatter_(2, matched_class.unsqueeze(-1), match.positive.unsqueeze(-1).to(y.dtype))
        y[..., self.background_id] += match.negative.to(y.dtype)
        y[..., c : c + 4] = torch.where(match.positive.unsqueeze(-1), self._encode_offsets(matched_boxes), 0.0)
        y[..., c + 4 : c + 8] = self.anchors
        y[..., c + 8 :] = torch.as_tensor(self.variances, device=boxes.device)
        y_encoded = y.cpu().numpy()
        if diagnostics:
            y_matched_anchors = y_encoded.copy()
            y_matched_anchors[:, :, -12:-8] = 0
            return y_encoded, y_matched_anchors
        return y_encoded


class SSDKerasLossParts(NamedTuple):
    """What :meth:`SSDLoss.loss_components` computed (per image unless stated)."""

    total: Tensor  # (B,) the compute_loss output
    pos_class_loss: Tensor  # (B,)
    neg_class_loss: Tensor  # (B,)
    loc_loss: Tensor  # (B,)
    classification_loss: Tensor  # (B, P) per anchor
    localization_loss: Tensor  # (B, P) per anchor
    positives: Tensor  # (B, P) float, max of the non-background class columns
    negatives: Tensor  # (B, P) float, the background column
    negatives_keep: Tensor  # (B, P) bool, the mined negatives
    n_positive: Tensor  # 0-d, over the batch


class SSDLoss:
    """ssd_keras ``SSDLoss``: softmax log loss + smooth L1 with batch-wide hard negative mining.

    Args:
        neg_pos_ratio: negatives kept per positive, counted over the whole batch.
        n_neg_min: minimum number of negatives kept (when that many have a non-zero loss).
        alpha: weight of the localisation loss.
    """

    def __init__(self, neg_pos_ratio: int = 3, n_neg_min: int = 0, alpha: float = 1.0) -> None:
        self.neg_pos_ratio = neg_pos_ratio
        self.n_neg_min = n_neg_min
        self.alpha = alpha

    def smooth_L1_loss(self, y_true: Tensor, y_pred: Tensor) -> Tensor:  # noqa: N802 (original name)
        """Smooth L1 (transition at 1) of ``y_pred - y_true``, summed over the last axis: ``(...)``."""
        return smooth_l1_loss(y_pred, y_true, 1.0, reduction="none").sum(dim=-1)

    def log_loss(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        """``-sum(y_true * log(max(y_pred, 1e-15)))`` over the last axis: ``(...)``; y_pred are probabilities."""
        return probability_cross_entropy(y_pred, y_true, eps=1e-15, reduction="none")

    def _check(self, y_true: Tensor, y_pred: Tensor) -> int:
        require_tensor(y_pred, "y_pred")
        require_tensor(y_true, "y_true")
        require_floating(y_pred, "y_pred")
        require_floating(y_true, "y_true")
        dims = require_shape(y_pred, "y_pred", ("B", "P", "C"))
        if dims["C"] < 14:
            raise ValueError(
                f"y_pred: expected a last dimension n_classes + 1 + 12 >= 14, got shape {tuple(y_pred.shape)}"
            )
        require_shape(y_true, "y_true", ("B", "P", "C"), dims)
        return dims["C"] - 12

    def loss_components(self, y_true: Tensor, y_pred: Tensor) -> SSDKerasLossParts:
        """Every intermediate of :meth:`compute_loss` (same arguments)."""
        n_cls = self._check(y_true, y_pred)
        batch = y_pred.shape[0]
        cls_loss = self.log_loss(y_true[..., :n_cls], y_pred[..., :n_cls])
        loc_loss = self.smooth_L1_loss(y_true[..., n_cls : n_cls + 4], y_pred[..., n_cls : n_cls + 4])
        acc = cls_loss.dtype
        negatives = y_true[..., 0].to(acc)
        positives = y_true[..., 1:n_cls].amax(dim=-1).to(acc)
        n_positive = positives.sum()
        keep = mine_hard_negatives_batchwide(
            cls_loss * negatives,
            negatives != 0,
            n_positive,
            neg_pos_ratio=self.neg_pos_ratio,
            min_negatives=self.n_neg_min,
        )
        zero = torch.zeros((), dtype=acc, device=cls_loss.device)
        pos_cls = (cls_loss * positives).sum(dim=-1)
        neg_cls = torch.where(keep, cls_loss, zero).sum(dim=-1)
        loc = (loc_loss * positives).sum(dim=-1)
        total = (pos_cls + neg_cls + self.alpha * loc) / positive_normalizer(positives) * batch
        return SSDKerasLossParts(
            total, pos_cls, neg_cls, loc, cls_loss, loc_loss, positives, negatives, keep, n_positive
        )

    def compute_loss(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        """The original's per-image loss vector ``(B,)`` (float32; float64 for float64 input).

        Args:
            y_true: ``(B, P, n_classes + 1 + 12)`` from :class:`SSDInputEncoder`.
            y_pred: same shape; class columns are softmax probabilities, then 4 offsets
                (the last 8 columns are not used).

        ``(pos_cls + neg_cls + alpha * loc) / max(1, n_pos_batch) * B`` per image; Keras
        averages it over the batch.
        """
        return self.loss_components(y_true, y_pred).total
