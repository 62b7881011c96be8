"""Bad input to every public foundation function: the error type, and a message that names
the argument and the expected and received shape / dtype / value."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import detloss as D
from detloss import functional as F

B = torch.rand(5, 4)  # valid-looking float boxes
B3 = torch.rand(5, 3)  # wrong last dimension
BI = torch.zeros(5, 4, dtype=torch.long)  # integer boxes
NAN = B.clone()
NAN[1, 2] = float("nan")
INF = B.clone()
INF[0, 0] = float("inf")
LBL = torch.zeros(5, dtype=torch.long)
RAW = torch.rand(2, 3, 3, 3, 4)
ANC = torch.rand(3, 2)


def s(text: str) -> str:
    """Regex for a literal message fragment."""
    return re.escape(text)


CASES = {
    # ------------------------------------------------------------------ boxes
    "cxcywh_to_xyxy last dim": (lambda: D.cxcywh_to_xyxy(B3), ValueError, s("boxes: expected boxes of shape (..., 4), got (5, 3)")),
    "xyxy_to_cxcywh last dim": (lambda: D.xyxy_to_cxcywh(B3), ValueError, s("boxes: expected boxes of shape (..., 4), got (5, 3)")),
    "xywh_to_xyxy rank 0": (lambda: D.xywh_to_xyxy(torch.tensor(1.0)), ValueError, s("boxes: expected boxes of shape (..., 4), got ()")),
    "xyxy_to_xywh not a tensor": (lambda: D.xyxy_to_xywh([0, 0, 1, 1]), TypeError, s("boxes: expected a torch.Tensor, got list")),
    "box_convert bad format": (lambda: D.box_convert(B, "xyxy", "yolo"), ValueError, s("out_fmt: expected one of ('xyxy', 'cxcywh', 'xywh'), got 'yolo'")),
    "box_convert bad in format": (lambda: D.box_convert(B, "ltrb", "xyxy"), ValueError, s("in_fmt: expected one of") + ".*'ltrb'"),
    "box_convert last dim": (lambda: D.box_convert(B3, "xyxy", "cxcywh"), ValueError, s("boxes: expected boxes of shape (..., 4), got (5, 3)")),
    "box_convert integer": (lambda: D.box_convert(BI, "xyxy", "cxcywh"), TypeError, s("boxes: expected a floating-point tensor, got dtype torch.int64")),
    "box_area integer": (lambda: D.box_area(BI), TypeError, s("boxes: expected a floating-point tensor, got dtype torch.int64")),
    "box_area last dim": (lambda: D.box_area(B3), ValueError, s("boxes: expected boxes of shape (..., 4), got (5, 3)")),
    "box_iou last dim": (lambda: D.box_iou(B, B3), ValueError, s("boxes2: expected boxes of shape (..., 4), got (5, 3)")),
    "box_iou rank": (lambda: D.box_iou(torch.rand(4), B), ValueError, s("boxes1, boxes2: expected shapes (..., N, 4) and (..., M, 4), got (4,) and (5, 4)")),
    "box_iou batch mismatch": (lambda: D.box_iou(torch.rand(2, 5, 4), torch.rand(3, 5, 4)), ValueError, s("expected equal leading (batch) dimensions, got (2,) and (3,)")),
    "box_iou integer": (lambda: D.box_iou(BI, B), TypeError, s("boxes1: expected a floating-point tensor, got dtype torch.int64")),
    "box_iou kind": (lambda: D.box_iou(B, B, "fiou"), ValueError, s("kind: expected one of ('iou', 'giou', 'diou', 'ciou'), got 'fiou'")),
    "box_iou chunk 0": (lambda: D.box_iou(B, B, chunk_size=0), ValueError, s("chunk_size: expected None or a positive integer, got 0")),
    "box_iou chunk float": (lambda: D.box_iou(B, B, chunk_size=2.5), ValueError, s("chunk_size: expected None or a positive integer, got 2.5")),
    "box_iou eps": (lambda: D.box_iou(B, B, eps=-1.0), ValueError, s("eps: expected a number > 0, got -1.0")),
    "aligned shapes": (lambda: D.aligned_box_iou(torch.rand(5, 4), torch.rand(3, 4)), ValueError, s("boxes1, boxes2: expected shapes that broadcast, got (5, 4) and (3, 4)")),
    "aligned kind": (lambda: D.aligned_box_iou(B, B, "IoU"), ValueError, s("kind: expected one of") + ".*'IoU'"),
    "aligned last dim": (lambda: D.aligned_box_iou(B3, B3), ValueError, s("boxes1: expected boxes of shape (..., 4), got (5, 3)")),
    # ------------------------------------------------------------------ priors
    "ssd_priors preset": (lambda: D.ssd_priors("voc301"), ValueError, s("config: expected one of ('voc300', 'coco300', 'voc512') or an SSDPriorConfig, got 'voc301'")),
    "SSDPriorConfig lengths": (lambda: D.SSDPriorConfig((38,), 300, (8, 16), (30,), (60,), ((2,),)), ValueError, s("steps: expected 1 entries (one per feature map), got 2")),
    "SSDPriorConfig size": (lambda: D.SSDPriorConfig((38,), 0, (8,), (30,), (60,), ((2,),)), ValueError, s("image_size: expected a positive size, got 0")),
    "retinaface size 0": (lambda: D.retinaface_priors(0), ValueError, s("image_size: expected a positive int or (height, width), got 0")),
    "retinaface size float": (lambda: D.retinaface_priors(640.0), TypeError, s("image_size: expected an int or (height, width) ints, got 640.0")),
    "retinaface size triple": (lambda: D.retinaface_priors((1, 2, 3)), ValueError, s("image_size: expected a positive int or (height, width), got (1, 2, 3)")),
    "retinaface steps": (lambda: D.retinaface_priors(640, min_sizes=((16,),), steps=(8, 16)), ValueError, s("min_sizes: expected one entry per step (2), got 1")),
    "retinaface step 0": (lambda: D.retinaface_priors(640, min_sizes=((16,),), steps=(0,)), ValueError, s("steps: expected a non-empty sequence of positive numbers, got (0,)")),
    "rcnn_anchors size": (lambda: D.rcnn_anchors(0, 5), ValueError, s("feat_height, feat_width: expected positive sizes, got 0 x 5")),
    "rcnn_anchors stride": (lambda: D.rcnn_anchors(2, 5, 0), ValueError, s("feat_stride: expected a number > 0, got 0")),
    "rcnn_base ratios empty": (lambda: D.rcnn_base_anchors(16, (), (8,)), ValueError, s("ratios: expected a non-empty sequence of positive numbers, got ()")),
    "rcnn_base ratio 0": (lambda: D.rcnn_base_anchors(16, (0.0,), (8,)), ValueError, s("ratios: expected a non-empty sequence of positive numbers, got (0.0,)")),
    "rcnn_base scales": (lambda: D.rcnn_base_anchors(16, (1.0,), ("a",)), TypeError, s("scales: expected a sequence of positive numbers, got ('a',)")),
    "retinanet sizes": (lambda: D.retinanet_anchors(800, sizes=(32,)), ValueError, s("sizes: expected one per stride (5), got 1")),
    "retinanet size": (lambda: D.retinanet_anchors(0), ValueError, s("image_size: expected a positive int or (height, width), got 0")),
    "retinanet size str": (lambda: D.retinanet_anchors("800"), TypeError, s("image_size: expected an int or (height, width) ints, got '800'")),
    "yolov3 strides": (lambda: D.yolov3_anchors(grid_units=True, strides=(8, 16)), ValueError, s("strides: expected 3 strides (one per scale), got (8, 16)")),
    "yolo_grid negative": (lambda: D.yolo_grid(-1, 3), ValueError, s("height: expected a number >= 0, got -1")),
    # ------------------------------------------------------------------ coders
    "encode variances count": (lambda: D.encode_boxes(B, B, (0.1,)), ValueError, s("variances: expected 2 finite numbers (centre, size), got (0.1,)")),
    "encode variances nan": (lambda: D.encode_boxes(B, B, (float("nan"), 0.2)), ValueError, s("variances: expected 2 finite numbers (centre, size), got (nan, 0.2)")),
    "encode variances negative": (lambda: D.encode_boxes(B, B, (0.1, -0.2)), ValueError, s("variances: expected two positive numbers (centre, size), got (0.1, -0.2)")),
    "encode variances type": (lambda: D.encode_boxes(B, B, "ab"), TypeError, s("variances: expected 2 numbers (centre, size), got 'ab'")),
    "encode last dim": (lambda: D.encode_boxes(B3, B), ValueError, s("matched: expected boxes of shape (..., 4), got (5, 3)")),
    "encode integer priors": (lambda: D.encode_boxes(B, BI), TypeError, s("priors: expected a floating-point tensor, got dtype torch.int64")),
    "encode batch": (lambda: D.encode_boxes(torch.rand(2, 5, 4), torch.rand(3, 5, 4)), ValueError, s("matched, priors: expected leading dimensions that broadcast, got (2, 5, 4) and (3, 5, 4)")),
    "decode last dim": (lambda: D.decode_boxes(B3, B), ValueError, s("loc: expected shape (..., 4), got (5, 3)")),
    "decode integer": (lambda: D.decode_boxes(BI, B), TypeError, s("loc: expected a floating-point tensor, got dtype torch.int64")),
    "decode variances": (lambda: D.decode_boxes(B, B, (0.1, 0.0)), ValueError, s("variances: expected two positive numbers (centre, size), got (0.1, 0.0)")),
    "encode_landmarks odd": (lambda: D.encode_landmarks(torch.rand(5, 9), B), ValueError, s("matched: expected an even last dimension (x, y pairs), got (5, 9)")),
    "encode_landmarks integer": (lambda: D.encode_landmarks(torch.zeros(5, 10, dtype=torch.long), B), TypeError, s("matched: expected a floating-point tensor, got dtype torch.int64")),
    "encode_landmarks batch": (lambda: D.encode_landmarks(torch.rand(4, 10), B), ValueError, s("matched, priors: expected leading dimensions that broadcast, got (4, 10) and (5, 4)")),
    "decode_landmarks odd": (lambda: D.decode_landmarks(torch.rand(5, 3), B), ValueError, s("pre: expected an even last dimension (x, y pairs), got (5, 3)")),
    "decode_landmarks priors": (lambda: D.decode_landmarks(torch.rand(5, 10), B3), ValueError, s("priors: expected boxes of shape (..., 4), got (5, 3)")),
    "encode_deltas stds": (lambda: D.encode_deltas(B, B, stds=(0, 1, 1, 1)), ValueError, s("stds: expected 4 positive numbers (dx, dy, dw, dh), got [0.0, 1.0, 1.0, 1.0]")),
    "encode_deltas means": (lambda: D.encode_deltas(B, B, means=(0, 1, 1)), ValueError, s("means: expected 4 finite numbers (dx, dy, dw, dh), got (0, 1, 1)")),
    "encode_deltas integer": (lambda: D.encode_deltas(BI, B), TypeError, s("boxes: expected a floating-point tensor, got dtype torch.int64")),
    "encode_deltas batch": (lambda: D.encode_deltas(torch.rand(3, 4), B), ValueError, s("boxes, reference: expected leading dimensions that broadcast, got (3, 4) and (5, 4)")),
    "decode_deltas last dim": (lambda: D.decode_deltas(torch.rand(5, 5), B), ValueError, s("deltas: expected shape (..., 4), got (5, 5)")),
    "decode_deltas stds nan": (lambda: D.decode_deltas(B, B, stds=(1, 1, float("nan"), 1)), ValueError, s("stds: expected 4 finite numbers (dx, dy, dw, dh)")),
    "encode_corner_offsets nan variance": (lambda: D.encode_corner_offsets(B, B, (float("nan"), 1, 1, 1)), ValueError, s("variances: expected 4 finite numbers (x1, y1, x2, y2), got (nan, 1, 1, 1)")),
    "encode_corner_offsets last dim": (lambda: D.encode_corner_offsets(B, B3), ValueError, s("anchors: expected boxes of shape (..., 4), got (5, 3)")),
    "decode_yolo rank": (lambda: D.decode_yolo(torch.rand(2, 3, 3, 4), ANC, 8), ValueError, s("raw: expected shape (B, H, W, A, 4), got (2, 3, 3, 4)")),
    "decode_yolo integer": (lambda: D.decode_yolo(RAW.long(), ANC, 8), TypeError, s("raw: expected a floating-point tensor, got dtype torch.int64")),
    "decode_yolo anchors shape": (lambda: D.decode_yolo(RAW, torch.rand(2, 2), 8), ValueError, s("anchors: expected shape (A=3, 2), got (2, 2)")),
    "decode_yolo anchors list": (lambda: D.decode_yolo(RAW, [[1.0, 2.0]] * 3, 8), TypeError, s("anchors: expected a torch.Tensor, got list")),
    "decode_yolo stride": (lambda: D.decode_yolo(RAW, ANC, 0), ValueError, s("stride: expected a positive number, got 0")),
    # ------------------------------------------------------------------ functional
    "smooth_l1 integer": (lambda: F.smooth_l1_loss(BI, BI), TypeError, s("input: expected a floating-point tensor, got dtype torch.int64")),
    "smooth_l1 shape": (lambda: F.smooth_l1_loss(B, B3), ValueError, s("target: expected the shape of input (5, 4), got (5, 3)")),
    "smooth_l1 both": (lambda: F.smooth_l1_loss(B, B, 1.0, sigma=3.0), ValueError, s("beta, sigma: expected at most one of them, got both")),
    "smooth_l1 beta": (lambda: F.smooth_l1_loss(B, B, -1.0), ValueError, s("beta: expected a number >= 0, got -1.0")),
    "smooth_l1 sigma": (lambda: F.smooth_l1_loss(B, B, sigma=0.0), ValueError, s("sigma: expected a number > 0, got 0.0")),
    "smooth_l1 sigma nan": (lambda: F.smooth_l1_loss(B, B, sigma=float("nan")), ValueError, s("sigma: expected a number > 0, got nan")),
    "smooth_l1 weight": (lambda: F.smooth_l1_loss(B, B, weight=torch.rand(3)), ValueError, s("weight: expected a shape that broadcasts to the element-wise loss (5, 4), got (3,)")),
    "smooth_l1 reduction": (lambda: F.smooth_l1_loss(B, B, reduction="avg"), ValueError, s("reduction: expected one of ('none', 'sum', 'mean'), got 'avg'")),
    "l1 target list": (lambda: F.l1_loss(B, [1.0]), TypeError, s("target: expected a torch.Tensor, got list")),
    "ce float target": (lambda: F.cross_entropy(B, torch.rand(5)), TypeError, s("target: expected an integer tensor, got dtype torch.float32")),
    "ce shape": (lambda: F.cross_entropy(B, LBL[:4]), ValueError, s("target: expected shape (5,) (logits without the class dimension), got (4,)")),
    "ce integer logits": (lambda: F.cross_entropy(BI, LBL), TypeError, s("logits: expected a floating-point tensor, got dtype torch.int64")),
    "ce weight": (lambda: F.cross_entropy(B, LBL, weight=torch.rand(4)), ValueError, s("weight: expected a shape that broadcasts to the element-wise loss (5,), got (4,)")),
    "bce shape": (lambda: F.binary_cross_entropy_with_logits(B, B3), ValueError, s("targets: expected the shape of logits (5, 4), got (5, 3)")),
    "bce integer": (lambda: F.binary_cross_entropy_with_logits(BI, B), TypeError, s("logits: expected a floating-point tensor, got dtype torch.int64")),
    "bce list": (lambda: F.binary_cross_entropy_with_logits(B, [1.0]), TypeError, s("targets: expected a torch.Tensor, got list")),
    "focal shape": (lambda: F.sigmoid_focal_loss(B, B3), ValueError, s("targets: expected the shape of logits (5, 4), got (5, 3)")),
    "focal gamma": (lambda: F.sigmoid_focal_loss(B, B, gamma=-1.0), ValueError, s("gamma: expected a number >= 0, got -1.0")),
    "focal normalizer with none": (lambda: F.sigmoid_focal_loss(B, B, reduction="none", normalizer=2.0), ValueError, s("normalizer: expected None with reduction='none'")),
    "softmax focal integer logits": (lambda: F.softmax_focal_loss(BI, LBL), TypeError, s("logits: expected a floating-point tensor, got dtype torch.int64")),
    "softmax focal alpha": (lambda: F.softmax_focal_loss(B, LBL, alpha=torch.rand(3)), ValueError, s("alpha: expected a tensor of shape (C=4,), got (3,)")),
    "softmax focal float target": (lambda: F.softmax_focal_loss(B, torch.zeros(5)), TypeError, s("target: expected an integer tensor, got dtype torch.float32")),
    "softmax focal gamma": (lambda: F.softmax_focal_loss(B, LBL, -2.0), ValueError, s("gamma: expected a number >= 0, got -2.0")),
    "probability_ce shape": (lambda: F.probability_cross_entropy(B, B3), ValueError, s("target: expected the shape of probs (5, 4), got (5, 3)")),
    "probability_ce integer": (lambda: F.probability_cross_entropy(BI, B), TypeError, s("probs: expected a floating-point tensor, got dtype torch.int64")),
    "probability_ce eps": (lambda: F.probability_cross_entropy(B, B, eps=0.0), ValueError, s("eps: expected a number > 0, got 0.0")),
    "iou_loss last dim": (lambda: F.iou_loss(B3, B3), ValueError, s("boxes: expected boxes of shape (..., 4), got (5, 3)")),
    "iou_loss fmt": (lambda: F.iou_loss(B, B, fmt="yolo"), ValueError, s("in_fmt: expected one of ('xyxy', 'cxcywh', 'xywh'), got 'yolo'")),
    "iou_loss kind": (lambda: F.iou_loss(B, B, "x"), ValueError, s("kind: expected one of ('iou', 'giou', 'diou', 'ciou'), got 'x'")),
    "iou_loss integer": (lambda: F.iou_loss(BI, B), TypeError, s("boxes: expected a floating-point tensor, got dtype torch.int64")),
    "dice integer": (lambda: F.dice_loss(BI, BI), TypeError, s("logits: expected a floating-point tensor, got dtype torch.int64")),
    "dice shape": (lambda: F.dice_loss(B, B3), ValueError, s("targets: expected the shape of logits (5, 4), got (5, 3)")),
    "dice rank 0": (lambda: F.dice_loss(torch.tensor(1.0), torch.tensor(1.0)), ValueError, s("logits: expected shape (N, ...), got ()")),
    "weighted_reduce reduction": (lambda: F.weighted_reduce(B, reduction="x"), ValueError, s("reduction: expected one of ('none', 'sum', 'mean'), got 'x'")),
    "weighted_reduce weight": (lambda: F.weighted_reduce(B, torch.rand(2, 4)), ValueError, s("weight: expected a shape that broadcasts to the element-wise loss (5, 4), got (2, 4)")),
    "positive_normalizer int": (lambda: F.positive_normalizer(3), TypeError, s("num_pos: expected a torch.Tensor, got int")),
    # ------------------------------------------------------------------ targets
    "pad count mismatch": (lambda: D.pad_ground_truth([B], []), ValueError, s("labels: expected one tensor per image (1), got 0")),
    "pad integer boxes": (lambda: D.pad_ground_truth([BI], [LBL]), TypeError, s("boxes[0]: expected a floating-point tensor, got dtype torch.int64")),
    "pad float labels": (lambda: D.pad_ground_truth([B], [torch.zeros(5)]), TypeError, s("labels[0]: expected an integer tensor, got dtype torch.float32")),
    "pad last dim": (lambda: D.pad_ground_truth([B, B3], [LBL, LBL]), ValueError, s("boxes[1]: expected shape (n, 4), got (5, 3)")),
    "pad nan": (lambda: D.pad_ground_truth([NAN], [LBL]), ValueError, s("boxes[0]: expected finite values, got 1 NaN/inf entries")),
    "pad labels per box": (lambda: D.pad_ground_truth([B], [LBL[:4]]), ValueError, s("labels[0]: expected 5 labels (one per box), got 4")),
    "pad max_boxes small": (lambda: D.pad_ground_truth([B], [LBL], max_boxes=3), ValueError, s("max_boxes: expected at least the largest box count 5, got 3")),
    "pad max_boxes negative": (lambda: D.pad_ground_truth([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], max_boxes=-1), ValueError, s("max_boxes: expected a number >= 0, got -1")),
    "pad extras rows": (lambda: D.pad_ground_truth([B], [LBL], [torch.rand(4, 10)]), ValueError, s("extras[0]: expected 5 rows (one per box), got 4")),
    "pad extras type": (lambda: D.pad_ground_truth([B], [LBL], [[1.0]]), TypeError, s("extras[0]: expected a torch.Tensor, got list")),
    "pad extras count": (lambda: D.pad_ground_truth([B], [LBL], []), ValueError, s("extras: expected one tensor per image (1), got 0")),
    "pad boxes type": (lambda: D.pad_ground_truth([np.zeros((2, 4))], [LBL[:2]]), TypeError, s("boxes[0]: expected a torch.Tensor, got ndarray")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_a_named_error(name):
    fn, exc, pattern = CASES[name]
    with pytest.raises(exc, match=pattern):
        fn()


def test_every_public_foundation_function_has_a_bad_input_case():
    import inspect

    names = {
        "cxcywh_to_xyxy", "xyxy_to_cxcywh", "xywh_to_xyxy", "xyxy_to_xywh", "box_convert", "box_area",
        "box_iou", "aligned_box_iou", "ssd_priors", "SSDPriorConfig", "retinaface_priors", "rcnn_anchors",
        "rcnn_base_anchors", "retinanet_anchors", "yolov3_anchors", "yolo_grid", "encode_boxes", "decode_boxes",
        "encode_landmarks", "decode_landmarks", "encode_deltas", "decode_deltas", "decode_yolo", "pad_ground_truth",
        "encode_corner_offsets", "probability_cross_entropy",
        "smooth_l1_loss", "l1_loss", "cross_entropy", "binary_cross_entropy_with_logits", "sigmoid_focal_loss",
        "softmax_focal_loss", "iou_loss", "dice_loss", "weighted_reduce", "positive_normalizer",
    }
    sources = "\n".join(inspect.getsource(fn) for fn, _, _ in CASES.values())
    missing = [n for n in sorted(names) if n not in sources]
    assert not missing, f"no bad-input case for {missing}"


# Box maths, coders and element-wise losses also run on predictions: they check metadata only,
# and a non-finite input gives a non-finite output (the value checks are the entry points' own).
NON_FINITE_PROPAGATES = {
    "box_area": lambda: D.box_area(NAN),
    "box_iou": lambda: D.box_iou(B, NAN),
    "aligned_box_iou": lambda: D.aligned_box_iou(NAN, B, "ciou"),
    "encode_boxes": lambda: D.encode_boxes(NAN, B),
    "decode_boxes": lambda: D.decode_boxes(B, NAN),
    "encode_deltas": lambda: D.encode_deltas(B, INF),
    "iou_loss": lambda: F.iou_loss(NAN, B, reduction="sum"),
}


@pytest.mark.parametrize("name", sorted(NON_FINITE_PROPAGATES))
def test_box_maths_propagate_non_finite_values_without_raising(name):
    out = NON_FINITE_PROPAGATES[name]()
    assert not bool(torch.isfinite(out).all())


def test_value_checks_can_be_switched_off():
    previous = D._validate.value_checks_enabled()
    D.set_value_checks(False)
    try:
        boxes, labels, valid = D.pad_ground_truth([NAN], [LBL])  # no check, NaN kept
        assert bool(torch.isnan(boxes).any())
    finally:
        D.set_value_checks(previous)
    with pytest.raises(ValueError, match=r"boxes\[0\]: expected finite values"):
        D.pad_ground_truth([NAN], [LBL])
