"""Drop-ins for ultralytics 8.4's ``v8DetectionLoss`` and ``TaskAlignedAssigner`` (YOLOv8 / YOLO11).

Same constructors, calls and return values; the numbers of ultralytics 8.4.190 (see
``golden/ultralytics/README.md``). Thin layers over :class:`detloss.YOLOv8Loss` and
:func:`detloss.match_task_aligned`; the original's behaviour is selected through options of
the native code:

* background anchors get GT slot 0's class and box in ``target_labels`` / ``target_bboxes``
  (``background_from_slot0=True``; ``fg_mask`` tells them apart);
* a ground-truth row whose box coordinates sum to 0 or less is padding (``gt_valid`` built
  from ``bboxes.sum(-1) > 0``);
* the assigner's overlap is ``max(CIoU, 0)`` (as the native assigner's), the box loss's CIoU
  is not clamped (as the native loss's);
* the DFL target is clamped at ``reg_max - 1.01`` (``dfl_max_target``);
* the small-box floor is ``stride[1]`` (``min_box_side``); no floor when the assigner gets
  no strides;
* the normaliser is the local target-score sum (``distributed=False``).

One difference is left: when a box has fewer than ``topk`` anchors with a positive metric,
ultralytics fills its top-k with zero-metric anchors in ``torch.topk``'s implementation-defined
tie order and marks them foreground with a zero target score. They change no loss and no
scored target, so they are not reproduced: ``fg_mask`` and ``target_gt_idx`` equal the
original's wherever the target score is positive.

The loss reads ``model.args.box / cls / dfl`` (attributes or dict keys),
``model.model[-1].stride / nc / reg_max``, an optional ``model.class_weights`` (per-class BCE
weights) and the device of ``model.parameters()``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .._validate import require_finite, require_floating, require_range, require_tensor, value_checks_active
from ..detectors.yolov8 import YOLOv8Loss
from ..priors import anchor_points
from ..matching.task_aligned import check_task_aligned_options, match_task_aligned

__all__ = ["TaskAlignedAssigner", "v8DetectionLoss"]


def _hyp(args: Any, name: str) -> float:
    value = args[name] if isinstance(args, dict) else getattr(args, name, None)
    if value is None:
        raise ValueError(f"model.args.{name}: expected a number, got None")
    return float(value)


class v8DetectionLoss:  # noqa: N801  (the original's name)
    """``v8DetectionLoss(model, tal_topk=10, tal_topk2=None)``; ``__call__(preds, batch)`` ->
    ``(loss (3,) box/cls/dfl times the batch size, items (3,) detached)``.

    ``preds``: ``{"boxes": (B, 4 * reg_max, A), "scores": (B, nc, A), "feats": [(B, C, h, w)]}``
    or an ``(inference, dict)`` tuple. ``batch``: ``{"batch_idx": (n,), "cls": (n, 1),
    "bboxes": (n, 4)}`` normalised ``cx, cy, w, h``.
    """

    def __init__(self, model: Any, tal_topk: int = 10, tal_topk2: Optional[int] = None) -> None:
        self.device = next(model.parameters()).device
        head = model.model[-1]
        self.hyp = model.args
        self.stride = torch.as_tensor(head.stride, dtype=torch.float32).flatten()
        self.nc, self.reg_max = int(head.nc), int(head.reg_max)
        self.no = self.nc + self.reg_max * 4
        self.use_dfl = self.reg_max > 1
        strides = self.stride.tolist()
        self.native = YOLOv8Loss(
            self.nc, reg_max=self.reg_max, topk=tal_topk, alpha=0.5, beta=6.0, topk2=tal_topk2,
            min_box_side=strides[1] if len(strides) > 1 else strides[0],
            box_weight=_hyp(self.hyp, "box"), cls_weight=_hyp(self.hyp, "cls"), dfl_weight=_hyp(self.hyp, "dfl"),
            class_weights=getattr(model, "class_weights", None),
            dfl_max_target=self.reg_max - 1.01 if self.use_dfl else None,
        ).to(self.device)

    def __call__(self, preds: Any, batch: dict) -> tuple[Tensor, Tensor]:
        if isinstance(preds, (tuple, list)):
            preds = preds[1]
        if not isinstance(preds, dict) or not {"boxes", "scores", "feats"} <= set(preds):
            raise ValueError(
                "preds: expected a dict with 'boxes', 'scores' and 'feats' (or an (inference, dict) tuple)"
            )
        boxes, scores, feats = preds["boxes"], preds["scores"], preds["feats"]
        require_floating(boxes, "preds['boxes']")
        require_floating(scores, "preds['scores']")
        sizes = [tuple(int(v) for v in f.shape[2:]) for f in feats]
        if len(sizes) != len(self.stride):
            raise ValueError(f"preds['feats']: expected {len(self.stride)} feature maps, got {len(sizes)}")
        a = sum(h * w for h, w in sizes)
        b = boxes.shape[0] if boxes.dim() == 3 else -1
        if boxes.dim() != 3 or boxes.shape[1:] != (4 * self.reg_max, a):
            raise ValueError(f"preds['boxes']: expected shape (B, {4 * self.reg_max}, {a}), got {tuple(boxes.shape)}")
        if scores.dim() != 3 or scores.shape != (b, self.nc, a):
            raise ValueError(f"preds['scores']: expected shape ({b}, {self.nc}, {a}), got {tuple(scores.shape)}")
        image_size = (sizes[0][0] * float(self.stride[0]), sizes[0][1] * float(self.stride[0]))
        gt_boxes, gt_labels, gt_valid = self._targets(batch, b, image_size, boxes.device)
        points, strides = anchor_points(sizes, self.stride.tolist(), device=boxes.device)
        if value_checks_active():
            require_finite(boxes, "preds['boxes']")
            require_finite(scores, "preds['scores']")
        out = self.native.forward_unchecked(
            boxes.permute(0, 2, 1), scores.permute(0, 2, 1), points, strides, gt_boxes, gt_labels, gt_valid,
            image_size=image_size,
        )
        loss = torch.stack((out["loss_box"], out["loss_cls"], out["loss_dfl"]))
        return loss * b, loss.detach()

    def _targets(self, batch: dict, b: int, image_size: tuple[float, float], device) -> tuple[Tensor, Tensor, Tensor]:
        """``batch`` rows packed into ``(B, M, 4)`` xyxy pixels, ``(B, M)`` labels and validity."""
        for key in ("batch_idx", "cls", "bboxes"):
            if key not in batch:
                raise ValueError(f"batch: expected the key {key!r}")
            require_tensor(batch[key], f"batch['{key}']")
        idx, cls, bboxes = batch["batch_idx"].to(device), batch["cls"].to(device), batch["bboxes"].to(device)
        n = bboxes.shape[0] if bboxes.dim() == 2 else -1
        if bboxes.dim() != 2 or bboxes.shape[1] != 4:
            raise ValueError(f"batch['bboxes']: expected shape (n, 4), got {tuple(bboxes.shape)}")
        if idx.reshape(-1).shape[0] != n:
            raise ValueError(f"batch['batch_idx']: expected {n} entries, got {tuple(idx.shape)}")
        if cls.reshape(-1).shape[0] != n:
            raise ValueError(f"batch['cls']: expected {n} entries, got {tuple(cls.shape)}")
        idx, cls = idx.reshape(-1), cls.reshape(-1)
        require_floating(bboxes, "batch['bboxes']")
        require_finite(bboxes, "batch['bboxes']")
        require_range(bboxes, "batch['bboxes']", 0.0, 1.0)
        require_range(cls, "batch['cls']", 0, self.nc - 1)
        require_range(idx, "batch['batch_idx']", 0, b - 1)
        if idx.is_floating_point() and value_checks_active():
            if bool((idx != idx.round()).any()) or bool((cls != cls.round()).any()):
                raise ValueError("batch['batch_idx'], batch['cls']: expected integer values")
        idx = idx.long()
        counts = torch.bincount(idx, minlength=b)
        m = int(counts.max()) if n > 0 else 0  # host read: the drop-in packs as the original
        order = torch.sort(idx, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(n, device=device) - starts[idx[order]]
        h, w = image_size
        xywh = bboxes[order].float() * torch.tensor([w, h, w, h], device=device)
        xyxy = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), -1)
        gt_boxes = torch.zeros(b, m, 4, device=device)
        gt_labels = torch.zeros(b, m, dtype=torch.long, device=device)
        gt_boxes[idx[order], slot] = xyxy
        gt_labels[idx[order], slot] = cls[order].long()
        gt_valid = gt_boxes.sum(-1) > 0  # all-zero rows are padding, as the original reads them
        return gt_boxes, gt_labels, gt_valid


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
