"""DETR matching: ``detr_matching_cost`` and ``match_hungarian`` (golden pairs, SciPy per
problem, brute-force optimality, padding invariance, chunking, the float64 oracle, errors)."""
from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import detloss
from detloss import _chunking
from detloss import HungarianMatch, detr_matching_cost, match_hungarian
from detloss.matching import hungarian as H
from oracles import detr as O

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

SETTINGS = settings(max_examples=200, deadline=None)


def random_boxes(rng, *shape):
    """Normalised cxcywh boxes with sizes in [0.05, 0.5]."""
    ctr = rng.uniform(0.1, 0.9, shape + (2,))
    size = rng.uniform(0.05, 0.5, shape + (2,))
    return torch.from_numpy(np.concatenate((ctr, size), -1))


def golden_stacked(g):
    """The golden inputs stacked as L * B problems, with the golden cost weights."""
    logits, boxes = torch.from_numpy(g["in_pred_logits"]), torch.from_numpy(g["in_pred_boxes"])
    num_layers, batch = logits.shape[:2]
    m = g["in_labels"].shape[1]
    valid = torch.arange(m)[None] < torch.from_numpy(g["in_num_gt"])[:, None]
    rep = lambda t: t.unsqueeze(0).expand(num_layers, *t.shape).flatten(0, 1)  # noqa: E731
    gt_boxes, gt_labels = torch.from_numpy(g["in_boxes"]), torch.from_numpy(g["in_labels"]).long()
    w_cls, w_l1, w_giou = (O.cfg_float(v) for v in g["cfg_cost"])
    return dict(
        pred_logits=logits.flatten(0, 1), pred_boxes=boxes.flatten(0, 1), gt_boxes=rep(gt_boxes),
        gt_labels=rep(gt_labels), gt_valid=rep(valid), cls_weight=w_cls, l1_weight=w_l1, giou_weight=w_giou,
    )


# ---------------------------------------------------------------------------- golden pairs
@pytest.mark.parametrize("case", O.DETR_GOLDEN_CASES)
def test_golden_pairs_every_layer(golden, case):
    g = golden(f"detr/{case}.npz")
    x = golden_stacked(g)
    match = match_hungarian(detr_matching_cost(**x), x["gt_valid"])
    num_layers, batch = g["in_pred_logits"].shape[:2]
    gt_to_query = match.gt_to_query.view(num_layers, batch, -1).numpy()
    for l in range(num_layers):
        for b in range(batch):
            n = int(g["in_num_gt"][b])
            expected = {(int(q), int(j)) for q, j in zip(g["mid_match_query"][l, b, :n], g["mid_match_gt"][l, b, :n])}
            got = {(int(gt_to_query[l, b, j]), j) for j in range(n)}
            assert got == expected, (l, b)
            assert (g["mid_match_query"][l, b, n:] == -1).all()


@pytest.mark.parametrize("case", ["detr_a_typical", "detr_g_one_query_per_gt"])
def test_golden_cost_equals_float64_oracle(golden, case):
    g = golden(f"detr/{case}.npz")
    x = golden_stacked(g)
    cost = detr_matching_cost(**x)
    for p in (0, cost.shape[0] - 1):
        n = int(x["gt_valid"][p].sum())
        ref = O.cost_matrix(x["pred_logits"][p].double().numpy(), x["pred_boxes"][p].double().numpy(),
                            x["gt_boxes"][p, :n].double().numpy(), x["gt_labels"][p, :n].numpy(),
                            w_cls=x["cls_weight"], w_l1=x["l1_weight"], w_giou=x["giou_weight"])
        np.testing.assert_allclose(cost[p, :, :n].numpy(), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- batched solve = SciPy
@st.composite
def problems(draw):
    n = draw(st.integers(1, 4))
    q = draw(st.integers(0, 8))
    m = draw(st.sampled_from([0, q, max(q - 2, 0), q + 3, draw(st.integers(0, 10))]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    integer = draw(st.booleans())  # small integers: many exact ties
    cost = rng.integers(0, 3, (n, q, m)).astype(np.float32) if integer else rng.normal(size=(n, q, m)).astype(np.float32)
    valid = rng.random((n, m)) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    return torch.from_numpy(cost), torch.from_numpy(valid)


@SETTINGS
@given(p=problems())
def test_batched_solve_equals_scipy_per_problem(p):
    cost, valid = p
    n, q, m = cost.shape
    match = match_hungarian(cost, valid)
    assert match.gt_to_query.shape == (n, m) and match.query_to_gt.shape == (n, q)
    assert match.gt_to_query.dtype == match.query_to_gt.dtype == torch.int64
    for i in range(n):
        columns = np.flatnonzero(valid[i].numpy())
        expected_g2q = np.full(m, -1)
        expected_q2g = np.full(q, -1)
        if columns.size and q:
            rows, cols = linear_sum_assignment(cost[i].numpy()[:, columns])
            expected_g2q[columns[cols]] = rows
            expected_q2g[rows] = columns[cols]
        np.testing.assert_array_equal(match.gt_to_query[i].numpy(), expected_g2q)
        np.testing.assert_array_equal(match.query_to_gt[i].numpy(), expected_q2g)


@SETTINGS
@given(q=st.integers(1, 6), n=st.integers(0, 7), seed=st.integers(0, 2**31 - 1))
def test_total_cost_is_optimal_brute_force(q, n, seed):
    cost = np.random.default_rng(seed).normal(size=(1, q, n))
    match = match_hungarian(torch.from_numpy(cost), torch.ones(1, n, dtype=torch.bool))
    g2q = match.gt_to_query[0].numpy()
    assert (g2q >= 0).sum() == min(q, n) and len(set(g2q[g2q >= 0])) == min(q, n)
    total = sum(cost[0, g2q[j], j] for j in range(n) if g2q[j] >= 0)
    if n <= q:  # every GT takes a distinct query
        best = min(sum(cost[0, p[j], j] for j in range(n)) for p in itertools.permutations(range(q), n))
    else:  # every query takes a distinct GT
        best = min(sum(cost[0, i, p[i]] for i in range(q)) for p in itertools.permutations(range(n), q))
    assert total == pytest.approx(best, abs=1e-9)


@SETTINGS
@given(q=st.integers(1, 7), m=st.integers(0, 6), pad=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_padding_changes_neither_cost_nor_match(q, m, pad, seed):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(1, q, 4)) * 3).float()
    boxes, gt = random_boxes(rng, 1, q).float(), random_boxes(rng, 1, m).float()
    labels = torch.from_numpy(rng.integers(0, 3, (1, m)))
    plain = detr_matching_cost(logits, boxes, gt, labels, torch.ones(1, m, dtype=torch.bool))
    plain_match = match_hungarian(plain, torch.ones(1, m, dtype=torch.bool))
    # padding columns (junk boxes, out-of-range labels) inserted at random places
    order = rng.permutation(m + pad)
    real = np.sort(order[:m])
    padded_gt = random_boxes(rng, 1, m + pad).float() * 3
    padded_labels = torch.full((1, m + pad), -7, dtype=torch.int64)
    padded_valid = torch.zeros(1, m + pad, dtype=torch.bool)
    padded_gt[0, real], padded_labels[0, real], padded_valid[0, real] = gt[0], labels[0], True
    padded = detr_matching_cost(logits, boxes, padded_gt, padded_labels, padded_valid)
    assert torch.equal(padded[..., real], plain)
    match = match_hungarian(padded, padded_valid)
    assert torch.equal(match.gt_to_query[0, real], plain_match.gt_to_query[0])
    assert (match.gt_to_query[0, ~padded_valid[0]] == -1).all()
    lookup = torch.from_numpy(np.append(real, -1))  # plain GT index -> padded position; -1 stays -1
    assert torch.equal(match.query_to_gt, lookup[plain_match.query_to_gt])


# ------------------------------------------------------------------------------ the cost
@pytest.mark.parametrize("kind", ["softmax", "focal"])
def test_cost_equals_float64_oracle(kind):
    rng = np.random.default_rng(3)
    n, q, m, k = 3, 7, 5, 5 if kind == "softmax" else 4
    logits = torch.from_numpy(rng.normal(size=(n, q, k)) * 4)
    boxes, gt = random_boxes(rng, n, q), random_boxes(rng, n, m)
    labels = torch.from_numpy(rng.integers(0, 4, (n, m)))
    valid = torch.ones(n, m, dtype=torch.bool)
    cost = detr_matching_cost(logits, boxes, gt, labels, valid, class_cost=kind, cls_weight=2.0, l1_weight=5.0,
                              giou_weight=2.0, alpha=0.3, gamma=1.5)
    assert cost.dtype == torch.float64
    for i in range(n):
        ref = O.cost_matrix(logits[i].numpy(), boxes[i].numpy(), gt[i].numpy(), labels[i].numpy(), kind=kind,
                            w_cls=2.0, w_l1=5.0, w_giou=2.0, alpha=0.3, gamma=1.5)
        np.testing.assert_allclose(cost[i].numpy(), ref, rtol=1e-10, atol=1e-12)


def test_cost_chunks_give_the_same_cost():
    rng = np.random.default_rng(4)
    logits = torch.randn(4, 37, 6)
    boxes, gt = random_boxes(rng, 4, 37).float(), random_boxes(rng, 4, 9).float()
    labels, valid = torch.from_numpy(rng.integers(0, 5, (4, 9))), torch.ones(4, 9, dtype=torch.bool)
    whole = detr_matching_cost(logits, boxes, gt, labels, valid)
    for chunk in (1, 9, 50, 37 * 9, 37 * 9 * 3 - 1):  # query rows of one problem, whole problems
        assert torch.equal(detr_matching_cost(logits, boxes, gt, labels, valid, chunk_elements=chunk), whole)


def test_cost_temporaries_are_bounded(monkeypatch):
    """Each block is about ``_chunking.DETR_COST`` entries, whatever Q x M."""
    seen = []
    real = H.aligned_box_iou_unchecked
    monkeypatch.setattr(H, "aligned_box_iou_unchecked", lambda a, b, k: seen.append(a.shape[1] * b.shape[2] * a.shape[0]) or real(a, b, k))
    monkeypatch.setattr(_chunking, "DETR_COST", _chunking.ChunkSize(4096, 4096))
    rng = np.random.default_rng(5)
    cost = detr_matching_cost(torch.randn(2, 300, 3), random_boxes(rng, 2, 300).float(), random_boxes(rng, 2, 100).float(),
                              torch.zeros(2, 100, dtype=torch.int64), torch.ones(2, 100, dtype=torch.bool))
    assert cost.shape == (2, 300, 100) and len(seen) == 2 * 8 and max(seen) <= 4096
    seen.clear()
    detr_matching_cost(torch.randn(60, 8, 3), random_boxes(rng, 60, 8).float(), random_boxes(rng, 60, 10).float(),
                       torch.zeros(60, 10, dtype=torch.int64), torch.ones(60, 10, dtype=torch.bool))
    assert len(seen) == 2 and max(seen) <= 4096  # whole problems per block while they fit


def test_cost_half_predictions_computed_in_float32():
    rng = np.random.default_rng(6)
    logits, boxes = torch.randn(2, 6, 4), random_boxes(rng, 2, 6).float()
    gt, labels, valid = random_boxes(rng, 2, 3).float(), torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.bool)
    ref = detr_matching_cost(logits.half().float(), boxes.half().float(), gt, labels, valid)
    got = detr_matching_cost(logits.half(), boxes.half(), gt, labels, valid)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert detr_matching_cost(logits, boxes, gt, labels, valid).dtype == torch.float32


def test_cost_compiles_fullgraph(strategy):
    if strategy != "dense":
        pytest.skip("under torch.compile every strategy runs dense")
    rng = np.random.default_rng(7)
    args = (torch.randn(3, 10, 5), random_boxes(rng, 3, 10).float(), random_boxes(rng, 3, 4).float(),
            torch.from_numpy(rng.integers(0, 4, (3, 4))), torch.from_numpy(rng.random((3, 4)) < 0.7))
    torch._dynamo.reset()
    compiled = torch.compile(H.matching_cost_unchecked, backend="aot_eager", fullgraph=True)
    # one whole problem (10 x 4 = 40 entries) per block of at most 50: 3 blocks
    torch.testing.assert_close(compiled(*args, chunk_elements=50), H.matching_cost_unchecked(*args, chunk_elements=50))


def test_solve_compiles_fullgraph_as_one_opaque_op():
    cost, valid = torch.randn(3, 5, 4), torch.rand(3, 4) < 0.6
    torch._dynamo.reset()
    compiled = torch.compile(lambda c, v: match_hungarian(c, v).query_to_gt, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(cost, valid), match_hungarian(cost, valid).query_to_gt)


# ------------------------------------------------------------------------ solver and host
def test_one_host_round_trip_for_all_problems(monkeypatch):
    calls = []
    real = H._solve_all
    monkeypatch.setattr(H, "_solve_all", lambda *a: calls.append(a[0].shape) or real(*a))
    cost, valid = torch.randn(12, 6, 5), torch.ones(12, 5, dtype=torch.bool)
    match_hungarian(cost, valid)
    assert calls == [(12, 6, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_packed_transfer_gives_the_same_result(dtype):
    """The accelerator path (cost and mask packed into one host copy), run on the CPU."""
    cost, valid = torch.randn(5, 6, 4).to(dtype), torch.rand(5, 4) < 0.6
    packed = H._solve_all(cost, valid, linear_sum_assignment, pack=True)
    assert torch.equal(packed, H._solve_all(cost, valid, linear_sum_assignment, pack=False))
    match = match_hungarian(cost, valid)
    assert torch.equal(packed, torch.cat((match.gt_to_query, match.query_to_gt), 1))


def test_custom_solver_is_called_per_problem_without_padding():
    seen = []

    def solver(block):
        seen.append(block.shape)
        return linear_sum_assignment(block)

    cost, valid = torch.randn(3, 4, 5), torch.tensor([[1, 1, 0, 0, 1], [0] * 5, [1] * 5], dtype=torch.bool)
    custom = match_hungarian(cost, valid, solver=solver)
    default = match_hungarian(cost, valid)
    assert seen == [(4, 3), (4, 5)]
    assert torch.equal(custom.gt_to_query, default.gt_to_query) and torch.equal(custom.query_to_gt, default.query_to_gt)


def test_solver_returning_a_partial_matching_is_an_error():
    with pytest.raises(ValueError, match=r"solver: expected min\(Q, n\) = 2"):
        match_hungarian(torch.randn(1, 3, 2), torch.ones(1, 2, dtype=torch.bool), solver=lambda c: ([0], [0]))


def test_non_finite_cost_gets_a_defined_matching_and_never_raises():
    """A diverging model (NaN / inf predictions) makes NaN costs: the solve still returns a
    complete one-to-one matching (the loss, from the same predictions, is non-finite)."""
    cost = torch.randn(2, 3, 2)
    cost[0, 1, 1] = float("nan")
    cost[1] = float("inf")
    match = match_hungarian(cost, torch.ones(2, 2, dtype=torch.bool))
    for i in range(2):
        assert sorted(match.gt_to_query[i].tolist()) == sorted(set(match.gt_to_query[i].tolist()))
        assert (match.gt_to_query[i] >= 0).all() and (match.query_to_gt[i] >= 0).sum() == 2
    padded = match_hungarian(cost, torch.tensor([[True, False], [True, True]]))
    assert padded.gt_to_query[0, 1] == -1


def test_missing_scipy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match=r'pip install "detloss\[detr\]"'):
        match_hungarian(torch.randn(1, 2, 2), torch.ones(1, 2, dtype=torch.bool))
    # a solver of one's own needs no SciPy
    eye = lambda c: (np.arange(min(c.shape)), np.arange(min(c.shape)))  # noqa: E731
    assert match_hungarian(torch.randn(1, 2, 2), torch.ones(1, 2, dtype=torch.bool), solver=eye).gt_to_query.tolist() == [[0, 1]]


def test_empty_problems():
    for n, q, m in ((0, 3, 2), (2, 0, 3), (2, 3, 0)):
        match = match_hungarian(torch.zeros(n, q, m), torch.ones(n, m, dtype=torch.bool))
        assert isinstance(match, HungarianMatch)
        assert match.gt_to_query.shape == (n, m) and match.query_to_gt.shape == (n, q)
        assert (match.gt_to_query == -1).all() and (match.query_to_gt == -1).all()


# ------------------------------------------------------------------------------ bad input
def _cost_args():
    rng = np.random.default_rng(8)
    return dict(pred_logits=torch.randn(2, 5, 4), pred_boxes=random_boxes(rng, 2, 5).float(),
                gt_boxes=random_boxes(rng, 2, 3).float(), gt_labels=torch.zeros(2, 3, dtype=torch.int64),
                gt_valid=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("change,error,match", [
    (dict(pred_boxes=torch.rand(2, 4, 4)), ValueError, r"pred_boxes: expected shape \(N=2, Q=5, 4\)"),
    (dict(gt_labels=torch.full((2, 3), 3)), ValueError, r"gt_labels: expected values in \[0, 2\]"),
    (dict(gt_labels=torch.zeros(2, 3)), TypeError, r"gt_labels: expected an integer tensor"),
    (dict(gt_valid=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"gt_valid: expected shape \(B=2, M=3\)"),
    (dict(gt_boxes=torch.full((2, 3, 4), float("inf"))), ValueError, r"gt_boxes: expected finite values"),
    (dict(class_cost="sigmoid"), ValueError, r"class_cost: expected one of \('softmax', 'focal'\)"),
    (dict(l1_weight=-1.0), ValueError, r"l1_weight: expected a number >= 0"),
])
def test_cost_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        detr_matching_cost(**{**_cost_args(), **change})


@pytest.mark.parametrize("cost,valid,kw,error,match", [
    (torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool), {}, ValueError, r"cost: expected shape \(N, Q, M\)"),
    (torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), {}, ValueError, r"gt_valid: expected shape \(N=2, M=4\)"),
    (torch.zeros(2, 3, 4, dtype=torch.int64), torch.ones(2, 4, dtype=torch.bool), {}, TypeError, r"cost: expected a floating"),
    (torch.randn(2, 3, 4), torch.ones(2, 4), {}, TypeError, r"gt_valid: expected a bool"),
    (torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), {"solver": "scipy"}, TypeError, r"solver: expected a callable"),
])
def test_match_bad_input(cost, valid, kw, error, match):
    with pytest.raises(error, match=match):
        match_hungarian(cost, valid, **kw)


def test_exports():
    assert detloss.match_hungarian is match_hungarian and detloss.detr_matching_cost is detr_matching_cost
