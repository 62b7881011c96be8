"""Native ``detloss.RetinaFaceLoss``: golden intermediates, the native-vs-original difference, the
float64 oracle, gradcheck, validation, faces without landmarks, zero positives."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import RetinaFaceLoss, pad_ground_truth
from oracles import ssd as O
from test_ssd_loss import small_priors
from conftest import golden_cases

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

SETTINGS = settings(max_examples=200, deadline=None)
CASES = golden_cases("torch/retina_mnet_*.npz")
UNWEIGHTED = dict(box_weight=1.0, cls_weight=1.0, landmark_weight=1.0)


def golden_batch(g, dtype=torch.float32):
    t = {k: torch.from_numpy(v) for k, v in g.items()}
    tg = t["in_targets"].to(dtype)
    valid = torch.arange(tg.shape[1])[None] < t["in_num_gt"][:, None]
    return dict(
        box_pred=t["in_loc_data"].to(dtype).requires_grad_(),
        cls_logits=t["in_conf_data"].to(dtype).requires_grad_(),
        landmark_pred=t["in_landm_data"].to(dtype).requires_grad_(),
        priors=t["in_priors"].to(dtype),
        gt_boxes=tg[..., :4].contiguous(),
        gt_landmarks=tg[..., 4:14].contiguous(),
        gt_has_landmarks=tg[..., 14] > 0,
        gt_valid=valid,
    )


@pytest.mark.parametrize("case", CASES)
def test_golden_native_with_quirk_option(golden, case):
    g = golden(f"torch/{case}.npz")
    x = golden_batch(g)
    out = RetinaFaceLoss(**UNWEIGHTED, drop_degenerate_gt=False, ignored_gt_claims_prior=True)(**x, return_assignment=True)
    a = out["assignment"]
    for key, ref in (("loss_box", "out_loss_l"), ("loss_cls", "out_loss_c"), ("loss_landmark", "out_loss_landm")):
        np.testing.assert_allclose(out[key].item(), g[ref], rtol=1e-5, atol=1e-6)
    conf_t = g["mid_conf_t"]
    np.testing.assert_array_equal(a.positive.numpy(), conf_t != 0)
    np.testing.assert_array_equal(a.positive.numpy(), g["mid_pos"])
    np.testing.assert_array_equal(a.landmark_positive.numpy(), g["mid_pos_landm"])
    np.testing.assert_array_equal(a.negative.numpy(), g["mid_neg"])
    np.testing.assert_array_equal(a.positive.sum(1).numpy(), g["mid_num_pos"])
    np.testing.assert_array_equal(a.negative.sum(1).numpy(), g["mid_num_neg"])
    np.testing.assert_array_equal(a.landmark_positive.sum(1).numpy(), g["mid_num_pos_landm"])
    np.testing.assert_array_equal(a.matched_gt.numpy(), g["mid_best_truth_idx"])
    np.testing.assert_array_equal(a.match.matched_iou.numpy(), g["mid_best_truth_overlap"])
    valid = x["gt_valid"].numpy()
    np.testing.assert_array_equal(a.match.best_prior.numpy()[valid], g["mid_best_prior_idx"][valid])
    pos = g["mid_pos"]
    np.testing.assert_allclose(a.box_targets.detach().numpy()[pos], g["mid_loc_t"][pos], rtol=1e-5, atol=1e-6)
    # landmark targets are only built where they are used: positives whose face has landmarks
    pos_landm = g["mid_pos_landm"]
    np.testing.assert_allclose(
        a.landmark_targets.detach().numpy()[pos_landm], g["mid_landm_t"][pos_landm], rtol=1e-5, atol=1e-6
    )
    assert (a.landmark_targets[~a.landmark_positive] == 0).all()
    (out["loss_box"] + out["loss_cls"] + out["loss_landmark"]).backward()
    for name, ref in (("box_pred", "out_grad_loc"), ("cls_logits", "out_grad_conf"), ("landmark_pred", "out_grad_landm")):
        np.testing.assert_allclose(x[name].grad.numpy(), g[ref], rtol=1e-5, atol=1e-7)


def test_golden_default_weights_train_py(golden):
    """Default ``loss = 2 * box + cls + landmark`` (train.py); gradients scale with the weights."""
    g = golden("torch/retina_mnet_b_image_all_ignored.npz")
    x = golden_batch(g)
    out = RetinaFaceLoss(drop_degenerate_gt=False, ignored_gt_claims_prior=True)(**x)
    np.testing.assert_allclose(out["loss"].item(), 2 * g["out_loss_l"] + g["out_loss_c"] + g["out_loss_landm"], rtol=1e-5)
    out["loss"].backward()
    np.testing.assert_allclose(x["box_pred"].grad.numpy(), 2 * g["out_grad_loc"], rtol=1e-5, atol=2e-7)


def test_native_default_differs_only_by_the_quirk(golden):
    """Natively an ignored face claims nothing. Golden ``a`` image 2 has priors that the original
    assigned to an ignored GT; natively each of them goes to a valid GT (a positive only if its
    IoU, 2.0 when forced, reaches 0.35). Every other prior is the original's."""
    g = golden("torch/retina_mnet_a_typical.npz")
    x = golden_batch(g)
    a = RetinaFaceLoss()(**x, return_assignment=True)["assignment"]
    ignored = ~g["mid_gt_valid"]
    idx = g["mid_best_truth_idx"]
    quirk = g["mid_pos"] & np.take_along_axis(ignored, np.maximum(idx, 0), 1) & (idx >= 0)
    assert quirk[2].sum() >= 1 and quirk[:2].sum() == 0
    pos, gt = a.positive.numpy(), a.matched_gt.numpy()
    np.testing.assert_array_equal(pos[~quirk], g["mid_pos"][~quirk])
    np.testing.assert_array_equal(gt[g["mid_pos"] & ~quirk], idx[g["mid_pos"] & ~quirk])
    for b, p in zip(*np.nonzero(quirk)):
        assert not ignored[b, gt[b, p]]
        assert pos[b, p] == (a.match.matched_iou[b, p].item() >= 0.35)


@pytest.mark.parametrize("case", CASES)
def test_golden_native_float64(golden, case):
    g = golden(f"torch/{case}.npz")
    out = RetinaFaceLoss(**UNWEIGHTED, drop_degenerate_gt=False, ignored_gt_claims_prior=True)(**golden_batch(g, torch.float64))
    for key, ref in (("loss_box", "out_loss_l_f64"), ("loss_cls", "out_loss_c_f64"), ("loss_landmark", "out_loss_landm_f64")):
        np.testing.assert_allclose(out[key].item(), g[ref], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- oracle property tests

@st.composite
def face_batches(draw):
    b = draw(st.integers(1, 3))
    counts = [draw(st.sampled_from([0, 1, 3, 32])) for _ in range(b)]
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["random", "tiny", "duplicate", "degenerate"]))
    gen = torch.Generator().manual_seed(seed)
    boxes, has, lms = [], [], []
    for n in counts:
        xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.8
        wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.4 + 0.01
        if kind == "tiny":
            wh = wh * torch.where(torch.rand(n, 1, generator=gen) < 0.5, 0.05, 1.0).double()
        box = torch.cat([xy, (xy + wh).clamp(max=1)], 1)
        if kind == "duplicate" and n >= 2:
            box[1::2] = box[0::2][: box[1::2].shape[0]]
        if kind == "degenerate" and n >= 1:
            box[0, 3] = box[0, 1]
        boxes.append(box)
        has.append((torch.rand(n, generator=gen) < 0.6).long())
        lms.append(torch.rand(n, 10, generator=gen, dtype=torch.float64))
    gt_boxes, gt_has, gt_valid, gt_lms = pad_ground_truth(boxes, has, lms)
    if gt_lms.shape[-1] != 10:
        gt_lms = gt_boxes.new_zeros(b, gt_boxes.shape[1], 10)
    priors = small_priors()
    p = priors.shape[0]
    loc = torch.randn(b, p, 4, generator=gen, dtype=torch.float64)
    conf = torch.randn(b, p, 2, generator=gen, dtype=torch.float64) * 2
    landm = torch.randn(b, p, 10, generator=gen, dtype=torch.float64)
    quirk = draw(st.booleans())
    return (loc, conf, landm, priors, gt_boxes, gt_lms, gt_has > 0, gt_valid), quirk


@SETTINGS
@given(face_batches())
def test_matches_float64_oracle(batch):
    args, quirk = batch
    out = RetinaFaceLoss(**UNWEIGHTED, ignored_gt_claims_prior=quirk)(*args, return_assignment=True)
    ref = O.retinaface_loss(*(a.numpy() for a in args), ignored_gt_claims_prior=quirk)
    a = out["assignment"]
    np.testing.assert_array_equal(a.positive.numpy(), ref["positive"])
    np.testing.assert_array_equal(a.negative.numpy(), ref["negative"])
    for key in ("loss_box", "loss_cls", "loss_landmark"):
        np.testing.assert_allclose(out[key].item(), ref[key], rtol=1e-9, atol=1e-12)
        assert np.isfinite(out[key].item())


def test_gradcheck_float64():
    """Gradients w.r.t. loc, logits and landmarks in float64 with a fixed assignment."""
    gen = torch.Generator().manual_seed(5)
    priors = small_priors(2)
    p = priors.shape[0]
    gt_boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]]], dtype=torch.float64)
    gt_lms = torch.rand(1, 2, 10, generator=gen, dtype=torch.float64)
    has = torch.tensor([[True, False]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    preds = [torch.randn(1, p, k, generator=gen, dtype=torch.float64, requires_grad=True) for k in (4, 2, 10)]
    loss = RetinaFaceLoss()
    assert torch.autograd.gradcheck(
        lambda l, c, m: loss(l, c, m, priors, gt_boxes, gt_lms, has, valid)["loss"], preds, fast_mode=True
    )


# ---------------------------------------------------------------- pain points and validation

def _batch(n_faces=2, has=(True, False), seed=0):
    gen = torch.Generator().manual_seed(seed)
    priors = small_priors()
    p = priors.shape[0]
    gt_boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]][:n_faces]])
    return dict(
        box_pred=torch.randn(1, p, 4, generator=gen, requires_grad=True),
        cls_logits=torch.randn(1, p, 2, generator=gen, requires_grad=True),
        landmark_pred=torch.randn(1, p, 10, generator=gen, requires_grad=True),
        priors=priors.float(),
        gt_boxes=gt_boxes,
        gt_landmarks=torch.rand(1, n_faces, 10, generator=gen),
        gt_has_landmarks=torch.tensor([list(has[:n_faces])]),
        gt_valid=torch.ones(1, n_faces, dtype=torch.bool),
    )


def test_faces_without_landmarks_no_landmark_loss():
    x = _batch(has=(False, False))
    out = RetinaFaceLoss()(**x, return_assignment=True)
    assert out["loss_landmark"].item() == 0 and out["loss_box"].item() > 0
    out["loss"].backward()
    assert torch.all(x["landmark_pred"].grad == 0)


def test_landmark_normaliser_counts_landmark_positives():
    x = _batch(has=(True, False))
    out = RetinaFaceLoss(**UNWEIGHTED)(**x, return_assignment=True)
    a = out["assignment"]
    assert 0 < a.landmark_positive.sum() < a.positive.sum()
    raw = torch.nn.functional.smooth_l1_loss(x["landmark_pred"][a.landmark_positive], a.landmark_targets[a.landmark_positive], reduction="sum")
    torch.testing.assert_close(out["loss_landmark"], raw / a.landmark_positive.sum())


def test_zero_positives_and_empty_images():
    x = _batch()
    x["gt_valid"] = torch.zeros_like(x["gt_valid"])
    out = RetinaFaceLoss()(**x)
    assert [out[k].item() for k in ("loss_box", "loss_cls", "loss_landmark")] == [0.0, 0.0, 0.0]
    x = _batch()
    for k in ("gt_boxes", "gt_landmarks", "gt_has_landmarks", "gt_valid"):
        x[k] = x[k][:, :0]
    out = RetinaFaceLoss()(**x)
    assert out["loss"].item() == 0
    out["loss"].backward()
    assert torch.all(x["cls_logits"].grad == 0)


def test_ignored_face_alone_gives_no_positives():
    """A face too small for any prior (best IoU < 0.2) is ignored; the image is all background."""
    x = _batch(n_faces=1)
    x["gt_boxes"] = torch.tensor([[[0.50, 0.50, 0.51, 0.51]]])
    a = RetinaFaceLoss()(**x, return_assignment=True)["assignment"]
    assert not a.positive.any() and (a.matched_gt == -1).all()


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda x: x.update(landmark_pred=x["landmark_pred"][..., :8]), ValueError, r"landmark_pred: expected shape \(B=1, P=144, 10\)"),
        (lambda x: x.update(gt_landmarks=x["gt_landmarks"][:, :1]), ValueError, r"gt_landmarks: expected shape \(B=1, M=2, 10\)"),
        (lambda x: x.update(gt_has_landmarks=x["gt_has_landmarks"].float()), TypeError, "gt_has_landmarks"),
        (lambda x: x.update(cls_logits=x["cls_logits"].detach().repeat(1, 1, 2)), ValueError, r"cls_logits: expected shape .*C=2"),
        (lambda x: x.update(priors=x["priors"][:10]), ValueError, r"priors: expected shape \(P=144, 4\)"),
        (lambda x: x.update(gt_boxes=x["gt_boxes"] * 640), ValueError, "normalis"),
    ],
)
def test_bad_input_named(change, error, pattern):
    x = _batch()
    change(x)
    with pytest.raises(error, match=pattern):
        RetinaFaceLoss()(**x)
