"""One head per loss family: prediction layers, priors/anchors, the native loss, decoding.

Every head is an ``nn.Module`` with

* ``forward(features) -> dict`` raw predictions (what the network outputs),
* ``loss(raw, batch) -> dict`` the family's detloss loss (``"loss"`` plus components),
* ``predict(raw) -> list[Detections]`` decoded boxes (xyxy pixels), scores, labels.

Ground truth arrives as a :class:`detloss.cli.data.Batch` (xyxy pixels of the ``S x S``
input, labels in ``[0, C-1]``); each head converts it to its family's convention (normalised
coordinates and ``label + 1`` columns for SSD, ...), as its module docstring prescribes.
"""
from __future__ import annotations

import importlib
import inspect as _inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import decode_boxes, decode_deltas, decode_landmarks, decode_yolo, retinaface_priors, retinanet_anchors, ssd_priors
from ..priors import SSDPriorConfig, anchor_points
from .data import Batch
from .models import STRIDES, LevelPredictor, conv_block
from .postprocess import Detections, batched_nms, select_detections


def family_loss(head: type) -> type:
    """The detloss loss class a head uses (``head.loss_module``, ``head.loss_name``)."""
    return getattr(importlib.import_module(head.loss_module), head.loss_name)


def make_loss(head: type, distributed: bool, **kwargs: Any) -> nn.Module:
    """Build ``head``'s family loss, passing ``distributed`` when the family has the option
    (Faster R-CNN has none: its terms are means over fixed-size samples per image, which DDP's
    gradient average already turns into the global mean)."""
    cls = family_loss(head)
    if "distributed" in _inspect.signature(cls).parameters:
        kwargs["distributed"] = distributed
    return cls(**kwargs)


def demo_ssd_config(image_size: int) -> SSDPriorConfig:
    """SSD priors for an ``S x S`` demo input: maps of stride 8/16/32, four priors per cell
    (two squares, 2:1 and 1:2) sized for objects of 8-75% of the image side."""
    s = image_size
    return SSDPriorConfig(
        feature_maps=tuple(s // st for st in STRIDES),
        image_size=s,
        steps=STRIDES,
        min_sizes=(0.12 * s, 0.25 * s, 0.45 * s),
        max_sizes=(0.25 * s, 0.45 * s, 0.75 * s),
        aspect_ratios=((2,), (2,), (2,)),
    )


class SSDHead(nn.Module):
    """SSD: softmax over ``C + 1`` columns (background first), variance-coded boxes on
    normalised ``cxcywh`` priors; :class:`detloss.SSDLoss` with hard negative mining."""

    loss_module, loss_name = "detloss.detectors.ssd", "SSDLoss"

    def __init__(self, num_classes: int, image_size: int, width: int = 64, distributed: bool = False) -> None:
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        cfg = demo_ssd_config(image_size)
        self.register_buffer("priors", ssd_priors(cfg), persistent=False)
        per_level = [2 + 2 * len(a) for a in cfg.aspect_ratios]
        self.loc = LevelPredictor(width, per_level, 4)
        self.cls = LevelPredictor(width, per_level, num_classes + 1)
        self.criterion = make_loss(SSDHead, distributed, num_classes=num_classes + 1)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return {"loc": self.loc(features), "cls": self.cls(features)}

    def loss(self, raw: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        return self.criterion(
            raw["loc"], raw["cls"], self.priors,
            batch.boxes / self.image_size, batch.labels.clamp(min=0), batch.valid,
        )

    def predict(self, raw: dict[str, Tensor]) -> list[Detections]:
        boxes = decode_boxes(raw["loc"].float(), self.priors) * self.image_size
        scores = raw["cls"].float().softmax(-1)[..., 1:]
        return select_detections(boxes, scores, image_size=self.image_size)


class RetinaNetHead(nn.Module):
    """RetinaNet: sigmoid scores for ``C`` classes (no background column), R-CNN deltas on
    ``xyxy`` pixel anchors (9 per cell); :class:`detloss.RetinaNetLoss` (focal + box)."""

    loss_module, loss_name = "detloss.detectors.retinanet", "RetinaNetLoss"

    def __init__(self, num_classes: int, image_size: int, width: int = 64, distributed: bool = False) -> None:
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        sizes = tuple(image_size * f for f in (0.125, 0.25, 0.5))
        self.register_buffer(
            "anchors", retinanet_anchors(image_size, strides=STRIDES, sizes=sizes), persistent=False
        )
        prior_bias = -math.log((1 - 0.01) / 0.01)
        self.box = LevelPredictor(width, [9] * 3, 4)
        self.cls = LevelPredictor(width, [9] * 3, num_classes, bias=prior_bias)
        self.criterion = make_loss(RetinaNetHead, distributed, num_classes=num_classes)
        self.coder = dict(self.criterion.coder)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return {"box": self.box(features), "cls": self.cls(features)}

    def loss(self, raw: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        return self.criterion(
            raw["box"], raw["cls"], self.anchors, batch.boxes, batch.labels.clamp(min=0), batch.valid
        )

    def predict(self, raw: dict[str, Tensor]) -> list[Detections]:
        boxes = decode_deltas(raw["box"].float(), self.anchors, **self.coder)
        return select_detections(boxes, raw["cls"].float().sigmoid(), image_size=self.image_size)


class YOLOv3Head(nn.Module):
    """YOLOv3: per scale ``(B, A * (5 + C), H, W)`` maps (``layout="nchw"``), three anchors per
    scale sized for the demo's objects; :class:`detloss.YOLOv3Loss` (GIoU, focal objectness).
    Score = sigmoid(objectness) * sigmoid(class)."""

    loss_module, loss_name = "detloss.detectors.yolov3", "YOLOv3Loss"
    # anchor (w, h) as fractions of the image side, per stride 8 / 16 / 32
    ANCHOR_FRACTIONS = (((0.12, 0.12), (0.09, 0.18), (0.18, 0.09)),
                        ((0.25, 0.25), (0.18, 0.36), (0.36, 0.18)),
                        ((0.45, 0.45), (0.33, 0.62), (0.62, 0.33)))

    def __init__(self, num_classes: int, image_size: int, width: int = 64, distributed: bool = False) -> None:
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        strides = torch.tensor(STRIDES, dtype=torch.float32).view(-1, 1, 1)
        anchors = torch.tensor(self.ANCHOR_FRACTIONS) * image_size / strides  # grid units
        self.register_buffer("anchors", anchors, persistent=False)
        channels = 3 * (5 + num_classes)
        self.tower = nn.ModuleList(conv_block(width, width) for _ in STRIDES)
        self.out = nn.ModuleList(nn.Conv2d(width, channels, 1) for _ in STRIDES)
        for conv in self.out:
            nn.init.normal_(conv.weight, std=0.01)
            bias = torch.zeros(3, 5 + num_classes)
            bias[:, 4] = -4.0  # objectness starts low: most cells are background
            conv.bias.data.copy_(bias.flatten())
        self.criterion = make_loss(YOLOv3Head, distributed, num_classes=num_classes, anchors=anchors,
                                   strides=STRIDES, layout="nchw")

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return {f"p{k}": out(tower(f)) for k, (f, tower, out) in enumerate(zip(features, self.tower, self.out))}

    def loss(self, raw: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        maps = [raw[f"p{k}"] for k in range(len(STRIDES))]
        return self.criterion(maps, batch.boxes, batch.labels.clamp(min=0), batch.valid)

    def predict(self, raw: dict[str, Tensor]) -> list[Detections]:
        boxes, scores = [], []
        for k, stride in enumerate(STRIDES):
            x = raw[f"p{k}"].float()
            b, _, h, w = x.shape
            x = x.view(b, 3, 5 + self.num_classes, h, w).permute(0, 3, 4, 1, 2)  # (B, H, W, A, 5 + C)
            cxcywh = decode_yolo(x[..., :4], self.anchors[k], stride).reshape(b, -1, 4)
            boxes.append(torch.cat((cxcywh[..., :2] - cxcywh[..., 2:] / 2, cxcywh[..., :2] + cxcywh[..., 2:] / 2), -1))
            scores.append((x[..., 4:5].sigmoid() * x[..., 5:].sigmoid()).reshape(b, -1, self.num_classes))
        return select_detections(torch.cat(boxes, 1), torch.cat(scores, 1), image_size=self.image_size)


class YOLOv8Head(nn.Module):
    """YOLOv8: anchor-free, one point per cell of the stride 8 / 16 / 32 maps; each box side a
    distribution over ``REG_MAX`` bins (distances in cells), sigmoid class scores (no
    objectness); :class:`detloss.YOLOv8Loss` (task-aligned assignment, BCE on soft scores,
    CIoU, DFL)."""

    loss_module, loss_name = "detloss.detectors.yolov8", "YOLOv8Loss"
    REG_MAX = 16

    def __init__(self, num_classes: int, image_size: int, width: int = 64, distributed: bool = False) -> None:
        super().__init__()

        self.num_classes, self.image_size = num_classes, image_size
        points, strides = anchor_points([(image_size // s, image_size // s) for s in STRIDES], STRIDES)
        self.register_buffer("points", points, persistent=False)
        self.register_buffer("strides", strides, persistent=False)
        self.box = LevelPredictor(width, [1] * 3, 4 * self.REG_MAX)
        self.cls = LevelPredictor(width, [1] * 3, num_classes, bias=-math.log((1 - 0.01) / 0.01))
        self.criterion = make_loss(YOLOv8Head, distributed, num_classes=num_classes, reg_max=self.REG_MAX)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return {"box": self.box(features), "cls": self.cls(features)}

    def loss(self, raw: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        return self.criterion(raw["box"], raw["cls"], self.points, self.strides, batch.boxes,
                              batch.labels.clamp(min=0), batch.valid)

    def decode(self, box: Tensor) -> Tensor:
        """``(B, A, 4 * REG_MAX)`` distributions -> ``(B, A, 4)`` xyxy input pixels."""
        from ..detectors.yolov8 import decode_distances

        dist = decode_distances(box.float(), self.REG_MAX) * self.strides[:, None]
        return torch.cat((self.points - dist[..., :2], self.points + dist[..., 2:]), -1)

    def predict(self, raw: dict[str, Tensor]) -> list[Detections]:
        return select_detections(self.decode(raw["box"]), raw["cls"].float().sigmoid(), image_size=self.image_size)


class YOLO26Head(nn.Module):
    """YOLO26 (end to end, NMS-free): two anchor-free branches on the same maps, one-to-many and
    one-to-one (the latter on detached features, as YOLO26 does), each side a plain distance in
    cells (``reg_max = 1``, softplus so it stays positive); :class:`detloss.YOLO26Loss` with the
    branch weights of :func:`detloss.yolo26_branch_weights` at the training progress the loop sets
    in ``progress`` (0 -> 1). Predictions come from the one-to-one branch without NMS."""

    loss_module, loss_name = "detloss.detectors.yolo26", "YOLO26Loss"
    SCHEDULE_EPOCHS = 100  # the schedule's length; the head maps training progress onto it

    def __init__(self, num_classes: int, image_size: int, width: int = 64, distributed: bool = False) -> None:
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        points, strides = anchor_points([(image_size // s, image_size // s) for s in STRIDES], STRIDES)
        self.register_buffer("points", points, persistent=False)
        self.register_buffer("strides", strides, persistent=False)
        prior = -math.log((1 - 0.01) / 0.01)
        self.box = LevelPredictor(width, [1] * 3, 4, bias=1.0)
        self.cls = LevelPredictor(width, [1] * 3, num_classes, bias=prior)
        self.box_o2o = LevelPredictor(width, [1] * 3, 4, bias=1.0)
        self.cls_o2o = LevelPredictor(width, [1] * 3, num_classes, bias=prior)
        self.criterion = make_loss(YOLO26Head, distributed, num_classes=num_classes, epochs=self.SCHEDULE_EPOCHS,
                                   reg_max=1)
        self.progress = 0.0

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        detached = [f.detach() for f in features]
        return {"box": F.softplus(self.box(features)), "cls": self.cls(features),
                "box_o2o": F.softplus(self.box_o2o(detached)), "cls_o2o": self.cls_o2o(detached)}

    def loss(self, raw: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        epoch = min(max(self.progress, 0.0), 1.0) * (self.SCHEDULE_EPOCHS - 1)
        out = self.criterion((raw["box"], raw["box_o2o"]), (raw["cls"], raw["cls_o2o"]), self.points, self.strides,
                             batch.boxes, batch.labels.clamp(min=0), batch.valid, epoch=epoch,
                             image_size=(self.image_size, self.image_size))
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}

    def decode(self, box: Tensor) -> Tensor:
        """``(B, A, 4)`` distances in cells -> ``(B, A, 4)`` xyxy input pixels."""
        dist = box.float() * self.strides[:, None]
        return torch.cat((self.points - dist[..., :2], self.points + dist[..., 2:]), -1)

    def predict(self, raw: dict[str, Tensor]) -> list[Detections]:
        # NMS-free: the one-to-one branch's best (box, class) pairs as they are (an IoU threshold
        # above 1 suppresses nothing)
        return select_detections(self.decode(raw["box_o2o"]), raw["cls_o2o"].float().sigmoid(),
                                 image_size=self.image_size, iou_threshold=1.01)


class RetinaFaceHead(nn.Module):
    """RetinaFace: background/face softmax, variance-coded boxes and five landmarks on square
    normalised priors (two per cell and level); :class:`detloss.RetinaFaceLoss`."""

    loss_module, loss_name = "detloss.detectors.retinaface", "RetinaFaceLoss"

    def __init__(self, num_classes: int, image_size: int, width: int = 64, distributed: bool = False) -> None:
        super().__init__()
        if num_classes != 1:
            raise ValueError(f"num_classes: RetinaFace detects one class (faces), got {num_classes}")
        self.num_classes, self.image_size = 1, image_size
        min_sizes = tuple(tuple(max(4, round(image_size * f)) for f in pair)
                          for pair in ((0.12, 0.19), (0.28, 0.4), (0.55, 0.78)))
        self.register_buffer("priors", retinaface_priors(image_size, min_sizes=min_sizes, steps=STRIDES),
                             persistent=False)
        self.loc = LevelPredictor(width, [2] * 3, 4)
        self.cls = LevelPredictor(width, [2] * 3, 2)
        self.landmarks = LevelPredictor(width, [2] * 3, 10)
        self.criterion = make_loss(RetinaFaceHead, distributed)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return {"loc": self.loc(features), "cls": self.cls(features), "landmarks": self.landmarks(features)}

    def loss(self, raw: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        s = self.image_size
        return self.criterion(raw["loc"], raw["cls"], raw["landmarks"], self.priors, batch.boxes / s,
                              batch.landmarks / s, batch.has_landmarks, batch.valid)

    def predict(self, raw: dict[str, Tensor]) -> list[Detections]:
        s = self.image_size
        boxes = decode_boxes(raw["loc"].float(), self.priors) * s
        points = decode_landmarks(raw["landmarks"].float(), self.priors) * s
        scores = raw["cls"].float().softmax(-1)[..., 1:]
        return select_detections(boxes, scores, image_size=s, extras=points)


def roi_features(feature: Tensor, rois: Tensor, stride: int, output: int = 7) -> Tensor:
    """RoI pooling by bilinear sampling (``grid_sample``): ``feature (B, C, H, W)`` of the
    given stride, ``rois (B, R, 4)`` xyxy input pixels -> ``(B, R, C * output**2)``, one sample
    at the centre of each of the ``output x output`` bins."""
    b, c, h, w = feature.shape
    r = rois.shape[1]
    t = (torch.arange(output, device=rois.device, dtype=rois.dtype) + 0.5) / output  # (O,)
    x1, y1, x2, y2 = rois.unbind(-1)
    xs = x1[..., None] + (x2 - x1)[..., None] * t  # (B, R, O)
    ys = y1[..., None] + (y2 - y1)[..., None] * t
    gx = xs / (w * stride) * 2 - 1
    gy = ys / (h * stride) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[..., None, :], gy[..., :, None]), dim=-1)  # (B, R, O, O, 2)
    sampled = F.grid_sample(feature, grid.reshape(b, r * output, output, 2).to(feature.dtype),
                            mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, C, R*O, O)
    return sampled.view(b, c, r, output, output).permute(0, 2, 1, 3, 4).reshape(b, r, -1)


class FasterRCNNHead(nn.Module):
    """Faster R-CNN: an RPN (9 anchors per cell on the stride-16 map, 2-way softmax), proposals
    by decoding + NMS, ROIs sampled by :func:`detloss.proposal_targets`,
    RoI features pooled with ``grid_sample`` from the stride-8 map, a two-layer MLP with
    class-specific boxes; :class:`detloss.FasterRCNNLoss`. R-CNN labels are ``label + 1``
    (0 is background)."""

    loss_module, loss_name = "detloss.detectors.faster_rcnn", "FasterRCNNLoss"
    PRE_NMS, TRAIN_PROPOSALS, TEST_PROPOSALS, ROIS_PER_IMAGE = 300, 64, 100, 64

    def __init__(self, num_classes: int, image_size: int, width: int = 64, distributed: bool = False) -> None:
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        sizes = (image_size * 0.3,)
        self.register_buffer("anchors", retinanet_anchors(image_size, strides=(16,), sizes=sizes,
                                                          scales=(0.6, 1.2, 2.4)), persistent=False)
        self.rpn = LevelPredictor(width, [9], 6)  # 2 objectness logits + 4 deltas per anchor
        self.fc = nn.Sequential(nn.Linear(width * 49, 256), nn.ReLU(inplace=True), nn.Linear(256, 256), nn.ReLU(inplace=True))
        self.cls = nn.Linear(256, num_classes + 1)
        self.box = nn.Linear(256, 4 * (num_classes + 1))
        nn.init.normal_(self.box.weight, std=0.001)
        nn.init.zeros_(self.box.bias)
        self.criterion = make_loss(FasterRCNNHead, distributed)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        rpn = self.rpn([features[1]])
        return {"rpn_cls": rpn[..., :2], "rpn_box": rpn[..., 2:], "p3": features[0]}

    @torch.no_grad()
    def proposals(self, raw: dict[str, Tensor], count: int) -> tuple[Tensor, Tensor]:
        """Top ``count`` RPN proposals per image after NMS (0.7): ``(B, count, 4)`` xyxy pixels
        (padded with zero boxes) and ``(B, count)`` valid."""
        boxes = decode_deltas(raw["rpn_box"].float(), self.anchors).clamp(0, self.image_size)
        scores = raw["rpn_cls"].float().softmax(-1)[..., 1]
        b = boxes.shape[0]
        out = boxes.new_zeros(b, count, 4)
        valid = torch.zeros(b, count, dtype=torch.bool, device=boxes.device)
        for i in range(b):  # the CLI may loop: proposals are not part of any loss
            top, idx = scores[i].topk(min(self.PRE_NMS, scores.shape[1]))
            cand = boxes[i][idx]
            big = ((cand[:, 2:] - cand[:, :2]) >= 2).all(-1)
            cand, top = cand[big], top[big]
            keep = batched_nms(cand, top, torch.zeros_like(top, dtype=torch.int64), 0.7)[:count]
            out[i, : len(keep)] = cand[keep]
            valid[i, : len(keep)] = True
        return out, valid

    def roi_head(self, p3: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        x = self.fc(roi_features(p3, rois, STRIDES[0]))
        return self.cls(x), self.box(x)

    def loss(self, raw: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        from ..matching.rcnn_targets import RCNN_STDS, proposal_targets

        props, valid = self.proposals(raw, self.TRAIN_PROPOSALS)
        targets = proposal_targets(props, batch.boxes, batch.labels.clamp(min=0) + 1, batch.valid, valid,
                                   num_samples=self.ROIS_PER_IMAGE, append_gt=True, stds=RCNN_STDS,
                                   generator=self.generator)
        cls_logits, box_pred = self.roi_head(raw["p3"], targets.rois.detach())
        size = (self.image_size, self.image_size)
        return self.criterion(raw["rpn_box"], raw["rpn_cls"], self.anchors, batch.boxes, batch.valid, size,
                              box_pred, cls_logits, targets, generator=self.generator)

    def predict(self, raw: dict[str, Tensor]) -> list[Detections]:
        from ..matching.rcnn_targets import RCNN_STDS

        rois, valid = self.proposals(raw, self.TEST_PROPOSALS)
        cls_logits, box_pred = self.roi_head(raw["p3"], rois)
        c = self.num_classes + 1
        boxes = decode_deltas(box_pred.float().unflatten(-1, (c, 4)), rois[:, :, None, :], stds=RCNN_STDS)
        scores = cls_logits.float().softmax(-1)[..., 1:] * valid[..., None]
        return select_detections(boxes[:, :, 1:], scores, image_size=self.image_size)


HEADS: dict[str, type[nn.Module]] = {
    "ssd": SSDHead,
    "retinanet": RetinaNetHead,
    "yolov3": YOLOv3Head,
    "yolov8": YOLOv8Head,
    "yolo26": YOLO26Head,
    "fasterrcnn": FasterRCNNHead,
    "retinaface": RetinaFaceHead,
}


def available_families() -> tuple[str, ...]:
    """The heads whose detloss loss can be imported in this installation."""
    out = []
    for name, head in HEADS.items():
        try:
            family_loss(head)
        except (ImportError, AttributeError):
            continue
        out.append(name)
    return tuple(out)
