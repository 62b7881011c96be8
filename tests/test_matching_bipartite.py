"""``detloss.match_priors``: golden matches, the float64 loop oracle, forcing rules, chunking, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import match_priors, pad_ground_truth
from detloss.matching.bipartite import FORCED_IOU
from oracles import ssd as O
from test_ssd_loss import small_priors


SETTINGS = settings(max_examples=200, deadline=None)
GOLDEN = [
    ("ssd300_voc_a_typical", {}),
    ("ssd300_voc_b_forced_match", {}),
    ("ssd300_voc_b2_tiny_rounding_tie", {}),
    ("ssd300_voc_c_tie_last_gt_wins", {}),
    ("ssd300_voc_d_30_gts", {}),
    ("ssd300_voc_e_batch1_single_gt", {}),
    ("retina_mnet_a_typical", dict(min_best_iou=0.2, ignored_gt_claims_prior=True)),
    ("retina_mnet_b_image_all_ignored", dict(min_best_iou=0.2, ignored_gt_claims_prior=True)),
    ("retina_mnet_c_zero_positives", dict(min_best_iou=0.2, ignored_gt_claims_prior=True)),
]


def _golden_inputs(g):
    t = torch.from_numpy(g["in_targets"])
    valid = torch.arange(t.shape[1])[None] < torch.from_numpy(g["in_num_gt"])[:, None]
    return torch.from_numpy(g["in_priors"]), t[..., :4].contiguous(), valid


@pytest.mark.parametrize("case, options", GOLDEN)
def test_golden(golden, case, options):
    g = golden(f"torch/{case}.npz")
    priors, boxes, valid = _golden_inputs(g)
    r = match_priors(priors, boxes, valid, pos_iou=float(g["cfg_overlap_thresh"]), drop_degenerate_gt=False, **options)
    np.testing.assert_array_equal(r.positive.numpy(), g["mid_pos"])
    np.testing.assert_array_equal(r.matched_gt.numpy(), g["mid_best_truth_idx"])
    np.testing.assert_array_equal(r.matched_iou.numpy(), g["mid_best_truth_overlap"])
    v = valid.numpy()
    np.testing.assert_array_equal(r.best_prior.numpy()[v], g["mid_best_prior_idx"][v])
    np.testing.assert_array_equal(r.best_prior_iou.numpy()[v], g["mid_best_prior_overlap"][v])
    assert (r.best_prior_iou.numpy()[~v] == -1).all()


def test_golden_c_later_gt_wins_and_identical_boxes(golden):
    """Golden ``c``: image 0, the later of two nested GTs takes the shared best prior; image 1, of two
    identical GTs every ordinary match goes to the first and only the shared best prior to the last."""
    g = golden("torch/ssd300_voc_c_tie_last_gt_wins.npz")
    priors, boxes, valid = _golden_inputs(g)
    r = match_priors(priors, boxes, valid, pos_iou=0.5)
    bp = g["mid_best_prior_idx"]
    shared = bp[0, 0]
    assert bp[0, 1] == shared and r.matched_gt[0, shared] == 1 and r.forced[0, shared]
    same = np.nonzero((g["in_targets"][1, :, :4] == g["in_targets"][1, 0, :4]).all(1))[0]
    first, last = same[0], same[-1]
    pos1 = r.positive[1].numpy()
    gt1 = r.matched_gt[1].numpy()
    assert set(gt1[pos1 & (gt1 != last)]) <= set(range(int(g["in_num_gt"][1]))) - {last}
    assert (gt1 == last).sum() == 1 and gt1[bp[1, last]] == last
    assert (gt1[pos1] == first).sum() >= 1


def test_chunked_equals_whole(golden):
    g = golden("torch/ssd300_voc_d_30_gts.npz")
    priors, boxes, valid = _golden_inputs(g)
    whole = match_priors(priors, boxes, valid, pos_iou=0.5, chunk_size=priors.shape[0])
    for chunk in (2000, 3001):
        part = match_priors(priors, boxes, valid, pos_iou=0.5, chunk_size=chunk)
        for name in ("matched_gt", "matched_iou", "positive", "forced", "best_prior", "best_prior_iou"):
            assert torch.equal(getattr(whole, name), getattr(part, name)), name


def test_chunk_boundary_first_max_kept():
    """A GT whose maximal IoU occurs in two chunks keeps the first index."""
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 5, dtype=torch.float64)
    gt = torch.tensor([[[0.4, 0.4, 0.6, 0.6]]], dtype=torch.float64)
    r = match_priors(priors, gt, torch.ones(1, 1, dtype=torch.bool), pos_iou=0.5, chunk_size=2)
    assert r.best_prior[0, 0] == 0 and r.forced[0].tolist() == [True, False, False, False, False]


def test_large_prior_set_bounded_memory():
    """200k priors x 100 GTs x 2 images would be 160 MB of IoU at once; chunked it still runs."""
    gen = torch.Generator().manual_seed(0)
    p, m = 200_000, 100
    c = torch.rand(p, 2, generator=gen)
    priors = torch.cat([c, torch.rand(p, 2, generator=gen) * 0.2 + 0.01], 1)
    xy = torch.rand(2, m, 2, generator=gen) * 0.8
    gt = torch.cat([xy, xy + 0.1], -1)
    r = match_priors(priors, gt, torch.ones(2, m, dtype=torch.bool), pos_iou=0.5)
    assert r.forced.sum(1).min() >= 1 and r.positive.shape == (2, p)


def test_padding_never_matches_and_empty():
    priors = small_priors().float()
    gt = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5]]])
    r = match_priors(priors, gt, torch.tensor([[False, True]]), pos_iou=0.5)
    assert (r.matched_gt[r.positive] == 1).all() and r.best_prior_iou[0, 0] == -1
    none = match_priors(priors, gt, torch.zeros(1, 2, dtype=torch.bool), pos_iou=0.5)
    assert not none.positive.any() and (none.matched_gt == -1).all() and (none.matched_iou == 0).all()
    empty = match_priors(priors, torch.zeros(3, 0, 4), torch.zeros(3, 0, dtype=torch.bool), pos_iou=0.5)
    assert empty.positive.shape == (3, priors.shape[0]) and empty.best_prior.shape == (3, 0)
    assert not empty.positive.any()


def test_neg_iou_band():
    priors = small_priors().float()
    gt = torch.tensor([[[0.1, 0.1, 0.5, 0.5]]])
    r = match_priors(priors, gt, torch.ones(1, 1, dtype=torch.bool), pos_iou=0.5, neg_iou=0.2)
    iou = r.matched_iou
    torch.testing.assert_close(r.ignore, (iou >= 0.2) & (iou < 0.5))
    assert not (r.ignore & r.positive).any() and r.ignore.any()
    with pytest.raises(ValueError, match="neg_iou"):
        match_priors(priors, gt, torch.ones(1, 1, dtype=torch.bool), pos_iou=0.5, neg_iou=0.6)


def test_xyxy_priors_format():
    priors = small_priors().float()
    gt = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.3, 0.5, 0.9, 0.9]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    a = match_priors(priors, gt, valid, pos_iou=0.5)
    from detloss import cxcywh_to_xyxy
    b = match_priors(cxcywh_to_xyxy(priors), gt, valid, pos_iou=0.5, priors_format="xyxy")
    assert torch.equal(a.matched_gt, b.matched_gt) and torch.equal(a.positive, b.positive)


def test_later_wins_is_not_scatter_order():
    """Many GTs share one best prior (identical boxes): the last valid one wins, whatever the
    layout of the batch (padding in between, several images)."""
    priors = small_priors().float()
    box = torch.tensor([0.2, 0.2, 0.45, 0.45])
    gt = box.expand(4, 9, 4).clone()
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[1, 8] = False
    valid[2, 3:] = False
    r = match_priors(priors, gt, valid, pos_iou=0.5)
    last = torch.tensor([8, 7, 2, 8])
    shared = r.best_prior[:, 0]
    assert torch.equal(r.matched_gt[torch.arange(4), shared], last)
    assert (r.matched_iou[torch.arange(4), shared] == FORCED_IOU).all()


@st.composite
def gt_batches(draw):
    b = draw(st.integers(1, 3))
    counts = [draw(st.sampled_from([0, 1, 2, 4, 33])) for _ in range(b)]
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["random", "tiny", "duplicate", "degenerate", "grid"]))
    gen = torch.Generator().manual_seed(seed)
    boxes = []
    for n in counts:
        if kind == "grid":  # on the prior grid: many exact IoU ties
            xy = torch.randint(0, 6, (n, 2), generator=gen).double() / 6
            box = torch.cat([xy, xy + torch.randint(1, 4, (n, 2), generator=gen).double() / 6], 1).clamp(max=1)
        else:
            xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.8
            wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.5 + 0.01
            wh = wh * (0.04 if kind == "tiny" else 1.0)
            box = torch.cat([xy, (xy + wh).clamp(max=1)], 1)
        if kind == "duplicate" and n >= 2:
            box[1::2] = box[0::2][: box[1::2].shape[0]]
        if kind == "degenerate" and n >= 1:
            box[0, 2] = box[0, 0]
        boxes.append(box)
    gt, _, valid = pad_ground_truth(boxes, [torch.zeros(len(x), dtype=torch.long) for x in boxes])
    options = draw(st.sampled_from([
        dict(pos_iou=0.5),
        dict(pos_iou=0.35, min_best_iou=0.2),
        dict(pos_iou=0.35, min_best_iou=0.2, ignored_gt_claims_prior=True, drop_degenerate_gt=False),
        dict(pos_iou=0.5, drop_degenerate_gt=False),
    ]))
    return gt, valid, options


@SETTINGS
@given(gt_batches())
def test_matches_loop_oracle(batch):
    gt, valid, options = batch
    priors = small_priors()
    r = match_priors(priors, gt, valid, **options)
    for i in range(gt.shape[0]):
        keep = valid[i].numpy()
        ref_gt, ref_iou, ref_pos = O.match_image(priors.numpy(), gt[i].numpy()[keep], **options)
        slots = np.nonzero(keep)[0]
        ref_gt = np.where(ref_gt >= 0, slots[np.maximum(ref_gt, 0)] if len(slots) else -1, -1)
        np.testing.assert_array_equal(r.positive[i].numpy(), ref_pos)
        np.testing.assert_array_equal(r.matched_gt[i].numpy(), ref_gt)
        np.testing.assert_array_equal(r.matched_iou[i].numpy(), ref_iou)


def test_bad_inputs_named():
    priors = small_priors().float()
    gt = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match=r"gt_valid: expected shape \(B=1, M=2\)"):
        match_priors(priors, gt, torch.ones(1, 3, dtype=torch.bool), pos_iou=0.5)
    with pytest.raises(ValueError, match=r"priors: expected shape \(P, 4\)"):
        match_priors(priors[None], gt, torch.ones(1, 2, dtype=torch.bool), pos_iou=0.5)
    with pytest.raises(ValueError, match="priors_format"):
        match_priors(priors, gt, torch.ones(1, 2, dtype=torch.bool), pos_iou=0.5, priors_format="xywh")
    with pytest.raises(TypeError, match="gt_valid"):
        match_priors(priors, gt, torch.ones(1, 2), pos_iou=0.5)


@SETTINGS
@given(gt_batches(), st.integers(0, 2**31 - 1))
def test_compacted_cpu_path_equals_dense_path(batch, seed):
    """On the CPU the matcher moves each image's usable GTs to the front and matches images in
    groups as wide as their largest count; the dense chunked path (taken with ``chunk_size``,
    and on accelerators) must give every field of the result bit for bit, also with padding
    slots between real ones."""
    gt, valid, options = batch
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(valid.shape, generator=gen).argsort(dim=1)  # interleave padding and real slots
    gt, valid = gt.gather(1, order.unsqueeze(2).expand(-1, -1, 4)), valid.gather(1, order)
    priors = small_priors()
    compacted = match_priors(priors, gt, valid, **options)
    dense = match_priors(priors, gt, valid, chunk_size=priors.shape[0], **options)
    for field in ("matched_gt", "matched_iou", "positive", "ignore", "forced", "best_prior", "best_prior_iou"):
        assert torch.equal(getattr(compacted, field), getattr(dense, field)), field

