"""COCO mAP of a detector on held-out images, with pycocotools' ``COCOeval``."""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .data import Dataset, collate
from .postprocess import Detections


def coco_ground_truth(dataset: Dataset) -> dict:
    """The data set's boxes as a COCO ``dict`` (ids from 1; ``bbox`` is ``[x, y, w, h]`` pixels)."""
    images, annotations = [], []
    for i in range(len(dataset)):
        images.append({"id": i + 1, "width": dataset.image_size, "height": dataset.image_size})
        for box, label in zip(dataset.boxes[i], dataset.labels[i]):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0,
            })
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(dataset.class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_results(detections: Sequence[Detections]) -> list[dict]:
    """Detections (image ``i`` is COCO image id ``i + 1``) as COCO result records."""
    out = []
    for i, det in enumerate(detections):
        b = det.boxes.double().numpy()
        for box, score, label in zip(b, det.scores.tolist(), det.labels.tolist()):
            out.append({
                "image_id": i + 1, "category_id": int(label) + 1, "score": float(score),
                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
            })
    return out


def coco_map(dataset: Dataset, detections: Sequence[Detections]) -> dict[str, float]:
    """``{"mAP": AP@[.5:.95], "mAP50": AP@.5, "mAP75", "mAP_small/medium/large"}`` in ``[0, 1]``.

    Categories absent from the ground truth count as pycocotools counts them (ignored);
    an empty detection list scores 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    keys = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large")
    results = coco_results(detections)
    if not results:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_ground_truth(dataset)
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a size bucket has no ground truth: report 0 there.
    return {k: float(max(v, 0.0)) for k, v in zip(keys, np.asarray(ev.stats[:6]))}


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: Dataset, batch_size: int = 32) -> list[Detections]:
    """Run ``model`` (a :class:`detloss.cli.models.Detector`) over ``dataset`` in eval mode."""
    was_training = model.training
    model.eval()
    out: list[Detections] = []
    for start in range(0, len(dataset), batch_size):
        batch = collate(dataset, range(start, min(start + batch_size, len(dataset))))
        out.extend(model.head.predict(model(batch.images)))
    model.train(was_training)
    return out
