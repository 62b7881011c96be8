"""Named checks for the 15 known failure modes of detection losses, across the families.

Each ``test_fmNN_*`` is the test that would have caught failure mode NN of
``/work/shared/research/pain_points.md`` (the task list of issue 8), on every family where
it applies. Expected values come from independent float64 recomputation or from the
documented conventions, never from the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import detloss
from detloss import boxes as B
from detloss.compat import retinaface as compat_rf
from detloss.compat import ssd_pytorch as compat_ssd
from detloss.functional import positive_normalizer, sigmoid_focal_loss
from detloss.sampling.batch_hard_negative import mine_hard_negatives_batchwide

from .cases import FAMILIES, IMAGE, Case, loss_and_grads, make_case, scalar_items, small_anchors, small_priors

pytestmark = pytest.mark.usefixtures("strategy", "single_thread")  # every test under both execution strategies


# Box-regression components of each family: exactly 0 without positives.
BOX_TERMS = {
    "ssd": ("loss_box",),
    "retinaface": ("loss_box", "loss_landmark"),
    "yolov3": ("loss_box", "loss_cls"),
    "retinanet": ("loss_box",),
    "rpn": ("loss_rpn_box",),
    "rcnn": ("loss_box",),
    "faster_rcnn": ("loss_rpn_box", "loss_box"),
    "detr": ("loss_l1", "loss_giou", "loss_l1_0", "loss_giou_0", "loss_l1_1", "loss_giou_1"),
    "yolov8": ("loss_box", "loss_dfl"),
}
DISTRIBUTED_FAMILIES = ("ssd", "retinaface", "yolov3", "retinanet", "rpn", "rcnn", "faster_rcnn")


def assert_finite(out: dict, grads: list) -> None:
    for k, v in scalar_items(out).items():
        assert torch.isfinite(v).all(), f"{k} = {v}"
        assert v.dtype in (torch.float32, torch.float64), f"{k} dtype {v.dtype}"
    for i, g in enumerate(grads):
        assert torch.isfinite(g).all(), f"gradient of prediction {i} not finite"


# ---------------------------------------------------------------- 1. mining masks and shapes
@pytest.mark.parametrize("family", ["ssd", "retinaface"])
def test_fm01_hard_negative_masks_are_batch_by_prior(family):
    case = make_case(family, batch=3, num_gt=[2, 0, 4], seed=1)
    a = case.call(return_assignment=True)["assignment"]
    p = small_priors().shape[0]
    for t in (a.positive, a.negative, a.labels, a.matched_gt):
        assert t.shape == (3, p)
    assert a.positive.dtype == torch.bool and a.negative.dtype == torch.bool
    ratio = case.module.neg_pos_ratio
    eligible = (~a.positive & ~a.match.ignore).sum(1)
    expected = torch.minimum(a.positive.sum(1) * ratio, torch.minimum(eligible, torch.tensor(p - 1)))
    assert torch.equal(a.negative.sum(1), expected.long())


def test_fm01_flat_mining_loss_is_rejected_with_its_shape():
    # the classic ``loss_c[pos] = 0`` mistake: a flat (B*P, 1) loss against a (B, P) mask
    with pytest.raises(ValueError, match=r"positive: expected shape \(B=6, P=1\)"):
        detloss.mine_hard_negatives(torch.rand(6, 1), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="negative"):
        mine_hard_negatives_batchwide(torch.rand(6, 1), torch.ones(2, 3, dtype=torch.bool), 1)


# ---------------------------------------------------------------- 2. normaliser
@pytest.mark.parametrize("family", FAMILIES)
def test_fm02_no_positives_gives_finite_loss_and_zero_box_terms(family):
    case = make_case(family, num_gt=0)
    out, grads = loss_and_grads(case)
    assert_finite(out, grads)
    for k in BOX_TERMS[family]:
        assert out[k].item() == 0.0, k


def test_fm02_integer_count_normaliser_is_float_and_at_least_one():
    for count, expected in ((0, 1.0), (3, 3.0), (7, 7.0)):
        n = positive_normalizer(torch.tensor(count))  # int64, as ``positive.sum()`` gives
        assert n.dtype == torch.float32 and n.item() == expected
    assert (torch.tensor(5.0) / positive_normalizer(torch.tensor(2))).item() == 2.5


@pytest.mark.parametrize("family", ["ssd", "retinaface", "retinanet", "yolov3"])
def test_fm02_loss_is_sum_over_float_positive_count(family, monkeypatch):
    """Normalised loss x N equals the unnormalised loss, N = number of positives (not floor-divided)."""
    options = {"normalize_by": "num_pos"} if family == "yolov3" else {}
    case = make_case(family, batch=2, num_gt=[3, 2], seed=3, options=options)
    out = case.call(return_assignment=True)
    a = out["assignment"]
    if family == "retinanet":
        n = a.num_pos
    elif family == "yolov3":
        n = sum(r.sum() for r in a.respond)
    else:
        n = a.positive.sum()
    assert n.item() > 1
    module = {"ssd": "ssd", "retinaface": "retinaface", "retinanet": "retinanet", "yolov3": "yolov3"}[family]
    import importlib

    mod = importlib.import_module(f"detloss.detectors.{module}")
    if family != "ssd":
        monkeypatch.setattr(mod, "positive_normalizer", lambda count, **kw: torch.ones((), dtype=torch.float32))
    if family in ("ssd", "retinaface"):
        monkeypatch.setattr(mod, "multibox_normalizer", lambda *a, **k: torch.ones(()))
    raw = case.call()
    terms = ("loss_box", "loss_cls") if family != "yolov3" else ("loss_box", "loss_obj", "loss_cls")
    for k in terms:
        torch.testing.assert_close(out[k].double() * n.double(), raw[k].double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 3. degenerate GT boxes
@pytest.mark.parametrize("family", FAMILIES)
def test_fm03_zero_and_negative_size_gt_give_finite_losses(family):
    case = make_case(family, num_gt=5, degenerate=True, seed=4)
    if family == "yolov3":  # YOLO rejects inverted boxes (see below); zero sizes pass
        with pytest.raises(ValueError, match="gt_boxes"):
            case.call()
        boxes = case.args[1].clone()
        boxes[:, 1, [0, 2]] = boxes[:, 1, [2, 0]]  # un-invert: zero width / height remain
        case.args[1] = boxes
    out, grads = loss_and_grads(case)
    assert_finite(out, grads)


@pytest.mark.parametrize("drop", [True, False])
def test_fm03_ssd_targets_finite_even_when_degenerate_gt_kept(drop):
    case = make_case("ssd", num_gt=5, degenerate=True, seed=4, options={"drop_degenerate_gt": drop})
    out = case.call(return_assignment=True)
    assert torch.isfinite(out["assignment"].box_targets).all()
    assert torch.isfinite(out["loss"])


def test_fm03_coders_finite_for_zero_size_boxes():
    gt = torch.tensor([[0.2, 0.2, 0.2, 0.5], [0.3, 0.3, 0.6, 0.3], [0.4, 0.4, 0.4, 0.4]])
    priors = torch.tensor([[0.3, 0.3, 0.2, 0.2]]).expand(3, 4)
    assert torch.isfinite(detloss.encode_boxes(gt, priors)).all()
    assert torch.isfinite(detloss.encode_deltas(gt * 64, B.cxcywh_to_xyxy(priors) * 64)).all()


# ---------------------------------------------------------------- 4. shared best prior
def _shared_prior_geometry(with_alternative: bool):
    """GT 0 and GT 1 share best prior 0; GT 0 also overlaps prior 1 at IoU 0.86 (if present)."""
    priors = [[0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.1, 0.1]]
    if with_alternative:
        priors.insert(1, [0.54, 0.5, 0.4, 0.4])
    gt = torch.tensor([[[0.31, 0.3, 0.71, 0.7], [0.3, 0.3, 0.7, 0.7]]])
    return torch.tensor(priors), gt, torch.ones(1, 2, dtype=torch.bool)


def test_fm04_shared_best_prior_later_gt_wins_earlier_keeps_threshold_matches():
    priors, gt, valid = _shared_prior_geometry(True)
    m = detloss.match_priors(priors, gt, valid, pos_iou=0.5)
    assert m.best_prior[0, 0] == m.best_prior[0, 1] == 0
    assert m.matched_gt[0, 0] == 1 and m.forced[0, 0]  # later GT wins the shared prior
    assert m.positive[0, 1] and m.matched_gt[0, 1] == 0  # earlier GT keeps its IoU-0.86 prior
    matched = {int(g) for g in m.matched_gt[0][m.positive[0]]}
    assert matched == {0, 1}


def test_fm04_shared_best_prior_without_alternative_is_reported():
    # As the originals (documented): the earlier GT then has no prior; best_prior shows why.
    priors, gt, valid = _shared_prior_geometry(False)
    m = detloss.match_priors(priors, gt, valid, pos_iou=0.5)
    assert m.best_prior[0, 0] == m.best_prior[0, 1]
    assert not (m.positive[0] & (m.matched_gt[0] == 0)).any()
    assert m.positive[0, 0] and m.matched_gt[0, 0] == 1


@pytest.mark.parametrize("family", ["ssd", "retinaface"])
def test_fm04_shared_best_prior_through_the_losses(family):
    priors, gt, valid = _shared_prior_geometry(True)
    case = make_case(family, batch=1, num_gt=2)
    case.args[2 if family == "ssd" else 3] = priors
    p = priors.shape[0]
    case = case.map_preds(lambda t: t[:, :p].detach().clone().requires_grad_(True))
    if family == "ssd":
        case.args[3], case.args[5] = gt, valid
        case.args[4] = torch.tensor([[0, 1]])
    else:
        case.args[4], case.args[7] = gt, valid
        case.args[5], case.args[6] = torch.full((1, 2, 10), 0.5), valid
    a = case.call(return_assignment=True)["assignment"]
    assert {int(g) for g in a.matched_gt[0][a.positive[0]]} == {0, 1}
    if family == "ssd":
        assert a.labels[0, 1] == 1 and a.labels[0, 0] == 2  # label k -> column k + 1


def test_fm04_max_iou_shared_best_anchor_both_gts_matched():
    priors, gt, valid = _shared_prior_geometry(True)
    anchors = B.cxcywh_to_xyxy(priors) * 100
    m = detloss.max_iou_match(anchors, gt * 100, valid, pos_iou=0.5, neg_iou=0.4)
    pos = m.labels[0] == 1
    assert {int(g) for g in m.matched_gt[0][pos]} == {0, 1}


# ---------------------------------------------------------------- 5. images without GT
@pytest.mark.parametrize("family", FAMILIES)
def test_fm05_all_invalid_padding_rows_equal_no_rows(family):
    with_rows = make_case(family, num_gt=[0, 0], seed=5)
    no_rows = make_case(family, num_gt=0, seed=5)
    a, b = scalar_items(with_rows.call()), scalar_items(no_rows.call())
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_fm05_pad_ground_truth_accepts_empty_shapes():
    boxes = [torch.zeros(0, 4), torch.zeros(0), torch.tensor([[0.1, 0.1, 0.5, 0.5]])]
    labels = [torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.tensor([2])]
    gb, gl, gv = detloss.pad_ground_truth(boxes, labels)
    assert gb.shape == (3, 1, 4) and gv.tolist() == [[False], [False], [True]]
    gb, gl, gv = detloss.pad_ground_truth(boxes[:2], labels[:2])
    assert gb.shape == (2, 0, 4) and gl.shape == (2, 0) and gv.shape == (2, 0)


@pytest.mark.parametrize("empty", [torch.zeros(0, 5), torch.zeros(0)], ids=["0x5", "0"])
def test_fm05_ssd_pytorch_dropin_with_empty_images(empty):
    case = make_case("ssd", batch=2, num_gt=[0, 2], seed=6)
    loc, conf, priors, gt, labels, valid = case.args
    targets = [empty, torch.cat((gt[1], labels[1, :, None].float()), dim=1)]
    drop = compat_ssd.MultiBoxLoss(4, 0.5, True, 0, True, 3, 0.5, False)
    loss_l, loss_c = drop((loc, conf, priors), targets)
    native = detloss.SSDLoss(4, drop_degenerate_gt=False)(loc, conf, priors, gt, labels, valid)
    torch.testing.assert_close(loss_l, native["loss_box"])
    torch.testing.assert_close(loss_c, native["loss_cls"])


@pytest.mark.parametrize("empty", [torch.zeros(0, 15), torch.zeros(0)], ids=["0x15", "0"])
def test_fm05_retinaface_dropin_with_empty_images(empty):
    case = make_case("retinaface", batch=2, num_gt=[0, 2], seed=6)
    loc, conf, landm, priors = case.args[:4]
    row = torch.cat((case.args[4][1], case.args[5][1], torch.ones(2, 1)), dim=1)
    drop = compat_rf.MultiBoxLoss(2, 0.35, True, 0, True, 7, 0.35, False)
    out = drop((loc, conf, landm), priors, [empty, row])
    assert all(torch.isfinite(t) for t in out)
    only = drop((loc[1:], conf[1:], landm[1:]), priors, [row])
    # the empty image adds no positives and no negatives: same losses as the other image alone
    for x, y in zip(out, only):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------- 6. no anchor fits
def _unreachable_gt(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    # a 1x1-pixel object between anchor centres: IoU 0 with every small anchor
    box = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]) * scale / IMAGE
    return box.expand(2, 1, 4).clone(), torch.ones(2, 1, dtype=torch.bool)


@pytest.mark.parametrize("family", ["retinanet", "rpn", "faster_rcnn"])
def test_fm06_no_anchor_fits_gives_no_positive_and_finite_loss(family):
    case = make_case(family, num_gt=1, seed=7)
    gt, valid = _unreachable_gt(IMAGE)
    gt = gt + 100.0  # outside every anchor (the anchors span [-12, 76])
    case.args[3] = gt
    case.args[5 if family == "retinanet" else 4] = valid
    out = case.call(return_assignment=True)
    a = out["assignment"]
    labels = a.labels
    assert not (labels == 1).any()
    out, grads = loss_and_grads(case)
    assert_finite(out, grads)
    assert out["loss_box" if family == "retinanet" else "loss_rpn_box"].item() == 0.0


@pytest.mark.parametrize("family", ["ssd", "yolov3"])
def test_fm06_tiny_object_is_still_assigned(family):
    """SSD forces each GT onto its best prior; YOLOv3 always has a responsible anchor."""
    case = make_case(family, batch=2, num_gt=1, seed=7)
    scale = 1.0 if family == "ssd" else float(IMAGE)
    tiny = torch.tensor([[[0.48, 0.48, 0.49, 0.49]]]).expand(2, 1, 4).clone() * scale
    case.args[3 if family == "ssd" else 1] = tiny
    out = case.call(return_assignment=True)
    a = out["assignment"]
    npos = a.positive.sum(1) if family == "ssd" else sum(r.flatten(1).sum(1) for r in a.respond)
    assert (npos >= 1).all()
    out, grads = loss_and_grads(case)
    assert_finite(out, grads)


def test_fm06_retinaface_face_below_floor_is_ignored_without_nan():
    case = make_case("retinaface", batch=2, num_gt=1, seed=7)
    case.args[4] = torch.tensor([[[0.48, 0.48, 0.485, 0.485]]]).expand(2, 1, 4).clone()
    a = case.call(return_assignment=True)["assignment"]
    assert not a.positive.any()
    out, grads = loss_and_grads(case)
    assert_finite(out, grads)
    assert out["loss_box"].item() == 0.0 and out["loss_landmark"].item() == 0.0


# ---------------------------------------------------------------- 7. landmarks
def test_fm07_faces_without_landmarks_give_zero_landmark_loss_and_gradient():
    case = make_case("retinaface", num_gt=3, seed=8)
    case.args[6] = torch.zeros_like(case.args[6])
    case.args[5] = torch.full_like(case.args[5], -1.0)  # the original's "no landmarks" marker
    out, grads = loss_and_grads(case)
    assert_finite(out, grads)
    assert out["loss_landmark"].item() == 0.0
    assert torch.count_nonzero(grads[2]) == 0


def test_fm07_landmark_targets_only_used_where_written():
    case = make_case("retinaface", num_gt=4, seed=9)
    out = case.call(return_assignment=True)
    a = out["assignment"]
    has = case.args[6]
    assert torch.equal(a.landmark_positive, a.positive & has.gather(1, a.matched_gt.clamp(min=0)))
    # changing the landmarks of faces without landmarks, or the predictions outside the
    # landmark positives, changes nothing
    landmarks = torch.where(has.unsqueeze(-1), case.args[5], torch.full_like(case.args[5], -1.0))
    case.args[5] = landmarks
    noisy = case.args[2].detach() + 50.0 * (~a.landmark_positive).unsqueeze(-1)
    case.args[2] = noisy
    again = case.call()
    torch.testing.assert_close(again["loss_landmark"], out["loss_landmark"])
    assert a.landmark_positive.any()


# ---------------------------------------------------------------- 8. IoU-family NaN
@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fm08_iou_family_identical_and_zero_size_boxes(kind, dtype):
    boxes = torch.tensor([[10.0, 10, 50, 30], [5, 5, 5, 25], [7, 7, 7, 7], [3, 4, 3, 9]])
    pred = boxes.to(dtype).requires_grad_(True)
    val = B.aligned_box_iou(pred, boxes.to(dtype), kind)
    assert val.dtype == torch.float32
    assert torch.isfinite(val).all()
    assert val[0].item() == pytest.approx(1.0, abs=1e-6)  # identical non-degenerate boxes
    rows = [0, 1, 2, 3] if dtype != torch.float16 else [0, 2]  # float16: see the xfail below
    loss = detloss.functional.iou_loss(pred[rows], boxes[rows].to(dtype), kind if kind != "iou" else "giou")
    assert torch.isfinite(loss)
    (g,) = torch.autograd.grad(val[[0, 2]].sum() + loss, pred, retain_graph=True)
    assert torch.isfinite(g).all()
    if dtype != torch.float16:  # float16: see the xfail below
        (g,) = torch.autograd.grad(val.sum(), pred)
        assert torch.isfinite(g).all()


def test_fm08_iou_gradient_zero_width_identical_boxes_float16():
    boxes = torch.tensor([[5.0, 5, 5, 25]])
    pred = boxes.half().requires_grad_(True)
    (g,) = torch.autograd.grad(B.aligned_box_iou(pred, boxes.half(), "iou").sum(), pred)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("box_loss", ["giou", "diou", "ciou"])
def test_fm08_yolo_zero_size_predictions_finite(box_loss):
    case = make_case("yolov3", num_gt=3, seed=10, options={"box_loss": box_loss})
    heads = []
    for h in case.args[0]:
        h = h.detach().clone().view(*h.shape[:3], 3, -1)
        h[..., 2:4] = -1e4  # exp(-1e4) = 0: zero-size decoded boxes
        heads.append(h.flatten(3).requires_grad_(True))
    case.args[0] = heads
    out, grads = loss_and_grads(case)
    assert_finite(out, grads)


def test_fm08_yolo_point_gt_half():
    case = make_case("yolov3", batch=1, num_gt=[4], logit_scale=30.0, dtype=torch.float16, seed=49900)
    case.args[1] = torch.tensor([[[0.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [64.0, 32, 64, 32]]])
    out, grads = loss_and_grads(case)
    assert_finite(out, grads)


def test_fm08_retinanet_giou_with_extreme_deltas_finite():
    case = make_case("retinanet", num_gt=3, seed=10, options={"box_loss": "giou"})
    case.args[1] = torch.full_like(case.args[1], -1e4).requires_grad_(True)
    out, grads = loss_and_grads(case)
    assert_finite(out, grads)


# ---------------------------------------------------------------- 9. pairwise N != M
@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
@pytest.mark.parametrize("n,m", [(3, 5), (5, 3), (1, 4), (4, 0)])
def test_fm09_pairwise_matches_aligned_for_n_not_m(kind, n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    def rand_boxes(k):
        xy = torch.rand(2, k, 2, generator=g, dtype=torch.float64) * 50
        wh = torch.rand(2, k, 2, generator=g, dtype=torch.float64) * 30
        return torch.cat((xy, xy + wh), -1)
    a, b = rand_boxes(n), rand_boxes(m)
    pair = B.box_iou(a, b, kind)
    assert pair.shape == (2, n, m)
    expected = B.aligned_box_iou(a[:, :, None, :].expand(2, n, m, 4), b[:, None, :, :].expand(2, n, m, 4), kind)
    torch.testing.assert_close(pair, expected)
    if kind == "iou" and n and m:  # independent float64 check of plain IoU
        for i in range(n):
            for j in range(m):
                x1, y1 = torch.maximum(a[0, i, :2], b[0, j, :2])
                x2, y2 = torch.minimum(a[0, i, 2:], b[0, j, 2:])
                inter = max(float(x2 - x1), 0) * max(float(y2 - y1), 0)
                area = lambda r: float((r[2] - r[0]) * (r[3] - r[1]))  # noqa: E731
                assert pair[0, i, j].item() == pytest.approx(inter / (area(a[0, i]) + area(b[0, j]) - inter))


# ---------------------------------------------------------------- 10. half-precision overflow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fm10_iou_of_large_pixel_boxes_does_not_overflow(dtype):
    a = torch.tensor([[0.0, 0, 2000, 1500], [100, 100, 1900, 1400]])
    b = torch.tensor([[10.0, 10, 2010, 1510], [0, 0, 1000, 1000], [500, 500, 3000, 3000]])
    ref = B.box_iou(a, b)
    half = B.box_iou(a.to(dtype), b.to(dtype))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, ref, rtol=1e-2, atol=5e-3)
    for kind in ("giou", "diou", "ciou"):
        assert torch.isfinite(B.aligned_box_iou(a.to(dtype), b[:2].to(dtype), kind)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fm10_focal_and_cross_entropy_with_huge_half_logits(dtype):
    logits = torch.tensor([[-1e4, 1e4, 0.0], [6e4, -6e4, 3.0]]).to(dtype).requires_grad_(True)
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    focal = sigmoid_focal_loss(logits, targets, reduction="sum")
    ref = sigmoid_focal_loss(logits.detach().double(), targets.double(), reduction="sum")
    assert torch.isfinite(focal) and focal.dtype == torch.float32
    torch.testing.assert_close(focal.double(), ref, rtol=1e-2, atol=1e-2)
    ce = detloss.functional.cross_entropy(logits, torch.tensor([1, 2]), reduction="sum")
    ref = F.cross_entropy(logits.detach().double(), torch.tensor([1, 2]), reduction="sum")
    assert torch.isfinite(ce) and ce.dtype == torch.float32
    torch.testing.assert_close(ce.double(), ref, rtol=1e-2, atol=1e-2)
    (g,) = torch.autograd.grad(focal + ce, logits)
    assert torch.isfinite(g.float()).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_fm10_families_under_bf16_autocast_with_large_logits(family):
    case = make_case(family, logit_scale=100.0, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = loss_and_grads(case)
    assert_finite(out, grads)
    assert out["loss"].dtype == torch.float32


# ---------------------------------------------------------------- 11. chunked assignment
def _count_chunks(monkeypatch) -> list:
    """Record the (start, stop) of every block the shared chunked IoU kernel computes."""
    calls = []
    real = B.ChunkedPairwiseIoU.__call__

    def counting(self, start, stop):
        calls.append((start, stop))
        return real(self, start, stop)

    monkeypatch.setattr(B.ChunkedPairwiseIoU, "__call__", counting)
    return calls


def test_fm11_match_priors_chunked_path_taken_and_equal(monkeypatch):
    g = torch.Generator().manual_seed(12)
    priors = small_priors().repeat(4, 1) + torch.rand(192, 4, generator=g) * 0.01
    case = make_case("ssd", batch=3, num_gt=[5, 0, 7], seed=12)
    gt, valid = case.args[3], case.args[5]
    whole = detloss.match_priors(priors, gt, valid, pos_iou=0.5, chunk_size=10**6)
    calls = _count_chunks(monkeypatch)
    chunked = detloss.match_priors(priors, gt, valid, pos_iou=0.5, chunk_size=25)
    assert len(calls) == math.ceil(192 / 25)
    for f in ("matched_gt", "matched_iou", "positive", "forced", "best_prior", "best_prior_iou"):
        assert torch.equal(getattr(whole, f), getattr(chunked, f)), f


def test_fm11_max_iou_chunked_path_taken_and_equal(monkeypatch):
    anchors = small_anchors()
    case = make_case("retinanet", batch=3, num_gt=[4, 0, 6], seed=13)
    gt, valid = case.args[3], case.args[5]
    whole = detloss.max_iou_match(anchors, gt, valid, pos_iou=0.5, neg_iou=0.4, chunk_size=10**6)
    calls = _count_chunks(monkeypatch)
    chunked = detloss.max_iou_match(anchors, gt, valid, pos_iou=0.5, neg_iou=0.4, chunk_size=30)
    assert len(calls) == math.ceil(128 / 30)  # one pass: labels, GT bests and ties together
    for f in ("labels", "matched_gt", "max_iou", "low_quality"):
        assert torch.equal(getattr(whole, f), getattr(chunked, f)), f


def test_fm11_box_iou_chunk_size_equal():
    g = torch.Generator().manual_seed(14)
    a = torch.rand(2, 37, 4, generator=g).sort(-1).values[..., [0, 1, 2, 3]]
    a = torch.cat((a[..., :2], a[..., :2] + a[..., 2:]), -1)
    b = a[:, :11].flip(1)
    for kind in ("iou", "giou"):
        torch.testing.assert_close(B.box_iou(a, b, kind, chunk_size=4), B.box_iou(a, b, kind), rtol=0, atol=0)


# ---------------------------------------------------------------- 12. DDP normaliser
def _fake_world(monkeypatch, other_rank_count: str):
    """Pretend to be rank 0 of 2; the other rank has the same counts ("same") or none ("zero")."""
    import torch.distributed as dist

    def all_reduce(t, op=None):
        if other_rank_count == "same":
            t.mul_(2)
        return None

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)


def _distributed_case(family: str, distributed: bool) -> Case:
    options = {"distributed": distributed}
    if family == "yolov3":
        options["normalize_by"] = "num_pos"
    return make_case(family, num_gt=3, seed=15, sample_all=True, options=options)


@pytest.mark.parametrize("family", DISTRIBUTED_FAMILIES)
def test_fm12_distributed_normaliser_is_reduced(family, monkeypatch):
    local = scalar_items(_distributed_case(family, False).call())
    _fake_world(monkeypatch, "same")  # both ranks alike: global count / world = local count
    same = scalar_items(_distributed_case(family, True).call())
    for k in local:
        torch.testing.assert_close(same[k], local[k])
    _fake_world(monkeypatch, "zero")  # other rank has nothing: divisor halves, loss doubles
    half = scalar_items(_distributed_case(family, True).call())
    changed = [k for k in local if not torch.allclose(half[k], local[k])]
    assert changed, "the distributed option does not reach the normaliser"
    torch.testing.assert_close(half["loss"], 2 * local["loss"])


def test_fm13_bce_gradient_at_zero_logit():
    x = torch.zeros(3, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 0.25])
    (g,) = torch.autograd.grad(detloss.functional.binary_cross_entropy_with_logits(x, t, reduction="sum"), x)
    torch.testing.assert_close(g, 0.5 - t)


# ---------------------------------------------------------------- 13. background index
def test_fm13_ssd_label_k_is_logit_column_k_plus_1():
    case = make_case("ssd", num_gt=3, seed=16)
    out = case.call(return_assignment=True)
    a = out["assignment"]
    labels = case.args[4]
    expected = labels.gather(1, a.matched_gt.clamp(min=0)) + 1
    assert torch.equal(a.labels[a.positive], expected[a.positive])
    assert (a.labels[~a.positive] == 0).all()
    logits = case.args[1].detach().double()
    sel = a.positive | a.negative
    ce = F.cross_entropy(logits[sel], a.labels[sel], reduction="sum") / a.positive.sum()
    torch.testing.assert_close(out["loss_cls"].double(), ce, rtol=1e-5, atol=1e-6)


def test_fm13_retinaface_column_1_is_face():
    case = make_case("retinaface", num_gt=3, seed=16)
    a = case.call(return_assignment=True)["assignment"]
    assert torch.equal(a.labels, a.positive.long())


def test_fm13_retinanet_label_k_is_sigmoid_column_k_no_background():
    case = make_case("retinanet", num_gt=3, seed=17)
    out = case.call(return_assignment=True)
    a = out["assignment"]
    pos = a.labels == 1
    assert torch.equal(a.target_class[pos], case.args[4].gather(1, a.matched_gt)[pos])
    onehot = F.one_hot(a.target_class.clamp(min=0), 3).double() * pos.unsqueeze(-1)
    logits = case.args[1].detach().double()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = 0.25 * onehot + 0.75 * (1 - onehot)
    focal = (alpha_t * (1 - p_t) ** 2 * ce * (a.labels >= 0).unsqueeze(-1)).sum() / pos.sum().clamp(min=1)
    torch.testing.assert_close(out["loss_cls"].double(), focal, rtol=1e-5, atol=1e-6)


def test_fm13_yolo_class_k_is_channel_5_plus_k():
    case = make_case("yolov3", batch=1, num_gt=1, seed=18, options={"box_weight": 0.0, "obj_weight": 0.0})
    # small non-zero logits: at exactly 0 the foundation BCE gradient is off (see below)
    case = case.map_preds(lambda t: torch.full_like(t, 1e-3).requires_grad_(True))
    k = int(case.args[2][0, 0])
    out = case.call(return_assignment=True)
    grads = torch.autograd.grad(out["loss"], case.pred_tensors())
    found = 0
    for g, respond in zip(grads, out["assignment"].respond):
        g = g.view(*g.shape[:3], 3, -1)
        for idx in respond[0].nonzero():
            cls_grad = g[0][tuple(idx)][5:]
            assert cls_grad[k] < 0 and (torch.cat((cls_grad[:k], cls_grad[k + 1:])) > 0).all()
            found += 1
    assert found >= 1


def test_fm13_rcnn_class_0_is_background_and_label_is_column():
    case = make_case("rcnn", num_gt=3, seed=19)
    targets = case.args[2]
    assert (targets.labels >= 0).all() and (targets.labels[:, : int(targets.num_fg.min())] >= 1).all()
    out = case.call()
    logits = case.args[1].detach().double()
    ref = F.cross_entropy(logits.flatten(0, 1), targets.labels.flatten(), ignore_index=-1)
    torch.testing.assert_close(out["loss_cls"].double(), ref, rtol=1e-5, atol=1e-6)


def test_fm13_rpn_column_1_is_object():
    case = make_case("rpn", num_gt=3, seed=20)
    out = case.call(return_assignment=True)
    labels = out["assignment"].labels
    logits = case.args[1].detach().double()
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-1)
    torch.testing.assert_close(out["loss_rpn_cls"].double(), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 14. box formats
@pytest.mark.parametrize("family", ["ssd", "retinaface"])
@pytest.mark.parametrize("which", ["gt_boxes", "priors"])
def test_fm14_normalised_losses_reject_pixel_boxes(family, which):
    case = make_case(family, seed=21)
    index = {"gt_boxes": 3 if family == "ssd" else 4, "priors": 2 if family == "ssd" else 3}[which]
    case.args[index] = case.args[index] * 300
    with pytest.raises(ValueError, match=rf"{which}: expected normalised coordinates"):
        case.call()


def test_fm14_yolo_rejects_inverted_gt_boxes():
    case = make_case("yolov3", seed=21)
    cxcywh = B.xyxy_to_cxcywh(case.args[1])  # a cxcywh box passed as xyxy: x2 = w < x1 = cx
    cxcywh[..., 2:] = cxcywh[..., 2:] * 0.5
    case.args[1] = cxcywh
    with pytest.raises(ValueError, match="gt_boxes"):
        case.call()


def test_fm14_format_conversions_round_trip():
    g = torch.Generator().manual_seed(22)
    xy = torch.rand(10, 2, generator=g)
    xyxy = torch.cat((xy, xy + torch.rand(10, 2, generator=g)), -1)
    for fmt in ("cxcywh", "xywh"):
        torch.testing.assert_close(detloss.box_convert(detloss.box_convert(xyxy, "xyxy", fmt), fmt, "xyxy"), xyxy)
    torch.testing.assert_close(B.xyxy_to_cxcywh(xyxy)[:, :2], (xyxy[:, :2] + xyxy[:, 2:]) / 2)


# ---------------------------------------------------------------- 15. positives vs negatives
@pytest.mark.parametrize("family", ["ssd", "retinaface"])
def test_fm15_per_image_mining_disjoint_and_counted_once(family):
    case = make_case(family, batch=3, num_gt=[3, 1, 0], seed=23)
    out = case.call(return_assignment=True)
    a = out["assignment"]
    assert not (a.positive & a.negative).any()
    logits = case.args[1].detach().double()
    ce = F.cross_entropy(logits.flatten(0, 1), a.labels.flatten(), reduction="none").view(a.labels.shape)
    # negatives are the highest-loss non-positives of each image
    for i in range(3):
        if a.negative[i].any():
            others = ~a.positive[i] & ~a.negative[i] & ~a.match.ignore[i]
            if others.any():
                assert ce[i][a.negative[i]].min() >= ce[i][others].max() - 1e-6
    expected = (ce * (a.positive | a.negative)).sum() / a.positive.sum().clamp(min=1)
    torch.testing.assert_close(out["loss_cls"].double(), expected, rtol=1e-5, atol=1e-6)


def test_fm15_batchwide_mining_excludes_positives_and_counts_once():
    g = torch.Generator().manual_seed(24)
    loss = torch.rand(3, 20, generator=g)
    positive = torch.rand(3, 20, generator=g) < 0.1
    negative = ~positive
    kept = mine_hard_negatives_batchwide(loss, negative, positive.sum(), neg_pos_ratio=3)
    assert not (kept & positive).any()
    k = min(3 * int(positive.sum()), int(negative.sum()))
    assert int(kept.sum()) == k
    threshold = loss[negative].sort(descending=True).values[k - 1]
    assert (loss[kept] >= threshold).all()


def test_fm15_balanced_sampler_never_double_counts():
    g = torch.Generator().manual_seed(25)
    labels = torch.randint(-1, 2, (4, 50), generator=g)
    kept = detloss.sample_balanced(labels, 16, 0.25, torch.Generator().manual_seed(1))
    assert ((kept == labels) | (kept == -1)).all()
    assert ((kept == 1).sum(1) <= 4).all() and ((kept >= 0).sum(1) <= 16).all()
    expected_pos = torch.minimum((labels == 1).sum(1), torch.tensor(4))
    assert torch.equal((kept == 1).sum(1), expected_pos)
