"""Rotated task-aligned assignment (match_rotated_task_aligned) against a dense float64 NumPy oracle;
chunk sizes give the same bits; bad ground truth raises."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import detloss
from detloss import match_rotated_task_aligned
from detloss.priors import anchor_points

pytestmark = pytest.mark.usefixtures("strategy")

POINTS, _ = anchor_points([(8, 8), (4, 4), (2, 2)], [8, 16, 32], dtype=torch.float64)  # 84 anchors, 64 px


def np_cov(w, h, r):
    rot = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
    return rot @ np.diag([w * w / 12, h * h / 12]) @ rot.T


def np_probiou(b1, b2):
    s1, s2 = np_cov(*b1[2:]), np_cov(*b2[2:])
    s = (s1 + s2) / 2
    d = b1[:2] - b2[:2]
    det1, det2 = np.linalg.det(s1), np.linalg.det(s2)
    bd = d @ np.linalg.solve(s, d) / 8 + 0.5 * math.log(np.linalg.det(s) / math.sqrt(det1 * det2))
    return 1 - math.sqrt(1 - math.exp(-min(max(bd, 0.0), 100.0)))


def np_inside(p, box, side):
    cx, cy, w, h, r = box
    if side is not None:
        w, h = max(w, side), max(h, side)
    d = p - np.array([cx, cy])
    u = d @ np.array([math.cos(r), math.sin(r)])
    v = d @ np.array([-math.sin(r), math.cos(r)])
    return abs(u) <= w / 2 and abs(v) <= h / 2


def oracle(scores, pred, points, gt, labels, valid, topk, alpha, beta, topk2, side, eps=1e-9):
    """Per image, per GT, per anchor: the steps of the module doc, written out in float64."""
    b_n, a_n, c_n = scores.shape
    m_n = gt.shape[1]
    fg = np.zeros((b_n, a_n), bool)
    matched = np.zeros((b_n, a_n), int)
    target = np.zeros((b_n, a_n, c_n))
    for b in range(b_n):
        u = np.zeros((m_n, a_n))
        t = np.zeros((m_n, a_n))
        for g in range(m_n):
            if not valid[b, g]:
                continue
            for a in range(a_n):
                if np_inside(points[a], gt[b, g], side):
                    u[g, a] = max(np_probiou(gt[b, g], pred[b, a]), 0.0)
                    t[g, a] = scores[b, a, labels[b, g]] ** alpha * u[g, a] ** beta
        chosen = np.zeros((m_n, a_n), bool)
        for g in range(m_n):
            order = sorted(range(a_n), key=lambda a: (-t[g, a], a))[:topk]
            for a in order:
                chosen[g, a] = t[g, a] > 0
        count = chosen.sum(0)
        for a in range(a_n):
            if count[a] == 1:
                matched[b, a] = int(np.argmax(chosen[:, a]))
            elif count[a] > 1:
                matched[b, a] = int(np.argmax(u[:, a]))  # first index among ties
            fg[b, a] = count[a] > 0 and t[matched[b, a], a] > 0
        if topk2 is not None and topk2 < topk:
            for g in range(m_n):
                mine = [a for a in range(a_n) if fg[b, a] and matched[b, a] == g]
                for a in sorted(mine, key=lambda a: (-t[g, a], a))[topk2:]:
                    fg[b, a] = False
        for g in range(m_n):
            mine = [a for a in range(a_n) if fg[b, a] and matched[b, a] == g]
            if not mine:
                continue
            max_t, max_u = max(t[g, a] for a in mine), max(u[g, a] for a in mine)
            for a in mine:
                target[b, a, labels[b, g]] = t[g, a] * max_u / (max_t + eps)
    return fg, matched, target


def random_problem(seed, b=2, m=6, c=3, dtype=torch.float64, invalid=True):
    g = torch.Generator().manual_seed(seed)
    a = POINTS.shape[0]
    centre = torch.rand(b, m, 2, generator=g, dtype=torch.float64) * 56 + 4
    size = torch.rand(b, m, 2, generator=g, dtype=torch.float64) * 30 + 2
    if m > 1:
        size[:, 1] = size[:, 1, :1]  # a square
    angle = torch.rand(b, m, 1, generator=g, dtype=torch.float64) * 2 * math.pi - math.pi
    gt = torch.cat((centre, size, angle), -1)
    valid = torch.ones(b, m, dtype=torch.bool)
    if invalid and m > 2:
        valid[0, -1] = False
        gt[0, -1] = 0
    labels = torch.randint(0, c, (b, m), generator=g)
    # predictions: boxes near each anchor, some near a GT
    pred_centre = POINTS + torch.randn(b, a, 2, generator=g, dtype=torch.float64) * 3
    pred_size = torch.rand(b, a, 2, generator=g, dtype=torch.float64) * 24 + 4
    pred_angle = torch.rand(b, a, 1, generator=g, dtype=torch.float64) * 4 - 2
    pred = torch.cat((pred_centre, pred_size, pred_angle), -1)
    scores = torch.rand(b, a, c, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return scores.to(dtype), pred.to(dtype), POINTS.to(dtype), gt.to(dtype), labels, valid


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([None, 16.0]), st.sampled_from([(10, None), (7, 1), (3, None)]),
       st.sampled_from([(0.5, 6.0), (1.0, 2.0)]))
def test_matches_the_float64_oracle(seed, side, tops, powers):
    topk, topk2 = tops
    alpha, beta = powers
    scores, pred, points, gt, labels, valid = random_problem(seed)
    r = match_rotated_task_aligned(scores, pred, points, gt, labels, valid, topk=topk, alpha=alpha, beta=beta,
                                   topk2=topk2, min_box_side=side)
    fg, matched, target = oracle(scores.numpy(), pred.numpy(), points.numpy(), gt.numpy(), labels.numpy(),
                                 valid.numpy(), topk, alpha, beta, topk2, side)
    np.testing.assert_array_equal(r.foreground.numpy(), fg)
    np.testing.assert_array_equal(r.matched_gt.numpy()[fg], matched[fg])
    # the oracle has no eps (the assigner keeps ultralytics' 1e-7 in ProbIoU): values agree to ~1e-5
    np.testing.assert_allclose(r.scores.numpy(), target, rtol=1e-4, atol=1e-9)
    assert r.boxes.shape == (*fg.shape, 5)
    np.testing.assert_array_equal(r.boxes.numpy()[fg], gt.numpy()[np.nonzero(fg)[0], matched[fg]])


@pytest.mark.parametrize("seed", [0, 1])
def test_chunk_sizes_give_the_same_bits(seed):
    scores, pred, points, gt, labels, valid = random_problem(seed, b=2, m=23, dtype=torch.float32)
    runs = [match_rotated_task_aligned(scores, pred, points, gt, labels, valid, topk=10, alpha=0.5, beta=6.0,
                                       min_box_side=16.0, chunk_size=k) for k in (1, 7, 23, None)]
    assert runs[0].foreground.any()
    for other in runs[1:]:
        for field in ("foreground", "matched_gt", "labels", "boxes", "scores", "metric", "overlap"):
            assert torch.equal(getattr(runs[0], field), getattr(other, field)), field


def test_strategies_give_the_same_bits():
    scores, pred, points, gt, labels, valid = random_problem(5, m=15, dtype=torch.float32)
    out = []
    for name in ("dense", "gathered"):
        with detloss.execution_strategy(name):
            out.append(match_rotated_task_aligned(scores, pred, points, gt, labels, valid, topk=10, chunk_size=4))
    for field in ("foreground", "matched_gt", "scores", "metric"):
        assert torch.equal(getattr(out[0], field), getattr(out[1], field)), field


def test_no_ground_truth_and_an_axis_aligned_box():
    scores, pred, points, gt, labels, valid = random_problem(3, dtype=torch.float32)
    empty = match_rotated_task_aligned(scores, pred, points, gt[:, :0], labels[:, :0], valid[:, :0])
    assert not empty.foreground.any() and empty.boxes.shape == (2, 84, 5)
    # an unrotated box takes the anchors the axis-aligned assigner takes (same candidates)
    box = torch.tensor([[[32.0, 32.0, 20.0, 12.0, 0.0]]])
    cand = match_rotated_task_aligned(torch.ones(1, 84, 1) * 0.5, box.expand(1, 84, 5), points, box,
                                      torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                                      topk=84)
    inside = ((points - 32).abs() < torch.tensor([10.0, 6.0])).all(-1)
    assert torch.equal(cand.foreground[0], inside)


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda gt: gt[..., :4], "gt_boxes"),
        (lambda gt: gt.index_put((torch.tensor([0]), torch.tensor([0]), torch.tensor([4])), torch.tensor(float("nan"))),
         "gt_boxes"),
        (lambda gt: gt.index_put((torch.tensor([0]), torch.tensor([0]), torch.tensor([2])), torch.tensor(-3.0)),
         r"gt_boxes \(w, h\)"),
    ],
)
def test_bad_ground_truth_names_the_argument(change, name):
    scores, pred, points, gt, labels, valid = random_problem(0, dtype=torch.float32)
    with pytest.raises(ValueError, match=name):
        match_rotated_task_aligned(scores, pred, points, change(gt), labels, valid)
    with pytest.raises(ValueError, match="pred_boxes"):
        match_rotated_task_aligned(scores, pred[..., :4], points, gt, labels, valid)
