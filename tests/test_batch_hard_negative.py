"""Batch-wide hard negative mining (``detloss.sampling.batch_hard_negative``) against the oracle."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss.sampling.batch_hard_negative import mine_hard_negatives_batchwide
from oracles import ssd_keras as O


SETTINGS = settings(max_examples=200, deadline=None)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    b=st.integers(1, 4),
    p=st.integers(0, 12),
    levels=st.sampled_from([0, 1, 3, 1000]),  # 0: all-zero losses; small: many ties
    neg_density=st.sampled_from([0.0, 0.5, 1.0]),
    n_pos=st.one_of(st.integers(0, 6), st.floats(0, 6)),
    ratio=st.sampled_from([0, 1, 3, 2.5]),
    n_min=st.integers(0, 60),
)
def test_equals_oracle(seed, b, p, levels, neg_density, n_pos, ratio, n_min):
    rng = np.random.default_rng(seed)
    loss = rng.integers(0, levels + 1, size=(b, p)) / max(levels, 1)
    negative = rng.random((b, p)) < neg_density
    got = mine_hard_negatives_batchwide(
        torch.tensor(loss, dtype=torch.float32), torch.tensor(negative), n_pos, neg_pos_ratio=ratio, min_negatives=n_min
    )
    want = O.batchwide_keep(loss, negative, n_pos, ratio, n_min)
    np.testing.assert_array_equal(got.numpy(), want)
    nonzero = int(np.count_nonzero(np.where(negative, loss, 0)))
    expected_k = min(max(int(ratio * int(n_pos)), n_min), nonzero)
    assert int(got.sum()) == expected_k
    assert not bool((got & ~torch.tensor(negative)).any())


def test_all_zero_losses_keep_nothing():
    keep = mine_hard_negatives_batchwide(torch.zeros(3, 5), torch.ones(3, 5, dtype=torch.bool), 4, min_negatives=10)
    assert not keep.any()


def test_min_negatives_larger_than_available_keeps_every_nonzero_negative():
    loss = torch.tensor([[0.5, 0.0, 0.2], [0.0, 0.0, 0.9]])
    negative = torch.tensor([[True, True, False], [True, False, True]])
    keep = mine_hard_negatives_batchwide(loss, negative, 0, min_negatives=100)
    np.testing.assert_array_equal(keep.numpy(), O.batchwide_keep(loss.numpy(), negative.numpy(), 0, 3, 100))
    assert keep.tolist() == [[True, False, False], [False, False, True]]


def test_one_image_can_take_all_negatives():
    loss = torch.tensor([[0.1, 0.1, 0.1, 0.1], [5.0, 4.0, 3.0, 2.0]])
    keep = mine_hard_negatives_batchwide(loss, torch.ones(2, 4, dtype=torch.bool), torch.tensor(1.0))
    assert keep.sum(1).tolist() == [0, 3]


def test_tensor_count_and_gradient_free():
    loss = torch.rand(2, 6, requires_grad=True)
    keep = mine_hard_negatives_batchwide(loss, torch.ones(2, 6, dtype=torch.bool), torch.tensor(2.7))
    assert keep.dtype == torch.bool and not keep.requires_grad and int(keep.sum()) == 6


@pytest.mark.slow
def test_compiles_without_graph_break():
    fn = torch.compile(mine_hard_negatives_batchwide, fullgraph=True, dynamic=False)
    loss, neg = torch.rand(2, 9), torch.rand(2, 9) > 0.3
    torch.testing.assert_close(fn(loss, neg, torch.tensor(2.0)), mine_hard_negatives_batchwide(loss, neg, 2.0))


@pytest.mark.parametrize(
    "args, kwargs, exc, text",
    [
        ((torch.zeros(2, 3, 1), torch.ones(2, 3, dtype=torch.bool), 1), {}, ValueError, "neg_loss"),
        ((torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.bool), 1), {}, TypeError, "neg_loss"),
        ((torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool), 1), {}, ValueError, "negative"),
        ((torch.zeros(2, 3), torch.ones(2, 3), 1), {}, TypeError, "negative"),
        ((torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 1), {"neg_pos_ratio": -1}, ValueError, "neg_pos_ratio"),
        ((torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 1), {"min_negatives": -2}, ValueError, "min_negatives"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, exc, text):
    with pytest.raises(exc, match=text):
        mine_hard_negatives_batchwide(*args, **kwargs)
