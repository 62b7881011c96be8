"""Mixed precision: half / bfloat16 predictions and CPU bfloat16 autocast, every native loss.

Promise (also in README "Reliability promises"): with float16 or bfloat16 predictions, or
float32 predictions under ``torch.autocast("cpu", dtype=torch.bfloat16)``, every component of
every native composite loss is finite, is returned as float32, and lies within the tolerance
below of the float32 result on the same (unrounded) predictions; gradients are finite and have
the predictions' dtype. Box maths and reductions run in float32.
"""
from __future__ import annotations

import pytest
import torch

from .cases import FAMILIES, loss_and_grads, make_case, scalar_items

pytestmark = pytest.mark.usefixtures("strategy", "single_thread")  # every test under both execution strategies


# (rtol, atol) per prediction dtype, the same for every family: rounding the predictions to
# float16 (11-bit mantissa) or bfloat16 (8-bit) moves each loss by well under these.
TOLERANCE = {
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
FAMILY_TOLERANCE = {family: TOLERANCE for family in FAMILIES}


def _reference(family: str, **kw):
    return loss_and_grads(make_case(family, **kw))


def _check(out: dict, ref: dict, tol: tuple[float, float]) -> None:
    rtol, atol = tol
    for k, v in scalar_items(ref).items():
        got = out[k]
        assert got.dtype == torch.float32, f"{k}: {got.dtype}"
        assert torch.isfinite(got), k
        torch.testing.assert_close(got, v, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_gt", [3, 0], ids=["gt3", "gt0"])
def test_half_predictions_close_to_float32(family, dtype, num_gt):
    ref, _ = _reference(family, num_gt=num_gt, seed=31)
    case = make_case(family, num_gt=num_gt, seed=31).leaves(dtype)
    out, grads = loss_and_grads(case)
    _check(out, ref, FAMILY_TOLERANCE[family][dtype])
    for g, p in zip(grads, case.pred_tensors()):
        assert g.dtype == p.dtype == dtype
        assert torch.isfinite(g.float()).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_bf16_autocast_close_to_float32(family):
    ref, ref_grads = _reference(family, seed=32)
    case = make_case(family, seed=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = loss_and_grads(case)
    _check(out, ref, FAMILY_TOLERANCE[family][torch.bfloat16])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("family", ["retinanet", "rpn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_large_pixel_boxes_with_half_predictions(family, dtype):
    """A 2560-pixel image: areas ~6e6 overflow float16 (max 65504) unless the IoU runs in float32."""
    scale = 40.0
    case = make_case(family, seed=33)
    case.args[2] = case.args[2] * scale  # anchors
    case.args[3] = case.args[3] * scale  # GT boxes
    if family == "rpn":
        case.args[5] = (64 * scale, 64 * scale)
    ref = scalar_items(case.call(return_assignment=False))
    ref_assignment = case.call(return_assignment=True)["assignment"]
    half = case.leaves(dtype)
    out, grads = loss_and_grads(half)
    _check(out, ref, TOLERANCE[dtype])
    assert torch.equal(half.call(return_assignment=True)["assignment"].labels, ref_assignment.labels)
    assert all(torch.isfinite(g.float()).all() for g in grads)
