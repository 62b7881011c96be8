"""The CPU fast paths against their sync-free forms: gathered rows vs masks, topk vs radix
mining, the no-grad ranking cross-entropy, the shared chunked IoU kernel.

On the CPU the SSD / RetinaFace losses gather the selected rows and rank negatives by
:func:`class_cross_entropy_no_grad`; on accelerators and under ``torch.compile`` they use masks. Both must
give the same losses, gradients and assignments.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import detloss
from detloss import boxes as B
from detloss.functional.classification import class_cross_entropy_no_grad
from detloss.functional.selection import RowSelection, gather_matched
from detloss.priors import retinaface_priors

SETTINGS = settings(max_examples=40, deadline=None)


def ssd_batch(seed: int, batch: int, num_gt: int, num_priors: int = 300, num_classes: int = 5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(num_priors, 2, generator=g, dtype=torch.float64)
    size = torch.rand(num_priors, 2, generator=g, dtype=torch.float64) * 0.4 + 0.05
    xy = torch.rand(batch, num_gt, 2, generator=g, dtype=torch.float64) * 0.7
    wh = torch.rand(batch, num_gt, 2, generator=g, dtype=torch.float64) * 0.3 + 0.02
    return dict(
        box_pred=torch.randn(batch, num_priors, 4, generator=g, dtype=torch.float64).to(dtype).requires_grad_(),
        cls_logits=(3 * torch.randn(batch, num_priors, num_classes, generator=g, dtype=torch.float64))
        .to(dtype).requires_grad_(),
        priors=torch.cat((centre, size), -1).to(dtype),
        gt_boxes=torch.cat((xy, xy + wh), -1).to(dtype),
        gt_labels=torch.randint(0, num_classes - 1, (batch, num_gt), generator=g),
        gt_valid=torch.rand(batch, num_gt, generator=g) < 0.7,
    )


def run(loss, x: dict, gather: bool) -> tuple[dict, list]:
    """Loss outputs and input gradients with the gathered (CPU) or the mask (accelerator) form."""
    with detloss.execution_strategy("gathered" if gather else "dense"):
        inputs = {k: (v.detach().clone().requires_grad_() if v.requires_grad else v) for k, v in x.items()}
        out = loss(**inputs, return_assignment=True)
        out["loss"].backward()
    grads = [v.grad for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return out, grads


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(0, 6), st.sampled_from([torch.float32, torch.float64]))
def test_ssd_gathered_equals_masked(seed, batch, num_gt, dtype):
    x = ssd_batch(seed, batch, num_gt, dtype=dtype)
    loss = detloss.SSDLoss(5)
    fast, fast_grads = run(loss, x, True)
    dense, dense_grads = run(loss, x, False)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for key in ("loss_box", "loss_cls", "loss"):
        torch.testing.assert_close(fast[key], dense[key], **tol)
    for a, b in zip(fast_grads, dense_grads):
        torch.testing.assert_close(a, b, **tol)
    fa, da = fast["assignment"], dense["assignment"]
    for field in ("labels", "positive", "negative", "matched_gt"):
        assert torch.equal(getattr(fa, field), getattr(da, field)), field
    torch.testing.assert_close(fa.box_targets, da.box_targets, **tol)
    assert (fa.box_targets[~fa.positive] == 0).all()


def test_retinaface_gathered_equals_masked():
    g = torch.Generator().manual_seed(3)
    priors = retinaface_priors((640, 640))
    p, batch, m = priors.shape[0], 3, 4
    xy = torch.rand(batch, m, 2, generator=g) * 0.6
    wh = torch.rand(batch, m, 2, generator=g) * 0.3 + 0.05
    x = dict(
        box_pred=torch.randn(batch, p, 4, generator=g).requires_grad_(),
        cls_logits=torch.randn(batch, p, 2, generator=g).requires_grad_(),
        landmark_pred=torch.randn(batch, p, 10, generator=g).requires_grad_(),
        priors=priors,
        gt_boxes=torch.cat((xy, xy + wh), -1),
        gt_landmarks=xy.repeat(1, 1, 5) + torch.rand(batch, m, 10, generator=g) * wh.repeat(1, 1, 5),
        gt_has_landmarks=torch.tensor([[True, False, True, True], [False, False, False, False], [True] * 4]),
        gt_valid=torch.tensor([[True, True, True, False], [True, True, False, False], [False] * 4]),
    )
    loss = detloss.RetinaFaceLoss(2)
    fast, fast_grads = run(loss, x, True)
    dense, dense_grads = run(loss, x, False)
    assert fast["assignment"].positive.any() and fast["assignment"].landmark_positive.any()
    for key in ("loss_box", "loss_cls", "loss_landmark", "loss"):
        torch.testing.assert_close(fast[key], dense[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for field in ("landmark_targets", "box_targets"):
        torch.testing.assert_close(getattr(fast["assignment"], field), getattr(dense["assignment"], field))


def test_row_selection_forms_agree():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 7, generator=g) < 0.4
    values = torch.randn(3, 7, 2, generator=g)
    priors = torch.randn(7, 2, generator=g)
    per_gt = torch.randn(3, 4, 2, generator=g)
    matched = torch.randint(-1, 4, (3, 7), generator=g)
    rows, masked = RowSelection(mask, gather=True), RowSelection(mask, gather=False)
    assert rows.weight() is None and torch.equal(masked.weight(1), mask[..., None])
    torch.testing.assert_close(rows.take(values), values[mask])
    torch.testing.assert_close(rows.take_priors(priors), priors.expand(3, 7, 2)[mask])
    torch.testing.assert_close(rows.take_matched(per_gt, matched), gather_matched(per_gt, matched)[mask])
    torch.testing.assert_close(rows.scatter(rows.take(values)), masked.scatter(values))
    empty = RowSelection(torch.zeros(2, 5, dtype=torch.bool), gather=True)
    assert empty.take_matched(torch.zeros(2, 0, 3), torch.full((2, 5), -1)).shape == (0, 3)


@pytest.mark.parametrize("target_class", [0, 7, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_class_cross_entropy_no_grad_matches_stable_form(dtype, target_class):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 30000, 21, generator=g) * 4).to(dtype)  # several chunks
    labels = torch.full(x.shape[:-1], target_class)
    ref = torch.nn.functional.cross_entropy(x.double().flatten(0, 1), labels.flatten(), reduction="none")
    tol = 1e-12 if dtype == torch.float64 else 5e-6
    got = class_cross_entropy_no_grad(x, target_class)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double().flatten(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("extreme", [100.0, -200.0, 3e38])
def test_class_cross_entropy_no_grad_falls_back_on_overflow_and_underflow(extreme):
    x = torch.randn(4, 50, 21, generator=torch.Generator().manual_seed(2))
    x[2, 7] += extreme  # one row overflows (or underflows entirely) without the max shift
    got = class_cross_entropy_no_grad(x, 3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.logsumexp(x, -1) - x[..., 3])


@pytest.mark.parametrize("column, value", [(5, float("-inf")), (5, float("inf")), (3, float("-inf")), (3, float("inf"))])
def test_class_cross_entropy_no_grad_infinite_logits(column, value):
    """An infinite logit gives the stable form's value (-inf elsewhere than the target is a
    probability of 0, finite cross-entropy), not the NaN of the fast path's column pick."""
    x = torch.randn(4, 50, 21, generator=torch.Generator().manual_seed(3))
    x[1, 9, column] = value
    got = class_cross_entropy_no_grad(x, 3)
    torch.testing.assert_close(got, torch.logsumexp(x, -1) - x[..., 3], equal_nan=True)
    assert torch.isfinite(got).sum() == got.numel() - (column == 3 or value > 0)


def test_class_cross_entropy_no_grad_propagates_nan_and_handles_empty():
    x = torch.zeros(2, 3, 4)
    x[1, 2, 0] = float("nan")
    got = class_cross_entropy_no_grad(x, 1)
    assert torch.isnan(got[1, 2]) and torch.isfinite(got[0]).all()
    assert class_cross_entropy_no_grad(torch.zeros(0, 5), 0).shape == (0,)


def _boxes(g, shape, dtype, degenerate=0.1):
    xy = torch.rand(*shape, 2, generator=g, dtype=dtype) * 50
    wh = torch.rand(*shape, 2, generator=g, dtype=dtype) * 20
    wh = torch.where(torch.rand(*shape, 1, generator=g) < degenerate, wh * 1e-5, wh)
    wh = torch.where(torch.rand(*shape, 1, generator=g) < degenerate, torch.zeros_like(wh), wh)
    return torch.cat((xy, xy + wh), -1)


@pytest.mark.parametrize("degenerate_columns", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_pairwise_iou_is_box_iou_bit_for_bit(dtype, degenerate_columns):
    g = torch.Generator().manual_seed(4)
    rows = _boxes(g, (3, 6), dtype)
    columns = _boxes(g, (1, 101), dtype, degenerate=0.1 if degenerate_columns else 0.0)
    rows_valid = torch.rand(3, 6, generator=g) > 0.3
    columns_valid = torch.rand(1, 101, generator=g) > 0.2
    kernel = B.ChunkedPairwiseIoU(rows, columns, rows_valid=rows_valid, columns_valid=columns_valid)
    got = torch.cat([kernel(s, min(s + 17, 101)) for s in range(0, 101, 17)], dim=-1)
    ref = B.box_iou(rows, columns.expand(3, -1, -1))
    valid = rows_valid[:, :, None] & columns_valid[:, None, :]
    assert torch.equal(got[valid], ref[valid])
    assert (got[~valid] <= -1).all() and (got[~valid] >= -4).all()  # shifted by -2 per invalid side


def test_yolo_decode_to_corners_and_coordinate_major_layout_are_exact():
    """The loss decodes every cell straight to corners from a channel-major copy of the head:
    the same numbers, bit for bit, as decoding to centre/size and converting."""
    from detloss import coders
    from detloss.matching.yolo_ignore import yolo_max_iou

    g = torch.Generator().manual_seed(6)
    raw = torch.randn(2, 4, 5, 6, 3, generator=g).permute(0, 2, 3, 4, 1)  # (B, H, W, A, 4) channel-major
    anchors = torch.rand(3, 2, generator=g) * 4 + 0.5
    corners = coders.decode_yolo(raw, anchors, 16, box_format="xyxy")
    assert torch.equal(corners, B.cxcywh_to_xyxy(coders.decode_yolo(raw, anchors, 16)))
    assert corners.stride(-1) != 1  # stays coordinate-major
    # vectorised and strided kernels may round sigmoid / exp differently in the last bit
    interleaved = B.cxcywh_to_xyxy(coders.decode_yolo(raw.contiguous(), anchors, 16))
    torch.testing.assert_close(corners, interleaved, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="box_format"):
        coders.decode_yolo(raw, anchors, 16, box_format="xywh")
    true = torch.cat((torch.rand(2, 4, 2, generator=g) * 80, torch.rand(2, 4, 2, generator=g) * 30 + 1), -1)
    centre = coders.decode_yolo(raw, anchors, 16).reshape(2, -1, 4)
    assert torch.equal(
        yolo_max_iou(corners.reshape(2, -1, 4), true, pred_format="xyxy"), yolo_max_iou(centre, true)
    )
    with pytest.raises(ValueError, match="pred_format"):
        yolo_max_iou(centre, true, pred_format="xywh")


@pytest.mark.parametrize("family", ["ssd", "retinaface", "yolov3"])
@pytest.mark.parametrize("seed", range(3))
def test_cpu_fast_paths_equal_sync_free_paths(family, seed):
    """Every loss with a CPU fast path (gathered rows, topk mining, compacted ignore IoU) gives
    the losses and gradients of its sync-free form, which accelerators and torch.compile run."""
    from reliability.cases import loss_and_grads, make_case

    case = make_case(family, batch=3, num_gt=[4, 0, 7], seed=seed)
    with detloss.execution_strategy("gathered"):
        fast_out, fast_grads = loss_and_grads(case)
    with detloss.execution_strategy("dense"):
        slow_out, slow_grads = loss_and_grads(case)
    for key, value in fast_out.items():
        torch.testing.assert_close(value, slow_out[key], rtol=1e-5, atol=1e-6, msg=key)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
