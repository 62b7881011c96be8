"""Shared test fixtures: golden reference data and seeded RNGs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
# Golden data: $DETLOSS_GOLDEN, ../shared/golden beside the checkout, then the small copy in tests/data.
GOLDEN_DIRS = [
    Path(p) for p in [os.environ.get("DETLOSS_GOLDEN", "")] if p
] + [HERE.parent.parent / "shared" / "golden", HERE / "data" / "golden"]

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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
