"""Catalogue of bad inputs across the public API: each raises ``ValueError``/``TypeError``
whose message names the argument and states what was expected.

One parametrised id per kind of mistake (``KINDS``); ``match`` holds the argument name and the
expectation text. The count of kinds is reported in the README.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import detloss
from detloss.compat import retinaface as compat_rf
from detloss.compat import ssd_pytorch as compat_ssd
from detloss.compat import ultralytics as compat_ul
from detloss.matching.rcnn_targets import proposal_targets

from .cases import make_case

pytestmark = pytest.mark.usefixtures("strategy", "single_thread")  # every test under both execution strategies



def _call(family, index, value, **kw):
    """Run ``family``'s loss with positional argument ``index`` replaced by ``value(old)``."""
    def run():
        case = make_case(family, **kw)
        case.args[index] = value(case.args[index])
        case.call()
    return run


def _ssd_labels_float():
    return _call("ssd", 4, lambda t: t.float())


def _yolo_heads(fn):
    return _call("yolov3", 0, fn)


def _ultralytics(key, value):
    """Call the ultralytics drop-in on a one-image 64 px batch with ``preds`` / ``batch`` entry ``key`` replaced."""
    def run():
        head = SimpleNamespace(stride=torch.tensor([8.0, 16.0, 32.0]), nc=3, reg_max=16)
        model = SimpleNamespace(args=SimpleNamespace(box=7.5, cls=0.5, dfl=1.5), model=[head],
                                parameters=lambda: iter([torch.zeros(1)]))
        feats = [torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
        preds = {"boxes": torch.zeros(1, 64, 84), "scores": torch.zeros(1, 3, 84), "feats": feats}
        batch = {"batch_idx": torch.zeros(1), "cls": torch.zeros(1, 1), "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
        (preds if key in preds else batch)[key] = value
        compat_ul.v8DetectionLoss(model)(preds, batch)
    return run


def _boxes(n=3):
    return torch.tensor([[0.1, 0.1, 0.4, 0.5]] * n)


KINDS = [
    # --- SSD / RetinaFace (normalised boxes)
    ("ssd-loc-pred-last-dim", _call("ssd", 0, lambda t: torch.cat((t, t[..., :1]), -1)), ValueError,
     r"box_pred: expected shape \(B, P, 4\), got \(2, 48, 5\)"),
    ("ssd-cls-logits-class-count", _call("ssd", 1, lambda t: torch.cat((t, t[..., :1]), -1)), ValueError,
     r"cls_logits: expected shape \(B=2, P=48, C=4\)"),
    ("ssd-priors-count", _call("ssd", 2, lambda t: t[:-1]), ValueError, r"priors: expected shape \(P=48, 4\)"),
    ("ssd-gt-batch-mismatch", _call("ssd", 3, lambda t: torch.cat((t, t[:1]))), ValueError,
     r"gt_boxes: expected shape \(B=2, M, 4\)"),
    ("ssd-gt-labels-float", _ssd_labels_float(), TypeError, r"gt_labels: expected an integer tensor"),
    ("ssd-gt-labels-range", _call("ssd", 4, lambda t: t + 3), ValueError, r"gt_labels: expected values in \[0, 2\]"),
    ("ssd-pixel-gt-boxes", _call("ssd", 3, lambda t: t * 300), ValueError,
     r"gt_boxes: expected normalised coordinates"),
    ("ssd-float-valid-mask", _call("ssd", 5, lambda t: t.float()), TypeError, r"gt_valid: expected a bool"),
    ("ssd-num-classes", lambda: detloss.SSDLoss(1), ValueError, r"num_classes: expected an integer >= 2"),
    ("ssd-normalize-by-choice", lambda: detloss.SSDLoss(4, normalize_by="mean"), ValueError,
     r"normalize_by: expected one of \('num_pos', 'none'\)"),
    ("ssd-negative-ratio", lambda: detloss.SSDLoss(4, neg_pos_ratio=-1), ValueError, r"neg_pos_ratio: expected a number >= 0"),
    ("retinaface-landmark-pred-dim", _call("retinaface", 2, lambda t: t[..., :8]), ValueError,
     r"landmark_pred: expected shape \(B=2, P=48, 10\)"),
    ("retinaface-has-landmarks-shape", _call("retinaface", 6, lambda t: t[:, :1]), ValueError,
     r"gt_has_landmarks: expected shape \(B=2, M=3\)"),
    ("retinaface-pos-iou", lambda: detloss.RetinaFaceLoss(pos_iou=-0.1), ValueError, r"pos_iou: expected a number > 0"),
    # --- YOLOv3 (pixel boxes, head maps)
    ("yolo-head-count", _yolo_heads(lambda h: h[:2]), ValueError, r"outputs: expected a sequence of 3 head maps"),
    ("yolo-head-channels", _yolo_heads(lambda h: [h[0][..., :-1], *h[1:]]), ValueError,
     r"outputs\[0\]: expected shape \(B, H, W, A\*\(5\+C\)\)"),
    ("yolo-head-spatial", _yolo_heads(lambda h: [h[0], h[1][:, :3], h[2]]), ValueError,
     r"outputs\[1\]: expected spatial size \(4, 4\)"),
    ("yolo-inverted-gt", _call("yolov3", 1, lambda t: t[..., [2, 3, 0, 1]]), ValueError, r"gt_boxes.*expected values in \[0, inf\]"),
    ("yolo-layout-choice", lambda: detloss.YOLOv3Loss(3, layout="nhcw"), ValueError, r"layout: expected one of"),
    ("yolo-anchors-shape", lambda: detloss.YOLOv3Loss(3, anchors=torch.ones(3, 3, 3)), ValueError,
     r"anchors: expected shape \(S=3, A, 2\)"),
    # --- RetinaNet / R-CNN (pixel boxes)
    ("retinanet-label-range", _call("retinanet", 4, lambda t: t + 3), ValueError, r"gt_labels: expected values in \[0, 2\]"),
    ("retinanet-anchor-width", _call("retinanet", 2, lambda t: torch.cat((t, t[:, :1]), -1)), ValueError,
     r"anchors: expected boxes of shape \(\*, 4\)"),
    ("retinanet-nan-gt", _call("retinanet", 3, lambda t: t.index_fill(2, torch.tensor([0]), float("inf"))), ValueError,
     r"gt_boxes: expected finite values"),
    ("retinanet-box-loss-choice", lambda: detloss.RetinaNetLoss(3, box_loss="iou"), ValueError, r"box_loss: expected one of"),
    ("rpn-image-size", _call("rpn", 5, lambda t: torch.ones(3, 2) * 64), ValueError, r"image_size: expected \(height, width\)"),
    ("rpn-objectness-shape", _call("rpn", 1, lambda t: torch.cat((t, t[..., :1]), -1)), ValueError,
     r"cls_logits: expected shape \(B=2, A=128, 2\)"),
    ("rcnn-box-pred-shape", _call("rcnn", 0, lambda t: t[..., :5]), ValueError, r"box_pred: expected shape \(B=2, S=8, 4\)"),
    ("proposal-label-range",
     lambda: proposal_targets(_boxes()[None] * 64, _boxes(1)[None] * 64, torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.bool),
                              num_classes=4), ValueError, r"gt_labels: expected values in \[1, 3\]"),
    # --- DETR (normalised cxcywh boxes, predictions (L, B, Q, ...))
    ("detr-label-range", _call("detr", 3, lambda t: t + 3), ValueError, r"gt_labels: expected values in \[0, 2\]"),
    ("detr-pixel-gt-boxes", _call("detr", 2, lambda t: t * 640), ValueError, r"gt_boxes: expected normalised coordinates"),
    ("detr-logits-class-count", _call("detr", 1, lambda t: t[..., :3]), ValueError, r"cls_logits: expected shape \(L=3, B=2, Q=6, 4\)"),
    ("detr-unstacked-layers", _call("detr", 0, lambda t: t[0]), ValueError, r"box_pred: expected shape \(L, B, Q, 4\)"),
    ("detr-matching-cost-shape", lambda: detloss.match_hungarian(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool)), ValueError,
     r"cost: expected shape \(N, Q, M\)"),
    # --- YOLOv8 (pixel boxes, anchor points) and its ultralytics drop-in
    ("yolov8-label-range", _call("yolov8", 5, lambda t: t + 3), ValueError, r"gt_labels: expected values in \[0, 2\]"),
    ("yolov8-box-channels", _call("yolov8", 0, lambda t: t[..., :-1]), ValueError, r"box_pred: expected shape \(B, A, 32\)"),
    ("yolov8-anchor-count", _call("yolov8", 2, lambda t: t[:-1]), ValueError, r"anchor_points: expected shape \(A=84, 2\)"),
    ("yolov8-gt-outside-image", lambda: make_case("yolov8").call(image_size=(32, 32)), ValueError,
     r"gt_boxes \(x\): expected values in \[0, 32\]"),
    ("yolov8-matcher-topk", lambda: detloss.match_task_aligned(torch.rand(1, 4, 2), torch.rand(1, 4, 4), torch.rand(4, 2),
                                                               torch.rand(1, 1, 4), torch.zeros(1, 1, dtype=torch.long),
                                                               torch.ones(1, 1, dtype=torch.bool), topk=0),
     ValueError, r"topk: expected a positive integer"),
    ("ultralytics-cls-range", _ultralytics("cls", torch.full((1, 1), 3.0)), ValueError,
     r"batch\['cls'\]: expected values in \[0, 2\]"),
    ("ultralytics-bboxes-outside", _ultralytics("bboxes", torch.tensor([[0.5, 1.5, 0.2, 0.2]])), ValueError,
     r"batch\['bboxes'\]: expected values in \[0, 1\]"),
    ("ultralytics-box-channels", _ultralytics("boxes", torch.zeros(1, 60, 84)), ValueError,
     r"preds\['boxes'\]: expected shape \(B, 64, 84\)"),
    # --- building blocks
    ("pad-label-count", lambda: detloss.pad_ground_truth([_boxes(2)], [torch.tensor([1])]), ValueError,
     r"labels\[0\]: expected 2 labels"),
    ("pad-box-width", lambda: detloss.pad_ground_truth([torch.ones(2, 5)], [torch.tensor([1, 2])]), ValueError,
     r"boxes\[0\]: expected shape \(n, 4\)"),
    ("match-gt-rank", lambda: detloss.match_priors(torch.rand(5, 4), _boxes(), torch.ones(1, 3, dtype=torch.bool), pos_iou=0.5),
     ValueError, r"gt_boxes: expected shape \(B, M, 4\), got \(3, 4\)"),
    ("max-iou-thresholds", lambda: detloss.max_iou_match(_boxes(), _boxes()[None], torch.ones(1, 3, dtype=torch.bool), pos_iou=0.4, neg_iou=0.5),
     ValueError, r"neg_iou: expected at most pos_iou=0.4"),
    ("sampler-label-values", lambda: detloss.sample_balanced(torch.full((1, 5), 2)), ValueError,
     r"labels: expected values in \[-1, 1\]"),
    ("sampler-fraction", lambda: detloss.sample_balanced(torch.zeros(1, 5, dtype=torch.int64), 4, 1.5), ValueError,
     r"positive_fraction: expected a value in \[0, 1\]"),
    ("mining-ratio", lambda: detloss.mine_hard_negatives(torch.rand(1, 5), torch.zeros(1, 5, dtype=torch.bool), neg_pos_ratio=-2),
     ValueError, r"neg_pos_ratio: expected a number >= 0"),
    ("iou-chunk-size", lambda: detloss.box_iou(_boxes(), _boxes(), chunk_size=0), ValueError,
     r"chunk_size: expected None or a positive integer"),
    # --- drop-ins that take lists
    ("ssd-pytorch-target-width", lambda: compat_ssd.MultiBoxLoss(4, 0.5, True, 0, True, 3, 0.5, False)(
        tuple(make_case("ssd", batch=1).args[:3]), [torch.ones(2, 4)]), ValueError, r"targets\[0\]: expected shape \(n, 5\)"),
    ("ssd-pytorch-target-count", lambda: compat_ssd.MultiBoxLoss(4, 0.5, True, 0, True, 3, 0.5, False)(
        tuple(make_case("ssd", batch=2).args[:3]), [torch.zeros(0, 5)]), ValueError, r"targets: expected one tensor per image \(2\)"),
    ("retinaface-target-label", lambda: compat_rf.MultiBoxLoss(2, 0.35, True, 0, True, 7, 0.35, False)(
        tuple(make_case("retinaface", batch=1).args[:3]), make_case("retinaface", batch=1).args[3],
        [torch.cat((_boxes(1), torch.zeros(1, 10), torch.full((1, 1), 2.0)), 1)]), ValueError,
     r"targets\[0\]\[:, 14\]: expected labels 1"),
]


@pytest.mark.parametrize("call,error,match", [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])
def test_bad_input_names_argument_and_expectation(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_catalogue_size():
    assert len({k[0] for k in KINDS}) == len(KINDS) >= 20
