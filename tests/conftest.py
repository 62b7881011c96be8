"""Shared test fixtures: golden reference data and seeded RNGs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import detloss

HERE = Path(__file__).resolve().parent
# Golden data: $DETLOSS_GOLDEN, ../shared/golden beside the checkout, then the small copy in tests/data.
GOLDEN_DIRS = [
    Path(p) for p in [os.environ.get("DETLOSS_GOLDEN", "")] if p
] + [HERE.parent.parent / "shared" / "golden", HERE / "data" / "golden"]

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# DETLOSS_STRATEGY=dense runs the whole suite on the sync-free path (tests that need one
# strategy set it themselves); the default is "auto".
detloss.set_execution_strategy(os.environ.get("DETLOSS_STRATEGY", "auto"))


@pytest.fixture(params=["dense", "gathered"], scope="module")
def strategy(request: pytest.FixtureRequest):
    """Runs every test of a module that uses it under both execution strategies.

    Put ``pytestmark = pytest.mark.usefixtures("strategy")`` in a module (parity, oracle,
    property and reliability tests) or request ``strategy`` in one test. Module scope keeps
    hypothesis' per-example fixture check quiet: the strategy is global state, constant
    across the examples of one test.
    """
    with detloss.execution_strategy(request.param):
        yield request.param


def golden_path(name: str) -> Path | None:
    """Path of golden file ``name`` (e.g. ``"torch/ssd_box_utils.npz"``), or None."""
    for root in GOLDEN_DIRS:
        candidate = root / name
        if candidate.exists():
            return candidate
    return None


@pytest.fixture
def golden() -> Callable[[str], dict[str, np.ndarray]]:
    """Load a golden ``.npz`` as a dict of arrays; skips the test when the file is absent."""

    def load(name: str) -> dict[str, np.ndarray]:
        path = golden_path(name)
        if path is None:
            pytest.skip(f"golden file {name} not found in {[str(d) for d in GOLDEN_DIRS]}")
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    return load
