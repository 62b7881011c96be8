"""A diverging model is not bad data: an overflowed (inf) or NaN prediction under mixed
precision gives a non-finite loss and never an exception, so that ``GradScaler`` skips the
step (DESIGN: "bad data raises; a diverging model gives NaN").

Every native loss of :mod:`tests.reliability.cases`, under ``torch.autocast`` (CPU, bfloat16),
under both execution strategies. Each prediction tensor in turn is the output of a one-weight
"head" applied to activations that overflowed (inf) or went NaN, as in a real network: the
head's weight gets a non-finite gradient (``d loss / d weight = sum(d loss / d pred *
activation)``), which is what ``GradScaler`` inspects.
"""
from __future__ import annotations

import pytest
import torch

from .cases import FAMILIES, RT_DETR_FAMILIES, YOLO_TASK_FAMILIES, make_case

pytestmark = pytest.mark.usefixtures("strategy", "single_thread")
EVERY_FAMILY = FAMILIES + RT_DETR_FAMILIES + YOLO_TASK_FAMILIES


def _run(family: str, which: int, value: float) -> tuple[torch.Tensor, torch.amp.GradScaler, torch.Tensor]:
    case = make_case(family, num_gt=3, seed=71)
    weights = []

    def head(prediction: torch.Tensor) -> torch.Tensor:
        weight = torch.ones((), requires_grad=True)
        weights.append(weight)
        activation = prediction.detach().clone()
        if len(weights) - 1 == which:
            activation.fill_(value)
        return activation * weight

    case = case.map_preds(head)
    optimizer = torch.optim.SGD(weights, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = case.call()["loss"]  # no exception: predictions are never read on the host
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, scaler, torch.stack([w.detach() for w in weights])


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_non_finite_prediction_gives_non_finite_loss_and_a_skipped_scaler_step(family, value):
    for which in range(len(make_case(family, num_gt=3, seed=71).pred_tensors())):
        loss, scaler, weights = _run(family, which, value)
        assert not torch.isfinite(loss).item(), (family, which)
        assert scaler.get_scale() < 2.0**8, (family, which)  # the step was skipped, the scale backed off
        assert torch.equal(weights, torch.ones_like(weights)), (family, which)  # no weight moved


@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_finite_predictions_take_the_step(family):
    loss, scaler, weights = _run(family, 0, 1.0)
    assert torch.isfinite(loss).item()
    assert scaler.get_scale() == 2.0**8  # the control: the scaler skips only because of the poison
