"""detloss.strategy: the one switch between the sync-free ("dense") path and the CPU-only
gathered paths."""
from __future__ import annotations

import pytest
import torch

import detloss
from detloss.strategy import host_sync_is_free


@pytest.mark.parametrize("name", ["fast", "", "Dense", None, 1])
def test_unknown_strategy_names_are_refused(name):
    before = detloss.get_execution_strategy()
    with pytest.raises((ValueError, TypeError), match="strategy"):
        detloss.set_execution_strategy(name)
    with pytest.raises((ValueError, TypeError), match="strategy"):
        with detloss.execution_strategy(name):
            pass
    assert detloss.get_execution_strategy() == before


def test_the_context_restores_the_previous_strategy_after_an_exception():
    detloss.set_execution_strategy("gathered")
    with pytest.raises(RuntimeError, match="inside"):
        with detloss.execution_strategy("dense"):
            assert detloss.get_execution_strategy() == "dense"
            raise RuntimeError("inside")
    assert detloss.get_execution_strategy() == "gathered"


def test_contexts_nest():
    with detloss.execution_strategy("dense"):
        with detloss.execution_strategy("gathered"):
            assert detloss.get_execution_strategy() == "gathered"
        assert detloss.get_execution_strategy() == "dense"


def test_auto_gathers_on_the_cpu_only_outside_compile():
    cpu = torch.zeros(2)
    with detloss.execution_strategy("auto"):
        assert host_sync_is_free(cpu)
        assert not host_sync_is_free(torch.zeros(2, device="meta"))  # not the CPU: an accelerator's rule
        assert not torch.compile(lambda x: torch.tensor(host_sync_is_free(x)), fullgraph=True)(cpu)
    with detloss.execution_strategy("dense"):
        assert not host_sync_is_free(cpu)
    with detloss.execution_strategy("gathered"):  # cannot make a read free off the CPU: dense there
        assert host_sync_is_free(cpu)
        assert not host_sync_is_free(torch.zeros(2, device="meta"))
