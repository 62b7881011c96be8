"""Drop-ins for ultralytics 8.4's ``v8DetectionLoss``, ``v8OBBLoss``, ``E2ELoss`` and
``TaskAlignedAssigner`` (YOLOv8 / YOLO11 / YOLO26, axis-aligned and oriented).

Same constructors, calls and return values; the numbers of ultralytics 8.4.190 (see
``golden/ultralytics/README.md``). Thin layers over :class:`detloss.YOLOv8Loss`,
:class:`detloss.YOLOOBBLoss`, :func:`detloss.yolo26_branch_weights` and
:func:`detloss.match_task_aligned`; the original's behaviour is selected through options of
the native code:

* background anchors get GT slot 0's class and box in ``target_labels`` / ``target_bboxes``
  (``background_from_slot0=True``; ``fg_mask`` tells them apart);
* a ground-truth row whose box values sum to 0 or less is padding (``gt_valid`` built from
  ``bboxes.sum(-1) > 0``; for oriented boxes the angle is part of the sum, as in the original);
* the assigner's overlap is ``max(CIoU, 0)`` (oriented: ``max(ProbIoU, 0)``), the box loss's
  CIoU is not clamped (as the native loss's);
* the DFL target is clamped at ``reg_max - 1.01`` (``dfl_max_target``);
* the small-box floor is ``stride[1]`` (``min_box_side``); no floor when the assigner gets
  no strides;
* oriented objects narrower or lower than 2 px are dropped (``min_object_size``);
* the normaliser is the local target-score sum (``distributed=False``).

One difference is left: when a box has fewer than ``topk`` anchors with a positive metric,
ultralytics fills its top-k with zero-metric anchors in ``torch.topk``'s implementation-defined
tie order and marks them foreground with a zero target score. They change no loss and no
scored target, so they are not reproduced: ``fg_mask`` and ``target_gt_idx`` equal the
original's wherever the target score is positive.

The losses read ``model.args.box / cls / dfl`` (and ``angle`` for oriented boxes, 1.0 when
absent; ``epochs`` for :class:`E2ELoss`) as attributes or dict keys,
``model.model[-1].stride / nc / reg_max``, an optional ``model.class_weights`` (per-class BCE
weights) and the device of ``model.parameters()``. Ground truth is checked in one host read per
call (which also reads the largest object count, needed to pack the batch); predictions are
never read on the host.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .._validate import ValueChecks, require_finite, require_floating, require_tensor
from ..detectors.yolo26 import yolo26_branch_weights
from ..detectors.yolo_obb import YOLOOBBLoss
from ..detectors.yolov8 import YOLOv8Loss
from ..priors import anchor_points
from ..matching.task_aligned import check_task_aligned_options, match_task_aligned

__all__ = ["E2ELoss", "TaskAlignedAssigner", "v8DetectionLoss", "v8OBBLoss"]


def _hyp(args: Any, name: str, default: Optional[float] = None) -> float:
    value = args.get(name, default) if isinstance(args, dict) else getattr(args, name, default)
    if value is None:
        raise ValueError(f"model.args.{name}: expected a number, got None")
    return float(value)


class v8DetectionLoss:  # noqa: N801  (the original's name)
    """``v8DetectionLoss(model, tal_topk=10, tal_topk2=None)``; ``__call__(preds, batch)`` ->
    ``(loss (3,) box/cls/dfl times the batch size, items (3,) detached)``.

    ``preds``: ``{"boxes": (B, 4 * reg_max, A), "scores": (B, nc, A), "feats": [(B, C, h, w)]}``
    or an ``(inference, dict)`` tuple. ``batch``: ``{"batch_idx": (n,), "cls": (n, 1),
    "bboxes": (n, 4)}`` normalised ``cx, cy, w, h``. ``loss(preds_dict, batch)`` is the call
    on an already parsed ``preds`` (what :class:`E2ELoss` uses), ``parse_output(preds)`` the parse.
    """

    box_columns = 4
    pred_keys = ("boxes", "scores", "feats")

    def __init__(self, model: Any, tal_topk: int = 10, tal_topk2: Optional[int] = None) -> None:
        self.device = next(model.parameters()).device
        head = model.model[-1]
        self.hyp = model.args
        self.stride = torch.as_tensor(head.stride, dtype=torch.float32).flatten()
        self.nc, self.reg_max = int(head.nc), int(head.reg_max)
        self.no = self.nc + self.reg_max * 4
        self.use_dfl = self.reg_max > 1
        strides = self.strides = tuple(self.stride.tolist())  # read once here, not at every step
        self.native = self._native_class()(
            self.nc, reg_max=self.reg_max, topk=tal_topk, alpha=0.5, beta=6.0, topk2=tal_topk2,
            min_box_side=strides[1] if len(strides) > 1 else strides[0],
            box_weight=_hyp(self.hyp, "box"), cls_weight=_hyp(self.hyp, "cls"), dfl_weight=_hyp(self.hyp, "dfl"),
            class_weights=getattr(model, "class_weights", None),
            dfl_max_target=self.reg_max - 1.01 if self.use_dfl else None, **self._native_options(),
        ).to(self.device)

    def _native_class(self) -> type:
        return YOLOv8Loss

    def _native_options(self) -> dict:
        return {}

    def parse_output(self, preds: Any) -> dict:
        """The training dict of ``preds`` (the second item of an ``(inference, dict)`` tuple)."""
        return preds[1] if isinstance(preds, (tuple, list)) else preds

    def __call__(self, preds: Any, batch: dict) -> tuple[Tensor, Tensor]:
        return self.loss(self.parse_output(preds), batch)

    def loss(self, preds: Any, batch: dict) -> tuple[Tensor, Tensor]:
        """``(loss (K,) times the batch size, items (K,) detached)`` of a parsed ``preds`` dict."""
        return self.loss_and_targets(preds, batch)[:2]

    def loss_and_targets(
        self, preds: Any, batch: dict, targets: Optional[tuple[Tensor, Tensor, Tensor]] = None
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """:meth:`loss` and the packed ground truth ``(boxes, labels, valid)``; given ``targets``
        (packed by another branch from the same ``batch``), it does not pack (or check) again."""
        if not isinstance(preds, dict) or not set(self.pred_keys) <= set(preds):
            keys = ", ".join(repr(k) for k in self.pred_keys)
            raise ValueError(f"preds: expected a dict with {keys} (or an (inference, dict) tuple)")
        boxes, scores, feats = preds["boxes"], preds["scores"], preds["feats"]
        require_floating(boxes, "preds['boxes']")
        require_floating(scores, "preds['scores']")
        sizes = [tuple(int(v) for v in f.shape[2:]) for f in feats]
        if len(sizes) != len(self.strides):
            raise ValueError(f"preds['feats']: expected {len(self.strides)} feature maps, got {len(sizes)}")
        a = sum(h * w for h, w in sizes)
        b = boxes.shape[0] if boxes.dim() == 3 else -1
        if boxes.dim() != 3 or boxes.shape[1:] != (4 * self.reg_max, a):
            raise ValueError(f"preds['boxes']: expected shape (B, {4 * self.reg_max}, {a}), got {tuple(boxes.shape)}")
        if scores.dim() != 3 or scores.shape != (b, self.nc, a):
            raise ValueError(f"preds['scores']: expected shape ({b}, {self.nc}, {a}), got {tuple(scores.shape)}")
        extra = self._extra_preds(preds, b, a)
        image_size = (sizes[0][0] * self.strides[0], sizes[0][1] * self.strides[0])
        if targets is None:
            targets = self._targets(batch, b, image_size, boxes.device)
        gt_boxes, gt_labels, gt_valid = targets
        points, strides = anchor_points(sizes, self.strides, device=boxes.device)
        out = self.native.forward_unchecked(
            boxes.permute(0, 2, 1), scores.permute(0, 2, 1), *extra, points, strides, gt_boxes, gt_labels, gt_valid,
            image_size=image_size,
        )
        loss = torch.stack([out[k] for k in self._terms()])
        return loss * b, loss.detach(), targets

    def _extra_preds(self, preds: dict, b: int, a: int) -> list[Tensor]:
        return []

    def _terms(self) -> tuple[str, ...]:
        return ("loss_box", "loss_cls", "loss_dfl")

    def _targets(self, batch: dict, b: int, image_size: tuple[float, float], device) -> tuple[Tensor, Tensor, Tensor]:
        """``batch`` rows packed into ``(B, M, 4)`` xyxy pixels (oriented: ``(B, M, 5)`` xywhr),
        ``(B, M)`` labels and validity. One host read: the value checks with the largest count."""
        cols = self.box_columns
        for key in ("batch_idx", "cls", "bboxes"):
            if key not in batch:
                raise ValueError(f"batch: expected the key {key!r}")
            require_tensor(batch[key], f"batch['{key}']")
        idx, cls, bboxes = batch["batch_idx"].to(device), batch["cls"].to(device), batch["bboxes"].to(device)
        n = bboxes.shape[0] if bboxes.dim() == 2 else -1
        if bboxes.dim() != 2 or bboxes.shape[1] != cols:
            raise ValueError(f"batch['bboxes']: expected shape (n, {cols}), got {tuple(bboxes.shape)}")
        if idx.reshape(-1).shape[0] != n:
            raise ValueError(f"batch['batch_idx']: expected {n} entries, got {tuple(idx.shape)}")
        if cls.reshape(-1).shape[0] != n:
            raise ValueError(f"batch['cls']: expected {n} entries, got {tuple(cls.shape)}")
        idx, cls = idx.reshape(-1), cls.reshape(-1)
        require_floating(bboxes, "batch['bboxes']")
        checks = ValueChecks().finite(bboxes, "batch['bboxes']")
        if cols == 4:
            checks.in_range(bboxes, "batch['bboxes']", 0.0, 1.0)
        else:  # a rotated box's sides may exceed the image (a long object along the diagonal)
            checks.in_range(bboxes[:, :2], "batch['bboxes'] (cx, cy)", 0.0, 1.0)
            checks.in_range(bboxes[:, 2:4], "batch['bboxes'] (w, h)", 0.0, None)
        checks.in_range(cls, "batch['cls']", 0, self.nc - 1)
        checks.in_range(idx, "batch['batch_idx']", 0, b - 1)
        for x, name in ((idx, "batch['batch_idx']"), (cls, "batch['cls']")):
            if x.is_floating_point():
                checks.condition((x != x.round()).any(), name, "integer",
                                 lambda name=name: f"{name}: expected integer values")
        idx = idx.long().clamp(0, max(b - 1, 0))
        counts = torch.zeros(b, dtype=torch.long, device=device).index_add_(0, idx, torch.ones_like(idx))  # no sync
        m = checks.run(also=counts.max()) if n > 0 else checks.run() or 0  # the one host read
        order = torch.sort(idx, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(n, device=device) - starts[idx[order]]
        h, w = image_size
        rows = bboxes[order].float()
        xywh = rows[:, :4] * torch.tensor([w, h, w, h], device=device)
        if cols == 4:
            box = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), -1)
        else:
            box = torch.cat((xywh, rows[:, 4:]), -1)
        gt_boxes = torch.zeros(b, m, cols, device=device)
        gt_labels = torch.zeros(b, m, dtype=torch.long, device=device)
        gt_boxes[idx[order], slot] = box
        gt_labels[idx[order], slot] = cls[order].long()
        gt_valid = gt_boxes.sum(-1) > 0  # all-zero rows are padding, as the original reads them
        return gt_boxes, gt_labels, gt_valid


class v8OBBLoss(v8DetectionLoss):  # noqa: N801  (the original's name)
    """``v8OBBLoss(model, tal_topk=10, tal_topk2=None)``; ``__call__(preds, batch)`` -> ``(loss (4,)
    box (ProbIoU) / cls / dfl / angle times the batch size, items (4,) detached)``.

    ``preds``: ``{"boxes": (B, 4 * reg_max, A), "scores": (B, nc, A), "angle": (B, 1, A) radians,
    "feats": [...]}`` or an ``(inference, dict)`` tuple. ``batch``: ``{"batch_idx": (n,), "cls":
    (n, 1), "bboxes": (n, 5)}`` normalised ``cx, cy, w, h`` and the angle in radians. Objects
    narrower or lower than 2 px (after scaling to pixels) are dropped, as in the original.
    """

    box_columns = 5
    pred_keys = ("boxes", "scores", "angle", "feats")

    def _native_class(self) -> type:
        return YOLOOBBLoss

    def _native_options(self) -> dict:
        return {"angle_weight": _hyp(self.hyp, "angle", 1.0), "min_object_size": 2.0}

    def _extra_preds(self, preds: dict, b: int, a: int) -> list[Tensor]:
        angle = preds["angle"]
        require_floating(angle, "preds['angle']")
        if angle.dim() != 3 or angle.shape != (b, 1, a):
            raise ValueError(f"preds['angle']: expected shape ({b}, 1, {a}), got {tuple(angle.shape)}")
        return [angle.permute(0, 2, 1)]

    def _terms(self) -> tuple[str, ...]:
        return ("loss_box", "loss_cls", "loss_dfl", "loss_angle")


class E2ELoss:
    """``E2ELoss(model, loss_fn=v8DetectionLoss)`` (YOLO26, end to end): a one-to-many branch
    ``loss_fn(model, tal_topk=10)`` and a one-to-one branch ``loss_fn(model, tal_topk=7,
    tal_topk2=1)`` on the same batch.

    ``__call__(preds, batch)`` with ``preds = {"one2many": {...}, "one2one": {...}}`` (each the
    dict ``loss_fn`` takes; or an ``(inference, dict)`` tuple) returns ``(o2m * loss_one2many +
    o2o * loss_one2one, items of the one-to-one branch)``. ``update()`` (once per epoch, as
    ultralytics' trainer calls it) moves the weights along :func:`detloss.yolo26_branch_weights`:
    ``o2m = decay(updates)`` from 0.8 to 0.1 at epoch ``model.args.epochs - 1``, ``o2o = 1 - o2m``.
    ``E2ELoss(model, v8OBBLoss)`` is the oriented YOLO26 loss.
    """

    def __init__(self, model: Any, loss_fn: type = v8DetectionLoss) -> None:
        self.one2many = loss_fn(model, tal_topk=10)
        self.one2one = loss_fn(model, tal_topk=7, tal_topk2=1)
        self.updates = 0
        self.total = 1.0
        self.o2m = 0.8
        self.o2o = self.total - self.o2m
        self.o2m_copy = self.o2m
        self.final_o2m = 0.1

    def __call__(self, preds: Any, batch: dict) -> tuple[Tensor, Tensor]:
        preds = self.one2many.parse_output(preds)
        if not isinstance(preds, dict) or not {"one2many", "one2one"} <= set(preds):
            raise ValueError("preds: expected a dict with 'one2many' and 'one2one' (or an (inference, dict) tuple)")
        loss_one2many, _, targets = self.one2many.loss_and_targets(preds["one2many"], batch)
        loss_one2one, items, _ = self.one2one.loss_and_targets(preds["one2one"], batch, targets)  # checked once
        return loss_one2many * self.o2m + loss_one2one * self.o2o, items

    def update(self) -> None:
        """One more epoch: recompute the branch weights."""
        self.updates += 1
        self.o2m = self.decay(self.updates)
        self.o2o = max(self.total - self.o2m, 0)

    def decay(self, x: float) -> float:
        """The one-to-many weight after ``x`` updates (:func:`detloss.yolo26_branch_weights`)."""
        epochs = int(_hyp(self.one2one.hyp, "epochs"))
        return yolo26_branch_weights(x, epochs, start=self.o2m_copy, end=self.final_o2m)[0]


class TaskAlignedAssigner(nn.Module):
    """``TaskAlignedAssigner(topk=13, num_classes=80, alpha=1.0, beta=6.0, stride=None, eps=1e-9,
    topk2=None)``; ``forward(pd_scores (B, A, C) probabilities, pd_bboxes (B, A, 4) xyxy pixels,
    anc_points (A, 2) pixels, gt_labels (B, M, 1), gt_bboxes (B, M, 4) xyxy pixels,
    mask_gt (B, M, 1))`` -> ``(target_labels (B, A), target_bboxes (B, A, 4), target_scores
    (B, A, C), fg_mask (B, A) bool, target_gt_idx (B, A))``."""

    def __init__(self, topk: int = 13, num_classes: int = 80, alpha: float = 1.0, beta: float = 6.0,
                 stride: Optional[Sequence[float]] = None, eps: float = 1e-9, topk2: Optional[int] = None) -> None:
        super().__init__()
        check_task_aligned_options(topk, alpha, beta, topk2, None, eps)
        self.topk, self.num_classes, self.alpha, self.beta, self.eps = topk, num_classes, alpha, beta, eps
        self.topk2 = topk2 or topk
        self.stride = None if stride is None else [float(s) for s in stride]
        self.bg_idx = num_classes

    @torch.no_grad()
    def forward(self, pd_scores: Tensor, pd_bboxes: Tensor, anc_points: Tensor, gt_labels: Tensor, gt_bboxes: Tensor,
                mask_gt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        b, a = pd_scores.shape[:2]
        m = gt_bboxes.shape[1] if gt_bboxes.dim() == 3 else -1
        for x, name in ((gt_labels, "gt_labels"), (mask_gt, "mask_gt")):
            require_tensor(x, name)
            if x.dim() != 3 or x.shape != (b, m, 1):
                raise ValueError(f"{name}: expected shape ({b}, {m}, 1), got {tuple(x.shape)}")
        if m == 0:
            zeros = pd_scores.new_zeros(b, a)
            return (torch.full_like(zeros, self.bg_idx), torch.zeros_like(pd_bboxes), torch.zeros_like(pd_scores),
                    zeros.bool(), zeros)
        valid = mask_gt[..., 0] > 0
        labels = gt_labels[..., 0]
        if labels.is_floating_point():
            require_finite(labels, "gt_labels")
            labels = labels.long()
        side = None if self.stride is None else self.stride[1] if len(self.stride) > 1 else self.stride[0]
        r = match_task_aligned(
            pd_scores, pd_bboxes, anc_points, gt_bboxes, labels, valid, topk=self.topk, alpha=self.alpha,
            beta=self.beta, topk2=self.topk2, min_box_side=side, eps=self.eps, background_from_slot0=True,
        )
        return r.labels, r.boxes, r.scores.to(pd_scores.dtype), r.foreground, r.matched_gt
