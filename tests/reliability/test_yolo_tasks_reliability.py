"""Reliability of the oriented-box YOLO and YOLO26 families (``yolo_obb``, ``yolo26``, ``yolo26_obb``
in :mod:`.cases`): half predictions and bf16 autocast, determinism, a sync-free dense step with
at most one host read when value checks are on, and bad input (NaN angle, negative size, a
4-column box given to the OBB loss). Their ``torch.compile(fullgraph=True)`` and 2-process gloo
gradients are checked with every other family's, in ``test_compile.py`` and ``test_distributed.py``."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import detloss
from .cases import YOLO_TASK_FAMILIES, loss_and_grads, make_case, scalar_items

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from dispatch_count import count_dispatch  # noqa: E402  (the benchmarks' operator counter)

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------ autocast
@pytest.mark.usefixtures("strategy")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", YOLO_TASK_FAMILIES)
@pytest.mark.parametrize("num_gt", [3, 0], ids=["gt3", "gt0"])
def test_half_predictions_close_to_float32(family, dtype, num_gt):
    ref, _ = loss_and_grads(make_case(family, num_gt=num_gt, seed=31))
    case = make_case(family, num_gt=num_gt, seed=31).leaves(dtype)
    out, grads = loss_and_grads(case)
    rtol, atol = (2e-3, 1e-3) if dtype == torch.float16 else (1e-2, 1e-2)
    for k, v in scalar_items(ref).items():
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k]), k
        torch.testing.assert_close(out[k], v, rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    for g, p in zip(grads, case.pred_tensors()):
        assert g.dtype == p.dtype == dtype and torch.isfinite(g.float()).all()


@pytest.mark.parametrize("family", YOLO_TASK_FAMILIES)
def test_cpu_bf16_autocast_and_overflowed_predictions(family):
    ref, ref_grads = loss_and_grads(make_case(family, seed=32))
    case = make_case(family, seed=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = loss_and_grads(case)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-2, atol=1e-2)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # an fp16 overflow (inf logits) and a NaN angle: a non-finite loss, no exception
    case = make_case(family, seed=33, logit_scale=1e6).leaves(torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = case.call()
    assert out["loss"].dtype == torch.float32 and not torch.isfinite(out["loss"])


# --------------------------------------------------------------------------- determinism
@pytest.mark.usefixtures("strategy")
@pytest.mark.parametrize("family", YOLO_TASK_FAMILIES)
def test_two_runs_bitwise_equal_and_degenerate_boxes_finite(family):
    case = make_case(family, batch=3, seed=41, num_gt=[4, 0, 2])
    a, ga = loss_and_grads(case.leaves())
    b, gb = loss_and_grads(case.leaves())
    for k, v in scalar_items(a).items():
        assert torch.equal(v, b[k]), k
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    out, grads = loss_and_grads(make_case(family, seed=42, degenerate=True))
    assert all(torch.isfinite(v) for v in scalar_items(out).values())
    assert all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------- host reads and syncs
@pytest.mark.parametrize("family", YOLO_TASK_FAMILIES)
@pytest.mark.parametrize("checks", [False, True], ids=["no-checks", "checks"])
def test_dense_step_sync_free_and_one_read_with_checks(family, checks):
    previous = detloss.value_checks_enabled()
    detloss.set_value_checks(checks)
    try:
        with detloss.execution_strategy("dense"):
            for num_gt in (3, 0):
                case = make_case(family, num_gt=num_gt)
                loss_and_grads(case)  # once first
                counts = count_dispatch(lambda: loss_and_grads(case))
                assert counts.ops > 0
                assert counts.syncs <= (1 if checks else 0), counts.sync_ops  # the GT checks' one read
                assert not counts.blocking_copies, counts.blocking_copies
    finally:
        detloss.set_value_checks(previous)


# ------------------------------------------------------------------------------ bad input
def _set(index, value_fn):
    def change(case):
        case.args[index] = value_fn(case.args[index].detach().clone())
    return change


def _nan_angle(t):
    t[0, 0, 4] = float("nan")
    return t


def _negative_size(t):
    t[1, 0, 2] = -3.0
    return t


BAD = [
    ("nan-angle", "yolo_obb", _set(5, _nan_angle), r"gt_boxes: expected finite values"),
    ("negative-size", "yolo_obb", _set(5, _negative_size), r"gt_boxes \(w, h\): expected values in \[0, inf\]"),
    ("four-column-box", "yolo_obb", _set(5, lambda t: t[..., :4]), r"gt_boxes: expected rotated boxes .* \(\*, \*, 5\)"),
    ("angle-shape", "yolo_obb", _set(2, lambda t: t[..., :0]), r"angle_pred"),
    ("nan-angle-yolo26", "yolo26_obb", _set(5, _nan_angle), r"gt_boxes: expected finite values"),
    ("four-column-box-yolo26", "yolo26_obb", _set(5, lambda t: t[..., :4]), r"gt_boxes: expected rotated boxes"),
    ("label-range-yolo26", "yolo26", _set(5, lambda t: t + 3), r"gt_labels: expected values in \[0, 2\]"),
    ("unpaired-head", "yolo26", lambda case: case.args.__setitem__(0, case.args[0][0]), r"box_pred"),
]


@pytest.mark.parametrize("name, family, change, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(name, family, change, match):
    case = make_case(family, seed=76)
    case.call()
    change(case)
    with pytest.raises(ValueError, match=match):
        case.call()
