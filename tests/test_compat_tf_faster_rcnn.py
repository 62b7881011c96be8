"""Parity of detloss.compat.tf_faster_rcnn with the golden tf-faster-rcnn cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detloss import box_iou
from detloss.coders import encode_deltas
from detloss.compat import tf_faster_rcnn as tfr
from detloss.matching.rcnn_targets import ProposalTargets
from detloss.matching.max_iou import max_iou_match
from conftest import golden_cases


CASES = [f"tf/{name}.npz" for name in golden_cases("tf/frcnn_*.npz")]
LOSSES = ["cross_entropy", "loss_box", "rpn_cross_entropy", "rpn_loss_box", "total_loss"]
PREDS = ["rpn_cls_score", "rpn_bbox_pred", "cls_score", "bbox_pred"]


@pytest.fixture
def golden_cfg():
    """The golden cases' config: config.py defaults with BG_THRESH_LO = 0 (restored after)."""
    saved = dict(vars(tfr.cfg.TRAIN))
    tfr.cfg.TRAIN.BG_THRESH_LO = 0.0
    yield tfr.cfg.TRAIN
    vars(tfr.cfg.TRAIN).update(saved)


def _layer_inputs(d):
    return d["in_rpn_cls_score"], d["in_gt_boxes"], d["in_im_info"], 16, d["in_anchors"], 9


@pytest.mark.parametrize("case", CASES)
def test_anchors(golden, case):
    d = golden(case)
    anchors, length = tfr.generate_anchors_pre(38, 50, 16)
    np.testing.assert_array_equal(anchors, d["in_anchors"])
    assert length == d["in_anchors"].shape[0]
    assert tfr.generate_anchors().shape == (9, 4)


@pytest.mark.parametrize("case", CASES)
def test_iou_matrix(golden, case):
    d = golden(case)
    anchors = torch.tensor(d["in_anchors"], dtype=torch.float64)
    gt = torch.tensor(d["in_gt_boxes"][:, :4], dtype=torch.float64)
    shift = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # inclusive-pixel IoU
    overlaps = box_iou(anchors + shift, gt + shift).float().numpy()
    np.testing.assert_array_equal(overlaps, d["mid_anchor_gt_overlaps"])


@pytest.mark.parametrize("case", CASES)
def test_presample_labels_exact(golden, golden_cfg, case):
    d = golden(case)
    golden_cfg.RPN_BATCHSIZE = 10**9  # as the generator did: no subsampling
    labels = tfr.anchor_target_layer(*_layer_inputs(d))[0]
    np.testing.assert_array_equal(labels, d["mid_rpn_labels_presample"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("as_torch", [False, True])
def test_anchor_targets(golden, golden_cfg, case, as_torch):
    d = golden(case)
    inputs = _layer_inputs(d)
    if as_torch:
        inputs = tuple(torch.as_tensor(x) if isinstance(x, np.ndarray) else x for x in inputs)
    gen = torch.Generator().manual_seed(3)
    labels, targets, inside, outside = [np.asarray(x) for x in tfr.anchor_target_layer(*inputs, generator=gen)]
    pre, stored = d["mid_rpn_labels_presample"], d["mid_rpn_labels"]
    # sampling: the original's counts, drawn from the presample labels
    for value in (1, 0):
        assert (labels == value).sum() == (stored == value).sum()
        assert np.all(pre[labels == value] == value)
    assert (labels == 1).sum() == min((pre == 1).sum(), 128)
    # regression targets: every inside anchor against its best GT
    np.testing.assert_allclose(targets, d["mid_rpn_bbox_targets"], rtol=1e-5, atol=1e-6)
    # weights follow the sampled labels by the original's rule; check the rule on ours
    lab_nhwc = labels.reshape(1, 9, 38, 50).transpose(0, 2, 3, 1).repeat(4, axis=3)
    np.testing.assert_array_equal(inside, (lab_nhwc == 1).astype(np.float32))
    np.testing.assert_allclose(outside, (lab_nhwc >= 0) / np.float32((labels >= 0).sum()), rtol=1e-7)
    # ... and on the golden labels the same rule gives the stored weights
    gold_nhwc = stored.reshape(1, 9, 38, 50).transpose(0, 2, 3, 1).repeat(4, axis=3)
    np.testing.assert_array_equal(d["mid_rpn_bbox_inside_weights"], (gold_nhwc == 1).astype(np.float32))
    np.testing.assert_allclose(
        d["mid_rpn_bbox_outside_weights"], (gold_nhwc >= 0) / np.float32((stored >= 0).sum()), rtol=1e-7
    )
    if as_torch:
        assert isinstance(tfr.anchor_target_layer(*inputs)[0], torch.Tensor)


@pytest.mark.parametrize("case", CASES)
def test_anchor_target_reproducible(golden, golden_cfg, case):
    d = golden(case)
    a = tfr.anchor_target_layer(*_layer_inputs(d), generator=torch.Generator().manual_seed(7))
    b = tfr.anchor_target_layer(*_layer_inputs(d), generator=torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("case", CASES)
def test_proposal_targets(golden, golden_cfg, case):
    d = golden(case)
    gen = torch.Generator().manual_seed(1)
    rois, scores, labels, targets, inside, outside = tfr.proposal_target_layer(
        d["in_rpn_rois"], d["in_rpn_scores"], d["in_gt_boxes"], 21, generator=gen
    )
    assert rois.shape == d["mid_rois"].shape and targets.shape == d["mid_bbox_targets"].shape
    n_fg = int((d["mid_labels"] > 0).sum())
    assert int((labels > 0).sum()) == n_fg
    assert np.all(labels[:n_fg] > 0) and np.all(labels[n_fg:] == 0)  # fg first, then bg
    # each sampled ROI is a real proposal with its own score, fg/bg by the thresholds
    src = {tuple(r): s for r, s in zip(d["in_rpn_rois"].tolist(), d["in_rpn_scores"][:, 0].tolist())}
    assert all(src[tuple(r)] == s for r, s in zip(rois.tolist(), scores.tolist()))
    gt = torch.tensor(d["in_gt_boxes"][:, :4], dtype=torch.float64)
    shift = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    iou = box_iou(torch.tensor(rois[:, 1:], dtype=torch.float64) + shift, gt + shift).max(dim=1).values
    assert bool((iou[:n_fg] >= 0.5).all()) and bool((iou[n_fg:] < 0.5).all())
    np.testing.assert_array_equal(outside, (inside > 0).astype(np.float32))
    assert np.all((targets != 0).sum(axis=1)[n_fg:] == 0)


@pytest.mark.parametrize("case", CASES)
def test_proposal_target_layout_on_stored_rois(golden, case):
    """Targets and weights of the stored sampled ROIs, built by the native code, are the stored ones."""
    d = golden(case)
    rois = torch.tensor(d["mid_rois"][None, :, 1:])
    gt = torch.tensor(d["in_gt_boxes"][None, :, :4])
    valid = torch.ones(gt.shape[:2], dtype=torch.bool)
    match = max_iou_match(rois.double(), gt.double(), valid, pos_iou=0.5, neg_iou=0.5,
                          allow_low_quality=False, pixel_offset=1.0)
    labels = torch.tensor(d["mid_labels"][None, :, 0]).long()
    matched_boxes = gt[0, match.matched_gt[0]][None]
    deltas = encode_deltas(matched_boxes.double(), rois.double(), stds=(0.1, 0.1, 0.2, 0.2), pixel_offset=1.0)
    deltas = torch.where((labels > 0).unsqueeze(-1), deltas, 0.0)
    np.testing.assert_array_equal(
        labels[0].numpy(), np.where(labels[0].numpy() > 0, d["in_gt_boxes"][match.matched_gt[0].numpy(), 4], 0)
    )
    pt = ProposalTargets(rois=rois, roi_index=labels, labels=labels, box_targets=deltas,
                         matched_gt=match.matched_gt, max_iou=match.max_iou, num_fg=(labels > 0).sum(1))
    targets, inside, outside = pt.class_specific(21)
    np.testing.assert_allclose(targets[0].float().numpy(), d["mid_bbox_targets"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(inside[0].numpy(), d["mid_bbox_inside_weights"])
    np.testing.assert_array_equal(outside[0].numpy(), d["mid_bbox_outside_weights"])


@pytest.mark.parametrize("case", CASES)
def test_losses_and_gradients(golden, case):
    d = golden(case)
    preds = {k: torch.tensor(d["in_" + k], requires_grad=True) for k in PREDS}
    reshaped = tfr.reshape_layer(preds["rpn_cls_score"], 2)
    np.testing.assert_array_equal(reshaped.detach().numpy(), d["mid_rpn_cls_score_reshape"])
    losses = tfr.add_losses(
        reshaped, d["mid_rpn_labels"], preds["rpn_bbox_pred"], d["mid_rpn_bbox_targets"],
        d["mid_rpn_bbox_inside_weights"], d["mid_rpn_bbox_outside_weights"],
        preds["cls_score"], d["mid_labels"], preds["bbox_pred"], d["mid_bbox_targets"],
        d["mid_bbox_inside_weights"], d["mid_bbox_outside_weights"],
        sigma_rpn=float(d["cfg_sigma_rpn"]),
    )
    for name in LOSSES:
        np.testing.assert_allclose(losses[name].item(), d["out_" + name], rtol=1e-5, err_msg=name)
    losses["total_loss"].backward()
    for name in PREDS:
        np.testing.assert_allclose(
            preds[name].grad.numpy(), d["out_grad_" + name], rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_smooth_l1_matches_formula():
    x = torch.linspace(-0.5, 0.5, 41, dtype=torch.float64).reshape(1, 41)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    got = tfr.smooth_l1_loss(x, zero, one, one, sigma=3.0)
    ax = x.abs()
    want = torch.where(ax < 1 / 9, 4.5 * x**2, ax - 1 / 18).sum()
    torch.testing.assert_close(got, want)


def test_bad_inputs(golden, golden_cfg):
    d = golden(CASES[0])
    score, gt, info, stride, anchors, a = _layer_inputs(d)
    with pytest.raises(ValueError, match="im_info"):
        tfr.anchor_target_layer(score, gt, None, stride, anchors, a)
    with pytest.raises(ValueError, match="im_info"):
        tfr.anchor_target_layer(score, gt, np.zeros((4, 4)), stride, anchors, a)
    with pytest.raises(ValueError, match="all_anchors"):
        tfr.anchor_target_layer(score, gt, info, stride, anchors[:-9], a)
    with pytest.raises(ValueError, match="rpn_cls_score"):
        tfr.anchor_target_layer(score[..., :10], gt, info, stride, anchors, a)
    with pytest.raises(ValueError, match="gt_boxes"):
        tfr.anchor_target_layer(score, gt[:, :2], info, stride, anchors, a)
    bad_gt = gt.copy()
    bad_gt[0, 4] = 25
    with pytest.raises(ValueError, match="gt_labels"):
        tfr.proposal_target_layer(d["in_rpn_rois"], d["in_rpn_scores"], bad_gt, 21)
    with pytest.raises(ValueError, match="rpn_scores"):
        tfr.proposal_target_layer(d["in_rpn_rois"], d["in_rpn_scores"][:5], gt, 21)
    cls = torch.tensor(d["in_cls_score"])
    bad_labels = d["mid_labels"].copy()
    bad_labels[0] = 30
    with pytest.raises(ValueError, match="labels"):
        tfr.add_losses(
            tfr.reshape_layer(torch.tensor(score), 2), d["mid_rpn_labels"], torch.tensor(d["in_rpn_bbox_pred"]),
            d["mid_rpn_bbox_targets"], d["mid_rpn_bbox_inside_weights"], d["mid_rpn_bbox_outside_weights"],
            cls, bad_labels, torch.tensor(d["in_bbox_pred"]), d["mid_bbox_targets"],
            d["mid_bbox_inside_weights"], d["mid_bbox_outside_weights"],
        )
