"""Box maths: formats, area, pairwise and aligned IoU / GIoU / DIoU / CIoU.

Property tests compare float64 torch against the loop oracle (``tests/oracles/foundation.py``)
on random boxes that include tiny, zero-width/height, inverted, identical, nested, touching
and disjoint pairs; golden tests compare against ssd.pytorch's box utilities and
tensorflow-yolov3's ``bbox_iou``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import (
    aligned_box_iou,
    box_area,
    box_convert,
    box_iou,
    cxcywh_to_xyxy,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)
from detloss.boxes import IOU_KINDS
from oracles import foundation as O


TOL = dict(rtol=1e-9, atol=1e-9)
KINDS = st.sampled_from(IOU_KINDS)

# ----------------------------------------------------------------------------- strategies

coord = st.floats(-50, 50, allow_nan=False, allow_infinity=False)
size = st.one_of(
    st.just(0.0),  # degenerate side
    st.floats(1e-7, 1e-3),  # tiny
    st.floats(0.0, 60.0),
)


@st.composite
def box(draw):
    """One xyxy box as a list; sometimes inverted (x2 < x1 and/or y2 < y1)."""
    x, y, w, h = draw(coord), draw(coord), draw(size), draw(size)
    b = [x, y, x + w, y + h]
    if draw(st.integers(0, 9)) == 0:
        b = [b[2], b[1], b[0], b[3]]
    if draw(st.integers(0, 9)) == 0:
        b = [b[0], b[3], b[2], b[1]]
    return b


@st.composite
def related(draw, a):
    """A box in a chosen relation to ``a``: identical, nested, touching, disjoint, random."""
    relation = draw(st.sampled_from(["identical", "nested", "touching", "disjoint", "random", "random"]))
    x1, y1, x2, y2 = a
    w, h = x2 - x1, y2 - y1
    if relation == "identical":
        return list(a)
    if relation == "nested":
        f = [draw(st.floats(0, 1)) for _ in range(4)]
        lo_x, lo_y = x1 + f[0] * w / 2, y1 + f[1] * h / 2
        return [lo_x, lo_y, x2 - f[2] * (x2 - lo_x), y2 - f[3] * (y2 - lo_y)]
    if relation == "touching":
        return [x2, y1, x2 + draw(size), y2]
    if relation == "disjoint":
        gap = draw(st.floats(1e-3, 20))
        return [x2 + gap, y2 + gap, x2 + gap + draw(size), y2 + gap + draw(size)]
    return draw(box())


@st.composite
def box_pairs(draw, max_n=6):
    """Aligned ``(n, 4), (n, 4)`` float64 boxes, every pair in some relation."""
    n = draw(st.integers(1, max_n))
    a = [draw(box()) for _ in range(n)]
    b = [draw(related(ai)) for ai in a]
    return np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)


@st.composite
def box_sets(draw, batch=None):
    """Pairwise inputs ``(B?, N, 4), (B?, M, 4)``; N and M independent, so often N != M.

    ``boxes2`` reuses rows of ``boxes1`` (identical) and rows related to them (nested, touching...).
    """
    b = batch if batch is not None else 1
    n = draw(st.integers(0, 5))
    m = draw(st.integers(0, 5))
    out1, out2 = [], []
    for _ in range(b):
        a = [draw(box()) for _ in range(n)]
        c = [draw(related(a[draw(st.integers(0, n - 1))])) if n and draw(st.booleans()) else draw(box()) for _ in range(m)]
        out1.append(np.array(a, dtype=np.float64).reshape(n, 4))
        out2.append(np.array(c, dtype=np.float64).reshape(m, 4))
    if batch is None:
        return out1[0], out2[0]
    return np.stack(out1), np.stack(out2)


def t64(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64)


# ----------------------------------------------------------------------------- formats and area


@settings(max_examples=200, deadline=None)
@given(st.lists(box(), min_size=0, max_size=8))
def test_conversions_equal_oracle_and_round_trip(rows):
    x = np.array(rows, dtype=np.float64).reshape(-1, 4)
    t = t64(x)
    torch.testing.assert_close(xyxy_to_cxcywh(t), t64(O.xyxy_to_cxcywh(x)), **TOL)
    torch.testing.assert_close(xyxy_to_xywh(t), t64(O.xyxy_to_xywh(x)), **TOL)
    torch.testing.assert_close(cxcywh_to_xyxy(t), t64(O.cxcywh_to_xyxy(x)), **TOL)
    torch.testing.assert_close(xywh_to_xyxy(t), t64(O.xywh_to_xyxy(x)), **TOL)
    for fmt in ("xyxy", "cxcywh", "xywh"):
        there = box_convert(t, "xyxy", fmt)
        torch.testing.assert_close(box_convert(there, fmt, "xyxy"), t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(box_convert(t, "cxcywh", "xywh"), xyxy_to_xywh(cxcywh_to_xyxy(t)), **TOL)


@settings(max_examples=200, deadline=None)
@given(st.lists(box(), min_size=0, max_size=8), st.integers(1, 3))
def test_box_area_equals_oracle(rows, lead):
    x = np.array(rows, dtype=np.float64).reshape(-1, 4)
    x = np.broadcast_to(x, (lead,) + x.shape)
    got = box_area(t64(x))
    assert got.shape == x.shape[:-1]
    torch.testing.assert_close(got, t64(O.area(x)), **TOL)
    assert bool((got >= 0).all())


# ----------------------------------------------------------------------------- pairwise / aligned vs oracle


@settings(max_examples=200, deadline=None)
@given(box_sets(), KINDS)
def test_pairwise_unbatched_equals_oracle(sets, kind):
    a, b = sets
    got = box_iou(t64(a), t64(b), kind)
    assert got.shape == (a.shape[0], b.shape[0])  # N != M: torchvision bug #6317
    torch.testing.assert_close(got, t64(O.pairwise_iou(a, b, kind)), **TOL)
    assert bool(torch.isfinite(got).all())


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3).flatmap(lambda bsz: box_sets(batch=bsz)), KINDS)
def test_pairwise_batched_equals_oracle_and_per_image(sets, kind):
    a, b = sets
    got = box_iou(t64(a), t64(b), kind)
    assert got.shape == (a.shape[0], a.shape[1], b.shape[1])
    torch.testing.assert_close(got, t64(O.pairwise_iou(a, b, kind)), **TOL)
    for i in range(a.shape[0]):
        torch.testing.assert_close(got[i], box_iou(t64(a[i]), t64(b[i]), kind), rtol=0, atol=0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2).flatmap(lambda bsz: box_sets(batch=bsz)), KINDS, st.integers(1, 6))
def test_chunked_pairwise_equals_unchunked(sets, kind, chunk):
    a, b = t64(sets[0]), t64(sets[1])
    full = box_iou(a, b, kind)
    torch.testing.assert_close(box_iou(a, b, kind, chunk_size=chunk), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(box_iou(a[0], b[0], kind, chunk_size=chunk), full[0], rtol=0, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(box_pairs(), KINDS)
def test_aligned_equals_oracle_and_pairwise_diagonal(pairs, kind):
    a, b = pairs
    got = aligned_box_iou(t64(a), t64(b), kind)
    want = O.aligned_iou(a, b, kind)
    torch.testing.assert_close(got, t64(want), **TOL)
    diag = torch.diagonal(box_iou(t64(a), t64(b), kind))
    torch.testing.assert_close(got, diag, rtol=0, atol=1e-12)
    # symmetric in its arguments (every kind, CIoU included)
    torch.testing.assert_close(aligned_box_iou(t64(b), t64(a), kind), got, **TOL)
    low = {"iou": 0.0, "giou": -1.0, "diou": -1.0, "ciou": -1.5}[kind]
    assert bool((got >= low - 1e-12).all()) and bool((got <= 1 + 1e-12).all())


@settings(max_examples=200, deadline=None)
@given(box_pairs(max_n=4), KINDS)
def test_aligned_broadcasts_leading_dims(pairs, kind):
    a, b = t64(pairs[0]), t64(pairs[1])
    got = aligned_box_iou(a[:, None, :], b[None, :, :], kind)
    torch.testing.assert_close(got, box_iou(a, b, kind), rtol=0, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(box_pairs(), KINDS, st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_low_precision_inputs_compute_in_float32_and_stay_finite(pairs, kind, dtype):
    a, b = (torch.from_numpy(x).to(dtype) for x in pairs)
    got = aligned_box_iou(a, b, kind)
    assert got.dtype == torch.float32
    assert bool(torch.isfinite(got).all())
    low = {"iou": 0.0, "giou": -1.0, "diou": -1.0, "ciou": -1.5}[kind]
    assert bool((got >= low - 1e-6).all()) and bool((got <= 1 + 1e-6).all())
    # same numbers as float64 maths on the (rounded) inputs, up to float32 rounding, where
    # the problem is well conditioned (sides not tiny next to the coordinates)
    want = aligned_box_iou(a.double(), b.double(), kind)
    sides = torch.cat([(a[:, 2:] - a[:, :2]).abs(), (b[:, 2:] - b[:, :2]).abs()], -1).double()
    ok = sides.min(-1).values > 0.5
    torch.testing.assert_close(got.double()[ok], want[ok], rtol=1e-3, atol=1e-3)
    assert box_iou(a, b, kind).dtype == torch.float32


def test_known_values():
    # hand-checkable: [0,0,2,2] vs [1,1,3,3]: inter 1, union 7, enclosing 3x3=9
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7]], dtype=torch.float64))
    torch.testing.assert_close(box_iou(a, b, "giou"), torch.tensor([[1 / 7 - 2 / 9]], dtype=torch.float64))
    # centres 2**0.5 apart, diagonal of the enclosing box 18**0.5: 1/7 - 2/18
    torch.testing.assert_close(box_iou(a, b, "diou"), torch.tensor([[1 / 7 - 2 / 18]], dtype=torch.float64))
    # same aspect ratio: v = 0, CIoU = DIoU
    torch.testing.assert_close(box_iou(a, b, "ciou"), box_iou(a, b, "diou"))


def test_empty_inputs():
    for kind in IOU_KINDS:
        assert box_iou(torch.zeros(0, 4), torch.zeros(3, 4), kind).shape == (0, 3)
        assert box_iou(torch.zeros(2, 0, 4), torch.zeros(2, 3, 4), kind, chunk_size=1).shape == (2, 0, 3)
        assert box_iou(torch.zeros(2, 4), torch.zeros(0, 4), kind, chunk_size=1).shape == (2, 0)
        assert aligned_box_iou(torch.zeros(0, 4), torch.zeros(0, 4), kind).shape == (0,)


def test_chunked_backward_matches_unchunked():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(7, 4, generator=g, dtype=torch.float64)
    a = torch.cat([a[:, :2], a[:, :2] + a[:, 2:]], -1).requires_grad_()
    b = torch.rand(5, 4, generator=g, dtype=torch.float64)
    b = torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], -1).requires_grad_()
    for kind in IOU_KINDS:
        ga = torch.autograd.grad(box_iou(a, b, kind).sum(), (a, b))
        gc = torch.autograd.grad(box_iou(a, b, kind, chunk_size=3).sum(), (a, b))
        for x, y in zip(ga, gc):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- finite gradients on degenerate boxes

DEGENERATE = {
    # name: (boxes1, boxes2) xyxy
    "zero_area_both": ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]),
    "zero_width": ([1.0, 1.0, 1.0, 3.0], [0.0, 0.0, 2.0, 2.0]),
    "zero_height_vs_point": ([0.0, 2.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]),
    "identical": ([0.5, 0.5, 2.0, 3.0], [0.5, 0.5, 2.0, 3.0]),
    "inverted": ([2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]),
    "both_inverted": ([2.0, 2.0, 0.0, 0.0], [3.0, 1.0, 1.0, 0.0]),
    "touching": ([0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0]),
    "tiny": ([0.0, 0.0, 1e-6, 1e-6], [0.0, 0.0, 1e-6, 2e-6]),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("kind", IOU_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_degenerate_boxes_give_finite_values_and_gradients(case, kind, dtype):
    a = torch.tensor([DEGENERATE[case][0]], dtype=dtype, requires_grad=True)
    b = torch.tensor([DEGENERATE[case][1]], dtype=dtype, requires_grad=True)
    value = aligned_box_iou(a, b, kind)
    assert value.dtype == torch.float32
    ga, gb = torch.autograd.grad(value.sum(), (a, b))
    assert bool(torch.isfinite(value).all()), value
    assert bool(torch.isfinite(ga).all()) and bool(torch.isfinite(gb).all()), (ga, gb)
    # pairwise path too
    ga, gb = torch.autograd.grad(box_iou(a, b, kind).sum(), (a, b))
    assert bool(torch.isfinite(ga).all()) and bool(torch.isfinite(gb).all())


# ----------------------------------------------------------------------------- golden: ssd.pytorch box_utils


def test_ssd_point_form_and_center_size_golden(golden):
    g = golden("torch/ssd_box_utils.npz")
    got = cxcywh_to_xyxy(torch.from_numpy(g["in_point_form_boxes"])).numpy()
    np.testing.assert_allclose(got, g["out_point_form"], rtol=1e-5, atol=1e-6)
    assert np.abs(got - g["out_point_form"]).max() == 0.0  # same float32 operations
    got = xyxy_to_cxcywh(torch.from_numpy(g["in_center_size_boxes"])).numpy()
    np.testing.assert_allclose(got, g["out_center_size"], rtol=1e-5, atol=1e-6)
    assert np.abs(got - g["out_center_size"]).max() == 0.0


def test_ssd_jaccard_and_intersect_golden(golden):
    g = golden("torch/ssd_box_utils.npz")
    a, b = g["in_jaccard_a"], g["in_jaccard_b"]
    got = box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    # bit-identical: same float32 operation order as jaccard()
    np.testing.assert_array_equal(got, g["out_jaccard"])
    np.testing.assert_array_equal(box_iou(torch.from_numpy(a), torch.from_numpy(b), chunk_size=5).numpy(), g["out_jaccard"])
    # the intersection: through the float64 oracle
    np.testing.assert_allclose(O.pairwise_intersection(a, b), g["out_intersect"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(O.pairwise_iou(a, b), g["out_jaccard"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- golden: tensorflow-yolov3 bbox_iou

YOLO_DEGENERATE_KINDS = (4,)  # touching edges: the original bbox_iou has no epsilon (observed error is 0 anyway)


def test_yolo_bbox_iou_golden(golden):
    g = golden("tf/yolo_box_utils.npz")
    a = cxcywh_to_xyxy(torch.from_numpy(g["in_boxes1_xywh"]))
    b = cxcywh_to_xyxy(torch.from_numpy(g["in_boxes2_xywh"]))
    got = aligned_box_iou(a, b).numpy()
    keep = ~np.isin(g["in_pair_kind"], YOLO_DEGENERATE_KINDS)
    np.testing.assert_allclose(got[keep], g["out_iou"][keep], rtol=1e-5, atol=1e-6)
    # outer product as broadcast in loss_layer
    oa = cxcywh_to_xyxy(torch.from_numpy(g["in_outer_a_xywh"]))
    ob = cxcywh_to_xyxy(torch.from_numpy(g["in_outer_b_xywh"]))
    np.testing.assert_allclose(box_iou(oa, ob).numpy(), g["out_iou_outer"], rtol=1e-5, atol=1e-6)


def test_yolo_bbox_iou_golden_all_pairs_within_tolerance(golden):
    # documents the difference on all kinds, touching edges included: bbox_iou has no epsilon,
    # but with positive areas its union never gets near eps, so the values still agree.
    g = golden("tf/yolo_box_utils.npz")
    a = cxcywh_to_xyxy(torch.from_numpy(g["in_boxes1_xywh"]))
    b = cxcywh_to_xyxy(torch.from_numpy(g["in_boxes2_xywh"]))
    got = aligned_box_iou(a, b).numpy()
    np.testing.assert_allclose(got, g["out_iou"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@settings(max_examples=10_000, deadline=None)
@given(st.integers(1, 3).flatmap(lambda bsz: box_sets(batch=bsz)), KINDS, st.integers(1, 6))
def test_pairwise_fuzz_10k(sets, kind, chunk):
    """The long fuzz run (``-m slow``): batched, chunked pairwise vs the oracle."""
    a, b = sets
    got = box_iou(t64(a), t64(b), kind, chunk_size=chunk)
    torch.testing.assert_close(got, t64(O.pairwise_iou(a, b, kind)), **TOL)
    assert bool(torch.isfinite(got).all())
