"""Pytorch_Retinaface drop-in (``detloss.compat.retinaface.MultiBoxLoss``) against the golden runs of the original."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import golden_cases, golden_path
from detloss.compat.retinaface import MultiBoxLoss
from detloss.priors import retinaface_priors

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

CASES = golden_cases("torch/retina_mnet_*.npz")


def _inputs(g, dtype=torch.float32):
    t = {k: torch.from_numpy(v) for k, v in g.items()}
    n = g["in_num_gt"]
    targets = [t["in_targets"][i, : n[i]].to(dtype) for i in range(len(n))]
    preds = tuple(t[k].to(dtype).requires_grad_() for k in ("in_loc_data", "in_conf_data", "in_landm_data"))
    return preds, t["in_priors"].to(dtype), targets


def _criterion(g):
    return MultiBoxLoss(int(g["cfg_num_classes"]), float(g["cfg_overlap_thresh"]), True, 0, True,
                        int(g["cfg_neg_pos"]), float(g["cfg_neg_overlap"]), False)


@pytest.mark.parametrize("case", CASES)
def test_golden_losses_and_gradients(golden, case):
    g = golden(f"torch/{case}.npz")
    preds, priors, targets = _inputs(g)
    losses = _criterion(g)(preds, priors, targets)
    for value, key in zip(losses, ("out_loss_l", "out_loss_c", "out_loss_landm")):
        np.testing.assert_allclose(value.item(), g[key], rtol=1e-5, atol=1e-6)
    sum(losses).backward()
    for x, key in zip(preds, ("out_grad_loc", "out_grad_conf", "out_grad_landm")):
        np.testing.assert_allclose(x.grad.numpy(), g[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES)
def test_golden_float64(golden, case):
    g = golden(f"torch/{case}.npz")
    assert g["out_f64_masks_equal"]
    preds, priors, targets = _inputs(g, torch.float64)
    losses = _criterion(g)(preds, priors, targets)
    for value, key in zip(losses, ("out_loss_l_f64", "out_loss_c_f64", "out_loss_landm_f64")):
        assert value.dtype == torch.float64
        np.testing.assert_allclose(value.item(), g[key], rtol=1e-9, atol=1e-12)


def test_golden_priors_are_detloss_retinaface(golden):
    g = golden("torch/retina_mnet_a_typical.npz")
    assert torch.equal(retinaface_priors((640, 640)), torch.from_numpy(g["in_priors"]))


def test_zero_positives_exact_zeros(golden):
    """Golden ``c``: only an ignored face, so zero positives: three exact zeros, zero gradients."""
    g = golden("torch/retina_mnet_c_zero_positives.npz")
    preds, priors, targets = _inputs(g)
    losses = _criterion(g)(preds, priors, targets)
    assert [v.item() for v in losses] == [0.0, 0.0, 0.0]
    sum(losses).backward()
    assert all(torch.all(x.grad == 0) for x in preds)


def test_ignored_gt_claims_prior_quirk_reproduced(golden):
    """Golden ``a`` image 2: an ignored tiny face claims its best prior, which becomes a positive
    regressing to that face. The drop-in reproduces it (the golden positives include it)."""
    g = golden("torch/retina_mnet_a_typical.npz")
    index = json.loads(golden_path("torch/index.json").read_text())
    case = next(c for c in index["cases"] if c["file"] == "retina_mnet_a_typical.npz")
    assert "positives_assigned_to_ignored_gt" in json.dumps(case)
    preds, priors, targets = _inputs(g)
    crit = _criterion(g)
    out = crit.loss(*preds, priors, *_padded(targets), return_assignment=True)
    a = out["assignment"]
    np.testing.assert_array_equal(a.positive.numpy(), g["mid_pos"])
    ignored = ~torch.from_numpy(g["mid_gt_valid"][2])
    claimed = a.positive[2] & ignored[a.matched_gt[2].clamp(min=0)]
    assert claimed.sum() >= 1


def _padded(targets):
    from detloss import pad_ground_truth
    boxes, has, valid, lms = pad_ground_truth([t[:, :4] for t in targets], [(t[:, 14] > 0).long() for t in targets],
                                              [t[:, 4:14] for t in targets])
    return boxes, lms, has > 0, valid


@pytest.mark.parametrize("empty", [torch.zeros(0, 15), torch.zeros(0, 4), torch.zeros(0)])
def test_image_without_gt(golden, empty):
    g = golden("torch/retina_mnet_c_zero_positives.npz")
    preds, priors, targets = _inputs(g)
    losses = _criterion(g)(preds, priors, [empty])
    assert [v.item() for v in losses] == [0.0, 0.0, 0.0]


def test_faces_without_landmarks(golden):
    """Faces labelled -1 are positives for box and class but carry no landmark loss."""
    g = golden("torch/retina_mnet_a_typical.npz")
    preds, priors, targets = _inputs(g)
    crit = _criterion(g)
    a = crit.loss(*preds, priors, *_padded(targets), return_assignment=True)["assignment"]
    np.testing.assert_array_equal(a.landmark_positive.numpy(), g["mid_pos_landm"])
    assert (a.positive & ~a.landmark_positive).any()
    all_without = [t.clone() for t in targets]
    for t in all_without:
        t[:, 14] = -1
    loss_l, loss_c, loss_landm = crit(preds, priors, all_without)
    assert loss_landm.item() == 0 and torch.isfinite(loss_l) and loss_l.item() > 0


def test_bad_labels_named(golden):
    g = golden("torch/retina_mnet_c_zero_positives.npz")
    preds, priors, targets = _inputs(g)
    bad = targets[0].clone()
    bad[:, 14] = 0
    with pytest.raises(ValueError, match=r"targets\[0\]\[:, 14\]: expected labels 1"):
        _criterion(g)(preds, priors, [bad])
    with pytest.raises(ValueError, match=r"targets\[0\]: expected shape \(n, 15\)"):
        _criterion(g)(preds, priors, [bad[:, :5]])
