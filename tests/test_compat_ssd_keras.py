"""ssd_keras drop-in (``detloss.compat.ssd_keras``): golden parity, oracle property tests, errors.

Golden files ``tf/ssd_*.npz`` come from running the original ``SSDInputEncoder`` and
``SSDLoss.compute_loss`` (see ``shared/golden/tf/README.md`` section 2).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import golden_cases, golden_path
from detloss.compat.ssd_keras import DegenerateBoxError, SSDInputEncoder, SSDLoss
from oracles import ssd_keras as O


SETTINGS = settings(max_examples=200, deadline=None)
CASES = golden_cases("tf/ssd_*.npz")
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)


def _config(name: str) -> dict:
    files = json.loads(golden_path("tf/index.json").read_text())["files"]
    return next(f["config"] for f in files if f["file"] == name + ".npz")


def _encoder(cfg: dict, **overrides) -> SSDInputEncoder:
    kwargs = dict(
        img_height=cfg["img_height"],
        img_width=cfg["img_width"],
        n_classes=cfg["n_classes"],
        predictor_sizes=cfg["predictor_sizes"],
        scales=cfg["scales"],
        aspect_ratios_per_layer=cfg["aspect_ratios_per_layer"],
        two_boxes_for_ar1=cfg["two_boxes_for_ar1"],
        steps=cfg["steps"],
        offsets=cfg["offsets"],
        clip_boxes=cfg["clip_boxes"],
        variances=cfg["variances"],
        matching_type=cfg["matching_type"],
        pos_iou_threshold=cfg["pos_iou_threshold"],
        neg_iou_limit=cfg["neg_iou_limit"],
        coords=cfg["coords"],
        normalize_coords=cfg["normalize_coords"],
        background_id=cfg["background_id"],
    )
    kwargs.update(overrides)
    return SSDInputEncoder(**kwargs)


def _gt_list(data: dict) -> list:
    return [data["in_gt_labels"][i, :c] for i, c in enumerate(data["in_gt_count"])]


# ----------------------------------------------------------------------------- golden parity


@pytest.mark.parametrize("case", CASES)
def test_encoder_matches_golden(golden, case):
    data = golden(f"tf/{case}.npz")
    y = _encoder(_config(case))(_gt_list(data))
    ref = data["in_y_true"]
    n_cls = int(data["cfg_n_classes_incl_bg"])
    assert y.shape == ref.shape and y.dtype == np.float64
    np.testing.assert_array_equal(y[..., :n_cls].astype(np.float32), ref[..., :n_cls])  # classes exact
    np.testing.assert_allclose(y[..., n_cls : n_cls + 4].astype(np.float32), ref[..., n_cls : n_cls + 4], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(y[..., n_cls + 4 :].astype(np.float32), ref[..., n_cls + 4 :])  # anchors, variances
    positives = y[..., 1:n_cls].max(-1)
    np.testing.assert_array_equal(positives, data["mid_positives"])
    np.testing.assert_array_equal(y[..., 0], data["mid_negatives"])
    np.testing.assert_array_equal(y[..., :n_cls].sum(-1) == 0, data["mid_neutral"].astype(bool))
    assert positives.sum() == data["mid_n_positive"]


@pytest.mark.parametrize("case", CASES)
def test_loss_matches_golden(golden, case):
    data = golden(f"tf/{case}.npz")
    y_true = torch.tensor(data["in_y_true"])
    y_pred = torch.tensor(data["in_y_pred"], requires_grad=True)
    loss = SSDLoss(int(data["cfg_neg_pos_ratio"]), int(data["cfg_n_neg_min"]), float(data["cfg_alpha"]))
    parts = loss.loss_components(y_true, y_pred)
    per_item = loss.compute_loss(y_true, y_pred)
    assert per_item.shape == (y_true.shape[0],) and per_item.dtype == torch.float32
    np.testing.assert_allclose(per_item.detach().numpy(), data["out_total_loss_per_item"], **LOSS_TOL)
    np.testing.assert_allclose(per_item.mean().item(), data["out_total_loss"], **LOSS_TOL)
    for mine, key in [
        (parts.pos_class_loss, "mid_pos_class_loss"),
        (parts.neg_class_loss, "mid_neg_class_loss"),
        (parts.loc_loss, "mid_loc_loss"),
        (parts.classification_loss, "mid_classification_loss"),
        (parts.localization_loss, "mid_localization_loss"),
    ]:
        np.testing.assert_allclose(mine.detach().numpy(), data[key], err_msg=key, **LOSS_TOL)
    np.testing.assert_array_equal(parts.negatives_keep.numpy(), data["mid_negatives_keep"].astype(bool))
    assert int(parts.negatives_keep.sum()) == int(data["mid_n_negative_keep"])
    assert int(((parts.classification_loss * parts.negatives) != 0).sum()) == int(data["mid_n_neg_losses"])
    assert float(parts.n_positive) == float(data["mid_n_positive"])
    per_item.mean().backward()
    np.testing.assert_allclose(y_pred.grad.numpy(), data["out_grad_y_pred"], **GRAD_TOL)


def test_loss_n_neg_min_alternative_matches_golden(golden):
    data = golden("tf/ssd_n_neg_min5.npz")
    y_true, y_pred = torch.tensor(data["in_y_true"]), torch.tensor(data["in_y_pred"])
    per_item = SSDLoss(3, int(data["cfg_n_neg_min_alt"]), 1.0).compute_loss(y_true, y_pred)
    np.testing.assert_allclose(per_item.numpy(), data["out_total_loss_per_item_alt"], **LOSS_TOL)
    np.testing.assert_allclose(per_item.mean().item(), data["out_total_loss_alt"], **LOSS_TOL)


def test_helpers_match_golden_per_box_losses(golden):
    data = golden("tf/ssd_typical.npz")
    y_true, y_pred = torch.tensor(data["in_y_true"]), torch.tensor(data["in_y_pred"])
    loss = SSDLoss()
    np.testing.assert_allclose(
        loss.log_loss(y_true[..., :-12], y_pred[..., :-12]).numpy(), data["mid_classification_loss"], **LOSS_TOL
    )
    np.testing.assert_allclose(
        loss.smooth_L1_loss(y_true[..., -12:-8], y_pred[..., -12:-8]).numpy(), data["mid_localization_loss"], **LOSS_TOL
    )


# ----------------------------------------------------------------------------- oracle properties

SMALL = dict(
    img_height=90,
    img_width=120,
    n_classes=3,
    predictor_sizes=[[3, 4], [1, 1]],
    scales=[0.3, 0.7, 1.0],
    aspect_ratios_per_layer=[[1.0, 2.0, 0.5], [1.0]],
)


def _random_labels(rng, b, max_gt, n_classes=3, h=90, w=120, dup=False):
    labels = []
    for _ in range(b):
        n = int(rng.integers(0, max_gt + 1))
        x0 = rng.uniform(-10, w - 5, n)
        y0 = rng.uniform(-10, h - 5, n)
        x1 = x0 + rng.uniform(1, w, n)
        y1 = y0 + rng.uniform(1, h, n)
        lab = np.stack([rng.integers(1, n_classes + 1, n), x0, y0, x1, y1], 1)
        if dup and n >= 2:
            lab[1, 1:] = lab[0, 1:]
        labels.append(lab)
    return labels


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 3),
    max_gt=st.integers(0, 5),
    dup=st.booleans(),
    matching_type=st.sampled_from(["multi", "bipartite"]),
    pos=st.sampled_from([0.3, 0.5, 0.7]),
    neg_gap=st.sampled_from([0.0, 0.2]),
)
def test_encoder_equals_oracle(seed, b, max_gt, dup, matching_type, pos, neg_gap):
    rng = np.random.default_rng(seed)
    labels = _random_labels(rng, b, max_gt, dup=dup)
    enc = SSDInputEncoder(**SMALL, matching_type=matching_type, pos_iou_threshold=pos, neg_iou_limit=pos - neg_gap)
    y = enc(labels)
    want = O.encode(
        labels, enc.anchors.numpy(), 3, (90, 120), matching_type=matching_type, pos_thr=pos, neg_limit=pos - neg_gap
    )
    np.testing.assert_array_equal(y[..., :4], want[..., :4])
    np.testing.assert_allclose(y[..., 4:], want[..., 4:], rtol=1e-9, atol=1e-12)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 3),
    p=st.integers(1, 10),
    n_cls=st.integers(2, 4),
    pos_rate=st.sampled_from([0.0, 0.2, 0.5]),
    neutral_rate=st.sampled_from([0.0, 0.2]),
    certain_bg=st.booleans(),  # all-zero negative losses
    ratio=st.sampled_from([1, 3]),
    n_neg_min=st.integers(0, 40),
    alpha=st.sampled_from([0.5, 1.0]),
)
def test_loss_equals_oracle(seed, b, p, n_cls, pos_rate, neutral_rate, certain_bg, ratio, n_neg_min, alpha):
    rng = np.random.default_rng(seed)
    kind = rng.random((b, p))
    cls = np.where(kind < pos_rate, rng.integers(1, n_cls, (b, p)), 0)
    onehot = np.eye(n_cls)[cls] * (kind >= pos_rate + neutral_rate)[..., None]
    onehot[kind < pos_rate] = np.eye(n_cls)[cls[kind < pos_rate]]
    y_true = np.concatenate([onehot, rng.normal(0, 1.5, (b, p, 4)), np.zeros((b, p, 8))], -1)
    probs = rng.dirichlet(np.ones(n_cls), (b, p))
    probs[rng.random((b, p)) < 0.1, 0] = 0.0  # the 1e-15 clamp
    if certain_bg:
        probs[..., :] = 0.0
        probs[..., 0] = 1.0
    y_pred = np.concatenate([probs, rng.normal(0, 1.5, (b, p, 4)), np.zeros((b, p, 8))], -1)
    got = SSDLoss(ratio, n_neg_min, alpha).loss_components(torch.tensor(y_true), torch.tensor(y_pred))
    want = O.ssd_keras_loss(y_true, y_pred, ratio, n_neg_min, alpha)
    np.testing.assert_array_equal(got.negatives_keep.numpy(), want["negatives_keep"])
    for key in ("pos_class_loss", "neg_class_loss", "loc_loss", "total"):
        np.testing.assert_allclose(getattr(got, key).numpy(), want[key], rtol=1e-10, atol=1e-10, err_msg=key)
    assert np.isfinite(got.total.numpy()).all()


def test_gradcheck_float64():
    rng = np.random.default_rng(0)
    b, p, n_cls = 2, 5, 3
    y_true = np.zeros((b, p, n_cls + 12))
    y_true[0, 0, 1] = y_true[1, 1, 2] = 1.0
    y_true[..., 0] = 1.0 - y_true[..., 1:n_cls].sum(-1)
    y_true[..., n_cls : n_cls + 4] = rng.normal(0, 1, (b, p, 4))
    y_pred = np.concatenate([rng.dirichlet(np.ones(n_cls), (b, p)), rng.normal(0, 1, (b, p, 4)), np.zeros((b, p, 8))], -1)
    y_pred[..., n_cls : n_cls + 4] = np.where(
        np.abs(y_pred[..., n_cls : n_cls + 4] - y_true[..., n_cls : n_cls + 4]) - 1 < 0.05,
        y_pred[..., n_cls : n_cls + 4] + 0.2,
        y_pred[..., n_cls : n_cls + 4],
    )
    yt = torch.tensor(y_true)
    yp = torch.tensor(y_pred, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: SSDLoss(1, 0, 1.0).compute_loss(yt, x), (yp,))


# ----------------------------------------------------------------------------- encoder options


def test_diagnostics_and_empty_batch():
    enc = SSDInputEncoder(**SMALL)
    labels = [np.array([[1, 10, 10, 60, 50]]), np.zeros((0, 5))]
    y, anchors_view = enc(labels, diagnostics=True)
    assert (anchors_view[..., -12:-8] == 0).all()
    np.testing.assert_array_equal(anchors_view[..., :-12], y[..., :-12])
    assert (y[1, :, 0] == 1).all() and (y[1, :, -12:-8] == 0).all()
    y_empty = enc([np.zeros((0, 5)), np.array([])])
    assert (y_empty[..., 0] == 1).all()
    assert enc.anchors.shape[0] == y.shape[1] == 3 * 4 * 4 + 2


@pytest.mark.parametrize("coords", ["corners", "minmax"])
def test_corner_coords_decode_back_to_the_box(coords):
    box = np.array([[2, 13.0, 17.0, 71.0, 64.0]])
    ref = SSDInputEncoder(**SMALL)([box])
    enc = SSDInputEncoder(**SMALL, coords=coords)
    y = enc([box])
    np.testing.assert_array_equal(y[..., :4], ref[..., :4])  # same assignment as centroids
    pos = y[0, :, 1:4].max(-1) > 0
    anchors = y[0, pos, -8:-4]
    offsets = y[0, pos, -12:-8] * y[0, pos, -4:]
    if coords == "minmax":  # (xmin, xmax, ymin, ymax)
        anchors, offsets = anchors[:, [0, 2, 1, 3]], offsets[:, [0, 2, 1, 3]]
    size = np.stack([anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]] * 2, 1)
    decoded = anchors + offsets * size
    want = box[0, 1:] / np.array([120, 90, 120, 90])
    np.testing.assert_allclose(decoded, np.broadcast_to(want, decoded.shape), rtol=1e-12)


def test_four_different_variances():
    box = [np.array([[3, 20.0, 5.0, 90.0, 60.0]])]
    a = SSDInputEncoder(**SMALL, variances=[0.1, 0.2, 0.3, 0.4])(box)
    b = SSDInputEncoder(**SMALL, variances=[1.0, 1.0, 1.0, 1.0])(box)
    np.testing.assert_allclose(a[..., -12:-8] * np.array([0.1, 0.2, 0.3, 0.4]), b[..., -12:-8], rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "labels, exc, text",
    [
        ([np.array([[4, 1, 1, 5, 5]])], ValueError, r"ground_truth_labels\[0\]"),  # class 4 > n_classes 3
        ([np.array([[0, 1, 1, 5, 5]])], ValueError, r"ground_truth_labels\[0\]"),  # background id
        ([np.zeros((0, 5)), np.array([[1, 9, 1, 5, 5]])], DegenerateBoxError, r"ground_truth_labels\[1\]"),
        ([np.array([[1, 1, 8, 5, 5]])], ValueError, "ymax > ymin"),
        ([np.array([[1, 1, 1, 5]])], ValueError, r"\(n, 5\)"),
        ([np.array([[1, np.nan, 1, 5, 5]])], ValueError, "finite"),
        (np.zeros((1, 2, 5)), TypeError, "ground_truth_labels"),
    ],
)
def test_encoder_bad_labels(labels, exc, text):
    with pytest.raises(exc, match=text):
        SSDInputEncoder(**SMALL)(labels)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(border_pixels="include"), "border_pixels"),
        (dict(coords="xywh"), "coords"),
        (dict(matching_type="greedy"), "matching_type"),
        (dict(neg_iou_limit=0.6), "neg_iou_limit"),
        (dict(variances=[0.1, 0.2]), "variances"),
        (dict(scales=[0.1, 0.2]), "scales"),
        (dict(aspect_ratios_per_layer=[[1.0]]), "aspect_ratios_per_layer"),
    ],
)
def test_encoder_bad_config(kwargs, text):
    cfg = dict(SMALL)
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=text):
        SSDInputEncoder(**cfg)


@pytest.mark.parametrize(
    "y_true, y_pred, exc, text",
    [
        (torch.zeros(2, 5, 33), torch.zeros(2, 5, 32), ValueError, "y_true"),
        (torch.zeros(2, 5, 13), torch.zeros(2, 5, 13), ValueError, "y_pred"),
        (torch.zeros(2, 6, 33), torch.zeros(2, 5, 33), ValueError, "y_true"),
        (torch.zeros(5, 33), torch.zeros(5, 33), ValueError, "y_pred"),
        (torch.zeros(2, 5, 33), torch.zeros(2, 5, 33, dtype=torch.int64), TypeError, "y_pred"),
        (np.zeros((2, 5, 33)), torch.zeros(2, 5, 33), TypeError, "y_true"),
    ],
)
def test_loss_bad_input(y_true, y_pred, exc, text):
    with pytest.raises(exc, match=text):
        SSDLoss().compute_loss(y_true, y_pred)


def test_half_precision_input_computes_in_float32(golden):
    data = golden("tf/ssd_typical.npz")
    y_true = torch.tensor(data["in_y_true"])
    y_pred = torch.tensor(data["in_y_pred"])
    full = SSDLoss().compute_loss(y_true, y_pred)
    half = SSDLoss().compute_loss(y_true.bfloat16(), y_pred.bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    np.testing.assert_allclose(half.numpy(), full.numpy(), rtol=0.05)


@pytest.mark.slow
def test_loss_compiles_without_graph_break(golden):
    data = golden("tf/ssd_typical.npz")
    y_true, y_pred = torch.tensor(data["in_y_true"]), torch.tensor(data["in_y_pred"])
    loss = SSDLoss()
    compiled = torch.compile(loss.compute_loss, fullgraph=True)
    np.testing.assert_allclose(compiled(y_true, y_pred).numpy(), data["out_total_loss_per_item"], **LOSS_TOL)
