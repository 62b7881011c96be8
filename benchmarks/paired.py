"""Paired measurements of several formulations of one step, for the CPU benchmarks: median
milliseconds over interleaved runs (each round runs every form once, so machine noise hits them
alike) and the peak resident growth of repeated runs (:class:`resident_memory.PeakResident`)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

from resident_memory import PeakResident


def paired_medians(steps: dict[str, Callable[[], None]], runs: int) -> dict[str, float]:
    """Median ms of each step over ``runs`` interleaved rounds, after one warm-up call of each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(runs):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_growth(step: Callable[[], None], runs: int) -> dict:
    """``{"peak_mib": ...}``: the peak resident growth over ``runs`` calls of ``step``."""
    with PeakResident() as probe:
        for _ in range(runs):
            step()
    return {"peak_mib": probe.growth_mib}
