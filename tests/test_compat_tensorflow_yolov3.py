"""tensorflow-yolov3 drop-in: every golden yolov3 case, labels to gradients, and the box utilities."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detloss.compat.tensorflow_yolov3 import YOLOv3Loss, preprocess_true_boxes
from oracles import yolov3 as oracle

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

CASES = oracle.GOLDEN_CASES
SCALES = "sml"

def close(got, want, rtol=1e-5, atol=0.0):
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def make(d):
    return YOLOv3Loss(int(d["cfg_num_class"]), d["cfg_anchors"], d["cfg_strides"],
                      iou_loss_thresh=float(d["cfg_iou_loss_thresh"]),
                      anchor_per_scale=int(d["cfg_anchor_per_scale"]))


def tensors(d, prefix):
    return [torch.tensor(d[f"{prefix}_{k}bbox"]) for k in SCALES]


@pytest.mark.parametrize("case", CASES)
def test_preprocess_true_boxes_exact(golden, case):
    d = golden(f"tf/{case}.npz")
    keys = [f"mid_label_{k}bbox" for k in SCALES] + [f"mid_true_{k}bbox" for k in SCALES]
    for b, n in enumerate(d["in_gt_count"]):
        out = preprocess_true_boxes(d["in_gt_boxes"][b, :n], int(d["cfg_input_size"]), d["cfg_strides"],
                                    d["cfg_anchors"], int(d["cfg_num_class"]),
                                    max_bbox_per_scale=int(d["cfg_max_bbox_per_scale"]))
        assert len(out) == 6
        for got, key in zip(out, keys):
            assert got.dtype == np.float64
            np.testing.assert_array_equal(got.astype(np.float32), d[key][b])


def test_preprocess_true_boxes_empty_image():
    anchors = np.arange(1, 19, dtype=np.float32).reshape(3, 3, 2) / 4
    out = preprocess_true_boxes(np.zeros((0, 5)), 64, [8, 16, 32], anchors, 2)
    assert [o.shape for o in out] == [(8, 8, 3, 7), (4, 4, 3, 7), (2, 2, 3, 7), (150, 4), (150, 4), (150, 4)]
    assert all(not o.any() for o in out)


@pytest.mark.parametrize("case", CASES)
def test_decode_and_intermediates(golden, case):
    d = golden(f"tf/{case}.npz")
    loss = make(d)
    for s, k in enumerate(SCALES):
        conv = torch.tensor(d[f"in_conv_{k}bbox"])
        pred = loss.decode(conv, loss.anchors[s], loss.strides[s])
        close(pred[..., :5], d[f"mid_pred_xywhc_{k}bbox"])
        label, true = torch.tensor(d[f"mid_label_{k}bbox"]), torch.tensor(d[f"mid_true_{k}bbox"])
        respond = label[..., 4]
        np.testing.assert_array_equal(respond.numpy().astype(np.uint8), d[f"mid_respond_bbox_{k}bbox"])
        giou = respond * loss.bbox_giou(pred[..., :4], label[..., :4])
        close(giou, d[f"mid_giou_{k}bbox"], atol=1e-6)
        max_iou = loss.bbox_iou(pred[..., None, :4], true[:, None, None, None]).amax(-1)
        close(max_iou, d[f"mid_max_iou_{k}bbox"], atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_losses_per_scale_and_total(golden, case):
    d = golden(f"tf/{case}.npz")
    loss = make(d)
    convs, labels, trues = tensors(d, "in_conv"), tensors(d, "mid_label"), tensors(d, "mid_true")
    for s, k in enumerate(SCALES):
        pred = loss.decode(convs[s], loss.anchors[s], loss.strides[s])
        terms = loss.loss_layer(convs[s], pred, labels[s], trues[s], loss.anchors[s], loss.strides[s])
        for got, name in zip(terms, ("giou", "conf", "prob")):
            close(got, d[f"out_{name}_loss_{k}bbox"])
    giou, conf, prob = loss.compute_loss(*convs, *labels, *trues)
    close(giou, d["out_giou_loss"])
    close(conf, d["out_conf_loss"])
    close(prob, d["out_prob_loss"])
    close(giou + conf + prob, d["out_total_loss"])


def _grads(d, term=None):
    loss = make(d)
    convs = [c.requires_grad_() for c in tensors(d, "in_conv")]
    terms = loss.compute_loss(*convs, *tensors(d, "mid_label"), *tensors(d, "mid_true"))
    value = sum(terms) if term is None else terms[("giou", "conf", "prob").index(term)]
    return torch.autograd.grad(value, convs)


@pytest.mark.parametrize("case", CASES)
def test_gradients_at_nonzero_logits(golden, case):
    d = golden(f"tf/{case}.npz")
    for s, (grad, k) in enumerate(zip(_grads(d), SCALES)):
        oracle.assert_grad_close(grad, d[f"out_grad_conv_{k}bbox"], d[f"in_conv_{k}bbox"] != 0)
    for term in ("giou", "conf", "prob"):
        grad = _grads(d, term)[0]
        oracle.assert_grad_close(grad, d[f"out_grad_{term}_conv_sbbox"], d["in_conv_sbbox"] != 0)


@pytest.mark.parametrize("case", CASES)
def test_giou_gradient_everywhere(golden, case):
    """The GIoU term's gradient does not go through the BCE: it matches at every entry."""
    d = golden(f"tf/{case}.npz")
    oracle.assert_grad_close(_grads(d, "giou")[0], d["out_grad_giou_conv_sbbox"])


@pytest.mark.parametrize("case", CASES)
def test_gradients_everywhere(golden, case):
    d = golden(f"tf/{case}.npz")
    for grad, k in zip(_grads(d), SCALES):
        oracle.assert_grad_close(grad, d[f"out_grad_conv_{k}bbox"])


def test_box_utils_values_and_gradients(golden):
    d = golden("tf/yolo_box_utils.npz")
    for name, fn in (("iou", YOLOv3Loss.bbox_iou), ("giou", YOLOv3Loss.bbox_giou)):
        b1 = torch.tensor(d["in_boxes1_xywh"], requires_grad=True)
        b2 = torch.tensor(d["in_boxes2_xywh"], requires_grad=True)
        value = fn(b1, b2)
        close(value, d[f"out_{name}"], atol=1e-7)
        g1, g2 = torch.autograd.grad(value.sum(), (b1, b2))
        oracle.assert_grad_close(g1, d[f"out_grad_sum_{name}_boxes1"])
        oracle.assert_grad_close(g2, d[f"out_grad_sum_{name}_boxes2"])
    outer = YOLOv3Loss.bbox_iou(torch.tensor(d["in_outer_a_xywh"])[:, None], torch.tensor(d["in_outer_b_xywh"])[None])
    close(outer, d["out_iou_outer"], atol=1e-7)
    actual = torch.tensor(d["in_focal_actual"], requires_grad=True)
    focal = YOLOv3Loss.focal(torch.tensor(d["in_focal_target"]), actual, float(d["cfg_focal_alpha"]),
                             float(d["cfg_focal_gamma"]))
    close(focal, d["out_focal"], atol=1e-7)
    (grad,) = torch.autograd.grad(focal.sum(), actual)
    oracle.assert_grad_close(grad, d["out_grad_sum_focal_actual"])


def test_wrong_channel_count_is_an_error():
    loss = YOLOv3Loss(2, np.ones((3, 3, 2)), [8, 16, 32])
    with pytest.raises(ValueError, match="anchor_per_scale\\*\\(5\\+num_class\\)=21"):
        loss.decode(torch.zeros(1, 8, 8, 20), loss.anchors[0], 8)


def test_bad_targets_are_errors():
    anchors = np.ones((3, 3, 2))
    with pytest.raises(ValueError, match="gt_labels"):
        preprocess_true_boxes(np.array([[0, 0, 10, 10, 5]]), 64, [8, 16, 32], anchors, 3)
    with pytest.raises(ValueError, match="gt_boxes centre x"):
        preprocess_true_boxes(np.array([[60, 0, 70, 10, 0]]), 64, [8, 16, 32], anchors, 3)
    with pytest.raises(ValueError, match="divisible"):
        preprocess_true_boxes(np.array([[0, 0, 10, 10, 0]]), 100, [8, 16, 32], anchors, 3)
