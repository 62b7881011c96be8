"""``detloss demo --loss yolo26``: the two-branch head, its schedule, NMS-free predictions, a tiny run."""
from __future__ import annotations

import json
import os

import pytest
import torch

from detloss import YOLOv8Loss, box_iou
from detloss.cli import main
from detloss.cli.data import collate, make_synthetic
from detloss.cli.heads import YOLO26Head

matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("pycocotools")
pytest.importorskip("tqdm")


def test_head_loss_follows_the_schedule():
    torch.manual_seed(0)
    head = YOLO26Head(3, 64)
    batch = collate(make_synthetic(2, 64, 0), [0, 1])
    g = torch.Generator().manual_seed(1)
    raw = {"box": torch.rand(2, 84, 4, generator=g) * 3 + 0.5, "cls": torch.randn(2, 84, 3, generator=g),
           "box_o2o": torch.rand(2, 84, 4, generator=g) * 3 + 0.5, "cls_o2o": torch.randn(2, 84, 3, generator=g)}
    args = (head.points, head.strides, batch.boxes, batch.labels.clamp(min=0), batch.valid)
    many = YOLOv8Loss(3, reg_max=1, topk=10)(raw["box"], raw["cls"], *args, image_size=(64, 64))["loss"]
    one = YOLOv8Loss(3, reg_max=1, topk=7, topk2=1)(raw["box_o2o"], raw["cls_o2o"], *args, image_size=(64, 64))["loss"]
    for progress, w in ((0.0, 0.8), (0.5, 0.8 - 0.7 * 49.5 / 99), (1.0, 0.1)):
        head.progress = progress
        torch.testing.assert_close(head.loss(raw, batch)["loss"], w * many + (1 - w) * one)


def test_predictions_are_nms_free():
    head = YOLO26Head(2, 64)
    raw = {"box_o2o": torch.full((1, 84, 4), 4.0), "cls_o2o": torch.full((1, 84, 2), -10.0)}
    raw["cls_o2o"][0, :2, 0] = 5.0  # two neighbouring anchors, the same class
    boxes = head.decode(raw["box_o2o"])[0, :2]
    assert float(box_iou(boxes[:1], boxes[1:])) > 0.7  # NMS at 0.5 would drop one of them
    det = head.predict(raw)[0]
    assert det.scores.shape[0] == 2 and bool((det.scores > 0.99).all())


def test_tiny_demo_run(tmp_path):
    out = str(tmp_path / "run")
    assert main(["demo", "--loss", "yolo26", "--steps", "3", "--train-images", "16", "--val-images", "8",
                 "--image-size", "64", "--batch-size", "4", "--threads", "1", "--no-progress", "--out", out]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["loss"] == "yolo26" and metrics["steps"] == 3 and 0.0 <= metrics["mAP50"] <= 1.0
    assert {"loss", "loss_box", "loss_cls", "loss_dfl", "one2one_loss"} <= set(metrics["final_losses"])
