"""Rotated box maths (detloss.rotated_boxes) against a float64 NumPy oracle written with 2x2 matrices."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import detloss
from detloss import (
    aligned_probiou,
    corners_to_xywhr,
    probiou,
    rotated_box_covariance,
    rotated_gwd,
    rotated_kld,
    xywhr_to_corners,
)

# ----------------------------------------------------------------------------- oracle (float64, matrices)


def np_cov(box):
    cx, cy, w, h, r = box
    rot = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
    return rot @ np.diag([w * w / 12, h * h / 12]) @ rot.T


def np_probiou(b1, b2):
    s1, s2 = np_cov(b1), np_cov(b2)
    s = (s1 + s2) / 2
    d = np.array(b1[:2]) - np.array(b2[:2])
    bd = d @ np.linalg.inv(s) @ d / 8 + 0.5 * math.log(np.linalg.det(s) / math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    bd = min(max(bd, 0.0), 100.0)
    return 1 - math.sqrt(1 - math.exp(-bd))


def np_kld(b1, b2):
    s1, s2 = np_cov(b1), np_cov(b2)
    inv2 = np.linalg.inv(s2)
    d = np.array(b2[:2]) - np.array(b1[:2])
    return 0.5 * (np.trace(inv2 @ s1) + d @ inv2 @ d - 2 + math.log(np.linalg.det(s2) / np.linalg.det(s1)))


def np_sqrtm(m):
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return vecs @ np.diag(np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def np_gwd(b1, b2):
    s1, s2 = np_cov(b1), np_cov(b2)
    r1 = np_sqrtm(s1)
    d = np.array(b1[:2]) - np.array(b2[:2])
    return d @ d + np.trace(s1 + s2 - 2 * np_sqrtm(r1 @ s2 @ r1))


def np_corners(box):
    cx, cy, w, h, r = box
    local = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])
    rot = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
    return local @ rot.T + np.array([cx, cy])


# ----------------------------------------------------------------------------- strategies

angles = st.one_of(
    st.floats(-4.0, 4.0), st.sampled_from([-math.pi / 2, math.pi / 2, math.pi, -math.pi, 0.0, 3 * math.pi / 2])
)
sizes = st.floats(0.05, 40.0)


@st.composite
def rboxes(draw, square=False, thin=False):
    w = draw(sizes)
    h = w if square else (draw(st.floats(0.05, 0.3)) if thin else draw(sizes))
    return (draw(st.floats(-20, 20)), draw(st.floats(-20, 20)), w, h, draw(angles))


any_box = st.one_of(rboxes(), rboxes(square=True), rboxes(thin=True))


def t64(box):
    return torch.tensor(box, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(any_box, any_box)
def test_probiou_kld_gwd_match_the_oracle(b1, b2):
    pair = probiou(t64(b1)[None], t64(b2)[None], eps=0.0)
    want = np_probiou(b1, b2)
    assert pair.shape == (1, 1)
    np.testing.assert_allclose(pair.item(), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(aligned_probiou(t64(b1), t64(b2), eps=0.0).item(), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rotated_kld(t64(b1), t64(b2), eps=0.0).item(), np_kld(b1, b2), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rotated_gwd(t64(b1), t64(b2)).item(), np_gwd(b1, b2), rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(any_box)
def test_corners_and_covariance(box):
    corners = xywhr_to_corners(t64(box))
    np.testing.assert_allclose(corners.numpy(), np_corners(box), atol=1e-9)
    back = corners_to_xywhr(corners)
    np.testing.assert_allclose(back[:4].numpy(), box[:4], rtol=1e-9, atol=1e-9)
    # same box, angle up to 2 pi
    np.testing.assert_allclose(xywhr_to_corners(back).numpy(), corners.numpy(), atol=1e-9)
    np.testing.assert_allclose(rotated_box_covariance(t64(box)).numpy(), np_cov(box), rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(rboxes(), rboxes(square=True), any_box)
def test_rotation_by_pi_and_square_by_half_pi_are_the_same_box(box, square, other):
    flip = t64(box) + t64((0, 0, 0, 0, math.pi))
    quarter = t64(square) + t64((0, 0, 0, 0, math.pi / 2))
    for same, orig in ((flip, t64(box)), (quarter, t64(square))):
        torch.testing.assert_close(rotated_box_covariance(same), rotated_box_covariance(orig), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(aligned_probiou(same, t64(other)), aligned_probiou(orig, t64(other)),
                                   rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(aligned_probiou(same, orig), aligned_probiou(orig, orig), rtol=1e-7, atol=1e-9)
        assert abs(rotated_kld(same, orig).item()) < 1e-6
        assert abs(rotated_gwd(same, orig).item()) < 1e-6
        # as a polygon, the same corner set
        a = np.sort(xywhr_to_corners(same).numpy().round(6), axis=0)
        b = np.sort(xywhr_to_corners(orig).numpy().round(6), axis=0)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_probiou_is_symmetric_and_bounded():
    g = torch.Generator().manual_seed(0)
    boxes = torch.cat((torch.rand(30, 2, generator=g) * 50, torch.rand(30, 2, generator=g) * 20 + 0.5,
                       torch.rand(30, 1, generator=g) * 8 - 4), -1)
    m = probiou(boxes, boxes)
    assert torch.equal(m, m.T)
    assert bool(((m >= 0) & (m <= 1)).all())
    assert bool((m.diagonal() > 0.999).all())
    assert probiou(boxes[:0], boxes).shape == (0, 30)
    assert probiou(boxes.view(2, 15, 5), boxes.view(2, 15, 5)).shape == (2, 15, 15)


DEGENERATE = [
    (5.0, 5.0, 0.0, 0.0, 0.3),  # a point
    (5.0, 5.0, 4.0, 0.0, 1.0),  # a segment
    (5.0, 5.0, 3.0, 3.0, 0.7),  # a square
    (5.0, 5.0, 3.0, 3.0, math.pi / 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("box", DEGENERATE)
def test_squares_and_zero_sizes_give_finite_values_and_gradients(box, dtype):
    for other in ((5.0, 5.0, 3.0, 2.0, 0.2), box, (6.0, 4.0, 0.0, 0.0, 0.0)):
        a = torch.tensor(box, dtype=dtype, requires_grad=True)
        b = torch.tensor(other, dtype=dtype, requires_grad=True)
        for fn in (aligned_probiou, rotated_kld, rotated_gwd):
            value = fn(a, b)
            ga, gb = torch.autograd.grad(value, (a, b))
            assert torch.isfinite(value), (fn.__name__, box, other)
            assert bool(torch.isfinite(ga).all() & torch.isfinite(gb).all()), (fn.__name__, box, other)


def test_half_inputs_compute_in_float32():
    a = torch.tensor([[10.0, 10.0, 6.0, 3.0, 0.5]], dtype=torch.float16)
    assert aligned_probiou(a, a.float()).dtype == torch.float32
    assert probiou(a.bfloat16(), a.bfloat16()).dtype == torch.float32


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    a = torch.cat((torch.rand(4, 2, generator=g) * 4, torch.rand(4, 2, generator=g) * 3 + 1,
                   torch.rand(4, 1, generator=g) * 6 - 3), -1).double().requires_grad_()
    b = (a.detach() + torch.randn(4, 5, generator=g).double() * 0.5).requires_grad_()
    for fn in (aligned_probiou, rotated_kld, rotated_gwd):
        assert torch.autograd.gradcheck(fn, (a, b))
    assert torch.autograd.gradcheck(lambda x, y: probiou(x, y), (a, b))
    assert torch.autograd.gradcheck(xywhr_to_corners, (a,))


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="boxes1.*5"):
        probiou(torch.zeros(3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="boxes2"):
        aligned_probiou(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="boxes"):
        xywhr_to_corners([1.0, 2.0, 3.0, 4.0, 0.0])
    with pytest.raises(ValueError, match="corners"):
        corners_to_xywhr(torch.zeros(3, 2))


def test_reexported_from_boxes():
    assert detloss.boxes.probiou is probiou and detloss.boxes.xywhr_to_corners is xywhr_to_corners
