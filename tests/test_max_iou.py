"""Max-IoU labelling (RPN / RetinaNet): oracle property tests, ties, chunking, edge cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss.matching.max_iou import max_iou_match
from oracles import two_stage as O



@st.composite
def problems(draw):
    """Integer-grid boxes (so IoU ties are exact in both float64 paths), padded GT."""
    batch = draw(st.integers(1, 2))
    n_a = draw(st.integers(1, 12))
    m = draw(st.integers(0, 4))

    def box():
        x1, y1 = draw(st.integers(0, 12)), draw(st.integers(0, 12))
        return [x1, y1, x1 + draw(st.integers(0, 8)), y1 + draw(st.integers(0, 8))]

    anchors = [box() for _ in range(n_a)]
    gt = [[box() for _ in range(m)] for _ in range(batch)]
    valid = [[draw(st.booleans()) for _ in range(m)] for _ in range(batch)]
    anchor_valid = [draw(st.booleans()) or draw(st.booleans()) for _ in range(n_a)]
    neg = draw(st.sampled_from([0.0, 0.3, 0.4, 0.5]))
    pos = draw(st.sampled_from([p for p in (0.3, 0.5, 0.7) if p >= neg]))
    return (np.array(anchors, float), np.array(gt, float).reshape(batch, m, 4), np.array(valid, bool).reshape(batch, m),
            np.array(anchor_valid), pos, neg)


@settings(max_examples=200, deadline=None)
@given(problems(), st.booleans(), st.booleans(), st.booleans(), st.sampled_from([0.0, 1.0]), st.sampled_from([None, 1, 5]))
def test_matches_oracle(problem, low_quality, zero_iou, clobber, offset, chunk):
    anchors, gt, valid, anchor_valid, pos, neg = problem
    got = max_iou_match(
        torch.tensor(anchors), torch.tensor(gt), torch.tensor(valid), pos_iou=pos, neg_iou=neg,
        allow_low_quality=low_quality, low_quality_zero_iou=zero_iou, clobber_positives=clobber,
        anchor_valid=torch.tensor(anchor_valid), pixel_offset=offset, chunk_size=chunk,
    )
    for b in range(gt.shape[0]):
        labels, matched, best = O.max_iou_labels(
            anchors, gt[b], valid[b], pos, neg, allow_low_quality=low_quality, zero_iou=zero_iou,
            clobber=clobber, anchor_valid=anchor_valid, offset=offset,
        )
        np.testing.assert_array_equal(got.labels[b].numpy(), labels)
        keep = anchor_valid
        np.testing.assert_array_equal(got.max_iou[b].numpy()[keep], best[keep])
        if valid[b].any():
            np.testing.assert_array_equal(got.matched_gt[b].numpy()[keep], matched[keep])


def test_every_tie_is_positive():
    # two anchors tie for the GT's best IoU (1/3 < neg 0.4), a third is lower
    anchors = torch.tensor([[0.0, 0, 10, 10], [10.0, 0, 20, 10], [30.0, 30, 40, 40]])
    gt = torch.tensor([[[5.0, 0, 15, 10]]])
    m = max_iou_match(anchors, gt, torch.ones(1, 1, dtype=torch.bool), pos_iou=0.7, neg_iou=0.4)
    assert m.labels.tolist() == [[1, 1, 0]]
    m = max_iou_match(anchors, gt, torch.ones(1, 1, dtype=torch.bool), pos_iou=0.7, neg_iou=0.4,
                      clobber_positives=True)
    assert m.labels.tolist() == [[0, 0, 0]]


def test_zero_iou_gt_quirk():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]])
    gt = torch.tensor([[[100.0, 100, 110, 110]]])
    valid = torch.ones(1, 1, dtype=torch.bool)
    assert max_iou_match(anchors, gt, valid, pos_iou=0.7, neg_iou=0.3).labels.tolist() == [[0, 0]]
    quirk = max_iou_match(anchors, gt, valid, pos_iou=0.7, neg_iou=0.3, low_quality_zero_iou=True)
    assert quirk.labels.tolist() == [[1, 1]]


def test_no_gt_and_all_invalid():
    anchors = torch.rand(7, 2) * 10
    anchors = torch.cat((anchors, anchors + 5), dim=1)
    for gt, valid in ((torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool)),
                      (torch.rand(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))):
        m = max_iou_match(anchors, gt, valid, pos_iou=0.5, neg_iou=0.4)
        assert m.labels.shape == (2, 7) and bool((m.labels == 0).all())
        assert bool((m.max_iou == 0).all())


def test_padding_rows_do_not_match():
    anchors = torch.tensor([[0.0, 0, 10, 10]])
    gt = torch.tensor([[[0.0, 0, 10, 10], [0.0, 0, 10, 10]]])
    valid = torch.tensor([[False, True]])
    m = max_iou_match(anchors, gt, valid, pos_iou=0.5, neg_iou=0.4)
    assert m.matched_gt.tolist() == [[1]] and m.labels.tolist() == [[1]]


def test_chunking_invariant_and_batched_anchors():
    g = torch.Generator().manual_seed(0)
    xy = torch.randint(0, 90, (60, 2), generator=g).double()
    anchors = torch.cat((xy, xy + torch.randint(1, 30, (60, 2), generator=g)), 1)
    gxy = torch.randint(0, 90, (3, 6, 2), generator=g).double()
    gt = torch.cat((gxy, gxy + torch.randint(1, 40, (3, 6, 2), generator=g)), 2)
    valid = torch.rand(3, 6, generator=g) > 0.3
    full = max_iou_match(anchors, gt, valid, pos_iou=0.5, neg_iou=0.4)
    for chunk in (1, 7, 59):
        part = max_iou_match(anchors.expand(3, -1, -1), gt, valid, pos_iou=0.5, neg_iou=0.4, chunk_size=chunk)
        assert torch.equal(part.labels, full.labels) and torch.equal(part.matched_gt, full.matched_gt)


def test_half_precision_and_errors():
    anchors = torch.tensor([[0.0, 0, 10, 10], [10.0, 0, 20, 10]])
    gt = torch.tensor([[[0.0, 0, 10, 10]]])
    valid = torch.ones(1, 1, dtype=torch.bool)
    m = max_iou_match(anchors.half(), gt.half(), valid, pos_iou=0.5, neg_iou=0.4)
    assert m.max_iou.dtype == torch.float32 and m.labels.tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="gt_valid"):
        max_iou_match(anchors, gt, torch.ones(1, 2, dtype=torch.bool), pos_iou=0.5, neg_iou=0.4)
    with pytest.raises(ValueError, match="neg_iou"):
        max_iou_match(anchors, gt, valid, pos_iou=0.3, neg_iou=0.4)
    with pytest.raises(ValueError, match="anchor_valid"):
        max_iou_match(anchors, gt, valid, pos_iou=0.5, neg_iou=0.4, anchor_valid=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="gt_boxes"):
        max_iou_match(anchors, gt[0], valid, pos_iou=0.5, neg_iou=0.4)


@pytest.mark.parametrize("seed", range(6))
def test_iou_and_ties_equal_box_iou_on_float_boxes(seed):
    """The matcher's chunk IoU is box_iou bit for bit (random float, zero-area and tiny boxes),
    so its maxima, argmaxes and low-quality ties are those of the full box_iou matrix."""
    from detloss import box_iou

    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if seed % 2 else torch.float32

    def boxes(*shape):
        xy = torch.rand(*shape, 2, generator=g, dtype=dtype) * 50
        wh = torch.rand(*shape, 2, generator=g, dtype=dtype) * 20
        wh = torch.where(torch.rand(*shape, 1, generator=g) < 0.1, wh * 1e-5, wh)  # tiny: union <= eps
        wh = torch.where(torch.rand(*shape, 1, generator=g) < 0.1, torch.zeros_like(wh), wh)
        return torch.cat((xy, xy + wh), -1)

    anchors = boxes(97)
    anchors[40:50] = anchors[30:40]  # duplicate anchors: exact ties for some GT's best
    gt = boxes(2, 7)
    gt[1, 3] = anchors[35]  # a GT equal to a duplicated anchor (IoU 1, tied)
    valid = torch.rand(2, 7, generator=g) > 0.2
    anchor_valid = torch.rand(97, generator=g) > 0.1
    got = max_iou_match(anchors, gt, valid, pos_iou=0.5, neg_iou=0.4, anchor_valid=anchor_valid, chunk_size=13)

    iou = box_iou(anchors.expand(2, -1, -1), gt)  # (B, A, M)
    iou = torch.where(valid[:, None, :] & anchor_valid[None, :, None], iou, torch.full_like(iou, -1.0))
    best, arg = iou.max(dim=2)
    keep = anchor_valid.expand(2, -1) & valid.any(dim=1, keepdim=True)
    assert torch.equal(got.max_iou[keep], best[keep])
    assert torch.equal(got.matched_gt[keep], arg[keep])
    gt_best = iou.max(dim=1).values
    tie = ((iou == gt_best[:, None, :]) & (gt_best > 0)[:, None, :]).any(dim=2) & anchor_valid
    assert torch.equal(got.low_quality, tie)
    assert got.low_quality.any()
