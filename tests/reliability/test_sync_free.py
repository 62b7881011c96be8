"""DESIGN rule: the dense path never synchronises with the host. Every native loss's forward +
backward, dense strategy, value checks off, counted by ``benchmarks/dispatch_count.py``: no
value read back, no data-dependent shape, and no tensor built from Python numbers by a
blocking copy (on an accelerator that copy ends in a stream synchronisation).

DETR is left out: its Hungarian matching is one host round trip by design (SciPy), the only
one of the library's losses."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import detloss
from .cases import FAMILIES, loss_and_grads, make_case

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from dispatch_count import count_dispatch  # noqa: E402  (the benchmarks' operator counter)


@pytest.fixture
def dense_without_value_checks():
    detloss.set_value_checks(False)
    try:
        with detloss.execution_strategy("dense"):
            yield
    finally:
        detloss.set_value_checks(True)


@pytest.mark.usefixtures("dense_without_value_checks")
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "detr"])
@pytest.mark.parametrize("num_gt", [3, 0])
def test_dense_step_never_waits_for_the_host(family, num_gt):
    case = make_case(family, num_gt=num_gt)
    loss_and_grads(case)  # once first: what a loss builds once and keeps is not per step
    counts = count_dispatch(lambda: loss_and_grads(case))
    assert counts.ops > 0
    assert counts.syncs == 0, counts.sync_ops
    assert not counts.blocking_copies, counts.blocking_copies
