"""Box coders: golden parity (ssd.pytorch / Pytorch_Retinaface box utils), oracle, round trips."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import (
    decode_boxes,
    decode_deltas,
    decode_landmarks,
    decode_yolo,
    encode_boxes,
    encode_deltas,
    encode_landmarks,
    yolov3_anchors,
)
from detloss.coders import MAX_LOG_SCALE
from oracles import foundation as O

TOL = dict(rtol=1e-9, atol=1e-9)
GOLDEN_TOL = dict(rtol=1e-5, atol=1e-6)


def t64(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64)


# ----------------------------------------------------------------------------- strategies

pos = st.floats(1e-3, 2.0)
centre = st.floats(-1.0, 2.0)


@st.composite
def priors_cxcywh(draw, n):
    return np.array([[draw(centre), draw(centre), draw(pos), draw(pos)] for _ in range(n)])


@st.composite
def boxes_xyxy(draw, n, allow_degenerate=True):
    size = st.one_of(st.just(0.0), pos) if allow_degenerate else pos
    rows = []
    for _ in range(n):
        x, y = draw(centre), draw(centre)
        rows.append([x, y, x + draw(size), y + draw(size)])
    return np.array(rows)


variances = st.tuples(st.floats(0.05, 2.0), st.floats(0.05, 2.0))


# ----------------------------------------------------------------------------- golden


def test_ssd_encode_decode_golden(golden):
    g = golden("torch/ssd_box_utils.npz")
    var = tuple(float(v) for v in g["cfg_variance"])
    got = encode_boxes(torch.from_numpy(g["in_encode_matched"]), torch.from_numpy(g["in_encode_priors"]), var)
    np.testing.assert_allclose(got.numpy(), g["out_encode"], **GOLDEN_TOL)
    got = decode_boxes(torch.from_numpy(g["in_decode_loc"]), torch.from_numpy(g["in_decode_priors"]), var)
    np.testing.assert_allclose(got.numpy(), g["out_decode"], **GOLDEN_TOL)


def test_retinaface_landmarks_golden(golden):
    g = golden("torch/retina_box_utils.npz")
    var = tuple(float(v) for v in g["cfg_variance"])
    priors = torch.from_numpy(g["in_priors"])
    got = encode_landmarks(torch.from_numpy(g["in_encode_landm_matched"]), priors, var)
    np.testing.assert_allclose(got.numpy(), g["out_encode_landm"], **GOLDEN_TOL)
    got = decode_landmarks(torch.from_numpy(g["in_decode_landm_pre"]), priors, var)
    np.testing.assert_allclose(got.numpy(), g["out_decode_landm"], **GOLDEN_TOL)


def test_golden_box_utils_also_match_oracle(golden):
    # the oracle and the originals agree, so the oracle tests below test the right thing
    g = golden("torch/ssd_box_utils.npz")
    var = tuple(float(v) for v in g["cfg_variance"])
    np.testing.assert_allclose(O.encode_boxes(g["in_encode_matched"], g["in_encode_priors"], var), g["out_encode"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(O.decode_boxes(g["in_decode_loc"], g["in_decode_priors"], var), g["out_decode"], rtol=1e-5, atol=1e-6)
    r = golden("torch/retina_box_utils.npz")
    np.testing.assert_allclose(O.encode_landmarks(r["in_encode_landm_matched"], r["in_priors"]), r["out_encode_landm"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(O.decode_landmarks(r["in_decode_landm_pre"], r["in_priors"]), r["out_decode_landm"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- variance coder vs oracle


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(boxes_xyxy(n), priors_cxcywh(n))), variances)
def test_encode_boxes_equals_oracle_and_is_finite(data, var):
    matched, priors = data
    got = encode_boxes(t64(matched), t64(priors), var)
    torch.testing.assert_close(got, t64(O.encode_boxes(matched, priors, var)), **TOL)
    assert bool(torch.isfinite(got).all())  # zero-size boxes: log clamped at min_ratio


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(boxes_xyxy(n, False), priors_cxcywh(n))), variances, st.integers(1, 3))
def test_variance_coder_round_trip_and_broadcast(data, var, batch):
    matched, priors = data
    m = t64(matched).expand(batch, -1, -1)
    p = t64(priors)  # (P, 4) broadcast against (B, P, 4)
    loc = encode_boxes(m, p, var)
    assert loc.shape == (batch, len(priors), 4)
    # decoding clamps log size ratios at MAX_LOG_SCALE: compare the rows inside it
    inside = (loc[0, :, 2:].abs() * var[1] < MAX_LOG_SCALE - 1e-9).all(-1)
    torch.testing.assert_close(decode_boxes(loc, p, var)[:, inside], m[:, inside], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(decode_boxes(loc, p, var), t64(O.decode_boxes(loc[0].numpy(), priors, var)).expand(batch, -1, -1), **TOL)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(st.lists(st.lists(st.floats(-30, 30), min_size=4, max_size=4), min_size=n, max_size=n), priors_cxcywh(n))
    ),
    variances,
)
def test_decode_boxes_equals_oracle_with_clamped_exponent(data, var):
    loc, priors = np.array(data[0]), data[1]
    got = decode_boxes(t64(loc), t64(priors), var)
    torch.testing.assert_close(got, t64(O.decode_boxes(loc, priors, var)), **TOL)
    assert bool(torch.isfinite(got).all())
    # inside the clamp, encode inverts decode
    inside = (np.abs(loc[:, 2:]) * var[1] < MAX_LOG_SCALE - 1e-6).all(1)
    if inside.any():
        back = encode_boxes(got[inside], t64(priors)[inside], var)
        torch.testing.assert_close(back, t64(loc[inside]), rtol=1e-7, atol=1e-7)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.data())
def test_landmarks_equal_oracle_and_round_trip(n, k, data):
    priors = data.draw(priors_cxcywh(n))
    points = np.array(data.draw(st.lists(st.lists(st.floats(-2, 3), min_size=2 * k, max_size=2 * k), min_size=n, max_size=n)))
    var = data.draw(variances)
    enc = encode_landmarks(t64(points), t64(priors), var)
    torch.testing.assert_close(enc, t64(O.encode_landmarks(points, priors, var)), **TOL)
    torch.testing.assert_close(decode_landmarks(enc, t64(priors), var), t64(points), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(decode_landmarks(enc, t64(priors), var), t64(O.decode_landmarks(enc.numpy(), priors, var)), **TOL)
    # batched (B, P, 2K) against (P, 4)
    enc_b = encode_landmarks(t64(points).expand(2, -1, -1), t64(priors), var)
    torch.testing.assert_close(enc_b[1], enc, rtol=0, atol=0)


# ----------------------------------------------------------------------------- R-CNN delta coder


@st.composite
def pixel_boxes(draw, n, allow_degenerate=True):
    size = st.one_of(st.just(0.0), st.floats(1.0, 300.0)) if allow_degenerate else st.floats(1.0, 300.0)
    rows = []
    for _ in range(n):
        x, y = draw(st.floats(-50, 800)), draw(st.floats(-50, 800))
        rows.append([x, y, x + draw(size), y + draw(size)])
    return np.array(rows)


delta_stats = st.sampled_from(
    [
        (None, None),
        ((0.0, 0.0, 0.0, 0.0), (0.1, 0.1, 0.2, 0.2)),
        ((0.1, -0.2, 0.05, 0.0), (0.5, 0.25, 2.0, 1.0)),
        (None, (1 / 10, 1 / 10, 1 / 5, 1 / 5)),  # torchvision weights (10, 10, 5, 5)
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(pixel_boxes(n), pixel_boxes(n, False))), delta_stats, st.sampled_from([0.0, 1.0]))
def test_encode_deltas_equals_oracle(data, stats, offset):
    boxes, ref = data
    means, stds = stats
    got = encode_deltas(t64(boxes), t64(ref), means=means, stds=stds, pixel_offset=offset)
    want = O.encode_deltas(boxes, ref, means or (0, 0, 0, 0), stds or (1, 1, 1, 1), offset)
    torch.testing.assert_close(got, t64(want), **TOL)
    assert bool(torch.isfinite(got).all())


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(pixel_boxes(n, False), pixel_boxes(n, False))), delta_stats, st.sampled_from([0.0, 1.0]))
def test_delta_coder_round_trip(data, stats, offset):
    boxes, ref = data
    means, stds = stats
    d = encode_deltas(t64(boxes), t64(ref), means=means, stds=stds, pixel_offset=offset)
    back = decode_deltas(d, t64(ref), means=means, stds=stds, pixel_offset=offset)
    # decoding clamps dw, dh at MAX_LOG_SCALE: compare the rows inside it
    raw = encode_deltas(t64(boxes), t64(ref), pixel_offset=offset)
    inside = (raw[:, 2:] < MAX_LOG_SCALE - 1e-9).all(-1)
    torch.testing.assert_close(back[inside], t64(boxes)[inside], rtol=1e-9, atol=1e-8)
    want = O.decode_deltas(d.numpy(), ref, means or (0, 0, 0, 0), stds or (1, 1, 1, 1), offset)
    torch.testing.assert_close(back, t64(want), **TOL)


def test_decode_deltas_clamps_large_scale():
    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    out = decode_deltas(torch.tensor([[0.0, 0.0, 1e4, 1e4]], dtype=torch.float64), ref)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, t64(O.decode_deltas([[0.0, 0.0, 1e4, 1e4]], ref.numpy())), **TOL)


# ----------------------------------------------------------------------------- YOLO decode


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.sampled_from([8, 16, 32]), st.data())
def test_decode_yolo_equals_oracle(b, h, w, stride, data):
    raw = np.array(data.draw(st.lists(st.floats(-20, 20), min_size=b * h * w * 3 * 4, max_size=b * h * w * 3 * 4))).reshape(b, h, w, 3, 4)
    anchors = yolov3_anchors(grid_units=True, dtype=torch.float64)[data.draw(st.integers(0, 2))]
    got = decode_yolo(t64(raw), anchors, stride)
    torch.testing.assert_close(got, t64(O.decode_yolo(raw, anchors.numpy(), stride)), **TOL)
    assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_decode_yolo_half_inputs_do_not_overflow(dtype):
    raw = torch.full((1, 2, 2, 3, 4), 30.0, dtype=dtype)
    out = decode_yolo(raw, yolov3_anchors(grid_units=True)[2], 32)
    assert bool(torch.isfinite(out).all())
    want = O.decode_yolo(raw.double().numpy(), yolov3_anchors(grid_units=True, dtype=torch.float64)[2].numpy(), 32)
    torch.testing.assert_close(out.double(), t64(want), rtol=1e-6, atol=1e-4)


def test_decode_yolo_golden(golden):
    g = golden("tf/yolo_typical_c80.npz")
    anchors = torch.from_numpy(g["cfg_anchors"])
    for i, (scale, stride) in enumerate(zip("sml", g["cfg_strides"])):
        conv = torch.from_numpy(g[f"in_conv_{scale}bbox"])
        b, s = conv.shape[0], conv.shape[1]
        raw = conv.reshape(b, s, s, 3, -1)[..., :4]
        got = decode_yolo(raw, anchors[i], float(stride))
        np.testing.assert_allclose(got.numpy(), g[f"mid_pred_xywhc_{scale}bbox"][..., :4], rtol=1e-5, atol=1e-4)


def test_half_precision_coders_compute_in_float32():
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.1]])
    loc = torch.tensor([[0.5, -0.5, 30.0, -2.0]], dtype=torch.float16)
    out = decode_boxes(loc, priors)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    matched = torch.tensor([[0.4, 0.45, 0.6, 0.55]], dtype=torch.float16)
    enc = encode_boxes(matched, priors.half())
    assert enc.dtype == torch.float32
    want = O.encode_boxes(matched.double().numpy(), priors.half().double().numpy())
    torch.testing.assert_close(enc.double(), t64(want), rtol=1e-5, atol=1e-5)
    ref = torch.tensor([[0.0, 0.0, 100.0, 50.0]], dtype=torch.float16)
    d = encode_deltas(torch.tensor([[10.0, 5.0, 60.0, 45.0]], dtype=torch.float16), ref)
    assert d.dtype == torch.float32
    assert decode_deltas(d.half(), ref).dtype == torch.float32
