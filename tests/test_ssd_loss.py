"""Native ``detloss.SSDLoss``: golden intermediates, the float64 oracle, gradcheck, validation, pain points."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import SSDLoss, pad_ground_truth
from oracles import ssd as O

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

SETTINGS = settings(max_examples=200, deadline=None)
CASES = O.SSD_GOLDEN_CASES


def golden_batch(g, dtype=torch.float32):
    """Native-API inputs from a golden SSD file."""
    t = {k: torch.from_numpy(v) for k, v in g.items()}
    n = g["in_num_gt"]
    tg = t["in_targets"].to(dtype)
    valid = torch.arange(tg.shape[1])[None] < torch.from_numpy(n)[:, None]
    return dict(
        box_pred=t["in_loc_data"].to(dtype).requires_grad_(),
        cls_logits=t["in_conf_data"].to(dtype).requires_grad_(),
        priors=t["in_priors"].to(dtype),
        gt_boxes=tg[..., :4].contiguous(),
        gt_labels=tg[..., 4].long(),
        gt_valid=valid,
    )


@pytest.mark.parametrize("case", CASES)
def test_golden_native(golden, case):
    g = golden(f"torch/{case}.npz")
    x = golden_batch(g)
    out = SSDLoss(21)(**x, return_assignment=True)
    a = out["assignment"]
    np.testing.assert_allclose(out["loss_box"].item(), g["out_loss_l"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["loss_cls"].item(), g["out_loss_c"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.labels.numpy(), g["mid_conf_t"])
    np.testing.assert_array_equal(a.positive.numpy(), g["mid_pos"])
    np.testing.assert_array_equal(a.negative.numpy(), g["mid_neg"])
    np.testing.assert_array_equal(a.positive.sum(1).numpy(), g["mid_num_pos"])
    np.testing.assert_array_equal(a.negative.sum(1).numpy(), g["mid_num_neg"])
    np.testing.assert_array_equal(a.matched_gt.numpy(), g["mid_best_truth_idx"])
    np.testing.assert_array_equal(a.match.matched_iou.numpy(), g["mid_best_truth_overlap"])
    valid = x["gt_valid"].numpy()
    np.testing.assert_array_equal(a.match.best_prior.numpy()[valid], g["mid_best_prior_idx"][valid])
    np.testing.assert_array_equal(a.match.best_prior_iou.numpy()[valid], g["mid_best_prior_overlap"][valid])
    pos = g["mid_pos"]
    np.testing.assert_allclose(a.box_targets.detach().numpy()[pos], g["mid_loc_t"][pos], rtol=1e-5, atol=1e-6)
    (out["loss_box"] + out["loss_cls"]).backward()
    np.testing.assert_allclose(x["box_pred"].grad.numpy(), g["out_grad_loc"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(x["cls_logits"].grad.numpy(), g["out_grad_conf"], rtol=1e-5, atol=1e-7)
    # weighted sum
    torch.testing.assert_close(out["loss"], out["loss_box"] + out["loss_cls"])


@pytest.mark.parametrize("case", CASES)
def test_golden_native_float64(golden, case):
    g = golden(f"torch/{case}.npz")
    out = SSDLoss(21)(**golden_batch(g, torch.float64), return_assignment=True)
    if g["out_f64_masks_equal"]:
        np.testing.assert_allclose(out["loss_box"].item(), g["out_loss_l_f64"], rtol=1e-9)
        np.testing.assert_allclose(out["loss_cls"].item(), g["out_loss_c_f64"], rtol=1e-9)
    else:  # b2: float64 resolves the exact IoU tie to another prior, as the original's float64 run did
        tiny = int(g["in_num_gt"][0]) - 1  # the 0.012 x 0.012 GT is image 0's last
        np.testing.assert_allclose(g["in_targets"][0, tiny, 2] - g["in_targets"][0, tiny, 0], 0.012, rtol=1e-3)
        best = out["assignment"].match.best_prior[0, tiny].item()
        assert best != g["mid_best_prior_idx"][0, tiny]


# ---------------------------------------------------------------- oracle property tests

def small_priors(grid: int = 6) -> torch.Tensor:
    """A small SSD-like prior set: two square sizes and a tall/wide pair on a grid (P = 4 * grid**2)."""
    c = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    rows = []
    for w, h in [(0.15, 0.15), (0.35, 0.35), (0.3, 0.15), (0.15, 0.3)]:
        rows.append(torch.stack([cx, cy, torch.full_like(cx, w), torch.full_like(cx, h)], -1).reshape(-1, 4))
    return torch.cat(rows).clamp(0, 1)


@st.composite
def ssd_batches(draw):
    b = draw(st.integers(1, 3))
    counts = [draw(st.sampled_from([0, 1, 2, 5, 31])) for _ in range(b)]
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["random", "tiny", "duplicate", "degenerate"]))
    gen = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for n in counts:
        xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.8
        wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.5 + 0.02
        if kind == "tiny":
            wh = wh * 0.05
        box = torch.cat([xy, (xy + wh).clamp(max=1)], 1)
        if kind == "duplicate" and n >= 2:
            box[1::2] = box[0::2][: box[1::2].shape[0]]
        if kind == "degenerate" and n >= 1:
            box[0, 2] = box[0, 0]
        boxes.append(box)
        labels.append(torch.randint(0, 5, (n,), generator=gen))
    gt_boxes, gt_labels, gt_valid = pad_ground_truth(boxes, labels)
    priors = small_priors()
    p = priors.shape[0]
    scale = draw(st.sampled_from([0.5, 3.0]))
    loc = torch.randn(b, p, 4, generator=gen, dtype=torch.float64)
    conf = torch.randn(b, p, 6, generator=gen, dtype=torch.float64) * scale
    return loc, conf, priors, gt_boxes, gt_labels, gt_valid


@SETTINGS
@given(ssd_batches())
def test_matches_float64_oracle(batch):
    loc, conf, priors, gt_boxes, gt_labels, gt_valid = batch
    out = SSDLoss(6)(loc, conf, priors, gt_boxes, gt_labels, gt_valid, return_assignment=True)
    ref = O.ssd_loss(loc.numpy(), conf.numpy(), priors.numpy(), gt_boxes.numpy(), gt_labels.numpy(), gt_valid.numpy())
    a = out["assignment"]
    np.testing.assert_array_equal(a.positive.numpy(), ref["positive"])
    np.testing.assert_array_equal(a.negative.numpy(), ref["negative"])
    np.testing.assert_array_equal(a.labels.numpy(), ref["labels"])
    np.testing.assert_allclose(out["loss_box"].item(), ref["loss_box"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["loss_cls"].item(), ref["loss_cls"], rtol=1e-9, atol=1e-12)
    assert not (a.positive & a.negative).any()


def test_gradcheck_float64():
    """Gradients w.r.t. loc and logits in float64. The assignment is fixed: matching does not
    depend on the predictions and the mining-loss gaps are far above gradcheck's eps."""
    gen = torch.Generator().manual_seed(3)
    priors = small_priors(2)
    p = priors.shape[0]
    gt_boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]], [[0.2, 0.5, 0.4, 0.9], [0, 0, 0, 0]]], dtype=torch.float64)
    gt_labels = torch.tensor([[0, 3], [1, 0]])
    gt_valid = torch.tensor([[True, True], [True, False]])
    loc = torch.randn(2, p, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    conf = torch.randn(2, p, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = SSDLoss(5)
    first = loss(loc, conf, priors, gt_boxes, gt_labels, gt_valid, return_assignment=True)["assignment"]
    assert torch.autograd.gradcheck(lambda l, c: loss(l, c, priors, gt_boxes, gt_labels, gt_valid)["loss"], (loc, conf), fast_mode=True)
    again = loss(loc, conf, priors, gt_boxes, gt_labels, gt_valid, return_assignment=True)["assignment"]
    assert torch.equal(first.negative, again.negative)


# ---------------------------------------------------------------- named pain points

def _one_image(gt_boxes, gt_labels, num_classes=6, seed=0):
    priors = small_priors()
    gen = torch.Generator().manual_seed(seed)
    b, m = gt_labels.shape
    loc = torch.randn(b, priors.shape[0], 4, generator=gen, requires_grad=True)
    conf = torch.randn(b, priors.shape[0], num_classes, generator=gen, requires_grad=True)
    return loc, conf, priors, gt_boxes, gt_labels, torch.ones(b, m, dtype=torch.bool)


def test_zero_positives_finite_and_exact_zero():
    """Pain point: N = 0. A batch without GT divides by max(N, 1): box loss exactly 0, no NaN."""
    loc, conf, priors, _, _, _ = _one_image(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long))
    out = SSDLoss(6)(loc, conf, priors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long),
                     torch.zeros(2, 0, dtype=torch.bool), return_assignment=True)
    assert out["loss_box"].item() == 0 and out["loss_cls"].item() == 0
    assert not out["assignment"].negative.any()
    out["loss"].backward()
    assert torch.all(loc.grad == 0) and torch.all(conf.grad == 0)


def test_normaliser_is_float_positive_count():
    """Pain point: integer N (LongTensor) -> integer division. N is the float count of positives."""
    x = _one_image(torch.tensor([[[0.1, 0.1, 0.6, 0.5], [0.5, 0.5, 0.9, 0.8]]]), torch.tensor([[2, 0]]))
    out = SSDLoss(6, normalize_by="none")(*x, return_assignment=True)
    per_n = SSDLoss(6)(*x)
    n = out["assignment"].positive.sum().item()
    assert n >= 2  # a non-trivial divisor
    torch.testing.assert_close(per_n["loss_box"], out["loss_box"] / n)
    torch.testing.assert_close(per_n["loss_cls"], out["loss_cls"] / n)
    assert per_n["loss_box"].dtype == torch.float32


def test_degenerate_gt_is_invalid_natively_and_targets_finite():
    """Pain point: zero-area GT -> log(0). Native: dropped (never matched); targets finite."""
    box = torch.tensor([[[0.3, 0.3, 0.3, 0.6], [0.1, 0.1, 0.6, 0.5]]])
    x = _one_image(box, torch.tensor([[1, 2]]))
    out = SSDLoss(6)(*x, return_assignment=True)
    a = out["assignment"]
    assert not (a.matched_gt[a.positive] == 0).any()
    assert a.match.best_prior_iou[0, 0] == -1
    assert torch.isfinite(a.box_targets).all() and torch.isfinite(out["loss"])
    kept = SSDLoss(6, drop_degenerate_gt=False)(*x, return_assignment=True)
    assert kept["assignment"].positive[0, 0] and torch.isfinite(kept["loss"])  # forced onto prior 0


def test_two_gts_sharing_best_prior_later_wins():
    """Pain point: two GTs with the same best prior. The later GT takes it (IoU 2.0); the earlier
    keeps exactly its ordinary IoU >= 0.5 matches elsewhere."""
    priors = small_priors()
    big = torch.tensor([0.05, 0.05, 0.45, 0.45], dtype=torch.float64)
    inner = torch.tensor([0.1, 0.1, 0.4, 0.4], dtype=torch.float64)
    gt = torch.stack([big, inner])[None].float()
    x = _one_image(gt, torch.tensor([[1, 4]]))
    a = SSDLoss(6)(*x, return_assignment=True)["assignment"]
    iou = O.iou_matrix(gt[0].double().numpy(), O.point_form(priors.numpy()))
    shared = int(iou[0].argmax())
    assert shared == int(iou[1].argmax())  # the set-up: one best prior for both
    assert a.matched_gt[0, shared] == 1 and a.labels[0, shared] == 5 and a.match.matched_iou[0, shared] == 2.0
    ordinary = (iou.max(0) >= 0.5) & (iou.argmax(0) == 0)
    ordinary[shared] = False
    np.testing.assert_array_equal((a.positive[0] & (a.matched_gt[0] == 0)).numpy(), ordinary)


def test_positives_never_negatives_even_when_ratio_exceeds_negatives():
    x = _one_image(torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), torch.tensor([[0]]))
    a = SSDLoss(6, pos_iou=0.01, neg_pos_ratio=1000)(*x, return_assignment=True)["assignment"]
    p = a.positive.shape[1]
    assert not (a.positive & a.negative).any()
    assert a.negative.sum() == p - a.positive.sum()


def test_ignore_band_not_mined():
    x = _one_image(torch.tensor([[[0.1, 0.1, 0.6, 0.5]]]), torch.tensor([[0]]))
    a = SSDLoss(6, neg_iou=0.3, neg_pos_ratio=1000)(*x, return_assignment=True)["assignment"]
    assert a.match.ignore.any()
    assert not (a.match.ignore & a.negative).any()


def test_half_precision_runs_in_float32():
    x = list(_one_image(torch.tensor([[[0.1, 0.1, 0.6, 0.5]]]), torch.tensor([[0]])))
    ref = SSDLoss(6)(*x)
    x[0] = x[0].detach().half().requires_grad_()
    x[1] = x[1].detach().half().requires_grad_()
    out = SSDLoss(6)(*x)
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], ref["loss"].detach(), rtol=2e-3, atol=2e-3)
    out["loss"].backward()
    assert x[1].grad.dtype == torch.float16


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda x: x.update(gt_labels=x["gt_labels"] + 30), ValueError, r"gt_labels: expected values in \[0, 19\]"),
        (lambda x: x.update(gt_labels=x["gt_labels"] - 5), ValueError, "gt_labels"),
        (lambda x: x.update(gt_labels=x["gt_labels"].float()), TypeError, "gt_labels: expected an integer"),
        (lambda x: x.update(cls_logits=x["cls_logits"][:, :-1]), ValueError, r"cls_logits: expected shape \(B=4, P=8732"),
        (lambda x: x.update(priors=x["priors"][:-1]), ValueError, r"priors: expected shape \(P=8732, 4\)"),
        (lambda x: x.update(box_pred=x["box_pred"][0]), ValueError, r"box_pred: expected shape \(B, P, 4\)"),
        (lambda x: x.update(cls_logits=x["cls_logits"][..., :5]), ValueError, r"cls_logits: expected shape .*C=21"),
        (lambda x: x.update(gt_boxes=x["gt_boxes"] * 300), ValueError, "gt_boxes: expected normalised.*divide pixel boxes"),
        (lambda x: x.update(gt_boxes=x["gt_boxes"].index_fill(1, torch.tensor([0]), float("inf"))), ValueError, "gt_boxes: expected finite"),
        (lambda x: x.update(gt_valid=x["gt_valid"][:, :1]), ValueError, r"gt_valid: expected shape \(B=4, M=4\)"),
        (lambda x: x.update(box_pred=x["box_pred"].long()), TypeError, "box_pred: expected a floating"),
    ],
)
def test_bad_input_named(golden, change, error, pattern):
    x = golden_batch(golden("torch/ssd300_voc_a_typical.npz"))
    change(x)
    with pytest.raises(error, match=pattern):
        SSDLoss(21)(**x)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        SSDLoss(1)
    with pytest.raises(ValueError, match="normalize_by"):
        SSDLoss(21, normalize_by="batch")
    with pytest.raises(ValueError, match="pos_iou"):
        SSDLoss(21, pos_iou=-0.5)


@pytest.mark.slow
def test_runs_under_torch_compile_fullgraph():
    """DESIGN rule: no graph break (no host sync, no data-dependent shapes) in the forward."""
    x = list(_one_image(torch.tensor([[[0.1, 0.1, 0.6, 0.5], [0.5, 0.5, 0.9, 0.8]]]), torch.tensor([[2, 0]])))
    loss = SSDLoss(6)
    compiled = torch.compile(lambda *a: loss(*a)["loss"], fullgraph=True)
    torch.testing.assert_close(compiled(*x), loss(*x)["loss"], rtol=1e-5, atol=1e-6)
