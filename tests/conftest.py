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

# DETLOSS_STRATEGY=dense runs the whole suite on the sync-free path (tests that need one
# strategy set it themselves); the default is "auto".
detloss.set_execution_strategy(os.environ.get("DETLOSS_STRATEGY", "auto"))
SUITE_THREADS = 2  # at most: the suite runs two workers on a 2-core machine


@pytest.fixture(autouse=True)
def isolated_global_state():
    """Every test starts from the same global state and leaves none behind: torch's global RNG
    seeded (an unseeded ``torch.randn`` gives the same numbers whatever ran before), at most
    ``SUITE_THREADS`` threads, value checks on; these and the execution strategy (set by the
    module-scoped :func:`strategy`, or by the test) are restored after the test."""
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    checks, strategy = detloss.value_checks_enabled(), detloss.get_execution_strategy()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(SUITE_THREADS, threads)))
    detloss.set_value_checks(True)
    yield
    torch.random.set_rng_state(rng)
    torch.set_num_threads(threads)
    detloss.set_value_checks(checks)
    detloss.set_execution_strategy(strategy)


@pytest.fixture
def single_thread():
    """One intra-op thread for the test (timing- or order-sensitive reductions); restored after
    by :func:`isolated_global_state`."""
    torch.set_num_threads(1)


@pytest.fixture(params=["dense", "gathered"], scope="module")
def strategy(request: pytest.FixtureRequest):
    """Runs every test of a module that uses it under both execution strategies.

    Only for modules whose code under test reads the strategy (``host_sync_is_free``: the
    MultiBox terms and their selection and mining, ``_memory.new_like`` of the focal and YOLOv3
    gradients, the task-aligned assigner, and the losses and drop-ins built on them); the others
    would run the same code twice.

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
