"""``detloss.mine_hard_negatives`` / ``top_k_mask``: the double-argsort rule, golden negatives, properties."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import mine_hard_negatives, top_k_mask
from detloss.sampling import hard_negative
from oracles import ssd as O

pytestmark = pytest.mark.usefixtures("strategy")  # every test under both execution strategies

SETTINGS = settings(max_examples=200, deadline=None)


def double_argsort(values: torch.Tensor, k: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """The originals' rule: stable descending sort of the eligible values, rank < k."""
    order = values.double().sort(dim=1, descending=True, stable=True)[1]
    # then eligible entries first, keeping the value order (a second stable sort)
    order = order.gather(1, (~eligible).gather(1, order).to(torch.uint8).sort(dim=1, stable=True)[1])
    rank = order.sort(dim=1)[1]
    return (rank < torch.minimum(k, eligible.sum(1))[:, None]) & eligible


@st.composite
def value_rows(draw):
    rows = draw(st.integers(1, 4))
    n = draw(st.integers(1, 70))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    kind = draw(st.sampled_from(["normal", "ties", "tiny", "huge", "signed_zero"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "normal":
        v = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    elif kind == "ties":
        v = torch.randint(-2, 3, (rows, n), generator=gen).double()
    elif kind == "tiny":
        v = torch.randn(rows, n, generator=gen, dtype=torch.float64) * 1e-40
    elif kind == "huge":
        v = torch.randn(rows, n, generator=gen, dtype=torch.float64) * 1e30
    else:
        v = torch.where(torch.rand(rows, n, generator=gen) < 0.5, -0.0, 0.0).double()
    v = v.to(dtype)
    k = torch.randint(-1, n + 3, (rows,), generator=gen)
    eligible = torch.rand(rows, n, generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    return v, k, eligible


# the module runs under both strategies (radix select, grouped topk); "one group per count"
# forces the grouping that rows of very different counts get at full size
@pytest.mark.parametrize("one_group_per_count", [False, True])
@SETTINGS
@given(rows=value_rows())
def test_top_k_mask_equals_double_argsort(rows, one_group_per_count):
    v, k, eligible = rows
    cost = 0 if one_group_per_count else hard_negative._TOPK_GROUP_COST
    with mock.patch.object(hard_negative, "_TOPK_GROUP_COST", cost):
        got = top_k_mask(v, k, eligible)
    ref = double_argsort(v.float() if v.dtype in (torch.float16, torch.bfloat16) else v, k, eligible)
    assert torch.equal(got, ref)
    assert torch.equal(got.sum(1), torch.minimum(k.clamp(min=0), eligible.sum(1)))


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 80), st.sampled_from([0, 1, 3, 7, 2.5]), st.integers(0, 2**31 - 1))
def test_mining_matches_loop_oracle(b, p, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    loss = torch.rand(b, p, generator=gen, dtype=torch.float64) * 5
    positive = torch.rand(b, p, generator=gen) < torch.rand(b, 1, generator=gen)
    neg = mine_hard_negatives(loss, positive, neg_pos_ratio=ratio)
    for i in range(b):
        ref = O.mine(loss[i].numpy(), positive[i].numpy(), ratio)
        np.testing.assert_array_equal(neg[i].numpy(), ref)
    assert not (neg & positive).any()
    expected = torch.minimum(torch.floor(positive.sum(1) * ratio).long().clamp(max=p - 1), (~positive).sum(1))
    assert torch.equal(neg.sum(1), expected)


@pytest.mark.parametrize("case, ratio", [("ssd300_voc_a_typical", 3), ("ssd300_voc_d_30_gts", 3), ("retina_mnet_a_typical", 7)])
def test_golden_negatives_from_golden_assignment(golden, case, ratio):
    """With the golden positives and labels, mining the stable per-row cross-entropy selects exactly
    the original's negatives (its global-max logsumexp differs only in rounding)."""
    g = golden(f"torch/{case}.npz")
    conf = torch.from_numpy(g["in_conf_data"])
    labels = torch.from_numpy(g["mid_conf_t"]).clamp(0, 1) if "retina" in case else torch.from_numpy(g["mid_conf_t"])
    ce = torch.nn.functional.cross_entropy(conf.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    neg = mine_hard_negatives(ce, torch.from_numpy(g["mid_pos"]), neg_pos_ratio=ratio)
    np.testing.assert_array_equal(neg.numpy(), g["mid_neg"])


def test_positives_never_counted_twice():
    """Pain point: positives in the negative set. Even when every entry ties at 0 (the original's
    zeroed positives), positives are excluded and the count stays min(ratio * pos, negatives)."""
    loss = torch.zeros(2, 10)
    positive = torch.zeros(2, 10, dtype=torch.bool)
    positive[0, :3] = True
    positive[1, 5:] = True
    neg = mine_hard_negatives(loss, positive, neg_pos_ratio=3)
    assert not (neg & positive).any()
    assert neg.sum(1).tolist() == [7, 5]
    assert neg[0].tolist() == [False] * 3 + [True] * 7  # ties: lowest index first


def test_caps_and_candidates():
    loss = torch.arange(20.0).flip(0)[None].repeat(2, 1)
    positive = torch.zeros(2, 20, dtype=torch.bool)
    positive[:, 0] = True
    assert mine_hard_negatives(loss, positive, neg_pos_ratio=100).sum(1).tolist() == [19, 19]  # P - 1
    assert mine_hard_negatives(loss, positive, neg_pos_ratio=5, max_negatives=2).sum(1).tolist() == [2, 2]
    cand = torch.ones(2, 20, dtype=torch.bool)
    cand[:, 1:3] = False
    neg = mine_hard_negatives(loss, positive, neg_pos_ratio=2, candidates=cand)
    assert neg[0].nonzero().flatten().tolist() == [3, 4]
    none = mine_hard_negatives(loss, torch.zeros(2, 20, dtype=torch.bool))
    assert not none.any()


def test_bad_inputs_named():
    with pytest.raises(ValueError, match=r"positive: expected shape \(B=2, P=5\)"):
        mine_hard_negatives(torch.zeros(2, 5), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mining_loss: expected a floating"):
        mine_hard_negatives(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="neg_pos_ratio"):
        mine_hard_negatives(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool), neg_pos_ratio=-1)
