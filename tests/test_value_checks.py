"""ValueChecks: every value check of an entry point in one host read; a wrapper's checks join
the read of the loss it calls (detloss._validate)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import detloss
from detloss._validate import ValueChecks, joined_value_checks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dispatch_count import count_dispatch  # noqa: E402


def _bad_labels() -> torch.Tensor:
    return torch.tensor([0, 9])


def test_many_checks_cost_one_read_and_name_the_first_failure():
    boxes = torch.tensor([[0.0, 0.0, 1.0, float("nan")]])
    checks = ValueChecks().in_range(_bad_labels(), "gt_labels", 0, 4).finite(boxes, "gt_boxes")
    assert checks.checked == [("gt_labels", "range"), ("gt_boxes", "finite")]
    with pytest.raises(ValueError, match=r"gt_labels: expected values in \[0, 4\], got min 0 and max 9"):
        checks.run()
    good = ValueChecks().in_range(torch.tensor([1, 2]), "gt_labels", 0, 4).finite(boxes[:, :3], "gt_boxes")
    assert count_dispatch(good.run).syncs == 1


def test_run_reads_a_count_in_the_same_read():
    checks = ValueChecks().finite(torch.ones(3), "x")
    counts = count_dispatch(lambda: checks.run(also=torch.tensor(41)))
    assert counts.syncs == 1
    assert ValueChecks().finite(torch.ones(3), "x").run(also=torch.tensor(41)) == 41


def test_joined_checks_ride_on_the_next_run_inside_the_block():
    def step():
        with joined_value_checks() as outer:
            outer.in_range(torch.tensor([1]), "targets", 0, 4)
            ValueChecks().finite(torch.ones(2), "gt_boxes").run()

    assert count_dispatch(step).syncs == 1
    with pytest.raises(ValueError, match="targets: expected values"):
        with joined_value_checks() as outer:
            outer.in_range(_bad_labels(), "targets", 0, 4)
            ValueChecks().finite(torch.ones(2), "gt_boxes").run()  # the joined check is read (and fails) here


def test_joined_checks_run_at_the_end_when_nothing_inside_runs():
    with pytest.raises(ValueError, match="targets: expected values"):
        with joined_value_checks() as outer:
            outer.in_range(_bad_labels(), "targets", 0, 4)


def test_an_error_inside_the_block_is_not_masked_by_the_joined_checks():
    with pytest.raises(KeyError):
        with joined_value_checks() as outer:
            outer.in_range(_bad_labels(), "targets", 0, 4)
            raise KeyError("inner")


def test_switched_off_checks_queue_nothing_and_read_nothing():
    previous = detloss.value_checks_enabled()
    detloss.set_value_checks(False)
    try:
        checks = ValueChecks().in_range(_bad_labels(), "gt_labels", 0, 4)
        assert checks.checked == []
        assert count_dispatch(checks.run).syncs == 0
    finally:
        detloss.set_value_checks(previous)
    assert detloss.value_checks_enabled() is previous
