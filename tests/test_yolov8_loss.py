"""Native ``detloss.YOLOv8Loss`` and the DFL / VFL / QFL functionals: golden numbers through the native
API, empty input, gradcheck, options, input checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from detloss import YOLOv8Loss, match_task_aligned
from detloss.priors import anchor_points
from oracles import task_aligned as O
from conftest import golden_cases
from detloss.functional import (
    binary_cross_entropy_with_logits,
    distribution_focal_loss,
    quality_focal_loss,
    sigmoid_focal_loss,
    varifocal_loss,
)

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

V8_CASES = golden_cases("ultralytics/v8_*.npz")


def native_inputs(g):
    """Native-API arguments from a golden ``v8_*`` file: (B, A, .) predictions, pixel anchors, padded GT."""
    strides = g["cfg_strides"].tolist()
    sizes = [tuple(int(v) for v in hw) for hw in g["in_feat_hw"]]
    points, per_anchor = anchor_points(sizes, strides)
    b = g["in_boxes"].shape[0]
    h, w = sizes[0][0] * strides[0], sizes[0][1] * strides[0]
    idx = g["in_batch_idx"].astype(int)
    m = max([int((idx == i).sum()) for i in range(b)], default=0)
    gt_boxes, gt_labels, gt_valid = torch.zeros(b, m, 4), torch.zeros(b, m, dtype=torch.long), torch.zeros(b, m, dtype=torch.bool)
    for i in range(b):
        rows = np.flatnonzero(idx == i)
        xywh = torch.from_numpy(g["in_bboxes"][rows]) * torch.tensor([w, h, w, h])
        gt_boxes[i, : len(rows)] = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), -1)
        gt_labels[i, : len(rows)] = torch.from_numpy(g["in_cls"][rows, 0]).long()
        gt_valid[i, : len(rows)] = True
    box_pred = torch.from_numpy(g["in_boxes"]).permute(0, 2, 1).contiguous().requires_grad_()
    cls_logits = torch.from_numpy(g["in_scores"]).permute(0, 2, 1).contiguous().requires_grad_()
    return [box_pred, cls_logits, points, per_anchor, gt_boxes, gt_labels, gt_valid], dict(image_size=(h, w))


def ultralytics_options(g):
    reg_max = int(g["cfg_reg_max"])
    gains = [float(str(np.float32(v))) for v in g["cfg_gains"]]
    return dict(reg_max=reg_max, topk=int(g["cfg_tal_topk"]), topk2=int(g["cfg_tal_topk2"]) or None,
                min_box_side=float(g["cfg_strides"][1]), box_weight=gains[0], cls_weight=gains[1], dfl_weight=gains[2],
                dfl_max_target=reg_max - 1.01 if reg_max > 1 else None)


@pytest.mark.parametrize("case", V8_CASES)
def test_golden_native(golden, case):
    g = golden(f"ultralytics/{case}.npz")
    args, kw = native_inputs(g)
    out = YOLOv8Loss(int(g["cfg_nc"]), **ultralytics_options(g))(*args, **kw, return_assignment=True)
    items = torch.stack((out["loss_box"], out["loss_cls"], out["loss_dfl"])).detach().numpy()
    np.testing.assert_allclose(items, g["out_items"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out["loss"], out["loss_box"] + out["loss_cls"] + out["loss_dfl"])
    a = out["assignment"]
    scored = g["mid_target_scores"].sum(-1) > 0
    np.testing.assert_allclose(a.scores.numpy(), g["mid_target_scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.foreground.numpy(), scored)
    np.testing.assert_array_equal(a.matched_gt.numpy()[scored], g["mid_target_gt_idx"][scored])
    np.testing.assert_array_equal(a.labels.numpy()[scored], g["mid_target_labels"][scored])
    np.testing.assert_allclose(a.boxes.numpy()[scored], g["mid_target_bboxes"][scored], atol=1e-4, rtol=0)
    (out["loss"] * args[0].shape[0]).backward()
    grad_boxes = args[0].grad.permute(0, 2, 1).numpy()
    grad_scores = args[1].grad.permute(0, 2, 1).numpy()
    np.testing.assert_allclose(grad_boxes, g["out_grad_boxes"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_scores, g["out_grad_scores"], rtol=1e-4, atol=1e-6)


def small_problem(num_gt=(2, 0), reg_max=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    points, strides = anchor_points([(8, 8), (4, 4), (2, 2)], (8, 16, 32), dtype=dtype)
    b, a, m = len(num_gt), points.shape[0], max(num_gt)
    ctr = torch.rand(b, m, 2, generator=gen, dtype=dtype) * 40 + 12
    half = torch.rand(b, m, 2, generator=gen, dtype=dtype) * 10 + 2
    gt = torch.cat((ctr - half, ctr + half), -1)
    valid = torch.arange(m)[None] < torch.tensor(num_gt)[:, None]
    gt = torch.where(valid[..., None], gt, torch.zeros((), dtype=dtype))
    labels = torch.randint(0, 3, (b, m), generator=gen)
    box = torch.randn(b, a, 4 * reg_max, generator=gen, dtype=dtype)
    if reg_max == 1:
        box = box.abs() + 0.5
    cls = torch.randn(b, a, 3, generator=gen, dtype=dtype)
    return [box.requires_grad_(), cls.requires_grad_(), points, strides, gt, labels, valid]


@pytest.mark.parametrize("reg_max", [16, 1])
@pytest.mark.parametrize("num_gt", [(0, 0), (2, 0), (0, 3)])
def test_images_without_objects(reg_max, num_gt):
    args = small_problem(num_gt, reg_max)
    out = YOLOv8Loss(3, reg_max=reg_max)(*args, image_size=(64, 64))
    assert all(torch.isfinite(v) for v in out.values())
    if sum(num_gt) == 0:
        assert out["loss_box"].item() == 0.0 and out["loss_dfl"].item() == 0.0
        assert out["loss_cls"].item() > 0
    out["loss"].backward()
    assert torch.isfinite(args[0].grad).all() and torch.isfinite(args[1].grad).all()
    if sum(num_gt) == 0:
        assert (args[0].grad == 0).all()  # no box term, no gradient into the distributions


def test_background_images_do_not_touch_box_terms_of_others():
    args = small_problem((2, 0))
    out = YOLOv8Loss(3)(*args, return_assignment=True)
    assert not out["assignment"].foreground[1].any()
    out["loss_box"].backward()
    assert (args[0].grad[1] == 0).all() and args[0].grad[0].abs().sum() > 0


def test_class_weights_and_gains():
    args = small_problem((2, 1))
    base = YOLOv8Loss(3)(*args)
    weights = torch.tensor([1.0, 0.0, 2.0])
    weighted = YOLOv8Loss(3, class_weights=weights, box_weight=1.0, dfl_weight=0.0)(*args)
    a = YOLOv8Loss(3)(*args, return_assignment=True)["assignment"]
    tss = a.scores.sum().clamp(min=1)
    want = binary_cross_entropy_with_logits(args[1], a.scores, weight=weights, reduction="sum", normalizer=tss) * 0.5
    torch.testing.assert_close(weighted["loss_cls"], want)
    torch.testing.assert_close(weighted["loss_box"], base["loss_box"] / 7.5)
    assert weighted["loss_dfl"].item() == 0.0


def test_distributed_without_process_group_is_local():
    args = small_problem((2, 1))
    torch.testing.assert_close(YOLOv8Loss(3, distributed=True)(*args)["loss"], YOLOv8Loss(3)(*args)["loss"])


def test_native_defaults_differ_from_dropin_only_in_documented_places():
    """The DFL clamp (reg_max - 1 natively, reg_max - 1.01 in the drop-in) is the only difference: with
    reg_max 4 some target distances lie beyond 2.99 bins, so the DFL terms must differ there."""
    args = small_problem((2, 2), reg_max=4)
    args[4] = torch.tensor([[[2.0, 2.0, 62.0, 50.0], [10.0, 20.0, 60.0, 62.0]], [[4.0, 8.0, 40.0, 60.0], [0.0, 0.0, 64.0, 64.0]]])
    native = YOLOv8Loss(3, reg_max=4)(*args, return_assignment=True)
    faithful = YOLOv8Loss(3, reg_max=4, dfl_max_target=2.99)(*args)
    a = native["assignment"]
    points, strides = args[2], args[3]
    grid = points / strides[:, None]
    target = a.boxes / strides[None, :, None]
    dist = torch.cat((grid - target[..., :2], target[..., 2:] - grid), -1)[a.foreground]
    assert bool((dist > 2.99).any())  # targets beyond the drop-in's clamp: the DFL check below can fail
    torch.testing.assert_close(native["loss_box"], faithful["loss_box"])
    torch.testing.assert_close(native["loss_cls"], faithful["loss_cls"])
    assert not torch.allclose(native["loss_dfl"], faithful["loss_dfl"], rtol=1e-6, atol=0)
    # with every target inside both clamps, the two agree
    near = YOLOv8Loss(3, reg_max=16)(*small_problem((3, 2)))
    torch.testing.assert_close(near["loss_dfl"], YOLOv8Loss(3, reg_max=16, dfl_max_target=14.99)(*small_problem((3, 2)))["loss_dfl"])


def test_float64_and_half():
    args64 = small_problem((2, 1), dtype=torch.float64)
    out64 = YOLOv8Loss(3)(*args64)
    assert out64["loss"].dtype == torch.float64
    args = small_problem((2, 1))
    half = [a.detach().bfloat16().requires_grad_() if i < 2 else a for i, a in enumerate(args)]
    out = YOLOv8Loss(3)(*half)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_topk2_one_to_one_keeps_one_anchor_per_object():
    args = small_problem((3, 2))
    a = YOLOv8Loss(3, topk=10, topk2=1)(*args, return_assignment=True)["assignment"]
    for i in range(2):
        counts = torch.bincount(a.matched_gt[i][a.foreground[i]], minlength=3)
        assert (counts <= 1).all() and counts.sum() >= 1


@pytest.mark.parametrize(
    "index, value, name",
    [
        (5, torch.tensor([[0, 3], [1, 0]]), "gt_labels"),
        (0, torch.randn(2, 83, 64), "cls_logits: expected shape \\(B=2, A=83"),
        (0, torch.randn(2, 84, 60), "box_pred"),
        (1, torch.randn(2, 84, 4), "cls_logits"),
        (2, torch.zeros(80, 2), "anchor_points"),
        (3, torch.zeros(84), "anchor_strides"),
        (4, torch.full((2, 2, 4), float("inf")), "gt_boxes"),
        (4, torch.tensor([[[0.0, 0.0, 70.0, 8.0], [1.0, 1.0, 9.0, 9.0]], [[0.0] * 4] * 2]), "gt_boxes"),
        (6, torch.ones(2, 3, dtype=torch.bool), "gt_valid"),
    ],
)
def test_bad_input_names_the_argument(index, value, name):
    args = small_problem((2, 1))
    YOLOv8Loss(3)(*args, image_size=(64, 64))
    args[index] = value
    with pytest.raises((ValueError, TypeError), match=name):
        YOLOv8Loss(3)(*args, image_size=(64, 64))


def test_bad_options():
    with pytest.raises(ValueError, match="image_size"):
        YOLOv8Loss(3, reg_max=1)(*small_problem((1, 1), reg_max=1))
    for kw, name in ((dict(reg_max=0), "reg_max"), (dict(topk=0), "topk"), (dict(dfl_max_target=20.0), "dfl_max_target"),
                     (dict(class_weights=[1.0, 2.0]), "class_weights"), (dict(beta=-1.0), "beta")):
        with pytest.raises(ValueError, match=name):
            YOLOv8Loss(3, **kw)


# ----------------------------------------------------------------------------- functionals


def test_dfl_values():
    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = torch.tensor([0.0, 2.25, 7.5, 14.999, 20.0], dtype=torch.float64)
    got = distribution_focal_loss(logits, target, reduction="none")
    lp = torch.log_softmax(logits, -1)
    y = target.clamp(0, 15)
    want = []
    for i in range(5):
        left = min(int(y[i]), 14)
        want.append(-(lp[i, left] * (left + 1 - y[i]) + lp[i, left + 1] * (y[i] - left)))
    torch.testing.assert_close(got, torch.stack(want))
    # at the last bin all weight is on it; ultralytics' clamp keeps 1 % on the one before
    assert torch.isclose(got[4], -lp[4, 15])
    clamped = distribution_focal_loss(logits[4:], target[4:], max_target=14.99, reduction="none")
    torch.testing.assert_close(clamped[0], -(lp[4, 14] * 0.01 + lp[4, 15] * 0.99))


def test_vfl_and_qfl_values():
    x = torch.tensor([-2.0, 0.0, 1.5, 3.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.7, 0.0, 0.2], dtype=torch.float64)
    p = torch.sigmoid(x)
    bce = -(t * torch.log(p) + (1 - t) * torch.log1p(-p))
    want_vfl = bce * torch.where(t > 0, t, 0.75 * p**2)
    torch.testing.assert_close(varifocal_loss(x, t, reduction="none"), want_vfl)
    torch.testing.assert_close(quality_focal_loss(x, t, reduction="none"), bce * (t - p).abs() ** 2)
    torch.testing.assert_close(quality_focal_loss(x, t, 1.5), sigmoid_focal_loss(x, t, alpha=-1, gamma=1.5))
    torch.testing.assert_close(varifocal_loss(x, t, reduction="sum", normalizer=2.0), want_vfl.sum() / 2)


def test_functionals_gradcheck():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(6, 4, generator=gen, dtype=torch.float64) * 7).requires_grad_(False)
    assert gradcheck(lambda z: distribution_focal_loss(z, target, reduction="none"), (logits,))
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    soft = torch.rand(10, 3, generator=gen, dtype=torch.float64)
    soft = torch.where(soft < 0.5, 0.0, soft)
    assert gradcheck(lambda z: varifocal_loss(z, soft, reduction="none"), (x,))
    assert gradcheck(lambda z: quality_focal_loss(z, soft, reduction="none"), (x,))
    w = torch.rand(6, 4, generator=gen, dtype=torch.float64)
    assert gradcheck(lambda z: distribution_focal_loss(z, target, weight=w, reduction="sum", normalizer=3.0), (logits,))


def test_functionals_reject_bad_input():
    with pytest.raises(ValueError, match="logits, target"):
        distribution_focal_loss(torch.zeros(3, 8), torch.zeros(4))
    with pytest.raises(ValueError, match="max_target"):
        distribution_focal_loss(torch.zeros(3, 8), torch.zeros(3), max_target=8.0)
    with pytest.raises(ValueError, match="targets"):
        varifocal_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="gamma"):
        quality_focal_loss(torch.zeros(3), torch.zeros(3), beta=-1.0)


def test_assignment_returned_matches_the_matcher():
    args = small_problem((3, 2))
    loss = YOLOv8Loss(3)
    out = loss(*args, return_assignment=True)
    box, cls, points, strides, gt, labels, valid = args
    grid = points / strides[:, None]
    bins = torch.arange(16, dtype=torch.float32)
    dist = box.detach().unflatten(-1, (4, 16)).softmax(-1).matmul(bins)
    pred = torch.cat((grid - dist[..., :2], grid + dist[..., 2:]), -1) * strides[:, None]
    direct = match_task_aligned(cls.detach().sigmoid(), pred, points, gt, labels, valid, topk=10, alpha=0.5,
                                min_box_side=16.0)
    for name in ("foreground", "matched_gt", "labels", "scores"):
        assert torch.equal(getattr(out["assignment"], name), getattr(direct, name)), name


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(0, 0), (1, 0), (3, 2), (6, 6)]), st.sampled_from([4, 8, 16]))
def test_loss_matches_float64_oracle(seed, num_gt, reg_max):
    args = small_problem(num_gt, reg_max, dtype=torch.float64, seed=seed)
    out = YOLOv8Loss(3, reg_max=reg_max)(*args)
    want = O.yolov8_loss(*[a.detach().numpy() for a in args], reg_max=reg_max)
    got = [out[k].item() for k in ("loss_box", "loss_cls", "loss_dfl")]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
