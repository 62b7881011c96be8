"""The fused chunked focal sum against the element-wise ``functional.sigmoid_focal_loss``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss.functional import sigmoid_focal_loss
from detloss.functional.focal_chunked import chunked_sigmoid_focal_sum

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies


def _reference(x, target, weight, alpha, gamma):
    onehot = F.one_hot(target.clamp(min=0), x.shape[-1]).to(x.dtype) * (target >= 0).unsqueeze(-1)
    return sigmoid_focal_loss(x, onehot, alpha, gamma, weight=weight.unsqueeze(-1).to(x.dtype), reduction="sum")


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 23), classes=st.integers(1, 6), chunk=st.integers(1, 9),
    alpha=st.sampled_from([0.25, 0.5, -1.0, 0.0, 1.0]), gamma=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]),
    scale=st.sampled_from([0.1, 3.0, 30.0]), seed=st.integers(0, 2**16),
)
def test_value_and_gradient_match_sigmoid_focal_loss(rows, classes, chunk, alpha, gamma, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(rows, classes, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.randint(-1, classes, (rows,), generator=g)
    weight = torch.rand(rows, generator=g, dtype=torch.float64) * (torch.rand(rows, generator=g) > 0.2)
    got = chunked_sigmoid_focal_sum(x, target, weight, alpha, gamma, chunk_size=chunk)
    want = _reference(x, target, weight, alpha, gamma)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.tensor(1.7, dtype=torch.float64)
    (g_got,) = torch.autograd.grad(got * upstream, x)
    (g_want,) = torch.autograd.grad(want * upstream, x)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_retained_graph():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(-1, 3, (4, 9), generator=g)
    weight = (torch.rand(4, 9, generator=g) > 0.3).double()
    assert torch.autograd.gradcheck(lambda z: chunked_sigmoid_focal_sum(z, target, weight, 0.3, 1.5, 4), (x,))
    loss = chunked_sigmoid_focal_sum(x, target, weight, chunk_size=4)
    (first,) = torch.autograd.grad(loss * 2, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 3, x)  # the first backward left the buffer intact
    torch.testing.assert_close(first * 1.5, second)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_close_to_float32(dtype):
    g = torch.Generator().manual_seed(4)
    x32 = 4 * torch.randn(50, 7, generator=g)
    target = torch.randint(-1, 7, (50,), generator=g)
    weight = torch.ones(50)
    x = x32.to(dtype).requires_grad_()
    got = chunked_sigmoid_focal_sum(x, target, weight, chunk_size=8)
    assert got.dtype == torch.float32
    ref = x.detach().float().requires_grad_()
    want = _reference(ref, target, weight, 0.25, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (g_got,) = torch.autograd.grad(got, x)
    (g_want,) = torch.autograd.grad(want, ref)
    assert g_got.dtype == dtype
    torch.testing.assert_close(g_got.float(), g_want, rtol=1e-2, atol=1e-3)


def test_no_grad_value_and_extremes_finite():
    x = torch.tensor([[-1e4, 1e4, 0.0], [50.0, -50.0, 20.0]], requires_grad=True)
    target = torch.tensor([1, 0])
    weight = torch.ones(2)
    with torch.no_grad():
        plain = chunked_sigmoid_focal_sum(x, target, weight)
    got = chunked_sigmoid_focal_sum(x, target, weight, chunk_size=1)
    torch.testing.assert_close(plain, got)
    torch.testing.assert_close(got, _reference(x.detach(), target, weight, 0.25, 2.0))
    got.backward()
    assert torch.isfinite(x.grad).all()


def test_empty_rows_and_default_chunk():
    x = torch.zeros(0, 5, requires_grad=True)
    out = chunked_sigmoid_focal_sum(x, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert out.item() == 0.0
    out.backward()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 40, generator=g, dtype=torch.float64)  # more than one default chunk
    target = torch.randint(-1, 40, (3000,), generator=g)
    torch.testing.assert_close(
        chunked_sigmoid_focal_sum(x, target, torch.ones(3000)), _reference(x, target, torch.ones(3000), 0.25, 2.0)
    )
