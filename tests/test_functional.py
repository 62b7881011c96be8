"""Element-wise losses: oracle values, gradcheck, reductions/weights, large logits, half inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from detloss.functional import (
    binary_cross_entropy_with_logits,
    cross_entropy,
    dice_loss,
    iou_loss,
    l1_loss,
    positive_normalizer,
    sigmoid_focal_loss,
    smooth_l1_loss,
    smooth_l1_sum,
    softmax_focal_loss,
    weighted_reduce,
)
from detloss.boxes import DEFAULT_EPS, IOU_KINDS, aligned_box_iou
from oracles import foundation as O

TOL = dict(rtol=1e-9, atol=1e-9)


def t64(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64)


logit_lists = st.lists(st.floats(-30, 30), min_size=0, max_size=12)


@st.composite
def logits_and_targets(draw, soft=True):
    x = draw(st.lists(st.floats(-30, 30), min_size=0, max_size=12))
    t = st.floats(0, 1) if soft else st.sampled_from([0.0, 1.0])
    return np.array(x, dtype=np.float64), np.array([draw(t) for _ in x], dtype=np.float64)


# ----------------------------------------------------------------------------- values vs oracle


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), max_size=12), st.one_of(st.just(0.0), st.floats(1e-3, 3.0)))
def test_smooth_l1_equals_oracle(pairs, beta):
    x = t64([p[0] for p in pairs]).reshape(-1)
    y = t64([p[1] for p in pairs]).reshape(-1)
    want = O.smooth_l1(x.numpy() - y.numpy(), beta) if beta > 0 else np.abs(x.numpy() - y.numpy())
    torch.testing.assert_close(smooth_l1_loss(x, y, beta, reduction="none"), t64(want).reshape(-1), **TOL)
    torch.testing.assert_close(smooth_l1_loss(x, y, beta, reduction="sum"), t64(want.sum()), **TOL)
    if beta == 0:
        torch.testing.assert_close(l1_loss(x, y, reduction="none"), t64(want).reshape(-1), **TOL)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-3, 3), max_size=12), st.floats(0.5, 5.0))
def test_smooth_l1_sigma_form_equals_beta_form(diffs, sigma):
    x = t64(diffs).reshape(-1)
    y = torch.zeros_like(x)
    a = smooth_l1_loss(x, y, sigma=sigma, reduction="none")
    b = smooth_l1_loss(x, y, 1.0 / sigma**2, reduction="none")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Faster R-CNN's own form: 0.5 * sigma^2 * x^2 if |x| < 1 / sigma^2 else |x| - 0.5 / sigma^2
    s2 = sigma**2
    want = [0.5 * s2 * d * d if abs(d) < 1 / s2 else abs(d) - 0.5 / s2 for d in diffs]
    torch.testing.assert_close(a, t64(want).reshape(-1), **TOL)


@settings(max_examples=200, deadline=None)
@given(logits_and_targets())
def test_bce_equals_oracle(data):
    x, t = data
    got = binary_cross_entropy_with_logits(t64(x), t64(t), reduction="none")
    torch.testing.assert_close(got, t64(O.bce_with_logits(x, t)), **TOL)


@settings(max_examples=200, deadline=None)
@given(logits_and_targets(), st.sampled_from([-1.0, 0.25, 0.5, 1.0]), st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]))
def test_sigmoid_focal_equals_oracle(data, alpha, gamma):
    x, t = data
    got = sigmoid_focal_loss(t64(x), t64(t), alpha, gamma, reduction="none")
    torch.testing.assert_close(got, t64(O.sigmoid_focal(x, t, alpha, gamma)), **TOL)


@settings(max_examples=200, deadline=None)
@given(logits_and_targets(soft=False), st.sampled_from([0.25, 0.75]), st.sampled_from([0.5, 1.0, 2.0]))
def test_focal_over_bce_is_modulating_factor(data, alpha, gamma):
    # the paper's form for 0/1 targets: FL / CE = alpha_t * (1 - p_t)^gamma, element-wise
    x, t = data
    x = x.clip(-15, 15)  # keep CE away from 0 so the ratio is defined
    fl = sigmoid_focal_loss(t64(x), t64(t), alpha, gamma, reduction="none")
    ce = binary_cross_entropy_with_logits(t64(x), t64(t), reduction="none")
    p = torch.sigmoid(t64(x))
    p_t = torch.where(t64(t) == 1, p, 1 - p)
    alpha_t = torch.where(t64(t) == 1, torch.tensor(alpha, dtype=torch.float64), torch.tensor(1 - alpha, dtype=torch.float64))
    torch.testing.assert_close(fl / ce, alpha_t * (1 - p_t) ** gamma, rtol=1e-9, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(logits_and_targets())
def test_focal_alpha_minus_one_gamma_zero_is_bce_values_and_grads(data):
    x, t = data
    xa = t64(x).requires_grad_()
    xb = t64(x).requires_grad_()
    fl = sigmoid_focal_loss(xa, t64(t), alpha=-1, gamma=0, reduction="sum")
    ce = binary_cross_entropy_with_logits(xb, t64(t), reduction="sum")
    torch.testing.assert_close(fl, ce, rtol=0, atol=0)
    if x.size:
        torch.testing.assert_close(torch.autograd.grad(fl, xa)[0], torch.autograd.grad(ce, xb)[0], rtol=0, atol=0)


@st.composite
def class_problems(draw):
    n = draw(st.integers(0, 8))
    c = draw(st.integers(1, 6))
    logits = np.array([[draw(st.floats(-30, 30)) for _ in range(c)] for _ in range(n)]).reshape(n, c)
    target = np.array([draw(st.one_of(st.integers(0, c - 1), st.just(-100))) for _ in range(n)], dtype=np.int64)
    return logits, target


@settings(max_examples=200, deadline=None)
@given(class_problems())
def test_cross_entropy_equals_oracle_with_ignore_index(data):
    logits, target = data
    keep = target != -100
    per = np.zeros(len(target))
    if keep.any():
        per[keep] = O.softmax_ce(logits[keep], target[keep])
    t = torch.from_numpy(target)
    torch.testing.assert_close(cross_entropy(t64(logits), t, reduction="none"), t64(per), **TOL)
    torch.testing.assert_close(cross_entropy(t64(logits), t, reduction="sum"), t64(per.sum()), **TOL)
    mean = per.sum() / keep.sum() if keep.any() else 0.0
    torch.testing.assert_close(cross_entropy(t64(logits), t, reduction="mean"), t64(mean), **TOL)


@settings(max_examples=200, deadline=None)
@given(class_problems(), st.sampled_from([0.0, 1.0, 2.0]), st.booleans())
def test_softmax_focal_equals_oracle(data, gamma, with_alpha):
    logits, target = data
    c = logits.shape[1]
    alpha = [0.1 + 0.2 * k for k in range(c)] if with_alpha else None
    keep = target != -100
    per = np.zeros(len(target))
    if keep.any():
        per[keep] = O.softmax_focal(logits[keep], target[keep], gamma, alpha)
    got = softmax_focal_loss(
        t64(logits), torch.from_numpy(target), gamma, alpha=None if alpha is None else t64(alpha), reduction="none"
    )
    torch.testing.assert_close(got, t64(per), rtol=1e-9, atol=1e-9)
    if gamma == 0 and not with_alpha:
        torch.testing.assert_close(
            softmax_focal_loss(t64(logits), torch.from_numpy(target), 0.0), cross_entropy(t64(logits), torch.from_numpy(target))
        )


# ----------------------------------------------------------------------------- gradcheck (float64)


def _rand(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _generic_boxes(n, seed):
    r = _rand((n, 4), seed)
    xy = r[:, :2] * 4
    return torch.cat([xy, xy + 0.5 + r[:, 2:] * 3], -1)


@pytest.mark.parametrize("kind", ["iou", "giou", "diou"])
@pytest.mark.parametrize("fmt", ["xyxy", "cxcywh"])
def test_iou_loss_gradcheck(kind, fmt):
    a = _generic_boxes(6, 1)
    b = _generic_boxes(6, 2)
    # pairs with partial overlap and disjoint pairs (GIoU/DIoU penalty active)
    b[3:] += 5.0
    if fmt == "cxcywh":
        from detloss import xyxy_to_cxcywh

        a, b = xyxy_to_cxcywh(a), xyxy_to_cxcywh(b)
    a.requires_grad_()
    b.requires_grad_()
    assert gradcheck(lambda p, q: iou_loss(p, q, kind, fmt=fmt, reduction="none"), (a, b))


def _frozen_alpha_ciou(a, b, alpha):
    """CIoU with ``alpha`` held constant: the function whose gradient CIoU documents."""
    eps = DEFAULT_EPS
    wa, ha = (a[..., 2] - a[..., 0]), (a[..., 3] - a[..., 1])
    wb, hb = (b[..., 2] - b[..., 0]), (b[..., 3] - b[..., 1])
    v = 4 / math.pi**2 * (torch.atan(wb / (hb + eps)) - torch.atan(wa / (ha + eps))) ** 2
    return aligned_box_iou(a, b, "diou") - alpha * v


def test_ciou_gradient_is_the_frozen_alpha_gradient_and_gradchecks():
    a = _generic_boxes(6, 3).requires_grad_()
    b = _generic_boxes(6, 4)
    b[3:] += 5.0
    b.requires_grad_()
    with torch.no_grad():
        iou = aligned_box_iou(a, b)
        wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        wb, hb = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        v = 4 / math.pi**2 * (torch.atan(wb / (hb + DEFAULT_EPS)) - torch.atan(wa / (ha + DEFAULT_EPS))) ** 2
        alpha = v / (1 - iou + v)
    assert bool((v > 1e-5).all())  # the aspect term is active in every pair
    ciou = aligned_box_iou(a, b, "ciou")
    frozen = _frozen_alpha_ciou(a, b, alpha)
    torch.testing.assert_close(ciou, frozen, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(ciou.sum(), (a, b))
    g2 = torch.autograd.grad(frozen.sum(), (a, b))
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert gradcheck(lambda p, q: _frozen_alpha_ciou(p, q, alpha), (a, b))
    # and the CIoU loss itself is consistent with it
    loss_grad = torch.autograd.grad(iou_loss(a, b, "ciou", reduction="sum"), a)[0]
    torch.testing.assert_close(loss_grad, -g1[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sigma", [None, 1.0, 3.0])
@pytest.mark.parametrize("side", [-1, 1])
def test_smooth_l1_gradcheck_around_the_kink(sigma, side):
    beta = 1.0 if sigma is None else 1.0 / sigma**2
    # |x| just below and just above beta (both signs of x), never exactly at the kink
    offsets = torch.tensor([1e-3, 1e-2, 0.3], dtype=torch.float64) * side
    x = torch.cat([beta + offsets * beta, -(beta + offsets * beta)]).requires_grad_()
    y = torch.zeros_like(x)
    fn = lambda inp: smooth_l1_loss(inp, y, sigma=sigma, reduction="none") if sigma else smooth_l1_loss(inp, y, reduction="none")
    assert gradcheck(fn, (x,))
    # the slope is |x| / beta inside, 1 outside: continuous at the kink
    g = torch.autograd.grad(fn(x).sum(), x)[0]
    want = torch.where(x.abs() < beta, x / beta, x.sign())
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5), st.sampled_from([0.0, 0.5, 1.0, 2.0])), min_size=1, max_size=12),
    st.sampled_from([0.0, 1.0 / 9, 0.1, 1.0]),
)
def test_smooth_l1_sum_is_the_weighted_sum_with_its_gradient(rows, beta):
    """smooth_l1_sum = smooth_l1_loss(reduction="sum") with the same weight: the value bit for
    bit, the gradients of input and target to rounding, the kink on the linear branch."""
    x, y, w = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    x, y = x.requires_grad_(), y.requires_grad_()
    got, want = smooth_l1_sum(x, y, beta, w), smooth_l1_loss(x, y, beta, weight=w, reduction="sum")
    assert torch.equal(got, want)
    for a, b in zip(torch.autograd.grad(2.5 * got, (x, y)), torch.autograd.grad(2.5 * want, (x, y))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_smooth_l1_sum_keeps_one_tensor_and_drops_zero_weights_exactly():
    x = torch.tensor([0.05, -2.0, float("inf"), 0.3], requires_grad=True)
    weight = torch.tensor([1.0, 2.0, 0.0, 1.0])
    total = smooth_l1_sum(x, torch.zeros(4), 0.1, weight)
    assert len(total.grad_fn.saved_tensors) == 1  # the weighted slope, nothing else
    total.backward()
    torch.testing.assert_close(total, torch.tensor(0.0125 + 2 * 1.95 + 0.25))  # the inf has weight 0
    torch.testing.assert_close(x.grad, torch.tensor([0.5, -2.0, 0.0, 1.0]))
    half = torch.tensor([0.05, -2.0], dtype=torch.float16, requires_grad=True)
    smooth_l1_sum(half, torch.zeros(2), 0.1, torch.ones(2)).backward()
    assert half.grad.dtype == torch.float16
    torch.testing.assert_close(half.grad, torch.tensor([0.5, -1.0], dtype=torch.float16), rtol=1e-3, atol=1e-3)


def test_smooth_l1_sum_gradcheck():
    x = torch.tensor([0.02, -0.07, 0.5, -3.0, 0.2], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.0, 0.01, 0.1, 0.0, -0.3], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    for beta in (0.0, 0.1, 1.0):
        assert gradcheck(lambda a, b: smooth_l1_sum(a, b, beta, w), (x, y))


def test_classification_gradchecks():
    x = (_rand(10, 5) - 0.5) * 8
    t = _rand(10, 6)
    x.requires_grad_()
    assert gradcheck(lambda z: binary_cross_entropy_with_logits(z, t, reduction="none"), (x,))
    assert gradcheck(lambda z: sigmoid_focal_loss(z, t, 0.25, 2.0, reduction="none"), (x,))
    assert gradcheck(lambda z: sigmoid_focal_loss(z, (t > 0.5).double(), 0.25, 2.0, reduction="none"), (x,))
    logits = ((_rand((6, 4), 7) - 0.5) * 6).requires_grad_()
    target = torch.tensor([0, 3, -100, 1, 2, 2])
    assert gradcheck(lambda z: cross_entropy(z, target, reduction="none"), (logits,))
    assert gradcheck(lambda z: cross_entropy(z, target, reduction="mean"), (logits,))
    assert gradcheck(lambda z: softmax_focal_loss(z, target, 2.0, reduction="none"), (logits,))


def test_bce_gradients_in_targets_and_second_order():
    # the fused backward covers soft targets that require grad and double backward (gradient
    # penalties); its d/dx must equal the oracle sigmoid(x) - t, with x = 0 included
    x = torch.cat([(_rand(9, 5) - 0.5) * 8, torch.zeros(1, dtype=torch.float64)]).requires_grad_()
    t = _rand(10, 6).requires_grad_()
    assert gradcheck(lambda z, y: binary_cross_entropy_with_logits(z, y, reduction="none"), (x, t))
    assert torch.autograd.gradgradcheck(lambda z, y: binary_cross_entropy_with_logits(z, y, reduction="sum"), (x, t))
    (g,) = torch.autograd.grad(binary_cross_entropy_with_logits(x, t.detach(), reduction="sum"), x)
    torch.testing.assert_close(g, torch.sigmoid(x.detach()) - t.detach(), rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- large logits / half inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_logits_are_finite(dtype):
    x = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=torch.float32).to(dtype).requires_grad_()
    t = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=dtype)
    for loss_fn in (
        lambda: binary_cross_entropy_with_logits(x, t, reduction="none"),
        lambda: sigmoid_focal_loss(x, t, reduction="none"),
        lambda: sigmoid_focal_loss(x, t, alpha=-1, gamma=0.5, reduction="none"),
    ):
        value = loss_fn()
        assert value.dtype == torch.float32
        (g,) = torch.autograd.grad(value.sum(), x)
        assert bool(torch.isfinite(value).all()) and bool(torch.isfinite(g).all())
    # a confidently wrong logit costs |x|: exact float32 value from the oracle
    want = O.bce_with_logits(x.detach().double().numpy(), t.double().numpy())
    torch.testing.assert_close(binary_cross_entropy_with_logits(x, t, reduction="none").double(), t64(want), rtol=1e-6, atol=1e-6)
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype=torch.float32).to(dtype).requires_grad_()
    target = torch.tensor([1, 0])
    for value in (
        cross_entropy(logits, target, reduction="none"),
        softmax_focal_loss(logits, target, reduction="none"),
        softmax_focal_loss(logits, target, 0.5, reduction="none"),
    ):
        assert value.dtype == torch.float32
        (g,) = torch.autograd.grad(value.sum(), logits)
        assert bool(torch.isfinite(value).all()) and bool(torch.isfinite(g).all())
    want = O.softmax_ce(logits.detach().double().numpy(), target.numpy())
    torch.testing.assert_close(cross_entropy(logits, target, reduction="none").double(), t64(want), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("kind", IOU_KINDS)
def test_iou_loss_half_inputs(kind):
    a = _generic_boxes(5, 11).half().requires_grad_()
    b = _generic_boxes(5, 12).half()
    value = iou_loss(a, b, kind)
    assert value.dtype == torch.float32
    (g,) = torch.autograd.grad(value, a)
    assert g.dtype == torch.float16 and bool(torch.isfinite(g).all())
    torch.testing.assert_close(value.double(), iou_loss(a.detach().double(), b.double(), kind), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- reductions, weights, normaliser

ALL_LOSSES = {
    "smooth_l1": lambda x, w=None, **kw: smooth_l1_loss(x, torch.zeros_like(x), weight=w, **kw),
    "l1": lambda x, w=None, **kw: l1_loss(x, torch.zeros_like(x), weight=w, **kw),
    "bce": lambda x, w=None, **kw: binary_cross_entropy_with_logits(x, (x > 0).to(x.dtype), weight=w, **kw),
    "sigmoid_focal": lambda x, w=None, **kw: sigmoid_focal_loss(x, (x > 0.3).to(x.dtype), weight=w, **kw),
    "cross_entropy": lambda x, w=None, **kw: cross_entropy(torch.stack([x, -x], -1), (x > 0).long(), weight=w, **kw),
    "softmax_focal": lambda x, w=None, **kw: softmax_focal_loss(torch.stack([x, -x], -1), (x > 0).long(), weight=w, **kw),
    "iou": lambda x, w=None, **kw: iou_loss(
        torch.stack([x, x, x + 2, x + 1], -1), torch.stack([x * 0, x * 0, x * 0 + 1, x * 0 + 1], -1), weight=w, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_reductions_and_weights(name):
    fn = ALL_LOSSES[name]
    x = (_rand(7, 21) - 0.5) * 4
    w = _rand(7, 22)
    w[2] = 0.0
    none = fn(x, reduction="none")
    assert none.shape == (7,)
    torch.testing.assert_close(fn(x, reduction="sum"), none.sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fn(x, reduction="mean"), none.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fn(x, w, reduction="none"), none * w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fn(x, w, reduction="sum"), (none * w).sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fn(x, w, reduction="mean"), (none * w).sum() / w.sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fn(x, w, reduction="sum", normalizer=2.5), (none * w).sum() / 2.5, rtol=1e-12, atol=1e-12)
    norm = positive_normalizer(torch.tensor(3))
    torch.testing.assert_close(fn(x, reduction="sum", normalizer=norm).float(), (none.sum() / 3).float())


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_empty_input_reduces_to_zero(name, dtype):
    x = torch.zeros(0, dtype=dtype, requires_grad=True)
    for reduction in ("sum", "mean"):
        value = ALL_LOSSES[name](x, reduction=reduction)
        assert value.shape == () and float(value.detach()) == 0.0 and not torch.isnan(value)
        (g,) = torch.autograd.grad(value, x, allow_unused=True) if value.requires_grad else (None,)
        assert g is None or g.shape == (0,)
    assert ALL_LOSSES[name](x, reduction="none").shape == (0,)
    # all-zero weights: 0 as well, not NaN
    value = ALL_LOSSES[name](torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype), reduction="mean")
    assert float(value) == 0.0


def test_zero_weight_removes_inf_exactly():
    loss = torch.tensor([1.0, float("inf"), 2.0])
    w = torch.tensor([1.0, 0.0, 3.0])
    assert float(weighted_reduce(loss, w, "sum")) == 7.0
    assert float(weighted_reduce(loss, w, "mean")) == 7.0 / 4.0
    assert weighted_reduce(loss.half(), w, "sum").dtype == torch.float32
    assert weighted_reduce(loss.double(), None, "sum").dtype == torch.float64


def test_positive_normalizer():
    for count, want in [(0, 1.0), (0.25, 1.0), (1, 1.0), (7, 7.0)]:
        out = positive_normalizer(torch.tensor(count))
        assert out.dtype == torch.float32 and out.shape == () and float(out) == want
    out = positive_normalizer(torch.tensor([[True, False], [True, True]]))
    assert out.dtype == torch.float32 and float(out) == 3.0
    assert positive_normalizer(torch.tensor([2.0, 3.0], dtype=torch.float64)).dtype == torch.float64
    assert float(positive_normalizer(torch.tensor(0), min_value=0.5)) == 0.5
    assert float(positive_normalizer(torch.tensor(3), distributed=True)) == 3.0  # no process group: local
    x = torch.tensor(4.0, requires_grad=True)
    assert not positive_normalizer(x).requires_grad


def test_dice_loss_formula():
    logits = (_rand((3, 2, 4), 31) - 0.5) * 6
    targets = (_rand((3, 2, 4), 32) > 0.5).double()
    p = torch.sigmoid(logits).flatten(1).numpy()
    t = targets.flatten(1).numpy()
    want = [1 - (2 * (p[i] * t[i]).sum() + 1) / (p[i].sum() + t[i].sum() + 1) for i in range(3)]
    torch.testing.assert_close(dice_loss(logits, targets, reduction="none"), t64(want), **TOL)
