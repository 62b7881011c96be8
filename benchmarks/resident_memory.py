"""Memory probes for the CPU benchmarks.

* :class:`PeakResident`: resident-set growth (Linux ``/proc``; ``ru_maxrss`` elsewhere).
  ``ru_maxrss`` is a high-water mark that input construction (NumPy arrays copied into
  tensors) already raises, so the growth a loss causes on top of its inputs reads as 0. On
  Linux, writing 5 to ``/proc/self/clear_refs`` resets that mark (``VmHWM``) to the current
  resident size; :class:`PeakResident` does so just before the measured code. The figure
  also moves with what glibc keeps of freed memory (the same code reads 1.0x or 1.3x of a
  tensor from run to run), and pages allocated but never touched do not count.
* :class:`PeakAllocated`: the most bytes held by live allocations (glibc ``mallinfo2``:
  in-use heap plus mapped blocks), read after every operator a :class:`TorchDispatchMode`
  sees, forward and backward: the CPU's counterpart of ``torch.cuda.max_memory_allocated``,
  and the same number on every run.
"""
from __future__ import annotations

import ctypes
import gc
import resource

from torch.utils._python_dispatch import TorchDispatchMode


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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _allocated_bytes_reader():
    """A function returning the bytes held by live allocations (glibc 2.33+), or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def read() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return read


_read_allocated = _allocated_bytes_reader()


class PeakAllocated(TorchDispatchMode):
    """``with PeakAllocated() as probe: ...``; then ``probe.growth_mib``: the most bytes held by
    live allocations after any operator of the block, above the bytes held at its start, in
    MiB (None where glibc's ``mallinfo2`` is missing). Enter it once before measuring: the
    first use of a dispatch mode allocates about 20 MiB of its own, once per process."""

    available = _read_allocated is not None

    def __enter__(self) -> "PeakAllocated":
        gc.collect()
        self._start = self._peak = _read_allocated() if self.available else 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.available:
            self._peak = max(self._peak, _read_allocated())
        return out

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.growth_mib = (self._peak - self._start) / 2**20 if self.available else None
