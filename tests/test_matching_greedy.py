"""ssd_keras greedy matching (``detloss.matching.greedy``) against the float64 loop oracle.

Similarities are drawn on a coarse grid (many exact ties and zeros) so the tie-breaking
(lowest anchor, then lowest GT), the re-matching of zeroed rows and the later-GT-wins
overwrites of the original are all exercised.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss.matching.greedy import greedy_bipartite_match, match_greedy, match_greedy_boxes
from oracles import ssd_keras as O


SETTINGS = settings(max_examples=200, deadline=None)


def _similarity(seed: int, b: int, m: int, p: int, levels: int, density: float, dup: bool):
    rng = np.random.default_rng(seed)
    sim = rng.integers(0, levels + 1, size=(b, m, p)) / levels
    sim = sim * (rng.random((b, m, p)) < density)
    if dup and m >= 2:
        sim[:, 1] = sim[:, 0]  # duplicate GT rows
    valid = rng.random((b, m)) < 0.8
    return sim, valid


sizes = st.tuples(st.integers(1, 3), st.integers(0, 5), st.integers(0, 8))
thresholds = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    shape=sizes,
    levels=st.sampled_from([1, 2, 4, 1000]),
    density=st.sampled_from([0.0, 0.3, 1.0]),
    dup=st.booleans(),
    matching_type=st.sampled_from(["multi", "bipartite"]),
    pos=thresholds,
    neg=thresholds,
)
def test_match_greedy_equals_oracle(seed, shape, levels, density, dup, matching_type, pos, neg):
    b, m, extra = shape
    p = m + extra + 1  # the original needs M <= P
    sim, valid = _similarity(seed, b, m, p, levels, density, dup)
    got = match_greedy(
        torch.tensor(sim), torch.tensor(valid), matching_type=matching_type, pos_iou=pos, neg_iou=neg
    )
    want = O.match_batch(sim, valid, matching_type, pos, neg)
    for name, g, w in zip(got._fields, got, want):
        np.testing.assert_array_equal(g.numpy(), w, err_msg=name)
    # the three masks partition the anchors
    total = got.positive.int() + got.negative.int() + got.neutral.int()
    assert bool((total == 1).all())


@SETTINGS
@given(seed=st.integers(0, 2**31), shape=sizes, levels=st.sampled_from([1, 3, 1000]), dup=st.booleans())
def test_greedy_bipartite_equals_oracle(seed, shape, levels, dup):
    b, m, extra = shape
    p = m + extra + 1
    sim, _ = _similarity(seed, b, m, p, levels, 0.6, dup)
    valid = np.ones((b, m), dtype=bool)
    got = greedy_bipartite_match(torch.tensor(sim), torch.tensor(valid)).numpy()
    for i in range(b):
        np.testing.assert_array_equal(got[i], O.greedy_bipartite(sim[i]))


@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), m=st.integers(0, 4), p=st.integers(4, 10))
def test_match_greedy_boxes_equals_oracle(seed, b, m, p):
    rng = np.random.default_rng(seed)
    anchors = np.sort(rng.random((p, 2, 2)), axis=1).transpose(0, 2, 1).reshape(p, 4)[:, [0, 2, 1, 3]]
    anchors = np.concatenate([np.minimum(anchors[:, :2], anchors[:, 2:]), np.maximum(anchors[:, :2], anchors[:, 2:]) + 0.05], 1)
    gts = anchors[rng.integers(0, p, size=(b, m))] + rng.normal(0, 0.05, size=(b, m, 4)) * (rng.random((b, m, 1)) < 0.7)
    gts[..., 2:] = np.maximum(gts[..., 2:], gts[..., :2] + 0.01)
    valid = rng.random((b, m)) < 0.8
    got = match_greedy_boxes(torch.tensor(gts), torch.tensor(anchors), torch.tensor(valid), neg_iou=0.3)
    sim = np.stack([O.iou_xyxy(gts[i], anchors) for i in range(b)]) if m else np.zeros((b, 0, p))
    want = O.match_batch(sim, valid, "multi", 0.5, 0.3)
    for name, g, w in zip(got._fields, got, want):
        np.testing.assert_array_equal(g.numpy(), w, err_msg=name)


def test_every_gt_gets_its_own_anchor_even_at_low_iou():
    sim = torch.tensor([[[0.1, 0.05, 0.0], [0.09, 0.02, 0.01]]], dtype=torch.float64)
    match = greedy_bipartite_match(sim)
    assert match.tolist() == O.greedy_bipartite(sim[0].numpy()).reshape(1, -1).tolist()
    assert len(set(match[0].tolist())) == 2


def test_empty_images_and_no_gt_are_all_negative():
    out = match_greedy(torch.zeros(2, 0, 5))
    assert out.negative.all() and not out.positive.any() and (out.gt_index == -1).all()
    sim = torch.rand(2, 3, 6, dtype=torch.float64)
    valid = torch.tensor([[True, True, False], [False, False, False]])
    out = match_greedy(sim, valid)
    assert out.negative[1].all() and not out.positive[1].any()
    assert out.positive[0].sum() >= 2
    assert bool((out.gt_index[0][out.positive[0]] < 2).all())


def test_float16_similarity_runs_in_float32():
    sim = torch.rand(2, 3, 7)
    a = match_greedy(sim.half())
    b = match_greedy(sim.half().float())
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "args, kwargs, exc, text",
    [
        ((torch.zeros(2, 3),), {}, ValueError, "similarity"),
        ((torch.zeros(2, 3, 4, dtype=torch.int64),), {}, TypeError, "similarity"),
        ((torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool)), {}, ValueError, "gt_valid"),
        ((torch.zeros(2, 3, 4), torch.ones(2, 3)), {}, TypeError, "gt_valid"),
        ((-torch.ones(1, 2, 4),), {}, ValueError, "similarity"),
        ((torch.full((1, 2, 4), float("nan")),), {}, ValueError, "similarity"),
        ((torch.zeros(1, 2, 4),), {"matching_type": "greedy"}, ValueError, "matching_type"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, exc, text):
    with pytest.raises(exc, match=text):
        match_greedy(*args, **kwargs)


def test_bad_boxes_name_the_argument():
    with pytest.raises(ValueError, match="gt_boxes"):
        match_greedy_boxes(torch.zeros(2, 3, 5), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="anchors"):
        match_greedy_boxes(torch.zeros(2, 3, 4), torch.zeros(3, 4, 4))


@SETTINGS
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 4), p=st.integers(1, 30), k=st.integers(1, 30), levels=st.sampled_from([1, 2, 5, 10**6]))
def test_top_candidates_equal_a_stable_sort(seed, rows, p, k, levels):
    from detloss.matching.greedy import _top_candidates

    rng = np.random.default_rng(seed)
    values = torch.tensor(rng.integers(0, levels + 1, size=(rows, p)) / levels)
    k = min(k, p)
    got_val, got_idx = _top_candidates(values, k)
    want = torch.sort(values, dim=-1, descending=True, stable=True)
    assert torch.equal(got_idx, want.indices[..., :k])
    assert torch.equal(got_val, want.values[..., :k])


@pytest.mark.slow
def test_compiles_without_graph_break():
    sim = torch.rand(2, 3, 20)
    sim[0, 1] = sim[0, 0]  # duplicate GT
    valid = torch.tensor([[True, True, False], [True, True, True]])
    compiled = torch.compile(match_greedy, fullgraph=True)
    for got, want in zip(compiled(sim, valid), match_greedy(sim, valid)):
        assert torch.equal(got, want)
