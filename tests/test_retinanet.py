"""RetinaNetLoss: float64 loop oracle (hypothesis), focal-loss identities, empty images, errors."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import retinanet_anchors
from detloss.detectors.retinanet import RetinaNetLoss, chunked_sigmoid_focal_sum
from detloss.functional import binary_cross_entropy_with_logits, sigmoid_focal_loss
from oracles import two_stage as O

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from resident_memory import PeakAllocated  # noqa: E402  (the benchmarks' allocation probe)

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies


@st.composite
def batches(draw):
    batch, n_a, k = draw(st.integers(1, 2)), draw(st.integers(1, 8)), draw(st.integers(1, 3))
    m = draw(st.integers(0, 3))

    def box(lo, span):
        x1, y1 = draw(st.integers(0, 10)), draw(st.integers(0, 10))
        return [x1, y1, x1 + draw(st.integers(lo, span)), y1 + draw(st.integers(lo, span))]

    anchors = np.array([box(1, 8) for _ in range(n_a)], float)  # anchors have positive size
    gt = np.array([[box(0, 8) for _ in range(m)] for _ in range(batch)], float).reshape(batch, m, 4)
    labels = np.array([[draw(st.integers(0, k - 1)) for _ in range(m)] for _ in range(batch)], np.int64).reshape(batch, m)
    valid = np.array([[draw(st.booleans()) for _ in range(m)] for _ in range(batch)], bool).reshape(batch, m)
    logits = np.array(draw(st.lists(st.integers(-48, 48), min_size=batch * n_a * k, max_size=batch * n_a * k))) / 8
    deltas = np.array(draw(st.lists(st.integers(-16, 16), min_size=batch * n_a * 4, max_size=batch * n_a * 4))) / 16
    return anchors, gt, labels, valid, logits.reshape(batch, n_a, k), deltas.reshape(batch, n_a, 4)


@settings(max_examples=200, deadline=None)
@given(batches(), st.sampled_from([(0.25, 2.0), (-1.0, 0.0), (0.5, 1.0)]), st.sampled_from(["smooth_l1", "l1"]),
       st.sampled_from([1, 3, None]))
def test_matches_oracle(data, focal, box_loss, chunk):
    anchors, gt, labels, valid, logits, deltas = data
    alpha, gamma = focal
    loss = RetinaNetLoss(logits.shape[2], alpha=alpha, gamma=gamma, box_loss=box_loss, beta=0.1, cls_chunk_size=chunk)
    out = loss(torch.tensor(deltas), torch.tensor(logits), torch.tensor(anchors), torch.tensor(gt),
               torch.tensor(labels), torch.tensor(valid))
    want_cls, want_box = O.retinanet_loss(logits, deltas, anchors, gt, labels, valid, alpha=alpha, gamma=gamma,
                                          beta=0.1, box_loss=box_loss)
    np.testing.assert_allclose(out["loss_cls"].item(), want_cls, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["loss_box"].item(), want_box, rtol=1e-10, atol=1e-12)
    assert out["loss"].item() == pytest.approx(want_cls + want_box, rel=1e-10, abs=1e-12)


def _scene(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    anchors = retinanet_anchors(96, dtype=dtype)
    gt = torch.tensor([[[8.0, 8, 40, 30], [50, 20, 90, 90], [0, 0, 0, 0]], [[0, 0, 0, 0]] * 3], dtype=dtype)
    labels = torch.tensor([[1, 2, 0], [0, 0, 0]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    logits = torch.randn(2, anchors.shape[0], 3, generator=g, dtype=dtype).requires_grad_()
    deltas = (0.1 * torch.randn(2, anchors.shape[0], 4, generator=g, dtype=dtype)).requires_grad_()
    return logits, deltas, anchors, gt, labels, valid


def test_alpha_minus_one_gamma_zero_is_bce():
    logits, deltas, anchors, gt, labels, valid = _scene()
    out = RetinaNetLoss(3, alpha=-1, gamma=0)(deltas, logits, anchors, gt, labels, valid, return_assignment=True)
    a = out["assignment"]
    onehot = F.one_hot(a.target_class.clamp(min=0), 3).double() * (a.target_class >= 0).unsqueeze(-1)
    keep = (a.labels >= 0).unsqueeze(-1).double()
    bce = binary_cross_entropy_with_logits(logits, onehot, weight=keep.expand_as(onehot), reduction="sum")
    bce = bce / max(1, int(a.num_pos))
    torch.testing.assert_close(out["loss_cls"], bce)
    g1, = torch.autograd.grad(out["loss_cls"], logits)
    g2, = torch.autograd.grad(bce, logits)
    torch.testing.assert_close(g1, g2)


def test_focal_over_bce_is_modulating_factor():
    xs = torch.linspace(-6, 6, 25, dtype=torch.float64)
    for alpha, gamma in ((0.25, 2.0), (0.75, 0.5)):
        for t in (0, 1):
            for x in xs:
                logit = x.reshape(1, 1)
                target = torch.tensor([0 if t else -1])  # class 0 of one, or an all-zero row
                focal = chunked_sigmoid_focal_sum(logit, target, torch.ones(1, dtype=torch.float64), alpha, gamma)
                bce = F.binary_cross_entropy_with_logits(x, torch.tensor(float(t), dtype=torch.float64))
                p = torch.sigmoid(x)
                p_t = p if t else 1 - p
                alpha_t = alpha if t else 1 - alpha
                torch.testing.assert_close(focal / bce, alpha_t * (1 - p_t) ** gamma)


def test_chunked_focal_gradient_matches_autograd():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(-1, 4, (3, 11), generator=g)
    weight = (torch.rand(3, 11, generator=g) > 0.3).double()
    for alpha, gamma in ((0.25, 2.0), (-1.0, 0.0), (0.4, 1.5)):
        got = chunked_sigmoid_focal_sum(x, target, weight, alpha, gamma, chunk_size=5)
        onehot = F.one_hot(target.clamp(min=0), 4).double() * (target >= 0).unsqueeze(-1)
        want = sigmoid_focal_loss(x, onehot, alpha, gamma, weight=weight.unsqueeze(-1), reduction="sum")
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])
    assert torch.autograd.gradcheck(lambda z: chunked_sigmoid_focal_sum(z, target, weight, chunk_size=7), (x,))


@pytest.mark.parametrize("box_loss", ["smooth_l1", "l1", "giou"])
def test_empty_images(box_loss):
    logits, deltas, anchors, gt, labels, valid = _scene()
    for m in (0, 3):
        out = RetinaNetLoss(3, box_loss=box_loss)(
            deltas, logits, anchors, gt[:, :m] * 0, labels[:, :m], torch.zeros(2, m, dtype=torch.bool),
            return_assignment=True,
        )
        assert out["loss_box"].item() == 0.0 and math.isfinite(out["loss"].item())
        assert bool((out["assignment"].labels == 0).all()) and int(out["assignment"].num_pos) == 0
        out["loss"].backward()
        assert bool(torch.isfinite(logits.grad).all()) and bool((deltas.grad == 0).all())
        logits.grad = deltas.grad = None


def test_normalizer_and_giou_finite():
    logits, deltas, anchors, gt, labels, valid = _scene()
    out = RetinaNetLoss(3, box_loss="giou")(deltas, logits, anchors, gt, labels, valid, return_assignment=True)
    a = out["assignment"]
    assert int(a.num_pos) == int((a.labels == 1).sum()) > 0
    assert bool((a.labels[1] == 0).all())  # the empty second image is all negative
    out["loss"].backward()
    assert bool(torch.isfinite(deltas.grad).all())


def test_half_precision_close_to_float32():
    logits, deltas, anchors, gt, labels, valid = _scene(torch.float32)
    loss = RetinaNetLoss(3)
    ref = loss(deltas, logits, anchors, gt, labels, valid)
    half = loss(deltas.detach().half(), logits.detach().half().requires_grad_(), anchors, gt, labels, valid)
    assert half["loss"].dtype == torch.float32
    torch.testing.assert_close(half["loss"], ref["loss"], rtol=2e-3, atol=1e-3)


def test_errors():
    logits, deltas, anchors, gt, labels, valid = _scene()
    loss = RetinaNetLoss(3)
    with pytest.raises(ValueError, match="cls_logits"):
        loss(deltas, logits[..., :2], anchors, gt, labels, valid)
    with pytest.raises(ValueError, match="anchors"):
        loss(deltas, logits, anchors[:-1], gt, labels, valid)
    with pytest.raises(ValueError, match="gt_labels"):
        loss(deltas, logits, anchors, gt, labels + 3, valid)
    with pytest.raises(ValueError, match="box_loss"):
        RetinaNetLoss(3, box_loss="iou")
    with pytest.raises(ValueError, match="num_classes"):
        RetinaNetLoss(0)


@pytest.mark.slow
def test_compiles_fullgraph():
    logits, deltas, anchors, gt, labels, valid = _scene(torch.float32)
    loss = RetinaNetLoss(3)

    def total(c, b):
        return loss(b, c, anchors, gt, labels, valid)["loss"]

    compiled = torch.compile(total, fullgraph=True)(logits, deltas)
    torch.testing.assert_close(compiled, total(logits, deltas))
    grad_c, = torch.autograd.grad(compiled, logits)
    grad_e, = torch.autograd.grad(total(logits, deltas), logits)
    torch.testing.assert_close(grad_c, grad_e)


@pytest.mark.skipif(not PeakAllocated.available, reason="needs glibc's mallinfo2")
def test_forward_backward_allocates_at_most_1_2x_the_logits():
    """One forward + backward at 640 px (76,725 anchors x 80 classes, 2 images, 20 boxes each)
    holds at most 1.2x the logits' bytes at any operator: the logits' gradient (1.0x), the box
    term's one kept tensor, the targets and cache-sized chunks (measured 1.17x; the matcher's
    outputs and the box term's temporaries are gone before the focal pass allocates its
    gradient, or they would add 0.3x)."""
    anchors, g = retinanet_anchors(640), torch.Generator().manual_seed(0)
    xy = torch.rand(2, 20, 2, generator=g) * 450
    gt = torch.cat((xy, xy + 16 + torch.rand(2, 20, 2, generator=g) * 190), -1)
    labels, valid = torch.randint(0, 80, (2, 20), generator=g), torch.ones(2, 20, dtype=torch.bool)
    logits = torch.randn(2, anchors.shape[0], 80, generator=g, requires_grad=True)
    deltas = (0.1 * torch.randn(2, anchors.shape[0], 4, generator=g)).requires_grad_()
    loss = RetinaNetLoss(80)

    def step():
        loss(deltas, logits, anchors, gt, labels, valid)["loss"].backward()
        logits.grad = deltas.grad = None

    with PeakAllocated():
        step()  # one-time allocations (the probe's own, lazy libraries)
    with PeakAllocated() as probe:
        step()
    assert probe.growth_mib * 2**20 <= 1.2 * logits.numel() * logits.element_size()
