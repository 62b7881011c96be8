"""pad_ground_truth: layout, padding values, empty images, extras, dtype/device."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import pad_ground_truth


@st.composite
def ground_truth(draw):
    counts = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    boxes, labels, extras = [], [], []
    for i, n in enumerate(counts):
        b = np.array(draw(st.lists(st.lists(st.floats(-10, 10), min_size=4, max_size=4), min_size=n, max_size=n)))
        # an empty image arrives as (0, 4) or as the easy-to-pass-by-mistake (0,)
        boxes.append(torch.tensor(b, dtype=torch.float64).reshape(n, 4) if n or draw(st.booleans()) else torch.zeros(0, dtype=torch.float64))
        labels.append(torch.tensor(draw(st.lists(st.integers(0, 20), min_size=n, max_size=n)), dtype=torch.int64))
        extras.append(torch.arange(n * 10, dtype=torch.float64).reshape(n, 10) + 100 * i)
    return counts, boxes, labels, extras


@settings(max_examples=200, deadline=None)
@given(ground_truth(), st.integers(0, 3), st.sampled_from([-1, 0, 255]), st.booleans())
def test_pad_ground_truth_layout(gt, extra_rows, pad_label, with_extras):
    counts, boxes, labels, extras = gt
    m_max = max(counts, default=0)
    max_boxes = m_max + extra_rows if extra_rows else None
    out = pad_ground_truth(boxes, labels, extras if with_extras else None, max_boxes=max_boxes, pad_label=pad_label)
    assert len(out) == (4 if with_extras else 3)
    pb, pl, valid = out[:3]
    m = m_max + extra_rows if extra_rows else m_max
    assert pb.shape == (len(counts), m, 4) and pl.shape == (len(counts), m) and valid.shape == (len(counts), m)
    assert pl.dtype == torch.int64 and valid.dtype == torch.bool
    assert pb.dtype == (torch.float64 if counts else torch.float32)
    for i, n in enumerate(counts):
        assert valid[i].tolist() == [True] * n + [False] * (m - n)
        torch.testing.assert_close(pb[i, :n], boxes[i].reshape(n, 4), rtol=0, atol=0)
        assert pl[i, :n].tolist() == labels[i].tolist()
        assert bool((pb[i, n:] == 0).all()) and bool((pl[i, n:] == pad_label).all())
        if with_extras:
            pe = out[3]
            assert pe.shape[:2] == (len(counts), m)
            if n:
                torch.testing.assert_close(pe[i, :n], extras[i], rtol=0, atol=0)
            assert bool((pe[i, n:] == 0).all())


def test_empty_batch_and_all_empty_images():
    b, l, v = pad_ground_truth([], [])
    assert b.shape == (0, 0, 4) and b.dtype == torch.float32 and l.shape == (0, 0) and v.shape == (0, 0)
    b, l, v = pad_ground_truth([torch.zeros(0, 4), torch.zeros(0)], [torch.zeros(0, dtype=torch.long)] * 2)
    assert b.shape == (2, 0, 4) and not bool(v.any())
    b, l, v = pad_ground_truth([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], max_boxes=3, pad_label=7)
    assert b.shape == (1, 3, 4) and l.tolist() == [[7, 7, 7]] and not bool(v.any())


def test_dtype_follows_first_image_and_labels_accept_column_shape():
    b, l, v = pad_ground_truth(
        [torch.ones(2, 4, dtype=torch.float16), torch.ones(1, 4)],
        [torch.tensor([[1], [2]], dtype=torch.int32), torch.tensor([3])],
    )
    assert b.dtype == torch.float16 and l.dtype == torch.int64
    assert l.tolist() == [[1, 2], [3, -1]] and v.tolist() == [[True, True], [True, False]]
