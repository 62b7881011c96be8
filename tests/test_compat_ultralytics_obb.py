"""Drop-ins ``v8OBBLoss`` and ``E2ELoss`` (YOLO26): ultralytics 8.4.190 golden numbers, call forms, bad input."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import detloss.compat.ultralytics as compat
from detloss.compat.ultralytics import E2ELoss, v8DetectionLoss, v8OBBLoss
from conftest import golden_cases

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

OBB_CASES = golden_cases("ultralytics/obb_*.npz")
E2E_CASES = golden_cases("ultralytics/e2e_*.npz")


def f32(v) -> float:
    return float(str(np.float32(v)))


def fake_model(nc=5, reg_max=16, strides=(8.0, 16.0, 32.0), gains=(7.5, 0.5, 1.5, 1.0), epochs=None):
    """The least ultralytics' ``DetectionModel`` / ``OBBModel`` offers the loss."""
    args = types.SimpleNamespace(box=gains[0], cls=gains[1], dfl=gains[2])
    if len(gains) > 3:
        args.angle = gains[3]
    if epochs is not None:
        args.epochs = epochs
    head = types.SimpleNamespace(stride=torch.tensor(strides), nc=nc, reg_max=reg_max)
    weight = torch.nn.Parameter(torch.zeros(1))
    return types.SimpleNamespace(args=args, model=[head], parameters=lambda: iter([weight]))


def golden_batch(g):
    return {k: torch.from_numpy(g[f"in_{k}"]) for k in ("batch_idx", "cls", "bboxes")}


def feats_of(g, b):
    return [torch.zeros(b, 1, int(h), int(w)) for h, w in g["in_feat_hw"]]


@pytest.mark.parametrize("case", OBB_CASES)
def test_obb_golden(golden, case):
    g = golden(f"ultralytics/{case}.npz")
    gains = tuple(f32(v) for v in g["cfg_gains"])
    model = fake_model(int(g["cfg_nc"]), int(g["cfg_reg_max"]), tuple(g["cfg_strides"].tolist()), gains)
    crit = v8OBBLoss(model, int(g["cfg_tal_topk"]), int(g["cfg_tal_topk2"]) or None)
    preds = {k: torch.from_numpy(g[f"in_{k}"]).requires_grad_() for k in ("boxes", "scores", "angle")}
    preds["feats"] = feats_of(g, preds["boxes"].shape[0])
    loss, items = crit(preds, golden_batch(g))
    assert loss.shape == (4,) and not items.requires_grad
    np.testing.assert_allclose(loss.detach().numpy(), g["out_loss"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(items.numpy(), g["out_items"], rtol=1e-5, atol=1e-8)
    loss.sum().backward()
    for key in ("boxes", "scores", "angle"):
        np.testing.assert_allclose(preds[key].grad.numpy(), g[f"out_grad_{key}"], rtol=1e-4, atol=1e-6, err_msg=key)


def e2e_call(g, loss_fn=v8DetectionLoss):
    gains = tuple(f32(v) for v in g["cfg_gains"])
    model = fake_model(int(g["cfg_nc"]), int(g["cfg_reg_max"]), tuple(g["cfg_strides"].tolist()), gains,
                       epochs=int(g["cfg_epochs"]))
    crit = E2ELoss(model, loss_fn)
    for _ in range(int(g["cfg_updates"])):
        crit.update()
    branches = {}
    for branch in ("one2many", "one2one"):
        branches[branch] = {k: torch.from_numpy(g[f"in_{branch}_{k}"]).requires_grad_() for k in ("boxes", "scores")}
        branches[branch]["feats"] = feats_of(g, branches[branch]["boxes"].shape[0])
    return crit, branches, golden_batch(g)


@pytest.mark.parametrize("case", E2E_CASES)
def test_e2e_golden(golden, case):
    g = golden(f"ultralytics/{case}.npz")
    crit, preds, batch = e2e_call(g)
    assert crit.o2m == pytest.approx(float(g["mid_o2m_weight"]), rel=1e-6)
    assert crit.o2o == pytest.approx(float(g["mid_o2o_weight"]), rel=1e-6)
    loss, items = crit(preds, batch)
    np.testing.assert_allclose(loss.detach().numpy(), g["out_loss"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(items.numpy(), g["out_items"], rtol=1e-5, atol=1e-8)
    loss.sum().backward()
    for branch in ("one2many", "one2one"):
        for key in ("boxes", "scores"):
            np.testing.assert_allclose(preds[branch][key].grad.numpy(), g[f"out_grad_{branch}_{key}"],
                                       rtol=1e-4, atol=1e-6, err_msg=f"{branch} {key}")


def test_e2e_is_the_weighted_sum_of_its_branches(golden):
    g = golden("ultralytics/e2e_b_mid_schedule.npz")
    crit, preds, batch = e2e_call(g)
    loss, items = crit((torch.zeros(1), preds), batch)
    many = v8DetectionLoss(fake_model(int(g["cfg_nc"]), 1, gains=(7.5, 0.5, 1.5)), tal_topk=10)
    one = v8DetectionLoss(fake_model(int(g["cfg_nc"]), 1, gains=(7.5, 0.5, 1.5)), tal_topk=7, tal_topk2=1)
    l_many, _ = many(preds["one2many"], batch)
    l_one, i_one = one(preds["one2one"], batch)
    w = max(1 - 4 / 9, 0) * 0.7 + 0.1  # four updates of ten epochs
    torch.testing.assert_close(loss, w * l_many + (1 - w) * l_one)
    torch.testing.assert_close(items, i_one)


def test_update_and_decay_schedule():
    crit = E2ELoss(fake_model(reg_max=1, gains=(7.5, 0.5, 1.5), epochs=6))
    assert (crit.o2m, crit.updates) == (0.8, 0)
    seen = []
    for _ in range(7):
        crit.update()
        seen.append(round(crit.o2m, 6))
        assert crit.o2o == pytest.approx(1 - crit.o2m)
    assert seen == [round(0.8 - 0.7 * min(k, 5) / 5, 6) for k in range(1, 8)]
    assert crit.decay(0) == pytest.approx(0.8) and crit.decay(2.5) == pytest.approx(0.45)
    assert isinstance(crit.one2many, v8DetectionLoss) and crit.one2one.native.assign_options["topk2"] == 1


def test_e2e_with_the_obb_loss(golden):
    """``E2ELoss(model, v8OBBLoss)``: YOLO26-OBB; each branch equals v8OBBLoss on its head."""
    g = golden("ultralytics/obb_a_typical.npz")
    model = fake_model(int(g["cfg_nc"]), 16, epochs=10)
    crit = E2ELoss(model, v8OBBLoss)
    assert isinstance(crit.one2one, v8OBBLoss)
    head = {k: torch.from_numpy(g[f"in_{k}"]) for k in ("boxes", "scores", "angle")}
    head["feats"] = feats_of(g, 2)
    other = {k: (v.flip(-1) if isinstance(v, torch.Tensor) else v) for k, v in head.items()}
    loss, items = crit({"one2many": head, "one2one": other}, golden_batch(g))
    assert loss.shape == (4,) and items.shape == (4,)
    l_many, _ = v8OBBLoss(model, tal_topk=10)(head, golden_batch(g))
    l_one, i_one = v8OBBLoss(model, tal_topk=7, tal_topk2=1)(other, golden_batch(g))
    torch.testing.assert_close(loss, 0.8 * l_many + 0.2 * l_one)
    torch.testing.assert_close(items, i_one)


def small_obb_call(**change):
    crit = v8OBBLoss(fake_model(nc=3))
    feats = [torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 1, 1)]
    preds = {"boxes": torch.randn(2, 64, 21), "scores": torch.randn(2, 3, 21), "angle": torch.randn(2, 1, 21),
             "feats": feats}
    batch = {"batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3, 0.3], [0.3, 0.6, 0.2, 0.2, 1.2]])}
    for key, value in change.items():
        (preds if key in preds else batch)[key] = value
    return crit(preds, batch)


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(bboxes=torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])), r"batch\['bboxes'\].*\(n, 5\)"),
        (dict(bboxes=torch.tensor([[0.5, 0.5, 0.4, 0.3, float("nan")], [0.3, 0.6, 0.2, 0.2, 0.0]])),
         r"batch\['bboxes'\]"),
        (dict(bboxes=torch.tensor([[0.5, 0.5, -0.4, 0.3, 0.1], [0.3, 0.6, 0.2, 0.2, 0.0]])), r"batch\['bboxes'\]"),
        (dict(cls=torch.tensor([[0.0], [3.0]])), r"batch\['cls'\]"),
        (dict(angle=torch.randn(2, 2, 21)), r"preds\['angle'\]"),
        (dict(boxes=torch.randn(2, 64, 20)), r"preds\['boxes'\]"),
    ],
)
def test_obb_bad_input_names_the_argument(change, name):
    small_obb_call()
    with pytest.raises((ValueError, TypeError), match=name):
        small_obb_call(**change)


def test_obb_rotated_box_longer_than_the_image_is_valid():
    """A thin object along the image diagonal: normalised width above 1 is real data, not an error."""
    loss, _ = small_obb_call(bboxes=torch.tensor([[0.5, 0.5, 1.3, 0.05, 0.785], [0.3, 0.6, 0.2, 0.2, 1.2]]))
    assert bool(torch.isfinite(loss).all())


def test_obb_missing_angle_and_e2e_missing_branch():
    feats = [torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 1, 1)]
    batch = {"batch_idx": torch.tensor([0.0]), "cls": torch.tensor([[0.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.3, 0.3]])}
    with pytest.raises(ValueError, match="angle"):
        v8OBBLoss(fake_model(nc=3))({"boxes": torch.randn(2, 64, 21), "scores": torch.randn(2, 3, 21),
                                      "feats": feats}, batch)
    with pytest.raises(ValueError, match="one2one"):
        E2ELoss(fake_model(nc=3, epochs=3), v8OBBLoss)({"one2many": {}}, batch)


def test_nan_angle_prediction_gives_nan_loss_not_an_error():
    loss, _ = small_obb_call(angle=torch.full((2, 1, 21), float("nan")))
    assert not bool(torch.isfinite(loss).all())


def test_module_exports():
    assert set(compat.__all__) == {"E2ELoss", "TaskAlignedAssigner", "v8DetectionLoss", "v8OBBLoss"}
