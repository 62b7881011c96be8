"""Fixed-size balanced sampling: counts by the original's rule, subset, reproducibility, uniformity."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss.sampling.balanced import sample_balanced



def _labels(n_pos: int, n_neg: int, n_ign: int, seed: int = 0) -> torch.Tensor:
    row = torch.tensor([1] * n_pos + [0] * n_neg + [-1] * n_ign, dtype=torch.long)
    return row[torch.randperm(row.numel(), generator=torch.Generator().manual_seed(seed))]


def _expected_counts(n_pos: int, n_neg: int, size: int, frac: float) -> tuple[int, int]:
    """tf-faster-rcnn: keep int(frac * size) positives at most, then size - kept negatives."""
    keep_pos = min(n_pos, int(frac * size))
    return keep_pos, min(n_neg, size - keep_pos)


@pytest.mark.parametrize("n_pos,n_neg", [(0, 500), (3, 500), (400, 500), (0, 0), (10, 20), (300, 2)])
def test_counts(n_pos, n_neg):
    labels = torch.stack([_labels(n_pos, n_neg, 50, s) for s in range(3)])
    out = sample_balanced(labels, 256, 0.5, torch.Generator().manual_seed(1))
    want = _expected_counts(n_pos, n_neg, 256, 0.5)
    assert ((out == 1).sum(1) == want[0]).all() and ((out == 0).sum(1) == want[1]).all()
    kept = out >= 0
    assert torch.equal(out[kept], labels[kept])  # only drops, never relabels


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 10)), min_size=1, max_size=3),
    st.integers(0, 64),
    st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    st.integers(0, 2**31 - 1),
)
def test_counts_property(rows, size, frac, seed):
    width = max(p + n + i for p, n, i in rows)
    labels = torch.stack([torch.cat((_labels(p, n, i, seed), torch.full((width - p - n - i,), -1))) for p, n, i in rows])
    out = sample_balanced(labels, size, frac, torch.Generator().manual_seed(seed))
    for (p, n, _), row, src in zip(rows, out, labels):
        kp, kn = _expected_counts(p, n, size, frac)
        assert int((row == 1).sum()) == kp and int((row == 0).sum()) == kn
        assert bool((src[row >= 0] == row[row >= 0]).all())


def test_reproducible_with_generator():
    labels = torch.stack([_labels(200, 800, 100, s) for s in range(2)])
    a = sample_balanced(labels, 256, 0.5, torch.Generator().manual_seed(42))
    b = sample_balanced(labels, 256, 0.5, torch.Generator().manual_seed(42))
    c = sample_balanced(labels, 256, 0.5, torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_uniform_selection():
    """Each of 20 positives is kept with probability 5/20 (quota 5); binomial 6-sigma band."""
    labels = _labels(20, 30, 0).unsqueeze(0).expand(400, -1).contiguous()
    out = sample_balanced(labels, 10, 0.5, torch.Generator().manual_seed(0))
    freq = (out == 1).sum(0)[labels[0] == 1].double()
    n, p = 400, 5 / 20
    assert bool(((freq - n * p).abs() < 6 * math.sqrt(n * p * (1 - p))).all())


def test_errors():
    with pytest.raises(TypeError, match="labels"):
        sample_balanced(torch.zeros(2, 3), 4, 0.5)
    with pytest.raises(ValueError, match="labels"):
        sample_balanced(torch.zeros(3, dtype=torch.long), 4, 0.5)
    with pytest.raises(ValueError, match="labels"):
        sample_balanced(torch.tensor([[0, 2]]), 4, 0.5)
    with pytest.raises(ValueError, match="positive_fraction"):
        sample_balanced(torch.tensor([[0, 1]]), 4, 1.5)
