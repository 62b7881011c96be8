"""Native ``detloss.RTDETRLoss`` and the real-time DETR terms: float64 oracles (hypothesis) of VFL,
MAL, IA-BCE, FGL and DDF, gradcheck, the one batched solve against per-layer / per-group /
per-image SciPy calls, DEIM's union matching, padding, non-finite predictions, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import detloss
from detloss import RTDETRLoss, detr_matching_cost
from detloss.detectors import rt_detr as R
from detloss.matching.detr_sets import union_matching
from detloss.functional import detr_terms as F
from detloss.matching import hungarian as H
from oracles import rt_detr as O


SETTINGS = settings(max_examples=30, deadline=None)


def _boxes(rng, *shape):
    centres = rng.uniform(0.15, 0.85, (*shape, 2))
    sizes = rng.uniform(0.05, 0.4, (*shape, 2))
    return np.concatenate((centres, sizes), -1)


# ----------------------------------------------------------------------- class terms
@SETTINGS
@given(kind=st.sampled_from(["vfl", "mal", "ia_bce"]), n=st.integers(1, 6), c=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.5, 3.0, 12.0]), mal_alpha=st.sampled_from([None, 0.6]))
def test_class_terms_match_float64_oracle(kind, n, c, seed, scale, mal_alpha):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, (n, c))
    label = rng.integers(-1, c, n)  # -1: unmatched query
    positive = (label[:, None] == np.arange(c)).astype(np.float64)
    iou = np.where(label >= 0, rng.uniform(0, 1, n), 0.0)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    if kind == "vfl":
        got = F.detr_varifocal_loss(t(logits), t(positive), t(iou), 0.7, 1.5)
        want = O.class_terms("vfl", logits, positive, iou, alpha=0.7, gamma=1.5)
    elif kind == "mal":
        got = F.matchability_aware_loss(t(logits), t(positive), t(iou), 1.5, mal_alpha)
        want = O.class_terms("mal", logits, positive, iou, gamma=1.5, mal_alpha=mal_alpha)
    else:
        got = F.iou_aware_bce_loss(t(logits), t(positive), t(iou), 0.25, 2.0)
        want = O.class_terms("ia_bce", logits, positive, iou, alpha=0.25, gamma=2.0)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["vfl", "mal", "ia_bce"])
def test_class_terms_gradient_matches_closed_form(kind):
    """The originals detach the focal weight and the positive quality; the gradient is then
    ``w (p - t)`` (VFL, MAL), ``p - q`` on IA-BCE positives and ``p^g (p - g (1 - p) log(1 - p))``
    on its negatives (the gradient flows through ``p^g``)."""
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(0, 2, (4, 3))).requires_grad_()
    positive = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.float64)
    iou = torch.tensor([0.7, 0.2, 0.0, 0.9], dtype=torch.float64)
    fn = {"vfl": F.detr_varifocal_loss, "mal": F.matchability_aware_loss, "ia_bce": F.iou_aware_bce_loss}[kind]
    fn(logits, positive, iou, reduction="sum").backward()
    x, pos, q = logits.detach().numpy(), positive.numpy(), iou.numpy()[:, None]
    p = 1 / (1 + np.exp(-x))
    if kind == "vfl":
        t = q * pos
        want = (0.75 * p**2 * (1 - pos) + t) * (p - t)
    elif kind == "mal":
        t = (q * pos) ** 2
        want = (p**2 * (1 - pos) + pos) * (p - t)
    else:
        quality = np.maximum(p**0.25 * q**0.75, 0.01)
        want = np.where(pos > 0, p - quality, p**2 * (p - 2 * (1 - p) * np.log1p(-p)))
    np.testing.assert_allclose(logits.grad.numpy(), want, rtol=1e-9, atol=1e-12)


def test_class_terms_finite_at_huge_logits():
    logits = torch.tensor([[1e4, -1e4]], requires_grad=True)
    positive, iou = torch.tensor([[1.0, 0.0]]), torch.tensor([0.5])
    for fn in (F.detr_varifocal_loss, F.matchability_aware_loss, F.iou_aware_bce_loss):
        loss = fn(logits, positive, iou, reduction="sum")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        logits.grad = None


# ------------------------------------------------------------------ FGL and DDF
@pytest.mark.parametrize("bins, up, reg_scale", [(32, 0.5, 4.0), (16, 0.5, 8.0), (8, 1.0, 2.0)])
def test_weighting_function_matches_oracle(bins, up, reg_scale):
    got = F.weighting_function(bins, up, reg_scale).double().numpy()
    np.testing.assert_allclose(got, O.weighting_function(bins, up, reg_scale), rtol=1e-6, atol=1e-6)
    assert got.shape == (bins + 1,) and np.all(np.diff(got) > 0)


@SETTINGS
@given(n=st.integers(1, 5), bins=st.sampled_from([8, 32]), seed=st.integers(0, 2**31 - 1),
       spread=st.sampled_from([0.3, 3.0]))
def test_fgl_and_ddf_match_oracle(n, bins, seed, spread):
    rng = np.random.default_rng(seed)
    corners = rng.normal(0, 2, (n, 4, bins + 1))
    teacher = rng.normal(0, 2, (n, 4, bins + 1))
    ref = _boxes(rng, n)
    target = ref.copy()
    target[:, :2] += rng.normal(0, 0.05 * spread, (n, 2))  # spread 3: edges beyond the last bin
    target[:, 2:] *= rng.uniform(0.5, 1.0 + spread, (n, 2))
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    grid = F.weighting_function(bins, 0.5, 4.0).double().numpy()
    got = F.fine_grained_localization_loss(t(corners), t(ref), t(target), max_num_bins=bins, up=0.5, reg_scale=4.0)
    np.testing.assert_allclose(got.numpy(), O.fgl(corners, ref, target, grid, 4.0), rtol=1e-7, atol=1e-9)
    got = F.decoupled_distillation_loss(t(corners), t(teacher), 5.0)
    np.testing.assert_allclose(got.numpy(), O.ddf(corners, teacher, 5.0), rtol=1e-9, atol=1e-12)


def test_fgl_and_ddf_gradcheck():
    rng = np.random.default_rng(5)
    corners = torch.from_numpy(rng.normal(0, 1, (3, 4, 9))).requires_grad_()
    teacher = torch.from_numpy(rng.normal(0, 1, (3, 4, 9)))
    ref, target = torch.from_numpy(_boxes(rng, 3)), torch.from_numpy(_boxes(rng, 3))
    assert torch.autograd.gradcheck(
        lambda c: F.fine_grained_localization_loss(c, ref, target, max_num_bins=8, up=0.5, reg_scale=4.0), (corners,))
    assert torch.autograd.gradcheck(lambda c: F.decoupled_distillation_loss(c, teacher, 5.0), (corners,))


# ------------------------------------------------- the one batched solve (property)
@SETTINGS
@given(layers=st.integers(1, 3), groups=st.integers(1, 3), per_group=st.integers(1, 5),
       counts=st.lists(st.integers(0, 7), min_size=1, max_size=3), padding=st.integers(0, 2),
       enc_per_group=st.sampled_from([None, 2, 4]), seed=st.integers(0, 2**31 - 1))
def test_one_solve_equals_per_layer_group_image_scipy(layers, groups, per_group, counts, padding, enc_per_group, seed):
    rng = np.random.default_rng(seed)
    batch, q, c = len(counts), groups * per_group, 3
    m = max(counts) + padding
    boxes = torch.from_numpy(_boxes(rng, layers, batch, q)).float()
    logits = torch.from_numpy(rng.normal(0, 2, (layers, batch, q, c))).float()
    gt = torch.from_numpy(_boxes(rng, batch, m)).float()
    labels = torch.from_numpy(rng.integers(0, c, (batch, m)))
    valid = torch.arange(m)[None] < torch.tensor(counts)[:, None]
    gt = torch.where(valid[..., None], gt, 0.0)  # padding rows: zeros
    kw = {}
    if enc_per_group is not None:
        kw = dict(enc_box_pred=torch.from_numpy(_boxes(rng, batch, groups * enc_per_group)).float(),
                  enc_cls_logits=torch.from_numpy(rng.normal(0, 2, (batch, groups * enc_per_group, c))).float())
    loss_fn = RTDETRLoss(c, num_groups=groups)
    calls = []
    real = H._solve_all
    H._solve_all, saved = (lambda cost, *a: calls.append(1) or real(cost, *a)), H._solve_all
    try:
        out = loss_fn(boxes, logits, gt, labels, valid, return_assignment=True, **kw)
    finally:
        H._solve_all = saved
    assert len(calls) == 1

    def expected(set_boxes, set_logits, qg):  # (B, Q, ...) one set -> (B, Q) by per-problem SciPy
        want = np.full((batch, set_boxes.shape[1]), -1)
        for b, n in enumerate(counts):
            for g in range(groups):
                rows = slice(g * qg, (g + 1) * qg)
                cost = detr_matching_cost(set_logits[b:b + 1, rows], set_boxes[b:b + 1, rows], gt[b:b + 1, :n],
                                          labels[b:b + 1, :n], valid[b:b + 1, :n], class_cost="focal", cls_weight=2.0)
                r, col = linear_sum_assignment(cost[0].numpy())
                want[b, g * qg + r] = col
        return want

    a = out["assignment"]
    for layer in range(layers):
        np.testing.assert_array_equal(a.query_to_gt[layer].numpy(), expected(boxes[layer], logits[layer], per_group))
    if enc_per_group is not None:
        np.testing.assert_array_equal(a.enc_query_to_gt.numpy(), expected(kw["enc_box_pred"], kw["enc_cls_logits"], enc_per_group))
    # every object is matched once per group while a group has queries left
    for layer in range(layers):
        for b, n in enumerate(counts):
            matched = a.query_to_gt[layer, b][a.query_to_gt[layer, b] >= 0]
            assert matched.numel() == groups * min(n, per_group)
    assert a.num_boxes.item() == max(1, sum(counts) * groups)


@SETTINGS
@given(layers=st.integers(1, 4), batch=st.integers(1, 3), q=st.integers(1, 6), m=st.integers(0, 4),
       seed=st.integers(0, 2**31 - 1))
def test_union_matching_equals_deim_rule(layers, batch, q, m, seed):
    rng = np.random.default_rng(seed)
    q2g = rng.integers(-1, m, (layers, batch, q)) if m else np.full((layers, batch, q), -1)
    got = union_matching(torch.from_numpy(q2g), None, m)
    np.testing.assert_array_equal(got.numpy(), O.union_matching(q2g))


# -------------------------------------------------------------------- the module
def _case(seed=0, counts=(3, 0), q=8, layers=3, c=4, corners=False, dn=False, enc=True):
    rng = np.random.default_rng(seed)
    batch, m = len(counts), max(counts, default=0)
    t = lambda a: torch.from_numpy(np.asarray(a)).float()  # noqa: E731
    gt = t(_boxes(rng, batch, m))
    valid = torch.arange(m)[None] < torch.tensor(counts)[:, None]
    args = [t(_boxes(rng, layers, batch, q)), t(rng.normal(0, 1, (layers, batch, q, c))),
            torch.where(valid[..., None], gt, 0.0), torch.from_numpy(rng.integers(0, c, (batch, m))), valid]
    kw: dict = {}
    if enc:
        kw.update(enc_box_pred=t(_boxes(rng, batch, q)), enc_cls_logits=t(rng.normal(0, 1, (batch, q, c))))
    if corners:
        kw.update(pred_corners=t(rng.normal(0, 1, (layers, batch, q, 4 * 33))), ref_points=t(_boxes(rng, layers, batch, q)))
    if dn:
        d = 2 * 2 * max(m, 1)
        q2g = torch.full((batch, d), -1, dtype=torch.int64)
        for b, n in enumerate(counts):
            for g in range(2):
                q2g[b, g * 2 * max(m, 1): g * 2 * max(m, 1) + n] = torch.arange(n)
        kw.update(dn_box_pred=t(_boxes(rng, layers, batch, d)), dn_cls_logits=t(rng.normal(0, 1, (layers, batch, d, c))),
                  dn_query_to_gt=q2g, dn_groups=2)
        if corners:
            kw.update(dn_pred_corners=t(rng.normal(0, 1, (layers, batch, d, 4 * 33))),
                      dn_ref_points=t(_boxes(rng, layers, batch, d)))
    return args, kw


@pytest.mark.parametrize("options", [dict(), dict(class_loss="mal", dense_one_to_one=True), dict(class_loss="ia_bce", num_groups=2),
                                     dict(class_loss="focal"), dict(class_loss="ce", match_class_cost="softmax")])
def test_padding_does_not_change_loss_or_gradients(options):
    args, kw = _case(corners=options.get("class_loss") == "mal", dn=True)
    if options.get("class_loss") == "ce":
        args[1] = torch.cat((args[1], args[1][..., :1]), -1)
        kw.update(enc_cls_logits=torch.cat((kw["enc_cls_logits"], kw["enc_cls_logits"][..., :1]), -1),
                  dn_cls_logits=torch.cat((kw["dn_cls_logits"], kw["dn_cls_logits"][..., :1]), -1))
    loss_fn = RTDETRLoss(4, **options)
    leaves = [args[0].clone().requires_grad_(), args[1].clone().requires_grad_()]
    out = loss_fn(*leaves, *args[2:], **kw)
    out["loss"].backward()
    pad = lambda x, v: torch.cat((x, torch.full((x.shape[0], 2, *x.shape[2:]), v, dtype=x.dtype)), 1)  # noqa: E731
    leaves2 = [args[0].clone().requires_grad_(), args[1].clone().requires_grad_()]
    out2 = loss_fn(*leaves2, pad(args[2], 0.5), pad(args[3], 1), pad(args[4], False), **kw)
    out2["loss"].backward()
    assert set(out) == set(out2)
    for k in out:
        torch.testing.assert_close(out2[k], out[k])
    for a, b in zip(leaves, leaves2):
        torch.testing.assert_close(b.grad, a.grad)


def test_keys_dn_normaliser_and_teacher_layer():
    args, kw = _case(corners=True, dn=True)
    out = RTDETRLoss(4)(*args, **kw)
    for suffix in ("", "_0", "_1", "_enc", "_dn_0", "_dn_1", "_dn_2"):
        assert {f"loss_cls{suffix}", f"loss_l1{suffix}", f"loss_giou{suffix}"} <= set(out)
    assert out["loss_ddf"].item() == 0 and out["loss_ddf_dn_2"].item() == 0  # the teachers
    assert out["loss_ddf_0"].item() > 0 and out["loss_fgl"].item() > 0
    kw1 = dict(kw, dn_groups=1)
    out1 = RTDETRLoss(4)(*args, **kw1)
    torch.testing.assert_close(out["loss_l1_dn_0"] * 2, out1["loss_l1_dn_0"])  # N x dn groups


def test_non_finite_predictions_never_raise():
    args, kw = _case(corners=True, dn=True)
    args[0] = args[0].clone()
    args[0][1, 0, 2] = float("nan")
    args[1] = args[1].clone()
    args[1][2, 0, 3, 1] = float("inf")
    kw["enc_cls_logits"] = kw["enc_cls_logits"].clone()
    kw["enc_cls_logits"][0, 0, 0] = float("-inf")
    out = RTDETRLoss(4, class_loss="mal", dense_one_to_one=True)(*args, **kw, return_assignment=True)
    assert not torch.isfinite(out["loss"])
    assert (out["assignment"].query_to_gt[:, 0] >= 0).sum(-1).tolist() == [3, 3, 3]  # every object still matched


def test_empty_batch_is_normal_input():
    args, kw = _case(counts=(0, 0), corners=True, dn=True)
    out = RTDETRLoss(4, class_loss="mal", dense_one_to_one=True)(*args, **kw)
    assert torch.isfinite(out["loss"]) and out["loss_l1"].item() == 0 and out["loss_fgl_0"].item() == 0


@pytest.mark.parametrize("change, match", [
    (lambda a, k: (a[:3] + [a[3] + 10] + a[4:], k), r"gt_labels: expected values in \[0, 3\]"),
    (lambda a, k: (a[:2] + [a[2] * 640] + a[3:], k), r"gt_boxes: expected normalised coordinates"),
    (lambda a, k: ([a[0][..., :3]] + a[1:], k), r"box_pred: expected shape \(L, B, Q, 4\)"),
    (lambda a, k: ([a[0], a[1][0]] + a[2:], k), r"cls_logits: expected shape \(L=3, B=2, Q=8, 4\)"),
    (lambda a, k: (a, dict(k, dn_query_to_gt=k["dn_query_to_gt"][:, :-1])), r"dn_query_to_gt: expected shape \(B=2, D=12\)"),
    (lambda a, k: (a, dict(k, dn_query_to_gt=k["dn_query_to_gt"] + 5)), r"dn_query_to_gt: expected values in \[-1, 2\]"),
    (lambda a, k: (a, dict(k, enc_cls_logits=None)), r"enc_box_pred, enc_cls_logits: expected both or neither"),
    (lambda a, k: (a, dict(k, ref_points=None)), r"ref_points: expected"),
])
def test_bad_input_raises_clear_value_error(change, match):
    args, kw = _case(corners=True, dn=True)
    args, kw = change(list(args), dict(kw))
    with pytest.raises(ValueError, match=match):
        RTDETRLoss(4)(*args, **kw)


def test_bad_options():
    with pytest.raises(ValueError, match="class_loss: expected one of"):
        RTDETRLoss(3, class_loss="bce")
    with pytest.raises(ValueError, match='match_class_cost: expected "softmax" with class_loss="ce"'):
        RTDETRLoss(3, class_loss="ce")
    with pytest.raises(ValueError, match="num_groups: expected a positive integer"):
        RTDETRLoss(3, num_groups=0)
    args, _ = _case(q=9, enc=False)
    with pytest.raises(ValueError, match="divisible by num_groups=2"):
        RTDETRLoss(4, num_groups=2)(*args)


def test_exported():
    assert detloss.RTDETRLoss is RTDETRLoss and detloss.RTDETRAssignment is R.RTDETRAssignment
    for name in ("detr_varifocal_loss", "matchability_aware_loss", "iou_aware_bce_loss", "weighting_function",
                 "fine_grained_localization_loss", "decoupled_distillation_loss"):
        assert getattr(detloss.functional, name) is getattr(F, name)
