"""Task-aligned assignment: ultralytics golden numbers, the float64 oracle, chunk independence, input checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import detloss
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import TaskAlignedAssignment, match_task_aligned
from detloss.compat.ultralytics import TaskAlignedAssigner
from detloss.priors import anchor_points
from oracles import task_aligned as O
from conftest import golden_cases

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

TAL_CASES = golden_cases("ultralytics/tal_*.npz")
IMAGE = 64
STRIDES = (8, 16, 32)


def tal_inputs(g):
    t = {k: torch.from_numpy(v) for k, v in g.items() if k.startswith("in_")}
    return t["in_pd_scores"], t["in_pd_bboxes"], t["in_anc_points"], t["in_gt_labels"], t["in_gt_bboxes"], t["in_mask_gt"]


@pytest.mark.parametrize("case", TAL_CASES)
def test_golden_dropin_assigner(golden, case):
    g = golden(f"ultralytics/{case}.npz")
    assigner = TaskAlignedAssigner(
        topk=int(g["cfg_topk"]), num_classes=int(g["cfg_nc"]), alpha=float(g["cfg_alpha"]), beta=float(g["cfg_beta"]),
        stride=g["cfg_strides"].tolist(), eps=float(g["cfg_eps"]), topk2=int(g["cfg_topk2"]) or None,
    )
    labels, boxes, scores, fg, gt_idx = assigner(*tal_inputs(g))
    scored = g["out_target_scores"].sum(-1) > 0
    assert scored.any()
    np.testing.assert_allclose(scores.numpy(), g["out_target_scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fg.numpy()[scored], g["out_fg_mask"][scored])
    np.testing.assert_array_equal(gt_idx.numpy()[scored], g["out_target_gt_idx"][scored])
    np.testing.assert_array_equal(labels.numpy()[scored], g["out_target_labels"][scored])
    np.testing.assert_allclose(boxes.numpy()[scored], g["out_target_bboxes"][scored], atol=1e-4, rtol=0)
    # every anchor the original marks foreground without a score is the tie filler of surprise 5
    assert not (fg.numpy() & ~g["out_fg_mask"]).any()
    # the background rows hold slot 0's class and box, as the original's
    np.testing.assert_array_equal(labels.numpy(), g["out_target_labels"])
    np.testing.assert_array_equal(boxes.numpy()[~g["out_fg_mask"]], g["out_target_bboxes"][~g["out_fg_mask"]])


@pytest.mark.parametrize("case", TAL_CASES)
def test_golden_native_chunked(golden, case):
    g = golden(f"ultralytics/{case}.npz")
    scores, boxes, points, labels, gt, mask = tal_inputs(g)
    kw = dict(topk=int(g["cfg_topk"]), alpha=float(g["cfg_alpha"]), beta=float(g["cfg_beta"]),
              topk2=int(g["cfg_topk2"]) or None, min_box_side=float(g["cfg_strides"][1]))
    outs = [match_task_aligned(scores, boxes, points, gt, labels[..., 0].long(), mask[..., 0] > 0, chunk_size=c, **kw)
            for c in (1, 7, None)]
    for other in outs[1:]:
        for name in TaskAlignedAssignment.__dataclass_fields__:
            assert torch.equal(getattr(outs[0], name), getattr(other, name)), name
    a = outs[0]
    np.testing.assert_allclose(a.scores.numpy(), g["out_target_scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.foreground.numpy(), g["out_target_scores"].sum(-1) > 0)
    assert (a.labels.numpy()[~a.foreground.numpy()] == -1).all()
    assert (a.boxes.numpy()[~a.foreground.numpy()] == 0).all()


# ----------------------------------------------------------------------------- oracle properties


@st.composite
def problems(draw, crowded=False):
    """A small random problem (float64): 84 anchors of a 64 px image, 0 / 1 / few GTs per image
    (``crowded``: 320)."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    b = draw(st.integers(1, 2))
    m = 320 if crowded else draw(st.sampled_from([0, 1, 2, 5, 9]))
    tiny = draw(st.booleans())
    duplicate = draw(st.booleans())
    num_classes = draw(st.sampled_from([1, 3]))
    points, strides = anchor_points([(IMAGE // s, IMAGE // s) for s in STRIDES], STRIDES, dtype=torch.float64)
    a = points.shape[0]
    centre = torch.rand(b, m, 2, generator=gen, dtype=torch.float64) * IMAGE
    size = torch.rand(b, m, 2, generator=gen, dtype=torch.float64) * (6 if tiny else 40) + 0.5
    gt = torch.cat((centre - size / 2, centre + size / 2), -1).clamp(0, IMAGE)
    if duplicate and m > 1:
        gt[:, 1] = gt[:, 0]
    counts = torch.randint(0, m + 1, (b,), generator=gen)
    if draw(st.booleans()):
        counts[0] = 0  # an all-padding image
    valid = torch.arange(m)[None] < counts[:, None]
    labels = torch.randint(0, num_classes, (b, m), generator=gen)
    dist = torch.rand(b, a, 4, generator=gen, dtype=torch.float64) * 3 * strides[:, None]
    pred = torch.cat((points - dist[..., :2], points + dist[..., 2:]), -1)
    scores = torch.rand(b, a, num_classes, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        scores = scores.round(decimals=1)  # exact zeros and ties
    options = dict(
        topk=draw(st.sampled_from([1, 3, 10, 13])), alpha=draw(st.sampled_from([0.5, 1.0])),
        beta=draw(st.sampled_from([6.0, 2.0])), topk2=draw(st.sampled_from([None, 1, 2])),
        min_box_side=draw(st.sampled_from([None, 16.0])),
    )
    return (scores, pred, points, gt, labels, valid), options


@settings(max_examples=200, deadline=None)
@given(problems())
def test_matches_oracle(problem):
    check_against_oracle(problem)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(problems(crowded=True))
def test_matches_oracle_crowded(problem):
    check_against_oracle(problem)


def check_against_oracle(problem):
    args, options = problem
    scores, pred, points, gt, labels, valid = args
    np_args = [x.numpy() for x in args]
    got = match_task_aligned(*args, **options)
    fg, matched, want_labels, want_scores, metric = O.match(*np_args, **options)
    np.testing.assert_array_equal(got.foreground.numpy(), fg)
    np.testing.assert_array_equal(got.matched_gt.numpy(), matched)
    np.testing.assert_array_equal(got.labels.numpy(), want_labels)
    np.testing.assert_allclose(got.scores.numpy(), want_scores, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.metric.numpy(), metric, rtol=1e-12, atol=1e-15)
    # invariants: background is inert, foreground anchors are matched to valid GTs, scores in [0, 1]
    assert (got.scores.sum(-1)[~got.foreground] == 0).all()
    assert (got.scores.numpy() >= 0).all() and (got.scores.numpy() <= 1 + 1e-9).all()
    if gt.shape[1]:
        assert valid.gather(1, got.matched_gt)[got.foreground].all()
    if options["topk2"] is not None and options["topk2"] < options["topk"]:
        # one-to-one: each GT keeps at most topk2 anchors (a conflict can give a GT more than topk)
        for i in range(gt.shape[0]):
            per_gt = np.bincount(got.matched_gt[i][got.foreground[i]].numpy(), minlength=1)
            assert (per_gt <= options["topk2"]).all()


@settings(max_examples=200, deadline=None)
@given(problems(), st.sampled_from([1, 7]))
def test_chunk_size_does_not_change_a_bit(problem, chunk):
    check_chunks(problem, chunk)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(problems(crowded=True))
def test_chunk_size_does_not_change_a_bit_crowded(problem):
    check_chunks(problem, 7)  # 320 one-GT chunks take seconds; the golden 150-GT case runs chunk size 1


def check_chunks(problem, chunk):
    args, options = problem
    args = [x.float() if x.is_floating_point() else x for x in args]
    whole = match_task_aligned(*args, **options)
    part = match_task_aligned(*args, chunk_size=chunk, **options)
    for name in TaskAlignedAssignment.__dataclass_fields__:
        assert torch.equal(getattr(whole, name), getattr(part, name)), name
    if detloss.get_execution_strategy() != "dense":  # the gathered form gives the dense form's bits
        with detloss.execution_strategy("dense"):
            dense = match_task_aligned(*args, **options)
        for name in TaskAlignedAssignment.__dataclass_fields__:
            assert torch.equal(getattr(dense, name), getattr(whole, name)), name


def test_zero_metric_anchors_never_foreground():
    points, _ = anchor_points([(8, 8), (4, 4), (2, 2)], STRIDES)
    scores = torch.zeros(1, points.shape[0], 2)
    scores[0, :5, 1] = 0.5  # only five anchors have any score
    gt = torch.tensor([[[0.0, 0.0, 64.0, 64.0]]])
    pred = gt.expand(1, points.shape[0], 4)  # CIoU 1 everywhere: the metric is zero only by score
    a = match_task_aligned(scores, pred, points, gt, torch.tensor([[1]]), torch.tensor([[True]]), topk=13)
    assert a.foreground.sum() == 5 and a.foreground[0, :5].all()


def test_conflict_goes_to_largest_ciou_over_all_gts():
    # anchor 0 is the top-1 of GTs 0 and 1; GT 2 (another class) contains it with the largest
    # CIoU but takes anchor 1 as its own top-1: the conflict still sends anchor 0 to GT 2
    points = torch.tensor([[10.0, 10.0], [14.0, 14.0]])
    pred = torch.tensor([[[1.0, 1.0, 19.0, 19.0], [5.0, 5.0, 23.0, 23.0]]])
    gt = torch.tensor([[[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 22.0, 22.0], [1.0, 1.0, 19.0, 19.0]]])
    scores = torch.tensor([[[0.9, 0.01], [0.1, 0.9]]])
    labels = torch.tensor([[0, 0, 1]])
    a = match_task_aligned(scores, pred, points, gt, labels, torch.ones(1, 3, dtype=torch.bool), topk=1, beta=1.0)
    assert a.foreground[0].tolist() == [True, True]
    assert a.matched_gt[0].tolist() == [2, 2]
    assert a.labels[0].tolist() == [1, 1]
    # the oracle agrees
    want = O.match(scores.numpy(), pred.numpy(), points.numpy(), gt.numpy(), labels.numpy(), np.ones((1, 3), bool),
                   topk=1, beta=1.0)
    assert want[1][0].tolist() == [2, 2]


def test_empty_and_all_padding():
    points, _ = anchor_points([(8, 8)], (8,))
    scores = torch.rand(2, 64, 3)
    pred = torch.cat((points - 4, points + 4), -1).expand(2, -1, -1)
    for m, valid in ((0, torch.zeros(2, 0, dtype=torch.bool)), (3, torch.zeros(2, 3, dtype=torch.bool))):
        a = match_task_aligned(scores, pred, points, torch.zeros(2, m, 4), torch.zeros(2, m, dtype=torch.long), valid)
        assert not a.foreground.any() and (a.scores == 0).all() and (a.labels == -1).all()


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda k: k.update(gt_labels=torch.tensor([[3]])), "gt_labels"),
        (lambda k: k.update(gt_labels=torch.tensor([[-1]])), "gt_labels"),
        (lambda k: k.update(gt_labels=torch.tensor([[1.0]])), "gt_labels"),
        (lambda k: k.update(anchor_points=torch.zeros(5, 2)), "anchor_points"),
        (lambda k: k.update(pred_boxes=torch.zeros(1, 4, 3)), "pred_boxes"),
        (lambda k: k.update(gt_boxes=torch.tensor([[[0.0, 0.0, float("inf"), 1.0]]])), "gt_boxes"),
        (lambda k: k.update(gt_valid=torch.ones(1, 2, dtype=torch.bool)), "gt_valid"),
        (lambda k: k.update(topk=0), "topk"),
        (lambda k: k.update(topk2=-1), "topk2"),
        (lambda k: k.update(alpha=-1.0), "alpha"),
    ],
)
def test_bad_input_names_the_argument(change, name):
    points = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]])
    kw = dict(pred_scores=torch.rand(1, 4, 3), pred_boxes=torch.cat((points - 4, points + 4), -1)[None],
              anchor_points=points, gt_boxes=torch.tensor([[[0.0, 0.0, 16.0, 16.0]]]), gt_labels=torch.tensor([[2]]),
              gt_valid=torch.tensor([[True]]))
    match_task_aligned(**kw)
    change(kw)
    with pytest.raises((ValueError, TypeError), match=name):
        match_task_aligned(**kw)


def test_dropin_assigner_without_objects():
    labels, boxes, scores, fg, idx = TaskAlignedAssigner(num_classes=4)(
        torch.rand(2, 5, 4), torch.rand(2, 5, 4), torch.rand(5, 2), torch.zeros(2, 0, 1), torch.zeros(2, 0, 4),
        torch.zeros(2, 0, 1))
    assert (labels == 4).all() and not fg.any() and (scores == 0).all() and boxes.shape == (2, 5, 4)


def test_inputs_are_not_modified():
    scores = torch.tensor([[[-0.5], [0.3]]])  # C = 1: the class-major copy must still be a copy
    args = [scores, torch.tensor([[[0.0, 0, 8, 8], [8, 8, 16, 16]]]), torch.tensor([[4.0, 4], [12, 12]]),
            torch.tensor([[[0.0, 0, 16, 16]]]), torch.tensor([[0]]), torch.tensor([[True]])]
    before = [a.clone() for a in args]
    match_task_aligned(*args)
    assert all(torch.equal(a, b) for a, b in zip(args, before))
