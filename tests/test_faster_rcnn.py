"""Native Faster R-CNN API: batched RPN targets, ROI sampling rules, losses, smooth L1 gradcheck."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detloss import rcnn_anchors
from detloss.compat import tf_faster_rcnn as tfr
from detloss.detectors.faster_rcnn import FasterRCNNLoss, RCNNLoss, RPNLoss
from detloss.functional import inside_outside_smooth_l1
from detloss.matching.rcnn_targets import proposal_targets, rpn_targets


ORIGINAL = dict(pixel_offset=1.0, low_quality_zero_iou=True)  # tf-faster-rcnn's conventions


def _golden_batch(d):
    """The golden image twice: once as is, once with two padding GT rows in front."""
    gt = torch.tensor(d["in_gt_boxes"][:, :4])
    g = gt.shape[0]
    pad = torch.zeros(2, 4)
    boxes = torch.stack((torch.cat((gt, pad)), torch.cat((pad, gt))))
    valid = torch.tensor([[True] * g + [False] * 2, [False] * 2 + [True] * g])
    return boxes, valid


@pytest.mark.parametrize("case", ["tf/frcnn_typical.npz", "tf/frcnn_large_boxes.npz"])
def test_batched_rpn_targets_match_golden(golden, case):
    d = golden(case)
    boxes, valid = _golden_batch(d)
    anchors = rcnn_anchors(38, 50, 16).double()
    t = rpn_targets(anchors, boxes.double(), valid, (600.0, 800.0), generator=torch.Generator().manual_seed(0), **ORIGINAL)
    want = d["mid_rpn_labels_presample"].reshape(9, 38, 50).transpose(1, 2, 0).reshape(-1)
    for b in range(2):
        np.testing.assert_array_equal(t.presample_labels[b].numpy(), want)
        assert int((t.labels[b] == 1).sum()) == int((d["mid_rpn_labels"] == 1).sum())
        assert int((t.labels[b] == 0).sum()) == int((d["mid_rpn_labels"] == 0).sum())
    targets = d["mid_rpn_bbox_targets"].reshape(-1, 4)
    np.testing.assert_allclose(t.box_targets[0].numpy(), targets, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t.box_targets[1].numpy(), targets, rtol=1e-5, atol=1e-6)


def test_rpn_empty_image():
    anchors = rcnn_anchors(10, 12, 16)
    boxes = torch.tensor([[[20.0, 20, 120, 100]], [[0.0, 0, 0, 0]]])
    valid = torch.tensor([[True], [False]])
    g = torch.Generator().manual_seed(0)
    t = rpn_targets(anchors, boxes, valid, (160, 192), generator=g)
    inside = t.inside[1]
    assert bool((t.presample_labels[1][inside] == 0).all()) and bool((t.presample_labels[1][~inside] == -1).all())
    assert int((t.labels[1] == 0).sum()) == min(256, int(inside.sum())) and int((t.labels[1] == 1).sum()) == 0
    assert bool((t.box_targets[1] == 0).all()) and bool((t.inside_weights[1] == 0).all())
    cls = torch.randn(2, anchors.shape[0], 2, requires_grad=True)
    box = torch.randn(2, anchors.shape[0], 4, requires_grad=True)
    empty = RPNLoss()(box[1:], cls[1:], anchors, boxes[1:], valid[1:], (160, 192), generator=g)
    assert empty["loss_rpn_box"].item() == 0.0 and torch.isfinite(empty["loss"]).item()
    out = RPNLoss()(box, cls, anchors, boxes, valid, (160, 192), generator=g, return_assignment=True)
    out["loss"].backward()
    assert bool((box.grad[1] == 0).all()) and bool(torch.isfinite(cls.grad).all())


def test_rpn_sigmoid_objectness_and_outside_weights():
    anchors = rcnn_anchors(20, 25, 16)
    boxes = torch.tensor([[[20.0, 20, 120, 100], [100, 40, 180, 150]]])
    t = rpn_targets(anchors, boxes, torch.ones(1, 2, dtype=torch.bool), (320, 400),
                    generator=torch.Generator().manual_seed(0), positive_weight=0.25)
    pos, neg = t.labels == 1, t.labels == 0
    torch.testing.assert_close(t.outside_weights[pos][:, 0], torch.full((int(pos.sum()),), 0.25 / int(pos.sum())))
    torch.testing.assert_close(t.outside_weights[neg][:, 0], torch.full((int(neg.sum()),), 0.75 / int(neg.sum())))
    logit = torch.randn(1, anchors.shape[0], dtype=torch.float64)
    loss = RPNLoss(pixel_offset=0.0)
    got = loss(torch.zeros(1, anchors.shape[0], 4), logit, anchors, boxes, torch.ones(1, 2, dtype=torch.bool),
               (320, 400), generator=torch.Generator().manual_seed(0), return_assignment=True)
    lab = got["assignment"].labels
    keep = lab >= 0
    want = torch.nn.functional.binary_cross_entropy_with_logits(logit[keep], lab[keep].double())
    torch.testing.assert_close(got["loss_rpn_cls"], want)


def _roi_problem(n_fg: int, n_bg: int, n_mid: int):
    """Proposals with exactly n_fg of IoU 1, n_bg of IoU 0 and n_mid of IoU 0.6 / 0.45 mixes."""
    gt = torch.tensor([[[0.0, 0, 100, 100]]])
    fg = torch.tensor([[0.0, 0, 100, 100]]).repeat(n_fg, 1)
    bg = torch.tensor([[300.0, 300, 400, 400]]).repeat(n_bg, 1)
    mid = torch.tensor([[0.0, 0, 100, 45]]).repeat(n_mid, 1)  # IoU 0.45: background unless lo > 0.45
    props = torch.cat((fg, bg, mid)).unsqueeze(0)
    return props, gt, torch.tensor([[7]]), torch.ones(1, 1, dtype=torch.bool)


@pytest.mark.parametrize("n_fg,n_bg,n_mid", [(5, 200, 0), (100, 200, 0), (50, 0, 0), (200, 0, 0), (0, 3, 0), (0, 0, 0),
                                             (0, 0, 4)])
def test_roi_sampling_rules(n_fg, n_bg, n_mid):
    props, gt, labels, valid = _roi_problem(n_fg, n_bg, n_mid)
    lo = 0.5 if n_mid == 4 else 0.0  # the (0, 0, 4) case: the IoU 0.45 ROIs are neither fg nor bg
    t = proposal_targets(props, gt, labels, valid, neg_iou_min=lo, generator=torch.Generator().manual_seed(0))
    n_bg_cand = n_bg + (n_mid if lo == 0.0 else 0)
    if n_fg and n_bg_cand:
        want_fg = min(32, n_fg)
    elif n_fg:
        want_fg = 128
    else:
        want_fg = 0
    lab = t.labels[0]
    assert int(t.num_fg[0]) == want_fg and int((lab == 7).sum()) == want_fg
    assert bool((lab[:want_fg] == 7).all())  # foreground first
    if n_fg or n_bg_cand:
        assert bool((lab[want_fg:] == 0).all())
        idx = t.roi_index[0]
        assert bool((idx[:want_fg] < n_fg).all()) and bool((idx[want_fg:] >= n_fg).all())
        if want_fg <= n_fg:  # without replacement: no foreground ROI twice
            assert len(set(idx[:want_fg].tolist())) == want_fg
    else:
        assert bool((lab == -1).all())
    assert bool((t.box_targets[0][want_fg:] == 0).all())


def test_roi_targets_and_class_layout():
    gt = torch.tensor([[[10.0, 10, 60, 80], [100, 100, 150, 140]]])
    props = torch.tensor([[[12.0, 8, 58, 84], [98, 102, 152, 139], [300, 300, 350, 350], [0, 0, 5, 5]]])
    labels, valid = torch.tensor([[3, 5]]), torch.ones(1, 2, dtype=torch.bool)
    t = proposal_targets(props, gt, labels, valid, num_samples=4, fg_fraction=0.5,
                         generator=torch.Generator().manual_seed(0))
    assert t.labels[0, :2].sort().values.tolist() == [3, 5] and t.labels[0, 2:].tolist() == [0, 0]
    targets, inside, outside = t.class_specific(6)
    for s in range(2):
        c = int(t.labels[0, s])
        g = gt[0, int(t.matched_gt[0, s])]
        r = t.rois[0, s]
        w, h = r[2] - r[0], r[3] - r[1]
        want = torch.stack(((g[0] + g[2] - r[0] - r[2]) / 2 / w / 0.1, (g[1] + g[3] - r[1] - r[3]) / 2 / h / 0.1,
                            torch.log((g[2] - g[0]) / w) / 0.2, torch.log((g[3] - g[1]) / h) / 0.2))
        torch.testing.assert_close(targets[0, s, 4 * c: 4 * c + 4], want)
        assert inside[0, s].sum() == 4 and inside[0, s, 4 * c: 4 * c + 4].sum() == 4
    assert bool((outside == (inside > 0)).all()) and bool((targets[0, 2:] == 0).all())
    # the class-specific loss equals the original's inside/outside formula on the 4C layout
    cls = torch.randn(1, 4, 6, dtype=torch.float64)
    pred = torch.randn(1, 4, 24, dtype=torch.float64)
    got = RCNNLoss()(pred, cls, t)
    want_box = tfr.smooth_l1_loss(pred[0], targets[0].double(), inside[0].double(), outside[0].double())
    torch.testing.assert_close(got["loss_box"], want_box)
    torch.testing.assert_close(got["loss_cls"], torch.nn.functional.cross_entropy(cls[0], t.labels[0]))
    agnostic = RCNNLoss()(pred[..., 4:8], cls, t)
    assert torch.isfinite(agnostic["loss_box"]).item()


def test_roi_sampling_reproducible_and_append_gt():
    props, gt, labels, valid = _roi_problem(0, 300, 0)
    a = proposal_targets(props, gt, labels, valid, generator=torch.Generator().manual_seed(5))
    b = proposal_targets(props, gt, labels, valid, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.roi_index, b.roi_index)
    c = proposal_targets(props, gt, labels, valid, append_gt=True, generator=torch.Generator().manual_seed(5))
    assert int(c.num_fg[0]) == 1 and int(c.roi_index[0, 0]) == 300  # the appended GT row is the only fg


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_smooth_l1_gradcheck_around_transition(sigma):
    k = 1.0 / sigma**2
    pts = torch.tensor([-k - 1e-3, -k, -k + 1e-3, 0.0, k - 1e-3, k, k + 1e-3, 2 * k], dtype=torch.float64)
    pred = pts.clone().requires_grad_()
    target = torch.zeros_like(pts)
    inside = torch.full_like(pts, 1.0)
    outside = torch.full_like(pts, 0.5)
    assert torch.autograd.gradcheck(lambda p: inside_outside_smooth_l1(p, target, inside, outside, sigma=sigma), (pred,))
    value = inside_outside_smooth_l1(pts, target, inside, outside, sigma=sigma)
    ax = pts.abs()
    want = 0.5 * torch.where(ax < k, 0.5 * sigma**2 * pts**2, ax - 0.5 / sigma**2)
    torch.testing.assert_close(value, want)
    beta_form = inside_outside_smooth_l1(pts, target, inside, outside, beta=k)
    torch.testing.assert_close(beta_form, value)


def test_faster_rcnn_loss_dict(golden):
    d = golden("tf/frcnn_typical.npz")
    boxes, valid = _golden_batch(d)
    anchors = rcnn_anchors(38, 50, 16)
    g = torch.Generator().manual_seed(0)
    rois = torch.tensor(d["in_rpn_rois"][:, 1:]).expand(2, -1, -1)
    labels = torch.tensor(d["in_gt_boxes"][:, 4]).long()
    gt_labels = torch.stack((torch.cat((labels, torch.zeros(2, dtype=torch.long))),
                             torch.cat((torch.zeros(2, dtype=torch.long), labels))))
    pt = proposal_targets(rois, boxes, gt_labels, valid, num_classes=21, generator=g, pixel_offset=1.0)
    assert pt.num_fg.tolist() == [32, 32]
    a = anchors.shape[0]
    preds = [torch.randn(2, a, 2), torch.randn(2, a, 4), torch.randn(2, 128, 21), torch.randn(2, 128, 84)]
    for p in preds:
        p.requires_grad_()
    out = FasterRCNNLoss(**ORIGINAL)(preds[1], preds[0], anchors, boxes, valid, (600, 800), preds[3], preds[2], pt,
                                     generator=g, return_assignment=True)
    parts = ["loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"]
    torch.testing.assert_close(out["loss"], sum(out[k] for k in parts))
    out["loss"].backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in preds)
    assert out["assignment"].labels.shape == (2, a)


def test_errors():
    anchors = rcnn_anchors(4, 4, 16)
    boxes, valid = torch.tensor([[[0.0, 0, 30, 30]]]), torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="image_size"):
        rpn_targets(anchors, boxes, valid, (1.0, 2.0, 3.0, 4.0, 5.0))
    with pytest.raises(ValueError, match="gt_labels"):
        proposal_targets(boxes, boxes, torch.tensor([[0]]), valid, num_classes=21)
    with pytest.raises(ValueError, match="box_pred"):
        t = rpn_targets(anchors, boxes, valid, (64, 64))
        from detloss.detectors.faster_rcnn import rpn_loss
        rpn_loss(torch.zeros(1, 3, 4), torch.zeros(1, anchors.shape[0], 2), t)


@pytest.mark.slow
def test_rpn_compiles_fullgraph():
    from detloss.detectors.faster_rcnn import rpn_loss

    anchors = rcnn_anchors(20, 25, 16)
    boxes = torch.tensor([[[20.0, 20, 120, 100], [100, 40, 180, 150]], [[0.0, 0, 0, 0], [50, 60, 250, 200]]])
    valid = torch.tensor([[True, True], [False, True]])
    cls = torch.randn(2, anchors.shape[0], 2)
    box = torch.randn(2, anchors.shape[0], 4)

    def total(c, b):
        t = rpn_targets(anchors, boxes, valid, (320, 400), generator=None, batch_size_per_image=10**6)
        return sum(rpn_loss(b, c, t).values())

    torch.testing.assert_close(torch.compile(total, fullgraph=True)(cls, box), total(cls, box))


def test_rcnn_image_without_gt():
    props = torch.tensor([[[0.0, 0, 50, 50], [10, 10, 80, 90], [5, 5, 30, 30]]])
    t = proposal_targets(props, torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.long),
                         torch.zeros(1, 0, dtype=torch.bool), num_samples=8, generator=torch.Generator().manual_seed(0))
    assert bool((t.labels == 0).all()) and int(t.num_fg[0]) == 0
    pred = torch.randn(1, 8, 12, requires_grad=True)
    out = RCNNLoss()(pred, torch.randn(1, 8, 3), t)
    assert out["loss_box"].item() == 0.0 and torch.isfinite(out["loss"]).item()
    out["loss"].backward()
    assert bool((pred.grad == 0).all())
