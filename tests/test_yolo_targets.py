"""YOLOv3 target builder: golden parity, oracle properties, rules, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import build_yolo_targets
from detloss.matching.yolo import assign_yolo_anchors
from detloss.priors import yolov3_anchors
from oracles import yolov3 as oracle
from conftest import golden_cases


CASES = golden_cases("tf/yolo_*_c*.npz")
STRIDES = (8, 16, 32)
ANCHORS = yolov3_anchors(grid_units=True, dtype=torch.float64)


def golden_batch(d):
    """Padded torch GT from a golden file's ``in_gt_boxes`` / ``in_gt_count``."""
    gt, counts = d["in_gt_boxes"], d["in_gt_count"]
    valid = torch.arange(gt.shape[1])[None] < torch.as_tensor(counts)[:, None]
    boxes = torch.where(valid[..., None], torch.as_tensor(gt[..., :4], dtype=torch.float64), 0.0)
    labels = torch.where(valid, torch.as_tensor(gt[..., 4], dtype=torch.int64), 0)
    return boxes, labels, valid


def golden_config(d):
    return dict(num_classes=int(d["cfg_num_class"]), anchors=torch.as_tensor(d["cfg_anchors"]),
                strides=tuple(int(s) for s in d["cfg_strides"]), image_size=int(d["cfg_input_size"]),
                max_boxes_per_scale=int(d["cfg_max_bbox_per_scale"]))


@pytest.mark.parametrize("case", CASES)
def test_golden_labels_and_true_boxes_exact(golden, case):
    d = golden(f"tf/{case}.npz")
    targets = build_yolo_targets(*golden_batch(d), **golden_config(d), faithful_fallback_clip=True)
    for s, k in enumerate("sml"):
        np.testing.assert_array_equal(targets.labels[s].float().numpy(), d[f"mid_label_{k}bbox"])
        np.testing.assert_array_equal(targets.true_boxes[s].float().numpy(), d[f"mid_true_{k}bbox"])


def test_golden_fallback_clip_is_an_option(golden):
    """The span case has tiny boxes whose fallback cell the original clips with the 13-grid."""
    d = golden("tf/yolo_span_scales_c20.npz")
    boxes, labels, valid = golden_batch(d)
    fixed = build_yolo_targets(boxes, labels, valid, **golden_config(d))
    assert not np.array_equal(fixed.labels[0].float().numpy(), d["mid_label_sbbox"])
    for b in range(boxes.shape[0]):
        n = int(valid[b].sum())
        want, _ = oracle.build_targets(boxes[b, :n].numpy(), labels[b, :n].numpy(), num_classes=20,
                                       anchors=d["cfg_anchors"].astype(np.float64), strides=STRIDES,
                                       image_hw=(416, 416))
        for s in range(3):
            np.testing.assert_allclose(fixed.labels[s][b].numpy(), want[s], rtol=0, atol=1e-12)


@st.composite
def gt_batches(draw, min_boxes=0, max_boxes=6):
    size = draw(st.sampled_from([64, 96]))
    batch = draw(st.integers(1, 2))
    num_classes = draw(st.integers(1, 4))
    boxes, counts = [], []
    m = draw(st.integers(min_boxes, max_boxes))
    for _ in range(batch):
        n = draw(st.integers(min_boxes, m))
        rows = []
        for _ in range(n):
            kind = draw(st.sampled_from(["any", "tiny", "border", "same_cell"]))
            if kind == "same_cell" and rows:  # a second box centred in the cell of the previous one
                x1, y1, x2, y2, _ = rows[-1]
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                w, h = draw(st.integers(2, size)), draw(st.integers(2, size))
                x1, x2 = max(0.0, cx - w / 2), min(float(size), cx + w / 2)
                y1, y2 = max(0.0, cy - h / 2), min(float(size), cy + h / 2)
            elif kind == "tiny":
                x1, y1 = draw(st.integers(0, size - 4)), draw(st.integers(0, size - 4))
                x2, y2 = x1 + draw(st.integers(0, 4)), y1 + draw(st.integers(0, 4))
            elif kind == "border":
                x1 = draw(st.sampled_from([0, size - 8]))
                y1 = draw(st.sampled_from([0, size - 8]))
                x2, y2 = (x1 + 8, y1 + draw(st.sampled_from([0, 8]))) if draw(st.booleans()) else (size, size)
            else:
                x1, x2 = sorted(draw(st.integers(0, size)) for _ in range(2))
                y1, y2 = sorted(draw(st.integers(0, size)) for _ in range(2))
            rows.append((float(x1), float(y1), float(x2), float(y2), draw(st.integers(0, num_classes - 1))))
        boxes.append(rows)
        counts.append(n)
    m = max(counts + [0])
    arr = np.zeros((batch, m, 5))
    for b, rows in enumerate(boxes):
        if rows:
            arr[b, : len(rows)] = rows
    return size, num_classes, arr, np.array(counts)


def run_both(size, num_classes, arr, counts, **kw):
    valid = torch.arange(arr.shape[1])[None] < torch.as_tensor(counts)[:, None]
    got = build_yolo_targets(torch.as_tensor(arr[..., :4]), torch.as_tensor(arr[..., 4]).long(), valid,
                             num_classes=num_classes, image_size=size, anchors=ANCHORS, **kw)
    oracle_kw = {k: v for k, v in kw.items() if k != "max_boxes_per_scale"}
    for b in range(arr.shape[0]):
        n = counts[b]
        want, lists = oracle.build_targets(arr[b, :n, :4], arr[b, :n, 4].astype(int), num_classes=num_classes,
                                           anchors=ANCHORS.numpy(), strides=STRIDES, image_hw=(size, size),
                                           max_boxes=kw.get("max_boxes_per_scale", 150), **oracle_kw)
        for s in range(3):
            np.testing.assert_allclose(got.labels[s][b].numpy(), want[s], rtol=0, atol=1e-12)
            np.testing.assert_array_equal(got.true_boxes[s][b].numpy(), lists[s])
    return got


@settings(max_examples=200, deadline=None)
@given(gt_batches(), st.sampled_from([0.0, 0.01, 0.1]), st.booleans())
def test_matches_oracle(data, smoothing, faithful):
    size, num_classes, arr, counts = data
    run_both(size, num_classes, arr, counts, label_smoothing=smoothing, faithful_fallback_clip=faithful)


@settings(max_examples=200, deadline=None)
@given(gt_batches(min_boxes=40, max_boxes=48), st.sampled_from([150, 7]))
def test_matches_oracle_crowded_and_list_wrap(data, max_boxes):
    size, num_classes, arr, counts = data
    run_both(size, num_classes, arr, counts, max_boxes_per_scale=max_boxes)


def one_image(rows, size=96, num_classes=3, **kw):
    arr = torch.tensor([rows], dtype=torch.float64).reshape(1, -1, 5)
    valid = torch.ones(arr.shape[:2], dtype=torch.bool)
    return build_yolo_targets(arr[..., :4], arr[..., 4].long(), valid, num_classes=num_classes,
                              image_size=size, anchors=ANCHORS, **kw)


def test_later_box_overwrites_earlier_in_same_slot():
    # Two near-equal boxes centred in the same 8-px cell take the same anchor: the second wins.
    t = one_image([[20, 20, 44, 44, 0], [21, 21, 43, 43, 2]])
    resp = t.labels[0][0, ..., 4] > 0
    assert int(resp.sum()) >= 1
    assert (t.labels[0][0][resp][:, 5:].argmax(-1) == 2).all()
    assert (t.labels[0][0][resp][:, 2] == 22).all()
    # Both are in the true-box list, in order.
    np.testing.assert_array_equal(t.true_boxes[0][0, :2, 2].numpy(), [24, 22])


def test_box_positive_on_two_scales_and_tiny_box_fallback():
    # 85x72 box: anchors (59,119)/16 at scale m and (116,90)/32 at scale l both pass 0.3.
    t = one_image([[100, 100, 185, 172, 1]], size=416)
    assert all(int(t.labels[s][..., 4].sum()) >= 1 for s in (1, 2))
    # A 2x2 box passes no anchor: exactly one slot over all scales.
    t = one_image([[300, 300, 302, 302, 1]], size=416)
    assert sum(int(lab[..., 4].sum()) for lab in t.labels) == 1


def test_zero_boxes_and_invalid_rows():
    boxes = torch.tensor([[[10.0, 10, 50, 50], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
    labels = torch.tensor([[1, 99], [99, 99]])  # padding rows may hold anything
    valid = torch.tensor([[True, False], [False, False]])
    t = build_yolo_targets(boxes, labels, valid, num_classes=2, image_size=64)
    assert sum(int(lab[1].abs().sum()) for lab in t.labels) == 0
    assert sum(int(lab[0, ..., 4].sum()) for lab in t.labels) >= 1
    empty = build_yolo_targets(torch.zeros(3, 0, 4), torch.zeros(3, 0, dtype=torch.long),
                               torch.zeros(3, 0, dtype=torch.bool), num_classes=2, image_size=64)
    assert all(lab.abs().sum() == 0 for lab in empty.labels)
    assert [tuple(lab.shape) for lab in empty.labels] == [(3, 8, 8, 3, 7), (3, 4, 4, 3, 7), (3, 2, 2, 3, 7)]


def test_non_square_input_and_float32_output():
    boxes = torch.tensor([[[10.0, 5, 120, 60]]])
    t = build_yolo_targets(boxes, torch.tensor([[0]]), torch.tensor([[True]]), num_classes=1, image_size=(64, 128))
    assert t.labels[0].shape == (1, 8, 16, 3, 6) and t.labels[0].dtype == torch.float32
    assert t.true_boxes[2].dtype == torch.float32


def test_assignment_is_deterministic_and_exposes_winner():
    t1 = assign_yolo_anchors(torch.tensor([[[20.0, 20, 44, 44], [21, 21, 43, 43]]]), torch.tensor([[0, 1]]),
                             torch.tensor([[True, True]]), num_classes=2, image_size=64)
    assert int(t1.winner[0].max()) == 1
    assert bool(t1.positive[0][0, 1].any()) and not bool(t1.positive[0][0, 0].any())
    assert bool(t1.in_list[0].all())


@pytest.mark.parametrize(
    "boxes, labels, valid, kw, match",
    [
        ([[[0.0, 0, 10, 10]]], [[5]], [[True]], {}, "gt_labels"),
        ([[[60.0, 0, 70, 10]]], [[0]], [[True]], {}, "gt_boxes centre x"),
        ([[[0.0, -12, 10, -1]]], [[0]], [[True]], {}, "gt_boxes centre y"),
        ([[[10.0, 0, 5, 10]]], [[0]], [[True]], {}, "width/height"),
        ([[[0.0, 0, 10, 10]]], [[0]], [[True]], {"image_size": 72}, "divisible"),
        ([[[0.0, 0, 10, 10]]], [[0], [0]], [[True], [True]], {}, "gt_labels: expected shape"),
        ([[[0.0, 0, 10, 10]]], [[0]], [[True, True]], {}, "gt_valid: expected shape"),
    ],
)
def test_bad_input_errors(boxes, labels, valid, kw, match):
    kw = {"image_size": 64, **kw}
    with pytest.raises(ValueError, match=match):
        build_yolo_targets(torch.tensor(boxes), torch.tensor(labels), torch.tensor(valid), num_classes=5 if
                           match != "gt_labels" else 3, **kw)


def test_invalid_rows_are_not_checked():
    # A padding row outside the image with an out-of-range label is fine.
    t = build_yolo_targets(torch.tensor([[[0.0, 0, 10, 10], [-50, -50, 900, 900]]]), torch.tensor([[0, 77]]),
                           torch.tensor([[True, False]]), num_classes=1, image_size=64)
    assert sum(int(lab[..., 4].sum()) for lab in t.labels) >= 1


_EDGE_VALUES = st.sampled_from([-1.0, 0.0, 31.5, 64.0, 64.5, float("nan"), float("inf")])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.lists(st.one_of(st.floats(-2, 66), _EDGE_VALUES), min_size=4, max_size=4),
                       st.integers(-1, 3), st.booleans()), min_size=1, max_size=4)
)
def test_ground_truth_check_accepts_exactly_the_usable_rows(rows):
    # the fused value check (one host read) raises exactly when a row breaks a stated condition,
    # padding rows included: every box finite; valid rows with a class in [0, 3), the centre
    # inside the 64 x 64 input and x1 <= x2, y1 <= y2
    import math

    boxes = torch.tensor([[r[0] for r in rows]], dtype=torch.float64)
    labels = torch.tensor([[r[1] for r in rows]])
    valid = torch.tensor([[r[2] for r in rows]])

    def usable(box, label, is_valid):
        if not all(math.isfinite(v) for v in box):
            return False
        x1, y1, x2, y2 = box
        inside = 0 <= (x1 + x2) / 2 <= 64 and 0 <= (y1 + y2) / 2 <= 64
        return not is_valid or (0 <= label < 3 and inside and x1 <= x2 and y1 <= y2)

    expected = all(usable(*r) for r in rows)
    try:
        build_yolo_targets(boxes, labels, valid, num_classes=3, image_size=64)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == expected
