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
# Golden data: the cases the tests use, copied into the repository (tests/data/golden/README.md),
# so that a plain clone proves parity. A missing file fails its test.
GOLDEN_DIR = HERE / "data" / "golden"

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


def golden_path(name: str) -> Path:
    """Path of golden file ``name`` (e.g. ``"torch/ssd_box_utils.npz"``) under ``tests/data/golden``;
    the calling test fails when it is missing (never skips)."""
    path = GOLDEN_DIR / name
    if not path.is_file():
        pytest.fail(f"golden file {name} missing from {GOLDEN_DIR} (see its README.md)", pytrace=False)
    return path


def golden_cases(pattern: str) -> list[str]:
    """Names (without the suffix) of the golden files matching ``pattern`` (e.g. ``"torch/ssd300_*.npz"``),
    sorted: case lists are globbed, so a new case file is picked up. Fails collection when none match."""
    found = sorted(p.name.split(".")[0] for p in GOLDEN_DIR.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no golden file matches {pattern} under {GOLDEN_DIR}")
    return found


@pytest.fixture
def golden() -> Callable[[str], dict[str, np.ndarray]]:
    """Load a golden ``.npz`` as a dict of arrays; the test fails when the file is missing."""

    def load(name: str) -> dict[str, np.ndarray]:
        with np.load(golden_path(name)) as data:
            return {k: data[k] for k in data.files}

    return load
