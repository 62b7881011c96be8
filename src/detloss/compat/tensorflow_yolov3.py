"""Drop-in for YunYang1994/tensorflow-yolov3: ``preprocess_true_boxes`` and the ``YOLOV3`` loss.

Same arguments, layouts and return values as the original (``core/dataset.py``,
``core/yolov3.py``), with torch tensors in NHWC, batch first, for the loss; NumPy in and out
for ``preprocess_true_boxes`` (one image, like the original). Everything runs on the native
code (:func:`detloss.matching.yolo.build_yolo_targets`, :func:`detloss.detectors.yolov3.yolov3_terms`, the native loss's own composition,
:func:`detloss.coders.decode_yolo`, :func:`detloss.boxes.aligned_box_iou`); the original's
quirks come in as options of it:

* the fallback cell is clipped with the last scale's grid size (``faithful_fallback_clip``);
* GIoU denominators get 1e-6 (``eps``); ``bbox_iou`` has no epsilon (``eps=1e-30``, the
  same except that two empty boxes give 0, not NaN);
* gradients at tied coordinates go to the first box (``ties="first"``, TensorFlow's
  ``minimum``/``maximum``);
* the decoded size is ``exp(t_wh)`` without a clamp.

Differences left: ``loss_layer`` recomputes ``pred`` from ``conv`` (the same numbers whenever
``pred = decode(conv)``, as in the original's graph), and reads the responsibility
``label[..., 4]`` as 0/1 (the original's labels hold nothing else).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .._constants import device_constant
from ..boxes import aligned_box_iou, cxcywh_to_xyxy
from ..coders import decode_yolo
from ..detectors.yolov3 import yolov3_terms
from ..matching.yolo import YoloSlotTargets
from ..matching.yolo import build_yolo_targets

__all__ = ["YOLOv3Loss", "preprocess_true_boxes"]

GIOU_EPS = 1e-6
# The original's bbox_iou divides by the bare union; detloss clamps it at eps > 0. This eps
# only differs from a bare division for unions below 1e-30 (the original's NaN becomes 0).
NO_EPS = 1e-30


def preprocess_true_boxes(
    bboxes: np.ndarray,
    train_input_size: int,
    strides: Sequence[int],
    anchors: np.ndarray,
    num_classes: int,
    anchor_per_scale: int = 3,
    max_bbox_per_scale: int = 150,
) -> tuple[np.ndarray, ...]:
    """Targets of one image, as ``Dataset.preprocess_true_boxes``.

    ``bboxes (n, 5)`` ``[xmin, ymin, xmax, ymax, class]`` input pixels; ``anchors (3, 3, 2)`` in
    grid units of each scale. Returns float64 ``(label_sbbox, label_mbbox, label_lbbox,
    sbboxes, mbboxes, lbboxes)``: labels ``(S, S, anchor_per_scale, 5 + num_classes)`` and
    ``(max_bbox_per_scale, 4)`` xywh (centre, size) lists.
    """
    bboxes = np.asarray(bboxes).reshape(-1, 5)
    anchors_t = torch.as_tensor(np.asarray(anchors, dtype=np.float64)).reshape(len(strides), anchor_per_scale, 2)
    boxes = torch.as_tensor(bboxes[:, :4].astype(np.float64))[None]
    labels = torch.as_tensor(bboxes[:, 4].astype(np.int64))[None]
    targets = build_yolo_targets(
        boxes, labels, torch.ones_like(labels, dtype=torch.bool), num_classes=num_classes,
        anchors=anchors_t, strides=tuple(int(s) for s in strides), image_size=int(train_input_size),
        pos_iou=0.3, label_smoothing=0.01, max_boxes_per_scale=max_bbox_per_scale,
        faithful_fallback_clip=True, dtype=torch.float64,
    )
    return tuple(t[0].numpy() for t in targets.labels) + tuple(t[0].numpy() for t in targets.true_boxes)


class YOLOv3Loss:
    """The loss half of tensorflow-yolov3's ``YOLOV3`` class, on torch tensors.

    Args:
        num_classes: ``C``.
        anchors: ``(3, 3, 2)`` anchors in grid units of each scale (the anchor file).
        strides: ``(8, 16, 32)``.
        iou_loss_thresh: the objectness ignore threshold (0.5).
        anchor_per_scale: ``A`` (3).
    """

    def __init__(
        self,
        num_classes: int,
        anchors,
        strides: Sequence[int],
        iou_loss_thresh: float = 0.5,
        anchor_per_scale: int = 3,
    ) -> None:
        self.num_class = int(num_classes)
        self.anchors = torch.as_tensor(np.asarray(anchors, dtype=np.float32)).reshape(-1, anchor_per_scale, 2)
        self.strides = tuple(int(s) for s in strides)
        self.iou_loss_thresh = float(iou_loss_thresh)
        self.anchor_per_scale = int(anchor_per_scale)

    def _grid_view(self, conv: Tensor) -> Tensor:
        """``(B, S, S, A*(5+C))`` -> ``(B, S, S, A, 5 + C)``."""
        expected = self.anchor_per_scale * (5 + self.num_class)
        if conv.dim() != 4 or conv.shape[-1] != expected:
            raise ValueError(
                f"conv: expected shape (B, S, S, anchor_per_scale*(5+num_class)={expected}), got {tuple(conv.shape)}"
            )
        return conv.reshape(*conv.shape[:3], self.anchor_per_scale, 5 + self.num_class)

    def decode(self, conv_output: Tensor, anchors, stride: float) -> Tensor:
        """``(B, S, S, A*(5+C))`` raw head -> ``(B, S, S, A, 5 + C)``: xywh pixels, sigmoid conf and classes."""
        raw = self._grid_view(conv_output)
        anchors = device_constant(anchors, dtype=raw.dtype, device=raw.device)
        xywh = decode_yolo(raw[..., :4], anchors, stride, max_log_scale=float("inf"))
        return torch.cat((xywh, torch.sigmoid(raw[..., 4:])), dim=-1)

    def loss_layer(
        self, conv: Tensor, pred: Tensor, label: Tensor, bboxes: Tensor, anchors, stride: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One scale: ``(giou_loss, conf_loss, prob_loss)``, each summed per image and averaged over the batch.

        ``conv (B, S, S, A*(5+C))``, ``pred (B, S, S, A, 5+C)`` from :meth:`decode`,
        ``label (B, S, S, A, 5+C)`` and ``bboxes (B, 150, 4)`` from :func:`preprocess_true_boxes`.
        The boxes are decoded from ``conv`` again (the original's graph has ``pred = decode(conv)``).
        """
        raw = self._grid_view(conv)
        batch, cells = raw.shape[0], raw.shape[1] * raw.shape[2] * raw.shape[3]
        label = label.to(raw.dtype).reshape(batch, cells, -1)
        responsible = label[..., 4] > 0
        targets = YoloSlotTargets(
            candidates=(torch.arange(cells, device=raw.device).expand(batch, cells),),  # every cell
            box=label[..., :4], cls=label[..., 5:], weight=responsible, responsible=responsible,
            true_boxes=bboxes.to(raw.dtype), true_valid=torch.ones(batch, 1, bboxes.shape[1], dtype=torch.bool),
        )
        anchors = torch.as_tensor(np.asarray(anchors, dtype=np.float32)).reshape(1, self.anchor_per_scale, 2)
        terms = yolov3_terms(
            [raw], anchors, [int(stride)], targets, ignore_iou=self.iou_loss_thresh, box_loss="giou",
            box_eps=GIOU_EPS, ignore_eps=NO_EPS, max_log_scale=float("inf"),
        )
        return terms.box / batch, terms.obj / batch, terms.cls / batch

    def compute_loss(
        self,
        conv_sbbox: Tensor,
        conv_mbbox: Tensor,
        conv_lbbox: Tensor,
        label_sbbox: Tensor,
        label_mbbox: Tensor,
        label_lbbox: Tensor,
        true_sbbox: Tensor,
        true_mbbox: Tensor,
        true_lbbox: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sum of :meth:`loss_layer` over the three scales: ``(giou_loss, conf_loss, prob_loss)``."""
        per_scale = [
            self.loss_layer(conv, self.decode(conv, self.anchors[i], stride), label, true, self.anchors[i], stride)
            for i, (conv, label, true, stride) in enumerate(
                zip((conv_sbbox, conv_mbbox, conv_lbbox), (label_sbbox, label_mbbox, label_lbbox),
                    (true_sbbox, true_mbbox, true_lbbox), self.strides)
            )
        ]
        return tuple(sum(terms) for terms in zip(*per_scale))

    @staticmethod
    def bbox_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
        """IoU of broadcastable xywh (centre, size) boxes, without epsilon (the original's ``bbox_iou``)."""
        return aligned_box_iou(cxcywh_to_xyxy(boxes1), cxcywh_to_xyxy(boxes2), "iou", eps=NO_EPS, ties="first")

    @staticmethod
    def bbox_giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
        """GIoU of broadcastable xywh (centre, size) boxes, denominators + 1e-6 (the original's ``bbox_giou``)."""
        return aligned_box_iou(cxcywh_to_xyxy(boxes1), cxcywh_to_xyxy(boxes2), "giou", eps=GIOU_EPS, ties="first")

    @staticmethod
    def focal(target: Tensor, actual: Tensor, alpha: float = 1, gamma: float = 2) -> Tensor:
        """The original's focal factor ``alpha * |target - actual| ** gamma``."""
        return alpha * torch.abs(target - actual) ** gamma
