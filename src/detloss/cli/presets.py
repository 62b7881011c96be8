"""Prior/anchor presets of ``detloss inspect`` and ``detloss anchors``, and their matchers.

A :class:`Preset` is a prior or anchor layout at a fixed input size together with the
matching rule of its family, run through detloss's own matchers:

==============  ==========  ===========================================================
preset          family      matching (as the original)
==============  ==========  ===========================================================
ssd300-voc      ssd         ``match_priors``: IoU >= 0.5, bipartite forcing; 3:1 mining
retinaface-640  retinaface  ``match_priors``: IoU >= 0.35, forcing if best IoU >= 0.2; 7:1
yolov3-416      yolov3      ``assign_yolo_anchors``: anchors of the GT's cell, IoU > 0.3
retinanet-800   retinanet   ``max_iou_match``: IoU >= 0.5 positive, [0.4, 0.5) ignored,
                            low-quality (best-IoU tie) matches
yolov8-640      yolov8      ``match_task_aligned``: top 10 anchor points inside each box by
                            ``score ** 0.5 * CIoU ** 6`` (YOLOv8's loss), conflicts to the
                            largest CIoU; predictions of an untrained head (seeded)
==============  ==========  ===========================================================

Everything is in pixels of the ``S x S`` network input. ``resize`` says how an image
enters it: ``"stretch"`` (SSD, RetinaFace: both sides scaled to ``S``) or ``"letterbox"``
(YOLOv3, RetinaNet, YOLOv8: longer side to ``S``, aspect kept). YOLOv8's "priors" are its
anchor points, drawn as the cells they centre.
A JSON config file describes a custom layout with the same keys (see :func:`preset_from_config`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import cxcywh_to_xyxy, retinaface_priors, retinanet_anchors, ssd_priors
from ..boxes import box_iou
from ..matching.bipartite import match_priors
from ..matching.max_iou import max_iou_match
from ..matching.task_aligned import match_task_aligned
from ..matching.yolo import assign_yolo_anchors
from ..priors import SSD_PRESETS, SSDPriorConfig, anchor_points
from ..sampling.hard_negative import mine_hard_negatives
from .errors import CLIError

FAMILIES = ("ssd", "retinaface", "retinanet", "yolov3")


@dataclass
class Assignment:
    """Matcher decisions for a batch, all ``(B, P)``: ``positive`` / ``ignored`` bool,
    ``matched_gt`` int64 (the GT slot of a positive prior, -1 elsewhere); ``iou (B, M, P)``
    the plain IoU of every GT with every prior (0 for padding)."""

    positive: Tensor
    ignored: Tensor
    matched_gt: Tensor
    iou: Tensor

    def positives_per_gt(self, num_gt: int) -> Tensor:
        """``(B, M)`` int64: how many positive priors each GT slot has."""
        onehot = torch.nn.functional.one_hot(self.matched_gt.clamp(min=0), max(num_gt, 1))[..., :num_gt]
        return (onehot * self.positive[..., None]).sum(1)

    def threshold_positives_per_gt(self, num_gt: int, pos_iou: float) -> Tensor:
        """``(B, M)``: positives of each GT whose own IoU with it reaches ``pos_iou``
        (so a GT with positives but none here was matched only through forcing)."""
        if num_gt == 0:
            return self.matched_gt.new_zeros(self.matched_gt.shape[0], 0)
        own = self.iou.gather(1, self.matched_gt.clamp(min=0)[:, None, :]).squeeze(1)
        strong = self.positive & (own >= pos_iou)
        onehot = torch.nn.functional.one_hot(self.matched_gt.clamp(min=0), max(num_gt, 1))[..., :num_gt]
        return (onehot * strong[..., None]).sum(1)


@dataclass(frozen=True)
class Preset:
    """A prior/anchor layout with its family's matching rule (see the module docstring)."""

    name: str
    family: str
    image_size: int
    resize: str
    pos_iou: float
    neg_iou: Optional[float] = None
    min_best_iou: Optional[float] = None
    neg_pos_ratio: Optional[float] = None
    num_classes: int = 21
    params: dict = field(default_factory=dict, hash=False, compare=False)

    # ------------------------------------------------------------------ priors
    def priors_xyxy(self) -> Tensor:
        """``(P, 4)`` float32 prior/anchor boxes, xyxy pixels of the input, in the family's order."""
        s = self.image_size
        p = self.params
        if self.family == "ssd":
            cfg = p.get("config") or SSD_PRESETS["voc300"]
            return cxcywh_to_xyxy(ssd_priors(cfg)) * s
        if self.family == "retinaface":
            pri = retinaface_priors(s, min_sizes=p.get("min_sizes", ((16, 32), (64, 128), (256, 512))),
                                    steps=p.get("steps", (8, 16, 32)))
            return cxcywh_to_xyxy(pri) * s
        if self.family == "retinanet":
            kw = {k: p[k] for k in ("strides", "sizes", "scales", "ratios") if k in p}
            return retinanet_anchors(s, **kw)
        if self.family == "yolov8":
            points, strides = self.yolov8_points()
            half = strides[:, None] / 2
            return torch.cat((points - half, points + half), -1)
        return self._yolo_boxes()

    def yolov8_points(self) -> tuple[Tensor, Tensor]:
        """``(P, 2)`` anchor points (cell centres, input pixels) and ``(P,)`` their strides."""

        strides = tuple(self.params.get("strides", (8, 16, 32)))
        return anchor_points([(self.image_size // st, self.image_size // st) for st in strides], strides)

    def yolov8_predictions(self, batch: int, seed: int) -> tuple[Tensor, Tensor]:
        """What an untrained head predicts, seeded: class probabilities ``(B, P, C)`` uniform in
        [0, 1) and boxes ``(B, P, 4)`` xyxy pixels, each side 0.5-4 strides from its point."""
        points, strides = self.yolov8_points()
        gen = torch.Generator().manual_seed(seed)
        scores = torch.rand(batch, points.shape[0], max(self.num_classes, 1), generator=gen)
        dist = (torch.rand(batch, points.shape[0], 4, generator=gen) * 3.5 + 0.5) * strides[:, None]
        return scores, torch.cat((points - dist[..., :2], points + dist[..., 2:]), -1)

    def match_yolov8(self, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, seed: int, **options):
        """:func:`detloss.match_task_aligned` with YOLOv8's loss settings on :meth:`yolov8_predictions`."""
        points, strides = self.yolov8_points()
        scores, pred = self.yolov8_predictions(gt_boxes.shape[0], seed)
        levels = strides.unique()  # sorted: the floor is stride[1], as ultralytics 8.4
        kw = dict(topk=10, alpha=0.5, beta=6.0, min_box_side=float(levels[min(1, levels.numel() - 1)]))
        kw.update(options)
        labels = gt_labels.clamp(0, scores.shape[-1] - 1)
        return match_task_aligned(scores, pred, points, gt_boxes, labels, gt_valid, **kw)

    def yolo_anchors_px(self) -> Tensor:
        """``(S, A, 2)`` YOLOv3 anchor sizes in input pixels."""
        from .. import yolov3_anchors

        if "anchors" in self.params:
            return torch.tensor(self.params["anchors"], dtype=torch.float32)
        return yolov3_anchors()

    def _yolo_boxes(self) -> Tensor:
        strides = tuple(self.params.get("strides", (8, 16, 32)))
        anchors = self.yolo_anchors_px()
        out = []
        for stride, wh in zip(strides, anchors):
            n = self.image_size // stride
            ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            centre = (torch.stack((xs, ys), -1).reshape(-1, 1, 2).float() + 0.5) * stride
            centre = centre.expand(-1, wh.shape[0], 2)
            half = wh[None].expand_as(centre) / 2
            out.append(torch.cat((centre - half, centre + half), -1).reshape(-1, 4))
        return torch.cat(out)

    def anchor_shapes(self) -> np.ndarray:
        """``(K, 2)`` the distinct prior/anchor (w, h) in input pixels."""
        b = self.priors_xyxy().double().numpy()
        wh = np.round(b[:, 2:] - b[:, :2], 3)
        return np.unique(wh, axis=0)

    # ------------------------------------------------------------------ matching
    def assign(self, gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, seed: int = 0) -> Assignment:
        """Run the family matcher on ``gt_boxes (B, M, 4)`` xyxy input pixels (``seed``: the
        synthetic predictions of the task-aligned families)."""
        priors = self.priors_xyxy()
        b, m = gt_valid.shape
        iou = box_iou(gt_boxes, priors.expand(b, -1, -1)) if m else gt_boxes.new_zeros(b, 0, priors.shape[0])
        iou = torch.where(gt_valid[..., None], iou, torch.zeros_like(iou))
        if self.family in ("ssd", "retinaface"):
            s = float(self.image_size)
            match = match_priors(priors / s, gt_boxes / s, gt_valid, pos_iou=self.pos_iou,
                                 min_best_iou=self.min_best_iou, priors_format="xyxy")
            positive, ignored = match.positive, match.ignore
            matched = torch.where(positive, match.matched_gt, -1)
        elif self.family == "yolov8":
            match = self.match_yolov8(gt_boxes, gt_labels, gt_valid, seed)
            positive, ignored = match.foreground, torch.zeros_like(match.foreground)
            matched = torch.where(positive, match.matched_gt, -1)
        elif self.family == "retinanet":
            match = max_iou_match(priors, gt_boxes, gt_valid, pos_iou=self.pos_iou, neg_iou=self.neg_iou)
            positive, ignored = match.labels == 1, match.labels == -1
            matched = torch.where(positive, match.matched_gt, -1)
        else:
            strides = tuple(self.params.get("strides", (8, 16, 32)))
            anchors = self.yolo_anchors_px() / torch.tensor(strides, dtype=torch.float32).view(-1, 1, 1)
            res = assign_yolo_anchors(gt_boxes, gt_labels.clamp(min=0), gt_valid, num_classes=max(self.num_classes, 1),
                                      anchors=anchors, strides=strides, image_size=self.image_size,
                                      pos_iou=self.pos_iou)
            matched = torch.cat(res.winner, dim=1)
            positive = matched >= 0
            ignored = torch.zeros_like(positive)
        return Assignment(positive, ignored, matched, iou)

    def mine(self, assignment: Assignment, seed: int) -> Optional[Tensor]:
        """Hard negatives ``(B, P)`` bool chosen with random logits (``seed``) for the families
        that mine (SSD 3:1, RetinaFace 7:1); None for the others."""
        if self.neg_pos_ratio is None:
            return None
        b, p = assignment.positive.shape
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(b, p, self.num_classes, generator=gen)
        background_loss = -torch.log_softmax(logits, -1)[..., 0]
        return mine_hard_negatives(background_loss, assignment.positive, neg_pos_ratio=self.neg_pos_ratio,
                                   candidates=~assignment.ignored)


PRESETS: dict[str, Preset] = {
    "ssd300-voc": Preset("ssd300-voc", "ssd", 300, "stretch", pos_iou=0.5, neg_pos_ratio=3, num_classes=21),
    "retinaface-640": Preset("retinaface-640", "retinaface", 640, "stretch", pos_iou=0.35, min_best_iou=0.2,
                             neg_pos_ratio=7, num_classes=2),
    "yolov3-416": Preset("yolov3-416", "yolov3", 416, "letterbox", pos_iou=0.3, num_classes=80),
    "retinanet-800": Preset("retinanet-800", "retinanet", 800, "letterbox", pos_iou=0.5, neg_iou=0.4, num_classes=80),
    "yolov8-640": Preset("yolov8-640", "yolov8", 640, "letterbox", pos_iou=0.0, num_classes=80),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a :class:`CLIError` listing the known names otherwise."""
    if name not in PRESETS:
        raise CLIError(f"--preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def preset_from_config(cfg: dict, source: str = "config") -> Preset:
    """A :class:`Preset` from a JSON object.

    Keys: ``family`` (ssd | retinaface | retinanet | yolov3), ``image_size``; optional
    ``pos_iou``, ``neg_iou``, ``min_best_iou``, ``neg_pos_ratio``, ``resize`` (defaults: the
    family's preset). Layout keys per family: ssd ``feature_maps``, ``steps``, ``min_sizes``,
    ``max_sizes``, ``aspect_ratios`` (an :class:`~detloss.priors.SSDPriorConfig`);
    retinaface ``min_sizes``, ``steps``; retinanet ``strides``, ``sizes``, ``scales``,
    ``ratios``; yolov3 ``anchors`` (``[S][A][2]`` w, h in pixels), ``strides``.
    """
    if not isinstance(cfg, dict):
        raise CLIError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    family = cfg.get("family")
    if family not in FAMILIES:
        raise CLIError(f"{source}: 'family' must be one of {', '.join(FAMILIES)}, got {family!r}")
    base = next(p for p in PRESETS.values() if p.family == family)
    try:
        size = int(cfg.get("image_size", base.image_size))
        params: dict = {}
        if family == "ssd":
            keys = ("feature_maps", "steps", "min_sizes", "max_sizes", "aspect_ratios")
            missing = [k for k in keys if k not in cfg]
            if missing:
                raise CLIError(f"{source}: an ssd config needs {', '.join(missing)}")
            params["config"] = SSDPriorConfig(
                tuple(int(v) for v in cfg["feature_maps"]), size, tuple(int(v) for v in cfg["steps"]),
                tuple(float(v) for v in cfg["min_sizes"]), tuple(float(v) for v in cfg["max_sizes"]),
                tuple(tuple(int(a) for a in ars) for ars in cfg["aspect_ratios"]),
            )
        elif family == "retinaface":
            for k in ("min_sizes", "steps"):
                if k in cfg:
                    params[k] = tuple(tuple(v) if isinstance(v, list) else v for v in cfg[k])
        elif family == "retinanet":
            for k in ("strides", "sizes", "scales", "ratios"):
                if k in cfg:
                    params[k] = tuple(float(v) if k != "strides" else int(v) for v in cfg[k])
        else:
            if "anchors" in cfg:
                arr = np.asarray(cfg["anchors"], dtype=np.float64)
                if arr.ndim != 3 or arr.shape[-1] != 2 or (arr <= 0).any():
                    raise CLIError(f"{source}: 'anchors' must be [scales][anchors][w, h] positive pixels, got shape {arr.shape}")
                params["anchors"] = arr.tolist()
            if "strides" in cfg:
                params["strides"] = tuple(int(v) for v in cfg["strides"])
        preset = Preset(
            name=str(cfg.get("name", f"{family}-{size}")), family=family, image_size=size,
            resize=str(cfg.get("resize", base.resize)),
            pos_iou=float(cfg.get("pos_iou", base.pos_iou)),
            neg_iou=cfg.get("neg_iou", base.neg_iou), min_best_iou=cfg.get("min_best_iou", base.min_best_iou),
            neg_pos_ratio=cfg.get("neg_pos_ratio", base.neg_pos_ratio), num_classes=base.num_classes, params=params,
        )
        if preset.resize not in ("stretch", "letterbox"):
            raise CLIError(f"{source}: 'resize' must be 'stretch' or 'letterbox', got {preset.resize!r}")
        preset.priors_xyxy()  # build once so a bad layout fails here, with the library's message
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{source}: invalid {family} layout: {exc}") from None
    return preset


def to_input(boxes: np.ndarray, image_hw: tuple[int, int], preset: Preset) -> np.ndarray:
    """Map xyxy pixel boxes of an ``(H, W)`` image into the preset's input pixels."""
    h, w = image_hw
    s = preset.image_size
    if preset.resize == "stretch":
        scale = np.array([s / w, s / h, s / w, s / h], dtype=np.float32)
        return (boxes * scale).astype(np.float32)
    return (boxes * (s / max(h, w))).astype(np.float32)
