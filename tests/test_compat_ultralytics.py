"""Drop-in ``detloss.compat.ultralytics.v8DetectionLoss``: ultralytics 8.4.190 golden numbers, call forms, bad input."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from detloss.compat.ultralytics import TaskAlignedAssigner, v8DetectionLoss
from conftest import golden_cases

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

V8_CASES = golden_cases("ultralytics/v8_*.npz")


def fake_model(nc=5, reg_max=16, strides=(8.0, 16.0, 32.0), gains=(7.5, 0.5, 1.5), class_weights=None):
    """The least ultralytics' ``DetectionModel`` offers the loss: args, the Detect head, parameters."""
    args = types.SimpleNamespace(box=gains[0], cls=gains[1], dfl=gains[2])
    head = types.SimpleNamespace(stride=torch.tensor(strides), nc=nc, reg_max=reg_max)
    weight = torch.nn.Parameter(torch.zeros(1))
    model = types.SimpleNamespace(args=args, model=[head], parameters=lambda: iter([weight]))
    if class_weights is not None:
        model.class_weights = class_weights
    return model


def golden_call(g):
    gains = tuple(float(str(np.float32(v))) for v in g["cfg_gains"])
    model = fake_model(int(g["cfg_nc"]), int(g["cfg_reg_max"]), tuple(g["cfg_strides"].tolist()), gains)
    crit = v8DetectionLoss(model, int(g["cfg_tal_topk"]), int(g["cfg_tal_topk2"]) or None)
    boxes = torch.from_numpy(g["in_boxes"]).requires_grad_()
    scores = torch.from_numpy(g["in_scores"]).requires_grad_()
    feats = [torch.zeros(boxes.shape[0], 1, int(h), int(w)) for h, w in g["in_feat_hw"]]
    batch = {"batch_idx": torch.from_numpy(g["in_batch_idx"]), "cls": torch.from_numpy(g["in_cls"]),
             "bboxes": torch.from_numpy(g["in_bboxes"])}
    return crit, {"boxes": boxes, "scores": scores, "feats": feats}, batch


@pytest.mark.parametrize("case", V8_CASES)
def test_golden(golden, case):
    g = golden(f"ultralytics/{case}.npz")
    crit, preds, batch = golden_call(g)
    loss, items = crit(preds, batch)
    np.testing.assert_allclose(loss.detach().numpy(), g["out_loss"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(items.numpy(), g["out_items"], rtol=1e-5, atol=1e-8)
    assert not items.requires_grad
    loss.sum().backward()
    np.testing.assert_allclose(preds["boxes"].grad.numpy(), g["out_grad_boxes"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(preds["scores"].grad.numpy(), g["out_grad_scores"], rtol=1e-4, atol=1e-6)


def test_tuple_preds_and_repeat_calls_are_stateless(golden):
    g = golden("ultralytics/v8_a_typical.npz")
    crit, preds, batch = golden_call(g)
    first, _ = crit(preds, batch)
    second, _ = crit((torch.zeros(1), preds), batch)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_unsorted_batch_rows_give_the_same_loss(golden):
    g = golden("ultralytics/v8_a_typical.npz")
    crit, preds, batch = golden_call(g)
    perm = torch.randperm(batch["cls"].shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = {k: v[perm] for k, v in batch.items()}
    # rows are packed per image in their order, as the original's per-image mask does
    keep = torch.sort(shuffled["batch_idx"], stable=True).indices
    grouped = {k: v[keep] for k, v in shuffled.items()}
    torch.testing.assert_close(crit(preds, shuffled)[0], crit(preds, grouped)[0], rtol=0, atol=0)


def test_class_weights_scale_the_class_term(golden):
    g = golden("ultralytics/v8_a_typical.npz")
    crit, preds, batch = golden_call(g)
    base = crit(preds, batch)[1]
    model = fake_model(class_weights=torch.full((5,), 2.0))
    doubled = v8DetectionLoss(model)(preds, batch)[1]
    torch.testing.assert_close(doubled[1], 2 * base[1])
    torch.testing.assert_close(doubled[[0, 2]], base[[0, 2]])


def test_dict_args_are_read():
    model = fake_model()
    model.args = {"box": 1.0, "cls": 2.0, "dfl": 3.0}
    crit = v8DetectionLoss(model)
    assert (crit.native.box_weight, crit.native.cls_weight, crit.native.dfl_weight) == (1.0, 2.0, 3.0)


def small_call(**change):
    crit = v8DetectionLoss(fake_model(nc=3))
    feats = [torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 1, 1)]
    preds = {"boxes": torch.randn(2, 64, 21), "scores": torch.randn(2, 3, 21), "feats": feats}
    batch = {"batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])}
    for key, value in change.items():
        (preds if key in preds else batch)[key] = value
    return crit(preds, batch)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(cls=torch.tensor([[0.0], [3.0]])), r"batch\['cls'\]"),
        (dict(cls=torch.tensor([[0.0], [-1.0]])), r"batch\['cls'\]"),
        (dict(batch_idx=torch.tensor([0.0, 2.0])), r"batch\['batch_idx'\]"),
        (dict(bboxes=torch.tensor([[0.5, 0.5, 0.4, 0.3], [1.5, 0.6, 0.2, 0.2]])), r"batch\['bboxes'\]"),
        (dict(bboxes=torch.tensor([[0.5, 0.5, 0.4, float("nan")], [0.3, 0.6, 0.2, 0.2]])), r"batch\['bboxes'\]"),
        (dict(bboxes=torch.zeros(2, 5)), r"batch\['bboxes'\]"),
        (dict(boxes=torch.randn(2, 64, 20)), r"preds\['boxes'\]"),
        (dict(boxes=torch.randn(2, 60, 21)), r"preds\['boxes'\]"),
        (dict(scores=torch.randn(2, 4, 21)), r"preds\['scores'\]"),
        (dict(feats=[torch.zeros(2, 1, 4, 4)]), r"preds\['feats'\]"),
    ],
)
def test_bad_input_names_the_argument(change, name):
    small_call()
    with pytest.raises((ValueError, TypeError), match=name):
        small_call(**change)


@pytest.mark.parametrize("key", ["boxes", "scores"])
def test_non_finite_predictions_give_a_non_finite_loss_not_an_error(key):
    shape = (2, 64, 21) if key == "boxes" else (2, 3, 21)
    loss, items = small_call(**{key: torch.full(shape, float("nan"))})  # never read on the host: no error
    assert not bool(torch.isfinite(loss).all())


def test_assigner_rejects_bad_labels():
    a = 21
    with pytest.raises(ValueError, match="gt_labels"):
        TaskAlignedAssigner(num_classes=3)(torch.rand(1, a, 3), torch.rand(1, a, 4), torch.rand(a, 2),
                                           torch.tensor([[[5.0]]]), torch.tensor([[[0.0, 0.0, 8.0, 8.0]]]),
                                           torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match="anchor_points"):
        TaskAlignedAssigner(num_classes=3)(torch.rand(1, a, 3), torch.rand(1, a, 4), torch.rand(a + 1, 2),
                                           torch.tensor([[[1.0]]]), torch.tensor([[[0.0, 0.0, 8.0, 8.0]]]),
                                           torch.ones(1, 1, 1))
