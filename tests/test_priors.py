"""Priors and anchors: golden parity (exact) and equality with the loop oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import (
    SSD_PRESETS,
    SSDPriorConfig,
    rcnn_anchors,
    rcnn_base_anchors,
    retinaface_priors,
    retinanet_anchors,
    ssd_priors,
    yolo_grid,
    yolov3_anchors,
)
from oracles import foundation as O


def _oracle_ssd(cfg: SSDPriorConfig) -> np.ndarray:
    return O.ssd_priors(
        cfg.feature_maps, cfg.image_size, cfg.steps, cfg.min_sizes, cfg.max_sizes, cfg.aspect_ratios, cfg.clip
    )


# ----------------------------------------------------------------------------- golden


def test_ssd_voc300_priors_equal_golden(golden):
    g = golden("torch/ssd300_voc_a_typical.npz")["in_priors"]
    got = ssd_priors("voc300").numpy()
    assert got.dtype == np.float32 and got.shape == g.shape == (8732, 4)
    np.testing.assert_array_equal(got, g)


def test_retinaface_640_priors_equal_golden(golden):
    data = golden("torch/retina_mnet_a_typical.npz")
    g = data["in_priors"]
    assert tuple(data["cfg_image_size"]) == (640, 640)
    got = retinaface_priors(640).numpy()
    assert got.shape == g.shape == (16800, 4)
    np.testing.assert_array_equal(got, g)
    np.testing.assert_array_equal(retinaface_priors((640, 640)).numpy(), g)


def test_rcnn_anchors_equal_golden(golden):
    data = golden("tf/frcnn_typical.npz")
    g = data["in_anchors"]
    h, w = (int(v) for v in data["cfg_feat_hw"])
    stride = int(data["cfg_feat_stride"])
    got = rcnn_anchors(h, w, stride).numpy()
    assert got.shape == g.shape == (h * w * 9, 4)
    np.testing.assert_array_equal(got, g)
    # position (0, 0) has no shift: its 9 anchors are the base anchors
    np.testing.assert_array_equal(rcnn_base_anchors().numpy().astype(np.float32), g[:9])


def test_yolov3_grid_anchors_equal_golden(golden):
    g = golden("tf/yolo_typical_c80.npz")["cfg_anchors"]
    np.testing.assert_array_equal(yolov3_anchors(grid_units=True).numpy(), g)
    strides = golden("tf/yolo_typical_c80.npz")["cfg_strides"]
    px = yolov3_anchors().numpy()
    np.testing.assert_array_equal(px, g * strides[:, None, None].astype(np.float32))


# ----------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("name", sorted(SSD_PRESETS))
def test_ssd_presets_equal_oracle(name):
    cfg = SSD_PRESETS[name]
    got = ssd_priors(name)
    assert got.shape == (cfg.num_priors, 4)
    np.testing.assert_array_equal(got.numpy(), _oracle_ssd(cfg).astype(np.float32))


def test_ssd_preset_sizes():
    assert ssd_priors("voc300").shape[0] == 8732
    assert ssd_priors("coco300").shape[0] == 8732
    assert ssd_priors("voc512").shape[0] == 24564


@st.composite
def ssd_configs(draw):
    n = draw(st.integers(1, 3))
    image_size = draw(st.integers(32, 600))
    maps = tuple(draw(st.integers(1, 6)) for _ in range(n))
    steps = tuple(draw(st.integers(1, image_size)) for _ in range(n))
    mins = tuple(draw(st.floats(1.0, 300.0)) for _ in range(n))
    maxs = tuple(m + draw(st.floats(0.0, 200.0)) for m in mins)
    ars = tuple(tuple(draw(st.lists(st.integers(2, 4), max_size=2))) for _ in range(n))
    clip = draw(st.booleans())
    return SSDPriorConfig(maps, image_size, steps, mins, maxs, ars, clip)


@settings(max_examples=200, deadline=None)
@given(ssd_configs())
def test_ssd_priors_random_config_equal_oracle(cfg):
    got = ssd_priors(cfg)
    assert got.shape == (cfg.num_priors, 4)
    np.testing.assert_array_equal(got.numpy(), _oracle_ssd(cfg).astype(np.float32))
    got64 = ssd_priors(cfg, dtype=torch.float64)
    assert got64.dtype == torch.float64


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 200),
    st.integers(1, 200),
    st.lists(st.integers(1, 64), min_size=1, max_size=3),
    st.booleans(),
)
def test_retinaface_priors_random_size_equal_oracle(height, width, steps, clip):
    min_sizes = tuple((4 * s, 8 * s) for s in steps)
    got = retinaface_priors((height, width), min_sizes=min_sizes, steps=steps, clip=clip).numpy()
    want = O.retinaface_priors((height, width), min_sizes, steps, clip)
    np.testing.assert_array_equal(got, want.astype(np.float32))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.sampled_from([4, 8, 16, 32]),
    st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=1, max_size=3, unique=True),
    st.lists(st.sampled_from([2.0, 4.0, 8.0, 16.0]), min_size=1, max_size=3, unique=True),
)
def test_rcnn_anchors_equal_oracle(h, w, stride, ratios, scales):
    np.testing.assert_array_equal(
        rcnn_base_anchors(16, ratios, scales).numpy(), O.rcnn_base_anchors(16, ratios, scales)
    )
    got = rcnn_anchors(h, w, stride, ratios=ratios, scales=scales).numpy()
    np.testing.assert_array_equal(got, O.rcnn_anchors(h, w, stride, ratios, scales).astype(np.float32))


def test_rcnn_base_anchor_values_from_oracle():
    # the well-known first rows of generate_anchors() (derived by the oracle, checked by golden above)
    want = O.rcnn_base_anchors()
    np.testing.assert_array_equal(rcnn_base_anchors().numpy(), want)
    assert rcnn_base_anchors().dtype == torch.float64


def test_retinanet_anchors_800_equal_oracle():
    got = retinanet_anchors(800).numpy()
    assert got.shape == (120087, 4)
    np.testing.assert_array_equal(got, O.retinanet_anchors((800, 800)).astype(np.float32))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from([0.0, 0.5]))
def test_retinanet_anchors_random_size_equal_oracle(h, w, offset):
    strides, sizes = (16, 32), (32, 64)
    got = retinanet_anchors((h, w), strides=strides, sizes=sizes, offset=offset).numpy()
    want = O.retinanet_anchors((h, w), strides, sizes, offset=offset)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_yolo_grid_layout():
    g = yolo_grid(3, 5)
    assert g.shape == (3, 5, 2)
    for y in range(3):
        for x in range(5):
            assert g[y, x, 0] == x and g[y, x, 1] == y


def test_priors_dtype_and_device_arguments():
    assert ssd_priors("voc300", dtype=torch.float64).dtype == torch.float64
    assert retinaface_priors(64, dtype=torch.float64).dtype == torch.float64
    assert rcnn_anchors(2, 2, dtype=torch.float64).dtype == torch.float64
    assert yolov3_anchors(dtype=torch.float64).dtype == torch.float64



@pytest.mark.parametrize(
    "make",
    [lambda: ssd_priors("voc300"), lambda: retinaface_priors(64), lambda: rcnn_base_anchors(), lambda: rcnn_anchors(2, 3)],
)
def test_cached_priors_are_not_shared_mutable_state(make):
    # the functions are cached; an in-place edit by one caller must not reach the next one
    before = make().clone()
    make().zero_()
    torch.testing.assert_close(make(), before, rtol=0, atol=0)
