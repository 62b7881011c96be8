"""Drop-in ``detloss.compat.detr``: every golden case (all loss entries, total, gradients, the
matcher's pairs on every layer), a user's own matcher, options and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import detloss
from detloss.compat import detr as compat
from detloss.matching import hungarian as H
from oracles import detr as O

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies


def build(g, matcher=None, losses=("labels", "boxes", "cardinality")):
    """The original's objects and arguments for golden case ``g``."""
    cost = [O.cfg_float(v) for v in g["cfg_cost"]]
    w = [O.cfg_float(v) for v in g["cfg_weights"]]
    logits = torch.from_numpy(g["in_pred_logits"]).requires_grad_()
    boxes = torch.from_numpy(g["in_pred_boxes"]).requires_grad_()
    num_layers = logits.shape[0]
    weight_dict = {"loss_ce": w[0], "loss_bbox": w[1], "loss_giou": w[2]}
    for i in range(num_layers - 1):
        weight_dict.update({f"{k}_{i}": v for k, v in list(weight_dict.items())[:3]})
    matcher = compat.HungarianMatcher(*cost) if matcher is None else matcher
    criterion = compat.SetCriterion(int(g["cfg_num_classes"]), matcher, weight_dict, O.cfg_float(g["cfg_eos_coef"]), list(losses))
    outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
               "aux_outputs": [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(num_layers - 1)]}
    targets = [{"labels": torch.from_numpy(g["in_labels"][b, :n]).long(), "boxes": torch.from_numpy(g["in_boxes"][b, :n])}
               for b, n in enumerate(g["in_num_gt"])]
    return criterion, outputs, targets, (logits, boxes), weight_dict


def check_against_golden(g, out, leaves, weight_dict):
    expected = [k[4:] for k in g if k.startswith("out_") and not k.startswith("out_grad") and k != "out_total"]
    assert list(out) == expected  # the original's keys, in its order
    for k, v in out.items():
        np.testing.assert_allclose(v.item(), g[f"out_{k}"], rtol=1e-5, atol=1e-7, err_msg=k)
    assert not out["class_error"].requires_grad and not out["cardinality_error"].requires_grad
    total = sum(weight_dict[k] * out[k] for k in weight_dict)
    np.testing.assert_allclose(total.item(), g["out_total"], rtol=1e-5, atol=1e-7)
    total.backward()
    np.testing.assert_allclose(leaves[0].grad.numpy(), g["out_grad_pred_logits"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(leaves[1].grad.numpy(), g["out_grad_pred_boxes"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", O.DETR_GOLDEN_CASES)
def test_golden_set_criterion(golden, case, monkeypatch):
    g = golden(f"detr/{case}.npz")
    calls = []
    real = H._solve_all
    monkeypatch.setattr(H, "_solve_all", lambda cost, *a: calls.append(tuple(cost.shape)) or real(cost, *a))
    criterion, outputs, targets, leaves, weight_dict = build(g)
    out = criterion(outputs, targets)
    num_layers, batch, q = g["in_pred_logits"].shape[:3]
    assert calls == [(num_layers * batch, q, int(g["in_num_gt"].max()))]  # every layer in one solve
    check_against_golden(g, out, leaves, weight_dict)


@pytest.mark.parametrize("case", O.DETR_GOLDEN_CASES)
def test_golden_matcher_pairs_every_layer(golden, case):
    g = golden(f"detr/{case}.npz")
    criterion, outputs, targets, _, _ = build(g)
    layers = outputs["aux_outputs"] + [outputs]
    for l, layer in enumerate(layers):
        pairs = criterion.matcher({"pred_logits": layer["pred_logits"], "pred_boxes": layer["pred_boxes"]}, targets)
        assert len(pairs) == len(targets)
        for b, (query, gt) in enumerate(pairs):
            n = int(g["in_num_gt"][b])
            assert query.dtype == gt.dtype == torch.int64
            assert torch.equal(query, query.sort().values)  # queries ascending, as SciPy returns them
            expected = {(int(q), int(j)) for q, j in zip(g["mid_match_query"][l, b, :n], g["mid_match_gt"][l, b, :n])}
            assert set(zip(query.tolist(), gt.tolist())) == expected


class PerImageMatcher(torch.nn.Module):
    """A user's own matcher, written as the original: one SciPy call per image, slicing a
    (B * Q) x (all objects) cost (only the costs that this test needs)."""

    def __init__(self, cost_class, cost_bbox, cost_giou):
        super().__init__()
        self.weights = (cost_class, cost_bbox, cost_giou)
        self.calls = 0

    @torch.no_grad()
    def forward(self, outputs, targets):
        self.calls += 1
        batch, q = outputs["pred_logits"].shape[:2]
        prob = outputs["pred_logits"].flatten(0, 1).softmax(-1)
        out_bbox = outputs["pred_boxes"].flatten(0, 1)
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets])
        giou = torch.stack([H.aligned_box_iou_unchecked(H.cxcywh_to_xyxy(out_bbox)[:, None], H.cxcywh_to_xyxy(tgt_bbox)[None], "giou")])[0]
        c = self.weights[1] * torch.cdist(out_bbox, tgt_bbox, p=1) - self.weights[0] * prob[:, tgt_ids] - self.weights[2] * giou
        c = c.view(batch, q, -1)
        sizes = [len(t["boxes"]) for t in targets]
        indices = [linear_sum_assignment(block[i]) for i, block in enumerate(c.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


@pytest.mark.parametrize("case", ["detr_a_typical", "detr_b_image_without_gt", "detr_e_no_aux_other_weights"])
def test_users_own_matcher_called_per_layer(golden, case):
    g = golden(f"detr/{case}.npz")
    matcher = PerImageMatcher(*[O.cfg_float(v) for v in g["cfg_cost"]])
    criterion, outputs, targets, leaves, weight_dict = build(g, matcher=matcher)
    out = criterion(outputs, targets)
    assert matcher.calls == g["in_pred_logits"].shape[0]
    check_against_golden(g, out, leaves, weight_dict)


@pytest.mark.parametrize("losses", [["boxes"], ["cardinality", "labels"], ["labels"]])
def test_subset_of_losses(golden, losses):
    g = golden("detr/detr_a_typical.npz")
    criterion, outputs, targets, _, _ = build(g, losses=losses)
    out = criterion(outputs, targets)
    names = {"labels": ["loss_ce", "class_error"], "boxes": ["loss_bbox", "loss_giou"], "cardinality": ["cardinality_error"]}
    expected = [k for loss in losses for k in names[loss]]
    for i in range(g["in_pred_logits"].shape[0] - 1):
        expected += [f"{k}_{i}" for loss in losses for k in names[loss] if k != "class_error"]
    assert list(out) == expected
    for k, v in out.items():
        np.testing.assert_allclose(v.item(), g[f"out_{k}"], rtol=1e-5, atol=1e-7)


def test_without_aux_outputs_and_empty_targets():
    criterion = compat.SetCriterion(3, compat.HungarianMatcher(1, 5, 2), {"loss_ce": 1}, 0.1, ["labels", "boxes", "cardinality"])
    logits = torch.randn(2, 5, 4, requires_grad=True)
    boxes = torch.rand(2, 5, 4).mul(0.4).add(0.1).requires_grad_()
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert list(out) == ["loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"]
    assert out["loss_bbox"].item() == 0 and out["loss_giou"].item() == 0 and out["class_error"].item() == 100
    assert all(torch.isfinite(v) for v in out.values())


def test_masks_and_unknown_losses_are_errors():
    with pytest.raises(NotImplementedError, match='"masks"'):
        compat.SetCriterion(3, compat.HungarianMatcher(), {}, 0.1, ["labels", "masks"])
    with pytest.raises(ValueError, match=r"losses: expected a subset of \('labels', 'boxes', 'cardinality'\)"):
        compat.SetCriterion(3, compat.HungarianMatcher(), {}, 0.1, ["labels", "box"])
    with pytest.raises(ValueError, match="cost_class, cost_bbox, cost_giou: expected at least one non-zero cost"):
        compat.HungarianMatcher(0, 0, 0)


def test_bad_targets_are_named():
    matcher = compat.HungarianMatcher()
    outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.1}
    with pytest.raises(ValueError, match=r"targets: expected one dict per image \(2\), got 1"):
        matcher(outputs, [{"labels": torch.zeros(1, dtype=torch.int64), "boxes": torch.rand(1, 4)}])
    with pytest.raises(ValueError, match=r'targets\[1\]: expected a dict with "labels" and "boxes"'):
        matcher(outputs, [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}, {"boxes": torch.rand(1, 4)}])
    with pytest.raises(ValueError, match=r"gt_labels: expected values in \[0, 2\]"):
        matcher(outputs, [{"labels": torch.tensor([3]), "boxes": torch.rand(1, 4)}] * 2)


def test_pixel_boxes_refused_with_detr_loss_message():
    """The drop-ins share DETRLoss's ground-truth check: same message for pixel boxes."""
    outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.1}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[320.0, 240.0, 50.0, 40.0]])}] * 2
    messages = []
    for call in (lambda: compat.HungarianMatcher()(outputs, targets),
                 lambda: compat.SetCriterion(3, compat.HungarianMatcher(), {}, 0.1, ["labels"])(outputs, targets),
                 lambda: detloss.DETRLoss(3)(outputs["pred_boxes"][None], outputs["pred_logits"][None],
                                             torch.stack([t["boxes"] for t in targets]),
                                             torch.stack([t["labels"] for t in targets]), torch.ones(2, 1, dtype=torch.bool))):
        with pytest.raises(ValueError, match=r"gt_boxes: expected normalised coordinates") as info:
            call()
        messages.append(str(info.value))
    assert messages[0] == messages[1] == messages[2]
    assert "empty_weight" not in compat.SetCriterion(3, compat.HungarianMatcher(), {}, 0.1, ["labels"]).state_dict()
    assert set(compat.__all__) == {"HungarianMatcher", "SetCriterion", "pad_targets"}


@pytest.mark.parametrize("other_rank_objects", [0, 1, None], ids=["other-empty", "other-one", "other-same"])
@pytest.mark.parametrize("one_local_object", [False, True], ids=["local-all", "local-one"])
def test_num_boxes_under_ddp_as_the_original(golden, monkeypatch, other_rank_objects, one_local_object):
    """The original divides the all-reduced count by the world size, then clamps at 1."""
    import torch.distributed as dist

    g = golden("detr/detr_e_no_aux_other_weights.npz")
    criterion, outputs, targets, _, _ = build(g)
    if one_local_object:  # (1 + 0) / 2 < 1: the clamp decides
        targets = [{"labels": t["labels"][:n], "boxes": t["boxes"][:n]} for t, n in zip(targets, (1, 0))]
    local_total = sum(len(t["labels"]) for t in targets)
    local = criterion(outputs, targets)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    other = local_total if other_rank_objects is None else other_rank_objects
    monkeypatch.setattr(dist, "all_reduce", lambda x, op=None: x.add_(other))
    out = criterion(outputs, targets)
    num_boxes = max((local_total + other) / 2, 1.0)
    for k in ("loss_bbox", "loss_giou"):
        torch.testing.assert_close(out[k], local[k] * local_total / num_boxes)
    torch.testing.assert_close(out["loss_ce"], local["loss_ce"])  # a per-process weighted mean
