"""Resident-memory probe for the CPU benchmarks (Linux ``/proc``; ``ru_maxrss`` elsewhere).

``ru_maxrss`` is a high-water mark that input construction (NumPy arrays copied into tensors)
already raises, so the growth a loss causes on top of its inputs reads as 0. On Linux,
writing 5 to ``/proc/self/clear_refs`` resets that mark (``VmHWM``) to the current resident
size; :class:`PeakResident` does so just before the measured code.
"""
from __future__ import annotations

import gc
import resource


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakResident:
    """``with PeakResident() as probe: ...``; then ``probe.growth_mib``: the peak resident size
    during the block above the resident size at its start, in MiB (where the high-water mark
    cannot be reset, the growth of ``ru_maxrss``, which may read low)."""

    def __enter__(self) -> "PeakResident":
        gc.collect()
        self._start = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._exact = self._start is not None
        except OSError:
            self._exact = False
        if not self._exact:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kib("VmHWM") if self._exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.growth_mib = max(0, peak - self._start) / 1024
