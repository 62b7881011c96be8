"""Large CPU tensors allocated through NumPy (``detloss._memory``) are ordinary zeroed (or
empty) tensors with the layout torch would give, and the losses that use them compute the same
gradients either way."""
from __future__ import annotations

import pytest
import torch

import detloss
from detloss import _memory
from detloss._memory import new_like
from detloss.functional.focal_chunked import chunked_sigmoid_focal_sum


@pytest.fixture(autouse=True)
def gathered():
    """NumPy memory is a CPU-only path of the "gathered" strategy (see ``detloss.strategy``)."""
    with detloss.execution_strategy("gathered"):
        yield


def _layouts():
    contiguous = torch.randn(2, 5, 7, 3)
    nchw_as_nhwc = torch.randn(2, 3, 5, 7).permute(0, 2, 3, 1)  # a permuted view, as YOLO's NCHW heads
    return {"contiguous": contiguous, "permuted": nchw_as_nhwc}


@pytest.fixture(
    params=[(layout, dtype, threshold) for layout in ("contiguous", "permuted")
            for dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16) for threshold in (0, 1 << 40)],
    ids=lambda p: f"{p[0]}-{str(p[1])[6:]}-{'numpy' if p[2] == 0 else 'torch'}",
)
def like(request, monkeypatch):
    """A tensor of each layout and dtype, with detloss allocating through NumPy or through torch."""
    layout, dtype, threshold = request.param
    monkeypatch.setattr(_memory, "FRESH_MAPPING_BYTES", threshold)
    return _layouts()[layout].to(dtype)


def test_new_like_has_torch_layout_and_zeros(like):
    x = like
    expected = torch.zeros_like(x)
    for zero in (True, False):
        y = new_like(x, zero=zero)
        assert (y.shape, y.stride(), y.dtype, y.device) == (x.shape, expected.stride(), x.dtype, x.device)
        assert not y.requires_grad
        assert y.untyped_storage().nbytes() == x.numel() * x.element_size()
        if zero:
            assert torch.equal(y, expected)
        y.copy_(x)  # writable, and independent of x
        assert torch.equal(y, x) and y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_new_like_small_or_unsupported_tensors_stay_with_torch(monkeypatch):
    monkeypatch.setattr(_memory, "FRESH_MAPPING_BYTES", 1 << 10)
    small = torch.zeros(8)
    assert new_like(small, zero=True).untyped_storage().resizable()
    large = torch.zeros(1024)
    assert not new_like(large, zero=True).untyped_storage().resizable()  # NumPy-owned memory
    assert new_like(large.bfloat16(), zero=True).untyped_storage().resizable()  # no NumPy bfloat16


def _yolo_grads():
    from reliability.cases import loss_and_grads, make_case

    case = make_case("yolov3", batch=2, num_gt=[3, 0], seed=1)
    return loss_and_grads(case)


def test_yolov3_head_gradient_is_the_same_through_numpy_memory(monkeypatch):
    out, grads = _yolo_grads()
    monkeypatch.setattr(_memory, "FRESH_MAPPING_BYTES", 0)
    numpy_out, numpy_grads = _yolo_grads()
    for key, value in out.items():
        assert torch.equal(value, numpy_out[key]), key
    for a, b in zip(grads, numpy_grads):
        assert torch.equal(a, b)


def test_focal_gradient_is_the_same_through_numpy_memory(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 7, generator=gen, dtype=torch.float64)
    target = torch.randint(-1, 7, (300,), generator=gen)
    weight = torch.rand(300, generator=gen, dtype=torch.float64)

    def run():
        x = logits.clone().requires_grad_()
        total = chunked_sigmoid_focal_sum(x, target, weight, chunk_size=64)
        total.backward()
        return total.detach(), x.grad

    expected = run()
    monkeypatch.setattr(_memory, "FRESH_MAPPING_BYTES", 0)
    got = run()
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
