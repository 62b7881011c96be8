"""Native YOLOOBBLoss and YOLO26Loss: terms written out independently, tiny objects, angle term, schedule, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from detloss import YOLO26Loss, YOLOOBBLoss, YOLOv8Loss, aligned_probiou, yolo26_branch_weights
from detloss.priors import anchor_points

pytestmark = pytest.mark.usefixtures("strategy")

POINTS, STRIDES = anchor_points([(8, 8), (4, 4), (2, 2)], [8, 16, 32])  # 84 anchors of a 64 px image


def problem(counts=(2, 1), reg_max=8, c=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b, m, a = len(counts), max(counts), POINTS.shape[0]
    centre = torch.rand(b, m, 2, generator=g) * 40 + 12
    size = torch.rand(b, m, 2, generator=g) * 24 + 6
    angle = torch.rand(b, m, 1, generator=g) * 3 - 1.5
    valid = torch.arange(m) < torch.tensor(counts).unsqueeze(1)
    gt = torch.where(valid.unsqueeze(-1), torch.cat((centre, size, angle), -1), torch.zeros(()))
    labels = torch.randint(0, c, (b, m), generator=g)
    box = torch.randn(b, a, 4 * reg_max, generator=g, dtype=dtype).requires_grad_()
    cls = torch.randn(b, a, c, generator=g, dtype=dtype).requires_grad_()
    ang = (torch.randn(b, a, 1, generator=g, dtype=dtype) * 0.5).requires_grad_()
    return [box, cls, ang, POINTS, STRIDES, gt, labels, valid]


def test_terms_written_out():
    """Box, DFL and angle terms recomputed from the returned assignment with plain formulas."""
    args = problem()
    loss_fn = YOLOOBBLoss(3, reg_max=8, box_weight=1.0, cls_weight=1.0, dfl_weight=1.0, angle_weight=1.0)
    out = loss_fn(*args, return_assignment=True)
    a = out["assignment"]
    box, cls, ang = args[:3]
    fg = a.foreground
    assert fg.any() and a.boxes.shape == (2, 84, 5)
    tss = a.scores.sum().clamp(min=1)
    w = a.scores.sum(-1)[fg]
    stride = STRIDES[None, :, None].expand(2, -1, 1)[fg]  # (n, 1)
    grid = (POINTS / STRIDES[:, None])[None].expand(2, -1, -1)[fg]
    dist = box.unflatten(-1, (4, 8)).softmax(-1).matmul(torch.arange(8.0))[fg]  # (n, 4)
    theta = ang[..., 0][fg]
    local = torch.stack(((dist[:, 2] - dist[:, 0]) / 2, (dist[:, 3] - dist[:, 1]) / 2), -1)
    rot = torch.stack((torch.cos(theta), -torch.sin(theta), torch.sin(theta), torch.cos(theta)), -1).view(-1, 2, 2)
    centre = grid + (rot @ local.unsqueeze(-1)).squeeze(-1)
    pred = torch.cat((centre, dist[:, :2] + dist[:, 2:], theta[:, None]), -1)
    target = a.boxes[fg].clone()
    target[:, :4] /= stride
    box_term = ((1 - aligned_probiou(pred, target, variance=0.01)) * w).sum() / tss
    torch.testing.assert_close(out["loss_box"], box_term)
    # angle: sin^2(2 d) times the aspect weight
    d = theta - target[:, 4]
    aspect = torch.exp(-torch.log(target[:, 2] / target[:, 3]) ** 2 / 9)
    torch.testing.assert_close(out["loss_angle"], (torch.sin(2 * d) ** 2 * aspect * w).sum() / tss)
    # DFL target: distances to the target's sides in its own frame
    off = target[:, :2] - grid
    c, s = torch.cos(target[:, 4]), torch.sin(target[:, 4])
    xf, yf = off[:, 0] * c + off[:, 1] * s, -off[:, 0] * s + off[:, 1] * c
    ltrb = torch.stack((target[:, 2] / 2 - xf, target[:, 3] / 2 - yf, target[:, 2] / 2 + xf, target[:, 3] / 2 + yf), -1)
    y = ltrb.clamp(0, 7)
    left = y.floor().clamp(max=6)
    logp = box.unflatten(-1, (4, 8))[fg].log_softmax(-1)
    lp_l = logp.gather(-1, left.long().unsqueeze(-1)).squeeze(-1)
    lp_r = logp.gather(-1, left.long().unsqueeze(-1) + 1).squeeze(-1)
    dfl = -(lp_l * (left + 1 - y) + lp_r * (y - left))
    torch.testing.assert_close(out["loss_dfl"], (dfl.mean(-1) * w).sum() / tss)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(cls, a.scores, reduction="sum") / tss
    torch.testing.assert_close(out["loss_cls"], bce)


def test_angle_term_is_zero_modulo_half_pi_and_tiny_objects_are_dropped():
    args = problem()
    a = YOLOOBBLoss(3, reg_max=8)(*args, return_assignment=True)["assignment"]
    # the predicted angle equal to the target's (plus pi/2 or pi) gives a zero angle term
    for shift in (0.0, math.pi / 2, math.pi):
        ang = torch.where(a.foreground, a.boxes[..., 4] + shift, 0.0).unsqueeze(-1)
        out = YOLOOBBLoss(3, reg_max=8)(args[0], args[1], ang, *args[3:])
        assert out["loss_angle"].abs().item() < 1e-6
    # a 1.5 px wide box is padding (ultralytics drops objects under 2 px); min_object_size=0 keeps it
    gt = args[5].clone()
    gt[1, 0, 2] = 1.5
    out = YOLOOBBLoss(3, reg_max=8)(*args[:5], gt, *args[6:], return_assignment=True)
    assert not (out["assignment"].matched_gt[1][out["assignment"].foreground[1]] == 0).any()
    kept = YOLOOBBLoss(3, reg_max=8, min_object_size=0.0)(*args[:5], gt, *args[6:], return_assignment=True)
    assert kept["assignment"].foreground[1].any()


def test_no_objects_and_zero_size_boxes_are_finite():
    args = problem(counts=(0, 0))
    out = YOLOOBBLoss(3, reg_max=8)(*args)
    assert out["loss_box"].item() == 0 and out["loss_dfl"].item() == 0 and out["loss_angle"].item() == 0
    assert torch.isfinite(out["loss"])
    args = problem()
    gt = args[5].clone()
    gt[0, 0, 2:4] = 0.0  # a point
    gt[0, 1, 3] = gt[0, 1, 2]  # a square
    out = YOLOOBBLoss(3, reg_max=8, min_object_size=0.0, min_box_side=16.0)(*args[:5], gt, *args[6:])
    grads = torch.autograd.grad(out["loss"], args[:3])
    assert torch.isfinite(out["loss"]) and all(bool(torch.isfinite(g).all()) for g in grads)


def test_reg_max_1_and_half_predictions():
    args = problem(reg_max=1)
    out = YOLOOBBLoss(3, reg_max=1)(*args, image_size=(64, 64))
    assert torch.isfinite(out["loss"]) and out["loss_dfl"] > 0
    with pytest.raises(ValueError, match="image_size"):
        YOLOOBBLoss(3, reg_max=1)(*args)
    half = [t.detach().bfloat16().requires_grad_() if i < 3 else t for i, t in enumerate(problem())]
    out = YOLOOBBLoss(3, reg_max=8)(*half)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_nan_angle_prediction_gives_nan_loss():
    args = problem()
    args[2] = torch.full_like(args[2], float("nan"))
    assert not torch.isfinite(YOLOOBBLoss(3, reg_max=8)(*args)["loss"])


@pytest.mark.parametrize(
    "index, change, name",
    [
        (5, lambda gt: gt[..., :4], "gt_boxes"),
        (5, lambda gt: gt.index_put((torch.tensor([0]), torch.tensor([0]), torch.tensor([4])), torch.tensor(float("nan"))),
         "gt_boxes"),
        (5, lambda gt: gt.index_put((torch.tensor([0]), torch.tensor([0]), torch.tensor([3])), torch.tensor(-2.0)),
         r"gt_boxes \(w, h\)"),
        (6, lambda lab: lab + 5, "gt_labels"),
        (2, lambda ang: ang[..., :0], "angle_pred"),
        (0, lambda box: box[..., :5], "box_pred"),
    ],
)
def test_bad_input_names_the_argument(index, change, name):
    args = problem()
    args[index] = change(args[index].detach())
    with pytest.raises(ValueError, match=name):
        YOLOOBBLoss(3, reg_max=8)(*args)


# ------------------------------------------------------------------------------------------- YOLO26


def test_branch_weights_schedule():
    assert yolo26_branch_weights(0, 10) == pytest.approx((0.8, 0.2))
    assert yolo26_branch_weights(9, 10) == pytest.approx((0.1, 0.9))
    assert yolo26_branch_weights(50, 10) == pytest.approx((0.1, 0.9))
    for e in range(10):
        o2m, o2o = yolo26_branch_weights(e, 10)
        assert o2m == pytest.approx(0.8 - 0.7 * e / 9) and o2m + o2o == pytest.approx(1.0)
    assert yolo26_branch_weights(0, 1) == pytest.approx((0.8, 0.2))
    with pytest.raises(ValueError, match="epochs"):
        yolo26_branch_weights(0, 0)
    with pytest.raises(ValueError, match="epoch"):
        yolo26_branch_weights(-1, 5)


@pytest.mark.parametrize("oriented", [False, True])
def test_yolo26_is_the_weighted_sum_of_two_independent_branches(oriented):
    args = problem(reg_max=1)
    g = torch.Generator().manual_seed(7)
    other = [torch.randn(t.shape, generator=g).requires_grad_() for t in args[:3]]
    if not oriented:  # axis-aligned GT: the rotated boxes' enclosing xyxy
        cx, cy, w, h = args[5][..., :4].unbind(-1)
        gt = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1).clamp(0, 64)
        gt = torch.where(args[7].unsqueeze(-1), gt, torch.zeros(()))
        shared = [*args[3:5], gt, *args[6:]]
        heads = [(args[0], other[0]), (args[1], other[1])]
        single = YOLOv8Loss
    else:
        shared = args[3:]
        heads = [(args[0], other[0]), (args[1], other[1]), (args[2], other[2])]
        single = YOLOOBBLoss
    loss_fn = YOLO26Loss(3, epochs=10, oriented=oriented, reg_max=1)
    out = loss_fn(*heads, *shared, epoch=4, image_size=(64, 64))
    many = single(3, reg_max=1, topk=10)(*[h[0] for h in heads], *shared, image_size=(64, 64))
    one = single(3, reg_max=1, topk=7, topk2=1)(*[h[1] for h in heads], *shared, image_size=(64, 64))
    w = 0.8 - 0.7 * 4 / 9
    torch.testing.assert_close(out["loss"], w * many["loss"] + (1 - w) * one["loss"])
    torch.testing.assert_close(out["one2one_loss"], one["loss"])
    # stacked (2, B, A, ...) predictions are the same call
    stacked = loss_fn(*[torch.stack(h) for h in heads], *shared, epoch=4, image_size=(64, 64))
    torch.testing.assert_close(stacked["loss"], out["loss"])
    boxes = [h[0].detach().abs() + 1.0 for h in heads[:1]] * 2  # boxes around every anchor: positives exist
    a = loss_fn((boxes[0], boxes[1]), *heads[1:], *shared, epoch=0, image_size=(64, 64), return_assignment=True)
    o2o, o2m = a["one2one_assignment"], a["assignment"]
    assert o2o.foreground.any() and o2m.foreground.sum() > o2o.foreground.sum()
    for b in range(2):
        assert torch.bincount(o2o.matched_gt[b][o2o.foreground[b]]).max() <= 1  # one anchor per object


def test_yolo26_bad_input():
    args = problem(reg_max=1)
    with pytest.raises(ValueError, match="box_pred"):
        YOLO26Loss(3, epochs=5)(args[0], (args[1], args[1]), *args[3:], epoch=0, image_size=(64, 64))
    with pytest.raises(TypeError, match="positional"):
        YOLO26Loss(3, epochs=5)(*args, epoch=0, image_size=(64, 64))
    with pytest.raises(ValueError, match="epochs"):
        YOLO26Loss(3, epochs=0)
