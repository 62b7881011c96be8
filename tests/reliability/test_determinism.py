"""Determinism: two runs on the same inputs give bitwise-equal losses and gradients (CPU).

The R-CNN / RPN samplers draw from a ``torch.Generator`` seeded identically for both runs
(:class:`reliability.cases.Case` makes a fresh one per call); a different seed draws other
samples, which shows the generator, not luck, makes the runs equal.
"""
from __future__ import annotations

import pytest
import torch

from .cases import FAMILIES, loss_and_grads, make_case, scalar_items

pytestmark = pytest.mark.usefixtures("strategy", "single_thread")  # every test under both execution strategies



@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kw", [{}, {"num_gt": [0, 4]}, {"logit_scale": 1e3}], ids=["plain", "empty-image", "large"])
def test_two_runs_bitwise_equal(family, kw):
    case = make_case(family, batch=3 if "num_gt" not in kw else 2, seed=41, **kw)
    out1, grads1 = loss_and_grads(case.leaves())
    out2, grads2 = loss_and_grads(case.leaves())
    for k, v in scalar_items(out1).items():
        assert torch.equal(v, out2[k]), k
    for g1, g2 in zip(grads1, grads2):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("family", ["rpn", "faster_rcnn"])
def test_sampling_follows_the_generator(family):
    case = make_case(family, batch=2, num_gt=3, seed=42)
    a = case.call(return_assignment=True)["assignment"].labels
    b = case.call(return_assignment=True)["assignment"].labels
    assert torch.equal(a, b)
    case.generator_seed = 43
    c = case.call(return_assignment=True)["assignment"].labels
    assert not torch.equal(a, c)
    assert torch.equal((a == 1).sum(1), (c == 1).sum(1))  # same counts, other draws


def test_proposal_sampling_follows_the_generator():
    from detloss.matching.rcnn_targets import proposal_targets

    case = make_case("rcnn", batch=2, num_gt=3, seed=44)
    gt = make_case("retinanet", batch=2, num_gt=3, seed=44)
    proposals = torch.rand(2, 40, 2) * 40
    proposals = torch.cat((proposals, proposals + 20), -1)
    kw = dict(num_samples=8, num_classes=4)
    labels = torch.ones(2, 3, dtype=torch.int64)
    r1 = proposal_targets(proposals, gt.args[3], labels, gt.args[5], generator=torch.Generator().manual_seed(1), **kw)
    r2 = proposal_targets(proposals, gt.args[3], labels, gt.args[5], generator=torch.Generator().manual_seed(1), **kw)
    r3 = proposal_targets(proposals, gt.args[3], labels, gt.args[5], generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(r1.roi_index, r2.roi_index) and torch.equal(r1.box_targets, r2.box_targets)
    assert not torch.equal(r1.roi_index, r3.roi_index)
    del case
