"""Native ``detloss.DETRLoss``: golden losses / gradients / matching, the float64 oracle (CE and
focal), gradcheck of the matched-pair terms, empty images, one solve per step, compile, DDP
normalisers, validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import detloss
from detloss import DETRLoss
from detloss.detectors import detr as D
from detloss.matching import hungarian as H
from oracles import detr as O

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

SETTINGS = settings(max_examples=200, deadline=None)


def golden_inputs(g, dtype=torch.float32):
    m = g["in_labels"].shape[1]
    return dict(
        box_pred=torch.from_numpy(g["in_pred_boxes"]).to(dtype).requires_grad_(),
        cls_logits=torch.from_numpy(g["in_pred_logits"]).to(dtype).requires_grad_(),
        gt_boxes=torch.from_numpy(g["in_boxes"]),
        gt_labels=torch.from_numpy(g["in_labels"]).long(),
        gt_valid=torch.arange(m)[None] < torch.from_numpy(g["in_num_gt"])[:, None],
    )


def golden_loss(g, **kw) -> DETRLoss:
    c = [O.cfg_float(v) for v in g["cfg_cost"]]
    w = [O.cfg_float(v) for v in g["cfg_weights"]]
    return DETRLoss(
        int(g["cfg_num_classes"]), eos_coef=O.cfg_float(g["cfg_eos_coef"]), cls_weight=w[0], l1_weight=w[1],
        giou_weight=w[2], match_cls_weight=c[0], match_l1_weight=c[1], match_giou_weight=c[2], **kw,
    )


@pytest.mark.parametrize("case", O.DETR_GOLDEN_CASES)
def test_golden_native(golden, case):
    g = golden(f"detr/{case}.npz")
    x = golden_inputs(g)
    out = golden_loss(g)(**x, return_assignment=True)
    num_layers = x["cls_logits"].shape[0]
    for native, original in (("loss_cls", "loss_ce"), ("loss_l1", "loss_bbox"), ("loss_giou", "loss_giou")):
        for layer in range(num_layers):
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            np.testing.assert_allclose(out[native + suffix].item(), g[f"out_{original}{suffix}"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["loss"].item(), g["out_total"], rtol=1e-5, atol=1e-7)
    assert len([k for k in out if k.startswith("loss")]) == 3 * num_layers + 1
    # the matching of every layer
    a = out["assignment"]
    for l in range(num_layers):
        for b, n in enumerate(g["in_num_gt"]):
            expected = {(int(q), int(j)) for q, j in zip(g["mid_match_query"][l, b, :n], g["mid_match_gt"][l, b, :n])}
            got = {(int(q), int(j)) for q, j in enumerate(a.query_to_gt[l, b].tolist()) if j >= 0}
            assert got == expected
            assert {(int(a.gt_to_query[l, b, j]), j) for j in range(n)} == expected
    assert a.num_boxes.item() == max(1, g["in_num_gt"].sum())
    out["loss"].backward()
    np.testing.assert_allclose(x["cls_logits"].grad.numpy(), g["out_grad_pred_logits"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(x["box_pred"].grad.numpy(), g["out_grad_pred_boxes"], rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------- float64 oracle
@st.composite
def detr_inputs(draw):
    num_layers, batch, q = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    counts = draw(st.lists(st.integers(0, q + 2), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**31 - 1))
    return num_layers, batch, q, counts, seed, draw(st.sampled_from(["ce", "focal"]))


def _random_case(num_layers, batch, q, counts, seed, class_loss, num_classes=3):
    rng = np.random.default_rng(seed)
    k = num_classes + (class_loss == "ce")
    m = max(counts)
    logits = rng.normal(size=(num_layers, batch, q, k)) * 3
    ctr, size = rng.uniform(0.1, 0.9, (num_layers, batch, q, 2)), rng.uniform(0.05, 0.5, (num_layers, batch, q, 2))
    boxes = np.concatenate((ctr, size), -1)
    gt = np.concatenate((rng.uniform(0.1, 0.9, (batch, m, 2)), rng.uniform(0.05, 0.5, (batch, m, 2))), -1)
    labels = rng.integers(0, num_classes, (batch, m))
    valid = np.arange(m)[None] < np.array(counts)[:, None]
    gt[~valid], labels[~valid] = 0.0, -1
    return logits, boxes, gt, labels, valid


@SETTINGS
@given(x=detr_inputs())
def test_equals_float64_oracle(x):
    num_layers, batch, q, counts, seed, class_loss = x
    logits, boxes, gt, labels, valid = _random_case(*x)
    options = dict(class_loss=class_loss, eos_coef=0.2, alpha=0.3, gamma=1.5)
    weights, cost_weights = (2.0, 5.0, 1.5), (1.5, 4.0, 2.5)
    loss = DETRLoss(3, **options, cls_weight=weights[0], l1_weight=weights[1], giou_weight=weights[2],
                    match_cls_weight=cost_weights[0], match_l1_weight=cost_weights[1], match_giou_weight=cost_weights[2])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    out = loss(t(boxes), t(logits), t(gt), t(labels), t(valid), return_assignment=True)
    cls, l1, giou, total, pairs = O.detr_loss(logits, boxes, gt, labels, counts, weights=weights,
                                              cost_weights=cost_weights, **options)
    for layer in range(num_layers):
        suffix = "" if layer == num_layers - 1 else f"_{layer}"
        np.testing.assert_allclose(out["loss_cls" + suffix].item(), cls[layer], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out["loss_l1" + suffix].item(), l1[layer], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out["loss_giou" + suffix].item(), giou[layer], rtol=1e-9, atol=1e-12)
        for b in range(batch):
            rows, cols = pairs[layer][b]
            expected = np.full(q, -1)
            expected[rows] = cols
            np.testing.assert_array_equal(out["assignment"].query_to_gt[layer, b].numpy(), expected)
    np.testing.assert_allclose(out["loss"].item(), total, rtol=1e-9)


# -------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_gradcheck_terms_on_matched_pairs(class_loss):
    rng = np.random.default_rng(11)
    logits, boxes, gt, labels, valid = _random_case(2, 2, 4, [2, 3], 11, class_loss)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    query_to_gt = torch.tensor([[[1, -1, 0, -1], [2, 0, -1, 1]], [[-1, 0, 1, -1], [0, 1, 2, -1]]])
    del rng, valid
    for term in range(3):
        def f(lg, bx, term=term):
            return D.detr_set_loss(bx, lg, t(gt), t(labels), query_to_gt, torch.tensor(5.0, dtype=torch.float64),
                                   class_loss=class_loss, eos_coef=0.3)[term]
        lg, bx = t(logits).requires_grad_(), t(boxes).requires_grad_()
        assert torch.autograd.gradcheck(f, (lg, bx), fast_mode=True)


def test_unmatched_queries_get_no_box_gradient():
    logits, boxes, gt, labels, valid = _random_case(1, 1, 5, [2], 12, "ce")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    bx = t(boxes).requires_grad_()
    out = DETRLoss(3)(bx, t(logits), t(gt), t(labels), t(valid), return_assignment=True)
    (out["loss_l1"] + out["loss_giou"]).backward()
    unmatched = out["assignment"].query_to_gt < 0
    assert (bx.grad[unmatched] == 0).all() and (bx.grad[~unmatched] != 0).any()


# ------------------------------------------------------------------------- empty images
@pytest.mark.parametrize("class_loss", ["ce", "focal"])
@pytest.mark.parametrize("counts", [[0, 0], [0, 3], [0]], ids=["batch-empty", "image-empty", "no-rows"])
def test_images_without_objects(class_loss, counts):
    logits, boxes, gt, labels, valid = _random_case(2, len(counts), 5, counts, 13, class_loss)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    lg, bx = t(logits).requires_grad_(), t(boxes).requires_grad_()
    if counts == [0]:
        gt, labels, valid = np.zeros((1, 0, 4)), np.zeros((1, 0), np.int64), np.zeros((1, 0), bool)
    out = DETRLoss(3, class_loss=class_loss)(bx, lg, t(gt), torch.from_numpy(labels), torch.from_numpy(valid))
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert torch.isfinite(lg.grad).all() and torch.isfinite(bx.grad).all()
    if sum(counts) == 0:
        for k in ("loss_l1", "loss_l1_0", "loss_giou", "loss_giou_0"):
            assert out[k].item() == 0.0
        assert (bx.grad == 0).all() and out["loss_cls"].item() > 0
    else:  # the empty image's queries all target "no object" and get no box gradient
        assert (bx.grad[:, 0] == 0).all()


def test_more_objects_than_queries():
    logits, boxes, gt, labels, valid = _random_case(2, 2, 3, [5, 2], 14, "ce")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    out = DETRLoss(3)(t(boxes), t(logits), t(gt), t(labels), t(valid), return_assignment=True)
    a = out["assignment"]
    assert (a.query_to_gt[:, 0] >= 0).all()  # every query of the crowded image is matched
    assert ((a.gt_to_query[:, 0] >= 0).sum(-1) == 3).all()  # 2 of its 5 objects stay unmatched
    assert a.num_boxes.item() == 7  # but every object counts in N
    cls, l1, giou, total, _ = O.detr_loss(logits, boxes, gt, labels, [5, 2])
    np.testing.assert_allclose(out["loss"].item(), total, rtol=1e-9)


def test_padding_rows_anywhere_change_nothing():
    logits, boxes, gt, labels, valid = _random_case(2, 2, 5, [3, 2], 20, "ce")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    lg1, bx1, lg2, bx2 = (t(a).requires_grad_() for a in (logits, boxes, logits, boxes))
    plain = DETRLoss(3)(bx1, lg1, t(gt), t(labels), t(valid))
    # five junk padding rows (3 .. 7) inserted before, between and after the real ones (0, 1, 2)
    order = [5, 0, 1, 6, 2, 3, 4, 7]  # position -> row of the extended arrays
    gt_x = np.concatenate((gt, np.full((2, 5, 4), 0.9)), 1)[:, order]
    labels_x = np.concatenate((labels, np.full((2, 5), -1)), 1)[:, order]
    valid_x = np.concatenate((valid, np.zeros((2, 5), bool)), 1)[:, order]
    padded = DETRLoss(3)(bx2, lg2, t(gt_x), t(labels_x), t(valid_x))
    for k in plain:
        assert torch.equal(plain[k], padded[k]), k
    plain["loss"].backward()
    padded["loss"].backward()
    assert torch.equal(lg1.grad, lg2.grad) and torch.equal(bx1.grad, bx2.grad)


# ------------------------------------------------------------------------ one solve a step
def test_every_layer_and_image_in_one_solve(monkeypatch):
    calls = []
    real = H._solve_all
    monkeypatch.setattr(H, "_solve_all", lambda cost, *a: calls.append(tuple(cost.shape)) or real(cost, *a))
    logits, boxes, gt, labels, valid = _random_case(6, 4, 10, [3, 0, 5, 2], 15, "ce")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    DETRLoss(3)(t(boxes), t(logits), t(gt), torch.from_numpy(labels), torch.from_numpy(valid))
    assert calls == [(24, 10, 5)]


def test_custom_solver():
    logits, boxes, gt, labels, valid = _random_case(2, 2, 6, [3, 4], 16, "ce")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    args = (t(boxes), t(logits), t(gt), torch.from_numpy(labels), torch.from_numpy(valid))
    seen = []

    def solver(cost):
        from scipy.optimize import linear_sum_assignment
        seen.append(cost.shape)
        return linear_sum_assignment(cost)

    a, b = DETRLoss(3, solver=solver)(*args), DETRLoss(3)(*args)
    assert len(seen) == 4 and all(torch.equal(a[k], b[k]) for k in b)


# --------------------------------------------------------------------------------- compile
def test_cost_and_set_loss_compile_separately_fullgraph(strategy):
    if strategy != "dense":
        pytest.skip("under torch.compile every strategy runs dense")
    logits, boxes, gt, labels, valid = _random_case(2, 2, 6, [3, 1], 17, "focal")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    lg, bx, g, lb, v = t(logits), t(boxes), t(gt), torch.from_numpy(labels), torch.from_numpy(valid)
    torch._dynamo.reset()
    cost_fn = torch.compile(H.matching_cost_unchecked, backend="aot_eager", fullgraph=True)
    rep = lambda x: x.unsqueeze(0).expand(2, *x.shape).flatten(0, 1)  # noqa: E731
    cost = cost_fn(lg.flatten(0, 1), bx.flatten(0, 1), rep(g), rep(lb), rep(v), class_cost="focal")
    q2g = H.match_hungarian_unchecked(cost, rep(v)).query_to_gt.view(2, 2, 6)
    loss_fn = torch.compile(D.detr_set_loss, backend="aot_eager", fullgraph=True)
    n = torch.tensor(4.0)
    lg1, lg2 = lg.clone().requires_grad_(), lg.clone().requires_grad_()
    got = loss_fn(bx, lg1, g, lb, q2g, n, class_loss="focal")
    ref = D.detr_set_loss(bx, lg2, g, lb, q2g, n, class_loss="focal")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    got[0].sum().backward()
    ref[0].sum().backward()
    torch.testing.assert_close(lg1.grad, lg2.grad)


# ------------------------------------------------------------------------------ DDP
def test_distributed_reduces_both_normalisers(monkeypatch):
    import torch.distributed as dist

    logits, boxes, gt, labels, valid = _random_case(2, 2, 6, [3, 2], 18, "ce")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    args = (t(boxes), t(logits), t(gt), t(labels), t(valid))
    local = DETRLoss(3)(*args)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda x, op=None: x.mul_(2))  # the other rank alike
    same = DETRLoss(3, distributed=True)(*args)
    for k in local:
        torch.testing.assert_close(same[k], local[k], rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(dist, "all_reduce", lambda x, op=None: None)  # the other rank: no objects, no queries
    half = DETRLoss(3, distributed=True)(*args)
    torch.testing.assert_close(half["loss"], 2 * local["loss"], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ bad input
def _args(**change):
    logits, boxes, gt, labels, valid = _random_case(2, 2, 5, [2, 3], 19, "ce")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    args = dict(box_pred=t(boxes), cls_logits=t(logits), gt_boxes=t(gt), gt_labels=torch.from_numpy(labels),
                gt_valid=torch.from_numpy(valid))
    return {**args, **change}


@pytest.mark.parametrize("change,error,match", [
    (lambda a: dict(cls_logits=a["cls_logits"][..., :3]), ValueError, r"cls_logits: expected shape \(L=2, B=2, Q=5, 4\)"),
    (lambda a: dict(cls_logits=a["cls_logits"][0]), ValueError, r"cls_logits: expected shape \(L=2, B=2, Q=5, 4\)"),
    (lambda a: dict(box_pred=a["box_pred"][..., :3]), ValueError, r"box_pred: expected shape \(L, B, Q, 4\)"),
    (lambda a: dict(box_pred=a["box_pred"][:, :, :4]), ValueError, r"cls_logits: expected shape \(L=2, B=2, Q=4, 4\)"),
    (lambda a: dict(gt_labels=a["gt_labels"].clamp(min=0) + 3), ValueError, r"gt_labels: expected values in \[0, 2\]"),
    (lambda a: dict(gt_boxes=a["gt_boxes"] * 640), ValueError, r"gt_boxes: expected normalised coordinates"),
    (lambda a: dict(gt_valid=a["gt_valid"][:1]), ValueError, r"gt_valid: expected shape \(B=2, M=3\)"),
    (lambda a: dict(gt_labels=a["gt_labels"].float()), TypeError, r"gt_labels: expected an integer tensor"),
])
def test_bad_input(change, error, match):
    args = _args()
    with pytest.raises(error, match=match):
        DETRLoss(3)(**{**args, **change(args)})


@pytest.mark.parametrize("kw,error,match", [
    (dict(num_classes=0), ValueError, r"num_classes: expected a positive integer"),
    (dict(class_loss="bce"), ValueError, r"class_loss: expected one of \('ce', 'focal'\)"),
    (dict(eos_coef=-0.1), ValueError, r"eos_coef: expected a number >= 0"),
    (dict(match_giou_weight=float("nan")), ValueError, r"match_giou_weight: expected a number >= 0"),
    (dict(solver=3), TypeError, r"solver: expected a callable"),
])
def test_bad_options(kw, error, match):
    with pytest.raises(error, match=match):
        DETRLoss(**{"num_classes": 3, **kw})


def test_exports():
    assert detloss.DETRLoss is DETRLoss and detloss.DETRAssignment is D.DETRAssignment
